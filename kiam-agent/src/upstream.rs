//! What the agent knows about pods' roles and credentials, asked from the servers and cached
//! per caller (pod and container), so a request for credentials the agent holds needs no
//! gRPC, and a server outage or roll-out is invisible to pods while the held credentials stay
//! valid.
//!
//! - Entries are keyed by the caller's subject, `<pod uid>/<container id>` (or the pod UID
//!   alone for a caller in no container; [`crate::identity::PodCgroup::subject`]): never
//!   shared between pods, nor between containers, whose roles may differ. Credentials are
//!   only served with at least the minimum validity left.
//! - A pod's answer (its role, or the node's metadata service) is trusted for `--role-ttl`,
//!   then asked again. A request that finds its pod's answer past that waits at most
//!   `--refresh-wait` for the servers' fresh one, and not at all while the servers are known
//!   to be unreachable: the held answer is served and the servers' answer replaces it when it
//!   comes. While no server answers, the last answer stands for as long as the pod exists
//!   (its cgroup), so held answers and credentials keep being served through an outage at
//!   once, never after a deadline.
//! - Only what a server says about the pod replaces a held answer (a refusal carrying one of
//!   the pod's reasons); a transport error, a timeout or a server that cannot answer never
//!   does.
//! - Definite refusals (no annotation, forbidden, …) are remembered for `--refusal-ttl`, so a
//!   pod without a role cannot make every one of its requests cost the servers a call. "Not
//!   known yet" is never remembered: the pod is about to be.
//! - One call to the servers per pod at a time: concurrent requests of one pod share it.
//! - Credentials are refreshed in the background once they have less than the minimum
//!   validity plus 10 minutes left, at most once every 30 s per pod.
//!
//! The servers and the wall clock are behind narrow traits ([`RoleServer`], [`Clock`]) so the
//! cache logic is unit-tested with fakes and tokio's paused time.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, OnceLock, RwLock},
    time::Duration,
};

use futures::{
    FutureExt as _,
    future::{BoxFuture, Shared},
};
use hyper::body::Bytes;
use kiam_proto::{
    Credentials as ProtoCredentials, GetCredentialsRequest, GetPodRoleRequest, GetPodRoleResponse,
    Reason, reason_of,
};
use tokio::time::Instant;
use tonic::Status;

use crate::identity::split_subject;

/// The kiam servers, as the cache sees them.
pub trait RoleServer: Send + Sync + 'static {
    /// `known_before`: the agent holds an answer for the pod, so "not known" means deleted
    /// and is final; otherwise it is retried until the deadline (a pod the watches are about
    /// to deliver).
    fn pod_role(
        &self,
        request: GetPodRoleRequest,
        deadline: Instant,
        known_before: bool,
    ) -> BoxFuture<'static, Result<GetPodRoleResponse, Status>>;
    fn credentials(
        &self,
        request: GetCredentialsRequest,
        deadline: Instant,
    ) -> BoxFuture<'static, Result<ProtoCredentials, Status>>;
    /// Whether any server is believed to answer now (the last call or health check got an
    /// answer). While not, requests with held answers do not wait for them.
    fn answering(&self) -> bool {
        true
    }
}

/// Wall-clock time, in Unix seconds (credential expiry is absolute).
pub trait Clock: Send + Sync + 'static {
    fn now_unix(&self) -> i64;
}

/// The system clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_unix(&self) -> i64 {
        kiam_ops::unix_now()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Role {
    /// Listed under `iam/security-credentials/`.
    pub name: String,
    pub arn: String,
    /// The caller's container, when the role is that container's own (per-container roles)
    /// rather than the pod's.
    pub container: Option<String>,
}

impl Role {
    /// `container` for a container's own role, `pod` for the pod's.
    pub fn scope(&self) -> &'static str {
        match self.container {
            Some(_) => "container",
            None => "pod",
        }
    }
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

#[derive(Debug, Clone)]
pub struct Settings {
    pub node: String,
    /// Per-request deadline: below botocore's default 1 s metadata timeout.
    pub deadline: Duration,
    pub min_validity: Duration,
    /// How long a pod's answer is trusted before asking again (annotation changes apply
    /// after at most this long, while the servers answer).
    pub role_ttl: Duration,
    /// How long a definite refusal is remembered.
    pub refusal_ttl: Duration,
    /// How long a request whose pod has a held answer past `role_ttl` waits for the
    /// servers' fresh one before the held one is served.
    pub refresh_wait: Duration,
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
/// One call to the servers, shared by every request waiting for it.
type Flight<T> = Shared<BoxFuture<'static, Result<T, Status>>>;

pub struct Upstream {
    servers: Option<Arc<dyn RoleServer>>,
    clock: Arc<dyn Clock>,
    settings: Settings,
    roles: RwLock<HashMap<String, Entry>>,
    /// By pod UID: the role ARN they are for (names repeat across paths and accounts) and
    /// the credentials. A pod has one role at a time.
    creds: RwLock<HashMap<String, (String, Arc<Creds>)>>,
    /// Background refreshes started, by key: at most one every `REFRESH_SPACING`.
    refreshing: Mutex<HashMap<CredsKey, Instant>>,
    /// Calls to the servers in flight, by pod (roles) and by pod and role (credentials).
    role_flights: Mutex<HashMap<String, Flight<Access>>>,
    creds_flights: Mutex<HashMap<CredsKey, Flight<Arc<Creds>>>>,
}

/// Minimum time between two background refreshes of one pod's credentials.
const REFRESH_SPACING: Duration = Duration::from_secs(30);
/// Credentials are refreshed once they have less than the minimum validity plus this left.
const REFRESH_MARGIN: Duration = Duration::from_secs(600);

/// Whether a server's error is an answer about the pod (it looked at the pod and said no, or
/// does not know it): only those replace what is held. Everything else (transport errors,
/// timeouts, a server not synced, STS trouble, the agent's own identity refused) says nothing
/// about the pod, and held answers stand.
fn about_the_pod(status: &Status) -> bool {
    match reason_of(status) {
        Reason::BadRequest
        | Reason::PodNotKnown
        | Reason::PodOnOtherNode
        | Reason::PodCompleted
        | Reason::MirrorPod
        | Reason::NoRoleAnnotation
        | Reason::RoleInvalid
        | Reason::RoleNotPermitted
        | Reason::NamespaceRuleInvalid
        | Reason::OtherRole
        | Reason::NodeMetadataPassthrough
        | Reason::TooManySessions
        | Reason::ContainerNotKnown
        | Reason::ContainerNoRole
        | Reason::ContainerRolesInvalid => true,
        Reason::Unspecified
        | Reason::IndexNotSynced
        | Reason::AgentIdentityMissing
        | Reason::AgentNodeMismatch
        | Reason::AgentTokenInvalid
        | Reason::AgentTokenExpired
        | Reason::AgentTokenWrongAudience
        | Reason::AgentTokenWrongServiceAccount
        | Reason::AgentTokenReviewUnavailable
        | Reason::AgentTokenNoNode
        | Reason::StsDenied
        | Reason::StsUnavailable
        | Reason::StsInvalid => false,
    }
}

/// A refusal worth remembering: the servers looked at the pod and said no.
fn definite(status: &Status) -> bool {
    about_the_pod(status)
        && !matches!(
            reason_of(status),
            Reason::PodNotKnown | Reason::ContainerNotKnown
        )
}

/// How much earlier than the request's deadline a call to the servers ends.
const CALL_MARGIN: Duration = Duration::from_millis(25);

/// Waits for `flight` until `until`; the call itself goes on in the background.
async fn wait<T: Clone>(flight: Flight<T>, until: Instant) -> Option<Result<T, Status>> {
    tokio::time::timeout_at(until, flight).await.ok()
}

fn late() -> Status {
    Status::deadline_exceeded("no kiam server answered in time")
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
            refreshing: Mutex::new(HashMap::new()),
            role_flights: Mutex::new(HashMap::new()),
            creds_flights: Mutex::new(HashMap::new()),
        })
    }

    /// When a metadata request starting now must be answered (one deadline for all the calls
    /// a request makes).
    pub fn deadline(&self) -> Instant {
        Instant::now() + self.settings.deadline
    }

    /// Where a call to the servers, started now, gives up: [`CALL_MARGIN`] before the
    /// deadline of the request that started it, so the servers' last word ("not known yet",
    /// a refusal) reaches that request rather than a bare timeout.
    fn call_deadline(&self) -> Instant {
        self.deadline() - CALL_MARGIN.min(self.settings.deadline / 2)
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
    pub async fn access(
        self: &Arc<Self>,
        subject: &str,
        deadline: Instant,
    ) -> Result<Access, Status> {
        let cached = {
            let roles = self.roles.read().unwrap_or_else(|e| e.into_inner());
            roles.get(subject).map(|e| match &e.outcome {
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
        let held = match cached {
            Some((answer, true)) => return answer,
            Some((Ok(held), false)) => Some(held),
            _ => None,
        };
        let servers = self.servers()?.clone();
        let (flight, new) = self.role_flight(subject);
        let Some(held) = held else {
            return wait(flight, deadline).await.unwrap_or_else(|| Err(late()));
        };
        // Only the request that started the call waits for it, and only while the servers
        // are believed to answer.
        if !new || !servers.answering() {
            return Ok(held);
        }
        let until = (Instant::now() + self.settings.refresh_wait).min(deadline);
        match wait(flight, until).await {
            Some(answer) => answer,
            None => Ok(held),
        }
    }

    /// The call asking the servers about `subject`: the one in flight, or a new one (then
    /// `true`). It runs to its end in the background whoever waits for it, and records its
    /// answer.
    fn role_flight(self: &Arc<Self>, subject: &str) -> (Flight<Access>, bool) {
        let mut flights = self.role_flights.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(flight) = flights.get(subject) {
            return (flight.clone(), false);
        }
        let (this, uid) = (self.clone(), subject.to_owned());
        let flight = async move {
            let answer = this.ask_role(&uid).await;
            this.role_flights
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&uid);
            answer
        }
        .boxed()
        .shared();
        flights.insert(subject.to_owned(), flight.clone());
        tokio::spawn(flight.clone());
        (flight, true)
    }

    async fn ask_role(&self, subject: &str) -> Result<Access, Status> {
        let (pod, container) = split_subject(subject);
        let request = GetPodRoleRequest {
            pod_uid: pod.to_owned(),
            node_name: self.settings.node.clone(),
            container_id: container.unwrap_or_default().to_owned(),
        };
        let previous = {
            let roles = self.roles.read().unwrap_or_else(|e| e.into_inner());
            match roles.get(subject).map(|e| &e.outcome) {
                Some(Outcome::Access(access)) => Some(access.clone()),
                _ => None,
            }
        };
        let answer = self
            .servers()?
            .pod_role(request, self.call_deadline(), previous.is_some())
            .await;
        match answer {
            Ok(answer) => {
                let access = match answer.node_metadata_passthrough {
                    true => Access::PassThrough,
                    false => Access::Role(Arc::new(Role {
                        name: answer.role_name,
                        arn: answer.role_arn,
                        container: Some(answer.container_name).filter(|c| !c.is_empty()),
                    })),
                };
                if previous.as_ref().is_some_and(|old| *old != access) {
                    // The annotation changed: nothing held for the old role may be served.
                    self.forget_creds(subject);
                }
                self.remember(subject, Outcome::Access(access.clone()));
                Ok(access)
            }
            Err(status) if !about_the_pod(&status) => previous.ok_or(status),
            Err(status) => {
                // The servers said no (deleted, forbidden, no annotation): nothing held for
                // this pod may be served any more.
                self.forget_creds(subject);
                match definite(&status) {
                    true => self.remember(subject, Outcome::Refused(status.clone())),
                    false => self.forget_role(subject),
                }
                Err(status)
            }
        }
    }

    fn remember(&self, subject: &str, outcome: Outcome) {
        let entry = Entry {
            outcome,
            fetched: Instant::now(),
        };
        self.roles
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(subject.to_owned(), entry);
    }

    fn forget_role(&self, subject: &str) {
        self.roles
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(subject);
    }

    fn forget_creds(&self, subject: &str) {
        self.creds
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(subject);
    }

    fn cached_creds(&self, subject: &str, arn: &str) -> Option<Arc<Creds>> {
        let creds = self.creds.read().unwrap_or_else(|e| e.into_inner());
        match creds.get(subject) {
            Some((for_arn, creds)) if for_arn == arn => Some(creds.clone()),
            _ => None,
        }
    }

    /// The call fetching credentials for `role` of `subject`: the one in flight, or a new
    /// one, run to its end in the background.
    fn creds_flight(self: &Arc<Self>, subject: &str, role: &Role) -> Flight<Arc<Creds>> {
        let key = (subject.to_owned(), role.arn.clone());
        let mut flights = self.creds_flights.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(flight) = flights.get(&key) {
            return flight.clone();
        }
        let (this, role, done) = (self.clone(), role.clone(), key.clone());
        let flight = async move {
            let answer = this.fetch(&done.0, &role).await;
            this.creds_flights
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&done);
            answer
        }
        .boxed()
        .shared();
        flights.insert(key, flight.clone());
        tokio::spawn(flight.clone());
        flight
    }

    async fn fetch(&self, subject: &str, role: &Role) -> Result<Arc<Creds>, Status> {
        let (pod, container) = split_subject(subject);
        let request = GetCredentialsRequest {
            pod_uid: pod.to_owned(),
            node_name: self.settings.node.clone(),
            role_name: role.name.clone(),
            container_id: container.unwrap_or_default().to_owned(),
        };
        let answer = self
            .servers()?
            .credentials(request, self.call_deadline())
            .await;
        let answer = match answer {
            Ok(answer) => answer,
            Err(status) => {
                tracing::warn!(subject, role = %role.arn, error = %status.message(), "fetching credentials failed");
                return Err(status);
            }
        };
        if answer.role_arn != role.arn {
            // The pod's role changed between the two calls: the next request starts over.
            self.forget_creds(subject);
            self.forget_role(subject);
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
            .insert(subject.to_owned(), (role.arn.clone(), creds.clone()));
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
        subject: &str,
        current: &Role,
        deadline: Instant,
    ) -> Result<Arc<Creds>, Status> {
        if let Some(creds) = self.cached_creds(subject, &current.arn) {
            let left = self.remaining(&creds);
            if left >= self.settings.min_validity + REFRESH_MARGIN {
                return Ok(creds);
            }
            if left >= self.settings.min_validity {
                if self.claim_refresh(&(subject.to_owned(), current.arn.clone())) {
                    // Runs to its end in the background; the held credentials are served.
                    drop(self.creds_flight(subject, current));
                }
                return Ok(creds);
            }
        }
        self.servers()?;
        let creds = wait(self.creds_flight(subject, current), deadline)
            .await
            .unwrap_or_else(|| Err(late()))?;
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
    use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};

    use kiam_proto::Refusal;
    use tonic::Code;

    use super::*;

    /// A clock the test moves.
    struct ManualClock(AtomicI64);

    impl Clock for ManualClock {
        fn now_unix(&self) -> i64 {
            self.0.load(Ordering::SeqCst)
        }
    }

    const START: i64 = 1_700_000_000;
    const REFRESH_WAIT: Duration = Duration::from_millis(100);

    /// Servers whose answers the test sets; counts calls. Frozen, they answer nothing until
    /// the caller's deadline, then fail as tonic does when its timeout fires.
    #[derive(Default)]
    struct FakeServers {
        role: Mutex<Option<Result<GetPodRoleResponse, Status>>>,
        creds: Mutex<Option<Result<ProtoCredentials, Status>>>,
        role_calls: AtomicUsize,
        creds_calls: AtomicUsize,
        frozen: AtomicBool,
        /// What the client believes (`RoleServer::answering`).
        unreachable: AtomicBool,
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

    /// The answer a fake server gives at `deadline`, or at once.
    fn answer<T: Send + 'static>(
        frozen: bool,
        answer: Option<Result<T, Status>>,
        deadline: Instant,
    ) -> BoxFuture<'static, Result<T, Status>> {
        async move {
            if frozen {
                tokio::time::sleep_until(deadline).await;
                return Err(Status::cancelled("Timeout expired"));
            }
            answer.unwrap_or_else(|| Err(Status::unavailable("down")))
        }
        .boxed()
    }

    impl RoleServer for Shared {
        fn pod_role(
            &self,
            _: GetPodRoleRequest,
            deadline: Instant,
            _: bool,
        ) -> BoxFuture<'static, Result<GetPodRoleResponse, Status>> {
            self.0.role_calls.fetch_add(1, Ordering::SeqCst);
            let frozen = self.0.frozen.load(Ordering::SeqCst);
            answer(frozen, self.0.role.lock().expect("lock").clone(), deadline)
        }
        fn credentials(
            &self,
            _: GetCredentialsRequest,
            deadline: Instant,
        ) -> BoxFuture<'static, Result<ProtoCredentials, Status>> {
            self.0.creds_calls.fetch_add(1, Ordering::SeqCst);
            let frozen = self.0.frozen.load(Ordering::SeqCst);
            answer(frozen, self.0.creds.lock().expect("lock").clone(), deadline)
        }
        fn answering(&self) -> bool {
            !self.0.unreachable.load(Ordering::SeqCst)
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
                refresh_wait: REFRESH_WAIT,
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
                container: None,
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

    /// Times `f` on the paused clock.
    async fn timed<T>(f: impl std::future::Future<Output = T>) -> (T, Duration) {
        let started = Instant::now();
        let out = f.await;
        (out, started.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn frozen_servers_never_hold_up_or_replace_a_held_answer() {
        let f = fixture();
        f.servers.answer_role(Ok(role_answer("app")));
        f.servers
            .answer_creds(Ok(creds_answer("app", 3600, f.now())));
        assert!(f.role().await.is_ok());
        let held = f.creds("app").await.expect("fetched");
        // Every server frozen (SIGSTOP): connections open, nothing answers.
        f.servers.frozen.store(true, Ordering::SeqCst);
        tokio::time::advance(Duration::from_secs(11)).await;
        // The first request past the role TTL waits the short budget, not the deadline.
        let (role, took) = timed(f.role()).await;
        assert!(matches!(role, Ok(Access::Role(r)) if r.name == "app"));
        assert_eq!(took, REFRESH_WAIT);
        // The next requests of the pod, while that call is still in flight, do not wait.
        let (role, took) = timed(f.role()).await;
        assert!(role.is_ok());
        assert_eq!(took, Duration::ZERO);
        assert_eq!(f.servers.calls().0, 2, "one call since the freeze");
        // Its call times out in the background ("Timeout expired", no reason): that says
        // nothing about the pod, so the held role and credentials stay.
        tokio::time::advance(Duration::from_secs(1)).await;
        tokio::task::yield_now().await;
        let (role, _) = timed(f.role()).await;
        assert!(
            matches!(&role, Ok(Access::Role(r)) if r.name == "app"),
            "{role:?}"
        );
        let (creds, took) = timed(f.creds("app")).await;
        assert_eq!(creds.expect("held").access_key_id, held.access_key_id);
        assert_eq!(took, Duration::ZERO);
        // Once the client knows no server answers, nothing waits at all.
        f.servers.unreachable.store(true, Ordering::SeqCst);
        tokio::time::advance(Duration::from_secs(11)).await;
        for _ in 0..3 {
            let (role, took) = timed(f.role()).await;
            assert!(role.is_ok());
            assert_eq!(took, Duration::ZERO);
        }
        // A pod with nothing held waits as long as the call may take (its deadline less the
        // margin that lets its answer through), and is told why.
        let (none, took) = timed(f.upstream.access("other", f.upstream.deadline())).await;
        assert_eq!(took, Duration::from_millis(900) - CALL_MARGIN);
        let why = none.expect_err("no answer");
        assert!(
            matches!(why.code(), Code::DeadlineExceeded | Code::Cancelled),
            "{why:?}"
        );
        // The servers come back: the next stale request gets their fresh answer.
        f.servers.frozen.store(false, Ordering::SeqCst);
        f.servers.unreachable.store(false, Ordering::SeqCst);
        f.servers.answer_role(Ok(role_answer("other")));
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(matches!(f.role().await, Ok(Access::Role(r)) if r.name == "other"));
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_requests_of_one_pod_share_one_call() {
        let f = fixture();
        f.servers.frozen.store(true, Ordering::SeqCst);
        let asks = (0..10).map(|_| f.role());
        let answers = futures::future::join_all(asks).await;
        assert!(answers.iter().all(Result::is_err));
        assert_eq!(f.servers.calls().0, 1, "one call for ten requests");
        f.servers.frozen.store(false, Ordering::SeqCst);
        f.servers.answer_role(Ok(role_answer("app")));
        f.servers
            .answer_creds(Ok(creds_answer("app", 3600, f.now())));
        let fetches = (0..10).map(|_| f.creds("app"));
        let fetched = futures::future::join_all(fetches).await;
        assert!(fetched.iter().all(Result::is_ok));
        assert_eq!(
            f.servers.calls().1,
            1,
            "one credentials call for ten requests"
        );
    }

    #[test]
    fn only_answers_about_the_pod_replace_what_is_held() {
        for (status, about) in [
            (Status::cancelled("Timeout expired"), false),
            (Status::unknown("tcp connect error"), false),
            (Status::unavailable("connection refused"), false),
            (Status::internal("h2 protocol error"), false),
            (refusal(Code::Unavailable, Reason::IndexNotSynced), false),
            (
                refusal(Code::Unauthenticated, Reason::AgentTokenExpired),
                false,
            ),
            (refusal(Code::NotFound, Reason::PodNotKnown), true),
            (
                refusal(Code::PermissionDenied, Reason::RoleNotPermitted),
                true,
            ),
            (refusal(Code::NotFound, Reason::NoRoleAnnotation), true),
        ] {
            assert_eq!(about_the_pod(&status), about, "{status:?}");
        }
    }
}
