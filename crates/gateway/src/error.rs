//! The gateway's error type; callers ask `is_transient` instead of matching.

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration cannot work: fix it and restart.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The tokens file cannot be read or has a bad line.
    #[error("{0}")]
    Tokens(String),
    #[error(transparent)]
    Store(#[from] event_store::Error),
}

impl Error {
    /// Worth retrying after a pause (the database went away); configuration, schema and
    /// privilege errors are not.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Store(e) => e.is_transient(),
            Error::Config(_) | Error::Tokens(_) => false,
        }
    }

    /// Retrying cannot fix it (credentials, privileges, schema): the retry policy waits its
    /// longest pause between attempts.
    pub fn is_permanent(&self) -> bool {
        match self {
            Error::Store(e) => e.is_permanent(),
            Error::Config(_) | Error::Tokens(_) => true,
        }
    }
}
