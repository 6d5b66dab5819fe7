//! A consumer's lease: "a process named X is running now", visible to anyone who can connect.
//!
//! Operator tools must not move a consumer's checkpoint under a running consumer (the consumer
//! would overwrite it with its next batch, or deliver from a position it no longer has). A
//! running consumer therefore holds a PostgreSQL *session* advisory lock keyed by its name, on its
//! own long-lived connection; `eventsctl reset` takes the same lock before it writes, and refuses
//! while someone else has it.
//!
//! Why an advisory lock: it needs no table, no privilege and no clean-up — PostgreSQL releases it
//! when the session ends, crash and `kill -9` included, so a dead consumer never leaves a stale
//! lease behind. It is tied to one session: take it on a direct connection that lives as long as
//! the process (the consumer's LISTEN connection), never on a pooled one, and take it again after
//! reconnecting. It does not work through PgBouncer in transaction pooling mode (neither does
//! LISTEN).
//!
//! The key is the 64-bit `hashtextextended` of `pgevents.consumer:<name>`: one lock space per
//! database, and a collision with anyone else's advisory locks would need a 64-bit hash clash.
//! Anyone may see who holds it in `pg_locks` (readable by every role).

use std::time::Duration;

use tokio_postgres::Client;

use crate::error::{Error, Result};

/// The key of `consumer`'s lease, as SQL over the bound name `$1`.
const KEY_SQL: &str = "hashtextextended('pgevents.consumer:' || $1::text, 0)";

/// The session that holds a consumer's lease.
#[derive(Debug, Clone, PartialEq)]
pub struct Holder {
    /// Backend process id (`pg_stat_activity.pid`).
    pub pid: i32,
    /// Its login role, when visible.
    pub user: Option<String>,
    pub application_name: Option<String>,
    pub client_addr: Option<String>,
    /// How long that session has been connected.
    pub connected_for: Option<Duration>,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "backend pid {}", self.pid)?;
        if let Some(user) = &self.user {
            write!(f, ", user {user}")?;
        }
        if let Some(app) = self.application_name.as_deref().filter(|a| !a.is_empty()) {
            write!(f, ", application {app:?}")?;
        }
        if let Some(addr) = &self.client_addr {
            write!(f, ", from {addr}")?;
        }
        if let Some(d) = self.connected_for {
            let d = Duration::from_secs(d.as_secs());
            write!(f, ", connected for {}", humantime::format_duration(d))?;
        }
        Ok(())
    }
}

/// Takes `consumer`'s lease for this session if nobody holds it; `false` when another session
/// does. Held until [`release`] or until the session ends. Taking it again in the same session
/// succeeds (the lock nests: release as often as acquired, or end the session).
///
/// The consumer calls this once per connection of its LISTEN loop, right after connecting.
pub async fn try_acquire(client: &Client, consumer: &str) -> Result<bool> {
    let row = client
        .query_one(
            &format!("SELECT pg_try_advisory_lock({KEY_SQL})"),
            &[&consumer],
        )
        .await
        .map_err(|e| Error::database(format!("take the lease of consumer {consumer:?}"), e))?;
    Ok(row.get(0))
}

/// Takes consumer `consumer`'s lease on this connection, or fails with [`Error::LeaseHeld`] naming
/// the holder: while it is held, `eventsctl reset` refuses to move the checkpoint, and a second
/// process with the same name waits instead of writing beside this one. The lease ends with the
/// connection; should an operator move the checkpoint while it is lost, the consumer finds the
/// checkpoint moved and rewinds, so nothing is skipped either way.
pub async fn take(client: &Client, consumer: &str) -> Result<()> {
    if try_acquire(client, consumer).await? {
        return Ok(());
    }
    let holder = holder(client, consumer).await.ok().flatten();
    Err(Error::LeaseHeld(format!(
        "another session holds the lease of consumer {consumer:?} ({}): another consumer with \
         this name is running, or `eventsctl reset` is moving its checkpoint; waiting for it to end",
        holder.map_or("holder not visible".into(), |h| h.to_string())
    )))
}

/// Gives `consumer`'s lease back (one level, if taken more than once). `false` when this session
/// did not hold it.
pub async fn release(client: &Client, consumer: &str) -> Result<bool> {
    let row = client
        .query_one(
            &format!("SELECT pg_advisory_unlock({KEY_SQL})"),
            &[&consumer],
        )
        .await
        .map_err(|e| Error::database(format!("release the lease of consumer {consumer:?}"), e))?;
    Ok(row.get(0))
}

/// Who holds `consumer`'s lease, if anyone (this session included).
pub async fn holder(client: &Client, consumer: &str) -> Result<Option<Holder>> {
    // A bigint advisory key shows in pg_locks as classid = high 32 bits, objid = low 32 bits,
    // objsubid = 1 (both as unsigned oids).
    let row = client
        .query_opt(
            &format!(
                "WITH k AS (SELECT {KEY_SQL} AS key)
                 SELECT l.pid, a.usename::text, a.application_name, host(a.client_addr),
                        extract(epoch FROM now() - a.backend_start)::float8
                   FROM k, pg_locks l
                   LEFT JOIN pg_stat_activity a ON a.pid = l.pid
                  WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
                    AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                    AND l.classid::text::bigint = (k.key >> 32) & 4294967295
                    AND l.objid::text::bigint = k.key & 4294967295
                  LIMIT 1"
            ),
            &[&consumer],
        )
        .await
        .map_err(|e| Error::database(format!("look up the lease of consumer {consumer:?}"), e))?;
    Ok(row.map(|row| Holder {
        pid: row.get(0),
        user: row.get(1),
        application_name: row.get(2),
        client_addr: row.get(3),
        connected_for: row
            .get::<_, Option<f64>>(4)
            .map(|s| Duration::from_secs_f64(s.max(0.0))),
    }))
}

/// Is `consumer`'s lease held by any session?
pub async fn is_held(client: &Client, consumer: &str) -> Result<bool> {
    Ok(holder(client, consumer).await?.is_some())
}
