//! `eventsctl tail`: events as JSON lines, read exactly as a consumer reads them — in position
//! order, only below the visibility horizon (`event_store::position::Reader`), so an event whose
//! transaction commits late is printed late, never skipped. It follows the stream with the shared
//! [`Follower`] (as the consumer does): LISTEN before the first read, batches cut by rows or
//! bytes followed at once, and without `--follow` it stops only when nothing more is readable.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use event_store::follow::{Follow, Follower, Quiet, Step};
use event_store::listener::Listener;
use event_store::migrations::{self, Role};
use event_store::position::{Batch, Reader};
use event_store::{db, Position, Topic};
use services::config::{parse_duration, ChannelArgs};
use tokio_util::sync::CancellationToken;

use crate::cli::Cli;
use crate::exit::{self, Code};
use crate::output;
use crate::target::Target;

/// Print events as JSON lines (position, id, event_id, topic, key, type, created_at, payload,
/// headers), in commit-safe position order: with the same no-skip reading as the consumer.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "\
Examples:
  eventsctl tail --from latest --follow                       # what is flowing right now
  eventsctl tail --topic orders --from 2026-12-04T17:00:00Z | jq .payload
  eventsctl tail --from 81234/1048576 --limit 10")]
pub struct Args {
    /// Only events of this topic (repeat for several; default: all topics)
    #[arg(long = "topic", value_name = "TOPIC")]
    pub topics: Vec<String>,

    /// Where to start: earliest, latest, a position <tx_id>/<id> (exclusive), or an RFC 3339 time
    #[arg(long = "from", default_value = "earliest")]
    pub from: Target,

    /// Keep waiting for new events (until Ctrl-C) instead of stopping at the last committed one
    #[arg(long = "follow", short = 'f')]
    pub follow: bool,

    /// Stop after printing this many events
    #[arg(long = "limit")]
    pub limit: Option<u64>,

    /// Events read per query
    #[arg(long = "batch-size", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub batch_size: u32,

    #[command(flatten)]
    pub channel: ChannelArgs,

    /// --follow: poll this often even without a wake-up
    #[arg(long = "poll-interval", default_value = "1s", value_parser = parse_duration)]
    pub poll_interval: Duration,
}

pub async fn run(cli: &Cli, args: &Args) -> anyhow::Result<Code> {
    for topic in &args.topics {
        Topic::new(topic.as_str()).map_err(|e| exit::usage(e.to_string()))?;
    }
    let config = db::config(&cli.postgres.database_url, "eventsctl:tail")?;
    let mut follow = Follow::new(config, args.channel.notify_channel.as_str());
    follow.limits.rows = args.batch_size as usize;
    follow.topics = (!args.topics.is_empty()).then(|| args.topics.clone());
    follow.poll_interval = args.poll_interval;
    follow.until_caught_up = !args.follow;
    // LISTEN before the first read: an event committed in between is either read or announced.
    let listener = Listener::connect(&follow.pg, &follow.channel, follow.wake.clone())
        .await
        .context("connect for tail")?;
    let client = listener.client();
    migrations::check(client, Role::Consumer).await?;
    let reader = Reader::prepare(client).await?;
    let from = args.from.resolve(client).await?.position;

    // The follower reads (and turns events into JSON lines) while this task prints.
    let stop = CancellationToken::new();
    let _stop_on_return = stop.clone().drop_guard();
    let encode = |batch: Batch, _after: Position| -> Vec<String> {
        for row in &batch.undecodable {
            tracing::warn!(event = %row.position, reason = %row.reason,
                "Skipping an event whose columns cannot be decoded.");
        }
        batch.events.iter().map(|event| event.to_json()).collect()
    };
    let mut follower = Follower::spawn(
        follow,
        Arc::new(Quiet),
        from,
        Some((listener, reader)),
        None,
        encode,
        stop.clone(),
    );

    let progress = output::counter("events");
    let mut printed: u64 = 0;
    // A batch of lines per write, not 8 KiB: fewer system calls into a pipe.
    let mut stdout = std::io::BufWriter::with_capacity(1 << 20, std::io::stdout().lock());
    loop {
        let step = tokio::select! {
            step = follower.steps.recv() => step,
            _ = tokio::signal::ctrl_c() => break,
        };
        match step {
            Some(Step::Batch(fetched)) => {
                if let Some(watermark) = &fetched.gap {
                    eprintln!(
                        "warning: events after {} up to {} were purged before tail read them",
                        fetched.after, watermark.position
                    );
                }
                for line in &fetched.item {
                    if args.limit.is_some_and(|limit| printed >= limit) {
                        break;
                    }
                    stdout.write_all(line.as_bytes())?;
                    stdout.write_all(b"\n")?;
                    printed += 1;
                }
                if args.limit.is_some_and(|limit| printed >= limit) {
                    break;
                }
                // Without --follow, print as fast as the reader goes; with it, show each batch.
                if args.follow {
                    stdout.flush()?;
                }
                if let Some(bar) = &progress {
                    bar.set_position(printed);
                }
            }
            Some(Step::CaughtUp { at, held_back }) => {
                if held_back {
                    eprintln!(
                        "note: committed events after {at} are held back by an older open \
                         transaction (see `eventsctl status`); they are printed once it ends"
                    );
                }
                break;
            }
            None => {
                stdout.flush()?;
                // The follower stopped on its own: an error it cannot retry past.
                follower.task.await??;
                break;
            }
        }
    }
    stdout.flush()?;
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    Ok(Code::Ok)
}
