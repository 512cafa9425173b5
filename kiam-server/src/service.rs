//! The gRPC service agents call, and the decision behind each answer: pod (by UID) → node
//! check → role annotation → namespace rule → cache key. Refusals map to precise gRPC codes
//! with messages an operator can act on; forbidden roles and STS failures also become
//! Kubernetes Events on the pod (deduplicated, at most one per pod and reason every 5 minutes).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant, UNIX_EPOCH},
};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder};
use tonic::{Code, Request, Response, Status};

use crate::{
    credentials::{CacheKey, CredentialCache, StsError},
    index::{Index, PodInfo},
    metrics::{Method, Metrics, RequestLabels},
    policy::{
        ANNOTATION_EXTERNAL_ID, ANNOTATION_SESSION_NAME, BaseArn, Denied, RoleArn, session_name,
    },
    proto::{
        Credentials as ProtoCredentials, GetCredentialsRequest, GetPodRoleRequest,
        GetPodRoleResponse, HealthRequest, HealthResponse, kiam_server::Kiam,
    },
    tls,
};

/// Settings the decision needs.
#[derive(Clone, Debug)]
pub struct Settings {
    pub base: BaseArn,
    pub role_annotation: String,
    pub default_session_name: String,
    pub require_node_identity: bool,
    /// Tag sessions with the pod's namespace and service account. Credentials are then
    /// shared per role, namespace and service account, not per role.
    pub session_tags: bool,
}

/// Why a pod gets no role.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("pod {0} is not known to this server (deleted, or not yet seen)")]
    UnknownPod(String),
    #[error("pod {pod} runs on node {actual:?}, not on {asked}")]
    WrongNode {
        pod: String,
        actual: Option<String>,
        asked: String,
    },
    #[error("pod {0} has completed")]
    Completed(String),
    #[error("pod {pod} has no {annotation} annotation")]
    NoRole { pod: String, annotation: String },
    #[error("pod {pod}: {denied}")]
    Forbidden { pod: String, denied: Denied },
    #[error("pod {pod} asked for role {asked}, but its role is {actual}")]
    OtherRole {
        pod: String,
        asked: String,
        actual: String,
    },
    #[error("this agent's certificate is for nodes {allowed:?}, not {asked}")]
    NotThisAgentsNode { allowed: Vec<String>, asked: String },
    #[error(
        "this agent's certificate names no node (spiffe://kiam/node/<name>) and --require-node-identity is set"
    )]
    NoNodeIdentity,
}

impl Refusal {
    pub fn code(&self) -> Code {
        match self {
            Self::UnknownPod(_)
            | Self::Completed(_)
            | Self::NoRole { .. }
            | Self::OtherRole { .. } => Code::NotFound,
            Self::Forbidden {
                denied: Denied::BadRole { .. },
                ..
            } => Code::InvalidArgument,
            Self::WrongNode { .. } | Self::Forbidden { .. } | Self::NotThisAgentsNode { .. } => {
                Code::PermissionDenied
            }
            Self::NoNodeIdentity => Code::Unauthenticated,
        }
    }
}

/// What a pod may have.
#[derive(Debug, Clone)]
pub struct Decision {
    pub pod: Arc<PodInfo>,
    pub role: RoleArn,
    pub key: CacheKey,
}

impl Decision {
    /// The name the instance-metadata API lists: the last path segment of the role.
    pub fn role_name(&self) -> &str {
        self.role.name.rsplit('/').next().unwrap_or(&self.role.name)
    }
}

fn pod_label(pod: &PodInfo) -> String {
    format!("{}/{}", pod.namespace, pod.name)
}

/// The decision for a pod, without the node check (prefetch and refresh use this).
pub fn decide_pod(
    index: &Index,
    settings: &Settings,
    pod: Arc<PodInfo>,
) -> Result<Decision, Refusal> {
    if pod.completed() {
        return Err(Refusal::Completed(pod_label(&pod)));
    }
    let value = pod
        .annotations
        .get(&settings.role_annotation)
        .ok_or_else(|| Refusal::NoRole {
            pod: pod_label(&pod),
            annotation: settings.role_annotation.clone(),
        })?;
    let forbidden = |denied| Refusal::Forbidden {
        pod: pod_label(&pod),
        denied,
    };
    let role = settings.base.resolve(value).map_err(|e| {
        forbidden(Denied::BadRole {
            value: value.clone(),
            reason: e.to_string(),
        })
    })?;
    let rules = index.namespace(&pod.namespace).ok_or_else(|| {
        forbidden(Denied::NoRule {
            namespace: pod.namespace.clone(),
        })
    })?;
    rules
        .check(&pod.namespace, &role, &settings.base)
        .map_err(forbidden)?;
    let session = pod
        .annotations
        .get(ANNOTATION_SESSION_NAME)
        .map(|s| session_name(s))
        .unwrap_or_else(|| session_name(&settings.default_session_name));
    let tags = match settings.session_tags {
        true => vec![
            ("kiam-namespace".to_owned(), pod.namespace.clone()),
            (
                "kiam-service-account".to_owned(),
                pod.service_account
                    .clone()
                    .unwrap_or_else(|| "default".into()),
            ),
        ],
        false => Vec::new(),
    };
    let key = CacheKey {
        role_arn: role.arn.clone(),
        external_id: pod.annotations.get(ANNOTATION_EXTERNAL_ID).cloned(),
        session_name: session,
        tags,
    };
    Ok(Decision { pod, role, key })
}

/// The full decision for an agent's request.
pub fn decide(
    index: &Index,
    settings: &Settings,
    uid: &str,
    node: &str,
) -> Result<Decision, Refusal> {
    let pod = index
        .pod(uid)
        .ok_or_else(|| Refusal::UnknownPod(uid.to_owned()))?;
    if pod.node.as_deref() != Some(node) {
        return Err(Refusal::WrongNode {
            pod: pod_label(&pod),
            actual: pod.node.clone(),
            asked: node.to_owned(),
        });
    }
    decide_pod(index, settings, pod)
}

/// Publishes Events on pods, at most one per pod and reason every `every`.
pub struct Events {
    recorder: Option<Recorder>,
    recent: Mutex<HashMap<(String, &'static str), Instant>>,
    every: Duration,
    metrics: Arc<Metrics>,
}

impl Events {
    pub fn new(recorder: Option<Recorder>, metrics: Arc<Metrics>) -> Self {
        Self {
            recorder,
            recent: Mutex::new(HashMap::new()),
            every: Duration::from_secs(300),
            metrics,
        }
    }

    pub fn warn(&self, pod: &PodInfo, reason: &'static str, note: String) {
        {
            let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            recent.retain(|_, at| now.duration_since(*at) < self.every);
            if recent.insert((pod.uid.clone(), reason), now).is_some() {
                return;
            }
        }
        tracing::warn!(pod_uid = %pod.uid, namespace = %pod.namespace, pod = %pod.name, reason, "{note}");
        let Some(recorder) = self.recorder.clone() else {
            return;
        };
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(pod.name.clone()),
            namespace: Some(pod.namespace.clone()),
            uid: Some(pod.uid.clone()),
            ..ObjectReference::default()
        };
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            let event = KubeEvent {
                type_: EventType::Warning,
                reason: reason.into(),
                note: Some(note),
                action: "AssumeRole".into(),
                secondary: None,
            };
            let result = match recorder.publish(&event, &reference).await {
                Ok(()) => "ok",
                Err(error) => {
                    tracing::warn!(%error, "cannot publish a Kubernetes Event");
                    "error"
                }
            };
            metrics
                .events
                .get_or_create(&crate::metrics::ResultLabels {
                    result: result.into(),
                })
                .inc();
        });
    }

    /// Reports what deserves an Event: forbidden or malformed roles.
    pub fn refusal(&self, pod: Option<&PodInfo>, refusal: &Refusal) {
        if let (Some(pod), Refusal::Forbidden { denied, .. }) = (pod, refusal) {
            let reason = match denied {
                Denied::BadRole { .. } => "IAMRoleInvalid",
                Denied::InvalidRule { .. } => "IAMNamespaceRuleInvalid",
                _ => "IAMRoleForbidden",
            };
            self.warn(pod, reason, refusal.to_string());
        }
    }
}

pub struct KiamService {
    pub index: Arc<Index>,
    pub settings: Settings,
    pub cache: CredentialCache,
    pub events: Arc<Events>,
    pub metrics: Arc<Metrics>,
}

fn sts_status(error: &StsError) -> Status {
    let code = match error {
        StsError::Denied(_) => Code::PermissionDenied,
        StsError::Throttled(_) | StsError::Unavailable(_) | StsError::TooShort(_) => {
            Code::Unavailable
        }
        StsError::Invalid(_) => Code::FailedPrecondition,
    };
    Status::new(code, error.to_string())
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

    /// The node an agent may ask about, checked against its certificate.
    fn check_node<T>(&self, request: &Request<T>, node: &str) -> Result<(), Refusal> {
        let identities: Vec<String> = request
            .peer_certs()
            .and_then(|certs| certs.first().map(tls::node_identities))
            .unwrap_or_default();
        if identities.is_empty() {
            return match self.settings.require_node_identity {
                true => Err(Refusal::NoNodeIdentity),
                false => Ok(()),
            };
        }
        match identities.iter().any(|n| n == node) {
            true => Ok(()),
            false => Err(Refusal::NotThisAgentsNode {
                allowed: identities,
                asked: node.to_owned(),
            }),
        }
    }

    fn decide_for<T>(
        &self,
        request: &Request<T>,
        uid: &str,
        node: &str,
    ) -> Result<Decision, Status> {
        if uid.is_empty() || node.is_empty() {
            return Err(Status::invalid_argument(
                "pod_uid and node_name are required",
            ));
        }
        if !self.index.ready() {
            return Err(Status::unavailable(
                "the Kubernetes index has not synced yet",
            ));
        }
        self.check_node(request, node)
            .and_then(|()| decide(&self.index, &self.settings, uid, node))
            .map_err(|refusal| {
                self.events
                    .refusal(self.index.pod(uid).as_deref(), &refusal);
                Status::new(refusal.code(), refusal.to_string())
            })
    }
}

#[tonic::async_trait]
impl Kiam for KiamService {
    async fn get_pod_role(
        &self,
        request: Request<GetPodRoleRequest>,
    ) -> Result<Response<GetPodRoleResponse>, Status> {
        let result = {
            let r = request.get_ref();
            self.decide_for(&request, &r.pod_uid, &r.node_name)
                .map(|d| {
                    Response::new(GetPodRoleResponse {
                        role_name: d.role_name().to_owned(),
                        role_arn: d.role.arn.clone(),
                        namespace: d.pod.namespace.clone(),
                        pod_name: d.pod.name.clone(),
                    })
                })
        };
        self.count(Method::GetPodRole, &result);
        result
    }

    async fn get_credentials(
        &self,
        request: Request<GetCredentialsRequest>,
    ) -> Result<Response<ProtoCredentials>, Status> {
        let result = async {
            let r = request.get_ref();
            let decision = self.decide_for(&request, &r.pod_uid, &r.node_name)?;
            if decision.role_name() != r.role_name && decision.role.arn != r.role_name {
                let refusal = Refusal::OtherRole {
                    pod: pod_label(&decision.pod),
                    asked: r.role_name.clone(),
                    actual: decision.role_name().to_owned(),
                };
                return Err(Status::new(refusal.code(), refusal.to_string()));
            }
            let creds = self.cache.get(&decision.key).await.map_err(|error| {
                self.events.warn(
                    &decision.pod,
                    "IAMAssumeRoleFailed",
                    format!("assuming {}: {error}", decision.role),
                );
                sts_status(&error)
            })?;
            let secs = |t: std::time::SystemTime| {
                t.duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs() as i64)
                    .unwrap_or(0)
            };
            tracing::debug!(pod_uid = %decision.pod.uid, role = %decision.role, "credentials served");
            Ok(Response::new(ProtoCredentials {
                access_key_id: creds.access_key_id.clone(),
                secret_access_key: creds.secret_access_key.clone(),
                session_token: creds.session_token.clone(),
                expiration_unix: secs(creds.expiration),
                last_updated_unix: secs(creds.issued),
                role_arn: decision.role.arn.clone(),
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
    use kube::api::DynamicObject;

    use super::*;
    use crate::policy::ANNOTATION_ROLE;

    fn settings() -> Settings {
        Settings {
            base: BaseArn::parse("123456789012").expect("base"),
            role_annotation: ANNOTATION_ROLE.into(),
            default_session_name: "kiam".into(),
            require_node_identity: false,
            session_tags: false,
        }
    }

    fn object(value: serde_json::Value) -> DynamicObject {
        serde_json::from_value(value).expect("object")
    }

    fn index() -> Index {
        let index = Index::new(vec![
            ANNOTATION_ROLE.into(),
            ANNOTATION_EXTERNAL_ID.into(),
            ANNOTATION_SESSION_NAME.into(),
        ]);
        index.replace_namespaces(&[object(serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "team", "annotations": {"iam.amazonaws.com/permitted": "app|team/.*"}}
        }))]);
        let pod = |uid: &str, role: Option<&str>, phase: &str, extra: serde_json::Value| {
            let mut annotations = extra;
            if let Some(role) = role {
                annotations[ANNOTATION_ROLE] = role.into();
            }
            object(serde_json::json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": uid, "namespace": "team", "uid": uid, "annotations": annotations},
                "spec": {"nodeName": "node-1"}, "status": {"phase": phase}
            }))
        };
        index.replace_pods(&[
            pod("ok", Some("app"), "Running", serde_json::json!({})),
            pod("path", Some("team/db"), "Running", serde_json::json!({"iam.amazonaws.com/external-id": "x1", "iam.amazonaws.com/session-name": "db job"})),
            pod("forbidden", Some("admin"), "Running", serde_json::json!({})),
            pod("done", Some("app"), "Succeeded", serde_json::json!({})),
            pod("none", None, "Running", serde_json::json!({})),
            pod("bad", Some("no spaces"), "Running", serde_json::json!({})),
        ]);
        index
    }

    #[test]
    fn decisions() {
        let (index, s) = (index(), settings());
        let ok = decide(&index, &s, "ok", "node-1").expect("permitted");
        assert_eq!(ok.role.arn, "arn:aws:iam::123456789012:role/app");
        assert_eq!(ok.role_name(), "app");
        assert_eq!(ok.key.session_name, "kiam");
        let path = decide(&index, &s, "path", "node-1").expect("permitted");
        assert_eq!(path.role_name(), "db");
        assert_eq!(path.key.external_id.as_deref(), Some("x1"));
        assert_eq!(path.key.session_name, "db-job");
        assert!(path.key.tags.is_empty());
        let tagged = Settings {
            session_tags: true,
            ..s.clone()
        };
        let key = decide(&index, &tagged, "ok", "node-1")
            .expect("permitted")
            .key;
        assert_eq!(
            key.tags,
            vec![
                ("kiam-namespace".to_owned(), "team".to_owned()),
                ("kiam-service-account".to_owned(), "default".to_owned())
            ]
        );

        let code =
            |uid: &str, node: &str| decide(&index, &s, uid, node).expect_err("refused").code();
        assert_eq!(code("ok", "node-2"), Code::PermissionDenied);
        assert_eq!(code("gone", "node-1"), Code::NotFound);
        assert_eq!(code("forbidden", "node-1"), Code::PermissionDenied);
        assert_eq!(code("done", "node-1"), Code::NotFound);
        assert_eq!(code("none", "node-1"), Code::NotFound);
        assert_eq!(code("bad", "node-1"), Code::InvalidArgument);
    }
}
