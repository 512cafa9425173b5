//! The instance-metadata API pods see, shaped like EC2's so AWS SDKs work unchanged.
//!
//! - Paths are checked first ([`crate::route`]): `//`, `.`/`..` segments and encoded
//!   separators get 400 before anything else looks at them.
//! - Pods the operator's pass-through policy selects (the servers say so, cached like a role)
//!   get the node's metadata service verbatim, token PUT included: the node's IMDSv2 token
//!   is theirs, not the agent's.
//! - `PUT /latest/api/token` (IMDSv2): a token bound to the calling pod, TTL 1–21600 s from
//!   `X-aws-ec2-metadata-token-ttl-seconds`; refused with `X-Forwarded-For`, as EC2 does.
//! - `GET`/`HEAD` `/<version>/meta-data/iam/security-credentials/` → the pod's role name;
//!   `…/<role>` → the credentials document; `…/iam/info`. Any version prefix.
//! - A token, when sent, must be valid, unexpired and the caller's (401 otherwise);
//!   `--require-imdsv2` refuses requests without one.
//! - Other paths matching `--allow-route-regexp` are forwarded to the real metadata service
//!   with the agent's own IMDSv2 session; the node's identity credentials and signed identity
//!   documents never are; everything else is 404.

use std::{sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{
    HeaderMap, Method, Request, Response, StatusCode,
    body::Bytes,
    header::{self, HeaderValue},
};
use regex::Regex;
use tonic::{Code, Status};

use crate::{
    forward::Forwarder,
    metrics::{Metrics, RouteLabels, ScopeLabels},
    resolver::Caller,
    route::{self, Route},
    token::{MAX_TTL, TokenError, Tokens},
    upstream::{Access, Creds, Upstream},
};

pub const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
pub const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";

pub struct Imds {
    pub log_budget: LogBudget,
    /// Requests per pod forwarded or relayed to the node's metadata service.
    pub forward_rate: crate::rate::PodRate,
    pub tokens: Tokens,
    pub upstream: Arc<Upstream>,
    pub allow: Regex,
    /// `--allow-user-data`: the node's user data may be forwarded (when `allow` matches).
    pub allow_user_data: bool,
    pub require_v2: bool,
    pub forwarder: Option<Forwarder>,
    pub metrics: Arc<Metrics>,
}

pub type Reply = Response<Full<Bytes>>;

/// How much of a refused request's path a log line shows.
const LOGGED_PATH: usize = 128;

/// Log lines about one pod's refused requests: at most [`LogBudget::LINES`] a minute, so one
/// pod cannot flood the node's logs (the metrics count every request).
#[derive(Default)]
pub struct LogBudget {
    spent: std::sync::Mutex<std::collections::HashMap<String, (std::time::Instant, u32)>>,
}

impl LogBudget {
    const LINES: u32 = 10;
    const WINDOW: Duration = Duration::from_secs(60);
    /// Pods tracked at once; past it, nothing more is logged until windows end.
    const PODS: usize = 4096;

    pub fn allows(&self, pod: &str) -> bool {
        let mut spent = self.spent.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        if spent.len() >= Self::PODS && !spent.contains_key(pod) {
            spent.retain(|_, (since, _)| now.duration_since(*since) < Self::WINDOW);
            if spent.len() >= Self::PODS {
                return false;
            }
        }
        let (since, lines) = spent.entry(pod.to_owned()).or_insert((now, 0));
        if now.duration_since(*since) >= Self::WINDOW {
            (*since, *lines) = (now, 0);
        }
        *lines += 1;
        *lines <= Self::LINES
    }
}

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

fn method_not_allowed(allow: &'static str) -> Reply {
    let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "");
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    response
}

fn rfc3339(unix: i64) -> String {
    jiff::Timestamp::from_second(unix)
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default()
}

/// A gRPC refusal as the HTTP answer an SDK understands, with the reason in the body.
fn from_status(status: &Status) -> Reply {
    let code = match status.code() {
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::PermissionDenied | Code::Unauthenticated => StatusCode::FORBIDDEN,
        Code::InvalidArgument | Code::FailedPrecondition => StatusCode::UNPROCESSABLE_ENTITY,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    text(code, format!("kiam: {}\n", status.message()))
}

/// The credentials document EC2 serves, rendered once per credentials.
fn document(creds: &Creds) -> Bytes {
    creds
        .document
        .get_or_init(|| {
            let body = serde_json::json!({
                "Code": "Success",
                "LastUpdated": rfc3339(creds.last_updated_unix),
                "Type": "AWS-HMAC",
                "AccessKeyId": creds.access_key_id,
                "SecretAccessKey": creds.secret_access_key,
                "Token": creds.session_token,
                "Expiration": rfc3339(creds.expiration_unix),
            });
            Bytes::from(body.to_string())
        })
        .clone()
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

    pub async fn handle(&self, request: Request<Bytes>, caller: &Caller) -> Reply {
        // Shares the request's bytes: only read for a refusal's log line.
        let uri = request.uri().clone();
        let (route, response) = self.route(request, caller).await;
        self.count(route, response.status());
        if (response.status().is_client_error() || response.status().is_server_error())
            && self.log_budget.allows(&caller.pod().pod_uid)
        {
            let path = uri.path();
            tracing::info!(
                pod_uid = %caller.pod().pod_uid,
                path = %path.get(..LOGGED_PATH).unwrap_or(path),
                status = response.status().as_u16(),
                "metadata request refused"
            );
        }
        response
    }

    async fn route(&self, request: Request<Bytes>, caller: &Caller) -> (&'static str, Reply) {
        let pod = caller.pod().pod_uid.as_str();
        // Answers, credentials and tokens are the caller's container's (its role may not be
        // the pod's); rates stay the pod's.
        let subject = caller.subject();
        let route = match route::classify(request.uri().path()) {
            Ok(route) => route,
            Err(error) => {
                return (
                    "bad_path",
                    text(StatusCode::BAD_REQUEST, format!("kiam: {error}\n")),
                );
            }
        };
        let deadline = self.upstream.deadline();
        // One answer per request, cached across requests: what the pod may have.
        let access = self.upstream.access(subject, deadline).await;
        if let (Ok(Access::PassThrough), Some(forwarder)) = (&access, &self.forwarder) {
            if !self.forward_rate.allows(pod) {
                return ("passthrough", too_often());
            }
            tracing::debug!(pod_uid = %pod, path = %request.uri().path(), "node metadata pass-through");
            return ("passthrough", forwarder.relay(request, deadline).await);
        }
        let (method, headers) = (request.method(), request.headers());
        if route == Route::Token {
            return ("token", self.token(method, headers, subject));
        }
        if !matches!(*method, Method::GET | Method::HEAD) {
            return ("other", method_not_allowed("GET, HEAD"));
        }
        if let Some(refusal) = self.check_token(headers, subject, pod) {
            return ("token", refusal);
        }
        let role = || match &access {
            Ok(Access::Role(role)) => Ok(role.clone()),
            Ok(Access::PassThrough) => Err(Status::failed_precondition(
                "this pod gets the node's metadata service, but this agent cannot reach it",
            )),
            Err(status) => Err(status.clone()),
        };
        match route {
            Route::IamRoleList => match role() {
                Ok(role) => ("role", text(StatusCode::OK, role.name.clone())),
                Err(status) => ("role", from_status(&status)),
            },
            Route::IamInfo => match role() {
                Ok(role) => ("role", info(&role.arn)),
                Err(status) => ("role", from_status(&status)),
            },
            Route::IamRoot => ("role", text(StatusCode::OK, "info\nsecurity-credentials/")),
            Route::IamCredentials(asked) => {
                let response = match role() {
                    Ok(role) if role.name != asked => text(
                        StatusCode::NOT_FOUND,
                        format!("kiam: this pod's role is {}, not {asked}\n", role.name),
                    ),
                    Ok(role) => match self.upstream.credentials(subject, &role, deadline).await {
                        Ok(creds) => {
                            let now = kiam_ops::unix_now();
                            self.metrics
                                .credentials_remaining
                                .observe((creds.expiration_unix - now).max(0) as f64);
                            self.metrics
                                .credentials_served
                                .get_or_create(&ScopeLabels {
                                    scope: role.scope(),
                                })
                                .inc();
                            reply(StatusCode::OK, "application/json", document(&creds))
                        }
                        Err(status) => from_status(&status),
                    },
                    Err(status) => from_status(&status),
                };
                ("credentials", response)
            }
            Route::IamOther => (
                "not_allowed",
                text(StatusCode::NOT_FOUND, "kiam: not found\n"),
            ),
            Route::NodeIdentity => (
                "not_allowed",
                text(
                    StatusCode::NOT_FOUND,
                    "kiam: the node's identity is not available to pods\n",
                ),
            ),
            Route::UserData if !self.allow_user_data => (
                "not_allowed",
                text(
                    StatusCode::NOT_FOUND,
                    "kiam: the node's user data is not available to pods (--allow-user-data)\n",
                ),
            ),
            Route::UserData | Route::Other | Route::Token => {
                self.other(pod, request.uri().path(), deadline).await
            }
        }
    }

    /// The refusal of a request whose token is not acceptable, if it is not.
    /// The refusal of a request whose token is not acceptable, if it is not. A token is
    /// its container's (`subject`); one an agent issued before tokens were kept per
    /// container names the pod only, and is accepted in any container of that pod until it
    /// expires, so an agent upgrade does not turn every held token into a 401 (the role
    /// served is the caller's own either way: the token proves a PUT, not an identity).
    fn check_token(&self, headers: &HeaderMap, subject: &str, pod: &str) -> Option<Reply> {
        let unauthorized =
            |why: &str| Some(text(StatusCode::UNAUTHORIZED, format!("kiam: {why}\n")));
        match headers.get(TOKEN_HEADER).map(|v| v.to_str()) {
            Some(Ok(token)) => match self.tokens.check(token, subject) {
                Ok(()) => None,
                Err(TokenError::OtherPod) if self.tokens.check(token, pod).is_ok() => None,
                Err(error) => unauthorized(&error.to_string()),
            },
            Some(Err(_)) => unauthorized("malformed token"),
            None if self.require_v2 => unauthorized("IMDSv2 required: PUT /latest/api/token first"),
            None => None,
        }
    }

    fn token(&self, method: &Method, headers: &HeaderMap, subject: &str) -> Reply {
        if *method != Method::PUT {
            return method_not_allowed("PUT");
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
            self.tokens.issue(subject, Duration::from_secs(ttl)),
        );
        if let Ok(value) = HeaderValue::from_str(&ttl.to_string()) {
            response.headers_mut().insert(TTL_HEADER, value);
        }
        response
    }

    async fn other(
        &self,
        pod: &str,
        path: &str,
        deadline: tokio::time::Instant,
    ) -> (&'static str, Reply) {
        match (&self.forwarder, self.allow.is_match(path)) {
            (Some(forwarder), true) => match forwarder.kept(path) {
                Some(body) => ("forwarded", text(StatusCode::OK, body)),
                None if !self.forward_rate.allows(pod) => ("forwarded", too_often()),
                None => ("forwarded", forwarder.get(path, deadline).await),
            },
            _ => (
                "not_allowed",
                text(StatusCode::NOT_FOUND, "kiam: not found\n"),
            ),
        }
    }
}

fn too_often() -> Reply {
    text(
        StatusCode::TOO_MANY_REQUESTS,
        "kiam: this pod asks the node's metadata service too often\n",
    )
}

fn info(arn: &str) -> Reply {
    let profile = arn.replacen(":role/", ":instance-profile/", 1);
    let name_len = arn.rsplit('/').next().map_or(0, str::len);
    let body = serde_json::json!({
        "Code": "Success",
        "LastUpdated": rfc3339(jiff::Timestamp::now().as_second()),
        "InstanceProfileArn": profile,
        "InstanceProfileId": format!("AIPAKIAM{name_len}"),
    });
    reply(StatusCode::OK, "application/json", body.to_string())
}

#[cfg(test)]
impl Imds {
    /// The service with no servers behind it (every role lookup fails), no node metadata
    /// service, a fresh token key and paths matching `allow` forwardable.
    pub(crate) fn for_tests(allow: &str, require_v2: bool) -> Self {
        Self {
            log_budget: LogBudget::default(),
            forward_rate: crate::rate::PodRate::new(20),
            tokens: Tokens::random().expect("key"),
            upstream: Upstream::new(
                None,
                Arc::new(crate::upstream::SystemClock),
                crate::upstream::Settings {
                    node: "node".into(),
                    deadline: Duration::from_millis(100),
                    min_validity: Duration::from_secs(1800),
                    role_ttl: Duration::from_secs(10),
                    refusal_ttl: Duration::from_secs(1),
                    refresh_wait: Duration::from_millis(10),
                },
            ),
            allow: Regex::new(allow).expect("regex"),
            allow_user_data: false,
            require_v2,
            forwarder: None,
            metrics: Arc::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt as _;

    use super::*;
    use crate::identity::{PodCgroup, QosClass};

    fn caller(uid: &str) -> Caller {
        in_container(uid, None)
    }

    fn in_container(uid: &str, container: Option<&str>) -> Caller {
        Caller::for_pod(PodCgroup {
            pod_uid: uid.into(),
            static_pod: false,
            qos: QosClass::BestEffort,
            container_id: container.map(str::to_owned),
            runtime: None,
        })
    }

    /// What a pod reads for each gRPC code a server refuses with (the server's
    /// `refusal::code_of` gives every reason one of these).
    #[test]
    fn refusals_become_http_statuses() {
        for (code, http) in [
            (Code::NotFound, StatusCode::NOT_FOUND),
            (Code::PermissionDenied, StatusCode::FORBIDDEN),
            (Code::Unauthenticated, StatusCode::FORBIDDEN),
            (Code::InvalidArgument, StatusCode::UNPROCESSABLE_ENTITY),
            (Code::FailedPrecondition, StatusCode::UNPROCESSABLE_ENTITY),
            (Code::ResourceExhausted, StatusCode::TOO_MANY_REQUESTS),
            (Code::Unavailable, StatusCode::SERVICE_UNAVAILABLE),
            (Code::DeadlineExceeded, StatusCode::SERVICE_UNAVAILABLE),
        ] {
            let reply = from_status(&Status::new(code, "why"));
            assert_eq!(reply.status(), http, "{code:?}");
        }
    }

    /// A token is bound to the container that fetched it: containers of one pod may hold
    /// different roles, so another container of the same pod cannot use it.
    #[tokio::test]
    async fn a_token_from_one_container_is_refused_in_another() {
        let api = imds(true);
        let (app, sidecar) = (
            in_container("pod-a", Some(&"a".repeat(64))),
            in_container("pod-a", Some(&"b".repeat(64))),
        );
        let put = request(Method::PUT, "/latest/api/token", &[(TTL_HEADER, "60")]);
        let token = body(api.handle(put, &app).await).await;
        let path = "/latest/meta-data/iam/";
        let with = |t: &str| request(Method::GET, path, &[(TOKEN_HEADER, t)]);
        assert_eq!(
            api.handle(with(&token), &app).await.status(),
            StatusCode::OK
        );
        let other = api.handle(with(&token), &sidecar).await;
        assert_eq!(other.status(), StatusCode::UNAUTHORIZED);
        assert!(body(other).await.contains("another pod or container"));
        // Nor in the pod's own cgroup, outside any container.
        let outside = api.handle(with(&token), &caller("pod-a")).await;
        assert_eq!(outside.status(), StatusCode::UNAUTHORIZED);
        // A token an agent issued before tokens were kept per container (it names the pod
        // only) is accepted in the pod's containers, and nowhere else.
        let put = request(Method::PUT, "/latest/api/token", &[(TTL_HEADER, "60")]);
        let legacy = body(api.handle(put, &caller("pod-a")).await).await;
        for container in [&app, &sidecar] {
            assert_eq!(
                api.handle(with(&legacy), container).await.status(),
                StatusCode::OK
            );
        }
        let elsewhere = in_container("pod-b", Some(&"a".repeat(64)));
        assert_eq!(
            api.handle(with(&legacy), &elsewhere).await.status(),
            StatusCode::UNAUTHORIZED
        );
    }

    fn imds(require_v2: bool) -> Imds {
        Imds::for_tests(
            "^/latest/meta-data/placement/region$|^/latest/.*$",
            require_v2,
        )
    }

    fn request(method: Method, path: &str, headers: &[(&'static str, &str)]) -> Request<Bytes> {
        let mut builder = Request::builder().method(method).uri(path);
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        builder.body(Bytes::new()).expect("request")
    }

    async fn body(reply: Reply) -> String {
        let bytes = reply.into_body().collect().await.expect("body").to_bytes();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    #[tokio::test]
    async fn tokens_follow_ec2_rules() {
        let api = imds(false);
        let a = caller("pod-a");
        let put = |h: &[(&'static str, &str)]| {
            api.handle(request(Method::PUT, "/latest/api/token", h), &a)
        };
        let ok = put(&[(TTL_HEADER, "21600")]).await;
        assert_eq!(ok.status(), StatusCode::OK);
        assert_eq!(
            ok.headers().get(TTL_HEADER).map(|v| v.as_bytes()),
            Some(&b"21600"[..])
        );
        let token = body(ok).await;
        for bad in ["0", "21601", "x", ""] {
            let r = put(&[(TTL_HEADER, bad)]).await;
            assert_eq!(r.status(), StatusCode::BAD_REQUEST, "ttl {bad:?}");
        }
        assert_eq!(put(&[]).await.status(), StatusCode::BAD_REQUEST);
        let proxied = put(&[(TTL_HEADER, "60"), ("x-forwarded-for", "1.2.3.4")]).await;
        assert_eq!(proxied.status(), StatusCode::FORBIDDEN);
        let get = api
            .handle(request(Method::GET, "/latest/api/token", &[]), &a)
            .await;
        assert_eq!(get.status(), StatusCode::METHOD_NOT_ALLOWED);

        // The token works for its pod only, and a forged one for nobody.
        let path = "/latest/meta-data/iam/";
        let with = |t: &str| request(Method::GET, path, &[(TOKEN_HEADER, t)]);
        assert_eq!(api.handle(with(&token), &a).await.status(), StatusCode::OK);
        let theirs = api.handle(with(&token), &caller("pod-b")).await;
        assert_eq!(theirs.status(), StatusCode::UNAUTHORIZED);
        let forged = api.handle(with(&format!("{token}x")), &a).await;
        assert_eq!(forged.status(), StatusCode::UNAUTHORIZED);
        // IMDSv1 is allowed unless required otherwise.
        let v1 = api.handle(request(Method::GET, path, &[]), &a).await;
        assert_eq!(v1.status(), StatusCode::OK);
        let strict = imds(true);
        let v1 = strict.handle(request(Method::GET, path, &[]), &a).await;
        assert_eq!(v1.status(), StatusCode::UNAUTHORIZED);
    }

    #[tokio::test]
    async fn bad_paths_and_the_nodes_identity_are_refused_whatever_the_allow_list() {
        // The allow-list here matches everything under /latest/.
        let api = imds(false);
        let a = caller("pod-a");
        for (path, status) in [
            ("/latest//meta-data/iam/security-credentials/", 400),
            ("/latest/./meta-data/iam/info", 400),
            (
                "/latest/meta-data/iam/%2E%2E/iam/security-credentials/",
                400,
            ),
            (
                "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
                404,
            ),
            ("/latest/dynamic/instance-identity/pkcs7", 404),
            ("/latest/dynamic/instance-identity/signature", 404),
            ("/latest/user-data", 404),
            ("/latest/meta-data/%69am/security-credentials/", 400),
            ("/latest/meta%2Ddata/iam/info", 400),
            ("/latest/meta-data/IAM/security-credentials/", 404),
            // Any version: kiam's own answer (here: no server configured).
            ("/2016-09-02/meta-data/iam/security-credentials/", 503),
            ("/2021-01-03/meta-data/iam/info", 503),
        ] {
            let r = api.handle(request(Method::GET, path, &[]), &a).await;
            assert_eq!(r.status().as_u16(), status, "{path}");
        }
        let r = api
            .handle(request(Method::GET, "/latest/./x", &[]), &a)
            .await;
        assert!(body(r).await.contains(". and .."));
    }

    #[tokio::test]
    async fn other_paths_and_methods() {
        let api = imds(false);
        let a = caller("pod-a");
        let r = api
            .handle(request(Method::GET, "/2009-04-04/user-data", &[]), &a)
            .await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        let r = api
            .handle(request(Method::POST, "/latest/meta-data/", &[]), &a)
            .await;
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        // Without servers, role lookups are unavailable, with the reason.
        let r = api
            .handle(
                request(
                    Method::GET,
                    "/latest/meta-data/iam/security-credentials/",
                    &[],
                ),
                &a,
            )
            .await;
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(body(r).await.contains("--server"));
    }

    #[test]
    fn one_pod_cannot_flood_the_log() {
        let budget = LogBudget::default();
        let logged = (0..1000).filter(|_| budget.allows("noisy")).count();
        assert_eq!(logged, LogBudget::LINES as usize);
        assert!(budget.allows("another"), "other pods keep their lines");
    }

    #[test]
    fn timestamps_end_in_z() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }
}
