//! Node identity (issue: node identity on by default): agents prove their node with the
//! projected service-account token the kubelet gives their pod, reviewed by the server with
//! TokenReview against the API emulator, which answers as the real API server does. The real
//! kiam-server binary and moto, over mutual TLS; the rotation test runs the real agent.

use std::time::Duration;

use kiam_e2e::{
    cluster::{Cluster, NODE_NAME},
    metric,
    node::{HELPER, privileged},
    stack::{AgentClient, ServerStack, TokenSpec, eventually, known, retry_until},
};
use kiam_proto::{GetCredentialsRequest, GetPodRoleRequest, Reason, reason_of};
use serde_json::json;
use tonic::Code;

const WAIT: Duration = Duration::from_secs(15);

/// One server and what it talks to, with the helpers these tests share.
struct Env(ServerStack);

impl std::ops::Deref for Env {
    type Target = ServerStack;
    fn deref(&self) -> &ServerStack {
        &self.0
    }
}

fn start(extra: &[&str]) -> Env {
    Env(ServerStack::start(extra))
}

impl Env {
    /// An agent presenting the shared certificate (no node in it) and `token`.
    async fn agent(&self, token: Option<String>) -> AgentClient {
        self.server
            .client_with_token(&self.certs, Some("agent-shared"), token)
            .await
            .expect("mTLS client")
    }

    fn refusals(&self, reason: &str) -> f64 {
        let series = format!("kiam_server_refusals_total{{reason=\"{reason}\"}}");
        metric(&self.server.metrics(), &series).unwrap_or(0.0)
    }

    /// A pod on `node` with a permitted role, known to the server, its credentials
    /// prefetched (so later STS calls are the ones a request causes).
    async fn pod(&self, name: &str, node: &str) -> String {
        let uid = self.kube.pod(
            "team",
            name,
            node,
            json!({"iam.amazonaws.com/role": "app-web"}),
        );
        let mut trusted = self.agent(Some(self.kube.agent_token(node))).await;
        let known = retry_until(
            WAIT,
            async || trusted.get_pod_role(role_request(&uid, node)).await,
            known,
        )
        .await;
        assert!(known.is_ok(), "pod {uid} never known");
        assert!(eventually(WAIT, || self.sts.calls() >= 1).await);
        uid
    }
}

fn role_request(uid: &str, node: &str) -> GetPodRoleRequest {
    GetPodRoleRequest {
        pod_uid: uid.into(),
        node_name: node.into(),
        container_id: String::new(),
    }
}

fn creds_request(uid: &str, node: &str) -> GetCredentialsRequest {
    GetCredentialsRequest {
        pod_uid: uid.into(),
        node_name: node.into(),
        role_name: "app-web".into(),
        container_id: String::new(),
    }
}

#[tokio::test]
async fn an_agent_gets_only_the_pods_of_the_node_its_token_names() {
    let env = start(&[]);
    let uid = env.pod("web", "node-b").await;
    let calls = env.sts.calls();
    let mut agent_a = env.agent(Some(env.kube.agent_token("node-a"))).await;
    // Claiming node B, with a token that names node A.
    let status = agent_a
        .get_credentials(creds_request(&uid, "node-b"))
        .await
        .expect_err("not its node");
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(reason_of(&status), Reason::AgentNodeMismatch);
    assert!(status.message().contains("node-a"), "{}", status.message());
    // Honest about node A, asking about a pod on node B.
    let status = agent_a
        .get_credentials(creds_request(&uid, "node-a"))
        .await
        .expect_err("pod elsewhere");
    assert_eq!(reason_of(&status), Reason::PodOnOtherNode);
    assert_eq!(env.refusals("AGENT_NODE_MISMATCH"), 1.0);
    assert_eq!(env.refusals("POD_ON_OTHER_NODE"), 1.0);
    assert_eq!(env.sts.calls(), calls, "no STS call for a refused agent");
    // Node B's agent is served.
    let mut agent_b = env.agent(Some(env.kube.agent_token("node-b"))).await;
    let creds = agent_b
        .get_credentials(creds_request(&uid, "node-b"))
        .await
        .expect("served")
        .into_inner();
    assert!(creds.role_arn.ends_with(":role/app-web"));
}

#[tokio::test]
async fn bad_tokens_are_refused_each_with_its_own_reason() {
    let env = start(&[]);
    let uid = env.pod("web", "node-1").await;
    let (agent_name, agent_uid) = env.kube.agent_pod("node-1");
    let bound = TokenSpec {
        pod: Some((&agent_name, &agent_uid)),
        node: Some("node-1"),
        ..TokenSpec::agent()
    };
    let other_account = env.kube.mint_token(&TokenSpec {
        namespace: "team",
        service_account: "default",
        pod: None,
        ..bound.clone()
    });
    let wrong_audience = env.kube.mint_token(&TokenSpec {
        audiences: vec!["vault"],
        ..bound.clone()
    });
    let expired = env.kube.mint_token(&TokenSpec {
        expiration_seconds: 1,
        ..bound.clone()
    });
    let forged = {
        let good = env.kube.mint_token(&bound);
        let (head, _) = good.rsplit_once('.').expect("jwt");
        format!("{head}.AAAA")
    };
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let cases = [
        (
            other_account,
            Reason::AgentTokenWrongServiceAccount,
            Code::PermissionDenied,
        ),
        (
            wrong_audience,
            Reason::AgentTokenWrongAudience,
            Code::Unauthenticated,
        ),
        (expired, Reason::AgentTokenExpired, Code::Unauthenticated),
        (forged, Reason::AgentTokenInvalid, Code::Unauthenticated),
    ];
    for (token, reason, code) in cases {
        let mut agent = env.agent(Some(token)).await;
        let status = agent
            .get_pod_role(role_request(&uid, "node-1"))
            .await
            .expect_err("refused");
        assert_eq!(
            (reason_of(&status), status.code()),
            (reason, code),
            "{}",
            status.message()
        );
    }
    // A review that cannot be made (the API server answers 503, whatever kube-rs retries):
    // refused, and reviewed again later.
    env.kube.fail_token_reviews(1000);
    let fresh = env.kube.mint_token(&bound);
    let mut agent = env.agent(Some(fresh)).await;
    let status = agent
        .get_pod_role(role_request(&uid, "node-1"))
        .await
        .expect_err("unavailable");
    assert_eq!(reason_of(&status), Reason::AgentTokenReviewUnavailable);
    assert_eq!(status.code(), Code::Unavailable);
    env.kube.fail_token_reviews(0);
    agent
        .get_pod_role(role_request(&uid, "node-1"))
        .await
        .expect("the same token is reviewed again and accepted");
    // A token whose pod was deleted no longer counts.
    env.kube.delete_pod("kiam", &agent_name);
    let stale = env.kube.mint_token(&bound);
    let mut agent = env.agent(Some(stale)).await;
    let status = agent
        .get_pod_role(role_request(&uid, "node-1"))
        .await
        .expect_err("pod gone");
    assert_eq!(reason_of(&status), Reason::AgentTokenInvalid);
}

#[tokio::test]
async fn older_clusters_name_the_node_through_the_tokens_pod() {
    let env = start(&[]);
    let uid = env.pod("web", "node-1").await;
    let (name, agent_uid) = env.kube.agent_pod("node-1");
    // No node-name extra (Kubernetes before 1.30): the bound pod's spec.nodeName decides.
    let token = env.kube.mint_token(&TokenSpec {
        pod: Some((&name, &agent_uid)),
        node: None,
        ..TokenSpec::agent()
    });
    let mut agent = env.agent(Some(token.clone())).await;
    agent
        .get_pod_role(role_request(&uid, "node-1"))
        .await
        .expect("node from the agent's pod");
    let status = agent
        .get_pod_role(role_request(&uid, "node-2"))
        .await
        .expect_err("not node-2");
    assert_eq!(reason_of(&status), Reason::AgentNodeMismatch);
    // An unbound token names no node at all.
    let unbound = env.kube.mint_token(&TokenSpec::agent());
    let mut agent = env.agent(Some(unbound)).await;
    let status = agent
        .get_pod_role(role_request(&uid, "node-1"))
        .await
        .expect_err("no node");
    assert_eq!(reason_of(&status), Reason::AgentTokenNoNode);
}

#[tokio::test]
async fn a_thousand_requests_cost_one_token_review() {
    let env = start(&[]);
    let uid = env.pod("web", "node-1").await;
    let token = env.kube.agent_token("node-1");
    let before = env.kube.token_reviews();
    let mut agent = env.agent(Some(token)).await;
    for i in 0..1000 {
        let answer = match i % 2 {
            0 => agent
                .get_pod_role(role_request(&uid, "node-1"))
                .await
                .map(|_| ()),
            _ => agent
                .get_credentials(creds_request(&uid, "node-1"))
                .await
                .map(|_| ()),
        };
        answer.expect("served");
    }
    assert_eq!(env.kube.token_reviews() - before, 1);
}

#[tokio::test]
async fn the_shared_certificate_alone_is_refused_unless_explicitly_allowed() {
    let env = start(&[]);
    let uid = env.pod("web", "node-1").await;
    let mut agent = env.agent(None).await;
    let status = agent
        .get_pod_role(role_request(&uid, "node-1"))
        .await
        .expect_err("no identity");
    assert_eq!(reason_of(&status), Reason::AgentIdentityMissing);
    assert_eq!(status.code(), Code::Unauthenticated);
    // A certificate that names the node is the second way.
    let mut node1 = env
        .server
        .client(&env.certs, Some("agent-node-1"))
        .await
        .expect("client");
    node1
        .get_pod_role(role_request(&uid, "node-1"))
        .await
        .expect("certificate identity");

    let open = start(&["--allow-unidentified-agents"]);
    let uid = open.pod("web", "node-1").await;
    let mut agent = open.agent(None).await;
    agent
        .get_pod_role(role_request(&uid, "node-1"))
        .await
        .expect("allowed by the opt-out");
    assert!(
        open.server
            .log_text()
            .contains("--allow-unidentified-agents: an agent that proves no node"),
        "the opt-out warns at start"
    );
}

#[test]
fn a_rotated_token_is_picked_up_without_a_restart() {
    if !privileged("token rotation") {
        return;
    }
    let mut c = Cluster::team(&["--role-ttl", "200ms", "--refusal-ttl", "200ms"]);
    let a = c.pod("a", json!({"iam.amazonaws.com/role": "app-a"}));
    let listing = "http://169.254.169.254/latest/meta-data/iam/security-credentials/";
    let get = |c: &Cluster, pod: &kiam_e2e::node::Pod| {
        c.node
            .run_in(&pod.cgroup, &pod.netns, &[HELPER.as_str(), "get", listing])
            .trim()
            .to_owned()
    };
    let poll = |c: &Cluster, pod: &kiam_e2e::node::Pod, want: &dyn Fn(&str) -> bool| {
        kiam_e2e::poll(Duration::from_secs(10), || want(&get(c, pod)))
    };
    assert!(
        poll(&c, &a, &|l| l == "200 app-a"),
        "{}",
        c.node.agent_log()
    );
    // The kubelet rotates the token; here to one for another node, so the switch shows. A
    // refusal of the agent itself says nothing about a pod, so what pod a holds stands (as
    // in an outage); a pod with nothing held is told why.
    c.write_agent_token(&c.kube.agent_token("node-9"));
    let b = c.pod("b", json!({"iam.amazonaws.com/role": "app-b"}));
    assert!(
        poll(&c, &b, &|l| l.starts_with("403") && l.contains("node-9")),
        "the agent kept its old token: {}",
        get(&c, &b)
    );
    assert_eq!(get(&c, &a), "200 app-a");
    c.write_agent_token(&c.kube.agent_token(NODE_NAME));
    assert!(poll(&c, &b, &|l| l == "200 app-b"), "{}", get(&c, &b));
}

/// The opt-in start-up taint: the real agent, once ready, removes `kiam.rs/agent-not-ready`
/// from its own node (and nothing else), with a token of its service account bound to its
/// pod on that node; the same token may not touch another node.
#[test]
fn the_agent_removes_the_startup_taint_from_its_own_node_only() {
    if !privileged("start-up taint") {
        return;
    }
    let mut c = Cluster::team(&[]);
    let dedicated = json!({"key": "dedicated", "value": "kiam", "effect": "NoSchedule"});
    let startup = json!({"key": "kiam.rs/agent-not-ready", "effect": "NoSchedule"});
    for node in [NODE_NAME, "node-2"] {
        c.kube.node(node, json!([dedicated, startup]));
    }
    // The agent pod's API token (the API server's audience), bound to its pod on node-1.
    let (pod, uid) = c.kube.agent_pod(NODE_NAME);
    let token = c.kube.mint_token(&TokenSpec {
        pod: Some((&pod, &uid)),
        node: Some(NODE_NAME),
        audiences: vec!["https://kubernetes.default.svc.cluster.local"],
        ..TokenSpec::agent()
    });
    let kubeconfig = c
        .kube
        .kubeconfig_with_token(&c.node.dir.join("agent-kubeconfig"), &token);
    c.node.kill_agent();
    c.node.agent_args.push("--remove-startup-taint".into());
    c.node.agent_env.push((
        "KUBECONFIG".into(),
        kubeconfig.to_str().expect("utf-8").into(),
    ));
    c.node.start_agent();
    let taints = |node: &str| c.kube.get_node(node)["spec"]["taints"].clone();
    assert!(
        kiam_e2e::poll(WAIT, || taints(NODE_NAME) == json!([dedicated])),
        "the start-up taint was not removed: {}\n{}",
        taints(NODE_NAME),
        c.node.agent_log()
    );
    assert!(c.node.agent_log().contains("removed the start-up taint"));
    // Another node, with the same token: refused by the admission rule, untouched.
    let patch = json!([{"op": "replace", "path": "/spec/taints", "value": [dedicated]}]);
    let (status, answer) = c.kube.patch_node("node-2", &token, &patch);
    assert_eq!(status, 403, "{answer}");
    assert!(
        answer["message"]
            .as_str()
            .is_some_and(|m| m.contains("only change the node it runs on")),
        "{answer}"
    );
    assert_eq!(taints("node-2"), json!([dedicated, startup]));
    // Its own node, but anything beyond removing the start-up taint: refused too.
    let (status, answer) = c.kube.patch_node(
        NODE_NAME,
        &token,
        &json!([{"op": "add", "path": "/metadata/labels/extra", "value": "x"}]),
    );
    assert_eq!(status, 403, "{answer}");
    let (status, _) = c.kube.patch_node(
        NODE_NAME,
        &token,
        &json!([{"op": "replace", "path": "/spec/taints", "value": []}]),
    );
    assert_eq!(status, 403, "removing another taint");
    // Without a token: not even read.
    let (status, _) = c.kube.patch_node(NODE_NAME, "not-a-token", &patch);
    assert_eq!(status, 401);
}
