//! The machine's own state that building, the demo and the tests rely on, beyond installed
//! packages: a cgroup v2 hierarchy, bpffs mounted (and shared, as systemd mounts it) at
//! `/sys/fs/bpf`, an iptables that works, kubectl for the kustomize bases.
//!
//! `cargo xtask setup` establishes what it can and says so in one line each, with the way
//! to undo it; what it cannot establish it names with the fix, before anything is built.
//! Everything here is idempotent: a machine already in shape is left as it is.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::bail;

/// Where bpffs is expected, as on every systemd distribution and in the manifests.
const BPFFS: &str = "/sys/fs/bpf";
/// A hybrid layout's cgroup v2 hierarchy (this machine kind; systemd's `hybrid` mode).
const UNIFIED: &str = "/sys/fs/cgroup/unified";

/// A line of `/proc/self/mountinfo`, as far as these checks need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub point: PathBuf,
    pub fs_type: String,
    /// `shared:N` among the optional fields: mounts below it propagate to other namespaces.
    pub shared: bool,
}

/// The mounts of `mountinfo`, in order (later entries stack on earlier ones).
pub fn mounts(mountinfo: &str) -> Vec<Mount> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fields: Vec<&str> = left.split(' ').collect();
            Some(Mount {
                point: PathBuf::from(fields.get(4)?.replace("\\040", " ")),
                fs_type: right.split(' ').next()?.to_owned(),
                shared: fields.iter().skip(6).any(|f| f.starts_with("shared:")),
            })
        })
        .collect()
}

/// The mount on top at exactly `point`, if anything is mounted there.
fn mounted_at<'a>(mounts: &'a [Mount], point: &Path) -> Option<&'a Mount> {
    mounts.iter().rev().find(|m| m.point == point)
}

/// What to do about one part of the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing: it is as needed.
    Ready,
    /// Commands that establish it, and the command that undoes them.
    Establish {
        what: String,
        commands: Vec<Vec<String>>,
        undo: String,
    },
    /// Setup cannot establish it: what is missing and how to fix it.
    Missing { what: String, fix: String },
}

fn argv(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| (*w).to_owned()).collect()
}

/// bpffs at `/sys/fs/bpf`, shared. The agent refuses pins on a bpffs the host does not see,
/// and a HostToContainer (rslave) view of a private mount is exactly that; systemd makes every
/// mount shared at boot, a machine without systemd does not.
pub fn bpffs_step(mounts: &[Mount]) -> Step {
    match mounted_at(mounts, Path::new(BPFFS)) {
        Some(m) if m.fs_type == "bpf" && m.shared => Step::Ready,
        Some(m) if m.fs_type == "bpf" => Step::Establish {
            what: format!("made the bpffs at {BPFFS} shared, as systemd mounts it"),
            commands: vec![argv(&["mount", "--make-shared", BPFFS])],
            undo: format!("mount --make-private {BPFFS}"),
        },
        Some(m) => Step::Missing {
            what: format!("{BPFFS} holds a {} file system, not bpffs", m.fs_type),
            fix: format!("unmount it (umount {BPFFS}) and rerun `cargo xtask setup`"),
        },
        None => Step::Establish {
            what: format!(
                "mounted bpffs at {BPFFS} (shared, as systemd mounts it; the agent's pins live there)"
            ),
            commands: vec![
                argv(&["mkdir", "-p", BPFFS]),
                argv(&["mount", "-t", "bpf", "bpf", BPFFS]),
                argv(&["mount", "--make-shared", BPFFS]),
            ],
            undo: format!("umount {BPFFS}"),
        },
    }
}

/// A cgroup v2 hierarchy at `/sys/fs/cgroup` (unified) or `/sys/fs/cgroup/unified` (hybrid).
/// A hybrid host without its unified mount gets one; a cgroup v1-only layout cannot be
/// turned into what the kubelet and kiam need without a reboot.
pub fn cgroup2_step(mounts: &[Mount]) -> Step {
    let at = |p: &str| mounted_at(mounts, Path::new(p)).map(|m| m.fs_type.as_str());
    match (at("/sys/fs/cgroup"), at(UNIFIED)) {
        (Some("cgroup2"), _) | (_, Some("cgroup2")) => Step::Ready,
        (Some("tmpfs"), None) => Step::Establish {
            what: format!("mounted the cgroup v2 hierarchy at {UNIFIED} (hybrid layout)"),
            commands: vec![
                argv(&["mkdir", "-p", UNIFIED]),
                argv(&["mount", "-t", "cgroup2", "cgroup2", UNIFIED]),
            ],
            undo: format!("umount {UNIFIED}"),
        },
        _ => Step::Missing {
            what: "no cgroup v2 hierarchy at /sys/fs/cgroup or /sys/fs/cgroup/unified".into(),
            fix: "boot with systemd.unified_cgroup_hierarchy=1 (cgroup v2), as the kubelet needs"
                .into(),
        },
    }
}

fn read_mounts() -> anyhow::Result<Vec<Mount>> {
    Ok(mounts(&fs::read_to_string("/proc/self/mountinfo")?))
}

fn succeeds(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// iptables as the node-safety tests use it (a kube-proxy-style DNAT, in a network namespace
/// of their own): Debian's default (nft) where the kernel has nf_tables, legacy otherwise.
fn iptables_step() -> Step {
    let works = |binary: &str| succeeds("unshare", &["--net", binary, "-t", "nat", "-S"]);
    if works("iptables") {
        return Step::Ready;
    }
    if works("iptables-legacy") {
        return Step::Establish {
            what: "iptables (nft) does not work with this kernel: switched to iptables-legacy"
                .into(),
            commands: vec![argv(&[
                "update-alternatives",
                "--set",
                "iptables",
                "/usr/sbin/iptables-legacy",
            ])],
            undo: "update-alternatives --auto iptables".into(),
        };
    }
    Step::Missing {
        what: "neither iptables (nft) nor iptables-legacy can make a NAT table here".into(),
        fix: "a kernel with nf_tables or ip_tables and the nat table (CONFIG_NF_NAT)".into(),
    }
}

/// kubectl renders the kustomize bases in `deploy/validate.py`; Debian does not package it.
fn kubectl_step() -> Step {
    match succeeds("kubectl", &["version", "--client"]) {
        true => Step::Ready,
        false => Step::Missing {
            what: "kubectl is not on PATH (deploy/validate.py renders the kustomize bases with `kubectl kustomize`)".into(),
            fix: "install kubectl: https://kubernetes.io/docs/tasks/tools/install-kubectl-linux/"
                .into(),
        },
    }
}

/// Brings the machine into shape, or says in one line each what it lacks and how to fix it.
/// Without root only what needs no privilege is checked (the privileged tests then skip).
pub fn prepare() -> anyhow::Result<()> {
    let mut steps = vec![("kubectl", kubectl_step())];
    if crate::is_root() {
        let mounts = read_mounts()?;
        steps.push(("cgroup v2", cgroup2_step(&mounts)));
        steps.push(("bpffs", bpffs_step(&mounts)));
        steps.push(("iptables", iptables_step()));
    } else {
        eprintln!(
            "setup: not root: bpffs, cgroup v2 and iptables left unchecked (the demo and the privileged tests need root)"
        );
    }
    let mut missing = Vec::new();
    for (name, step) in steps {
        match step {
            Step::Ready => eprintln!("setup: {name} ready"),
            Step::Establish {
                what,
                commands,
                undo,
            } => {
                for command in &commands {
                    crate::run(Command::new(&command[0]).args(&command[1..]))?;
                }
                eprintln!("setup: {what} (undo: {undo})");
            }
            Step::Missing { what, fix } => missing.push(format!("{what}: {fix}")),
        }
    }
    if !missing.is_empty() {
        bail!(
            "this machine cannot build and test kiam-rs yet:\n  {}",
            missing.join("\n  ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Mount tables as this machine kind has them (hybrid cgroups, private mounts, no systemd)
    /// and as a systemd node has them.
    const BARE: &str = "\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
23 27 0:22 / /sys rw,relatime - sysfs sysfs rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const PRIVATE_BPFFS: &str = "44 23 0:40 / /sys/fs/bpf rw,relatime - bpf bpf rw\n";
    const SYSTEMD: &str = "\
24 1 0:22 / /sys rw,nosuid shared:7 - sysfs sysfs rw
25 24 0:6 / /sys/fs/cgroup rw,nosuid shared:8 - cgroup2 cgroup2 rw
26 24 0:7 / /sys/fs/bpf rw,nosuid shared:9 - bpf bpf rw,mode=700
";

    fn commands(step: &Step) -> Vec<String> {
        match step {
            Step::Establish { commands, .. } => commands.iter().map(|c| c.join(" ")).collect(),
            other => panic!("expected commands, got {other:?}"),
        }
    }

    #[test]
    fn bpffs_is_mounted_and_shared_when_missing_or_private() {
        let bare = mounts(BARE);
        assert_eq!(
            commands(&bpffs_step(&bare)),
            [
                "mkdir -p /sys/fs/bpf",
                "mount -t bpf bpf /sys/fs/bpf",
                "mount --make-shared /sys/fs/bpf"
            ]
        );
        let private = mounts(&format!("{BARE}{PRIVATE_BPFFS}"));
        assert_eq!(
            commands(&bpffs_step(&private)),
            ["mount --make-shared /sys/fs/bpf"]
        );
        assert_eq!(bpffs_step(&mounts(SYSTEMD)), Step::Ready);
        // Something else mounted there is not papered over.
        let tmpfs = mounts(&format!(
            "{BARE}44 23 0:40 / /sys/fs/bpf rw shared:3 - tmpfs tmpfs rw\n"
        ));
        assert!(matches!(bpffs_step(&tmpfs), Step::Missing { .. }));
        // The top of a stack of mounts counts.
        let stacked = mounts(&format!(
            "{BARE}{PRIVATE_BPFFS}45 44 0:41 / /sys/fs/bpf rw shared:4 - bpf bpf rw\n"
        ));
        assert_eq!(bpffs_step(&stacked), Step::Ready);
    }

    #[test]
    fn cgroup2_is_found_in_either_layout_and_added_to_a_hybrid_host() {
        assert_eq!(cgroup2_step(&mounts(BARE)), Step::Ready);
        assert_eq!(cgroup2_step(&mounts(SYSTEMD)), Step::Ready);
        let hybrid_without_unified: String = BARE
            .lines()
            .filter(|l| !l.contains("unified"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(
            commands(&cgroup2_step(&mounts(&hybrid_without_unified))),
            [
                "mkdir -p /sys/fs/cgroup/unified",
                "mount -t cgroup2 cgroup2 /sys/fs/cgroup/unified"
            ]
        );
        let v1_only = "31 23 0:28 / /sys/fs/cgroup rw - cgroup cgroup rw,cpu\n";
        assert!(matches!(
            cgroup2_step(&mounts(v1_only)),
            Step::Missing { .. }
        ));
    }
}
