//! One error type for the shared crate; callers ask questions (`is_transient`) instead of matching.

use std::fmt;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, with enough context to act on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration cannot work (bad URL, bad name): fix it and restart.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The schema is missing or older than this binary: run `migrate`.
    #[error("{0}")]
    Schema(String),
    /// The database role lacks a privilege this service needs.
    #[error("{0}")]
    Privilege(String),
    /// An event failed validation; nothing was sent to the database.
    #[error("invalid event: {0}")]
    InvalidEvent(#[from] crate::event::InvalidEvent),
    /// A database call failed; `context` says what we were doing.
    #[error("{context}: {source}")]
    Database {
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },
    /// No pooled connection could be had.
    #[error("{context}: {source}")]
    Pool {
        context: String,
        #[source]
        source: deadpool_postgres::PoolError,
    },
    #[error("migration failed: {0}")]
    Migration(#[from] refinery::Error),
}

impl Error {
    pub fn database(context: impl fmt::Display, source: tokio_postgres::Error) -> Error {
        Error::Database {
            context: context.to_string(),
            source,
        }
    }

    /// Worth retrying after a pause: the connection broke, the server is restarting or shutting
    /// down, a serialization conflict. Configuration, schema, privilege and validation errors are
    /// not: retrying cannot fix them.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Database { source, .. } => is_transient_pg(source),
            Error::Pool { source, .. } => match source {
                deadpool_postgres::PoolError::Backend(e) => is_transient_pg(e),
                _ => true,
            },
            _ => false,
        }
    }

    /// The SQLSTATE, when PostgreSQL answered with an error.
    pub fn code(&self) -> Option<&tokio_postgres::error::SqlState> {
        match self {
            Error::Database { source, .. } => source.code(),
            Error::Pool {
                source: deadpool_postgres::PoolError::Backend(e),
                ..
            } => e.code(),
            _ => None,
        }
    }
}

/// Transient PostgreSQL failures: I/O and closed connections, and the SQLSTATE classes that mean
/// "the server is going away or busy" rather than "your request is wrong".
pub fn is_transient_pg(e: &tokio_postgres::Error) -> bool {
    match e.code() {
        None => true, // no SQLSTATE: I/O error, closed connection, timeout
        Some(code) => {
            let class = &code.code()[..2];
            // 08 connection exception, 53 insufficient resources, 57 operator intervention
            // (admin shutdown, crash shutdown, cannot connect now), 40 rollbacks (serialization).
            matches!(class, "08" | "53" | "57" | "40")
        }
    }
}
