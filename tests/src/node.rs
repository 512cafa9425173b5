//! Test "nodes" for the privileged end-to-end tests: a node network namespace with a fake real
//! metadata service on `169.254.169.254` (on its loopback: this kernel has no dummy driver),
//! pod namespaces joined by veth pairs, a kubelet-shaped cgroup tree under a test cgroup, and
//! the real `kiam-agent` with its eBPF programs attached to that tree.
//!
//! Nothing is added to the machine's root network namespace. Every name carries a unique
//! `ke…` prefix, and `Drop` removes exactly what the node created.

use std::{
    fs,
    io::{BufRead, BufReader},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

/// The helper program run inside pods.
pub static HELPER: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    crate::workspace_bin("kiam-e2e-helper")
        .to_string_lossy()
        .into_owned()
});
/// Address of the node that pods are redirected to (on the node namespace's loopback).
pub const AGENT_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
/// The node's IPv6 address pods connecting to `[fd00:ec2::254]` are sent to.
pub const AGENT_IP6: &str = "fd00:198:19::1";
pub const AGENT_PORT: u16 = 8186;
/// A link-local agent address (`--agent-ip`): the agent puts it on the node's loopback.
pub const LINK_LOCAL_AGENT_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 181, 254);
pub const IMDS: &str = "169.254.169.254";
pub const IMDS6: &str = "fd00:ec2::254";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// True when the test can run. Otherwise prints a loud SKIP, or fails when
/// `KIAM_E2E_REQUIRE_PRIVILEGED=1` (set by `cargo xtask test` when running as root).
pub fn privileged(test: &str) -> bool {
    let uid = fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|r| r.split_whitespace().nth(1).map(str::to_owned))
        })
        .and_then(|u| u.parse::<u32>().ok());
    let root = uid == Some(0);
    let required = std::env::var("KIAM_E2E_REQUIRE_PRIVILEGED").as_deref() == Ok("1");
    if root {
        return true;
    }
    assert!(
        !required,
        "{test}: needs root (BPF, cgroups, network namespaces) but KIAM_E2E_REQUIRE_PRIVILEGED=1"
    );
    eprintln!(
        "\n!!!!!!!! SKIPPED {test}: needs root for BPF, cgroups and network namespaces !!!!!!!!\n"
    );
    false
}

fn sh(args: &[&str]) -> Output {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn unique() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    format!("{:04x}{:x}", (std::process::id() ^ nanos) & 0xffff, n % 16)
}

fn uuid(seed: &str, n: u32) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in seed.bytes().chain(n.to_le_bytes()) {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    let g = h ^ (h >> 29);
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        (h >> 32) as u32,
        (h >> 16) as u16,
        (g >> 4) as u16 & 0xfff,
        (g >> 20) as u16 & 0xfff,
        g & 0xffff_ffff_ffff
    )
}

fn container_id(uid: &str) -> String {
    let hex: String = uid.chars().filter(char::is_ascii_hexdigit).collect();
    format!("{hex}{hex}").chars().take(64).collect()
}

/// The cgroup v2 mount: `/sys/fs/cgroup` on a unified host, `/sys/fs/cgroup/unified` on a
/// hybrid one like this test machine.
pub fn cgroup_root() -> PathBuf {
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.join("cgroup.controllers").exists())
        .expect("no cgroup v2 mount")
}

pub fn agent_bin() -> PathBuf {
    let path = std::env::var_os("KIAM_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::workspace_bin("kiam-agent"));
    assert!(
        path.is_file(),
        "{} missing: run `cargo xtask test` (or `cargo build -p kiam-agent`)",
        path.display()
    );
    path
}

/// Agent flags for tests and benchmarks that drive one pod at thousands of new connections
/// a second: they measure the agent, not its per-pod rate (the attack tests do that).
pub const LOAD_TEST_ARGS: [&str; 2] = ["--pod-connection-rate", "1000000"];

/// The capabilities a container gets by default (containerd's and Docker's set, `NET_RAW`
/// included), as `setpriv --bounding-set` takes them: a root process keeps only these.
pub const DEFAULT_CAPABILITIES: &str = "-all,+chown,+dac_override,+fowner,+fsetid,+kill,+setgid,+setuid,+setpcap,+net_bind_service,+net_raw,+sys_chroot,+mknod,+audit_write,+setfcap";

/// `cmd` as a tenant's container runs it: with the default capabilities only.
pub fn as_tenant<'a>(cmd: &[&'a str]) -> Vec<&'a str> {
    let mut line = vec!["setpriv", "--bounding-set", DEFAULT_CAPABILITIES, "--"];
    line.extend_from_slice(cmd);
    line
}

/// A clean environment for an AWS SDK inside a test pod: no credentials, configuration or
/// profile but what the metadata service gives, region `us-east-1`, `home` as `$HOME`.
pub fn sdk_env<'a>(command: &'a mut Command, home: &Path) -> &'a mut Command {
    command
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("HOME", home)
        .env("AWS_CONFIG_FILE", "/nonexistent")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .env("AWS_METADATA_SERVICE_TIMEOUT", "2")
        .env("AWS_METADATA_SERVICE_NUM_ATTEMPTS", "3")
}

/// A pod: a cgroup shaped like the kubelet's (systemd driver, containerd) and a network
/// namespace (its own, or the node's for a host-network pod).
#[derive(Debug, Clone)]
pub struct Pod {
    pub uid: String,
    pub container_id: String,
    pub cgroup: PathBuf,
    pub netns: String,
    pub ip: Ipv4Addr,
}

pub struct Agent {
    pub child: Child,
    pub log: PathBuf,
}

pub struct Node {
    pub id: String,
    pub cgroup_root: PathBuf,
    pub test_cgroup: PathBuf,
    pub kubepods: PathBuf,
    pub netns: String,
    pub pin_dir: PathBuf,
    pub dir: PathBuf,
    pub agent_pod: Pod,
    pub agent: Option<Agent>,
    /// More flags for `kiam-agent run`.
    pub agent_args: Vec<String>,
    /// Environment variables for the agent (e.g. `KUBECONFIG`).
    pub agent_env: Vec<(String, String)>,
    /// `--agent-ip` of the agent: the node's address, or a link-local one.
    pub agent_ip: Ipv4Addr,
    /// `--log-level` of the agent (debug for the tests; benchmarks log less).
    pub agent_log_level: String,
    /// `--admin-listen` of the agent, in the node's network namespace.
    pub agent_admin: std::net::SocketAddr,
    fake_imds: Vec<Child>,
    pod_netns: Vec<String>,
    pods: u32,
    agent_starts: u32,
}

impl Node {
    /// A node with its fake real metadata service running and no agent yet.
    #[expect(
        clippy::new_without_default,
        reason = "creating a node creates namespaces and cgroups: not a default value"
    )]
    pub fn new() -> Node {
        let id = format!("ke{}", unique());
        let cgroup_root = cgroup_root();
        let test_cgroup = cgroup_root.join(format!("kiam-e2e-{id}"));
        let kubepods = test_cgroup.join("kubepods.slice");
        for qos in ["burstable", "besteffort"] {
            fs::create_dir_all(kubepods.join(format!("kubepods-{qos}.slice")))
                .expect("create cgroups");
        }
        let dir = std::env::temp_dir().join(format!("kiam-e2e-{id}"));
        fs::create_dir_all(&dir).expect("temp dir");
        let netns = format!("{id}-node");
        sh(&["ip", "netns", "add", &netns]);
        let mut node = Node {
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/kiam-e2e-{id}")),
            agent_pod: Pod {
                uid: String::new(),
                container_id: String::new(),
                cgroup: PathBuf::new(),
                netns: netns.clone(),
                ip: AGENT_IP,
            },
            id,
            cgroup_root,
            test_cgroup,
            kubepods,
            netns,
            dir,
            agent: None,
            agent_args: Vec::new(),
            agent_env: Vec::new(),
            agent_ip: AGENT_IP,
            agent_log_level: "info,kiam_agent=debug".into(),
            agent_admin: "127.0.0.1:8182".parse().expect("address"),
            fake_imds: Vec::new(),
            pod_netns: Vec::new(),
            pods: 0,
            agent_starts: 0,
        };
        let ns = node.netns.clone();
        sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        sh(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{IMDS}/32"),
            "dev",
            "lo",
        ]);
        sh(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{AGENT_IP}/32"),
            "dev",
            "lo",
        ]);
        for v6 in [IMDS6, AGENT_IP6] {
            let addr = format!("{v6}/128");
            sh(&["ip", "-n", &ns, "addr", "add", &addr, "dev", "lo", "nodad"]);
        }
        // The agent runs as a (host-network) pod itself, like the DaemonSet: exempt by cgroup.
        node.agent_pod = node.add_pod_cgroup("besteffort", ns.clone(), AGENT_IP);
        let outside = node.outside_cgroup();
        let log = node.fake_imds_log();
        for listen in [format!("{IMDS}:80"), format!("[{IMDS6}]:80")] {
            let child = node.spawn_in(
                &outside,
                &ns,
                &[
                    HELPER.as_str(),
                    "fake-imds",
                    "--listen",
                    &listen,
                    "--log",
                    log.to_str().expect("utf-8"),
                ],
            );
            crate::track(&child);
            node.fake_imds.push(wait_ready(child, "fake-imds"));
        }
        node
    }

    pub fn fake_imds_log(&self) -> PathBuf {
        self.dir.join("fake-imds.log")
    }

    /// Connections the fake real metadata service has accepted.
    pub fn fake_imds_connections(&self) -> usize {
        fs::read_to_string(self.fake_imds_log())
            .map(|s| s.lines().filter(|l| l.starts_with("connection ")).count())
            .unwrap_or(0)
    }

    /// Requests the fake real metadata service has seen: `<method> <path> token=<token>`.
    pub fn fake_imds_requests(&self) -> Vec<String> {
        fs::read_to_string(self.fake_imds_log())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.strip_prefix("request "))
            .map(str::to_owned)
            .collect()
    }

    /// A cgroup outside the attach point (a system service, not a pod).
    pub fn outside_cgroup(&self) -> PathBuf {
        let path = self.test_cgroup.join("outside");
        fs::create_dir_all(&path).expect("create cgroup");
        path
    }

    fn add_pod_cgroup(&mut self, qos: &str, netns: String, ip: Ipv4Addr) -> Pod {
        self.pods += 1;
        let uid = uuid(&self.id, self.pods);
        self.pod_cgroup(qos, netns, ip, uid)
    }

    fn pod_cgroup(&mut self, qos: &str, netns: String, ip: Ipv4Addr, uid: String) -> Pod {
        let container_id = container_id(&uid);
        let cgroup = self
            .kubepods
            .join(format!("kubepods-{qos}.slice"))
            .join(format!(
                "kubepods-{qos}-pod{}.slice/cri-containerd-{container_id}.scope",
                uid.replace('-', "_")
            ));
        fs::create_dir_all(&cgroup).expect("create pod cgroup");
        Pod {
            uid,
            container_id,
            cgroup,
            netns,
            ip,
        }
    }

    /// A pod with its own network namespace, joined to the node by a veth pair.
    pub fn add_pod(&mut self) -> Pod {
        let n = self.pod_netns.len() + 1;
        let netns = format!("{}-p{n}", self.id);
        sh(&["ip", "netns", "add", &netns]);
        self.pod_netns.push(netns.clone());
        let (host_if, pod_if) = (format!("{}h{n}", self.id), format!("{}p{n}", self.id));
        sh(&[
            "ip",
            "link",
            "add",
            &host_if,
            "netns",
            &self.netns,
            "type",
            "veth",
            "peer",
            "name",
            &pod_if,
            "netns",
            &netns,
        ]);
        let host_ip = format!("198.18.{n}.1");
        let pod_ip = Ipv4Addr::new(198, 18, n as u8, 2);
        sh(&[
            "ip",
            "-n",
            &self.netns,
            "addr",
            "add",
            &format!("{host_ip}/24"),
            "dev",
            &host_if,
        ]);
        sh(&["ip", "-n", &self.netns, "link", "set", &host_if, "up"]);
        sh(&[
            "ip",
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{pod_ip}/24"),
            "dev",
            &pod_if,
        ]);
        sh(&["ip", "-n", &netns, "link", "set", &pod_if, "up"]);
        sh(&["ip", "-n", &netns, "link", "set", "lo", "up"]);
        sh(&[
            "ip", "-n", &netns, "route", "add", "default", "via", &host_ip,
        ]);
        let (host_ip6, pod_ip6) = (format!("fd00:198:18:{n}::1"), format!("fd00:198:18:{n}::2"));
        let (host_net6, pod_net6) = (format!("{host_ip6}/64"), format!("{pod_ip6}/64"));
        sh(&[
            "ip",
            "-n",
            &self.netns,
            "addr",
            "add",
            &host_net6,
            "dev",
            &host_if,
            "nodad",
        ]);
        sh(&[
            "ip", "-n", &netns, "addr", "add", &pod_net6, "dev", &pod_if, "nodad",
        ]);
        sh(&[
            "ip", "-n", &netns, "-6", "route", "add", "default", "via", &host_ip6,
        ]);
        self.add_pod_cgroup("burstable", netns, pod_ip)
    }

    /// Another pod sharing `pod`'s network namespace: its own cgroup and UID (a pod
    /// recreated under the same name gets a new UID, and with it a new cgroup).
    pub fn add_pod_sharing(&mut self, pod: &Pod) -> Pod {
        self.add_pod_cgroup("burstable", pod.netns.clone(), pod.ip)
    }

    /// Removes a pod's cgroups, as the kubelet does when the pod is gone.
    pub fn remove_pod(&self, pod: &Pod) {
        if let Some(pod_dir) = pod.cgroup.parent() {
            remove_cgroup_tree(pod_dir);
        }
    }

    /// A static pod, as the kubelet runs one from a manifest on the node (kube-proxy, etcd):
    /// its UID, and so its cgroup, is the kubelet's config hash (32 hex digits, no dashes);
    /// host network.
    pub fn add_static_host_network_pod(&mut self) -> Pod {
        self.pods += 1;
        let hash = uuid(&self.id, self.pods).replace('-', "");
        let ns = self.netns.clone();
        self.pod_cgroup("burstable", ns, AGENT_IP, hash)
    }

    /// A host-network pod: a pod cgroup in the node's namespace.
    pub fn add_host_network_pod(&mut self) -> Pod {
        let ns = self.netns.clone();
        self.add_pod_cgroup("burstable", ns, AGENT_IP)
    }

    /// `cmd` in `cgroup` and network namespace `netns`: the shell moves itself into the cgroup,
    /// then execs nsenter (which keeps the cgroup, and unlike `ip netns exec` keeps /sys).
    pub fn command_in(&self, cgroup: &Path, netns: &str, cmd: &[&str]) -> Command {
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(format!(
                "echo $$ > '{}/cgroup.procs' && exec \"$@\"",
                cgroup.display()
            ))
            .arg("sh")
            .arg("nsenter")
            .arg(format!("--net=/var/run/netns/{netns}"))
            .arg("--")
            .args(cmd);
        command
    }

    pub fn spawn_in(&self, cgroup: &Path, netns: &str, cmd: &[&str]) -> Child {
        self.command_in(cgroup, netns, cmd)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn")
    }

    pub fn run_in(&self, cgroup: &Path, netns: &str, cmd: &[&str]) -> String {
        let out = self
            .command_in(cgroup, netns, cmd)
            .output()
            .expect("run in pod");
        assert!(
            out.status.success(),
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The helper's `get` from inside `pod`: one line per response.
    pub fn get(&self, pod: &Pod, url: &str) -> String {
        self.run_in(&pod.cgroup, &pod.netns, &[HELPER.as_str(), "get", url])
            .trim()
            .to_owned()
    }

    /// Whether `pod` is served `role` (the credentials listing names it) within 10 s.
    pub fn served(&self, pod: &Pod, role: &str) -> bool {
        let listing = format!("http://{IMDS}/latest/meta-data/iam/security-credentials/");
        crate::poll(Duration::from_secs(10), || {
            self.get(pod, &listing) == format!("200 {role}")
        })
    }

    /// The agent's command line for this node (`kiam-agent` and its flags, without
    /// `agent_args`).
    pub fn agent_command_line(&self) -> Vec<String> {
        let attach = self
            .kubepods
            .strip_prefix(&self.cgroup_root)
            .expect("under root")
            .to_owned();
        let utf8 = |p: &Path| p.to_str().expect("utf-8").to_owned();
        [
            utf8(&agent_bin()),
            "--log-format".into(),
            "json".into(),
            "--log-level".into(),
            self.agent_log_level.clone(),
            "run".into(),
            "--agent-ip".into(),
            self.agent_ip.to_string(),
            "--agent-ip6".into(),
            AGENT_IP6.into(),
            "--port".into(),
            AGENT_PORT.to_string(),
            "--cgroup-root".into(),
            utf8(&self.cgroup_root),
            "--attach-cgroup".into(),
            utf8(&attach),
            "--bpffs-dir".into(),
            utf8(&self.pin_dir),
            "--token-key-file".into(),
            utf8(&self.dir.join("token.key")),
            "--admin-listen".into(),
            self.agent_admin.to_string(),
        ]
        .into_iter()
        .chain(self.agent_args.iter().cloned())
        .collect()
    }

    /// Starts the agent (as the agent pod) and waits until it serves.
    pub fn start_agent(&mut self) {
        assert!(self.agent.is_none(), "agent already running");
        self.agent_starts += 1;
        let log = self.dir.join(format!("agent-{}.log", self.agent_starts));
        let file = fs::File::create(&log).expect("agent log");
        let line = self.agent_command_line();
        let line: Vec<&str> = line.iter().map(String::as_str).collect();
        let child = self
            .command_in(&self.agent_pod.cgroup, &self.netns, &line)
            .envs(self.agent_env.iter().map(|(k, v)| (k, v)))
            .stdout(file.try_clone().expect("dup"))
            .stderr(file)
            .spawn()
            .expect("spawn agent");
        crate::track(&child);
        let mut agent = Agent { child, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = fs::read_to_string(&agent.log).unwrap_or_default();
            if text.contains("kiam-agent ready") {
                break;
            }
            if let Ok(Some(status)) = agent.child.try_wait() {
                panic!("agent exited ({status}) before ready:\n{text}");
            }
            assert!(Instant::now() < deadline, "agent not ready:\n{text}");
            thread::sleep(Duration::from_millis(50));
        }
        self.agent = Some(agent);
    }

    /// Whether the agent process is still running.
    pub fn agent_alive(&mut self) -> bool {
        self.agent
            .as_mut()
            .is_some_and(|a| matches!(a.child.try_wait(), Ok(None)))
    }

    pub fn agent_pid(&self) -> u32 {
        self.agent.as_ref().expect("agent running").child.id()
    }

    pub fn agent_log(&self) -> String {
        self.agent
            .as_ref()
            .map(|a| fs::read_to_string(&a.log).unwrap_or_default())
            .unwrap_or_default()
    }

    /// The agent's `/metrics` (its admin listener, in the node's network namespace).
    pub fn agent_metrics(&self) -> String {
        crate::stack::in_netns(Some(&self.netns), || {
            crate::stack::http_to(self.agent_admin, "GET", "/metrics", None)
        })
        .1
    }

    /// The agent's JSON log records.
    pub fn agent_records(&self) -> Vec<serde_json::Value> {
        self.agent_log()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    pub fn signal_agent(&self, signal: &str) {
        sh(&["kill", &format!("-{signal}"), &self.agent_pid().to_string()]);
    }

    /// SIGKILL: nothing runs on the way out, as when the agent crashes or is OOM-killed.
    pub fn kill_agent(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            let _ = agent.child.kill();
            let _ = agent.child.wait();
        }
    }

    /// How often each kiam program is attached below the test cgroup (by whole name:
    /// `kiam_bind4` is part of `kiam_post_bind4`), from `bpftool cgroup tree`.
    pub fn attachments(&self) -> std::collections::HashMap<String, usize> {
        let mut counts = std::collections::HashMap::new();
        let tree = self.bpftool_cgroup_tree();
        for word in tree.split_whitespace().filter(|w| w.starts_with("kiam_")) {
            *counts.entry(word.to_owned()).or_default() += 1;
        }
        counts
    }

    /// `bpftool cgroup tree` below the test cgroup.
    pub fn bpftool_cgroup_tree(&self) -> String {
        let out = sh(&[
            "bpftool",
            "cgroup",
            "tree",
            self.test_cgroup.to_str().expect("utf-8"),
        ]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn agent_command(&self, args: &[&str]) -> Output {
        Command::new(agent_bin())
            .args(args)
            .args(["--bpffs-dir", self.pin_dir.to_str().expect("utf-8")])
            .output()
            .expect("run kiam-agent")
    }
}

fn wait_ready(mut child: Child, what: &str) -> Child {
    let stdout = child.stdout.take().expect("piped stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read ready line");
    assert_eq!(line.trim(), "ready", "{what} did not start");
    child
}

/// Removes a cgroup subtree, killing anything still in it.
fn remove_cgroup_tree(path: &Path) {
    if !path.exists() {
        return;
    }
    let _ = fs::write(path.join("cgroup.kill"), "1");
    let _ = remove_dirs_deepest_first(path);
}

/// Removes the cgroup directory `tree` and every one below it, deepest first, each retried
/// for a second while its processes are still exiting; returns those that would not go.
pub fn remove_dirs_deepest_first(tree: &Path) -> Vec<(PathBuf, std::io::Error)> {
    let mut dirs = Vec::new();
    let mut stack = vec![tree.to_owned()];
    while let Some(dir) = stack.pop() {
        if let Ok(entries) = fs::read_dir(&dir) {
            for entry in entries.flatten() {
                if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    stack.push(entry.path());
                }
            }
        }
        dirs.push(dir);
    }
    let mut left = Vec::new();
    for dir in dirs.into_iter().rev() {
        let mut result = fs::remove_dir(&dir);
        for _ in 0..50 {
            if result.is_ok() {
                break;
            }
            thread::sleep(Duration::from_millis(20));
            result = fs::remove_dir(&dir);
        }
        if let Err(e) = result {
            left.push((dir, e));
        }
    }
    left
}

/// Removes what a node with this id left behind (namespaces, cgroups, pins, files), for a
/// process that cannot run `Drop` (an interrupted demo).
pub fn cleanup(id: &str) {
    let pins = PathBuf::from(format!("/sys/fs/bpf/kiam-e2e-{id}"));
    let _ = Command::new(agent_bin())
        .args(["uninstall", "--bpffs-dir"])
        .arg(&pins)
        .output();
    let _ = fs::remove_dir_all(&pins);
    remove_cgroup_tree(&cgroup_root().join(format!("kiam-e2e-{id}")));
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            if name.starts_with(&format!("{id}-")) {
                let _ = Command::new("ip").args(["netns", "del", name]).output();
            }
        }
    }
    let _ = fs::remove_dir_all(std::env::temp_dir().join(format!("kiam-e2e-{id}")));
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill_agent();
        for mut imds in self.fake_imds.drain(..) {
            let _ = imds.kill();
            let _ = imds.wait();
        }
        let _ = self.agent_command(&["uninstall"]);
        let _ = fs::remove_dir_all(&self.pin_dir);
        remove_cgroup_tree(&self.test_cgroup);
        for ns in self.pod_netns.iter().chain(std::iter::once(&self.netns)) {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}
