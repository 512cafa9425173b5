//! What kiam's programs cost pods' ordinary traffic (not to the metadata address): every pod
//! pays it on every connection and packet. The same client runs in a pod's cgroup below the
//! attach point (programs attached) and in a cgroup beside it at the same depth (no program
//! runs), in the same network namespace, alternating attached and detached rounds so drift
//! cancels out.
//!
//! End to end, a 2-core VM's noise is a few per cent either way, the size of what is being
//! measured. So the programs' own time is measured too: with the kernel's BPF statistics
//! (`kernel.bpf_stats_enabled`), the run time of every kiam program attached to the pods
//! cgroup, per connection, per exchange and per second of bulk transfer, set beside the time
//! each of those takes.

use std::{fs, path::PathBuf, process::Command, time::Duration};

use anyhow::{Context as _, bail};
use serde::Serialize;

use super::{Options, in_pod, load::Stats, median, serve_in, tune_netns};
use crate::node::{AGENT_IP, Node, Pod};

const ECHO_PORT: u16 = 9000;
const IPERF_PORT: u16 = 5201;

/// Attached over detached, per figure (medians of the rounds).
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    pub name: &'static str,
    pub unit: &'static str,
    pub attached: f64,
    pub detached: f64,
    /// attached / detached: 1.00 costs nothing, 0.98 costs 2 %.
    pub ratio: f64,
    /// Each round's ratio, to see the spread.
    pub round_ratios: Vec<f64>,
    /// Time the kiam programs ran per operation (per connection, per exchange, per second of
    /// transfer), nanoseconds.
    pub program_ns_per_op: f64,
    /// That time over the operation's own (1/rate; a second for bulk): the programs' share.
    pub program_share: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Ordinary {
    pub rounds: usize,
    pub figures: Vec<Figure>,
}

impl Ordinary {
    pub fn table(&self) -> String {
        let mut out = format!(
            "\n2. ordinary pod traffic, programs attached vs detached ({} alternating rounds, medians)\n",
            self.rounds
        );
        for f in &self.figures {
            let spread = f
                .round_ratios
                .iter()
                .map(|r| format!("{r:.3}"))
                .collect::<Vec<_>>()
                .join(" ");
            out.push_str(&format!(
                "   {:<26} attached {:>9.1} {:<6} detached {:>9.1} {:<6} ratio {:.3}x (rounds {spread}); programs {:.0} ns/op = {:.2} %\n",
                f.name,
                f.attached,
                f.unit,
                f.detached,
                f.unit,
                f.ratio,
                f.program_ns_per_op,
                f.program_share * 100.0
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
    let tcp = |pod: &Pod, connect: bool| -> anyhow::Result<Stats> {
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
        in_pod(&node, pod, &args)
    };
    // (connect rate, small-request rate, bulk) per side.
    let mut sides: [Vec<[f64; 3]>; 2] = [Vec::new(), Vec::new()];
    for round in 0..options.rounds {
        eprintln!(
            "bench: ordinary traffic round {}/{}",
            round + 1,
            options.rounds
        );
        // Alternate which side goes first.
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for side in order {
            let who = if side == 0 { &pod } else { &detached };
            let connect = tcp(who, true)?.per_second;
            let small = tcp(who, false)?.per_second;
            let bulk = iperf(&node, &who.cgroup, &who.netns, options.run)? / 1e9;
            sides[side].push([connect, small, bulk]);
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
            0 => tcp(&pod, true)?.requests as f64,
            1 => tcp(&pod, false)?.requests as f64,
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
        let attached = median(sides[0].iter().map(|r| r[i]).collect());
        let detached = median(sides[1].iter().map(|r| r[i]).collect());
        let round_ratios: Vec<f64> = sides[0]
            .iter()
            .zip(&sides[1])
            .map(|(a, d)| a[i] / d[i].max(1e-9))
            .collect();
        // An operation's own time: 1/rate, and a second for bulk transfer.
        let op_ns = if i == 2 {
            1e9
        } else {
            1e9 / attached.max(1e-9)
        };
        Figure {
            name,
            unit,
            attached,
            detached,
            ratio: median(round_ratios.clone()),
            round_ratios,
            program_ns_per_op: costs[i],
            program_share: costs[i] / op_ns,
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
