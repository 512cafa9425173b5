//! The bpf file system the pins live on: whether a directory is on one, whether the host sees
//! that mount (so the pins outlive the agent's container), and mounting one
//! (`kiam-agent mount-bpffs`, the manifests' init container).

use std::{
    fs, io,
    path::{Path, PathBuf},
};

/// bpffs super-block magic, from `linux/magic.h`.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Where bpffs is mounted when it is missing.
const BPFFS_MOUNT: &str = "/sys/fs/bpf";

#[derive(Debug, thiserror::Error)]
pub enum BpffsError {
    #[error(
        "{} is not on a bpf file system: mount bpffs on the host at /sys/fs/bpf (the manifests' init container runs `kiam-agent mount-bpffs`) and give the agent the host's /sys/fs/bpf, or set --bpffs-dir; pins anywhere else would vanish with the agent and let pods reach the node's credentials",
        .0.display()
    )]
    NotBpffs(PathBuf),
    #[error(
        "{} is on a bpf file system only this agent's mount namespace sees (a private mount): give the agent the host's /sys/fs/bpf with mountPropagation: HostToContainer, and make the host's mount shared (`kiam-agent mount-bpffs` does; systemd mounts it shared), or pins would vanish with the agent and let pods reach the node's credentials (--allow-private-bpffs accepts this for development only)",
        .0.display()
    )]
    PrivateBpffs(PathBuf),
    #[error("mounting bpffs at {} (needs CAP_SYS_ADMIN)", .0.display())]
    Mount(PathBuf, #[source] nix::Error),
    #[error("making the bpffs at {} shared (needs CAP_SYS_ADMIN)", .0.display())]
    MakeShared(PathBuf, #[source] nix::Error),
    #[error("{}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> BpffsError + '_ {
    move |source| BpffsError::Io {
        path: path.to_owned(),
        source,
    }
}

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|fs| fs.filesystem_type().0 == BPF_FS_MAGIC)
        .unwrap_or(false)
}

/// A line of `/proc/self/mountinfo`, as far as the checks need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_point: PathBuf,
    pub fs_type: String,
    /// The mount has a peer group (`shared:N`) or a master (`master:N`): it propagates
    /// between mount namespaces, i.e. it is (or receives) the host's.
    pub propagated: bool,
    /// The mount has a peer group (`shared:N`): mounts made below it, and bind mounts of it
    /// with HostToContainer propagation, receive what happens on the host.
    pub shared: bool,
}

/// `\040`-style escapes of mountinfo paths.
fn unescape(field: &str) -> String {
    let mut out = String::new();
    let mut rest = field;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(byte) => {
                out.push(char::from(byte));
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The mount holding `path`: the entry with the longest mount point that contains it (the
/// last one when several are stacked on the same point).
pub fn mount_of(mountinfo: &str, path: &Path) -> Option<MountEntry> {
    let mut best: Option<MountEntry> = None;
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let fields: Vec<&str> = left.split(' ').collect();
        let (Some(point), Some(fs_type)) = (fields.get(4), right.split(' ').next()) else {
            continue;
        };
        let mount_point = PathBuf::from(unescape(point));
        if !path.starts_with(&mount_point) {
            continue;
        }
        let longer = best
            .as_ref()
            .is_none_or(|b| mount_point.as_os_str().len() >= b.mount_point.as_os_str().len());
        if longer {
            let optional = || fields.iter().skip(6);
            let shared = optional().any(|f| f.starts_with("shared:"));
            best = Some(MountEntry {
                mount_point,
                fs_type: fs_type.to_owned(),
                propagated: shared || optional().any(|f| f.starts_with("master:")),
                shared,
            });
        }
    }
    best
}

/// Whether this process shares the mount namespace of the kernel's own threads (the host's).
/// Only answerable with the host's pid namespace (pid 2 is then `kthreadd`); in a container
/// it is `false` and the mount's propagation decides.
fn in_host_mount_namespace() -> bool {
    let kthreadd = fs::read_to_string("/proc/2/comm").is_ok_and(|c| c.trim() == "kthreadd");
    let ns = |pid: &str| fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
    kthreadd && ns("2").is_some() && ns("2") == ns("self")
}

/// Makes sure `dir` can be created on a bpffs the host sees, so the pins outlive this agent
/// (and its container). With `allow_private` (development), a bpffs only this mount
/// namespace sees is accepted, and mounted at `/sys/fs/bpf` when missing.
pub fn ensure(dir: &Path, allow_private: bool) -> Result<(), BpffsError> {
    let parent = dir.parent().unwrap_or(dir);
    if !is_bpffs(parent) {
        if allow_private && parent == Path::new(BPFFS_MOUNT) {
            mount(parent)?;
            tracing::warn!(
                path = BPFFS_MOUNT,
                "--allow-private-bpffs: mounted a bpffs the host may not see; the pins vanish with this agent"
            );
            return Ok(());
        }
        return Err(BpffsError::NotBpffs(dir.to_owned()));
    }
    if allow_private || in_host_mount_namespace() {
        return Ok(());
    }
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").map_err(io_err(parent))?;
    match mount_of(&mountinfo, parent) {
        Some(entry) if entry.fs_type == "bpf" && entry.propagated => Ok(()),
        _ => Err(BpffsError::PrivateBpffs(dir.to_owned())),
    }
}

/// What [`mount`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mounted {
    /// A bpffs was mounted there, and made shared.
    Mounted,
    /// A bpffs was there already, private: it was made shared.
    MadeShared,
    /// A shared bpffs was there already (or bpffs further up: nothing to change here).
    AlreadyThere,
}

/// Mounts bpffs at `path` unless one is there, and makes the mount shared as systemd does
/// (`kiam-agent mount-bpffs`, run by the manifests' init container with the host's
/// `/sys/fs/bpf` and bidirectional propagation, so the mount is the host's). A private
/// mount would reach the agent's HostToContainer view as a private copy, which it refuses.
pub fn mount(path: &Path) -> Result<Mounted, BpffsError> {
    use nix::mount::{MsFlags, mount as sys_mount};
    let make_shared = || {
        sys_mount(
            None::<&str>,
            path,
            None::<&str>,
            MsFlags::MS_SHARED,
            None::<&str>,
        )
        .map_err(|e| BpffsError::MakeShared(path.to_owned(), e))
    };
    if is_bpffs(path) {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").map_err(io_err(path))?;
        return match mount_of(&mountinfo, path) {
            Some(entry) if entry.mount_point == path && !entry.shared => {
                make_shared()?;
                Ok(Mounted::MadeShared)
            }
            _ => Ok(Mounted::AlreadyThere),
        };
    }
    fs::create_dir_all(path).map_err(io_err(path))?;
    sys_mount(
        Some("bpf"),
        path,
        Some("bpf"),
        MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| BpffsError::Mount(path.to_owned(), e))?;
    make_shared()?;
    Ok(Mounted::Mounted)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: &str = "\
27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
23 27 0:22 / /sys rw,relatime shared:7 - sysfs sysfs rw
44 23 0:39 / /sys/fs/bpf rw,relatime shared:12 - bpf bpf rw
45 23 0:40 / /sys/fs/bpf/odd\\040dir rw,relatime - tmpfs tmpfs rw
";
    const CONTAINER_HOST_TO_CONTAINER: &str = "\
700 650 0:80 / / rw,relatime - overlay overlay rw
720 700 0:39 / /sys/fs/bpf rw,relatime master:12 - bpf bpf rw
";
    const CONTAINER_PRIVATE: &str = "\
700 650 0:80 / / rw,relatime - overlay overlay rw
720 700 0:22 / /sys rw,relatime - sysfs sysfs rw
721 720 0:91 / /sys/fs/bpf rw,relatime - bpf bpf rw
";

    #[test]
    fn the_mount_holding_a_path_and_whether_it_propagates() {
        let pins = Path::new("/sys/fs/bpf/kiam");
        let cases = [
            (HOST, pins, Some(("/sys/fs/bpf", "bpf", true, true))),
            (
                CONTAINER_HOST_TO_CONTAINER,
                pins,
                Some(("/sys/fs/bpf", "bpf", true, false)),
            ),
            (
                CONTAINER_PRIVATE,
                pins,
                Some(("/sys/fs/bpf", "bpf", false, false)),
            ),
            (
                HOST,
                Path::new("/sys/fs/bpf/odd dir/x"),
                Some(("/sys/fs/bpf/odd dir", "tmpfs", false, false)),
            ),
            (
                HOST,
                Path::new("/sys/fs/bpfx"),
                Some(("/sys", "sysfs", true, true)),
            ),
            (HOST, Path::new("/tmp/x"), Some(("/", "ext4", true, true))),
            ("", pins, None),
        ];
        for (mountinfo, path, want) in cases {
            let got = mount_of(mountinfo, path);
            let got = got.as_ref().map(|m| {
                (
                    m.mount_point.to_str().unwrap_or(""),
                    m.fs_type.as_str(),
                    m.propagated,
                    m.shared,
                )
            });
            assert_eq!(got, want, "{}", path.display());
        }
    }
}
