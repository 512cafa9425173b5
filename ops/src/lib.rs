//! What kiam-agent and kiam-server share to be operable: logging set-up (`--log-format`,
//! `--log-level`, the `log` crate bridged), the admin listener (`/metrics`, `/live`,
//! `/ready`, `/health`), listeners one client cannot exhaust ([`listen`]) and waiting for a stop
//! signal.

pub mod listen;

use std::{convert::Infallible, io::IsTerminal as _, sync::Arc};

use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, service::service_fn};
use hyper_util::rt::TokioIo;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("--log-level {0:?} is not a valid filter")]
    Filter(String),
    #[error("cannot set up logging: {0}")]
    Init(String),
}

/// Sets up `tracing` with an EnvFilter; `try_init` also bridges the `log` crate (aya logs
/// through it). Colours only on a terminal.
pub fn init_logging(format: LogFormat, filter: &str) -> Result<(), LogError> {
    let env = tracing_subscriber::EnvFilter::try_new(filter)
        .map_err(|_| LogError::Filter(filter.to_owned()))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(env)
        .with_ansi(std::io::stdout().is_terminal());
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    result.map_err(|e| LogError::Init(e.to_string()))
}

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

/// Connections the admin listener holds at once (Prometheus and probes need a few).
const ADMIN_CONNECTIONS: usize = 64;
/// How long an admin client may take to send a request head.
const ADMIN_HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Serves `/metrics`, `/live` (the process answers) and `/ready`, with the same limits as
/// the agent's listener: a connection cap and a head timeout.
pub async fn serve_admin(listener: tokio::net::TcpListener, admin: Admin) {
    let admin = Arc::new(admin);
    let gate = listen::Gate::new(ADMIN_CONNECTIONS);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        // Over the cap: closed at once.
        let Some(pass) = gate.enter() else {
            continue;
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let _pass = pass;
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let admin = admin.clone();
                async move {
                    let (status, body) = match req.uri().path() {
                        "/metrics" => (StatusCode::OK, (admin.metrics)()),
                        "/live" => (StatusCode::OK, "ok\n".to_owned()),
                        "/ready" if (admin.ready)() => (StatusCode::OK, "ready\n".to_owned()),
                        "/ready" => (StatusCode::SERVICE_UNAVAILABLE, admin.not_ready.to_owned()),
                        "/health" if admin.health.is_some() => {
                            let (healthy, body) =
                                admin.health.as_ref().map(|h| h()).unwrap_or_default();
                            match healthy {
                                true => (StatusCode::OK, body),
                                false => (StatusCode::SERVICE_UNAVAILABLE, body),
                            }
                        }
                        _ => (StatusCode::NOT_FOUND, "not found\n".to_owned()),
                    };
                    let metrics = req.uri().path() == "/metrics";
                    let mut response = Response::new(Full::new(Bytes::from(body)));
                    *response.status_mut() = status;
                    // prometheus-client writes OpenMetrics (counter families named without
                    // `_total`, `# EOF`): say so, or Prometheus parses it as the older format.
                    let content_type = match metrics {
                        true => "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        false => "text/plain; charset=utf-8",
                    };
                    response.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static(content_type),
                    );
                    Ok::<_, Infallible>(response)
                }
            });
            let _ = listen::http1(ADMIN_HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
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

/// Completes on SIGTERM or SIGINT (never, if the handlers cannot be installed).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
