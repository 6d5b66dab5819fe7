//! The shared rate limit and event budget of the load generator's tasks.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Spaces appends so that all tasks together stay at `rate` events per second. A task that falls
/// behind (an outage) does not burst to catch up: the schedule restarts from now.
#[derive(Debug)]
pub struct Pace {
    per_event: Duration,
    next: Mutex<Instant>,
}

impl Pace {
    /// `None` for a rate of 0 (as fast as possible).
    pub fn new(rate: f64) -> Option<Pace> {
        (rate > 0.0).then(|| Pace {
            per_event: Duration::from_secs_f64(1.0 / rate),
            next: Mutex::new(Instant::now()),
        })
    }

    /// Reserves `events` slots and returns when the first one starts.
    pub fn reserve(&self, events: u64) -> Instant {
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        let start = (*next).max(Instant::now());
        *next = start
            + self
                .per_event
                .saturating_mul(events.min(u32::MAX as u64) as u32);
        start
    }
}

/// How many events may still be started, for `--count`. Unlimited when `None`.
#[derive(Debug)]
pub struct Budget(Option<AtomicU64>);

impl Budget {
    pub fn new(limit: Option<u64>) -> Budget {
        Budget(limit.map(AtomicU64::new))
    }

    /// Takes up to `want` events; 0 once the budget is spent.
    pub fn take(&self, want: u64) -> u64 {
        let Some(left) = &self.0 else { return want };
        match left.fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
            Some(left - left.min(want))
        }) {
            Ok(before) => before.min(want),
            Err(_) => unreachable!("the update closure always succeeds"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_is_handed_out_exactly() {
        let budget = Budget::new(Some(250));
        let taken: Vec<u64> = (0..4).map(|_| budget.take(100)).collect();
        assert_eq!(taken, [100, 100, 50, 0]);
        assert_eq!(Budget::new(None).take(100), 100);
    }

    #[tokio::test(start_paused = true)]
    async fn pace_spaces_reservations_and_never_bursts_after_a_pause() {
        assert!(Pace::new(0.0).is_none());
        let pace = Pace::new(100.0).unwrap();
        let t0 = Instant::now();
        assert_eq!(pace.reserve(10), t0);
        assert_eq!(pace.reserve(1), t0 + Duration::from_millis(100));
        tokio::time::advance(Duration::from_secs(10)).await;
        // Far behind schedule: starts now, not 10 s ago.
        let now = Instant::now();
        assert_eq!(pace.reserve(1), now);
        assert_eq!(pace.reserve(1), now + Duration::from_millis(10));
    }
}
