//! The agent's client for kiam servers: mutual TLS, several servers (names re-resolved, so a
//! headless Service follows roll-outs), a deadline per request, a retry on another server when
//! one fails, and hedging: if the first server has not answered after `hedge_after`, a second
//! one is asked too and the first good answer wins.
//!
//! "Pod not known yet" answers (a pod asking before the servers' watches delivered it) are
//! retried with backoff until the deadline, which is kept below the SDKs' own timeouts.
//!
//! The retry and hedging policy ([`call_backends`]) is generic over the backend, so it is
//! unit-tested with fakes under tokio's paused clock.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use futures::{FutureExt as _, StreamExt as _, future::BoxFuture, stream::FuturesUnordered};
use kiam_proto::{
    Credentials as ProtoCredentials, GetCredentialsRequest, GetPodRoleRequest, GetPodRoleResponse,
    Reason, kiam_client::KiamClient, reason_of,
};
use tokio::time::Instant;
use tonic::{
    Code, Status,
    metadata::MetadataValue,
    service::{Interceptor, interceptor::InterceptedService},
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
    /// The agent's projected service-account token, sent with every call.
    pub token_file: Option<PathBuf>,
}

/// The agent's projected service-account token, re-read whenever the kubelet rotates it
/// (a new file behind the same path: its modification time changes).
pub struct TokenFile {
    path: PathBuf,
    current: std::sync::Mutex<Option<(std::time::SystemTime, Arc<str>)>>,
}

impl TokenFile {
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            current: std::sync::Mutex::new(None),
        }
    }

    /// The token as the file holds it now; the last one read if the file is unreadable.
    pub fn token(&self) -> Option<Arc<str>> {
        let modified = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let fresh = match (&*current, modified) {
            (Some((seen, _)), Some(now)) => *seen != now,
            (None, Some(_)) => true,
            (_, None) => false,
        };
        if fresh && let (Ok(text), Some(modified)) = (std::fs::read_to_string(&self.path), modified)
        {
            let token: Arc<str> = Arc::from(text.trim());
            if !token.is_empty() {
                *current = Some((modified, token));
            }
        }
        current.as_ref().map(|(_, token)| token.clone())
    }
}

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct BearerToken(Option<Arc<TokenFile>>);

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(token) = self.0.as_ref().and_then(|t| t.token())
            && let Ok(value) = MetadataValue::try_from(format!("Bearer {token}"))
        {
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }
}

/// A server's client, with the agent's token on every call.
pub type Client = KiamClient<InterceptedService<Channel, BearerToken>>;

struct Backend {
    addr: SocketAddr,
    client: Client,
}

pub struct Servers {
    options: Options,
    token: BearerToken,
    tls: RwLock<ClientTlsConfig>,
    /// Modification times of the certificate files the current `tls` was built from.
    tls_files: std::sync::Mutex<Vec<Option<std::time::SystemTime>>>,
    backends: RwLock<Vec<Arc<Backend>>>,
    next: AtomicUsize,
    /// Whether a server answered the last call or health check (see
    /// [`crate::upstream::RoleServer::answering`]).
    answering: Arc<AtomicBool>,
}

/// Whether `result` came from a server (an answer, or a refusal with its reason) rather than
/// from the transport or a timeout.
fn answered<T>(result: &Result<T, Status>) -> bool {
    match result {
        Ok(_) => true,
        Err(status) => reason_of(status) != Reason::Unspecified,
    }
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

/// The startup race: the servers have not seen the pod yet, or (per-container roles) the
/// kubelet has not reported the caller's container yet.
fn not_known_yet(status: &Status) -> bool {
    matches!(
        reason_of(status),
        Reason::PodNotKnown | Reason::ContainerNotKnown
    )
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
        let token = BearerToken(
            options
                .token_file
                .clone()
                .map(|path| Arc::new(TokenFile::new(path))),
        );
        Ok(Arc::new(Self {
            options,
            token,
            tls: RwLock::new(tls),
            tls_files: std::sync::Mutex::new(files),
            backends: RwLock::new(Vec::new()),
            next: AtomicUsize::new(0),
            answering: Arc::new(AtomicBool::new(true)),
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
                        client: KiamClient::with_interceptor(channel, self.token.clone()),
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

    /// Resolves every `resolve_every`; while no server address is known (the agent came up
    /// before any server was ready, as on a new cluster), after 1 s, doubling up to it.
    pub async fn resolve_forever(self: Arc<Self>) {
        let mut retry = None;
        loop {
            let known = !self
                .backends
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .is_empty();
            let (wait, next) = next_resolve(known, retry, self.options.resolve_every);
            retry = next;
            tokio::time::sleep(wait).await;
            self.resolve().await;
        }
    }

    /// Asks every resolved server for its Health, at once; each address and its answer
    /// (`Ok(ready)`, or why it did not answer).
    pub async fn health_each(&self, timeout: Duration) -> Vec<(SocketAddr, Result<bool, Status>)> {
        let checks = self.snapshot().into_iter().map(|backend| async move {
            let mut client = backend.client.clone();
            let mut request = tonic::Request::new(kiam_proto::HealthRequest {});
            request.set_timeout(timeout);
            let answer = tokio::time::timeout(timeout, client.health(request))
                .await
                .unwrap_or_else(|_| Err(Status::deadline_exceeded("no answer in time")))
                .map(|r| r.into_inner().ready);
            (backend.addr, answer)
        });
        let answers = futures::future::join_all(checks).await;
        let any = answers.iter().any(|(_, a)| matches!(a, Ok(true)));
        self.answering.store(any, Ordering::Relaxed);
        answers
    }

    fn snapshot(&self) -> Vec<Arc<Backend>> {
        self.backends
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Calls `op` on the servers until one answers, within `deadline` (see
    /// [`call_backends`]), and remembers whether one did.
    fn call<T: Send + 'static>(
        &self,
        deadline: Instant,
        retry_not_known: bool,
        op: impl Fn(Client) -> BoxFuture<'static, Result<T, Status>> + Send + Sync + 'static,
    ) -> BoxFuture<'static, Result<T, Status>> {
        let backends = self.snapshot();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let (hedge, answering) = (self.options.hedge_after, self.answering.clone());
        async move {
            let result = call_backends(&backends, start, hedge, deadline, retry_not_known, |b| {
                op(b.client.clone())
            })
            .await;
            answering.store(answered(&result), Ordering::Relaxed);
            result
        }
        .boxed()
    }
}

impl crate::upstream::RoleServer for Servers {
    fn pod_role(
        &self,
        request: GetPodRoleRequest,
        deadline: Instant,
        known_before: bool,
    ) -> BoxFuture<'static, Result<GetPodRoleResponse, Status>> {
        self.call(deadline, !known_before, move |mut client| {
            let request = with_deadline(&request, deadline);
            async move { client.get_pod_role(request).await.map(|r| r.into_inner()) }.boxed()
        })
    }

    fn credentials(
        &self,
        request: GetCredentialsRequest,
        deadline: Instant,
    ) -> BoxFuture<'static, Result<ProtoCredentials, Status>> {
        // Credentials are asked for a pod whose role was just answered: not known now means
        // deleted.
        self.call(deadline, false, move |mut client| {
            let request = with_deadline(&request, deadline);
            async move {
                client
                    .get_credentials(request)
                    .await
                    .map(|r| r.into_inner())
            }
            .boxed()
        })
    }

    fn answering(&self) -> bool {
        self.answering.load(Ordering::Relaxed)
    }
}

/// A request that tells the server how long the agent waits (`grpc-timeout`), so a slow STS
/// gets a clear answer before the agent gives up.
fn with_deadline<T: Clone>(message: &T, deadline: Instant) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message.clone());
    request.set_timeout(deadline.saturating_duration_since(Instant::now()));
    request
}

/// Calls `op` on `backends` (starting at `start`, round robin) until one answers, within
/// `deadline`:
/// - a failed attempt is retried on a backend not tried yet when there is one, after a
///   growing pause (20 ms doubling to 200 ms) otherwise, so a fast-failing server (refused,
///   TLS error, not synced) is never hammered;
/// - "pod not known yet" is retried after the pause too, with `retry_not_known` (a pod never
///   seen: the watch is about to deliver it); without, once every backend said so, that is
///   the answer (a pod known before was deleted);
/// - if the first backend has not answered after `hedge_after`, a second one is asked as
///   well and the first good answer wins;
/// - definite answers (a refusal) end the call at once.
pub async fn call_backends<B, T: Send + 'static>(
    backends: &[B],
    start: usize,
    hedge_after: Duration,
    deadline: Instant,
    retry_not_known: bool,
    op: impl Fn(&B) -> BoxFuture<'static, Result<T, Status>>,
) -> Result<T, Status> {
    if backends.is_empty() {
        return Err(Status::unavailable(
            "no kiam server is configured or resolvable",
        ));
    }
    let mut turn = 0usize;
    let launch =
        |turn: &mut usize,
         inflight: &mut FuturesUnordered<BoxFuture<'static, Result<T, Status>>>| {
            let backend = &backends[(start + *turn) % backends.len()];
            *turn += 1;
            inflight.push(op(backend));
        };
    let mut inflight = FuturesUnordered::new();
    launch(&mut turn, &mut inflight);
    let mut hedged = backends.len() < 2;
    let hedge = tokio::time::sleep(hedge_after);
    tokio::pin!(hedge);
    let mut last = Status::deadline_exceeded("no kiam server answered in time");
    let mut backoff = Duration::from_millis(20);
    loop {
        tokio::select! {
            biased;
            answer = inflight.next(), if !inflight.is_empty() => match answer {
                Some(Ok(value)) => return Ok(value),
                Some(Err(status)) if try_elsewhere(&status) || not_known_yet(&status) => {
                    // A server's own refusal says more than a late retry's timeout.
                    if reason_of(&status) != Reason::Unspecified
                        || reason_of(&last) == Reason::Unspecified
                    {
                        last = status;
                    }
                    if inflight.is_empty() {
                        // Every server has said it does not know the pod: for a pod that
                        // was known before, that is the answer (it was deleted).
                        if !retry_not_known && not_known_yet(&last) && turn >= backends.len() {
                            return Err(last);
                        }
                        // Another server at once while some are untried; else wait.
                        if turn >= backends.len() || (retry_not_known && not_known_yet(&last)) {
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

/// How long to wait before resolving the servers again, and the retry delay after that:
/// `every` while some address is known; otherwise the retry delay (1 s at first), doubled
/// each time up to `every`.
pub fn next_resolve(
    known: bool,
    retry: Option<Duration>,
    every: Duration,
) -> (Duration, Option<Duration>) {
    if known {
        return (every, None);
    }
    let wait = retry.unwrap_or(Duration::from_secs(1)).min(every);
    (wait, Some((wait * 2).min(every)))
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use kiam_proto::Refusal;

    use super::*;

    #[test]
    fn an_agent_that_knows_no_server_resolves_again_soon() {
        let every = Duration::from_secs(30);
        let s = Duration::from_secs;
        assert_eq!(next_resolve(true, None, every), (every, None));
        let mut retry = None;
        let mut waits = Vec::new();
        for _ in 0..7 {
            let (wait, next) = next_resolve(false, retry, every);
            waits.push(wait);
            retry = next;
        }
        assert_eq!(waits, [s(1), s(2), s(4), s(8), s(16), s(30), s(30)]);
        // Once an address is known again, the regular period, and the retries start over.
        assert_eq!(next_resolve(true, retry, every), (every, None));
    }

    /// What each fake backend does when called.
    #[derive(Clone, Copy, Debug)]
    enum Behaviour {
        Answer(Duration),
        Fail(Code, Duration),
        NotKnown,
        Refuse,
    }

    /// (backend, time since the test started) of every call.
    type Calls = Arc<Mutex<Vec<(usize, Duration)>>>;

    struct Fake {
        id: usize,
        behaviour: Behaviour,
        calls: Calls,
        started: Instant,
    }

    fn op(b: &Fake) -> BoxFuture<'static, Result<usize, Status>> {
        b.calls
            .lock()
            .expect("lock")
            .push((b.id, b.started.elapsed()));
        let (id, behaviour) = (b.id, b.behaviour);
        async move {
            match behaviour {
                Behaviour::Answer(after) => {
                    tokio::time::sleep(after).await;
                    Ok(id)
                }
                Behaviour::Fail(code, after) => {
                    tokio::time::sleep(after).await;
                    Err(Status::new(code, "failed"))
                }
                Behaviour::NotKnown => Err(Refusal {
                    reason: Reason::PodNotKnown.into(),
                    message: "not known".into(),
                }
                .into_status(Code::NotFound)),
                Behaviour::Refuse => Err(Refusal {
                    reason: Reason::RoleNotPermitted.into(),
                    message: "no".into(),
                }
                .into_status(Code::PermissionDenied)),
            }
        }
        .boxed()
    }

    fn backends(behaviours: &[Behaviour]) -> (Vec<Fake>, Calls) {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let started = Instant::now();
        let fakes = behaviours
            .iter()
            .enumerate()
            .map(|(id, behaviour)| Fake {
                id,
                behaviour: *behaviour,
                calls: calls.clone(),
                started,
            })
            .collect();
        (fakes, calls)
    }

    const HEDGE: Duration = Duration::from_millis(150);
    const MS: fn(u64) -> Duration = Duration::from_millis;

    async fn call(fakes: &[Fake]) -> Result<usize, Status> {
        call_backends(fakes, 0, HEDGE, Instant::now() + MS(900), true, op).await
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_server_is_hedged_after_hedge_after() {
        let (fakes, calls) = backends(&[Behaviour::Answer(MS(2000)), Behaviour::Answer(MS(10))]);
        let started = Instant::now();
        assert_eq!(call(&fakes).await.expect("answered"), 1);
        assert_eq!(started.elapsed(), HEDGE + MS(10));
        assert_eq!(*calls.lock().expect("lock"), vec![(0, MS(0)), (1, HEDGE)]);
        // A fast first answer asks nobody else.
        let (fakes, calls) = backends(&[Behaviour::Answer(MS(5)), Behaviour::Answer(MS(5))]);
        assert_eq!(call(&fakes).await.expect("answered"), 0);
        assert_eq!(calls.lock().expect("lock").len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_server_is_retried_on_another_at_once() {
        let (fakes, calls) = backends(&[
            Behaviour::Fail(Code::Unavailable, MS(1)),
            Behaviour::Answer(MS(1)),
        ]);
        assert_eq!(call(&fakes).await.expect("answered"), 1);
        assert_eq!(*calls.lock().expect("lock"), vec![(0, MS(0)), (1, MS(1))]);
    }

    #[tokio::test(start_paused = true)]
    async fn when_every_server_failed_retries_back_off_until_the_deadline() {
        let (fakes, calls) = backends(&[
            Behaviour::Fail(Code::Unavailable, MS(0)),
            Behaviour::Fail(Code::Unavailable, MS(0)),
        ]);
        let started = Instant::now();
        let err = call(&fakes).await.expect_err("no server");
        assert_eq!(err.code(), Code::Unavailable);
        assert_eq!(
            started.elapsed(),
            MS(900),
            "gave up at the deadline, not before"
        );
        let times: Vec<Duration> = calls.lock().expect("lock").iter().map(|c| c.1).collect();
        // Both at once, then pauses of 20, 40, 80, 160, 200, 200 … ms.
        assert_eq!(
            &times[..6],
            &[MS(0), MS(0), MS(20), MS(60), MS(140), MS(300)]
        );
        assert!(times.windows(2).all(|w| w[1] - w[0] <= MS(200)));
    }

    #[tokio::test(start_paused = true)]
    async fn not_known_yet_is_retried_and_refusals_are_final() {
        let (fakes, calls) = backends(&[Behaviour::NotKnown]);
        let err = call(&fakes).await.expect_err("never known");
        assert_eq!(reason_of(&err), Reason::PodNotKnown);
        assert!(calls.lock().expect("lock").len() > 3, "retried");
        // For a pod known before, every server saying so is the answer, at once.
        let (fakes, calls) = backends(&[Behaviour::NotKnown, Behaviour::NotKnown]);
        let started = Instant::now();
        let err = call_backends(&fakes, 0, HEDGE, Instant::now() + MS(900), false, op)
            .await
            .expect_err("deleted");
        assert_eq!(reason_of(&err), Reason::PodNotKnown);
        assert_eq!(calls.lock().expect("lock").len(), 2, "each server once");
        assert_eq!(started.elapsed(), MS(0));
        let (fakes, calls) = backends(&[Behaviour::Refuse, Behaviour::Answer(MS(0))]);
        let err = call(&fakes).await.expect_err("refused");
        assert_eq!(reason_of(&err), Reason::RoleNotPermitted);
        assert_eq!(calls.lock().expect("lock").len(), 1, "a refusal is final");
    }

    #[test]
    fn the_token_is_re_read_when_the_file_changes() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("token");
        let file = TokenFile::new(path.clone());
        assert_eq!(file.token(), None, "no file yet");
        std::fs::write(&path, "first\n").expect("write");
        assert_eq!(file.token().as_deref(), Some("first"));
        // The kubelet swaps in a new file; its modification time differs.
        std::fs::write(dir.path().join("new"), "second").expect("write");
        let later = std::time::SystemTime::now() + Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(dir.path().join("new"))
            .and_then(|f| f.set_modified(later))
            .expect("mtime");
        std::fs::rename(dir.path().join("new"), &path).expect("rename");
        assert_eq!(file.token().as_deref(), Some("second"));
        // Unreadable for a moment: the last token stands.
        std::fs::remove_file(&path).expect("rm");
        assert_eq!(file.token().as_deref(), Some("second"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_servers_reason_outlives_a_later_bare_timeout() {
        // The first answer explains itself (STS is slow); a retry then times out bare.
        let calls = Arc::new(Mutex::new(0usize));
        let fakes = vec![()];
        let op = |_: &()| {
            let n = {
                let mut c = calls.lock().expect("lock");
                *c += 1;
                *c
            };
            async move {
                match n {
                    1 => Err(Refusal {
                        reason: Reason::StsUnavailable.into(),
                        message: "STS is slow".into(),
                    }
                    .into_status(Code::Unavailable)),
                    _ => Err(Status::cancelled("Timeout expired")),
                }
            }
            .boxed()
        };
        let op: &dyn Fn(&()) -> BoxFuture<'static, Result<(), Status>> = &op;
        let err = call_backends(&fakes, 0, HEDGE, Instant::now() + MS(900), true, op)
            .await
            .expect_err("no answer");
        assert_eq!(err.message(), "STS is slow");
        assert!(*calls.lock().expect("lock") > 1, "retried");
    }

    #[tokio::test(start_paused = true)]
    async fn no_backend_is_unavailable() {
        let err = call(&[]).await.expect_err("none");
        assert_eq!(err.code(), Code::Unavailable);
    }
}
