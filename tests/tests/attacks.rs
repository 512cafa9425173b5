//! A hostile tenant on a real node (issue: hostile tenant): what one ordinary pod, with the
//! capabilities a container gets by default (`NET_RAW` included) or host networking outside
//! kube-system, tried against today's agent, and what now holds. Each attack comes with a
//! control that shows the probe could have seen it succeed. Run as root by `cargo xtask
//! test`; without root each test prints a loud SKIP.

use std::time::Duration;

use kiam_e2e::{
    cluster::Cluster,
    node::{AGENT_IP, AGENT_PORT, HELPER, Node, Pod, privileged},
    poll,
};
use serde_json::json;

const META: &str = "http://169.254.169.254";

fn helper(node: &Node, pod: &Pod, args: &[&str]) -> String {
    let mut cmd = vec![HELPER.as_str()];
    cmd.extend_from_slice(args);
    node.run_in(&pod.cgroup, &pod.netns, &cmd).trim().to_owned()
}

/// A node with the team namespace, the agent run with `agent_args`, and pod `a` (role
/// `app-a`) served.
fn cluster_with_pod(agent_args: &[&str]) -> (Cluster, Pod) {
    let mut c = Cluster::team(agent_args);
    let a = c.pod("a", json!({"iam.amazonaws.com/role": "app-a"}));
    assert!(c.node.served(&a, "app-a"), "{}", c.node.agent_log());
    (c, a)
}

/// With `--allow-route-regexp '.*'`, percent-encoded letters spelled the credential paths
/// past the guard (`%69am` is `iam` to any server that decodes), and the node's user data
/// (bootstrap secrets on self-managed nodes) was an ordinary path.
#[test]
fn encoded_names_non_ascii_paths_and_user_data_never_reach_the_node() {
    if !privileged("percent-encoded credential paths") {
        return;
    }
    let (c, a) = cluster_with_pod(&["--allow-route-regexp", ".*"]);
    for (path, want) in [
        ("/latest/meta-data/%69am/security-credentials/", "400 "),
        ("/latest/meta%2Ddata/iam/security-credentials/", "400 "),
        (
            "/latest/meta-data/%69dentity-credentials/ec2/security-credentials/ec2-instance",
            "400 ",
        ),
        ("/latest/dynamic/%69nstance-identity/pkcs7", "400 "),
        ("/latest/meta-data/%c3%a9", "400 "),
        ("/latest/meta-data/x%zz", "400 "),
        ("/latest/user-data", "404 "),
        ("/2009-04-04/user-data", "404 "),
    ] {
        let line = helper(&c.node, &a, &["request", &format!("{META}{path}")]);
        assert!(line.starts_with(want), "{path}: {line}");
    }
    assert!(
        c.node.fake_imds_requests().is_empty(),
        "{:#?}",
        c.node.fake_imds_requests()
    );
    // Control: `.*` forwards everything else, encodings that spell nothing included, so the
    // recorder sees what reaches it.
    for path in [
        "/latest/meta-data/instance-id",
        "/latest/meta-data/tags/instance/Cost%20Center",
    ] {
        let line = helper(&c.node, &a, &["request", &format!("{META}{path}")]);
        assert_eq!(line, "200 real-imds", "{path}");
    }
    // The agent's own IMDSv2 session (its token PUT) aside.
    let seen: Vec<String> = c
        .node
        .fake_imds_requests()
        .iter()
        .filter(|r| r.starts_with("GET"))
        .filter_map(|r| r.split_whitespace().nth(1).map(str::to_owned))
        .collect();
    assert_eq!(
        seen,
        [
            "/latest/meta-data/instance-id",
            "/latest/meta-data/tags/instance/Cost%20Center"
        ]
    );
    // `--allow-user-data` is the operator's explicit choice.
    drop(c);
    let (c, a) = cluster_with_pod(&["--allow-route-regexp", ".*", "--allow-user-data"]);
    let line = helper(
        &c.node,
        &a,
        &["request", &format!("{META}/latest/user-data")],
    );
    assert_eq!(line, "200 real-imds");
    assert!(
        poll(Duration::from_secs(1), || !c
            .node
            .fake_imds_requests()
            .is_empty()),
        "the control never reached the recorder"
    );
}

/// The metadata listener answered on every address of the node (`0.0.0.0:8186`), so any host
/// in the VPC or the cluster reached the agent's HTTP parser, filled the share that
/// connections without an identity have in common, and wrote a WARN line each time.
#[test]
fn the_metadata_listener_answers_only_on_the_agent_address() {
    if !privileged("listener on every node address") {
        return;
    }
    let (c, a) = cluster_with_pod(&[]);
    // The node's address on the pod's own link (its default gateway).
    let gateway = helper(&c.node, &a, &["gateway"]);
    let elsewhere = helper(
        &c.node,
        &a,
        &[
            "get",
            &format!("http://{gateway}:{AGENT_PORT}/latest/meta-data/"),
        ],
    );
    assert!(
        elsewhere.starts_with("ERROR") && elsewhere.contains("refused"),
        "the agent answered on {gateway}: {elsewhere}"
    );
    // Control: the agent's own address answers (and refuses a connection that did not come
    // through the redirect), so the probe reaches a listener where there is one.
    let direct = helper(
        &c.node,
        &a,
        &[
            "get",
            &format!("http://{AGENT_IP}:{AGENT_PORT}/latest/meta-data/"),
        ],
    );
    assert!(direct.starts_with("403 "), "{direct}");
}
