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
}

impl Error {
    pub fn mongo(context: impl fmt::Display, source: mongodb::error::Error) -> Error {
        Error::Mongo {
            context: context.to_string(),
            source: Box::new(source),
        }
    }

    /// Worth retrying after a pause. Configuration and integrity errors are not; neither are
    /// PostgreSQL schema/privilege errors or MongoDB authentication failures, which a retry cannot
    /// fix.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Config(_) | Error::Integrity(_) => false,
            Error::Timeout(_) => true,
            Error::Store(e) => e.is_transient(),
            Error::Mongo { source, .. } => mongo_is_transient(source),
        }
    }
}

/// MongoDB failures worth retrying: everything except bad credentials, missing privileges and
/// invalid arguments (the driver retries the rest once itself; we keep retrying with backoff).
pub fn mongo_is_transient(e: &mongodb::error::Error) -> bool {
    use mongodb::error::ErrorKind;
    match e.kind.as_ref() {
        ErrorKind::Authentication { .. }
        | ErrorKind::InvalidArgument { .. }
        | ErrorKind::InvalidTlsConfig { .. } => false,
        // 13 Unauthorized, 18 AuthenticationFailed.
        ErrorKind::Command(c) => !matches!(c.code, 13 | 18),
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
