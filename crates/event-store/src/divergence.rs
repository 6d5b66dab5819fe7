//! "Is this still the database my checkpoint came from?" — asked by a reader with a stored
//! position (the consumer, at start and on every reconnect; the gateway, of a resume position).
//!
//! A position `(tx_id, id)` only means something in the database it was read from. Three ways to
//! lose that silently, each caught here before anything is fetched:
//!
//! - **A restore into a new cluster**: transaction ids restart, so the checkpoint is *ahead* of
//!   the cluster's counter and every new event would sort behind it ([`check_not_ahead`]).
//! - **A failover that lost commits**: the new primary reuses transaction ids and event ids, and
//!   once its counter passes the checkpoint again, new events hide behind it. The checkpoint
//!   records the `event_id` of the row at its position; if that row now holds another event, or
//!   is gone without a purge having removed it, the stream diverged.
//! - **Another database**: `DATABASE_URL` pointed elsewhere. The checkpoint records the cluster's
//!   system identifier and the database's name.
//!
//! A diverged consumer stops with an error that says what it found and the ways out: restart with
//! `--accept-divergence` (carry on from the checkpoint, accepting that events may have been lost
//! or skipped), or move the checkpoint with `eventsctl reset`. Checkpoints written before these
//! fields existed, or by `eventsctl reset`, skip the event check.

use crate::position::{self, Origin, Position};
use tokio_postgres::Client;
use tracing::warn;

use crate::error::{Error, Result};

/// The way out, appended to every divergence error.
const WAY_OUT: &str = "If this database is the right one and you accept that events between the \
     checkpoint and now may have been lost or skipped, restart with --accept-divergence \
     (CONSUMER_ACCEPT_DIVERGENCE=true); or move the checkpoint with `eventsctl reset <consumer> \
     --to <position|time>` and let the consumer deliver from there";

/// What the consumer expects to find: its checkpoint.
#[derive(Debug, Clone, Default)]
pub struct Expected {
    pub position: Position,
    pub event_id: Option<uuid::Uuid>,
    pub origin: Option<Origin>,
}

/// Fails when `position` is ahead of the cluster's transaction counter: the events database was
/// restored into a new cluster, where transaction ids restart; delivering from there would skip
/// every new event.
pub async fn check_not_ahead(client: &Client, name: &str, position: Position) -> Result<()> {
    let row = client
        .query_one("SELECT pg_snapshot_xmax(pg_current_snapshot())::text", &[])
        .await
        .map_err(|e| Error::database("read the cluster's transaction counter", e))?;
    let next: u64 = row
        .try_get::<_, &str>(0)
        .ok()
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| Error::Schema("unexpected xid8 text from the server".into()))?;
    if position.tx_id >= next {
        return Err(Error::Integrity(format!(
            "consumer {name:?} is at position {position}, but this PostgreSQL cluster's next \
             transaction id is {next}: {}",
            position::REBASE_HINT
        )));
    }
    Ok(())
}

/// Checks that the database behind `client` is the one `expected` was read from; returns its
/// origin (for the next checkpoints). With `accept`, a divergence is logged and accepted.
pub async fn check(
    client: &Client,
    name: &str,
    expected: &Expected,
    accept: bool,
) -> Result<Origin> {
    check_not_ahead(client, name, expected.position).await?;
    let here = position::origin(client).await?;
    let found = match &expected.origin {
        Some(origin) if *origin != here => Some(format!(
            "its checkpoint {} was written reading {origin}, but DATABASE_URL now leads to {here}",
            expected.position
        )),
        _ => None,
    };
    let found = match found {
        Some(found) => Some(found),
        None => event_mismatch(client, expected).await?,
    };
    let Some(found) = found else { return Ok(here) };
    let message = format!("consumer {name:?} refuses to go on: {found}. {WAY_OUT}");
    if accept {
        warn!(
            consumer = name,
            "{found}; going on because --accept-divergence is set."
        );
        return Ok(here);
    }
    Err(Error::Integrity(message))
}

/// Whether the event recorded at the checkpoint is still there (or was purged).
async fn event_mismatch(client: &Client, expected: &Expected) -> Result<Option<String>> {
    let (Some(event_id), false) = (expected.event_id, expected.position == Position::START) else {
        return Ok(None);
    };
    let position = expected.position;
    match position::event_at(client, position).await? {
        Some(stored) if stored == event_id => Ok(None),
        Some(stored) => Ok(Some(format!(
            "the event at its checkpoint {position} was {event_id}, but the database now holds \
             {stored} there (commits were lost, e.g. by a failover, and ids reused, or this is \
             another database)"
        ))),
        None => {
            let purged = position::watermark(client)
                .await?
                .is_some_and(|w| w.position >= position);
            if purged {
                Ok(None)
            } else {
                Ok(Some(format!(
                    "the event at its checkpoint {position} ({event_id}) is gone and no purge \
                     removed it (commits were lost, e.g. by a failover, or this is another \
                     database)"
                )))
            }
        }
    }
}
