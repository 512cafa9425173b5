//! The whole product on the real kernel, with real AWS SDKs inside test pods: network
//! namespaces and kubelet-shaped cgroups for the pods, the agent with its eBPF redirect, two
//! kiam servers, moto as STS and the Kubernetes API emulator (all inside the node's network
//! namespace). Run as root by `cargo xtask test`; without root each test prints a loud SKIP.

use std::{process::Output, time::Duration};

use kiam_e2e::{
    cluster::{Cluster, STS_URL},
    node::{HELPER, Pod, privileged},
    repo,
};
use serde_json::json;

const SDK: &str = env!("CARGO_BIN_EXE_kiam-e2e-sdk");
const CREDS: &str = "http://169.254.169.254/latest/meta-data/iam/security-credentials/";

/// What the tests do inside pods.
trait InPods {
    fn run(&self, pod: &Pod, cmd: &[&str], env: &[(&str, &str)]) -> Output;
    fn arn(&self, pod: &Pod, cmd: &[&str], env: &[(&str, &str)]) -> String;
    fn wait_served(&self, pod: &Pod, role: &str);
    fn helper(&self, pod: &Pod, args: &[&str]) -> String;
}

impl InPods for Cluster {
    fn run(&self, pod: &Pod, cmd: &[&str], env: &[(&str, &str)]) -> Output {
        let mut command = self.command(pod, cmd);
        for (k, v) in env {
            command.env(k, v);
        }
        command.output().expect("run in pod")
    }

    fn arn(&self, pod: &Pod, cmd: &[&str], env: &[(&str, &str)]) -> String {
        let out = self.run(pod, cmd, env);
        assert!(
            out.status.success(),
            "{cmd:?} failed: {}\n--- agent:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.node.agent_log()
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Waits until the servers know `pod` (their watch is asynchronous; the startup race has
    /// its own test).
    fn wait_served(&self, pod: &Pod, role: &str) {
        for _ in 0..100 {
            if self.helper(pod, &["get", CREDS]) == format!("200 {role}") {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("pod never served:\n{}", self.node.agent_log());
    }

    fn helper(&self, pod: &Pod, args: &[&str]) -> String {
        let mut cmd = vec![HELPER.as_str()];
        cmd.extend_from_slice(args);
        self.node
            .run_in(&pod.cgroup, &pod.netns, &cmd)
            .trim()
            .to_owned()
    }
}

fn role(name: &str) -> serde_json::Value {
    json!({"iam.amazonaws.com/role": name})
}

fn assumed(role: &str) -> String {
    format!("arn:aws:sts::123456789012:assumed-role/{role}/")
}

#[test]
fn real_aws_sdks_in_two_pods_get_their_own_roles() {
    if !privileged("real SDKs") {
        return;
    }
    let mut c = Cluster::team(&[]);
    let a = c.pod("a", role("app-a"));
    let b = c.pod("b", role("app-b"));
    c.wait_served(&a, "app-a");
    c.wait_served(&b, "app-b");

    let cli = c.aws_whoami(&a);
    assert!(
        cli.status.success(),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    assert!(String::from_utf8_lossy(&cli.stdout).contains(&assumed("app-a")));

    let python = repo(".venv/bin/python");
    let boto3 = format!(
        "import boto3; print(boto3.client('sts', endpoint_url='{STS_URL}').get_caller_identity()['Arn'])"
    );
    let py = python.to_str().expect("utf-8");
    assert!(
        c.arn(&a, &[py, "-c", &boto3], &[])
            .starts_with(&assumed("app-a"))
    );
    // boto3 over IPv6: fd00:ec2::254, redirected to the agent's IPv6 address.
    assert!(
        c.arn(
            &b,
            &[py, "-c", &boto3],
            &[("AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE", "IPv6")]
        )
        .starts_with(&assumed("app-b"))
    );
    let script = repo("tests/js/whoami.js");
    assert!(
        c.arn(&a, &["node", script.to_str().expect("utf-8"), STS_URL], &[])
            .starts_with(&assumed("app-a"))
    );
    assert!(
        c.arn(&b, &[SDK, STS_URL], &[])
            .starts_with(&assumed("app-b"))
    );

    // IMDSv1 (no token) as the SDKs fall back to it: the pod's role and credentials.
    assert_eq!(c.helper(&a, &["get", CREDS]), "200 app-a");
    let line = c.helper(&a, &["get", &format!("{CREDS}app-a")]);
    let doc: serde_json::Value =
        serde_json::from_str(line.strip_prefix("200 ").expect("200")).expect("json");
    assert_eq!(doc["Code"], "Success");
    assert_eq!(doc["Type"], "AWS-HMAC");
    assert!(doc["Expiration"].as_str().is_some_and(|e| e.ends_with('Z')));
    // Another pod's role is not there for this pod.
    assert!(
        c.helper(&a, &["get", &format!("{CREDS}app-b")])
            .starts_with("404")
    );
    assert_eq!(
        c.node.fake_imds_connections(),
        0,
        "nothing reached the real IMDS"
    );
    // Two roles, two servers (each prefetches on its own): roles × servers AssumeRole calls,
    // whatever the number of SDK requests.
    assert_eq!(c.sts.calls(), 2 * 2);
}

#[test]
fn pods_without_a_permitted_role_get_a_clear_error_and_an_event() {
    if !privileged("refusals") {
        return;
    }
    let mut c = Cluster::team(&[]);
    let plain = c.pod("plain", json!({}));
    let sneaky = c.pod("sneaky", role("admin"));
    let out = c.aws_whoami(&plain);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Unable to locate credentials"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = c.helper(&plain, &["get", CREDS]);
    assert!(
        line.starts_with("404 ") && line.contains("has no iam.amazonaws.com/role annotation"),
        "{line}"
    );
    let out = c.aws_whoami(&sneaky);
    assert!(!out.status.success());
    let line = c.helper(&sneaky, &["get", CREDS]);
    assert!(
        line.starts_with("403 ") && line.contains("does not permit"),
        "{line}"
    );
    let mut evented = false;
    for _ in 0..100 {
        evented = c.kube.events().iter().any(|e| {
            e["reason"] == "IAMRoleForbidden" && e["regarding"]["uid"] == sneaky.uid.as_str()
        });
        if evented {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(evented, "no Event for the forbidden role");
    assert_eq!(c.sts.calls(), 0);
}

#[test]
fn only_allow_listed_paths_reach_the_real_metadata_service() {
    if !privileged("allow list") {
        return;
    }
    let mut c = Cluster::team(&[]);
    let a = c.pod("a", role("app-a"));
    let region = "http://169.254.169.254/latest/meta-data/placement/region";
    assert_eq!(c.helper(&a, &["get", region]), "200 real-imds");
    let reached = c.node.fake_imds_connections();
    assert!(reached >= 1, "the allow-listed path was not forwarded");
    for path in [
        "latest/meta-data/instance-id",
        "latest/user-data",
        "latest/meta-data/iam/security-credentials/node-role/x",
    ] {
        let line = c.helper(&a, &["get", &format!("http://169.254.169.254/{path}")]);
        assert!(line.starts_with("404"), "{path}: {line}");
    }
    assert_eq!(
        c.node.fake_imds_connections(),
        reached,
        "a refused path reached the real IMDS"
    );
}

#[test]
fn imds_v2_tokens_are_bound_to_the_pod_and_checked() {
    if !privileged("tokens") {
        return;
    }
    let mut c = Cluster::team(&[]);
    let a = c.pod("a", role("app-a"));
    let b = c.pod("b", role("app-b"));
    c.wait_served(&a, "app-a");
    c.wait_served(&b, "app-b");
    let token_url = "http://169.254.169.254/latest/api/token";
    let put = |pod: &Pod, headers: &[&str]| {
        let mut args = vec!["request", token_url, "--method", "PUT"];
        for h in headers {
            args.extend(["--header", h]);
        }
        c.helper(pod, &args)
    };
    let line = put(&a, &["X-aws-ec2-metadata-token-ttl-seconds: 21600"]);
    let token = line.strip_prefix("200 ").expect("token").to_owned();
    let get = |pod: &Pod, token: &str| {
        c.helper(
            pod,
            &[
                "request",
                CREDS,
                "--header",
                &format!("X-aws-ec2-metadata-token: {token}"),
            ],
        )
    };
    assert_eq!(get(&a, &token), "200 app-a");
    assert!(get(&b, &token).starts_with("401"), "another pod's token");
    assert!(
        get(&a, &format!("{token}A")).starts_with("401"),
        "forged token"
    );
    assert!(put(&a, &["X-aws-ec2-metadata-token-ttl-seconds: 21601"]).starts_with("400"));
    assert!(
        put(
            &a,
            &[
                "X-aws-ec2-metadata-token-ttl-seconds: 60",
                "X-Forwarded-For: 10.0.0.1"
            ]
        )
        .starts_with("403")
    );
    let short = put(&a, &["X-aws-ec2-metadata-token-ttl-seconds: 1"]);
    let short = short.strip_prefix("200 ").expect("token").to_owned();
    std::thread::sleep(Duration::from_millis(2100));
    assert!(get(&a, &short).starts_with("401"), "expired token");
}

#[test]
fn a_server_dying_mid_run_is_invisible_and_an_outage_serves_cached_credentials() {
    if !privileged("failover") {
        return;
    }
    // Ask the servers for the role on (nearly) every request, so the run exercises them; a
    // connection rate this one pod's run stays under.
    let mut c = Cluster::team(&["--role-ttl", "1ms", "--pod-connection-rate", "5000"]);
    let a = c.pod("a", role("app-a"));
    c.wait_served(&a, "app-a");
    let url = format!("{CREDS}app-a");
    assert!(c.helper(&a, &["get", &url]).starts_with("200"));
    let mut run = c.node.spawn_in(
        &a.cgroup,
        &a.netns,
        &[
            HELPER.as_str(),
            "get",
            &url,
            "--count",
            "2000",
            "--concurrency",
            "4",
        ],
    );
    std::thread::sleep(Duration::from_millis(300));
    c.servers[0].kill();
    // The kill landed mid-run: the client had requests left to make.
    assert!(
        run.try_wait().expect("client").is_none(),
        "the run ended before the kill: make it longer"
    );
    let out = run.wait_with_output().expect("client");
    let text = String::from_utf8_lossy(&out.stdout);
    let failed: Vec<&str> = text.lines().filter(|l| !l.starts_with("200 ")).collect();
    assert_eq!(text.lines().count(), 2000);
    assert!(
        failed.is_empty(),
        "client-visible errors: {:?}",
        &failed[..failed.len().min(5)]
    );
    // Every server gone: the agent keeps serving what it holds.
    c.servers[1].kill();
    for _ in 0..3 {
        assert!(c.helper(&a, &["get", &url]).starts_with("200"));
    }
}

#[test]
fn a_pod_the_servers_do_not_know_yet_gets_a_clear_error_within_the_sdk_timeout() {
    if !privileged("startup race") {
        return;
    }
    let mut c = Cluster::team(&[]);
    // The pod runs (cgroup, network) but the API server has not told kiam about it yet.
    let early = c.node.add_pod();
    // Timed in the pod, as the SDK's own timeout runs: no process start in it.
    let line = c.helper(&early, &["timed-get", CREDS]);
    let (status, rest) = line.split_once(' ').expect("status");
    let (micros, body) = rest.split_once(' ').expect("time");
    assert!(status == "404" && body.contains("not known"), "{line}");
    let waited = Duration::from_micros(micros.parse().expect("microseconds"));
    assert!(
        waited < Duration::from_millis(1000),
        "answered after {waited:?}: botocore gives up after 1 s"
    );
    // Once the watch delivers it, the same pod is served.
    c.kube.pod_with_uid(
        "team",
        "early",
        "node-1",
        Some(&early.uid),
        role("app-early"),
    );
    let mut served = String::new();
    for _ in 0..50 {
        served = c.helper(&early, &["get", CREDS]);
        if served == "200 app-early" {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(served, "200 app-early");
}

/// A pod with per-container roles whose container the kubelet has not reported yet (no
/// `containerID` in its status): the first request waits within the SDK's timeout for the
/// status, then gets the container's role, and is never answered with the pod's. A second
/// container of the pod that the annotation does not list gets the pod's role, and a
/// connection made in one container and used from the other keeps its maker's identity.
#[test]
fn a_container_not_yet_in_the_status_waits_and_never_gets_the_pods_role() {
    if !privileged("per-container roles: a container not reported yet") {
        return;
    }
    let mut c = Cluster::team(&[]);
    let pod = c.node.add_pod();
    // A second container of the same pod: its own cgroup beside the first.
    let sidecar_id = "5".repeat(64);
    let sidecar = pod
        .cgroup
        .with_file_name(format!("cri-containerd-{sidecar_id}.scope"));
    std::fs::create_dir_all(&sidecar).expect("sidecar cgroup");
    let put = |statuses: serde_json::Value| {
        c.kube.put(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "two", "namespace": "team", "uid": pod.uid,
                "annotations": {"iam.amazonaws.com/role": "app-pod",
                                "iam.amazonaws.com/container-roles": r#"{"app": "app-container"}"#}},
            "spec": {"nodeName": kiam_e2e::cluster::NODE_NAME,
                     "containers": [{"name": "app", "image": "app"}, {"name": "sidecar", "image": "app"}]},
            "status": {"phase": "Running", "containerStatuses": statuses}}));
    };
    put(json!([]));
    // Until the status lists it: "not known yet", never the pod's role.
    let mut line = String::new();
    for _ in 0..100 {
        line = c.helper(&pod, &["get", CREDS]);
        assert!(!line.contains("app-pod"), "{line}");
        if line.contains("does not list container") {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(line.starts_with("404 "), "{line}");
    // The kubelet reports both containers while a request waits.
    let report = std::thread::scope(|scope| {
        scope.spawn(|| {
            std::thread::sleep(Duration::from_millis(300));
            put(json!([
                {"name": "app", "containerID": format!("containerd://{}", pod.container_id)},
                {"name": "sidecar", "containerID": format!("containerd://{sidecar_id}")}
            ]));
        });
        let started = std::time::Instant::now();
        let line = c.helper(&pod, &["get", CREDS]);
        (line, started.elapsed())
    });
    assert_eq!(report.0, "200 app-container", "{}", c.node.agent_log());
    assert!(
        report.1 < Duration::from_secs(1),
        "answered after {:?}",
        report.1
    );
    let unlisted = c
        .node
        .run_in(&sidecar, &pod.netns, &[HELPER.as_str(), "get", CREDS]);
    assert_eq!(unlisted.trim(), "200 app-pod");
    // A connection keeps its connector's identity whoever sends on it: made in one
    // container, then used from a process in the other, each way.
    let moved = |from: &std::path::Path, to: &std::path::Path| {
        let to = to.to_str().expect("utf-8");
        c.node
            .run_in(
                from,
                &pod.netns,
                &[HELPER.as_str(), "connect-then-move", CREDS, "--to", to],
            )
            .trim()
            .to_owned()
    };
    assert_eq!(moved(&pod.cgroup, &sidecar), "200 app-container");
    assert_eq!(moved(&sidecar, &pod.cgroup), "200 app-pod");
}
