//! Capped exponential backoff with jitter, for reconnecting.

use std::time::Duration;

use rand::Rng;

/// Delays of `first`, 2×, 4×, … up to `max`, each drawn uniformly from its upper half so that
/// many tasks that lost their connections together do not reconnect in lock-step.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            first,
            max: max.max(first),
            attempt: 0,
        }
    }

    /// The failed attempts so far (1 after the first failure).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Records a failure and returns how long to wait before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        self.attempt = self.attempt.saturating_add(1);
        let factor = 1u32 << (self.attempt - 1).min(16);
        let ceiling = self.first.saturating_mul(factor).min(self.max);
        let floor = ceiling / 2;
        rand::rng().random_range(floor..=ceiling)
    }

    /// After a success: the next failure waits `first` again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

impl Default for Backoff {
    /// 100 ms doubling up to 5 s: quick after a blip, gentle on a server that stays down.
    fn default() -> Backoff {
        Backoff::new(Duration::from_millis(100), Duration::from_secs(5))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_and_reset() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let ceilings = [100, 200, 400, 800, 1000, 1000];
        for (i, ceiling) in ceilings.into_iter().enumerate() {
            let d = b.next_delay();
            assert_eq!(b.attempt(), i as u32 + 1);
            let ceiling = Duration::from_millis(ceiling);
            assert!(d <= ceiling && d >= ceiling / 2, "attempt {i}: {d:?}");
        }
        for _ in 0..100 {
            assert!(b.next_delay() <= Duration::from_secs(1));
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
        assert_eq!(b.attempt(), 1);
    }
}
