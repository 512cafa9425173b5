//! What operators watch, on the real kernel with the real agent, servers, moto and the API
//! emulator:
//! - the agent's `/metrics` after real traffic: kernel counters, map fill levels, readiness,
//!   servers reachable, validity left on served credentials (and `promtool check metrics`
//!   accepts the exposition when promtool is installed), and every series the shipped alerts
//!   and dashboard query is one the agent or server exposes;
//! - `kiam-agent health` and `kiam-server health`, and their exit codes.
//!
//! Run as root by `cargo xtask test`; without root each test prints a loud SKIP.

use std::{
    process::{Command, Output, Stdio},
    time::Duration,
};

use kiam_e2e::{
    cluster::Cluster,
    metric,
    node::{HELPER, Node, privileged},
    poll,
};
use serde_json::json;

const CREDENTIALS: &str = "http://169.254.169.254/latest/meta-data/iam/security-credentials/";

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\n{}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// An OpenMetrics exposition in the older text format `promtool check metrics` lints, as
/// Prometheus reads it: a counter family `x` is the series `x_total`, and there is no `# EOF`.
fn as_text_format(openmetrics: &str) -> String {
    let counters: Vec<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    openmetrics
        .lines()
        .filter(|l| *l != "# EOF")
        .map(|line| {
            for family in &counters {
                for kind in ["# HELP ", "# TYPE "] {
                    if let Some(rest) = line.strip_prefix(&format!("{kind}{family} ")) {
                        return format!("{kind}{family}_total {rest}");
                    }
                }
            }
            line.to_owned()
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

/// `promtool check metrics` on an exposition; `None` when promtool is not installed
/// (`cargo xtask setup` installs it; `.ci/run` requires it through `KIAM_REQUIRE_PROMTOOL`).
fn promtool_check_metrics(openmetrics: &str) -> Option<Output> {
    let exposition = as_text_format(openmetrics);
    let required = std::env::var("KIAM_REQUIRE_PROMTOOL").as_deref() == Ok("1");
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(error) => {
            assert!(!required, "promtool: {error} (KIAM_REQUIRE_PROMTOOL=1)");
            eprintln!(
                "\n!!!!!!!! promtool not installed ({error}): exposition not linted !!!!!!!!\n"
            );
            return None;
        }
    };
    use std::io::Write as _;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(exposition.as_bytes())
        .expect("write exposition");
    Some(child.wait_with_output().expect("promtool"))
}

/// The `kiam_agent_*` and `kiam_server_*` names in a rules file or dashboard.
fn kiam_series(source: &str) -> Vec<String> {
    let mut names = Vec::new();
    for prefix in ["kiam_agent_", "kiam_server_"] {
        for (at, _) in source.match_indices(prefix) {
            let name: String = source[at..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            let whole_word = !source[..at]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
            if whole_word && !names.contains(&name) {
                names.push(name);
            }
        }
    }
    names
}

#[test]
fn agent_metrics_follow_real_traffic() {
    if !privileged("agent metrics") {
        return;
    }
    let mut c = Cluster::team(&["--kernel-metrics-interval", "1s"]);
    let pod = c.pod("web", json!({"iam.amazonaws.com/role": "app-web"}));
    let creds = format!("{CREDENTIALS}app-web");
    let get = |url: &str| {
        c.node
            .run_in(&pod.cgroup, &pod.netns, &[HELPER.as_str(), "get", url])
            .trim()
            .to_owned()
    };
    assert!(
        poll(Duration::from_secs(15), || get(&creds).starts_with("200")),
        "credentials never served:\n{}",
        c.node.agent_log()
    );
    for _ in 0..4 {
        assert!(get(&creds).starts_with("200"));
    }
    // A path outside the allow-list: answered 404, still a redirected connection.
    assert!(get("http://169.254.169.254/latest/user-data").starts_with("404"));
    // A role the namespace does not permit: refused by the server.
    let forbidden = c.pod("forbidden", json!({"iam.amazonaws.com/role": "db-admin"}));
    let answer = c.node.get(&forbidden, &format!("{CREDENTIALS}db-admin"));
    assert!(!answer.starts_with("200"), "{answer}");
    // A process in the pods' tree that is no pod (its QoS slice): refused by the agent.
    let qos_slice = pod
        .cgroup
        .parent()
        .and_then(|p| p.parent())
        .expect("qos slice");
    let helper = [HELPER.as_str(), "get", &creds];
    let answer = c
        .node
        .command_in(qos_slice, &pod.netns, &helper)
        .output()
        .expect("get");
    assert!(
        !String::from_utf8_lossy(&answer.stdout).starts_with("200"),
        "{answer:?}"
    );

    let mut exposition = String::new();
    assert!(
        poll(Duration::from_secs(10), || {
            exposition = c.node.agent_metrics();
            metric(
                &exposition,
                "kiam_agent_kernel_events_total{event=\"redirected_ipv4\"}",
            )
            .is_some_and(|v| v >= 6.0)
        }),
        "kernel counters never reached the agent's metrics:\n{exposition}"
    );
    let value = |name: &str| metric(&exposition, name).unwrap_or(-1.0);
    // Every redirected connection was bound to the agent's socket at the handshake.
    assert!(value("kiam_agent_kernel_events_total{event=\"bound_to_agent_socket\"}") >= 6.0);
    assert_eq!(
        value("kiam_agent_kernel_events_total{event=\"tuple_collision\"}"),
        0.0
    );
    assert_eq!(
        value("kiam_agent_kernel_events_total{event=\"denied_unconfigured\"}"),
        0.0
    );
    let programs = kiam_common::program_names::ALL.len() as f64;
    assert_eq!(value("kiam_agent_programs_attached"), programs);
    assert_eq!(value("kiam_agent_programs_expected"), programs);
    assert_eq!(value("kiam_agent_kernel_configured"), 1.0);
    assert_eq!(
        value("kiam_agent_map_capacity{map=\"KIAM_CONNECT\"}"),
        16384.0
    );
    for map in ["KIAM_CONNECT", "KIAM_TUPLES", "KIAM_ACCEPTED"] {
        let entries = value(&format!("kiam_agent_map_entries{{map=\"{map}\"}}"));
        assert!((0.0..=16384.0).contains(&entries), "{map}: {entries}");
    }
    // The agent's own view agrees with the kernel's.
    assert!(
        value("kiam_agent_imds_requests_total{route=\"credentials\",status=\"200\"}") >= 5.0,
        "{exposition}"
    );
    assert!(value("kiam_agent_imds_requests_total{route=\"not_allowed\",status=\"404\"}") >= 1.0);
    // Served credentials had far more than 30 minutes left: none in the lowest buckets.
    assert!(value("kiam_agent_credentials_remaining_seconds_count") >= 5.0);
    assert_eq!(
        value("kiam_agent_credentials_remaining_seconds_bucket{le=\"2100.0\"}"),
        0.0,
        "{exposition}"
    );
    assert_eq!(value("kiam_agent_ready"), 1.0);
    assert!(
        poll(Duration::from_secs(10), || {
            metric(&c.node.agent_metrics(), "kiam_agent_servers_reachable") == Some(2.0)
        }),
        "both servers reachable"
    );
    if let Some(out) = promtool_check_metrics(&exposition) {
        assert!(
            out.status.success(),
            "promtool check metrics: {}",
            text(&out)
        );
    }
    // Every series the shipped alerts and dashboard query is one the running binaries expose.
    let agent = c.node.agent_metrics();
    let servers: Vec<String> = c.servers.iter().map(|s| s.metrics()).collect();
    let families: Vec<String> = std::iter::once(&agent)
        .chain(&servers)
        .flat_map(|e| e.lines())
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    for file in [
        "deploy/helm/kiam/files/kiam.rules.yaml",
        "deploy/helm/kiam/files/grafana-dashboard.json",
    ] {
        let source = std::fs::read_to_string(kiam_e2e::repo(file)).expect(file);
        let queried = kiam_series(&source);
        assert!(!queried.is_empty(), "{file} queries no kiam series");
        for name in queried {
            assert!(
                families.iter().any(|f| {
                    name == *f
                        || name
                            .strip_prefix(f.as_str())
                            .is_some_and(|s| ["_total", "_bucket", "_count", "_sum"].contains(&s))
                }),
                "{file} queries {name}, which neither binary exposes; they expose {families:?}"
            );
        }
    }

    // With one server gone the agent stays ready and says how many it reaches.
    c.servers[1].kill();
    assert!(
        poll(Duration::from_secs(20), || {
            let m = c.node.agent_metrics();
            metric(&m, "kiam_agent_servers_reachable") == Some(1.0)
                && metric(&m, "kiam_agent_ready") == Some(1.0)
        }),
        "one server reachable:\n{}",
        c.node.agent_metrics()
    );
}

#[test]
fn agent_health_checks_the_agent_its_programs_and_every_server() {
    if !privileged("kiam-agent health") {
        return;
    }
    let mut c = Cluster::team(&[]);
    let mut out = c.agent_health(&[]);
    assert!(
        poll(Duration::from_secs(15), || {
            out = c.agent_health(&[]);
            out.status.code() == Some(0)
        }),
        "a healthy agent: {}",
        text(&out)
    );
    let report = text(&out);
    for line in [
        "ok    agent: ready",
        "ok    configuration: ready",
        &format!(
            "ok    programs: {} links attached",
            kiam_common::program_names::ALL.len()
        ),
        "ok    server 127.0.0.1:8443: ready",
        "ok    server 127.0.0.1:8444: ready",
        "ok    servers: 2 of 2 ready",
    ] {
        assert!(report.contains(line), "{line:?} missing:\n{report}");
    }

    // The programs must be attached where the flags say.
    let elsewhere = c.agent_health_attached_at(".", &[]);
    assert_eq!(elsewhere.status.code(), Some(1), "{}", text(&elsewhere));
    let report = text(&elsewhere);
    assert!(
        report.contains("FAIL  configuration: written for cgroup id"),
        "{report}"
    );
    assert!(
        report.contains("FAIL  programs: kiam_egress attached to cgroup id"),
        "{report}"
    );

    // One server down: healthy (one is enough) and reported; unhealthy when all must answer.
    c.servers[1].kill();
    let one = c.agent_health(&[]);
    assert_eq!(one.status.code(), Some(0), "{}", text(&one));
    assert!(
        text(&one).contains("warn  server 127.0.0.1:8444"),
        "{}",
        text(&one)
    );
    assert!(
        text(&one).contains("ok    servers: 1 of 2 ready"),
        "{}",
        text(&one)
    );
    let all = c.agent_health(&["--require-all-servers"]);
    assert_eq!(all.status.code(), Some(1), "{}", text(&all));
    assert!(
        text(&all).contains("FAIL  servers: 1 of 2 ready"),
        "{}",
        text(&all)
    );

    // The agent gone: its pins stay (pods stay redirected), but it is not healthy.
    c.node.kill_agent();
    let gone = c.agent_health(&[]);
    assert_eq!(gone.status.code(), Some(1), "{}", text(&gone));
    let report = text(&gone);
    assert!(report.contains("FAIL  agent: no answer"), "{report}");
    assert!(
        report.contains(&format!(
            "ok    programs: {} links attached",
            kiam_common::program_names::ALL.len()
        )),
        "{report}"
    );
}

#[test]
fn server_health_reports_watches_and_sts() {
    if !privileged("kiam-server health") {
        return;
    }
    let mut c = Cluster::start_with(
        Node::new(),
        "team",
        json!({"iam.amazonaws.com/permitted": "app-.*"}),
        &[],
        &["--sts-health-interval", "1s"],
    );
    let server_bin = std::env::var_os("KIAM_SERVER_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| kiam_e2e::workspace_bin("kiam-server"));
    let health = |c: &Cluster| {
        let line = [
            server_bin.to_str().expect("utf-8"),
            "health",
            "--admin-listen",
            "127.0.0.1:9620",
        ];
        c.node
            .command_in(&c.node.agent_pod.cgroup, &c.node.netns, &line)
            .output()
            .expect("kiam-server health")
    };
    let mut out = health(&c);
    assert!(
        poll(Duration::from_secs(15), || {
            out = health(&c);
            out.status.code() == Some(0)
        }),
        "a healthy server: {}",
        text(&out)
    );
    assert!(
        text(&out).contains("ok    watches: synced"),
        "{}",
        text(&out)
    );
    assert!(
        text(&out).contains("ok    sts: GetCallerIdentity: arn:aws:sts::"),
        "{}",
        text(&out)
    );

    // STS gone: the server says so within a few checks.
    c.sts.kill_moto();
    assert!(
        poll(Duration::from_secs(60), || {
            out = health(&c);
            out.status.code() == Some(1)
        }),
        "STS down never reported: {}",
        text(&out)
    );
    // Failed, or no answer for three intervals while the SDK retries.
    assert!(
        text(&out).contains("FAIL  sts: GetCallerIdentity failed")
            || text(&out).contains("FAIL  sts: no GetCallerIdentity answer"),
        "{}",
        text(&out)
    );
    assert!(
        text(&out).contains("ok    watches: synced"),
        "{}",
        text(&out)
    );

    // The server gone: unhealthy, and the message names the address.
    c.servers[0].kill();
    let gone = health(&c);
    assert_eq!(gone.status.code(), Some(1), "{}", text(&gone));
    assert!(
        text(&gone).contains("FAIL  server: no answer at 127.0.0.1:9620"),
        "{}",
        text(&gone)
    );
}
