//! `kiam-agent`: the per-node half of kiam; the parts live in the `kiam_agent` library.
#![forbid(unsafe_code)]

use std::{net::IpAddr, path::Path, sync::Arc, time::Duration};

use kiam_agent::{
    address, api, bpffs, caps, cgroup, client, config, forward, health, imds, loader, metrics,
    pins, port, rate, resolver, status, taint, token, upstream,
};

use anyhow::Context as _;
use clap::Parser as _;

use config::{Cli, Command, RunArgs};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Err(e) = kiam_ops::init_logging(cli.log.log_format, &cli.log.log_level) {
        eprintln!("kiam-agent: {e:#}");
        return std::process::ExitCode::from(2);
    }
    let result = match cli.command {
        Command::Run(args) => run(*args),
        Command::Status(args) => status::show(&args),
        Command::Uninstall(args) => uninstall(&args.bpffs_dir),
        Command::MountBpffs(args) => mount_bpffs(&args.path),
        Command::PrepareNode(args) => {
            mount_bpffs(&args.mount.path).and_then(|()| reserve_port(args.port))
        }
        Command::Probe(args) => return kiam_ops::probe(&args),
        Command::Health(args) => {
            return match health::run(&args) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("kiam-agent health: {e:#}");
                    std::process::ExitCode::from(health::UNHEALTHY)
                }
            };
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kiam-agent: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    caps::check()?;
    // rustls needs one process-wide crypto provider for the Kubernetes client (the start-up
    // taint) when more than one is compiled in.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut net = config::network(&args)?;
    net.kernel.agent_netns_cookie = own_netns_cookie();
    let settings = config::api(&args.api)?;
    // Before anything is attached: refused here, nothing is left half done.
    if port::ensure_reserved(args.port)? == port::Reservation::Reserved {
        tracing::info!(
            port = args.port,
            "reserved the agent's port (net.ipv4.ip_local_reserved_ports)"
        );
    }
    let tokens = token::Tokens::from_file(&args.api.token_key_file).context("--token-key-file")?;
    let root = cgroup::find_root(args.cgroup_root.as_deref())?;
    let attach = cgroup::find_attach_cgroup(&root, args.attach_cgroup.as_deref())?;
    let attach_id = cgroup::cgroup_id(&attach)?;
    let own = cgroup::own_cgroup(&root)?;
    let mut exempt = vec![cgroup::cgroup_id(&own)?];
    for path in &args.exempt_cgroup {
        let path = root.join(path);
        exempt.push(cgroup::cgroup_id(&path).with_context(|| "--exempt-cgroup")?);
    }
    tracing::info!(
        cgroup_root = %root.display(),
        attach_cgroup = %attach.display(),
        own_cgroup = %own.display(),
        "cgroups found"
    );

    let object = match &args.ebpf_object {
        Some(path) => {
            Some(std::fs::read(path).with_context(|| format!("--ebpf-object {}", path.display()))?)
        }
        None => None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        raise_memlock_limit();
        if let IpAddr::V4(v4) = args.agent_ip
            && address::is_link_local(v4)
            && address::ensure_on_loopback(v4).await?
        {
            tracing::info!(address = %v4, "added the link-local agent address to lo");
        }
        // Install first: pinned programs from a previous run refuse bind() to the agent's port
        // until this agent's cgroup is in the exempt set. Until the listener is up, redirected
        // pods get "connection refused".
        let installed = loader::install(&loader::InstallOptions {
            pin_dir: args.bpffs_dir.clone(),
            attach_cgroup: attach.clone(),
            attach_cgroup_id: attach_id,
            own_cgroup_covered: own.starts_with(&attach),
            own_cgroup: own,
            config: net.kernel,
            exempt,
            allow_private_bpffs: args.allow_private_bpffs,
            object,
        })?;
        kiam_ops::listen::raise_open_files_limit();
        let listeners = net
            .listen
            .iter()
            .map(|addr| {
                kiam_ops::listen::bind(*addr).with_context(|| {
                    format!("listening on {addr} (--agent-ip/--agent-ip6 must be this node's addresses; --port)")
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        start_kernel_logs(&installed);
        let lookup = cgroup::Cgroupfs::new(&root, attach.clone(), true)
            .with_context(|| format!("opening the cgroup root {}", root.display()))?;
        let throttle = Arc::new(rate::KernelThrottle::new(installed.throttle));
        let resolver = Arc::new(resolver::Resolver::new(
            resolver::AcceptedMap::new(installed.accepted),
            Arc::new(lookup),
            root,
        ));

        let servers = match settings.servers {
            None => {
                tracing::warn!("no --server: pods' credential requests will be refused");
                None
            }
            Some(options) => {
                let servers = client::Servers::new(options)?;
                if !args.api.token_file.exists() {
                    tracing::warn!(
                        path = %args.api.token_file.display(),
                        "no service-account token (--token-file): servers refuse this agent unless its certificate names this node"
                    );
                }
                servers.resolve().await;
                tokio::spawn(servers.clone().resolve_forever());
                Some(servers)
            }
        };
        let upstream = upstream::Upstream::new(
            servers
                .clone()
                .map(|s| s as Arc<dyn upstream::RoleServer>),
            Arc::new(upstream::SystemClock),
            settings.upstream,
        );
        {
            // Forget removed cgroups, and with them what was held for pods no longer here.
            let (resolver, upstream) = (resolver.clone(), upstream.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(60));
                loop {
                    tick.tick().await;
                    let pruned = resolver.prune();
                    if pruned > 0 {
                        tracing::debug!(pruned, "forgot removed cgroups");
                    }
                    let alive = resolver.subjects();
                    upstream.prune(|subject| alive.contains(subject));
                }
            });
        }
        let metrics = Arc::new(metrics::Metrics::default());
        let imds = Arc::new(imds::Imds {
            log_budget: imds::LogBudget::default(),
            forward_rate: kiam_agent::rate::PodRate::new(args.api.pod_forward_rate),
            tokens,
            upstream,
            allow: settings.allow,
            allow_user_data: args.api.allow_user_data,
            require_v2: args.api.require_imdsv2,
            forwarder: Some(forward::Forwarder::new(&args.api.imds_endpoint)),
            metrics: metrics.clone(),
        });
        let admin = kiam_ops::listen::bind(args.api.admin_listen)
            .with_context(|| format!("listening on {} (--admin-listen)", args.api.admin_listen))?;
        let server_ok = Arc::new(std::sync::atomic::AtomicBool::new(servers.is_none()));
        metrics.ready.set(i64::from(servers.is_none()));
        if let Some(servers) = servers {
            let (flag, metrics) = (server_ok.clone(), metrics.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(5));
                loop {
                    tick.tick().await;
                    let answers = servers.health_each(Duration::from_secs(2)).await;
                    let reachable = answers.iter().filter(|(_, a)| matches!(a, Ok(true))).count();
                    metrics.servers.set(answers.len() as i64);
                    metrics.servers_reachable.set(reachable as i64);
                    metrics.ready.set(i64::from(reachable > 0));
                    flag.store(reachable > 0, std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
        if let Some(node) = settings.remove_taint_of {
            tokio::spawn(taint::remove_when_ready(node, server_ok.clone()));
        }
        tokio::spawn(
            metrics
                .kernel
                .clone()
                .refresh(args.bpffs_dir.clone(), args.kernel_metrics_interval),
        );
        let admin_state = Arc::new(kiam_ops::Admin {
            metrics: Box::new(move || metrics.encode()),
            ready: Box::new(move || server_ok.load(std::sync::atomic::Ordering::Relaxed)),
            not_ready: "not ready: no kiam server reachable\n",
            health: None,
        });
        if let Some(path) = &args.api.probe_socket {
            let probes = kiam_ops::bind_probe(path)
                .with_context(|| format!("listening on {} (--probe-socket)", path.display()))?;
            tokio::spawn(kiam_ops::serve_probes(probes, admin_state.clone()));
        }
        tokio::spawn(kiam_ops::serve_admin(
            admin,
            admin_state,
            kiam_ops::AdminLimits::default(),
        ));
        tracing::info!(listen = ?net.listen, pin_dir = %args.bpffs_dir.display(), "kiam-agent ready");
        tokio::select! {
            () = api::serve(listeners, resolver, imds, settings.limits, throttle) => {}
            () = kiam_ops::shutdown_signal() => tracing::info!("shutting down; the pinned redirect stays in place"),
        }
        // The rest of `installed` (links, maps) is dropped here; the pins keep the programs
        // attached.
        Ok(())
    })
}

/// Follows the kernel programs' aya-log output (only written with
/// `--ebpf-log-connections`, so a slow poll is enough).
fn start_kernel_logs(installed: &loader::Installed) {
    let Some((_, id)) = installed.program_ids.first() else {
        return;
    };
    match aya_log::EbpfLogger::init_from_id(*id) {
        Ok(mut logger) => {
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(250));
                loop {
                    tick.tick().await;
                    logger.flush();
                }
            });
        }
        Err(error) => tracing::debug!(%error, "no kernel log records will be shown"),
    }
}

/// The cookie of the agent's network namespace, where the bind guard keeps the agent's port;
/// 0 (every namespace guarded) on kernels that cannot tell (before 5.14).
fn own_netns_cookie() -> u64 {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None);
    match socket.and_then(|s| kiam_common::sys::netns_cookie(&s)) {
        Ok(cookie) => cookie,
        Err(error) => {
            tracing::warn!(%error, "cannot read this network namespace's cookie (Linux 5.14+): the agent's port is guarded in every network namespace, pods' included");
            0
        }
    }
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; newer ones use memcg accounting,
/// so failing to raise it (no CAP_SYS_RESOURCE) is only worth a note.
fn raise_memlock_limit() {
    use nix::sys::resource::{Resource, setrlimit};
    if let Err(error) = setrlimit(
        Resource::RLIMIT_MEMLOCK,
        nix::sys::resource::RLIM_INFINITY,
        nix::sys::resource::RLIM_INFINITY,
    ) {
        tracing::debug!(%error, "could not raise RLIMIT_MEMLOCK (harmless on kernels >= 5.11)");
    }
}

fn uninstall(dir: &Path) -> anyhow::Result<()> {
    // The configured address, to remove it from lo if the agent added it there.
    let agent_addr = pins::status(dir)
        .ok()
        .and_then(|s| s.config)
        .and_then(|c| c.agent_addr4.parse::<std::net::Ipv4Addr>().ok())
        .filter(|a| address::is_link_local(*a));
    let removed = loader::uninstall(dir)?;
    if let Some(addr) = agent_addr {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        if runtime.block_on(address::remove_from_loopback(addr))? {
            println!("removed {addr}/32 from lo");
        }
    }
    if removed.is_empty() {
        println!("nothing pinned at {}", dir.display());
    }
    for path in removed {
        println!("removed {}", path.display());
    }
    Ok(())
}

/// `kiam-agent prepare-node`'s second step.
fn reserve_port(port: u16) -> anyhow::Result<()> {
    use kiam_agent::port::Reservation::*;
    match port::ensure_reserved(port)? {
        Reserved => println!("reserved port {port} (net.ipv4.ip_local_reserved_ports)"),
        AlreadyReserved => println!("port {port} already reserved"),
        OutsideRange => println!("port {port} is outside the ephemeral range"),
    }
    Ok(())
}

fn mount_bpffs(path: &Path) -> anyhow::Result<()> {
    match bpffs::mount(path)? {
        bpffs::Mounted::Mounted => println!("mounted bpffs at {} (shared)", path.display()),
        bpffs::Mounted::MadeShared => {
            println!(
                "bpffs already mounted at {}; made it shared",
                path.display()
            )
        }
        bpffs::Mounted::AlreadyThere => println!("bpffs already mounted at {}", path.display()),
    }
    Ok(())
}
