//! The consumer: copies every committed event from the PostgreSQL outbox into MongoDB, in commit
//! order, exactly once as far as MongoDB can tell, surviving restarts and outages of either side.
//!
//! ```no_run
//! # async fn example() -> consumer::Result<()> {
//! let config = consumer::Config::new("postgres://consumer@db/app", Some("mongodb://mongo".into()));
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! consumer::run(config, shutdown).await // returns when `shutdown` is cancelled
//! # }
//! ```
//!
//! How it fits together:
//! - [`fetcher`]: follows the stream with the shared [`event_store::follow::Follower`] (one
//!   dedicated connection that LISTENs and reads below the visibility horizon), adding the lease,
//!   the divergence check and the sink's encoding; batches are queued, overlapped with the write
//!   of the previous one through a one-slot queue.
//! - [`writer`]: stores each batch in the [`sink`], re-reading the sink's checkpoint after any
//!   failure and rewinding the fetcher when it moved.
//! - [`sink`]: the [`Sink`](sink::Sink) trait; MongoDB (documents, dead letters and checkpoint,
//!   one transaction per batch when the server has transactions), or the null sink for
//!   benchmarks. The sink's checkpoint is where delivery resumes.
//! - [`publisher`]: the committed position, published to PostgreSQL for the purger, with a
//!   heartbeat.
//! - [`health`], [`monitor`] and [`metrics`]: what the parts observe, lag, `/healthz`,
//!   `/metrics`.
//!
//! No row stops the stream: payloads are read as text, never parsed on the PostgreSQL side, and
//! an event the sink cannot store becomes a dead letter in the same write as its batch
//! (`--on-poison stop` halts instead).
//!
//! Start-up checks that cannot be fixed by waiting (unparseable URIs, schema not migrated, missing
//! privileges, a checkpoint ahead of the cluster after a restore) end [`run`] with an error;
//! everything transient is retried with capped backoff for as long as it takes.

pub mod config;
pub mod error;
pub mod fetcher;
pub mod group;
pub mod health;
pub mod metrics;
pub mod monitor;
pub mod publisher;
pub mod sink;
pub mod writer;

use std::sync::Arc;

use event_store::db;
use event_store::migrations::{self, Role};
use event_store::position::{Limits, Reader};
use services::ops::{self, Health};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::info;

pub use config::{Config, OnPoison, SinkKind, Transactions};
pub use error::{Error, Result};
use sink::{Checkpoint, HttpSink, MongoSink, NatsSink, NullSink, Sink};

use crate::health::{Context, Status, POSTGRES};
use crate::metrics::Metrics;
use crate::writer::{Committed, Writer};
use event_store::divergence::{self, Expected};
use event_store::follow::Rewind;
use event_store::group::Partition;
use event_store::listener::Listener;
use event_store::retry::{sleep_or_stop, Decision, Policy, Retry};

/// Runs the consumer described by `config` until `shutdown` is cancelled (then returns `Ok`
/// after the batch in flight), or until an error that waiting cannot fix.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    config.validate()?;
    if config.partitions.is_some() {
        return group::run(config, shutdown).await;
    }
    match config.sink {
        SinkKind::Null => run_with(config, NullSink::new(), shutdown).await,
        SinkKind::Mongodb => {
            let sink = MongoSink::new(config.mongo()).await?;
            run_with(config, sink, shutdown).await
        }
        SinkKind::Nats => {
            let app = format!("events-consumer:{}", config.name);
            let pool = db::pool(db::config(&config.postgres.database_url, &app)?, 2)?;
            let sink = NatsSink::new(config.nats()?, pool);
            run_with(config, sink, shutdown).await
        }
        SinkKind::Http => {
            let app = format!("events-consumer:{}", config.name);
            let pool = db::pool(db::config(&config.postgres.database_url, &app)?, 2)?;
            let sink = HttpSink::new(config.webhook()?, pool)?;
            run_with(config, sink, shutdown).await
        }
    }
}

/// [`run`] with a sink of the caller's making (the benchmarks observe a null sink).
pub async fn run_with<S: Sink>(config: Config, sink: S, shutdown: CancellationToken) -> Result<()> {
    config.validate()?;
    let (health, stop) = serve(&config, &shutdown).await?;
    // Stops the helpers (and the HTTP endpoint) however this function returns.
    let _stop_on_return = stop.clone().drop_guard();
    pipeline(&config, None, sink, health, stop).await
}

/// The process's health (and, with `--http-addr`, `/healthz` and `/metrics` serving it), and the
/// token that stops its helpers: a child of `shutdown`.
pub(crate) async fn serve(
    config: &Config,
    shutdown: &CancellationToken,
) -> Result<(Arc<Health>, CancellationToken)> {
    let health = Health::new();
    let stop = shutdown.child_token();
    ops::spawn(config.http.http_addr, health.clone(), stop.clone())
        .await
        .map_err(|e| Error::Config(format!("{e:#}")))?;
    Ok((health, stop))
}

/// One consumer's delivery: the whole stream under `config.name`, or one partition of a group
/// (then `config.name` is the partition's, its ownership is the group's lease, and the sink is
/// fenced by the lease's epoch). Reports on `health`; returns when `stop` is cancelled.
pub(crate) async fn pipeline<S: Sink>(
    config: &Config,
    part: Option<(Partition, health::Reached)>,
    mut sink: S,
    health: Arc<Health>,
    stop: CancellationToken,
) -> Result<()> {
    let name = config.name.clone();
    let app = format!("events-consumer:{name}");
    let pg = db::config(&config.postgres.database_url, &app)?;
    let metrics = Metrics::new(&name);
    let (partition, sink_reached) = part.unzip();
    let stop = stop.child_token();
    let _stop_on_return = stop.clone().drop_guard();
    if partition.is_none() {
        // A group member's health is shared by its partitions and says so for all of them.
        health.failing(POSTGRES, "not connected yet");
        health.failing(S::KIND, "not connected yet");
    }
    info!(consumer = %name, postgres = %db::describe(&pg), sink = %sink.describe(),
          topics = ?config.topic_filter(), "Starting the consumer.");

    // The dedicated connection (LISTEN, fetches, the lease) goes direct when DATABASE_URL leads
    // through a transaction-pooling proxy, which cannot LISTEN. It gets a name of its own, so
    // operators (and tests) can tell it from the pool's connections in pg_stat_activity.
    let mut listen_pg = match &config.listen_database_url {
        Some(url) => db::config(url, &app)?,
        None => pg.clone(),
    };
    listen_pg.application_name(format!("{app}:listen"));
    let ctx = Arc::new(Context {
        name: name.clone(),
        pg: listen_pg,
        channel: config.channel.notify_channel.to_string(),
        topics: config.topic_filter(),
        limits: Limits {
            rows: sink
                .batch_rows()
                .unwrap_or(usize::MAX)
                .min(config.batch_rows()),
            bytes: config.batch_max_bytes,
        },
        poll_interval: config.poll_interval,
        health: health.clone(),
        metrics: metrics.clone(),
        status: Status::default(),
        wake: Arc::new(Notify::new()),
        sink_check: S::KIND,
        encoder: sink.encoder(),
        accept_divergence: config.accept_divergence,
        dead_letters: Default::default(),
        partition,
        sink_reached,
    });

    // PostgreSQL first: LISTEN before anything is fetched, then the checks that end start-up
    // when the schema or the role is wrong.
    let mut retry = Retry::new(Policy::default());
    let listener = loop {
        let connected = async {
            let listener = Listener::connect(&ctx.pg, &ctx.channel, ctx.wake.clone()).await?;
            migrations::check(listener.client(), Role::Consumer).await?;
            if partition.is_none() {
                // The lease first: a group's first member takes it while it creates the group,
                // so that the check below cannot miss a group created meanwhile.
                event_store::lease::take(listener.client(), &ctx.name).await?;
                group::refuse_if_grouped(listener.client(), &ctx.name).await?;
            }
            Ok::<_, Error>(listener)
        }
        .await;
        match connected {
            Ok(listener) => break listener,
            Err(e) if e.decision() != Decision::Soon => return Err(e),
            Err(e) => {
                let pause = retry.failed("Cannot start on PostgreSQL yet", &e, false);
                health.failing(POSTGRES, e.to_string());
                if sleep_or_stop(pause, &stop).await {
                    return Ok(());
                }
            }
        }
    };
    health.ok(POSTGRES);

    // Then the sink, whose checkpoint says where to resume.
    let mut retry = Retry::new(Policy::default());
    let checkpoint = loop {
        match sink.open().await {
            Ok(checkpoint) => break checkpoint,
            Err(e) if e.decision() != Decision::Soon => return Err(e.into()),
            Err(e) => {
                let what = format!("Cannot reach the sink ({}) at start-up", S::KIND);
                let pause = retry.failed(&what, &e, false);
                health.failing(S::KIND, e.to_string());
                if sleep_or_stop(pause, &stop).await {
                    return Ok(());
                }
            }
        }
    };
    health.ok(S::KIND);
    let checkpoint = match checkpoint {
        Some(checkpoint) => {
            info!(position = %checkpoint.position, "Resuming after the stored checkpoint.");
            checkpoint
        }
        None => {
            info!("No checkpoint yet: starting at the oldest stored event.");
            Checkpoint::default()
        }
    };
    let start = checkpoint.position;
    let expected = Expected {
        position: start,
        event_id: checkpoint.event_id,
        origin: checkpoint.origin.clone(),
    };

    // Is this the database the checkpoint came from? The connection may have broken while we
    // waited for MongoDB; the fetcher then makes a new one and runs the same check.
    let checked = async {
        let origin = divergence::check(
            listener.client(),
            &name,
            &expected,
            config.accept_divergence,
        )
        .await?;
        let reader = Reader::prepare(listener.client()).await?;
        Ok::<_, Error>((origin, reader.for_partition(partition)))
    }
    .await;
    let (first, origin) = match checked {
        Ok((origin, reader)) => (Some((listener, reader)), Some(origin)),
        Err(e) if e.decision() != Decision::Soon => return Err(e),
        Err(_) => (None, checkpoint.origin.clone()),
    };

    metrics.position(start);
    let (committed_tx, committed_rx) = watch::channel(Committed {
        position: start,
        event_id: checkpoint.event_id,
        rewinds: 0,
    });
    let pool = db::pool(pg, 2)?;
    let publisher = tokio::spawn(publisher::publish_loop(
        pool.clone(),
        name.clone(),
        committed_rx.clone(),
        config.heartbeat_interval,
        stop.clone(),
    ));
    let committed_rx_fetcher = committed_rx.clone();
    let monitor = tokio::spawn(monitor::monitor_loop(
        ctx.clone(),
        pool,
        sink.probe(),
        committed_rx,
        config.monitor_interval,
        config.stall_timeout,
        stop.clone(),
    ));

    let (rewind_tx, rewind_rx) = watch::channel(Rewind::default());
    let follower = fetcher::spawn(
        ctx.clone(),
        start,
        first,
        origin,
        committed_rx_fetcher,
        rewind_rx,
        stop.clone(),
    );
    let writer = Writer::new(
        ctx.clone(),
        sink,
        follower.steps,
        rewind_tx,
        committed_tx,
        stop.clone(),
    );
    let fetcher = {
        let task = follower.task;
        let stop = stop.clone();
        tokio::spawn(cancel_on_error(
            async move {
                task.await
                    .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
                    .map_err(Error::from)
            },
            stop,
        ))
    };
    let writer = tokio::spawn(cancel_on_error(writer.run(), stop.clone()));
    let (fetched, written) = tokio::join!(fetcher, writer);
    stop.cancel();
    let _ = tokio::join!(publisher, monitor);
    let joined = |r: std::result::Result<Result<()>, tokio::task::JoinError>| {
        r.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
    };
    joined(fetched).and(joined(written))?;
    info!(consumer = %name, "Stopped.");
    Ok(())
}

/// Stops the other half of the pipeline when one half fails.
async fn cancel_on_error(
    work: impl std::future::Future<Output = Result<()>>,
    stop: CancellationToken,
) -> Result<()> {
    let result = work.await;
    if result.is_err() {
        stop.cancel();
    }
    result
}
