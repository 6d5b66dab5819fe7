//! One error type for the shared crate, and **the** error report every service prints.
//!
//! Callers ask questions instead of matching: [`Error::is_transient`] (retry soon),
//! [`Error::is_permanent`] (retrying cannot fix it: a wrong password, a missing privilege, table
//! or database, a TLS certificate that fails verification, a bad URL).
//!
//! tokio-postgres's own `Display` of a server error is just "db error", with the server's words
//! one `source()` down, so a log that prints `{error}` tells nobody anything. [`pg_report`] is the
//! one place that turns a PostgreSQL error into text: the server's message, SQLSTATE, detail and
//! hint, and — for the errors that will not fix themselves — what to do about it. [`report`] does
//! the same for any error chain (an `anyhow::Error` at exit, a pool error), so logs, `/healthz`
//! and exit messages all say the same thing.

use std::fmt;

use tokio_postgres::error::SqlState;

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
    InvalidEvent(#[from] InvalidEvent),
    /// A database call failed; `context` says what we were doing. The text is the full report
    /// ([`pg_report`]), so the driver error is not repeated as a `source()`.
    #[error("{context}: {}", pg_report(source))]
    Database {
        context: String,
        source: tokio_postgres::Error,
    },
    /// No pooled connection could be had.
    #[error("{context}: {}", pool_report(source))]
    Pool {
        context: String,
        source: deadpool_postgres::PoolError,
    },
    #[error("migration failed: {0}")]
    Migration(#[from] refinery::Error),
    /// Carrying on would lose or skip events: a stored position from another database or cluster,
    /// or history that changed under it ([`crate::divergence`]). Needs an operator.
    #[error("{0}")]
    Integrity(String),
    /// Another session holds a consumer's lease ([`crate::lease`]); waiting for it to end.
    #[error("{0}")]
    LeaseHeld(String),
}

impl Error {
    pub fn database(context: impl fmt::Display, source: tokio_postgres::Error) -> Error {
        Error::Database {
            context: context.to_string(),
            source,
        }
    }

    /// A failed connection attempt to `target` (`host:port/db as user`, never the password).
    pub fn connect(target: impl fmt::Display, source: tokio_postgres::Error) -> Error {
        Error::database(format!("cannot connect to PostgreSQL at {target}"), source)
    }

    /// The driver error behind a database or pool error.
    pub fn pg_error(&self) -> Option<&tokio_postgres::Error> {
        match self {
            Error::Database { source, .. } => Some(source),
            Error::Pool {
                source: deadpool_postgres::PoolError::Backend(e),
                ..
            } => Some(e),
            _ => None,
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
            Error::LeaseHeld(_) => true,
            _ => false,
        }
    }

    /// Retrying cannot fix it, and an operator must act: bad configuration (URL, TLS settings),
    /// a missing schema or privilege, or a PostgreSQL error of a [permanent](is_permanent_pg)
    /// kind. At start-up, services exit non-zero on these; later they back off to their longest
    /// pause and say why in `/healthz`.
    pub fn is_permanent(&self) -> bool {
        match self {
            Error::Config(_)
            | Error::Schema(_)
            | Error::Privilege(_)
            | Error::Migration(_)
            | Error::Integrity(_) => true,
            Error::InvalidEvent(_) | Error::LeaseHeld(_) => false,
            _ => self.pg_error().is_some_and(is_permanent_pg),
        }
    }

    /// The retry decision: [`Error::is_transient`] errors soon, integrity and configuration
    /// errors never, everything else slowly (an operator may be fixing it).
    pub fn decision(&self) -> crate::retry::Decision {
        use crate::retry::Decision;
        match self {
            Error::Integrity(_) | Error::Config(_) => Decision::Never,
            e if e.is_transient() => Decision::Soon,
            _ => Decision::Slowly,
        }
    }

    /// The SQLSTATE, when PostgreSQL answered with an error.
    pub fn code(&self) -> Option<&SqlState> {
        self.pg_error().and_then(|e| e.code())
    }
}

/// Transient PostgreSQL failures: I/O and closed connections, and the SQLSTATE classes that mean
/// "the server is going away or busy" rather than "your request is wrong". A TLS certificate that
/// fails verification is not transient, although it has no SQLSTATE.
pub fn is_transient_pg(e: &tokio_postgres::Error) -> bool {
    match e.code() {
        None => advice(e).is_none(),
        Some(code) => {
            let class = &code.code()[..2];
            // 08 connection exception, 53 insufficient resources, 57 operator intervention
            // (admin shutdown, crash shutdown, cannot connect now), 40 rollbacks (serialization).
            matches!(class, "08" | "53" | "57" | "40")
        }
    }
}

/// Errors that will not fix themselves: bad password (28P01), no `pg_hba.conf` entry (28000),
/// insufficient privilege (42501), undefined table (42P01), unknown database (3D000), a TLS
/// certificate that fails verification, a server without TLS when TLS is required, a missing
/// password.
pub fn is_permanent_pg(e: &tokio_postgres::Error) -> bool {
    advice(e).is_some()
}

/// What to do about a permanent error (`None` for the others).
fn advice(e: &tokio_postgres::Error) -> Option<String> {
    if let Some(db) = e.as_db_error() {
        let code = db.code();
        let text = if *code == SqlState::INVALID_PASSWORD {
            "the password is wrong for this user: fix the password in DATABASE_URL".into()
        } else if *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION {
            if db.message().contains("no encryption") {
                "the server accepts this login only over TLS: add sslmode=verify-full and \
                 sslrootcert=<CA file> (or at least sslmode=require) to DATABASE_URL"
                    .into()
            } else {
                "the server does not let this user in from here (pg_hba.conf, or the role \
                 cannot log in): check the user, database and TLS settings in DATABASE_URL, or ask \
                 the database administrator for an entry"
                    .into()
            }
        } else if *code == SqlState::INSUFFICIENT_PRIVILEGE {
            if db.message().contains("for database") {
                "the login may not connect to this database: grant it the database's group role \
                 (see docs/security.md: `GRANT <prefix>_consumer TO <login>`)"
                    .into()
            } else {
                "the login lacks a privilege: grant it the database's group role (see \
                 docs/security.md), or run `migrate` if the schema predates this binary"
                    .into()
            }
        } else if *code == SqlState::UNDEFINED_TABLE || *code == SqlState::UNDEFINED_FUNCTION {
            "the schema is missing or older than this binary: run `migrate` against this database"
                .into()
        } else if *code == SqlState::INVALID_CATALOG_NAME {
            "the database does not exist: check the database name in DATABASE_URL (or create it \
             and run `migrate`)"
                .into()
        } else {
            return None;
        };
        return Some(text);
    }
    if let Some(failure) = crate::certificate::verification_failure(e) {
        return Some(format!(
            "{failure} (or, not recommended, lower sslmode in DATABASE_URL)"
        ));
    }
    let chain = chain_text(e);
    if chain.contains("server does not support TLS") {
        return Some(
            "the server does not offer TLS but DATABASE_URL requires it: enable ssl on the server, \
             or (not recommended) set sslmode=prefer"
                .into(),
        );
    }
    if chain.contains("password missing") {
        return Some("the server asks for a password: put it in DATABASE_URL".into());
    }
    None
}

/// The one report of a PostgreSQL error: `<severity>: <message> (SQLSTATE <code>); detail: …;
/// hint: …`, then what to do when retrying cannot help; for errors the server did not send (I/O,
/// TLS), the driver's words and their causes, each once.
pub fn pg_report(e: &tokio_postgres::Error) -> String {
    let mut text = match e.as_db_error() {
        Some(db) => {
            let mut text = format!(
                "{}: {} (SQLSTATE {})",
                db.severity(),
                db.message(),
                db.code().code()
            );
            if let Some(detail) = db.detail() {
                text += &format!("; detail: {detail}");
            }
            if let Some(hint) = db.hint() {
                text += &format!("; hint: {hint}");
            }
            text.replace('\n', " ")
        }
        None => match crate::certificate::verification_failure(e) {
            Some(_) => format!("TLS verification failed: {}", chain_text(e)),
            None => chain_text(e),
        },
    };
    if let Some(advice) = advice(e) {
        text += " — ";
        text += &advice;
    } else if e.code().is_none() && !e.is_closed() {
        text += " — is the server running and reachable? check the host and port in DATABASE_URL";
    }
    text
}

fn pool_report(e: &deadpool_postgres::PoolError) -> String {
    match e {
        deadpool_postgres::PoolError::Backend(e) => pg_report(e),
        other => other.to_string(),
    }
}

/// An error and its causes, `what: cause: cause`, each said once (drivers often repeat their
/// source in their own message).
fn chain_text(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// The report of any error chain, for logs, `/healthz` and exit messages: each cause once, and a
/// PostgreSQL error in it as [`pg_report`] says it. Pass `&*anyhow_error` or `&error`.
pub fn report(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = String::new();
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = cause {
        let part = match e.downcast_ref::<tokio_postgres::Error>() {
            Some(pg) => pg_report(pg),
            None => e.to_string(),
        };
        if !text.contains(&part) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&part);
        }
        if e.is::<tokio_postgres::Error>() {
            break; // its causes are in the report
        }
        cause = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("inner: detail")]
    struct Inner;

    #[test]
    fn report_says_each_cause_once() {
        assert_eq!(report(&Outer(Inner)), "outer: inner: detail");
        let wrapped = anyhow::Error::new(Outer(Inner)).context("starting");
        assert_eq!(report(&*wrapped), "starting: outer: inner: detail");
    }
}

/// Why an event was refused before reaching the database.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidEvent {
    #[error("bad topic {topic:?}: {reason}")]
    Topic { topic: String, reason: &'static str },
    #[error("payload is not valid JSON: {0}")]
    PayloadNotJson(String),
    #[error("payload is {size} bytes, over the limit of {limit} bytes")]
    PayloadTooLarge { size: usize, limit: usize },
    #[error("headers must be a JSON object")]
    HeadersNotObject,
}
