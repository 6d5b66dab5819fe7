//! Which consumers hold purging back, decided from their published positions.
//!
//! A consumer publishes the position it has durably delivered up to after every batch. The purger
//! may delete an event only at or before the slowest *active* consumer's position. A consumer is
//! active unless `--consumer-expiry` is set and its position has not been published for longer
//! than that (measured with the database clock, which stamps `updated_at`). `--force` ignores
//! every consumer; the pass then still purges what is safe first, so that only events past a
//! consumer are recorded as a forced purge.

use std::time::{Duration, SystemTime};

use event_store::position::{Position, PublishedPosition};

/// What a pass may delete and whose events that affects.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Plan {
    /// Delete only at or before this position (the slowest active consumer's); `None`: no active
    /// consumer, age alone decides.
    pub keep_after: Option<Position>,
    /// The slowest active consumer (the one `keep_after` comes from).
    pub slowest: Option<PublishedPosition>,
    /// Consumers past their expiry: they no longer hold purging back.
    pub expired: Vec<PublishedPosition>,
    /// With `--force`: the active consumers the forced part of the pass may take events from.
    pub overridden: Vec<PublishedPosition>,
}

impl Plan {
    /// `positions` in any order; `now` is the database clock.
    pub fn decide(
        positions: &[PublishedPosition],
        now: SystemTime,
        expiry: Option<Duration>,
        force: bool,
    ) -> Plan {
        let mut sorted: Vec<&PublishedPosition> = positions.iter().collect();
        sorted.sort_by_key(|p| p.position);
        let (expired, active): (Vec<&PublishedPosition>, Vec<&PublishedPosition>) = sorted
            .into_iter()
            .partition(|p| expiry.is_some_and(|expiry| idle(p, now) > expiry));
        let slowest = active.first().map(|p| (*p).clone());
        Plan {
            keep_after: slowest.as_ref().map(|p| p.position),
            slowest,
            expired: expired.into_iter().cloned().collect(),
            overridden: if force {
                active.into_iter().cloned().collect()
            } else {
                Vec::new()
            },
        }
    }
}

/// How long `consumer` has not published, by the database clock (zero if its clock ran ahead).
pub fn idle(consumer: &PublishedPosition, now: SystemTime) -> Duration {
    now.duration_since(consumer.updated_at).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn consumer(name: &str, id: i64, idle_for: Duration, now: SystemTime) -> PublishedPosition {
        PublishedPosition {
            consumer: name.into(),
            position: Position::new(100 + id as u64, id),
            updated_at: now - idle_for,
        }
    }

    #[test]
    fn no_consumers_means_age_alone() {
        let plan = Plan::decide(&[], SystemTime::now(), Some(HOUR), false);
        assert_eq!(plan, Plan::default());
    }

    #[test]
    fn the_slowest_active_consumer_holds_purging_back() {
        let now = SystemTime::now();
        let positions = [
            consumer("fast", 50, Duration::ZERO, now),
            consumer("slow", 10, 10 * HOUR, now),
            consumer("middle", 30, Duration::ZERO, now),
        ];
        let plan = Plan::decide(&positions, now, None, false);
        assert_eq!(plan.slowest.as_ref().unwrap().consumer, "slow");
        assert_eq!(plan.keep_after, Some(positions[1].position));
        assert!(plan.expired.is_empty() && plan.overridden.is_empty());
    }

    #[test]
    fn expired_consumers_stop_holding_back() {
        let now = SystemTime::now();
        let positions = [
            consumer("fast", 50, Duration::ZERO, now),
            consumer("gone", 10, 10 * HOUR, now),
            consumer("middle", 30, HOUR / 2, now),
        ];
        let plan = Plan::decide(&positions, now, Some(HOUR), false);
        assert_eq!(plan.slowest.as_ref().unwrap().consumer, "middle");
        assert_eq!(plan.keep_after, Some(positions[2].position));
        let expired: Vec<_> = plan.expired.iter().map(|p| p.consumer.as_str()).collect();
        assert_eq!(expired, ["gone"]);

        let all_gone = Plan::decide(&positions[1..2], now, Some(HOUR), false);
        assert_eq!(
            all_gone.keep_after, None,
            "age alone once every consumer expired"
        );
        assert_eq!(all_gone.expired.len(), 1);
    }

    #[test]
    fn force_names_the_active_consumers_it_overrides() {
        let now = SystemTime::now();
        let positions = [
            consumer("b", 20, Duration::ZERO, now),
            consumer("a", 10, Duration::ZERO, now),
            consumer("gone", 5, 10 * HOUR, now),
        ];
        let plan = Plan::decide(&positions, now, Some(HOUR), true);
        // The safe part of a forced pass still keeps what "a" needs.
        assert_eq!(plan.keep_after, Some(positions[1].position));
        let overridden: Vec<_> = plan
            .overridden
            .iter()
            .map(|p| p.consumer.as_str())
            .collect();
        assert_eq!(overridden, ["a", "b"]);
        assert_eq!(plan.expired.len(), 1);
    }

    #[test]
    fn a_clock_ahead_of_the_database_counts_as_not_idle() {
        let now = SystemTime::now();
        let ahead = consumer("ahead", 1, Duration::ZERO, now + HOUR);
        assert_eq!(idle(&ahead, now), Duration::ZERO);
    }
}
