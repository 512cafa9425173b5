//! Forwarding of allow-listed paths to the node's real metadata service, with the agent's own
//! IMDSv2 session (the agent's cgroup is exempt from the redirect).

use std::time::Duration;

use http_body_util::{BodyExt as _, Empty, Full};
use hyper::{Method, Request, Response, StatusCode, body::Bytes};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use tokio::{sync::Mutex, time::Instant};

use crate::imds::{TOKEN_HEADER, TTL_HEADER};

const SESSION_TTL: u64 = 21_600;

pub struct Forwarder {
    endpoint: String,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
    session: Mutex<Option<(String, Instant)>>,
}

fn reply(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
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

    async fn send(&self, request: Request<Empty<Bytes>>) -> Result<(StatusCode, Bytes), String> {
        let response = tokio::time::timeout(Duration::from_secs(2), self.client.request(request))
            .await
            .map_err(|_| "timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, body))
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
            .body(Empty::new())
            .map_err(|e| e.to_string())?;
        let (status, body) = self.send(request).await?;
        if !status.is_success() {
            return Err(format!("token request answered {status}"));
        }
        let token = String::from_utf8_lossy(&body).trim().to_owned();
        *session = Some((
            token.clone(),
            Instant::now() + Duration::from_secs(SESSION_TTL - 60),
        ));
        Ok(token)
    }

    pub async fn get(&self, path: &str) -> Response<Full<Bytes>> {
        let result = async {
            let token = self.token().await?;
            let request = Request::builder()
                .uri(format!("{}{path}", self.endpoint))
                .header(TOKEN_HEADER, token)
                .body(Empty::new())
                .map_err(|e| e.to_string())?;
            self.send(request).await
        }
        .await;
        match result {
            Ok((StatusCode::UNAUTHORIZED, _)) => {
                // The real service restarted or rotated: a new session next time.
                *self.session.lock().await = None;
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "kiam: metadata session expired, retry\n",
                )
            }
            Ok((status, body)) => reply(status, body),
            Err(error) => {
                tracing::warn!(%path, %error, "forwarding to the real metadata service failed");
                reply(
                    StatusCode::BAD_GATEWAY,
                    "kiam: the node's metadata service did not answer\n",
                )
            }
        }
    }
}
