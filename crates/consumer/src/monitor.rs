//! Periodic measurements: the lag (for `/metrics`) and the health of both databases and of
//! delivery itself (for `/healthz`).
//!
//! Delivery counts as *stuck* when committed events have been waiting longer than the stall
//! timeout and no batch was delivered for that long either — whatever the cause (MongoDB refusing
//! writes, a transaction holding the horizon back, PostgreSQL away). A consumer that is merely
//! busy catching up delivers batches, so it is not stuck.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use deadpool_postgres::Pool;
use event_store::position::{self, Backlog, Position};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::health::{Context, DELIVERY, POSTGRES};
use crate::sink::Probe;
use crate::writer::Committed;

/// The backlog is counted up to this many events, to keep the measurement cheap.
pub const BACKLOG_CAP: i64 = 100_000;

pub async fn monitor_loop(
    ctx: Arc<Context>,
    pool: Pool,
    prober: impl Probe,
    committed: watch::Receiver<Committed>,
    interval: Duration,
    stall_timeout: Duration,
    shutdown: CancellationToken,
) {
    let started = Instant::now();
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let position = committed.borrow().position;
        let probe_timeout = interval.max(Duration::from_secs(2));
        let (backlog, sink) = tokio::join!(
            tokio::time::timeout(probe_timeout, measure(&pool, position)),
            tokio::time::timeout(probe_timeout, prober.ping()),
        );
        let backlog =
            backlog.unwrap_or_else(|_| Err(Error::Timeout("measuring the backlog".into())));
        let sink = match sink {
            Ok(pinged) => pinged.map_err(Error::from),
            Err(_) => Err(Error::Timeout("pinging MongoDB".into())),
        };

        match &backlog {
            Ok(backlog) => {
                if ctx.status.postgres_error().is_none() {
                    ctx.health.ok(POSTGRES);
                }
                ctx.metrics.lag_events.set(backlog.events as f64);
                ctx.metrics
                    .lag_seconds
                    .set(age(backlog.oldest).as_secs_f64());
            }
            Err(e) => ctx.health.failing(POSTGRES, e.to_string()),
        }
        match sink {
            Ok(()) => ctx.sink_ok(false),
            Err(e) => ctx.sink_failing(e.to_string(), false),
        }

        let idle = ctx.status.since_last_commit(started);
        match &backlog {
            Ok(backlog)
                if backlog.events > 0
                    && age(backlog.oldest) > stall_timeout
                    && idle > stall_timeout =>
            {
                let cause = ctx
                    .status
                    .held_back_by()
                    .map(|b| format!("held back: {b}"))
                    .or_else(|| ctx.status.sink_error().map(|e| format!("writes fail: {e}")))
                    .or_else(|| {
                        ctx.status
                            .postgres_error()
                            .map(|e| format!("PostgreSQL: {e}"))
                    })
                    .unwrap_or_else(|| "cause unknown; see the log".into());
                ctx.health.failing(
                    DELIVERY,
                    format!(
                        "stuck: nothing delivered for {}, {}{} events waiting, the oldest for {}; {cause}",
                        seconds(idle),
                        if backlog.events >= BACKLOG_CAP { "at least " } else { "" },
                        backlog.events,
                        seconds(age(backlog.oldest)),
                    ),
                );
            }
            // PostgreSQL unreachable: its own check says so; nothing to add about delivery.
            Err(_) => {}
            Ok(_) => ctx.health.ok(DELIVERY),
        }
    }
}

async fn measure(pool: &Pool, position: Position) -> Result<Backlog> {
    let client = pool.get().await.map_err(|e| {
        Error::Store(event_store::Error::Pool {
            context: "get a PostgreSQL connection".into(),
            source: e,
        })
    })?;
    Ok(position::backlog(&client, position, BACKLOG_CAP).await?)
}

fn age(oldest: Option<SystemTime>) -> Duration {
    oldest
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .unwrap_or_default()
}

fn seconds(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
}
