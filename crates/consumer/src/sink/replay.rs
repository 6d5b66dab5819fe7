//! Replays that `eventsctl dead-letters replay` asked for, for the sinks whose dead letters live
//! in PostgreSQL (`sink_dead_letters`): the running consumer holds the sink's settings and
//! secrets, so it sends the event again itself, read anew from `events`, alone, and then either
//! removes the dead letter or records why it was not taken.

use std::time::Duration;

use event_store::sink_state::{self, DeadLetterFilter, DeadLetterRow, StoredDeadLetter};
use event_store::{Event, Position};
use tokio_postgres::Client;
use tracing::{info, warn};

use super::http::store_error;
use super::SinkResult;

/// How often a sink looks for requested replays (from its housekeeping tick).
pub const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Up to 100 requested replays of `consumer`, each with its event when `events` still has it.
pub async fn requested(
    client: &Client,
    consumer: &str,
) -> SinkResult<Vec<(StoredDeadLetter, Option<Event>)>> {
    let letters = sink_state::dead_letters(
        client,
        &DeadLetterFilter {
            consumer: Some(consumer),
            replay_requested: true,
            limit: 100,
            ..Default::default()
        },
    )
    .await
    .map_err(store_error)?;
    if letters.is_empty() {
        return Ok(Vec::new());
    }
    let reader = event_store::position::Reader::prepare(client)
        .await
        .map_err(store_error)?;
    let mut out = Vec::with_capacity(letters.len());
    for letter in letters {
        let position = letter.position;
        let batch = reader
            .fetch(client, before(position), 1, None)
            .await
            .map_err(store_error)?;
        let event = batch.events.into_iter().find(|e| e.position == position);
        out.push((letter, event));
    }
    Ok(out)
}

/// The position just before `position`: where a fetch of that one event starts.
pub fn before(position: Position) -> Position {
    Position::new(position.tx_id, position.id - 1)
}

/// The sink took the replayed event: the dead letter goes.
pub async fn taken(client: &Client, consumer: &str, position: Position) -> SinkResult<()> {
    sink_state::remove_dead_letter(client, consumer, position.id)
        .await
        .map_err(store_error)?;
    info!(
        id = position.id,
        "Replayed a dead letter; the sink took it."
    );
    Ok(())
}

/// The event is gone from `events`: the reason for [`not_taken`].
pub const PURGED: &str = "replay failed: the event is no longer in PostgreSQL (purged) or cannot \
                          be read; its payload text is kept here";

/// The replay failed: the dead letter stays, with the new reason (the request is cleared).
pub async fn not_taken(
    client: &Client,
    consumer: &str,
    letter: &StoredDeadLetter,
    reason: &str,
    detail: &str,
) -> SinkResult<()> {
    warn!(id = letter.position.id, detail = %detail, "A replayed dead letter was not taken.");
    let row = DeadLetterRow {
        position: letter.position,
        event_id: letter.event_id,
        topic: letter.topic.as_deref(),
        key: letter.key.as_deref(),
        event_type: letter.event_type.as_deref(),
        payload: &letter.payload_text,
        reason,
        detail,
    };
    sink_state::record_dead_letter(client, consumer, &row)
        .await
        .map_err(store_error)
}
