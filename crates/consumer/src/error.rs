//! What can go wrong, and the one question the delivery loop asks: retry soon, slowly, or never
//! ([`Decision`]).

use event_store::retry::Decision;

use crate::sink::SinkError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration cannot work: fix it and restart. Never retried.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// PostgreSQL (or the shared crate's checks: schema, privileges, divergence).
    #[error(transparent)]
    Store(#[from] event_store::Error),
    /// The sink failed; it decided whether to retry.
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// A call took too long (the peer may be gone); worth retrying.
    #[error("{0} timed out")]
    Timeout(String),
}

impl Error {
    /// Retry soon, slowly (an operator must act: at start-up the consumer exits; later it waits
    /// the retry policy's longest pause between attempts and says why on `/healthz`), or never.
    pub fn decision(&self) -> Decision {
        match self {
            Error::Config(_) => Decision::Never,
            Error::Store(e) => e.decision(),
            Error::Sink(e) => e.decision(),
            Error::Timeout(_) => Decision::Soon,
        }
    }
}
