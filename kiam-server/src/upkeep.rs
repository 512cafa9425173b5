//! Which credentials the servers hold, and keeping them fresh.
//!
//! - **Prefetch**: when a pod arrives or changes, its permitted keys (the pod's role and, with
//!   per-container roles, each container's) are queued and a few workers fetch them, so a
//!   pod's first request finds credentials waiting.
//! - **Upkeep**: every `--refresh-interval` the keys in use are refreshed ahead of expiry and
//!   the others dropped. How many pods use each key is kept in [`InUse`], updated from what
//!   the index says changed ([`Index::take_changes`]): a tick re-decides only pods that
//!   changed (their old and new states) or whose namespace did, never every pod (100,000 pods
//!   would be 100,000 regex checks every tick), and nothing is kept per pod.
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

/// How many pods of each namespace use each key. Nothing is kept per pod: a changed pod's old
/// part is taken away by deciding its old state again ([`Changes::pods`] carries it), and a
/// namespace whose rules changed is counted again from its pods.
#[derive(Debug, Default)]
pub struct InUse {
    by_namespace: HashMap<String, HashMap<CacheKey, usize>>,
}

impl InUse {
    /// Applies what changed; returns how many pod states were decided.
    pub fn update(&mut self, index: &Index, settings: &Settings, changes: Changes) -> usize {
        let mut decided = 0;
        if changes.everything {
            self.by_namespace.clear();
        }
        // Namespaces whose rules changed are counted again from their pods, as they are now:
        // what their pods' old states counted was decided under the old rules.
        for namespace in &changes.namespaces {
            self.by_namespace.remove(namespace);
        }
        for pod in &changes.current {
            decided += 1;
            self.add(index, settings, pod);
        }
        if changes.everything {
            return decided;
        }
        let counted = |pod: &&Arc<PodInfo>| !changes.namespaces.contains(&pod.namespace);
        for (before, now) in changes.pods.values() {
            if let Some(pod) = before.as_ref().filter(counted) {
                decided += 1;
                self.take_away(index, settings, pod);
            }
            if let Some(pod) = now.as_ref().filter(counted) {
                decided += 1;
                self.add(index, settings, pod);
            }
        }
        decided
    }

    /// Counts what `pod` uses.
    fn add(&mut self, index: &Index, settings: &Settings, pod: &PodInfo) {
        let keys = permitted_keys(index, settings, pod);
        if keys.is_empty() {
            return;
        }
        let counts = self.by_namespace.entry(pod.namespace.clone()).or_default();
        for key in keys {
            *counts.entry(key).or_default() += 1;
        }
    }

    /// Takes away what `pod` used, as [`Self::add`] counted it.
    fn take_away(&mut self, index: &Index, settings: &Settings, pod: &PodInfo) {
        let Some(counts) = self.by_namespace.get_mut(&pod.namespace) else {
            return;
        };
        for key in permitted_keys(index, settings, pod) {
            if let Some(n) = counts.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    counts.remove(&key);
                }
            }
        }
        if counts.is_empty() {
            self.by_namespace.remove(&pod.namespace);
        }
    }

    /// The keys in use, by namespace, for the session budget.
    pub fn by_namespace(&self) -> HashMap<String, HashSet<CacheKey>> {
        self.by_namespace
            .iter()
            .map(|(namespace, counts)| (namespace.clone(), counts.keys().cloned().collect()))
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
    /// `--prefetch-queue` and `--prefetch-workers` (both more than 0: `config::validate`).
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
        let (prefetch_tx, prefetch_rx) = tokio::sync::mpsc::channel::<CacheKey>(queue);
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
    use crate::{
        decision::tests::settings,
        policy::{ANNOTATION_PERMITTED, ANNOTATION_ROLE},
    };

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
        assert_eq!(in_use.by_namespace["team"].values().sum::<usize>(), 50);

        // Nothing changed: nothing is decided again.
        assert_eq!(in_use.update(&index, &settings, index.take_changes()), 0);

        // One pod arrives with another role: one pod state decided.
        index.apply_pod(&pod("new", "team", Some("app-b")));
        assert_eq!(in_use.update(&index, &settings, index.take_changes()), 1);
        // It changes role: its old state and its new one.
        index.apply_pod(&pod("new", "team", Some("app-c")));
        index.apply_pod(&pod("new", "team", Some("app-b")));
        assert_eq!(in_use.update(&index, &settings, index.take_changes()), 2);
        assert_eq!(roles(&in_use, "team"), ["app-a", "app-b"]);
        index.apply_pod(&pod("new", "team", Some("app-c")));
        in_use.update(&index, &settings, index.take_changes());
        assert_eq!(roles(&in_use, "team"), ["app-a", "app-c"]);
        index.apply_pod(&pod("new", "team", Some("app-b")));
        in_use.update(&index, &settings, index.take_changes());
        assert_eq!(roles(&in_use, "team"), ["app-a", "app-b"]);

        // Its key stays while another pod uses it; goes with the last one.
        index.apply_pod(&pod("new2", "team", Some("app-b")));
        index.delete_pod(&pod("new", "team", Some("app-b")));
        in_use.update(&index, &settings, index.take_changes());
        assert_eq!(roles(&in_use, "team"), ["app-a", "app-b"]);
        index.delete_pod(&pod("new2", "team", Some("app-b")));
        assert_eq!(in_use.update(&index, &settings, index.take_changes()), 1);
        assert_eq!(roles(&in_use, "team"), ["app-a"]);

        // The namespace's rule changes: its pods are decided again, and now refused.
        index.apply_namespace(&namespace("team", "other-.*"));
        assert_eq!(in_use.update(&index, &settings, index.take_changes()), 100);
        assert!(roles(&in_use, "team").is_empty());
        assert!(in_use.by_namespace.is_empty());

        // And permitted again.
        index.apply_namespace(&namespace("team", "app-.*"));
        in_use.update(&index, &settings, index.take_changes());
        assert_eq!(roles(&in_use, "team"), ["app-a"]);
        assert_eq!(in_use.by_namespace["team"].values().sum::<usize>(), 50);
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
