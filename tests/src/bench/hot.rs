//! The agent's side: the metadata hot path against its physical limit, a new pod's first
//! request, and the agent's memory with many pods.

use std::{fs, time::Duration};

use anyhow::Context as _;
use serde::Serialize;
use serde_json::json;

use super::{Options, cpu_seconds, in_pod, load::Stats, median, memory_mib, serve_in, tune_netns};
use crate::{
    cluster::Cluster,
    node::{AGENT_IP, AGENT_PORT, Node},
};

const ROLE: &str = "app-bench";
const CREDS: &str = "/latest/meta-data/iam/security-credentials/app-bench";

/// One configuration of the hot path: connection reuse and concurrency.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Shape {
    pub keep_alive: bool,
    pub concurrency: usize,
}

impl Shape {
    fn all() -> [Shape; 4] {
        [
            Shape {
                keep_alive: false,
                concurrency: 1,
            },
            Shape {
                keep_alive: false,
                concurrency: 16,
            },
            Shape {
                keep_alive: true,
                concurrency: 1,
            },
            Shape {
                keep_alive: true,
                concurrency: 16,
            },
        ]
    }

    fn label(&self) -> String {
        format!(
            "{} c={}",
            if self.keep_alive {
                "keep-alive"
            } else {
                "new connection"
            },
            self.concurrency
        )
    }

    fn args(&self) -> Vec<String> {
        let mut args = vec!["--concurrency".to_owned(), self.concurrency.to_string()];
        if self.keep_alive {
            args.push("--keep-alive".into());
        }
        args
    }
}

/// Side-by-side figures of one shape, medians over the rounds.
#[derive(Debug, Clone, Serialize)]
pub struct Compared {
    pub shape: Shape,
    /// kiam-agent through the redirect.
    pub agent: Stats,
    /// The bare hyper responder through the same redirect.
    pub bare: Stats,
    /// The bare hyper responder, connected to directly.
    pub direct: Stats,
    /// agent / bare throughput (median of the rounds' ratios).
    pub ratio: f64,
    /// Agent CPU per request, microseconds.
    pub agent_cpu_us: f64,
    /// Bare responder CPU per request, microseconds.
    pub bare_cpu_us: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct HotPath {
    pub rounds: usize,
    pub seconds_per_run: f64,
    pub shapes: Vec<Compared>,
    /// Agent memory after the runs, MiB.
    pub agent_rss_mib: f64,
}

impl HotPath {
    pub fn table(&self) -> String {
        let mut out = format!(
            "\n1. hot path: IMDSv2 credentials the agent holds ({} rounds of {:.0} s, medians)\n",
            self.rounds, self.seconds_per_run
        );
        out.push_str(&format!(
            "   {:<18} {:>22} {:>22} {:>22} {:>7} {:>10}\n",
            "shape",
            "agent req/s p50/p99 µs",
            "bare req/s p50/p99 µs",
            "direct req/s p50/p99",
            "ratio",
            "agent CPU"
        ));
        for c in &self.shapes {
            let cell =
                |s: &Stats| format!("{:>7.0} {:>5.0}/{:<5.0}", s.per_second, s.p50_us, s.p99_us);
            out.push_str(&format!(
                "   {:<18} {:>22} {:>22} {:>22} {:>6.2}x {:>7.1} µs\n",
                c.shape.label(),
                cell(&c.agent),
                cell(&c.bare),
                cell(&c.direct),
                c.ratio,
                c.agent_cpu_us
            ));
        }
        out.push_str(&format!("   agent RSS {:.1} MiB\n", self.agent_rss_mib));
        out
    }
}

/// One load run inside `pod`, and the CPU `pid` spent on it.
fn measure(
    node: &Node,
    pod: &crate::node::Pod,
    target: &str,
    shape: Shape,
    options: &Options,
    pid: u32,
) -> anyhow::Result<(Stats, f64)> {
    let before = cpu_seconds(pid);
    let seconds = options.run.as_secs_f64().to_string();
    let mut args = vec![
        "load".to_owned(),
        "--target".into(),
        target.into(),
        "--path".into(),
        CREDS.into(),
        "--seconds".into(),
        seconds,
    ];
    args.extend(shape.args());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let stats: Stats = in_pod(node, pod, &args)?;
    let cpu = cpu_seconds(pid) - before;
    anyhow::ensure!(
        stats.errors * 100 <= stats.requests.max(1),
        "{target} {}: {} errors for {} requests",
        shape.label(),
        stats.errors,
        stats.requests
    );
    let per_request = cpu * 1e6 / stats.requests.max(1) as f64;
    Ok((stats, per_request))
}

fn median_stats(runs: &[Stats]) -> Stats {
    Stats {
        requests: runs.iter().map(|s| s.requests).sum::<u64>() / runs.len().max(1) as u64,
        errors: runs.iter().map(|s| s.errors).sum(),
        seconds: median(runs.iter().map(|s| s.seconds).collect()),
        per_second: median(runs.iter().map(|s| s.per_second).collect()),
        p50_us: median(runs.iter().map(|s| s.p50_us).collect()),
        p99_us: median(runs.iter().map(|s| s.p99_us).collect()),
        max_us: runs.iter().map(|s| s.max_us).fold(0.0, f64::max),
        first_error: runs.iter().find_map(|s| s.first_error.clone()),
    }
}

/// A cluster whose agent and servers log at info (per-request debug lines would be measured),
/// the agent without a per-pod rate (one pod drives it at thousands of connections a second).
fn quiet_cluster(namespace_rule: &str) -> Cluster {
    let mut node = Node::new();
    node.agent_log_level = "info".into();
    Cluster::start_with(
        node,
        "bench",
        json!({"iam.amazonaws.com/permitted": namespace_rule}),
        &crate::node::LOAD_TEST_ARGS,
        &["--log-level", "info"],
    )
}

pub fn hot_path(options: &Options) -> anyhow::Result<HotPath> {
    eprintln!("bench: hot path");
    let mut c = quiet_cluster("app-.*");
    let pod = c.pod("bench", json!({"iam.amazonaws.com/role": ROLE}));
    tune_netns(&pod.netns)?;
    let url = format!("http://169.254.169.254{CREDS}");
    let served = crate::poll(Duration::from_secs(10), || {
        c.node.get(&pod, &url).starts_with("200 ")
    });
    anyhow::ensure!(served, "the bench pod was never served");
    let redirect = "169.254.169.254:80".to_owned();
    let direct = format!("{AGENT_IP}:{AGENT_PORT}");
    let listen = format!("0.0.0.0:{AGENT_PORT}");
    let shapes = Shape::all();
    let mut runs: Vec<[Vec<(Stats, f64)>; 3]> = shapes.iter().map(|_| Default::default()).collect();
    for round in 0..options.rounds {
        eprintln!("bench: hot path round {}/{}", round + 1, options.rounds);
        // The agent, through the redirect.
        let pid = c.node.agent_pid();
        for (i, shape) in shapes.iter().enumerate() {
            runs[i][0].push(measure(&c.node, &pod, &redirect, *shape, options, pid)?);
        }
        // The bare responder where the agent was: same cgroup (exempt, may bind the port),
        // same address and port, same programs in front.
        c.node.kill_agent();
        let agent = c.node.agent_pod.clone();
        let mut bare = serve_in(
            &c.node,
            &agent.cgroup,
            &agent.netns,
            &["bare", "--listen", &listen],
        )?;
        let bare_pid = bare.id();
        for (i, shape) in shapes.iter().enumerate() {
            runs[i][1].push(measure(
                &c.node, &pod, &redirect, *shape, options, bare_pid,
            )?);
            runs[i][2].push(measure(&c.node, &pod, &direct, *shape, options, bare_pid)?);
        }
        let _ = bare.kill();
        let _ = bare.wait();
        c.node.start_agent();
    }
    let compared = shapes
        .iter()
        .zip(runs)
        .map(|(shape, [agent, bare, direct])| {
            let ratios = agent
                .iter()
                .zip(&bare)
                .map(|(a, b)| a.0.per_second / b.0.per_second.max(1e-9))
                .collect();
            let stats = |runs: &[(Stats, f64)]| {
                median_stats(&runs.iter().map(|r| r.0.clone()).collect::<Vec<_>>())
            };
            let cpu = |runs: &[(Stats, f64)]| median(runs.iter().map(|r| r.1).collect());
            Compared {
                shape: *shape,
                agent: stats(&agent),
                bare: stats(&bare),
                direct: stats(&direct),
                ratio: median(ratios),
                agent_cpu_us: cpu(&agent),
                bare_cpu_us: cpu(&bare),
            }
        })
        .collect();
    Ok(HotPath {
        rounds: options.rounds,
        seconds_per_run: options.run.as_secs_f64(),
        shapes: compared,
        agent_rss_mib: memory_mib(c.node.agent_pid()).0,
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct NewPod {
    pub sibling_pods: usize,
    pub pods_measured: usize,
    /// A new pod's first request (connect to answer), milliseconds: median and worst.
    pub first_ms_median: f64,
    pub first_ms_max: f64,
    /// The same pod's second request (its cgroup cached), milliseconds, median.
    pub second_ms_median: f64,
}

impl NewPod {
    pub fn table(&self) -> String {
        format!(
            "\n3. a new pod's first request, {} sibling pod cgroups ({} pods): median {:.2} ms, worst {:.2} ms; its second request {:.2} ms\n",
            self.sibling_pods,
            self.pods_measured,
            self.first_ms_median,
            self.first_ms_max,
            self.second_ms_median
        )
    }
}

/// A kubelet-shaped pod cgroup with no process, as the node's other pods are to the agent.
fn sibling(node: &Node, i: usize) -> anyhow::Result<()> {
    let uid = format!("5151{i:04x}-0000-4000-8000-{i:012x}");
    let dir = node
        .kubepods
        .join("kubepods-besteffort.slice")
        .join(format!(
            "kubepods-besteffort-pod{}.slice/cri-containerd-{:064x}.scope",
            uid.replace('-', "_"),
            i
        ));
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))
}

pub fn new_pod(options: &Options) -> anyhow::Result<NewPod> {
    eprintln!("bench: new pod with 2,000 siblings");
    let mut node = Node::new();
    node.agent_log_level = "info".into();
    let siblings = 2000;
    for i in 0..siblings {
        sibling(&node, i)?;
    }
    node.start_agent();
    let pods = options.rounds.max(3) + 2;
    let (mut first, mut second) = (Vec::new(), Vec::new());
    for _ in 0..pods {
        let pod = node.add_pod();
        let times: Vec<f64> = in_pod(&node, &pod, &["first-request", "--count", "2"])?;
        first.push(times[0]);
        second.push(times[1]);
    }
    let first_ms_max = first.iter().copied().fold(0.0, f64::max);
    Ok(NewPod {
        sibling_pods: siblings,
        pods_measured: pods,
        first_ms_median: median(first),
        first_ms_max,
        second_ms_median: median(second),
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct AgentMemory {
    pub pods: usize,
    pub rss_mib: f64,
    pub peak_mib: f64,
    /// Before the pods asked anything.
    pub idle_rss_mib: f64,
}

impl AgentMemory {
    pub fn table(&self) -> String {
        format!(
            "\n4. agent memory, {} pods each holding credentials: RSS {:.1} MiB (peak {:.1}, idle {:.1})\n",
            self.pods, self.rss_mib, self.peak_mib, self.idle_rss_mib
        )
    }
}

pub fn agent_memory(_options: &Options) -> anyhow::Result<AgentMemory> {
    eprintln!("bench: agent memory with 1,000 pods");
    let pods = 1000;
    let mut c = quiet_cluster("app-.*");
    let idle_rss_mib = memory_mib(c.node.agent_pid()).0;
    // Pods share one network namespace (as host-network pods do); their cgroups are theirs.
    let first = c.node.add_pod();
    let mut all = vec![first.clone()];
    for _ in 1..pods {
        let mut pod = c.node.add_host_network_pod();
        pod.netns = first.netns.clone();
        pod.ip = first.ip;
        all.push(pod);
    }
    for (i, pod) in all.iter().enumerate() {
        c.kube.pod_with_uid(
            "bench",
            &format!("pod-{i}"),
            crate::cluster::NODE_NAME,
            Some(&pod.uid),
            json!({"iam.amazonaws.com/role": format!("app-{}", i % 10)}),
        );
    }
    for (i, pod) in all.iter().enumerate() {
        let url = format!(
            "http://169.254.169.254/latest/meta-data/iam/security-credentials/app-{}",
            i % 10
        );
        let ok = crate::poll(Duration::from_secs(5), || {
            c.node.get(pod, &url).starts_with("200 ")
        });
        anyhow::ensure!(ok, "pod {i} was never served");
    }
    let (rss_mib, peak_mib) = memory_mib(c.node.agent_pid());
    Ok(AgentMemory {
        pods,
        rss_mib,
        peak_mib,
        idle_rss_mib,
    })
}
