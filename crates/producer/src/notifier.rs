//! Wake-ups off the commit path: one side connection sends at most one NOTIFY per interval.
//!
//! PostgreSQL serialises the commits of transactions that NOTIFY through one queue lock, so a
//! `pg_notify` in every appending transaction caps throughput well below what plain INSERTs reach.
//! Wake-ups are only hints — consumers read events by position and poll as a fallback — so they
//! need not commit with the events. Appenders call [`Notifier::wake`] after their commit (a mutex
//! and a channel send, no I/O); one background task turns any number of those calls within an
//! interval into one `pg_notify` per distinct topic, in one statement on its own connection.
//!
//! The notifier's own transactions commit with `synchronous_commit = off`: a NOTIFY commit must
//! flush nothing, so it holds the queue lock only briefly and its hint leaves at once.
//!
//! The price is latency: a wake-up leaves one round trip after the commit instead of with it, plus
//! at most one interval (default 1 ms) when appends arrive faster than that. A crash between
//! commit and hint loses the hint, never the event: the consumer's fallback poll finds it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_store::db::{self, Database};
use event_store::error::pg_report;
use event_store::retry::{Policy, Retry};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_postgres::types::Type;
use tokio_postgres::Client;
use tracing::{debug, info, warn};

use event_store::channel::Channel;

/// More distinct topics than this in one interval wake consumers with the first ones only: a hint
/// for a few topics wakes every consumer anyway, and one statement stays small.
const MAX_TOPICS_PER_NOTIFY: usize = 64;

const NOTIFY_TOPICS: &str = "SELECT pg_notify($1, topic) FROM unnest($2::text[]) AS topic";

/// A handle to the background task that sends wake-ups. Cheap to clone; when the last handle is
/// dropped the task sends what is pending and ends (await [`NotifierTask::finished`]).
#[derive(Clone)]
pub struct Notifier {
    pending: Arc<Mutex<Vec<String>>>,
    signal: mpsc::Sender<()>,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier").finish_non_exhaustive()
    }
}

/// The background task behind a [`Notifier`].
#[derive(Debug)]
pub struct NotifierTask(JoinHandle<()>);

impl NotifierTask {
    /// Waits until every [`Notifier`] handle is gone and the last wake-ups are sent (or, when
    /// PostgreSQL is unreachable, given up after one more attempt).
    pub async fn finished(self) {
        if let Err(error) = self.0.await {
            warn!(%error, "The notifier task failed.");
        }
    }
}

impl Notifier {
    /// Starts the task (it connects at once and reconnects on its own) and returns its handle.
    /// Must be called inside a Tokio runtime.
    pub fn spawn(db: Database, channel: Channel, interval: Duration) -> (Notifier, NotifierTask) {
        let pending = Arc::new(Mutex::new(Vec::new()));
        // Capacity 1: a signal already waiting covers every wake-up that arrives after it.
        let (signal, rx) = mpsc::channel(1);
        let worker = Worker {
            db,
            channel,
            interval,
            pending: pending.clone(),
            client: None,
            retry: Retry::new(Policy::default()),
        };
        let task = tokio::spawn(worker.run(rx));
        (Notifier { pending, signal }, NotifierTask(task))
    }

    /// Asks for a wake-up on each topic. Call it after the events' transaction has committed:
    /// a consumer woken earlier finds nothing new and waits for its fallback poll.
    pub fn wake<'a>(&self, topics: impl IntoIterator<Item = &'a str>) {
        {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            for topic in topics {
                if pending.len() < MAX_TOPICS_PER_NOTIFY && !pending.iter().any(|t| t == topic) {
                    pending.push(topic.to_string());
                }
            }
        }
        // Full means a wake-up is already due; closed cannot happen while a handle exists.
        let _ = self.signal.try_send(());
    }
}

struct Worker {
    db: Database,
    channel: Channel,
    interval: Duration,
    pending: Arc<Mutex<Vec<String>>>,
    client: Option<Client>,
    retry: Retry,
}

impl Worker {
    async fn run(mut self, mut signals: mpsc::Receiver<()>) {
        // Connect before the first wake-up is asked for, so it does not wait for a handshake.
        if let Err(error) = self.connect().await {
            warn!(%error, "The notifier cannot connect yet; it will retry on the first wake-up.");
        }
        loop {
            let open = signals.recv().await.is_some();
            self.flush(&signals).await;
            if !open {
                debug!("The notifier stopped: no producer is left.");
                return;
            }
            // The coalescing window: wake-ups asked for meanwhile leave together, after it.
            tokio::time::sleep(self.interval).await;
        }
    }

    /// Sends everything pending, retrying with backoff until it is sent or no handle is left.
    async fn flush(&mut self, signals: &mpsc::Receiver<()>) {
        loop {
            let topics =
                std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
            if topics.is_empty() {
                return;
            }
            match self.send(&topics).await {
                Ok(()) => {
                    metrics::counter!("producer_notifications_total")
                        .increment(topics.len() as u64);
                    if self.retry.succeeded() {
                        info!(
                            attempts = self.retry.attempt(),
                            "The notifier is sending wake-ups again."
                        );
                    }
                    return;
                }
                Err(error) => {
                    self.client = None;
                    // Keep the topics for the next attempt (merging with newer ones).
                    {
                        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                        for topic in topics {
                            if pending.len() < MAX_TOPICS_PER_NOTIFY && !pending.contains(&topic) {
                                pending.push(topic);
                            }
                        }
                    }
                    if signals.is_closed() {
                        warn!(%error, "Dropping the last wake-ups: PostgreSQL is unreachable and the producer is stopping; consumers will find the events by polling.");
                        self.pending
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .clear();
                        return;
                    }
                    let delay = self.retry.failed(
                        "Cannot send a wake-up; reconnecting the notifier to PostgreSQL",
                        &error,
                        false,
                    );
                    metrics::counter!("producer_reconnects_total", "connection" => "notifier")
                        .increment(1);
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    async fn connect(&mut self) -> Result<&Client, String> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            self.client = None;
            let client = db::connect_spawned(&self.db)
                .await
                .map_err(|e| e.to_string())?;
            // A wake-up needs no durability (a crash loses hints, never events), so its commit
            // need not wait for a WAL flush — nor hold the NOTIFY queue lock through one.
            client
                .batch_execute("SET synchronous_commit = off")
                .await
                .map_err(|e| format!("configure the notifier's connection: {}", pg_report(&e)))?;
            self.client = Some(client);
        }
        Ok(self.client.as_ref().expect("connected above"))
    }

    async fn send(&mut self, topics: &[String]) -> Result<(), String> {
        let channel = self.channel.as_str().to_string();
        let client = self.connect().await?;
        client
            .query_typed(
                NOTIFY_TOPICS,
                &[(&channel, Type::TEXT), (&topics, Type::TEXT_ARRAY)],
            )
            .await
            .map_err(|e| format!("send NOTIFY on channel {channel:?}: {}", pg_report(&e)))?;
        Ok(())
    }
}
