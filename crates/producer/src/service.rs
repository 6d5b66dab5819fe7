//! The `producer` service: start-up checks, the appending tasks, progress, shutdown.
//!
//! Counting is exact. Each task appends a batch with one statement (its own transaction); the
//! batch counts once that statement has returned. When the connection breaks while it runs, the
//! outcome is unknown, so after reconnecting the task looks the batch's `event_id`s up (generated
//! here, one UUID per event): the ones found count and are never sent again, the others are
//! appended again. A re-append that races a late commit of the first attempt fails on the unique
//! `event_id` and is looked up in turn, so an event can neither be lost from the count nor stored
//! twice.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use event_store::db::Database;
use event_store::migrations::{self, Role};
use event_store::retry::{sleep_or_stop, Policy, Retry};
use event_store::{db, NewEvent};
use services::ops::{self, Health};
use services::{shutdown, telemetry};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use uuid::Uuid;

use crate::append::{NotifyMode, Prepared, Producer};
use crate::config::Args;
use crate::error::AppendError;
use crate::notifier::{Notifier, NotifierTask};
use crate::pace::{Budget, Pace};
use crate::payload::Generator;

/// After SIGTERM, how long a task keeps trying to learn whether a batch whose COMMIT outcome is
/// unknown was stored, before it stops without counting it.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Runs the binary: logging, signals, the HTTP endpoint, then [`run`]. Prints
/// `produced <N> events` on stdout once appending has started, whatever the outcome.
pub async fn main(args: Args) -> anyhow::Result<()> {
    telemetry::init(&args.log.log_level)?;
    let shutdown = shutdown::on_signals();
    let health = Health::new();
    ops::spawn(args.http.http_addr, health.clone(), shutdown.clone()).await?;
    let started = start(&args, health, shutdown.clone()).await?;
    let (produced, result) = started.produce().await;
    println!("produced {produced} events");
    shutdown.cancel(); // stops the HTTP endpoint
    result
}

/// Start-up: configuration, connection, schema and privilege checks. What retrying cannot fix
/// (bad configuration, a failed login or TLS verification, a missing schema or privilege) is an
/// error; an unreachable server is retried ([`event_store::retry`]) until it answers or a signal
/// arrives.
pub async fn start(
    args: &Args,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> anyhow::Result<Started> {
    let db = db::config(&args.postgres.database_url, "producer")?;
    info!(
        database = %db::describe(&db),
        tls = %db.tls().describe(),
        mode = %args.notify_mode,
        rate = args.rate,
        count = ?args.count,
        batch_size = args.batch_size,
        concurrency = args.concurrency,
        "Starting the producer."
    );
    if let Some(client) = connect_with_retry(&db, &health, &shutdown).await? {
        migrations::check(&client, Role::Producer)
            .await
            .map_err(anyhow::Error::new)?;
        check_read_back(&client).await?;
        health.ok("postgres");
    }
    let (producer, notifier) = match args.notify_mode {
        NotifyMode::InTransaction => (
            Producer::in_transaction(args.channel.notify_channel.clone()),
            None,
        ),
        NotifyMode::AfterCommit => {
            let (notifier, task) = Notifier::spawn(
                db.clone(),
                args.channel.notify_channel.clone(),
                args.notify_interval,
            );
            (Producer::after_commit(notifier), Some(task))
        }
    };
    let shared = Shared {
        db,
        producer,
        generator: Generator::new(args.topics.clone(), args.payload_bytes as usize),
        batch_size: args.batch_size.into(),
        budget: Budget::new(args.count),
        pace: Pace::new(args.rate),
        seq: AtomicU64::new(0),
        produced: AtomicU64::new(0),
        health,
    };
    Ok(Started {
        shared: Arc::new(shared),
        notifier,
        concurrency: args.concurrency,
        progress_interval: args.progress_interval,
        shutdown,
    })
}

/// A producer that passed its start-up checks.
pub struct Started {
    shared: Arc<Shared>,
    notifier: Option<NotifierTask>,
    concurrency: u32,
    progress_interval: Duration,
    shutdown: CancellationToken,
}

impl Started {
    /// Appends until `--count` events have committed, a signal arrives, or an error that retrying
    /// cannot fix (a privilege revoked meanwhile). Returns the number of events committed, always,
    /// and the error if there was one.
    pub async fn produce(self) -> (u64, anyhow::Result<()>) {
        // Stops the other tasks when one fails for good.
        let stop = self.shutdown.child_token();
        let mut tasks = JoinSet::new();
        for task in 0..self.concurrency {
            let shared = self.shared.clone();
            let stop = stop.clone();
            tasks.spawn(async move { shared.work(task, stop).await });
        }
        let done = CancellationToken::new();
        let progress = tokio::spawn(report_progress(
            self.shared.clone(),
            self.progress_interval,
            done.clone(),
        ));
        let mut result = Ok(());
        while let Some(joined) = tasks.join_next().await {
            let outcome = joined.context("an appending task panicked").and_then(|r| r);
            if let Err(error) = outcome {
                if result.is_ok() {
                    stop.cancel();
                    result = Err(error);
                }
            }
        }
        done.cancel();
        let _ = progress.await;
        let produced = self.shared.produced.load(Ordering::Acquire);
        // The last handle to the notifier goes with `shared`; then its task sends what is left.
        drop(self.shared);
        if let Some(notifier) = self.notifier {
            if tokio::time::timeout(SHUTDOWN_GRACE, notifier.finished())
                .await
                .is_err()
            {
                warn!("Gave up waiting for the last wake-up; consumers will find the events by polling.");
            }
        }
        info!(produced, "The producer stopped.");
        (produced, result)
    }
}

struct Shared {
    db: Database,
    producer: Producer,
    generator: Generator,
    batch_size: u64,
    budget: Budget,
    pace: Option<Pace>,
    seq: AtomicU64,
    produced: AtomicU64,
    health: Arc<Health>,
}

impl Shared {
    async fn work(&self, task: u32, stop: CancellationToken) -> anyhow::Result<()> {
        let mut connection = Connection::new(self.db.clone(), self.producer.clone());
        let mut retry = Retry::new(Policy::default());
        loop {
            if stop.is_cancelled() {
                return Ok(());
            }
            let size = self.budget.take(self.batch_size);
            if size == 0 {
                tracing::debug!(task, "The task appended its share of --count.");
                return Ok(());
            }
            if let Some(pace) = &self.pace {
                let at = pace.reserve(size);
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = stop.cancelled() => return Ok(()),
                }
            }
            let first = self.seq.fetch_add(size, Ordering::Relaxed);
            let batch = (first..first + size)
                .map(|seq| self.generator.event(seq))
                .collect();
            self.deliver(&mut connection, &mut retry, batch, &stop)
                .await?;
        }
    }

    /// Appends `pending` until every event of it is known to be stored (and counted), retrying
    /// over reconnects. On shutdown it sends nothing new, but still settles an unknown outcome
    /// for up to [`SHUTDOWN_GRACE`].
    async fn deliver(
        &self,
        connection: &mut Connection,
        retry: &mut Retry,
        mut pending: Vec<NewEvent>,
        stop: &CancellationToken,
    ) -> anyhow::Result<()> {
        // Whether an earlier attempt may have committed.
        let mut unknown = false;
        let mut give_up_at = None;
        loop {
            if stop.is_cancelled() {
                if !unknown {
                    return Ok(());
                }
                let deadline = *give_up_at.get_or_insert_with(|| Instant::now() + SHUTDOWN_GRACE);
                if Instant::now() >= deadline {
                    warn!(
                        events = pending.len(),
                        "Stopping without knowing whether a batch committed; it is not counted."
                    );
                    return Ok(());
                }
            }
            let (client, prepared) = match connection.get().await {
                Ok((client, prepared)) => (client, prepared),
                Err(error) if error.is_transient() || error.is_permanent() => {
                    // Permanent (a revoked grant, a failed login after a password change): the
                    // longest pause, and /healthz says why, until someone fixes it.
                    self.pause(retry, &error, error.is_permanent(), stop).await;
                    continue;
                }
                Err(error) => return Err(anyhow::anyhow!("{error}")),
            };
            if unknown {
                match stored(client, &pending).await {
                    Ok(found) => {
                        unknown = false;
                        let (done, rest): (Vec<NewEvent>, Vec<NewEvent>) = pending
                            .into_iter()
                            .partition(|e| found.contains(&event_id(e)));
                        info!(
                            stored = done.len(),
                            not_stored = rest.len(),
                            "Checked a batch whose commit outcome was unknown."
                        );
                        self.count(&done);
                        self.producer.wake_committed(done.iter().map(|e| &e.topic));
                        pending = rest;
                        if pending.is_empty() || stop.is_cancelled() {
                            return Ok(());
                        }
                    }
                    Err(error) => {
                        connection.reset();
                        let permanent = error
                            .downcast_ref::<tokio_postgres::Error>()
                            .is_some_and(event_store::error::is_permanent_pg);
                        let report = event_store::error::report(error.as_ref());
                        self.pause(retry, &report, permanent, stop).await;
                        continue;
                    }
                }
            }
            match prepared.append(client, &pending).await {
                Ok(_) => {
                    self.count(&pending);
                    if retry.succeeded() {
                        info!(attempts = retry.attempt(), "Appending again.");
                        self.health.ok("postgres");
                    }
                    return Ok(());
                }
                // An earlier attempt did commit after all (or is committing right now).
                Err(error) if error.is_duplicate() => unknown = true,
                Err(error) if error.is_transient() || error.is_permanent() => {
                    unknown = unknown || error.outcome_unknown();
                    connection.reset();
                    self.pause(retry, &error, error.is_permanent(), stop).await;
                }
                Err(error) => {
                    return Err(
                        anyhow::Error::new(error).context("cannot append events (not retried)")
                    );
                }
            }
        }
    }

    fn count(&self, events: &[NewEvent]) {
        if events.is_empty() {
            return;
        }
        self.produced
            .fetch_add(events.len() as u64, Ordering::AcqRel);
        metrics::counter!("producer_events_total").increment(events.len() as u64);
        metrics::counter!("producer_batches_total").increment(1);
    }

    async fn pause(
        &self,
        retry: &mut Retry,
        error: &(dyn std::fmt::Display + Sync),
        permanent: bool,
        stop: &CancellationToken,
    ) {
        let delay = retry.failed(
            "Cannot append; reconnecting to PostgreSQL",
            error,
            permanent,
        );
        self.health.failing("postgres", error.to_string());
        metrics::counter!("producer_reconnects_total", "connection" => "append").increment(1);
        if stop.is_cancelled() {
            // Shutting down: settling an unknown outcome, briefly.
            tokio::time::sleep(delay.min(Duration::from_millis(250))).await;
        } else {
            sleep_or_stop(delay, stop).await;
        }
    }
}

fn event_id(event: &NewEvent) -> Uuid {
    event.event_id.expect("generated events carry an event_id")
}

/// Which of these events are stored. The producer role may read `event_id`, which is all this needs.
async fn stored(client: &Client, events: &[NewEvent]) -> anyhow::Result<HashSet<Uuid>> {
    let ids: Vec<Uuid> = events.iter().map(event_id).collect();
    let rows = client
        .query(
            "SELECT event_id FROM events WHERE event_id = ANY($1)",
            &[&ids],
        )
        .await
        .context("look up events whose commit outcome is unknown")?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

/// One task's connection with the producer's statements prepared on it, made again after it
/// breaks.
struct Connection {
    db: Database,
    producer: Producer,
    live: Option<(Client, Prepared)>,
}

#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error(transparent)]
    Connect(#[from] event_store::Error),
    #[error(transparent)]
    Prepare(#[from] AppendError),
}

impl ConnectError {
    fn is_transient(&self) -> bool {
        match self {
            ConnectError::Connect(e) => e.is_transient(),
            ConnectError::Prepare(e) => e.is_transient(),
        }
    }

    fn is_permanent(&self) -> bool {
        match self {
            ConnectError::Connect(e) => e.is_permanent(),
            ConnectError::Prepare(e) => e.is_permanent(),
        }
    }
}

impl Connection {
    fn new(db: Database, producer: Producer) -> Connection {
        Connection {
            db,
            producer,
            live: None,
        }
    }

    async fn get(&mut self) -> Result<&(Client, Prepared), ConnectError> {
        if self.live.as_ref().is_none_or(|(c, _)| c.is_closed()) {
            self.live = None;
            let client = db::connect_spawned(&self.db).await?;
            let prepared = self.producer.prepare(&client).await?;
            self.live = Some((client, prepared));
        }
        Ok(self.live.as_ref().expect("connected above"))
    }

    fn reset(&mut self) {
        self.live = None;
    }
}

/// Connects for the start-up checks, retrying while the server is unreachable. `None` when a
/// signal arrived first.
async fn connect_with_retry(
    db: &Database,
    health: &Health,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<Client>> {
    let mut retry = Retry::new(Policy::default());
    loop {
        match db::connect_spawned(db).await {
            Ok(client) => return Ok(Some(client)),
            Err(error) if error.is_transient() => {
                let delay = retry.failed("Cannot reach PostgreSQL yet", &error, false);
                health.failing("postgres", error.to_string());
                if sleep_or_stop(delay, shutdown).await {
                    return Ok(None);
                }
            }
            Err(error) => return Err(anyhow::Error::new(error)),
        }
    }
}

/// `migrations::check` covers INSERT; appending also reads back `id` and `event_id` (RETURNING,
/// and the look-up after an unknown COMMIT) and draws ids from the sequence.
async fn check_read_back(client: &Client) -> anyhow::Result<()> {
    let row = client
        .query_one(
            "SELECT has_column_privilege(current_user, 'events', 'id', 'SELECT')
                AND has_column_privilege(current_user, 'events', 'event_id', 'SELECT'),
                    has_sequence_privilege(current_user, pg_get_serial_sequence('events', 'id'), 'USAGE'),
                    current_user::text",
            &[],
        )
        .await
        .context("check the producer's privileges")?;
    let (select, usage, user): (bool, bool, String) = (row.get(0), row.get(1), row.get(2));
    if !select || !usage {
        let group = migrations::group_role(client, Role::Producer).await?;
        anyhow::bail!(
            "role {user:?} lacks {} needed to append events; grant it this database's producer \
             group role: GRANT {group} TO \"{user}\"",
            if select {
                "USAGE on the events id sequence"
            } else {
                "SELECT (id, event_id) on \"events\""
            }
        );
    }
    Ok(())
}

async fn report_progress(shared: Arc<Shared>, every: Duration, done: CancellationToken) {
    let started = Instant::now();
    let mut ticks = tokio::time::interval_at(Instant::now() + every, every);
    let mut last = (started, 0u64);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = done.cancelled() => return,
        }
        let now = Instant::now();
        let appended = shared.produced.load(Ordering::Acquire);
        let rate = (appended - last.1) as f64 / now.duration_since(last.0).as_secs_f64();
        let average = appended as f64 / now.duration_since(started).as_secs_f64();
        info!(
            appended,
            rate = format!("{rate:.0}/s"),
            average = format!("{average:.0}/s"),
            "Appending events."
        );
        last = (now, appended);
    }
}
