//! Prometheus metrics (prometheus-client, typed label sets), served by the admin listener.

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Method {
    GetPodRole,
    GetCredentials,
    Health,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: Method,
    /// gRPC status code name, `ok` on success.
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// The refusal reason, as the proto names it (`POD_NOT_KNOWN`, `MIRROR_POD`, …).
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServedLabels {
    /// `annotation`, `default` for `--default-role`, or `container-roles`.
    pub role_source: &'static str,
    /// Whose role: `pod` (the pod's own, for every container not listed) or `container`.
    pub scope: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub refusals: Family<ReasonLabels, Counter>,
    pub served: Family<ServedLabels, Counter>,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    pub sts_calls: Family<ResultLabels, Counter>,
    pub sts_seconds: Histogram,
    pub pods_indexed: Gauge,
    pub cached_credentials: Gauge,
    pub prefetch_queued: Counter,
    pub prefetch_dropped: Counter,
    pub events: Family<ResultLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("kiam_server");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "gRPC requests by method and result",
            requests.clone(),
        );
        let refusals = Family::<ReasonLabels, Counter>::default();
        registry.register("refusals", "Requests refused, by reason", refusals.clone());
        let served = Family::<ServedLabels, Counter>::default();
        registry.register(
            "credentials_served",
            "Credentials served to agents, by where the pod's role came from",
            served.clone(),
        );
        let cache_hits = Counter::default();
        registry.register(
            "cache_hits",
            "Credentials served from the cache",
            cache_hits.clone(),
        );
        let cache_misses = Counter::default();
        registry.register(
            "cache_misses",
            "Credential requests that had to wait for STS",
            cache_misses.clone(),
        );
        let sts_calls = Family::<ResultLabels, Counter>::default();
        registry.register(
            "sts_assume_role",
            "AssumeRole calls by result",
            sts_calls.clone(),
        );
        let sts_seconds = Histogram::new([0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]);
        registry.register(
            "sts_assume_role_seconds",
            "AssumeRole latency, retries included",
            sts_seconds.clone(),
        );
        let pods_indexed = Gauge::default();
        registry.register("pods_indexed", "Pods in the index", pods_indexed.clone());
        let cached_credentials = Gauge::default();
        registry.register(
            "cached_credentials",
            "Credentials held (role and session parameters)",
            cached_credentials.clone(),
        );
        let prefetch_queued = Counter::default();
        registry.register(
            "prefetch_queued",
            "Prefetches queued",
            prefetch_queued.clone(),
        );
        let prefetch_dropped = Counter::default();
        registry.register(
            "prefetch_dropped",
            "Prefetches dropped because the queue was full",
            prefetch_dropped.clone(),
        );
        let events = Family::<ResultLabels, Counter>::default();
        registry.register(
            "kubernetes_events",
            "Kubernetes Events published",
            events.clone(),
        );
        Self {
            registry,
            requests,
            refusals,
            served,
            cache_hits,
            cache_misses,
            sts_calls,
            sts_seconds,
            pods_indexed,
            cached_credentials,
            prefetch_queued,
            prefetch_dropped,
            events,
        }
    }
}

impl Metrics {
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}
