//! `eventsctl group repartition`: change a consumer group's partition count.
//!
//! A partition's checkpoint says how far *its* keys are delivered; with another count the keys
//! land in other partitions, so no old checkpoint fits a new partition. Every new partition
//! therefore starts at the oldest old checkpoint: events past it are delivered again, and the
//! MongoDB sink recognises the ones it already stored (`_id` = the event's id), so nothing is
//! doubled and nothing skipped. Per key, the stored order is unchanged (re-delivered events are
//! already there).
//!
//! Safety: only while no member runs (a running member would write under the old count), the
//! plan is printed first, and nothing changes without `--yes`. MongoDB is written first: should
//! PostgreSQL then fail, the old count stays recorded and the checkpoints have only moved back
//! (re-delivery), so running the command again finishes the change.

use event_store::group::{self, Partition};
use event_store::migrations::Role;
use event_store::Position;
use mongo_format::checkpoint::{self, CHECKPOINTS};
use mongodb::bson::{doc, DateTime, Document};
use serde::Serialize;

use crate::cli::Cli;
use crate::exit::{self, Code};
use crate::{connect, output};

/// Consumer groups (consumer --partitions).
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: GroupCommand,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum GroupCommand {
    Repartition(RepartitionArgs),
}

/// Change a group's partition count while no member runs. Every new partition starts at the
/// oldest checkpoint of the old ones: events after it are delivered again (MongoDB keeps one
/// copy of each), none is skipped. Prints the plan; changes nothing without --yes.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "\
Example:
  eventsctl group repartition orders --partitions 32          # the plan only
  eventsctl group repartition orders --partitions 32 --yes    # then start the members with --partitions 32

Stop every member first; start them again with the new --partitions.")]
pub struct RepartitionArgs {
    /// The group's name (the members' --name)
    pub group: String,

    /// The new partition count (1 to 1024)
    #[arg(long = "partitions")]
    pub partitions: u32,

    /// Make the change (without it, only the plan is printed)
    #[arg(long = "yes")]
    pub yes: bool,
}

#[derive(Debug, Serialize)]
struct Plan {
    group: String,
    from_partitions: u32,
    to_partitions: u32,
    /// Where every new partition starts (the oldest old checkpoint).
    start: Position,
    /// Events after `start` (delivered again where already stored).
    events_after_start: i64,
    applied: bool,
}

pub async fn run(cli: &Cli, args: &Args) -> anyhow::Result<Code> {
    match &args.command {
        GroupCommand::Repartition(args) => repartition(cli, args).await,
    }
}

async fn repartition(cli: &Cli, args: &RepartitionArgs) -> anyhow::Result<Code> {
    let name = args.group.as_str();
    group::validate_group_name(name).map_err(|e| exit::usage(e.to_string()))?;
    group::check_count(args.partitions).map_err(|e| exit::usage(e.to_string()))?;
    let mut client = connect::postgres(cli, Role::Consumer).await?;
    let Some(old) = group::partitions_of(&client, name).await? else {
        return Err(exit::usage(format!(
            "there is no consumer group {name:?} (`eventsctl status` lists the groups); a group \
             is created by its first member's start"
        )));
    };
    let members = group::members(&client, name).await?;
    if !members.is_empty() {
        let ids: Vec<&str> = members.iter().map(|m| m.member.as_str()).collect();
        return Err(exit::refused(format!(
            "consumer group {name:?} has {} running member(s) ({}); stop every member, then run \
             the command again",
            members.len(),
            ids.join(", ")
        )));
    }
    let checkpoints = connect::mongo_required(cli, "repartition moves the partitions' checkpoints")
        .await?
        .collection::<Document>(CHECKPOINTS);

    // A partition without a checkpoint of its own has never been claimed: it would start at the
    // checkpoint of the consumer the group took over, or at the start.
    let base = match checkpoints.find_one(doc! {"_id": name}).await? {
        Some(d) => checkpoint::position(&d, name)?,
        None => Position::START,
    };
    let mut start: Option<Position> = None;
    for p in Partition::all(old) {
        let partition = p.name(name);
        let at = match checkpoints.find_one(doc! {"_id": &partition}).await? {
            Some(d) => checkpoint::position(&d, &partition)?,
            None => base,
        };
        start = Some(start.map_or(at, |s| s.min(at)));
    }
    let start = start.unwrap_or(base);
    let latest = event_store::position::latest(&client).await?;
    let events_after_start = if latest > start {
        event_store::position::count_between(&client, start, latest, 10_000_000).await?
    } else {
        0
    };
    let mut plan = Plan {
        group: name.to_string(),
        from_partitions: old,
        to_partitions: args.partitions,
        start,
        events_after_start,
        applied: false,
    };
    if args.yes {
        let now = DateTime::now();
        for p in Partition::all(args.partitions) {
            let partition = p.name(name);
            let mut stored = checkpoint::update(start, now)
                .get_document("$set")
                .expect("built with $set")
                .clone();
            stored.insert("_id", &partition);
            // Epochs start again with the new partitions' leases.
            stored.insert("epoch", 0_i64);
            checkpoints
                .replace_one(doc! {"_id": &partition}, stored)
                .upsert(true)
                .await?;
        }
        let keep: Vec<String> = Partition::all(args.partitions)
            .map(|p| p.name(name))
            .collect();
        for p in Partition::all(old) {
            let partition = p.name(name);
            if !keep.contains(&partition) {
                checkpoints.delete_one(doc! {"_id": &partition}).await?;
            }
        }
        group::repartition(&mut client, name, args.partitions, Some(start))
            .await
            .map_err(|e| match e {
                event_store::Error::LeaseHeld(why) => exit::refused(why),
                other => other.into(),
            })?;
        plan.applied = true;
    }
    if cli.json {
        output::json(&plan)?;
    } else {
        let mut out = format!(
            "Repartition consumer group {name:?}: {} → {} partitions\n  every partition starts at {} ({} events after it are delivered again; MongoDB keeps one copy of each)\n",
            plan.from_partitions, plan.to_partitions, plan.start, plan.events_after_start
        );
        if plan.applied {
            out.push_str(&format!(
                "Done. Start the members with --partitions {}.\n",
                plan.to_partitions
            ));
        } else {
            out.push_str("Nothing changed: add --yes to apply.\n");
        }
        print!("{out}");
    }
    Ok(Code::Ok)
}
