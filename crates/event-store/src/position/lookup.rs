//! Where a position is: which database it was read from, the event stored there, and the
//! positions operator tools start from (a time, the ends of the stream, counts between two).

use std::fmt;
use std::time::SystemTime;

use tokio_postgres::{Client, Row};

use super::Position;
use crate::error::{Error, Result};

/// Which database a reader reads: the cluster's system identifier (new with every `initdb`, kept
/// by physical replicas) and the database's name. A checkpoint records it, so a consumer pointed
/// at another database, or at a new cluster, notices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub system_id: String,
    pub database: String,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "database {:?} of cluster {}",
            self.database, self.system_id
        )
    }
}

/// The [`Origin`] of `client`'s database (`pg_control_system()` is readable by every role).
pub async fn origin(client: &Client) -> Result<Origin> {
    let row = client
        .query_one(
            "SELECT system_identifier::text, current_database()::text FROM pg_control_system()",
            &[],
        )
        .await
        .map_err(|e| Error::database("read the cluster's system identifier", e))?;
    let read = |i: usize| {
        row.try_get::<_, String>(i)
            .map_err(|e| Error::database("read the cluster's system identifier", e))
    };
    Ok(Origin {
        system_id: read(0)?,
        database: read(1)?,
    })
}

/// The `event_id` of the event stored at `position`, if any.
pub async fn event_at(client: &Client, position: Position) -> Result<Option<uuid::Uuid>> {
    let row = client
        .query_opt(
            "SELECT event_id FROM events WHERE id = $2 AND tx_id = $1::text::xid8",
            &[&position.tx_text(), &position.id],
        )
        .await
        .map_err(|e| Error::database(format!("look up the event at {position}"), e))?;
    row.map(|row| row.try_get(0))
        .transpose()
        .map_err(|e| Error::database(format!("look up the event at {position}"), e))
}

/// The oldest event still in the table, if any.
pub async fn oldest(client: &Client) -> Result<Option<(Position, SystemTime)>> {
    let row = client
        .query_opt(
            // Qualified: a bare `tx_id` would sort by the text output column of the same name
            // (wrong across a digit-count boundary, and a full sort instead of the index).
            "SELECT e.tx_id::text, e.id, e.created_at FROM events e ORDER BY e.tx_id, e.id LIMIT 1",
            &[],
        )
        .await
        .map_err(|e| Error::database("find the oldest event", e))?;
    row.map(|row| Ok((Position::from_text(row.get(0), row.get(1))?, row.get(2))))
        .transpose()
}

/// The newest position of `topics` at or before `head` (`None` when they have none): what the
/// gateway names in a `reset`, so a client learns nothing of topics it did not ask for. One
/// backward index scan.
pub async fn newest_of_topics(
    client: &Client,
    topics: &[String],
    head: Position,
) -> Result<Option<Position>> {
    let row = client
        .query_opt(
            "SELECT e.tx_id::text, e.id FROM events e
              WHERE (e.tx_id, e.id) <= ($1::text::xid8, $2::bigint)
                AND e.topic = ANY($3::text[])
              ORDER BY e.tx_id DESC, e.id DESC
              LIMIT 1",
            &[&head.tx_id.to_string(), &head.id, &topics],
        )
        .await
        .map_err(|e| Error::database("read the newest position of a reset stream's topics", e))?;
    row.map(|row| Position::from_text(row.get(0), row.get(1)))
        .transpose()
}

// ---------------------------------------------------------------------------------------------
// Where to start reading, and how much lies between two positions (operator tools: `eventsctl
// reset --to …`, `tail --from …`, `status`).

/// The position just before the first event (in position order) created at or after `time`, or
/// `None` when no event is that recent. A reader placed there reads every event created since
/// `time` — and possibly a few older ones, because `created_at` (the writing transaction's start)
/// does not follow commit order: re-reading is safe, skipping is not.
pub async fn before_time(client: &Client, time: SystemTime) -> Result<Option<Position>> {
    let row = client
        .query_opt(
            "SELECT e.tx_id::text, e.id FROM events e
              WHERE e.created_at >= $1
              ORDER BY e.tx_id, e.id
              LIMIT 1",
            &[&time],
        )
        .await
        .map_err(|e| Error::database("find the first event created after a time", e))?;
    row.map(|row| {
        let first = Position::from_text(row.get(0), row.get(1))?;
        // Nothing lies between (tx, id - 1) and (tx, id): ids are integers, and no event of an
        // earlier position was created after `time` (this one is the first).
        Ok(Position::new(first.tx_id, first.id - 1))
    })
    .transpose()
}

/// Events after `after` up to and including `up_to`, counted along the position index and
/// stopping at `cap` (so the answer is exact below `cap`, and "at least `cap`" at it).
pub async fn count_between(
    client: &Client,
    after: Position,
    up_to: Position,
    cap: i64,
) -> Result<i64> {
    let row = client
        .query_one(
            "SELECT count(*) FROM (SELECT 1 FROM events
                WHERE (tx_id, id) > ($1::text::xid8, $2::bigint)
                  AND (tx_id, id) <= ($3::text::xid8, $4::bigint)
                ORDER BY tx_id, id LIMIT $5) AS page",
            &[
                &after.tx_text(),
                &after.id,
                &up_to.tx_text(),
                &up_to.id,
                &cap.max(0),
            ],
        )
        .await
        .map_err(|e| Error::database("count the events between two positions", e))?;
    Ok(row.get(0))
}

/// The first and the last event by position, each with its `created_at`; `None` when the table
/// is empty. Two index probes, however large the table.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ends {
    pub oldest: (Position, SystemTime),
    pub newest: (Position, SystemTime),
}

pub async fn ends(client: &Client) -> Result<Option<Ends>> {
    let rows = client
        .query(
            "(SELECT e.tx_id::text, e.id, e.created_at FROM events e ORDER BY e.tx_id, e.id LIMIT 1)
             UNION ALL
             (SELECT e.tx_id::text, e.id, e.created_at FROM events e
               ORDER BY e.tx_id DESC, e.id DESC LIMIT 1)",
            &[],
        )
        .await
        .map_err(|e| Error::database("read the first and last event", e))?;
    if rows.len() < 2 {
        return Ok(None);
    }
    let end = |row: &Row| -> Result<(Position, SystemTime)> {
        Ok((Position::from_text(row.get(0), row.get(1))?, row.get(2)))
    };
    Ok(Some(Ends {
        oldest: end(&rows[0])?,
        newest: end(&rows[1])?,
    }))
}
