//! Agent metrics (prometheus-client, typed label sets), served by the admin listener.
//!
//! Besides the agent's own counters, the kernel's: the programs' `KIAM_STATS` counters and the
//! maps' fill levels, read from the pins by a background task ([`Kernel::refresh`]) and
//! encoded as they were last read.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use kiam_common::{limits, map_names, program_names};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, text::encode},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::Histogram,
    },
    registry::Registry,
};

use crate::pins;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// `token`, `role`, `credentials`, `forwarded`, `not_allowed`, `other`.
    pub route: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScopeLabels {
    /// `pod` (the pod's role) or `container` (a container's own, per-container roles).
    pub scope: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    pub reason: &'static str,
}

/// Upper bounds of `kiam_agent_credentials_remaining_seconds`: fine around the 30-minute
/// minimum validity (the alert looks at the 35-minute bucket), coarse beyond.
const REMAINING_BUCKETS: [f64; 8] = [
    1800.0, 2100.0, 2400.0, 2700.0, 3000.0, 3600.0, 7200.0, 43200.0,
];

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RouteLabels, Counter>,
    pub refused_connections: Family<RefusedLabels, Counter>,
    /// Credentials served, by whose role they were.
    pub credentials_served: Family<ScopeLabels, Counter>,
    /// What served credentials had left, in seconds.
    pub credentials_remaining: Histogram,
    /// 1 when `/ready` answers 200.
    pub ready: Gauge,
    /// Servers that answered the last health check, and servers known.
    pub servers_reachable: Gauge,
    pub servers: Gauge,
    pub kernel: Arc<Kernel>,
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
        let credentials_served = Family::<ScopeLabels, Counter>::default();
        registry.register(
            "credentials_served",
            "Credentials served, by scope: the pod's role, or a container's own",
            credentials_served.clone(),
        );
        let refused_connections = Family::<RefusedLabels, Counter>::default();
        registry.register(
            "refused_connections",
            "Connections refused before any request (no record, not a pod, collision)",
            refused_connections.clone(),
        );
        let credentials_remaining = Histogram::new(REMAINING_BUCKETS);
        registry.register(
            "credentials_remaining_seconds",
            "Validity left on credentials served to pods",
            credentials_remaining.clone(),
        );
        let ready = Gauge::default();
        registry.register(
            "ready",
            "1 when the agent is ready (a kiam server answers its health checks)",
            ready.clone(),
        );
        let servers_reachable = Gauge::default();
        registry.register(
            "servers_reachable",
            "kiam servers that answered the last health check",
            servers_reachable.clone(),
        );
        let servers = Gauge::default();
        registry.register(
            "servers",
            "kiam server addresses the agent resolved",
            servers.clone(),
        );
        let kernel = Arc::new(Kernel::default());
        registry.register_collector(Box::new(kernel.clone()));
        Self {
            registry,
            requests,
            refused_connections,
            credentials_served,
            credentials_remaining,
            ready,
            servers_reachable,
            servers,
            kernel,
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

/// The kernel side, as last read from the pins.
#[derive(Debug, Default)]
pub struct Kernel {
    last: Mutex<Option<KernelSnapshot>>,
    /// Reads of the pins that failed; the kernel series vanish until one succeeds.
    read_errors: std::sync::atomic::AtomicU64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelSnapshot {
    /// `KIAM_STATS` by name, summed over CPUs.
    pub events: Vec<(String, u64)>,
    /// Entries in the per-connection maps, by map name.
    pub map_entries: Vec<(String, usize)>,
    /// Pinned links present, of [`program_names::ALL`].
    pub programs_attached: usize,
    /// Whether the pinned configuration says ready.
    pub configured: bool,
}

impl KernelSnapshot {
    pub fn from_sample(sample: pins::Sample) -> Self {
        Self {
            events: sample.counters.into_iter().collect(),
            map_entries: sample.map_entries.into_iter().collect(),
            programs_attached: sample.links_pinned,
            configured: sample.config.as_ref().is_some_and(pins::is_ready),
        }
    }
}

fn capacity(map: &str) -> Option<u32> {
    match map {
        map_names::CONNECT => Some(limits::CONNECT_ENTRIES),
        map_names::TUPLES => Some(limits::TUPLES_ENTRIES),
        map_names::ACCEPTED => Some(limits::ACCEPTED_ENTRIES),
        map_names::THROTTLE => Some(limits::THROTTLE_ENTRIES),
        _ => None,
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    event: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabels {
    map: String,
}

impl Kernel {
    pub fn set(&self, snapshot: KernelSnapshot) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(snapshot);
    }

    /// A read failed: what was read before is no longer shown as current.
    pub fn failed(&self) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.read_errors
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Reads the pins every `every` with a [`pins::Sampler`] (off the async threads:
    /// counting map entries is one syscall per entry), until the process ends.
    pub async fn refresh(self: Arc<Self>, pin_dir: PathBuf, every: Duration) {
        let mut tick = tokio::time::interval(every);
        let sampler = Arc::new(Mutex::new(pins::Sampler::new(&pin_dir)));
        loop {
            tick.tick().await;
            let sampler = sampler.clone();
            let read = tokio::task::spawn_blocking(move || {
                sampler.lock().unwrap_or_else(|e| e.into_inner()).sample()
            })
            .await;
            match read {
                Ok(Ok(sample)) => self.set(KernelSnapshot::from_sample(sample)),
                Ok(Err(error)) => {
                    self.failed();
                    tracing::warn!(%error, "cannot read the pinned kernel counters");
                }
                Err(error) => {
                    self.failed();
                    tracing::warn!(%error, "kernel counter task failed");
                }
            }
        }
    }
}

impl Collector for Kernel {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        scalar(
            &mut encoder,
            "kernel_metrics_read_errors",
            "Failed reads of the pinned kernel counters (the kernel series are absent until one succeeds)",
            ConstCounter::new(self.read_errors.load(std::sync::atomic::Ordering::Relaxed)),
        )?;
        let Some(snapshot) = self.last.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
            return Ok(());
        };
        {
            let mut family = encoder.encode_descriptor(
                "kernel_events",
                "Events counted by the eBPF programs (KIAM_STATS): redirected, exempt, denied, bound, guard drops, tuple collisions, bind denials",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (event, value) in &snapshot.events {
                ConstCounter::new(*value).encode(family.encode_family(&EventLabels {
                    event: event.clone(),
                })?)?;
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "map_entries",
                "Entries in the eBPF connection maps",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (map, entries) in &snapshot.map_entries {
                ConstGauge::new(*entries as i64)
                    .encode(family.encode_family(&MapLabels { map: map.clone() })?)?;
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "map_capacity",
                "Capacity of the eBPF connection maps (LRU: the oldest entries go first)",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (map, _) in &snapshot.map_entries {
                if let Some(cap) = capacity(map) {
                    ConstGauge::new(i64::from(cap))
                        .encode(family.encode_family(&MapLabels { map: map.clone() })?)?;
                }
            }
        }
        scalar(
            &mut encoder,
            "programs_attached",
            "Pinned eBPF program links present",
            ConstGauge::new(snapshot.programs_attached as i64),
        )?;
        scalar(
            &mut encoder,
            "programs_expected",
            "eBPF program links a complete installation pins",
            ConstGauge::new(program_names::ALL.len() as i64),
        )?;
        scalar(
            &mut encoder,
            "kernel_configured",
            "1 when the pinned configuration is complete (otherwise the programs refuse metadata connections)",
            ConstGauge::new(i64::from(snapshot.configured)),
        )
    }
}

/// One unlabelled series `name` with `help`.
fn scalar(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric: impl EncodeMetric,
) -> Result<(), std::fmt::Error> {
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_counters_are_encoded_as_read() {
        let metrics = Metrics::default();
        // Nothing read yet: no kernel series rather than zeros.
        assert!(!metrics.encode().contains("kiam_agent_kernel_events_total{"));
        metrics.kernel.set(KernelSnapshot {
            events: vec![("redirected_ipv4".into(), 7), ("bind_denied".into(), 1)],
            map_entries: vec![(map_names::CONNECT.into(), 3)],
            programs_attached: 6,
            configured: true,
        });
        let text = metrics.encode();
        for line in [
            "kiam_agent_kernel_events_total{event=\"redirected_ipv4\"} 7",
            "kiam_agent_kernel_events_total{event=\"bind_denied\"} 1",
            "kiam_agent_map_entries{map=\"KIAM_CONNECT\"} 3",
            "kiam_agent_map_capacity{map=\"KIAM_CONNECT\"} 16384",
            "kiam_agent_programs_attached 6",
            "kiam_agent_programs_expected 8",
            "kiam_agent_kernel_configured 1",
            "# TYPE kiam_agent_kernel_events counter",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        // A failed read: no stale kernel series, and the failure counted.
        metrics.kernel.failed();
        let text = metrics.encode();
        assert!(!text.contains("kiam_agent_programs_attached"), "{text}");
        assert!(
            text.contains("kiam_agent_kernel_metrics_read_errors_total 1"),
            "{text}"
        );
    }
}
