//! Backfill: the rows a captured table already holds become `read` events, so a sink can start
//! from the whole table rather than from the changes made after `capture add`.
//!
//! The work happens in PostgreSQL (migration `V10__capture_backfill.sql`); this module drives it.
//! [`start`] registers a backfill (or finds the unfinished one, to resume it); each [`chunk`] is
//! one short READ COMMITTED transaction that reads the next `chunk_rows` rows in key order with
//! `SELECT … FOR SHARE`, appends their `read` events and records its progress, all or nothing. A
//! killed backfill therefore resumes after its last committed chunk, and no finished chunk is
//! read again.
//!
//! # Why a `read` never goes back in time
//!
//! For any key, a `read` sorts after every change to that row it reflects, and before every
//! change it does not:
//! - `FOR SHARE` conflicts with every UPDATE and DELETE, so the chunk waits for an in-flight
//!   writer of a row and then reads the row as that writer left it (READ COMMITTED re-reads the
//!   newest version). The `read` event is written after that commit, in the same transaction as
//!   the lock; its sort key (`events_sort_key()`, V8) is at least the newest transaction id
//!   finished when it is written, so it sorts after the writer's events.
//! - A writer that comes later must wait for the chunk's lock (TRUNCATE for its table lock), so
//!   its statement runs after the chunk committed and its events sort after the `read`.
//! - `FOR KEY SHARE` would not do: a non-key UPDATE does not wait for it, and the chunk could read
//!   the value from before an UPDATE whose event then sorts before the `read`.
//! - A row inserted by a transaction still open is invisible to the chunk and gets no `read` (its
//!   insert event carries it); a row whose key an open transaction moves out of the chunk's range
//!   is re-checked after the wait and skipped (its delete + insert carry it). The range is fixed
//!   before the locking read, from the chunk's last key, so a key moved far ahead can never make
//!   the next chunk skip rows.
//!
//! The full argument is at the top of the migration.

use std::time::SystemTime;

use tokio_postgres::{Client, GenericClient, IsolationLevel};

use crate::capture::{capture_admin, quote_ident, validate_table_name, CaptureError};

/// The default rows per chunk: big enough that the per-chunk cost (a plan, a commit) is small,
/// small enough that a chunk's locks are held for milliseconds.
pub const DEFAULT_CHUNK_ROWS: u32 = 1_000;

/// The most rows one chunk may read (the migration's limit).
pub const MAX_CHUNK_ROWS: u32 = 1_000_000;

/// What to backfill.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackfillSpec {
    table: String,
    chunk_rows: u32,
    condition: Option<String>,
}

impl BackfillSpec {
    /// `table` as you would write it in SQL; all rows, [`DEFAULT_CHUNK_ROWS`] per chunk.
    pub fn new(table: impl Into<String>) -> BackfillSpec {
        BackfillSpec {
            table: table.into(),
            chunk_rows: DEFAULT_CHUNK_ROWS,
            condition: None,
        }
    }

    pub fn chunk_rows(mut self, rows: u32) -> Result<BackfillSpec, CaptureError> {
        if rows == 0 || rows > MAX_CHUNK_ROWS {
            return Err(CaptureError::Invalid(format!(
                "chunk rows must be between 1 and {MAX_CHUNK_ROWS}, not {rows}"
            )));
        }
        self.chunk_rows = rows;
        Ok(self)
    }

    /// Only rows matching `condition`, an SQL boolean expression over the table's columns
    /// (`created_at > '2024-01-01'`). It runs with the caller's rights, as part of the chunk's
    /// query.
    pub fn condition(mut self, condition: impl Into<String>) -> Result<BackfillSpec, CaptureError> {
        let condition = condition.into();
        if condition.contains('\0') {
            return Err(CaptureError::Invalid(
                "the condition contains a NUL byte".into(),
            ));
        }
        self.condition = (!condition.trim().is_empty()).then_some(condition);
        Ok(self)
    }

    pub fn table(&self) -> &str {
        &self.table
    }
}

/// One chunk's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    /// Rows this chunk read (and `read` events it wrote).
    pub rows_read: i64,
    /// Rows read by all finished chunks of this backfill.
    pub rows_done: i64,
    /// Rows that matched when the backfill started (the table changes meanwhile: an estimate).
    pub rows_total: i64,
    pub finished: bool,
}

impl Chunk {
    /// Rows still to read, by the start's count (never negative).
    pub fn remaining(&self) -> i64 {
        (self.rows_total - self.rows_done).max(0)
    }
}

/// A backfill as recorded in `capture_backfills`.
#[derive(Debug, Clone, PartialEq)]
pub struct Backfill {
    pub id: i64,
    pub schema: String,
    pub table: String,
    pub topic: String,
    pub condition: Option<String>,
    pub chunk_rows: i32,
    pub rows_total: i64,
    pub rows_done: i64,
    pub chunks_done: i64,
    pub started_by: String,
    pub started_at: SystemTime,
    pub updated_at: SystemTime,
    pub finished_at: Option<SystemTime>,
}

impl Backfill {
    /// `schema.table`, each part quoted when SQL needs it (as [`Captured::qualified_name`]).
    ///
    /// [`Captured::qualified_name`]: crate::capture::Captured::qualified_name
    pub fn qualified_name(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.table))
    }

    pub fn remaining(&self) -> i64 {
        if self.finished_at.is_some() {
            0
        } else {
            (self.rows_total - self.rows_done).max(0)
        }
    }
}

/// Registers a backfill of `spec.table` and returns its id; when the table has an unfinished one
/// with the same condition, returns that one (to resume it; it then uses `spec`'s chunk size).
/// Refused: a table that is not captured, rows whose key is NULL, an unfinished backfill with
/// another condition. Run it as the table's owner, a member of the capture admin role.
pub async fn start(client: &impl GenericClient, spec: &BackfillSpec) -> Result<i64, CaptureError> {
    validate_table_name(&spec.table)?;
    let admin = capture_admin(client).await;
    let chunk_rows = spec.chunk_rows as i32;
    let row = client
        .query_one(
            "SELECT capture_backfill_start($1::text, $2::int4, $3::text)",
            &[&spec.table, &chunk_rows, &spec.condition],
        )
        .await
        .map_err(|e| CaptureError::from_db(&format!("backfill {}", spec.table), e, &admin))?;
    Ok(row.get(0))
}

/// Runs the next chunk of backfill `id` in a transaction of its own (READ COMMITTED, committed
/// before this returns).
pub async fn chunk(client: &mut Client, id: i64) -> Result<Chunk, CaptureError> {
    let what = format!("backfill {id}: chunk");
    let map = |e| CaptureError::from_db(&what, e, "the capture admin role");
    let tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::ReadCommitted)
        .start()
        .await
        .map_err(map)?;
    let row = tx
        .query_one(
            "SELECT rows_read, rows_done, rows_total, finished FROM capture_backfill_chunk($1)",
            &[&id],
        )
        .await
        .map_err(map)?;
    let chunk = Chunk {
        rows_read: row.get(0),
        rows_done: row.get(1),
        rows_total: row.get(2),
        finished: row.get(3),
    };
    tx.commit().await.map_err(map)?;
    Ok(chunk)
}

/// Stops the unfinished backfill of `table` for good (the `read` events written so far stay).
/// Returns whether there was one.
pub async fn cancel(client: &impl GenericClient, table: &str) -> Result<bool, CaptureError> {
    validate_table_name(table)?;
    let admin = capture_admin(client).await;
    let row = client
        .query_one("SELECT capture_backfill_cancel($1::text)", &[&table])
        .await
        .map_err(|e| {
            CaptureError::from_db(&format!("cancel the backfill of {table}"), e, &admin)
        })?;
    Ok(row.get(0))
}

/// The backfills the caller may see (a capture admin: those of the tables it owns; the database
/// owner: all), running ones first, newest first. Empty when the schema predates backfills.
pub async fn list(client: &impl GenericClient) -> Result<Vec<Backfill>, CaptureError> {
    let admin = capture_admin(client).await;
    let present: bool = client
        .query_one(
            "SELECT to_regclass('capture_backfills') IS NOT NULL
                    AND has_table_privilege('capture_backfills', 'SELECT')",
            &[],
        )
        .await
        .map_err(|e| CaptureError::from_db("list backfills", e, &admin))?
        .get(0);
    if !present {
        return Ok(Vec::new());
    }
    let rows = client
        .query(
            "SELECT b.id, n.nspname::text, c.relname::text, b.topic, b.condition, b.chunk_rows,
                    b.rows_total, b.rows_done, b.chunks_done, b.started_by::text, b.started_at,
                    b.updated_at, b.finished_at
               FROM capture_backfills b
               JOIN pg_catalog.pg_class c ON c.oid = b.tab
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
              ORDER BY b.finished_at IS NOT NULL, b.started_at DESC, b.id DESC",
            &[],
        )
        .await
        .map_err(|e| CaptureError::from_db("list backfills", e, &admin))?;
    Ok(rows
        .iter()
        .map(|row| Backfill {
            id: row.get(0),
            schema: row.get(1),
            table: row.get(2),
            topic: row.get(3),
            condition: row.get(4),
            chunk_rows: row.get(5),
            rows_total: row.get(6),
            rows_done: row.get(7),
            chunks_done: row.get(8),
            started_by: row.get(9),
            started_at: row.get(10),
            updated_at: row.get(11),
            finished_at: row.get(12),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_sizes_and_conditions_are_validated() {
        let spec = BackfillSpec::new("orders");
        assert!(spec.clone().chunk_rows(0).is_err());
        assert!(spec.clone().chunk_rows(MAX_CHUNK_ROWS + 1).is_err());
        assert_eq!(spec.clone().chunk_rows(7).unwrap().chunk_rows, 7);
        assert!(spec.clone().condition("a\0").is_err());
        assert_eq!(spec.clone().condition("  ").unwrap().condition, None);
        assert_eq!(
            spec.condition("id > 3").unwrap().condition.as_deref(),
            Some("id > 3")
        );
    }

    #[test]
    fn remaining_never_goes_negative() {
        let c = Chunk {
            rows_read: 5,
            rows_done: 12,
            rows_total: 10,
            finished: false,
        };
        assert_eq!(c.remaining(), 0);
    }
}
