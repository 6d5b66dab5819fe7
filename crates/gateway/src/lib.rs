//! The live-push gateway: the event stream over Server-Sent Events and WebSocket, to browsers and
//! services, resumable from any position without a gap or a duplicate.
//!
//! ```no_run
//! # async fn example() -> anyhow::Result<()> {
//! let config = gateway::Config::new("postgres://gateway@db/app"); // --open: no tokens
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! let bound = gateway::bind(config).await?; // fails now on a taken port
//! println!("streaming on http://{}", bound.local_addr());
//! bound.run(shutdown).await // returns when `shutdown` is cancelled and the streams said goodbye
//! # }
//! ```
//!
//! Why it exists: pushing PostgreSQL notifications to web clients is easy, but a client that was
//! away loses whatever happened meanwhile. Here every event has a position, the pair
//! `(tx_id, id)` walked in commit-safe order by [`event_store::position`], so a client that
//! reconnects (browsers' EventSource does so by itself, sending `Last-Event-ID`) gets exactly
//! what it missed and then live events.
//!
//! How it fits together:
//! - [`hub`]: the one live reader. One LISTEN connection and one fetch per wake-up serve every
//!   live client, through a broadcast; the queries per wake-up do not grow with clients.
//! - [`catch_up`]: a few pooled connections for clients that start behind the live head, under a
//!   semaphore (`--catch-up-concurrency`).
//! - [`session`]: one client: start (position, `earliest`, `latest`, or a malformed
//!   `Last-Event-ID`), catch up, join live, and every way to end — each with a `goodbye` naming
//!   the position to resume from. A bounded queue per client; a client that lets it fill is
//!   dropped, never waited for.
//! - [`http`]: routes, auth ([`auth`]), caps ([`limits`]), CORS, `Origin` and `Host` checks, the
//!   SSE and WebSocket framing ([`wire`]), the demo page, `/healthz` and `/metrics` ([`metrics`]).
//! - [`connections`]: the accept loop, connection caps, the header-read timeout and the
//!   open-file limit.

pub mod auth;
pub mod catch_up;
pub mod config;
pub mod connections;
pub mod error;
pub mod http;
pub mod hub;
pub mod limits;
pub mod metrics;
pub mod session;
pub mod wire;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use event_store::db;
use services::ops::Health;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

pub use config::Config;
pub use error::{Error, Result};

use crate::auth::Tokens;
use crate::catch_up::CatchUp;
use crate::hub::{Hub, Live};
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::session::Shared;

/// A gateway whose configuration checked out and whose port is bound.
pub struct Bound {
    config: Config,
    tokens: Tokens,
    listener: tokio::net::TcpListener,
}

/// Checks the configuration, reads the tokens file and binds `--http-addr`.
pub async fn bind(config: Config) -> anyhow::Result<Bound> {
    config.validate()?;
    let tokens = match &config.tokens_file {
        Some(path) => Tokens::load(path)?,
        None => Tokens::Open,
    };
    let listener = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("cannot listen on --http-addr {}", config.http_addr))?;
    Ok(Bound {
        config,
        tokens,
        listener,
    })
}

/// [`bind`] then [`Bound::run`].
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    bind(config).await?.run(shutdown).await
}

impl Bound {
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("bound listener has an address")
    }

    /// Connects (retrying while PostgreSQL is unreachable), then serves until `shutdown`. On
    /// shutdown every stream gets a `goodbye` with its resume position, within
    /// `--shutdown-grace`.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let config = self.config;
        let pg = db::config(&config.postgres.database_url, "events-gateway")?;
        let max_connections = connections::fit_file_limit(u64::from(config.max_connections)) as u32;
        let health = Health::new();
        let metrics = Metrics::new();
        health.failing(hub::POSTGRES, "not connected yet");
        info!(postgres = %db::describe(&pg), addr = %self.listener.local_addr()?,
              open = config.open, max_connections, "Starting the gateway.");

        let mut listen_pg = pg.clone();
        listen_pg.application_name("events-gateway:listen");
        let limits = event_store::position::Limits {
            rows: config.batch_size as usize,
            bytes: config.batch_max_bytes,
        };
        let hub = Hub {
            pg: listen_pg,
            channel: config.channel.notify_channel.to_string(),
            limits,
            poll_interval: config.poll_interval,
            health: health.clone(),
            metrics: metrics.clone(),
        };
        let wake = Arc::new(Notify::new());
        let Some((listener, reader, head)) = hub.start(wake.clone(), &shutdown).await? else {
            return Ok(());
        };
        info!(head = %head, "Live streams start at the newest readable event.");
        let live = Live::new(head);
        metrics.head(head);

        let stop_hub = CancellationToken::new();
        let hub_task = tokio::spawn(hub.run(
            live.clone(),
            wake,
            Some((listener, reader)),
            stop_hub.clone(),
        ));
        let mut catch_up_pg = pg.clone();
        catch_up_pg.application_name("events-gateway:catch-up");
        let shared = Arc::new(Shared {
            live,
            catch_up: Arc::new(CatchUp::new(
                catch_up_pg,
                config.catch_up_concurrency as usize,
                limits,
                metrics.clone(),
            )),
            metrics: metrics.clone(),
            heartbeat: config.heartbeat_interval,
            max_age: config.max_stream_age,
            shutdown: shutdown.clone(),
            goodbye_wait: config.shutdown_grace,
            slow_client_timeout: config.slow_client_timeout,
        });
        let tasks = TaskTracker::new();
        let app = Arc::new(http::App {
            shared,
            tokens: self.tokens,
            limits: Limits::new(
                config.max_clients,
                config.max_clients_per_token,
                metrics.clone(),
            ),
            allowed_origins: config.origins(),
            allowed_hosts: config.hosts(),
            client_buffer: config.client_buffer as usize,
            tasks: tasks.clone(),
        });
        let router = http::router(app, health.clone());
        let caps = connections::Caps::new(
            max_connections as usize,
            config.max_connections_per_address as usize,
        );
        let serve = connections::serve(
            self.listener,
            router,
            caps,
            config.header_read_timeout,
            shutdown.clone(),
        );
        let grace = config.shutdown_grace;
        let served = tokio::select! {
            () = serve => Ok(()),
            _ = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => {
                warn!(grace = %humantime::format_duration(grace),
                      "Streams still open after the shutdown grace period; closing them.");
                Ok(())
            }
        };
        // Sessions said goodbye when `shutdown` fired; WebSockets (which the HTTP server no longer
        // tracks once upgraded) finish sending theirs here.
        tasks.close();
        let _ = tokio::time::timeout(grace, tasks.wait()).await;
        stop_hub.cancel();
        let _ = hub_task.await;
        info!("Stopped.");
        served
    }
}
