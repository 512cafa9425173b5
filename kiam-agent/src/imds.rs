//! The instance-metadata API pods see, shaped like EC2's so AWS SDKs work unchanged.
//!
//! - `PUT /latest/api/token` (IMDSv2): a token bound to the calling pod, TTL 1–21600 s from
//!   `X-aws-ec2-metadata-token-ttl-seconds`; refused with `X-Forwarded-For`, as EC2 does.
//! - `GET`/`HEAD` `/latest/meta-data/iam/security-credentials/` → the pod's role name;
//!   `…/<role>` → the credentials document; `/latest/meta-data/iam/info`.
//! - A token, when sent, must be valid, unexpired and the caller's (401 otherwise);
//!   `--require-imdsv2` refuses requests without one.
//! - Other paths matching `--allow-route-regexp` are forwarded to the real metadata service
//!   with the agent's own IMDSv2 session; everything else is 404.

use std::{sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{
    HeaderMap, Method, Response, StatusCode,
    body::Bytes,
    header::{self, HeaderValue},
};
use regex::Regex;
use tonic::Code;

use crate::{
    forward::Forwarder,
    metrics::{Metrics, RouteLabels},
    resolver::Caller,
    token::{MAX_TTL, Tokens},
    upstream::Upstream,
};

pub const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
pub const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
const CREDENTIALS_PREFIX: &str = "/latest/meta-data/iam/security-credentials/";

pub struct Imds {
    pub tokens: Tokens,
    pub upstream: Arc<Upstream>,
    pub allow: Regex,
    pub require_v2: bool,
    pub forwarder: Option<Forwarder>,
    pub metrics: Arc<Metrics>,
}

type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Reply {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Reply {
    reply(status, "text/plain", body)
}

fn rfc3339(unix: i64) -> String {
    jiff::Timestamp::from_second(unix)
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default()
}

/// A gRPC refusal as the HTTP answer an SDK understands, with the reason in the body.
fn from_status(status: &tonic::Status) -> Reply {
    let code = match status.code() {
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::PermissionDenied | Code::Unauthenticated => StatusCode::FORBIDDEN,
        Code::InvalidArgument | Code::FailedPrecondition => StatusCode::UNPROCESSABLE_ENTITY,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    text(code, format!("kiam: {}\n", status.message()))
}

impl Imds {
    fn count(&self, route: &'static str, status: StatusCode) {
        self.metrics
            .requests
            .get_or_create(&RouteLabels {
                route,
                status: status.as_u16(),
            })
            .inc();
    }

    pub async fn handle(
        &self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
        caller: &Caller,
    ) -> Reply {
        let (route, response) = self.route(method, path, headers, caller).await;
        self.count(route, response.status());
        if response.status().is_client_error() || response.status().is_server_error() {
            tracing::info!(
                pod_uid = %caller.pod.pod_uid,
                %path,
                status = response.status().as_u16(),
                "metadata request refused"
            );
        }
        response
    }

    async fn route(
        &self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
        caller: &Caller,
    ) -> (&'static str, Reply) {
        let pod = caller.pod.pod_uid.as_str();
        if path == "/latest/api/token" {
            return ("token", self.token(method, headers, pod));
        }
        if !matches!(*method, Method::GET | Method::HEAD) {
            let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "");
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return ("other", response);
        }
        match headers.get(TOKEN_HEADER).map(|v| v.to_str()) {
            Some(Ok(token)) => {
                if let Err(error) = self.tokens.check(token, pod) {
                    return (
                        "token",
                        text(StatusCode::UNAUTHORIZED, format!("kiam: {error}\n")),
                    );
                }
            }
            Some(Err(_)) => {
                return (
                    "token",
                    text(StatusCode::UNAUTHORIZED, "kiam: malformed token\n"),
                );
            }
            None if self.require_v2 => {
                return (
                    "token",
                    text(
                        StatusCode::UNAUTHORIZED,
                        "kiam: IMDSv2 required: PUT /latest/api/token first\n",
                    ),
                );
            }
            None => {}
        }
        let response = match path {
            "/latest/meta-data/iam/security-credentials"
            | "/latest/meta-data/iam/security-credentials/" => {
                match self.upstream.role(pod, self.upstream.deadline()).await {
                    Ok(role) => text(StatusCode::OK, role.name),
                    Err(status) => from_status(&status),
                }
            }
            "/latest/meta-data/iam/info" | "/latest/meta-data/iam/info/" => self.info(pod).await,
            "/latest/meta-data/iam" | "/latest/meta-data/iam/" => {
                text(StatusCode::OK, "info\nsecurity-credentials/")
            }
            _ => match path.strip_prefix(CREDENTIALS_PREFIX) {
                Some(role) => {
                    return (
                        "credentials",
                        self.credentials(pod, role.trim_end_matches('/')).await,
                    );
                }
                None => return self.other(path).await,
            },
        };
        ("role", response)
    }

    fn token(&self, method: &Method, headers: &HeaderMap, pod: &str) -> Reply {
        if *method != Method::PUT {
            let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "");
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("PUT"));
            return response;
        }
        // EC2 refuses token requests that went through a proxy.
        if headers.contains_key("x-forwarded-for") {
            return text(
                StatusCode::FORBIDDEN,
                "kiam: token requests through a proxy are refused\n",
            );
        }
        let ttl = headers
            .get(TTL_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let Some(ttl) = ttl.filter(|t| (1..=MAX_TTL).contains(t)) else {
            return text(
                StatusCode::BAD_REQUEST,
                format!("kiam: {TTL_HEADER} must be 1 to {MAX_TTL}\n"),
            );
        };
        let mut response = text(
            StatusCode::OK,
            self.tokens.issue(pod, Duration::from_secs(ttl)),
        );
        if let Ok(value) = HeaderValue::from_str(&ttl.to_string()) {
            response.headers_mut().insert(TTL_HEADER, value);
        }
        response
    }

    async fn credentials(&self, pod: &str, role: &str) -> Reply {
        match self
            .upstream
            .credentials(pod, role, self.upstream.deadline())
            .await
        {
            Ok(creds) => {
                let body = serde_json::json!({
                    "Code": "Success",
                    "LastUpdated": rfc3339(creds.last_updated_unix),
                    "Type": "AWS-HMAC",
                    "AccessKeyId": creds.access_key_id,
                    "SecretAccessKey": creds.secret_access_key,
                    "Token": creds.session_token,
                    "Expiration": rfc3339(creds.expiration_unix),
                });
                reply(StatusCode::OK, "application/json", body.to_string())
            }
            Err(status) => from_status(&status),
        }
    }

    async fn info(&self, pod: &str) -> Reply {
        match self.upstream.role(pod, self.upstream.deadline()).await {
            Ok(role) => {
                let profile = role.arn.replacen(":role/", ":instance-profile/", 1);
                let body = serde_json::json!({
                    "Code": "Success",
                    "LastUpdated": rfc3339(jiff::Timestamp::now().as_second()),
                    "InstanceProfileArn": profile,
                    "InstanceProfileId": format!("AIPAKIAM{}", role.name.len()),
                });
                reply(StatusCode::OK, "application/json", body.to_string())
            }
            Err(status) => from_status(&status),
        }
    }

    async fn other(&self, path: &str) -> (&'static str, Reply) {
        match (&self.forwarder, self.allow.is_match(path)) {
            (Some(forwarder), true) => ("forwarded", forwarder.get(path).await),
            _ => (
                "not_allowed",
                text(StatusCode::NOT_FOUND, "kiam: not found\n"),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt as _;

    use super::*;
    use crate::{
        identity::{PodCgroup, QosClass},
        upstream::{Settings, Upstream},
    };

    fn caller(uid: &str) -> Caller {
        Caller {
            cgroup_id: 1,
            pid: 1,
            cgroup_path: "/kubepods".into(),
            pod: PodCgroup {
                pod_uid: uid.into(),
                qos: QosClass::BestEffort,
                container_id: None,
                runtime: None,
            },
        }
    }

    fn imds(require_v2: bool) -> Imds {
        Imds {
            tokens: Tokens::random().expect("key"),
            upstream: Upstream::new(
                None,
                Settings {
                    node: "node".into(),
                    deadline: Duration::from_millis(100),
                    min_validity: Duration::from_secs(1800),
                    role_ttl: Duration::from_secs(10),
                },
            ),
            allow: Regex::new("^/latest/meta-data/placement/region$").expect("regex"),
            require_v2,
            forwarder: None,
            metrics: Arc::default(),
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.insert(*k, HeaderValue::from_str(v).expect("value"));
        }
        map
    }

    async fn body(reply: Reply) -> String {
        let bytes = reply.into_body().collect().await.expect("body").to_bytes();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    #[tokio::test]
    async fn tokens_follow_ec2_rules() {
        let api = imds(false);
        let a = caller("pod-a");
        let put = |h: HeaderMap| {
            let api = &api;
            let a = &a;
            async move { api.handle(&Method::PUT, "/latest/api/token", &h, a).await }
        };
        let ok = put(headers(&[(TTL_HEADER, "21600")])).await;
        assert_eq!(ok.status(), StatusCode::OK);
        assert_eq!(
            ok.headers().get(TTL_HEADER).map(|v| v.as_bytes()),
            Some(&b"21600"[..])
        );
        let token = body(ok).await;
        for bad in ["0", "21601", "x", ""] {
            let r = put(headers(&[(TTL_HEADER, bad)])).await;
            assert_eq!(r.status(), StatusCode::BAD_REQUEST, "ttl {bad:?}");
        }
        assert_eq!(
            put(HeaderMap::new()).await.status(),
            StatusCode::BAD_REQUEST
        );
        let proxied = put(headers(&[
            (TTL_HEADER, "60"),
            ("x-forwarded-for", "1.2.3.4"),
        ]))
        .await;
        assert_eq!(proxied.status(), StatusCode::FORBIDDEN);
        let get = api
            .handle(&Method::GET, "/latest/api/token", &HeaderMap::new(), &a)
            .await;
        assert_eq!(get.status(), StatusCode::METHOD_NOT_ALLOWED);

        // The token works for its pod only, and a forged one for nobody.
        let path = "/latest/meta-data/iam/";
        let with = |t: &str| headers(&[(TOKEN_HEADER, t)]);
        let mine = api.handle(&Method::GET, path, &with(&token), &a).await;
        assert_eq!(mine.status(), StatusCode::OK);
        let theirs = api
            .handle(&Method::GET, path, &with(&token), &caller("pod-b"))
            .await;
        assert_eq!(theirs.status(), StatusCode::UNAUTHORIZED);
        let forged = api
            .handle(&Method::GET, path, &with(&format!("{token}x")), &a)
            .await;
        assert_eq!(forged.status(), StatusCode::UNAUTHORIZED);
        // IMDSv1 is allowed unless required otherwise.
        let v1 = api.handle(&Method::GET, path, &HeaderMap::new(), &a).await;
        assert_eq!(v1.status(), StatusCode::OK);
        let strict = imds(true);
        let v1 = strict
            .handle(&Method::GET, path, &HeaderMap::new(), &a)
            .await;
        assert_eq!(v1.status(), StatusCode::UNAUTHORIZED);
    }

    #[tokio::test]
    async fn other_paths_and_methods() {
        let api = imds(false);
        let a = caller("pod-a");
        let none = HeaderMap::new();
        let r = api
            .handle(&Method::GET, "/latest/user-data", &none, &a)
            .await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        let r = api
            .handle(&Method::POST, "/latest/meta-data/", &none, &a)
            .await;
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        // Without servers, role lookups are unavailable, with the reason.
        let r = api
            .handle(
                &Method::GET,
                "/latest/meta-data/iam/security-credentials/",
                &none,
                &a,
            )
            .await;
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(body(r).await.contains("--server"));
    }

    #[test]
    fn timestamps_end_in_z() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }
}
