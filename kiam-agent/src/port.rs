//! The agent's port must never be one the kernel hands out by itself. A host-network pod that
//! loops `bind(0)`, or calls `listen()` on an unbound socket, is given any free port of
//! `net.ipv4.ip_local_port_range` (widened ranges such as `1024 65535` are common tuning):
//! while the agent is down it would get the agent's port, every pod's metadata traffic with
//! it, and the restarted agent could not bind. The kernel never hands out ports listed in
//! `net.ipv4.ip_local_reserved_ports` (for IPv6 too), so the agent's port is added there
//! (by the manifests' privileged init container, `kiam-agent prepare-node`, or by the agent
//! itself where `/proc/sys` is writable); an agent whose port is in the range and cannot be
//! reserved refuses to start. The kernel programs' `post_bind` guard is the second line.

use std::{fs, io, ops::RangeInclusive};

const RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";
const RESERVED: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

#[derive(Debug, thiserror::Error)]
pub enum PortError {
    #[error(
        "--port {port} is inside net.ipv4.ip_local_port_range ({low}-{high}) and not in net.ipv4.ip_local_reserved_ports, so the kernel may give it to any process while the agent restarts; reserve it (sysctl -w net.ipv4.ip_local_reserved_ports={port}; the manifests' init container runs `kiam-agent prepare-node`) or pick a port outside the range"
    )]
    Ephemeral { port: u16, low: u16, high: u16 },
    #[error("reading {path}")]
    Read {
        path: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{path} holds {text:?}, not what the kernel writes there")]
    Parse { path: &'static str, text: String },
}

/// What [`ensure_reserved`] found or did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reservation {
    /// Outside the ephemeral range: the kernel never picks it.
    OutsideRange,
    AlreadyReserved,
    /// Added to `ip_local_reserved_ports` now.
    Reserved,
}

/// `ip_local_port_range`: `low<tab>high`.
pub fn parse_range(text: &str) -> Option<RangeInclusive<u16>> {
    let mut words = text.split_whitespace().map(str::parse::<u16>);
    match (words.next(), words.next(), words.next()) {
        (Some(Ok(low)), Some(Ok(high)), None) => Some(low..=high),
        _ => None,
    }
}

/// `ip_local_reserved_ports`: comma-separated ports and `low-high` ranges, or empty.
pub fn parse_reserved(text: &str) -> Option<Vec<RangeInclusive<u16>>> {
    text.trim()
        .split(',')
        .filter(|part| !part.is_empty())
        .map(|part| match part.split_once('-') {
            Some((low, high)) => Some(low.parse().ok()?..=high.parse().ok()?),
            None => {
                let port = part.parse().ok()?;
                Some(port..=port)
            }
        })
        .collect()
}

fn read(path: &'static str) -> Result<String, PortError> {
    fs::read_to_string(path).map_err(|source| PortError::Read { path, source })
}

/// Makes sure the kernel never hands out `port` in this network namespace: reserves it when
/// it is inside the ephemeral range, or says why it cannot.
pub fn ensure_reserved(port: u16) -> Result<Reservation, PortError> {
    let text = read(RANGE)?;
    let range = parse_range(&text).ok_or(PortError::Parse { path: RANGE, text })?;
    if !range.contains(&port) {
        return Ok(Reservation::OutsideRange);
    }
    let text = read(RESERVED)?;
    let reserved = parse_reserved(&text).ok_or_else(|| PortError::Parse {
        path: RESERVED,
        text: text.clone(),
    })?;
    if reserved.iter().any(|r| r.contains(&port)) {
        return Ok(Reservation::AlreadyReserved);
    }
    let with_port = match text.trim() {
        "" => port.to_string(),
        list => format!("{list},{port}"),
    };
    match fs::write(RESERVED, with_port) {
        Ok(()) => Ok(Reservation::Reserved),
        Err(error) => {
            tracing::debug!(%error, "cannot write {RESERVED}");
            Err(PortError::Ephemeral {
                port,
                low: *range.start(),
                high: *range.end(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernels_port_lists_are_read_as_it_writes_them() {
        assert_eq!(parse_range("32768\t60999\n"), Some(32768..=60999));
        assert_eq!(parse_range("1024 65535"), Some(1024..=65535));
        assert_eq!(parse_range("1024"), None);
        assert_eq!(parse_range("a b"), None);
        assert_eq!(parse_reserved("\n"), Some(vec![]));
        assert_eq!(
            parse_reserved("8186,9000-9010\n"),
            Some(vec![8186..=8186, 9000..=9010])
        );
        assert_eq!(parse_reserved("x"), None);
    }
}
