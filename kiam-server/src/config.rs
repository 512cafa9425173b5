//! Command line of `kiam-server`, validated by pure functions before anything starts.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::policy::{self, BaseArn};

/// kiam server: assumes roles for pods and serves the credentials to kiam agents over gRPC
/// with mutual TLS. The only kiam component that needs `sts:AssumeRole`. Without a
/// subcommand, runs with the flags below.
#[derive(Debug, Parser)]
#[command(
    name = "kiam-server",
    version,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub log: kiam_ops::LogArgs,
    #[command(flatten)]
    pub run: Option<RunArgs>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check a running server (watches synced, STS reachable). Exit code 0: healthy; 1: not.
    Health(crate::health::HealthArgs),
    /// Ask the running server over its probe socket (the kubelet's exec probes). Exit code 0:
    /// answered 200; 1: not.
    Probe(kiam_ops::ProbeArgs),
}

/// What the server runs with.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// gRPC listen address (mutual TLS).
    #[arg(long, env = "KIAM_SERVER_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// Admin listen address: `/metrics`, `/live`, `/ready` (plain HTTP). Loopback by default;
    /// the manifests give the pod's address, which Prometheus and the kubelet reach.
    #[arg(
        long,
        env = "KIAM_SERVER_ADMIN_LISTEN",
        default_value = kiam_ops::DEFAULT_SERVER_ADMIN_LISTEN
    )]
    pub admin_listen: SocketAddr,
    /// `/ready` turns false once the Kubernetes watches have been failing for this long, so a
    /// server that lost the API server leaves the Service.
    #[arg(long, env = "KIAM_WATCH_GRACE", default_value = "30s", value_parser = parse_duration)]
    pub watch_grace: Duration,
    /// PEM server certificate chain.
    #[arg(long, env = "KIAM_TLS_CERT")]
    pub tls_cert: PathBuf,
    /// PEM private key of the server certificate.
    #[arg(long, env = "KIAM_TLS_KEY")]
    pub tls_key: PathBuf,
    /// PEM CA bundle agent certificates must chain to.
    #[arg(long, env = "KIAM_TLS_CA")]
    pub tls_ca: PathBuf,
    /// How often the certificate files are checked for changes (cert-manager rotates them).
    #[arg(long, env = "KIAM_TLS_RELOAD_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub tls_reload_interval: Duration,
    /// The agents' service account, `<namespace>:<name>`: their projected tokens prove which
    /// node they run on (TokenReview).
    #[arg(
        long,
        env = "KIAM_AGENT_SERVICE_ACCOUNT",
        default_value = "kiam:kiam-agent"
    )]
    pub agent_service_account: String,
    /// The audience of the agents' projected service-account tokens.
    #[arg(long, env = "KIAM_AGENT_TOKEN_AUDIENCE", default_value = "kiam")]
    pub agent_token_audience: String,
    /// Let agents that prove no node (no token, a certificate without
    /// `spiffe://kiam/node/<name>`) ask about pods of any node: anyone holding the agents'
    /// certificate then gets any pod's role. Insecure; for migrations only.
    #[arg(long, env = "KIAM_ALLOW_UNIDENTIFIED_AGENTS")]
    pub allow_unidentified_agents: bool,
    /// Pods that get the node's own metadata service, verbatim, instead of a role: system
    /// DaemonSets that need the node's identity (VPC CNI, CSI node plugins, spot handlers).
    /// Rules `namespace=<ns>[,service-account=<sa>][,host-network=true|false]`, repeated or
    /// separated by `;`. `none` intercepts every pod. Only this flag selects pods: nothing a
    /// pod or a namespace user controls does. Mirror pods are never selected.
    #[arg(
        long,
        env = "KIAM_NODE_METADATA_PASSTHROUGH",
        value_delimiter = ';',
        default_value = "namespace=kube-system,host-network=true"
    )]
    pub node_metadata_passthrough: Vec<String>,
    /// Base ARN for role names without an account, e.g. `arn:aws:iam::123456789012:role/`
    /// (or just the account id).
    #[arg(
        long,
        env = "KIAM_ROLE_BASE_ARN",
        conflicts_with = "role_base_arn_autodetect"
    )]
    pub role_base_arn: Option<String>,
    /// Take the base ARN's account from the server's own identity (STS GetCallerIdentity).
    #[arg(long, env = "KIAM_ROLE_BASE_ARN_AUTODETECT")]
    pub role_base_arn_autodetect: bool,
    /// Pod annotation naming the role.
    #[arg(long, env = "KIAM_ROLE_ANNOTATION", default_value = policy::ANNOTATION_ROLE)]
    pub role_annotation: String,
    /// Role (name or ARN) for pods without a role annotation, in namespaces whose rule
    /// permits it; kube2iam's `--default-role`, for migrations. Off by default: an
    /// unannotated pod gets no role.
    #[arg(long, env = "KIAM_DEFAULT_ROLE")]
    pub default_role: Option<String>,
    /// Role the server assumes first and uses to assume pods' roles (optional).
    #[arg(long, env = "KIAM_ASSUME_ROLE_ARN")]
    pub assume_role_arn: Option<String>,
    /// STS region (regional endpoint). Default: the SDK's region chain.
    #[arg(long, env = "KIAM_STS_REGION")]
    pub sts_region: Option<String>,
    /// STS endpoint URL override (tests, VPC endpoints).
    #[arg(long, env = "KIAM_STS_ENDPOINT")]
    pub sts_endpoint: Option<String>,
    /// Lifetime of assumed-role sessions (15m to 12h, and above --min-validity).
    #[arg(long, env = "KIAM_SESSION_DURATION", default_value = "1h", value_parser = parse_duration)]
    pub session_duration: Duration,
    /// Credentials are never served with less than this left; they are refreshed well before.
    #[arg(long, env = "KIAM_MIN_VALIDITY", default_value = "30m", value_parser = parse_duration)]
    pub min_validity: Duration,
    /// Session name when the pod has no session-name annotation.
    #[arg(long, env = "KIAM_SESSION_NAME", default_value = "kiam")]
    pub session_name: String,
    /// Tag sessions with the pod's namespace and service account (`kiam-namespace`,
    /// `kiam-service-account`), for CloudTrail and ABAC. STS calls then grow with roles ×
    /// namespaces × service accounts.
    #[arg(long, env = "KIAM_SESSION_TAGS")]
    pub session_tags: bool,
    /// How often the server asks STS who it is (`GetCallerIdentity`) for `/health` and
    /// `kiam-server health`: one call per interval and server, whatever the cluster's size.
    #[arg(long, env = "KIAM_STS_HEALTH_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    pub sts_health_interval: Duration,
    /// Attempts per AssumeRole call (throttling and 5xx are retried with backoff and jitter).
    #[arg(long, env = "KIAM_STS_MAX_ATTEMPTS", default_value_t = 4)]
    pub sts_max_attempts: u32,
    /// Distinct sessions (role, external id, session name: pods choose the last two) one
    /// namespace may cause; more are refused, so no namespace can drive STS into throttling.
    #[arg(long, env = "KIAM_MAX_SESSIONS_PER_NAMESPACE", default_value_t = 32)]
    pub max_sessions_per_namespace: usize,
    /// Concurrent prefetch workers.
    #[arg(long, env = "KIAM_PREFETCH_WORKERS", default_value_t = 4)]
    pub prefetch_workers: usize,
    /// Prefetch queue bound; requests beyond it are dropped and counted.
    #[arg(long, env = "KIAM_PREFETCH_QUEUE", default_value_t = 1024)]
    pub prefetch_queue: usize,
    /// How often cached credentials are checked for refresh and eviction.
    #[arg(long, env = "KIAM_REFRESH_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub refresh_interval: Duration,
    /// Name of this server for Kubernetes Events (the downward API's pod name).
    #[arg(long, env = "KIAM_SERVER_NAME", default_value = "kiam-server")]
    pub server_name: String,
    /// Serve `/live` and `/ready` on this Unix socket too, for the kubelet's exec probes
    /// (`kiam-server probe ready`): no pod can reach it, so none can starve the probes.
    #[arg(long, env = "KIAM_PROBE_SOCKET")]
    pub probe_socket: Option<PathBuf>,
}

/// Durations such as `90s`, `15m`, `1h 30m` (humantime syntax).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{text:?}: {e} (e.g. 90s, 15m, 1h)"))
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("--session-duration must be between 15m and 12h (STS limits), got {0}s")]
    SessionDuration(u64),
    #[error(
        "--min-validity ({min}s) must be at least 5m below --session-duration ({duration}s), or credentials could never be served"
    )]
    MinValidity { min: u64, duration: u64 },
    #[error(
        "--min-validity must be more than 15m: SDKs refresh credentials expiring sooner on every call"
    )]
    MinValidityTooShort,
    #[error("--role-base-arn: {0}")]
    BaseArn(String),
    #[error("set --role-base-arn or --role-base-arn-autodetect")]
    NoBaseArn,
    #[error("--assume-role-arn: {0}")]
    GatewayRole(String),
    #[error("--sts-max-attempts must be between 1 and 10")]
    Attempts,
    #[error("--prefetch-workers and --prefetch-queue must be at least 1")]
    Prefetch,
    #[error("--node-metadata-passthrough: {0}")]
    PassThrough(String),
    #[error("--agent-service-account must be <namespace>:<name>, got {0:?}")]
    AgentServiceAccount(String),
    #[error("--agent-token-audience must not be empty")]
    AgentAudience,
    #[error("--default-role: {0}")]
    DefaultRole(String),
}

/// Validated settings that do not touch the network.
#[derive(Debug, Clone)]
pub struct Validated {
    pub base: Option<BaseArn>,
    pub passthrough: Vec<policy::PassThroughRule>,
    pub session_duration: Duration,
    pub min_validity: Duration,
}

pub fn validate(cli: &RunArgs) -> Result<Validated, ConfigError> {
    let duration = cli.session_duration.as_secs();
    if !(900..=43_200).contains(&duration) {
        return Err(ConfigError::SessionDuration(duration));
    }
    let min = cli.min_validity.as_secs();
    if min <= 900 {
        return Err(ConfigError::MinValidityTooShort);
    }
    if min + 300 > duration {
        return Err(ConfigError::MinValidity { min, duration });
    }
    let base = match (&cli.role_base_arn, cli.role_base_arn_autodetect) {
        (Some(base), _) => {
            Some(BaseArn::parse(base).map_err(|e| ConfigError::BaseArn(e.to_string()))?)
        }
        (None, true) => None,
        (None, false) => return Err(ConfigError::NoBaseArn),
    };
    if let Some(role) = &cli.default_role {
        // Any base gives the same verdict on a name; a full ARN is checked as it is.
        let probe = base.clone().unwrap_or(BaseArn {
            partition: "aws".into(),
            account: "000000000000".into(),
        });
        probe
            .resolve(role)
            .map_err(|e| ConfigError::DefaultRole(e.to_string()))?;
    }
    if let Some(arn) = &cli.assume_role_arn {
        policy::RoleArn::parse(arn).map_err(|e| ConfigError::GatewayRole(e.to_string()))?;
    }
    if !(1..=10).contains(&cli.sts_max_attempts) {
        return Err(ConfigError::Attempts);
    }
    if cli.prefetch_workers == 0 || cli.prefetch_queue == 0 {
        return Err(ConfigError::Prefetch);
    }
    let sa_parts: Vec<&str> = cli.agent_service_account.split(':').collect();
    if sa_parts.len() != 2 || sa_parts.iter().any(|p| p.trim().is_empty()) {
        return Err(ConfigError::AgentServiceAccount(
            cli.agent_service_account.clone(),
        ));
    }
    if cli.agent_token_audience.trim().is_empty() {
        return Err(ConfigError::AgentAudience);
    }
    let passthrough = policy::PassThroughRule::parse_all(&cli.node_metadata_passthrough)
        .map_err(|e| ConfigError::PassThrough(e.to_string()))?;
    Ok(Validated {
        base,
        passthrough,
        session_duration: cli.session_duration,
        min_validity: cli.min_validity,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(extra: &[&str]) -> RunArgs {
        let mut argv = vec![
            "kiam-server",
            "--tls-cert",
            "c",
            "--tls-key",
            "k",
            "--tls-ca",
            "ca",
            "--role-base-arn",
            "arn:aws:iam::123456789012:role/",
        ];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).expect("parses").run.expect("run")
    }

    #[test]
    fn subcommands_need_none_of_the_servers_flags() {
        let health = Cli::try_parse_from(["kiam-server", "health", "--json"]).expect("parses");
        assert!(matches!(health.command, Some(Command::Health(h)) if h.json));
        let probe = Cli::try_parse_from(["kiam-server", "probe", "ready"]).expect("parses");
        assert!(matches!(probe.command, Some(Command::Probe(p)) if p.what == "ready"));
        assert!(
            Cli::try_parse_from(["kiam-server"]).is_err(),
            "running needs TLS"
        );
        assert!(Cli::try_parse_from(["kiam-server", "probe", "sideways"]).is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("1h30").is_err());
    }

    #[test]
    fn defaults_are_valid() {
        let v = validate(&cli(&[])).expect("valid");
        assert_eq!(
            v.passthrough,
            vec![policy::PassThroughRule {
                namespace: "kube-system".into(),
                service_account: None,
                host_network: Some(true),
            }]
        );
        let none = validate(&cli(&["--node-metadata-passthrough", "none"])).expect("valid");
        assert!(none.passthrough.is_empty());
        let two = validate(&cli(&[
            "--node-metadata-passthrough",
            "namespace=kube-system,service-account=aws-node;namespace=monitoring",
        ]))
        .expect("valid");
        assert_eq!(two.passthrough.len(), 2);
        assert_eq!(v.session_duration, Duration::from_secs(3600));
        assert_eq!(v.min_validity, Duration::from_secs(1800));
    }

    #[test]
    fn bad_settings_name_their_flag() {
        let cases: [(&[&str], &str); 11] = [
            (
                &["--agent-service-account", "kiam-agent"],
                "--agent-service-account",
            ),
            (&["--agent-token-audience", " "], "--agent-token-audience"),
            (
                &["--node-metadata-passthrough", "kube-system"],
                "--node-metadata-passthrough",
            ),
            (&["--session-duration", "10m"], "--session-duration"),
            (&["--session-duration", "13h"], "--session-duration"),
            (&["--min-validity", "10m"], "--min-validity"),
            (&["--min-validity", "58m"], "--min-validity"),
            (&["--sts-max-attempts", "0"], "--sts-max-attempts"),
            (&["--assume-role-arn", "nope"], "--assume-role-arn"),
            (&["--default-role", "no spaces"], "--default-role"),
            (
                &["--default-role", "arn:aws:iam::123456789012:user/x"],
                "--default-role",
            ),
        ];
        validate(&cli(&["--default-role", "team/app"])).expect("a role name is a default role");
        for (extra, flag) in cases {
            let err = validate(&cli(extra)).expect_err("invalid");
            assert!(err.to_string().contains(flag), "{extra:?}: {err}");
        }
        let no_base = Cli::try_parse_from([
            "kiam-server",
            "--tls-cert",
            "c",
            "--tls-key",
            "k",
            "--tls-ca",
            "ca",
        ])
        .expect("parses")
        .run
        .expect("run");
        assert_eq!(
            validate(&no_base).expect_err("no base"),
            ConfigError::NoBaseArn
        );
    }
}
