//! Capped exponential backoff.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
    jitter: bool,
}

impl Backoff {
    /// Reconnecting to a database: 100 ms doubling to 10 s, with ±20 % jitter so that many
    /// consumers do not reconnect in lockstep after a server restart.
    pub fn reconnect() -> Backoff {
        Backoff {
            jitter: true,
            ..Backoff::new(Duration::from_millis(100), Duration::from_secs(10))
        }
    }

    /// Re-polling while an open transaction holds the visibility horizon back: 20 ms doubling
    /// to 1 s (short transactions that overlap are waited out quickly, long ones cheaply).
    pub fn horizon() -> Backoff {
        Backoff::new(Duration::from_millis(20), Duration::from_secs(1))
    }

    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max,
            next: initial,
            jitter: false,
        }
    }

    /// The pause before the next attempt.
    pub fn next_pause(&mut self) -> Duration {
        let pause = self.next;
        self.next = (self.next * 2).min(self.max);
        if self.jitter {
            pause.mul_f64(rand::random_range(0.8..1.2))
        } else {
            pause
        }
    }

    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_resets() {
        let mut b = Backoff::horizon();
        let pauses: Vec<u128> = (0..8).map(|_| b.next_pause().as_millis()).collect();
        assert_eq!(pauses, vec![20, 40, 80, 160, 320, 640, 1000, 1000]);
        b.reset();
        assert_eq!(b.next_pause(), Duration::from_millis(20));
        let mut r = Backoff::reconnect();
        for _ in 0..20 {
            assert!(r.next_pause() <= Duration::from_secs(12));
        }
    }
}
