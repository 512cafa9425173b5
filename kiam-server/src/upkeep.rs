//! Which credentials the servers hold, and keeping them fresh.
//!
//! - **Prefetch**: when a pod arrives or changes, its permitted keys (the pod's role and, with
//!   per-container roles, each container's) are queued and a few workers fetch them, so a
//!   pod's first request finds credentials waiting.
//! - **Upkeep**: every `--refresh-interval` the keys in use are refreshed ahead of expiry and
//!   the others dropped. Which keys each pod uses is kept in [`InUse`], updated from what the
//!   index says changed ([`Index::take_changes`]): a tick re-decides only pods that changed
//!   or whose namespace did, never every pod (100,000 pods would be 100,000 regex checks every
//!   tick).
//! - Each namespace keeps only the keys its session budget admits ([`SessionBudget`]).

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use crate::{
    credentials::{CacheKey, CredentialCache},
    decision::{self, Access, Settings},
    events::Events,
    index::{Changes, Index, PodInfo},
    metrics::Metrics,
    sessions::SessionBudget,
};

/// A pod's namespace and the keys it uses.
type PodKeys = (Arc<str>, Box<[Arc<CacheKey>]>);

/// The keys each pod uses, and how many pods use each key in each namespace. Pods without a
/// permitted role take no room; the others about 150 bytes (their UID, and pointers to a
/// namespace name and keys shared by all the pods using them).
#[derive(Debug, Default)]
pub struct InUse {
    by_pod: HashMap<Box<str>, PodKeys>,
    by_namespace: HashMap<Arc<str>, HashMap<Arc<CacheKey>, usize>>,
}

impl InUse {
    /// Applies what changed; returns how many pods were decided.
    pub fn update(&mut self, index: &Index, settings: &Settings, changes: Changes) -> usize {
        if changes.everything {
            *self = Self::default();
            let pods = index.pods();
            for pod in &pods {
                self.set(&pod.uid, Some(pod), index, settings);
            }
            return pods.len();
        }
        let mut decided = 0;
        for uid in &changes.pods {
            let pod = index.pod(uid);
            decided += usize::from(pod.is_some());
            self.set(uid, pod.as_deref(), index, settings);
        }
        if !changes.namespaces.is_empty() {
            for pod in index.pods() {
                if changes.namespaces.contains(&pod.namespace) && !changes.pods.contains(&pod.uid) {
                    decided += 1;
                    self.set(&pod.uid, Some(&pod), index, settings);
                }
            }
        }
        decided
    }

    /// Records the keys of the pod with this UID (`None`: it is gone).
    fn set(&mut self, uid: &str, pod: Option<&PodInfo>, index: &Index, settings: &Settings) {
        if let Some((namespace, keys)) = self.by_pod.remove(uid) {
            let counts = self.by_namespace.entry(namespace.clone()).or_default();
            for key in keys.iter() {
                if let Some(n) = counts.get_mut(key) {
                    *n -= 1;
                    if *n == 0 {
                        counts.remove(key);
                    }
                }
            }
            if counts.is_empty() {
                self.by_namespace.remove(&namespace);
            }
        }
        let Some(pod) = pod else {
            return;
        };
        let keys = permitted_keys(index, settings, pod);
        if keys.is_empty() {
            return;
        }
        let namespace: Arc<str> = match self.by_namespace.get_key_value(pod.namespace.as_str()) {
            Some((shared, _)) => shared.clone(),
            None => pod.namespace.as_str().into(),
        };
        let counts = self.by_namespace.entry(namespace.clone()).or_default();
        let keys: Box<[Arc<CacheKey>]> = keys
            .into_iter()
            .map(|key| {
                let shared = match counts.get_key_value(&key) {
                    Some((shared, _)) => shared.clone(),
                    None => Arc::new(key),
                };
                *counts.entry(shared.clone()).or_default() += 1;
                shared
            })
            .collect();
        self.by_pod.insert(uid.into(), (namespace, keys));
    }

    /// The keys in use, by namespace, for the session budget.
    pub fn by_namespace(&self) -> HashMap<String, HashSet<CacheKey>> {
        self.by_namespace
            .iter()
            .map(|(namespace, counts)| {
                (
                    namespace.to_string(),
                    counts.keys().map(|key| (**key).clone()).collect(),
                )
            })
            .collect()
    }
}

/// The distinct keys a pod's decisions permit (its role's, its containers').
fn permitted_keys(index: &Index, settings: &Settings, pod: &PodInfo) -> Vec<CacheKey> {
    let mut keys: Vec<CacheKey> = decision::decide_every_indexed(index, settings, pod)
        .into_iter()
        .filter_map(|decided| match decided {
            Ok(Access::Role { key, .. }) => Some(key),
            _ => None,
        })
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// What prefetch and upkeep need.
pub struct Upkeep {
    pub index: Arc<Index>,
    pub settings: Settings,
    pub cache: CredentialCache,
    pub metrics: Arc<Metrics>,
    pub sessions: Arc<SessionBudget>,
    pub events: Arc<Events>,
    /// `--refresh-interval`.
    pub every: Duration,
    /// `--prefetch-queue` and `--prefetch-workers`.
    pub queue: usize,
    pub workers: usize,
}

impl Upkeep {
    /// Hooks prefetch into the index and starts the prefetch workers and the upkeep task.
    pub fn start(self) {
        let Self {
            index,
            settings,
            cache,
            metrics,
            sessions,
            events,
            every,
            queue,
            workers,
        } = self;
        let (prefetch_tx, prefetch_rx) = tokio::sync::mpsc::channel::<CacheKey>(queue.max(1));
        {
            let (index_ref, settings, events, metrics, sessions) = (
                Arc::downgrade(&index),
                settings.clone(),
                events.clone(),
                metrics.clone(),
                sessions.clone(),
            );
            index.set_pod_hook(Box::new(move |pod| {
                let Some(index) = index_ref.upgrade() else {
                    return;
                };
                for decided in decision::decide_every_indexed(&index, &settings, pod) {
                    let admitted = decided.and_then(|access| {
                        match &access {
                            Access::Role { key, .. } => sessions.admit(&pod.namespace, key),
                            Access::PassThrough => Ok(()),
                        }
                        .map(|()| access)
                    });
                    match admitted {
                        Ok(Access::Role { key, .. }) => {
                            match prefetch_tx.try_send(key) {
                                Ok(()) => metrics.prefetch_queued.inc(),
                                Err(_) => metrics.prefetch_dropped.inc(),
                            };
                        }
                        Ok(Access::PassThrough) => {}
                        Err(refusal) => events.refusal(pod, &refusal),
                    }
                }
            }));
        }
        let prefetch_rx = Arc::new(tokio::sync::Mutex::new(prefetch_rx));
        for _ in 0..workers {
            let (rx, cache) = (prefetch_rx.clone(), cache.clone());
            tokio::spawn(async move {
                loop {
                    let Some(key) = rx.lock().await.recv().await else {
                        return;
                    };
                    if let Some(flight) = cache.prefetch(&key) {
                        let _ = flight.await;
                    }
                }
            });
        }
        tokio::spawn(async move {
            let mut in_use = InUse::default();
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                if !index.synced() {
                    continue;
                }
                metrics.pods_indexed.set(index.pod_count() as i64);
                in_use.update(&index, &settings, index.take_changes());
                let keys = sessions.keys_in_use(&in_use.by_namespace());
                for flight in cache.maintain(&keys) {
                    tokio::spawn(async move {
                        let _ = flight.await;
                    });
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use kube::api::DynamicObject;

    use super::*;
    use crate::policy::{ANNOTATION_PERMITTED, ANNOTATION_ROLE, BaseArn};

    fn settings() -> Settings {
        Settings {
            base: BaseArn::parse("123456789012").expect("base"),
            role_annotation: ANNOTATION_ROLE.into(),
            default_session_name: "kiam".into(),
            session_tags: false,
            passthrough: Vec::new(),
            default_role: None,
        }
    }

    fn pod(uid: &str, namespace: &str, role: Option<&str>) -> DynamicObject {
        let annotations = match role {
            Some(role) => serde_json::json!({ ANNOTATION_ROLE: role }),
            None => serde_json::json!({}),
        };
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": uid, "namespace": namespace, "uid": uid,
                         "annotations": annotations},
            "spec": {"nodeName": "node-1"},
        }))
        .expect("pod")
    }

    fn namespace(name: &str, permitted: &str) -> DynamicObject {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "annotations": {ANNOTATION_PERMITTED: permitted}},
        }))
        .expect("namespace")
    }

    fn index() -> Index {
        Index::new(vec![ANNOTATION_ROLE.into()])
    }

    /// The roles in use in `namespace`, by name.
    fn roles(in_use: &InUse, namespace: &str) -> Vec<String> {
        let mut roles: Vec<String> = in_use
            .by_namespace()
            .remove(namespace)
            .unwrap_or_default()
            .into_iter()
            .map(|key| key.role_arn.rsplit('/').next().unwrap_or("").to_owned())
            .collect();
        roles.sort();
        roles
    }

    #[test]
    fn a_tick_decides_only_what_changed() {
        let (index, settings) = (index(), settings());
        index.replace_namespaces(vec![
            Index::namespace_info(&namespace("team", "app-.*")).expect("ns"),
        ]);
        let pods = (0..100)
            .map(|i| {
                let role = (i % 2 == 0).then_some("app-a");
                index
                    .pod_info(&pod(&format!("p{i}"), "team", role))
                    .expect("pod")
            })
            .collect();
        index.replace_pods(pods);
        let mut in_use = InUse::default();
        assert_eq!(in_use.update(&index, &settings, index.take_changes()), 100);
        assert_eq!(roles(&in_use, "team"), ["app-a"]);
        // Only the pods refused take no room.
        assert_eq!(in_use.by_pod.len(), 50);

        // Nothing changed: nothing is decided again.
        assert_eq!(in_use.update(&index, &settings, index.take_changes()), 0);

        // One pod arrives with another role: one pod decided.
        index.apply_pod(&pod("new", "team", Some("app-b")));
        assert_eq!(in_use.update(&index, &settings, index.take_changes()), 1);
        assert_eq!(roles(&in_use, "team"), ["app-a", "app-b"]);

        // Its key stays while another pod uses it; goes with the last one.
        index.apply_pod(&pod("new2", "team", Some("app-b")));
        index.delete_pod(&pod("new", "team", Some("app-b")));
        in_use.update(&index, &settings, index.take_changes());
        assert_eq!(roles(&in_use, "team"), ["app-a", "app-b"]);
        index.delete_pod(&pod("new2", "team", Some("app-b")));
        assert_eq!(in_use.update(&index, &settings, index.take_changes()), 0);
        assert_eq!(roles(&in_use, "team"), ["app-a"]);

        // The namespace's rule changes: its pods are decided again, and now refused.
        index.apply_namespace(&namespace("team", "other-.*"));
        assert_eq!(in_use.update(&index, &settings, index.take_changes()), 100);
        assert!(roles(&in_use, "team").is_empty());
        assert!(in_use.by_pod.is_empty() && in_use.by_namespace.is_empty());

        // And permitted again.
        index.apply_namespace(&namespace("team", "app-.*"));
        in_use.update(&index, &settings, index.take_changes());
        assert_eq!(roles(&in_use, "team"), ["app-a"]);
        assert_eq!(in_use.by_pod.len(), 50);
    }

    #[test]
    fn a_relist_starts_over_from_the_pods_listed() {
        let (index, settings) = (index(), settings());
        index.replace_namespaces(vec![
            Index::namespace_info(&namespace("team", "app-.*")).expect("ns"),
        ]);
        index.replace_pods(vec![
            index
                .pod_info(&pod("a", "team", Some("app-a")))
                .expect("pod"),
        ]);
        let mut in_use = InUse::default();
        in_use.update(&index, &settings, index.take_changes());
        assert_eq!(roles(&in_use, "team"), ["app-a"]);
        // The watch relisted: pod a was deleted meanwhile, b arrived.
        index.replace_pods(vec![
            index
                .pod_info(&pod("b", "team", Some("app-b")))
                .expect("pod"),
        ]);
        assert_eq!(in_use.update(&index, &settings, index.take_changes()), 1);
        assert_eq!(roles(&in_use, "team"), ["app-b"]);
    }
}
