//! `eventsctl capture`: turn a table's row changes into events (add, list, remove), read the
//! rows it already holds into the stream (backfill), compare it with its MongoDB mirror (verify),
//! and run the change watcher that wakes consumers for them.
//!
//! add/list/remove call the SQL functions of migrations V5–V7 through `event_store::capture` (the
//! same ones you can call from your own migrations). Run them as the table's owner, a member of
//! `<prefix>_capture_admin` (`events_capture_admin` with the default role prefix).

use std::time::Duration;

use event_store::backfill::{self, Backfill};
use event_store::capture::{self, CaptureError, CaptureSpec, Captured, Op};
use event_store::{db, Topic};
use producer::Notifier;
use serde::Serialize;
use services::config::{parse_duration, ChannelArgs};

use crate::cli::Cli;
use crate::exit::{self, Code};
use crate::output;

/// Table-change capture: row changes of a table become events, in the same transaction.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: CaptureCommand,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum CaptureCommand {
    Add(AddArgs),
    /// Every captured table with its topic, operations, key and excluded columns, and the
    /// backfills (running and finished, rows done and remaining) (--json for scripts)
    List,
    Backfill(crate::cmd::backfill::BackfillArgs),
    Verify(crate::cmd::verify::VerifyArgs),
    Remove(RemoveArgs),
    Watch(WatchArgs),
}

/// Start capturing a table: every INSERT, UPDATE, DELETE and TRUNCATE statement on it appends one
/// event per changed row (a TRUNCATE: one event), committed with the change.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "\
Examples:
  eventsctl capture add orders --topic orders
  eventsctl capture add 'sales.\"Order Items\"' --topic order-items --exclude-columns card_number
  eventsctl capture add audit_log --topic audit --ops insert --key-columns tenant,seq --full-old

Run it as the table's owner, a member of the capture admin role (events_capture_admin with the
default role prefix; see event_stream_roles). Capturing a captured table is an
error: `capture remove` it first to change its settings.")]
pub struct AddArgs {
    /// The table, as in SQL: orders, sales.orders, '"Order Items"' (quoted names keep their case)
    #[arg(value_name = "TABLE")]
    pub table: String,

    /// The topic of the events (letters, digits, '_', '.', '-')
    #[arg(long = "topic")]
    pub topic: String,

    /// Operations to capture, comma-separated: insert, update, delete, truncate
    #[arg(
        long = "ops",
        value_delimiter = ',',
        default_value = "insert,update,delete,truncate"
    )]
    pub ops: Vec<String>,

    /// Columns that never appear in any event (they stay out after a rename), comma-separated
    #[arg(
        long = "exclude-columns",
        value_delimiter = ',',
        value_name = "COLUMNS"
    )]
    pub exclude_columns: Vec<String>,

    /// The columns that identify a row (default: the primary key; required without one),
    /// comma-separated
    #[arg(long = "key-columns", value_delimiter = ',', value_name = "COLUMNS")]
    pub key_columns: Vec<String>,

    /// Updates also carry the whole old row under "old" (by default only the changed columns'
    /// old values, under "changed")
    #[arg(long = "full-old")]
    pub full_old: bool,
}

/// Stop capturing a table: its capture triggers are dropped; the table and its data are untouched.
#[derive(Debug, Clone, clap::Args)]
pub struct RemoveArgs {
    /// The table, as in SQL: orders, sales.orders, '"Order Items"'
    #[arg(value_name = "TABLE")]
    pub table: String,
}

/// Wake consumers when captured events (or any events written without a NOTIFY) become
/// readable: one index probe per --interval, one NOTIFY after commit from a side connection.
/// Runs until SIGTERM/SIGINT. One per database is enough; it needs only SELECT on events (run it
/// with a consumer's login).
#[derive(Debug, Clone, clap::Args)]
pub struct WatchArgs {
    /// How often to probe for newly readable events; also the longest a wake-up waits
    #[arg(long = "interval", env = "WATCH_INTERVAL", default_value = "1ms", value_parser = parse_duration)]
    pub interval: Duration,

    #[command(flatten)]
    pub channel: ChannelArgs,
}

pub async fn run(cli: &Cli, args: &Args) -> anyhow::Result<Code> {
    match &args.command {
        CaptureCommand::Add(add) => run_add(cli, add).await,
        CaptureCommand::List => run_list(cli).await,
        CaptureCommand::Remove(remove) => run_remove(cli, remove).await,
        CaptureCommand::Watch(watch) => run_watch(cli, watch).await,
        CaptureCommand::Backfill(b) => crate::cmd::backfill::run(cli, b).await,
        CaptureCommand::Verify(v) => crate::cmd::verify::run(cli, v).await,
    }
}

/// The spec, validated before any connection is made.
fn spec(args: &AddArgs) -> anyhow::Result<CaptureSpec> {
    let topic = Topic::new(args.topic.as_str()).map_err(|e| exit::usage(e.to_string()))?;
    let ops = args
        .ops
        .iter()
        .map(|op| op.parse::<Op>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(coded)?;
    CaptureSpec::new(args.table.as_str(), topic)
        .ops(&ops)
        .full_old(args.full_old)
        .exclude_columns(args.exclude_columns.iter().cloned())
        .and_then(|s| s.key_columns(args.key_columns.iter().cloned()))
        .map_err(coded)
}

/// Bad input (a missing table or column, no key, NULL keys, a bad --where) exits 2; a refusal
/// (not the owner or not a capture admin, already captured, an unfinished backfill with another
/// condition) 3; the rest 4.
pub(crate) fn coded(error: CaptureError) -> anyhow::Error {
    use tokio_postgres::error::SqlState;
    match error {
        CaptureError::Invalid(message) => exit::usage(message),
        CaptureError::Refused { ref code, .. }
            if *code == SqlState::INSUFFICIENT_PRIVILEGE
                || *code == SqlState::DUPLICATE_OBJECT
                || *code == SqlState::OBJECT_IN_USE =>
        {
            exit::refused(error.to_string())
        }
        refused @ CaptureError::Refused { .. } => exit::usage(refused.to_string()),
        CaptureError::Store(e) => e.into(),
    }
}

async fn connect(cli: &Cli) -> anyhow::Result<tokio_postgres::Client> {
    let config = db::config(&cli.postgres.database_url, "eventsctl")?;
    Ok(db::connect_spawned(&config).await?)
}

async fn run_add(cli: &Cli, args: &AddArgs) -> anyhow::Result<Code> {
    let spec = spec(args)?;
    let client = connect(cli).await?;
    capture::add(&client, &spec).await.map_err(coded)?;
    println!(
        "capturing {} on topic {}",
        args.table,
        spec.topic().as_str()
    );
    Ok(Code::Ok)
}

async fn run_remove(cli: &Cli, args: &RemoveArgs) -> anyhow::Result<Code> {
    let client = connect(cli).await?;
    if capture::remove(&client, &args.table).await.map_err(coded)? {
        println!("stopped capturing {}", args.table);
    } else {
        println!("{} was not captured: nothing to do", args.table);
    }
    Ok(Code::Ok)
}

#[derive(Debug, Serialize)]
struct Listed {
    table: String,
    topic: String,
    ops: Vec<String>,
    key_columns: Vec<String>,
    exclude_columns: Vec<String>,
    full_old: bool,
    /// This table's backfills, running first (omitted when there are none).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    backfills: Vec<ListedBackfill>,
}

#[derive(Debug, Serialize)]
struct ListedBackfill {
    id: i64,
    state: &'static str,
    condition: Option<String>,
    rows_done: i64,
    rows_remaining: i64,
    rows_total: i64,
    chunks_done: i64,
    chunk_rows: i32,
    started_by: String,
    started_at: String,
    updated_at: String,
    finished_at: Option<String>,
}

impl From<&Backfill> for ListedBackfill {
    fn from(b: &Backfill) -> ListedBackfill {
        ListedBackfill {
            id: b.id,
            state: if b.finished_at.is_some() {
                "finished"
            } else {
                "running"
            },
            condition: b.condition.clone(),
            rows_done: b.rows_done,
            rows_remaining: b.remaining(),
            rows_total: b.rows_total,
            chunks_done: b.chunks_done,
            chunk_rows: b.chunk_rows,
            started_by: b.started_by.clone(),
            started_at: output::time(b.started_at),
            updated_at: output::time(b.updated_at),
            finished_at: b.finished_at.map(output::time),
        }
    }
}

impl From<&Captured> for Listed {
    fn from(c: &Captured) -> Listed {
        Listed {
            table: c.qualified_name(),
            topic: c.topic.clone(),
            ops: c.ops.iter().map(|op| op.to_string()).collect(),
            key_columns: c.key_columns.clone(),
            exclude_columns: c.exclude_columns.clone(),
            full_old: c.full_old,
            backfills: Vec::new(),
        }
    }
}

async fn run_list(cli: &Cli) -> anyhow::Result<Code> {
    let client = connect(cli).await?;
    let backfills = backfill::list(&client).await.map_err(coded)?;
    let mut listed: Vec<Listed> = capture::list(&client)
        .await
        .map_err(coded)?
        .iter()
        .map(Listed::from)
        .collect();
    // Backfills of tables no longer captured are shown in the table view only.
    let mut orphans: Vec<(String, ListedBackfill)> = Vec::new();
    for b in &backfills {
        let name = b.qualified_name();
        match listed.iter_mut().find(|l| l.table == name) {
            Some(l) => l.backfills.push(ListedBackfill::from(b)),
            None => orphans.push((name, ListedBackfill::from(b))),
        }
    }
    if cli.json {
        output::json(&listed)?;
        return Ok(Code::Ok);
    }
    if listed.is_empty() {
        println!("no table is captured");
        return Ok(Code::Ok);
    }
    let rows: Vec<Vec<String>> = listed
        .iter()
        .map(|l| {
            vec![
                l.table.clone(),
                l.topic.clone(),
                l.ops.join(","),
                l.key_columns.join(","),
                l.exclude_columns.join(","),
                if l.full_old { "yes" } else { "no" }.to_string(),
            ]
        })
        .collect();
    print!(
        "{}",
        output::table(
            &["TABLE", "TOPIC", "OPS", "KEY", "EXCLUDED", "FULL OLD"],
            &rows
        )
    );
    let now = std::time::SystemTime::now();
    let backfill_rows: Vec<Vec<String>> = listed
        .iter()
        .flat_map(|l| l.backfills.iter().map(|b| (l.table.as_str(), b)))
        .chain(orphans.iter().map(|(table, b)| (table.as_str(), b)))
        .map(|(table, b)| {
            let updated = backfills
                .iter()
                .find(|x| x.id == b.id)
                .map(|x| output::age(output::elapsed(x.updated_at, now)) + " ago")
                .unwrap_or_default();
            vec![
                table.to_string(),
                b.id.to_string(),
                b.state.to_string(),
                b.rows_done.to_string(),
                b.rows_remaining.to_string(),
                b.chunks_done.to_string(),
                updated,
                b.condition.clone().unwrap_or_default(),
            ]
        })
        .collect();
    if !backfill_rows.is_empty() {
        println!();
        print!(
            "{}",
            output::table(
                &[
                    "BACKFILL OF",
                    "ID",
                    "STATE",
                    "ROWS DONE",
                    "REMAINING",
                    "CHUNKS",
                    "UPDATED",
                    "WHERE"
                ],
                &backfill_rows
            )
        );
    }
    Ok(Code::Ok)
}

async fn run_watch(cli: &Cli, args: &WatchArgs) -> anyhow::Result<Code> {
    if args.interval.is_zero() {
        return Err(exit::usage("--interval must be greater than zero"));
    }
    let channel = args.channel.notify_channel.clone();
    let config = db::config(&cli.postgres.database_url, "eventsctl-capture-watch")?;
    // Fail fast on a bad URL or a missing grant, instead of retrying forever in the background.
    let client = db::connect_spawned(&config).await?;
    event_store::migrations::check(&client, event_store::migrations::Role::Consumer).await?;
    drop(client);
    let shutdown = services::shutdown::on_signals();
    eprintln!(
        "watching for new events every {}; waking consumers on channel {:?} (SIGTERM/SIGINT stops)",
        humantime::format_duration(args.interval),
        channel.as_str()
    );
    let (notifier, task) = Notifier::spawn(config.clone(), channel, args.interval);
    producer::watcher::run(config, notifier, args.interval, shutdown).await;
    task.finished().await;
    eprintln!("stopped");
    Ok(Code::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        let mut full = vec![
            "eventsctl",
            "--database-url",
            "postgres://x@h/db",
            "capture",
        ];
        full.extend_from_slice(args);
        Cli::try_parse_from(full)
    }

    fn add(cli: Cli) -> AddArgs {
        match cli.command {
            crate::cli::Command::Capture(Args {
                command: CaptureCommand::Add(a),
            }) => a,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn add_parses_its_options_and_validates_before_connecting() {
        let a = add(parse(&[
            "add",
            "sales.\"Order Items\"",
            "--topic",
            "items",
            "--ops",
            "insert,update",
            "--exclude-columns",
            "card,ssn",
            "--key-columns",
            "tenant,seq",
            "--full-old",
        ])
        .unwrap());
        assert_eq!(a.table, "sales.\"Order Items\"");
        assert_eq!(a.ops, ["insert", "update"]);
        assert_eq!(a.exclude_columns, ["card", "ssn"]);
        assert_eq!(a.key_columns, ["tenant", "seq"]);
        assert!(a.full_old);
        assert!(spec(&a).is_ok());

        let defaults = add(parse(&["add", "orders", "--topic", "orders"]).unwrap());
        assert_eq!(defaults.ops, ["insert", "update", "delete", "truncate"]);
        assert!(defaults.key_columns.is_empty() && !defaults.full_old);

        for bad in [
            vec!["add", "orders", "--topic", "bad topic"],
            vec!["add", "orders", "--topic", "t", "--ops", "upsert"],
            vec!["add", "orders", "--topic", "t", "--key-columns", "a,a"],
        ] {
            let a = add(parse(&bad).unwrap());
            assert!(spec(&a).is_err(), "{bad:?} should be refused");
        }
        assert!(parse(&["add", "orders"]).is_err(), "--topic is required");
        assert!(parse(&["watch", "--interval", "soon"]).is_err());
    }
}
