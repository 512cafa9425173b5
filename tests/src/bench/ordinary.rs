//! What kiam's programs cost pods' ordinary traffic (not to the metadata address): every pod
//! pays it on every connection and packet.
//!
//! The figure that answers it is the programs' own time: with the kernel's BPF statistics
//! (`kernel.bpf_stats_enabled`), the run time of every kiam program attached to the pods
//! cgroup, per connection, per exchange and per second of bulk transfer, set beside the time
//! each of those takes. It leads the report.
//!
//! End to end, the same client runs in three states, in the same network namespace: in a
//! cgroup beside the attach point at the same depth (detached: no program runs), in a pod's
//! cgroup below it with the agent running (attached), and there with the agent stopped (the
//! pinned programs still run). Each round runs the three in a different order (rotated), so
//! drift and what runs first do not favour one; the report gives each state's median and the
//! spread of the rounds' ratios. On a 2-core VM that spread is ±10 % or more, far more than
//! what is measured: the end-to-end ratios say whether there is a large cost, not a small one.

use std::{fs, path::PathBuf, process::Command, time::Duration};

use anyhow::{Context as _, bail};
use serde::Serialize;

use super::{Options, in_pod, load::Stats, median, serve_in, tune_netns};
use crate::node::{AGENT_IP, Node, Pod};

const ECHO_PORT: u16 = 9000;
const IPERF_PORT: u16 = 5201;

/// The three states a round measures, in the order of [`STATES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Detached,
    Attached,
    AgentStopped,
}

const STATES: [State; 3] = [State::Detached, State::Attached, State::AgentStopped];

/// The states in round `round`'s order: rotated by one each round.
fn order(round: usize) -> [State; 3] {
    let mut order = STATES;
    order.rotate_left(round % STATES.len());
    order
}

/// A ratio to the detached state: the median of the rounds' ratios, and their spread.
#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// Each round's ratio.
    pub rounds: Vec<f64>,
}

impl Ratio {
    fn of(state: &[f64], detached: &[f64]) -> Self {
        let rounds: Vec<f64> = state
            .iter()
            .zip(detached)
            .map(|(s, d)| s / d.max(1e-9))
            .collect();
        Self {
            median: median(rounds.clone()),
            min: rounds.iter().copied().fold(f64::INFINITY, f64::min),
            max: rounds.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            rounds,
        }
    }

    fn show(&self) -> String {
        format!("{:.2}x ({:.2}-{:.2})", self.median, self.min, self.max)
    }
}

/// One kind of traffic: the programs' time, then each state's median and the ratios.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    pub name: &'static str,
    pub unit: &'static str,
    /// Time the kiam programs ran per operation (per connection, per exchange, per second of
    /// transfer), nanoseconds.
    pub program_ns_per_op: f64,
    /// That time over the operation's own (1/rate; a second for bulk): the programs' share.
    pub program_share: f64,
    pub detached: f64,
    pub attached: f64,
    pub agent_stopped: f64,
    /// attached / detached: 1.00 costs nothing, 0.98 costs 2 %.
    pub attached_ratio: Ratio,
    /// attached with the agent stopped / detached.
    pub agent_stopped_ratio: Ratio,
}

#[derive(Debug, Clone, Serialize)]
pub struct Ordinary {
    pub rounds: usize,
    pub figures: Vec<Figure>,
}

impl Ordinary {
    pub fn table(&self) -> String {
        let mut out = String::from(
            "\n2. ordinary pod traffic: the programs' own time (bpf_stats) per connection, per exchange, per second of bulk\n",
        );
        for f in &self.figures {
            out.push_str(&format!(
                "   {:<26} {:>7.0} ns = {:.2} % of its time\n",
                f.name,
                f.program_ns_per_op,
                f.program_share * 100.0
            ));
        }
        out.push_str(&format!(
            "   end to end, {} rounds in rotated order (medians; ratio to detached, min-max of the rounds: noise on a shared VM)\n",
            self.rounds
        ));
        for f in &self.figures {
            out.push_str(&format!(
                "   {:<26} detached {:>9.1} {unit:<6} attached {:>9.1} {} agent stopped {:>9.1} {}\n",
                f.name,
                f.detached,
                f.attached,
                f.attached_ratio.show(),
                f.agent_stopped,
                f.agent_stopped_ratio.show(),
                unit = f.unit,
            ));
        }
        out
    }
}

/// A cgroup beside the attach point, as deep as a pod's container cgroup.
fn detached_cgroup(node: &Node) -> anyhow::Result<PathBuf> {
    let path = node
        .test_cgroup
        .join("detached.slice/detached-qos.slice/detached-pod.slice/container.scope");
    fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
    Ok(path)
}

/// iperf3 from `cgroup`: bits per second received.
fn iperf(node: &Node, cgroup: &std::path::Path, netns: &str, run: Duration) -> anyhow::Result<f64> {
    let seconds = run.as_secs().max(1).to_string();
    let server = AGENT_IP.to_string();
    let port = IPERF_PORT.to_string();
    let out = node
        .command_in(
            cgroup,
            netns,
            &[
                "taskset", "-c", "0", "iperf3", "-c", &server, "-p", &port, "-t", &seconds, "-J",
            ],
        )
        .output()
        .context("running iperf3 (apt-get install iperf3)")?;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3: {}", String::from_utf8_lossy(&out.stderr)))?;
    match report["end"]["sum_received"]["bits_per_second"].as_f64() {
        Some(bps) => Ok(bps),
        None => bail!("iperf3: {}", report["error"]),
    }
}

pub fn run(options: &Options) -> anyhow::Result<Ordinary> {
    eprintln!("bench: ordinary traffic");
    let mut node = Node::new();
    node.agent_log_level = "info".into();
    let pod = node.add_pod();
    tune_netns(&pod.netns)?;
    node.start_agent();
    let detached = Pod {
        cgroup: detached_cgroup(&node)?,
        ..pod.clone()
    };
    let outside = node.outside_cgroup();
    let listen = format!("0.0.0.0:{ECHO_PORT}");
    let ns = node.netns.clone();
    // Clients on CPU 0, servers on CPU 1: less noise from the scheduler.
    let mut echo = serve_in(
        &node,
        &outside,
        &ns,
        &["echo", "--listen", &listen, "--cpu", "1"],
    )?;
    let mut iperf_server = node
        .command_in(
            &outside,
            &ns,
            &[
                "taskset",
                "-c",
                "1",
                "iperf3",
                "-s",
                "-p",
                &IPERF_PORT.to_string(),
            ],
        )
        .stdout(std::process::Stdio::null())
        .spawn()
        .context("starting iperf3 -s (apt-get install iperf3)")?;
    crate::track(&iperf_server);
    std::thread::sleep(Duration::from_millis(300));
    let target = format!("{AGENT_IP}:{ECHO_PORT}");
    let seconds = options.run.as_secs_f64().to_string();
    let tcp = |node: &Node, pod: &Pod, connect: bool| -> anyhow::Result<Stats> {
        let mut args = vec![
            "tcp",
            "--target",
            &target,
            "--seconds",
            &seconds,
            "--cpu",
            "0",
        ];
        if connect {
            args.push("--connect");
        }
        in_pod(node, pod, &args)
    };
    // (connect rate, small-request rate, bulk) per state, in the order of STATES.
    let mut measured: [Vec<[f64; 3]>; 3] = [Vec::new(), Vec::new(), Vec::new()];
    for round in 0..options.rounds {
        let order = order(round);
        eprintln!(
            "bench: ordinary traffic round {}/{} ({order:?})",
            round + 1,
            options.rounds
        );
        for state in order {
            match state {
                State::AgentStopped => node.kill_agent(),
                State::Detached | State::Attached if !node.agent_alive() => {
                    node.kill_agent();
                    node.start_agent();
                }
                State::Detached | State::Attached => {}
            }
            let who = match state {
                State::Detached => &detached,
                State::Attached | State::AgentStopped => &pod,
            };
            let connect = tcp(&node, who, true)?.per_second;
            let small = tcp(&node, who, false)?.per_second;
            let bulk = iperf(&node, &who.cgroup, &who.netns, options.run)? / 1e9;
            measured[state as usize].push([connect, small, bulk]);
        }
    }
    // The programs' own time, attached side only, with the kernel's BPF statistics on.
    let programs = attached_programs(&node)?;
    let stats = BpfStats::enable()?;
    let mut costs = [0.0f64; 3];
    for (i, cost) in costs.iter_mut().enumerate() {
        let before = program_time(&programs)?;
        let started = std::time::Instant::now();
        let ops = match i {
            0 => tcp(&node, &pod, true)?.requests as f64,
            1 => tcp(&node, &pod, false)?.requests as f64,
            _ => {
                iperf(&node, &pod.cgroup, &pod.netns, options.run)?;
                // Per second of transfer.
                started.elapsed().as_secs_f64()
            }
        };
        *cost = (program_time(&programs)? - before) as f64 / ops.max(1.0);
    }
    drop(stats);
    let _ = echo.kill();
    let _ = echo.wait();
    let _ = iperf_server.kill();
    let _ = iperf_server.wait();
    let figure = |i: usize, name, unit| {
        let of =
            |state: State| -> Vec<f64> { measured[state as usize].iter().map(|r| r[i]).collect() };
        let (detached, attached, stopped) = (
            of(State::Detached),
            of(State::Attached),
            of(State::AgentStopped),
        );
        let attached_median = median(attached.clone());
        // An operation's own time: 1/rate, and a second for bulk transfer.
        let op_ns = if i == 2 {
            1e9
        } else {
            1e9 / attached_median.max(1e-9)
        };
        Figure {
            name,
            unit,
            program_ns_per_op: costs[i],
            program_share: costs[i] / op_ns,
            detached: median(detached.clone()),
            attached: attached_median,
            agent_stopped: median(stopped.clone()),
            attached_ratio: Ratio::of(&attached, &detached),
            agent_stopped_ratio: Ratio::of(&stopped, &detached),
        }
    };
    Ok(Ordinary {
        rounds: options.rounds,
        figures: vec![
            figure(0, "connect + 64 B exchange", "conn/s"),
            figure(1, "64 B exchanges, one conn", "req/s"),
            figure(2, "bulk (iperf3)", "Gbit/s"),
        ],
    })
}

/// Ids of the programs attached to the node's pods cgroup.
fn attached_programs(node: &Node) -> anyhow::Result<Vec<u64>> {
    let out = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(&node.kubepods)
        .arg("--json")
        .output()
        .context("bpftool cgroup show")?;
    let attached: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("bpftool: {}", String::from_utf8_lossy(&out.stderr)))?;
    let ids: Vec<u64> = attached
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["name"].as_str().is_some_and(|n| n.starts_with("kiam_")))
        .filter_map(|p| p["id"].as_u64())
        .collect();
    if ids.is_empty() {
        bail!("no kiam program attached to {}", node.kubepods.display());
    }
    Ok(ids)
}

/// Total run time of `programs` so far, nanoseconds (with BPF statistics on).
fn program_time(programs: &[u64]) -> anyhow::Result<u64> {
    let mut total = 0;
    for id in programs {
        let out = Command::new("bpftool")
            .args(["prog", "show", "id", &id.to_string(), "--json"])
            .output()
            .context("bpftool prog show")?;
        let prog: serde_json::Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("bpftool: {}", String::from_utf8_lossy(&out.stderr)))?;
        total += prog["run_time_ns"].as_u64().unwrap_or(0);
    }
    Ok(total)
}

/// `kernel.bpf_stats_enabled` on while it lives (it costs every BPF program on the machine
/// two clock reads per run, so only for the measurement), then back as it was.
struct BpfStats(String);

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    fn enable() -> anyhow::Result<Self> {
        let before = fs::read_to_string(BPF_STATS).context("reading bpf_stats_enabled")?;
        fs::write(BPF_STATS, "1").context("enabling BPF statistics")?;
        Ok(Self(before.trim().to_owned()))
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = fs::write(BPF_STATS, &self.0);
    }
}

/// Whether iperf3 is installed (checked before a run).
pub fn iperf_present() -> bool {
    Command::new("iperf3").arg("--version").output().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_state_takes_each_place_once_in_three_rounds() {
        for place in 0..3 {
            let mut seen: Vec<State> = (0..3).map(|round| order(round)[place]).collect();
            seen.dedup();
            assert_eq!(seen.len(), 3, "place {place}: {seen:?}");
        }
    }

    #[test]
    fn ratios_report_their_spread() {
        let ratio = Ratio::of(&[90.0, 110.0, 100.0], &[100.0, 100.0, 100.0]);
        assert_eq!(ratio.median, 1.0);
        assert_eq!((ratio.min, ratio.max), (0.9, 1.1));
        assert_eq!(ratio.show(), "1.00x (0.90-1.10)");
    }
}
