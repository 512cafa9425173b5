//! Loads the kernel programs, attaches them with bpf links and pins everything under one
//! bpffs directory, so the redirect outlives the agent (fail closed: with the agent gone, pods
//! get "connection refused", never the node's metadata service).
//!
//! Layout: `<pin dir>/maps/KIAM_*` and `<pin dir>/links/kiam_*`. A restarted agent loads the
//! object again with the pinned maps, then for each program either re-adopts the pinned link
//! (same program tag) or swaps in the new program: the new link is attached and pinned beside
//! the old one, then renamed over it, so the hook is never empty.

use std::{
    collections::BTreeMap,
    fs, io,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, MapError, MapInfo, PerCpuArray},
    pin::PinError,
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, ProgramError, SockOps,
        links::{FdLink, LinkError, PinnedLink},
        loaded_programs,
    },
};
use kiam_common::{
    CONFIG_READY, Config, ConnRecord, LAYOUT_VERSION, map_names, program_names, stat,
};

/// The eBPF object built by `cargo xtask build-ebpf`, embedded at build time (empty when the
/// agent was built without it).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/kiam-ebpf.o"));

/// bpffs super-block magic, from `linux/magic.h`.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Cgroup bpf links always attach in multi mode (beside Cilium's and others' programs); the
/// kernel rejects `BPF_LINK_CREATE` with any attach flag, so "single" is what asks for that.
const LINK_MODE: CgroupAttachMode = CgroupAttachMode::Single;
/// Where bpffs is mounted when it is missing.
const BPFFS_MOUNT: &str = "/sys/fs/bpf";

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error(
        "this kiam-agent was built without its eBPF object: run `cargo xtask build-ebpf`, then rebuild the agent"
    )]
    NoObject,
    #[error(
        "{} is not on a bpf file system: mount bpffs on the host at /sys/fs/bpf (the manifests' init container runs `kiam-agent mount-bpffs`) and give the agent the host's /sys/fs/bpf, or set --bpffs-dir; pins anywhere else would vanish with the agent and let pods reach the node's credentials",
        .0.display()
    )]
    NotBpffs(PathBuf),
    #[error(
        "{} is on a bpf file system only this agent's mount namespace sees (a private mount): give the agent the host's /sys/fs/bpf with mountPropagation: HostToContainer, or pins would vanish with the agent and let pods reach the node's credentials (--allow-private-bpffs accepts this for development only)",
        .0.display()
    )]
    PrivateBpffs(PathBuf),
    #[error("mounting bpffs at {} (needs CAP_SYS_ADMIN)", .0.display())]
    Mount(PathBuf, #[source] nix::Error),
    #[error(
        "loading the eBPF programs (the agent needs root or CAP_BPF + CAP_NET_ADMIN, and a kernel with cgroup sock_addr, sock_ops and cgroup_skb programs, 5.8 or newer)"
    )]
    Load(#[source] aya::EbpfError),
    #[error("program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("program {0} missing from the eBPF object")]
    MissingProgram(&'static str),
    #[error("map {0} missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("pinned link {}", path.display())]
    Link {
        path: PathBuf,
        #[source]
        source: LinkError,
    },
    #[error("pinning {}", path.display())]
    Pin {
        path: PathBuf,
        #[source]
        source: PinError,
    },
    #[error(
        "the programs pinned at {} are attached to another cgroup (id {pinned}, not {wanted}); run `kiam-agent uninstall` first",
        dir.display()
    )]
    OtherCgroup {
        dir: PathBuf,
        pinned: u64,
        wanted: u64,
    },
    #[error("opening cgroup {}", path.display())]
    Cgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What the agent wants attached, and where.
#[derive(Debug, Clone)]
pub struct InstallOptions {
    pub pin_dir: PathBuf,
    pub attach_cgroup: PathBuf,
    pub attach_cgroup_id: u64,
    /// The agent's own cgroup; covered by sock_ops too when it is outside `attach_cgroup`.
    pub own_cgroup: PathBuf,
    pub own_cgroup_covered: bool,
    /// Written to `KIAM_CONFIG` with `attach_cgroup_id` filled in and `CONFIG_READY` set.
    pub config: Config,
    /// Cgroup ids whose connections are left alone (the agent's own first).
    pub exempt: Vec<u64>,
    /// Accept a bpffs the host does not see (development only).
    pub allow_private_bpffs: bool,
    /// An object to load instead of the built-in one.
    pub object: Option<Vec<u8>>,
}

/// What happened to each program's link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkAction {
    Attached,
    Readopted,
    Replaced,
}

/// The programs, attached and pinned, and the maps the agent uses while it runs.
pub struct Installed {
    /// Keeps the per-run sock_ops link on the agent's own cgroup (if any) attached.
    _ebpf: Ebpf,
    _links: Vec<PinnedLink>,
    pub accepted: HashMap<MapData, u64, ConnRecord>,
    pub program_ids: Vec<(&'static str, u32)>,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LoaderError + '_ {
    move |source| LoaderError::Io {
        path: path.to_owned(),
        source,
    }
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> LoaderError {
    move |source| LoaderError::Map { name, source }
}

fn prog_err(name: &'static str) -> impl FnOnce(ProgramError) -> LoaderError {
    move |source| LoaderError::Program { name, source }
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
            best = Some(MountEntry {
                mount_point,
                fs_type: fs_type.to_owned(),
                propagated: fields
                    .iter()
                    .skip(6)
                    .any(|f| f.starts_with("shared:") || f.starts_with("master:")),
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
fn ensure_bpffs(dir: &Path, allow_private: bool) -> Result<(), LoaderError> {
    let parent = dir.parent().unwrap_or(dir);
    if !is_bpffs(parent) {
        if allow_private && parent == Path::new(BPFFS_MOUNT) {
            mount_bpffs(parent)?;
            tracing::warn!(
                path = BPFFS_MOUNT,
                "--allow-private-bpffs: mounted a bpffs the host may not see; the pins vanish with this agent"
            );
            return Ok(());
        }
        return Err(LoaderError::NotBpffs(dir.to_owned()));
    }
    if allow_private || in_host_mount_namespace() {
        return Ok(());
    }
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").map_err(io_err(parent))?;
    match mount_of(&mountinfo, parent) {
        Some(entry) if entry.fs_type == "bpf" && entry.propagated => Ok(()),
        _ => Err(LoaderError::PrivateBpffs(dir.to_owned())),
    }
}

/// Mounts bpffs at `path` unless one is there (`kiam-agent mount-bpffs`, run by the
/// manifests' init container with the host's `/sys/fs/bpf` and bidirectional propagation, so
/// the mount is the host's). Returns whether it mounted.
pub fn mount_bpffs(path: &Path) -> Result<bool, LoaderError> {
    if is_bpffs(path) {
        return Ok(false);
    }
    fs::create_dir_all(path).map_err(io_err(path))?;
    nix::mount::mount(
        Some("bpf"),
        path,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| LoaderError::Mount(path.to_owned(), e))?;
    Ok(true)
}

/// Maps of the current layout; other `maps-v*` directories belong to older agents.
pub fn maps_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join(format!("maps-v{LAYOUT_VERSION}"))
}

fn is_maps_dir(name: &str) -> bool {
    name == "maps" || name.starts_with("maps-v")
}

pub fn links_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("links")
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<Map, LoaderError> {
    ebpf.take_map(name).ok_or(LoaderError::MissingMap(name))
}

/// Whether the program behind a pinned link is the one just loaded: the same code (tag) using
/// the maps pinned now (the tag ignores map references, and a program holding maps from an
/// older layout or a deleted pin would never see the agent's configuration).
fn pinned_link_runs(link: &FdLink, tag: u64, map_ids: &[u32]) -> Option<u32> {
    let prog_id = link.info().ok()?.program_id();
    let prog = loaded_programs().flatten().find(|p| p.id() == prog_id)?;
    if prog.tag() != tag {
        return None;
    }
    let uses = prog.map_ids().ok()??;
    let stale = uses.iter().any(|id| {
        MapInfo::from_id(*id).is_ok_and(|info| {
            info.name_as_str().is_some_and(|n| n.starts_with("KIAM_")) && !map_ids.contains(id)
        })
    });
    (!stale).then_some(prog_id)
}

/// Loads the object (re-using pinned maps), attaches or re-adopts every program, writes the
/// configuration and the exempt set.
pub fn install(opts: &InstallOptions) -> Result<Installed, LoaderError> {
    let object = opts.object.as_deref().unwrap_or(OBJECT);
    if object.is_empty() {
        return Err(LoaderError::NoObject);
    }
    ensure_bpffs(&opts.pin_dir, opts.allow_private_bpffs)?;
    let maps = maps_dir(&opts.pin_dir);
    let links = links_dir(&opts.pin_dir);
    for dir in [&opts.pin_dir, &maps, &links] {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
    }

    let map_paths: Vec<(&'static str, PathBuf)> = map_names::ALL
        .iter()
        .map(|name| (*name, maps.join(name)))
        .collect();
    let mut loader = EbpfLoader::new();
    for (name, path) in &map_paths {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader.load(object).map_err(LoaderError::Load)?;
    let map_ids: Vec<u32> = map_paths
        .iter()
        .filter_map(|(_, path)| MapInfo::from_pin(path).ok().map(|i| i.id()))
        .collect();

    let mut config: Array<MapData, Config> =
        Array::try_from(take_map(&mut ebpf, map_names::CONFIG)?)
            .map_err(map_err(map_names::CONFIG))?;
    let previous = config.get(&0, 0).map_err(map_err(map_names::CONFIG))?;
    let any_link_pinned = program_names::ALL.iter().any(|p| links.join(p).exists());
    if any_link_pinned
        && previous.attach_cgroup_id != 0
        && previous.attach_cgroup_id != opts.attach_cgroup_id
    {
        return Err(LoaderError::OtherCgroup {
            dir: opts.pin_dir.clone(),
            pinned: previous.attach_cgroup_id,
            wanted: opts.attach_cgroup_id,
        });
    }

    // Exempt set before the configuration: the agent must never be redirected to itself.
    let mut exempt: HashMap<MapData, u64, u32> =
        HashMap::try_from(take_map(&mut ebpf, map_names::EXEMPT)?)
            .map_err(map_err(map_names::EXEMPT))?;
    for id in &opts.exempt {
        exempt
            .insert(id, 1, 0)
            .map_err(map_err(map_names::EXEMPT))?;
    }
    let stale: Vec<u64> = exempt
        .keys()
        .flatten()
        .filter(|id| !opts.exempt.contains(id))
        .collect();
    for id in stale {
        exempt.remove(&id).map_err(map_err(map_names::EXEMPT))?;
    }

    let mut cfg = opts.config;
    cfg.attach_cgroup_id = opts.attach_cgroup_id;
    cfg.flags |= CONFIG_READY;
    config.set(0, cfg, 0).map_err(map_err(map_names::CONFIG))?;

    let cgroup = fs::File::open(&opts.attach_cgroup).map_err(|source| LoaderError::Cgroup {
        path: opts.attach_cgroup.clone(),
        source,
    })?;
    let mut pinned = Vec::new();
    let mut program_ids = Vec::new();
    for name in program_names::ALL {
        let (link, action, prog_id) =
            attach_one(&mut ebpf, name, &cgroup, &links.join(name), &map_ids)?;
        tracing::info!(
            program = name,
            ?action,
            program_id = prog_id,
            "program ready"
        );
        pinned.push(link);
        program_ids.push((name, prog_id));
    }

    if !opts.own_cgroup_covered {
        // The agent's side of the handshake must run sock_ops too. This link is not pinned:
        // it is only useful while this agent is alive to accept connections.
        let own = fs::File::open(&opts.own_cgroup).map_err(|source| LoaderError::Cgroup {
            path: opts.own_cgroup.clone(),
            source,
        })?;
        let prog = sock_ops(&mut ebpf)?;
        // Unloaded again when the pinned sock_ops link was re-adopted; any real load error
        // shows up as the attach error below.
        let _ = prog.load();
        prog.attach(own.as_fd(), LINK_MODE)
            .map_err(prog_err(program_names::SOCK_OPS))?;
        tracing::info!(cgroup = %opts.own_cgroup.display(), "sock_ops attached to the agent's own cgroup");
    }

    // Older layouts' maps are only referenced by programs that were just replaced.
    remove_stale_maps(&opts.pin_dir);

    let accepted = HashMap::try_from(take_map(&mut ebpf, map_names::ACCEPTED)?)
        .map_err(map_err(map_names::ACCEPTED))?;
    Ok(Installed {
        _ebpf: ebpf,
        _links: pinned,
        accepted,
        program_ids,
    })
}

fn sock_ops(ebpf: &mut Ebpf) -> Result<&mut SockOps, LoaderError> {
    let name = program_names::SOCK_OPS;
    let prog: &mut SockOps = ebpf
        .program_mut(name)
        .ok_or(LoaderError::MissingProgram(name))?
        .try_into()
        .map_err(prog_err(name))?;
    Ok(prog)
}

/// One of the program types kiam uses.
enum Prog<'a> {
    SockAddr(&'a mut CgroupSockAddr),
    SockOps(&'a mut SockOps),
    Skb(&'a mut CgroupSkb),
}

impl<'a> Prog<'a> {
    fn of(ebpf: &'a mut Ebpf, name: &'static str) -> Result<Self, LoaderError> {
        let program = ebpf
            .program_mut(name)
            .ok_or(LoaderError::MissingProgram(name))?;
        let prog = match name {
            program_names::CONNECT4
            | program_names::CONNECT6
            | program_names::BIND4
            | program_names::BIND6 => Self::SockAddr(program.try_into().map_err(prog_err(name))?),
            program_names::SOCK_OPS => Self::SockOps(program.try_into().map_err(prog_err(name))?),
            program_names::EGRESS => Self::Skb(program.try_into().map_err(prog_err(name))?),
            _ => return Err(LoaderError::MissingProgram(name)),
        };
        Ok(prog)
    }

    fn load(&mut self) -> Result<aya::programs::ProgramInfo, ProgramError> {
        match self {
            Self::SockAddr(p) => {
                p.load()?;
                p.info()
            }
            Self::SockOps(p) => {
                p.load()?;
                p.info()
            }
            Self::Skb(p) => {
                p.load()?;
                p.info()
            }
        }
    }

    fn unload(&mut self) -> Result<(), ProgramError> {
        match self {
            Self::SockAddr(p) => p.unload(),
            Self::SockOps(p) => p.unload(),
            Self::Skb(p) => p.unload(),
        }
    }

    fn attach(&mut self, cgroup: &fs::File, name: &'static str) -> Result<FdLink, LoaderError> {
        let fd = cgroup.as_fd();
        let mode = LINK_MODE;
        let link = match self {
            Self::SockAddr(p) => {
                let id = p.attach(fd, mode).map_err(prog_err(name))?;
                FdLink::try_from(p.take_link(id).map_err(prog_err(name))?)
            }
            Self::SockOps(p) => {
                let id = p.attach(fd, mode).map_err(prog_err(name))?;
                FdLink::try_from(p.take_link(id).map_err(prog_err(name))?)
            }
            Self::Skb(p) => {
                let id = p
                    .attach(fd, CgroupSkbAttachType::Egress, mode)
                    .map_err(prog_err(name))?;
                FdLink::try_from(p.take_link(id).map_err(prog_err(name))?)
            }
        };
        link.map_err(|source| LoaderError::Link {
            path: PathBuf::from(name),
            source,
        })
    }
}

fn open_pinned_link(pin: &Path) -> Result<PinnedLink, LoaderError> {
    PinnedLink::from_pin(pin).map_err(|source| LoaderError::Link {
        path: pin.to_owned(),
        source,
    })
}

fn pin_link(link: FdLink, pin: &Path) -> Result<PinnedLink, LoaderError> {
    link.pin(pin).map_err(|source| LoaderError::Pin {
        path: pin.to_owned(),
        source,
    })
}

/// Loads `name` and attaches it to `cgroup`, unless the pinned link at `pin` already runs the
/// same code.
fn attach_one(
    ebpf: &mut Ebpf,
    name: &'static str,
    cgroup: &fs::File,
    pin: &Path,
    map_ids: &[u32],
) -> Result<(PinnedLink, LinkAction, u32), LoaderError> {
    let mut prog = Prog::of(ebpf, name)?;
    // Loaded first: the tag tells whether a pinned link runs this very code.
    let info = prog.load().map_err(prog_err(name))?;
    if !pin.exists() {
        let link = prog.attach(cgroup, name)?;
        return Ok((pin_link(link, pin)?, LinkAction::Attached, info.id()));
    }
    let existing: FdLink = open_pinned_link(pin)?.into();
    if let Some(prog_id) = pinned_link_runs(&existing, info.tag(), map_ids) {
        // Same code already attached: keep it, and do not leave an idle copy loaded.
        prog.unload().map_err(prog_err(name))?;
        return Ok((open_pinned_link(pin)?, LinkAction::Readopted, prog_id));
    }
    // Different code: attach the new program beside the old one, then swap the pins, so the
    // hook is never empty. Dropping the last reference to the old link detaches it.
    // bpffs refuses names with a dot: `kiam_connect4_next`, not `kiam_connect4.new`.
    let staged = pin.with_file_name(format!(
        "{}_next",
        pin.file_name().and_then(|n| n.to_str()).unwrap_or(name)
    ));
    let _ = fs::remove_file(&staged);
    let new = pin_link(prog.attach(cgroup, name)?, &staged)?;
    fs::rename(&staged, pin).map_err(io_err(pin))?;
    drop(new);
    drop(existing);
    Ok((open_pinned_link(pin)?, LinkAction::Replaced, info.id()))
}

fn remove_stale_maps(pin_dir: &Path) {
    let current = maps_dir(pin_dir);
    let Ok(entries) = fs::read_dir(pin_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if path != current && is_maps_dir(&name.to_string_lossy()) {
            match fs::remove_dir_all(&path) {
                Ok(()) => tracing::info!(path = %path.display(), "removed maps of an older layout"),
                Err(error) => {
                    tracing::warn!(path = %path.display(), %error, "cannot remove old maps")
                }
            }
        }
    }
}

/// Removes every pin under `pin_dir` (links first, so the hooks go before their maps).
/// Returns the paths removed. Links held open by a running agent stay attached until it exits.
pub fn uninstall(pin_dir: &Path) -> Result<Vec<PathBuf>, LoaderError> {
    let mut removed = Vec::new();
    let mut dirs = vec![links_dir(pin_dir)];
    if let Ok(entries) = fs::read_dir(pin_dir) {
        dirs.extend(
            entries
                .flatten()
                .filter(|e| is_maps_dir(&e.file_name().to_string_lossy()))
                .map(|e| e.path()),
        );
    }
    for dir in &dirs {
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err(dir)(e)),
        };
        for entry in entries {
            let path = entry.map_err(io_err(dir))?.path();
            fs::remove_file(&path).map_err(io_err(&path))?;
            removed.push(path);
        }
        fs::remove_dir(dir).map_err(io_err(dir))?;
    }
    match fs::remove_dir(pin_dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(pin_dir)(e)),
    }
    Ok(removed)
}

/// A pinned link, as `status` reports it.
#[derive(Debug, serde::Serialize)]
pub struct LinkStatus {
    pub program: String,
    pub link_id: u32,
    pub program_id: u32,
    pub program_tag: String,
    pub run_count: u64,
}

/// Everything `kiam-agent status` shows.
#[derive(Debug, serde::Serialize)]
pub struct Status {
    pub pin_dir: PathBuf,
    pub links: Vec<LinkStatus>,
    pub missing_links: Vec<String>,
    pub config: Option<ConfigStatus>,
    pub exempt_cgroups: Vec<u64>,
    pub map_entries: BTreeMap<String, usize>,
    pub counters: BTreeMap<String, u64>,
}

#[derive(Debug, serde::Serialize)]
pub struct ConfigStatus {
    pub attach_cgroup_id: u64,
    pub agent_addr4: String,
    pub agent_addr6: String,
    pub agent_port: u32,
    pub agent_netns_cookie: u64,
    pub ready: bool,
}

/// The cgroup each pinned link is attached to, as the kernel reports it (`cgroup_id:` in
/// the link's fdinfo; 0 once the cgroup is gone); `None` for a link that is not pinned.
pub fn link_cgroups(pin_dir: &Path) -> Result<Vec<(String, Option<u64>)>, LoaderError> {
    let dir = links_dir(pin_dir);
    let mut found = Vec::new();
    for name in program_names::ALL {
        let path = dir.join(name);
        if !path.exists() {
            found.push((name.to_owned(), None));
            continue;
        }
        let link_err = |source| LoaderError::Link {
            path: path.clone(),
            source,
        };
        // Held open while this process's fdinfo is searched for it.
        let link: FdLink = PinnedLink::from_pin(&path).map_err(link_err)?.into();
        let id = link.info().map_err(link_err)?.id();
        found.push((name.to_owned(), fdinfo_cgroup(id)));
        drop(link);
    }
    Ok(found)
}

/// Finds this process's descriptor of link `link_id` and reads its `cgroup_id`.
fn fdinfo_cgroup(link_id: u32) -> Option<u64> {
    let wanted = format!("link_id:\t{link_id}\n");
    fs::read_dir("/proc/self/fdinfo")
        .ok()?
        .flatten()
        .filter_map(|entry| fs::read_to_string(entry.path()).ok())
        .find(|info| info.contains(&wanted))
        .and_then(|info| parse_fdinfo_cgroup(&info))
}

fn parse_fdinfo_cgroup(info: &str) -> Option<u64> {
    info.lines()
        .find_map(|line| line.strip_prefix("cgroup_id:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Reads the pinned state without loading or changing anything.
pub fn status(pin_dir: &Path) -> Result<Status, LoaderError> {
    let links_dir = links_dir(pin_dir);
    let maps_dir = maps_dir(pin_dir);
    let mut links = Vec::new();
    let mut missing_links = Vec::new();
    for name in program_names::ALL {
        let path = links_dir.join(name);
        if !path.exists() {
            missing_links.push(name.to_owned());
            continue;
        }
        let link: FdLink = PinnedLink::from_pin(&path)
            .map_err(|source| LoaderError::Link {
                path: path.clone(),
                source,
            })?
            .into();
        let info = link.info().map_err(|source| LoaderError::Link {
            path: path.clone(),
            source,
        })?;
        let prog = loaded_programs()
            .flatten()
            .find(|p| p.id() == info.program_id());
        links.push(LinkStatus {
            program: name.to_owned(),
            link_id: info.id(),
            program_id: info.program_id(),
            program_tag: prog
                .as_ref()
                .map(|p| format!("{:016x}", p.tag()))
                .unwrap_or_default(),
            run_count: prog.map(|p| p.run_count()).unwrap_or(0),
        });
    }

    let open = |name: &'static str| -> Result<Option<MapData>, LoaderError> {
        let path = maps_dir.join(name);
        if !path.exists() {
            return Ok(None);
        }
        MapData::from_pin(&path).map(Some).map_err(map_err(name))
    };
    let config = match open(map_names::CONFIG)? {
        Some(data) => {
            let array: Array<MapData, Config> =
                Array::try_from(Map::Array(data)).map_err(map_err(map_names::CONFIG))?;
            let c = array.get(&0, 0).map_err(map_err(map_names::CONFIG))?;
            Some(ConfigStatus {
                attach_cgroup_id: c.attach_cgroup_id,
                agent_addr4: kiam_common::addr::from_words(kiam_common::v4_mapped(c.agent_addr4))
                    .to_string(),
                agent_addr6: kiam_common::addr::from_words(c.agent_addr6).to_string(),
                agent_port: c.agent_port,
                agent_netns_cookie: c.agent_netns_cookie,
                ready: c.flags & CONFIG_READY != 0,
            })
        }
        None => None,
    };
    let exempt_cgroups = match open(map_names::EXEMPT)? {
        Some(data) => {
            let map: HashMap<MapData, u64, u32> =
                HashMap::try_from(Map::HashMap(data)).map_err(map_err(map_names::EXEMPT))?;
            map.keys().flatten().collect()
        }
        None => Vec::new(),
    };
    let mut map_entries = BTreeMap::new();
    for name in [map_names::CONNECT, map_names::ACCEPTED] {
        if let Some(data) = open(name)? {
            let map: HashMap<MapData, u64, ConnRecord> =
                HashMap::try_from(Map::LruHashMap(data)).map_err(map_err(name))?;
            map_entries.insert(name.to_owned(), map.keys().flatten().count());
        }
    }
    if let Some(data) = open(map_names::TUPLES)? {
        let map: HashMap<MapData, kiam_common::TupleKey, ConnRecord> =
            HashMap::try_from(Map::LruHashMap(data)).map_err(map_err(map_names::TUPLES))?;
        map_entries.insert(map_names::TUPLES.to_owned(), map.keys().flatten().count());
    }
    let mut counters = BTreeMap::new();
    if let Some(data) = open(map_names::STATS)? {
        let stats: PerCpuArray<MapData, u64> =
            PerCpuArray::try_from(Map::PerCpuArray(data)).map_err(map_err(map_names::STATS))?;
        for (index, name) in stat::NAMES.iter().enumerate() {
            let values = stats
                .get(&(index as u32), 0)
                .map_err(map_err(map_names::STATS))?;
            counters.insert((*name).to_owned(), values.iter().sum());
        }
    }
    Ok(Status {
        pin_dir: pin_dir.to_owned(),
        links,
        missing_links,
        config,
        exempt_cgroups,
        map_entries,
        counters,
    })
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
    fn cgroup_links_name_their_cgroup_in_fdinfo() {
        let info = "pos:\t0\nflags:\t02000000\nmnt_id:\t15\nino:\t1057\nlink_type:\tcgroup\nlink_id:\t42\nprog_tag:\t0123456789abcdef\nprog_id:\t97\ncgroup_id:\t5301\nattach_type:\t10\n";
        assert_eq!(parse_fdinfo_cgroup(info), Some(5301));
        assert_eq!(parse_fdinfo_cgroup("link_type:\txdp\nlink_id:\t1\n"), None);
    }

    #[test]
    fn the_mount_holding_a_path_and_whether_it_propagates() {
        let pins = Path::new("/sys/fs/bpf/kiam");
        let cases = [
            (HOST, pins, Some(("/sys/fs/bpf", "bpf", true))),
            (
                CONTAINER_HOST_TO_CONTAINER,
                pins,
                Some(("/sys/fs/bpf", "bpf", true)),
            ),
            (CONTAINER_PRIVATE, pins, Some(("/sys/fs/bpf", "bpf", false))),
            (
                HOST,
                Path::new("/sys/fs/bpf/odd dir/x"),
                Some(("/sys/fs/bpf/odd dir", "tmpfs", false)),
            ),
            (
                HOST,
                Path::new("/sys/fs/bpfx"),
                Some(("/sys", "sysfs", true)),
            ),
            (HOST, Path::new("/tmp/x"), Some(("/", "ext4", true))),
            ("", pins, None),
        ];
        for (mountinfo, path, want) in cases {
            let got = mount_of(mountinfo, path);
            let got = got.as_ref().map(|m| {
                (
                    m.mount_point.to_str().unwrap_or(""),
                    m.fs_type.as_str(),
                    m.propagated,
                )
            });
            assert_eq!(got, want, "{}", path.display());
        }
    }
}
