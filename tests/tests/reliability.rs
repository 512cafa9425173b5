//! Reliability under abuse (issue: reliability): one pod cannot take the agent's listener
//! from the others, half-sent requests do not hold connections forever, a namespace cannot
//! drive STS into throttling with pod-chosen session names, and no secret reaches a log at
//! debug level. Real agent, servers, moto and the API emulator; run as root by
//! `cargo xtask test`, a loud SKIP otherwise.

use std::{
    io::{BufRead as _, BufReader},
    time::Duration,
};

use kiam_e2e::{
    bench::{in_pod, load::Stats, memory_mib},
    cluster::Cluster,
    metric,
    node::{HELPER, LOAD_TEST_ARGS, Node, privileged},
    stack::{ServerStack, eventually, known, retry_until},
};
use kiam_proto::{GetCredentialsRequest, Reason, reason_of};
use serde_json::json;

const CREDS: &str = "/latest/meta-data/iam/security-credentials/";

#[test]
fn one_pod_holding_20000_connections_cannot_slow_another_down() {
    if !privileged("connection limits") {
        return;
    }
    let mut c = Cluster::team(&["--idle-timeout", "5s", LOAD_TEST_ARGS[0], LOAD_TEST_ARGS[1]]);
    let victim = c.pod("victim", json!({"iam.amazonaws.com/role": "app-v"}));
    let attacker = c.pod("attacker", json!({"iam.amazonaws.com/role": "app-a"}));
    assert!(c.node.served(&victim, "app-v"));
    // The other pod's credentials, a new connection per request, for 3 s.
    let victim_load = |c: &Cluster| -> Stats {
        in_pod(
            &c.node,
            &victim,
            &[
                "load",
                "--target",
                "169.254.169.254:80",
                "--path",
                "/latest/meta-data/iam/security-credentials/app-v",
                "--seconds",
                "3",
            ],
        )
        .expect("victim load")
    };
    // The baseline, on this machine, in this run, with nobody flooding.
    let quiet = victim_load(&c);
    assert_eq!(quiet.errors, 0, "{quiet:?}");
    // Two processes of 10,000 (the open files limit here is 20,000 a process).
    let url = "http://169.254.169.254/latest/meta-data/iam/security-credentials/";
    let mut floods: Vec<_> = (0..2)
        .map(|_| {
            c.node.spawn_in(
                &attacker.cgroup,
                &attacker.netns,
                &[
                    HELPER.as_str(),
                    "flood",
                    url,
                    "--count",
                    "10000",
                    "--hold-ms",
                    "15000",
                ],
            )
        })
        .collect();
    let mut held = 0;
    for flood in &mut floods {
        let mut line = String::new();
        BufReader::new(flood.stdout.as_mut().expect("stdout"))
            .read_line(&mut line)
            .expect("flood report");
        held += line
            .split_whitespace()
            .nth(1)
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(0);
    }
    assert!(held >= 19_000, "the attacker held only {held} connections");
    let refused_total = |c: &Cluster| {
        metric(
            &c.node.agent_metrics(),
            "kiam_agent_refused_connections_total{reason=\"pod_connection_limit\"}",
        )
        .unwrap_or(0.0)
    };
    // Measured once the agent has refused what it will refuse (the count stands still for
    // half a second): what is compared is a pod among 20,000 held connections, not the
    // agent's work of refusing them.
    let mut last = refused_total(&c);
    assert!(
        kiam_e2e::poll(Duration::from_secs(10), || {
            std::thread::sleep(Duration::from_millis(500));
            let now = refused_total(&c);
            std::mem::replace(&mut last, now) == now
        }),
        "the agent was still refusing the flood's connections after 10 s"
    );
    // While they are held: the other pod's credentials, as before.
    let stats = victim_load(&c);
    eprintln!("the other pod, quiet: {quiet:?}\nwhile 20,000 connections were held: {stats:?}");
    let refused = |metrics: &str| {
        metrics
            .lines()
            .filter(|l| l.starts_with("kiam_agent_refused_connections_total"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(
        stats.errors,
        0,
        "{stats:?}\n{}",
        refused(&c.node.agent_metrics())
    );
    // Against the same pod's quiet run: the same order of latency (20,000 sockets held on a
    // 2-core machine cost the kernel something: 0.46 ms quiet became 3.2 ms on one run), and
    // at least half the rate.
    let bound = 10.0 * quiet.p99_us + 2_000.0;
    assert!(
        stats.p99_us < bound,
        "the victim's p99 was {} µs while another pod held 20,000 connections ({} µs quiet; bound {bound} µs)",
        stats.p99_us,
        quiet.p99_us
    );
    assert!(
        stats.per_second > quiet.per_second / 2.0,
        "the victim's rate fell from {:.0}/s to {:.0}/s",
        quiet.per_second,
        stats.per_second
    );
    assert!(c.node.agent_alive(), "the agent died");
    let (rss, _) = memory_mib(c.node.agent_pid());
    assert!(rss < 64.0, "agent RSS {rss} MiB");
    let metrics = c.node.agent_metrics();
    assert!(
        metric(
            &metrics,
            "kiam_agent_refused_connections_total{reason=\"pod_connection_limit\"}"
        )
        .unwrap_or(0.0)
            >= 10_000.0,
        "{metrics}"
    );
    for mut flood in floods {
        let _ = flood.kill();
        let _ = flood.wait();
    }
}

#[test]
fn a_half_sent_request_is_closed_after_the_idle_timeout() {
    if !privileged("idle timeout") {
        return;
    }
    let mut node = Node::new();
    node.agent_args = vec!["--idle-timeout".into(), "2s".into()];
    let pod = node.add_pod();
    node.start_agent();
    // The client side runs in the pod: a raw socket would not be redirected from here.
    let script = "exec 3<>/dev/tcp/169.254.169.254/80; printf 'GET / HTTP/1.1\\r\\nHost: x\\r\\n' >&3; start=$(date +%s%N); cat <&3 >/dev/null; echo $(( ($(date +%s%N) - start) / 1000000 ))";
    let out = node.run_in(&pod.cgroup, &pod.netns, &["bash", "-c", script]);
    let held_ms: u64 = out.trim().parse().expect("milliseconds");
    assert!(
        (1500..6000).contains(&held_ms),
        "a half-sent request head was held for {held_ms} ms with --idle-timeout 2s"
    );
}

#[tokio::test]
async fn pods_choosing_unique_session_names_cost_at_most_the_bound() {
    let ServerStack {
        server,
        certs,
        kube,
        sts,
        dir: _dir,
    } = ServerStack::start(&["--max-sessions-per-namespace", "10"]);
    let uids: Vec<String> = (0..500)
        .map(|i| {
            kube.pod(
                "team",
                &format!("p{i}"),
                "node-1",
                json!({"iam.amazonaws.com/role": "app-x",
                       "iam.amazonaws.com/session-name": format!("unique-{i}")}),
            )
        })
        .collect();
    let mut agent = server
        .client(&certs, Some("agent-node-1"))
        .await
        .expect("client");
    // Every pod is asked for, as agents would.
    let mut refused = 0;
    for uid in &uids {
        let request = GetCredentialsRequest {
            pod_uid: uid.clone(),
            node_name: "node-1".into(),
            role_name: "app-x".into(),
            container_id: String::new(),
        };
        let answer = retry_until(
            Duration::from_secs(10),
            async || agent.get_credentials(request.clone()).await,
            known,
        )
        .await;
        match answer {
            Ok(Ok(_)) => {}
            Ok(Err(s)) if reason_of(&s) == Reason::TooManySessions => {
                assert_eq!(s.code(), tonic::Code::ResourceExhausted);
                refused += 1;
            }
            Ok(Err(s)) | Err(Err(s)) => panic!("{}", s.message()),
            Err(Ok(_)) => unreachable!("an answer is accepted"),
        }
    }
    assert_eq!(refused, 490);
    // Prefetch and refresh had their chances too.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(sts.calls() <= 10, "{} AssumeRole calls", sts.calls());
    assert!(
        eventually(Duration::from_secs(10), || kube
            .events()
            .iter()
            .any(|e| e["reason"] == "IAMSessionLimit"))
        .await,
        "no Event for the namespace's pods over the bound"
    );
}

#[test]
fn no_secret_reaches_a_log_at_debug_level() {
    if !privileged("secrets in logs") {
        return;
    }
    // The agent and the servers log at debug in the tests.
    let mut c = Cluster::team(&["--role-ttl", "1ms"]);
    let pod = c.pod("a", json!({"iam.amazonaws.com/role": "app-a"}));
    assert!(c.node.served(&pod, "app-a"));
    let line = c.node.run_in(
        &pod.cgroup,
        &pod.netns,
        &[
            HELPER.as_str(),
            "get",
            &format!("http://169.254.169.254{CREDS}app-a"),
        ],
    );
    let doc: serde_json::Value =
        serde_json::from_str(line.trim().strip_prefix("200 ").expect("200")).expect("json");
    let secrets = [
        doc["SecretAccessKey"].as_str().expect("secret").to_owned(),
        doc["Token"].as_str().expect("token").to_owned(),
    ];
    assert!(secrets.iter().all(|s| s.len() > 8));
    let mut logs = c.node.agent_log();
    for server in &c.servers {
        logs.push_str(&server.log_text());
    }
    assert!(logs.contains("\"level\":\"DEBUG\""), "debug logs are on");
    for secret in &secrets {
        assert!(!logs.contains(secret.as_str()), "a secret reached a log");
    }
}
