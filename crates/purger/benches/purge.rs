//! Purge rate of a 1M-event old backlog while a producer appends, and what purging does to the
//! producer's append latency.
//!
//! `cargo bench -p purger --bench purge` (set `PURGE_BENCH_EVENTS` for another backlog size).
//!
//! Every row runs on a fresh backlog in a throwaway PostgreSQL (testbed: `fsync=off`), with a
//! producer appending one event per transaction at a fixed rate as the least-privilege producer
//! role. Its latency is measured from each append's *scheduled* start, so a stall counts for every
//! append it delays. The backlog goes in 8 slices (the cut-off moves forward by an eighth each
//! time), each preceded by a quiet second: "without" pools the producer's appends in the quiet
//! seconds, "with" those while a slice is being purged, so background noise on this shared machine
//! falls on both alike. The ratio compares them within one row.
//!
//! Rows:
//! - `raw DELETE` — the baseline: one `DELETE … WHERE created_at < cutoff` statement (the seed's
//!   way: one huge transaction);
//! - `purger, batch N` — a purger pass as the purger role, batches of N;
//! - `… snapshot held` — a REPEATABLE READ transaction stays open throughout (a long report or
//!   `pg_dump`), so deleted rows cannot be marked dead in the index: with resuming each batch's
//!   index scan where the previous one stopped (what the purger does) and without (every batch
//!   scanning from the oldest entry, the original `purge_batch`).

use std::time::{Duration, Instant, SystemTime};

use event_store::position;
use event_store::{db, migrations};
use purger::{Purger, Settings};
use testbed::Postgres;
use tokio::sync::watch;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

const PRODUCER_RATE: u32 = 1000; // appends per second
/// Quiet time in total, split before the segments.
const QUIET: Duration = Duration::from_secs(8);
const SEGMENTS: u32 = 8;

/// The rows: `raw` (one DELETE statement), `B:P` (purger, batch B, pause P ms), `B:P:held` (the
/// same with a snapshot held open), `noresume:B:held` (the original `purge_batch` loop). Override
/// with `PURGE_BENCH_CASES`, e.g. `raw,5000:0,2000:5`.
const DEFAULT_CASES: &str =
    "raw,5000:0,1000:0,1000:3,500:2,1000:3:held,5000:0:held,noresume:5000:held";

fn parse_case(spec: &str) -> Case {
    let parts: Vec<&str> = spec.split(':').collect();
    let held = parts.last() == Some(&"held");
    let number = |i: usize| -> u32 {
        parts
            .get(i)
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("bad case {spec:?}"))
    };
    let suffix = if held { ", snapshot held" } else { "" };
    match parts[0] {
        "raw" => Case {
            name: "raw DELETE (one statement)".into(),
            method: Method::RawDelete,
            hold_snapshot: held,
        },
        "noresume" => Case {
            name: format!(
                "no resume (original purge_batch), batch {}{suffix}",
                number(1)
            ),
            method: Method::NoResume { batch: number(1) },
            hold_snapshot: held,
        },
        _ => {
            let (batch, pause) = (number(0), number(1));
            Case {
                name: format!("purger, batch {batch}, pause {pause} ms{suffix}"),
                method: Method::Purger {
                    batch,
                    pause: Duration::from_millis(pause.into()),
                },
                hold_snapshot: held,
            }
        }
    }
}

async fn connect(url: &str) -> Client {
    db::connect_spawned(&db::config(url, "purge-bench").unwrap())
        .await
        .unwrap()
}

#[derive(Clone, Copy)]
enum Method {
    RawDelete,
    Purger {
        batch: u32,
        pause: Duration,
    },
    /// `purge_batch` in a loop: no resume point.
    NoResume {
        batch: u32,
    },
}

struct Case {
    name: String,
    method: Method,
    hold_snapshot: bool,
}

struct Outcome {
    name: String,
    deleted: u64,
    seconds: f64,
    without: Latency,
    with: Latency,
}

#[derive(Clone, Copy, Default)]
struct Latency {
    samples: usize,
    p50: f64,
    p99: f64,
    max: f64,
}

fn latency(mut ms: Vec<f64>) -> Latency {
    if ms.is_empty() {
        return Latency::default();
    }
    ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let at = |q: f64| ms[((ms.len() as f64 * q).ceil() as usize).clamp(1, ms.len()) - 1];
    Latency {
        samples: ms.len(),
        p50: at(0.50),
        p99: at(0.99),
        max: *ms.last().unwrap(),
    }
}

/// Appends one event per transaction on a fixed schedule; returns (scheduled start, latency ms).
fn spawn_producer(
    client: Client,
    stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<Vec<(Instant, f64)>> {
    tokio::spawn(async move {
        let statement = client
            .prepare(
                "INSERT INTO events (topic, payload) VALUES ('live', $1::text::jsonb) RETURNING id",
            )
            .await
            .unwrap();
        let payload = serde_like_payload();
        let mut ticks = tokio::time::interval(Duration::from_secs(1) / PRODUCER_RATE);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut samples = Vec::new();
        while !*stop.borrow() {
            let scheduled = ticks.tick().await.into_std();
            client.query_one(&statement, &[&payload]).await.unwrap();
            samples.push((scheduled, scheduled.elapsed().as_secs_f64() * 1000.0));
        }
        samples
    })
}

fn serde_like_payload() -> String {
    format!(
        "{{\"course\": \"c-42\", \"note\": \"{}\"}}",
        "x".repeat(100)
    )
}

/// `events` old events (30 days, 1 ms apart), inserted as the owner (who may set created_at),
/// then vacuumed and analysed like a backlog that has sat there.
async fn fill(admin: &Client, events: i64) {
    admin.batch_execute("TRUNCATE events").await.unwrap();
    admin
        .execute(
            "INSERT INTO events (topic, payload, created_at)
             SELECT 'backlog', jsonb_build_object('course', 'c-' || g, 'note', repeat('x', 100)),
                    now() - interval '30 days' + g * interval '1 ms'
               FROM generate_series(1, $1::bigint) g",
            &[&events],
        )
        .await
        .unwrap();
    admin.batch_execute("VACUUM ANALYZE events").await.unwrap();
}

/// Purges the backlog in `SEGMENTS` slices (by moving the cut-off), each preceded by a quiet
/// window: machine noise (other builds, autovacuum) then falls on both windows alike.
async fn run_case(pg: &Postgres, admin: &Client, events: i64, case: &Case) -> Outcome {
    fill(admin, events).await;
    let range = admin
        .query_one("SELECT min(created_at), max(created_at) FROM events", &[])
        .await
        .unwrap();
    let (first, last): (SystemTime, SystemTime) = (range.get(0), range.get(1));
    let span = last.duration_since(first).unwrap() + Duration::from_millis(1);
    let (stop_tx, stop_rx) = watch::channel(false);
    let producer = spawn_producer(connect(&pg.url_for("bench_producer", None)).await, stop_rx);
    tokio::time::sleep(Duration::from_secs(1)).await; // warm-up, not measured

    // A long reader's snapshot, taken before the purge starts.
    let mut holder = connect(&pg.url()).await;
    let snapshot = if case.hold_snapshot {
        let tx = holder
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .start()
            .await
            .unwrap();
        tx.query_one("SELECT count(*) FROM consumer_positions", &[])
            .await
            .unwrap();
        Some(tx)
    } else {
        None
    };
    let purger_client = connect(&pg.url_for("bench_purger", None)).await;

    let mut quiet = Vec::new();
    let mut purging = Vec::new();
    let mut deleted = 0;
    for segment in 1..=SEGMENTS {
        let from = Instant::now();
        tokio::time::sleep(QUIET / SEGMENTS).await;
        quiet.push((from, Instant::now()));
        let cutoff = first + span * segment / SEGMENTS;
        let from = Instant::now();
        deleted += purge(pg, admin, &purger_client, case.method, cutoff).await;
        purging.push((from, Instant::now()));
    }
    drop(snapshot);
    stop_tx.send(true).unwrap();
    let samples = producer.await.unwrap();
    let within = |windows: &[(Instant, Instant)]| {
        latency(
            samples
                .iter()
                .filter(|(at, _)| windows.iter().any(|(f, t)| at >= f && at < t))
                .map(|(_, ms)| *ms)
                .collect(),
        )
    };
    assert_eq!(
        deleted as i64, events,
        "{}: the whole backlog goes",
        case.name
    );
    Outcome {
        name: case.name.clone(),
        deleted,
        seconds: purging.iter().map(|(f, t)| (*t - *f).as_secs_f64()).sum(),
        without: within(&quiet),
        with: within(&purging),
    }
}

/// Deletes everything created before `cutoff` the way `method` does.
async fn purge(
    pg: &Postgres,
    admin: &Client,
    purger_client: &Client,
    method: Method,
    cutoff: SystemTime,
) -> u64 {
    match method {
        Method::RawDelete => admin
            .execute("DELETE FROM events WHERE created_at < $1", &[&cutoff])
            .await
            .unwrap(),
        Method::Purger { batch, pause } => {
            // A pass with the retention that puts its cut-off here.
            let now = db::now(purger_client).await.unwrap();
            let mut purger = Purger::connect(
                &pg.url_for("bench_purger", None),
                Settings {
                    batch_size: batch,
                    batch_pause: pause,
                    ..Settings::with_retention(now.duration_since(cutoff).unwrap())
                },
            )
            .unwrap();
            purger
                .pass(&CancellationToken::new())
                .await
                .unwrap()
                .deleted
        }
        Method::NoResume { batch } => {
            let mut deleted = 0;
            loop {
                let purged =
                    position::purge_batch(purger_client, cutoff, None, batch.into(), false)
                        .await
                        .unwrap();
                deleted += purged.deleted;
                if purged.deleted < u64::from(batch) {
                    return deleted;
                }
            }
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let events: i64 = std::env::var("PURGE_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let pg = Postgres::start();
    let mut admin = connect(&pg.url()).await;
    migrations::run(&mut admin).await.unwrap();
    admin
        .batch_execute(
            "CREATE ROLE bench_producer LOGIN IN ROLE events_producer;
             CREATE ROLE bench_purger LOGIN IN ROLE events_purger;",
        )
        .await
        .unwrap();
    let spec = std::env::var("PURGE_BENCH_CASES").unwrap_or_else(|_| DEFAULT_CASES.into());
    let cases: Vec<Case> = spec.split(',').map(|c| parse_case(c.trim())).collect();
    let started = SystemTime::now();
    eprintln!("load average before: {}", testbed::machine::load());
    let mut outcomes = Vec::new();
    for case in &cases {
        eprintln!("running: {} (load {})", case.name, testbed::machine::load());
        outcomes.push(run_case(&pg, &admin, events, case).await);
    }
    let raw_rate = outcomes
        .iter()
        .find(|o| o.name.starts_with("raw"))
        .map(|o| o.deleted as f64 / o.seconds)
        .unwrap_or(f64::NAN);

    println!(
        "\nPurging a {events}-event old backlog while a producer appends {PRODUCER_RATE} \
         single-event transactions/s (PostgreSQL {}, fsync off; load average after: {}; {:.0} s)\n",
        admin
            .query_one("SHOW server_version", &[])
            .await
            .unwrap()
            .get::<_, String>(0),
        testbed::machine::load(),
        started.elapsed().unwrap().as_secs_f64()
    );
    println!(
        "| method | purged | time | events/s | vs raw | producer p50 / p99 / max without (ms) | with (ms) | p99 with / without |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | --- | --- | ---: |");
    for o in &outcomes {
        let rate = o.deleted as f64 / o.seconds;
        println!(
            "| {} | {} | {:.2} s | {:.0} | {:.2}× | {:.2} / {:.2} / {:.1} (n={}) | {:.2} / {:.2} / {:.1} (n={}) | {:.2} |",
            o.name,
            o.deleted,
            o.seconds,
            rate,
            rate / raw_rate,
            o.without.p50,
            o.without.p99,
            o.without.max,
            o.without.samples,
            o.with.p50,
            o.with.p99,
            o.with.max,
            o.with.samples,
            o.with.p99 / o.without.p99,
        );
    }
}
