//! `eventsctl tail`: events as JSON lines, read exactly as a consumer reads them — in position
//! order, only below the visibility horizon (`event_store::position::Reader`), so an event whose
//! transaction commits late is printed late, never skipped. `--follow` LISTENs on the consumers'
//! wake-up channel (the consumer's own `Listener`) before its first read, and polls as a fallback.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use event_store::migrations::{self, Role};
use event_store::position::Reader;
use event_store::{db, Topic};
use services::config::{parse_duration, ChannelArgs};
use tokio::sync::Notify;

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
    let topics = (!args.topics.is_empty()).then_some(args.topics.as_slice());
    let config = db::config(&cli.postgres.database_url, "eventsctl:tail")?;
    let wake = Arc::new(Notify::new());
    // LISTEN before the first read: an event committed in between is either read or announced.
    let listener = consumer::listener::Listener::connect(
        &config,
        args.channel.notify_channel.as_str(),
        wake.clone(),
    )
    .await
    .context("connect for tail")?;
    let client = listener.client();
    migrations::check(client, Role::Consumer).await?;
    let reader = Reader::prepare(client).await?;
    let mut after = args.from.resolve(client).await?.position;

    let progress = output::counter("events");
    let mut printed: u64 = 0;
    let mut held_back_delay = Duration::from_millis(20);
    let mut stdout = std::io::BufWriter::new(std::io::stdout().lock());
    loop {
        let batch = reader
            .fetch(client, after, args.batch_size as usize, topics)
            .await?;
        for row in &batch.undecodable {
            tracing::warn!(event = %row.position, reason = %row.reason,
                "Skipping an event whose columns cannot be decoded.");
        }
        for event in &batch.events {
            if args.limit.is_some_and(|limit| printed >= limit) {
                break;
            }
            stdout.write_all(event.to_json().as_bytes())?;
            stdout.write_all(b"\n")?;
            printed += 1;
            // The position only moves past what was printed, so --limit never skips an event.
            after = event.position;
        }
        if args.limit.is_some_and(|limit| printed >= limit) {
            break;
        }
        if let Some(end) = batch.end {
            after = end;
        }
        stdout.flush()?;
        if let Some(bar) = &progress {
            bar.set_position(printed);
        }
        if batch.scanned == args.batch_size as usize {
            continue;
        }
        let held_back = reader.pending_beyond_horizon(client, after).await?;
        if !args.follow {
            if held_back {
                eprintln!(
                    "note: committed events after {after} are held back by an older open \
                     transaction (see `eventsctl status`); they are printed once it ends"
                );
            }
            break;
        }
        // Caught up: wait for a wake-up, or re-poll soon when an open transaction holds
        // committed events back (no wake-up will come for those).
        let wait = if held_back {
            let d = held_back_delay;
            held_back_delay = (held_back_delay * 2).min(Duration::from_secs(1));
            d
        } else {
            held_back_delay = Duration::from_millis(20);
            args.poll_interval
        };
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = listener.closed() => anyhow::bail!("the connection to PostgreSQL closed; run tail again with --from {after}"),
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    stdout.flush()?;
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    Ok(Code::Ok)
}
