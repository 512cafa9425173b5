//! The admin listener (`/metrics`, `/live`, `/ready`, `/health`) and the probe socket.
//!
//! The admin listener listens on an address pods can reach (Prometheus scrapes it), so no
//! client may hold it: besides the connection cap and head timeout every listener here has,
//! each source address may hold only [`AdminLimits::per_source`] connections, and a
//! connection is closed after [`AdminLimits::max_age`] however busy it keeps itself (a
//! client sending `GET /live` every few seconds re-arms the head timeout forever).
//!
//! The kubelet's probes do not share it: they are exec probes (`kiam-agent probe ready`)
//! that ask the process over a Unix socket in the container's own file system
//! (`--probe-socket`), which no pod can reach.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::listen;

/// What the admin listener serves.
pub struct Admin {
    /// Prometheus text exposition for `/metrics`.
    pub metrics: Box<dyn Fn() -> String + Send + Sync>,
    /// Whether `/ready` answers 200.
    pub ready: Box<dyn Fn() -> bool + Send + Sync>,
    /// The body of a 503 from `/ready`.
    pub not_ready: &'static str,
    /// `/health`: whether healthy (200, else 503) and a JSON body saying what was checked.
    pub health: Option<Box<dyn Fn() -> (bool, String) + Send + Sync>>,
}

/// How much of the admin listener one client may hold.
#[derive(Debug, Clone, Copy)]
pub struct AdminLimits {
    /// Connections open at once, all clients together.
    pub connections: usize,
    /// Connections open at once from one source address.
    pub per_source: usize,
    /// A connection is closed (after the request in flight) once this old.
    pub max_age: Duration,
    /// A request head must arrive within this.
    pub header_timeout: Duration,
}

impl Default for AdminLimits {
    fn default() -> Self {
        Self {
            connections: 64,
            per_source: 4,
            max_age: Duration::from_secs(60),
            header_timeout: Duration::from_secs(5),
        }
    }
}

/// Connections open per source address, up to a cap.
#[derive(Default)]
struct Sources {
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection of a source; dropping it frees the place.
struct SourcePass(Arc<Sources>, IpAddr);

impl Drop for SourcePass {
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

impl Sources {
    fn enter(self: &Arc<Self>, source: IpAddr, max: usize) -> Option<SourcePass> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(source).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(SourcePass(self.clone(), source))
    }
}

/// The answer to an admin request.
fn answer(admin: &Admin, path: &str) -> Response<Full<Bytes>> {
    let (status, body) = match path {
        "/metrics" => (StatusCode::OK, (admin.metrics)()),
        "/live" => (StatusCode::OK, "ok\n".to_owned()),
        "/ready" if (admin.ready)() => (StatusCode::OK, "ready\n".to_owned()),
        "/ready" => (StatusCode::SERVICE_UNAVAILABLE, admin.not_ready.to_owned()),
        "/health" if admin.health.is_some() => {
            let (healthy, body) = admin.health.as_ref().map(|h| h()).unwrap_or_default();
            match healthy {
                true => (StatusCode::OK, body),
                false => (StatusCode::SERVICE_UNAVAILABLE, body),
            }
        }
        _ => (StatusCode::NOT_FOUND, "not found\n".to_owned()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    // prometheus-client writes OpenMetrics (counter families named without `_total`,
    // `# EOF`): say so, or Prometheus parses it as the older format.
    let content_type = match path == "/metrics" {
        true => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        false => "text/plain; charset=utf-8",
    };
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}

/// Serves one connection until it ends, or until it is `max_age` old (then after the
/// request in flight).
async fn serve_one<IO>(io: IO, admin: Arc<Admin>, limits: AdminLimits)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
        let admin = admin.clone();
        async move { Ok::<_, Infallible>(answer(&admin, req.uri().path())) }
    });
    let connection =
        listen::http1(limits.header_timeout).serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => {}
        () = tokio::time::sleep(limits.max_age) => {
            connection.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(limits.header_timeout, connection).await;
        }
    }
}

/// Serves `/metrics`, `/live`, `/ready` (and `/health`) on `listener` within `limits`.
pub async fn serve_admin(
    listener: tokio::net::TcpListener,
    admin: Arc<Admin>,
    limits: AdminLimits,
) {
    let gate = listen::Gate::new(limits.connections);
    let sources = Arc::new(Sources::default());
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        // Over a cap: closed at once.
        let Some(source) = sources.enter(peer.ip(), limits.per_source) else {
            continue;
        };
        let Some(pass) = gate.enter() else {
            continue;
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let _passes = (pass, source);
            serve_one(stream, admin, limits).await;
        });
    }
}

/// Binds the probe socket at `path` (a stale one from an earlier run is replaced).
pub fn bind_probe(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    tokio::net::UnixListener::bind(path)
}

/// Serves `/live` and `/ready` on the probe socket: only processes that see the
/// container's file system (the kubelet's exec probes, `kubectl exec`) reach it.
pub async fn serve_probes(listener: tokio::net::UnixListener, admin: Arc<Admin>) {
    let gate = listen::Gate::new(8);
    let limits = AdminLimits::default();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Some(pass) = gate.enter() else {
            continue;
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let _pass = pass;
            serve_one(stream, admin, limits).await;
        });
    }
}

/// Where the probe socket is, and what `probe` asks.
#[derive(Debug, Clone, clap::Args)]
pub struct ProbeArgs {
    /// `live` (the process answers) or `ready`.
    #[arg(value_parser = ["live", "ready"])]
    pub what: String,
    /// The running process's probe socket (its `--probe-socket`).
    #[arg(long, env = "KIAM_PROBE_SOCKET", default_value = DEFAULT_PROBE_SOCKET)]
    pub probe_socket: PathBuf,
}

/// Where the manifests put the probe socket (an emptyDir of the container).
pub const DEFAULT_PROBE_SOCKET: &str = "/run/kiam-probe/probe.sock";

/// Where each binary's admin listener is when no flag says otherwise (loopback; the
/// manifests give the node's or the pod's address). `run`, `health` and `status` share them.
pub const DEFAULT_AGENT_ADMIN_LISTEN: &str = "127.0.0.1:8182";
pub const DEFAULT_SERVER_ADMIN_LISTEN: &str = "127.0.0.1:9620";

/// `GET /<what>` on the probe socket: 0 when answered 200, 1 otherwise (the kubelet's exec
/// probe), with the answer or the reason on standard output.
pub fn probe(args: &ProbeArgs) -> std::process::ExitCode {
    use std::io::{Read as _, Write as _};
    let asked = || -> std::io::Result<(u16, String)> {
        let mut stream = std::os::unix::net::UnixStream::connect(&args.probe_socket)?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        stream.set_write_timeout(Some(Duration::from_secs(2)))?;
        write!(
            stream,
            "GET /{} HTTP/1.1\r\nHost: kiam\r\nConnection: close\r\n\r\n",
            args.what
        )?;
        let mut raw = String::new();
        stream.read_to_string(&mut raw)?;
        let status = raw
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = raw.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        Ok((status, body.trim().to_owned()))
    };
    match asked() {
        Ok((200, body)) => {
            println!("{body}");
            std::process::ExitCode::SUCCESS
        }
        Ok((status, body)) => {
            println!("{status}: {body}");
            std::process::ExitCode::FAILURE
        }
        Err(error) => {
            println!("{}: {error}", args.probe_socket.display());
            std::process::ExitCode::FAILURE
        }
    }
}

/// `GET path` on an admin listener (for the `status` and `health` commands); the status and
/// body. Gives up after 2 seconds.
pub async fn admin_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: kiam\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        Ok((status, body.to_owned()))
    };
    tokio::time::timeout(std::time::Duration::from_secs(2), exchange)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in 2s"))?
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    fn admin() -> Admin {
        Admin {
            metrics: Box::new(String::new),
            ready: Box::new(|| true),
            not_ready: "no\n",
            health: None,
        }
    }

    /// Sends `GET /live` on `stream` and reads the whole answer (keep-alive: up to the body).
    async fn live(stream: &mut tokio::net::TcpStream) -> bool {
        if stream
            .write_all(b"GET /live HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .is_err()
        {
            return false;
        }
        let mut buf = [0u8; 512];
        matches!(
            tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)).await,
            Ok(Ok(n)) if n > 0 && buf.starts_with(b"HTTP/1.1 200")
        )
    }

    #[tokio::test]
    async fn one_source_holds_a_few_connections_and_none_for_ever() {
        let listener = listen::bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let limits = AdminLimits {
            per_source: 2,
            max_age: Duration::from_millis(600),
            ..AdminLimits::default()
        };
        tokio::spawn(serve_admin(listener, Arc::new(admin()), limits));
        let mut first = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut second = tokio::net::TcpStream::connect(addr).await.expect("connect");
        assert!(live(&mut first).await && live(&mut second).await);
        // A third from the same address is closed unanswered.
        let mut third = tokio::net::TcpStream::connect(addr).await.expect("connect");
        assert!(!live(&mut third).await, "over the per-source cap");
        // Kept busy, a connection still ends once it is max_age old.
        let started = std::time::Instant::now();
        while live(&mut first).await {
            assert!(started.elapsed() < Duration::from_secs(3), "never closed");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(started.elapsed() >= Duration::from_millis(400));
    }

    #[tokio::test]
    async fn probes_answer_on_the_socket() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("probe.sock");
        let listener = bind_probe(&path).expect("bind");
        tokio::spawn(serve_probes(listener, Arc::new(admin())));
        let args = ProbeArgs {
            what: "ready".into(),
            probe_socket: path.clone(),
        };
        let code = tokio::task::spawn_blocking(move || probe(&args))
            .await
            .expect("probe");
        assert_eq!(code, std::process::ExitCode::SUCCESS);
        let missing = ProbeArgs {
            what: "live".into(),
            probe_socket: dir.path().join("none.sock"),
        };
        let code = tokio::task::spawn_blocking(move || probe(&missing))
            .await
            .expect("probe");
        assert_eq!(code, std::process::ExitCode::FAILURE);
    }
}
