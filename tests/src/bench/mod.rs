//! `cargo xtask bench`: kiam's speed and scale, measured on the real kernel with release
//! builds. Every figure is set beside a baseline measured in the same run (a ratio), or is a
//! count; absolute times are reported, never asserted.
//!
//! 1. [`hot`]: a pod's IMDSv2 request for credentials the agent holds, through the real
//!    redirect, against a bare hyper responder behind the same programs at the same address
//!    (the physical limit), and that responder reached directly; new connection and
//!    keep-alive, concurrency 1 and 16; agent CPU per request. Also a new pod's first request
//!    with 2,000 sibling pod cgroups, and the agent's memory with 1,000 pods.
//! 2. [`ordinary`]: what the programs cost pods' ordinary traffic: the same client in a pod's
//!    cgroup (programs attached) and in a cgroup beside the attach point (none), alternating.
//! 3. [`scale`]: the server with 10,000 and 100,000 realistic pods: memory, time to ready,
//!    GetCredentials latency from 200 agents, AssumeRole calls counted at moto; and 10,000
//!    pods every one of which is refused, against the same pods permitted.
//! 4. [`outage`]: a credential fetch as SDKs make it, with every server frozen and then
//!    killed, against the same fetch while they are healthy.

pub mod hot;
pub mod load;
pub mod ordinary;
pub mod outage;
pub mod scale;
pub mod servers;

use std::{
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::Duration,
};

use anyhow::{Context as _, anyhow, bail};
use serde::Serialize;

use crate::node::{Node, Pod};

/// What to measure, and for how long.
#[derive(Debug, Clone)]
pub struct Options {
    pub out: PathBuf,
    /// Rounds of each side-by-side comparison (the median is reported).
    pub rounds: usize,
    /// Length of one load run.
    pub run: Duration,
    /// Pod counts for the server scale runs.
    pub scale: Vec<usize>,
    /// Sections to run (`hot`, `ordinary`, `new-pod`, `agent-memory`, `scale`, `refused`,
    /// `outage`).
    pub only: Vec<String>,
}

impl Options {
    fn wants(&self, section: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s == section)
    }
}

/// Everything a run measured.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub machine: Machine,
    pub hot_path: Option<hot::HotPath>,
    pub ordinary_traffic: Option<ordinary::Ordinary>,
    pub new_pod: Option<hot::NewPod>,
    pub agent_memory: Option<hot::AgentMemory>,
    pub server_scale: Vec<scale::Scale>,
    pub refused_pods: Option<scale::Refused>,
    pub outage: Option<outage::Outage>,
}

#[derive(Debug, Default, Serialize)]
pub struct Machine {
    pub kernel: String,
    pub cpus: usize,
    pub date: String,
}

impl Machine {
    fn read() -> Self {
        Self {
            kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
            cpus: std::thread::available_parallelism().map_or(1, usize::from),
            date: std::process::Command::new("date")
                .arg("-u")
                .arg("+%Y-%m-%dT%H:%M:%SZ")
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
                .unwrap_or_default(),
        }
    }
}

/// Why the benchmarks cannot run here, if they cannot.
pub fn preflight() -> anyhow::Result<()> {
    if !crate::node::privileged("kiam-bench") {
        bail!("the benchmarks need root (BPF programs, cgroups, network namespaces)");
    }
    if !ordinary::iperf_present() {
        bail!("iperf3 is missing: run `cargo xtask setup`");
    }
    Ok(())
}

/// Runs the selected sections, prints the table and writes `report.json` under `out`.
pub fn run(options: &Options) -> anyhow::Result<Report> {
    fs::create_dir_all(&options.out)
        .with_context(|| format!("creating {}", options.out.display()))?;
    let mut report = Report {
        machine: Machine::read(),
        ..Report::default()
    };
    if options.wants("hot") {
        report.hot_path = Some(hot::hot_path(options)?);
    }
    if options.wants("ordinary") {
        report.ordinary_traffic = Some(ordinary::run(options)?);
    }
    if options.wants("new-pod") {
        report.new_pod = Some(hot::new_pod(options)?);
    }
    if options.wants("agent-memory") {
        report.agent_memory = Some(hot::agent_memory(options)?);
    }
    if options.wants("scale") {
        for &pods in &options.scale {
            report.server_scale.push(scale::run(options, pods, false)?);
        }
    }
    if options.wants("refused") {
        report.refused_pods = Some(scale::Refused::run(options, REFUSED_PODS)?);
    }
    if options.wants("outage") {
        report.outage = Some(outage::Outage::run(options)?);
    }
    let path = options.out.join("report.json");
    fs::write(&path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", path.display()))?;
    print!("{}", table(&report));
    println!("\nwritten to {}", path.display());
    Ok(report)
}

/// Pods of the refused-pods case (and of its permitted baseline).
const REFUSED_PODS: usize = 10_000;

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// The report as the README shows it.
pub fn table(report: &Report) -> String {
    let mut out = format!(
        "kiam bench: kernel {}, {} CPUs, {}\n",
        report.machine.kernel, report.machine.cpus, report.machine.date
    );
    if let Some(hot) = &report.hot_path {
        out.push_str(&hot.table());
    }
    if let Some(ordinary) = &report.ordinary_traffic {
        out.push_str(&ordinary.table());
    }
    if let Some(new_pod) = &report.new_pod {
        out.push_str(&new_pod.table());
    }
    if let Some(memory) = &report.agent_memory {
        out.push_str(&memory.table());
    }
    if !report.server_scale.is_empty() {
        out.push_str(&scale::table(&report.server_scale));
    }
    if let Some(refused) = &report.refused_pods {
        out.push_str(&refused.table());
    }
    if let Some(outage) = &report.outage {
        out.push_str(&outage.table());
    }
    out
}

/// `kiam-bench`, to run its subcommands inside pods: this program when it is that one (a
/// release build under `cargo xtask bench`), else the one beside the tests.
pub fn me() -> PathBuf {
    std::env::current_exe()
        .ok()
        .filter(|exe| exe.file_name().is_some_and(|n| n == "kiam-bench"))
        .unwrap_or_else(|| crate::workspace_bin("kiam-bench"))
}

/// Runs `args` of this program in `pod`, and parses the JSON it prints.
pub fn in_pod<T: serde::de::DeserializeOwned>(
    node: &Node,
    pod: &Pod,
    args: &[&str],
) -> anyhow::Result<T> {
    let me = me();
    let mut cmd = vec![me.to_str().ok_or_else(|| anyhow!("path is not UTF-8"))?];
    cmd.extend_from_slice(args);
    let out = node
        .command_in(&pod.cgroup, &pod.netns, &cmd)
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("running {args:?} in a pod"))?;
    if !out.status.success() {
        bail!("{args:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("{args:?} printed {}", String::from_utf8_lossy(&out.stdout)))
}

/// Starts `args` of this program in `cgroup` and `netns`, and waits for its `ready` line.
pub fn serve_in(node: &Node, cgroup: &Path, netns: &str, args: &[&str]) -> anyhow::Result<Child> {
    let me = me();
    let mut cmd = vec![me.to_str().ok_or_else(|| anyhow!("path is not UTF-8"))?];
    cmd.extend_from_slice(args);
    let mut child = node
        .command_in(cgroup, netns, &cmd)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {args:?}"))?;
    crate::track(&child);
    let mut line = String::new();
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    BufReader::new(stdout).read_line(&mut line)?;
    if line.trim() != "ready" {
        let _ = child.kill();
        bail!("{args:?} did not start: {line:?}");
    }
    Ok(child)
}

/// Lets a load generator in `netns` open connections as fast as it can: every port, and
/// ports in TIME_WAIT reused (the client closes first, so each connection leaves one).
pub fn tune_netns(netns: &str) -> anyhow::Result<()> {
    for setting in [
        "net.ipv4.ip_local_port_range=1024 65000",
        "net.ipv4.tcp_tw_reuse=1",
    ] {
        let out = std::process::Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{netns}"))
            .args(["--", "sysctl", "-qw", setting])
            .output()
            .context("running sysctl")?;
        if !out.status.success() {
            bail!("sysctl {setting}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    Ok(())
}

/// CPU time (user + system) a process has used, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which may contain spaces.
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat; 12 and 13 after the name and state.
    (ticks(11) + ticks(12)) / 100.0
}

/// Resident and peak memory of a process, in MiB.
pub fn memory_mib(pid: u32) -> (f64, f64) {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (kib("VmRSS:") / 1024.0, kib("VmHWM:") / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(Vec::new()), 0.0);
    }

    #[test]
    fn this_process_has_cpu_and_memory() {
        let pid = std::process::id();
        let (rss, peak) = memory_mib(pid);
        assert!(rss > 0.0 && peak >= rss, "{rss} {peak}");
        let mut x = 0u64;
        for i in 0..50_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        assert!(x > 0);
        assert!(cpu_seconds(pid) > 0.0);
    }
}
