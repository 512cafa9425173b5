//! Command line of `kiam-agent`, and its validation into what the agent runs with.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use clap::{Args, Parser, Subcommand};
use kiam_common::{CONFIG_LOG_CONNECTIONS, Config, addr};

use crate::{api, client, upstream};

/// kiam node agent: sends pods' instance-metadata connections to itself with eBPF and answers
/// them for the pod that made them.
#[derive(Debug, Parser)]
#[command(name = "kiam-agent", version)]
pub struct Cli {
    #[command(flatten)]
    pub log: LogArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load and attach (or re-adopt) the eBPF programs and serve redirected pods.
    Run(Box<RunArgs>),
    /// Show the pinned programs, configuration, map sizes and counters, and the running
    /// agent's requests by route (pass-through included).
    Status(StatusArgs),
    /// Detach and unpin the programs and maps (stop the agent first), and remove a
    /// link-local agent address the agent added.
    Uninstall(PinArgs),
    /// Mount bpffs at a path unless one is there, shared (with the host's /sys/fs/bpf and
    /// bidirectional mount propagation).
    MountBpffs(MountArgs),
    /// What the node must provide before the agent starts, as the DaemonSet's privileged init
    /// container: bpffs mounted (shared) at --path, and the agent's --port reserved
    /// (net.ipv4.ip_local_reserved_ports) where the ephemeral range covers it.
    PrepareNode(PrepareArgs),
    /// Check the running agent, its pinned programs and every server, like `kiam health`.
    /// Reads the same flags and `KIAM_*` environment as `run`. Exit code 0: healthy; 1: a
    /// check failed; 2: bad usage.
    Health(Box<HealthArgs>),
    /// Ask the running agent over its probe socket (the kubelet's exec probes). Exit code 0:
    /// answered 200; 1: not.
    Probe(kiam_ops::ProbeArgs),
}

#[derive(Debug, Args)]
pub struct HealthArgs {
    /// bpffs directory holding the pinned programs and maps.
    #[arg(long, env = "KIAM_BPFFS_DIR", default_value = "/sys/fs/bpf/kiam")]
    pub bpffs_dir: PathBuf,
    /// As for `run`.
    #[arg(long, env = "KIAM_CGROUP_ROOT")]
    pub cgroup_root: Option<PathBuf>,
    /// As for `run`: the programs must be attached to this cgroup.
    #[arg(long, env = "KIAM_ATTACH_CGROUP")]
    pub attach_cgroup: Option<PathBuf>,
    /// How long each server has to answer.
    #[arg(long, env = "KIAM_HEALTH_TIMEOUT", default_value = "3s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Fail unless every server is ready (by default one ready server is enough; the others
    /// are reported).
    #[arg(long)]
    pub require_all_servers: bool,
    #[command(flatten)]
    pub api: ApiArgs,
}

#[derive(Debug, Args)]
pub struct MountArgs {
    /// Where bpffs must be mounted.
    #[arg(long, env = "KIAM_BPFFS_MOUNT", default_value = "/sys/fs/bpf")]
    pub path: PathBuf,
}

#[derive(Debug, Args)]
pub struct PrepareArgs {
    #[command(flatten)]
    pub mount: MountArgs,
    /// The agent's port (as for `run`), reserved so the kernel never hands it out.
    #[arg(long, env = "KIAM_PORT", default_value_t = DEFAULT_PORT)]
    pub port: u16,
}

pub use kiam_ops::{LogArgs, LogFormat};

#[derive(Debug, Args)]
pub struct PinArgs {
    /// bpffs directory holding the pinned programs and maps.
    #[arg(long, env = "KIAM_BPFFS_DIR", default_value = "/sys/fs/bpf/kiam")]
    pub bpffs_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub pins: PinArgs,
    /// Print JSON instead of text.
    #[arg(long, env = "KIAM_STATUS_JSON")]
    pub json: bool,
    /// The running agent's admin listener, for its request counters.
    #[arg(long, env = "KIAM_ADMIN_LISTEN", default_value = kiam_ops::DEFAULT_AGENT_ADMIN_LISTEN)]
    pub admin_listen: SocketAddr,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// IPv4 address pods are redirected to. A link-local address (169.254.0.0/16, not
    /// 169.254.169.254) is added to the node's loopback as a /32 when missing: no Service can
    /// claim it, so a DNAT rule for the node's address (a Service's `externalIPs`) cannot
    /// capture pods' metadata traffic. Otherwise a node address every pod reaches (the
    /// downward API's `status.hostIP`).
    #[arg(long, env = "KIAM_AGENT_IP")]
    pub agent_ip: IpAddr,
    /// IPv6 address of this node for pods connecting to `[fd00:ec2::254]`. Without it they are
    /// sent to the IPv4-mapped `--agent-ip`, which IPv6-only sockets cannot reach.
    #[arg(long, env = "KIAM_AGENT_IP6")]
    pub agent_ip6: Option<Ipv6Addr>,
    /// TCP port the agent listens on and pods are redirected to. The default is one neither
    /// kiam's nor kube2iam's agent (8181) uses, so both can run side by side during a
    /// migration; pods keep the port in their own network namespaces.
    #[arg(long, env = "KIAM_PORT", default_value_t = DEFAULT_PORT)]
    pub port: u16,
    /// Mount point of the cgroup v2 file system (default: detect `/sys/fs/cgroup`, then
    /// `/sys/fs/cgroup/unified`).
    #[arg(long, env = "KIAM_CGROUP_ROOT")]
    pub cgroup_root: Option<PathBuf>,
    /// Cgroup to attach to, absolute or relative to the cgroup root (default: the kubelet's
    /// `kubepods.slice` or `kubepods`). Every pod, including host-network pods, is below it.
    #[arg(long, env = "KIAM_ATTACH_CGROUP")]
    pub attach_cgroup: Option<PathBuf>,
    /// bpffs directory for the pinned programs and maps. Pins keep the redirect in place while
    /// the agent restarts, so pods never reach the node's own credentials.
    #[arg(long, env = "KIAM_BPFFS_DIR", default_value = "/sys/fs/bpf/kiam")]
    pub bpffs_dir: PathBuf,
    /// Accept pin directories on a bpffs the host does not see, and mount one at
    /// `/sys/fs/bpf` when missing (development only: the pins, and with them the redirect,
    /// vanish with the agent's mount namespace).
    #[arg(long, env = "KIAM_ALLOW_PRIVATE_BPFFS")]
    pub allow_private_bpffs: bool,
    /// More cgroups (paths, as for `--attach-cgroup`) whose connections to the metadata
    /// service are not redirected. The agent's own cgroup is always exempt.
    #[arg(long, env = "KIAM_EXEMPT_CGROUPS", value_delimiter = ',')]
    pub exempt_cgroup: Vec<PathBuf>,
    /// Load the kernel programs from this object instead of the one built in (the upgrade
    /// tests swap programs under load with it).
    #[arg(long, env = "KIAM_EBPF_OBJECT", hide = true)]
    pub ebpf_object: Option<PathBuf>,
    /// Emit a kernel log record for every redirected connection (debugging only: ~20 µs per
    /// connection).
    #[arg(long, env = "KIAM_EBPF_LOG_CONNECTIONS")]
    pub ebpf_log_connections: bool,
    /// How often the kernel counters and map fill levels are read for `/metrics`.
    #[arg(long, env = "KIAM_KERNEL_METRICS_INTERVAL", default_value = "15s", value_parser = humantime::parse_duration)]
    pub kernel_metrics_interval: Duration,
    #[command(flatten)]
    pub api: ApiArgs,
}

/// The metadata API and the servers behind it.
#[derive(Debug, Args)]
pub struct ApiArgs {
    /// This node's name (the downward API's `spec.nodeName`); servers refuse pods of other
    /// nodes.
    #[arg(long, env = "KIAM_NODE_NAME")]
    pub node_name: Option<String>,
    /// Once ready (programs attached, a server answering), remove the taint
    /// `kiam.rs/agent-not-ready` from this node (--node-name), so pods land on it only once
    /// their metadata service works. Needs `patch` on nodes, limited to the agent's own node
    /// by the shipped ValidatingAdmissionPolicy.
    #[arg(long, env = "KIAM_REMOVE_STARTUP_TAINT")]
    pub remove_startup_taint: bool,
    /// kiam servers, `host:port`, comma-separated; names (a headless Service) are resolved to
    /// all their addresses and re-resolved every `--resolve-interval`.
    #[arg(long = "server", env = "KIAM_SERVERS", value_delimiter = ',')]
    pub servers: Vec<String>,
    /// The agent's projected service-account token (audience `kiam`), sent with every call:
    /// it proves to the servers which node this agent runs on. Re-read when rotated.
    #[arg(
        long,
        env = "KIAM_TOKEN_FILE",
        default_value = "/var/run/secrets/kiam/token"
    )]
    pub token_file: PathBuf,
    /// Name the servers' certificates must carry.
    #[arg(long, env = "KIAM_SERVER_TLS_NAME", default_value = "kiam-server")]
    pub server_tls_name: String,
    /// PEM client certificate presented to the servers.
    #[arg(long, env = "KIAM_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of the client certificate.
    #[arg(long, env = "KIAM_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA bundle the servers' certificates must chain to.
    #[arg(long, env = "KIAM_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Deadline for one metadata request's calls to the servers; keep it under the SDKs'
    /// timeouts (botocore: 1 s).
    #[arg(long, env = "KIAM_REQUEST_DEADLINE", default_value = "900ms", value_parser = humantime::parse_duration)]
    pub request_deadline: Duration,
    /// Ask a second server when the first has not answered after this long.
    #[arg(long, env = "KIAM_HEDGE_AFTER", default_value = "150ms", value_parser = humantime::parse_duration)]
    pub hedge_after: Duration,
    /// How often server names are re-resolved.
    #[arg(long, env = "KIAM_RESOLVE_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub resolve_interval: Duration,
    /// How long a pod's role is trusted before the servers are asked again.
    #[arg(long, env = "KIAM_ROLE_TTL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub role_ttl: Duration,
    /// How long a request whose pod's answer is older than `--role-ttl` waits for the
    /// servers' fresh one before the held answer is served (the fresh one replaces it when it
    /// comes). While the servers are known to be unreachable, held answers are served at once.
    #[arg(long, env = "KIAM_REFRESH_WAIT", default_value = "100ms", value_parser = humantime::parse_duration)]
    pub refresh_wait: Duration,
    /// How long a refusal (no role annotation, role not permitted, …) is remembered before
    /// the servers are asked again, so a pod without a role costs them little.
    #[arg(long, env = "KIAM_REFUSAL_TTL", default_value = "2s", value_parser = humantime::parse_duration)]
    pub refusal_ttl: Duration,
    /// Credentials are never served with less than this left.
    #[arg(long, env = "KIAM_MIN_VALIDITY", default_value = "30m", value_parser = humantime::parse_duration)]
    pub min_validity: Duration,
    /// Refuse metadata requests without an IMDSv2 token.
    #[arg(long, env = "KIAM_REQUIRE_IMDSV2")]
    pub require_imdsv2: bool,
    /// Paths forwarded to the node's real metadata service; everything else is 404. Keep it
    /// to what pods need (region, zone, the unsigned identity document): every path it
    /// matches shows pods something about the node. IAM paths, the node's identity
    /// credentials and its signed identity documents are never forwarded, whatever it says.
    #[arg(
        long,
        env = "KIAM_ALLOW_ROUTE_REGEXP",
        default_value = DEFAULT_ALLOW_ROUTE
    )]
    pub allow_route_regexp: String,
    /// Forward the node's user data (`/latest/user-data`) when --allow-route-regexp matches
    /// it. Off by default: on self-managed nodes it holds bootstrap secrets.
    #[arg(long, env = "KIAM_ALLOW_USER_DATA")]
    pub allow_user_data: bool,
    /// The node's real metadata service, for allow-listed paths.
    #[arg(
        long,
        env = "KIAM_IMDS_ENDPOINT",
        default_value = "http://169.254.169.254"
    )]
    pub imds_endpoint: String,
    /// Key for IMDSv2 tokens, created (0600) if missing, so tokens survive agent restarts.
    #[arg(
        long,
        env = "KIAM_TOKEN_KEY_FILE",
        default_value = "/run/kiam/imds-token.key"
    )]
    pub token_key_file: PathBuf,
    /// Admin listener: `/metrics`, `/live`, `/ready`. Loopback by default; the manifests
    /// give the node's address (`status.hostIP`), which Prometheus reaches. Each source
    /// address may hold 4 connections, none for more than a minute.
    #[arg(long, env = "KIAM_ADMIN_LISTEN", default_value = kiam_ops::DEFAULT_AGENT_ADMIN_LISTEN)]
    pub admin_listen: SocketAddr,
    /// Serve `/live` and `/ready` on this Unix socket too, for the kubelet's exec probes
    /// (`kiam-agent probe ready`): no pod can reach it, so none can starve the probes.
    #[arg(long, env = "KIAM_PROBE_SOCKET")]
    pub probe_socket: Option<PathBuf>,
    /// Connections the metadata listener holds at once, all pods together; more are closed
    /// at once.
    #[arg(long, env = "KIAM_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,
    /// Connections one pod may hold at once; more get 429 and are closed, so one pod can
    /// never keep the others waiting.
    #[arg(long, env = "KIAM_MAX_CONNECTIONS_PER_POD", default_value_t = 64)]
    pub max_connections_per_pod: usize,
    /// New connections one pod may open a second, with bursts of twice that; more get 429
    /// and are closed, so a pod looping connect/close cannot keep the agent from the others.
    #[arg(long, env = "KIAM_POD_CONNECTION_RATE", default_value_t = 100)]
    pub pod_connection_rate: u32,
    /// Requests of one pod forwarded or relayed to the node's metadata service a second, with
    /// bursts of twice that; more get 429 (EC2 allows about 1,024 packets a second per
    /// interface, for every pod of the node). Answers that never change (region, zone, the
    /// identity document) are kept once fetched and cost nothing.
    #[arg(long, env = "KIAM_POD_FORWARD_RATE", default_value_t = 20)]
    pub pod_forward_rate: u32,
    /// A request head must arrive within this; an idle kept-alive connection is closed
    /// after it too.
    #[arg(long, env = "KIAM_IDLE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,
}

/// The agent's default port: not 8181 (kiam's and kube2iam's agents, OPA), not in the
/// NodePort range.
pub const DEFAULT_PORT: u16 = 8186;
/// What pods may read of the node's metadata by default: what SDKs use to find their region.
pub const DEFAULT_ALLOW_ROUTE: &str = "^/latest/meta-data/placement/(region|availability-zone)/?$|^/latest/dynamic/instance-identity/document/?$";
/// Kubernetes' default NodePort range: a Service could take these ports on every node.
const NODE_PORTS: std::ops::RangeInclusive<u16> = 30000..=32767;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("--agent-ip must be an IPv4 address (got {0}); give an IPv6 address with --agent-ip6")]
    AgentIpNotV4(IpAddr),
    #[error("--agent-ip {0} cannot be used: pods need a unicast address of this node")]
    AgentIpUnusable(Ipv4Addr),
    #[error("--agent-ip6 {0} cannot be used: pods need a unicast address of this node")]
    AgentIp6Unusable(Ipv6Addr),
    #[error("--port must not be 0 or 80 (got {0}); pick a free port such as {DEFAULT_PORT}")]
    BadPort(u16),
    #[error(
        "--port {0} is in the NodePort range (30000-32767), where a Service could take it on every node; pick a port such as {DEFAULT_PORT}"
    )]
    NodePort(u16),
    #[error("--server needs --node-name, --tls-cert, --tls-key and --tls-ca")]
    ServerWithoutIdentity,
    #[error("--remove-startup-taint needs --node-name: the node to remove it from")]
    TaintWithoutNode,
    #[error("--allow-route-regexp is not a valid regular expression: {0}")]
    AllowRoute(String),
    #[error("--request-deadline must be between 100ms and 5s")]
    Deadline,
    #[error("--refresh-wait must not be longer than --request-deadline")]
    RefreshWait,
    #[error(
        "--min-validity must be more than 15m: SDKs refresh credentials expiring sooner on every call"
    )]
    MinValidity,
    #[error(
        "--max-connections-per-pod ({per_pod}) must be between 1 and --max-connections ({max})"
    )]
    Connections { per_pod: usize, max: usize },
    #[error("--idle-timeout must be between 1s and 5m")]
    IdleTimeout,
    #[error("--{0} must be at least 1 a second")]
    Rate(&'static str),
}

/// The metadata API's settings once checked: what `run` and `health` use, never the raw
/// flags again.
#[derive(Debug, Clone)]
pub struct Api {
    /// Paths forwarded to the node's real metadata service.
    pub allow: regex::Regex,
    /// How to reach the servers; `None` without `--server` (credential requests are refused).
    pub servers: Option<client::Options>,
    /// How answers are asked for and held.
    pub upstream: upstream::Settings,
    /// The node whose start-up taint is removed once ready (`--remove-startup-taint`).
    pub remove_taint_of: Option<String>,
    /// The metadata listener's connection limits.
    pub limits: api::Limits,
}

/// Checks the metadata API settings that do not touch the system, and returns them typed.
pub fn api(args: &ApiArgs) -> Result<Api, ConfigError> {
    let servers = match &args.servers[..] {
        [] => None,
        servers => {
            let (Some(_), Some(cert), Some(key), Some(ca)) =
                (&args.node_name, &args.tls_cert, &args.tls_key, &args.tls_ca)
            else {
                return Err(ConfigError::ServerWithoutIdentity);
            };
            Some(client::Options {
                servers: servers.to_vec(),
                server_name: args.server_tls_name.clone(),
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
                hedge_after: args.hedge_after,
                resolve_every: args.resolve_interval,
                token_file: Some(args.token_file.clone()),
            })
        }
    };
    let remove_taint_of = match (args.remove_startup_taint, &args.node_name) {
        (false, _) => None,
        (true, Some(node)) => Some(node.clone()),
        (true, None) => return Err(ConfigError::TaintWithoutNode),
    };
    if !(Duration::from_millis(100)..=Duration::from_secs(5)).contains(&args.request_deadline) {
        return Err(ConfigError::Deadline);
    }
    if args.refresh_wait > args.request_deadline {
        return Err(ConfigError::RefreshWait);
    }
    if args.min_validity <= Duration::from_secs(900) {
        return Err(ConfigError::MinValidity);
    }
    if args.max_connections_per_pod == 0 || args.max_connections_per_pod > args.max_connections {
        return Err(ConfigError::Connections {
            per_pod: args.max_connections_per_pod,
            max: args.max_connections,
        });
    }
    if !(Duration::from_secs(1)..=Duration::from_secs(300)).contains(&args.idle_timeout) {
        return Err(ConfigError::IdleTimeout);
    }
    for (rate, flag) in [
        (args.pod_connection_rate, "pod-connection-rate"),
        (args.pod_forward_rate, "pod-forward-rate"),
    ] {
        if rate == 0 {
            return Err(ConfigError::Rate(flag));
        }
    }
    let allow = regex::Regex::new(&args.allow_route_regexp).map_err(|e| {
        ConfigError::AllowRoute(e.to_string().lines().last().unwrap_or("").trim().to_owned())
    })?;
    Ok(Api {
        allow,
        servers,
        upstream: upstream::Settings {
            node: args.node_name.clone().unwrap_or_default(),
            deadline: args.request_deadline,
            min_validity: args.min_validity,
            role_ttl: args.role_ttl,
            refusal_ttl: args.refusal_ttl,
            refresh_wait: args.refresh_wait,
        },
        remove_taint_of,
        limits: api::Limits {
            connections_per_second: args.pod_connection_rate,
            max_connections: args.max_connections,
            max_per_pod: args.max_connections_per_pod,
            idle_timeout: args.idle_timeout,
        },
    })
}

/// The validated parts of `run` that do not touch the system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    /// The agent's IPv4 address and port, and its IPv6 address and port when it has one.
    pub listen: Vec<SocketAddr>,
    pub kernel: Config,
}

/// Checks the addresses and port, and derives the listen addresses and the kernel config.
pub fn network(args: &RunArgs) -> Result<Network, ConfigError> {
    let agent4 = match args.agent_ip {
        IpAddr::V4(v4) => v4,
        other => return Err(ConfigError::AgentIpNotV4(other)),
    };
    if agent4.is_unspecified() || agent4.is_broadcast() || agent4.is_multicast() {
        return Err(ConfigError::AgentIpUnusable(agent4));
    }
    if agent4 == Ipv4Addr::new(169, 254, 169, 254) {
        return Err(ConfigError::AgentIpUnusable(agent4));
    }
    if let Some(v6) = args.agent_ip6
        && (v6.is_unspecified() || v6.is_multicast() || v6 == kiam_imds_v6())
    {
        return Err(ConfigError::AgentIp6Unusable(v6));
    }
    if args.port == 0 || args.port == 80 {
        return Err(ConfigError::BadPort(args.port));
    }
    if NODE_PORTS.contains(&args.port) {
        return Err(ConfigError::NodePort(args.port));
    }
    let agent_addr6 = match args.agent_ip6 {
        Some(v6) => addr::words(IpAddr::V6(v6)),
        None => addr::words(IpAddr::V4(agent4)),
    };
    let mut flags = 0;
    if args.ebpf_log_connections {
        flags |= CONFIG_LOG_CONNECTIONS;
    }
    // Only the addresses pods are sent to: nothing else on the node's other addresses (the
    // VPC's, other pods') reaches the agent's HTTP parser.
    let listen = std::iter::once(IpAddr::V4(agent4))
        .chain(args.agent_ip6.map(IpAddr::V6))
        .map(|ip| SocketAddr::new(ip, args.port))
        .collect();
    Ok(Network {
        listen,
        kernel: Config {
            attach_cgroup_id: 0,
            agent_addr4: addr::v4_word(agent4),
            agent_addr6,
            agent_port: u32::from(args.port),
            flags,
            _reserved: 0,
            // Filled in by the agent from its own socket.
            agent_netns_cookie: 0,
        },
    })
}

fn kiam_imds_v6() -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> RunArgs {
        let mut argv = vec!["kiam-agent", "run", "--agent-ip", "10.0.0.5"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).expect("parses").command {
            Command::Run(run) => *run,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn defaults() {
        let net = network(&args(&[])).expect("valid");
        assert_eq!(net.listen, ["10.0.0.5:8186".parse().expect("literal")]);
        assert_eq!(net.kernel.agent_port, 8186);
        assert_eq!(
            addr::from_words(net.kernel.agent_addr6),
            "10.0.0.5".parse::<IpAddr>().expect("literal")
        );
    }

    #[test]
    fn the_agent_listens_on_its_addresses_only() {
        let net = network(&args(&["--agent-ip6", "fd00:1::5"])).expect("valid");
        let want: Vec<SocketAddr> = ["10.0.0.5:8186", "[fd00:1::5]:8186"]
            .iter()
            .map(|a| a.parse().expect("literal"))
            .collect();
        assert_eq!(net.listen, want);
        assert_eq!(
            addr::from_words(net.kernel.agent_addr6),
            "fd00:1::5".parse::<IpAddr>().expect("literal")
        );
    }

    #[test]
    fn bad_configurations_name_the_flag() {
        let cases: [(&[&str], &str); 5] = [
            (&["--port", "80"], "--port"),
            (&["--port", "30000"], "NodePort"),
            (&["--port", "32767"], "NodePort"),
            (&["--port", "0"], "--port"),
            (&["--agent-ip6", "fd00:ec2::254"], "--agent-ip6"),
        ];
        for (extra, flag) in cases {
            let err = network(&args(extra)).expect_err("invalid");
            assert!(err.to_string().contains(flag), "{extra:?}: {err}");
        }
        let v6 =
            Cli::try_parse_from(["kiam-agent", "run", "--agent-ip", "fd00::1"]).expect("parses");
        let Command::Run(run) = v6.command else {
            panic!("run")
        };
        assert!(
            network(&run)
                .expect_err("v6")
                .to_string()
                .contains("--agent-ip")
        );
        let imds = Cli::try_parse_from(["kiam-agent", "run", "--agent-ip", "169.254.169.254"])
            .expect("parses");
        let Command::Run(run) = imds.command else {
            panic!("run")
        };
        assert!(network(&run).is_err());
    }

    #[test]
    fn api_settings() {
        let run = args(&[]);
        assert!(api(&run.api).is_ok());
        for (extra, flag) in [
            (&["--server", "kiam:8443"][..], "--node-name"),
            (&["--allow-route-regexp", "("][..], "--allow-route-regexp"),
            (&["--request-deadline", "10s"][..], "--request-deadline"),
            (&["--min-validity", "5m"][..], "--min-validity"),
            (
                &["--max-connections-per-pod", "0"][..],
                "--max-connections-per-pod",
            ),
            (
                &["--max-connections", "10", "--max-connections-per-pod", "20"][..],
                "--max-connections",
            ),
            (&["--idle-timeout", "0s"][..], "--idle-timeout"),
            (&["--pod-connection-rate", "0"][..], "--pod-connection-rate"),
            (&["--pod-forward-rate", "0"][..], "--pod-forward-rate"),
        ] {
            let err = api(&args(extra).api).expect_err("invalid");
            assert!(err.to_string().contains(flag), "{extra:?}: {err}");
        }
        let settings = api(&run.api).expect("default");
        assert!(settings.servers.is_none());
        assert!(settings.remove_taint_of.is_none());
        let connected = api(&args(&[
            "--server",
            "kiam-server:8443",
            "--node-name",
            "node-a",
            "--tls-cert",
            "/c",
            "--tls-key",
            "/k",
            "--tls-ca",
            "/ca",
            "--remove-startup-taint",
            "--request-deadline",
            "500ms",
        ])
        .api)
        .expect("valid");
        let options = connected.servers.expect("servers");
        assert_eq!(options.servers, ["kiam-server:8443"]);
        assert_eq!(
            (options.cert, options.key, options.ca),
            ("/c".into(), "/k".into(), "/ca".into())
        );
        assert_eq!(connected.upstream.node, "node-a");
        assert_eq!(connected.upstream.deadline, Duration::from_millis(500));
        assert_eq!(connected.remove_taint_of.as_deref(), Some("node-a"));
        let re = settings.allow;
        assert!(re.is_match("/latest/meta-data/placement/region"));
        assert!(re.is_match("/latest/meta-data/placement/availability-zone/"));
        assert!(re.is_match("/latest/dynamic/instance-identity/document"));
        assert!(!re.is_match("/latest/dynamic/instance-identity/pkcs7"));
        assert!(!re.is_match("/latest/meta-data/instance-id"));
        assert!(!re.is_match("/latest/user-data"));
    }

    #[test]
    fn missing_agent_ip_is_a_usage_error() {
        let err = Cli::try_parse_from(["kiam-agent", "run"]).expect_err("required");
        assert!(err.to_string().contains("--agent-ip"), "{err}");
    }
}
