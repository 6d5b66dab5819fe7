//! `eventsctl reset`: move a consumer to another position — its MongoDB checkpoint (where delivery
//! resumes) and its PostgreSQL `consumer_positions` row (what the purger keeps for it) together.
//!
//! Safety:
//! - Nothing changes without `--yes`; the plan (from, to, how many events are re-delivered or
//!   skipped) is printed either way.
//! - A running consumer would overwrite its checkpoint with its next batch, so `reset --yes` takes
//!   the consumer's lease (`event_store::lease`) for the duration of the writes and refuses
//!   (exit 3) while another session holds it or the consumer's LISTEN connection is open.
//! - The two writes are ordered so that a failure between them never lets the purger delete what
//!   the consumer still needs: moving back, PostgreSQL first (the purger keeps more from then on);
//!   moving forward, MongoDB first.
//! - Moving back re-delivers without duplicates: a document's `_id` is its event's `id`, and the
//!   consumer recognises events already stored.

use event_store::event::validate_name;
use event_store::lease;
use event_store::migrations::Role;
use event_store::position::{self, Position};
use event_store::sink_state;
use mongodb::bson::{doc, DateTime, Document};
use serde::Serialize;

use crate::cli::Cli;
use crate::consumers;
use crate::exit::{self, Code};
use crate::target::Target;
use crate::{connect, output};

/// Events counted exactly in a plan; beyond, the plan says "at least".
const PLAN_COUNT_CAP: i64 = 10_000_000;

/// Move a consumer's checkpoint (MongoDB) and published position (PostgreSQL) to another place in
/// the stream. Prints the plan; changes nothing without --yes. Refuses while the consumer runs.
///
/// --to earliest: re-deliver every event still stored (like a new consumer). latest: skip
/// everything committed so far. <tx_id>/<id>: everything after that position. <RFC 3339 time>:
/// everything created since then (and possibly a few older events: re-delivery is safe,
/// skipping is not).
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "\
Examples:
  eventsctl reset orders-to-mongo --to 2026-12-04T17:00:00Z          # the plan only
  eventsctl reset orders-to-mongo --to 2026-12-04T17:00:00Z --yes    # replay the last hour
  eventsctl reset audit --to earliest --yes
  eventsctl reset audit --to 81234/1048576 --yes

Stop the consumer first (e.g. scenarios/local stop consumer); start it again afterwards.")]
pub struct Args {
    /// The consumer's name (its --name / CONSUMER_NAME)
    pub consumer: String,

    /// Where to: earliest, latest, a position <tx_id>/<id>, or an RFC 3339 time (2026-12-04T17:00:00Z)
    #[arg(long = "to")]
    pub to: Target,

    /// Make the change (without it, only the plan is printed)
    #[arg(long = "yes")]
    pub yes: bool,
}

#[derive(Debug, Serialize)]
struct Plan {
    consumer: String,
    /// The MongoDB checkpoint now (null: none yet, it would start at the oldest event).
    from: Option<Position>,
    /// The published PostgreSQL position now.
    published: Option<Position>,
    to: Position,
    /// `re-deliver`, `skip` or `none`.
    direction: &'static str,
    /// Events between `from` and `to` (at least this many when `events_capped`).
    events: i64,
    events_capped: bool,
    warnings: Vec<String>,
    /// Why it cannot be applied now (the consumer runs), if so.
    running: Option<String>,
    /// Where the checkpoint lives: `MongoDB`, or `PostgreSQL` for the webhook and JetStream sinks.
    checkpoint_in: &'static str,
    applied: bool,
}

pub async fn run(cli: &Cli, args: &Args) -> anyhow::Result<Code> {
    validate_name(&args.consumer)
        .map_err(|why| exit::usage(format!("bad consumer name {:?}: {why}", args.consumer)))?;
    let client = connect::postgres(cli, Role::Consumer).await?;
    let name = args.consumer.as_str();
    // A consumer group: every partition moves, and only while no member runs (a member between
    // two partitions would not show as running any one of them).
    if let Some(count) = event_store::group::partitions_of(&client, name).await? {
        let members = event_store::group::members(&client, name).await?;
        if args.yes && !members.is_empty() {
            let ids: Vec<&str> = members.iter().map(|m| m.member.as_str()).collect();
            return Err(exit::refused(format!(
                "consumer group {name:?} has {} running member(s) ({}); stop every member, then \
                 run the reset again",
                members.len(),
                ids.join(", ")
            )));
        }
        for partition in event_store::group::Partition::all(count) {
            reset_one(cli, &client, &partition.name(name), args).await?;
        }
        return Ok(Code::Ok);
    }
    reset_one(cli, &client, name, args).await
}

/// Plans (and with --yes applies) the reset of one consumer: a consumer of its own, or one
/// partition of a group.
async fn reset_one(
    cli: &Cli,
    client: &tokio_postgres::Client,
    name: &str,
    args: &Args,
) -> anyhow::Result<Code> {
    // A webhook or JetStream consumer keeps its checkpoint in PostgreSQL (sink_checkpoints,
    // visible to its own login and the owner); every other one in MongoDB.
    let in_postgres = sink_state::load(client, name).await?;
    let checkpoints = match in_postgres {
        Some(_) => None,
        None => Some(
            connect::mongo_required(cli, "reset moves the consumer's MongoDB checkpoint")
                .await?
                .collection::<Document>(mongo_format::checkpoint::CHECKPOINTS),
        ),
    };

    let from = match (&in_postgres, &checkpoints) {
        (Some(stored), _) => Some(stored.position),
        (None, Some(checkpoints)) => match checkpoints.find_one(doc! {"_id": name}).await? {
            Some(d) => Some(mongo_format::checkpoint::position(&d, name)?),
            None => None,
        },
        (None, None) => None,
    };
    let published = position::published_positions(client)
        .await?
        .into_iter()
        .find(|p| p.consumer == name)
        .map(|p| p.position);
    let resolved = args.to.resolve(client).await?;
    let to = resolved.position;
    let (_, next_xid) = position::horizon(client).await?;
    if consumers::ahead_of_cluster(to, next_xid) {
        return Err(exit::usage(format!(
            "position {to} is ahead of this cluster's transaction counter (next xid {next_xid}): \
             no event can ever be there; pick a position of an existing event"
        )));
    }

    let start = from.unwrap_or(Position::START);
    let (direction, low, high) = match to.cmp(&start) {
        std::cmp::Ordering::Less => ("re-deliver", to, start),
        std::cmp::Ordering::Greater => ("skip", start, to),
        std::cmp::Ordering::Equal => ("none", to, to),
    };
    let events = position::count_between(client, low, high, PLAN_COUNT_CAP).await?;
    let mut warnings = Vec::new();
    if resolved.nothing_newer {
        warnings.push(format!(
            "no event was created at or after {}: the consumer goes to the latest position",
            args.to
        ));
    }
    if from.is_none() && in_postgres.is_none() {
        warnings.push(format!(
            "consumer {name:?} has no checkpoint in MongoDB yet: one is created"
        ));
    }
    if let Some(w) = position::watermark(client).await? {
        if to != Position::START && to < w.position {
            warnings.push(format!(
                "events up to {} were purged: resetting to {to} re-delivers only what is still \
                 stored, and the consumer will report the purged range as a gap",
                w.position
            ));
        }
    }
    let running = consumers::running(client, name).await?;
    let mut plan = Plan {
        consumer: name.to_string(),
        from,
        published,
        to,
        direction,
        events,
        events_capped: events >= PLAN_COUNT_CAP,
        warnings,
        running: running.clone(),
        checkpoint_in: if in_postgres.is_some() {
            "PostgreSQL"
        } else {
            "MongoDB"
        },
        applied: false,
    };

    if args.yes {
        if let Some(why) = running {
            print_plan(cli, &plan)?;
            return Err(exit::refused(format!(
                "consumer {name:?} is running — {why}; stop it, then run the reset again"
            )));
        }
        // Hold the lease while writing, so the consumer cannot start in between.
        if !lease::try_acquire(client, name).await? {
            let holder = lease::holder(client, name).await?;
            print_plan(cli, &plan)?;
            return Err(exit::refused(format!(
                "consumer {name:?} just started ({}); stop it, then run the reset again",
                holder.map_or("its lease is held".into(), |h| h.to_string())
            )));
        }
        let write_mongo = async {
            match &checkpoints {
                Some(checkpoints) => checkpoints
                    .update_one(
                        doc! {"_id": name},
                        mongo_format::checkpoint::update(to, DateTime::now()),
                    )
                    .upsert(true)
                    .await
                    .map(|_| ())
                    .map_err(anyhow::Error::from),
                // Both in PostgreSQL: the checkpoint moves in the transaction below.
                None => Ok(()),
            }
        };
        // The published position may never be ahead of the checkpoint (the purger would delete
        // what the consumer still needs). Back: commit PostgreSQL first. Forward: write it in a
        // transaction committed after MongoDB. Either way a refused PostgreSQL write (another
        // login owns the row) stops the reset before MongoDB is touched.
        if in_postgres.is_some() {
            client.batch_execute("BEGIN").await?;
            let moved = async {
                position::register(client, name, to)
                    .await
                    .map_err(|e| explain_position_write(e, name))?;
                sink_state::move_checkpoint(client, name, to).await?;
                Ok::<_, anyhow::Error>(())
            }
            .await;
            if let Err(e) = moved {
                client.batch_execute("ROLLBACK").await?;
                return Err(e);
            }
            client.batch_execute("COMMIT").await?;
        } else if to < start {
            position::register(client, name, to)
                .await
                .map_err(|e| explain_position_write(e, name))?;
            write_mongo.await?;
        } else {
            client.batch_execute("BEGIN").await?;
            let registered = position::register(client, name, to).await;
            if let Err(e) = registered {
                client.batch_execute("ROLLBACK").await?;
                return Err(explain_position_write(e, name));
            }
            if let Err(e) = write_mongo.await {
                client.batch_execute("ROLLBACK").await?;
                return Err(e);
            }
            client.batch_execute("COMMIT").await?;
        }
        lease::release(client, name).await?;
        plan.applied = true;
    }
    print_plan(cli, &plan)?;
    Ok(Code::Ok)
}

/// A position row the login may not write belongs to another login (row-level security).
fn explain_position_write(e: event_store::Error, name: &str) -> anyhow::Error {
    if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) {
        anyhow::Error::new(e).context(format!(
            "the consumer_positions row of {name:?} belongs to another login: run the reset as \
             the consumer's own login (its DATABASE_URL) or as the database owner; nothing changed"
        ))
    } else {
        e.into()
    }
}

fn print_plan(cli: &Cli, plan: &Plan) -> anyhow::Result<()> {
    if cli.json {
        return output::json(plan);
    }
    let at = |p: Option<Position>| p.map_or("none".to_string(), |p| p.to_string());
    let mut out = format!(
        "Reset consumer {:?}\n  from   {} ({} checkpoint; published to PostgreSQL: {})\n  to     {}\n",
        plan.consumer,
        at(plan.from),
        plan.checkpoint_in,
        at(plan.published),
        plan.to
    );
    let count = if plan.events_capped {
        format!("at least {}", plan.events)
    } else {
        plan.events.to_string()
    };
    out.push_str(&match plan.direction {
        "re-deliver" => format!("  {count} events will be delivered again (without duplicates)\n"),
        "skip" => format!("  {count} events will be skipped (never delivered)\n"),
        _ => "  nothing moves\n".to_string(),
    });
    for w in &plan.warnings {
        out.push_str(&format!("  note: {w}\n"));
    }
    if plan.applied {
        out.push_str("Done: checkpoint and published position moved. Start the consumer.\n");
    } else if let Some(why) = &plan.running {
        out.push_str(&format!(
            "The consumer is running ({why}): stop it before --yes.\n"
        ));
    } else {
        out.push_str("Nothing changed: add --yes to apply.\n");
    }
    print!("{out}");
    Ok(())
}
