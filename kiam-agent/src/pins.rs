//! The pins under `--bpffs-dir`: where each lives, and read-only inspection of what is pinned
//! (links, the programs behind them, configuration, map fill, kernel counters) for
//! `kiam-agent status`, `kiam-agent health` and the agent's metrics. Nothing here loads,
//! attaches or changes anything; that is [`crate::loader`]. The metrics read through a lean
//! [`Sampler`] that keeps its maps open; `status` is the full picture, made on demand.
//!
//! Layout: `<pin dir>/maps-v<layout>/KIAM_*` and `<pin dir>/links/kiam_*`.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray},
    programs::{
        links::{FdLink, LinkError, PinnedLink},
        loaded_programs,
    },
};
use kiam_common::{
    CONFIG_READY, Config, ConnRecord, LAYOUT_VERSION, map_names, program_names, stat,
};

#[derive(Debug, thiserror::Error)]
pub enum PinsError {
    #[error("pinned link {}", path.display())]
    Link {
        path: PathBuf,
        #[source]
        source: LinkError,
    },
    #[error("map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> PinsError {
    move |source| PinsError::Map { name, source }
}

/// Maps of the current layout; other `maps-v*` directories belong to older agents.
pub fn maps_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join(format!("maps-v{LAYOUT_VERSION}"))
}

pub(crate) fn is_maps_dir(name: &str) -> bool {
    name == "maps" || name.starts_with("maps-v")
}

pub fn links_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("links")
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
pub fn link_cgroups(pin_dir: &Path) -> Result<Vec<(String, Option<u64>)>, PinsError> {
    let dir = links_dir(pin_dir);
    let mut found = Vec::new();
    for name in program_names::ALL {
        let path = dir.join(name);
        if !path.exists() {
            found.push((name.to_owned(), None));
            continue;
        }
        let link_err = |source| PinsError::Link {
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
pub fn status(pin_dir: &Path) -> Result<Status, PinsError> {
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
            .map_err(|source| PinsError::Link {
                path: path.clone(),
                source,
            })?
            .into();
        let info = link.info().map_err(|source| PinsError::Link {
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

    let sample = Sampler::new(pin_dir).sample()?;
    let config = sample.config.map(|c| ConfigStatus {
        attach_cgroup_id: c.attach_cgroup_id,
        agent_addr4: kiam_common::addr::from_words(kiam_common::v4_mapped(c.agent_addr4))
            .to_string(),
        agent_addr6: kiam_common::addr::from_words(c.agent_addr6).to_string(),
        agent_port: c.agent_port,
        agent_netns_cookie: c.agent_netns_cookie,
        ready: is_ready(&c),
    });
    let exempt_cgroups = match open_pinned(&maps_dir, map_names::EXEMPT)? {
        Some(data) => {
            let map: HashMap<MapData, u64, u32> =
                HashMap::try_from(Map::HashMap(data)).map_err(map_err(map_names::EXEMPT))?;
            map.keys().flatten().collect()
        }
        None => Vec::new(),
    };
    let (map_entries, counters) = (sample.map_entries, sample.counters);
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

/// Whether the pinned configuration says the agent finished configuring the programs.
pub fn is_ready(config: &Config) -> bool {
    config.flags & CONFIG_READY != 0
}

fn open_pinned(maps_dir: &Path, name: &'static str) -> Result<Option<MapData>, PinsError> {
    let path = maps_dir.join(name);
    if !path.exists() {
        return Ok(None);
    }
    MapData::from_pin(&path).map(Some).map_err(map_err(name))
}

/// What the agent's metrics read of the pins every `--kernel-metrics-interval`.
#[derive(Debug, Default)]
pub struct Sample {
    /// The pinned configuration, when there is one.
    pub config: Option<Config>,
    /// `KIAM_STATS` by name, summed over CPUs.
    pub counters: BTreeMap<String, u64>,
    /// Entries of the per-connection maps, by map name.
    pub map_entries: BTreeMap<String, usize>,
    /// Links pinned, of [`program_names::ALL`].
    pub links_pinned: usize,
}

/// The maps a [`Sample`] reads, opened once.
struct Opened {
    config: Option<Array<MapData, Config>>,
    stats: Option<PerCpuArray<MapData, u64>>,
    connections: Vec<(&'static str, HashMap<MapData, u64, ConnRecord>)>,
    tuples: Option<HashMap<MapData, kiam_common::TupleKey, ConnRecord>>,
}

/// The lean reader behind the metrics: the maps are opened on the first sample and kept
/// (opened again after a failed read, as after an uninstall and a new install); links are
/// counted by their pins, without opening them or walking the host's programs. Counting a
/// map's entries is still one system call per entry (at most the maps' capacities, 16,384).
pub struct Sampler {
    pin_dir: PathBuf,
    opened: Option<Opened>,
}

impl Sampler {
    pub fn new(pin_dir: &Path) -> Self {
        Self {
            pin_dir: pin_dir.to_owned(),
            opened: None,
        }
    }

    fn open(&self) -> Result<Opened, PinsError> {
        let dir = maps_dir(&self.pin_dir);
        let config = open_pinned(&dir, map_names::CONFIG)?
            .map(|data| Array::try_from(Map::Array(data)).map_err(map_err(map_names::CONFIG)))
            .transpose()?;
        let stats = open_pinned(&dir, map_names::STATS)?
            .map(|data| {
                PerCpuArray::try_from(Map::PerCpuArray(data)).map_err(map_err(map_names::STATS))
            })
            .transpose()?;
        let mut connections = Vec::new();
        for name in [map_names::CONNECT, map_names::ACCEPTED] {
            if let Some(data) = open_pinned(&dir, name)? {
                let map = HashMap::try_from(Map::LruHashMap(data)).map_err(map_err(name))?;
                connections.push((name, map));
            }
        }
        let tuples = open_pinned(&dir, map_names::TUPLES)?
            .map(|data| {
                HashMap::try_from(Map::LruHashMap(data)).map_err(map_err(map_names::TUPLES))
            })
            .transpose()?;
        Ok(Opened {
            config,
            stats,
            connections,
            tuples,
        })
    }

    /// Reads the pins; after an error the maps are opened again on the next call.
    pub fn sample(&mut self) -> Result<Sample, PinsError> {
        let opened = match self.opened.take() {
            Some(opened) => opened,
            None => self.open()?,
        };
        let sample = Self::read(&opened, &self.pin_dir)?;
        self.opened = Some(opened);
        Ok(sample)
    }

    fn read(opened: &Opened, pin_dir: &Path) -> Result<Sample, PinsError> {
        let config = opened
            .config
            .as_ref()
            .map(|array| array.get(&0, 0).map_err(map_err(map_names::CONFIG)))
            .transpose()?;
        let mut counters = BTreeMap::new();
        if let Some(stats) = &opened.stats {
            for (index, name) in stat::NAMES.iter().enumerate() {
                let values = stats
                    .get(&(index as u32), 0)
                    .map_err(map_err(map_names::STATS))?;
                counters.insert((*name).to_owned(), values.iter().sum());
            }
        }
        let mut map_entries = BTreeMap::new();
        for (name, map) in &opened.connections {
            map_entries.insert((*name).to_owned(), map.keys().flatten().count());
        }
        if let Some(tuples) = &opened.tuples {
            map_entries.insert(
                map_names::TUPLES.to_owned(),
                tuples.keys().flatten().count(),
            );
        }
        let links = links_dir(pin_dir);
        let links_pinned = program_names::ALL
            .iter()
            .filter(|name| links.join(name).exists())
            .count();
        Ok(Sample {
            config,
            counters,
            map_entries,
            links_pinned,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_links_name_their_cgroup_in_fdinfo() {
        let info = "pos:\t0\nflags:\t02000000\nmnt_id:\t15\nino:\t1057\nlink_type:\tcgroup\nlink_id:\t42\nprog_tag:\t0123456789abcdef\nprog_id:\t97\ncgroup_id:\t5301\nattach_type:\t10\n";
        assert_eq!(parse_fdinfo_cgroup(info), Some(5301));
        assert_eq!(parse_fdinfo_cgroup("link_type:\txdp\nlink_id:\t1\n"), None);
    }
}
