//! The node's real metadata service (the agent's cgroup is exempt from the redirect), for two
//! kinds of requests:
//! - allow-listed paths of intercepted pods, asked with the agent's own IMDSv2 session; the
//!   answers that never change on an instance (region, zone, instance id and type, the
//!   identity document) are kept once fetched, so pods asking for them cost the node's
//!   metadata service nothing (EC2 allows about 1,024 packets a second per interface, shared
//!   with aws-node and the pass-through pods);
//! - every request of a pass-through pod, relayed verbatim: method, path and query, headers
//!   (the pod's own IMDSv2 token included) and body, and the answer back as it came. Only
//!   hop-by-hop headers are dropped, as any HTTP proxy does.
//!
//! Every call ends by the request's deadline, waiting for the agent's session included: when
//! the metadata service throttles, requests are answered 504 in time, never queued without
//! bound.

use std::{collections::HashMap, time::Duration};

use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{
    HeaderMap, Method, Request, Response, StatusCode,
    body::Bytes,
    header::{self, HeaderName},
};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use tokio::{sync::Mutex, time::Instant};

use crate::imds::{TOKEN_HEADER, TTL_HEADER};

const SESSION_TTL: u64 = 21_600;
/// Answers larger than this are refused (user-data is at most 16 KiB).
const MAX_ANSWER: usize = 1 << 20;
/// How long the node's metadata service may take.
const TIMEOUT: Duration = Duration::from_secs(2);

/// Headers that describe one hop, not the request (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

type Reply = Response<Full<Bytes>>;

pub struct Forwarder {
    endpoint: String,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    session: Mutex<Option<(String, Instant)>>,
    /// Answers of [`STATIC_PATHS`], once fetched.
    kept: std::sync::RwLock<HashMap<String, Bytes>>,
}

/// Paths (below any version) whose answers never change during an instance's life.
const STATIC_PATHS: [&str; 7] = [
    "meta-data/placement/region",
    "meta-data/placement/availability-zone",
    "meta-data/placement/availability-zone-id",
    "meta-data/instance-id",
    "meta-data/instance-type",
    "meta-data/ami-id",
    "dynamic/instance-identity/document",
];
/// Answers kept at most this large (the identity document is well under 1 KiB).
const MAX_KEPT: usize = 16 * 1024;

/// Whether `path` is one of [`STATIC_PATHS`] under a version (`/latest/…`, `/2021-01-03/…`),
/// with or without a trailing slash.
fn is_static(path: &str) -> bool {
    let Some((_, rest)) = path.trim_start_matches('/').split_once('/') else {
        return false;
    };
    STATIC_PATHS.contains(&rest.trim_end_matches('/'))
}

fn late() -> Reply {
    reply(
        StatusCode::GATEWAY_TIMEOUT,
        "kiam: the node's metadata service did not answer in time\n",
    )
}

fn reply(status: StatusCode, body: impl Into<Bytes>) -> Reply {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
}

fn without_hop_by_hop(headers: &mut HeaderMap) {
    // Headers named by `Connection` are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in HOP_BY_HOP.iter().chain(&named) {
        headers.remove(name);
    }
}

impl Forwarder {
    /// `endpoint`: the real service, e.g. `http://169.254.169.254`.
    pub fn new(endpoint: &str) -> Self {
        Self {
            endpoint: endpoint.trim_end_matches('/').to_owned(),
            client: Client::builder(TokioExecutor::new()).build_http(),
            session: Mutex::new(None),
            kept: std::sync::RwLock::new(HashMap::new()),
        }
    }

    async fn send(&self, request: Request<Full<Bytes>>) -> Result<Response<Bytes>, String> {
        let response = tokio::time::timeout(TIMEOUT, self.client.request(request))
            .await
            .map_err(|_| "timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        let (parts, body) = response.into_parts();
        let body = tokio::time::timeout(TIMEOUT, Limited::new(body, MAX_ANSWER).collect())
            .await
            .map_err(|_| "timed out".to_owned())?
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok(Response::from_parts(parts, body))
    }

    async fn token(&self) -> Result<String, String> {
        let mut session = self.session.lock().await;
        if let Some((token, until)) = session.as_ref()
            && Instant::now() < *until
        {
            return Ok(token.clone());
        }
        let request = Request::builder()
            .method(Method::PUT)
            .uri(format!("{}/latest/api/token", self.endpoint))
            .header(TTL_HEADER, SESSION_TTL.to_string())
            .body(Full::default())
            .map_err(|e| e.to_string())?;
        let response = self.send(request).await?;
        if !response.status().is_success() {
            return Err(format!("token request answered {}", response.status()));
        }
        let token = String::from_utf8_lossy(response.body()).trim().to_owned();
        *session = Some((
            token.clone(),
            Instant::now() + Duration::from_secs(SESSION_TTL - 60),
        ));
        Ok(token)
    }

    /// The answer kept for `path`, if it is one that never changes and was fetched before.
    pub fn kept(&self, path: &str) -> Option<Bytes> {
        self.kept
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(path)
            .cloned()
    }

    /// An allow-listed path, asked with the agent's own session, answered by `deadline`.
    pub async fn get(&self, path: &str, deadline: Instant) -> Reply {
        if let Some(body) = self.kept(path) {
            return reply(StatusCode::OK, body);
        }
        let result = tokio::time::timeout_at(deadline, async {
            let token = self.token().await?;
            let request = Request::builder()
                .uri(format!("{}{path}", self.endpoint))
                .header(TOKEN_HEADER, token)
                .body(Full::default())
                .map_err(|e| e.to_string())?;
            self.send(request).await
        })
        .await;
        match result {
            Err(_) => late(),
            Ok(Ok(response)) if response.status() == StatusCode::UNAUTHORIZED => {
                // The real service restarted or rotated: a new session next time.
                *self.session.lock().await = None;
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "kiam: metadata session expired, retry\n",
                )
            }
            Ok(Ok(response)) => {
                if response.status() == StatusCode::OK
                    && is_static(path)
                    && response.body().len() <= MAX_KEPT
                {
                    self.kept
                        .write()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(path.to_owned(), response.body().clone());
                }
                reply(response.status(), response.into_body())
            }
            Ok(Err(error)) => {
                tracing::warn!(%path, %error, "forwarding to the real metadata service failed");
                reply(
                    StatusCode::BAD_GATEWAY,
                    "kiam: the node's metadata service did not answer\n",
                )
            }
        }
    }

    /// A pass-through pod's request, relayed verbatim, answered by `deadline`.
    pub async fn relay(&self, request: Request<Bytes>, deadline: Instant) -> Reply {
        let (mut parts, body) = request.into_parts();
        let path = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "/".into());
        let result = tokio::time::timeout_at(deadline, async {
            parts.uri = format!("{}{path}", self.endpoint)
                .parse()
                .map_err(|e: hyper::http::uri::InvalidUri| e.to_string())?;
            without_hop_by_hop(&mut parts.headers);
            self.send(Request::from_parts(parts, Full::new(body))).await
        })
        .await
        .unwrap_or_else(|_| Err("no answer by the request's deadline".into()));
        match result {
            Ok(response) => {
                let (mut parts, body) = response.into_parts();
                without_hop_by_hop(&mut parts.headers);
                // The body was collected: hyper sets the length.
                parts.headers.remove(header::CONTENT_LENGTH);
                Response::from_parts(parts, Full::new(body))
            }
            Err(error) => {
                tracing::warn!(%path, %error, "relaying to the node's metadata service failed");
                reply(
                    StatusCode::BAD_GATEWAY,
                    "kiam: the node's metadata service did not answer\n",
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_answers_that_never_change_are_kept() {
        for path in [
            "/latest/meta-data/placement/region",
            "/latest/meta-data/placement/availability-zone/",
            "/2021-01-03/dynamic/instance-identity/document",
            "/latest/meta-data/instance-id",
        ] {
            assert!(is_static(path), "{path}");
        }
        for path in [
            "/latest/meta-data/spot/instance-action",
            "/latest/meta-data/events/maintenance/scheduled",
            "/latest/meta-data/placement",
            "/latest/dynamic/instance-identity/pkcs7",
            "/latest",
            "/",
        ] {
            assert!(!is_static(path), "{path}");
        }
    }

    #[test]
    fn hop_by_hop_headers_are_dropped_end_to_end_ones_kept() {
        let mut headers = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, x-private"),
            ("keep-alive", "timeout=5"),
            ("x-private", "hop"),
            ("x-aws-ec2-metadata-token", "t"),
            ("x-aws-ec2-metadata-token-ttl-seconds", "60"),
            ("host", "169.254.169.254"),
        ] {
            headers.insert(
                HeaderName::from_static(k),
                hyper::header::HeaderValue::from_static(v),
            );
        }
        without_hop_by_hop(&mut headers);
        let mut left: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(
            left,
            [
                "host",
                "x-aws-ec2-metadata-token",
                "x-aws-ec2-metadata-token-ttl-seconds"
            ]
        );
    }
}
