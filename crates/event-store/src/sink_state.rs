//! The checkpoints and dead letters of sinks that have no store of their own (HTTP webhooks),
//! kept in PostgreSQL (`sink_checkpoints`, `sink_dead_letters`, migration V11).
//!
//! A webhook receiver offers no transaction to join, so the order is: record the request about
//! to be sent (its end, [`begin_request`]), send it, and after the receiver's 2xx move the
//! checkpoint to that end ([`commit_request`]), dead letters in the same PostgreSQL transaction.
//! A crash between the 2xx and the commit sends the same events again — as the same request,
//! since the pending end survived, so its idempotency key is the same too.
//!
//! Every update names the position it expects to move from (compare-and-set): a checkpoint that
//! moved under the consumer (`eventsctl reset`, a second writer) is reported, never overwritten.

use sha2::{Digest, Sha256};
use tokio_postgres::{Client, GenericClient};

use crate::error::{Error, Result};
use crate::position::{Origin, Position};

/// How much of a dead letter's payload is kept (its full length and hash are kept too).
pub const PAYLOAD_BYTES: usize = 64 * 1024;
/// How much of a dead letter's key, type and detail is kept.
pub const FIELD_BYTES: usize = 4 * 1024;

/// A consumer's stored checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkCheckpoint {
    pub position: Position,
    /// The event at `position` when it was written (for the divergence check).
    pub event_id: Option<uuid::Uuid>,
    pub origin: Option<Origin>,
    /// The end of a request that was sent (or about to be) and not confirmed.
    pub pending: Option<Position>,
}

/// `consumer`'s checkpoint, `None` before its first request.
pub async fn load(client: &impl GenericClient, consumer: &str) -> Result<Option<SinkCheckpoint>> {
    let row = client
        .query_opt(
            "SELECT tx_id::text, id, event_id, origin_system, origin_database,
                    pending_tx_id::text, pending_id
               FROM sink_checkpoints WHERE consumer = $1",
            &[&consumer],
        )
        .await
        .map_err(|e| Error::database(format!("read the checkpoint of consumer {consumer:?}"), e))?;
    let Some(row) = row else { return Ok(None) };
    let origin = match (
        row.get::<_, Option<String>>(3),
        row.get::<_, Option<String>>(4),
    ) {
        (Some(system_id), Some(database)) => Some(Origin {
            system_id,
            database,
        }),
        _ => None,
    };
    let pending = match (row.get::<_, Option<&str>>(5), row.get::<_, Option<i64>>(6)) {
        (Some(tx), Some(id)) => Some(Position::from_text(tx, id)?),
        _ => None,
    };
    Ok(Some(SinkCheckpoint {
        position: Position::from_text(row.get(0), row.get(1))?,
        event_id: row.get(2),
        origin,
        pending,
    }))
}

/// Records that the request taking `consumer` from `from` to `to` is about to be sent. `Err`
/// of the outer result: the database failed; `Ok(Err(found))`: the checkpoint is not at `from`
/// (`found`, `None` when there is none).
pub async fn begin_request(
    client: &Client,
    consumer: &str,
    sink: &str,
    from: Position,
    to: Position,
) -> Result<std::result::Result<(), Option<Position>>> {
    let context = || format!("record the request in flight of consumer {consumer:?}");
    let updated = client
        .execute(
            "UPDATE sink_checkpoints
                SET pending_tx_id = $4::text::xid8, pending_id = $5, updated_at = now()
              WHERE consumer = $1 AND tx_id = $2::text::xid8 AND id = $3",
            &[&consumer, &from.tx_text(), &from.id, &to.tx_text(), &to.id],
        )
        .await
        .map_err(|e| Error::database(context(), e))?;
    if updated == 1 {
        return Ok(Ok(()));
    }
    if from == Position::START {
        let inserted = client
            .execute(
                "INSERT INTO sink_checkpoints (consumer, sink, tx_id, id, pending_tx_id, pending_id)
                 VALUES ($1, $2, '0'::xid8, 0, $3::text::xid8, $4)
                 ON CONFLICT (consumer) DO NOTHING",
                &[&consumer, &sink, &to.tx_text(), &to.id],
            )
            .await
            .map_err(|e| Error::database(context(), e))?;
        if inserted == 1 {
            return Ok(Ok(()));
        }
    }
    Ok(Err(load(client, consumer).await?.map(|c| c.position)))
}

/// A dead letter as stored.
#[derive(Debug, Clone)]
pub struct DeadLetterRow<'a> {
    pub position: Position,
    pub event_id: Option<uuid::Uuid>,
    pub topic: Option<&'a str>,
    pub key: Option<&'a str>,
    pub event_type: Option<&'a str>,
    pub payload: &'a str,
    pub reason: &'a str,
    pub detail: &'a str,
}

/// Moves `consumer`'s checkpoint from `from` to `to` (clearing the pending request) and records
/// `dead_letters`, in one transaction. `Ok(Err(found))`: the checkpoint was not at `from`;
/// nothing was written.
pub async fn commit_request(
    client: &mut Client,
    consumer: &str,
    from: Position,
    to: Position,
    event_id: Option<uuid::Uuid>,
    origin: Option<&Origin>,
    dead_letters: &[DeadLetterRow<'_>],
) -> Result<std::result::Result<(), Option<Position>>> {
    let context = || format!("store the checkpoint of consumer {consumer:?}");
    let tx = client
        .transaction()
        .await
        .map_err(|e| Error::database(context(), e))?;
    let updated = tx
        .execute(
            "UPDATE sink_checkpoints
                SET tx_id = $4::text::xid8, id = $5, event_id = $6,
                    origin_system = $7, origin_database = $8,
                    pending_tx_id = NULL, pending_id = NULL, updated_at = now()
              WHERE consumer = $1 AND tx_id = $2::text::xid8 AND id = $3",
            &[
                &consumer,
                &from.tx_text(),
                &from.id,
                &to.tx_text(),
                &to.id,
                &event_id,
                &origin.map(|o| o.system_id.as_str()),
                &origin.map(|o| o.database.as_str()),
            ],
        )
        .await
        .map_err(|e| Error::database(context(), e))?;
    if updated != 1 {
        drop(tx);
        return Ok(Err(load(client, consumer).await?.map(|c| c.position)));
    }
    for letter in dead_letters {
        record_dead_letter(&tx, consumer, letter).await?;
    }
    tx.commit()
        .await
        .map_err(|e| Error::database(context(), e))?;
    Ok(Ok(()))
}

/// Records (or refreshes) one dead letter of `consumer`.
pub async fn record_dead_letter(
    client: &impl GenericClient,
    consumer: &str,
    letter: &DeadLetterRow<'_>,
) -> Result<()> {
    let kept = prefix(letter.payload, PAYLOAD_BYTES);
    client
        .execute(
            "INSERT INTO sink_dead_letters AS d
                 (consumer, id, tx_id, event_id, topic, key, type, reason, detail,
                  payload_text, payload_bytes, payload_truncated, payload_sha256)
             VALUES ($1, $2, $3::text::xid8, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
             ON CONFLICT (consumer, id) DO UPDATE
                SET reason = EXCLUDED.reason, detail = EXCLUDED.detail, last_seen_at = now(),
                    replay_requested_at = NULL",
            &[
                &consumer,
                &letter.position.id,
                &letter.position.tx_text(),
                &letter.event_id,
                &letter.topic.map(|s| prefix(s, FIELD_BYTES)),
                &letter.key.map(|s| prefix(s, FIELD_BYTES)),
                &letter.event_type.map(|s| prefix(s, FIELD_BYTES)),
                &letter.reason,
                &prefix(letter.detail, FIELD_BYTES),
                &kept,
                &(letter.payload.len() as i64),
                &(kept.len() < letter.payload.len()),
                &sha256_hex(letter.payload.as_bytes()),
            ],
        )
        .await
        .map_err(|e| {
            Error::database(
                format!("record the dead letter of event {}", letter.position.id),
                e,
            )
        })?;
    Ok(())
}

/// A stored dead letter, for `eventsctl` and for replays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredDeadLetter {
    pub consumer: String,
    pub position: Position,
    pub event_id: Option<uuid::Uuid>,
    pub topic: Option<String>,
    pub key: Option<String>,
    pub event_type: Option<String>,
    pub reason: String,
    pub detail: String,
    pub payload_text: String,
    pub payload_bytes: i64,
    pub payload_truncated: bool,
    pub first_seen_at: std::time::SystemTime,
    pub replay_requested: bool,
}

/// Which dead letters to read.
#[derive(Debug, Clone, Default)]
pub struct DeadLetterFilter<'a> {
    pub consumer: Option<&'a str>,
    pub reason: Option<&'a str>,
    /// Only these events' ids (empty: any).
    pub ids: &'a [i64],
    /// Only those whose replay was requested.
    pub replay_requested: bool,
    pub limit: i64,
}

/// Dead letters matching `filter`, oldest id first.
pub async fn dead_letters(
    client: &impl GenericClient,
    filter: &DeadLetterFilter<'_>,
) -> Result<Vec<StoredDeadLetter>> {
    let rows = client
        .query(
            "SELECT consumer, tx_id::text, id, event_id, topic, key, type, reason, detail,
                    payload_text, payload_bytes, payload_truncated, first_seen_at,
                    replay_requested_at IS NOT NULL
               FROM sink_dead_letters d
              WHERE ($1::text IS NULL OR d.consumer = $1)
                AND ($2::text IS NULL OR d.reason = $2)
                AND (cardinality($3::bigint[]) = 0 OR d.id = ANY($3))
                AND (NOT $4 OR d.replay_requested_at IS NOT NULL)
              ORDER BY d.id, d.consumer
              LIMIT $5",
            &[
                &filter.consumer,
                &filter.reason,
                &filter.ids,
                &filter.replay_requested,
                &filter.limit,
            ],
        )
        .await
        .map_err(|e| Error::database("read the dead letters in PostgreSQL", e))?;
    rows.iter()
        .map(|row| {
            Ok(StoredDeadLetter {
                consumer: row.get(0),
                position: Position::from_text(row.get(1), row.get(2))?,
                event_id: row.get(3),
                topic: row.get(4),
                key: row.get(5),
                event_type: row.get(6),
                reason: row.get(7),
                detail: row.get(8),
                payload_text: row.get(9),
                payload_bytes: row.get(10),
                payload_truncated: row.get(11),
                first_seen_at: row.get(12),
                replay_requested: row.get(13),
            })
        })
        .collect()
}

/// Asks the consumer to send `consumer`'s dead letter of event `id` again; `false` when there is
/// no such dead letter.
pub async fn request_replay(client: &impl GenericClient, consumer: &str, id: i64) -> Result<bool> {
    let n = client
        .execute(
            "UPDATE sink_dead_letters SET replay_requested_at = now()
              WHERE consumer = $1 AND id = $2",
            &[&consumer, &id],
        )
        .await
        .map_err(|e| Error::database(format!("request the replay of event {id}"), e))?;
    Ok(n == 1)
}

/// Removes `consumer`'s dead letter of event `id`; `false` when there was none.
pub async fn remove_dead_letter(
    client: &impl GenericClient,
    consumer: &str,
    id: i64,
) -> Result<bool> {
    let n = client
        .execute(
            "DELETE FROM sink_dead_letters WHERE consumer = $1 AND id = $2",
            &[&consumer, &id],
        )
        .await
        .map_err(|e| Error::database(format!("remove the dead letter of event {id}"), e))?;
    Ok(n == 1)
}

/// The longest prefix of `text` within `max` bytes, on a character boundary.
pub fn prefix(text: &str, max: usize) -> String {
    let mut cut = text.len().min(max);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text[..cut].to_string()
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::prefix;

    #[test]
    fn prefixes_end_on_character_boundaries() {
        assert_eq!(prefix("héllo", 2), "h");
        assert_eq!(prefix("héllo", 3), "hé");
        assert_eq!(prefix("abc", 10), "abc");
    }
}

/// What `eventsctl status` shows of a consumer whose sink keeps its state here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkStanding {
    pub consumer: String,
    /// `http` or `nats`; `None` for a consumer with dead letters and no checkpoint yet.
    pub sink: Option<String>,
    pub checkpoint: Option<Position>,
    pub dead_letters: i64,
}

/// Every consumer's checkpoint and dead-letter count the caller may read (the owner reads all, a
/// consumer login its own rows); `None` when the role may not read these tables at all (a purger
/// login), so that a status report can say "not visible" instead of failing.
pub async fn standings(client: &impl GenericClient) -> Result<Option<Vec<SinkStanding>>> {
    let readable: bool = client
        .query_one(
            "SELECT has_table_privilege('sink_checkpoints', 'SELECT')
                AND has_table_privilege('sink_dead_letters', 'SELECT')",
            &[],
        )
        .await
        .map_err(|e| Error::database("check the right to read sink_checkpoints", e))?
        .get(0);
    if !readable {
        return Ok(None);
    }
    let rows = client
        .query(
            "WITH d AS (SELECT consumer, count(*) AS n FROM sink_dead_letters GROUP BY consumer)
             SELECT coalesce(c.consumer, d.consumer), c.sink, c.tx_id::text, c.id, coalesce(d.n, 0)
               FROM sink_checkpoints c FULL JOIN d ON d.consumer = c.consumer
              ORDER BY 1",
            &[],
        )
        .await
        .map_err(|e| Error::database("read the sinks' checkpoints and dead letters", e))?;
    rows.iter()
        .map(|row| {
            let checkpoint = match (row.get::<_, Option<&str>>(2), row.get::<_, Option<i64>>(3)) {
                (Some(tx), Some(id)) => Some(Position::from_text(tx, id)?),
                _ => None,
            };
            Ok(SinkStanding {
                consumer: row.get(0),
                sink: row.get(1),
                checkpoint,
                dead_letters: row.get(4),
            })
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// Moves `consumer`'s checkpoint to `to` (`eventsctl reset`, under the consumer's lease): the
/// request in flight is forgotten, so the next request starts at `to` under a new idempotency
/// key. `false` when the caller sees no such row.
pub async fn move_checkpoint(
    client: &impl GenericClient,
    consumer: &str,
    to: Position,
) -> Result<bool> {
    let moved = client
        .execute(
            "UPDATE sink_checkpoints
                SET tx_id = $2::text::xid8, id = $3, event_id = NULL,
                    pending_tx_id = NULL, pending_id = NULL, updated_at = now()
              WHERE consumer = $1",
            &[&consumer, &to.tx_text(), &to.id],
        )
        .await
        .map_err(|e| Error::database(format!("move the checkpoint of consumer {consumer:?}"), e))?;
    Ok(moved == 1)
}
