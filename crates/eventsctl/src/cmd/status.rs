//! `eventsctl status`: consumers, the events table, the purge watermark, and what holds the
//! visibility horizon (and so delivery and purging) back.
//!
//! Fast on a table of any size: the row count is the planner's estimate (`pg_class.reltuples`),
//! the oldest and newest events are index probes, and each consumer's lag is counted along the
//! position index up to a cap — every approximate figure is labelled as such.

use std::time::Duration;

use event_store::migrations::Role;
use event_store::position::{self, Position};
use event_store::sink_state;
use mongo_format::dead_letter::DEAD_LETTERS;
use mongodb::bson::{doc, Document};
use serde::Serialize;
use services::config::parse_duration;
use tokio_postgres::Client;

use crate::cli::Cli;
use crate::consumers::{self, Standing, COUNT_CAP};
use crate::exit::Code;
use crate::{connect, output};

/// Show each consumer's position, lag, heartbeat and state; the events table; the purge
/// watermark; and what holds the visibility horizon or purging back.
///
/// States: live (heartbeat recent, events to deliver), idle (heartbeat recent, caught up), stale
/// (no heartbeat for --stale-after: stopped, or cut off from PostgreSQL), expired (no heartbeat
/// for the purger's --consumer-expiry: purging no longer waits for it).
#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Example:\n  eventsctl status\n  eventsctl status --json | jq '.consumers[] | {consumer, lag_events}'"
)]
pub struct Args {
    /// A consumer without a heartbeat for this long is `stale` (consumers refresh it every --heartbeat-interval, 10s by default)
    #[arg(long = "stale-after", default_value = "1m", value_parser = parse_duration)]
    pub stale_after: Duration,

    /// The purger's --consumer-expiry: a consumer idle longer is `expired` (purging no longer waits for it)
    #[arg(long = "consumer-expiry", env = "PURGER_CONSUMER_EXPIRY", value_parser = parse_duration)]
    pub consumer_expiry: Option<Duration>,
}

#[derive(Debug, Serialize)]
struct Status {
    /// The database server's clock, which every age is measured against.
    now: String,
    consumers: Vec<ConsumerStatus>,
    events: EventsTable,
    purge_watermark: Option<WatermarkStatus>,
    /// The slowest consumer that still holds purging back (events after its position stay).
    purging_held_back_by: Option<String>,
    horizon: Horizon,
    /// Dead letters of all consumers: the MongoDB `deadLetters` collection (when MONGODB_URI is
    /// set) plus the `sink_dead_letters` table (when the login may read it); null if neither.
    dead_letters: Option<u64>,
    /// Consumer groups (`consumer --partitions`): their members and who owns which partition;
    /// each partition is also a consumer above (`<group>.p00` …). Null when this login may not
    /// read the group tables.
    groups: Option<Vec<GroupStatus>>,
}

#[derive(Debug, Serialize)]
struct GroupStatus {
    group: String,
    partitions: u32,
    /// Running members (heartbeat not expired), by id.
    members: Vec<MemberStatus>,
    /// Partitions nobody owns now (between owners, or no member runs).
    unowned: Vec<u32>,
}

#[derive(Debug, Serialize)]
struct MemberStatus {
    member: String,
    /// It can reach its sink (a member that cannot is given no partitions).
    ready: bool,
    partitions: Vec<u32>,
}

#[derive(Debug, Serialize)]
struct ConsumerStatus {
    #[serde(flatten)]
    standing: Standing,
    state: &'static str,
    /// Where its sink keeps the checkpoint: `mongodb`, `http` or `nats`; null when not known
    /// (no MONGODB_URI and no row in `sink_checkpoints`).
    sink: Option<String>,
    /// Its checkpoint (where delivery resumes): in MongoDB (when MONGODB_URI is set) or, for the
    /// webhook and JetStream sinks, in `sink_checkpoints`.
    checkpoint: Option<Position>,
    /// Its dead letters (events it set aside), from the same store as the checkpoint.
    dead_letters: Option<u64>,
}

#[derive(Debug, Serialize)]
struct EventsTable {
    /// The planner's estimate (`pg_class.reltuples`, as of the last ANALYZE); null if never analysed.
    estimated_rows: Option<i64>,
    /// Only when there is no estimate: rows counted, stopping at `counted_up_to`.
    counted_rows: Option<i64>,
    counted_up_to: Option<i64>,
    /// Table, indexes and TOAST.
    total_bytes: i64,
    oldest: Option<EventEnd>,
    newest: Option<EventEnd>,
}

#[derive(Debug, Serialize)]
struct EventEnd {
    position: Position,
    created_at: String,
    age_seconds: f64,
}

#[derive(Debug, Serialize)]
struct WatermarkStatus {
    position: Position,
    forced: bool,
    updated_at: String,
}

#[derive(Debug, Serialize)]
struct Horizon {
    /// `pg_snapshot_xmin`: transactions below it have all finished; readers read only below it.
    xmin: String,
    /// The next transaction id to be assigned.
    next_xid: String,
    /// Sessions with an open transaction, oldest first (at most 10).
    backends: Vec<Backend>,
    prepared_transactions: Vec<Prepared>,
    replication_slots: Vec<Slot>,
}

#[derive(Debug, Serialize)]
struct Backend {
    pid: i32,
    role: Option<String>,
    application: Option<String>,
    state: Option<String>,
    xact_age_seconds: Option<f64>,
    /// `delivery and purging` for a transaction that has written (its xid is the horizon's
    /// floor); `vacuum only` for a snapshot without writes (it keeps dead rows, not events).
    holds: &'static str,
    /// The first line of its current or last statement; null when this login may not see it
    /// (other sessions need the owner, a superuser or pg_read_all_stats).
    query: Option<String>,
}

#[derive(Debug, Serialize)]
struct Prepared {
    gid: String,
    owner: Option<String>,
    database: Option<String>,
    age_seconds: f64,
}

#[derive(Debug, Serialize)]
struct Slot {
    name: String,
    kind: Option<String>,
    active: bool,
    xmin: Option<String>,
    catalog_xmin: Option<String>,
}

pub async fn run(cli: &Cli, args: &Args) -> anyhow::Result<Code> {
    let progress = output::spinner("reading status");
    // Every consumer's position: the owner, or a purger login (consumer logins see only their own).
    let client = connect::postgres(cli, Role::Purger).await?;
    let mongo = connect::mongo(cli).await?;
    let now = event_store::db::now(&client).await?;

    let standings = consumers::standings(&client, None, COUNT_CAP).await?;
    let checkpoints = match &mongo {
        Some(db) => Some(checkpoints(db).await?),
        None => None,
    };
    // The webhook and JetStream sinks keep theirs in PostgreSQL.
    let sinks = sink_state::standings(&client).await?;
    let mut consumers = Vec::with_capacity(standings.len());
    for standing in standings {
        let in_postgres = sinks
            .iter()
            .flatten()
            .find(|s| s.consumer == standing.consumer);
        let in_mongo = checkpoints
            .as_ref()
            .and_then(|c| c.iter().find(|(n, _)| *n == standing.consumer))
            .map(|(_, p)| *p);
        let (sink, checkpoint, dead_letters) = match (in_postgres, in_mongo, &mongo) {
            (Some(s), None, _) => (
                s.sink.clone(),
                s.checkpoint,
                Some(u64::try_from(s.dead_letters).unwrap_or(0)),
            ),
            (_, _, Some(db)) => (
                in_mongo.map(|_| "mongodb".to_string()),
                in_mongo,
                Some(
                    db.collection::<Document>(DEAD_LETTERS)
                        .count_documents(doc! {"consumer": &standing.consumer})
                        .await?,
                ),
            ),
            _ => (None, None, None),
        };
        consumers.push(ConsumerStatus {
            state: consumers::state(&standing, args.stale_after, args.consumer_expiry),
            sink,
            checkpoint,
            dead_letters,
            standing,
        });
    }
    let sink_dead_letters = sinks.as_ref().map(|all| {
        all.iter()
            .map(|s| u64::try_from(s.dead_letters).unwrap_or(0))
            .sum::<u64>()
    });
    let purging_held_back_by = consumers.iter().find(|c| c.state != "expired").map(|c| {
        format!(
            "consumer {:?} at {}",
            c.standing.consumer, c.standing.position
        )
    });

    let status = Status {
        now: output::time(now),
        events: events_table(&client, now).await?,
        purge_watermark: position::watermark(&client)
            .await?
            .map(|w| WatermarkStatus {
                position: w.position,
                forced: w.forced,
                updated_at: output::time(w.updated_at),
            }),
        purging_held_back_by,
        horizon: horizon(&client).await?,
        dead_letters: match (&mongo, sink_dead_letters) {
            (Some(db), in_postgres) => Some(
                db.collection::<Document>(DEAD_LETTERS)
                    .count_documents(doc! {})
                    .await?
                    + in_postgres.unwrap_or(0),
            ),
            (None, in_postgres) => in_postgres,
        },
        consumers,
        groups: groups(&client).await.ok(),
    };
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    if cli.json {
        output::json(&status)?;
    } else {
        print!("{}", render(&status));
    }
    Ok(Code::Ok)
}

/// Every consumer group, its members and their partitions.
async fn groups(client: &Client) -> anyhow::Result<Vec<GroupStatus>> {
    use event_store::group;
    let mut out = Vec::new();
    for (name, partitions) in group::all(client).await? {
        let leases = group::leases(client, &name).await?;
        let members = group::members(client, &name)
            .await?
            .into_iter()
            .map(|m| MemberStatus {
                partitions: leases
                    .iter()
                    .filter(|l| l.member.as_deref() == Some(m.member.as_str()))
                    .map(|l| l.partition.index)
                    .collect(),
                member: m.member,
                ready: m.ready,
            })
            .collect();
        let unowned = leases
            .iter()
            .filter(|l| l.member.is_none())
            .map(|l| l.partition.index)
            .collect();
        out.push(GroupStatus {
            group: name,
            partitions,
            members,
            unowned,
        });
    }
    Ok(out)
}

/// Every checkpoint in the consumers' MongoDB database.
async fn checkpoints(db: &mongodb::Database) -> anyhow::Result<Vec<(String, Position)>> {
    use futures_util::TryStreamExt;
    let docs: Vec<Document> = db
        .collection::<Document>(mongo_format::checkpoint::CHECKPOINTS)
        .find(doc! {})
        .await?
        .try_collect()
        .await?;
    Ok(docs
        .iter()
        .filter_map(|d| {
            let name = d.get_str("_id").ok()?;
            let position = mongo_format::checkpoint::position(d, name).ok()?;
            Some((name.to_string(), position))
        })
        .collect())
}

async fn events_table(client: &Client, now: std::time::SystemTime) -> anyhow::Result<EventsTable> {
    let row = client
        .query_one(
            "SELECT CASE WHEN c.reltuples < 0 THEN NULL ELSE c.reltuples::bigint END,
                    pg_total_relation_size(c.oid)
               FROM pg_class c WHERE c.oid = 'events'::regclass",
            &[],
        )
        .await?;
    let estimated_rows: Option<i64> = row.get(0);
    // Never analysed (a new table): a count that stops at the cap is cheap and better than nothing.
    let counted_rows = match estimated_rows {
        Some(_) => None,
        None => Some(
            client
                .query_one(
                    "SELECT count(*) FROM (SELECT 1 FROM events LIMIT $1) AS page",
                    &[&COUNT_CAP],
                )
                .await?
                .get::<_, i64>(0),
        ),
    };
    let ends = position::ends(client).await?;
    let end = |(p, t): (Position, std::time::SystemTime)| EventEnd {
        position: p,
        created_at: output::time(t),
        age_seconds: output::elapsed(t, now).as_secs_f64(),
    };
    Ok(EventsTable {
        estimated_rows,
        counted_up_to: counted_rows.map(|_| COUNT_CAP),
        counted_rows,
        total_bytes: row.get(1),
        oldest: ends.map(|e| end(e.oldest)),
        newest: ends.map(|e| end(e.newest)),
    })
}

async fn horizon(client: &Client) -> anyhow::Result<Horizon> {
    let (xmin, next_xid) = position::horizon(client).await?;
    let backends = client
        .query(
            "SELECT pid, usename::text, application_name, state,
                    extract(epoch FROM now() - xact_start)::float8,
                    backend_xid IS NOT NULL,
                    -- Hidden from logins without pg_read_all_stats: no state, no query.
                    CASE WHEN state IS NOT NULL THEN left(split_part(query, E'\\n', 1), 120) END
               FROM pg_stat_activity
              WHERE (backend_xid IS NOT NULL OR backend_xmin IS NOT NULL)
                AND pid <> pg_backend_pid()
              ORDER BY greatest(age(backend_xid), age(backend_xmin)) DESC NULLS LAST
              LIMIT 10",
            &[],
        )
        .await?
        .iter()
        .map(|row| Backend {
            pid: row.get(0),
            role: row.get(1),
            application: row.get::<_, Option<String>>(2).filter(|a| !a.is_empty()),
            state: row.get(3),
            xact_age_seconds: row.get(4),
            holds: if row.get(5) {
                "delivery and purging"
            } else {
                "vacuum only"
            },
            query: row.get::<_, Option<String>>(6).filter(|q| !q.is_empty()),
        })
        .collect();
    let prepared_transactions = client
        .query(
            "SELECT gid, owner::text, database::text,
                    extract(epoch FROM now() - prepared)::float8
               FROM pg_prepared_xacts ORDER BY prepared",
            &[],
        )
        .await?
        .iter()
        .map(|row| Prepared {
            gid: row.get(0),
            owner: row.get(1),
            database: row.get(2),
            age_seconds: row.get(3),
        })
        .collect();
    let replication_slots = client
        .query(
            "SELECT slot_name::text, slot_type, active, xmin::text, catalog_xmin::text
               FROM pg_replication_slots ORDER BY slot_name",
            &[],
        )
        .await?
        .iter()
        .map(|row| Slot {
            name: row.get(0),
            kind: row.get(1),
            active: row.get(2),
            xmin: row.get(3),
            catalog_xmin: row.get(4),
        })
        .collect();
    Ok(Horizon {
        xmin: xmin.to_string(),
        next_xid: next_xid.to_string(),
        backends,
        prepared_transactions,
        replication_slots,
    })
}

/// Partition indexes as short ranges: `0-3, 8, 10-11` (`none` for none).
fn ranges(indexes: &[u32]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < indexes.len() {
        let mut j = i;
        while j + 1 < indexes.len() && indexes[j + 1] == indexes[j] + 1 {
            j += 1;
        }
        parts.push(if i == j {
            indexes[i].to_string()
        } else {
            format!("{}-{}", indexes[i], indexes[j])
        });
        i = j + 1;
    }
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(", ")
    }
}

fn render(s: &Status) -> String {
    let mut out = String::new();
    out.push_str(&format!("Consumers (database clock {}):\n", s.now));
    if s.consumers.is_empty() {
        out.push_str("  none has published a position yet\n");
    } else {
        let rows: Vec<Vec<String>> = s
            .consumers
            .iter()
            .map(|c| {
                let st = &c.standing;
                vec![
                    st.consumer.clone(),
                    c.state.to_string(),
                    st.position.to_string(),
                    match (&c.checkpoint, &c.dead_letters) {
                        (Some(p), _) => p.to_string(),
                        // The store was read and holds none.
                        (None, Some(_)) => "none".into(),
                        (None, None) => "-".into(),
                    },
                    st.lag_text(),
                    consumers::seconds(st.lag_seconds),
                    format!("{} ago", consumers::seconds(st.heartbeat_age_seconds)),
                    c.dead_letters.map_or("-".into(), |n| n.to_string()),
                    st.running
                        .as_ref()
                        .map_or("no".into(), |r| format!("pid {} ({})", r.pid, r.seen_by)),
                ]
            })
            .collect();
        let table = output::table(
            &[
                "CONSUMER",
                "STATE",
                "POSITION",
                "CHECKPOINT",
                "LAG",
                "LAG AGE",
                "HEARTBEAT",
                "DEAD",
                "RUNNING",
            ],
            &rows,
        );
        for line in table.lines() {
            out.push_str(&format!("  {line}\n"));
        }
        out.push_str(&format!(
            "  (LAG: events counted along the position index, up to {COUNT_CAP}; POSITION: \
             published to PostgreSQL after each batch)\n"
        ));
    }
    if let Some(n) = s.dead_letters {
        out.push_str(&format!(
            "Dead letters: {n} (eventsctl dead-letters list)\n"
        ));
    }
    for g in s.groups.iter().flatten() {
        out.push_str(&format!(
            "\nConsumer group {} ({} partitions, {} running members; partitions are the consumers {}.p…):\n",
            g.group,
            g.partitions,
            g.members.len(),
            g.group
        ));
        for m in &g.members {
            out.push_str(&format!(
                "  member {}{}: partitions {}\n",
                m.member,
                if m.ready {
                    ""
                } else {
                    " (cannot reach its sink)"
                },
                ranges(&m.partitions)
            ));
        }
        if !g.unowned.is_empty() {
            out.push_str(&format!("  unowned: partitions {}\n", ranges(&g.unowned)));
        }
    }

    out.push_str("\nEvents:\n");
    let e = &s.events;
    match (e.estimated_rows, e.counted_rows) {
        (Some(n), _) => out.push_str(&format!("  rows         ~{n} (planner estimate)\n")),
        (None, Some(n)) if n >= COUNT_CAP => out.push_str(&format!(
            "  rows         ≥{n} (counted up to {COUNT_CAP}; no planner estimate yet)\n"
        )),
        (None, Some(n)) => out.push_str(&format!(
            "  rows         {n} (counted; no planner estimate yet)\n"
        )),
        (None, None) => out.push_str("  rows         unknown\n"),
    }
    out.push_str(&format!(
        "  size         {}\n",
        output::bytes(e.total_bytes)
    ));
    for (label, end) in [("oldest", &e.oldest), ("newest", &e.newest)] {
        match end {
            Some(end) => out.push_str(&format!(
                "  {label:<12} {} created {} ({} ago)\n",
                end.position,
                end.created_at,
                consumers::seconds(end.age_seconds)
            )),
            None => out.push_str(&format!("  {label:<12} none (the table is empty)\n")),
        }
    }
    match &s.purge_watermark {
        Some(w) => out.push_str(&format!(
            "  purged up to {}{} at {}\n",
            w.position,
            if w.forced { " (forced)" } else { "" },
            w.updated_at
        )),
        None => out.push_str("  purged up to nothing yet\n"),
    }
    if let Some(by) = &s.purging_held_back_by {
        out.push_str(&format!("  purging waits for {by}\n"));
    }

    let h = &s.horizon;
    out.push_str(&format!(
        "\nVisibility horizon: xmin {} (next xid {})\n",
        h.xmin, h.next_xid
    ));
    if h.backends.is_empty() {
        out.push_str("  no open transaction holds it back\n");
    } else {
        let rows: Vec<Vec<String>> = h
            .backends
            .iter()
            .map(|b| {
                vec![
                    b.pid.to_string(),
                    b.role.clone().unwrap_or_else(|| "?".into()),
                    b.state.clone().unwrap_or_else(|| "?".into()),
                    b.xact_age_seconds.map_or("-".into(), consumers::seconds),
                    b.holds.to_string(),
                    b.query
                        .clone()
                        .unwrap_or_else(|| "(not visible to this login)".into()),
                ]
            })
            .collect();
        let table = output::table(
            &["PID", "ROLE", "STATE", "XACT AGE", "HOLDS", "QUERY"],
            &rows,
        );
        for line in table.lines() {
            out.push_str(&format!("  {line}\n"));
        }
    }
    for p in &h.prepared_transactions {
        out.push_str(&format!(
            "  prepared transaction {:?} (owner {}, database {}) open for {}: holds delivery and purging until COMMIT/ROLLBACK PREPARED\n",
            p.gid,
            p.owner.as_deref().unwrap_or("?"),
            p.database.as_deref().unwrap_or("?"),
            consumers::seconds(p.age_seconds)
        ));
    }
    for slot in &h.replication_slots {
        out.push_str(&format!(
            "  replication slot {:?} ({}, {}): xmin {}, catalog_xmin {}\n",
            slot.name,
            slot.kind.as_deref().unwrap_or("?"),
            if slot.active { "active" } else { "inactive" },
            slot.xmin.as_deref().unwrap_or("-"),
            slot.catalog_xmin.as_deref().unwrap_or("-"),
        ));
    }
    out
}
