//! The listener redirected pods reach. Each accepted connection is resolved to its caller once
//! (the identity holds for every request on a keep-alive connection); a connection the kernel
//! did not bind a record to is refused, never guessed from its address.
//!
//! Requests go to the instance-metadata API, except `GET /kiam/v1/identity`, which shows the
//! caller the pod (and container) kiam resolved for it: its own, and nothing about the node.
//!
//! No pod can take the listener from the others: connections are capped overall and per pod
//! (the caller's pod, from its cgroup; over the cap a pod gets a 429 and the connection is
//! closed), a request head must arrive within `--idle-timeout`, which also ends idle
//! kept-alive connections, and heads and bodies are bounded. A pod already known is held to
//! its share in the accept loop itself, before it can take an overall slot, so a flood from
//! one pod cannot fill the overall cap while the agent is behind in serving it. Connections
//! without an identity (no record, as a direct connection to the agent's port has) share one
//! pod's share between them. A refused connection's answer is followed by a gentle close
//! (FIN, then the client's unread request drained), so the client reads the 429 rather than
//! a reset.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{
    Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use kiam_ops::listen::{Gate, Pass};
use tokio::{
    io::AsyncReadExt as _,
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};

use crate::{
    imds::Imds,
    metrics::RefusedLabels,
    rate::{PodRate, Throttle},
    resolver::{Begun, Caller, RecordSource, ResolveError, Resolver},
};

/// The listener's limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub max_per_pod: usize,
    /// New connections one pod may open a second (bursts of twice that).
    pub connections_per_second: u32,
    /// A request head must arrive within this (an idle kept-alive connection ends then too).
    pub idle_timeout: Duration,
}

/// Connections open per pod, up to a cap.
struct PodGate {
    open: Mutex<HashMap<String, usize>>,
    max: usize,
}

/// One of a pod's open connections.
struct PodPass(Arc<PodGate>, String);

impl Drop for PodPass {
    fn drop(&mut self) {
        let mut open = self.0.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.1);
            }
        }
    }
}

impl PodGate {
    fn enter(self: &Arc<Self>, pod: &str) -> Option<PodPass> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(pod.to_owned()).or_default();
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(PodPass(self.clone(), pod.to_owned()))
    }
}

/// Serves `listeners` (the agent's IPv4 and IPv6 addresses) with one set of limits, until
/// the process ends. Accept errors such as `EMFILE` pause briefly instead of ending a loop.
pub async fn serve<S: RecordSource>(
    listeners: Vec<TcpListener>,
    resolver: Arc<Resolver<S>>,
    imds: Arc<Imds>,
    limits: Limits,
    throttle: Arc<dyn Throttle>,
) {
    let gate = Gate::new(limits.max_connections);
    let shared = Arc::new(Shared {
        resolver,
        imds,
        pods: Arc::new(PodGate {
            open: Mutex::new(HashMap::new()),
            max: limits.max_per_pod.max(1),
        }),
        limits,
        lingering: Arc::new(Semaphore::new(MAX_LINGERING)),
        rate: PodRate::new(limits.connections_per_second),
        throttle,
    });
    {
        // Buckets of pods that went quiet are forgotten.
        let shared = Arc::downgrade(&shared);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tick.tick().await;
                match shared.upgrade() {
                    Some(shared) => shared.rate.prune(),
                    None => return,
                }
            }
        });
    }
    let loops = listeners
        .into_iter()
        .map(|listener| accept_loop(listener, shared.clone(), gate.clone()));
    futures::future::join_all(loops).await;
}

async fn accept_loop<S: RecordSource>(
    listener: TcpListener,
    shared: Arc<Shared<S>>,
    gate: Arc<Gate>,
) {
    let Shared {
        resolver,
        imds,
        pods,
        lingering,
        rate,
        throttle,
        ..
    } = &*shared;
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let begun = match socket2::SockRef::from(&stream).cookie() {
                    Ok(cookie) => resolver.begin(cookie),
                    Err(error) => {
                        // Without the cookie nothing names the caller: refused, like a
                        // connection with no record.
                        tracing::error!(%error, %peer, "getsockopt(SO_COOKIE) failed");
                        refused(imds, "no_cookie");
                        continue;
                    }
                };
                // A pod the agent knows is held to its share here, before its connection
                // takes one of the overall slots: however many connections one pod opens,
                // and however far behind the agent is in serving them, they never fill the
                // slots the other pods need. Connections nobody can be named for (no record,
                // a collision, a cgroup gone or not a pod's) share one such share. Nothing
                // here waits: a cgroup not cached yet is looked up by the connection's task,
                // which applies the same share.
                let pod_pass = match &begun {
                    Begun::Known(Ok(caller)) => {
                        let pod = &caller.pod().pod_uid;
                        if !rate.allows(pod) {
                            throttle.hold(caller.cgroup_id);
                            too_fast(imds, stream, lingering);
                            continue;
                        }
                        match pods.enter(pod) {
                            Some(pass) => Some(pass),
                            None => {
                                too_many(imds, stream, lingering);
                                continue;
                            }
                        }
                    }
                    Begun::Known(Err(error)) => {
                        match rate.allows(UNIDENTIFIED).then(|| pods.enter(UNIDENTIFIED)) {
                            Some(Some(pass)) => Some(pass),
                            _ => {
                                refused(imds, refusal_reason(error));
                                continue;
                            }
                        }
                    }
                    Begun::Lookup(_) => None,
                };
                let Some(pass) = gate.enter() else {
                    refused(imds, "over_capacity");
                    continue;
                };
                let shared = shared.clone();
                tokio::spawn(async move {
                    handle(stream, peer, begun, shared, (pass, pod_pass)).await;
                });
            }
            Err(error) => {
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

const TOO_MANY: &[u8] = b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: text/plain\r\nContent-Length: 53\r\nConnection: close\r\n\r\nkiam: this pod has too many connections to kiam open\n";
const TOO_FAST: &[u8] = b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: text/plain\r\nContent-Length: 51\r\nConnection: close\r\n\r\nkiam: this pod opens connections to kiam too often\n";

/// The per-pod share that connections without an identity have in common (not a pod UID).
const UNIDENTIFIED: &str = "(unidentified)";

/// How long a refused connection's unread input is drained after its answer.
const LINGER: Duration = Duration::from_secs(2);
/// Refused connections drained at once; past this, closed at once.
const MAX_LINGERING: usize = 256;

/// Refuses a connection of a pod over its share: counted, answered 429 and closed gently.
/// The answer is a plain non-blocking send: nothing has been written to the new socket yet,
/// so it fits in the buffer without waiting.
fn too_many(imds: &Imds, stream: TcpStream, lingering: &Arc<Semaphore>) {
    refused(imds, "pod_connection_limit");
    let _ = socket2::SockRef::from(&stream).send(TOO_MANY);
    close_gently(stream, lingering);
}

/// Refuses a connection of a pod over its rate of new connections, the same way.
fn too_fast(imds: &Imds, stream: TcpStream, lingering: &Arc<Semaphore>) {
    refused(imds, "pod_connection_rate");
    let _ = socket2::SockRef::from(&stream).send(TOO_FAST);
    close_gently(stream, lingering);
}

/// Closes a connection that has been sent its refusal: FIN after the answer, then whatever
/// the client sent or still sends is read and dropped until it closes, for at most
/// [`LINGER`]. Closed with its request unread, the socket would be reset by the kernel, and
/// the client could see the reset instead of the answer. Past [`MAX_LINGERING`] connections
/// being drained, the connection is closed at once, so a flood costs a bounded amount.
fn close_gently(stream: TcpStream, lingering: &Arc<Semaphore>) {
    let _ = socket2::SockRef::from(&stream).shutdown(std::net::Shutdown::Write);
    let Ok(permit) = lingering.clone().try_acquire_owned() else {
        return;
    };
    tokio::spawn(async move {
        let (mut stream, _permit) = (stream, permit);
        let mut sink = [0u8; 1024];
        let _ = tokio::time::timeout(LINGER, async {
            while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
        })
        .await;
    });
}

/// The `reason` label of a connection refused for `error`.
fn refusal_reason(error: &ResolveError) -> &'static str {
    match error {
        ResolveError::NoRecord => "no_record",
        ResolveError::Collision => "collision",
        ResolveError::NotAPod { .. } => "not_a_pod",
        ResolveError::CgroupGone(_) => "cgroup_gone",
        ResolveError::Unresolved { .. } => "unresolved",
        ResolveError::Map(_) => "map_error",
    }
}

fn refused(imds: &Imds, reason: &'static str) {
    imds.metrics
        .refused_connections
        .get_or_create(&RefusedLabels { reason })
        .inc();
}

/// What every connection's task shares.
struct Shared<S> {
    resolver: Arc<Resolver<S>>,
    imds: Arc<Imds>,
    pods: Arc<PodGate>,
    limits: Limits,
    /// Permits for refused connections being drained ([`close_gently`]).
    lingering: Arc<Semaphore>,
    /// New connections per pod.
    rate: PodRate,
    /// Stops a cgroup over its pod's rate in the kernel.
    throttle: Arc<dyn Throttle>,
}

async fn handle<S: RecordSource>(
    stream: TcpStream,
    peer: SocketAddr,
    begun: Begun,
    shared: Arc<Shared<S>>,
    (slot, pod_pass): (Pass, Option<PodPass>),
) {
    let Shared {
        resolver,
        imds,
        pods,
        limits,
        lingering,
        rate,
        throttle,
    } = &*shared;
    let looked_up = matches!(begun, Begun::Lookup(_));
    let caller = match begun {
        Begun::Known(result) => result,
        Begun::Lookup(record) => resolver.finish(record).await,
    };
    match &caller {
        Ok(c) => tracing::debug!(
            %peer,
            pod_uid = %c.pod().pod_uid,
            container_id = c.pod().container_id.as_deref().unwrap_or(""),
            cgroup_id = c.cgroup_id,
            pid = c.pid,
            "caller identified"
        ),
        Err(error) => {
            tracing::warn!(%peer, %error, "refusing connection");
            refused(imds, refusal_reason(error));
        }
    }
    // A caller first seen now (its cgroup was looked up) gets the same rate and share.
    if let (true, Ok(c)) = (looked_up, &caller)
        && !rate.allows(&c.pod().pod_uid)
    {
        throttle.hold(c.cgroup_id);
        drop(slot);
        too_fast(imds, stream, lingering);
        return;
    }
    let _pod_pass = match (pod_pass, &caller) {
        (Some(pass), _) => pass,
        (None, Ok(c)) => match pods.enter(&c.pod().pod_uid) {
            Some(pass) => pass,
            None => {
                // Draining a refused connection takes none of the overall slots.
                drop(slot);
                too_many(imds, stream, lingering);
                return;
            }
        },
        (None, Err(_)) => match pods.enter(UNIDENTIFIED) {
            Some(pass) => pass,
            None => return,
        },
    };
    if let Err(error) = serve_connection(stream, caller, imds.clone(), limits.idle_timeout).await {
        tracing::debug!(%peer, %error, "connection ended with an error");
    }
}

/// Serves HTTP/1.1 requests on `io` for a caller resolved once for the whole connection
/// (or the reason it could not be: every request then gets it). The fuzz target feeds it
/// arbitrary bytes.
pub async fn serve_connection<IO>(
    io: IO,
    caller: Result<Caller, ResolveError>,
    imds: Arc<Imds>,
    idle_timeout: Duration,
) -> Result<(), hyper::Error>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let caller = Arc::new(caller);
    let service = service_fn(move |req: Request<Incoming>| {
        let (caller, imds) = (caller.clone(), imds.clone());
        async move {
            let response = match (caller.as_ref(), req.uri().path()) {
                (Ok(c), path) if path != IDENTITY_PATH => {
                    let (parts, body) = req.into_parts();
                    // Metadata requests carry no body worth more than a few bytes.
                    match Limited::new(body, MAX_BODY).collect().await {
                        Ok(body) => {
                            imds.handle(Request::from_parts(parts, body.to_bytes()), c)
                                .await
                        }
                        Err(_) => reply(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            "text/plain",
                            b"kiam: request body too large\n".to_vec(),
                            true,
                        ),
                    }
                }
                (caller, _) => respond(caller),
            };
            Ok::<_, Infallible>(response)
        }
    });
    kiam_ops::listen::http1(idle_timeout)
        .serve_connection(TokioIo::new(io), service)
        .await
}

/// The largest request body read (metadata requests have none).
const MAX_BODY: usize = 16 * 1024;

/// Shows a pod the identity kiam resolved for it.
pub const IDENTITY_PATH: &str = "/kiam/v1/identity";

fn respond(caller: &Result<Caller, ResolveError>) -> Response<Full<Bytes>> {
    match caller {
        Ok(caller) => match serde_json::to_vec(caller) {
            Ok(body) => reply(StatusCode::OK, "application/json", body, false),
            Err(e) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                format!("kiam: {e}\n").into_bytes(),
                true,
            ),
        },
        Err(error) => {
            let status = match error {
                ResolveError::Map(_) => StatusCode::INTERNAL_SERVER_ERROR,
                ResolveError::Unresolved { .. } => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::FORBIDDEN,
            };
            reply(
                status,
                "text/plain",
                format!("kiam: {error}\n").into_bytes(),
                true,
            )
        }
    }
}

fn reply(
    status: StatusCode,
    content_type: &'static str,
    body: Vec<u8>,
    close: bool,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    if close {
        headers.insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
    }
    response
}

#[cfg(test)]
mod tests {
    use std::{
        collections::VecDeque,
        fs,
        os::unix::fs::MetadataExt as _,
        path::{Path, PathBuf},
        sync::Mutex,
    };

    use aya::maps::MapError;
    use kiam_common::ConnRecord;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;
    use crate::cgroup::Cgroupfs;

    const POD_A: &str = "0f6a8c2e-3b1d-4e5f-9a7b-1c2d3e4f5a6b";
    const POD_B: &str = "7c1d2e3f-4a5b-4c6d-8e7f-9a0b1c2d3e4f";

    /// Hands out records in accept order (the tests connect one at a time); `None` stands
    /// for a connection that did not come through the redirect, as do all once they run out.
    struct Queue(Mutex<VecDeque<Option<ConnRecord>>>);

    impl RecordSource for Queue {
        fn take(&self, _cookie: u64) -> Result<Option<ConnRecord>, MapError> {
            Ok(self.0.lock().expect("lock").pop_front().flatten())
        }
    }

    /// The kubelet-shaped cgroup of `pod` under `root`.
    fn pod_slice(root: &Path, pod: &str) -> PathBuf {
        root.join(format!(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
            pod.replace('-', "_")
        ))
    }

    /// A container cgroup of `pod` under `root`; its id (inode).
    fn container(root: &Path, pod: &str) -> u64 {
        let dir = pod_slice(root, pod).join(format!("cri-containerd-{}.scope", "ab".repeat(32)));
        fs::create_dir_all(&dir).expect("mkdir");
        fs::metadata(&dir).expect("stat").ino()
    }

    fn record(cgroup_id: u64) -> ConnRecord {
        ConnRecord {
            cgroup_id,
            tgid: 7,
            ..ConnRecord::default()
        }
    }

    /// The listener with `records`, walking cgroups under `root`; its address and metrics.
    async fn listener(
        root: &Path,
        records: Vec<Option<ConnRecord>>,
        max_connections: usize,
        max_per_pod: usize,
    ) -> (SocketAddr, Arc<Imds>) {
        listener_with_rate(root, records, max_connections, max_per_pod, 1_000_000).await
    }

    /// The same, with `rate` new connections a second per pod.
    async fn listener_with_rate(
        root: &Path,
        records: Vec<Option<ConnRecord>>,
        max_connections: usize,
        max_per_pod: usize,
        rate: u32,
    ) -> (SocketAddr, Arc<Imds>) {
        let lookup =
            Arc::new(Cgroupfs::new(root, root.join("kubepods.slice"), false).expect("open"));
        let resolver = Arc::new(Resolver::new(
            Queue(Mutex::new(records.into())),
            lookup,
            root.to_owned(),
        ));
        let imds = Arc::new(Imds::for_tests(crate::config::DEFAULT_ALLOW_ROUTE, false));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let limits = Limits {
            max_connections,
            max_per_pod,
            connections_per_second: rate,
            idle_timeout: Duration::from_secs(30),
        };
        tokio::spawn(serve(
            vec![listener],
            resolver,
            imds.clone(),
            limits,
            Arc::new(crate::rate::NoThrottle),
        ));
        (addr, imds)
    }

    /// Connects and waits until the agent has accepted (and resolved) the connection: the
    /// identity path answers on it. Returns the open connection.
    async fn held(addr: SocketAddr) -> TcpStream {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(b"GET /kiam/v1/identity HTTP/1.1\r\nHost: kiam\r\n\r\n")
            .await
            .expect("write");
        let mut buf = [0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("an answer in time")
            .expect("read");
        assert!(
            buf[..n].starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&buf[..n])
        );
        stream
    }

    /// A new connection, and what the agent sent on it before closing it (empty if it closed
    /// without a word), or `None` while it keeps the connection open.
    async fn unasked(addr: SocketAddr) -> (TcpStream, Option<String>) {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let mut text = Vec::new();
        let answer =
            tokio::time::timeout(Duration::from_millis(500), stream.read_to_end(&mut text))
                .await
                .ok()
                .map(|_| String::from_utf8_lossy(&text).into_owned());
        (stream, answer)
    }

    fn refusals(imds: &Imds, reason: &'static str) -> u64 {
        imds.metrics
            .refused_connections
            .get_or_create(&RefusedLabels { reason })
            .get()
    }

    #[tokio::test]
    async fn a_known_pod_over_its_share_gets_429_without_taking_an_overall_slot() {
        let dir = tempfile::tempdir().expect("dir");
        let (a, b) = (container(dir.path(), POD_A), container(dir.path(), POD_B));
        // Pod A holds both overall slots (its share is two); its next five connections are
        // refused by its share, with a 429, not by the overall cap.
        let mut records = vec![Some(record(a)); 7];
        records.push(Some(record(b)));
        let (addr, imds) = listener(dir.path(), records, 2, 2).await;
        let first = held(addr).await;
        let _second = held(addr).await;
        for _ in 0..5 {
            let (_, answer) = unasked(addr).await;
            let answer = answer.expect("closed at once");
            assert!(answer.starts_with("HTTP/1.1 429"), "{answer:?}");
        }
        assert_eq!(refusals(&imds, "pod_connection_limit"), 5);
        assert_eq!(refusals(&imds, "over_capacity"), 0);
        // Once pod A lets one go, pod B gets its slot.
        drop(first);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let _other = held(addr).await;
    }

    #[tokio::test]
    async fn a_pod_over_its_rate_of_new_connections_gets_429_and_others_do_not() {
        let dir = tempfile::tempdir().expect("dir");
        let (a, b) = (container(dir.path(), POD_A), container(dir.path(), POD_B));
        // Rate 5 a second, bursts of 10: pod A's first 10 connections are answered (and
        // closed by the client), the next 5 refused; pod B is unaffected.
        let mut records = vec![Some(record(a)); 15];
        records.push(Some(record(b)));
        let (addr, imds) = listener_with_rate(dir.path(), records, 100, 100, 5).await;
        for _ in 0..10 {
            drop(held(addr).await);
        }
        for _ in 0..5 {
            let (_, answer) = unasked(addr).await;
            let answer = answer.expect("closed at once");
            assert!(answer.contains("too often"), "{answer:?}");
        }
        assert_eq!(refusals(&imds, "pod_connection_rate"), 5);
        let _b = held(addr).await;
    }

    #[tokio::test]
    async fn a_refused_client_that_already_asked_reads_the_whole_429_and_a_clean_close() {
        let dir = tempfile::tempdir().expect("dir");
        let a = container(dir.path(), POD_A);
        let slice = fs::metadata(pod_slice(dir.path(), POD_A))
            .expect("stat")
            .ino();
        // Pod A's share is one: it holds it, and each of its next connections is refused
        // after its request is already on the way, as an SDK's would be. The first ten come
        // from its cached container cgroup (refused in the accept loop), the next ten from its
        // pod cgroup, not cached yet (refused by the connection's task after the lookup).
        let mut records = vec![Some(record(a)); 11];
        records.extend([Some(record(slice)); 10]);
        let (addr, imds) = listener(dir.path(), records, 10, 1).await;
        let _held = held(addr).await;
        for _ in 0..20 {
            let mut stream = TcpStream::connect(addr).await.expect("connect");
            stream
                .write_all(b"GET /latest/meta-data/iam/security-credentials/ HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n")
                .await
                .expect("write");
            let mut text = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut text))
                .await
                .expect("closed in time");
            let text = String::from_utf8_lossy(&text);
            assert!(
                read.is_ok(),
                "{read:?} after {text:?}: reset instead of closed"
            );
            assert!(
                text.starts_with("HTTP/1.1 429") && text.ends_with("open\n"),
                "{text:?}"
            );
        }
        assert_eq!(refusals(&imds, "pod_connection_limit"), 20);
    }

    #[tokio::test]
    async fn connections_without_an_identity_share_one_pods_share() {
        let dir = tempfile::tempdir().expect("dir");
        let a = container(dir.path(), POD_A);
        // Five connections without a record between two of pod A's, as direct connections
        // to the agent's port would be.
        let mut records = vec![Some(record(a))];
        records.extend([None; 5]);
        records.push(Some(record(a)));
        let (addr, imds) = listener(dir.path(), records, 10, 2).await;
        let _pod = held(addr).await;
        let mut kept = Vec::new();
        for _ in 0..2 {
            let (stream, answer) = unasked(addr).await;
            assert_eq!(
                answer, None,
                "the first two are kept (and answered when they ask)"
            );
            kept.push(stream);
        }
        for _ in 0..3 {
            let (_, answer) = unasked(addr).await;
            assert_eq!(answer.as_deref(), Some(""), "closed at once");
        }
        assert_eq!(refusals(&imds, "no_record"), 5);
        assert_eq!(refusals(&imds, "over_capacity"), 0);
        // The pod with an identity still has its own share.
        let _again = held(addr).await;
    }
}
