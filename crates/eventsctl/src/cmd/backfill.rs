//! `eventsctl capture backfill`: the rows a captured table already holds become `read` events,
//! chunk by chunk, each chunk its own short transaction (see `event_store::backfill` for why
//! that is causal). Progress lives in PostgreSQL, so running the same command again after a kill
//! resumes after the last finished chunk.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use event_store::backfill::{self, BackfillSpec, DEFAULT_CHUNK_ROWS};
use event_store::db;

use crate::cli::Cli;
use crate::cmd::capture::coded;
use crate::exit::Code;

/// Emit one `read` event per existing row of a captured table (same payload as an insert: key,
/// new), in key order, in chunks, while the application keeps writing. Resumable: run it again
/// after an interruption and it continues after its last finished chunk.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "\
Examples:
  eventsctl capture backfill orders
  eventsctl capture backfill 'sales.\"Order Items\"' --chunk-rows 2000 --where \"created_at > '2024-01-01'\"
  eventsctl capture backfill orders --cancel

Run it as the table's owner, a member of the capture admin role. Each chunk reads its rows with
SELECT … FOR SHARE and writes their events in the same short transaction, so writers of those rows
wait for at most one chunk. `eventsctl capture list` shows running and finished backfills.")]
pub struct BackfillArgs {
    /// The table, as in SQL: orders, sales.orders, '"Order Items"'; it must be captured
    #[arg(value_name = "TABLE")]
    pub table: String,

    /// Rows per chunk (one transaction each; its row locks last as long as it does)
    #[arg(long = "chunk-rows", default_value_t = DEFAULT_CHUNK_ROWS, value_name = "N")]
    pub chunk_rows: u32,

    /// Only rows matching this SQL condition over the table's columns (run with your rights)
    #[arg(long = "where", value_name = "SQL")]
    pub condition: Option<String>,

    /// Stop the table's unfinished backfill for good instead (its events so far stay)
    #[arg(long = "cancel", conflicts_with_all = ["condition"])]
    pub cancel: bool,
}

/// How often progress is logged when stderr is not a terminal.
const LOG_EVERY: Duration = Duration::from_secs(1);

pub async fn run(cli: &Cli, args: &BackfillArgs) -> anyhow::Result<Code> {
    let mut spec = BackfillSpec::new(args.table.as_str())
        .chunk_rows(args.chunk_rows)
        .map_err(coded)?;
    if let Some(condition) = &args.condition {
        spec = spec.condition(condition.as_str()).map_err(coded)?;
    }
    let config = db::config(&cli.postgres.database_url, "eventsctl-backfill")?;
    let mut client = db::connect_spawned(&config).await?;
    if args.cancel {
        if backfill::cancel(&client, &args.table)
            .await
            .map_err(coded)?
        {
            println!("cancelled the backfill of {}", args.table);
        } else {
            println!("{} has no unfinished backfill: nothing to do", args.table);
        }
        return Ok(Code::Ok);
    }

    let id = backfill::start(&client, &spec).await.map_err(coded)?;
    let shutdown = services::shutdown::on_signals();
    let started = Instant::now();
    let bar = progress_bar();
    let mut logged = Instant::now();
    let mut read_now = 0i64;
    loop {
        if shutdown.is_cancelled() {
            if let Some(bar) = &bar {
                bar.abandon();
            }
            return Err(anyhow::anyhow!(
                "backfill {id} of {} interrupted after {read_now} rows in this run; its finished \
                 chunks are kept: run the same command to resume",
                args.table
            ));
        }
        let chunk = backfill::chunk(&mut client, id).await.map_err(coded)?;
        read_now += chunk.rows_read;
        let rate = read_now as f64 / started.elapsed().as_secs_f64().max(1e-3);
        if let Some(bar) = &bar {
            bar.set_length(chunk.rows_total.max(chunk.rows_done) as u64);
            bar.set_position(chunk.rows_done as u64);
        } else if logged.elapsed() >= LOG_EVERY || chunk.finished {
            logged = Instant::now();
            eprintln!(
                "backfill {id} of {}: {} rows read, about {} remaining, {:.0} rows/s{}",
                args.table,
                chunk.rows_done,
                chunk.remaining(),
                rate,
                eta(chunk.remaining(), rate)
            );
        }
        if chunk.finished {
            if let Some(bar) = &bar {
                bar.finish_and_clear();
            }
            println!(
                "backfilled {}: {} rows read ({} in this run, {:.0} rows/s)",
                args.table, chunk.rows_done, read_now, rate
            );
            return Ok(Code::Ok);
        }
    }
}

fn eta(remaining: i64, rate: f64) -> String {
    if remaining == 0 || rate <= 0.0 {
        return String::new();
    }
    let secs = (remaining as f64 / rate).ceil() as u64;
    format!(
        ", about {} left",
        humantime::format_duration(Duration::from_secs(secs))
    )
}

/// A bar on a terminal only, so logs and pipes get plain lines.
fn progress_bar() -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {human_pos}/{human_len} rows ({per_sec}, {eta} left)",
        )
        .ok()?,
    );
    Some(bar)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eta_reads_well() {
        assert_eq!(eta(0, 10.0), "");
        assert_eq!(eta(100, 0.0), "");
        assert_eq!(eta(150, 10.0), ", about 15s left");
    }
}
