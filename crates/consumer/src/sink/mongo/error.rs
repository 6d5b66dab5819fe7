//! MongoDB's failures as [`SinkError`]s: the decision comes from the driver's error kinds, labels
//! and server codes (never from message text), and the text from [`compact`].

use event_store::retry::Decision;

use crate::sink::SinkError;

/// A failed MongoDB call while doing `context`.
pub fn failed(context: impl std::fmt::Display, e: mongodb::error::Error) -> SinkError {
    let decision = if mongo_is_transient(&e) {
        Decision::Soon
    } else {
        Decision::Slowly
    };
    SinkError::failed(format!("{context}: {}", compact(&e)), decision, e)
}

/// The driver's error inside a [`SinkError::Failed`] made by [`failed`].
pub fn source(e: &SinkError) -> Option<&mongodb::error::Error> {
    match e {
        SinkError::Failed {
            source: Some(source),
            ..
        } => source.downcast_ref(),
        _ => None,
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
pub(crate) fn mongo_is_transient(e: &mongodb::error::Error) -> bool {
    use mongodb::error::{ErrorKind, RETRYABLE_WRITE_ERROR, TRANSIENT_TRANSACTION_ERROR};
    if e.contains_label(TRANSIENT_TRANSACTION_ERROR) || e.contains_label(RETRYABLE_WRITE_ERROR) {
        return true;
    }
    if super::is_rejected(e) {
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
