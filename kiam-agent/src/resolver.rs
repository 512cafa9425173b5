//! Caller resolution: accepted socket → the record the kernel bound to it → cgroup id →
//! cgroup path → pod UID and container. Never the peer IP.
//!
//! The hot path is one map lookup and delete (by socket cookie) plus a cache hit keyed by
//! cgroup id. A miss asks the cgroup file system ([`CgroupLookup`], in `cgroup`):
//! - `open_by_handle_at` on the cgroup2 mount turns the id (a kernfs node id) into the
//!   cgroup's directory in one system call, whatever the number of cgroups (it needs
//!   `CAP_DAC_READ_SEARCH`; no `hostPID`, no `/proc/<pid>` of the caller);
//! - without it, a walk of the pods cgroup, one at a time.
//!
//! An id is only remembered as gone when the kernel says so (`ESTALE`) or a complete walk did
//! not find it, and only for [`GONE_TTL`]: a walk that could not read everything (`EMFILE`, a
//! directory removed under it) refuses that one connection and marks nothing. Cgroup ids are
//! inode numbers the kernel does not reuse while it runs, so a cached entry can go stale only
//! by its cgroup disappearing; those are pruned periodically, and the bounded cache makes room
//! by dropping gone entries, never by emptying itself under a lookup.

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use aya::maps::{HashMap as BpfHashMap, MapData, MapError};
use kiam_common::{ConnRecord, RECORD_POISONED};
use tokio::time::Instant;

use crate::{
    cgroup::{self, CgroupLookup, Found, inode},
    identity::{self, ParseError, PodCgroup},
};

/// Cgroups remembered at once (a node has far fewer).
const MAX_CACHED: usize = 65_536;
/// How long an id known to be gone is refused without asking again.
pub const GONE_TTL: Duration = Duration::from_secs(30);

/// Where per-connection records come from: the kernel's `KIAM_ACCEPTED` map in production.
pub trait RecordSource: Send + Sync + 'static {
    /// Removes and returns the record bound to the agent socket with this cookie.
    fn take(&self, cookie: u64) -> Result<Option<ConnRecord>, MapError>;
}

/// `KIAM_ACCEPTED`, shared by all connection tasks.
pub struct AcceptedMap(Mutex<BpfHashMap<MapData, u64, ConnRecord>>);

impl AcceptedMap {
    pub fn new(map: BpfHashMap<MapData, u64, ConnRecord>) -> Self {
        Self(Mutex::new(map))
    }
}

impl RecordSource for AcceptedMap {
    fn take(&self, cookie: u64) -> Result<Option<ConnRecord>, MapError> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(&cookie, 0) {
            Ok(record) => {
                // Removal failing only leaves the entry to the LRU; the answer stands.
                let _ = map.remove(&cookie);
                Ok(Some(record))
            }
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

#[derive(Debug)]
pub struct CachedCgroup {
    path: String,
    pod: Result<PodCgroup, ParseError>,
    /// The pod's [`PodCgroup::subject`], made once per cgroup.
    subject: String,
}

impl CachedCgroup {
    fn new(path: String, pod: Result<PodCgroup, ParseError>) -> Self {
        let subject = pod.as_ref().map(PodCgroup::subject).unwrap_or_default();
        Self { path, pod, subject }
    }
}

/// The identity of a connection's caller.
#[derive(Debug, Clone)]
pub struct Caller {
    pub cgroup_id: u64,
    /// Process that called `connect()`, in the root pid namespace.
    pub pid: u32,
    cgroup: Arc<CachedCgroup>,
}

impl Caller {
    pub fn pod(&self) -> &PodCgroup {
        match &self.cgroup.pod {
            Ok(pod) => pod,
            // Callers are only made from pods (`resolve` refuses the rest).
            Err(_) => unreachable!("a Caller always holds a pod"),
        }
    }

    pub fn cgroup_path(&self) -> &str {
        &self.cgroup.path
    }

    /// What the caller's answers, credentials and tokens are kept under: its pod and
    /// container ([`PodCgroup::subject`]).
    pub fn subject(&self) -> &str {
        &self.cgroup.subject
    }

    /// A caller not resolved from a connection (tests and fuzzing of the API).
    pub fn for_pod(pod: PodCgroup) -> Self {
        Self {
            cgroup_id: 1,
            pid: 1,
            cgroup: Arc::new(CachedCgroup::new("/kubepods".into(), Ok(pod))),
        }
    }
}

/// What `/kiam/v1/identity` shows the caller: the pod (and container) kiam resolved for it,
/// and nothing about the node (no host pid, no host cgroup path).
impl serde::Serialize for Caller {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.pod().serialize(serializer)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("connection did not come through the metadata-address redirect")]
    NoRecord,
    #[error("another socket claimed this connection's address and port; refusing both")]
    Collision,
    #[error("reading the connection record")]
    Map(#[source] MapError),
    #[error("cgroup {0} of the caller no longer exists")]
    CgroupGone(u64),
    #[error("the caller's cgroup {id} could not be found now ({why}); retry")]
    Unresolved { id: u64, why: String },
    #[error("caller's cgroup {path} is not a pod's")]
    NotAPod {
        path: String,
        #[source]
        source: ParseError,
    },
}

/// How far [`Resolver::begin`] got without waiting.
#[derive(Debug)]
pub enum Begun {
    /// The caller, or why there is none.
    Known(Result<Caller, ResolveError>),
    /// The record of a cgroup not cached yet: [`Resolver::finish`] looks it up.
    Lookup(ConnRecord),
}

fn caller(record: &ConnRecord, cached: Arc<CachedCgroup>) -> Result<Caller, ResolveError> {
    match &cached.pod {
        Ok(_) => Ok(Caller {
            cgroup_id: record.cgroup_id,
            pid: record.tgid,
            cgroup: cached,
        }),
        Err(e) => Err(ResolveError::NotAPod {
            path: cached.path.clone(),
            source: e.clone(),
        }),
    }
}

pub struct Resolver<S> {
    records: S,
    lookup: Arc<dyn CgroupLookup>,
    /// cgroup v2 mount point.
    root: PathBuf,
    cache: RwLock<HashMap<u64, Arc<CachedCgroup>>>,
    max_cached: usize,
    /// Ids known to be gone, until when.
    gone: Mutex<HashMap<u64, Instant>>,
}

impl<S: RecordSource> Resolver<S> {
    pub fn new(records: S, lookup: Arc<dyn CgroupLookup>, root: PathBuf) -> Self {
        Self {
            records,
            lookup,
            root,
            cache: RwLock::new(HashMap::new()),
            max_cached: MAX_CACHED,
            gone: Mutex::new(HashMap::new()),
        }
    }

    /// Who made the connection whose agent-side socket has this cookie ([`Self::begin`], then
    /// [`Self::finish`] when that is needed).
    pub async fn resolve(&self, cookie: u64) -> Result<Caller, ResolveError> {
        match self.begin(cookie) {
            Begun::Known(result) => result,
            Begun::Lookup(record) => self.finish(record).await,
        }
    }

    /// The part of [`Self::resolve`] that never waits (no await, no contended lock): the
    /// record, and the caller when its cgroup is cached (or known to be gone). The accept loop
    /// uses it to hold a known pod to its share of connections before the connection takes an
    /// overall slot.
    pub fn begin(&self, cookie: u64) -> Begun {
        let record = match self.records.take(cookie) {
            Ok(Some(record)) => record,
            Ok(None) => return Begun::Known(Err(ResolveError::NoRecord)),
            Err(e) => return Begun::Known(Err(ResolveError::Map(e))),
        };
        if record.flags & RECORD_POISONED != 0 {
            return Begun::Known(Err(ResolveError::Collision));
        }
        // Never waits on a lock: while the cache is being pruned or made room in, the
        // connection's task finishes the resolution instead.
        let cached = match self.cache.try_read() {
            Ok(cache) => cache.get(&record.cgroup_id).cloned(),
            Err(std::sync::TryLockError::Poisoned(e)) => {
                e.into_inner().get(&record.cgroup_id).cloned()
            }
            Err(std::sync::TryLockError::WouldBlock) => return Begun::Lookup(record),
        };
        if let Some(hit) = cached {
            return Begun::Known(caller(&record, hit));
        }
        // A pod creating and deleting cgroups must not make the agent look up per
        // connection: a gone id is refused at once for a while.
        let gone = match self.gone.try_lock() {
            Ok(gone) => gone.get(&record.cgroup_id).copied(),
            Err(std::sync::TryLockError::Poisoned(e)) => {
                e.into_inner().get(&record.cgroup_id).copied()
            }
            Err(std::sync::TryLockError::WouldBlock) => return Begun::Lookup(record),
        };
        if gone.is_some_and(|until| Instant::now() < until) {
            return Begun::Known(Err(ResolveError::CgroupGone(record.cgroup_id)));
        }
        Begun::Lookup(record)
    }

    /// The rest of [`Self::resolve`] for a record whose cgroup is not cached: asks the cgroup
    /// file system.
    pub async fn finish(&self, record: ConnRecord) -> Result<Caller, ResolveError> {
        let cached = self.cgroup(record.cgroup_id).await?;
        caller(&record, cached)
    }

    fn cached(&self, id: u64) -> Option<Arc<CachedCgroup>> {
        let cache = self.cache.read().unwrap_or_else(|e| e.into_inner());
        cache.get(&id).cloned()
    }

    /// Remembers `id`'s cgroup; a full cache first drops what is gone, then one entry.
    fn remember(&self, id: u64, entry: Arc<CachedCgroup>) {
        let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= self.max_cached {
            let root = &self.root;
            cache.retain(|id, e| inode(&root.join(e.path.trim_start_matches('/'))) == Some(*id));
            if cache.len() >= self.max_cached
                && let Some(victim) = cache.keys().next().copied()
            {
                cache.remove(&victim);
            }
        }
        cache.insert(id, entry);
    }

    fn is_gone(&self, id: u64) -> bool {
        let gone = self.gone.lock().unwrap_or_else(|e| e.into_inner());
        gone.get(&id).is_some_and(|until| Instant::now() < *until)
    }

    fn mark_gone(&self, id: u64) {
        let mut gone = self.gone.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if gone.len() >= self.max_cached {
            gone.retain(|_, until| *until > now);
        }
        if gone.len() < self.max_cached {
            gone.insert(id, now + GONE_TTL);
        }
    }

    async fn cgroup(&self, id: u64) -> Result<Arc<CachedCgroup>, ResolveError> {
        if let Some(hit) = self.cached(id) {
            return Ok(hit);
        }
        if self.is_gone(id) {
            return Err(ResolveError::CgroupGone(id));
        }
        let lookup = self.lookup.clone();
        let found = tokio::task::spawn_blocking(move || lookup.find(id))
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
        match found {
            Ok(Found::Path(path)) => {
                let rel = cgroup::relative_path(&self.root, &path).ok_or_else(|| {
                    ResolveError::Unresolved {
                        id,
                        why: format!("{} is outside the cgroup root", path.display()),
                    }
                })?;
                let pod = identity::parse_cgroup_path(&rel);
                let entry = Arc::new(CachedCgroup::new(rel, pod));
                self.remember(id, entry.clone());
                Ok(entry)
            }
            Ok(Found::Gone) => {
                self.mark_gone(id);
                Err(ResolveError::CgroupGone(id))
            }
            Err(why) => Err(ResolveError::Unresolved { id, why }),
        }
    }

    /// Drops cached cgroups that no longer exist, and expired gone marks.
    pub fn prune(&self) -> usize {
        let now = Instant::now();
        self.gone
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, until| *until > now);
        let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
        let before = cache.len();
        let root = &self.root;
        cache
            .retain(|id, entry| inode(&root.join(entry.path.trim_start_matches('/'))) == Some(*id));
        before - cache.len()
    }

    /// The subjects (pod and container) whose cgroups the cache holds (after
    /// [`Self::prune`]: that exist). A restarted container's previous one is gone with its
    /// cgroup.
    pub fn subjects(&self) -> HashSet<String> {
        let cache = self.cache.read().unwrap_or_else(|e| e.into_inner());
        cache
            .values()
            .filter(|entry| entry.pod.is_ok())
            .map(|entry| entry.subject.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::{fs, path::Path, sync::atomic::Ordering};

    use super::*;
    use crate::cgroup::Cgroupfs;

    #[test]
    fn the_identity_a_pod_sees_is_its_own_and_says_nothing_of_the_node() {
        let caller = Caller::for_pod(PodCgroup {
            pod_uid: "0f6a8c2e-3b1d-4e5f-9a7b-1c2d3e4f5a6b".into(),
            static_pod: false,
            qos: identity::QosClass::Burstable,
            container_id: Some("abc".repeat(22)),
            runtime: Some(identity::Runtime::Containerd),
        });
        let shown = serde_json::to_value(&caller).expect("json");
        let mut keys: Vec<&str> = shown
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            ["container_id", "pod_uid", "qos", "runtime", "static_pod"]
        );
    }

    const UID: &str = "0f6a8c2e-3b1d-4e5f-9a7b-1c2d3e4f5a6b";
    const CID: &str = "5e1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9";

    struct Records(Mutex<HashMap<u64, ConnRecord>>);

    impl RecordSource for Records {
        fn take(&self, cookie: u64) -> Result<Option<ConnRecord>, MapError> {
            Ok(self.0.lock().expect("lock").remove(&cookie))
        }
    }

    fn records(pairs: &[(u64, ConnRecord)]) -> Records {
        Records(Mutex::new(pairs.iter().copied().collect()))
    }

    fn tree() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("temp dir");
        let container = dir.path().join(format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{CID}.scope",
            UID.replace('-', "_")
        ));
        fs::create_dir_all(&container).expect("mkdir");
        (dir, container)
    }

    fn record(cgroup_id: u64) -> ConnRecord {
        ConnRecord {
            cgroup_id,
            tgid: 4242,
            ..ConnRecord::default()
        }
    }

    /// Walks only: the temporary tree is not a cgroup2 file system.
    fn walker(dir: &Path) -> Arc<dyn CgroupLookup> {
        Arc::new(Cgroupfs::new(dir, dir.join("kubepods.slice"), false).expect("open"))
    }

    #[tokio::test]
    async fn begin_answers_cached_ids_itself_and_leaves_only_misses_to_finish() {
        let (dir, container) = tree();
        let id = inode(&container).expect("inode");
        let qos = inode(container.parent().and_then(Path::parent).expect("qos")).expect("inode");
        let rec = |cgroup_id, tgid| ConnRecord {
            cgroup_id,
            tgid,
            ..ConnRecord::default()
        };
        let resolver = Resolver::new(
            records(&[
                (1, rec(id, 1)),
                (2, rec(id, 2)),
                (3, rec(qos, 3)),
                (4, rec(qos, 4)),
            ]),
            walker(dir.path()),
            dir.path().to_owned(),
        );
        let Begun::Lookup(first) = resolver.begin(1) else {
            panic!("an id not cached yet is left to finish")
        };
        assert_eq!(resolver.finish(first).await.expect("a pod").pid, 1);
        // Cached now: known without waiting, with this connection's pid.
        match resolver.begin(2) {
            Begun::Known(Ok(c)) => assert_eq!((c.pid, c.pod().pod_uid.as_str()), (2, UID)),
            other => panic!("{other:?}"),
        }
        let Begun::Lookup(third) = resolver.begin(3) else {
            panic!("an id not cached yet is left to finish")
        };
        assert!(matches!(
            resolver.finish(third).await,
            Err(ResolveError::NotAPod { .. })
        ));
        // A cached cgroup that is not a pod's is refused at once too.
        assert!(matches!(
            resolver.begin(4),
            Begun::Known(Err(ResolveError::NotAPod { .. }))
        ));
        assert!(matches!(
            resolver.begin(5),
            Begun::Known(Err(ResolveError::NoRecord))
        ));
    }

    #[tokio::test]
    async fn resolves_by_walking_then_from_the_cache() {
        let (dir, container) = tree();
        let id = inode(&container).expect("inode");
        let resolver = Resolver::new(
            records(&[(7, record(id)), (8, record(id))]),
            walker(dir.path()),
            dir.path().to_owned(),
        );
        let caller = resolver.resolve(7).await.expect("resolved");
        assert_eq!(caller.pod().pod_uid, UID);
        assert_eq!(caller.pod().container_id.as_deref(), Some(CID));
        assert_eq!((caller.cgroup_id, caller.pid), (id, 4242));
        assert!(caller.cgroup_path().starts_with("/kubepods.slice/"));
        let json = serde_json::to_value(&caller).expect("json");
        assert_eq!(json["pod_uid"], UID);
        // The record is consumed: a second resolve of the same cookie finds nothing.
        assert!(matches!(
            resolver.resolve(7).await,
            Err(ResolveError::NoRecord)
        ));
        // Removing the directory does not change a cached answer for the same id...
        fs::remove_dir(&container).expect("rmdir");
        assert_eq!(
            resolver.resolve(8).await.expect("cached").pod().pod_uid,
            UID
        );
        // ...and pruning forgets it.
        assert_eq!(resolver.prune(), 1);
        assert!(resolver.subjects().is_empty());
    }

    #[tokio::test]
    async fn unknown_cgroups_and_non_pods_are_refused() {
        let (dir, container) = tree();
        let qos = container.parent().and_then(Path::parent).expect("qos dir");
        let poisoned = ConnRecord {
            flags: RECORD_POISONED,
            ..record(inode(&container).expect("inode"))
        };
        let resolver = Resolver::new(
            records(&[
                (1, record(u64::MAX)),
                (2, record(inode(qos).expect("inode"))),
                (4, poisoned),
            ]),
            walker(dir.path()),
            dir.path().to_owned(),
        );
        assert!(matches!(
            resolver.resolve(1).await,
            Err(ResolveError::CgroupGone(u64::MAX))
        ));
        assert!(resolver.is_gone(u64::MAX), "a complete walk marks it gone");
        assert!(matches!(
            resolver.resolve(2).await,
            Err(ResolveError::NotAPod { .. })
        ));
        assert!(matches!(
            resolver.resolve(3).await,
            Err(ResolveError::NoRecord)
        ));
        // A poisoned record is refused even though its cgroup is a real pod's.
        assert!(matches!(
            resolver.resolve(4).await,
            Err(ResolveError::Collision)
        ));
    }

    /// Answers from a script, one answer per lookup, counting them.
    struct Scripted(
        Mutex<Vec<Result<Found, String>>>,
        std::sync::atomic::AtomicUsize,
    );

    impl CgroupLookup for Scripted {
        fn find(&self, _: u64) -> Result<Found, String> {
            self.1.fetch_add(1, Ordering::SeqCst);
            let mut script = self.0.lock().expect("lock");
            match script.len() {
                0 => Err("script exhausted".into()),
                _ => script.remove(0),
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_transient_failure_never_marks_a_live_cgroup_gone() {
        let (dir, container) = tree();
        let id = inode(&container).expect("inode");
        let script = Arc::new(Scripted(
            Mutex::new(vec![
                // The pods cgroup is briefly unreadable (EMFILE, say).
                Err("the walk was incomplete (Too many open files)".into()),
                Ok(Found::Path(container.clone())),
            ]),
            Default::default(),
        ));
        let resolver = Resolver::new(
            records(&[(1, record(id)), (2, record(id))]),
            script.clone(),
            dir.path().to_owned(),
        );
        assert!(matches!(
            resolver.resolve(1).await,
            Err(ResolveError::Unresolved { .. })
        ));
        assert!(!resolver.is_gone(id));
        // Readable again: the same cgroup id resolves.
        assert_eq!(
            resolver.resolve(2).await.expect("resolves").pod().pod_uid,
            UID
        );
    }

    #[tokio::test(start_paused = true)]
    async fn gone_marks_expire() {
        let (dir, container) = tree();
        let id = inode(&container).expect("inode");
        let script = Arc::new(Scripted(
            Mutex::new(vec![Ok(Found::Gone), Ok(Found::Path(container.clone()))]),
            Default::default(),
        ));
        let resolver = Resolver::new(
            records(&(1..=3).map(|c| (c, record(id))).collect::<Vec<_>>()),
            script.clone(),
            dir.path().to_owned(),
        );
        assert!(matches!(
            resolver.resolve(1).await,
            Err(ResolveError::CgroupGone(_))
        ));
        // Refused at once while marked, without asking again.
        assert!(matches!(
            resolver.resolve(2).await,
            Err(ResolveError::CgroupGone(_))
        ));
        assert_eq!(script.1.load(Ordering::SeqCst), 1);
        tokio::time::advance(GONE_TTL + Duration::from_secs(1)).await;
        assert!(resolver.resolve(3).await.is_ok(), "the mark expired");
    }

    #[tokio::test]
    async fn a_full_cache_makes_room_without_emptying_itself() {
        let (dir, container) = tree();
        let live = inode(&container).expect("inode");
        let mut resolver = Resolver::new(records(&[]), walker(dir.path()), dir.path().to_owned());
        resolver.max_cached = 3;
        let entry = |path: &str| {
            Arc::new(CachedCgroup::new(
                path.into(),
                identity::parse_cgroup_path(path),
            ))
        };
        let live_path = cgroup::relative_path(dir.path(), &container).expect("relative");
        resolver.remember(live, entry(&live_path));
        // Two entries whose directories are gone.
        resolver.remember(1, entry("/kubepods.slice/gone-1"));
        resolver.remember(2, entry("/kubepods.slice/gone-2"));
        resolver.remember(3, entry("/kubepods.slice/new"));
        let cache = resolver.cache.read().expect("lock");
        assert!(cache.contains_key(&live), "the live entry stays");
        assert!(cache.contains_key(&3));
        assert_eq!(cache.len(), 2);
    }
}
