//! Developer commands that need the test infrastructure (run through `cargo xtask`):
//!
//! - `demo`: the whole product on this machine, on the node lab (`kiam_e2e::lab`): containerd
//!   with CRI and CNI, a stand-in kubelet, the API emulator and moto as STS; kiam from the
//!   shipped manifests and images; a namespace permitting two roles and two annotated pods,
//!   real containers in which the AWS CLI runs, and the roles they got printed side by side.
//!   Everything is removed on exit and on Ctrl-C.
//! - `certs`: a development CA, server certificate and agent certificates.

use std::{
    path::PathBuf,
    process::{Command, ExitCode},
    time::Duration,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use k8s_cri::v1 as cri;
use kiam_e2e::{
    lab::{self, Lab, LabPod},
    node::Node,
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
    /// Run a command in a container of a running `demo --keep` (CRI ExecSync, as `kubectl
    /// exec` reaches the runtime); prints its output and exits with its code.
    DemoExec {
        /// The pod: frontend, backend, or one of kiam's (kiam-agent-lab01, ...).
        pod: String,
        /// The container, when the pod runs more than one.
        #[arg(long, short)]
        container: Option<String>,
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

/// A demo pod: its name, its role annotation, and its containers, each with the role the
/// container-roles annotation gives it, if any. `shop` runs an envoy sidecar with a role of
/// its own.
type DemoPod = (
    &'static str,
    &'static str,
    &'static [(&'static str, Option<&'static str>)],
);

const PODS: [DemoPod; 3] = [
    ("frontend", "app-frontend", &[("app", None)]),
    ("backend", "app-backend", &[("app", None)]),
    (
        "shop",
        "app-shop",
        &[("app", None), ("envoy", Some("app-envoy"))],
    ),
];
const DEMO_NAMESPACE: &str = "demo";

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
            "the demo needs root (containerd, BPF programs, cgroups, network namespaces): run `sudo -E cargo xtask demo`"
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
    for tool in ["ip", "nsenter", "bpftool", "kubectl"] {
        if Command::new(tool).arg("--version").output().is_err() {
            bail!("{tool} is missing: run `cargo xtask setup`");
        }
    }
    lab::preflight().map_err(|why| anyhow::anyhow!("{why} (`cargo xtask demo` does all of it)"))
}

/// A demo pod's containers from the lab's workload image (the AWS CLI, boto3, the Rust SDK),
/// with the region and moto's STS endpoint in their environment as an operator's pod would
/// have its region.
fn demo_pod(lab: &mut Lab, (name, role, containers): DemoPod) -> LabPod {
    let sts = format!("http://{}:{}", lab::NODE_IP, lab.sts.moto_port);
    let mut annotations = json!({"iam.amazonaws.com/role": role});
    let own: serde_json::Map<String, serde_json::Value> = containers
        .iter()
        .filter_map(|(container, own)| own.map(|role| ((*container).to_owned(), json!(role))))
        .collect();
    if !own.is_empty() {
        annotations["iam.amazonaws.com/container-roles"] =
            json!(serde_json::Value::Object(own).to_string());
    }
    let containers: Vec<serde_json::Value> = containers
        .iter()
        .map(|(container, _)| {
            json!({"name": container, "image": lab::workload_image(),
                "env": [{"name": "AWS_DEFAULT_REGION", "value": "us-east-1"},
                        {"name": "AWS_ENDPOINT_URL_STS", "value": sts}]})
        })
        .collect();
    lab.create_pod(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": DEMO_NAMESPACE, "annotations": annotations},
        "spec": {"terminationGracePeriodSeconds": 1, "containers": containers}}))
}

fn demo(keep: bool) -> anyhow::Result<()> {
    preflight()?;
    let node = Node::new();
    let id = node.id.clone();
    println!(
        "Starting demo kiam-e2e-{id}: a node lab (containerd with CRI and CNI, a stand-in kubelet, the API emulator, moto as STS) running kiam from the shipped manifests and images …"
    );
    ctrlc::set_handler(move || {
        eprintln!("\ninterrupted: cleaning up");
        let _ = std::fs::remove_file(demo_state());
        lab::cleanup(&id);
        std::process::exit(130);
    })
    .context("installing the Ctrl-C handler")?;
    let mut lab = Lab::start_on(node);
    lab.ensure_namespace(
        DEMO_NAMESPACE,
        json!({"iam.amazonaws.com/permitted": "app-(frontend|backend|shop|envoy)"}),
    );
    let pods: Vec<(LabPod, DemoPod)> = PODS
        .iter()
        .map(|demo| (demo_pod(&mut lab, *demo), *demo))
        .collect();
    for (pod, ..) in &pods {
        lab.wait_pod_ready(pod, Duration::from_secs(120));
    }
    println!();
    println!("kiam, as the manifests in deploy/kustomize/base deploy it:");
    for pod in lab.pods() {
        let namespace = pod["metadata"]["namespace"].as_str().unwrap_or("");
        if namespace != "kiam" {
            continue;
        }
        println!(
            "  {namespace}/{:<18} {:<40} {}",
            pod["metadata"]["name"].as_str().unwrap_or(""),
            pod["spec"]["containers"][0]["image"].as_str().unwrap_or(""),
            pod["status"]["podIP"].as_str().unwrap_or(""),
        );
    }
    println!();
    println!(
        "{:<14} {:<27} {:<14} aws sts get-caller-identity, run in the container",
        "POD/CONTAINER", "ANNOTATIONS", "CONTAINER ID"
    );
    let mut arns = Vec::new();
    for (pod, (_, role, containers)) in &pods {
        for (container, own) in *containers {
            let id = lab.container_id(pod, container).unwrap_or_default();
            let (code, out, err) =
                lab.exec(pod, container, &lab::AWS_WHOAMI, Duration::from_secs(60));
            if code != 0 {
                bail!(
                    "the AWS CLI in {}/{container}: {}{}",
                    pod.name,
                    out,
                    err.trim()
                );
            }
            let arn = out.trim().to_owned();
            // Whose role the container gets: its own, or the pod's.
            let annotation = match own {
                Some(own) => format!("container-roles: {own}"),
                None => format!("role: {role}"),
            };
            println!(
                "{:<14} {annotation:<27} {:<14} {arn}",
                format!("{}/{container}", pod.name),
                &id[..id.len().min(12)]
            );
            arns.push(arn);
        }
    }
    println!();
    println!(
        "Each container's AWS CLI connected to 169.254.169.254; kiam's eBPF programs sent it to"
    );
    println!("the agent, which knew the pod and container from the caller's cgroup and asked the");
    println!("servers for that container's role: the pod's, or its own where the pod's");
    println!("iam.amazonaws.com/container-roles annotation lists it (shop's envoy sidecar).");
    println!(
        "Nothing reached the node's metadata service: {} connections.",
        lab.node.fake_imds_connections()
    );
    let distinct: std::collections::HashSet<&String> = arns.iter().collect();
    if arns.len() != 4 || distinct.len() != 4 {
        bail!("expected four different assumed roles, got {arns:?}");
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
    let kubepods = lab.node.test_cgroup.join("kubepods");
    println!("  bpftool cgroup tree {}", kubepods.display());
    let tree = Command::new("bpftool")
        .args(["cgroup", "tree"])
        .arg(&kubepods)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    for line in tree
        .lines()
        .filter(|l| l.contains("kiam_") || l.starts_with('/'))
    {
        println!("      {line}");
    }
    println!("  bpftool prog list | grep -A3 kiam_");
    println!(
        "  cargo xtask demo exec {} -- kiam-agent status",
        lab.agent.name
    );
    std::fs::create_dir_all(demo_state().parent().unwrap_or(std::path::Path::new(".")))?;
    std::fs::write(
        demo_state(),
        serde_json::to_vec_pretty(&json!({"cri": lab.cri_socket()}))?,
    )?;
    println!();
    println!(
        "Run commands in a pod's container (CRI ExecSync, as kubectl exec), from another terminal (as root):"
    );
    println!("  cargo xtask demo exec frontend -- aws sts get-caller-identity");
    println!(
        "  cargo xtask demo exec backend -- kiam-e2e-helper get http://169.254.169.254/latest/meta-data/iam/security-credentials/"
    );
    println!("\nRunning until Ctrl-C.");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Where a running `demo --keep` says where its runtime is.
fn demo_state() -> PathBuf {
    repo("target/demo/lab.json")
}

/// `command` in `pod`'s container (`container`, or its only running one) through the demo
/// runtime's CRI ExecSync: its output, then its exit code.
fn demo_exec(pod: &str, container: Option<&str>, command: &[String]) -> anyhow::Result<ExitCode> {
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(demo_state())
            .context("no demo running: start `sudo -E cargo xtask demo --keep` first")?,
    )?;
    let socket = state["cri"].as_str().context("demo state: no CRI socket")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("unix://{socket}"))?
            .connect()
            .await
            .context("the demo's containerd (is `cargo xtask demo --keep` still running?)")?;
        let mut cri = cri::runtime_service_client::RuntimeServiceClient::new(channel);
        let running = cri
            .list_containers(cri::ListContainersRequest {
                filter: Some(cri::ContainerFilter {
                    state: Some(cri::ContainerStateValue {
                        state: cri::ContainerState::ContainerRunning as i32,
                    }),
                    ..Default::default()
                }),
            })
            .await?
            .into_inner()
            .containers;
        let label = |c: &cri::Container, key: &str| c.labels.get(key).cloned().unwrap_or_default();
        let in_pod: Vec<&cri::Container> = running
            .iter()
            .filter(|c| label(c, "io.kubernetes.pod.name") == pod)
            .collect();
        if in_pod.is_empty() {
            let mut pods: Vec<String> = running
                .iter()
                .map(|c| label(c, "io.kubernetes.pod.name"))
                .collect();
            pods.sort();
            pods.dedup();
            bail!(
                "no running pod {pod:?} in the demo; its pods: {}",
                pods.join(", ")
            );
        }
        let names: Vec<String> = in_pod
            .iter()
            .map(|c| label(c, "io.kubernetes.container.name"))
            .collect();
        let chosen = match container {
            Some(name) => in_pod
                .iter()
                .find(|c| label(c, "io.kubernetes.container.name") == name)
                .with_context(|| {
                    format!(
                        "pod {pod} has no running container {name:?}; it has {}",
                        names.join(", ")
                    )
                })?,
            None if in_pod.len() == 1 => &in_pod[0],
            None => bail!(
                "pod {pod} runs several containers ({}): name one with --container",
                names.join(", ")
            ),
        };
        let answer = cri
            .exec_sync(cri::ExecSyncRequest {
                container_id: chosen.id.clone(),
                cmd: command.to_vec(),
                timeout: 600,
            })
            .await
            .context("CRI ExecSync")?
            .into_inner();
        use std::io::Write as _;
        std::io::stdout().write_all(&answer.stdout)?;
        std::io::stderr().write_all(&answer.stderr)?;
        Ok(ExitCode::from(answer.exit_code.clamp(0, 255) as u8))
    })
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
        Cmd::DemoExec {
            pod,
            container,
            command,
        } => match demo_exec(&pod, container.as_deref(), &command) {
            Ok(code) => return code,
            Err(e) => Err(e),
        },
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
