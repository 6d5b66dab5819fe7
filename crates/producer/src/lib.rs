//! Appending events to the `events` outbox table, and waking consumers.
//!
//! ```no_run
//! # async fn demo(client: &mut tokio_postgres::Client, db: event_store::db::Database) -> Result<(), Box<dyn std::error::Error>> {
//! use producer::{Channel, Notifier, Producer};
//! use event_store::{NewEvent, Topic};
//! use std::time::Duration;
//!
//! // One per process: wake-ups leave after commit, from a side connection.
//! let (notifier, _task) = Notifier::spawn(db, Channel::default(), Duration::from_millis(1));
//! let producer = Producer::after_commit(notifier);
//!
//! // The outbox pattern: the event commits (or rolls back) with your own writes.
//! let tx = client.transaction().await?;
//! tx.execute("UPDATE accounts SET balance = balance - 10 WHERE id = 1", &[]).await?;
//! let event = NewEvent::new(Topic::new("payments")?, serde_json::json!({"account": 1, "amount": -10}));
//! let appended = producer.append_in(&tx, &event).await?;
//! let receipt = producer.commit(tx, appended).await?; // commits, then wakes consumers
//! println!("event {} has id {}", receipt.event_id, receipt.id);
//! # Ok(()) }
//! ```
//!
//! - [`Producer::append_in`] / [`Producer::append_batch_in`] append inside the caller's
//!   transaction (anything implementing [`tokio_postgres::GenericClient`]: a `Transaction`, or a
//!   `Client` for a statement of its own). A batch is one statement and one round trip.
//! - [`Producer::append`] / [`Producer::append_pooled`] append in a transaction of their own.
//! - [`Producer::prepare`] prepares the statements once on a long-lived connection; the
//!   [`Prepared`] producer then appends without the server parsing and planning every statement
//!   (the pooled path does the same through deadpool's statement cache).
//! - Input is validated before anything is sent ([`AppendError::Invalid`]): payload size (JSON
//!   text, [`DEFAULT_MAX_PAYLOAD_BYTES`] unless configured), headers a JSON object. Topics and JSON
//!   text are validated when the [`event_store::NewEvent`] is built ([`event_store::Topic::new`],
//!   [`event_store::NewEvent::from_json_text`]).
//! - Wake-ups ([`NotifyMode`]): NOTIFY on the channel (default `events`) with the topic as
//!   payload — a hint, never the data. `after-commit` (the default, much faster under concurrent
//!   load, see [`notifier`]) or `in-transaction`.
//! - [`watcher`]: wake-ups for events written without one (table-change capture's triggers):
//!   one probe per interval for newly readable events, sent through the same [`Notifier`].
//! - `service` (feature `cli`, on by default): the `producer` binary, a load generator that counts
//!   exactly what committed, with its `config`, `pace` and `payload`. Applications that only append
//!   can turn the feature off and build no argument parser or HTTP server.

mod append;
#[cfg(feature = "cli")]
pub mod config;
mod error;
pub mod notifier;
#[cfg(feature = "cli")]
pub mod pace;
#[cfg(feature = "cli")]
pub mod payload;
#[cfg(feature = "cli")]
pub mod service;
pub mod watcher;

pub use append::{Appended, NotifyMode, Prepared, Producer, Receipt, DEFAULT_MAX_PAYLOAD_BYTES};
#[cfg(feature = "cli")]
pub use config::Args;
pub use error::AppendError;
pub use event_store::channel::{Channel, InvalidChannel};
pub use notifier::{Notifier, NotifierTask};
