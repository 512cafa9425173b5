//! `kiam-agent status`: the pinned state (links, configuration, maps, kernel counters) read
//! from bpffs, and the running agent's requests by route read from its admin listener.

use std::collections::BTreeMap;

use anyhow::Context as _;

use crate::{config::StatusArgs, pins};

pub use kiam_ops::admin_get;

/// Sums `kiam_agent_imds_requests_total` by its `route` label.
pub fn requests_by_route(metrics: &str) -> BTreeMap<String, u64> {
    sum_by(metrics, "kiam_agent_imds_requests_total", "route")
}

/// Sums the counter `name` by its label `label`.
fn sum_by(metrics: &str, name: &str, label: &str) -> BTreeMap<String, u64> {
    let mut sums = BTreeMap::new();
    let (prefix, key) = (format!("{name}{{"), format!("{label}=\""));
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix(prefix.as_str()) else {
            continue;
        };
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        let found = labels
            .split(',')
            .find_map(|l| l.strip_prefix(key.as_str()))
            .map(|r| r.trim_end_matches('"'));
        let value = value.trim().parse::<f64>().ok();
        if let (Some(found), Some(value)) = (found, value) {
            *sums.entry(found.to_owned()).or_default() += value as u64;
        }
    }
    sums
}

#[derive(serde::Serialize)]
struct Report {
    #[serde(flatten)]
    pins: pins::Status,
    /// `None` when the agent's admin listener did not answer.
    requests_by_route: Option<BTreeMap<String, u64>>,
    /// Credentials served by scope: `pod` (the pod's role) or `container` (a container's
    /// own); `None` as above.
    credentials_by_scope: Option<BTreeMap<String, u64>>,
}

pub fn show(args: &StatusArgs) -> anyhow::Result<()> {
    let dir = &args.pins.bpffs_dir;
    if !dir.exists() {
        anyhow::bail!(
            "nothing pinned at {} (--bpffs-dir): the agent has not run here, or was uninstalled",
            dir.display()
        );
    }
    let pins = pins::status(dir)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let metrics = runtime.block_on(admin_get(args.admin_listen, "/metrics"));
    let (requests_by_route, credentials_by_scope) = match &metrics {
        Ok((200, text)) => (
            Some(requests_by_route(text)),
            Some(sum_by(text, "kiam_agent_credentials_served_total", "scope")),
        ),
        _ => (None, None),
    };
    if args.json {
        let report = Report {
            pins,
            requests_by_route,
            credentials_by_scope,
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("pinned at {}", pins.pin_dir.display());
    for link in &pins.links {
        println!(
            "  link {:<14} link_id={} prog_id={} tag={} runs={}",
            link.program, link.link_id, link.program_id, link.program_tag, link.run_count
        );
    }
    for name in &pins.missing_links {
        println!("  link {name:<14} MISSING");
    }
    match &pins.config {
        Some(c) => println!(
            "  config: agent {}:{} / [{}]:{} attach_cgroup_id={} netns_cookie={} ready={}",
            c.agent_addr4,
            c.agent_port,
            c.agent_addr6,
            c.agent_port,
            c.attach_cgroup_id,
            c.agent_netns_cookie,
            c.ready
        ),
        None => println!("  config: MISSING"),
    }
    println!("  exempt cgroups: {:?}", pins.exempt_cgroups);
    for (name, entries) in &pins.map_entries {
        println!("  map {name:<14} entries={entries}");
    }
    for (name, value) in &pins.counters {
        println!("  counter {name:<22} {value}");
    }
    match (requests_by_route, metrics) {
        (Some(routes), _) => {
            println!("agent at {}", args.admin_listen);
            for (route, count) in routes {
                println!("  requests {route:<20} {count}");
            }
            for (scope, count) in credentials_by_scope.unwrap_or_default() {
                println!("  credentials served ({scope} roles) {count}");
            }
        }
        (None, Ok((status, _))) => {
            println!("agent at {}: /metrics answered {status}", args.admin_listen)
        }
        (None, Err(error)) => println!(
            "agent at {}: not reachable ({error}); --admin-listen names it",
            args.admin_listen
        ),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_summed_by_route() {
        let text = "\
# HELP kiam_agent_imds_requests Metadata requests by route and HTTP status.
# TYPE kiam_agent_imds_requests counter
kiam_agent_imds_requests_total{route=\"passthrough\",status=\"200\"} 3
kiam_agent_imds_requests_total{route=\"passthrough\",status=\"401\"} 1
kiam_agent_imds_requests_total{route=\"credentials\",status=\"200\"} 12
kiam_agent_refused_connections_total{reason=\"no_record\"} 2
kiam_agent_credentials_served_total{scope=\"pod\"} 5
kiam_agent_credentials_served_total{scope=\"container\"} 7
# EOF
";
        let routes = requests_by_route(text);
        assert_eq!(routes.get("passthrough"), Some(&4));
        assert_eq!(routes.get("credentials"), Some(&12));
        assert_eq!(routes.len(), 2);
        assert!(requests_by_route("").is_empty());
        let scopes = sum_by(text, "kiam_agent_credentials_served_total", "scope");
        assert_eq!(scopes.get("pod"), Some(&5));
        assert_eq!(scopes.get("container"), Some(&7));
    }
}
