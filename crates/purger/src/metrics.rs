//! The purger's metrics (served on `/metrics` with `--http-addr`).
//!
//! | name | type | meaning |
//! | --- | --- | --- |
//! | `purger_events_purged_total` | counter | events deleted (`forced="true"`: past an active consumer) |
//! | `purger_passes_total` | counter | passes, by `outcome` (`ok`, `error`) |
//! | `purger_last_pass_duration_seconds` | gauge | how long the last completed pass took |
//! | `purger_last_pass_deleted` | gauge | events the last completed pass deleted (or would, in a dry run) |
//! | `purger_held_back` | gauge | 1 when events older than the retention are kept for a consumer or an open transaction |
//! | `purger_held_back_by_consumer` | gauge | 1 for the consumer (label `consumer`) holding purging back, else 0 |
//! | `purger_oldest_event_age_seconds` | gauge | age of the oldest event left (0 when the table is empty) |
//! | `purger_expired_consumers` | gauge | consumers past `--consumer-expiry` that no longer hold purging back |

use std::collections::BTreeSet;

use metrics::{counter, gauge};

use crate::report::{HeldBack, PassReport};

/// Records events deleted by one batch, as they go (a pass that fails half-way still counts).
pub fn purged(events: u64, forced: bool) {
    counter!("purger_events_purged_total", "forced" => if forced { "true" } else { "false" })
        .increment(events);
}

pub fn pass_failed() {
    counter!("purger_passes_total", "outcome" => "error").increment(1);
}

/// Records a completed pass. `holders` remembers which consumers ever held purging back so their
/// gauge drops to 0 once they stop.
pub fn pass_finished(report: &PassReport, holders: &mut BTreeSet<String>) {
    counter!("purger_passes_total", "outcome" => "ok").increment(1);
    gauge!("purger_last_pass_duration_seconds").set(report.duration.as_secs_f64());
    gauge!("purger_last_pass_deleted").set(report.would_delete.unwrap_or(report.deleted) as f64);
    gauge!("purger_held_back").set(if report.held_back.is_some() { 1.0 } else { 0.0 });
    let holder = match &report.held_back {
        Some(HeldBack::Consumer { consumer, .. }) => Some(consumer.consumer.clone()),
        _ => None,
    };
    if let Some(name) = &holder {
        holders.insert(name.clone());
    }
    for name in holders.iter() {
        let value = if holder.as_ref() == Some(name) {
            1.0
        } else {
            0.0
        };
        gauge!("purger_held_back_by_consumer", "consumer" => name.clone()).set(value);
    }
    gauge!("purger_oldest_event_age_seconds")
        .set(report.oldest.map_or(0.0, |o| o.age.as_secs_f64()));
    gauge!("purger_expired_consumers").set(report.expired.len() as f64);
}
