//! The node's real metadata service (the agent's cgroup is exempt from the redirect), for two
//! kinds of requests:
//! - allow-listed paths of intercepted pods, asked with the agent's own IMDSv2 session;
//! - every request of a pass-through pod, relayed verbatim: method, path and query, headers
//!   (the pod's own IMDSv2 token included) and body, and the answer back as it came. Only
//!   hop-by-hop headers are dropped, as any HTTP proxy does.

use std::time::Duration;

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

    /// An allow-listed path, asked with the agent's own session.
    pub async fn get(&self, path: &str) -> Reply {
        let result = async {
            let token = self.token().await?;
            let request = Request::builder()
                .uri(format!("{}{path}", self.endpoint))
                .header(TOKEN_HEADER, token)
                .body(Full::default())
                .map_err(|e| e.to_string())?;
            self.send(request).await
        }
        .await;
        match result {
            Ok(response) if response.status() == StatusCode::UNAUTHORIZED => {
                // The real service restarted or rotated: a new session next time.
                *self.session.lock().await = None;
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "kiam: metadata session expired, retry\n",
                )
            }
            Ok(response) => reply(response.status(), response.into_body()),
            Err(error) => {
                tracing::warn!(%path, %error, "forwarding to the real metadata service failed");
                reply(
                    StatusCode::BAD_GATEWAY,
                    "kiam: the node's metadata service did not answer\n",
                )
            }
        }
    }

    /// A pass-through pod's request, relayed verbatim.
    pub async fn relay(&self, request: Request<Bytes>) -> Reply {
        let (mut parts, body) = request.into_parts();
        let path = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "/".into());
        let result = async {
            parts.uri = format!("{}{path}", self.endpoint)
                .parse()
                .map_err(|e: hyper::http::uri::InvalidUri| e.to_string())?;
            without_hop_by_hop(&mut parts.headers);
            self.send(Request::from_parts(parts, Full::new(body))).await
        }
        .await;
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
