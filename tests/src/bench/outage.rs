//! A credential fetch as an SDK makes it (token PUT, role listing, credentials GET), timed
//! inside a pod while the servers are healthy, frozen (SIGSTOP) and killed: the agent serves
//! what it holds at once, so an outage costs at most twice the healthy time. Shared by
//! `cargo xtask bench` and `tests/tests/faults.rs`.

use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use serde::Serialize;
use serde_json::json;

use super::Options;
use crate::{
    cluster::Cluster,
    node::{HELPER, Node, Pod},
};

/// One call of a fetch: its step (`token`, `role`, `credentials`), HTTP status, microseconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Call {
    pub step: String,
    pub status: String,
    pub micros: u64,
}

/// One fetch from inside `pod`: its three calls, and the access key it was served.
pub fn fetch(node: &Node, pod: &Pod) -> anyhow::Result<(Vec<Call>, String)> {
    let out = node.run_in(
        &pod.cgroup,
        &pod.netns,
        &[
            HELPER.as_str(),
            "fetch-credentials",
            "http://169.254.169.254",
        ],
    );
    let mut calls = Vec::new();
    let mut key = None;
    for line in out.lines() {
        match line.split_whitespace().collect::<Vec<_>>().as_slice() {
            ["key", k] => key = Some((*k).to_owned()),
            [step, status, micros] => calls.push(Call {
                step: (*step).to_owned(),
                status: (*status).to_owned(),
                micros: micros.parse().context("microseconds")?,
            }),
            _ => bail!("unexpected fetch-credentials output: {out}"),
        }
    }
    Ok((calls, key.ok_or_else(|| anyhow!("no key line: {out}"))?))
}

/// Microseconds the calls took together.
pub fn total(calls: &[Call]) -> u64 {
    calls.iter().map(|c| c.micros).sum()
}

/// The median of `rounds` fetches, each once the pod's role is older than the agent's
/// `--role-ttl` of 1 s (so every fetch asks the servers, or would): microseconds, and every
/// key served. Any call not answered 200 is an error.
pub fn median_fetch(node: &Node, pod: &Pod, rounds: usize) -> anyhow::Result<(u64, Vec<String>)> {
    let mut totals = Vec::new();
    let mut keys = Vec::new();
    for _ in 0..rounds.max(1) {
        std::thread::sleep(Duration::from_millis(1100));
        let (calls, key) = fetch(node, pod)?;
        if calls.len() != 3 || calls.iter().any(|c| c.status != "200") {
            bail!("a fetch failed: {calls:?}");
        }
        totals.push(total(&calls));
        keys.push(key);
    }
    totals.sort_unstable();
    Ok((totals[totals.len() / 2], keys))
}

/// Sends `signal` (`STOP`, `CONT`, `KILL`) to `pid`.
pub fn signal(pid: u32, signal: &str) -> anyhow::Result<()> {
    let status = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .context("kill")?;
    if !status.success() {
        bail!("kill -{signal} {pid} failed");
    }
    Ok(())
}

/// The agent's `kiam_agent_servers_reachable`, -1 when it cannot be read.
pub fn servers_reachable(node: &Node) -> f64 {
    crate::metric(&node.agent_metrics(), "kiam_agent_servers_reachable").unwrap_or(-1.0)
}

/// The bench's figures: median fetch times, and their ratio to the healthy one.
#[derive(Debug, Serialize)]
pub struct Outage {
    pub rounds: usize,
    pub healthy_us: u64,
    pub frozen_us: u64,
    pub killed_us: u64,
    pub frozen_ratio: f64,
    pub killed_ratio: f64,
    /// Every fetch during the outage was served the key held before it.
    pub held_key_served: bool,
}

impl Outage {
    pub fn run(options: &Options) -> anyhow::Result<Self> {
        let rounds = options.rounds.max(1) * 2 + 1;
        let mut c = Cluster::team(&["--role-ttl", "1s"]);
        let pod = c.pod("a", json!({"iam.amazonaws.com/role": "app-a"}));
        if !c.node.served(&pod, "app-a") {
            bail!("the pod was never served its role");
        }
        let (healthy_us, keys) = median_fetch(&c.node, &pod, rounds)?;
        let held = keys.last().cloned().unwrap_or_default();
        let mut during = Vec::new();
        let mut held_key_served = true;
        for fault in ["STOP", "KILL"] {
            for server in &c.servers {
                signal(server.pid(), fault)?;
            }
            if !crate::poll(Duration::from_secs(15), || {
                servers_reachable(&c.node) == 0.0
            }) {
                bail!("the agent never noticed SIG{fault}");
            }
            let (median, keys) = median_fetch(&c.node, &pod, rounds)?;
            held_key_served &= keys.iter().all(|k| *k == held);
            during.push(median);
            if fault == "STOP" {
                for server in &c.servers {
                    signal(server.pid(), "CONT")?;
                }
                if !crate::poll(Duration::from_secs(15), || {
                    servers_reachable(&c.node) >= 1.0
                }) {
                    bail!("the servers never came back after SIGCONT");
                }
            }
        }
        let ratio = |us: u64| us as f64 / healthy_us.max(1) as f64;
        Ok(Self {
            rounds,
            healthy_us,
            frozen_us: during[0],
            killed_us: during[1],
            frozen_ratio: ratio(during[0]),
            killed_ratio: ratio(during[1]),
            held_key_served,
        })
    }

    pub fn table(&self) -> String {
        format!(
            "\n7. a credential fetch (token, role, credentials) in a server outage ({} fetches each, medians): healthy {:.1} ms; servers frozen {:.1} ms ({:.2}x); servers killed {:.1} ms ({:.2}x); the held key served throughout: {}\n",
            self.rounds,
            self.healthy_us as f64 / 1e3,
            self.frozen_us as f64 / 1e3,
            self.frozen_ratio,
            self.killed_us as f64 / 1e3,
            self.killed_ratio,
            self.held_key_served
        )
    }
}
