//! Command line of `kiam-agent`, and its validation into what the agent runs with.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
};

use clap::{Args, Parser, Subcommand, ValueEnum};
use kiam_common::{CONFIG_LOG_CONNECTIONS, Config, addr};

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
    Run(RunArgs),
    /// Show the pinned programs, configuration, map sizes and counters.
    Status(PinArgs),
    /// Detach and unpin the programs and maps (stop the agent first).
    Uninstall(PinArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct LogArgs {
    /// Log output format.
    #[arg(
        long,
        env = "KIAM_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,
    /// Log filter, in `tracing` EnvFilter syntax (e.g. `info,kiam_agent=debug`).
    #[arg(long, env = "KIAM_LOG", default_value = "info", global = true)]
    pub log_level: String,
}

#[derive(Debug, Args)]
pub struct PinArgs {
    /// bpffs directory holding the pinned programs and maps.
    #[arg(long, env = "KIAM_BPFFS_DIR", default_value = "/sys/fs/bpf/kiam")]
    pub bpffs_dir: PathBuf,
    /// Print JSON instead of text (status only).
    #[arg(long, env = "KIAM_STATUS_JSON")]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// IPv4 address of this node that pods are redirected to (the downward API's
    /// `status.hostIP`). The agent must be reachable there from every pod.
    #[arg(long, env = "KIAM_AGENT_IP")]
    pub agent_ip: IpAddr,
    /// IPv6 address of this node for pods connecting to `[fd00:ec2::254]`. Without it they are
    /// sent to the IPv4-mapped `--agent-ip`, which IPv6-only sockets cannot reach.
    #[arg(long, env = "KIAM_AGENT_IP6")]
    pub agent_ip6: Option<Ipv6Addr>,
    /// TCP port the agent listens on and pods are redirected to.
    #[arg(long, env = "KIAM_PORT", default_value_t = 8181)]
    pub port: u16,
    /// Address to listen on (default: `::` with `--agent-ip6`, else `0.0.0.0`).
    #[arg(long, env = "KIAM_BIND")]
    pub bind: Option<IpAddr>,
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
    /// More cgroups (paths, as for `--attach-cgroup`) whose connections to the metadata
    /// service are not redirected. The agent's own cgroup is always exempt.
    #[arg(long, env = "KIAM_EXEMPT_CGROUPS", value_delimiter = ',')]
    pub exempt_cgroup: Vec<PathBuf>,
    /// Emit a kernel log record for every redirected connection (debugging only: ~20 µs per
    /// connection).
    #[arg(long, env = "KIAM_EBPF_LOG_CONNECTIONS")]
    pub ebpf_log_connections: bool,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("--agent-ip must be an IPv4 address (got {0}); give an IPv6 address with --agent-ip6")]
    AgentIpNotV4(IpAddr),
    #[error("--agent-ip {0} cannot be used: pods need a unicast address of this node")]
    AgentIpUnusable(Ipv4Addr),
    #[error("--agent-ip6 {0} cannot be used: pods need a unicast address of this node")]
    AgentIp6Unusable(Ipv6Addr),
    #[error("--port must not be 0 or 80 (got {0}); pick a free port such as 8181")]
    BadPort(u16),
    #[error("--bind {bind} is IPv4 but --agent-ip6 is set; use --bind ::")]
    BindFamily { bind: IpAddr },
}

/// The validated parts of `run` that do not touch the system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    pub listen: SocketAddr,
    pub kernel: Config,
}

/// Checks the addresses and port, and derives the listen address and the kernel config.
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
    let bind = match (args.bind, args.agent_ip6) {
        (Some(bind @ IpAddr::V4(_)), Some(_)) => return Err(ConfigError::BindFamily { bind }),
        (Some(bind), _) => bind,
        (None, Some(_)) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        (None, None) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    };
    let agent_addr6 = match args.agent_ip6 {
        Some(v6) => addr::words(IpAddr::V6(v6)),
        None => addr::words(IpAddr::V4(agent4)),
    };
    let mut flags = 0;
    if args.ebpf_log_connections {
        flags |= CONFIG_LOG_CONNECTIONS;
    }
    Ok(Network {
        listen: SocketAddr::new(bind, args.port),
        kernel: Config {
            attach_cgroup_id: 0,
            agent_addr4: addr::v4_word(agent4),
            agent_addr6,
            agent_port: u32::from(args.port),
            flags,
            _reserved: 0,
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
            Command::Run(run) => run,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn defaults() {
        let net = network(&args(&[])).expect("valid");
        assert_eq!(net.listen, "0.0.0.0:8181".parse().expect("literal"));
        assert_eq!(net.kernel.agent_port, 8181);
        assert_eq!(
            addr::from_words(net.kernel.agent_addr6),
            "10.0.0.5".parse::<IpAddr>().expect("literal")
        );
    }

    #[test]
    fn ipv6_agent_listens_dual_stack() {
        let net = network(&args(&["--agent-ip6", "fd00:1::5"])).expect("valid");
        assert_eq!(net.listen, "[::]:8181".parse().expect("literal"));
        assert_eq!(
            addr::from_words(net.kernel.agent_addr6),
            "fd00:1::5".parse::<IpAddr>().expect("literal")
        );
    }

    #[test]
    fn bad_configurations_name_the_flag() {
        let cases: [(&[&str], &str); 4] = [
            (&["--port", "80"], "--port"),
            (&["--port", "0"], "--port"),
            (&["--agent-ip6", "fd00:ec2::254"], "--agent-ip6"),
            (&["--agent-ip6", "fd00::1", "--bind", "0.0.0.0"], "--bind"),
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
    fn missing_agent_ip_is_a_usage_error() {
        let err = Cli::try_parse_from(["kiam-agent", "run"]).expect_err("required");
        assert!(err.to_string().contains("--agent-ip"), "{err}");
    }
}
