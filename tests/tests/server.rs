//! kiam-server end to end, on loopback: the real binary against moto (real STS protocol,
//! AssumeRole counted by a proxy) and the Kubernetes API emulator, over mutual TLS.

use std::{
    collections::HashSet,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use kiam_e2e::stack::{
    ACCOUNT, AgentClient, Certs, ServerStack, eventually, eventually_async, known, retry_until,
};
use kiam_proto::{GetCredentialsRequest, GetPodRoleRequest, HealthRequest};
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
    Env(ServerStack::start_with(
        |kube| {
            kube.namespace(
                "team",
                json!({"iam.amazonaws.com/permitted": "app-.*|arn:aws:iam::999999999999:role/cross"}),
            );
            kube.namespace(
                "legacy",
                json!({"iam.amazonaws.com/allowed-roles": "[\"old-app\"]"}),
            );
            kube.namespace("closed", json!({}));
        },
        extra,
    ))
}

impl Env {
    /// An mTLS client presenting agent certificate `agent`.
    async fn client(&self, agent: &str) -> AgentClient {
        self.server
            .client(&self.certs, Some(agent))
            .await
            .expect("mTLS client")
    }
}

fn role(name: &str) -> serde_json::Value {
    json!({"iam.amazonaws.com/role": name})
}

fn creds_request(uid: &str, node: &str, role: &str) -> GetCredentialsRequest {
    GetCredentialsRequest {
        pod_uid: uid.into(),
        node_name: node.into(),
        role_name: role.into(),
        container_id: String::new(),
    }
}

/// Waits until the server's index has the pod (its watch delivers it asynchronously), as an
/// agent's retries would.
async fn wait_known(client: &mut AgentClient, uid: &str) {
    let request = GetPodRoleRequest {
        pod_uid: uid.into(),
        node_name: "node-1".into(),
        container_id: String::new(),
    };
    let known = retry_until(
        Duration::from_secs(5),
        async || client.get_pod_role(request.clone()).await,
        known,
    )
    .await;
    assert!(known.is_ok(), "pod {uid} never reached the server's index");
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[tokio::test]
async fn a_permitted_pod_is_prefetched_and_served_with_enough_validity() {
    let env = start(&[]);
    let uid = env.kube.pod("team", "web", "node-1", role("app-web"));
    // Prefetched with no request at all.
    assert!(
        eventually(WAIT, || env.sts.calls() == 1).await,
        "no prefetch"
    );

    let mut client = env.client("agent-node-1").await;
    let role = client
        .get_pod_role(GetPodRoleRequest {
            pod_uid: uid.clone(),
            node_name: "node-1".into(),
            container_id: String::new(),
        })
        .await
        .expect("role")
        .into_inner();
    assert_eq!(role.role_name, "app-web");
    assert_eq!(
        role.role_arn,
        format!("arn:aws:iam::{ACCOUNT}:role/app-web")
    );
    let creds = client
        .get_credentials(creds_request(&uid, "node-1", "app-web"))
        .await
        .expect("credentials")
        .into_inner();
    assert!(
        creds.access_key_id.starts_with("ASIA"),
        "{}",
        creds.access_key_id
    );
    assert!(!creds.secret_access_key.is_empty() && !creds.session_token.is_empty());
    assert!(
        creds.expiration_unix - now() >= 30 * 60,
        "served credentials must have at least --min-validity left"
    );
    assert_eq!(env.sts.calls(), 1, "served from the prefetched cache");
    let health = client
        .health(HealthRequest {})
        .await
        .expect("health")
        .into_inner();
    assert!(health.ready);
    assert!(
        !env.server.log_text().contains(&creds.secret_access_key),
        "secret in the log"
    );
    assert!(env.server.metrics().contains("kiam_server_requests_total"));
}

#[tokio::test]
async fn fifty_pods_sharing_three_roles_cost_three_assume_role_calls() {
    let env = start(&[]);
    let uids: Vec<(String, String)> = (0..50)
        .map(|i| {
            let role_name = format!("app-{}", i % 3);
            let uid = env
                .kube
                .pod("team", &format!("p{i}"), "node-1", role(&role_name));
            (uid, role_name)
        })
        .collect();
    assert!(eventually(WAIT, || env.sts.calls() >= 3).await);
    let mut client = env.client("agent-node-1").await;
    for (uid, _) in &uids {
        wait_known(&mut client, uid).await;
    }
    let answers = futures::future::join_all(uids.iter().map(|(uid, role_name)| {
        let mut client = client.clone();
        async move {
            client
                .get_credentials(creds_request(uid, "node-1", role_name))
                .await
                .map(|r| (r.into_inner(), role_name.clone()))
        }
    }))
    .await;
    let mut keys = HashSet::new();
    for answer in answers {
        let (creds, role_name) = answer.expect("credentials");
        assert_eq!(
            creds.role_arn,
            format!("arn:aws:iam::{ACCOUNT}:role/{role_name}")
        );
        keys.insert(creds.access_key_id);
    }
    assert_eq!(keys.len(), 3, "one set of credentials per role");
    assert_eq!(env.sts.calls(), 3);
}

#[tokio::test]
async fn forbidden_roles_are_refused_with_an_event_and_no_sts_call() {
    let env = start(&[]);
    let forbidden = env.kube.pod("team", "sneaky", "node-1", role("admin"));
    let closed = env.kube.pod("closed", "x", "node-1", role("app-x"));
    let mut client = env.client("agent-node-1").await;
    wait_known(&mut client, &forbidden).await;
    wait_known(&mut client, &closed).await;
    for (uid, want) in [
        (&forbidden, "does not permit role"),
        (&closed, "permits no role"),
    ] {
        let status = client
            .get_credentials(creds_request(uid, "node-1", "admin"))
            .await
            .expect_err("refused");
        assert_eq!(
            status.code(),
            Code::PermissionDenied,
            "{status:?}\n{}",
            env.server.log_text()
        );
        assert!(status.message().contains(want), "{}", status.message());
    }
    assert!(
        eventually(WAIT, || env.kube.events().iter().any(|e| {
            e["reason"] == "IAMRoleForbidden" && e["regarding"]["uid"] == forbidden.as_str()
        }))
        .await,
        "no Event: {:?}",
        env.kube.events()
    );
    assert_eq!(env.sts.calls(), 0);
}

#[tokio::test]
async fn cross_account_arns_kube2iam_lists_and_external_ids() {
    let env = start(&[]);
    let cross = env.kube.pod(
        "team",
        "cross",
        "node-1",
        role("arn:aws:iam::999999999999:role/cross"),
    );
    let legacy = env.kube.pod("legacy", "old", "node-1", role("old-app"));
    let plain = env.kube.pod("team", "a", "node-1", role("app-x"));
    let with_id = env.kube.pod(
        "team",
        "b",
        "node-1",
        json!({"iam.amazonaws.com/role": "app-x", "iam.amazonaws.com/external-id": "e-123"}),
    );
    let mut client = env.client("agent-node-1").await;
    for uid in [&cross, &legacy, &plain, &with_id] {
        wait_known(&mut client, uid).await;
    }
    let c = client
        .get_credentials(creds_request(&cross, "node-1", "cross"))
        .await
        .expect("cross-account")
        .into_inner();
    assert_eq!(c.role_arn, "arn:aws:iam::999999999999:role/cross");
    client
        .get_credentials(creds_request(&legacy, "node-1", "old-app"))
        .await
        .expect("kube2iam allowed-roles");
    let a = client
        .get_credentials(creds_request(&plain, "node-1", "app-x"))
        .await
        .expect("plain")
        .into_inner();
    let b = client
        .get_credentials(creds_request(&with_id, "node-1", "app-x"))
        .await
        .expect("external id")
        .into_inner();
    assert_ne!(
        a.access_key_id, b.access_key_id,
        "external id is part of the key"
    );
    assert_eq!(env.sts.calls(), 4);
}

#[tokio::test]
async fn deleted_pods_other_nodes_and_other_roles_are_refused() {
    let env = start(&[]);
    let uid = env.kube.pod("team", "web", "node-1", role("app-web"));
    let elsewhere = env.kube.pod("team", "far", "node-2", role("app-web"));
    let mut agent = env.client("agent-node-1").await;
    wait_known(&mut agent, &uid).await;
    wait_known(&mut agent, &elsewhere).await;
    agent
        .get_credentials(creds_request(&uid, "node-1", "app-web"))
        .await
        .expect("served");
    // The pod lives elsewhere.
    let status = agent
        .get_credentials(creds_request(&elsewhere, "node-1", "app-web"))
        .await
        .expect_err("other node");
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(status.message().contains("node-2"), "{}", status.message());
    // An agent certificate for node-1 cannot ask about node-2.
    let status = agent
        .get_credentials(creds_request(&elsewhere, "node-2", "app-web"))
        .await
        .expect_err("not this agent's node");
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(
        kiam_proto::reason_of(&status),
        kiam_proto::Reason::AgentNodeMismatch,
        "{}",
        status.message()
    );
    // Another role than the pod's.
    let status = agent
        .get_credentials(creds_request(&uid, "node-1", "app-other"))
        .await
        .expect_err("other role");
    assert_eq!(status.code(), Code::NotFound);
    // Deleted: refused as soon as the watch delivers it.
    env.kube.delete_pod("team", "web");
    let refused = retry_until(
        Duration::from_secs(5),
        async || {
            agent
                .get_credentials(creds_request(&uid, "node-1", "app-web"))
                .await
        },
        |r| matches!(r, Err(status) if status.code() == Code::NotFound),
    )
    .await;
    assert!(refused.is_ok(), "deleted pod still served");
}

#[tokio::test]
async fn clients_without_a_certificate_from_the_ca_are_refused_at_the_tls_layer() {
    let env = start(&[]);
    for agent in [None, Some("agent-other-ca")] {
        let refused = match env.server.client(&env.certs, agent).await {
            Err(_) => true,
            Ok(mut client) => client.health(HealthRequest {}).await.is_err(),
        };
        assert!(refused, "{agent:?} was let in");
    }
    assert!(
        env.server.log_text().contains("TLS handshake refused"),
        "{}",
        env.server.log_text()
    );
    // The right certificate works.
    let mut client = env.client("agent-node-1").await;
    client.health(HealthRequest {}).await.expect("health");
}

#[tokio::test]
async fn the_index_recovers_from_dropped_watches_and_410_gone() {
    let env = start(&[]);
    let mut client = env.client("agent-node-1").await;
    let before = env.kube.requests()["list pods"].as_u64().unwrap_or(0);
    // Every resourceVersion the server knows is now too old, and its watches are cut.
    env.kube.control("compact");
    env.kube.control("drop-watches");
    let uid = env.kube.pod("team", "late", "node-1", role("app-late"));
    let served = retry_until(
        Duration::from_secs(10),
        async || {
            client
                .get_credentials(creds_request(&uid, "node-1", "app-late"))
                .await
        },
        Result::is_ok,
    )
    .await;
    assert!(
        served.is_ok(),
        "new pod not served after the watch expired:\n{}",
        env.server.log_text()
    );
    let after = env.kube.requests()["list pods"].as_u64().unwrap_or(0);
    assert!(
        after > before,
        "the server did not relist after 410 ({before} → {after})"
    );
}

#[tokio::test]
async fn sts_throttling_is_retried_denials_are_reported_and_cached_credentials_survive_outages() {
    let env = start(&[]);
    let mut client = env.client("agent-node-1").await;
    // Credentials due for refresh soon: 30 min 12 s of life, 30 min minimum validity, so a
    // refresh is due after 6 s and they may be served for 12 s.
    env.sts.expire_in(Some(Duration::from_secs(30 * 60 + 12)));
    // Two throttled answers, then moto: the SDK's retries get through.
    env.sts.inject(&[(400, "Throttling"), (400, "Throttling")]);
    let uid = env.kube.pod("team", "web", "node-1", role("app-web"));
    wait_known(&mut client, &uid).await;
    let creds = client
        .get_credentials(creds_request(&uid, "node-1", "app-web"))
        .await
        .expect("retried through throttling")
        .into_inner();
    assert_eq!(
        env.sts.calls(),
        3,
        "two throttled attempts and one good one"
    );

    // STS down for good while the refresh is due: the refresh is tried and fails, and the
    // held credentials keep being served.
    env.sts.inject(&[(503, "ServiceUnavailable"); 50]);
    let before = env.sts.calls();
    assert!(
        eventually(Duration::from_secs(10), || env.sts.calls() > before).await,
        "no refresh was tried during the outage"
    );
    assert!(
        env.sts.faults.lock().expect("lock").len() < 50,
        "the refresh met the outage"
    );
    let again = client
        .get_credentials(creds_request(&uid, "node-1", "app-web"))
        .await
        .expect("cached credentials during the outage")
        .into_inner();
    assert_eq!(again.access_key_id, creds.access_key_id);

    // A role STS denies: a clear error, an Event.
    env.sts.faults.lock().expect("lock").clear();
    env.sts.inject(&[(403, "AccessDenied"); 8]);
    let denied = env.kube.pod("team", "nope", "node-1", role("app-denied"));
    let status = retry_until(
        Duration::from_secs(5),
        async || {
            client
                .get_credentials(creds_request(&denied, "node-1", "app-denied"))
                .await
        },
        |r| matches!(r, Err(s) if s.code() == Code::PermissionDenied),
    )
    .await
    .ok()
    .and_then(Result::err)
    .expect("STS denial reported as permission denied");
    assert!(
        status.message().contains("AccessDenied"),
        "{}",
        status.message()
    );
    assert!(
        eventually(WAIT, || env
            .kube
            .events()
            .iter()
            .any(|e| e["reason"] == "IAMAssumeRoleFailed"))
        .await
    );
}

#[tokio::test]
async fn session_tags_autodetected_base_and_a_gateway_role() {
    let env = start(&[
        "--session-tags",
        "--role-base-arn-autodetect",
        "--assume-role-arn",
        "arn:aws:iam::123456789012:role/kiam-gateway",
    ]);
    env.kube
        .namespace("team2", json!({"iam.amazonaws.com/permitted": "app-.*"}));
    let a = env.kube.pod("team", "a", "node-1", role("app-shared"));
    let b = env.kube.pod("team2", "b", "node-1", role("app-shared"));
    let mut client = env.client("agent-node-1").await;
    wait_known(&mut client, &a).await;
    wait_known(&mut client, &b).await;
    // moto's caller identity is in account 123456789012: role names resolve there.
    let role = client
        .get_pod_role(GetPodRoleRequest {
            pod_uid: a.clone(),
            node_name: "node-1".into(),
            container_id: String::new(),
        })
        .await
        .expect("role")
        .into_inner();
    assert_eq!(role.role_arn, "arn:aws:iam::123456789012:role/app-shared");
    let ca = client
        .get_credentials(creds_request(&a, "node-1", "app-shared"))
        .await
        .expect("a")
        .into_inner();
    let cb = client
        .get_credentials(creds_request(&b, "node-1", "app-shared"))
        .await
        .expect("b")
        .into_inner();
    // Tagged sessions differ per namespace; one more call assumed the gateway role first.
    assert_ne!(ca.access_key_id, cb.access_key_id);
    assert_eq!(env.sts.calls(), 3, "gateway + one per namespace");
}

#[tokio::test]
async fn rotated_certificates_are_picked_up_without_a_restart() {
    let env = start(&[]);
    let old = tempfile::tempdir().expect("dir");
    for entry in std::fs::read_dir(&env.certs.dir).expect("certs").flatten() {
        if entry.path().extension().is_some_and(|e| e == "pem") {
            std::fs::copy(entry.path(), old.path().join(entry.file_name())).expect("copy");
        }
    }
    let old = Certs {
        dir: old.path().to_owned(),
    };
    let mut client = env
        .server
        .client(&old, Some("agent-node-1"))
        .await
        .expect("old CA");
    client.health(HealthRequest {}).await.expect("health");
    // cert-manager rotates everything, CA included, in place.
    let rotated = Certs::new(&env.certs.dir);
    let switched = eventually_async(Duration::from_secs(10), || async {
        match env.server.client(&rotated, Some("agent-node-1")).await {
            Ok(mut c) => c.health(HealthRequest {}).await.is_ok(),
            Err(_) => false,
        }
    })
    .await;
    assert!(
        switched,
        "rotated certificates not loaded:\n{}",
        env.server.log_text()
    );
    let stale = match env.server.client(&old, Some("agent-node-1")).await {
        Err(_) => true,
        Ok(mut c) => c.health(HealthRequest {}).await.is_err(),
    };
    assert!(stale, "a certificate from the replaced CA still works");
    assert!(env.server.log_text().contains("TLS certificates reloaded"));
}

#[tokio::test]
async fn kube2iam_migration_default_role_and_allowed_roles_globs() {
    let env = start(&["--default-role", "app-default"]);
    env.kube.namespace(
        "globbed",
        json!({"iam.amazonaws.com/allowed-roles": "[\"svc-*\", \"team/*\"]"}),
    );
    let mut client = env.client("agent-node-1").await;
    let ask = |uid: &str| GetPodRoleRequest {
        pod_uid: uid.into(),
        node_name: "node-1".into(),
        container_id: String::new(),
    };

    // An unannotated pod where the namespace permits the default role gets it.
    let plain = env.kube.pod("team", "plain", "node-1", json!({}));
    wait_known(&mut client, &plain).await;
    let role = client.get_pod_role(ask(&plain)).await.expect("default");
    assert_eq!(role.into_inner().role_name, "app-default");
    let creds = client
        .get_credentials(creds_request(&plain, "node-1", "app-default"))
        .await
        .expect("credentials for the default role")
        .into_inner();
    assert_eq!(
        env.sts.role_of(&creds.access_key_id).as_deref(),
        Some(format!("arn:aws:iam::{ACCOUNT}:role/app-default").as_str())
    );
    let metrics = env.server.metrics();
    assert!(
        metrics.contains(
            "kiam_server_credentials_served_total{role_source=\"default\",scope=\"pod\"} 1"
        ),
        "{metrics}"
    );
    // Where the namespace does not permit it: no role, and the reason says why.
    let closed = env.kube.pod("legacy", "plain", "node-1", json!({}));
    wait_known(&mut client, &closed).await;
    let refused = client
        .get_pod_role(ask(&closed))
        .await
        .expect_err("not permitted");
    assert_eq!(refused.code(), Code::NotFound);
    assert!(refused.message().contains("--default-role"), "{refused:?}");

    // Globs, as kube2iam's: `*` matches any run of characters, `/` included.
    for (name, role, permitted) in [
        ("a", "svc-api", true),
        ("b", "team/db", true),
        ("c", "team/x/db", true),
        ("d", "other", false),
        ("e", "my-svc-api", false),
    ] {
        let uid = env.kube.pod(
            "globbed",
            name,
            "node-1",
            json!({"iam.amazonaws.com/role": role}),
        );
        wait_known(&mut client, &uid).await;
        let answer = client.get_pod_role(ask(&uid)).await;
        assert_eq!(answer.is_ok(), permitted, "{role}: {answer:?}");
        if let Err(status) = answer {
            assert_eq!(status.code(), Code::PermissionDenied, "{role}");
        }
    }
}
