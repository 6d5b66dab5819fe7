//! The consumer's side of following the stream. The loop itself is the shared
//! [`event_store::follow::Follower`] (LISTEN before the first read, pipelined fetches, horizon
//! back-off, gap detection, fallback poll, reconnects, prefetch). This module adds what only
//! the consumer needs:
//!
//! - **On every new connection**: take the consumer's lease, and check that this is still the
//!   database the checkpoint came from ([`divergence`]). The read position may be up to two
//!   batches past the checkpoint (queued, being written), so it is checked too. Otherwise a
//!   failover that lost the commits in between would let those batches carry the checkpoint
//!   onto history the database no longer has.
//! - **Encoding** each batch in the sink's format on the follower's task, so it overlaps the
//!   write of the previous one. Each delivery records the database it was read from.
//! - **Health and metrics**: PostgreSQL up or failing, wake-ups, how long delivery has been held
//!   back and by whom.
//!
//! **Rewinds.** The read position is only the follower's guess; the sink's checkpoint is the
//! truth. When the writer finds the checkpoint elsewhere (a sink that lost acknowledged writes),
//! it sends a [`Rewind`]. The follower then reads again from there, tagging its batches with the
//! new generation so the writer drops the ones fetched before.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_store::divergence::{self, Expected};
use event_store::follow::{Follow, Follower, Observer, Resume, Rewind};
use event_store::listener::Listener;
use event_store::position::{HorizonBlocker, Origin, Position, Reader};
use tokio::sync::watch;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::health::Context;
use crate::sink::Delivery;
use crate::writer::Committed;

/// Batches fetched ahead of the one being written: one queued plus one being fetched while one
/// is written.
const PREFETCH: usize = 1;

/// What the consumer adds to the shared follower.
struct Reading {
    ctx: Arc<Context>,
    /// What the writer committed: the checkpoint a reconnect checks the database against.
    committed: watch::Receiver<Committed>,
    /// The database the batches are read from, recorded with each checkpoint.
    origin: Arc<Mutex<Option<Arc<Origin>>>>,
}

impl Observer for Reading {
    async fn connected(&self, client: &Client, resume: Resume) -> event_store::Result<()> {
        let ctx = &self.ctx;
        if ctx.partition.is_none() {
            event_store::lease::take(client, &ctx.name).await?;
        }
        let committed = *self.committed.borrow();
        let origin = self.origin.lock().unwrap().as_deref().cloned();
        let expected = Expected {
            position: committed.position,
            event_id: committed.event_id,
            origin: origin.clone(),
        };
        let here = divergence::check(client, &ctx.name, &expected, ctx.accept_divergence).await?;
        if resume.position != committed.position {
            let read = Expected {
                position: resume.position,
                event_id: resume.event_id,
                origin,
            };
            divergence::check(client, &ctx.name, &read, ctx.accept_divergence).await?;
        }
        *self.origin.lock().unwrap() = Some(Arc::new(here));
        Ok(())
    }

    fn postgres_ok(&self) {
        self.ctx.postgres_ok();
    }

    fn postgres_failing(&self, error: &event_store::Error) {
        self.ctx.postgres_failing(error);
    }

    fn reconnected(&self) {
        self.ctx.metrics.reconnects_postgres.increment(1);
    }

    fn held_back(&self, held: Option<Duration>, blocker: Option<&HorizonBlocker>) {
        self.ctx.metrics.held_back(held.unwrap_or_default());
        let mut by = self.ctx.status.held_back_by.lock().unwrap();
        match (held, blocker) {
            (None, _) => *by = None,
            (Some(_), Some(blocker)) => *by = Some(blocker.to_string()),
            (Some(_), None) => {}
        }
    }

    fn wakeup(&self) {
        self.ctx.metrics.wakeups.increment(1);
    }
}

/// Starts following from `start` for the writer. `first`: the connection start-up made and
/// checked; `origin`: the database it leads to.
pub fn spawn(
    ctx: Arc<Context>,
    start: Position,
    first: Option<(Listener, Reader)>,
    origin: Option<Origin>,
    committed: watch::Receiver<Committed>,
    rewinds: watch::Receiver<Rewind>,
    shutdown: CancellationToken,
) -> Follower<Delivery> {
    let origin = Arc::new(Mutex::new(origin.map(Arc::new)));
    let follow = Follow {
        pg: ctx.pg.clone(),
        channel: ctx.channel.clone(),
        limits: ctx.limits,
        topics: ctx.topics.clone(),
        partition: ctx.partition,
        poll_interval: ctx.poll_interval,
        until_caught_up: false,
        prefetch: PREFETCH,
        wake: ctx.wake.clone(),
    };
    let encoder = ctx.encoder;
    let read_from = origin.clone();
    let encode = move |batch: event_store::position::Batch, after: Position| {
        let end = batch.end.unwrap_or(after);
        let mut delivery = encoder(batch, after, end);
        delivery.origin = read_from.lock().unwrap().clone();
        delivery
    };
    let observer = Arc::new(Reading {
        ctx,
        committed,
        origin,
    });
    Follower::spawn(
        follow,
        observer,
        start,
        first,
        Some(rewinds),
        encode,
        shutdown,
    )
}
