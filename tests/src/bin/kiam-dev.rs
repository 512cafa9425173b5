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
    /// Run a command inside a pod of a running `demo --keep`: in its cgroup and network
    /// namespace, with the environment an SDK in a pod has (no credentials but the metadata
    /// service's) and the test virtualenv's AWS CLI on PATH.
    DemoExec {
        /// The pod: frontend or backend.
        pod: String,
        /// The command and its arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        command: Vec<String>,
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
    let node = Node::new();
    let id = node.id.clone();
    println!(
        "Starting demo kiam-e2e-{id}: moto (STS), the Kubernetes API emulator, two kiam servers, the agent …"
    );
    ctrlc::set_handler(move || {
        eprintln!("\ninterrupted: cleaning up");
        let _ = std::fs::remove_file(demo_state());
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
    if arns.len() != 2 || arns[0] == arns[1] {
        bail!("expected two different assumed roles, got {arns:?}");
    }
    if !keep {
        println!();
        println!(
            "Rerun with `sudo -E cargo xtask demo --keep` to explore: bpftool, `kiam-agent status`,"
        );
        println!("and `cargo xtask demo exec <pod> -- <command>` to run commands in a pod.");
        println!("\nCleaning up.");
        return Ok(());
    }
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
    let state: serde_json::Map<String, serde_json::Value> = pods
        .iter()
        .map(|(pod, name, _)| {
            (
                (*name).to_owned(),
                json!({
                    "cgroup": pod.cgroup,
                    "netns": pod.netns,
                    "home": cluster.home(),
                }),
            )
        })
        .collect();
    std::fs::create_dir_all(demo_state().parent().unwrap_or(std::path::Path::new(".")))?;
    std::fs::write(demo_state(), serde_json::to_vec_pretty(&state)?)?;
    println!();
    println!("Run commands inside a pod, from another terminal (as root):");
    println!(
        "  cargo xtask demo exec frontend -- aws sts get-caller-identity --endpoint-url {}",
        kiam_e2e::cluster::STS_URL
    );
    println!(
        "  cargo xtask demo exec backend -- curl -s http://169.254.169.254/latest/meta-data/iam/security-credentials/"
    );
    println!("\nRunning until Ctrl-C.");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Where a running `demo --keep` says where its pods are.
fn demo_state() -> PathBuf {
    repo("target/demo/pods.json")
}

fn demo_exec(pod: &str, command: &[String]) -> ExitCode {
    let run = || -> anyhow::Result<ExitCode> {
        let state: serde_json::Value = serde_json::from_slice(
            &std::fs::read(demo_state())
                .context("no demo running: start `sudo -E cargo xtask demo --keep` first")?,
        )?;
        let Some(found) = state.get(pod) else {
            let names: Vec<&String> = state
                .as_object()
                .map(|o| o.keys().collect())
                .unwrap_or_default();
            bail!("no pod {pod:?} in the demo; its pods: {names:?}");
        };
        let field = |key: &str| found[key].as_str().map(str::to_owned).context("demo state");
        let (cgroup, netns, home) = (field("cgroup")?, field("netns")?, field("home")?);
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!("echo $$ > '{cgroup}/cgroup.procs' && exec \"$@\""))
            .arg("sh")
            .arg("nsenter")
            .arg(format!("--net=/var/run/netns/{netns}"))
            .arg("--")
            .args(command);
        node::sdk_env(&mut cmd, std::path::Path::new(&home));
        cmd.env(
            "PATH",
            format!(
                "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                repo(".venv/bin").display()
            ),
        );
        let status = cmd.status().context("running the command in the pod")?;
        Ok(ExitCode::from(
            status.code().unwrap_or(1).clamp(0, 255) as u8
        ))
    };
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kiam-dev: {e:#}");
            ExitCode::FAILURE
        }
    }
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
        (
            "kiam-agent prepare-node",
            &agent,
            &["prepare-node", "--help"][..],
        ),
        ("kiam-agent health", &agent, &["health", "--help"][..]),
        ("kiam-agent probe", &agent, &["probe", "--help"][..]),
        ("kiam-server", &server, &["--help"][..]),
        ("kiam-server health", &server, &["health", "--help"][..]),
        ("kiam-server probe", &server, &["probe", "--help"][..]),
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
        Cmd::DemoExec { pod, command } => return demo_exec(&pod, &command),
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
