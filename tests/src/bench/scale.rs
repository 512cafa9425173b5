//! The server at cluster scale: the API emulator holds realistic pods (two containers with
//! env, probes and resources, a full status, managedFields: about the size of real objects)
//! across namespaces, nodes and roles; two servers list and watch them, prefetch, and answer
//! 200 simulated agents, each proving its node with its own token.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use serde::Serialize;
use serde_json::{Value, json};

use super::{Options, load::Stats, memory_mib};
use crate::stack::{Certs, Kube, Server, Sts};

/// The shape of a synthetic cluster.
#[derive(Debug, Clone, Copy, Serialize, serde::Deserialize)]
pub struct ClusterShape {
    pub pods: usize,
    pub namespaces: usize,
    pub roles: usize,
    pub nodes: usize,
    /// No namespace permits any role: every pod is refused (an unpermitted annotation, or a
    /// migration where pods are annotated before their namespaces).
    #[serde(default)]
    pub refused: bool,
}

impl ClusterShape {
    pub fn namespace(&self, i: usize) -> String {
        format!("ns-{}", i % self.namespaces)
    }
    pub fn node(&self, i: usize) -> String {
        format!("node-{}", i % self.nodes)
    }
    pub fn role(&self, i: usize) -> String {
        format!("role-{}", i % self.roles)
    }
    pub fn uid(i: usize) -> String {
        format!("{:08x}-5ca1-4000-8000-{:012x}", i, i)
    }
}

/// Pod `i` of the synthetic cluster, shaped like a real Deployment's pod (about 6 KB of JSON).
pub fn synthetic_pod(shape: &ClusterShape, i: usize) -> Value {
    let ns = shape.namespace(i);
    let name = format!("app-{i}-7d9c8b6f5-x{:04x}", i % 65536);
    let container = |name: &str, image: &str| {
        json!({
            "name": name,
            "image": format!("123456789012.dkr.ecr.us-east-1.amazonaws.com/{image}:v1.42.{}", i % 100),
            "ports": [{"containerPort": 8080, "name": "http", "protocol": "TCP"}],
            "env": (0..6).map(|e| json!({"name": format!("SETTING_{e}"), "value": format!("value-{e}-{i}")}))
                .chain([json!({"name": "POD_NAME", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}})])
                .collect::<Vec<_>>(),
            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
            "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080, "scheme": "HTTP"}, "periodSeconds": 10, "timeoutSeconds": 1, "successThreshold": 1, "failureThreshold": 3},
            "livenessProbe": {"httpGet": {"path": "/live", "port": 8080, "scheme": "HTTP"}, "periodSeconds": 10, "timeoutSeconds": 1, "successThreshold": 1, "failureThreshold": 3},
            "volumeMounts": [{"name": "kube-api-access", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true},
                             {"name": "config", "mountPath": "/etc/app"}],
            "terminationMessagePath": "/dev/termination-log",
            "terminationMessagePolicy": "File",
            "imagePullPolicy": "IfNotPresent",
        })
    };
    let status_of = |name: &str| {
        json!({
            "name": name, "ready": true, "restartCount": 0, "started": true,
            "image": format!("123456789012.dkr.ecr.us-east-1.amazonaws.com/{name}:v1.42.{}", i % 100),
            "imageID": format!("123456789012.dkr.ecr.us-east-1.amazonaws.com/{name}@sha256:{:064x}", i),
            "containerID": format!("containerd://{:064x}", i * 7 + 1),
            "state": {"running": {"startedAt": "2026-11-29T10:00:00Z"}},
            "lastState": {},
        })
    };
    let condition = |kind: &str| json!({"type": kind, "status": "True", "lastProbeTime": null, "lastTransitionTime": "2026-11-29T10:00:00Z"});
    let fields = json!({"f:metadata": {"f:annotations": {".": {}, "f:iam.amazonaws.com/role": {}},
        "f:generateName": {}, "f:labels": {".": {}, "f:app": {}, "f:pod-template-hash": {}},
        "f:ownerReferences": {".": {}, "k:{\"uid\":\"x\"}": {}}},
        "f:spec": {"f:containers": {"k:{\"name\":\"app\"}": {".": {}, "f:env": {}, "f:image": {}, "f:ports": {}, "f:resources": {}}}}});
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name, "namespace": ns, "uid": ClusterShape::uid(i),
            "generateName": format!("app-{i}-7d9c8b6f5-"),
            "labels": {"app": format!("app-{}", i % 1000), "pod-template-hash": "7d9c8b6f5", "team": format!("team-{}", i % 50)},
            "annotations": {"iam.amazonaws.com/role": shape.role(i), "kubectl.kubernetes.io/restartedAt": "2026-11-29T09:59:00Z"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("app-{i}-7d9c8b6f5"), "uid": format!("rs-{i}"), "controller": true, "blockOwnerDeletion": true}],
            "creationTimestamp": "2026-11-29T10:00:00Z",
            "managedFields": [
                {"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1", "time": "2026-11-29T10:00:00Z", "fieldsType": "FieldsV1", "fieldsV1": fields},
                {"manager": "kubelet", "operation": "Update", "apiVersion": "v1", "time": "2026-11-29T10:00:05Z", "fieldsType": "FieldsV1", "subresource": "status",
                 "fieldsV1": {"f:status": {"f:conditions": {}, "f:containerStatuses": {}, "f:hostIP": {}, "f:phase": {}, "f:podIP": {}, "f:podIPs": {}, "f:startTime": {}}}},
            ],
        },
        "spec": {
            "nodeName": shape.node(i), "serviceAccountName": "app", "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30, "dnsPolicy": "ClusterFirst", "schedulerName": "default-scheduler",
            "containers": [container("app", "app"), container("sidecar", "proxy")],
            "volumes": [{"name": "kube-api-access", "projected": {"defaultMode": 420, "sources": [
                {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}}]}},
                {"name": "config", "configMap": {"name": "app-config", "defaultMode": 420}}],
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                            {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}],
        },
        "status": {
            "phase": "Running", "qosClass": "Burstable",
            "hostIP": format!("10.0.{}.{}", (i / 250) % 250, i % 250 + 1), "podIP": format!("10.1.{}.{}", (i / 250) % 250, i % 250 + 1),
            "podIPs": [{"ip": format!("10.1.{}.{}", (i / 250) % 250, i % 250 + 1)}],
            "startTime": "2026-11-29T10:00:00Z",
            "conditions": [condition("Initialized"), condition("Ready"), condition("ContainersReady"), condition("PodScheduled")],
            "containerStatuses": [status_of("app"), status_of("sidecar")],
        },
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct ServerFigures {
    /// From start to `/ready` (both watches synced).
    pub ready_seconds: f64,
    pub rss_mib_ready: f64,
    pub rss_mib_after_load: f64,
    pub peak_mib: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Scale {
    pub shape: ClusterShape,
    /// Bytes of one pod's JSON.
    pub pod_json_bytes: usize,
    pub servers: Vec<ServerFigures>,
    pub agents: usize,
    /// Requests per second offered by all agents together.
    pub offered_per_second: f64,
    pub get_credentials: Stats,
    /// AssumeRole calls counted at moto's proxy, and what roles × servers predicts.
    pub assume_role_calls: usize,
    pub roles_times_servers: usize,
    pub token_reviews: u64,
    /// Events the emulator received, and those the servers did not publish (rate limit,
    /// full queue), by the servers' own count.
    pub events_published: usize,
    pub events_not_published: f64,
}

/// Every pod refused against every pod permitted, in the same run.
#[derive(Debug, Clone, Serialize)]
pub struct Refused {
    pub permitted: Scale,
    pub refused: Scale,
    /// The refused case's server RSS over the permitted case's (the worst server of each).
    pub rss_ratio: f64,
}

impl Refused {
    pub fn run(options: &Options, pods: usize) -> anyhow::Result<Self> {
        let permitted = run(options, pods, false)?;
        let refused = run(options, pods, true)?;
        let rss = |s: &Scale| {
            s.servers
                .iter()
                .map(|f| f.rss_mib_after_load)
                .fold(0.0, f64::max)
        };
        Ok(Self {
            rss_ratio: rss(&refused) / rss(&permitted).max(1.0),
            permitted,
            refused,
        })
    }

    pub fn table(&self) -> String {
        let worst =
            |s: &Scale, f: fn(&ServerFigures) -> f64| s.servers.iter().map(f).fold(0.0, f64::max);
        format!(
            "\n6. refused pods ({} pods, 2 servers): RSS {:.0} MiB (peak {:.0}) with every pod refused, {:.0} MiB (peak {:.0}) with every pod permitted: ratio {:.2}x; Events published {}, not published (rate limit) {:.0}\n",
            self.refused.shape.pods,
            worst(&self.refused, |f| f.rss_mib_after_load),
            worst(&self.refused, |f| f.peak_mib),
            worst(&self.permitted, |f| f.rss_mib_after_load),
            worst(&self.permitted, |f| f.peak_mib),
            self.rss_ratio,
            self.refused.events_published,
            self.refused.events_not_published,
        )
    }
}

pub fn table(runs: &[Scale]) -> String {
    let mut out = String::from("\n5. server scale (2 servers, 200 agents)\n");
    for r in runs {
        let worst = |f: fn(&ServerFigures) -> f64| r.servers.iter().map(f).fold(0.0, f64::max);
        out.push_str(&format!(
            "   {:>7} pods ({} B each), {} namespaces, {} roles: RSS {:.0} MiB (peak {:.0}), ready in {:.1} s, GetCredentials p50 {:.0} µs p99 {:.0} µs ({:.0}/s offered), AssumeRole {} (roles x servers = {}), TokenReviews {}\n",
            r.shape.pods,
            r.pod_json_bytes,
            r.shape.namespaces,
            r.shape.roles,
            worst(|s| s.rss_mib_after_load),
            worst(|s| s.peak_mib),
            worst(|s| s.ready_seconds),
            r.get_credentials.p50_us,
            r.get_credentials.p99_us,
            r.offered_per_second,
            r.assume_role_calls,
            r.roles_times_servers,
            r.token_reviews
        ));
    }
    out
}

pub fn run(options: &Options, pods: usize, refused: bool) -> anyhow::Result<Scale> {
    eprintln!(
        "bench: server scale, {pods} pods{}",
        if refused { ", every one refused" } else { "" }
    );
    let shape = ClusterShape {
        pods,
        namespaces: 100,
        roles: 500,
        nodes: 200,
        refused,
    };
    let dir = tempfile::tempdir()?;
    let sts = Sts::start();
    let kube = Kube::start(dir.path());
    let started = Instant::now();
    kube.generate(&shape);
    eprintln!(
        "bench: emulator holds {pods} pods ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
    // The agents' pods and tokens (one agent per node).
    let tokens: Vec<String> = (0..shape.nodes)
        .map(|n| kube.agent_token(&shape.node(n)))
        .collect();
    let certs = Certs::new(dir.path());
    let server_args = ["--log-level", "info", "--refresh-interval", "10s"];
    let started = Instant::now();
    let servers: Vec<Server> = (0..2)
        .map(|_| {
            Server::spawn_in(
                None,
                (free(), free()),
                dir.path(),
                &certs,
                &sts,
                &kube,
                &server_args,
            )
        })
        .collect();
    let mut figures = Vec::new();
    for server in &servers {
        server.wait_ready_within(Duration::from_secs(300));
        figures.push(started.elapsed().as_secs_f64());
    }
    // Prefetch settles: every role, on each server.
    let expected = shape.roles * servers.len();
    let settle = Instant::now();
    let mut last = (sts.calls(), Instant::now());
    while settle.elapsed() < Duration::from_secs(180) {
        std::thread::sleep(Duration::from_millis(500));
        let now = sts.calls();
        if now != last.0 {
            last = (now, Instant::now());
        } else if now >= expected || last.1.elapsed() > Duration::from_secs(10) {
            break;
        }
    }
    if refused {
        // What refusals leave behind must not grow with time either.
        std::thread::sleep(Duration::from_secs(15));
    }
    let ready_memory: Vec<(f64, f64)> = servers.iter().map(|s| memory_mib(s.pid())).collect();
    let reviews_before = kube.token_reviews();
    let stats = agents_load(
        &servers,
        &certs,
        &tokens,
        &shape,
        options.run.max(Duration::from_secs(5)),
    )?;
    let servers_figures = servers
        .iter()
        .zip(figures)
        .zip(ready_memory)
        .map(|((server, ready_seconds), (rss_ready, _))| {
            let (rss, peak) = memory_mib(server.pid());
            ServerFigures {
                ready_seconds,
                rss_mib_ready: rss_ready,
                rss_mib_after_load: rss,
                peak_mib: peak,
            }
        })
        .collect();
    let events_not_published = servers
        .iter()
        .map(|s| {
            crate::metric(
                &s.metrics(),
                "kiam_server_kubernetes_events_total{result=\"not_published\"}",
            )
            .unwrap_or(0.0)
        })
        .sum();
    Ok(Scale {
        events_published: kube.events().len(),
        events_not_published,
        shape,
        pod_json_bytes: synthetic_pod(&shape, 1).to_string().len(),
        servers: servers_figures,
        agents: shape.nodes,
        offered_per_second: shape.nodes as f64 * AGENT_RATE,
        get_credentials: stats,
        assume_role_calls: sts.calls(),
        roles_times_servers: expected,
        token_reviews: kube.token_reviews() - reviews_before,
    })
}

fn free() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// Requests per second each simulated agent makes: 200 agents make 1,000/s, more than a
/// 10,000-pod cluster's agents ask for (each pod's role is asked for every --role-ttl, 10 s).
const AGENT_RATE: f64 = 5.0;

/// 200 agents, one per node, each asking for its own pods' credentials at [`AGENT_RATE`]
/// for `run` (open loop: a slow answer does not slow the next request down); half talk to
/// each server.
fn agents_load(
    servers: &[Server],
    certs: &Certs,
    tokens: &[String],
    shape: &ClusterShape,
    run: Duration,
) -> anyhow::Result<Stats> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let latencies = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(Mutex::new(0u64));
        // Every agent warms up first (see below), then runs for `run`.
        let started = Instant::now() + Duration::from_secs(2);
        let mut tasks = Vec::new();
        let agents = tokens.len().max(1);
        for (n, token) in tokens.iter().enumerate() {
            let server = &servers[n % servers.len()];
            let mut client = server
                .client_with_token(certs, Some("agent-shared"), Some(token.clone()))
                .await
                .context("agent client")?;
            let (latencies, errors, shape) = (latencies.clone(), errors.clone(), *shape);
            tasks.push(tokio::spawn(async move {
                let mut mine = Vec::new();
                let mut i = n;
                // Warm up: the agent's first call costs a TokenReview, once per token
                // lifetime; the figures are about the calls after it.
                let first = kiam_proto::GetCredentialsRequest {
                    pod_uid: ClusterShape::uid(i),
                    node_name: shape.node(n),
                    role_name: shape.role(i),
                    container_id: String::new(),
                };
                if client.get_credentials(first).await.is_err() {
                    *errors.lock().unwrap_or_else(|e| e.into_inner()) += 1;
                }
                // Spread the agents' first requests over one interval, and only then start
                // the clock: an interval made earlier would fire its missed ticks at once.
                let offset = Duration::from_secs_f64(n as f64 / agents as f64 / AGENT_RATE);
                tokio::time::sleep_until((started + offset).into()).await;
                let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / AGENT_RATE));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                while started.elapsed() < run {
                    tick.tick().await;
                    let request = kiam_proto::GetCredentialsRequest {
                        pod_uid: ClusterShape::uid(i),
                        node_name: shape.node(n),
                        role_name: shape.role(i),
                        container_id: String::new(),
                    };
                    let t = Instant::now();
                    match client.get_credentials(request).await {
                        Ok(_) => {
                            mine.push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX))
                        }
                        Err(_) => *errors.lock().unwrap_or_else(|e| e.into_inner()) += 1,
                    }
                    // The next pod on this agent's node.
                    i = (i + shape.nodes) % shape.pods.max(1);
                }
                latencies
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend(mine);
            }));
        }
        for task in tasks {
            task.await?;
        }
        let micros = std::mem::take(&mut *latencies.lock().unwrap_or_else(|e| e.into_inner()));
        let errors = *errors.lock().unwrap_or_else(|e| e.into_inner());
        Ok(Stats::from_latencies(micros, errors, started.elapsed()))
    })
}
