//! A consumer's standing as PostgreSQL sees it: the position it published, how far behind that is
//! (events and seconds), when it last published (its heartbeat), and whether it is running now.
//! `status` and `lag` both report it.
//!
//! "Running" is known two ways: the consumer's lease (`event_store::lease`, a session advisory
//! lock it holds while it runs), and its LISTEN connection, which names itself
//! `events-consumer:<name>:listen` in `pg_stat_activity` (unless DATABASE_URL overrides
//! `application_name`).

use std::collections::HashMap;
use std::time::Duration;

use event_store::position::{self, Position};
use event_store::{db, lease};
use serde::Serialize;
use tokio_postgres::Client;

use crate::output;

/// How many pending events are counted exactly, per consumer: beyond it the count says "at
/// least", so that a consumer a million events behind costs no more than one this far behind.
pub const COUNT_CAP: i64 = 100_000;

#[derive(Debug, Clone, Serialize)]
pub struct Standing {
    pub consumer: String,
    /// The position it published to `consumer_positions` (after each committed batch).
    pub position: Position,
    /// Events after `position`, counted along the position index up to `lag_events_capped_at`.
    pub lag_events: i64,
    /// `Some(cap)` when the count stopped at the cap: the lag is at least `lag_events`.
    pub lag_events_capped_at: Option<i64>,
    /// Age of the oldest event it has not delivered (0 when caught up), by the database clock.
    pub lag_seconds: f64,
    /// When it last refreshed its `consumer_positions` row (each batch, and every heartbeat
    /// interval while idle).
    pub heartbeat: String,
    pub heartbeat_age_seconds: f64,
    /// The backend that shows it is running, if any.
    pub running: Option<Running>,
    #[serde(skip)]
    pub heartbeat_age: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct Running {
    pub pid: i32,
    /// `lease` (it holds its lease) or `connection` (its LISTEN connection is there).
    pub seen_by: &'static str,
}

impl Standing {
    pub fn lag_text(&self) -> String {
        match self.lag_events_capped_at {
            Some(_) => format!("≥{}", self.lag_events),
            None => self.lag_events.to_string(),
        }
    }
}

/// Every consumer that published a position (or only `only`: a consumer, or a consumer group's
/// partitions), slowest first.
pub async fn standings(
    client: &Client,
    only: Option<&str>,
    cap: i64,
) -> anyhow::Result<Vec<Standing>> {
    let now = db::now(client).await?;
    let listening = listening(client).await?;
    let mut out = Vec::new();
    for published in position::published_positions(client).await? {
        let of_group = event_store::group::split_name(&published.consumer).map(|(g, _)| g);
        if only.is_some_and(|name| name != published.consumer && Some(name) != of_group) {
            continue;
        }
        let backlog = position::backlog(client, published.position, cap).await?;
        let running = match lease::holder(client, &published.consumer).await? {
            Some(holder) => Some(Running {
                pid: holder.pid,
                seen_by: "lease",
            }),
            None => listening.get(&published.consumer).map(|&pid| Running {
                pid,
                seen_by: "connection",
            }),
        };
        let heartbeat_age = output::elapsed(published.updated_at, now);
        out.push(Standing {
            lag_events: backlog.events,
            lag_events_capped_at: (backlog.events >= cap).then_some(cap),
            lag_seconds: backlog
                .oldest
                .map_or(0.0, |t| output::elapsed(t, now).as_secs_f64()),
            heartbeat: output::time(published.updated_at),
            heartbeat_age_seconds: heartbeat_age.as_secs_f64(),
            heartbeat_age,
            running,
            consumer: published.consumer,
            position: published.position,
        });
    }
    Ok(out)
}

/// The consumers whose LISTEN connection is open now, by name.
pub async fn listening(client: &Client) -> anyhow::Result<HashMap<String, i32>> {
    let rows = client
        .query(
            "SELECT pid, application_name FROM pg_stat_activity
              WHERE application_name LIKE 'events-consumer:%:listen'",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .filter_map(|row| {
            let app: &str = row.get(1);
            let name = app
                .strip_prefix("events-consumer:")?
                .strip_suffix(":listen")?;
            Some((name.to_string(), row.get(0)))
        })
        .collect())
}

/// Why a consumer cannot be touched now, if it is running: its lease holder, or its connection.
pub async fn running(client: &Client, consumer: &str) -> anyhow::Result<Option<String>> {
    if let Some(holder) = lease::holder(client, consumer).await? {
        return Ok(Some(format!("it holds its lease ({holder})")));
    }
    if let Some(pid) = listening(client).await?.get(consumer) {
        return Ok(Some(format!(
            "its LISTEN connection is open (backend pid {pid}, application \
             \"events-consumer:{consumer}:listen\")"
        )));
    }
    Ok(None)
}

/// Is `target` ahead of the cluster's transaction counter? No event can ever be written there,
/// and a consumer whose checkpoint is there refuses to start (`event_store::position::REBASE_HINT`).
pub fn ahead_of_cluster(target: Position, next_xid: u64) -> bool {
    target.tx_id >= next_xid
}

/// Standing → state. Running consumers refresh their `consumer_positions` row every heartbeat
/// interval, idle or not, so an old heartbeat means stopped (or cut off from PostgreSQL).
pub fn state(s: &Standing, stale_after: Duration, expiry: Option<Duration>) -> &'static str {
    if expiry.is_some_and(|e| s.heartbeat_age > e) {
        "expired"
    } else if s.heartbeat_age > stale_after {
        "stale"
    } else if s.lag_events > 0 {
        "live"
    } else {
        "idle"
    }
}

/// Seconds as a short age: `3m 12s`.
pub fn seconds(s: f64) -> String {
    output::age(Duration::from_secs_f64(s.max(0.0)))
}
