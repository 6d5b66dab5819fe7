//! The one retry policy of every service: exponential backoff with jitter, reset only after a
//! stretch of health, and permanent errors straight to the longest pause.
//!
//! Why not "reset on success": a connection that is made and then fails at once (a revoked
//! privilege, a table dropped under a running service) succeeds at every reconnect, and a backoff
//! that resets there retries a permanent error several times a second, forever. Here a failure
//! resets the count only when the last failure lies at least [`Policy::healthy_after`] in the past
//! and something succeeded in between.
//!
//! ```
//! use event_store::retry::{sleep_or_stop, Policy, Retry};
//! # async fn demo(stop: tokio_util::sync::CancellationToken) {
//! let mut retry = Retry::new(Policy::default());
//! loop {
//!     match do_work().await {
//!         Ok(()) => {
//!             retry.succeeded();
//!         }
//!         Err(error) => {
//!             // Logs `attempt` and `retry_in`; a permanent error waits the cap at once.
//!             let pause = retry.failed("Cannot reach PostgreSQL", &error, false);
//!             if sleep_or_stop(pause, &stop).await {
//!                 break; // shutting down
//!             }
//!         }
//!     }
//! }
//! # }
//! # async fn do_work() -> Result<(), String> { Ok(()) }
//! ```

use std::fmt;
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What to do about a failure: the one question every retry loop asks of an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Waiting is likely to fix it (a server restarting, a network blip): retry with the policy.
    Soon,
    /// An operator must fix it (credentials, privileges, a missing table) and may while we wait:
    /// at start-up, exit with the error; later, retry at the policy's slowest pace.
    Slowly,
    /// Going on would lose or corrupt events, or the configuration cannot work: stop.
    Never,
}

impl Decision {
    /// Retry at the slowest pace (the `permanent` argument of [`Retry::failed`]).
    pub fn is_slow(self) -> bool {
        self == Decision::Slowly
    }
}

/// How a service retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// The pause after the first failure.
    pub first: Duration,
    /// The longest pause; permanent errors wait this long at once.
    pub cap: Duration,
    /// How long without a failure (and with a success) before the count starts again.
    pub healthy_after: Duration,
}

impl Default for Policy {
    /// 100 ms doubling to 30 s; healthy again after a minute without failures. Quick after a
    /// blip, a line or two a minute for a problem that stays.
    fn default() -> Policy {
        Policy {
            first: Duration::from_millis(100),
            cap: Duration::from_secs(30),
            healthy_after: Duration::from_secs(60),
        }
    }
}

impl Policy {
    /// The ceiling of the pause after `attempt` failures (before jitter).
    fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32 << attempt.saturating_sub(1).min(20);
        self.first.saturating_mul(factor).min(self.cap)
    }
}

/// Re-polling while an open transaction holds the visibility horizon back (committed rows wait
/// behind it): 20 ms doubling to 1 s, so short overlapping transactions are waited out quickly and
/// long ones cheaply.
pub const HORIZON_POLL: Policy = Policy {
    first: Duration::from_millis(20),
    cap: Duration::from_secs(1),
    healthy_after: Duration::ZERO,
};

/// One retrying activity's state (a connection, a loop). Not shared between tasks.
#[derive(Debug, Clone)]
pub struct Retry {
    policy: Policy,
    attempt: u32,
    last_failure: Option<Instant>,
    succeeded_since_failure: bool,
}

impl Retry {
    pub fn new(policy: Policy) -> Retry {
        Retry {
            policy,
            attempt: 0,
            last_failure: None,
            succeeded_since_failure: false,
        }
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Failures counted so far (1 after the first); 0 when healthy.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Records a failure and returns the pause before the next attempt, without logging:
    /// `first`, 2×, 4×, … up to `cap`, each drawn from the upper half of its range (so that many
    /// services that lost their server together do not return in lock-step). A `permanent`
    /// error (see [`crate::Error::is_permanent`]) waits the cap at once.
    pub fn next_pause(&mut self, permanent: bool) -> Duration {
        let now = Instant::now();
        if self.succeeded_since_failure
            && self
                .last_failure
                .is_some_and(|at| now.duration_since(at) >= self.policy.healthy_after)
        {
            self.attempt = 0;
        }
        self.attempt = self.attempt.saturating_add(1);
        self.last_failure = Some(now);
        self.succeeded_since_failure = false;
        let ceiling = if permanent {
            self.policy.cap
        } else {
            self.policy.ceiling(self.attempt)
        };
        rand::rng().random_range(ceiling / 2..=ceiling)
    }

    /// [`Retry::next_pause`], logged once as a warning with `error`, `attempt` and `retry_in`:
    /// `what` says what failed ("Cannot reach PostgreSQL").
    pub fn failed(&mut self, what: &str, error: &dyn fmt::Display, permanent: bool) -> Duration {
        let pause = self.next_pause(permanent);
        tracing::warn!(
            error = %error,
            attempt = self.attempt,
            retry_in = %humantime::format_duration(round(pause)),
            permanent,
            "{what}; retrying."
        );
        pause
    }

    /// Records a success. Returns `true` for the first success after failures (for a "back
    /// again" log line). The failure count is kept until [`Policy::healthy_after`] has passed.
    pub fn succeeded(&mut self) -> bool {
        let first = self.attempt > 0 && !self.succeeded_since_failure;
        self.succeeded_since_failure = true;
        if self
            .last_failure
            .is_some_and(|at| at.elapsed() >= self.policy.healthy_after)
        {
            self.attempt = 0;
            self.last_failure = None;
        }
        first
    }
}

/// Milliseconds are enough in logs.
fn round(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

/// Sleeps for `pause` unless `stop` is cancelled first; `true` when stopping.
pub async fn sleep_or_stop(pause: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = stop.cancelled() => true,
        _ = tokio::time::sleep(pause) => stop.is_cancelled(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            first: Duration::from_millis(100),
            cap: Duration::from_secs(2),
            healthy_after: Duration::from_secs(10),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn pauses_double_with_jitter_up_to_the_cap() {
        let mut r = Retry::new(policy());
        for (i, ceiling) in [100, 200, 400, 800, 1600, 2000, 2000]
            .into_iter()
            .enumerate()
        {
            let pause = r.next_pause(false);
            let ceiling = Duration::from_millis(ceiling);
            assert!(
                pause <= ceiling && pause >= ceiling / 2,
                "attempt {i}: {pause:?}"
            );
            assert_eq!(r.attempt(), i as u32 + 1);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_resets_only_after_a_stretch_of_health() {
        let mut r = Retry::new(policy());
        for _ in 0..5 {
            r.next_pause(false);
        }
        // Reconnects that succeed and fail at once keep climbing.
        assert!(
            r.succeeded(),
            "the first success after failures is reported"
        );
        assert!(!r.succeeded());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(r.next_pause(false) >= Duration::from_secs(1));
        assert_eq!(r.attempt(), 6);
        // A long healthy stretch starts over.
        r.succeeded();
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(r.next_pause(false) <= Duration::from_millis(100));
        assert_eq!(r.attempt(), 1);
        // Without a success in between, time alone does not reset.
        tokio::time::advance(Duration::from_secs(60)).await;
        r.next_pause(false);
        assert_eq!(r.attempt(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_errors_wait_the_cap_at_once() {
        let mut r = Retry::new(policy());
        let pause = r.next_pause(true);
        assert!(pause >= Duration::from_secs(1) && pause <= Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn sleep_or_stop_returns_early_on_stop() {
        let stop = CancellationToken::new();
        assert!(!sleep_or_stop(Duration::from_millis(10), &stop).await);
        stop.cancel();
        let started = Instant::now();
        assert!(sleep_or_stop(Duration::from_secs(3600), &stop).await);
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}
