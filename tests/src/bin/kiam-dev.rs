//! Developer commands that need the test infrastructure (run through `cargo xtask`):
//!
//! - `demo`: the whole product on this machine: moto as STS, the Kubernetes API emulator with
//!   a namespace permitting two roles and two annotated pods, two kiam servers with generated
//!   mTLS material, the agent with its eBPF redirect; the real AWS CLI runs inside each demo
//!   pod (a network namespace and a kubelet-shaped cgroup) and the roles they got are printed
//!   side by side. Everything is removed on exit and on Ctrl-C.
//! - `certs`: a development CA, server certificate and agent certificates.

use std::{
    path::PathBuf,
    process::{Command, ExitCode},
    time::Duration,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use kiam_e2e::{
    cluster::Cluster,
    node::{self, Node, Pod},
    repo, stack,
};
use serde_json::json;

#[derive(Parser)]
#[command(name = "kiam-dev")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the demo (root, cgroup v2, BPF).
    Demo {
        /// Keep everything running until Ctrl-C, to explore with bpftool and the CLI.
        #[arg(long)]
        keep: bool,
    },
    /// Print docs/flags.md: every command's --help (`cargo xtask docs` writes it).
    FlagsDoc,
    /// Write a development PKI for kiam.
    Certs {
        /// Output directory.
        #[arg(long, default_value = "target/kiam-certs")]
        out: PathBuf,
        /// DNS names of the server certificate.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "kiam-server,kiam-server.kube-system.svc,localhost"
        )]
        server_names: Vec<String>,
        /// Nodes to issue agent certificates with a node identity for (a shared agent
        /// certificate without one is always written).
        #[arg(long, value_delimiter = ',')]
        nodes: Vec<String>,
    },
}

const ROLES: [(&str, &str); 2] = [("frontend", "app-frontend"), ("backend", "app-backend")];

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|r| r.split_whitespace().nth(1).map(str::to_owned))
        })
        .is_some_and(|uid| uid == "0")
}

/// Why the demo cannot run here, if it cannot.
fn preflight() -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "the demo needs root (BPF programs, cgroups, network namespaces): run `sudo -E cargo xtask demo`"
        );
    }
    if !["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .iter()
        .any(|p| std::path::Path::new(p).join("cgroup.controllers").exists())
    {
        bail!(
            "no cgroup v2 file system at /sys/fs/cgroup or /sys/fs/cgroup/unified: kiam needs cgroup v2 (boot with systemd.unified_cgroup_hierarchy=1)"
        );
    }
    for tool in ["ip", "nsenter", "bpftool"] {
        if Command::new(tool).arg("--version").output().is_err() {
            bail!("{tool} is missing: run `cargo xtask setup`");
        }
    }
    for (path, fix) in [
        (repo(".venv/bin/aws"), "run `cargo xtask setup`"),
        (
            kiam_e2e::workspace_bin("kiam-agent"),
            "run `cargo xtask demo` (it builds everything)",
        ),
    ] {
        if !path.exists() {
            bail!("{} is missing: {fix}", path.display());
        }
    }
    Ok(())
}

/// The ARN the AWS CLI gets inside `pod`.
fn whoami(cluster: &Cluster, pod: &Pod) -> anyhow::Result<String> {
    let out = cluster.aws_whoami(pod);
    match out.status.success() {
        true => Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned()),
        false => bail!("{}", String::from_utf8_lossy(&out.stderr).trim()),
    }
}

fn demo(keep: bool) -> anyhow::Result<()> {
    preflight()?;
    println!("Starting: moto (STS), the Kubernetes API emulator, two kiam servers, the agent …");
    let node = Node::new();
    let id = node.id.clone();
    ctrlc::set_handler(move || {
        eprintln!("\ninterrupted: cleaning up");
        kiam_e2e::kill_tracked();
        node::cleanup(&id);
        std::process::exit(130);
    })
    .context("installing the Ctrl-C handler")?;

    let mut cluster = Cluster::start(
        node,
        "demo",
        json!({"iam.amazonaws.com/permitted": "app-frontend|app-backend"}),
        &[],
    );
    let pods: Vec<(Pod, &str, &str)> = ROLES
        .iter()
        .map(|(name, role)| {
            let pod = cluster.pod(name, json!({"iam.amazonaws.com/role": role}));
            (pod, *name, *role)
        })
        .collect();
    // The servers prefetch the roles as soon as their watches deliver the pods.
    std::thread::sleep(Duration::from_millis(500));

    println!();
    println!(
        "{:<10} {:<14} aws sts get-caller-identity, run inside the pod",
        "POD", "ANNOTATION"
    );
    let mut arns = Vec::new();
    for (pod, name, role) in &pods {
        let arn = whoami(&cluster, pod).with_context(|| format!("the AWS CLI in pod {name}"))?;
        println!("{name:<10} {role:<14} {arn}");
        arns.push(arn);
    }
    println!();
    println!("Each pod connected to 169.254.169.254; kiam's eBPF programs sent it to the agent,");
    println!("which knew the pod from its cgroup and asked the servers for that pod's role.");
    println!(
        "Nothing reached the node's metadata service: {} connections.",
        cluster.node.fake_imds_connections()
    );
    println!();
    println!("Inspect the kernel side:");
    let node = &cluster.node;
    let tree = node.bpftool_cgroup_tree();
    println!("  bpftool cgroup tree {}", node.test_cgroup.display());
    for line in tree
        .lines()
        .filter(|l| l.contains("kiam_") || l.starts_with('/'))
    {
        println!("      {line}");
    }
    let maps = node
        .pin_dir
        .join(format!("maps-v{}", kiam_common::LAYOUT_VERSION));
    println!("  bpftool prog list | grep -A3 kiam_");
    println!("  bpftool map dump pinned {}/KIAM_CONFIG", maps.display());
    println!("  bpftool map dump pinned {}/KIAM_STATS", maps.display());
    println!(
        "  {} status --bpffs-dir {}",
        node::agent_bin().display(),
        node.pin_dir.display()
    );
    if arns.len() != 2 || arns[0] == arns[1] {
        bail!("expected two different assumed roles, got {arns:?}");
    }
    if keep {
        println!("\nRunning until Ctrl-C.");
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    println!("\nCleaning up.");
    Ok(())
}

fn certs(out: PathBuf, server_names: Vec<String>, nodes: Vec<String>) -> anyhow::Result<()> {
    let names: Vec<&str> = server_names.iter().map(String::as_str).collect();
    let nodes: Vec<&str> = nodes.iter().map(String::as_str).collect();
    stack::write_dev_pki(&out, &names, &nodes)
        .with_context(|| format!("writing to {}", out.display()))?;
    println!("Wrote a development PKI to {}:", out.display());
    println!("  ca.pem                       CA for --tls-ca (agent and server)");
    println!(
        "  server.pem, server-key.pem   server certificate for {}",
        names.join(", ")
    );
    println!("  agent-shared.pem, -key.pem   agent certificate without a node identity");
    for node in nodes {
        println!(
            "  agent-{node}.pem, -key.pem   agent certificate for node {node} (spiffe://kiam/node/{node})"
        );
    }
    println!("For development and clusters without cert-manager only; keep the keys secret.");
    Ok(())
}

/// The flags reference, from the binaries' own `--help`, so it cannot drift.
pub fn flags_doc() -> anyhow::Result<String> {
    let mut out = String::from(
        "# Flags\n\nGenerated from each command's `--help` by `cargo xtask docs`; a test fails when this\nfile and the binaries disagree. Every flag can also be set with the environment variable\nshown.\n",
    );
    let agent = kiam_e2e::workspace_bin("kiam-agent");
    let server = kiam_e2e::workspace_bin("kiam-server");
    for (title, bin, args) in [
        ("kiam-agent run", &agent, &["run", "--help"][..]),
        ("kiam-agent status", &agent, &["status", "--help"][..]),
        ("kiam-agent uninstall", &agent, &["uninstall", "--help"][..]),
        (
            "kiam-agent mount-bpffs",
            &agent,
            &["mount-bpffs", "--help"][..],
        ),
        ("kiam-server", &server, &["--help"][..]),
    ] {
        // A clean environment: clap shows the values of set variables.
        let help = Command::new(bin)
            .args(args)
            .env_clear()
            .env("NO_COLOR", "1")
            .output()
            .with_context(|| format!("running {}", bin.display()))?;
        if !help.status.success() {
            bail!("{title} --help failed");
        }
        out.push_str(&format!(
            "\n## `{title}`\n\n```text\n{}```\n",
            String::from_utf8_lossy(&help.stdout)
        ));
    }
    Ok(out)
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Cmd::FlagsDoc => flags_doc().map(|doc| print!("{doc}")),
        Cmd::Demo { keep } => demo(keep),
        Cmd::Certs {
            out,
            server_names,
            nodes,
        } => certs(out, server_names, nodes),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kiam-dev: {e:#}");
            ExitCode::FAILURE
        }
    }
}
