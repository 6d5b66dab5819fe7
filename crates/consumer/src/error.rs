//! What can go wrong, and the one question the delivery loop asks: retry, or stop?

use std::fmt;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration cannot work: fix it and restart. Never retried.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// PostgreSQL (or the shared crate's checks: schema, privileges).
    #[error(transparent)]
    Store(#[from] event_store::Error),
    /// A MongoDB call failed; `context` says what we were doing.
    #[error("{context}: {}", compact(source))]
    Mongo {
        context: String,
        #[source]
        source: Box<mongodb::error::Error>,
    },
    /// Carrying on would lose or corrupt events (a checkpoint from another cluster, a collection
    /// holding other events under our ids). Needs an operator.
    #[error("{0}")]
    Integrity(String),
    /// A call took too long (the peer may be gone); worth retrying.
    #[error("{0} timed out")]
    Timeout(String),
    /// The sink's stored checkpoint is not where this consumer's last write left it: the sink lost
    /// writes it had acknowledged (a crash without journal, a failover rollback), or an operator
    /// moved it. Delivery goes on from the stored checkpoint; nothing is skipped.
    #[error(
        "the stored checkpoint is at {}, not at {expected} where this consumer's last write left \
         it; delivering again from the stored checkpoint",
        found.map_or("(none)".to_string(), |p| p.to_string())
    )]
    CheckpointMoved {
        expected: event_store::Position,
        found: Option<event_store::Position>,
    },
    /// An event cannot be stored and `--on-poison stop` is set.
    #[error(
        "event {} (id {}, topic {}) cannot be stored: {}: {}. Fix the data or the mapping, or run \
         with --on-poison dead-letter to record it in deadLetters and go on",
        .0.position, .0.id(), .0.topic.as_deref().unwrap_or("?"), .0.code, .0.detail
    )]
    Poison(Box<crate::sink::DeadLetter>),
}

impl Error {
    pub fn mongo(context: impl fmt::Display, source: mongodb::error::Error) -> Error {
        Error::Mongo {
            context: context.to_string(),
            source: Box::new(source),
        }
    }

    /// Retrying cannot fix it and an operator must act (credentials, privileges, schema,
    /// configuration): at start-up the consumer exits; later it waits the retry policy's longest
    /// pause between attempts and says why on `/healthz`.
    pub fn is_permanent(&self) -> bool {
        match self {
            Error::Config(_) | Error::Integrity(_) | Error::Poison(_) => true,
            Error::Store(e) => e.is_permanent(),
            Error::Mongo { source, .. } => !mongo_is_transient(source),
            Error::Timeout(_) | Error::CheckpointMoved { .. } => false,
        }
    }

    /// Worth retrying after a pause. Configuration and integrity errors are not; neither are
    /// PostgreSQL schema/privilege errors or MongoDB authentication failures, which a retry cannot
    /// fix.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Config(_) | Error::Integrity(_) | Error::Poison(_) => false,
            Error::Timeout(_) | Error::CheckpointMoved { .. } => true,
            Error::Store(e) => e.is_transient(),
            Error::Mongo { source, .. } => mongo_is_transient(source),
        }
    }
}

/// MongoDB failures worth retrying, decided from the driver's error kinds, labels and server
/// codes (never from message text):
/// - retry: network and pool errors, server selection, anything labelled
///   `TransientTransactionError`, `RetryableWriteError` or `UnknownTransactionCommitResult`,
///   not-primary and shutdown codes, write-concern errors (a majority not reached yet);
/// - never: bad credentials or TLS settings, missing privileges (13 Unauthorized,
///   18 AuthenticationFailed), invalid arguments, and documents the server refuses as invalid
///   (those are isolated as dead letters before they get here).
pub fn mongo_is_transient(e: &mongodb::error::Error) -> bool {
    use mongodb::error::{ErrorKind, RETRYABLE_WRITE_ERROR, TRANSIENT_TRANSACTION_ERROR};
    if e.contains_label(TRANSIENT_TRANSACTION_ERROR) || e.contains_label(RETRYABLE_WRITE_ERROR) {
        return true;
    }
    if crate::sink::mongo::is_rejected(e) {
        return false;
    }
    match e.kind.as_ref() {
        ErrorKind::Authentication { .. }
        | ErrorKind::InvalidArgument { .. }
        | ErrorKind::InvalidTlsConfig { .. } => false,
        ErrorKind::Command(c) => !matches!(c.code, 13 | 18),
        ErrorKind::Write(mongodb::error::WriteFailure::WriteError(w)) => !matches!(w.code, 13 | 18),
        _ => true,
    }
}

/// The MongoDB counterpart of [`event_store::error::pg_report`], and the one place a MongoDB
/// error becomes text (logs, `/healthz`, exit messages): one line with the server's error code and
/// code name, its message, the error labels (`[RetryableWriteError, …]`), and what to do when a
/// retry cannot help. The driver's own `Display` includes the raw server response as hex, and an
/// insert's every write error.
pub fn compact(e: &mongodb::error::Error) -> String {
    use mongodb::error::{ErrorKind, WriteFailure};
    let mut text = match e.kind.as_ref() {
        ErrorKind::InsertMany(failure) => {
            let errors = failure.write_errors.as_deref().unwrap_or_default();
            let mut text = format!("insert failed: {} write errors", errors.len());
            if let Some(first) = errors.first() {
                text += &format!(" (first: code {} {})", first.code, first.message);
            }
            if let Some(concern) = &failure.write_concern_error {
                text += &format!(
                    "; write concern error code {} ({}): {}",
                    concern.code, concern.code_name, concern.message
                );
            }
            text
        }
        ErrorKind::Write(WriteFailure::WriteError(w)) => format!(
            "write error code {}{}: {}",
            w.code,
            w.code_name
                .as_deref()
                .map(|n| format!(" ({n})"))
                .unwrap_or_default(),
            w.message
        ),
        ErrorKind::Write(WriteFailure::WriteConcernError(c)) => format!(
            "write concern error code {} ({}): {}",
            c.code, c.code_name, c.message
        ),
        kind => kind.to_string(),
    };
    let mut labels: Vec<&String> = e.labels().iter().collect();
    if !labels.is_empty() {
        labels.sort();
        let labels: Vec<&str> = labels.iter().map(|l| l.as_str()).collect();
        text += &format!(" [{}]", labels.join(", "));
    }
    match e.kind.as_ref() {
        ErrorKind::Authentication { .. } => {
            text += " — check the user, password and authSource in MONGODB_URI";
        }
        ErrorKind::Command(c) if c.code == 18 => {
            text += " — check the user, password and authSource in MONGODB_URI";
        }
        ErrorKind::Command(c) if c.code == 13 => {
            text += " — the MongoDB user lacks a privilege: grant it readWrite on the consumer's \
                     database";
        }
        ErrorKind::InvalidTlsConfig { .. } => {
            text += " — check the tls, tlsCAFile and tlsCertificateKeyFile options in MONGODB_URI";
        }
        _ => {}
    }
    text
}
