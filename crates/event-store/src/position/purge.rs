//! Deleting old events by position, never past what a consumer still needs.

use std::time::SystemTime;

use tokio_postgres::Client;

use super::Position;
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Purged {
    pub deleted: u64,
    /// The highest position deleted.
    pub highest: Option<Position>,
}

/// An optional position as two nullable parameters (`$n::text::xid8`, `$m::bigint`).
fn optional_binds(position: Option<Position>) -> (Option<String>, Option<i64>) {
    match position {
        Some(p) => (Some(p.tx_text()), Some(p.id)),
        None => (None, None),
    }
}

/// What one batch of a purge pass did, and where the next batch of the same pass may start.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PurgeStep {
    pub deleted: u64,
    /// The highest position deleted.
    pub highest: Option<Position>,
    /// The newest `created_at` deleted. Every event the batch passed over before it stays
    /// ineligible for the rest of the pass (it is held back by a position or the horizon), so the
    /// next batch may start its index scan here instead of at the oldest entry; see
    /// [`purge_step`].
    pub resume_from: Option<SystemTime>,
}

/// Deletes up to `limit` events created before `cutoff`, below the visibility horizon, and — when
/// `keep_after` is given — at or before that position (the slowest consumer's). Runs in the
/// caller's connection as one short statement, and raises the watermark in the same statement so
/// a consumer can never miss the fact that rows past its position went.
pub async fn purge_batch(
    client: &Client,
    cutoff: SystemTime,
    keep_after: Option<Position>,
    limit: i64,
    forced: bool,
) -> Result<Purged> {
    let step = purge_step(client, cutoff, keep_after, None, limit, forced).await?;
    Ok(Purged {
        deleted: step.deleted,
        highest: step.highest,
    })
}

/// [`purge_batch`] for one batch of a pass: the scan along the `created_at` index starts at
/// `resume_from` (the previous batch's [`PurgeStep::resume_from`]; `None` for the first batch).
///
/// Why resume: a deleted row stays in the index until vacuum, and while any snapshot older than
/// the delete is open (a long report, a `pg_dump`) the scan cannot even mark it dead, so a pass
/// that always started at the oldest entry would walk every row it already deleted again on each
/// batch — quadratic in the backlog. Starting at the last deleted `created_at` (inclusive, since
/// rows of one transaction share it) keeps each batch's scan proportional to its size.
///
/// The rows are picked by `ctid` in a materialised CTE and deleted with a TID scan: the same
/// tuples, in the same statement, without a second trip through the primary key. Events are
/// never updated, and a row deleted or moved concurrently is skipped, never mistaken.
///
/// The horizon is computed once per statement, as a sub-select: written inline it is a per-row
/// filter on the `created_at` index scan, taking a fresh snapshot for every row it looks at (a
/// cost that grows with the number of open transactions).
pub async fn purge_step(
    client: &Client,
    cutoff: SystemTime,
    keep_after: Option<Position>,
    resume_from: Option<SystemTime>,
    limit: i64,
    forced: bool,
) -> Result<PurgeStep> {
    let (keep_tx, keep_id) = optional_binds(keep_after);
    let row = client
        .query_one(
            "WITH doomed AS MATERIALIZED (
                 SELECT ctid FROM events
                  WHERE created_at < $1
                    AND created_at >= coalesce($6::timestamptz, '-infinity')
                    AND tx_id < (SELECT pg_snapshot_xmin(pg_current_snapshot()))
                    AND ($2::text IS NULL OR (tx_id, id) <= ($2::text::xid8, $3::bigint))
                  ORDER BY created_at
                  LIMIT $4
             ), deleted AS (
                 DELETE FROM events WHERE ctid = ANY (ARRAY(SELECT ctid FROM doomed))
                 RETURNING tx_id, id, created_at
             ), highest AS (
                 SELECT tx_id, id FROM deleted ORDER BY tx_id DESC, id DESC LIMIT 1
             ), raised AS (
                 INSERT INTO purge_watermark AS w (tx_id, id, forced, updated_at)
                 SELECT tx_id, id, $5, now() FROM highest
                 ON CONFLICT (singleton) DO UPDATE
                    SET tx_id = EXCLUDED.tx_id, id = EXCLUDED.id,
                        forced = EXCLUDED.forced, updated_at = now()
                  WHERE (w.tx_id, w.id) < (EXCLUDED.tx_id, EXCLUDED.id)
             )
             SELECT (SELECT count(*) FROM deleted),
                    (SELECT tx_id::text FROM highest), (SELECT id FROM highest),
                    (SELECT max(created_at) FROM deleted)",
            &[
                &cutoff,
                &keep_tx,
                &keep_id,
                &limit.max(1),
                &forced,
                &resume_from,
            ],
        )
        .await
        .map_err(|e| Error::database("delete a batch of old events", e))?;
    let deleted: i64 = row.get(0);
    let highest = match (row.get::<_, Option<&str>>(1), row.get::<_, Option<i64>>(2)) {
        (Some(tx), Some(id)) => Some(Position::from_text(tx, id)?),
        _ => None,
    };
    Ok(PurgeStep {
        deleted: deleted as u64,
        highest,
        resume_from: row.get(3),
    })
}

/// Counts what [`purge_batch`] would delete in total (for `--dry-run`).
pub async fn purgeable(
    client: &Client,
    cutoff: SystemTime,
    keep_after: Option<Position>,
) -> Result<u64> {
    purgeable_past(client, cutoff, Position::START, keep_after).await
}

/// Counts the events a purge with `cutoff` and `keep_after` would delete that lie past `after`:
/// what a consumer standing at `after` would lose (for the warnings about expired consumers and
/// forced purges).
pub async fn purgeable_past(
    client: &Client,
    cutoff: SystemTime,
    after: Position,
    keep_after: Option<Position>,
) -> Result<u64> {
    let (keep_tx, keep_id) = optional_binds(keep_after);
    let row = client
        .query_one(
            "SELECT count(*) FROM events
              WHERE created_at < $1
                AND tx_id < (SELECT pg_snapshot_xmin(pg_current_snapshot()))
                AND (tx_id, id) > ($4::text::xid8, $5::bigint)
                AND ($2::text IS NULL OR (tx_id, id) <= ($2::text::xid8, $3::bigint))",
            &[&cutoff, &keep_tx, &keep_id, &after.tx_text(), &after.id],
        )
        .await
        .map_err(|e| Error::database("count the events a purge would take from a consumer", e))?;
    Ok(row.get::<_, i64>(0) as u64)
}

/// Why events older than the retention are still in the table after a purge: the first such
/// event (by age) that consumers still need, and the first that the visibility horizon holds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Kept {
    /// An old event past `keep_after`: the slowest consumer has not read it yet.
    pub by_position: Option<(Position, SystemTime)>,
    /// An old event at or above the visibility horizon: an older transaction is still open, so
    /// no consumer can have read it yet.
    pub by_horizon: Option<(Position, SystemTime)>,
}

/// What [`purge_step`] with `cutoff` and `keep_after` leaves behind, and why (for the pass
/// report). Both lookups stop at the first hit: the first walks the `created_at` index (old rows
/// past the slowest consumer are the oldest left), the second the position index from the horizon
/// up (only transactions newer than the oldest open one are there).
pub async fn kept(
    client: &Client,
    cutoff: SystemTime,
    keep_after: Option<Position>,
) -> Result<Kept> {
    let by_position = match keep_after {
        None => None,
        Some(keep) => client
            .query_opt(
                "SELECT tx_id::text, id, created_at FROM events
                  WHERE created_at < $1
                    AND tx_id < (SELECT pg_snapshot_xmin(pg_current_snapshot()))
                    AND (tx_id, id) > ($2::text::xid8, $3::bigint)
                  ORDER BY created_at
                  LIMIT 1",
                &[&cutoff, &keep.tx_text(), &keep.id],
            )
            .await
            .map_err(|e| Error::database("look for old events a consumer still needs", e))?
            .map(|row| Ok::<_, Error>((Position::from_text(row.get(0), row.get(1))?, row.get(2))))
            .transpose()?,
    };
    let by_horizon = client
        .query_opt(
            "SELECT e.tx_id::text, e.id, e.created_at FROM events e
              WHERE e.tx_id >= pg_snapshot_xmin(pg_current_snapshot())
                AND e.created_at < $1
              ORDER BY e.tx_id, e.id
              LIMIT 1",
            &[&cutoff],
        )
        .await
        .map_err(|e| Error::database("look for old events beyond the visibility horizon", e))?
        .map(|row| Ok::<_, Error>((Position::from_text(row.get(0), row.get(1))?, row.get(2))))
        .transpose()?;
    Ok(Kept {
        by_position,
        by_horizon,
    })
}
