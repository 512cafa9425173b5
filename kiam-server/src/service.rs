//! The gRPC service agents call: a thin layer over [`crate::decision`]. It establishes which
//! node the calling agent proved it runs on ([`crate::identity`]: its bearer token or its
//! certificate), asks the decision what the pod may have, fetches
//! credentials from the cache, and turns refusals into statuses with a typed reason (and an
//! Event on the pod where its owner must see it). Every refusal is counted by reason.

use std::{sync::Arc, time::Duration};

use tonic::{Code, Request, Response, Status};

use crate::{
    credentials::{CredentialCache, StsError},
    decision::{self, Access, Decision, Refusal, RoleSource, Settings, listed_name},
    events::Events,
    identity::AgentAuth,
    index::Index,
    metrics::{Method, Metrics, ReasonLabels, RequestLabels, ServedLabels},
    proto::{
        Credentials as ProtoCredentials, GetCredentialsRequest, GetPodRoleRequest,
        GetPodRoleResponse, HealthRequest, HealthResponse, kiam_server::Kiam,
    },
    sessions::SessionBudget,
};

pub struct KiamService {
    pub index: Arc<Index>,
    pub settings: Settings,
    pub auth: Arc<AgentAuth>,
    pub sessions: Arc<SessionBudget>,
    pub cache: CredentialCache,
    pub events: Arc<Events>,
    pub metrics: Arc<Metrics>,
}

fn code_name(code: Code) -> String {
    match code {
        Code::Ok => "ok".into(),
        other => format!("{other:?}").to_ascii_lowercase(),
    }
}

impl KiamService {
    fn count<T>(&self, method: Method, result: &Result<T, Status>) {
        let code = match result {
            Ok(_) => Code::Ok,
            Err(status) => status.code(),
        };
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                method,
                result: code_name(code),
            })
            .inc();
    }

    /// Counts the refusal, reports it on the pod where that helps its owner, and makes the
    /// status.
    fn refuse(&self, uid: &str, refusal: &Refusal) -> Status {
        self.metrics
            .refusals
            .get_or_create(&ReasonLabels {
                reason: refusal.label(),
            })
            .inc();
        if let Some(pod) = self.index.pod(uid) {
            self.events.refusal(&pod, refusal);
        }
        refusal.to_status()
    }

    async fn decide_for<T>(
        &self,
        request: &Request<T>,
        uid: &str,
        node: &str,
        container_id: &str,
    ) -> Result<Decision, Status> {
        let decided = async {
            if uid.is_empty() || node.is_empty() {
                return Err(Refusal::BadRequest("pod_uid and node_name are required"));
            }
            let certificate_nodes: Vec<String> = request
                .peer_certs()
                .and_then(|certs| {
                    certs
                        .first()
                        .map(|c| crate::proto::certificate::node_identities(c.as_ref()))
                })
                .unwrap_or_default();
            let proven = self
                .auth
                .authenticate(
                    bearer(request),
                    certificate_nodes,
                    request.remote_addr().map(|a| a.ip()),
                )
                .await?;
            proven.check(node)?;
            let container = Some(container_id).filter(|id| !id.is_empty());
            let decision = decision::decide(&self.index, &self.settings, uid, node, container)?;
            if let Access::Role { key, .. } = &decision.access {
                self.sessions.admit(&decision.pod.namespace, key)?;
            }
            Ok(decision)
        };
        decided.await.map_err(|refusal| self.refuse(uid, &refusal))
    }
}

/// How long a request may wait for STS: what its caller allows (`grpc-timeout`, which agents
/// set to their deadline) less a margin to answer in, at most [`MAX_STS_WAIT`].
fn sts_budget<T>(request: &Request<T>) -> Duration {
    let allowed = request
        .metadata()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
        .unwrap_or(MAX_STS_WAIT);
    allowed
        .saturating_sub(ANSWER_MARGIN)
        .clamp(ANSWER_MARGIN, MAX_STS_WAIT)
}

const MAX_STS_WAIT: Duration = Duration::from_secs(30);
const ANSWER_MARGIN: Duration = Duration::from_millis(100);

/// A `grpc-timeout` value: up to 8 digits and a unit (`H`, `M`, `S`, `m`, `u`, `n`).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The agent's token: `authorization: Bearer <token>`.
fn bearer<T>(request: &Request<T>) -> Option<&str> {
    request
        .metadata()
        .get("authorization")?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

#[tonic::async_trait]
impl Kiam for KiamService {
    async fn get_pod_role(
        &self,
        request: Request<GetPodRoleRequest>,
    ) -> Result<Response<GetPodRoleResponse>, Status> {
        let r = request.get_ref();
        let result = self
            .decide_for(&request, &r.pod_uid, &r.node_name, &r.container_id)
            .await
            .map(|d| {
                let mut response = GetPodRoleResponse {
                    namespace: d.pod.namespace.clone(),
                    pod_name: d.pod.name.clone(),
                    ..GetPodRoleResponse::default()
                };
                match &d.access {
                    Access::Role { role, source, .. } => {
                        response.role_name = listed_name(role).to_owned();
                        response.role_arn = role.arn.clone();
                        if *source == RoleSource::Container {
                            response.container_name = d.container.clone().unwrap_or_default();
                        }
                    }
                    Access::PassThrough => {
                        tracing::debug!(pod_uid = %d.pod.uid, namespace = %d.pod.namespace, pod = %d.pod.name, "node metadata pass-through");
                        response.node_metadata_passthrough = true;
                    }
                }
                Response::new(response)
            });
        self.count(Method::GetPodRole, &result);
        result
    }

    async fn get_credentials(
        &self,
        request: Request<GetCredentialsRequest>,
    ) -> Result<Response<ProtoCredentials>, Status> {
        let result = async {
            let r = request.get_ref();
            let decision = self
                .decide_for(&request, &r.pod_uid, &r.node_name, &r.container_id)
                .await?;
            let (role, key) = decision
                .role()
                .map_err(|refusal| self.refuse(&r.pod_uid, &refusal))?;
            if listed_name(role) != r.role_name && role.arn != r.role_name {
                let refusal = Refusal::OtherRole {
                    pod: decision::pod_label(&decision.pod),
                    asked: r.role_name.clone(),
                    actual: listed_name(role).to_owned(),
                };
                return Err(self.refuse(&r.pod_uid, &refusal));
            }
            // Never past the caller's deadline: a slow STS gets a clear answer in time, and
            // the call goes on in the background for the next request.
            let fetched = tokio::time::timeout(sts_budget(&request), self.cache.get(key))
                .await
                .unwrap_or_else(|_| {
                    Err(StsError::Unavailable(
                        "AssumeRole has not answered within this request's deadline; it goes on in the background".into(),
                    ))
                });
            let creds = fetched.map_err(|error| {
                let refusal = Refusal::Sts {
                    role: role.arn.clone(),
                    error,
                };
                self.refuse(&r.pod_uid, &refusal)
            })?;
            let secs = kiam_ops::unix_seconds;
            if let Access::Role { source, .. } = &decision.access {
                self.metrics
                    .served
                    .get_or_create(&ServedLabels {
                        role_source: source.label(),
                        scope: source.scope(),
                    })
                    .inc();
            }
            tracing::debug!(pod_uid = %decision.pod.uid, container_id = %r.container_id, role = %role, "credentials served");
            Ok(Response::new(ProtoCredentials {
                access_key_id: creds.access_key_id.clone(),
                secret_access_key: creds.secret_access_key.clone(),
                session_token: creds.session_token.clone(),
                expiration_unix: secs(creds.expiration),
                last_updated_unix: secs(creds.issued),
                role_arn: role.arn.clone(),
            }))
        }
        .await;
        self.count(Method::GetCredentials, &result);
        result
    }

    async fn health(
        &self,
        _request: Request<HealthRequest>,
    ) -> Result<Response<HealthResponse>, Status> {
        let ready = self.index.ready();
        let result = Ok(Response::new(HealthResponse {
            ready,
            message: match ready {
                true => "ready".into(),
                false => "the Kubernetes index has not synced yet".into(),
            },
        }));
        self.count(Method::Health, &result);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts() {
        assert_eq!(parse_grpc_timeout("850m"), Some(Duration::from_millis(850)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("100u"), Some(Duration::from_micros(100)));
        for bad in ["", "m", "12", "1x", "123456789m", "-1S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
        let mut request = Request::new(());
        assert_eq!(sts_budget(&request), MAX_STS_WAIT - ANSWER_MARGIN);
        request.set_timeout(Duration::from_millis(900));
        assert_eq!(sts_budget(&request), Duration::from_millis(800));
        request.set_timeout(Duration::from_millis(50));
        assert_eq!(sts_budget(&request), ANSWER_MARGIN);
    }
}
