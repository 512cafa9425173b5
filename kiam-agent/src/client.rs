//! The agent's client for kiam servers: mutual TLS, several servers (names re-resolved, so a
//! headless Service follows roll-outs), a deadline per request, a retry on another server when
//! one fails, and hedging: if the first server has not answered after `hedge_after`, a second
//! one is asked too and the first good answer wins.
//!
//! "Pod not known yet" answers (a pod asking before the servers' watches delivered it) are
//! retried with backoff until the deadline, which is kept below the SDKs' own timeouts.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, RwLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use futures::{StreamExt as _, future::BoxFuture, stream::FuturesUnordered};
use kiam_proto::kiam_client::KiamClient;
use tokio::time::Instant;
use tonic::{
    Code, Status,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("reading {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0:?} is not host:port (--server)")]
    BadServer(String),
}

#[derive(Clone, Debug)]
pub struct Options {
    /// `host:port` entries; names are resolved to every address they have.
    pub servers: Vec<String>,
    /// Name the server certificates are checked against.
    pub server_name: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    pub hedge_after: Duration,
    pub resolve_every: Duration,
}

struct Backend {
    addr: SocketAddr,
    client: KiamClient<Channel>,
}

pub struct Servers {
    options: Options,
    tls: RwLock<ClientTlsConfig>,
    /// Modification times of the certificate files the current `tls` was built from.
    tls_files: std::sync::Mutex<Vec<Option<std::time::SystemTime>>>,
    backends: RwLock<Vec<Arc<Backend>>>,
    next: AtomicUsize,
}

fn read(path: &PathBuf) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path).map_err(|source| ClientError::Read {
        path: path.display().to_string(),
        source,
    })
}

fn tls_config(options: &Options) -> Result<ClientTlsConfig, ClientError> {
    Ok(ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&options.ca)?))
        .identity(Identity::from_pem(
            read(&options.cert)?,
            read(&options.key)?,
        ))
        .domain_name(options.server_name.clone()))
}

fn modified(options: &Options) -> Vec<Option<std::time::SystemTime>> {
    [&options.cert, &options.key, &options.ca]
        .iter()
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
}

/// Whether another server may answer better.
fn try_elsewhere(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Unknown
            | Code::Internal
            | Code::Cancelled
    )
}

/// The startup race: the servers have not seen the pod yet.
fn not_known_yet(status: &Status) -> bool {
    status.code() == Code::NotFound && status.message().contains("not known")
}

impl Servers {
    pub fn new(options: Options) -> Result<Arc<Self>, ClientError> {
        for server in &options.servers {
            if server
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok())
                .is_none()
            {
                return Err(ClientError::BadServer(server.clone()));
            }
        }
        let tls = tls_config(&options)?;
        let files = modified(&options);
        Ok(Arc::new(Self {
            options,
            tls: RwLock::new(tls),
            tls_files: std::sync::Mutex::new(files),
            backends: RwLock::new(Vec::new()),
            next: AtomicUsize::new(0),
        }))
    }

    /// Rebuilds the TLS configuration when the certificate files changed (cert-manager
    /// renews them); returns whether it did. A broken new set is logged and the old one kept.
    fn reload_tls(&self) -> bool {
        let now = modified(&self.options);
        let mut seen = self.tls_files.lock().unwrap_or_else(|e| e.into_inner());
        if *seen == now {
            return false;
        }
        match tls_config(&self.options) {
            Ok(tls) => {
                *self.tls.write().unwrap_or_else(|e| e.into_inner()) = tls;
                *seen = now;
                tracing::info!("agent TLS certificates reloaded");
                true
            }
            Err(error) => {
                tracing::error!(%error, "agent TLS certificates changed but cannot be loaded; keeping the previous ones");
                false
            }
        }
    }

    /// Resolves the server names and keeps connections to addresses that remain (all
    /// connections are rebuilt after a certificate reload).
    pub async fn resolve(&self) {
        let reloaded = self.reload_tls();
        let mut addrs = Vec::new();
        for server in &self.options.servers {
            match tokio::net::lookup_host(server.as_str()).await {
                Ok(found) => addrs.extend(found),
                Err(error) => tracing::warn!(server, %error, "cannot resolve kiam server"),
            }
        }
        addrs.sort();
        addrs.dedup();
        let current: Vec<Arc<Backend>> = match reloaded {
            true => Vec::new(),
            false => self.snapshot(),
        };
        let tls = self.tls.read().unwrap_or_else(|e| e.into_inner()).clone();
        let mut fresh = Vec::new();
        for addr in addrs {
            if let Some(existing) = current.iter().find(|b| b.addr == addr) {
                fresh.push(existing.clone());
                continue;
            }
            let endpoint = Endpoint::from_shared(format!("https://{addr}"))
                .and_then(|e| e.tls_config(tls.clone()));
            match endpoint {
                Ok(endpoint) => {
                    let channel = endpoint
                        .connect_timeout(Duration::from_secs(2))
                        .http2_keep_alive_interval(Duration::from_secs(10))
                        .keep_alive_timeout(Duration::from_secs(5))
                        .keep_alive_while_idle(true)
                        .connect_lazy();
                    fresh.push(Arc::new(Backend {
                        addr,
                        client: KiamClient::new(channel),
                    }));
                }
                Err(error) => tracing::warn!(%addr, %error, "bad server endpoint"),
            }
        }
        if fresh.is_empty() {
            tracing::warn!("no kiam server address resolved; keeping the previous ones");
            return;
        }
        *self.backends.write().unwrap_or_else(|e| e.into_inner()) = fresh;
    }

    pub async fn resolve_forever(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.options.resolve_every);
        loop {
            tick.tick().await;
            self.resolve().await;
        }
    }

    fn snapshot(&self) -> Vec<Arc<Backend>> {
        self.backends
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Calls `op` on the servers until one answers, within `deadline`. A failed attempt is
    /// retried on a server not tried yet when there is one, after a growing pause otherwise,
    /// so a fast-failing server (refused, TLS error, not synced) is never hammered.
    pub async fn call<T: Send + 'static>(
        &self,
        deadline: Instant,
        op: impl Fn(KiamClient<Channel>) -> BoxFuture<'static, Result<T, Status>>,
    ) -> Result<T, Status> {
        let backends = self.snapshot();
        if backends.is_empty() {
            return Err(Status::unavailable(
                "no kiam server is configured or resolvable",
            ));
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut turn = 0usize;
        let launch =
            |turn: &mut usize,
             inflight: &mut FuturesUnordered<BoxFuture<'static, Result<T, Status>>>| {
                let backend = &backends[(start + *turn) % backends.len()];
                *turn += 1;
                inflight.push(op(backend.client.clone()));
            };
        let mut inflight = FuturesUnordered::new();
        launch(&mut turn, &mut inflight);
        let mut hedged = backends.len() < 2;
        let hedge = tokio::time::sleep(self.options.hedge_after);
        tokio::pin!(hedge);
        let mut last = Status::deadline_exceeded("no kiam server answered in time");
        let mut backoff = Duration::from_millis(20);
        loop {
            tokio::select! {
                biased;
                answer = inflight.next(), if !inflight.is_empty() => match answer {
                    Some(Ok(value)) => return Ok(value),
                    Some(Err(status)) if try_elsewhere(&status) || not_known_yet(&status) => {
                        last = status;
                        if inflight.is_empty() {
                            // Another server at once while some are untried; else wait.
                            if turn >= backends.len() || not_known_yet(&last) {
                                let wake = (Instant::now() + backoff).min(deadline);
                                tokio::time::sleep_until(wake).await;
                                backoff = (backoff * 2).min(Duration::from_millis(200));
                            }
                            if Instant::now() >= deadline {
                                return Err(last);
                            }
                            launch(&mut turn, &mut inflight);
                        }
                    }
                    Some(Err(status)) => return Err(status),
                    None => {}
                },
                () = &mut hedge, if !hedged => {
                    hedged = true;
                    if turn < backends.len() {
                        launch(&mut turn, &mut inflight);
                    }
                }
                () = tokio::time::sleep_until(deadline) => return Err(last),
            }
        }
    }
}
