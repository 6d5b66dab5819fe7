//! Why an append failed.

use event_store::error::{is_permanent_pg, is_transient_pg, pg_report};
use event_store::event::InvalidEvent;
use tokio_postgres::error::SqlState;
use uuid::Uuid;

/// The unique constraint on `events.event_id` (PostgreSQL's default name for `event_id … UNIQUE`).
const EVENT_ID_CONSTRAINT: &str = "events_event_id_key";

/// Why an append failed. `Invalid` and `DuplicateEventId` are decided before the database is
/// touched; the rest come from the database or the pool.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// An event failed validation (payload too large, headers not an object, …). Nothing was sent.
    #[error("event #{index} is invalid: {source}")]
    Invalid {
        /// Position of the event in the input (0 for a single event).
        index: usize,
        #[source]
        source: InvalidEvent,
    },
    /// Two events of one batch carry the same `event_id`. Nothing was sent.
    #[error("event #{index} repeats event_id {event_id} of an earlier event in the same batch")]
    DuplicateEventId { index: usize, event_id: Uuid },
    /// A database call failed; `context` says what we were doing.
    #[error("{context}: {}", pg_report(source))]
    Database {
        context: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    /// No pooled connection could be had.
    #[error("cannot get a PostgreSQL connection from the pool: {}", pool_report(.0))]
    Pool(#[source] deadpool_postgres::PoolError),
}

impl AppendError {
    pub(crate) fn database(context: &'static str, source: tokio_postgres::Error) -> AppendError {
        AppendError::Database { context, source }
    }

    /// Refused before reaching the database: retrying the same input cannot help.
    pub fn is_invalid(&self) -> bool {
        matches!(
            self,
            AppendError::Invalid { .. } | AppendError::DuplicateEventId { .. }
        )
    }

    /// Worth retrying after a pause (connection lost, server restarting, pool exhausted).
    pub fn is_transient(&self) -> bool {
        match self {
            AppendError::Database { source, .. } => is_transient_pg(source),
            AppendError::Pool(deadpool_postgres::PoolError::Backend(e)) => is_transient_pg(e),
            AppendError::Pool(_) => true,
            AppendError::Invalid { .. } | AppendError::DuplicateEventId { .. } => false,
        }
    }

    /// Retrying cannot fix it (a revoked privilege, a dropped table, a failed login; see
    /// [`event_store::error::is_permanent_pg`]): the service retries only at its longest pause.
    pub fn is_permanent(&self) -> bool {
        match self {
            AppendError::Database { source, .. } => is_permanent_pg(source),
            AppendError::Pool(deadpool_postgres::PoolError::Backend(e)) => is_permanent_pg(e),
            _ => false,
        }
    }

    /// The statement or COMMIT may have taken effect although it reported an error: the
    /// connection broke, or the server was shutting down, while it ran. Look the events up by
    /// their `event_id` before appending them again (re-appending a committed `event_id` fails
    /// with a unique violation, so a blind retry can never duplicate, only fail).
    pub fn outcome_unknown(&self) -> bool {
        match self {
            AppendError::Database { source, .. } => is_transient_pg(source),
            _ => false,
        }
    }

    /// An event with one of these `event_id`s is already in the table. Only the `event_id`
    /// constraint counts: another unique violation (an `id` clash after a restore left the
    /// sequence behind) is a real error, and retrying it as a duplicate would spin.
    pub fn is_duplicate(&self) -> bool {
        let db_error = match self {
            AppendError::Database { source, .. } => source.as_db_error(),
            AppendError::Pool(deadpool_postgres::PoolError::Backend(e)) => e.as_db_error(),
            _ => None,
        };
        db_error.is_some_and(|e| {
            *e.code() == SqlState::UNIQUE_VIOLATION && e.constraint() == Some(EVENT_ID_CONSTRAINT)
        })
    }

    /// The SQLSTATE, when PostgreSQL answered with an error.
    pub fn code(&self) -> Option<&SqlState> {
        match self {
            AppendError::Database { source, .. } => source.code(),
            AppendError::Pool(deadpool_postgres::PoolError::Backend(e)) => e.code(),
            _ => None,
        }
    }
}

fn pool_report(error: &deadpool_postgres::PoolError) -> String {
    match error {
        deadpool_postgres::PoolError::Backend(e) => pg_report(e),
        other => other.to_string(),
    }
}
