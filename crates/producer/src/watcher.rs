//! Wake-ups for events that were written without one: one cheap watcher instead of a NOTIFY on
//! every writer's commit.
//!
//! Table-change capture's triggers append events inside the user's own transactions. A
//! `pg_notify` there would put every captured commit through PostgreSQL's global NOTIFY queue
//! lock (measured: captured single-row commits fall to a fraction), and a trigger cannot run after
//! commit. So nothing in the writer's transaction wakes anyone. Instead, one watcher per database
//! probes the newest *readable* event ([`event_store::position::NewestReadable`], one backward
//! index probe) every `interval`, and when it has moved, asks the [`Notifier`] for a wake-up — the
//! same after-commit notifier producers use, so bursts coalesce into one NOTIFY per interval from
//! a side connection.
//!
//! Exact, not heuristic: the probe only sees rows below the visibility horizon, and a row that
//! becomes readable later always sorts after every row readable now, so a late-committing
//! transaction moves the probe too (when the horizon passes it) and is never missed. What it costs:
//! up to one `interval` (default 1 ms) of extra latency, and one index probe per interval on one
//! connection. Consumers still poll as a fallback, so a watcher that is down delays events, never
//! loses them.

use std::time::Duration;

use event_store::db::{self, Database};
use event_store::position::{NewestReadable, Position};
use event_store::retry::{sleep_or_stop, Policy, Retry};
use event_store::Error;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::notifier::Notifier;

/// Runs until `shutdown` is cancelled: probes every `interval` and wakes consumers through
/// `notifier` whenever new events have become readable. Reconnects on its own (the shared retry
/// policy) when PostgreSQL goes away; needs only SELECT on `events` (the consumer role has it).
pub async fn run(
    db: Database,
    notifier: Notifier,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut last: Option<Position> = None;
    let mut retry = Retry::new(Policy::default());
    let mut connection: Option<(Client, NewestReadable)> = None;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        if connection.as_ref().is_none_or(|(c, _)| c.is_closed()) {
            match connect(&db).await {
                Ok(c) => connection = Some(c),
                Err(error) => {
                    let pause = retry.failed(
                        "The change watcher cannot reach PostgreSQL",
                        &error,
                        error.is_permanent(),
                    );
                    if sleep_or_stop(pause, &shutdown).await {
                        return;
                    }
                    continue;
                }
            }
        }
        let (client, probe) = connection.as_ref().expect("connected above");
        match probe.read(client).await {
            Ok(Some((position, topic))) => {
                if retry.succeeded() {
                    info!("The change watcher is probing again.");
                }
                if last.is_none_or(|seen| position > seen) {
                    // The first probe wakes too: events may have arrived while no watcher ran.
                    notifier.wake([topic.as_str()]);
                    metrics::counter!("watcher_wakeups_total").increment(1);
                    last = Some(position);
                }
            }
            Ok(None) => {
                retry.succeeded();
            }
            Err(error) => {
                connection = None;
                let pause = retry.failed(
                    "The change watcher's probe failed",
                    &error,
                    error.is_permanent(),
                );
                if sleep_or_stop(pause, &shutdown).await {
                    return;
                }
            }
        }
    }
}

async fn connect(db: &Database) -> Result<(Client, NewestReadable), Error> {
    let client = db::connect_spawned(db).await?;
    let probe = NewestReadable::prepare(&client).await?;
    Ok((client, probe))
}
