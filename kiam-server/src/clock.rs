//! The server's clocks, behind seams its tests control.
//!
//! - Monotonic time (deadlines, pauses, how long a watch has failed, Event pacing) is
//!   `tokio::time::Instant`: paused and advanced by `#[tokio::test(start_paused = true)]`.
//! - Wall-clock time (credential expiry, which STS gives as an absolute time) is read through
//!   [`Clock`]: [`SystemClock`] in production, [`ManualClock`] in tests.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

/// Wall-clock time.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> SystemTime;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that moves only when told to; clones share one time.
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<Mutex<SystemTime>>);

impl ManualClock {
    /// Starts at the system's current time, so times made from it look real.
    pub fn new() -> Self {
        Self(Arc::new(Mutex::new(SystemTime::now())))
    }

    pub fn advance(&self, by: Duration) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) += by;
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_told_and_for_all_its_clones() {
        let clock = ManualClock::new();
        let shared = clock.clone();
        let start = clock.now();
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(clock.now(), start);
        shared.advance(Duration::from_secs(90));
        assert_eq!(clock.now(), start + Duration::from_secs(90));
    }
}
