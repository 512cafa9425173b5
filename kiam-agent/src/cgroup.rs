//! The cgroup v2 file system: where it is mounted, which cgroup to attach to, and the agent's
//! own cgroup id (exempt from the redirect).

use std::{
    fs,
    io::{self, BufRead},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
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
}
