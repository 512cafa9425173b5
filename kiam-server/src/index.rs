//! The Kubernetes index: pods by UID and namespace rules by name, fed by kube-rs watchers.
//!
//! Objects are read as `DynamicObject`s and only the few fields kiam needs are kept, so an
//! object with an unexpected shape elsewhere never stops the watch, and 10 k pods stay small.
//! Each object is projected the moment it arrives, during the initial list too: the full
//! objects of a list are never all held at once (the server's peak memory would otherwise be
//! the whole cluster's pods, and glibc keeps a peak as the steady state).
//! Each watcher restart (`Init` … `InitDone`, e.g. after a 410) replaces the whole set at once,
//! so objects deleted while the watch was down disappear.
//!
//! Readiness follows the watches: the index is ready once both have listed, and not ready
//! again while either has been failing for longer than the grace period (it keeps serving
//! what it has: the Service stops sending new agents its way).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;

use futures::StreamExt as _;
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind},
    runtime::{WatchStreamExt as _, watcher},
};

use crate::{
    containers::{ANNOTATION_CONTAINER_ROLES, PodContainers},
    policy::{ANNOTATION_ALLOWED_ROLES, ANNOTATION_PERMITTED, NamespaceRules},
};

/// What kiam keeps of a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub node: Option<String>,
    pub phase: Option<String>,
    pub service_account: Option<String>,
    /// `spec.hostNetwork`.
    pub host_network: bool,
    /// A mirror pod (the API's copy of a static pod): the static pod's UID, the kubelet's
    /// config hash, from its `kubernetes.io/config.mirror` annotation. Agents know static pods
    /// by that hash (their cgroups carry it), never by the mirror pod's own UID.
    pub mirror: Option<String>,
    /// The annotations kiam reads (role, external id, session name), by key.
    pub annotations: BTreeMap<String, String>,
    /// Per-container roles and the container IDs they need: only for pods with the
    /// container-roles annotation (boxed: the other pods pay one pointer).
    pub containers: Option<Box<PodContainers>>,
}

impl PodInfo {
    /// Succeeded and Failed pods get nothing.
    pub fn completed(&self) -> bool {
        matches!(self.phase.as_deref(), Some("Succeeded" | "Failed"))
    }
}

/// The annotation the kubelet puts on mirror pods.
pub const ANNOTATION_MIRROR: &str = "kubernetes.io/config.mirror";

/// Called for every pod added or changed (prefetch hooks in here).
pub type PodHook = Box<dyn Fn(&PodInfo) + Send + Sync>;

pub struct Index {
    /// Annotation keys kept on pods.
    pod_annotations: Vec<String>,
    pods: RwLock<Pods>,
    namespaces: RwLock<HashMap<String, Arc<NamespaceRules>>>,
    pods_synced: AtomicBool,
    namespaces_synced: AtomicBool,
    /// Since when each watch (pods, namespaces) has been failing, if it is.
    failing: Mutex<[Option<Instant>; 2]>,
    grace: Duration,
    on_pod: RwLock<Option<PodHook>>,
    changes: Mutex<Changes>,
}

/// A pod's state before and after (`None`: not there).
pub type Transition = (Option<Arc<PodInfo>>, Option<Arc<PodInfo>>);

/// What changed since the last [`Index::take_changes`], so the upkeep re-decides only those
/// pods: pods applied or deleted, namespaces whose rules came, changed or went, and whether a
/// relist replaced everything. The states it carries are consistent with one another: taken
/// under the same lock the pods are changed under, so no change is seen twice or missed.
#[derive(Debug, Default)]
pub struct Changes {
    /// Pods applied or deleted, by UID: what each was at the last take (`None`: it was not
    /// there), so its old part can be taken away without being remembered per pod, and what
    /// it is now.
    pub pods: HashMap<String, Transition>,
    pub namespaces: HashSet<String>,
    pub everything: bool,
    /// Every pod when `everything`; else the pods of `namespaces`.
    pub current: Vec<Arc<PodInfo>>,
}

impl Changes {
    fn pod(&mut self, uid: &str, before: Option<Arc<PodInfo>>) {
        if !self.everything {
            self.pods.entry(uid.to_owned()).or_insert((before, None));
        }
    }

    fn namespace(&mut self, name: &str) {
        if !self.everything {
            self.namespaces.insert(name.to_owned());
        }
    }

    fn everything(&mut self) {
        *self = Self {
            everything: true,
            ..Self::default()
        };
    }
}

/// Pods by UID, and mirror pods by the UID of their static pod.
#[derive(Default)]
struct Pods {
    by_uid: HashMap<String, Arc<PodInfo>>,
    /// Config hash → UIDs of the mirror pods claiming it (one, normally).
    by_static_hash: HashMap<String, Vec<String>>,
}

impl Pods {
    /// Adds or replaces a pod; returns what it replaced.
    fn insert(&mut self, pod: Arc<PodInfo>) -> Option<Arc<PodInfo>> {
        let previous = self.by_uid.insert(pod.uid.clone(), pod.clone());
        if let Some(old) = &previous {
            self.unlink_static(old);
        }
        if let Some(hash) = &pod.mirror {
            self.by_static_hash
                .entry(hash.clone())
                .or_default()
                .push(pod.uid.clone());
        }
        previous
    }

    /// Removes a pod; returns it.
    fn remove(&mut self, uid: &str) -> Option<Arc<PodInfo>> {
        let old = self.by_uid.remove(uid)?;
        self.unlink_static(&old);
        Some(old)
    }

    fn unlink_static(&mut self, pod: &PodInfo) {
        let Some(hash) = &pod.mirror else {
            return;
        };
        if let Some(uids) = self.by_static_hash.get_mut(hash) {
            uids.retain(|u| *u != pod.uid);
            if uids.is_empty() {
                self.by_static_hash.remove(hash);
            }
        }
    }
}

fn annotation(obj: &DynamicObject, key: &str) -> Option<String> {
    obj.metadata.annotations.as_ref()?.get(key).cloned()
}

fn str_at(value: &serde_json::Value, path: &[&str]) -> Option<String> {
    let mut v = value;
    for key in path {
        v = v.get(key)?;
    }
    v.as_str().map(str::to_owned)
}

impl Index {
    pub fn new(pod_annotations: Vec<String>) -> Self {
        Self::with_grace(Duration::from_secs(30), pod_annotations)
    }

    /// An index that stops being ready once a watch has been failing for `grace`.
    pub fn with_grace(grace: Duration, pod_annotations: Vec<String>) -> Self {
        Self {
            pod_annotations,
            pods: RwLock::new(Pods::default()),
            namespaces: RwLock::new(HashMap::new()),
            pods_synced: AtomicBool::new(false),
            namespaces_synced: AtomicBool::new(false),
            failing: Mutex::new([None, None]),
            grace,
            on_pod: RwLock::new(None),
            changes: Mutex::new(Changes::default()),
        }
    }

    fn changed(&self) -> std::sync::MutexGuard<'_, Changes> {
        self.changes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What changed since the last call (the first call after a list: everything), with the
    /// pods' states as of now. Pods change with the pods lock held for writing and record the
    /// change before letting it go; this reads under the same lock.
    pub fn take_changes(&self) -> Changes {
        let pods = self.pods.read().unwrap_or_else(|e| e.into_inner());
        let mut changes = std::mem::take(&mut *self.changed());
        for (uid, (_, now)) in changes.pods.iter_mut() {
            *now = pods.by_uid.get(uid).cloned();
        }
        if changes.everything || !changes.namespaces.is_empty() {
            changes.current = pods
                .by_uid
                .values()
                .filter(|p| changes.everything || changes.namespaces.contains(&p.namespace))
                .cloned()
                .collect();
        }
        changes
    }

    /// Records how a watch is doing: `ok` clears its failure, a failure starts one.
    fn watch_health(&self, resource: Resource, ok: bool) {
        let mut failing = self.failing.lock().unwrap_or_else(|e| e.into_inner());
        let slot = &mut failing[resource as usize];
        match ok {
            true => *slot = None,
            false => {
                slot.get_or_insert_with(Instant::now);
            }
        }
    }

    /// Whether a watch has been failing for longer than the grace period.
    pub fn watches_failing(&self) -> bool {
        let failing = self.failing.lock().unwrap_or_else(|e| e.into_inner());
        failing
            .iter()
            .flatten()
            .any(|since| since.elapsed() >= self.grace)
    }

    pub fn set_pod_hook(&self, hook: PodHook) {
        *self.on_pod.write().unwrap_or_else(|e| e.into_inner()) = Some(hook);
    }

    /// Both watchers have completed their first list.
    pub fn synced(&self) -> bool {
        self.pods_synced.load(Ordering::Acquire) && self.namespaces_synced.load(Ordering::Acquire)
    }

    /// Synced, and no watch failing beyond the grace period.
    pub fn ready(&self) -> bool {
        self.synced() && !self.watches_failing()
    }

    pub fn pod(&self, uid: &str) -> Option<Arc<PodInfo>> {
        self.pods
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .by_uid
            .get(uid)
            .cloned()
    }

    /// The mirror pods of the static pod whose UID (config hash) is `hash`: one, unless
    /// someone else made a pod claiming the same hash.
    pub fn static_pods(&self, hash: &str) -> Vec<Arc<PodInfo>> {
        let pods = self.pods.read().unwrap_or_else(|e| e.into_inner());
        pods.by_static_hash
            .get(hash)
            .into_iter()
            .flatten()
            .filter_map(|uid| pods.by_uid.get(uid).cloned())
            .collect()
    }

    pub fn namespace(&self, name: &str) -> Option<Arc<NamespaceRules>> {
        self.namespaces
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    pub fn pod_count(&self) -> usize {
        self.pods
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .by_uid
            .len()
    }

    pub fn pod_info(&self, obj: &DynamicObject) -> Option<PodInfo> {
        let uid = obj.metadata.uid.clone()?;
        let annotations = self
            .pod_annotations
            .iter()
            .filter_map(|k| annotation(obj, k).map(|v| (k.clone(), v)))
            .collect();
        Some(PodInfo {
            uid,
            name: obj.metadata.name.clone().unwrap_or_default(),
            namespace: obj.metadata.namespace.clone().unwrap_or_default(),
            node: str_at(&obj.data, &["spec", "nodeName"]),
            phase: str_at(&obj.data, &["status", "phase"]),
            service_account: str_at(&obj.data, &["spec", "serviceAccountName"]),
            host_network: obj.data["spec"]["hostNetwork"].as_bool().unwrap_or(false),
            mirror: annotation(obj, ANNOTATION_MIRROR),
            annotations,
            containers: annotation(obj, ANNOTATION_CONTAINER_ROLES).map(|raw| {
                Box::new(PodContainers::new(
                    &raw,
                    &obj.data["spec"],
                    &obj.data["status"],
                ))
            }),
        })
    }

    fn notify(&self, pod: &PodInfo) {
        if let Some(hook) = self
            .on_pod
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            hook(pod);
        }
    }

    pub fn apply_pod(&self, obj: &DynamicObject) {
        let Some(pod) = self.pod_info(obj) else {
            return;
        };
        let changed = {
            let mut pods = self.pods.write().unwrap_or_else(|e| e.into_inner());
            let previous = pods.insert(Arc::new(pod.clone()));
            let changed = previous.as_deref() != Some(&pod);
            if changed {
                self.changed().pod(&pod.uid, previous);
            }
            changed
        };
        if changed {
            self.notify(&pod);
        }
    }

    pub fn delete_pod(&self, obj: &DynamicObject) {
        if let Some(uid) = &obj.metadata.uid {
            let mut pods = self.pods.write().unwrap_or_else(|e| e.into_inner());
            if let Some(removed) = pods.remove(uid) {
                self.changed().pod(uid, Some(removed));
            }
        }
    }

    /// Replaces every pod with `pods` (projected as they arrived).
    pub fn replace_pods(&self, pods: Vec<PodInfo>) {
        let mut fresh = Pods::default();
        for pod in pods {
            fresh.insert(Arc::new(pod));
        }
        let added: Vec<Arc<PodInfo>> = {
            let mut pods = self.pods.write().unwrap_or_else(|e| e.into_inner());
            let added = fresh
                .by_uid
                .values()
                .filter(|p| pods.by_uid.get(&p.uid) != Some(*p))
                .cloned()
                .collect();
            *pods = fresh;
            self.changed().everything();
            added
        };
        self.pods_synced.store(true, Ordering::Release);
        for pod in added {
            self.notify(&pod);
        }
    }

    /// A namespace's name and parsed rules.
    pub fn namespace_info(obj: &DynamicObject) -> Option<(String, Arc<NamespaceRules>)> {
        let rules = NamespaceRules::parse(
            annotation(obj, ANNOTATION_PERMITTED).as_deref(),
            annotation(obj, ANNOTATION_ALLOWED_ROLES).as_deref(),
        );
        Some((obj.metadata.name.clone()?, Arc::new(rules)))
    }

    pub fn apply_namespace(&self, obj: &DynamicObject) {
        if let Some((name, rules)) = Self::namespace_info(obj) {
            self.namespaces
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(name.clone(), rules);
            // Its rules may have changed (they are not compared: namespaces change rarely).
            self.changed().namespace(&name);
        }
    }

    pub fn delete_namespace(&self, obj: &DynamicObject) {
        if let Some(name) = &obj.metadata.name {
            self.namespaces
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .remove(name);
            self.changed().namespace(name);
        }
    }

    /// Replaces every namespace with `namespaces` (projected as they arrived).
    pub fn replace_namespaces(&self, namespaces: Vec<(String, Arc<NamespaceRules>)>) {
        let fresh = namespaces.into_iter().collect();
        *self.namespaces.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        self.changed().everything();
        self.namespaces_synced.store(true, Ordering::Release);
    }
}

/// Objects per list page: the most full objects held at once while listing.
const LIST_PAGE_SIZE: u32 = 250;

#[derive(Clone, Copy)]
enum Resource {
    Pods = 0,
    Namespaces = 1,
}

/// Runs both watchers until the process ends; watch errors (410, API server restarts) are
/// retried with kube-rs's default backoff, relisting when the version is gone.
pub async fn run(client: Client, index: Arc<Index>) {
    let pods = ApiResource::from_gvk(&GroupVersionKind::gvk("", "v1", "Pod"));
    let namespaces = ApiResource::from_gvk(&GroupVersionKind::gvk("", "v1", "Namespace"));
    let pods = watch(
        Api::all_with(client.clone(), &pods),
        index.clone(),
        Resource::Pods,
    );
    let namespaces = watch(
        Api::all_with(client, &namespaces),
        index,
        Resource::Namespaces,
    );
    tokio::join!(pods, namespaces);
}

/// What an initial list has delivered so far, already projected.
enum Listed {
    Pods(Vec<PodInfo>),
    Namespaces(Vec<(String, Arc<NamespaceRules>)>),
}

impl Listed {
    fn new(resource: Resource) -> Self {
        match resource {
            Resource::Pods => Self::Pods(Vec::new()),
            Resource::Namespaces => Self::Namespaces(Vec::new()),
        }
    }

    fn len(&self) -> usize {
        match self {
            Self::Pods(p) => p.len(),
            Self::Namespaces(n) => n.len(),
        }
    }

    /// Projects `obj` and keeps only the projection.
    fn push(&mut self, index: &Index, obj: &DynamicObject) {
        match self {
            Self::Pods(pods) => pods.extend(index.pod_info(obj)),
            Self::Namespaces(namespaces) => namespaces.extend(Index::namespace_info(obj)),
        }
    }

    fn install(self, index: &Index) {
        match self {
            Self::Pods(pods) => index.replace_pods(pods),
            Self::Namespaces(namespaces) => index.replace_namespaces(namespaces),
        }
    }
}

async fn watch(api: Api<DynamicObject>, index: Arc<Index>, resource: Resource) {
    let name = match resource {
        Resource::Pods => "pods",
        Resource::Namespaces => "namespaces",
    };
    let stream =
        watcher(api, watcher::Config::default().page_size(LIST_PAGE_SIZE)).default_backoff();
    futures::pin_mut!(stream);
    let mut listed = Listed::new(resource);
    while let Some(event) = stream.next().await {
        index.watch_health(resource, event.is_ok());
        match event {
            Ok(watcher::Event::Init) => listed = Listed::new(resource),
            Ok(watcher::Event::InitApply(obj)) => listed.push(&index, &obj),
            Ok(watcher::Event::InitDone) => {
                let objects = listed.len();
                std::mem::replace(&mut listed, Listed::new(resource)).install(&index);
                tracing::info!(resource = name, objects, "index synced");
            }
            Ok(watcher::Event::Apply(obj)) => match resource {
                Resource::Pods => index.apply_pod(&obj),
                Resource::Namespaces => index.apply_namespace(&obj),
            },
            Ok(watcher::Event::Delete(obj)) => match resource {
                Resource::Pods => index.delete_pod(&obj),
                Resource::Namespaces => index.delete_namespace(&obj),
            },
            Err(error) => tracing::warn!(resource = name, %error, "watch failed; retrying"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod_object(uid: &str, name: &str, node: &str, role: Option<&str>) -> DynamicObject {
        let mut annotations = serde_json::Map::new();
        if let Some(role) = role {
            annotations.insert("iam.amazonaws.com/role".into(), role.into());
        }
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "ns", "uid": uid, "annotations": annotations},
            "spec": {"nodeName": node, "containers": "not what a Pod spec looks like"},
            "status": {"phase": "Running"}
        }))
        .expect("object")
    }

    fn index() -> Index {
        Index::new(vec!["iam.amazonaws.com/role".into()])
    }

    #[test]
    fn pods_are_indexed_by_uid_and_relists_replace_everything() {
        let index = index();
        let seen = Arc::new(RwLock::new(Vec::new()));
        let sink = seen.clone();
        index.set_pod_hook(Box::new(move |p| {
            sink.write().expect("lock").push(p.uid.clone())
        }));
        assert!(!index.ready());
        let project = |o: DynamicObject| index.pod_info(&o).expect("a pod");
        index.replace_pods(vec![project(pod_object("u1", "a", "n1", Some("app")))]);
        index.replace_namespaces(Vec::new());
        assert!(index.ready());
        let a = index.pod("u1").expect("indexed");
        assert_eq!(a.node.as_deref(), Some("n1"));
        assert_eq!(
            a.annotations
                .get("iam.amazonaws.com/role")
                .map(String::as_str),
            Some("app")
        );

        index.apply_pod(&pod_object("u2", "b", "n1", None));
        // Unchanged objects (a resync) do not fire the hook again.
        index.apply_pod(&pod_object("u2", "b", "n1", None));
        index.delete_pod(&pod_object("u1", "a", "n1", None));
        assert!(index.pod("u1").is_none());
        assert_eq!(index.pod_count(), 1);
        // A relist after the watch expired: u2 went away meanwhile, u3 appeared.
        index.replace_pods(vec![project(pod_object("u3", "c", "n2", Some("x")))]);
        assert!(index.pod("u2").is_none());
        assert!(index.pod("u3").is_some());
        assert_eq!(*seen.read().expect("lock"), vec!["u1", "u2", "u3"]);
    }

    #[test]
    fn host_network_and_mirror_pods_are_recognised() {
        let index = index();
        let obj: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "kube-proxy-x", "namespace": "kube-system", "uid": "m1",
                         "annotations": {"kubernetes.io/config.mirror": "abc"}},
            "spec": {"nodeName": "n1", "hostNetwork": true, "serviceAccountName": "kube-proxy"},
        }))
        .expect("object");
        let pod = index.pod_info(&obj).expect("pod");
        assert!(pod.host_network);
        assert_eq!(pod.mirror.as_deref(), Some("abc"));
        assert_eq!(pod.service_account.as_deref(), Some("kube-proxy"));
        let plain = index
            .pod_info(&pod_object("u1", "a", "n1", None))
            .expect("pod");
        assert!(!plain.host_network && plain.mirror.is_none());
    }

    #[test]
    fn static_pods_are_found_by_their_config_hash_through_their_mirror_pods() {
        let index = index();
        let mirror = |uid: &str, hash: &str| -> DynamicObject {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": format!("etcd-{uid}"), "namespace": "kube-system", "uid": uid,
                             "annotations": {"kubernetes.io/config.mirror": hash,
                                             "kubernetes.io/config.hash": hash}},
                "spec": {"nodeName": "n1", "hostNetwork": true},
            }))
            .expect("object")
        };
        let project = |o: DynamicObject| index.pod_info(&o).expect("a pod");
        index.replace_pods(vec![project(mirror("m1", "h1"))]);
        let found = index.static_pods("h1");
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].uid, "m1");
        assert!(index.static_pods("m1").is_empty(), "by hash, not by UID");
        // A second pod claiming the same hash is found too (the decision refuses both).
        index.apply_pod(&mirror("m2", "h1"));
        assert_eq!(index.static_pods("h1").len(), 2);
        // Deleting or changing a mirror pod unlinks it.
        index.delete_pod(&mirror("m2", "h1"));
        assert_eq!(index.static_pods("h1").len(), 1);
        index.apply_pod(&mirror("m1", "h2"));
        assert!(index.static_pods("h1").is_empty());
        assert_eq!(index.static_pods("h2").len(), 1);
        // A relist replaces the hash index with the pods.
        index.replace_pods(Vec::new());
        assert!(index.static_pods("h2").is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn readiness_drops_after_the_grace_period_of_failing_watches() {
        let index = Index::with_grace(Duration::from_secs(30), Vec::new());
        index.replace_pods(Vec::new());
        index.replace_namespaces(Vec::new());
        assert!(index.ready());
        index.watch_health(Resource::Pods, false);
        tokio::time::advance(Duration::from_millis(29_999)).await;
        index.watch_health(Resource::Pods, false);
        assert!(
            index.ready(),
            "a failure goes on: still within the grace period"
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        index.watch_health(Resource::Pods, false);
        assert!(!index.ready(), "failing for longer than the grace period");
        index.watch_health(Resource::Pods, true);
        assert!(index.ready(), "the watch recovered");
        index.watch_health(Resource::Namespaces, false);
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(!index.ready());
    }

    #[test]
    fn namespace_rules_are_parsed_on_arrival() {
        let index = index();
        let ns: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "ns", "annotations": {"iam.amazonaws.com/permitted": "app"}}
        }))
        .expect("object");
        index.apply_namespace(&ns);
        assert!(index.namespace("ns").is_some());
        index.delete_namespace(&ns);
        assert!(index.namespace("ns").is_none());
    }
}
