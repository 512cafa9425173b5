//! A Kubernetes API server emulator for tests: enough of the real HTTP protocol that kube-rs
//! clients (the production code, unchanged) list and watch against it.
//!
//! - `GET /api/v1/pods`, `/api/v1/namespaces/{ns}/pods`, `/api/v1/namespaces` (and every
//!   other stored core resource): lists with `metadata.resourceVersion`, `limit`/`continue`
//!   pagination, `fieldSelector` on `spec.nodeName`, `metadata.name` and
//!   `metadata.namespace` (anything else is refused); with `watch=true` a chunked
//!   stream of `ADDED`/`MODIFIED`/`DELETED` events after the given `resourceVersion`,
//!   `BOOKMARK` events when `allowWatchBookmarks=true`, closed after `timeoutSeconds`.
//!   A watch from a compacted `resourceVersion` gets an `ERROR` event with a 410 `Expired`
//!   status, as etcd compaction causes.
//! - `POST .../namespaces/{ns}/events` (core and `events.k8s.io/v1`): stored and listed by the
//!   control API; `PATCH` of a stored event updates it.
//! - `POST /apis/authentication.k8s.io/v1/tokenreviews`: reviews the service-account tokens
//!   this emulator minted as the real API server does: signature, expiry, audiences (the
//!   requested ones, else the API server's own), the bound pod still existing with its UID;
//!   `status.user` with `system:serviceaccount:<ns>:<name>` and the `authentication.
//!   kubernetes.io/{pod-name,pod-uid,node-name,node-uid,credential-id}` extras,
//!   `status.audiences` the intersection; `authenticated: false` with an `error` otherwise.
//!
//! - `GET`, `PATCH` (JSON patch) `/api/v1/nodes/{name}`: authenticated by the bearer token
//!   (minted here), and patches by the kiam agent's service account held to the rule of the
//!   shipped ValidatingAdmissionPolicy `kiam-agent-own-node` (its own node, only the start-up
//!   taint removed).
//!
//! - `GET /api/v1/namespaces/{ns}/{pods|secrets|configmaps|serviceaccounts|services}/{name}`;
//!   `PATCH .../pods/{name}/status` (merge patch: what the kubelet writes; only `status` is
//!   taken); `POST .../serviceaccounts/{name}/token` (TokenRequest: a token bound to the pod
//!   in `boundObjectRef`, which must exist with that UID and run as that account, and to its
//!   node; audiences default to the API server's).
//! - With `--tls-listen`, the same API over HTTPS (kube-rs in pods speaks only HTTPS).
//!
//! Stored kinds: see [`RESOURCES`] (Pod, Namespace, Node, Secret, ConfigMap, ServiceAccount,
//! Service, DaemonSet, Deployment, PodDisruptionBudget, NetworkPolicy, RBAC, admission
//! policies). Nothing acts on the workload kinds: no controllers, no RBAC.
//!
//! Control API for tests (not Kubernetes): `PUT /_emulator/objects` (any stored kind, created
//! or replaced), `GET` and `DELETE /_emulator/objects/{resource}/{namespace or -}/{name}`,
//! `POST /_emulator/compact` (every older resourceVersion becomes 410),
//! `POST /_emulator/drop-watches`, `POST /_emulator/bookmark`, `GET /_emulator/events`,
//! `GET /_emulator/requests` (counts of list, watch and create requests by resource),
//! `POST /_emulator/tokens` (mint a token as the kubelet would: `namespace`,
//! `serviceAccount`, `podName`, `podUid`, `nodeName` (omitted: an API server before 1.30 that
//! does not say), `audiences`, `expirationSeconds`), `POST /_emulator/fail-token-reviews`
//! (`count` reviews answered 503), `POST /_emulator/generate` (a synthetic cluster:
//! `pods`, `namespaces`, `roles`, `nodes`; see `kiam_e2e::bench::scale`; older resource
//! versions become 410 Gone, as after a compaction).

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use clap::Parser;
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Frame, Incoming},
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

#[derive(Parser)]
struct Cli {
    /// Address to listen on (port 0 picks one; the address is printed as `listening <addr>`).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The first resourceVersion. A restarted API server starts from its store's revision:
    /// watches from before it are too old (410 Gone) and must relist.
    #[arg(long, default_value_t = 1)]
    initial_rv: u64,
    /// Also serve the API over HTTPS here (what pods reach as `KUBERNETES_SERVICE_HOST`;
    /// kube-rs's in-cluster configuration speaks only HTTPS). Printed as `tls <addr>`.
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    tls_listen: Option<SocketAddr>,
    /// PEM certificate chain of the HTTPS listener.
    #[arg(long)]
    tls_cert: Option<std::path::PathBuf>,
    /// PEM private key of the HTTPS listener.
    #[arg(long)]
    tls_key: Option<std::path::PathBuf>,
}

/// The resources the emulator stores: plural, apiVersion, kind, namespaced.
const RESOURCES: [(&str, &str, &str, bool); 15] = [
    ("pods", "v1", "Pod", true),
    ("namespaces", "v1", "Namespace", false),
    ("nodes", "v1", "Node", false),
    ("secrets", "v1", "Secret", true),
    ("configmaps", "v1", "ConfigMap", true),
    ("serviceaccounts", "v1", "ServiceAccount", true),
    ("services", "v1", "Service", true),
    ("daemonsets", "apps/v1", "DaemonSet", true),
    ("deployments", "apps/v1", "Deployment", true),
    (
        "poddisruptionbudgets",
        "policy/v1",
        "PodDisruptionBudget",
        true,
    ),
    (
        "networkpolicies",
        "networking.k8s.io/v1",
        "NetworkPolicy",
        true,
    ),
    (
        "clusterroles",
        "rbac.authorization.k8s.io/v1",
        "ClusterRole",
        false,
    ),
    (
        "clusterrolebindings",
        "rbac.authorization.k8s.io/v1",
        "ClusterRoleBinding",
        false,
    ),
    (
        "validatingadmissionpolicies",
        "admissionregistration.k8s.io/v1",
        "ValidatingAdmissionPolicy",
        false,
    ),
    (
        "validatingadmissionpolicybindings",
        "admissionregistration.k8s.io/v1",
        "ValidatingAdmissionPolicyBinding",
        false,
    ),
];

/// One of [`RESOURCES`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Kind(usize);

impl Kind {
    const POD: Self = Self(0);
    const NAMESPACE: Self = Self(1);
    const NODE: Self = Self(2);

    /// By plural resource name (`pods`).
    fn of(resource: &str) -> Option<Self> {
        RESOURCES.iter().position(|r| r.0 == resource).map(Self)
    }

    /// By `kind` (`Pod`).
    fn of_kind(kind: &str) -> Option<Self> {
        RESOURCES.iter().position(|r| r.2 == kind).map(Self)
    }

    fn api_version(self) -> &'static str {
        RESOURCES[self.0].1
    }

    fn name(self) -> &'static str {
        RESOURCES[self.0].2
    }

    fn namespaced(self) -> bool {
        RESOURCES[self.0].3
    }
}

#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    kind: Kind,
    event: &'static str,
    object: Value,
}

/// Messages to live watches.
#[derive(Clone, Debug)]
enum Live {
    Change(Change),
    Bookmark,
    Drop,
}

type Key = (Kind, String, String);

struct State {
    rv: u64,
    /// Watches from a resourceVersion below this get 410 Gone.
    compacted: u64,
    objects: BTreeMap<Key, Value>,
    history: Vec<Change>,
    events: Vec<Value>,
    requests: HashMap<String, u64>,
    next_uid: u64,
    /// Token reviews still to answer with 503.
    failing_reviews: u64,
    /// Tokens minted (each gets its own `jti`).
    minted: u64,
}

struct Emulator {
    state: Mutex<State>,
    live: broadcast::Sender<Live>,
    /// Signs the service-account tokens this emulator mints.
    token_key: [u8; 32],
}

/// The API server's own audience, for reviews that ask for none.
const API_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";

fn key_of(kind: Kind, object: &Value) -> Key {
    let meta = &object["metadata"];
    let ns = match kind.namespaced() {
        true => meta["namespace"].as_str().unwrap_or("default"),
        false => "",
    };
    (
        kind,
        ns.to_owned(),
        meta["name"].as_str().unwrap_or_default().to_owned(),
    )
}

impl Emulator {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, state: &mut State, kind: Kind, event: &'static str, object: Value) {
        let change = Change {
            rv: state.rv,
            kind,
            event,
            object,
        };
        state.history.push(change.clone());
        let _ = self.live.send(Live::Change(change));
    }

    fn upsert(&self, mut object: Value) -> Result<Value, String> {
        let kind = match object["kind"].as_str().and_then(Kind::of_kind) {
            Some(kind) => kind,
            None => return Err(format!("unsupported kind {}", object["kind"])),
        };
        if object["metadata"]["name"].as_str().unwrap_or("").is_empty() {
            return Err("metadata.name is required".into());
        }
        let mut state = self.lock();
        state.rv += 1;
        let key = key_of(kind, &object);
        let existing = state.objects.get(&key).cloned();
        let meta = object["metadata"]
            .as_object_mut()
            .ok_or("metadata must be an object")?;
        if kind.namespaced() && !meta.contains_key("namespace") {
            meta.insert("namespace".into(), json!("default"));
        }
        let uid = match existing.as_ref() {
            Some(old) => old["metadata"]["uid"].clone(),
            None => match meta.get("uid") {
                Some(uid) => uid.clone(),
                None => {
                    state.next_uid += 1;
                    json!(format!("00000000-0000-4000-8000-{:012x}", state.next_uid))
                }
            },
        };
        meta.insert("uid".into(), uid);
        meta.insert("resourceVersion".into(), json!(state.rv.to_string()));
        meta.entry("creationTimestamp")
            .or_insert(json!("2026-01-01T00:00:00Z"));
        if object["apiVersion"].as_str() != Some(kind.api_version()) {
            object["apiVersion"] = json!(kind.api_version());
        }
        state.objects.insert(key, object.clone());
        let event = if existing.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.record(&mut state, kind, event, object.clone());
        Ok(object)
    }

    /// A synthetic cluster, stored at once: no watch saw it being built, so earlier resource
    /// versions are compacted away.
    fn generate(&self, shape: &kiam_e2e::bench::scale::ClusterShape) {
        let pods: Vec<Value> = (0..shape.pods)
            .map(|i| kiam_e2e::bench::scale::synthetic_pod(shape, i))
            .collect();
        let mut state = self.lock();
        state.rv += 1;
        let rv = json!(state.rv.to_string());
        for n in 0..shape.namespaces {
            let name = format!("ns-{n}");
            let permitted = match shape.refused {
                true => "not-a-role-any-pod-has",
                false => "role-.*",
            };
            let object = json!({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": name, "uid": format!("ns-uid-{n}"), "resourceVersion": rv,
                    "annotations": {"iam.amazonaws.com/permitted": permitted}}});
            state
                .objects
                .insert((Kind::NAMESPACE, String::new(), name), object);
        }
        for mut pod in pods {
            pod["metadata"]["resourceVersion"] = rv.clone();
            let key = key_of(Kind::POD, &pod);
            state.objects.insert(key, pod);
        }
        state.compacted = state.rv;
        state.history.clear();
    }

    fn delete(&self, kind: Kind, ns: &str, name: &str) -> Option<Value> {
        let mut state = self.lock();
        let key = (kind, ns.to_owned(), name.to_owned());
        let mut object = state.objects.remove(&key)?;
        state.rv += 1;
        object["metadata"]["resourceVersion"] = json!(state.rv.to_string());
        self.record(&mut state, kind, "DELETED", object.clone());
        Some(object)
    }
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Emulator {
    fn sign(&self, data: &str) -> String {
        use hmac::Mac as _;
        let mut mac =
            hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.token_key).expect("any key length");
        mac.update(data.as_bytes());
        b64(&mac.finalize().into_bytes())
    }

    /// A projected service-account token, as the kubelet gets one for a pod.
    fn mint(&self, spec: &Value) -> Result<Value, String> {
        let field = |k: &str| spec[k].as_str().map(str::to_owned);
        let namespace = field("namespace").ok_or("namespace is required")?;
        let account = field("serviceAccount").ok_or("serviceAccount is required")?;
        let now = unix_now();
        let mut binding = json!({"namespace": namespace,
            "serviceaccount": {"name": account, "uid": format!("sa-{namespace}-{account}")}});
        if let (Some(name), Some(uid)) = (field("podName"), field("podUid")) {
            binding["pod"] = json!({"name": name, "uid": uid});
        }
        if let Some(node) = field("nodeName") {
            let uid = self
                .lock()
                .objects
                .get(&(Kind::NODE, String::new(), node.clone()))
                .and_then(|n| n["metadata"]["uid"].as_str().map(str::to_owned))
                .unwrap_or_else(|| format!("node-uid-{node}"));
            binding["node"] = json!({"name": node, "uid": uid});
        }
        let jti = {
            let mut state = self.lock();
            state.minted += 1;
            format!("jti-{}", state.minted)
        };
        let claims = json!({
            "iss": "https://kubernetes.default.svc.cluster.local",
            "sub": format!("system:serviceaccount:{namespace}:{account}"),
            "aud": spec["audiences"].clone(),
            "iat": now, "nbf": now,
            "exp": now + spec["expirationSeconds"].as_i64().unwrap_or(3600),
            "jti": jti,
            "kubernetes.io": binding,
        });
        let unsigned = format!(
            "{}.{}",
            b64(br#"{"alg":"HS256","kid":"emulator"}"#),
            b64(claims.to_string().as_bytes())
        );
        let signature = self.sign(&unsigned);
        Ok(json!({"token": format!("{unsigned}.{signature}")}))
    }

    /// `TokenReview.status` for a token, as the real API server reviews service-account
    /// tokens.
    fn review(&self, spec: &Value) -> Value {
        let refused = |why: &str| json!({"authenticated": false, "error": format!("[invalid bearer token, {why}]")});
        let token = spec["token"].as_str().unwrap_or("");
        let parts: Vec<&str> = token.split('.').collect();
        let [header, payload, signature] = parts.as_slice() else {
            return refused("token is not a JWT");
        };
        if self.sign(&format!("{header}.{payload}")) != *signature {
            return refused("token signature is invalid");
        }
        let claims: Value = {
            use base64::Engine as _;
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or(Value::Null)
        };
        if claims["exp"].as_i64().is_none_or(|exp| exp <= unix_now()) {
            return refused("service account token has expired");
        }
        let wanted: Vec<String> = match spec["audiences"].as_array() {
            Some(a) if !a.is_empty() => a
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect(),
            _ => vec![API_AUDIENCE.to_owned()],
        };
        let token_audiences: Vec<String> = claims["aud"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        let audiences: Vec<String> = wanted
            .iter()
            .filter(|a| token_audiences.contains(a))
            .cloned()
            .collect();
        if audiences.is_empty() {
            return refused(&format!(
                "token audiences {token_audiences:?} is invalid for the target audiences {wanted:?}"
            ));
        }
        let binding = &claims["kubernetes.io"];
        let namespace = binding["namespace"].as_str().unwrap_or("");
        let account = binding["serviceaccount"]["name"].as_str().unwrap_or("");
        let mut extra = serde_json::Map::new();
        if let Some(pod) = binding.get("pod") {
            let (name, uid) = (
                pod["name"].as_str().unwrap_or(""),
                pod["uid"].as_str().unwrap_or(""),
            );
            // A bound token dies with its pod.
            let alive = self
                .lock()
                .objects
                .get(&(Kind::POD, namespace.to_owned(), name.to_owned()))
                .is_some_and(|p| p["metadata"]["uid"] == uid);
            if !alive {
                return refused(&format!("pod {namespace}/{name} ({uid}) no longer exists"));
            }
            extra.insert(
                "authentication.kubernetes.io/pod-name".into(),
                json!([name]),
            );
            extra.insert("authentication.kubernetes.io/pod-uid".into(), json!([uid]));
        }
        if let Some(node) = binding.get("node") {
            extra.insert(
                "authentication.kubernetes.io/node-name".into(),
                json!([node["name"]]),
            );
            extra.insert(
                "authentication.kubernetes.io/node-uid".into(),
                json!([node["uid"]]),
            );
        }
        extra.insert(
            "authentication.kubernetes.io/credential-id".into(),
            json!([format!("JTI={}", claims["jti"].as_str().unwrap_or(""))]),
        );
        json!({
            "authenticated": true,
            "user": {
                "username": format!("system:serviceaccount:{namespace}:{account}"),
                "uid": binding["serviceaccount"]["uid"],
                "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{namespace}"), "system:authenticated"],
                "extra": extra,
            },
            "audiences": audiences,
        })
    }
}

/// The service account the kiam agent runs as, in the shipped manifests.
const AGENT_USER: &str = "system:serviceaccount:kiam:kiam-agent";
/// The taint `kiam-agent --remove-startup-taint` removes.
const STARTUP_TAINT: &str = "kiam.rs/agent-not-ready";

impl Emulator {
    /// Who sent `req`: its bearer token, reviewed as the API server's own audience
    /// (`TokenReview.status.user`). Anonymous requests are refused.
    fn caller(&self, req: &Request<Incoming>) -> Result<Value, String> {
        let token = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or("no bearer token: anonymous requests are refused")?;
        let review = self.review(&json!({"token": token}));
        match review["authenticated"].as_bool() {
            Some(true) => Ok(review["user"].clone()),
            _ => Err(review["error"]
                .as_str()
                .unwrap_or("unauthenticated")
                .to_owned()),
        }
    }

    /// A JSON patch (RFC 6902) of a node, through the admission rule the manifests ship as
    /// the ValidatingAdmissionPolicy `kiam-agent-own-node`: the kiam agent may only change
    /// the node named in its token, and only by removing the start-up taint. (The rule is
    /// the policy's, written here in Rust: the emulator cannot evaluate CEL.)
    fn patch_node(
        &self,
        user: &Value,
        name: &str,
        patch: Value,
    ) -> Response<BoxBody<Bytes, Infallible>> {
        let patch: json_patch::Patch = match serde_json::from_value(patch) {
            Ok(patch) => patch,
            Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string()),
        };
        let mut state = self.lock();
        let key = (Kind::NODE, String::new(), name.to_owned());
        let Some(old) = state.objects.get(&key).cloned() else {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("nodes \"{name}\" not found"),
            );
        };
        let mut new = old.clone();
        if let Err(e) = json_patch::patch(&mut new, &patch) {
            // A failed `test` is the API server's 422.
            return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", &e.to_string());
        }
        if user["username"] == AGENT_USER
            && let Err(why) = agent_may_change(user, &old, &new)
        {
            return status(
                StatusCode::FORBIDDEN,
                "Forbidden",
                &format!(
                    "nodes \"{name}\" is forbidden: ValidatingAdmissionPolicy 'kiam-agent-own-node' with binding 'kiam-agent-own-node' denied request: {why}"
                ),
            );
        }
        state.rv += 1;
        new["metadata"]["resourceVersion"] = json!(state.rv.to_string());
        state.objects.insert(key, new.clone());
        self.record(&mut state, Kind::NODE, "MODIFIED", new.clone());
        full(StatusCode::OK, new)
    }
}

impl Emulator {
    /// A merge patch of a pod's `status` (what the kubelet writes); the rest of the patch
    /// is ignored, as the API server's status subresource does.
    fn patch_pod_status(
        &self,
        ns: &str,
        name: &str,
        patch: &Value,
    ) -> Response<BoxBody<Bytes, Infallible>> {
        let mut state = self.lock();
        let key = (Kind::POD, ns.to_owned(), name.to_owned());
        let Some(mut pod) = state.objects.get(&key).cloned() else {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("pods \"{name}\" not found"),
            );
        };
        if !patch["status"].is_null() {
            merge(&mut pod["status"], &patch["status"]);
        }
        state.rv += 1;
        pod["metadata"]["resourceVersion"] = json!(state.rv.to_string());
        state.objects.insert(key, pod.clone());
        self.record(&mut state, Kind::POD, "MODIFIED", pod.clone());
        full(StatusCode::OK, pod)
    }

    /// `TokenRequest` for a service account, as the kubelet makes one for a projected
    /// token: bound to the pod named in `spec.boundObjectRef` (which must exist with that
    /// UID) and to the node the pod is on.
    fn token_request(
        &self,
        ns: &str,
        account: &str,
        mut request: Value,
    ) -> Response<BoxBody<Bytes, Infallible>> {
        let spec = &request["spec"];
        let mut mint = json!({
            "namespace": ns,
            "serviceAccount": account,
            "audiences": match spec["audiences"].as_array() {
                Some(a) if !a.is_empty() => json!(a),
                _ => json!([API_AUDIENCE]),
            },
            "expirationSeconds": spec["expirationSeconds"].as_i64().unwrap_or(3600),
        });
        let bound = &spec["boundObjectRef"];
        if !bound.is_null() {
            if bound["kind"] != "Pod" {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "the emulator binds tokens to pods only",
                );
            }
            let name = bound["name"].as_str().unwrap_or("");
            let pod = self
                .lock()
                .objects
                .get(&(Kind::POD, ns.to_owned(), name.to_owned()))
                .cloned();
            let Some(pod) =
                pod.filter(|p| bound["uid"].is_null() || p["metadata"]["uid"] == bound["uid"])
            else {
                return status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("pods \"{name}\" not found"),
                );
            };
            if pod["spec"]["serviceAccountName"]
                .as_str()
                .unwrap_or("default")
                != account
            {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    &format!("pod {name} does not run as service account {account}"),
                );
            }
            mint["podName"] = json!(name);
            mint["podUid"] = pod["metadata"]["uid"].clone();
            if let Some(node) = pod["spec"]["nodeName"].as_str() {
                mint["nodeName"] = json!(node);
            }
        }
        let expiration = mint["expirationSeconds"].as_i64().unwrap_or(3600);
        match self.mint(&mint) {
            Ok(token) => {
                let expires = jiff::Timestamp::now()
                    .checked_add(jiff::SignedDuration::from_secs(expiration))
                    .map(|t| t.to_string())
                    .unwrap_or_default();
                request["status"] =
                    json!({"token": token["token"], "expirationTimestamp": expires});
                request["kind"] = json!("TokenRequest");
                request["apiVersion"] = json!("authentication.k8s.io/v1");
                full(StatusCode::CREATED, request)
            }
            Err(e) => status(StatusCode::BAD_REQUEST, "BadRequest", &e),
        }
    }
}

/// The shipped policy's validations, for a change of `old` into `new` by the kiam agent.
fn agent_may_change(user: &Value, old: &Value, new: &Value) -> Result<(), &'static str> {
    let own = user["extra"]["authentication.kubernetes.io/node-name"][0].as_str();
    if own != new["metadata"]["name"].as_str() {
        return Err("the kiam agent may only change the node it runs on");
    }
    let taints = |node: &Value| -> Vec<Value> {
        node["spec"]["taints"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    let kept: Vec<Value> = taints(old)
        .into_iter()
        .filter(|t| t["key"] != STARTUP_TAINT)
        .collect();
    let meta = |node: &Value, field: &str| match &node["metadata"][field] {
        Value::Null => json!({}),
        value => value.clone(),
    };
    let same_meta = ["labels", "annotations"]
        .iter()
        .all(|field| meta(old, field) == meta(new, field));
    if taints(new) != kept || !same_meta {
        return Err("the kiam agent may only remove the kiam.rs/agent-not-ready taint");
    }
    Ok(())
}

fn full(status: StatusCode, body: Value) -> Response<BoxBody<Bytes, Infallible>> {
    let mut response = Response::new(
        Full::new(Bytes::from(body.to_string()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<BoxBody<Bytes, Infallible>> {
    full(
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code.as_u16()}),
    )
}

fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.replace("%2C", ",").replace("%3D", "=")))
        .collect()
}

/// `fieldSelector`: equality on `spec.nodeName` and `metadata.name`/`metadata.namespace`
/// (the kubelet watches its node's pods with `spec.nodeName=<node>`); anything else is
/// refused by the caller before listing.
#[derive(Clone, Default)]
struct FieldSelector(Vec<(String, String)>);

impl FieldSelector {
    const SUPPORTED: [&str; 3] = ["spec.nodeName", "metadata.name", "metadata.namespace"];

    fn parse(q: &HashMap<String, String>) -> Self {
        Self(
            q.get("fieldSelector")
                .map(|s| {
                    s.split(',')
                        .filter_map(|term| term.split_once('='))
                        .map(|(k, v)| (k.trim_end_matches('=').to_owned(), v.to_owned()))
                        .collect()
                })
                .unwrap_or_default(),
        )
    }

    /// The first field this emulator cannot select on.
    fn unsupported(q: &HashMap<String, String>) -> Option<String> {
        let terms = q.get("fieldSelector")?;
        terms
            .split(',')
            .filter(|t| !t.is_empty())
            .find(|term| {
                term.contains("!=")
                    || !term
                        .split_once('=')
                        .is_some_and(|(k, _)| Self::SUPPORTED.contains(&k.trim_end_matches('=')))
            })
            .map(str::to_owned)
    }

    fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|(field, value)| {
            let found = field
                .split('.')
                .fold(object, |v, part| &v[part])
                .as_str()
                .unwrap_or("");
            found == value
        })
    }
}

fn list(
    emu: &Emulator,
    kind: Kind,
    ns: Option<&str>,
    q: &HashMap<String, String>,
) -> Response<BoxBody<Bytes, Infallible>> {
    let state = emu.lock();
    let fields = FieldSelector::parse(q);
    let items: Vec<&Value> = state
        .objects
        .iter()
        .filter(|((k, n, _), v)| *k == kind && ns.is_none_or(|ns| ns == n) && fields.matches(v))
        .map(|(_, v)| v)
        .collect();
    let offset: usize = q.get("continue").and_then(|c| c.parse().ok()).unwrap_or(0);
    let limit: usize = q
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let page: Vec<&Value> = items.iter().skip(offset).take(limit).copied().collect();
    let next = offset.saturating_add(page.len());
    let mut metadata = json!({"resourceVersion": state.rv.to_string()});
    if next < items.len() {
        metadata["continue"] = json!(next.to_string());
        metadata["remainingItemCount"] = json!(items.len() - next);
    }
    full(
        StatusCode::OK,
        json!({"kind": format!("{}List", kind.name()), "apiVersion": kind.api_version(),
               "metadata": metadata, "items": page}),
    )
}

fn line(value: &Value) -> Bytes {
    let mut text = value.to_string();
    text.push('\n');
    Bytes::from(text)
}

fn watch(
    emu: &Arc<Emulator>,
    kind: Kind,
    ns: Option<String>,
    q: &HashMap<String, String>,
) -> Response<BoxBody<Bytes, Infallible>> {
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = q.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(300));
    let (tx, rx) = mpsc::channel::<Bytes>(1024);
    let fields = FieldSelector::parse(q);
    let matches = move |change: &Change| {
        change.kind == kind
            && ns
                .as_deref()
                .is_none_or(|ns| change.object["metadata"]["namespace"] == ns)
            && fields.matches(&change.object)
    };
    let emu = emu.clone();
    // Subscribe before reading history so no change falls between the two.
    let mut live = emu.live.subscribe();
    let (replay, current, expired) = {
        let state = emu.lock();
        let expired = from != 0 && from < state.compacted;
        let replay: Vec<Change> = state
            .history
            .iter()
            .filter(|c| c.rv > from && matches(c))
            .cloned()
            .collect();
        (replay, state.rv, expired)
    };
    tokio::spawn(async move {
        if expired {
            let gone = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1",
                "metadata": {}, "status": "Failure", "reason": "Expired", "code": 410,
                "message": format!("too old resource version: {from}")}});
            let _ = tx.send(line(&gone)).await;
            return;
        }
        for change in replay {
            let _ = tx
                .send(line(
                    &json!({"type": change.event, "object": change.object}),
                ))
                .await;
        }
        // Everything up to `current` was in the replay; live copies of it are skipped.
        let mut last = current.max(from);
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                () = &mut deadline => return,
                message = live.recv() => match message {
                    Ok(Live::Change(change)) if change.rv > last && matches(&change) => {
                        last = change.rv;
                        let event = json!({"type": change.event, "object": change.object});
                        if tx.send(line(&event)).await.is_err() {
                            return;
                        }
                    }
                    Ok(Live::Change(change)) => last = last.max(change.rv),
                    Ok(Live::Bookmark) if bookmarks => {
                        let rv = emu.lock().rv;
                        let event = json!({"type": "BOOKMARK", "object": {"kind": kind.name(),
                            "apiVersion": kind.api_version(),
                            "metadata": {"resourceVersion": rv.to_string()}}});
                        if tx.send(line(&event)).await.is_err() {
                            return;
                        }
                    }
                    Ok(Live::Bookmark) => {}
                    Ok(Live::Drop) | Err(_) => return,
                },
            }
        }
    });
    let stream = futures_stream(rx);
    let mut response = Response::new(BoxBody::new(StreamBody::new(stream)));
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

/// The receiver as a body stream of data frames.
fn futures_stream(
    rx: mpsc::Receiver<Bytes>,
) -> impl futures::Stream<Item = Result<Frame<Bytes>, Infallible>> {
    futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok(Frame::data(b)), rx))
    })
}

async fn body_json(req: Request<Incoming>) -> Result<Value, String> {
    let bytes = req
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    serde_json::from_slice(&bytes).map_err(|e| format!("invalid JSON: {e}"))
}

async fn handle(
    emu: Arc<Emulator>,
    req: Request<Incoming>,
) -> Result<Response<BoxBody<Bytes, Infallible>>, Infallible> {
    let path: Vec<String> = req
        .uri()
        .path()
        .trim_matches('/')
        .split('/')
        .map(str::to_owned)
        .collect();
    let segments: Vec<&str> = path.iter().map(String::as_str).collect();
    let method = req.method().clone();
    let q = query(&req);
    let response = match (&method, segments.as_slice()) {
        (&Method::GET, ["api", "v1", resource])
        | (&Method::GET, ["api", "v1", "namespaces", _, resource])
            if Kind::of(resource).is_some() =>
        {
            let kind = Kind::of(resource).unwrap_or(Kind::POD);
            let ns = match segments.as_slice() {
                ["api", "v1", "namespaces", ns, _] => Some((*ns).to_owned()),
                _ => None,
            };
            let watching = q.get("watch").map(String::as_str) == Some("true")
                || q.get("watch").map(String::as_str) == Some("1");
            if let Some(term) = FieldSelector::unsupported(&q) {
                return Ok(status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    &format!("the emulator cannot select on {term}"),
                ));
            }
            *emu.lock()
                .requests
                .entry(format!(
                    "{} {resource}",
                    if watching { "watch" } else { "list" }
                ))
                .or_default() += 1;
            if watching {
                watch(&emu, kind, ns, &q)
            } else {
                list(&emu, kind, ns.as_deref(), &q)
            }
        }
        (&Method::GET, ["api", "v1", "nodes", name]) => match emu.caller(&req) {
            Err(why) => status(StatusCode::UNAUTHORIZED, "Unauthorized", &why),
            Ok(_) => match emu
                .lock()
                .objects
                .get(&(Kind::NODE, String::new(), (*name).to_owned()))
            {
                Some(node) => full(StatusCode::OK, node.clone()),
                None => status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("nodes \"{name}\" not found"),
                ),
            },
        },
        (&Method::PATCH, ["api", "v1", "nodes", name]) => {
            let name = (*name).to_owned();
            let json_patch = req
                .headers()
                .get(hyper::header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes() == b"application/json-patch+json");
            match (emu.caller(&req), json_patch) {
                (Err(why), _) => status(StatusCode::UNAUTHORIZED, "Unauthorized", &why),
                (Ok(_), false) => status(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "UnsupportedMediaType",
                    "the emulator patches nodes with application/json-patch+json only",
                ),
                (Ok(user), true) => match body_json(req).await {
                    Ok(patch) => emu.patch_node(&user, &name, patch),
                    Err(e) => status(StatusCode::BAD_REQUEST, "BadRequest", &e),
                },
            }
        }
        (&Method::GET, ["api", "v1", "namespaces", ns, resource, name])
            if Kind::of(resource).is_some_and(|k| k.namespaced() && k.api_version() == "v1") =>
        {
            let kind = Kind::of(resource).unwrap_or(Kind::POD);
            let key = (kind, (*ns).to_owned(), (*name).to_owned());
            match emu.lock().objects.get(&key) {
                Some(object) => full(StatusCode::OK, object.clone()),
                None => status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("{resource} \"{name}\" not found"),
                ),
            }
        }
        (&Method::PATCH, ["api", "v1", "namespaces", ns, "pods", name, "status"]) => {
            let (ns, name) = ((*ns).to_owned(), (*name).to_owned());
            let merge_patch = req
                .headers()
                .get(hyper::header::CONTENT_TYPE)
                .is_some_and(|v| {
                    v.as_bytes() == b"application/merge-patch+json"
                        || v.as_bytes() == b"application/strategic-merge-patch+json"
                });
            match (merge_patch, body_json(req).await) {
                (false, _) => status(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "UnsupportedMediaType",
                    "the emulator patches pod status with merge patches only",
                ),
                (true, Ok(patch)) => emu.patch_pod_status(&ns, &name, &patch),
                (true, Err(e)) => status(StatusCode::BAD_REQUEST, "BadRequest", &e),
            }
        }
        (
            &Method::POST,
            [
                "api",
                "v1",
                "namespaces",
                ns,
                "serviceaccounts",
                name,
                "token",
            ],
        ) => {
            let (ns, name) = ((*ns).to_owned(), (*name).to_owned());
            match body_json(req).await {
                Ok(request) => emu.token_request(&ns, &name, request),
                Err(e) => status(StatusCode::BAD_REQUEST, "BadRequest", &e),
            }
        }
        (&Method::GET, ["api", "v1", "namespaces", name]) => {
            let state = emu.lock();
            match state
                .objects
                .get(&(Kind::NAMESPACE, String::new(), (*name).to_owned()))
            {
                Some(ns) => full(StatusCode::OK, ns.clone()),
                None => status(StatusCode::NOT_FOUND, "NotFound", "namespace not found"),
            }
        }
        (&Method::POST, ["api", "v1", "namespaces", ns, "events"])
        | (&Method::POST, ["apis", "events.k8s.io", "v1", "namespaces", ns, "events"]) => {
            let ns = (*ns).to_owned();
            match body_json(req).await {
                Ok(mut event) => {
                    let mut state = emu.lock();
                    state.rv += 1;
                    event["metadata"]["namespace"] = json!(ns);
                    event["metadata"]["resourceVersion"] = json!(state.rv.to_string());
                    if event["metadata"]["name"].is_null() {
                        let prefix = event["metadata"]["generateName"]
                            .as_str()
                            .unwrap_or("event.");
                        event["metadata"]["name"] = json!(format!("{prefix}{}", state.rv));
                    }
                    state.events.push(event.clone());
                    full(StatusCode::CREATED, event)
                }
                Err(e) => status(StatusCode::BAD_REQUEST, "BadRequest", &e),
            }
        }
        (
            &Method::PATCH,
            [
                "apis",
                "events.k8s.io",
                "v1",
                "namespaces",
                ns,
                "events",
                name,
            ],
        )
        | (&Method::PATCH, ["api", "v1", "namespaces", ns, "events", name]) => {
            let (ns, name) = ((*ns).to_owned(), (*name).to_owned());
            match body_json(req).await {
                Ok(patch) => {
                    let mut state = emu.lock();
                    let found = state.events.iter_mut().find(|e| {
                        e["metadata"]["namespace"] == ns.as_str()
                            && e["metadata"]["name"] == name.as_str()
                    });
                    match found {
                        Some(event) => {
                            merge(event, &patch);
                            full(StatusCode::OK, event.clone())
                        }
                        None => status(StatusCode::NOT_FOUND, "NotFound", "event not found"),
                    }
                }
                Err(e) => status(StatusCode::BAD_REQUEST, "BadRequest", &e),
            }
        }
        (&Method::POST, ["apis", "authentication.k8s.io", "v1", "tokenreviews"]) => {
            let failing = {
                let mut state = emu.lock();
                *state
                    .requests
                    .entry("create tokenreviews".into())
                    .or_default() += 1;
                let failing = state.failing_reviews > 0;
                state.failing_reviews = state.failing_reviews.saturating_sub(1);
                failing
            };
            match (failing, body_json(req).await) {
                (true, _) => status(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "ServiceUnavailable",
                    "injected by the test",
                ),
                (false, Ok(mut review)) => {
                    review["status"] = emu.review(&review["spec"]);
                    review["apiVersion"] = json!("authentication.k8s.io/v1");
                    review["kind"] = json!("TokenReview");
                    full(StatusCode::CREATED, review)
                }
                (false, Err(e)) => status(StatusCode::BAD_REQUEST, "BadRequest", &e),
            }
        }
        (&Method::POST, ["_emulator", "tokens"]) => match body_json(req).await {
            Ok(spec) => match emu.mint(&spec) {
                Ok(token) => full(StatusCode::OK, token),
                Err(e) => status(StatusCode::BAD_REQUEST, "BadRequest", &e),
            },
            Err(e) => status(StatusCode::BAD_REQUEST, "BadRequest", &e),
        },
        (&Method::POST, ["_emulator", "generate"]) => match body_json(req).await {
            Ok(shape) => match serde_json::from_value(shape) {
                Ok(shape) => {
                    emu.generate(&shape);
                    full(StatusCode::OK, json!({}))
                }
                Err(e) => status(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string()),
            },
            Err(e) => status(StatusCode::BAD_REQUEST, "BadRequest", &e),
        },
        (&Method::POST, ["_emulator", "fail-token-reviews"]) => match body_json(req).await {
            Ok(spec) => {
                emu.lock().failing_reviews = spec["count"].as_u64().unwrap_or(1);
                full(StatusCode::OK, json!({}))
            }
            Err(e) => status(StatusCode::BAD_REQUEST, "BadRequest", &e),
        },
        (&Method::PUT, ["_emulator", "objects"]) => match body_json(req).await {
            Ok(object) => match emu.upsert(object) {
                Ok(stored) => full(StatusCode::OK, stored),
                Err(e) => status(StatusCode::BAD_REQUEST, "BadRequest", &e),
            },
            Err(e) => status(StatusCode::BAD_REQUEST, "BadRequest", &e),
        },
        (&Method::GET, ["_emulator", "objects", resource, ns, name]) => {
            let ns = if *ns == "-" { "" } else { ns };
            let found = Kind::of(resource).and_then(|k| {
                emu.lock()
                    .objects
                    .get(&(k, ns.to_owned(), (*name).to_owned()))
                    .cloned()
            });
            match found {
                Some(object) => full(StatusCode::OK, object),
                None => status(StatusCode::NOT_FOUND, "NotFound", "no such object"),
            }
        }
        (&Method::DELETE, ["_emulator", "objects", resource, ns, name]) => {
            let ns = if *ns == "-" { "" } else { ns };
            match Kind::of(resource).and_then(|k| emu.delete(k, ns, name)) {
                Some(object) => full(StatusCode::OK, object),
                None => status(StatusCode::NOT_FOUND, "NotFound", "no such object"),
            }
        }
        (&Method::POST, ["_emulator", "compact"]) => {
            let mut state = emu.lock();
            state.compacted = state.rv + 1;
            let keep = state.compacted;
            state.history.retain(|c| c.rv >= keep);
            full(StatusCode::OK, json!({"compacted": keep}))
        }
        (&Method::POST, ["_emulator", "drop-watches"]) => {
            let _ = emu.live.send(Live::Drop);
            full(StatusCode::OK, json!({}))
        }
        (&Method::POST, ["_emulator", "bookmark"]) => {
            let _ = emu.live.send(Live::Bookmark);
            full(StatusCode::OK, json!({}))
        }
        (&Method::GET, ["_emulator", "events"]) => full(StatusCode::OK, json!(emu.lock().events)),
        (&Method::GET, ["_emulator", "requests"]) => {
            full(StatusCode::OK, json!(emu.lock().requests))
        }
        _ => status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("the emulator does not serve {method} {}", req.uri().path()),
        ),
    };
    Ok(response)
}

/// JSON merge patch (RFC 7386).
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let (live, _) = broadcast::channel(4096);
    let emu = Arc::new(Emulator {
        state: Mutex::new(State {
            rv: cli.initial_rv,
            compacted: if cli.initial_rv > 1 {
                cli.initial_rv
            } else {
                0
            },
            objects: BTreeMap::new(),
            history: Vec::new(),
            events: Vec::new(),
            requests: HashMap::new(),
            next_uid: 0,
            failing_reviews: 0,
            minted: 0,
        }),
        live,
        token_key: {
            let mut key = [0u8; 32];
            getrandom::fill(&mut key)
                .map_err(|e| anyhow::anyhow!("randomness for the token key: {e}"))?;
            key
        },
    });
    let listener = tokio::net::TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("bind {}", cli.listen))?;
    if let (Some(address), Some(cert), Some(key)) = (cli.tls_listen, &cli.tls_cert, &cli.tls_key) {
        let acceptor = tls_acceptor(cert, key)?;
        let tls = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("bind {address}"))?;
        println!("tls {}", tls.local_addr()?);
        let emu = emu.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = tls.accept().await else {
                    continue;
                };
                let (emu, acceptor) = (emu.clone(), acceptor.clone());
                tokio::spawn(async move {
                    if let Ok(stream) = acceptor.accept(stream).await {
                        serve(emu, stream).await;
                    }
                });
            }
        });
    }
    println!("listening {}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(serve(emu.clone(), stream));
    }
}

async fn serve<S>(emu: Arc<Emulator>, stream: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| handle(emu.clone(), req));
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
    let chain = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing {}", cert.display()))?;
    let key =
        PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading {}", key.display()))?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}
