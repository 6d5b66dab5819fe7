//! What a sink's failures are to the delivery loop: a message and one [`Decision`] (retry soon,
//! retry slowly, never), plus the two outcomes the loop acts on by name — the checkpoint moved,
//! and a poison event with `--on-poison stop`. Each sink decides for its own errors (the MongoDB
//! sink from the driver's error kinds and labels); the loop never sees a sink's driver types.

use event_store::retry::Decision;
use event_store::Position;

use super::DeadLetter;

pub type SinkResult<T> = std::result::Result<T, SinkError>;

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The sink's configuration cannot work: fix it and restart.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A call to the sink failed; `message` says what we were doing and why.
    #[error("{message}")]
    Failed {
        message: String,
        decision: Decision,
        /// The driver's error, for the sink's own use (it may look at it again, e.g. to split a
        /// batch the server refused).
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// The sink asked to be called again no sooner than `after` (HTTP 429 or 503 with
    /// `Retry-After`); retried soon, but not sooner.
    #[error("{message} (asked to retry in {}s)", after.as_secs())]
    Throttled {
        message: String,
        after: std::time::Duration,
    },
    /// Carrying on would lose or corrupt events (a collection holding other events under our
    /// ids, an unreadable checkpoint). Needs an operator.
    #[error("{0}")]
    Integrity(String),
    /// The sink's stored checkpoint is not where this consumer's last write left it: the sink lost
    /// writes it had acknowledged (a crash without journal, a failover rollback), or an operator
    /// moved it. Delivery goes on from the stored checkpoint; nothing is skipped.
    #[error(
        "the stored checkpoint is at {}, not at {expected} where this consumer's last write left \
         it; delivering again from the stored checkpoint",
        found.map_or("(none)".to_string(), |p| p.to_string())
    )]
    CheckpointMoved {
        expected: Position,
        found: Option<Position>,
    },
    /// This member no longer owns the consumer group's partition: another member took it over
    /// (this one was paused, or cut off, past its lease) and stamped a newer epoch on its
    /// checkpoint. Nothing more is written to it from here.
    #[error(
        "partition {partition} was taken over by another member of the group (its checkpoint \
         carries epoch {}, this member's is {epoch}); this member's write was refused and it \
         stops writing that partition",
        found.map_or("(none)".to_string(), |e| e.to_string())
    )]
    Fenced {
        partition: String,
        epoch: i64,
        found: Option<i64>,
    },
    /// An event cannot be stored and `--on-poison stop` is set.
    #[error(
        "event {} (id {}, topic {}) cannot be stored: {}: {}. Fix the data or the mapping, or run \
         with --on-poison dead-letter to record it as a dead letter and go on",
        .0.position, .0.id(), .0.topic.as_deref().unwrap_or("?"), .0.code, .0.detail
    )]
    Poison(Box<DeadLetter>),
}

impl SinkError {
    /// A failed call, with the sink's decision.
    pub fn failed(
        message: impl Into<String>,
        decision: Decision,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> SinkError {
        SinkError::Failed {
            message: message.into(),
            decision,
            source: Some(Box::new(source)),
        }
    }

    /// The least the sink asked to wait before the next attempt.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            SinkError::Throttled { after, .. } => Some(*after),
            _ => None,
        }
    }

    /// Retry soon, slowly, or never.
    pub fn decision(&self) -> Decision {
        match self {
            SinkError::Config(_)
            | SinkError::Integrity(_)
            | SinkError::Poison(_)
            | SinkError::Fenced { .. } => Decision::Never,
            SinkError::CheckpointMoved { .. } | SinkError::Throttled { .. } => Decision::Soon,
            SinkError::Failed { decision, .. } => *decision,
        }
    }
}
