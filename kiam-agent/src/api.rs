//! The listener redirected pods reach. Each accepted connection is resolved to its caller once
//! (the identity holds for every request on a keep-alive connection); a connection the kernel
//! did not bind a record to is refused, never guessed from its address.
//!
//! Requests go to the instance-metadata API, except `GET /kiam/v1/identity`, which shows the
//! caller the identity kiam resolved for it (its own, so nothing is disclosed).

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{
    Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

use crate::{
    imds::Imds,
    metrics::RefusedLabels,
    resolver::{Caller, RecordSource, ResolveError, Resolver},
};

/// Serves until the listener fails for good. Accept errors such as `EMFILE` pause briefly
/// instead of ending the loop.
pub async fn serve<S: RecordSource>(
    listener: TcpListener,
    resolver: Arc<Resolver<S>>,
    imds: Arc<Imds>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                // Nothing slower than accept() happens on this loop: resolution runs per task.
                let (resolver, imds) = (resolver.clone(), imds.clone());
                tokio::spawn(async move { handle(stream, peer, resolver, imds).await });
            }
            Err(error) => {
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handle<S: RecordSource>(
    stream: TcpStream,
    peer: SocketAddr,
    resolver: Arc<Resolver<S>>,
    imds: Arc<Imds>,
) {
    let caller = match socket2::SockRef::from(&stream).cookie() {
        Ok(cookie) => resolver.resolve(cookie).await,
        Err(error) => {
            tracing::error!(%error, %peer, "getsockopt(SO_COOKIE) failed");
            return;
        }
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
            let reason = match error {
                ResolveError::NoRecord => "no_record",
                ResolveError::Collision => "collision",
                ResolveError::NotAPod { .. } => "not_a_pod",
                ResolveError::CgroupGone(_) => "cgroup_gone",
                ResolveError::Unresolved { .. } => "unresolved",
                ResolveError::Map(_) => "map_error",
            };
            imds.metrics
                .refused_connections
                .get_or_create(&RefusedLabels { reason })
                .inc();
        }
    }
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
    if let Err(error) = hyper::server::conn::http1::Builder::new()
        // A client may shut down its sending side and wait for the answer.
        .half_close(true)
        .serve_connection(TokioIo::new(stream), service)
        .await
    {
        tracing::debug!(%peer, %error, "connection ended with an error");
    }
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
