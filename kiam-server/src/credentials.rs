//! Credentials: AssumeRole through a narrow `CredentialSource` (aws-sdk-sts in production),
//! and the cache in front of it.
//!
//! The cache is keyed by everything that changes STS's answer (role ARN, external id, session
//! name), so STS calls grow with roles, not with pods. Per key at most one call is in flight
//! and later callers share it. Credentials are refreshed ahead of time (halfway between the
//! session's start and the minimum validity) and never served with less than the minimum
//! validity left; while a refresh fails, the held credentials keep being served as long as
//! they stay above it. Keys no pod uses any more are dropped by `maintain`.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use futures::{
    FutureExt as _,
    future::{BoxFuture, Shared},
};

use tokio::time::Instant;

use crate::{
    clock::Clock,
    metrics::{Metrics, ResultLabels},
};

/// What AssumeRole is asked with.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey {
    pub role_arn: String,
    pub external_id: Option<String>,
    pub session_name: String,
    /// Session tags (key, value), sorted; empty unless `--session-tags`.
    pub tags: Vec<(String, String)>,
}

#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: String,
    pub expiration: SystemTime,
    pub issued: SystemTime,
}

// Never print secrets, at any log level.
impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("expiration", &self.expiration)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// What is left of them at `now`.
    pub fn remaining(&self, now: SystemTime) -> Duration {
        self.expiration
            .duration_since(now)
            .unwrap_or(Duration::ZERO)
    }
}

/// What STS (or the way to it) said: its error code, when it gave one, and its message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub code: Option<String>,
    pub message: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.code {
            Some(code) => write!(f, "{code}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl<T: Into<String>> From<T> for Failure {
    fn from(message: T) -> Self {
        Self {
            code: None,
            message: message.into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StsError {
    #[error("STS denied AssumeRole: {0}")]
    Denied(Failure),
    #[error("STS is throttling AssumeRole: {0}")]
    Throttled(Failure),
    #[error("STS is unavailable: {0}")]
    Unavailable(Failure),
    #[error("STS rejected the request: {0}")]
    Invalid(Failure),
    #[error("credentials expire too soon to be served ({0}s left) and could not be refreshed")]
    TooShort(u64),
}

impl StsError {
    fn label(&self) -> &'static str {
        match self {
            Self::Denied(_) => "denied",
            Self::Throttled(_) => "throttled",
            Self::Unavailable(_) => "unavailable",
            Self::Invalid(_) => "invalid",
            Self::TooShort(_) => "too_short",
        }
    }

    /// What pods and their Events may read: the kind of failure and STS's error code, never
    /// STS's own message, which names the servers' identity ("User: arn:aws:sts::…:
    /// assumed-role/kiam-server/… is not authorized to perform sts:AssumeRole …"). Messages
    /// without a code are kiam's or the transport's, and stay. The servers' log has it all.
    pub fn public(&self) -> String {
        let code = |f: &Failure| match &f.code {
            Some(code) => format!(" ({code})"),
            None => format!(" ({})", f.message),
        };
        match self {
            Self::Denied(f) => format!(
                "STS denied AssumeRole{}: the role's trust policy must allow kiam's servers, and its sts:ExternalId condition match the pod's iam.amazonaws.com/external-id",
                code(f)
            ),
            Self::Throttled(f) => format!("STS is throttling AssumeRole{}; retry", code(f)),
            Self::Unavailable(f) => format!("STS is unavailable{}; retry", code(f)),
            Self::Invalid(f) => format!("STS rejected the request{}", code(f)),
            Self::TooShort(_) => self.to_string(),
        }
    }
}

/// Somewhere credentials come from.
pub trait CredentialSource: Send + Sync + 'static {
    fn assume(&self, key: CacheKey) -> BoxFuture<'static, Result<Credentials, StsError>>;
}

/// AssumeRole with aws-sdk-sts; the SDK's standard retry (backoff with jitter) handles
/// throttling and 5xx.
pub struct StsSource {
    pub client: aws_sdk_sts::Client,
    pub duration: Duration,
    /// When the credentials were issued is read from it.
    pub clock: Arc<dyn Clock>,
}

impl CredentialSource for StsSource {
    fn assume(&self, key: CacheKey) -> BoxFuture<'static, Result<Credentials, StsError>> {
        let request = self
            .client
            .assume_role()
            .role_arn(&key.role_arn)
            .role_session_name(&key.session_name)
            .set_external_id(key.external_id.clone())
            .duration_seconds(i32::try_from(self.duration.as_secs()).unwrap_or(3600));
        let tags: Result<Vec<_>, _> = key
            .tags
            .iter()
            .map(|(k, v)| aws_sdk_sts::types::Tag::builder().key(k).value(v).build())
            .collect();
        let clock = self.clock.clone();
        async move {
            let tags = tags.map_err(|e| StsError::Invalid(format!("session tag: {e}").into()))?;
            let request = match tags.is_empty() {
                true => request,
                false => request.set_tags(Some(tags)),
            };
            let issued = clock.now();
            let output = request.send().await.map_err(classify)?;
            let c = output
                .credentials
                .ok_or_else(|| StsError::Invalid("no credentials in the answer".into()))?;
            let expiration = SystemTime::try_from(c.expiration)
                .map_err(|e| StsError::Invalid(format!("bad expiration: {e}").into()))?;
            Ok(Credentials {
                access_key_id: c.access_key_id,
                secret_access_key: c.secret_access_key,
                session_token: c.session_token,
                expiration,
                issued,
            })
        }
        .boxed()
    }
}

fn classify(
    err: aws_sdk_sts::error::SdkError<aws_sdk_sts::operation::assume_role::AssumeRoleError>,
) -> StsError {
    use aws_sdk_sts::error::{ProvideErrorMetadata as _, SdkError};
    let status = err.raw_response().map(|r| r.status().as_u16());
    match &err {
        SdkError::ServiceError(service) => {
            let code = service.err().code().unwrap_or("Unknown").to_owned();
            let message = Failure {
                code: Some(code.clone()),
                message: service.err().message().unwrap_or("no message").to_owned(),
            };
            match code.as_str() {
                "AccessDenied"
                | "AccessDeniedException"
                | "ExpiredToken"
                | "InvalidClientTokenId"
                | "UnrecognizedClientException" => StsError::Denied(message),
                "Throttling" | "ThrottlingException" | "RequestLimitExceeded" => {
                    StsError::Throttled(message)
                }
                _ if status.is_some_and(|s| s >= 500) => StsError::Unavailable(message),
                _ => StsError::Invalid(message),
            }
        }
        _ => StsError::Unavailable(
            aws_sdk_sts::error::DisplayErrorContext(&err)
                .to_string()
                .into(),
        ),
    }
}

type Flight = Shared<BoxFuture<'static, Result<Arc<Credentials>, StsError>>>;

#[derive(Default)]
struct Slot {
    current: Option<Arc<Credentials>>,
    flight: Option<Flight>,
    /// After a failed call, background refreshes wait until then.
    retry_after: Option<Instant>,
}

/// Pause between background refreshes after STS failed (callers without usable credentials
/// still ask at once).
const RETRY_PAUSE: Duration = Duration::from_secs(5);

struct Inner {
    source: Box<dyn CredentialSource>,
    slots: Mutex<HashMap<CacheKey, Slot>>,
    min_validity: Duration,
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
}

#[derive(Clone)]
pub struct CredentialCache(Arc<Inner>);

impl CredentialCache {
    pub fn new(
        source: impl CredentialSource,
        min_validity: Duration,
        metrics: Arc<Metrics>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self(Arc::new(Inner {
            source: Box::new(source),
            slots: Mutex::new(HashMap::new()),
            min_validity,
            metrics,
            clock,
        }))
    }

    /// What is left of `creds` now.
    fn remaining(&self, creds: &Credentials) -> Duration {
        creds.remaining(self.0.clock.now())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<CacheKey, Slot>> {
        self.0.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Refresh once less than this is left: halfway between issue and the minimum validity.
    fn refresh_below(&self, creds: &Credentials) -> Duration {
        let lifetime = creds
            .expiration
            .duration_since(creds.issued)
            .unwrap_or(Duration::ZERO);
        let min = self.0.min_validity;
        min + lifetime.saturating_sub(min) / 2
    }

    /// Starts (or joins) the STS call for `key`. Called with the slots locked.
    fn flight(&self, key: &CacheKey, slot: &mut Slot) -> Flight {
        if let Some(flight) = &slot.flight {
            return flight.clone();
        }
        let this = self.clone();
        let key = key.clone();
        let call = self.0.source.assume(key.clone());
        let flight = async move {
            let started = Instant::now();
            let result = call.await;
            let metrics = &this.0.metrics;
            metrics.sts_seconds.observe(started.elapsed().as_secs_f64());
            let label = match &result {
                Ok(_) => "ok",
                Err(e) => e.label(),
            };
            metrics
                .sts_calls
                .get_or_create(&ResultLabels {
                    result: label.into(),
                })
                .inc();
            let mut slots = this.lock();
            // The key may have been evicted meanwhile (no pod uses it): do not bring it back.
            let Some(slot) = slots.get_mut(&key) else {
                return result.map(Arc::new);
            };
            slot.flight = None;
            slot.retry_after = result.is_err().then(|| Instant::now() + RETRY_PAUSE);
            match result {
                Ok(creds) => {
                    tracing::info!(role = %key.role_arn, expires_in_s = this.remaining(&creds).as_secs(), "assumed role");
                    let creds = Arc::new(creds);
                    slot.current = Some(creds.clone());
                    Ok(creds)
                }
                Err(error) => {
                    tracing::warn!(role = %key.role_arn, %error, "AssumeRole failed");
                    Err(error)
                }
            }
        }
        .boxed()
        .shared();
        slot.flight = Some(flight.clone());
        // Driven to completion even if every caller goes away (an agent's deadline or a lost
        // hedge cancels the gRPC handler that awaited it).
        let driver = flight.clone();
        tokio::spawn(async move {
            let _ = driver.await;
        });
        flight
    }

    fn may_refresh(slot: &Slot) -> bool {
        slot.flight.is_none() && slot.retry_after.is_none_or(|at| Instant::now() >= at)
    }

    /// Credentials for `key` with at least the minimum validity left.
    pub async fn get(&self, key: &CacheKey) -> Result<Arc<Credentials>, StsError> {
        let flight = {
            let mut slots = self.lock();
            let slot = slots.entry(key.clone()).or_default();
            match slot.current.clone() {
                Some(creds) if self.remaining(&creds) >= self.refresh_below(&creds) => {
                    self.0.metrics.cache_hits.inc();
                    return Ok(creds);
                }
                Some(creds) if self.remaining(&creds) >= self.0.min_validity => {
                    // Good enough to serve; refresh in the background (driven by `flight`).
                    self.0.metrics.cache_hits.inc();
                    if Self::may_refresh(slot) {
                        drop(self.flight(key, slot));
                    }
                    return Ok(creds);
                }
                _ => {
                    self.0.metrics.cache_misses.inc();
                    self.flight(key, slot)
                }
            }
        };
        let fresh = flight.await?;
        let left = self.remaining(&fresh);
        if left < self.0.min_validity {
            return Err(StsError::TooShort(left.as_secs()));
        }
        Ok(fresh)
    }

    /// Fetches in the background if nothing usable is held or in flight (prefetch).
    pub fn prefetch(&self, key: &CacheKey) -> Option<Flight> {
        let mut slots = self.lock();
        let slot = slots.entry(key.clone()).or_default();
        let usable = slot
            .current
            .as_ref()
            .is_some_and(|c| self.remaining(c) >= self.refresh_below(c));
        (!usable).then(|| self.flight(key, slot))
    }

    /// Drops keys no pod uses; starts refreshes for those due. Returns the flights started.
    pub fn maintain(&self, in_use: &HashSet<CacheKey>) -> Vec<Flight> {
        let mut slots = self.lock();
        slots.retain(|key, _| in_use.contains(key));
        let keys: Vec<CacheKey> = in_use.iter().cloned().collect();
        let mut started = Vec::new();
        for key in keys {
            let slot = slots.entry(key.clone()).or_default();
            let due = slot
                .current
                .as_ref()
                .is_none_or(|c| self.remaining(c) < self.refresh_below(c));
            if due && Self::may_refresh(slot) {
                started.push(self.flight(&key, slot));
            }
        }
        self.0.metrics.cached_credentials.set(slots.len() as i64);
        started
    }

    /// Keys held, for tests and status.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::clock::ManualClock;

    /// Issues credentials valid for `lifetime` from `clock`'s now, counting calls; fails
    /// while `fail` is set.
    struct Fake {
        calls: Arc<AtomicUsize>,
        lifetime: Duration,
        fail: Arc<Mutex<Option<StsError>>>,
        delay: Duration,
        clock: ManualClock,
    }

    impl CredentialSource for Fake {
        fn assume(&self, key: CacheKey) -> BoxFuture<'static, Result<Credentials, StsError>> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            let (lifetime, delay) = (self.lifetime, self.delay);
            let fail = self.fail.lock().expect("lock").clone();
            let clock = self.clock.clone();
            async move {
                tokio::time::sleep(delay).await;
                if let Some(e) = fail {
                    return Err(e);
                }
                let now = clock.now();
                Ok(Credentials {
                    access_key_id: format!("AKIA{n}{}", key.role_arn.len()),
                    secret_access_key: "secret".into(),
                    session_token: "token".into(),
                    expiration: now + lifetime,
                    issued: now,
                })
            }
            .boxed()
        }
    }

    fn key(role: &str) -> CacheKey {
        CacheKey {
            role_arn: format!("arn:aws:iam::123456789012:role/{role}"),
            external_id: None,
            session_name: "kiam".into(),
            tags: Vec::new(),
        }
    }

    /// A cache in front of a [`Fake`], and the handles that steer it.
    struct Harness {
        cache: CredentialCache,
        calls: Arc<AtomicUsize>,
        fail: Arc<Mutex<Option<StsError>>>,
        clock: ManualClock,
    }

    /// The minimum validity is 30 minutes.
    fn harness(lifetime: Duration) -> Harness {
        let calls = Arc::new(AtomicUsize::new(0));
        let fail = Arc::new(Mutex::new(None));
        let clock = ManualClock::new();
        let fake = Fake {
            calls: calls.clone(),
            lifetime,
            fail: fail.clone(),
            delay: Duration::from_millis(20),
            clock: clock.clone(),
        };
        let cache = CredentialCache::new(
            fake,
            Duration::from_secs(1800),
            Arc::default(),
            Arc::new(clock.clone()),
        );
        Harness {
            cache,
            calls,
            fail,
            clock,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_share_one_call_per_key() {
        let Harness { cache, calls, .. } = harness(Duration::from_secs(3600));
        let gets: Vec<_> = (0..50)
            .map(|i| {
                let cache = cache.clone();
                let k = key(["a", "b", "c"][i % 3]);
                tokio::spawn(async move { cache.get(&k).await })
            })
            .collect();
        for get in gets {
            assert!(get.await.expect("join").is_ok());
        }
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        // Served from the cache afterwards.
        cache.get(&key("a")).await.expect("cached");
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn external_id_is_part_of_the_key() {
        let Harness { cache, calls, .. } = harness(Duration::from_secs(3600));
        let mut with_id = key("a");
        with_id.external_id = Some("xyz".into());
        cache.get(&key("a")).await.expect("ok");
        cache.get(&with_id).await.expect("ok");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn never_serves_less_than_min_validity_and_refreshes_ahead() {
        // 2 s above the 30-minute minimum: refreshed below 30 min + 1 s, i.e. a second after
        // they are issued.
        let Harness {
            cache,
            calls,
            clock,
            ..
        } = harness(Duration::from_secs(1802));
        let first = cache.get(&key("a")).await.expect("ok");
        let in_use = HashSet::from([key("a")]);
        clock.advance(Duration::from_millis(999));
        assert!(cache.maintain(&in_use).is_empty(), "not due yet");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        clock.advance(Duration::from_millis(2));
        // Due: refreshed ahead, while the held ones could still be served.
        let flights = cache.maintain(&in_use);
        assert_eq!(flights.len(), 1);
        for flight in flights {
            flight.await.expect("refreshed");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        let refreshed = cache.get(&key("a")).await.expect("ok");
        assert_ne!(refreshed.access_key_id, first.access_key_id);
        assert_eq!(refreshed.remaining(clock.now()), Duration::from_secs(1802));

        // Credentials that are already below the minimum are never served: the call fails
        // with TooShort, whatever the source says.
        let short = harness(Duration::from_secs(600)).cache;
        assert!(matches!(
            short.get(&key("a")).await,
            Err(StsError::TooShort(_))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn failed_refreshes_keep_serving_valid_credentials_then_say_why() {
        // 2 s above the 30-minute minimum: due for refresh (below 30 min + 1 s) a second
        // later, and still servable for another second.
        let Harness {
            cache,
            calls,
            fail,
            clock,
        } = harness(Duration::from_secs(1802));
        let held = cache.get(&key("a")).await.expect("first");
        clock.advance(Duration::from_millis(1100));
        *fail.lock().expect("lock") = Some(StsError::Throttled("slow down".into()));
        // Due for refresh, and the refresh fails.
        let flights = cache.maintain(&HashSet::from([key("a")]));
        assert_eq!(flights.len(), 1);
        for flight in flights {
            assert!(flight.await.is_err());
        }
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        // The held credentials, still above the minimum, are served meanwhile.
        clock.advance(Duration::from_millis(899));
        let again = cache.get(&key("a")).await.expect("still valid");
        assert_eq!(again.access_key_id, held.access_key_id);
        // Once they are below it, the caller gets STS's reason, never them.
        clock.advance(Duration::from_millis(2));
        assert_eq!(
            cache.get(&key("a")).await.expect_err("no longer servable"),
            StsError::Throttled("slow down".into())
        );
    }

    #[tokio::test(start_paused = true)]
    async fn unused_keys_are_dropped_and_no_longer_refreshed() {
        let Harness { cache, calls, .. } = harness(Duration::from_secs(3600));
        cache.get(&key("a")).await.expect("ok");
        cache.get(&key("b")).await.expect("ok");
        assert_eq!(cache.len(), 2);
        assert!(cache.maintain(&HashSet::from([key("b")])).is_empty());
        assert_eq!(cache.len(), 1);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn debug_output_has_no_secrets() {
        let creds = Credentials {
            access_key_id: "AKIA".into(),
            secret_access_key: "very-secret".into(),
            session_token: "token-secret".into(),
            expiration: SystemTime::UNIX_EPOCH,
            issued: SystemTime::UNIX_EPOCH,
        };
        let text = format!("{creds:?}");
        assert!(
            !text.contains("very-secret") && !text.contains("token-secret"),
            "{text}"
        );
    }

    #[test]
    fn pods_read_stss_error_code_never_its_message() {
        let denied = StsError::Denied(Failure {
            code: Some("AccessDenied".into()),
            message: "User: arn:aws:sts::123456789012:assumed-role/kiam-server/i-0 is not authorized to perform: sts:AssumeRole".into(),
        });
        let public = denied.public();
        assert!(
            public.contains("AccessDenied") && public.contains("trust policy"),
            "{public}"
        );
        assert!(
            !public.contains("arn:") && !public.contains("kiam-server"),
            "{public}"
        );
        // The servers' own log keeps all of it.
        assert!(denied.to_string().contains("assumed-role/kiam-server"));
    }
}
