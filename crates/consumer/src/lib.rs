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
//! - [`listener`]: the one dedicated PostgreSQL connection; LISTENs for wake-ups (hints only)
//!   and runs the position queries.
//! - [`delivery`]: the loop — a fetcher (PostgreSQL, below the visibility horizon) and a writer
//!   (the sink) overlapped through a one-slot queue; purge-gap detection; hold-back reporting.
//! - [`sink`]: MongoDB (documents and checkpoint, one transaction per batch when the server has
//!   transactions), or the null sink for benchmarks. The sink's checkpoint is where delivery
//!   resumes.
//! - [`publisher`]: the committed position, published to PostgreSQL for the purger.
//! - [`monitor`] and [`metrics`]: lag, `/healthz`, `/metrics`.
//!
//! Start-up checks that cannot be fixed by waiting (unparseable URIs, schema not migrated, missing
//! privileges, a checkpoint ahead of the cluster after a restore) end [`run`] with an error;
//! everything transient is retried with capped backoff for as long as it takes.

pub mod backoff;
pub mod config;
pub mod delivery;
pub mod error;
pub mod listener;
pub mod metrics;
pub mod monitor;
pub mod publisher;
pub mod sink;

use std::sync::Arc;

use event_store::db;
use event_store::migrations::{self, Role};
use event_store::ops::{self, Health};
use event_store::position::{Position, Reader};
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use config::{Config, SinkKind, Transactions};
pub use error::{Error, Result};
use sink::{MongoSink, NullSink, Sink};

use crate::backoff::Backoff;
use crate::delivery::{Context, Status, MONGODB, POSTGRES};
use crate::listener::Listener;
use crate::metrics::Metrics;

/// Batches queued between the fetcher and the writer: one queued plus one being fetched while
/// one is written.
const PIPELINE_SLOTS: usize = 1;

/// Runs the consumer described by `config` until `shutdown` is cancelled (then returns `Ok`
/// after the batch in flight), or until an error that waiting cannot fix.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    config.validate()?;
    let sink = match config.sink {
        SinkKind::Null => Sink::Null(NullSink::new()),
        SinkKind::Mongodb => {
            let uri = config.mongodb_uri.as_deref().unwrap_or_default();
            Sink::Mongo(Box::new(
                MongoSink::new(
                    uri,
                    &config.mongodb_database,
                    &config.mongodb_collection,
                    &config.name,
                    config.mongodb_transactions,
                )
                .await?,
            ))
        }
    };
    run_with(config, sink, shutdown).await
}

/// [`run`] with a sink of the caller's making (the benchmarks observe a null sink).
pub async fn run_with(config: Config, mut sink: Sink, shutdown: CancellationToken) -> Result<()> {
    config.validate()?;
    let name = config.name.clone();
    let pg = db::config(
        &config.postgres.database_url,
        &format!("events-consumer:{name}"),
    )?;
    let health = Health::new();
    let metrics = Metrics::new(&name);
    // Stops the helpers (and the HTTP endpoint) however this function returns.
    let stop = shutdown.child_token();
    let _stop_on_return = stop.clone().drop_guard();
    ops::spawn(config.http.http_addr, health.clone(), stop.clone())
        .await
        .map_err(|e| Error::Config(format!("{e:#}")))?;
    health.failing(POSTGRES, "not connected yet");
    health.failing(MONGODB, "not connected yet");
    info!(consumer = %name, postgres = %db::describe(&pg), sink = %sink.describe(),
          topics = ?config.topic_filter(), "Starting the consumer.");

    // The LISTEN connection gets a name of its own, so operators (and tests) can tell it from the
    // pool's connections in pg_stat_activity.
    let mut listen_pg = pg.clone();
    let base = pg.get_application_name().unwrap_or("events-consumer");
    listen_pg.application_name(format!("{base}:listen"));
    let ctx = Arc::new(Context {
        name: name.clone(),
        pg: listen_pg,
        channel: config.notify_channel.clone(),
        topics: config.topic_filter(),
        batch_size: config.batch_size as usize,
        poll_interval: config.poll_interval,
        health: health.clone(),
        metrics: metrics.clone(),
        status: Status::default(),
        wake: Arc::new(Notify::new()),
        sink_check: MONGODB,
        encoder: sink.encoder(),
    });

    // PostgreSQL first: LISTEN before anything is fetched, then the checks that end start-up
    // when the schema or the role is wrong.
    let mut backoff = Backoff::reconnect();
    let mut attempt = 0u32;
    let listener = loop {
        let connected = async {
            let listener = Listener::connect(&ctx.pg, &ctx.channel, ctx.wake.clone()).await?;
            migrations::check(listener.client(), Role::Consumer).await?;
            Ok::<_, Error>(listener)
        }
        .await;
        match connected {
            Ok(listener) => break listener,
            Err(e) if !e.is_transient() => return Err(e),
            Err(e) => {
                attempt += 1;
                warn!(error = %e, attempt, "Cannot reach PostgreSQL at start-up; retrying.");
                health.failing(POSTGRES, e.to_string());
                if sleep_or_stop(backoff.next_pause(), &stop).await {
                    return Ok(());
                }
            }
        }
    };
    health.ok(POSTGRES);

    // Then the sink, whose checkpoint says where to resume.
    backoff.reset();
    attempt = 0;
    let checkpoint = loop {
        match sink.open().await {
            Ok(checkpoint) => break checkpoint,
            Err(e) if !e.is_transient() => return Err(e),
            Err(e) => {
                attempt += 1;
                warn!(error = %e, attempt, "Cannot reach MongoDB at start-up; retrying.");
                health.failing(MONGODB, e.to_string());
                if sleep_or_stop(backoff.next_pause(), &stop).await {
                    return Ok(());
                }
            }
        }
    };
    health.ok(MONGODB);
    let start = checkpoint.unwrap_or(Position::START);
    match checkpoint {
        Some(position) => info!(position = %position, "Resuming after the stored checkpoint."),
        None => info!("No checkpoint yet: starting at the oldest stored event."),
    }

    // The connection may have broken while we waited for MongoDB; the fetcher then makes a new one
    // and runs the same check.
    let reader = async {
        delivery::check_not_ahead(listener.client(), &name, start).await?;
        Ok::<_, Error>(Reader::prepare(listener.client()).await?)
    }
    .await;
    let first = match reader {
        Ok(reader) => Some((listener, reader)),
        Err(e) if !e.is_transient() => return Err(e),
        Err(_) => None,
    };

    metrics.position(start);
    let (committed_tx, committed_rx) = watch::channel(start);
    let pool = db::pool(pg, 2)?;
    let publisher = tokio::spawn(publisher::publish_loop(
        pool.clone(),
        name.clone(),
        committed_rx.clone(),
        stop.clone(),
    ));
    let monitor = tokio::spawn(monitor::monitor_loop(
        ctx.clone(),
        pool,
        sink.prober(),
        committed_rx,
        config.monitor_interval,
        config.stall_timeout,
        stop.clone(),
    ));

    let (queue_tx, queue_rx) = mpsc::channel(PIPELINE_SLOTS);
    let fetcher = tokio::spawn(cancel_on_error(
        delivery::fetch_loop(ctx.clone(), first, start, queue_tx, stop.clone()),
        stop.clone(),
    ));
    let writer = tokio::spawn(cancel_on_error(
        delivery::write_loop(ctx.clone(), sink, queue_rx, committed_tx, stop.clone()),
        stop.clone(),
    ));
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

/// Sleeps; `true` when stopped meanwhile.
async fn sleep_or_stop(duration: std::time::Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(duration) => false,
        _ = stop.cancelled() => true,
    }
}
