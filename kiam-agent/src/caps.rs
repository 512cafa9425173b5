//! The capabilities `run` needs, checked before anything is touched, so a missing one is one
//! clear error (in a container runtime that dropped it, say) instead of a kernel `EPERM` from
//! deep inside the loader.

use std::fmt;

/// A capability, by its number in `linux/capability.h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cap {
    pub name: &'static str,
    pub bit: u32,
}

pub const DAC_READ_SEARCH: Cap = Cap {
    name: "DAC_READ_SEARCH",
    bit: 2,
};
pub const NET_ADMIN: Cap = Cap {
    name: "NET_ADMIN",
    bit: 12,
};
pub const SYS_ADMIN: Cap = Cap {
    name: "SYS_ADMIN",
    bit: 21,
};
pub const BPF: Cap = Cap {
    name: "BPF",
    bit: 39,
};

/// What `run` needs: BPF to load programs and maps, NET_ADMIN to attach them to cgroups and
/// add the link-local address, SYS_ADMIN to find pinned programs and maps by id when it
/// re-adopts them.
pub const REQUIRED: [Cap; 3] = [BPF, NET_ADMIN, SYS_ADMIN];
/// Without it, callers are resolved by walking the cgroup tree instead of opening their
/// cgroup by id: slower, still correct.
pub const WANTED: [Cap; 1] = [DAC_READ_SEARCH];

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub struct Missing(pub Vec<&'static str>);

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "kiam-agent run needs the capabilities {}; this process lacks {} (add them to the container's securityContext, as the DaemonSet does, or run as root on the host)",
            REQUIRED.map(|c| c.name).join(", "),
            self.0.join(", ")
        )
    }
}

/// The effective set, from `/proc/self/status`'s `CapEff:` line.
pub fn effective(proc_status: &str) -> Option<u64> {
    proc_status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

pub fn has(set: u64, cap: Cap) -> bool {
    set & (1 << cap.bit) != 0
}

/// The required capabilities missing from `set`. Kernels before 5.8 have no CAP_BPF and
/// want SYS_ADMIN for it, which is required anyway.
pub fn missing(set: u64) -> Vec<&'static str> {
    REQUIRED
        .iter()
        .filter(|cap| {
            let stands_in = **cap == BPF && has(set, SYS_ADMIN);
            !(has(set, **cap) || stands_in)
        })
        .map(|cap| cap.name)
        .collect()
}

/// Checks this process; warns about wanted capabilities.
pub fn check() -> Result<(), Missing> {
    let Some(set) = std::fs::read_to_string("/proc/self/status")
        .ok()
        .as_deref()
        .and_then(effective)
    else {
        tracing::warn!("cannot read this process's capabilities; going on");
        return Ok(());
    };
    let missing = missing(set);
    if !missing.is_empty() {
        return Err(Missing(missing));
    }
    for cap in WANTED {
        if !has(set, cap) {
            tracing::warn!(
                capability = cap.name,
                "missing: callers' cgroups are found by walking the cgroup tree, not opened by id"
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effective_sets_are_read_and_checked() {
        let status = "Name:\tkiam-agent\nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\nCapEff:\t000001ffffffffff\n";
        let all = effective(status).expect("CapEff");
        assert_eq!(missing(all), Vec::<&str>::new());
        // The DaemonSet's set: BPF, NET_ADMIN, SYS_ADMIN, DAC_READ_SEARCH.
        let daemonset = (1 << 39) | (1 << 12) | (1 << 21) | (1 << 2);
        assert!(missing(daemonset).is_empty());
        // A container runtime's default set (no NET_ADMIN, SYS_ADMIN or BPF).
        let default = effective("CapEff:\t00000000a80425fb\n").expect("CapEff");
        assert_eq!(missing(default), vec!["BPF", "NET_ADMIN", "SYS_ADMIN"]);
        // Before CAP_BPF, SYS_ADMIN stands in for it.
        assert!(missing((1 << 12) | (1 << 21)).is_empty());
        assert_eq!(missing(1 << 39), vec!["NET_ADMIN", "SYS_ADMIN"]);
        assert_eq!(effective("Name:\tx\n"), None);
        let message = Missing(missing(0)).to_string();
        assert!(
            message.contains("lacks BPF, NET_ADMIN, SYS_ADMIN"),
            "{message}"
        );
    }
}
