//! Kubernetes Events on pods for the refusals and failures a pod's owner must see:
//! forbidden or malformed roles, broken namespace rules, AssumeRole failures.
//!
//! Bounded whatever tenants do: at most one Event per pod and reason every 5 minutes (the
//! table that remembers them holds at most [`MAX_REMEMBERED`] entries), published by one
//! task from a short queue at [`PER_SECOND`] a second. What does not fit (10,000 pods
//! refused at once, when a namespace loses its rule) is counted as `not_published`, never
//! held: each Event in flight costs a request and its buffers, and the server's peak memory
//! is what it keeps.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder};
use tokio::{sync::mpsc, time::Instant};

use crate::{
    index::PodInfo,
    metrics::{Metrics, ResultLabels},
    proto::Reason,
    refusal::Refusal,
};

/// How often one pod may get an Event for one reason.
const EVERY: Duration = Duration::from_secs(300);
/// Pods and reasons remembered at once for that.
pub const MAX_REMEMBERED: usize = 10_000;
/// Events waiting to be published.
const QUEUE: usize = 64;
/// Events published a second, at most.
pub const PER_SECOND: u32 = 10;

/// An Event to publish, and the pod it is about.
struct Pending {
    reference: ObjectReference,
    event: KubeEvent,
}

/// Publishes Events on pods, at most one per pod and reason every 5 minutes.
pub struct Events {
    recent: Mutex<HashMap<(String, &'static str), Instant>>,
    queue: Option<mpsc::Sender<Pending>>,
    metrics: Arc<Metrics>,
}

impl Events {
    /// With a recorder, starts the task that publishes (so it needs a tokio runtime).
    pub fn new(recorder: Option<Recorder>, metrics: Arc<Metrics>) -> Self {
        let queue = recorder.map(|recorder| {
            let (tx, rx) = mpsc::channel(QUEUE);
            tokio::spawn(publish(recorder, rx, metrics.clone()));
            tx
        });
        Self {
            recent: Mutex::new(HashMap::new()),
            queue,
            metrics,
        }
    }

    fn count(&self, result: &str) {
        self.metrics
            .events
            .get_or_create(&ResultLabels {
                result: result.into(),
            })
            .inc();
    }

    /// Whether this pod may get an Event for `reason` now: `None` when the table of
    /// recent Events is full.
    fn due(&self, uid: &str, reason: &'static str) -> Option<bool> {
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if recent
            .get(&(uid.to_owned(), reason))
            .is_some_and(|at| now.duration_since(*at) < EVERY)
        {
            return Some(false);
        }
        if recent.len() >= MAX_REMEMBERED {
            recent.retain(|_, at| now.duration_since(*at) < EVERY);
        }
        // More pods than the table holds refused at once: no more Events until it frees
        // up, rather than a table without bound.
        (recent.len() < MAX_REMEMBERED).then_some(true)
    }

    /// Remembers that the pod got an Event for `reason`.
    fn sent(&self, uid: &str, reason: &'static str) {
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if recent.len() < MAX_REMEMBERED {
            recent.insert((uid.to_owned(), reason), Instant::now());
        }
    }

    pub fn warn(&self, pod: &PodInfo, reason: &'static str, note: String) {
        match self.due(&pod.uid, reason) {
            Some(true) => {}
            Some(false) => return,
            None => return self.count("not_published"),
        }
        let Some(queue) = &self.queue else {
            tracing::warn!(pod_uid = %pod.uid, namespace = %pod.namespace, pod = %pod.name, reason, "{note}");
            return self.sent(&pod.uid, reason);
        };
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(pod.name.clone()),
            namespace: Some(pod.namespace.clone()),
            uid: Some(pod.uid.clone()),
            ..ObjectReference::default()
        };
        let event = KubeEvent {
            type_: EventType::Warning,
            reason: reason.into(),
            note: Some(note),
            action: "AssumeRole".into(),
            secondary: None,
        };
        match queue.try_send(Pending { reference, event }) {
            Ok(()) => self.sent(&pod.uid, reason),
            // Not remembered: a later refusal of the pod may still get its Event.
            Err(mpsc::error::TrySendError::Full(pending)) => {
                tracing::debug!(pod_uid = %pod.uid, reason, note = pending.event.note.as_deref().unwrap_or_default(), "Event not published now: the queue is full");
                self.count("not_published");
            }
            Err(mpsc::error::TrySendError::Closed(_)) => self.count("error"),
        }
    }

    /// Reports what deserves an Event on the pod: forbidden or malformed roles, broken
    /// namespace rules, AssumeRole failures.
    pub fn refusal(&self, pod: &PodInfo, refusal: &Refusal) {
        let reason = match refusal.reason() {
            Reason::RoleInvalid => "IAMRoleInvalid",
            Reason::NamespaceRuleInvalid => "IAMNamespaceRuleInvalid",
            Reason::RoleNotPermitted => "IAMRoleForbidden",
            Reason::TooManySessions => "IAMSessionLimit",
            Reason::ContainerRolesInvalid => "IAMContainerRolesInvalid",
            Reason::StsDenied | Reason::StsUnavailable | Reason::StsInvalid => {
                "IAMAssumeRoleFailed"
            }
            _ => return,
        };
        self.warn(pod, reason, refusal.public());
    }
}

/// Publishes queued Events one at a time, at most [`PER_SECOND`] a second.
async fn publish(recorder: Recorder, mut queue: mpsc::Receiver<Pending>, metrics: Arc<Metrics>) {
    let mut pace = tokio::time::interval(Duration::from_secs(1) / PER_SECOND);
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while let Some(Pending { reference, event }) = queue.recv().await {
        pace.tick().await;
        tracing::warn!(
            pod_uid = reference.uid.as_deref().unwrap_or_default(),
            namespace = reference.namespace.as_deref().unwrap_or_default(),
            pod = reference.name.as_deref().unwrap_or_default(),
            reason = %event.reason,
            "{}",
            event.note.as_deref().unwrap_or_default()
        );
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
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn pod(uid: &str) -> PodInfo {
        PodInfo {
            uid: uid.into(),
            name: uid.into(),
            namespace: "team".into(),
            node: None,
            phase: None,
            service_account: None,
            host_network: false,
            mirror: None,
            containers: None,
            annotations: BTreeMap::new(),
        }
    }

    #[test]
    fn one_event_per_pod_and_reason_and_a_bounded_table() {
        let events = Events::new(None, Arc::default());
        events.warn(&pod("a"), "IAMRoleForbidden", String::new());
        assert_eq!(events.due("a", "IAMRoleForbidden"), Some(false));
        assert_eq!(events.due("a", "IAMRoleInvalid"), Some(true));
        for i in 0..MAX_REMEMBERED * 2 {
            events.warn(&pod(&format!("p{i}")), "IAMRoleForbidden", String::new());
        }
        assert_eq!(
            events.recent.lock().expect("lock").len(),
            MAX_REMEMBERED,
            "never more than the table holds"
        );
        assert_eq!(events.due("new", "IAMRoleForbidden"), None);
    }
}
