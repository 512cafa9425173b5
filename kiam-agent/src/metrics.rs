//! Agent metrics (prometheus-client, typed label sets), served by the admin listener.

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// `token`, `role`, `credentials`, `forwarded`, `not_allowed`, `other`.
    pub route: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    pub reason: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RouteLabels, Counter>,
    pub refused_connections: Family<RefusedLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("kiam_agent");
        let requests = Family::<RouteLabels, Counter>::default();
        registry.register(
            "imds_requests",
            "Metadata requests by route and HTTP status",
            requests.clone(),
        );
        let refused_connections = Family::<RefusedLabels, Counter>::default();
        registry.register(
            "refused_connections",
            "Connections refused before any request (no record, not a pod, collision)",
            refused_connections.clone(),
        );
        Self {
            registry,
            requests,
            refused_connections,
        }
    }
}

impl Metrics {
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}
