//! Loads the kernel programs, attaches them with bpf links and pins everything under one
//! bpffs directory, so the redirect outlives the agent (fail closed: with the agent gone, pods
//! get "connection refused", never the node's metadata service).
//!
//! Layout: see [`crate::pins`]; the pins must live on a bpffs the host sees
//! ([`crate::bpffs`]). A restarted agent loads the object again with the pinned maps, then for each program either re-adopts the pinned link
//! (same program tag) or swaps in the new program: the new link is attached and pinned beside
//! the old one, then renamed over it, so the hook is never empty.

use std::{
    fs, io,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, MapError, MapInfo},
    pin::PinError,
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr, ProgramError,
        SockOps,
        links::{FdLink, LinkError, PinnedLink},
        loaded_programs,
    },
};
use kiam_common::{CONFIG_READY, Config, ConnRecord, map_names, program_names};

use crate::{
    bpffs::{self, BpffsError},
    pins::{is_maps_dir, links_dir, maps_dir},
};

/// The eBPF object built by `cargo xtask build-ebpf`, embedded at build time (empty when the
/// agent was built without it).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/kiam-ebpf.o"));

/// Cgroup bpf links always attach in multi mode (beside Cilium's and others' programs); the
/// kernel rejects `BPF_LINK_CREATE` with any attach flag, so "single" is what asks for that.
const LINK_MODE: CgroupAttachMode = CgroupAttachMode::Single;

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error(
        "this kiam-agent was built without its eBPF object: run `cargo xtask build-ebpf`, then rebuild the agent"
    )]
    NoObject,
    #[error(transparent)]
    Bpffs(#[from] BpffsError),
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
    pub throttle: HashMap<MapData, u64, u64>,
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
    bpffs::ensure(&opts.pin_dir, opts.allow_private_bpffs)?;
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
    let throttle = HashMap::try_from(take_map(&mut ebpf, map_names::THROTTLE)?)
        .map_err(map_err(map_names::THROTTLE))?;
    Ok(Installed {
        _ebpf: ebpf,
        _links: pinned,
        accepted,
        throttle,
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
    Sock(&'a mut CgroupSock),
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
            program_names::POST_BIND4 | program_names::POST_BIND6 => {
                Self::Sock(program.try_into().map_err(prog_err(name))?)
            }
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
            Self::Sock(p) => {
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
            Self::Sock(p) => p.unload(),
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
            Self::Sock(p) => {
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
