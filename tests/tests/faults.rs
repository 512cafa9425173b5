//! Faults and churn (issue: reliability), end to end with the real binaries: servers frozen
//! and killed under load, an STS stall, an API server that restarts empty, 300 pod
//! lifecycles under continuous requests, and an agent upgrade that swaps the pinned programs
//! under load. Run as root by `cargo xtask test`; without root each prints a loud SKIP.

use std::{
    process::Stdio,
    sync::Mutex,
    time::{Duration, Instant},
};

use kiam_e2e::{
    bench::{
        self,
        load::Stats,
        outage::{self, median_fetch, servers_reachable},
    },
    cluster::{Cluster, NODE_NAME},
    metric,
    node::{HELPER, IMDS, LOAD_TEST_ARGS, Node, Pod, privileged},
    poll,
    stack::{Certs, Kube, PodObject, Server, Sts, eventually, retry_until},
};
use kiam_proto::{GetCredentialsRequest, Reason, reason_of};
use serde_json::json;

const LISTING: &str = "http://169.254.169.254/latest/meta-data/iam/security-credentials/";

/// Starts `kiam-bench load` in `pod` (IMDSv2 credentials, a new connection per request).
fn start_load(node: &Node, pod: &Pod, role: &str, seconds: &str) -> std::process::Child {
    // Thousands of connections a second: ports in TIME_WAIT must be reusable.
    bench::tune_netns(&pod.netns).expect("sysctl");
    let bench = bench::me();
    let path = format!("/latest/meta-data/iam/security-credentials/{role}");
    node.command_in(
        &pod.cgroup,
        &pod.netns,
        &[
            bench.to_str().expect("utf-8"),
            "load",
            "--target",
            "169.254.169.254:80",
            "--path",
            &path,
            "--seconds",
            seconds,
            "--concurrency",
            "4",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("load")
}

fn finish_load(load: std::process::Child) -> Stats {
    let out = load.wait_with_output().expect("load output");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stats")
}

#[test]
fn a_frozen_or_killed_server_is_invisible_to_pods() {
    if !privileged("server failover in flight") {
        return;
    }
    // The role is asked for on every request, so every request needs a server.
    let mut c = Cluster::team(&["--role-ttl", "1ms", LOAD_TEST_ARGS[0], LOAD_TEST_ARGS[1]]);
    let pod = c.pod("a", json!({"iam.amazonaws.com/role": "app-a"}));
    assert!(c.node.served(&pod, "app-a"));
    let answered = |s: &Server| {
        metric(
            &s.metrics(),
            "kiam_server_requests_total{method=\"GetPodRole\",result=\"ok\"}",
        )
        .unwrap_or(0.0)
    };
    for (fault, round) in [("STOP", 0), ("KILL", 1)] {
        let victim = round;
        let before: Vec<f64> = c.servers.iter().map(answered).collect();
        let load = start_load(&c.node, &pod, "app-a", "3");
        std::thread::sleep(Duration::from_millis(1000));
        // Both servers were serving before the fault, by their own counts.
        let serving: Vec<f64> = c.servers.iter().map(answered).collect();
        for (i, (b, s)) in before.iter().zip(&serving).enumerate() {
            assert!(
                s > b,
                "server {i} answered nothing before the fault ({b} → {s})"
            );
        }
        outage::signal(c.servers[victim].pid(), fault).expect("signal");
        let stats = finish_load(load);
        eprintln!("SIG{fault} of a server under load: {stats:?}");
        assert_eq!(stats.errors, 0, "client-visible errors: {stats:?}");
        assert!(stats.requests > 100, "{stats:?}");
        // Within botocore's 1 s timeout, thanks to hedging (150 ms).
        assert!(stats.max_us < 1_000_000.0, "{stats:?}");
        if fault == "STOP" {
            outage::signal(c.servers[victim].pid(), "CONT").expect("signal");
        }
    }
    assert_eq!(c.node.fake_imds_connections(), 0);
}

/// What an SDK sees when every server is frozen (SIGSTOP), then killed: held answers come
/// back at once. A fetch's three calls (token PUT, role listing, credentials GET), timed
/// inside the pod once the role is older than `--role-ttl`, take at most twice what they
/// took before the fault, and serve the credentials held before it.
#[test]
fn with_every_server_frozen_or_killed_a_credential_fetch_takes_at_most_twice_its_healthy_time() {
    if !privileged("server outage as an SDK sees it") {
        return;
    }
    let mut c = Cluster::team(&["--role-ttl", "1s"]);
    let pod = c.pod("a", json!({"iam.amazonaws.com/role": "app-a"}));
    assert!(c.node.served(&pod, "app-a"));
    let (healthy, keys) = median_fetch(&c.node, &pod, 7).expect("healthy fetches");
    let held = keys.last().cloned().expect("a key");
    let reachable = servers_reachable;
    for fault in ["STOP", "KILL"] {
        for server in &c.servers {
            outage::signal(server.pid(), fault).expect("signal");
        }
        // The first fetch after the fault, before the agent has noticed it: one call waits
        // the short --refresh-wait (100 ms), never the request deadline (915 ms a call
        // before), and the others not at all.
        std::thread::sleep(Duration::from_millis(1100));
        let (calls, key) = outage::fetch(&c.node, &pod).expect("fetch");
        eprintln!("SIG{fault}, first fetch: {calls:?}");
        assert_eq!(key, held, "{calls:?}");
        let first = outage::total(&calls);
        assert!(first < 2 * healthy + 120_000, "{calls:?}");
        // Once the agent knows no server answers (its last call or health check said so).
        assert!(
            poll(Duration::from_secs(15), || reachable(&c.node) == 0.0),
            "the agent never noticed: {}",
            c.node.agent_metrics()
        );
        let (outage, keys) = median_fetch(&c.node, &pod, 7).expect("fetches in the outage");
        eprintln!("SIG{fault}: median fetch {outage} µs, healthy {healthy} µs");
        assert!(keys.iter().all(|k| *k == held), "{keys:?}");
        // Twice the healthy time, with 2 ms for the noise of a shared 2-core machine.
        assert!(
            outage <= 2 * healthy + 2_000,
            "SIG{fault}: {outage} µs against {healthy} µs healthy"
        );
        if fault == "STOP" {
            for server in &c.servers {
                outage::signal(server.pid(), "CONT").expect("signal");
            }
            assert!(
                poll(Duration::from_secs(15), || reachable(&c.node) >= 1.0),
                "the servers never came back"
            );
        }
    }
    assert_eq!(c.node.fake_imds_connections(), 0);
}

#[test]
fn an_sts_stall_leaves_held_credentials_alone_and_new_pods_get_a_clear_answer() {
    if !privileged("STS stall") {
        return;
    }
    let mut c = Cluster::team(&LOAD_TEST_ARGS);
    let pod = c.pod("a", json!({"iam.amazonaws.com/role": "app-a"}));
    assert!(c.node.served(&pod, "app-a"));
    let creds = format!("{LISTING}app-a");
    assert!(c.node.get(&pod, &creds).starts_with("200 "));
    let before = finish_load(start_load(&c.node, &pod, "app-a", "2"));
    let arn = |role: &str| format!("arn:aws:iam::123456789012:role/{role}");
    let held_calls = c.sts.calls_for(&arn("app-a"));

    c.sts.stall(Duration::from_secs(10));
    let stalled_at = Instant::now();
    let during = finish_load(start_load(&c.node, &pod, "app-a", "2"));
    eprintln!("held credentials, before: {before:?}\n during the stall: {during:?}");
    assert_eq!(during.errors, 0);
    assert!(
        during.p99_us < (2.0 * before.p99_us).max(before.p99_us + 5_000.0),
        "p99 {} µs during the stall, {} µs before",
        during.p99_us,
        before.p99_us
    );
    // A pod that appears now: a clear 503 within the SDKs' timeout, not a hang.
    let new = c.pod("b", json!({"iam.amazonaws.com/role": "app-b"}));
    assert!(c.node.served(&new, "app-b"), "the role itself needs no STS");
    // Timed in the pod, as the SDK's own timeout runs: no process start in it.
    let line = c.node.run_in(
        &new.cgroup,
        &new.netns,
        &[HELPER.as_str(), "timed-get", &format!("{LISTING}app-b")],
    );
    let (status, rest) = line.trim().split_once(' ').expect("status");
    let (micros, answer) = rest.split_once(' ').expect("time");
    let took = Duration::from_micros(micros.parse().expect("microseconds"));
    assert!(
        status == "503" && answer.contains("AssumeRole has not answered"),
        "{line}"
    );
    assert!(
        took < Duration::from_millis(1000),
        "answered after {took:?}"
    );
    assert!(
        stalled_at.elapsed() < Duration::from_secs(10),
        "the test outlasted the stall"
    );
    // After the stall: served, with one AssumeRole per key and server, no herd.
    std::thread::sleep(Duration::from_secs(10).saturating_sub(stalled_at.elapsed()));
    let mut answer = String::new();
    assert!(
        (0..50).any(|_| {
            answer = c.node.get(&new, &format!("{LISTING}app-b"));
            let ok = answer.starts_with("200 ");
            if !ok {
                std::thread::sleep(Duration::from_millis(200));
            }
            ok
        }),
        "{answer}"
    );
    assert_eq!(c.sts.calls_for(&arn("app-b")), c.servers.len());
    assert_eq!(c.sts.calls_for(&arn("app-a")), held_calls);
}

#[tokio::test]
async fn an_api_server_restart_is_recovered_without_a_restart_and_deletions_are_seen() {
    let dir = tempfile::tempdir().expect("dir");
    let sts = Sts::start();
    let mut kube = Kube::start(dir.path());
    let rule = json!({"iam.amazonaws.com/permitted": "app-.*"});
    kube.namespace("team", rule.clone());
    let certs = Certs::new(dir.path());
    let server = Server::start(dir.path(), &certs, &sts, &kube, &["--watch-grace", "1s"]);
    let role = |r: &str| json!({"iam.amazonaws.com/role": r});
    let kept = kube.pod("team", "kept", NODE_NAME, role("app-kept"));
    let gone = kube.pod("team", "gone", NODE_NAME, role("app-gone"));
    let mut agent = server
        .client(&certs, Some("agent-node-1"))
        .await
        .expect("client");
    let creds = |uid: &str, role: &str| GetCredentialsRequest {
        pod_uid: uid.into(),
        node_name: NODE_NAME.into(),
        role_name: role.into(),
        container_id: String::new(),
    };
    for (uid, role) in [(&kept, "app-kept"), (&gone, "app-gone")] {
        let served = retry_until(
            Duration::from_secs(5),
            async || agent.get_credentials(creds(uid, role)).await,
            Result::is_ok,
        )
        .await;
        assert!(served.is_ok(), "{role} never served");
    }
    let ready = |server: &Server| {
        let (status, _) = kiam_e2e::stack::http(server.admin_port, "GET", "/ready", None);
        status == 200
    };
    // The API server goes away: the server leaves the Service after the grace period...
    kube.stop();
    assert!(
        eventually(Duration::from_secs(15), || !ready(&server)).await,
        "still ready without an API server"
    );
    // ...and comes back empty, with new resource versions; "gone" was deleted meanwhile.
    kube.restart_empty();
    kube.namespace("team", rule);
    kube.pod_with_uid("team", "kept", NODE_NAME, Some(&kept), role("app-kept"));
    assert!(
        eventually(Duration::from_secs(30), || ready(&server)).await,
        "not ready again:\n{}",
        server.log_text()
    );
    let refused = retry_until(
        Duration::from_secs(5),
        async || agent.get_credentials(creds(&gone, "app-gone")).await,
        |r| matches!(r, Err(status) if reason_of(status) == Reason::PodNotKnown),
    )
    .await;
    assert!(
        refused.is_ok(),
        "a pod deleted during the outage is still served"
    );
    agent
        .get_credentials(creds(&kept, "app-kept"))
        .await
        .expect("the pod that stayed is served");
}

/// What a pod's role and the namespace's rule were, over time.
#[derive(Default)]
struct Timeline {
    /// (when, pod UID, its role; `None` once deleted)
    roles: Vec<(Instant, String, Option<String>)>,
    /// (when, roles the namespace permits)
    rules: Vec<(Instant, Vec<String>)>,
}

impl Timeline {
    /// Whether `check` held at some moment of `[from, to]` for the step function `steps`.
    fn held_during<T>(
        steps: &[(Instant, T)],
        from: Instant,
        to: Instant,
        check: impl Fn(&T) -> bool,
    ) -> bool {
        let at_start = steps.iter().rfind(|(t, _)| *t <= from);
        at_start.is_some_and(|(_, v)| check(v))
            || steps.iter().any(|(t, v)| *t > from && *t <= to && check(v))
    }

    /// Whether `pod` may have been served `role` by an answer in `[from, to]`.
    fn allows(&self, pod: &str, role: &str, from: Instant, to: Instant) -> bool {
        let pod_roles: Vec<(Instant, Option<String>)> = self
            .roles
            .iter()
            .filter(|(_, uid, _)| uid == pod)
            .map(|(t, _, r)| (*t, r.clone()))
            .collect();
        Self::held_during(&pod_roles, from, to, |r| r.as_deref() == Some(role))
            && Self::held_during(&self.rules, from, to, |permitted| {
                permitted.iter().any(|p| p == role)
            })
    }
}

#[test]
fn three_hundred_pod_lifecycles_never_serve_a_wrong_role() {
    if !privileged("pod churn") {
        return;
    }
    const ROLE_TTL_MS: u64 = 300;
    // The documented window: an answer may lag a change by --role-ttl (plus the watch).
    let window = Duration::from_millis(ROLE_TTL_MS + 500);
    let roles = ["app-a", "app-b", "app-c", "app-d"];
    let narrow = ["app-a", "app-b"];
    let rule = |permitted: &[&str]| json!({"iam.amazonaws.com/permitted": permitted.join("|")});
    let mut c = Cluster::start(
        Node::new(),
        "churn",
        rule(&roles),
        &[
            "--role-ttl",
            &format!("{ROLE_TTL_MS}ms"),
            "--refusal-ttl",
            &format!("{ROLE_TTL_MS}ms"),
        ],
    );
    let timeline = Mutex::new(Timeline::default());
    timeline.lock().expect("lock").rules.push((
        Instant::now(),
        roles.iter().map(|r| r.to_string()).collect(),
    ));
    // Six workers, fifty lifecycles each; every lifecycle is a new pod (new UID, new cgroup)
    // under the worker's pod name.
    const WORKERS: usize = 6;
    const LIFECYCLES: usize = 50;
    let homes: Vec<Pod> = (0..WORKERS).map(|_| c.node.add_pod()).collect();
    let pods: Vec<Vec<Pod>> = homes
        .iter()
        .map(|home| {
            (0..LIFECYCLES)
                .map(|_| c.node.add_pod_sharing(home))
                .collect()
        })
        .collect();
    // (pod UID, served role, asked at, answered at)
    let answers = Mutex::new(Vec::<(String, String, Instant, Instant)>::new());
    let done = std::sync::atomic::AtomicBool::new(false);
    let c = &c;
    std::thread::scope(|scope| {
        // The namespace's rule flips between all four roles and two of them.
        scope.spawn(|| {
            let mut wide = true;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(700));
                wide = !wide;
                let permitted: &[&str] = if wide { &roles } else { &narrow };
                // Recorded before the change: the new rule may take effect from now on.
                let mut t = timeline.lock().expect("lock");
                t.rules.push((
                    Instant::now(),
                    permitted.iter().map(|r| r.to_string()).collect(),
                ));
                c.kube.namespace("churn", rule(permitted));
            }
        });
        let workers: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(w, lifecycles)| {
                let (timeline, answers) = (&timeline, &answers);
                scope.spawn(move || {
                    for (k, pod) in lifecycles.iter().enumerate() {
                        let name = format!("worker-{w}");
                        let set_role = |role: Option<&str>| {
                            timeline.lock().expect("lock").roles.push((
                                Instant::now(),
                                pod.uid.clone(),
                                role.map(str::to_owned),
                            ));
                            match role {
                                Some(role) => {
                                    let mut object = PodObject::new("churn", &name, NODE_NAME);
                                    object.uid = Some(&pod.uid);
                                    object.annotations = json!({"iam.amazonaws.com/role": role});
                                    c.kube.put_pod(&object);
                                }
                                None => c.kube.delete_pod("churn", &name),
                            }
                        };
                        set_role(Some(roles[(w + k) % roles.len()]));
                        let started = Instant::now();
                        let mut edited = false;
                        while started.elapsed() < Duration::from_millis(600) {
                            if !edited && started.elapsed() > Duration::from_millis(300) {
                                // The annotation is edited mid-life.
                                set_role(Some(roles[(w + k + 1) % roles.len()]));
                                edited = true;
                            }
                            let asked = Instant::now();
                            let listing = c.node.get(pod, LISTING);
                            let Some(role) = listing.strip_prefix("200 ") else {
                                continue;
                            };
                            let line = c.node.get(pod, &format!("{LISTING}{role}"));
                            let answered = Instant::now();
                            if let Some(doc) = line.strip_prefix("200 ") {
                                let doc: serde_json::Value =
                                    serde_json::from_str(doc).expect("credentials document");
                                let key = doc["AccessKeyId"].as_str().unwrap_or("").to_owned();
                                let issued = c.sts.role_of(&key).unwrap_or_else(|| {
                                    panic!("served credentials STS never issued: {key}")
                                });
                                let served = issued.rsplit('/').next().unwrap_or("").to_owned();
                                answers.lock().expect("lock").push((
                                    pod.uid.clone(),
                                    served,
                                    asked,
                                    answered,
                                ));
                            }
                            answers.lock().expect("lock").push((
                                pod.uid.clone(),
                                role.to_owned(),
                                asked,
                                answered,
                            ));
                        }
                        set_role(None);
                        // Deleted: nothing more once the window has passed.
                        std::thread::sleep(window);
                        let after = c.node.get(pod, LISTING);
                        assert!(
                            !after.starts_with("200 "),
                            "a deleted pod was served: {after}"
                        );
                        c.node.remove_pod(pod);
                    }
                })
            })
            .collect();
        // Every worker ends on its own; the rule flipper only once told to, also when a
        // worker failed (or the scope would wait for it forever).
        let ended: Vec<_> = workers.into_iter().map(|w| w.join()).collect();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        for worker in ended {
            if let Err(panic) = worker {
                std::panic::resume_unwind(panic);
            }
        }
    });
    let timeline = timeline.into_inner().expect("lock");
    let answers = answers.into_inner().expect("lock");
    let wrong: Vec<_> = answers
        .iter()
        .filter(|(uid, role, asked, answered)| {
            !timeline.allows(
                uid,
                role,
                asked.checked_sub(window).unwrap_or(*asked),
                *answered,
            )
        })
        .collect();
    eprintln!(
        "{} lifecycles, {} answers checked, {} rule changes",
        WORKERS * LIFECYCLES,
        answers.len(),
        timeline.rules.len()
    );
    assert!(
        answers.len() >= WORKERS * LIFECYCLES,
        "too few answers to mean anything"
    );
    assert!(
        wrong.is_empty(),
        "{} wrong answers, e.g. {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
}

#[test]
fn an_agent_upgrade_under_load_swaps_the_programs_without_a_gap() {
    if !privileged("agent upgrade") {
        return;
    }
    let variant = std::env::var_os("KIAM_EBPF_VARIANT_OBJECT")
        .map(std::path::PathBuf::from)
        .filter(|p| p.is_file())
        .expect("the variant eBPF object: run `cargo xtask build-ebpf --variant` and set KIAM_EBPF_VARIANT_OBJECT (cargo xtask test does)");
    let mut node = Node::new();
    let pod = node.add_pod();
    node.agent_args = LOAD_TEST_ARGS.map(str::to_owned).to_vec();
    node.start_agent();
    let identity = format!("http://{IMDS}/kiam/v1/identity");
    // Load for a fixed time (rounds of 20 requests), not a count a refused connect uses up
    // in microseconds: it goes on through both swaps and after them. Its answers go to a
    // file, so a full pipe never pauses it.
    let answers = node.dir.join("load-answers");
    let mut load = node
        .command_in(
            &pod.cgroup,
            &pod.netns,
            &[
                "sh",
                "-c",
                &format!(
                    "end=$(($(date +%s) + 8)); while [ $(date +%s) -lt $end ]; do {} get {identity} --count 20 --concurrency 2 --timeout-ms 3000 >> '{}'; done",
                    HELPER.as_str(),
                    answers.display()
                ),
            ],
        )
        .spawn()
        .expect("load");
    // Answered now, by the agent running: 20 of 20.
    let answered = |node: &Node, when: &str| {
        let out = node.run_in(
            &pod.cgroup,
            &pod.netns,
            &[HELPER.as_str(), "get", &identity, "--count", "20"],
        );
        let ok = out.lines().filter(|l| l.starts_with("200 {")).count();
        assert_eq!(ok, 20, "{when}: {out}\n{}", node.agent_log());
    };
    std::thread::sleep(Duration::from_millis(500));
    // Upgrade: the new agent brings other programs (another build), the same maps.
    node.kill_agent();
    node.agent_args.extend([
        "--ebpf-object".into(),
        variant.to_str().expect("utf-8").to_owned(),
    ]);
    node.start_agent();
    let upgraded = node.agent_log();
    assert!(
        upgraded.contains("Replaced") && upgraded.contains("kiam_connect4"),
        "the new programs did not replace the old ones:\n{upgraded}"
    );
    answered(&node, "after the upgrade");
    std::thread::sleep(Duration::from_millis(500));
    // And back again.
    node.kill_agent();
    node.agent_args = LOAD_TEST_ARGS.map(str::to_owned).to_vec();
    node.start_agent();
    answered(&node, "after the downgrade");
    assert!(
        load.try_wait().expect("load").is_none(),
        "the load ended before the swaps did"
    );
    assert!(load.wait().expect("load").success());
    let text = std::fs::read_to_string(&answers).expect("the load's answers");
    let lines: Vec<&str> = text.lines().collect();
    let ok = lines.iter().filter(|l| l.starts_with("200 {")).count();
    let refused: Vec<&&str> = lines.iter().filter(|l| !l.starts_with("200 {")).collect();
    assert!(
        refused.iter().all(|l| l.starts_with("ERROR")),
        "only refusals may be seen during the swap, got {:?}",
        &refused[..refused.len().min(5)]
    );
    assert!(ok > 100, "{ok} answers of {}", lines.len());
    assert_eq!(
        node.fake_imds_connections(),
        0,
        "a connection reached the node's IMDS"
    );
    let counts = node.attachments();
    for program in kiam_common::program_names::ALL {
        assert_eq!(counts.get(program), Some(&1), "{program}: {counts:?}");
    }
}
