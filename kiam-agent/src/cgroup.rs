//! The cgroup v2 file system: where it is mounted, which cgroup to attach to, the agent's
//! own cgroup id (exempt from the redirect), and how a cgroup id becomes its directory
//! ([`Cgroupfs`]: `open_by_handle_at` on the mount, or a walk of the pods cgroup).

use std::{
    fs,
    io::{self, BufRead},
    os::{fd::AsRawFd as _, unix::fs::MetadataExt},
    path::{Path, PathBuf},
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

/// cgroup2 super-block magic, from `linux/magic.h`.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Where to look for the cgroup v2 mount when `--cgroup-root` is not given: a unified host
/// first, then the hybrid layout (`/sys/fs/cgroup/unified`).
pub const CANDIDATE_ROOTS: [&str; 2] = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"];

/// Where the kubelet puts pods, for each cgroup driver, relative to the cgroup root.
pub const KUBEPODS_CANDIDATES: [&str; 2] = ["kubepods.slice", "kubepods"];

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "no cgroup v2 file system at {}; kiam needs cgroup v2 (set --cgroup-root to its mount point)",
        .0.display()
    )]
    NotCgroup2(PathBuf),
    #[error(
        "{} is a cgroup v1 hierarchy (a hybrid layout): its cgroup v2 is at {}; leave --cgroup-root unset to find it, or set it there",
        .given.display(),
        .unified.display()
    )]
    Hybrid { given: PathBuf, unified: PathBuf },
    #[error(
        "no cgroup v2 file system found at {candidates}; kiam needs cgroup v2 (set --cgroup-root)"
    )]
    NoCgroup2 { candidates: String },
    #[error(
        "no kubelet pods cgroup ({candidates}) under {}; set --attach-cgroup",
        root.display()
    )]
    NoKubepods { root: PathBuf, candidates: String },
    #[error("cgroup {} does not exist (--attach-cgroup)", .0.display())]
    Missing(PathBuf),
    #[error("cannot find the agent's own cgroup (pid {pid}) under {}", root.display())]
    OwnCgroupNotFound { pid: u32, root: PathBuf },
    #[error("{}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_owned(),
        source,
    }
}

/// True when `path` is the root of a cgroup2 mount (or any directory in one).
pub fn is_cgroup2(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|fs| fs.filesystem_type().0 == CGROUP2_SUPER_MAGIC)
        .unwrap_or(false)
}

/// The cgroup v2 mount point: `explicit` if given (checked), else the first candidate that is
/// one.
pub fn find_root(explicit: Option<&Path>) -> Result<PathBuf, CgroupError> {
    if let Some(path) = explicit {
        let unified = path.join("unified");
        return match (is_cgroup2(path), is_cgroup2(&unified)) {
            (true, _) => Ok(path.to_owned()),
            (false, true) => Err(CgroupError::Hybrid {
                given: path.to_owned(),
                unified,
            }),
            (false, false) => Err(CgroupError::NotCgroup2(path.to_owned())),
        };
    }
    CANDIDATE_ROOTS
        .iter()
        .map(PathBuf::from)
        .find(|p| is_cgroup2(p))
        .ok_or_else(|| CgroupError::NoCgroup2 {
            candidates: CANDIDATE_ROOTS.join(", "),
        })
}

/// The cgroup to attach to: `explicit` (absolute, or relative to `root`) or the kubelet's pods
/// cgroup under `root`.
pub fn find_attach_cgroup(root: &Path, explicit: Option<&Path>) -> Result<PathBuf, CgroupError> {
    if let Some(path) = explicit {
        let path = root.join(path);
        return match is_cgroup2(&path) && path.is_dir() {
            true => Ok(path),
            false => Err(CgroupError::Missing(path)),
        };
    }
    KUBEPODS_CANDIDATES
        .iter()
        .map(|c| root.join(c))
        .find(|p| p.is_dir())
        .ok_or_else(|| CgroupError::NoKubepods {
            root: root.to_owned(),
            candidates: KUBEPODS_CANDIDATES.join(", "),
        })
}

/// A cgroup's id: the inode number of its directory (what `bpf_get_current_cgroup_id()` returns).
pub fn cgroup_id(path: &Path) -> Result<u64, CgroupError> {
    fs::metadata(path).map(|m| m.ino()).map_err(io_err(path))
}

/// The cgroup v2 path of a process, relative to the reader's cgroup namespace root.
pub fn process_cgroup_path(pid: u32) -> io::Result<String> {
    let file = fs::File::open(format!("/proc/{pid}/cgroup"))?;
    for line in io::BufReader::new(file).lines() {
        if let Some(path) = line?.strip_prefix("0::") {
            return Ok(path.to_owned());
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        "no cgroup v2 entry in /proc/PID/cgroup",
    ))
}

/// Whether `pid` (as this process sees pids) is listed in the cgroup's `cgroup.procs`. The
/// kernel lists members in the reader's pid namespace and leaves out the others, so this holds
/// in a container too.
fn has_member(cgroup: &Path, pid: u32) -> bool {
    let Ok(procs) = fs::read_to_string(cgroup.join("cgroup.procs")) else {
        return false;
    };
    procs.lines().any(|l| l.trim().parse() == Ok(pid))
}

/// The agent's own cgroup directory under `root`.
///
/// With the host's cgroup namespace `/proc/self/cgroup` names it. In a container with a
/// private cgroup namespace it reads `0::/` while `root` may be the host's hierarchy (a
/// `hostPath` mount): then the directory whose `cgroup.procs` lists this process is searched
/// for, depth-first and bounded.
pub fn own_cgroup(root: &Path) -> Result<PathBuf, CgroupError> {
    let pid = std::process::id();
    if let Ok(path) = process_cgroup_path(pid) {
        let candidate = root.join(path.trim_start_matches('/'));
        if has_member(&candidate, pid) {
            return Ok(candidate);
        }
    }
    let mut stack = vec![(root.to_owned(), 0usize)];
    while let Some((dir, depth)) = stack.pop() {
        if has_member(&dir, pid) {
            return Ok(dir);
        }
        if depth >= 12 {
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
    Err(CgroupError::OwnCgroupNotFound {
        pid,
        root: root.to_owned(),
    })
}

/// `path` relative to `root`, with a leading `/`, as the kubelet path parser expects.
pub fn relative_path(root: &Path, path: &Path) -> Option<String> {
    let rel = path.strip_prefix(root).ok()?;
    Some(format!("/{}", rel.to_str()?))
}

/// How deep below the pods cgroup a walk goes (kubepods/qos/pod/container/+nested).
const MAX_WALK_DEPTH: usize = 8;

/// What the cgroup file system says about an id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// The cgroup's directory (under the cgroup2 mount).
    Path(PathBuf),
    /// No such cgroup: the kernel said so, or a complete walk did not find it.
    Gone,
}

/// Turns a cgroup id into its directory.
pub trait CgroupLookup: Send + Sync + 'static {
    /// `Err` when it could not tell (a walk that could not read everything).
    fn find(&self, id: u64) -> Result<Found, String>;
}

/// The cgroup2 file system: `open_by_handle_at`, then walks when that is not permitted.
pub struct Cgroupfs {
    mount: fs::File,
    search_root: PathBuf,
    by_handle: AtomicBool,
    walking: Mutex<()>,
}

impl Cgroupfs {
    /// `mount`: the cgroup2 mount point; `search_root`: where walks start (the pods cgroup).
    pub fn new(mount: &Path, search_root: PathBuf, by_handle: bool) -> io::Result<Self> {
        Ok(Self {
            mount: fs::File::open(mount)?,
            search_root,
            by_handle: AtomicBool::new(by_handle),
            walking: Mutex::new(()),
        })
    }

    fn by_handle(&self, id: u64) -> Option<Result<Found, String>> {
        if !self.by_handle.load(Ordering::Relaxed) {
            return None;
        }
        match kiam_common::sys::open_cgroup(&self.mount, id) {
            Ok(fd) => {
                let link = fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()));
                Some(match link {
                    // Removed between the open and the read.
                    Ok(path) if path.to_string_lossy().ends_with(" (deleted)") => Ok(Found::Gone),
                    Ok(path) => Ok(Found::Path(path)),
                    Err(e) => Err(format!("reading the cgroup's path: {e}")),
                })
            }
            Err(e) if e.raw_os_error() == Some(libc_estale()) => Some(Ok(Found::Gone)),
            Err(error) => {
                // Not permitted (no CAP_DAC_READ_SEARCH) or not supported: walk from now on.
                tracing::warn!(%error, "cannot open cgroups by id (the agent needs CAP_DAC_READ_SEARCH); walking the pods cgroup instead");
                self.by_handle.store(false, Ordering::Relaxed);
                None
            }
        }
    }
}

/// `ESTALE`: the file handle names nothing (the cgroup is gone).
fn libc_estale() -> i32 {
    nix::errno::Errno::ESTALE as i32
}

impl CgroupLookup for Cgroupfs {
    fn find(&self, id: u64) -> Result<Found, String> {
        if let Some(found) = self.by_handle(id) {
            return found;
        }
        let _one_at_a_time = self.walking.lock().unwrap_or_else(|e| e.into_inner());
        walk_for(&self.search_root, id)
    }
}

pub fn inode(path: &Path) -> Option<u64> {
    fs::metadata(path).ok().map(|m| m.ino())
}

/// Looks for cgroup `id` below `root`. `Err` when a directory could not be read, so the
/// absence of `id` proves nothing.
fn walk_for(root: &Path, id: u64) -> Result<Found, String> {
    let mut stack = vec![(root.to_owned(), 0usize)];
    let mut incomplete = None;
    while let Some((dir, depth)) = stack.pop() {
        match fs::metadata(&dir) {
            Ok(meta) if meta.ino() == id => return Ok(Found::Path(dir)),
            Ok(_) => {}
            // Removed while walking: nothing below it is anyone's any more.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                incomplete = Some(format!("{}: {e}", dir.display()));
                continue;
            }
        }
        if depth >= MAX_WALK_DEPTH {
            continue;
        }
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                incomplete = Some(format!("{}: {e}", dir.display()));
                continue;
            }
        };
        for entry in entries {
            match entry {
                Ok(entry) if entry.file_type().is_ok_and(|t| t.is_dir()) => {
                    stack.push((entry.path(), depth + 1));
                }
                Ok(_) => {}
                Err(e) => incomplete = Some(format!("{}: {e}", dir.display())),
            }
        }
    }
    match incomplete {
        Some(why) => Err(format!(
            "the walk of {} was incomplete ({why})",
            root.display()
        )),
        None => Ok(Found::Gone),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths() {
        let root = Path::new("/sys/fs/cgroup");
        assert_eq!(
            relative_path(root, Path::new("/sys/fs/cgroup/kubepods.slice/a")),
            Some("/kubepods.slice/a".to_owned())
        );
        assert_eq!(
            relative_path(root, Path::new("/sys/fs/cgroup")),
            Some("/".to_owned())
        );
        assert_eq!(relative_path(root, Path::new("/elsewhere")), None);
    }

    #[test]
    fn explicit_root_that_is_not_cgroup2_is_rejected() {
        let err = find_root(Some(Path::new("/proc"))).expect_err("/proc is not cgroup2");
        assert!(err.to_string().contains("--cgroup-root"), "{err}");
    }

    #[test]
    fn a_hybrid_layouts_v1_root_names_its_unified_hierarchy() {
        // This machine's layout (and a systemd hybrid node's): v1 at /sys/fs/cgroup.
        let root = Path::new("/sys/fs/cgroup");
        if is_cgroup2(root) || !is_cgroup2(&root.join("unified")) {
            eprintln!("SKIPPED: not a hybrid cgroup layout here");
            return;
        }
        let err = find_root(Some(root)).expect_err("v1");
        assert!(
            matches!(&err, CgroupError::Hybrid { unified, .. } if unified == Path::new("/sys/fs/cgroup/unified")),
            "{err}"
        );
        assert_eq!(find_root(None).expect("detected"), root.join("unified"));
    }

    #[test]
    fn a_complete_walk_proves_absence_an_incomplete_one_does_not() {
        let dir = tempfile::tempdir().expect("temp dir");
        let container = dir
            .path()
            .join("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podx.slice/c.scope");
        fs::create_dir_all(&container).expect("mkdir");
        let id = inode(&container).expect("inode");
        let root = dir.path().join("kubepods.slice");
        assert_eq!(walk_for(&root, id), Ok(Found::Path(container.clone())));
        assert_eq!(walk_for(&root, u64::MAX), Ok(Found::Gone));
        // A search root that is not a directory cannot be read.
        let file = dir.path().join("file");
        fs::write(&file, "").expect("file");
        assert!(walk_for(&file, u64::MAX).is_err());
    }
}
