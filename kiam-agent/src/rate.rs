//! Per-pod rates: how often one pod may open connections to the agent, and have requests
//! forwarded or relayed to the node's metadata service. Concurrency caps bound what a pod
//! holds; these bound what it churns through (a connect/close loop keeps the accept loop and
//! the listener's backlog busy; forwarded requests spend the node's metadata allowance, about
//! 1,024 packets a second per interface, which aws-node and the pass-through pods share).
//! Token buckets: `per_second` on average, bursts of twice that.
//!
//! A pod over its rate of new connections is also stopped in the kernel ([`Throttle`]): its
//! cgroup's connections to the metadata service fail in `connect()`, in its own context, so a
//! connect/close loop costs the pod that runs it, not the agent and the other pods. The first
//! time for a second; a cgroup over its rate again soon after is held twice as long each time
//! (up to [`LONGEST_HOLD`]): a pod that loops for good reaches the agent with one burst every
//! 16 s instead of one every second, and a pod that bursts once is held for a second.

use std::{collections::HashMap as StdHashMap, num::NonZeroU32, sync::Mutex, time::Duration};

use aya::maps::{HashMap, MapData};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// How long a cgroup over its pod's rate is first refused in the kernel.
pub const FIRST_HOLD: Duration = Duration::from_secs(1);
/// The longest a cgroup is refused at once.
pub const LONGEST_HOLD: Duration = Duration::from_secs(16);
/// A cgroup over its rate within this long after its last hold ended is held twice as long.
pub const REMEMBER_FOR: Duration = Duration::from_secs(30);

/// Where a cgroup over its pod's rate is stopped.
pub trait Throttle: Send + Sync + 'static {
    fn hold(&self, cgroup_id: u64);
}

/// One cgroup's last hold: when it ends and how long it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    pub until: Duration,
    pub length: Duration,
}

/// The next hold of a cgroup over its rate at `now` (a monotonic clock), given its last one.
/// While a hold lasts it stays as it is: the connections that were already queued when it
/// began are one offence, not one each.
pub fn next_hold(last: Option<Held>, now: Duration) -> Held {
    let length = match last {
        Some(last) if now < last.until => return last,
        Some(last) if now < last.until + REMEMBER_FOR => (last.length * 2).min(LONGEST_HOLD),
        _ => FIRST_HOLD,
    };
    Held {
        until: now + length,
        length,
    }
}

/// The kernel programs' `KIAM_THROTTLE`, and each cgroup's last hold.
pub struct KernelThrottle(Mutex<Holds>);

struct Holds {
    map: HashMap<MapData, u64, u64>,
    last: StdHashMap<u64, Held>,
}

impl KernelThrottle {
    pub fn new(map: HashMap<MapData, u64, u64>) -> Self {
        Self(Mutex::new(Holds {
            map,
            last: StdHashMap::new(),
        }))
    }
}

impl Throttle for KernelThrottle {
    fn hold(&self, cgroup_id: u64) {
        // The programs compare with bpf_ktime_get_ns(): CLOCK_MONOTONIC.
        let now = match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
            Ok(now) => Duration::from(now),
            Err(error) => {
                tracing::warn!(%error, "cannot read CLOCK_MONOTONIC");
                return;
            }
        };
        let mut guard = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let Holds { map, last: holds } = &mut *guard;
        // Holds are rare (at most one per cgroup a second): forgetting old ones here is cheap.
        holds.retain(|_, held| now < held.until + REMEMBER_FOR);
        let last = holds.get(&cgroup_id).copied();
        let held = next_hold(last, now);
        if Some(held) == last {
            return;
        }
        holds.insert(cgroup_id, held);
        let until = held.until.as_nanos().try_into().unwrap_or(u64::MAX);
        if let Err(error) = map.insert(cgroup_id, until, 0) {
            tracing::warn!(%error, cgroup_id, "cannot throttle a cgroup");
        } else {
            tracing::debug!(
                cgroup_id,
                seconds = held.length.as_secs(),
                "cgroup held in the kernel"
            );
        }
    }
}

/// No kernel to tell (tests of the listener alone).
pub struct NoThrottle;

impl Throttle for NoThrottle {
    fn hold(&self, _: u64) {}
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

    #[test]
    fn a_cgroup_over_its_rate_again_soon_is_held_twice_as_long_up_to_the_longest() {
        let s = Duration::from_secs;
        let first = next_hold(None, s(100));
        assert_eq!(
            first,
            Held {
                until: s(101),
                length: s(1)
            }
        );
        // Over its rate again right after each hold ends: 2, 4, 8, 16, 16 seconds.
        let mut held = first;
        for length in [2, 4, 8, 16, 16] {
            held = next_hold(Some(held), held.until);
            assert_eq!(held.length, s(length));
        }
        // Connections queued before a hold began change nothing while it lasts.
        assert_eq!(
            next_hold(Some(first), s(100) + Duration::from_millis(999)),
            first
        );
        // Again within REMEMBER_FOR of the end: still doubling from the last.
        let later = next_hold(Some(first), first.until + REMEMBER_FOR - s(1));
        assert_eq!(later.length, s(2));
        // Quiet for REMEMBER_FOR after its hold: a first hold again.
        let forgiven = next_hold(Some(held), held.until + REMEMBER_FOR);
        assert_eq!(forgiven.length, FIRST_HOLD);
    }
}
