//! Per-pod rates: how often one pod may open connections to the agent, and have requests
//! forwarded or relayed to the node's metadata service. Concurrency caps bound what a pod
//! holds; these bound what it churns through (a connect/close loop keeps the accept loop and
//! the listener's backlog busy; forwarded requests spend the node's metadata allowance, about
//! 1,024 packets a second per interface, which aws-node and the pass-through pods share).
//! Token buckets: `per_second` on average, bursts of twice that.
//!
//! A pod over its rate of new connections is also stopped in the kernel ([`Throttle`]): its
//! cgroup's connections to the metadata service fail in `connect()` for a second, in its own
//! context, so a connect/close loop costs the pod that runs it, not the agent and the other
//! pods.

use std::{num::NonZeroU32, sync::Mutex, time::Duration};

use aya::maps::{HashMap, MapData};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// How long a cgroup over its pod's rate is refused in the kernel.
pub const THROTTLE_FOR: Duration = Duration::from_secs(1);

/// Where a cgroup over its pod's rate is stopped.
pub trait Throttle: Send + Sync + 'static {
    fn hold(&self, cgroup_id: u64, duration: Duration);
}

/// The kernel programs' `KIAM_THROTTLE`.
pub struct KernelThrottle(Mutex<HashMap<MapData, u64, u64>>);

impl KernelThrottle {
    pub fn new(map: HashMap<MapData, u64, u64>) -> Self {
        Self(Mutex::new(map))
    }
}

impl Throttle for KernelThrottle {
    fn hold(&self, cgroup_id: u64, duration: Duration) {
        // The programs compare with bpf_ktime_get_ns(): CLOCK_MONOTONIC.
        let now = match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
            Ok(now) => Duration::from(now),
            Err(error) => {
                tracing::warn!(%error, "cannot read CLOCK_MONOTONIC");
                return;
            }
        };
        let until = (now + duration).as_nanos().try_into().unwrap_or(u64::MAX);
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(error) = map.insert(cgroup_id, until, 0) {
            tracing::warn!(%error, cgroup_id, "cannot throttle a cgroup");
        }
    }
}

/// No kernel to tell (tests of the listener alone).
pub struct NoThrottle;

impl Throttle for NoThrottle {
    fn hold(&self, _: u64, _: Duration) {}
}

pub struct PodRate(DefaultKeyedRateLimiter<String>);

impl PodRate {
    /// `per_second` is at least 1.
    pub fn new(per_second: u32) -> Self {
        let rate = NonZeroU32::new(per_second.max(1)).unwrap_or(NonZeroU32::MIN);
        let burst = rate.saturating_mul(NonZeroU32::MIN.saturating_add(1));
        Self(RateLimiter::keyed(
            Quota::per_second(rate).allow_burst(burst),
        ))
    }

    /// Takes one token of `pod`'s bucket, if it has one left.
    pub fn allows(&self, pod: &str) -> bool {
        self.0.check_key(&pod.to_owned()).is_ok()
    }

    /// Forgets pods whose buckets are full again (they cost nothing to recreate).
    pub fn prune(&self) {
        self.0.retain_recent();
        self.0.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_gets_a_burst_of_twice_its_rate_and_others_theirs() {
        let rate = PodRate::new(10);
        let allowed = (0..100).filter(|_| rate.allows("busy")).count();
        assert!((20..=21).contains(&allowed), "{allowed}");
        assert!(rate.allows("quiet"));
    }
}
