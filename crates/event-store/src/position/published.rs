//! The positions consumers publish for the purger.

use std::time::SystemTime;

use tokio_postgres::Client;

use super::Position;
use crate::error::{Error, Result};

// ---------------------------------------------------------------------------------------------
// Positions published for the purger, and the purge watermark.

/// Records `consumer`'s delivered position so the purger keeps what it still needs. Positions only
/// move forward here, even if an older write arrives late.
///
/// A row belongs to the login that first wrote it (`owner`, row-level security since V4): another
/// login publishing under the same name fails with SQLSTATE 42501 instead of moving someone
/// else's position. A row from before V4 (no owner) is claimed by the first login to publish.
pub async fn publish(client: &Client, consumer: &str, position: Position) -> Result<()> {
    upsert_position(client, consumer, position, false).await
}

/// Records where `consumer` starts, even behind what it published before: a consumer whose
/// checkpoint was reset or restored from an older backup needs the purger to keep everything
/// after *that* position, not after the one it had reached before.
pub async fn register(client: &Client, consumer: &str, position: Position) -> Result<()> {
    upsert_position(client, consumer, position, true).await
}

async fn upsert_position(
    client: &Client,
    consumer: &str,
    position: Position,
    may_move_back: bool,
) -> Result<()> {
    client
        .execute(
            "INSERT INTO consumer_positions AS p (consumer, tx_id, id, updated_at)
             VALUES ($1, $2::text::xid8, $3, now())
             ON CONFLICT (consumer) DO UPDATE
                SET tx_id = EXCLUDED.tx_id, id = EXCLUDED.id, updated_at = now(),
                    owner = current_user
              WHERE $4 OR (p.tx_id, p.id) <= (EXCLUDED.tx_id, EXCLUDED.id)",
            &[&consumer, &position.tx_text(), &position.id, &may_move_back],
        )
        .await
        .map_err(|e| {
            Error::database(format!("publish the position of consumer {consumer:?}"), e)
        })?;
    Ok(())
}

/// A consumer's published position.
#[derive(Debug, Clone, PartialEq)]
pub struct PublishedPosition {
    pub consumer: String,
    pub position: Position,
    pub updated_at: SystemTime,
}

/// Every published position, slowest first.
pub async fn published_positions(client: &Client) -> Result<Vec<PublishedPosition>> {
    let rows = client
        .query(
            // Qualified: a bare `tx_id` would sort by the text output column of the same name.
            "SELECT consumer, tx_id::text, id, updated_at FROM consumer_positions p
              ORDER BY p.tx_id, p.id",
            &[],
        )
        .await
        .map_err(|e| Error::database("read consumer positions", e))?;
    rows.iter()
        .map(|row| {
            Ok(PublishedPosition {
                consumer: row.get(0),
                position: Position::from_text(row.get(1), row.get(2))?,
                updated_at: row.get(3),
            })
        })
        .collect()
}
