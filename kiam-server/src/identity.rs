//! Which node an agent proved it runs on. The server never trusts a node name it is told: an
//! agent may only ask about pods of the node its credentials name.
//!
//! Two ways to prove a node, the first one preferred:
//! - **A projected service-account token** (`authorization: Bearer …` on every call), issued
//!   by the kubelet to the agent's pod with audience `--agent-token-audience`. The server asks
//!   the API server to review it (`TokenReview`), accepts only the kiam agent's service
//!   account (`--agent-service-account`) and the expected audience, and takes the node from
//!   the review's `authentication.kubernetes.io/node-name` (Kubernetes ≥ 1.30), or else from
//!   the pod the token is bound to (`…/pod-uid` → the pod's `spec.nodeName`).
//! - **A certificate** carrying `spiffe://kiam/node/<node>` URI SANs, for clusters without
//!   bound tokens.
//!
//! Without either, the agent is refused, unless `--allow-unidentified-agents` (then it may
//! ask about any node, as kiam's agents could: kiam#521).
//!
//! Reviews are cached by the token's SHA-256 until shortly before the token expires (one
//! review per agent per rotation, not per request), and concurrent first uses of a token share
//! one review. A review that cannot be made is refused, never guessed.
//!
//! Whoever holds the agents' certificate can send any token, so reviews are bounded whatever
//! it sends: a token whose own (unverified) claims cannot be the agent's (another subject,
//! another audience, expired, not a JWT) is refused without a review; reviews in flight are
//! capped overall and per client address; refusals are remembered in a table of their own,
//! so they never push out the reviews legitimate agents rely on; and a review bound to a pod
//! (the agent's) is trusted only while that pod is in the index.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use futures::{
    FutureExt as _,
    future::{BoxFuture, Shared},
};
use kiam_ops::unix_now;
use sha2::{Digest as _, Sha256};
use tokio::time::Instant;

use crate::{index::Index, refusal::Refusal};

/// The review extra that names the node a token's pod runs on (Kubernetes ≥ 1.30).
pub const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";
/// The review extras that name the pod a token is bound to.
pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
pub const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";

/// What the API server said about a token.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Review {
    pub authenticated: bool,
    /// Why not, when not authenticated.
    pub error: Option<String>,
    pub username: String,
    pub extra: BTreeMap<String, Vec<String>>,
    /// The requested audiences the token is valid for.
    pub audiences: Vec<String>,
}

/// Where reviews come from: the API server's `TokenReview` in production.
pub trait TokenReviewer: Send + Sync + 'static {
    fn review(&self, token: String, audience: String)
    -> BoxFuture<'static, Result<Review, String>>;
}

/// `TokenReview` through kube-rs.
pub struct KubeReviewer(pub kube::Client);

impl TokenReviewer for KubeReviewer {
    fn review(
        &self,
        token: String,
        audience: String,
    ) -> BoxFuture<'static, Result<Review, String>> {
        use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
        let api: kube::Api<TokenReview> = kube::Api::all(self.0.clone());
        async move {
            let request = TokenReview {
                spec: TokenReviewSpec {
                    token,
                    audiences: Some(vec![audience]),
                },
                ..TokenReview::default()
            };
            let answer = api
                .create(&kube::api::PostParams::default(), &request)
                .await
                .map_err(|e| e.to_string())?;
            let status = answer.status.unwrap_or_default();
            let user = status.user.unwrap_or_default();
            Ok(Review {
                authenticated: status.authenticated.unwrap_or(false),
                error: status.error,
                username: user.username.unwrap_or_default(),
                extra: user.extra.unwrap_or_default(),
                audiences: status.audiences.unwrap_or_default(),
            })
        }
        .boxed()
    }
}

/// What identities the server accepts.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `<namespace>:<name>` of the agents' service account.
    pub service_account: String,
    pub audience: String,
    /// `--allow-unidentified-agents`: an agent that proves no node may ask about any.
    pub allow_unidentified: bool,
}

impl Settings {
    fn username(&self) -> String {
        format!("system:serviceaccount:{}", self.service_account)
    }
}

/// The nodes an agent may ask about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Proven {
    Nodes(Vec<String>),
    /// `--allow-unidentified-agents` and no identity: any node.
    AnyNode,
}

impl Proven {
    /// Whether the agent may ask about pods of `node`.
    pub fn check(&self, node: &str) -> Result<(), Refusal> {
        match self {
            Self::AnyNode => Ok(()),
            Self::Nodes(nodes) if nodes.iter().any(|n| n == node) => Ok(()),
            Self::Nodes(nodes) => Err(Refusal::AgentNodeMismatch {
                proven: nodes.join(","),
                asked: node.to_owned(),
            }),
        }
    }
}

/// How long a review may take. kube-rs retries the API server's 5xx with backoff for minutes;
/// an agent waits less than a second, so a slow review is an unavailable one.
const REVIEW_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a failed review is remembered (a rotated token is a new one anyway).
const REFUSAL_TTL: Duration = Duration::from_secs(10);
/// A token is trusted until this long before its expiry.
const EXPIRY_MARGIN: Duration = Duration::from_secs(30);
/// At most this long without asking again, whatever the token's expiry.
const MAX_TRUST: Duration = Duration::from_secs(3600);
/// Accepted tokens remembered at once (a few per agent); past it, what expired is forgotten,
/// then new ones are reviewed every time rather than push out those in use.
const MAX_TRUSTED: usize = 65_536;
/// Refused tokens remembered at once; a full table starts over.
const MAX_REFUSED: usize = 4_096;
/// Reviews in flight at once, and from one client address.
const MAX_REVIEWS: usize = 32;
const MAX_REVIEWS_PER_PEER: usize = 2;

/// The node a token proves, or why it proves none.
type Outcome = Result<String, Refusal>;
/// A review's outcome, until when it holds (`None`: do not remember it), and the pod the
/// token is bound to.
type Reviewed = (Outcome, Option<Instant>, Option<String>);
type Flight = Shared<BoxFuture<'static, Reviewed>>;

struct Trusted {
    node: String,
    until: Instant,
    /// The pod the token is bound to: the token is trusted only while it exists.
    pod_uid: Option<String>,
}

#[derive(Default)]
struct Cache {
    trusted: HashMap<[u8; 32], Trusted>,
    refused: HashMap<[u8; 32], (Refusal, Instant)>,
    reviewing: HashMap<[u8; 32], Flight>,
    /// Reviews in flight by client address.
    in_flight: HashMap<IpAddr, usize>,
}

pub struct AgentAuth {
    reviewer: Arc<dyn TokenReviewer>,
    settings: Settings,
    index: Arc<Index>,
    cache: Mutex<Cache>,
}

/// A review slot of one client address; freed when dropped.
struct Slot<'a>(&'a AgentAuth, Option<IpAddr>);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut cache = self.0.cache.lock().unwrap_or_else(|e| e.into_inner());
        let key = self.1.unwrap_or(IpAddr::from([0, 0, 0, 0]));
        if let Some(n) = cache.in_flight.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                cache.in_flight.remove(&key);
            }
        }
    }
}

/// The claims of a JWT, unverified: to refuse at once what cannot be the agent's, to learn a
/// token's expiry and to explain a refusal; never to accept one.
fn claims(token: &str) -> Option<serde_json::Value> {
    let payload = token.split('.').nth(1)?;
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()
}

fn audiences_of(claims: &serde_json::Value) -> Vec<String> {
    match &claims["aud"] {
        serde_json::Value::String(one) => vec![one.clone()],
        serde_json::Value::Array(many) => many
            .iter()
            .filter_map(|a| a.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    }
}

/// Refuses, without asking the API server, a token whose own claims say it cannot be the
/// agent's: not a JWT, another subject or audience, expired. Forging claims gains nothing:
/// the review that follows checks the signature.
pub fn precheck(settings: &Settings, token: &str) -> Result<(), Refusal> {
    let Some(claims) = claims(token) else {
        return Err(Refusal::AgentTokenInvalid("not a JWT".into()));
    };
    let audiences = audiences_of(&claims);
    if !audiences.contains(&settings.audience) {
        return Err(Refusal::AgentTokenWrongAudience {
            want: settings.audience.clone(),
            got: audiences,
        });
    }
    let subject = claims["sub"].as_str().unwrap_or_default();
    if subject != settings.username() {
        return Err(Refusal::AgentTokenWrongServiceAccount {
            want: settings.username(),
            got: subject.to_owned(),
        });
    }
    match claims["exp"].as_i64() {
        Some(exp) if exp > unix_now() => Ok(()),
        _ => Err(Refusal::AgentTokenExpired(
            "the token's expiry has passed".into(),
        )),
    }
}

impl AgentAuth {
    pub fn new(reviewer: Arc<dyn TokenReviewer>, settings: Settings, index: Arc<Index>) -> Self {
        Self {
            reviewer,
            settings,
            index,
            cache: Mutex::new(Cache::default()),
        }
    }

    /// The nodes an agent may ask about, from its bearer token (if any) and the node
    /// identities of its certificate; `peer` is the client's address.
    pub async fn authenticate(
        &self,
        token: Option<&str>,
        certificate_nodes: Vec<String>,
        peer: Option<IpAddr>,
    ) -> Result<Proven, Refusal> {
        let Some(token) = token else {
            return match (
                certificate_nodes.is_empty(),
                self.settings.allow_unidentified,
            ) {
                (false, _) => Ok(Proven::Nodes(certificate_nodes)),
                (true, true) => Ok(Proven::AnyNode),
                (true, false) => Err(Refusal::AgentIdentityMissing),
            };
        };
        let node = self.node_of(token, peer).await?;
        // A certificate that names nodes must agree with the token.
        if !certificate_nodes.is_empty() && !certificate_nodes.contains(&node) {
            return Err(Refusal::AgentNodeMismatch {
                proven: node,
                asked: certificate_nodes.join(","),
            });
        }
        Ok(Proven::Nodes(vec![node]))
    }

    /// What is known about the token with this key now, if anything.
    fn known(&self, cache: &mut Cache, key: &[u8; 32]) -> Option<Outcome> {
        let now = Instant::now();
        if let Some(trusted) = cache.trusted.get(key) {
            // A token bound to a pod dies with it (the API server says so at the next
            // review): trusted only while the pod is in the index.
            let pod_gone = trusted
                .pod_uid
                .as_ref()
                .is_some_and(|uid| self.index.synced() && self.index.pod(uid).is_none());
            if now < trusted.until && !pod_gone {
                return Some(Ok(trusted.node.clone()));
            }
            cache.trusted.remove(key);
        }
        match cache.refused.get(key) {
            Some((refusal, until)) if now < *until => Some(Err(refusal.clone())),
            _ => None,
        }
    }

    /// The node `token` proves (cached, one review in flight per token, a bounded number
    /// of reviews overall and per client).
    async fn node_of(&self, token: &str, peer: Option<IpAddr>) -> Outcome {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let (flight, _slot) = {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(outcome) = self.known(&mut cache, &key) {
                return outcome;
            }
            match cache.reviewing.get(&key) {
                Some(flight) => (flight.clone(), None),
                None => {
                    precheck(&self.settings, token)?;
                    let total: usize = cache.in_flight.values().sum();
                    let mine = cache
                        .in_flight
                        .entry(peer.unwrap_or(IpAddr::from([0, 0, 0, 0])))
                        .or_default();
                    if total >= MAX_REVIEWS || *mine >= MAX_REVIEWS_PER_PEER {
                        return Err(Refusal::AgentTokenReviewUnavailable(
                            "too many token reviews in flight; retry".into(),
                        ));
                    }
                    *mine += 1;
                    let flight = self.review(token.to_owned()).boxed().shared();
                    cache.reviewing.insert(key, flight.clone());
                    (flight, Some(Slot(self, peer)))
                }
            }
        };
        let (outcome, until, pod_uid) = flight.await;
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.reviewing.remove(&key);
        let now = Instant::now();
        match (&outcome, until) {
            (Ok(node), Some(until)) => {
                if cache.trusted.len() >= MAX_TRUSTED {
                    cache.trusted.retain(|_, t| t.until > now);
                }
                if cache.trusted.len() < MAX_TRUSTED {
                    let node = node.clone();
                    cache.trusted.insert(
                        key,
                        Trusted {
                            node,
                            until,
                            pod_uid,
                        },
                    );
                }
            }
            (Err(refusal), Some(until)) => {
                if cache.refused.len() >= MAX_REFUSED {
                    cache.refused.clear();
                }
                cache.refused.insert(key, (refusal.clone(), until));
            }
            (_, None) => {}
        }
        outcome
    }

    /// Reviews `token`; the outcome, until when it holds (`None`: do not remember it), and
    /// the pod the token is bound to.
    fn review(&self, token: String) -> impl Future<Output = Reviewed> + use<> {
        let call = self
            .reviewer
            .review(token.clone(), self.settings.audience.clone());
        let (settings, index) = (self.settings.clone(), self.index.clone());
        async move {
            let answer = tokio::time::timeout(REVIEW_TIMEOUT, call)
                .await
                .unwrap_or_else(|_| Err(format!("no answer in {REVIEW_TIMEOUT:?}")));
            let review = match answer {
                Ok(review) => review,
                Err(error) => {
                    tracing::warn!(%error, "TokenReview failed");
                    return (Err(Refusal::AgentTokenReviewUnavailable(error)), None, None);
                }
            };
            let claims = claims(&token).unwrap_or_default();
            let refused = |refusal: Refusal| {
                tracing::info!(%refusal, "agent token refused");
                (Err(refusal), Some(Instant::now() + REFUSAL_TTL), None)
            };
            if let Err(refusal) = judge(&settings, &review, &claims) {
                return refused(refusal);
            }
            let node = match node_of_review(&review, &index) {
                Ok(node) => node,
                Err(refusal) => return refused(refusal),
            };
            // Trusted until shortly before the token expires.
            let left = claims["exp"]
                .as_i64()
                .map(|exp| Duration::from_secs(u64::try_from(exp - unix_now()).unwrap_or(0)))
                .unwrap_or(Duration::ZERO);
            let trust = left.saturating_sub(EXPIRY_MARGIN).min(MAX_TRUST);
            let pod_uid = review
                .extra
                .get(EXTRA_POD_UID)
                .and_then(|v| v.first())
                .cloned();
            tracing::debug!(node = %node, trust_s = trust.as_secs(), "agent token reviewed");
            (Ok(node), Some(Instant::now() + trust), pod_uid)
        }
    }
}

/// Checks an API server's review against what the server accepts; `claims` (unverified)
/// only explain a refusal.
pub fn judge(
    settings: &Settings,
    review: &Review,
    claims: &serde_json::Value,
) -> Result<(), Refusal> {
    let wrong_audience = |got: Vec<String>| Refusal::AgentTokenWrongAudience {
        want: settings.audience.clone(),
        got,
    };
    if !review.authenticated {
        let why = review
            .error
            .clone()
            .unwrap_or_else(|| "not authenticated".into());
        // The API server's message differs across versions; the token's own claims say
        // which of the usual causes it is.
        if claims["exp"].as_i64().is_some_and(|exp| exp <= unix_now()) {
            return Err(Refusal::AgentTokenExpired(why));
        }
        let audiences = audiences_of(claims);
        if !audiences.is_empty() && !audiences.contains(&settings.audience) {
            return Err(wrong_audience(audiences));
        }
        return Err(Refusal::AgentTokenInvalid(why));
    }
    if !review.audiences.contains(&settings.audience) {
        return Err(wrong_audience(review.audiences.clone()));
    }
    if review.username != settings.username() {
        return Err(Refusal::AgentTokenWrongServiceAccount {
            want: settings.username(),
            got: review.username.clone(),
        });
    }
    Ok(())
}

/// The node of an accepted review: its node-name extra, or the node of the pod it names.
pub fn node_of_review(review: &Review, index: &Index) -> Result<String, Refusal> {
    let first = |key: &str| review.extra.get(key).and_then(|v| v.first()).cloned();
    if let Some(node) = first(EXTRA_NODE_NAME).filter(|n| !n.is_empty()) {
        return Ok(node);
    }
    // Kubernetes before 1.30: the token names its pod; the pod names its node.
    let (Some(uid), Some(name)) = (first(EXTRA_POD_UID), first(EXTRA_POD_NAME)) else {
        return Err(Refusal::AgentTokenNoNode(
            "the token is not bound to a pod (use a projected service-account token)".into(),
        ));
    };
    let namespace = review
        .username
        .strip_prefix("system:serviceaccount:")
        .and_then(|rest| rest.split(':').next())
        .unwrap_or("");
    match index.pod(&uid) {
        Some(pod) if pod.name == name && pod.namespace == namespace => {
            pod.node.clone().ok_or_else(|| {
                Refusal::AgentTokenNoNode(format!("pod {namespace}/{name} is not scheduled"))
            })
        }
        _ => Err(Refusal::AgentTokenNoNode(format!(
            "the token's pod {namespace}/{name} ({uid}) is not in the index"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use kube::api::DynamicObject;

    use super::*;
    use crate::proto::Reason;

    fn settings() -> Settings {
        Settings {
            service_account: "kiam:kiam-agent".into(),
            audience: "kiam".into(),
            allow_unidentified: false,
        }
    }

    fn token(claims: serde_json::Value) -> String {
        format!(
            "e30.{}.sig",
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).expect("json"))
        )
    }

    /// A token whose claims are the agent's (the reviewer decides whether it is valid).
    fn agent_token(expires_in: i64) -> String {
        token(serde_json::json!({
            "exp": unix_now() + expires_in,
            "aud": ["kiam"],
            "sub": "system:serviceaccount:kiam:kiam-agent",
        }))
    }

    fn accepted(node: Option<&str>) -> Review {
        let mut extra = BTreeMap::new();
        if let Some(node) = node {
            extra.insert(EXTRA_NODE_NAME.to_owned(), vec![node.to_owned()]);
        }
        extra.insert(EXTRA_POD_NAME.to_owned(), vec!["kiam-agent-x".to_owned()]);
        extra.insert(EXTRA_POD_UID.to_owned(), vec!["agent-uid".to_owned()]);
        Review {
            authenticated: true,
            error: None,
            username: "system:serviceaccount:kiam:kiam-agent".into(),
            extra,
            audiences: vec!["kiam".into()],
        }
    }

    fn index_with_agent_pod(node: &str) -> Arc<Index> {
        let index = Index::new(Vec::new());
        let pod: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "kiam-agent-x", "namespace": "kiam", "uid": "agent-uid"},
            "spec": {"nodeName": node},
        }))
        .expect("pod");
        index.apply_pod(&pod);
        Arc::new(index)
    }

    #[test]
    fn reviews_are_judged_and_refusals_explained() {
        let s = settings();
        let future = serde_json::json!({"exp": unix_now() + 600, "aud": ["kiam"]});
        assert_eq!(judge(&s, &accepted(Some("n1")), &future), Ok(()));
        let reason = |review: &Review, claims: &serde_json::Value| {
            judge(&s, review, claims).expect_err("refused").reason()
        };
        let other_sa = Review {
            username: "system:serviceaccount:default:default".into(),
            ..accepted(Some("n1"))
        };
        assert_eq!(
            reason(&other_sa, &future),
            Reason::AgentTokenWrongServiceAccount
        );
        let no_audience = Review {
            audiences: Vec::new(),
            ..accepted(Some("n1"))
        };
        assert_eq!(
            reason(&no_audience, &future),
            Reason::AgentTokenWrongAudience
        );
        let refused = Review {
            authenticated: false,
            error: Some("invalid bearer token".into()),
            ..Review::default()
        };
        let expired = serde_json::json!({"exp": unix_now() - 5, "aud": ["kiam"]});
        assert_eq!(reason(&refused, &expired), Reason::AgentTokenExpired);
        let elsewhere = serde_json::json!({"exp": unix_now() + 600, "aud": ["vault"]});
        assert_eq!(
            reason(&refused, &elsewhere),
            Reason::AgentTokenWrongAudience
        );
        assert_eq!(reason(&refused, &future), Reason::AgentTokenInvalid);
        assert_eq!(
            reason(&refused, &serde_json::Value::Null),
            Reason::AgentTokenInvalid
        );
    }

    #[test]
    fn the_node_comes_from_the_review_or_the_bound_pod() {
        let index = index_with_agent_pod("n2");
        assert_eq!(
            node_of_review(&accepted(Some("n1")), &index),
            Ok("n1".into())
        );
        // Before Kubernetes 1.30: no node-name extra, the bound pod's node.
        assert_eq!(node_of_review(&accepted(None), &index), Ok("n2".into()));
        let unknown = Arc::new(Index::new(Vec::new()));
        assert_eq!(
            node_of_review(&accepted(None), &unknown)
                .expect_err("pod unknown")
                .reason(),
            Reason::AgentTokenNoNode
        );
        let unbound = Review {
            extra: BTreeMap::new(),
            ..accepted(None)
        };
        assert!(node_of_review(&unbound, &index).is_err());
    }

    /// Reviews every token as valid for node `n1`, counting calls.
    struct Counting(Arc<AtomicUsize>, Result<Review, String>);

    impl TokenReviewer for Counting {
        fn review(&self, _: String, _: String) -> BoxFuture<'static, Result<Review, String>> {
            self.0.fetch_add(1, Ordering::SeqCst);
            let answer = self.1.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                answer
            }
            .boxed()
        }
    }

    fn auth(answer: Result<Review, String>) -> (AgentAuth, Arc<AtomicUsize>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let reviewer = Arc::new(Counting(calls.clone(), answer));
        (
            AgentAuth::new(reviewer, settings(), index_with_agent_pod("n2")),
            calls,
        )
    }

    #[tokio::test(start_paused = true)]
    async fn one_review_per_token_until_shortly_before_it_expires() {
        let (auth, calls) = auth(Ok(accepted(Some("n1"))));
        let t = agent_token(600);
        let all = futures::future::join_all(
            (0..50).map(|_| auth.authenticate(Some(&t), Vec::new(), None)),
        )
        .await;
        assert!(
            all.iter()
                .all(|p| *p == Ok(Proven::Nodes(vec!["n1".into()])))
        );
        for _ in 0..1000 {
            auth.authenticate(Some(&t), Vec::new(), None)
                .await
                .expect("cached");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // Past the token's expiry (less the margin), it is asked again.
        tokio::time::advance(Duration::from_secs(571)).await;
        auth.authenticate(Some(&t), Vec::new(), None)
            .await
            .expect("again");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        // A rotated token is a new one.
        let rotated = agent_token(601);
        auth.authenticate(Some(&rotated), Vec::new(), None)
            .await
            .expect("rotated");
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn failed_reviews_are_refused_and_not_remembered() {
        let (auth, calls) = auth(Err("connection refused".into()));
        let t = agent_token(600);
        for _ in 0..3 {
            let refusal = auth
                .authenticate(Some(&t), Vec::new(), None)
                .await
                .expect_err("unavailable");
            assert_eq!(refusal.reason(), Reason::AgentTokenReviewUnavailable);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 3, "asked again each time");
    }

    #[tokio::test(start_paused = true)]
    async fn certificates_and_the_opt_out() {
        let (auth, _) = auth(Ok(accepted(Some("n1"))));
        assert_eq!(
            auth.authenticate(None, vec!["n3".into()], None).await,
            Ok(Proven::Nodes(vec!["n3".into()]))
        );
        assert_eq!(
            auth.authenticate(None, Vec::new(), None)
                .await
                .expect_err("nothing")
                .reason(),
            Reason::AgentIdentityMissing
        );
        // A token and a certificate must agree.
        let t = agent_token(600);
        assert_eq!(
            auth.authenticate(Some(&t), vec!["n3".into()], None)
                .await
                .expect_err("disagree")
                .reason(),
            Reason::AgentNodeMismatch
        );
        let mut open = auth;
        open.settings.allow_unidentified = true;
        assert_eq!(
            open.authenticate(None, Vec::new(), None).await,
            Ok(Proven::AnyNode)
        );
        assert_eq!(Proven::AnyNode.check("anything"), Ok(()));
        assert_eq!(
            Proven::Nodes(vec!["a".into()])
                .check("b")
                .expect_err("b")
                .reason(),
            Reason::AgentNodeMismatch
        );
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_that_cannot_be_the_agents_cost_no_review() {
        let (auth, calls) = auth(Ok(accepted(Some("n1"))));
        let forged = |claims: serde_json::Value| token(claims);
        for (t, reason) in [
            ("not a token".to_owned(), Reason::AgentTokenInvalid),
            (
                forged(
                    serde_json::json!({"exp": unix_now() + 600, "aud": ["vault"],
                    "sub": "system:serviceaccount:kiam:kiam-agent"}),
                ),
                Reason::AgentTokenWrongAudience,
            ),
            (
                forged(serde_json::json!({"exp": unix_now() + 600, "aud": ["kiam"],
                    "sub": "system:serviceaccount:team:app"})),
                Reason::AgentTokenWrongServiceAccount,
            ),
            (agent_token(-5), Reason::AgentTokenExpired),
        ] {
            let refusal = auth
                .authenticate(Some(&t), Vec::new(), None)
                .await
                .expect_err("refused");
            assert_eq!(refusal.reason(), reason, "{t}");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 0, "no review for any of them");
    }

    #[tokio::test(start_paused = true)]
    async fn a_flood_of_tokens_never_pushes_out_an_agents_review_nor_exceeds_the_bounds() {
        let refused = Review {
            authenticated: false,
            error: Some("invalid bearer token".into()),
            ..Review::default()
        };
        // The API server accepts one token (the agent's) and refuses the rest.
        struct OneValid(Arc<AtomicUsize>, Arc<AtomicUsize>, String, Review);
        impl TokenReviewer for OneValid {
            fn review(
                &self,
                token: String,
                _: String,
            ) -> BoxFuture<'static, Result<Review, String>> {
                self.0.fetch_add(1, Ordering::SeqCst);
                let now = self.1.fetch_add(1, Ordering::SeqCst) + 1;
                let in_flight = self.1.clone();
                let answer = match token == self.2 {
                    true => Ok(accepted(Some("n1"))),
                    false => Ok(self.3.clone()),
                };
                async move {
                    assert!(now <= MAX_REVIEWS, "{now} reviews in flight");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                    answer
                }
                .boxed()
            }
        }
        let calls = Arc::new(AtomicUsize::new(0));
        let legit = agent_token(3600);
        let reviewer = OneValid(calls.clone(), Arc::default(), legit.clone(), refused);
        let auth = AgentAuth::new(Arc::new(reviewer), settings(), index_with_agent_pod("n2"));
        let agent: Option<IpAddr> = Some([10, 0, 0, 1].into());
        assert!(
            auth.authenticate(Some(&legit), Vec::new(), agent)
                .await
                .is_ok()
        );
        // Thousands of forged tokens with the agent's claims, from a few addresses at once.
        let attackers: Vec<IpAddr> = (2..6).map(|i| IpAddr::from([10, 0, 0, i])).collect();
        for round in 0..50 {
            let forged: Vec<String> = (0..200)
                .map(|i| format!("{}x{round}x{i}", agent_token(3600)))
                .collect();
            let flood = forged.iter().enumerate().map(|(i, t)| {
                auth.authenticate(Some(t), Vec::new(), Some(attackers[i % attackers.len()]))
            });
            let answers = futures::future::join_all(flood).await;
            assert!(answers.iter().all(Result::is_err));
            // The agent is answered from its cached review throughout.
            assert_eq!(
                auth.authenticate(Some(&legit), Vec::new(), agent).await,
                Ok(Proven::Nodes(vec!["n1".into()]))
            );
        }
        // At most two reviews in flight per attacking address at any time.
        assert!(
            calls.load(Ordering::SeqCst) <= 1 + 50 * attackers.len() * MAX_REVIEWS_PER_PEER,
            "{} reviews",
            calls.load(Ordering::SeqCst)
        );
        assert_eq!(auth.cache.lock().expect("lock").trusted.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_review_bound_to_a_pod_is_trusted_only_while_the_pod_exists() {
        let (auth, calls) = auth(Ok(accepted(None)));
        auth.index.replace_namespaces(Vec::new());
        let t = agent_token(3600);
        assert!(auth.authenticate(Some(&t), Vec::new(), None).await.is_ok());
        assert!(auth.authenticate(Some(&t), Vec::new(), None).await.is_ok());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // The agent's pod is deleted (its node name may come back as another machine).
        auth.index.replace_pods(Vec::new());
        let _ = auth.authenticate(Some(&t), Vec::new(), None).await;
        assert_eq!(calls.load(Ordering::SeqCst), 2, "reviewed again");
    }
}
