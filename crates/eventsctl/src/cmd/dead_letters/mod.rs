//! `eventsctl dead-letters`: the events a consumer set aside because they cannot be stored (the
//! MongoDB `deadLetters` collection, `_id` = the event's id), listed, shown, replayed or
//! discarded.
//!
//! Where the consumer's sink has no store of its own (webhooks), its dead letters are rows of
//! the PostgreSQL table `sink_dead_letters` ([`in_postgres`]): used when MONGODB_URI is not set.
//!
//! Replay is for after the cause is fixed — a mapping in a new consumer release, or the row
//! corrected in PostgreSQL: the event is read again from PostgreSQL with the consumer's reader
//! and mapped with the consumer's own document code (`mongo_format::event`), then
//! stored under its id as the consumer would have stored it, and its dead letter removed. Insert
//! first, delete second: a replay interrupted in between is simply run again (the stored
//! document is recognised as the same event). The consumer's checkpoint does not move, and a
//! running consumer is no obstacle: it has passed these events for good.

use std::collections::HashSet;

use event_store::migrations::Role;
use event_store::position::{Position, Reader};
use futures_util::TryStreamExt;
use mongo_format::dead_letter::DEAD_LETTERS;
use mongo_format::event as document;
use mongodb::bson::{doc, Bson, DateTime, Document, RawDocumentBuf};
use mongodb::Collection;
use serde::Serialize;

use crate::cli::Cli;
use crate::exit::{self, Code};
use crate::{connect, output};

mod in_postgres;

/// List, show, replay or discard the events consumers set aside (the `deadLetters` collection).
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "\
Examples:
  eventsctl dead-letters list
  eventsctl dead-letters show 1048576
  eventsctl dead-letters replay 1048576 --dry-run     # would it be stored now?
  eventsctl dead-letters replay --all --consumer orders-to-mongo
  eventsctl dead-letters discard 1048576")]
pub struct Args {
    #[command(subcommand)]
    pub action: Action,

    /// The consumers' events collection, where replayed events go (their --mongodb-collection)
    #[arg(
        long = "mongodb-collection",
        env = "MONGODB_COLLECTION",
        default_value = "receivedEvents",
        global = true
    )]
    pub collection: String,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum Action {
    /// List dead letters (id, position, consumer, topic, reason, size, first seen)
    List(Filter),
    /// Show one dead letter in full (its payload text included)
    Show {
        /// The event's id (the dead letter's _id)
        id: i64,
    },
    /// Store events again through the consumer's mapping, then remove their dead letters
    Replay(Selection),
    /// Remove dead letters without storing their events
    Discard(Selection),
}

#[derive(Debug, Clone, clap::Args)]
pub struct Filter {
    /// Only this consumer's dead letters
    #[arg(long = "consumer")]
    pub consumer: Option<String>,

    /// Only dead letters with this reason (e.g. number_out_of_range, too_deep, too_large)
    #[arg(long = "reason")]
    pub reason: Option<String>,

    /// At most this many, oldest id first
    #[arg(long = "limit", default_value_t = 100)]
    pub limit: i64,
}

#[derive(Debug, Clone, clap::Args)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["ids", "all"])))]
pub struct Selection {
    /// The events' ids
    pub ids: Vec<i64>,

    /// Every dead letter (narrowed by --consumer)
    #[arg(long = "all")]
    pub all: bool,

    /// With --all: only this consumer's dead letters
    #[arg(long = "consumer")]
    pub consumer: Option<String>,

    /// Say what would happen; change nothing
    #[arg(long = "dry-run")]
    pub dry_run: bool,

    /// With replay of dead letters kept in PostgreSQL (webhook consumers, which send the events
    /// again themselves): wait up to this long for the consumer to report each outcome (e.g.
    /// 30s). Default: only request the replay.
    #[arg(long = "wait", value_parser = services::config::parse_duration)]
    pub wait: Option<std::time::Duration>,
}

#[derive(Debug, Serialize)]
struct Letter {
    id: i64,
    position: Option<String>,
    consumer: Option<String>,
    topic: Option<String>,
    reason: Option<String>,
    detail: Option<String>,
    payload_bytes: Option<i64>,
    first_seen_at: Option<String>,
}

#[derive(Debug, Serialize)]
struct Outcome {
    id: i64,
    /// `replayed`, `already stored`, `discarded`, or (with --dry-run) `would replay`, `would
    /// discard`; `still refused`, `not in PostgreSQL`, `no dead letter` when it cannot be done.
    result: String,
    detail: Option<String>,
}

pub async fn run(cli: &Cli, args: &Args) -> anyhow::Result<Code> {
    // Sinks without a store of their own (webhooks) keep their dead letters in PostgreSQL; the
    // MongoDB sink keeps them in MongoDB. Without MONGODB_URI only the former are at hand.
    let Some(db) = connect::mongo(cli).await? else {
        return in_postgres::run(cli, &args.action).await;
    };
    let letters = db.collection::<Document>(DEAD_LETTERS);
    match &args.action {
        Action::List(filter) => list(cli, &letters, filter).await,
        Action::Show { id } => show(cli, &letters, *id).await,
        Action::Replay(selection) => {
            let client = connect::postgres(cli, Role::Consumer).await?;
            let events = db.collection::<RawDocumentBuf>(&args.collection);
            let ids = select(&letters, selection).await?;
            let reader = Reader::prepare(&client).await?;
            let progress = output::counter("replayed");
            let mut outcomes = Vec::new();
            for id in ids {
                let outcome =
                    replay_one(&client, &reader, &letters, &events, id, selection.dry_run).await?;
                outcomes.push(outcome);
                if let Some(bar) = &progress {
                    bar.inc(1);
                }
            }
            if let Some(bar) = progress {
                bar.finish_and_clear();
            }
            report(cli, &outcomes)
        }
        Action::Discard(selection) => {
            let ids = select(&letters, selection).await?;
            let mut outcomes = Vec::new();
            for id in ids {
                let result = if selection.dry_run {
                    "would discard"
                } else {
                    letters.delete_one(doc! {"_id": id}).await?;
                    "discarded"
                };
                outcomes.push(Outcome {
                    id,
                    result: result.into(),
                    detail: None,
                });
            }
            report(cli, &outcomes)
        }
    }
}

async fn list(cli: &Cli, letters: &Collection<Document>, filter: &Filter) -> anyhow::Result<Code> {
    let mut query = doc! {};
    if let Some(c) = &filter.consumer {
        query.insert("consumer", c);
    }
    if let Some(r) = &filter.reason {
        query.insert("reason", r);
    }
    let docs: Vec<Document> = letters
        .find(query)
        .sort(doc! {"_id": 1})
        .limit(filter.limit.max(1))
        .await?
        .try_collect()
        .await?;
    let list: Vec<Letter> = docs.iter().map(letter).collect();
    if cli.json {
        output::json(&list)?;
        return Ok(Code::Ok);
    }
    if list.is_empty() {
        println!("no dead letters");
        return Ok(Code::Ok);
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|l| {
            let text = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
            vec![
                l.id.to_string(),
                text(&l.position),
                text(&l.consumer),
                text(&l.topic),
                text(&l.reason),
                l.payload_bytes.map_or("-".into(), output::bytes),
                text(&l.first_seen_at),
            ]
        })
        .collect();
    print!(
        "{}",
        output::table(
            &[
                "ID",
                "POSITION",
                "CONSUMER",
                "TOPIC",
                "REASON",
                "PAYLOAD",
                "FIRST SEEN"
            ],
            &rows
        )
    );
    Ok(Code::Ok)
}

async fn show(cli: &Cli, letters: &Collection<Document>, id: i64) -> anyhow::Result<Code> {
    let Some(found) = letters.find_one(doc! {"_id": id}).await? else {
        return Err(exit::usage(format!("no dead letter for event {id}")));
    };
    let value = Bson::Document(found).into_relaxed_extjson();
    if cli.json {
        output::json(&value)?;
    } else {
        println!("{}", serde_json::to_string_pretty(&value)?);
    }
    Ok(Code::Ok)
}

/// The ids a selection names: those given (each must have a dead letter), or all (of a consumer).
async fn select(letters: &Collection<Document>, selection: &Selection) -> anyhow::Result<Vec<i64>> {
    let mut query = doc! {};
    if selection.all {
        if let Some(c) = &selection.consumer {
            query.insert("consumer", c);
        }
    } else {
        query.insert("_id", doc! {"$in": &selection.ids});
    }
    let docs: Vec<Document> = letters
        .find(query)
        .projection(doc! {"_id": 1})
        .sort(doc! {"_id": 1})
        .await?
        .try_collect()
        .await?;
    let found: Vec<i64> = docs.iter().filter_map(|d| d.get_i64("_id").ok()).collect();
    if !selection.all {
        let present: HashSet<i64> = found.iter().copied().collect();
        let missing: Vec<String> = selection
            .ids
            .iter()
            .filter(|id| !present.contains(id))
            .map(|id| id.to_string())
            .collect();
        if !missing.is_empty() {
            return Err(exit::usage(format!(
                "no dead letter for event(s) {}; `eventsctl dead-letters list` shows them",
                missing.join(", ")
            )));
        }
    }
    Ok(found)
}

async fn replay_one(
    client: &tokio_postgres::Client,
    reader: &Reader,
    letters: &Collection<Document>,
    events: &Collection<RawDocumentBuf>,
    id: i64,
    dry_run: bool,
) -> anyhow::Result<Outcome> {
    let outcome = |result: &str, detail: Option<String>| Outcome {
        id,
        result: result.into(),
        detail,
    };
    let letter = letters.find_one(doc! {"_id": id}).await?;
    let Some(position) = letter
        .as_ref()
        .and_then(|l| l.get_str("position").ok())
        .and_then(|p| Position::parse(p).ok())
    else {
        return Ok(outcome("no dead letter", None));
    };
    // The consumer's reader, one row from just before the event: the same columns and decoding.
    let before = Position::new(position.tx_id, position.id - 1);
    let batch = reader.fetch(client, before, 1, None).await?;
    if let Some(bad) = batch.undecodable.first().filter(|u| u.position == position) {
        return Ok(outcome("still refused", Some(bad.reason.clone())));
    }
    let Some(event) = batch.events.into_iter().find(|e| e.position == position) else {
        return Ok(outcome(
            "not in PostgreSQL",
            Some(format!(
                "event {position} was purged; its payload text is in the dead letter (show {id})"
            )),
        ));
    };
    let doc = match document::event_document(&event, DateTime::now()) {
        Ok(doc) => doc,
        Err(poison) => return Ok(outcome("still refused", Some(poison.to_string()))),
    };
    if dry_run {
        return Ok(outcome("would replay", None));
    }
    let result = match events.insert_one(&doc).await {
        Ok(_) => "replayed",
        Err(e) if is_duplicate_key(&e) => {
            // Stored already (an earlier replay stopped before deleting the letter): it must be
            // the same event.
            let stored = events.find_one(doc! {"_id": id}).await?;
            let same = stored
                .as_ref()
                .and_then(|d| d.get("event_id").ok().flatten())
                .and_then(|b| b.as_binary())
                .is_some_and(|b| b.bytes == event.event_id.as_bytes());
            if !same {
                anyhow::bail!(
                    "event {id}: the events collection holds another event under this id; \
                     nothing changed"
                );
            }
            "already stored"
        }
        Err(e) => return Err(e.into()),
    };
    letters.delete_one(doc! {"_id": id}).await?;
    Ok(outcome(result, None))
}

fn is_duplicate_key(e: &mongodb::error::Error) -> bool {
    match e.kind.as_ref() {
        mongodb::error::ErrorKind::Write(mongodb::error::WriteFailure::WriteError(w)) => {
            w.code == 11000
        }
        _ => false,
    }
}

/// Prints what happened to each; exit 4 when any could not be done.
fn report(cli: &Cli, outcomes: &[Outcome]) -> anyhow::Result<Code> {
    if cli.json {
        output::json(&outcomes)?;
    } else {
        for o in outcomes {
            match &o.detail {
                Some(d) => println!("{}: {} ({d})", o.id, o.result),
                None => println!("{}: {}", o.id, o.result),
            }
        }
        if outcomes.is_empty() {
            println!("no dead letters selected");
        }
    }
    let failed = outcomes
        .iter()
        .filter(|o| {
            matches!(
                o.result.as_str(),
                "still refused" | "not in PostgreSQL" | "no dead letter" | "no answer yet"
            )
        })
        .count();
    if failed > 0 {
        return Err(anyhow::anyhow!(
            "{failed} of {} could not be replayed (see above); their dead letters stay",
            outcomes.len()
        ));
    }
    Ok(Code::Ok)
}

fn letter(d: &Document) -> Letter {
    let text = |k: &str| d.get_str(k).ok().map(str::to_string);
    Letter {
        id: d.get_i64("_id").unwrap_or_default(),
        position: text("position"),
        consumer: text("consumer"),
        topic: text("topic"),
        reason: text("reason"),
        detail: text("detail"),
        payload_bytes: d.get_i64("payload_bytes").ok(),
        first_seen_at: d
            .get_datetime("first_seen_at")
            .ok()
            .map(|t| output::time(t.to_system_time())),
    }
}
