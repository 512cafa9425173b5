//! Kubernetes Events on pods for the refusals and failures a pod's owner must see:
//! forbidden or malformed roles, broken namespace rules, AssumeRole failures. Deduplicated:
//! at most one per pod and reason every 5 minutes.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder};

use crate::{
    decision::Refusal,
    index::PodInfo,
    metrics::{Metrics, ResultLabels},
    proto::Reason,
};

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
                .get_or_create(&ResultLabels {
                    result: result.into(),
                })
                .inc();
        });
    }

    /// Reports what deserves an Event on the pod: forbidden or malformed roles, broken
    /// namespace rules, AssumeRole failures.
    pub fn refusal(&self, pod: &PodInfo, refusal: &Refusal) {
        let reason = match refusal.reason() {
            Reason::RoleInvalid => "IAMRoleInvalid",
            Reason::NamespaceRuleInvalid => "IAMNamespaceRuleInvalid",
            Reason::RoleNotPermitted => "IAMRoleForbidden",
            Reason::TooManySessions => "IAMSessionLimit",
            Reason::StsDenied | Reason::StsUnavailable | Reason::StsInvalid => {
                "IAMAssumeRoleFailed"
            }
            _ => return,
        };
        self.warn(pod, reason, refusal.to_string());
    }
}
