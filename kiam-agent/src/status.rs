//! `kiam-agent status`: the pinned state (links, configuration, maps, kernel counters) read
//! from bpffs, and the running agent's requests by route read from its admin listener.

use std::collections::BTreeMap;

use anyhow::Context as _;

use crate::{config::StatusArgs, pins};

pub use kiam_ops::admin_get;

/// Sums `kiam_agent_imds_requests_total` by its `route` label.
pub fn requests_by_route(metrics: &str) -> BTreeMap<String, u64> {
    let mut routes = BTreeMap::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("kiam_agent_imds_requests_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        let route = labels
            .split(',')
            .find_map(|l| l.strip_prefix("route=\""))
            .map(|r| r.trim_end_matches('"'));
        let value = value.trim().parse::<f64>().ok();
        if let (Some(route), Some(value)) = (route, value) {
            *routes.entry(route.to_owned()).or_default() += value as u64;
        }
    }
    routes
}

#[derive(serde::Serialize)]
struct Report {
    #[serde(flatten)]
    pins: pins::Status,
    /// `None` when the agent's admin listener did not answer.
    requests_by_route: Option<BTreeMap<String, u64>>,
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
    let requests_by_route = match &metrics {
        Ok((200, text)) => Some(requests_by_route(text)),
        _ => None,
    };
    if args.json {
        let report = Report {
            pins,
            requests_by_route,
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
# EOF
";
        let routes = requests_by_route(text);
        assert_eq!(routes.get("passthrough"), Some(&4));
        assert_eq!(routes.get("credentials"), Some(&12));
        assert_eq!(routes.len(), 2);
        assert!(requests_by_route("").is_empty());
    }
}
