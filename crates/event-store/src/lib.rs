//! The shared core of the event stream: everything the producer, consumer and purger agree on.
//!
//! - [`event`]: what an event is, and the validation every producer applies before touching the
//!   database (the same rules as the schema's CHECK constraints).
//! - [`position`]: the position model. Event ids are handed out at INSERT but become visible at
//!   COMMIT, so a reader that simply follows `id` skips events whose transaction commits late.
//!   Every row therefore carries its writing transaction's id (`tx_id`), readers walk `(tx_id, id)`
//!   and read only below the *visibility horizon* (the oldest transaction still running): no row
//!   can ever appear behind a position once it has been read. All SQL that reads events by
//!   position lives in that module, and nowhere else.
//! - [`follow`]: the one loop that follows the stream (LISTEN before the first read, pipelined
//!   fetches, horizon back-off, gap detection, fallback poll, reconnects, prefetch), on the
//!   dedicated connection of [`listener`]; [`divergence`]: is this still the database a stored
//!   position was read from?
//! - [`db`]: connection pools and dedicated connections, with errors that say what to do.
//! - [`lease`]: the session advisory lock a running consumer holds, so that operator tools
//!   (`eventsctl reset`) can tell it is running and refuse to move its checkpoint.
//! - [`migrations`]: the embedded schema (`migrations/` at the repository root) and the check each
//!   service runs at start-up that the schema is there and its role may do its job.
//! - [`capture`]: table-change capture (row changes of your own tables become events in the same
//!   transaction); the work is done by triggers from migrations V5–V9, this module manages them.
//!   [`backfill`]: the rows a captured table already holds, as `read` events (V10), resumable.
//! - [`tls`]: TLS on every connection, with libpq's `sslmode` and `sslrootcert`.
//! - [`error`]: the one error report (server message, SQLSTATE, detail, hint, what to do) and the
//!   transient/permanent classification; [`retry`]: the one retry policy.
//! - [`channel`]: the NOTIFY channel wake-ups travel on.
//!
//! What only the binaries need (command-line pieces, logging, the `/healthz` + `/metrics`
//! endpoint, SIGTERM handling, the `migrate` binary) is in the `service` crate, so an application
//! that appends events through this crate does not build an HTTP server or an argument parser.

pub mod backfill;
pub mod capture;
mod certificate;
pub mod channel;
pub mod db;
pub mod divergence;
pub mod error;
pub mod event;
pub mod follow;
pub mod group;
pub mod lease;
pub mod listener;
pub mod migrations;
pub mod position;
pub mod redact;
pub mod retry;
pub mod sink_state;
#[cfg(feature = "testing")]
pub mod testing;
pub mod tls;

pub use error::{Error, Result};
pub use event::{NewEvent, RawJson, Topic};
pub use position::Event;
pub use position::Position;

/// The fixed name of the outbox table (users type `select count(*) from events`).
pub const EVENTS_TABLE: &str = "events";

/// The default NOTIFY channel that producers wake consumers on.
pub const DEFAULT_CHANNEL: &str = "events";
