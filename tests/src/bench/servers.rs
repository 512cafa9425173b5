//! The yardsticks the agent is measured against, and the far end of ordinary pod traffic:
//! - a bare hyper responder, built the way the agent's listener is (tokio's multi-threaded
//!   runtime, a task and an HTTP/1.1 connection per accepted socket) but answering every
//!   request with a fixed credentials document: the physical limit of the metadata path;
//! - an echo server for ordinary traffic (exchanges of [`super::load::MESSAGE`] bytes).

use std::{convert::Infallible, net::SocketAddr};

use anyhow::Context as _;
use http_body_util::Full;
use hyper::{Request, Response, body::Bytes, header, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

/// A credentials document the size of a real one.
pub fn document() -> Bytes {
    let body = serde_json::json!({
        "Code": "Success",
        "LastUpdated": "2026-11-30T00:00:00Z",
        "Type": "AWS-HMAC",
        "AccessKeyId": "ASIA".to_owned() + &"X".repeat(16),
        "SecretAccessKey": "s".repeat(40),
        "Token": "t".repeat(780),
        "Expiration": "2026-11-30T01:00:00Z",
    });
    Bytes::from(body.to_string())
}

/// Runs `connection` in a task for every connection accepted on `listen`, on tokio's
/// multi-threaded runtime, until the process ends. Prints `ready` once listening.
fn serve<F, Fut>(listen: SocketAddr, connection: F) -> anyhow::Result<()>
where
    F: Fn(TcpStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("bind {listen}"))?;
        println!("ready");
        loop {
            let (stream, _) = listener.accept().await?;
            tokio::spawn(connection(stream));
        }
    })
}

/// Serves `document()` to every request (a token to PUTs) until the process ends. Prints
/// `ready` once listening.
pub fn bare_hyper(listen: SocketAddr) -> anyhow::Result<()> {
    let body = document();
    serve(listen, move |stream| {
        let body = body.clone();
        async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let body = match req.method() == hyper::Method::PUT {
                    true => Bytes::from_static(b"bare-token"),
                    false => body.clone(),
                };
                async move {
                    let mut response = Response::new(Full::new(body));
                    response.headers_mut().insert(
                        header::CONTENT_TYPE,
                        header::HeaderValue::from_static("application/json"),
                    );
                    Ok::<_, Infallible>(response)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        }
    })
}

/// Echoes [`super::load::MESSAGE`]-byte exchanges until each client closes. Prints `ready`.
pub fn echo(listen: SocketAddr) -> anyhow::Result<()> {
    serve(listen, |mut stream| async move {
        let _ = stream.set_nodelay(true);
        let mut buf = [0u8; super::load::MESSAGE];
        while stream.read_exact(&mut buf).await.is_ok() {
            if stream.write_all(&buf).await.is_err() {
                return;
            }
        }
    })
}
