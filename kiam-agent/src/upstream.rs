//! What the agent knows about pods' roles and credentials, asked from the servers and cached
//! per pod UID, so a request for credentials the agent holds needs no gRPC, and a server
//! outage or roll-out is invisible to pods while the held credentials stay valid.
//!
//! - Entries are keyed by pod UID (never shared between pods) and credentials are only served
//!   with at least the minimum validity left.
//! - A pod's answer (its role, or the node's metadata service) is trusted for `--role-ttl`,
//!   then asked again; while no server answers, the last answer stands for as long as the pod
//!   exists (its cgroup), so held credentials keep being served through an outage.
//! - Definite refusals (no annotation, forbidden, …) are remembered for `--refusal-ttl`, so a
//!   pod without a role cannot make every one of its requests cost the servers a call. "Not
//!   known yet" is never remembered: the pod is about to be.
//! - Credentials are refreshed in the background once they have less than the minimum
//!   validity plus 10 minutes left, at most once every 30 s per pod.
//!
//! The servers and the wall clock are behind narrow traits ([`RoleServer`], [`Clock`]) so the
//! cache logic is unit-tested with fakes and tokio's paused time.

use std::{
    collections::HashMap,
    sync::{Arc, OnceLock, RwLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures::future::BoxFuture;
use hyper::body::Bytes;
use kiam_proto::{
    Credentials as ProtoCredentials, GetCredentialsRequest, GetPodRoleRequest, GetPodRoleResponse,
    Reason, reason_of,
};
use tokio::time::Instant;
use tonic::{Code, Status};

/// The kiam servers, as the cache sees them.
pub trait RoleServer: Send + Sync + 'static {
    fn pod_role(
        &self,
        request: GetPodRoleRequest,
        deadline: Instant,
    ) -> BoxFuture<'static, Result<GetPodRoleResponse, Status>>;
    fn credentials(
        &self,
        request: GetCredentialsRequest,
        deadline: Instant,
    ) -> BoxFuture<'static, Result<ProtoCredentials, Status>>;
}

/// Wall-clock time, in Unix seconds (credential expiry is absolute).
pub trait Clock: Send + Sync + 'static {
    fn now_unix(&self) -> i64;
}

/// The system clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_unix(&self) -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Role {
    /// Listed under `iam/security-credentials/`.
    pub name: String,
    pub arn: String,
}

/// What a pod may have.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Access {
    Role(Arc<Role>),
    /// The node's own metadata service, verbatim (the operator's pass-through policy).
    PassThrough,
}

pub struct Creds {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: String,
    pub expiration_unix: i64,
    pub last_updated_unix: i64,
    /// The rendered metadata document, made once per credentials by the API.
    pub document: OnceLock<Bytes>,
}

// Never print secrets, at any log level.
impl std::fmt::Debug for Creds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Creds")
            .field("access_key_id", &self.access_key_id)
            .field("expiration_unix", &self.expiration_unix)
            .finish_non_exhaustive()
    }
}

pub struct Settings {
    pub node: String,
    /// Per-request deadline: below botocore's default 1 s metadata timeout.
    pub deadline: Duration,
    pub min_validity: Duration,
    /// How long a pod's answer is trusted before asking again (annotation changes apply
    /// after at most this long).
    pub role_ttl: Duration,
    /// How long a definite refusal is remembered.
    pub refusal_ttl: Duration,
}

enum Outcome {
    Access(Access),
    Refused(Status),
}

struct Entry {
    outcome: Outcome,
    fetched: Instant,
}

type CredsKey = (String, String);

pub struct Upstream {
    servers: Option<Arc<dyn RoleServer>>,
    clock: Arc<dyn Clock>,
    settings: Settings,
    roles: RwLock<HashMap<String, Entry>>,
    /// By pod UID: the role ARN they are for (names repeat across paths and accounts) and
    /// the credentials. A pod has one role at a time.
    creds: RwLock<HashMap<String, (String, Arc<Creds>)>>,
    /// Background refreshes started, by key: at most one every `REFRESH_SPACING`.
    refreshing: std::sync::Mutex<HashMap<CredsKey, Instant>>,
}

/// Minimum time between two background refreshes of one pod's credentials.
const REFRESH_SPACING: Duration = Duration::from_secs(30);
/// Credentials are refreshed once they have less than the minimum validity plus this left.
const REFRESH_MARGIN: Duration = Duration::from_secs(600);

/// No server answered: held answers stand.
fn unavailable_or_late(status: &Status) -> bool {
    matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded)
}

/// A refusal worth remembering: the servers looked at the pod and said no.
fn definite(status: &Status) -> bool {
    !unavailable_or_late(status) && reason_of(status) != Reason::PodNotKnown
}

impl Upstream {
    pub fn new(
        servers: Option<Arc<dyn RoleServer>>,
        clock: Arc<dyn Clock>,
        settings: Settings,
    ) -> Arc<Self> {
        Arc::new(Self {
            servers,
            clock,
            settings,
            roles: RwLock::new(HashMap::new()),
            creds: RwLock::new(HashMap::new()),
            refreshing: std::sync::Mutex::new(HashMap::new()),
        })
    }

    /// When a metadata request starting now must be answered (one deadline for all the calls
    /// a request makes).
    pub fn deadline(&self) -> Instant {
        Instant::now() + self.settings.deadline
    }

    fn servers(&self) -> Result<&Arc<dyn RoleServer>, Status> {
        self.servers
            .as_ref()
            .ok_or_else(|| Status::unavailable("this agent has no --server configured"))
    }

    fn remaining(&self, creds: &Creds) -> Duration {
        Duration::from_secs(
            u64::try_from(creds.expiration_unix - self.clock.now_unix()).unwrap_or(0),
        )
    }

    /// What the pod may have; a cached answer while fresh, or while no server answers.
    pub async fn access(&self, pod_uid: &str, deadline: Instant) -> Result<Access, Status> {
        let cached = {
            let roles = self.roles.read().unwrap_or_else(|e| e.into_inner());
            roles.get(pod_uid).map(|e| match &e.outcome {
                Outcome::Access(access) => (
                    Ok(access.clone()),
                    e.fetched.elapsed() < self.settings.role_ttl,
                ),
                Outcome::Refused(status) => (
                    Err(status.clone()),
                    e.fetched.elapsed() < self.settings.refusal_ttl,
                ),
            })
        };
        if let Some((answer, true)) = &cached {
            return answer.clone();
        }
        let request = GetPodRoleRequest {
            pod_uid: pod_uid.to_owned(),
            node_name: self.settings.node.clone(),
        };
        let answer = self.servers()?.pod_role(request, deadline).await;
        let previous = match cached {
            Some((Ok(access), _)) => Some(access),
            _ => None,
        };
        match answer {
            Ok(answer) => {
                let access = match answer.node_metadata_passthrough {
                    true => Access::PassThrough,
                    false => Access::Role(Arc::new(Role {
                        name: answer.role_name,
                        arn: answer.role_arn,
                    })),
                };
                if previous.as_ref().is_some_and(|old| *old != access) {
                    // The annotation changed: nothing held for the old role may be served.
                    self.forget_creds(pod_uid);
                }
                self.remember(pod_uid, Outcome::Access(access.clone()));
                Ok(access)
            }
            Err(status) if unavailable_or_late(&status) => previous.ok_or(status),
            Err(status) => {
                // The servers said no (deleted, forbidden, no annotation): nothing held for
                // this pod may be served any more.
                self.forget_creds(pod_uid);
                match definite(&status) {
                    true => self.remember(pod_uid, Outcome::Refused(status.clone())),
                    false => self.forget_role(pod_uid),
                }
                Err(status)
            }
        }
    }

    fn remember(&self, pod_uid: &str, outcome: Outcome) {
        let entry = Entry {
            outcome,
            fetched: Instant::now(),
        };
        self.roles
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(pod_uid.to_owned(), entry);
    }

    fn forget_role(&self, pod_uid: &str) {
        self.roles
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(pod_uid);
    }

    fn forget_creds(&self, pod_uid: &str) {
        self.creds
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(pod_uid);
    }

    fn cached_creds(&self, pod_uid: &str, arn: &str) -> Option<Arc<Creds>> {
        let creds = self.creds.read().unwrap_or_else(|e| e.into_inner());
        match creds.get(pod_uid) {
            Some((for_arn, creds)) if for_arn == arn => Some(creds.clone()),
            _ => None,
        }
    }

    async fn fetch(
        &self,
        pod_uid: &str,
        role: &Role,
        deadline: Instant,
    ) -> Result<Arc<Creds>, Status> {
        let request = GetCredentialsRequest {
            pod_uid: pod_uid.to_owned(),
            node_name: self.settings.node.clone(),
            role_name: role.name.clone(),
        };
        let answer = self.servers()?.credentials(request, deadline).await?;
        if answer.role_arn != role.arn {
            // The pod's role changed between the two calls: the next request starts over.
            self.forget_creds(pod_uid);
            self.forget_role(pod_uid);
            return Err(Status::unavailable(format!(
                "the pod's role changed to {} while asking; retry",
                answer.role_arn
            )));
        }
        let creds = Arc::new(Creds {
            access_key_id: answer.access_key_id,
            secret_access_key: answer.secret_access_key,
            session_token: answer.session_token,
            expiration_unix: answer.expiration_unix,
            last_updated_unix: answer.last_updated_unix,
            document: OnceLock::new(),
        });
        self.creds
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(pod_uid.to_owned(), (role.arn.clone(), creds.clone()));
        Ok(creds)
    }

    /// Claims the one background refresh allowed for `key` now.
    fn claim_refresh(&self, key: &CredsKey) -> bool {
        let mut refreshing = self.refreshing.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        refreshing.retain(|_, at| now.duration_since(*at) < REFRESH_SPACING);
        match refreshing.contains_key(key) {
            true => false,
            false => {
                refreshing.insert(key.clone(), now);
                true
            }
        }
    }

    /// Credentials for the pod's role `current` (from [`Self::access`]), with at least the
    /// minimum validity left.
    pub async fn credentials(
        self: &Arc<Self>,
        pod_uid: &str,
        current: &Role,
        deadline: Instant,
    ) -> Result<Arc<Creds>, Status> {
        if let Some(creds) = self.cached_creds(pod_uid, &current.arn) {
            let left = self.remaining(&creds);
            if left >= self.settings.min_validity + REFRESH_MARGIN {
                return Ok(creds);
            }
            if left >= self.settings.min_validity {
                if self.claim_refresh(&(pod_uid.to_owned(), current.arn.clone())) {
                    let (this, uid, role) = (self.clone(), pod_uid.to_owned(), current.clone());
                    tokio::spawn(async move {
                        let deadline = this.deadline();
                        if let Err(status) = this.fetch(&uid, &role, deadline).await {
                            tracing::warn!(pod_uid = %uid, role = %role.arn, error = %status.message(), "background refresh failed");
                        }
                    });
                }
                return Ok(creds);
            }
        }
        let creds = self.fetch(pod_uid, current, deadline).await?;
        match self.remaining(&creds) {
            left if left >= self.settings.min_validity => Ok(creds),
            left => Err(Status::unavailable(format!(
                "the servers' credentials have only {}s left",
                left.as_secs()
            ))),
        }
    }

    /// Drops what can no longer be served: credentials below the minimum validity, and
    /// everything about pods that no longer run on this node (`alive` says which do).
    pub fn prune(&self, alive: impl Fn(&str) -> bool) {
        let min = self.settings.min_validity;
        self.creds
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|uid, (_, c)| alive(uid) && self.remaining(c) >= min);
        let refusal_ttl = self.settings.refusal_ttl;
        self.roles
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|uid, e| match e.outcome {
                Outcome::Access(_) => alive(uid),
                Outcome::Refused(_) => e.fetched.elapsed() < refusal_ttl,
            });
    }

    /// Pod UIDs the cache holds anything for.
    #[cfg(test)]
    fn pods(&self) -> std::collections::HashSet<String> {
        let roles = self.roles.read().unwrap_or_else(|e| e.into_inner());
        roles.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Mutex,
        atomic::{AtomicI64, AtomicUsize, Ordering},
    };

    use futures::FutureExt as _;
    use kiam_proto::Refusal;

    use super::*;

    /// A clock the test moves.
    struct ManualClock(AtomicI64);

    impl Clock for ManualClock {
        fn now_unix(&self) -> i64 {
            self.0.load(Ordering::SeqCst)
        }
    }

    const START: i64 = 1_700_000_000;

    /// Servers whose answers the test sets; counts calls.
    #[derive(Default)]
    struct FakeServers {
        role: Mutex<Option<Result<GetPodRoleResponse, Status>>>,
        creds: Mutex<Option<Result<ProtoCredentials, Status>>>,
        role_calls: AtomicUsize,
        creds_calls: AtomicUsize,
    }

    impl FakeServers {
        fn answer_role(&self, answer: Result<GetPodRoleResponse, Status>) {
            *self.role.lock().expect("lock") = Some(answer);
        }
        fn answer_creds(&self, answer: Result<ProtoCredentials, Status>) {
            *self.creds.lock().expect("lock") = Some(answer);
        }
        fn calls(&self) -> (usize, usize) {
            (
                self.role_calls.load(Ordering::SeqCst),
                self.creds_calls.load(Ordering::SeqCst),
            )
        }
    }

    struct Shared(Arc<FakeServers>);

    impl RoleServer for Shared {
        fn pod_role(
            &self,
            _: GetPodRoleRequest,
            _: Instant,
        ) -> BoxFuture<'static, Result<GetPodRoleResponse, Status>> {
            self.0.role_calls.fetch_add(1, Ordering::SeqCst);
            let answer = self.0.role.lock().expect("lock").clone();
            async move { answer.unwrap_or_else(|| Err(Status::unavailable("down"))) }.boxed()
        }
        fn credentials(
            &self,
            _: GetCredentialsRequest,
            _: Instant,
        ) -> BoxFuture<'static, Result<ProtoCredentials, Status>> {
            self.0.creds_calls.fetch_add(1, Ordering::SeqCst);
            let answer = self.0.creds.lock().expect("lock").clone();
            async move { answer.unwrap_or_else(|| Err(Status::unavailable("down"))) }.boxed()
        }
    }

    fn role_answer(name: &str) -> GetPodRoleResponse {
        GetPodRoleResponse {
            role_name: name.into(),
            role_arn: format!("arn:aws:iam::123456789012:role/{name}"),
            ..GetPodRoleResponse::default()
        }
    }

    fn creds_answer(name: &str, expires_in: i64, now: i64) -> ProtoCredentials {
        ProtoCredentials {
            access_key_id: format!("ASIA{now}"),
            secret_access_key: "secret".into(),
            session_token: "token".into(),
            expiration_unix: now + expires_in,
            last_updated_unix: now,
            role_arn: format!("arn:aws:iam::123456789012:role/{name}"),
        }
    }

    fn refusal(code: Code, reason: Reason) -> Status {
        Refusal {
            reason: reason.into(),
            message: format!("{reason:?}"),
        }
        .into_status(code)
    }

    struct Fixture {
        servers: Arc<FakeServers>,
        clock: Arc<ManualClock>,
        upstream: Arc<Upstream>,
    }

    fn fixture() -> Fixture {
        let servers = Arc::new(FakeServers::default());
        let clock = Arc::new(ManualClock(AtomicI64::new(START)));
        let upstream = Upstream::new(
            Some(Arc::new(Shared(servers.clone()))),
            clock.clone(),
            Settings {
                node: "node-1".into(),
                deadline: Duration::from_millis(900),
                min_validity: Duration::from_secs(1800),
                role_ttl: Duration::from_secs(10),
                refusal_ttl: Duration::from_secs(2),
            },
        );
        Fixture {
            servers,
            clock,
            upstream,
        }
    }

    impl Fixture {
        fn advance_wall(&self, secs: i64) {
            self.clock.0.fetch_add(secs, Ordering::SeqCst);
        }
        fn now(&self) -> i64 {
            self.clock.now_unix()
        }
        async fn role(&self) -> Result<Access, Status> {
            self.upstream.access("pod", self.upstream.deadline()).await
        }
        async fn creds(&self, role: &str) -> Result<Arc<Creds>, Status> {
            let role = Role {
                name: role.into(),
                arn: format!("arn:aws:iam::123456789012:role/{role}"),
            };
            self.upstream
                .credentials("pod", &role, self.upstream.deadline())
                .await
        }
    }

    #[tokio::test(start_paused = true)]
    async fn answers_are_trusted_for_the_role_ttl_then_asked_again() {
        let f = fixture();
        f.servers.answer_role(Ok(role_answer("app")));
        assert!(matches!(f.role().await, Ok(Access::Role(r)) if r.name == "app"));
        assert!(f.role().await.is_ok());
        assert_eq!(f.servers.calls().0, 1);
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(f.role().await.is_ok());
        assert_eq!(f.servers.calls().0, 2);
        // Pass-through answers are cached the same way.
        let f = fixture();
        f.servers.answer_role(Ok(GetPodRoleResponse {
            node_metadata_passthrough: true,
            ..GetPodRoleResponse::default()
        }));
        assert_eq!(f.role().await.ok(), Some(Access::PassThrough));
        assert_eq!(f.role().await.ok(), Some(Access::PassThrough));
        assert_eq!(f.servers.calls().0, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn definite_refusals_are_remembered_briefly_not_known_never() {
        let f = fixture();
        f.servers.answer_role(Err(refusal(
            Code::PermissionDenied,
            Reason::RoleNotPermitted,
        )));
        for _ in 0..5 {
            assert_eq!(
                f.role().await.expect_err("refused").code(),
                Code::PermissionDenied
            );
        }
        assert_eq!(f.servers.calls().0, 1, "refusal answered from the cache");
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!(f.role().await.is_err());
        assert_eq!(f.servers.calls().0, 2);

        let f = fixture();
        f.servers
            .answer_role(Err(refusal(Code::NotFound, Reason::PodNotKnown)));
        assert!(f.role().await.is_err());
        f.servers.answer_role(Ok(role_answer("app")));
        assert!(f.role().await.is_ok(), "the pod became known");
        assert_eq!(f.servers.calls().0, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn an_outage_serves_held_credentials_until_min_validity() {
        let f = fixture();
        f.servers.answer_role(Ok(role_answer("app")));
        f.servers
            .answer_creds(Ok(creds_answer("app", 3600, f.now())));
        assert!(f.role().await.is_ok());
        let held = f.creds("app").await.expect("fetched");
        // Every server gone, for far longer than the role TTL (an hour of outage would have
        // pruned the entry before).
        *f.servers.role.lock().expect("lock") = None;
        *f.servers.creds.lock().expect("lock") = None;
        for _ in 0..20 {
            tokio::time::advance(Duration::from_secs(60)).await;
            f.upstream.prune(|_| true);
        }
        f.advance_wall(20 * 60);
        assert!(
            matches!(f.role().await, Ok(Access::Role(r)) if r.name == "app"),
            "the last answer stands while no server answers"
        );
        let again = f.creds("app").await.expect("held credentials");
        assert_eq!(again.access_key_id, held.access_key_id);
        // Below the minimum validity nothing is served.
        f.advance_wall(20 * 60);
        f.upstream.prune(|_| true);
        assert_eq!(
            f.creds("app").await.expect_err("too old").code(),
            Code::Unavailable
        );
        // A pod that is gone is forgotten even while its credentials are valid.
        let f = fixture();
        f.servers.answer_role(Ok(role_answer("app")));
        f.servers
            .answer_creds(Ok(creds_answer("app", 3600, f.now())));
        assert!(f.role().await.is_ok());
        assert!(f.creds("app").await.is_ok());
        f.upstream.prune(|uid| uid != "pod");
        assert!(f.upstream.pods().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn credentials_are_refreshed_ahead_in_the_background() {
        let f = fixture();
        f.servers.answer_role(Ok(role_answer("app")));
        f.servers
            .answer_creds(Ok(creds_answer("app", 3600, f.now())));
        let first = f.creds("app").await.expect("fetched");
        // 45 minutes left: above min validity + 10 minutes, no refresh.
        f.advance_wall(15 * 60);
        assert!(f.creds("app").await.is_ok());
        assert_eq!(f.servers.calls().1, 1);
        // 35 minutes left: served at once, refreshed in the background, once.
        f.advance_wall(10 * 60);
        f.servers
            .answer_creds(Ok(creds_answer("app", 3600, f.now())));
        let served = f.creds("app").await.expect("served");
        assert_eq!(served.access_key_id, first.access_key_id);
        assert!(f.creds("app").await.is_ok());
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(f.servers.calls().1, 2, "one background refresh");
        let fresh = f.creds("app").await.expect("refreshed");
        assert_ne!(fresh.access_key_id, first.access_key_id);
        // Expired or too short credentials from the servers are never served.
        let f = fixture();
        f.servers
            .answer_creds(Ok(creds_answer("app", 600, f.now())));
        assert_eq!(
            f.creds("app").await.expect_err("too short").code(),
            Code::Unavailable
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_changed_role_drops_what_was_held_for_the_old_one() {
        let f = fixture();
        f.servers.answer_role(Ok(role_answer("app")));
        f.servers
            .answer_creds(Ok(creds_answer("app", 3600, f.now())));
        assert!(f.role().await.is_ok());
        assert!(f.creds("app").await.is_ok());
        f.servers.answer_role(Ok(role_answer("other")));
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(matches!(f.role().await, Ok(Access::Role(r)) if r.name == "other"));
        assert!(f.upstream.creds.read().expect("lock").is_empty());
        // A refusal drops the pod's credentials too.
        f.servers
            .answer_creds(Ok(creds_answer("other", 3600, f.now())));
        assert!(f.creds("other").await.is_ok());
        f.servers
            .answer_role(Err(refusal(Code::NotFound, Reason::NoRoleAnnotation)));
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(f.role().await.is_err());
        assert!(f.upstream.creds.read().expect("lock").is_empty());
    }
}
