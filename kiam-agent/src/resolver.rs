//! Caller resolution: accepted socket → the record the kernel bound to it → cgroup id →
//! cgroup path → pod UID and container. Never the peer IP.
//!
//! The hot path is one map lookup and delete (by socket cookie) plus a cache hit keyed by
//! cgroup id. A miss first tries `/proc/<pid>/cgroup` of the caller (checked against the
//! cgroup id, since the pid may be gone or reused), then one walk of the pods cgroup that fills
//! the cache for every cgroup it sees; walks run off the async workers, one at a time.
//! Cgroup ids are inode numbers that the kernel does not reuse while it runs, so a cached entry
//! can go stale only by its cgroup disappearing; those are pruned periodically.

use std::{
    collections::{HashMap, HashSet},
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
};

use aya::maps::{HashMap as BpfHashMap, MapData, MapError};
use kiam_common::{ConnRecord, RECORD_POISONED};

use crate::{
    cgroup,
    identity::{self, ParseError, PodCgroup},
};

/// Entries kept before the cache is rebuilt from scratch (a node has far fewer cgroups).
const MAX_CACHED: usize = 65_536;
/// How deep below the pods cgroup a walk goes (kubepods/qos/pod/container/+nested).
const MAX_WALK_DEPTH: usize = 8;

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

/// The identity of a connection's caller.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Caller {
    pub cgroup_id: u64,
    /// Process that called `connect()`, in the root pid namespace.
    pub pid: u32,
    pub cgroup_path: String,
    #[serde(flatten)]
    pub pod: PodCgroup,
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
    #[error("caller's cgroup {path} is not a pod's")]
    NotAPod {
        path: String,
        #[source]
        source: ParseError,
    },
}

#[derive(Debug)]
struct CachedCgroup {
    path: String,
    pod: Result<PodCgroup, ParseError>,
}

pub struct Resolver<S> {
    records: S,
    /// cgroup v2 mount point.
    root: PathBuf,
    /// Walked on a cache miss: the pods cgroup.
    search_root: PathBuf,
    cache: RwLock<HashMap<u64, Arc<CachedCgroup>>>,
    /// Ids a walk did not find (removed, or too deep below the pods cgroup).
    gone: Mutex<HashSet<u64>>,
    walk: tokio::sync::Mutex<()>,
}

impl<S: RecordSource> Resolver<S> {
    pub fn new(records: S, root: PathBuf, search_root: PathBuf) -> Self {
        Self {
            records,
            root,
            search_root,
            cache: RwLock::new(HashMap::new()),
            gone: Mutex::new(HashSet::new()),
            walk: tokio::sync::Mutex::new(()),
        }
    }

    /// Who made the connection whose agent-side socket has this cookie.
    pub async fn resolve(&self, cookie: u64) -> Result<Caller, ResolveError> {
        let record = self
            .records
            .take(cookie)
            .map_err(ResolveError::Map)?
            .ok_or(ResolveError::NoRecord)?;
        if record.flags & RECORD_POISONED != 0 {
            return Err(ResolveError::Collision);
        }
        let cached = self.cgroup(record.cgroup_id, record.tgid).await?;
        match &cached.pod {
            Ok(pod) => Ok(Caller {
                cgroup_id: record.cgroup_id,
                pid: record.tgid,
                cgroup_path: cached.path.clone(),
                pod: pod.clone(),
            }),
            Err(e) => Err(ResolveError::NotAPod {
                path: cached.path.clone(),
                source: e.clone(),
            }),
        }
    }

    fn cached(&self, id: u64) -> Option<Arc<CachedCgroup>> {
        let cache = self.cache.read().unwrap_or_else(|e| e.into_inner());
        cache.get(&id).cloned()
    }

    fn remember(&self, entries: impl IntoIterator<Item = (u64, PathBuf)>) {
        let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
        for (id, path) in entries {
            if cache.len() >= MAX_CACHED {
                cache.clear();
            }
            let Some(rel) = cgroup::relative_path(&self.root, &path) else {
                continue;
            };
            let pod = identity::parse_cgroup_path(&rel);
            cache.insert(id, Arc::new(CachedCgroup { path: rel, pod }));
        }
    }

    async fn cgroup(&self, id: u64, pid: u32) -> Result<Arc<CachedCgroup>, ResolveError> {
        if let Some(hit) = self.cached(id) {
            return Ok(hit);
        }
        // The caller's own /proc entry usually names the cgroup; trust it only if the inode
        // matches, since the process may have exited and its pid been reused.
        if let Ok(path) = cgroup::process_cgroup_path(pid) {
            let candidate = self.root.join(path.trim_start_matches('/'));
            if inode(&candidate) == Some(id) {
                self.remember([(id, candidate)]);
                if let Some(hit) = self.cached(id) {
                    return Ok(hit);
                }
            }
        }
        // Cgroup ids are never reused and the cgroup existed when the caller connected, so an
        // id a walk did not find will never be found: remember that instead of walking again
        // (a pod creating cgroups must not make the agent walk per connection).
        if self.is_gone(id) {
            return Err(ResolveError::CgroupGone(id));
        }
        let _walking = self.walk.lock().await;
        if let Some(hit) = self.cached(id) {
            return Ok(hit);
        }
        if self.is_gone(id) {
            return Err(ResolveError::CgroupGone(id));
        }
        let search_root = self.search_root.clone();
        let found = tokio::task::spawn_blocking(move || walk(&search_root))
            .await
            .unwrap_or_default();
        tracing::debug!(cgroups = found.len(), "walked the pods cgroup");
        self.remember(found);
        match self.cached(id) {
            Some(hit) => Ok(hit),
            None => {
                let mut gone = self.gone.lock().unwrap_or_else(|e| e.into_inner());
                if gone.len() >= MAX_CACHED {
                    gone.clear();
                }
                gone.insert(id);
                Err(ResolveError::CgroupGone(id))
            }
        }
    }

    fn is_gone(&self, id: u64) -> bool {
        let gone = self.gone.lock().unwrap_or_else(|e| e.into_inner());
        gone.contains(&id)
    }

    /// Drops cached cgroups that no longer exist.
    pub fn prune(&self) -> usize {
        let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
        let before = cache.len();
        let root = &self.root;
        cache
            .retain(|id, entry| inode(&root.join(entry.path.trim_start_matches('/'))) == Some(*id));
        before - cache.len()
    }

    /// UIDs of the pods whose cgroups the cache holds (after [`Self::prune`]: that exist).
    pub fn pods(&self) -> HashSet<String> {
        let cache = self.cache.read().unwrap_or_else(|e| e.into_inner());
        cache
            .values()
            .filter_map(|entry| entry.pod.as_ref().ok().map(|p| p.pod_uid.clone()))
            .collect()
    }
}

fn inode(path: &Path) -> Option<u64> {
    fs::metadata(path).ok().map(|m| m.ino())
}

/// Every cgroup directory under `root` (inclusive), with its id.
fn walk(root: &Path) -> Vec<(u64, PathBuf)> {
    let mut out = Vec::new();
    let mut stack = vec![(root.to_owned(), 0usize)];
    while let Some((dir, depth)) = stack.pop() {
        let Some(id) = inode(&dir) else { continue };
        out.push((id, dir.clone()));
        if depth >= MAX_WALK_DEPTH {
            continue;
        }
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push((entry.path(), depth + 1));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f6a8c2e-3b1d-4e5f-9a7b-1c2d3e4f5a6b";
    const CID: &str = "5e1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9";

    struct Records(Mutex<HashMap<u64, ConnRecord>>);

    impl RecordSource for Records {
        fn take(&self, cookie: u64) -> Result<Option<ConnRecord>, MapError> {
            Ok(self.0.lock().expect("lock").remove(&cookie))
        }
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
            // A pid that cannot exist, so resolution has to walk.
            tgid: u32::MAX,
            ..ConnRecord::default()
        }
    }

    #[tokio::test]
    async fn resolves_by_walking_then_from_the_cache() {
        let (dir, container) = tree();
        let id = inode(&container).expect("inode");
        let records = Records(Mutex::new(HashMap::from([
            (7, record(id)),
            (8, record(id)),
        ])));
        let resolver = Resolver::new(
            records,
            dir.path().to_owned(),
            dir.path().join("kubepods.slice"),
        );
        let caller = resolver.resolve(7).await.expect("resolved");
        assert_eq!(caller.pod.pod_uid, UID);
        assert_eq!(caller.pod.container_id.as_deref(), Some(CID));
        assert_eq!(caller.cgroup_id, id);
        assert!(caller.cgroup_path.starts_with("/kubepods.slice/"));
        // The record is consumed: a second resolve of the same cookie finds nothing.
        assert!(matches!(
            resolver.resolve(7).await,
            Err(ResolveError::NoRecord)
        ));
        // Removing the directory does not change a cached answer for the same id...
        fs::remove_dir(&container).expect("rmdir");
        assert_eq!(resolver.resolve(8).await.expect("cached").pod.pod_uid, UID);
        // ...and pruning forgets it.
        assert!(resolver.prune() >= 1);
    }

    #[tokio::test]
    async fn unknown_cgroups_and_non_pods_are_refused() {
        let (dir, container) = tree();
        let qos = container.parent().and_then(Path::parent).expect("qos dir");
        let poisoned = ConnRecord {
            flags: RECORD_POISONED,
            ..record(inode(&container).expect("inode"))
        };
        let records = Records(Mutex::new(HashMap::from([
            (1, record(u64::MAX)),
            (2, record(inode(qos).expect("inode"))),
            (4, poisoned),
        ])));
        let resolver = Resolver::new(
            records,
            dir.path().to_owned(),
            dir.path().join("kubepods.slice"),
        );
        assert!(matches!(
            resolver.resolve(1).await,
            Err(ResolveError::CgroupGone(u64::MAX))
        ));
        assert!(resolver.is_gone(u64::MAX), "unknown ids are remembered");
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
}
