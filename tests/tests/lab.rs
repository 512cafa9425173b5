//! The node lab (`kiam_e2e::lab`): kiam from the shipped manifests and images, on containerd
//! with CNI and a stand-in kubelet, serving real containers running real SDKs. Run as root by
//! `cargo xtask test`; without root each prints a loud SKIP. A lab that cannot start (no
//! containerd, no images) fails, naming what is missing.

use std::time::Duration;

use kiam_e2e::{
    lab::{AWS_WHOAMI, Lab, LabPod, NODE_IP, WORKLOAD_IMAGE},
    node::privileged,
};
use serde_json::json;

const TEAM: &str = "team";
const LISTING: &str = "http://169.254.169.254/latest/meta-data/iam/security-credentials/";

fn lab_with_team() -> Lab {
    let lab = Lab::start();
    lab.ensure_namespace(TEAM, json!({"iam.amazonaws.com/permitted": "app-.*"}));
    lab
}

fn sts_endpoint(lab: &Lab) -> String {
    format!("http://{NODE_IP}:{}", lab.sts.moto_port)
}

/// `aws sts get-caller-identity` (the AWS CLI, botocore's metadata provider) and the Rust
/// SDK inside `pod`'s `app` container: the ARNs they print.
fn caller_identities(lab: &Lab, pod: &LabPod) -> (String, String) {
    caller_identities_in(lab, pod, "app")
}

/// [`caller_identities`] in `container` of `pod`.
fn caller_identities_in(lab: &Lab, pod: &LabPod, container: &str) -> (String, String) {
    let endpoint = sts_endpoint(lab);
    let sts = format!("AWS_ENDPOINT_URL_STS={endpoint}");
    let mut cli = vec!["env", "AWS_DEFAULT_REGION=us-east-1", sts.as_str()];
    cli.extend(AWS_WHOAMI);
    let (code, cli, err) = lab.exec(pod, container, &cli, Duration::from_secs(60));
    assert_eq!(code, 0, "aws: {cli}{err}\n{}", lab.diagnostics());
    let (code, rust, err) = lab.exec(
        pod,
        container,
        &["kiam-e2e-sdk", &endpoint],
        Duration::from_secs(60),
    );
    assert_eq!(code, 0, "rust sdk: {rust}{err}");
    (cli.trim().to_owned(), rust.trim().to_owned())
}

/// Two pods with two roles, each a real container started by containerd from the lab's
/// workload image: the AWS CLI and the Rust SDK in each get their own role's credentials
/// from kiam, which runs from the shipped manifests and images.
#[test]
fn real_sdks_in_containers_get_their_pods_roles() {
    if !privileged("node lab: SDKs in containers") {
        return;
    }
    let mut lab = lab_with_team();
    let a = lab.workload(TEAM, "frontend", json!({"iam.amazonaws.com/role": "app-a"}));
    let b = lab.workload(TEAM, "backend", json!({"iam.amazonaws.com/role": "app-b"}));
    for pod in [&a, &b] {
        let found = lab.wait_pod_ready(pod, Duration::from_secs(60));
        assert_eq!(
            found["spec"]["containers"][0]["image"],
            format!("{WORKLOAD_IMAGE}:{}", env!("CARGO_PKG_VERSION"))
        );
    }
    let (cli, rust) = caller_identities(&lab, &a);
    assert!(cli.contains(":assumed-role/app-a/"), "{cli}");
    assert!(rust.contains(":assumed-role/app-a/"), "{rust}");
    let (cli, rust) = caller_identities(&lab, &b);
    assert!(cli.contains(":assumed-role/app-b/"), "{cli}");
    assert!(rust.contains(":assumed-role/app-b/"), "{rust}");
    assert_eq!(lab.node.fake_imds_connections(), 0);
}

/// A kube-system host-network pod (as the VPC CNI or a CSI node plugin runs) is passed
/// through by the shipped rule (`namespace=kube-system,host-network=true`) and reaches the
/// node's own metadata service; an ordinary pod on the node never does.
#[test]
fn a_kube_system_host_network_pod_is_passed_through_and_no_other_pod_is() {
    if !privileged("node lab: pass-through") {
        return;
    }
    let mut lab = lab_with_team();
    let tenant = lab.workload(TEAM, "tenant", json!({}));
    let system = lab.create_pod(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "aws-node-lab", "namespace": "kube-system"},
        "spec": {"hostNetwork": true, "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "app", "image": format!("{WORKLOAD_IMAGE}:{}", env!("CARGO_PKG_VERSION"))}]}}));
    for pod in [&tenant, &system] {
        lab.wait_pod_ready(pod, Duration::from_secs(60));
    }
    let answer = lab.get(&tenant, LISTING);
    assert!(!answer.contains("node-role"), "{answer}");
    assert_eq!(lab.node.fake_imds_connections(), 0, "{answer}");
    let answer = lab.get(&system, LISTING);
    assert_eq!(answer, "200 node-role", "{}", lab.diagnostics());
    assert!(lab.node.fake_imds_connections() > 0);
}

/// The lifecycle the kubelet drives: a container that exits is restarted with a new
/// container ID and is still its pod's; a deleted pod's sandbox and cgroup go, and a pod
/// made again under the same name (another UID, another role) gets only its own role.
#[test]
fn restarted_containers_keep_their_pods_role_and_a_deleted_pods_name_carries_nothing() {
    if !privileged("node lab: container restart and pod deletion") {
        return;
    }
    let mut lab = lab_with_team();
    let pod = lab.workload(TEAM, "worker", json!({"iam.amazonaws.com/role": "app-a"}));
    lab.wait_pod_ready(&pod, Duration::from_secs(60));
    assert_eq!(lab.get(&pod, LISTING), "200 app-a");
    let first = lab.container_id(&pod, "app").expect("container");
    lab.stop_container(&pod, "app", Duration::ZERO);
    // The kubelet's back-off (10 s), then a new container.
    assert!(
        kiam_e2e::poll(Duration::from_secs(40), || {
            lab.container_id(&pod, "app").is_some_and(|id| id != first)
                && lab.pod(&pod)["status"]["containerStatuses"][0]["ready"] == true
        }),
        "never restarted: {}",
        lab.diagnostics()
    );
    assert_eq!(
        lab.pod(&pod)["status"]["containerStatuses"][0]["restartCount"],
        1
    );
    assert_eq!(lab.get(&pod, LISTING), "200 app-a");

    let uid = lab.pod(&pod)["metadata"]["uid"]
        .as_str()
        .expect("uid")
        .to_owned();
    let cgroups = lab.node.test_cgroup.join("kubepods/besteffort");
    assert!(
        cgroups.join(format!("pod{uid}")).is_dir(),
        "pod cgroup layout"
    );
    lab.delete_pod(&pod);
    assert!(
        kiam_e2e::poll(Duration::from_secs(30), || !cgroups
            .join(format!("pod{uid}"))
            .exists()),
        "the deleted pod's cgroup stayed: {}",
        lab.diagnostics()
    );
    let again = lab.workload(TEAM, "worker", json!({"iam.amazonaws.com/role": "app-b"}));
    lab.wait_pod_ready(&again, Duration::from_secs(60));
    assert_ne!(lab.pod(&again)["metadata"]["uid"], uid.as_str());
    assert_eq!(lab.get(&again, LISTING), "200 app-b");
    assert_eq!(lab.node.fake_imds_connections(), 0);
}

/// The agent's container killed under the kubelet (SIGKILL by the runtime), then restarted
/// after the kubelet's back-off: meanwhile the pinned programs keep pods from the node's
/// metadata service. Then the DaemonSet's image changes and its pod is replaced: the new
/// agent (its own init container first) takes over the pins, and pods are served again.
#[test]
fn the_agent_killed_or_upgraded_by_the_runtime_never_lets_a_pod_reach_the_node() {
    if !privileged("node lab: agent restart and upgrade") {
        return;
    }
    let mut lab = lab_with_team();
    let pod = lab.workload(TEAM, "worker", json!({"iam.amazonaws.com/role": "app-a"}));
    lab.wait_pod_ready(&pod, Duration::from_secs(60));
    assert_eq!(lab.get(&pod, LISTING), "200 app-a");
    let agent = lab.agent.clone();
    let first = lab.container_id(&agent, "agent").expect("agent container");
    lab.stop_container(&agent, "agent", Duration::ZERO);
    // While the agent is down: never the node's answer.
    for _ in 0..5 {
        let answer = lab.get(&pod, LISTING);
        assert!(!answer.contains("node-role"), "{answer}");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        kiam_e2e::poll(Duration::from_secs(60), || {
            lab.container_id(&agent, "agent")
                .is_some_and(|id| id != first)
                && lab.get(&pod, LISTING) == "200 app-a"
        }),
        "the agent never came back: {}",
        lab.diagnostics()
    );
    let release = "ghcr.io/example/kiam-agent:0.1.1-lab";
    lab.tag_image(
        &format!("ghcr.io/example/kiam-agent:{}", env!("CARGO_PKG_VERSION")),
        release,
    );
    let upgraded = lab.roll_agent(release);
    let mut answers = Vec::new();
    let served = kiam_e2e::poll(Duration::from_secs(90), || {
        let answer = lab.get(&pod, LISTING);
        let ok = answer == "200 app-a" && kiam_e2e::lab::ready(&lab.pod(&upgraded));
        answers.push(answer);
        ok
    });
    assert!(served, "{answers:?}\n{}", lab.diagnostics());
    assert!(
        answers.iter().all(|a| !a.contains("node-role")),
        "{answers:?}"
    );
    assert_eq!(
        lab.pod(&upgraded)["spec"]["containers"][0]["image"],
        release
    );
    assert_eq!(lab.node.fake_imds_connections(), 0);
}

/// Fifty pods started at once (two roles, alternating): each one's first request is
/// answered with its own role.
#[test]
fn fifty_pods_started_at_once_each_get_their_role_on_the_first_request() {
    if !privileged("node lab: fifty pods") {
        return;
    }
    let mut lab = lab_with_team();
    let pods: Vec<(LabPod, &str)> = (0..50)
        .map(|i| {
            let role = if i % 2 == 0 { "app-a" } else { "app-b" };
            let pod = lab.workload(
                TEAM,
                &format!("w{i:02}"),
                json!({"iam.amazonaws.com/role": role}),
            );
            (pod, role)
        })
        .collect();
    assert!(
        lab.wait_ready(|p| p.namespace == TEAM, 50, Duration::from_secs(300)),
        "{}",
        lab.diagnostics()
    );
    for (pod, role) in &pods {
        assert_eq!(lab.get(pod, LISTING), format!("200 {role}"), "{}", pod.name);
    }
    assert_eq!(lab.node.fake_imds_connections(), 0);
}

/// Per-container roles on real containers: the app container gets the pod's role, its
/// sidecar the role the container-roles annotation gives it, a third container listed with
/// no role nothing; each checked at STS. A token fetched in one container is refused in
/// another, and a restarted sidecar (a new container ID, reported by the kubelet after it
/// starts) gets its own role again, never the pod's.
#[test]
fn containers_of_one_pod_get_their_own_roles_and_tokens() {
    if !privileged("node lab: per-container roles") {
        return;
    }
    let mut lab = lab_with_team();
    let container = |name: &str| json!({"name": name, "image": kiam_e2e::lab::workload_image()});
    let pod = lab.create_pod(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "two", "namespace": TEAM, "annotations": {
            "iam.amazonaws.com/role": "app-a",
            "iam.amazonaws.com/container-roles": r#"{"sidecar": "app-b", "quiet": null}"#}},
        "spec": {"terminationGracePeriodSeconds": 1,
            "containers": [container("app"), container("sidecar"), container("quiet")]}}));
    lab.wait_pod_ready(&pod, Duration::from_secs(90));
    for (name, role) in [("app", "app-a"), ("sidecar", "app-b")] {
        let (cli, rust) = caller_identities_in(&lab, &pod, name);
        let arn = format!("arn:aws:sts::123456789012:assumed-role/{role}/");
        assert!(cli.starts_with(&arn), "{name}: {cli}");
        assert!(rust.starts_with(&arn), "{name}: {rust}");
    }
    let quiet = lab.request_in(&pod, "quiet", LISTING, "GET", &[]);
    assert!(
        quiet.starts_with("404") && quiet.contains("container quiet"),
        "{quiet}"
    );

    // IMDSv2: a token is its container's.
    let token = lab.request_in(
        &pod,
        "app",
        "http://169.254.169.254/latest/api/token",
        "PUT",
        &["X-aws-ec2-metadata-token-ttl-seconds: 60"],
    );
    let token = token.strip_prefix("200 ").expect("a token").to_owned();
    let header = format!("X-aws-ec2-metadata-token: {token}");
    assert_eq!(
        lab.request_in(&pod, "app", LISTING, "GET", &[&header]),
        "200 app-a"
    );
    let elsewhere = lab.request_in(&pod, "sidecar", LISTING, "GET", &[&header]);
    assert!(elsewhere.starts_with("401"), "{elsewhere}");

    // The sidecar restarted: a new container ID, the same role, never the pod's.
    let before = lab.container_id(&pod, "sidecar").expect("sidecar");
    lab.stop_container(&pod, "sidecar", Duration::ZERO);
    let mut answers = Vec::new();
    let restarted = kiam_e2e::poll(Duration::from_secs(60), || {
        if lab
            .container_id(&pod, "sidecar")
            .is_none_or(|id| id == before)
        {
            return false;
        }
        let answer = lab.request_in(&pod, "sidecar", LISTING, "GET", &[]);
        let served = answer == "200 app-b";
        answers.push(answer);
        served
    });
    assert!(restarted, "{answers:?}\n{}", lab.diagnostics());
    assert!(answers.iter().all(|a| !a.contains("app-a")), "{answers:?}");
    assert_eq!(lab.node.fake_imds_connections(), 0);
}
