//! Exit codes. Scripts and health checks branch on them, so they are part of the interface and
//! documented in `eventsctl --help` ([`HELP`]) and docs/eventsctl.md.

use std::process::ExitCode;

/// What `eventsctl` exits with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// Done; or `lag`: every consumer within the thresholds.
    Ok = 0,
    /// `lag`: a consumer is over `--fail-above-events` or `--fail-above-seconds`; `capture
    /// verify`: the mirror differs from its table.
    OverThreshold = 1,
    /// Bad usage or input: an unknown option, a malformed `--to`/`--from`, an unknown consumer.
    Usage = 2,
    /// Refused to act: `reset --yes` while the consumer is running; `capture add` of a table that
    /// is captured already or not the caller's.
    Refused = 3,
    /// Failed: a database unreachable, the schema missing, a privilege missing, a write failed, a
    /// dead letter that could not be replayed.
    Error = 4,
}

impl From<Code> for ExitCode {
    fn from(code: Code) -> ExitCode {
        ExitCode::from(code as u8)
    }
}

/// The exit-code table for `--help`.
pub const HELP: &str = "\
Exit codes:
  0  done; `lag`: every consumer within the thresholds
  1  `lag`: a consumer is over --fail-above-events or --fail-above-seconds; `capture verify`:
     the mirror differs from its table
  2  bad usage or input (unknown option, malformed --to/--from, unknown consumer)
  3  refused: `reset --yes` while the consumer is running (its lease is held); `capture add/remove/
     backfill` of a table that is captured already, missing, or not owned by the caller, or that
     has an unfinished backfill with another --where
  4  failed: a database unreachable, the schema or a privilege missing, a write failed,
     a dead letter that could not be replayed";

/// An error that exits with a code of its own instead of [`Code::Error`].
#[derive(Debug)]
pub struct Coded {
    pub code: Code,
    pub message: String,
}

impl std::fmt::Display for Coded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Coded {}

/// Bad input (exit 2).
pub fn usage(message: impl Into<String>) -> anyhow::Error {
    Coded {
        code: Code::Usage,
        message: message.into(),
    }
    .into()
}

/// Refused (exit 3).
pub fn refused(message: impl Into<String>) -> anyhow::Error {
    Coded {
        code: Code::Refused,
        message: message.into(),
    }
    .into()
}

/// The exit code for an error: its own when it has one, else [`Code::Error`].
pub fn code_of(error: &anyhow::Error) -> Code {
    error
        .chain()
        .find_map(|e| e.downcast_ref::<Coded>())
        .map_or(Code::Error, |c| c.code)
}

pub fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
