//! `kiam-server`: wires the index, the credential cache, the gRPC service and the admin
//! listener together. See the library modules for what each part owns.
#![forbid(unsafe_code)]

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::{CommandFactory as _, Parser as _};
use kiam_server::{
    clock::{Clock, SystemClock},
    config::{self, Cli, Command, RunArgs},
    credentials::{CredentialCache, StsSource},
    decision::Settings,
    events::Events,
    health,
    identity::{self, AgentAuth, KubeReviewer},
    index::{self, Index},
    metrics::Metrics,
    policy::{self, BaseArn},
    proto::kiam_server::KiamServer,
    service::KiamService,
    sessions::SessionBudget,
    tls,
    upkeep::Upkeep,
};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Health(args)) => {
            let code = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map(|rt| rt.block_on(health::check(&args)))
                .unwrap_or(health::UNHEALTHY);
            return std::process::ExitCode::from(code);
        }
        Some(Command::Probe(args)) => return kiam_ops::probe(&args),
        None => {}
    }
    let Some(run_args) = cli.run else {
        // clap requires the TLS flags when there is no subcommand: this is only for safety.
        Cli::command()
            .error(
                clap::error::ErrorKind::MissingRequiredArgument,
                "--tls-cert, --tls-key and --tls-ca are required",
            )
            .exit()
    };
    // The AWS SDK brings aws-lc-rs and tonic ring: with both compiled in, rustls cannot pick a
    // process default by itself (kube's client needs one).
    let _ = rustls::crypto::ring::default_provider().install_default();
    if let Err(e) = kiam_ops::init_logging(cli.log.log_format, &cli.log.log_level) {
        eprintln!("kiam-server: {e:#}");
        return std::process::ExitCode::from(2);
    }
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
        .and_then(|rt| rt.block_on(run(run_args)));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kiam-server: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn sts_client(cli: &RunArgs) -> aws_sdk_sts::Client {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    if let Some(region) = &cli.sts_region {
        loader = loader.region(aws_config::Region::new(region.clone()));
    }
    if let Some(endpoint) = &cli.sts_endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    let base = loader.load().await;
    let mut builder = aws_sdk_sts::config::Builder::from(&base).retry_config(
        aws_config::retry::RetryConfig::standard().with_max_attempts(cli.sts_max_attempts),
    );
    if let Some(gateway) = &cli.assume_role_arn {
        // The server's own credentials only assume the gateway role; pods' roles are assumed
        // with the gateway's.
        let provider = aws_config::sts::AssumeRoleProvider::builder(gateway)
            .session_name("kiam-server")
            .configure(&base)
            .build()
            .await;
        builder = builder.credentials_provider(provider);
    }
    aws_sdk_sts::Client::from_conf(builder.build())
}

async fn run(cli: RunArgs) -> anyhow::Result<()> {
    let validated = config::validate(&cli)?;
    let tls = tls::Reloading::new(tls::Files {
        cert: cli.tls_cert.clone(),
        key: cli.tls_key.clone(),
        ca: cli.tls_ca.clone(),
    })
    .map_err(|e| anyhow::anyhow!("{} (--tls-cert/--tls-key/--tls-ca)", tls::DisplayChain(&e)))?;
    let sts = sts_client(&cli).await;
    let base = match validated.base {
        Some(base) => base,
        None => {
            let me = sts
                .get_caller_identity()
                .send()
                .await
                .map_err(|e| anyhow::anyhow!("{}", aws_sdk_sts::error::DisplayErrorContext(&e)))
                .context("--role-base-arn-autodetect: GetCallerIdentity failed")?;
            let arn = me.arn.unwrap_or_default();
            let base = BaseArn::from_caller_arn(&arn)
                .with_context(|| format!("--role-base-arn-autodetect: caller ARN {arn:?}"))?;
            tracing::info!(account = %base.account, "role base ARN detected");
            base
        }
    };
    if cli.allow_unidentified_agents {
        tracing::warn!(
            "--allow-unidentified-agents: an agent that proves no node (no token, a certificate without one) may ask for the pods of any node, so anyone holding the agents' certificate gets any pod's role"
        );
    }
    let client = kube::Client::try_default()
        .await
        .context("connecting to Kubernetes (in-cluster config or KUBECONFIG)")?;

    let metrics = Arc::new(Metrics::default());
    let index = Arc::new(Index::with_grace(
        cli.watch_grace,
        vec![
            cli.role_annotation.clone(),
            policy::ANNOTATION_EXTERNAL_ID.into(),
            policy::ANNOTATION_SESSION_NAME.into(),
        ],
    ));
    let settings = Settings {
        base,
        role_annotation: cli.role_annotation.clone(),
        default_session_name: cli.session_name.clone(),
        session_tags: cli.session_tags,
        passthrough: validated.passthrough.clone(),
        default_role: cli.default_role.clone(),
    };
    if let Some(role) = &cli.default_role {
        let arn = settings
            .base
            .resolve(role)
            .map(|r| r.arn)
            .unwrap_or_default();
        tracing::warn!(
            default_role = %arn,
            "--default-role: every pod without a {} annotation, in a namespace whose rule permits {arn}, gets its credentials (kiam_server_credentials_served_total{{role_source=\"default\"}} counts them)",
            cli.role_annotation
        );
    }
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let cache = CredentialCache::new(
        StsSource {
            client: sts.clone(),
            duration: validated.session_duration,
            clock: clock.clone(),
        },
        validated.min_validity,
        metrics.clone(),
        clock,
    );
    let recorder = kube::runtime::events::Recorder::new(
        client.clone(),
        kube::runtime::events::Reporter {
            controller: "kiam-server".into(),
            instance: Some(cli.server_name.clone()),
        },
    );
    let events = Arc::new(Events::new(Some(recorder), metrics.clone()));

    let sessions = Arc::new(SessionBudget::new(cli.max_sessions_per_namespace));
    Upkeep {
        index: index.clone(),
        settings: settings.clone(),
        cache: cache.clone(),
        metrics: metrics.clone(),
        sessions: sessions.clone(),
        events: events.clone(),
        every: cli.refresh_interval,
        queue: cli.prefetch_queue,
        workers: cli.prefetch_workers,
    }
    .start();

    tokio::spawn(index::run(client.clone(), index.clone()));
    tokio::spawn(tls.clone().watch(cli.tls_reload_interval));

    let admin = kiam_ops::listen::bind(cli.admin_listen)
        .with_context(|| format!("listening on {} (--admin-listen)", cli.admin_listen))?;
    let ready_index = index.clone();
    let health_index = index.clone();
    let exposed = metrics.clone();
    let sts_health = Arc::new(health::StsHealth::new(cli.sts_health_interval));
    tokio::spawn(sts_health.clone().probe_forever(sts.clone()));
    let admin_state = Arc::new(kiam_ops::Admin {
        metrics: Box::new(move || exposed.encode()),
        ready: Box::new(move || ready_index.ready()),
        not_ready: "not ready: the Kubernetes index has not synced, or its watches are failing\n",
        health: Some(Box::new(move || {
            let report = sts_health.report(health_index.ready());
            let body = serde_json::to_string(&report).unwrap_or_default();
            (report.healthy, body + "\n")
        })),
    });
    if let Some(path) = &cli.probe_socket {
        let probes = kiam_ops::bind_probe(path)
            .with_context(|| format!("listening on {} (--probe-socket)", path.display()))?;
        tokio::spawn(kiam_ops::serve_probes(probes, admin_state.clone()));
    }
    tokio::spawn(kiam_ops::serve_admin(
        admin,
        admin_state,
        kiam_ops::AdminLimits::default(),
    ));

    kiam_ops::listen::raise_open_files_limit();
    let listener = kiam_ops::listen::bind(cli.listen)
        .with_context(|| format!("listening on {} (--listen)", cli.listen))?;
    tracing::info!(listen = %cli.listen, admin = %cli.admin_listen, "kiam-server started; waiting for the Kubernetes index");
    let auth = Arc::new(AgentAuth::new(
        Arc::new(KubeReviewer(client.clone())),
        identity::Settings {
            service_account: cli.agent_service_account.clone(),
            audience: cli.agent_token_audience.clone(),
            allow_unidentified: cli.allow_unidentified_agents,
        },
        index.clone(),
    ));
    let service = KiamService {
        index,
        settings,
        auth,
        sessions,
        cache,
        events,
        metrics,
    };
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(KiamServer::new(service))
        .serve_with_incoming_shutdown(tls::incoming(listener, tls), async {
            kiam_ops::shutdown_signal().await;
            tracing::info!("shutting down");
        })
        .await
        .context("gRPC server")?;
    Ok(())
}
