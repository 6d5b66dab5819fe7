//! The position model and **all** SQL that reads or deletes events by position.
//!
//! A position is the pair `(tx_id, id)` of the last event a reader has passed. Events are read in
//! `(tx_id, id)` order and only when `tx_id` is below the visibility horizon
//! `pg_snapshot_xmin(pg_current_snapshot())`. (Following `id` alone skips events: ids are taken
//! at INSERT, rows appear at COMMIT.)
//!
//! # The sort key, and why the order is causal
//!
//! `tx_id` is not simply the writer's transaction id. Since migration V8 its default is
//! `events_sort_key()`:
//!
//! ```text
//! key = greatest(own, latest)
//!   own    = pg_current_xact_id()                          the writer's id, assigned now if needed
//!   latest = pg_snapshot_xmax(pg_current_snapshot()) - 1   from a snapshot taken as the row is written
//! ```
//!
//! `xmax - 1` is PostgreSQL's `latestCompletedXid` when the snapshot was taken: the newest
//! transaction id known to have finished. It never decreases. The function is VOLATILE plpgsql, so
//! in READ COMMITTED its expression runs with a fresh snapshot for each row, taken when the row is
//! written. In REPEATABLE READ and SERIALIZABLE that snapshot is the transaction's, taken at its
//! first statement.
//!
//! **Causal.** Say transaction B committed before A wrote a row, and B's commit was visible to A
//! then (always so in READ COMMITTED; in the stricter levels when A's snapshot came after B's
//! commit). Then `latestCompletedXid` was already at least B's own id, and at least every `latest`
//! of B's rows (it only grows). So the row's key is at least every key of B's. On a tie, the row's
//! `id` comes from the sequence after B's rows took theirs. So it sorts after all of B's events.
//! This also holds when the row's statement began before B committed: a statement whose UPDATE
//! waited for B's row lock and then built on B's version still writes its events after B's.
//! Capture triggers write their events from their own statement, after the captured one.
//!
//! **Within one transaction** keys never decrease and ids increase, so a transaction's events
//! keep the order they were written in. They are not necessarily adjacent: another transaction
//! that committed between two of its statements sorts between them. Unrelated transactions (none
//! could see the other) are in no promised order; this is not commit order. True commit order
//! would need commit-time serialisation (one lock for every writer) or WAL decoding.
//!
//! **Nothing is skipped.** This is the round-1 horizon argument; the new key keeps it because it
//! is never below `own`. The horizon `xmin` is at most the id of every transaction still running
//! when the reader takes its snapshot. A transaction with no id yet gets one at or above the next
//! unassigned id, which is also at or above `xmin`. So every row that is not yet visible to the
//! reader, written now or later, has `key >= own >= xmin`. The reader takes only rows with
//! `key < xmin`. Those were written by finished transactions, and the reader's snapshot sees all
//! of them. Once a reader has passed a position, no row can appear behind it. The larger key only
//! means a row may wait until transactions older than `latest` finish. They could still write
//! rows that sort before it, so it has to.
//!
//! **Rejected alternatives** (measured or argued in the issue 20 note):
//! - The same expression inline in the column default uses the *statement's* snapshot. A statement
//!   that waited for a row lock, and then built on the commit it waited for, would sort before
//!   that commit (the test `a_statement_that_waited_for_a_commit_sorts_after_it` fails with it).
//!   A SQL-language function can be inlined, which gives the same result.
//! - `greatest(own, xmax)` without the `- 1` is causal too. But `xmax` may become the id of the
//!   *next* transaction, so a row would wait for a writer that started after it.
//! - A commit sequence taken under a lock serialises every writer's commit, which is the cost the
//!   NOTIFY design avoids.
//! - A row trigger that computes the key costs a trigger call per row, and a producer could bypass
//!   a session setting. The column default needs neither, and producers still cannot set `tx_id`
//!   (column grants).
//!
//! Upgrading (V8) changes only the default. Stored rows keep their keys, and their relative order
//! is unchanged. A row written after the upgrade still has `key >= own`, so a consumer running
//! across the upgrade is covered by the same argument.
//!
//! tokio-postgres has no Rust type for `xid8`, so `tx_id` travels as text (`tx_id::text` out,
//! `$1::text::xid8` in). Ordering and comparisons always use the `xid8` column itself, never its
//! text form, where `'999' > '1000'`.
//!
//! After a dump/restore into a new cluster transaction ids start again from a small number, below
//! every stored position; see [`REBASE_HINT`]. Keys are still below the new cluster's next
//! transaction id (`latest` has finished, `own` is assigned), so the restore check is unchanged.

mod lookup;
mod partition;
mod published;
mod purge;
mod read;

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub use lookup::{
    before_time, count_between, ends, event_at, newest_of_topics, oldest, origin, Ends, Origin,
};
pub use partition::Partition;
pub use published::{publish, published_positions, register, PublishedPosition};
pub use purge::{
    kept, purge_batch, purge_step, purgeable, purgeable_past, Kept, PurgeStep, Purged,
};
pub use read::{
    backlog, horizon, horizon_blocker, latest, watermark, Backlog, Batch, Event, HorizonBlocker,
    Limits, NewestReadable, Reader, Undecodable, Watermark,
};

/// Where a reader stands: it has seen every event at or before `(tx_id, id)`.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Position {
    /// The event's sort key `events.tx_id` (`xid8`, epoch-extended, never wraps): its writing
    /// transaction's id or the newest one its statement saw finished, see the module docs.
    pub tx_id: u64,
    /// The event's `id`.
    pub id: i64,
}

impl Position {
    /// Before every event.
    pub const START: Position = Position { tx_id: 0, id: 0 };

    pub fn new(tx_id: u64, id: i64) -> Position {
        Position { tx_id, id }
    }

    pub(crate) fn tx_text(&self) -> String {
        self.tx_id.to_string()
    }

    pub(crate) fn from_text(tx_id: &str, id: i64) -> Result<Position> {
        let tx_id = tx_id.parse().map_err(|_| {
            Error::Schema(format!("unexpected xid8 text {tx_id:?} from the server"))
        })?;
        Ok(Position { tx_id, id })
    }
}

/// Why a text is not a position.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not a position: expected TX_ID/ID, two non-negative integers such as 1234/56")]
pub struct BadPosition {
    pub text: String,
}

impl Position {
    /// Parses the `tx_id/id` text that [`Position`]'s `Display` prints (the form services log
    /// and clients send back to resume). Strict: two plain non-negative integers.
    pub fn parse(text: &str) -> std::result::Result<Position, BadPosition> {
        let bad = || BadPosition {
            text: text.chars().take(64).collect(),
        };
        let (tx, id) = text.trim().split_once('/').ok_or_else(bad)?;
        let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !all_digits(tx) || !all_digits(id) {
            return Err(bad());
        }
        Ok(Position {
            tx_id: tx.parse().map_err(|_| bad())?,
            id: id.parse().map_err(|_| bad())?,
        })
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.tx_id, self.id)
    }
}

/// What an operator does when a stored position is ahead of the cluster's transaction counter
/// (documented in docs/consumer.md).
pub const REBASE_HINT: &str = "a stored position is ahead of this cluster's transaction counter, \
     which happens after a dump/restore into a new cluster (transaction ids restart there); \
     see \"Restoring into a new cluster\" in docs/consumer.md to re-base positions";

impl std::str::FromStr for Position {
    type Err = BadPosition;

    /// [`Position::parse`]: `<tx_id>/<id>`, as [`Position`] displays itself.
    fn from_str(text: &str) -> std::result::Result<Position, BadPosition> {
        Position::parse(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_round_trip_through_their_text() {
        let p = Position::new(1_000_000, 42);
        assert_eq!(Position::parse(&p.to_string()).unwrap(), p);
        assert_eq!(Position::parse(" 7/8 ").unwrap(), Position::new(7, 8));
        for bad in [
            "",
            "7",
            "7/",
            "/8",
            "a/b",
            "-1/2",
            "1/-2",
            "1/2/3",
            "1.5/2",
            "99999999999999999999/1",
        ] {
            let err = Position::parse(bad).unwrap_err();
            assert!(err.to_string().contains("TX_ID/ID"), "{bad:?}: {err}");
        }
    }
}
