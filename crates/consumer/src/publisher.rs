//! Publishes the committed position to PostgreSQL (`consumer_positions`), where the purger reads
//! what every consumer still needs. Best effort and off the delivery path: it follows the latest
//! committed position (intermediate ones are skipped when it lags), retries with backoff when
//! PostgreSQL is away, and publishes once at start so the purger knows the consumer exists (a new
//! consumer publishes the very beginning, holding every event for it). That first publish may move
//! the position *back* (a checkpoint reset or restored from an older backup), and so may the first
//! after a rewind; others only move it forward.
//!
//! **Heartbeat.** The row is also refreshed every heartbeat interval when nothing moves, so
//! `updated_at` is the last sign of life: the purger's consumer expiry counts from it, and an idle
//! but healthy consumer never looks dead.

use std::time::Duration;

use deadpool_postgres::Pool;
use event_store::position::{self, Position};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::writer::Committed;
use event_store::retry::{sleep_or_stop, Policy, Retry};

const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn publish_loop(
    pool: Pool,
    name: String,
    mut committed: watch::Receiver<Committed>,
    heartbeat: Duration,
    shutdown: CancellationToken,
) {
    let mut retry = Retry::new(Policy::default());
    let mut failures = 0u32;
    // The rewind count last published with `register`; `None` before the first publish.
    let mut registered: Option<u64> = None;
    loop {
        let Committed {
            position, rewinds, ..
        } = *committed.borrow_and_update();
        match publish(&pool, &name, position, registered != Some(rewinds)).await {
            Ok(()) => {
                registered = Some(rewinds);
                if failures > 0 {
                    info!(attempts = failures, position = %position, "Publishing the position works again.");
                }
                failures = 0;
                retry.succeeded();
            }
            Err(e) => {
                failures += 1;
                // Quiet after the first few: the fetcher already reports PostgreSQL outages.
                if failures <= 3 || failures % 20 == 0 {
                    warn!(error = %e, attempt = failures,
                          "Cannot publish the position to PostgreSQL for the purger; retrying.");
                }
                if sleep_or_stop(retry.next_pause(e.decision().is_slow()), &shutdown).await {
                    break;
                }
                continue;
            }
        }
        tokio::select! {
            changed = committed.changed() => if changed.is_err() { break },
            // Idle: publish the same position again, as a heartbeat.
            _ = tokio::time::sleep(heartbeat) => {}
            _ = shutdown.cancelled() => break,
        }
    }
    // The last position, so the purger does not hold back more than needed while we are away.
    let Committed {
        position, rewinds, ..
    } = *committed.borrow();
    if let Err(e) = publish(&pool, &name, position, registered != Some(rewinds)).await {
        warn!(error = %e, "Cannot publish the final position.");
    }
}

/// `register`: the first publish of this run, which may move the position back.
async fn publish(pool: &Pool, name: &str, position: Position, register: bool) -> Result<()> {
    let work = async {
        let client = pool.get().await.map_err(|e| {
            Error::Store(event_store::Error::Pool {
                context: "get a PostgreSQL connection".into(),
                source: e,
            })
        })?;
        if register {
            position::register(&client, name, position).await?;
        } else {
            position::publish(&client, name, position).await?;
        }
        Ok(())
    };
    tokio::time::timeout(PUBLISH_TIMEOUT, work)
        .await
        .unwrap_or_else(|_| Err(Error::Timeout("publishing the position".into())))
}
