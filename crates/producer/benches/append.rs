//! Append throughput: the producer against raw SQL baselines, all in one run on one throwaway
//! cluster (`cargo bench -p producer --bench append`).
//!
//! Every case runs `connections` tasks, each with its own connection as the producer login, for a
//! fixed time, appending the same kind of event (~100-byte JSON payload, client-generated
//! `event_id`). The table is truncated before each case. One superuser connection LISTENs on the
//! channel throughout (a realistic consumer) and counts the notifications each case caused.
//!
//! Baselines, as fast as plain SQL gets:
//! - raw INSERT: a prepared single-row `INSERT`, autocommit (one round trip per event);
//! - raw INSERT + pg_notify: the same INSERT and a `pg_notify` in one prepared statement, so one
//!   transaction and one round trip per event — the cheapest way to NOTIFY with every event;
//! - raw multi-row INSERT: a prepared `INSERT … VALUES (…), (…), …` of 100 rows per statement.
//!
//! Environment: `BENCH_SECONDS` (per measurement, default 1.5), `BENCH_ROUNDS` (default 4; the
//! cases are interleaved round by round, in alternating order, and the median is reported),
//! `BENCH_LATENCY_SAMPLES` (default 300), `BENCH_ONLY` (`;`-separated parts of `<case> x<n>`
//! to run only those, e.g. `multi-row INSERT (100 rows) x8`, for profiling; `latency` runs the
//! latency measurement), `BENCH_FSYNC=off` (keep the testbed's
//! non-durable settings instead of starting the cluster with fsync on, see [`DURABLE`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_store::db::Database;
use event_store::{db, migrations, NewEvent, Topic};
use futures_util::StreamExt;
use producer::{Channel, Notifier, Producer};
use serde_json::{json, Value};
use testbed::{env_or, Postgres};
use tokio::sync::mpsc;
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, Client, Statement};
use uuid::Uuid;

const BATCH: usize = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Case {
    RawInsert,
    RawInsertNotify,
    AfterCommit,
    InTransaction,
    AfterCommitUnprepared,
    AfterCommitCallerTx,
    RawBatch,
    BatchAfterCommit,
    BatchInTransaction,
}

impl Case {
    fn label(self) -> &'static str {
        match self {
            Case::RawInsert => "raw INSERT",
            Case::RawInsertNotify => "raw INSERT + pg_notify",
            Case::AfterCommit => "producer, after-commit (default)",
            Case::InTransaction => "producer, in-transaction",
            Case::AfterCommitUnprepared => "producer, after-commit, unprepared",
            Case::AfterCommitCallerTx => "producer, after-commit, in caller's BEGIN…COMMIT",
            Case::RawBatch => "raw multi-row INSERT (100 rows)",
            Case::BatchAfterCommit => "producer batch of 100, after-commit (default)",
            Case::BatchInTransaction => "producer batch of 100, in-transaction",
        }
    }

    fn per_op(self) -> usize {
        match self {
            Case::RawBatch | Case::BatchAfterCommit | Case::BatchInTransaction => BATCH,
            _ => 1,
        }
    }
}

/// What is measured, at how many connections. The variants that only explain a difference (no
/// prepared statements, the caller's own BEGIN…COMMIT) run where the difference shows: at 8.
const SINGLE: [(Case, usize); 10] = [
    (Case::RawInsert, 1),
    (Case::RawInsertNotify, 1),
    (Case::AfterCommit, 1),
    (Case::InTransaction, 1),
    (Case::RawInsert, 8),
    (Case::RawInsertNotify, 8),
    (Case::AfterCommit, 8),
    (Case::InTransaction, 8),
    (Case::AfterCommitUnprepared, 8),
    (Case::AfterCommitCallerTx, 8),
];
const BATCHED: [(Case, usize); 5] = [
    (Case::RawBatch, 1),
    (Case::BatchAfterCommit, 1),
    (Case::RawBatch, 8),
    (Case::BatchAfterCommit, 8),
    (Case::BatchInTransaction, 8),
];

#[derive(Debug, Default, Clone, Copy)]
struct Measured {
    events: u64,
    seconds: f64,
    notifications: u64,
}

impl Measured {
    fn rate(&self) -> f64 {
        self.events as f64 / self.seconds
    }
}

/// Every round's measurement of one case.
#[derive(Debug, Default, Clone)]
struct Rounds(Vec<Measured>);

impl Rounds {
    /// The median of the rounds' rates: robust to a round that met a burst of disk contention.
    fn rate(&self) -> f64 {
        let mut rates: Vec<f64> = self.0.iter().map(Measured::rate).collect();
        rates.sort_by(f64::total_cmp);
        let n = rates.len();
        if n % 2 == 1 {
            rates[n / 2]
        } else {
            (rates[n / 2 - 1] + rates[n / 2]) / 2.0
        }
    }

    fn range(&self) -> (f64, f64) {
        let rates = self.0.iter().map(Measured::rate);
        (
            rates.clone().fold(f64::INFINITY, f64::min),
            rates.fold(0.0, f64::max),
        )
    }

    fn notifications_per_1k(&self) -> f64 {
        let events: u64 = self.0.iter().map(|m| m.events).sum();
        let notifications: u64 = self.0.iter().map(|m| m.notifications).sum();
        notifications as f64 * 1000.0 / events.max(1) as f64
    }
}

struct Bench {
    config: Database,
    admin: Client,
    notifications: Arc<AtomicU64>,
    arrivals: mpsc::UnboundedReceiver<Instant>,
    seconds: f64,
}

/// Wake-up latency of one way of appending, in milliseconds.
struct Latency {
    /// From the start of the append call to the notification's arrival at the listener.
    wake_up: Vec<f64>,
    /// From the start of the append call to its return (the commit is done).
    append: Vec<f64>,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn event(i: u64) -> (Uuid, &'static str, Value) {
    let topic = if i % 2 == 0 { "courses" } else { "policies" };
    let payload =
        json!({ "seq": i, "text": "a course was updated; here is some text to make ~100 bytes" });
    (Uuid::new_v4(), topic, payload)
}

fn new_event(i: u64) -> NewEvent {
    let (id, topic, payload) = event(i);
    NewEvent::new(Topic::new(topic).unwrap(), payload).with_event_id(id)
}

fn raw_batch_sql() -> String {
    let rows: Vec<String> = (0..BATCH)
        .map(|r| format!("(${}, ${}, ${})", 3 * r + 1, 3 * r + 2, 3 * r + 3))
        .collect();
    format!(
        "INSERT INTO events (event_id, topic, payload) VALUES {}",
        rows.join(", ")
    )
}

impl Bench {
    /// One event at a time, waiting for its wake-up before the next (a few hundred per second).
    async fn latency(&mut self, case: Case, samples: usize) -> Latency {
        self.admin.batch_execute("TRUNCATE events").await.unwrap();
        let (notifier, notifier_task) = Notifier::spawn(
            self.config.clone(),
            Channel::default(),
            Duration::from_millis(1),
        );
        let producer = match case {
            Case::InTransaction => Producer::in_transaction(Channel::default()),
            _ => Producer::after_commit(notifier.clone()),
        };
        drop(notifier);
        let client = db::connect_spawned(&self.config).await.unwrap();
        let prepared = producer.prepare(&client).await.unwrap();
        let insert_notify = client
            .prepare(
                "WITH e AS (INSERT INTO events (event_id, topic, payload) VALUES ($1, $2, $3) \
                 RETURNING event_id) SELECT pg_notify('events', $2) FROM e",
            )
            .await
            .unwrap();
        // Let the notifier connect first.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut result = Latency {
            wake_up: Vec::with_capacity(samples),
            append: Vec::with_capacity(samples),
        };
        for seq in 0..samples as u64 {
            while self.arrivals.try_recv().is_ok() {}
            let started = Instant::now();
            match case {
                Case::RawInsertNotify => {
                    let (id, topic, payload) = event(seq);
                    client
                        .execute(&insert_notify, &[&id, &topic, &payload])
                        .await
                        .unwrap();
                }
                _ => {
                    prepared.append(&client, &[new_event(seq)]).await.unwrap();
                }
            }
            let appended = started.elapsed();
            let arrived = tokio::time::timeout(Duration::from_secs(2), self.arrivals.recv())
                .await
                .expect("a wake-up within 2 s")
                .unwrap();
            result
                .wake_up
                .push((arrived - started).as_secs_f64() * 1000.0);
            result.append.push(appended.as_secs_f64() * 1000.0);
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        drop((prepared, producer));
        notifier_task.finished().await;
        result.wake_up.sort_by(f64::total_cmp);
        result.append.sort_by(f64::total_cmp);
        result
    }

    async fn measure(&mut self, case: Case, connections: usize) -> Measured {
        // Every case starts from the same state: an empty table, no checkpoint due.
        self.admin
            .batch_execute("TRUNCATE events; CHECKPOINT")
            .await
            .unwrap();
        // The after-commit cases share one notifier (one side connection), as a process would.
        let (notifier, notifier_task) = Notifier::spawn(
            self.config.clone(),
            Channel::default(),
            Duration::from_millis(1),
        );
        let producer = match case {
            Case::InTransaction | Case::BatchInTransaction => {
                Producer::in_transaction(Channel::default())
            }
            _ => Producer::after_commit(notifier.clone()),
        };
        drop(notifier); // only producers hold it now, so the task ends with the case
        let stop = Arc::new(AtomicBool::new(false));
        let counting = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for _ in 0..connections {
            let client = db::connect_spawned(&self.config).await.unwrap();
            let producer = producer.clone();
            let (stop, counting) = (stop.clone(), counting.clone());
            tasks.push(tokio::spawn(async move {
                run(case, client, producer, stop, counting).await
            }));
        }
        drop(producer);
        // Warm up (connections, plans, caches), then count for the measured window.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let notified_before = self.notifications.load(Ordering::Relaxed);
        counting.store(true, Ordering::Release);
        let started = Instant::now();
        tokio::time::sleep(Duration::from_secs_f64(self.seconds)).await;
        counting.store(false, Ordering::Release);
        let seconds = started.elapsed().as_secs_f64();
        stop.store(true, Ordering::Release);
        let mut events = 0;
        for task in tasks {
            events += task.await.unwrap();
        }
        notifier_task.finished().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let notifications = self.notifications.load(Ordering::Relaxed) - notified_before;
        while self.arrivals.try_recv().is_ok() {}
        Measured {
            events,
            seconds,
            notifications,
        }
    }
}

/// One connection's loop; returns the events appended while `counting` was set.
async fn run(
    case: Case,
    mut client: Client,
    producer: Producer,
    stop: Arc<AtomicBool>,
    counting: Arc<AtomicBool>,
) -> u64 {
    let insert: Statement = client
        .prepare("INSERT INTO events (event_id, topic, payload) VALUES ($1, $2, $3)")
        .await
        .unwrap();
    let insert_notify: Statement = client
        .prepare(
            "WITH e AS (INSERT INTO events (event_id, topic, payload) VALUES ($1, $2, $3) \
             RETURNING event_id) SELECT pg_notify('events', $2) FROM e",
        )
        .await
        .unwrap();
    let insert_many: Statement = client.prepare(&raw_batch_sql()).await.unwrap();
    let prepared = producer.prepare(&client).await.unwrap();
    let mut seq = 0u64;
    let mut counted = 0u64;
    while !stop.load(Ordering::Acquire) {
        match case {
            Case::RawInsert | Case::RawInsertNotify => {
                let (id, topic, payload) = event(seq);
                let statement = if case == Case::RawInsert {
                    &insert
                } else {
                    &insert_notify
                };
                client
                    .execute(statement, &[&id, &topic, &payload])
                    .await
                    .unwrap();
            }
            Case::AfterCommit | Case::InTransaction => {
                prepared.append(&client, &[new_event(seq)]).await.unwrap();
            }
            Case::AfterCommitUnprepared => {
                producer.append(&client, &[new_event(seq)]).await.unwrap();
            }
            Case::AfterCommitCallerTx => {
                let tx = client.transaction().await.unwrap();
                let appended = prepared.append_in(&tx, &new_event(seq)).await.unwrap();
                producer.commit(tx, appended).await.unwrap();
            }
            Case::RawBatch => {
                let rows: Vec<(Uuid, &str, Value)> =
                    (0..BATCH as u64).map(|i| event(seq + i)).collect();
                let params: Vec<&(dyn ToSql + Sync)> = rows
                    .iter()
                    .flat_map(|(id, topic, payload)| {
                        [
                            id as &(dyn ToSql + Sync),
                            topic as &(dyn ToSql + Sync),
                            payload as &(dyn ToSql + Sync),
                        ]
                    })
                    .collect();
                client.execute(&insert_many, &params).await.unwrap();
            }
            Case::BatchAfterCommit | Case::BatchInTransaction => {
                let events: Vec<NewEvent> = (0..BATCH as u64).map(|i| new_event(seq + i)).collect();
                prepared.append(&client, &events).await.unwrap();
            }
        }
        seq += case.per_op() as u64;
        if counting.load(Ordering::Acquire) {
            counted += case.per_op() as u64;
        }
    }
    counted
}

/// A superuser connection LISTENing on `events`, counting notifications and reporting when each
/// arrived.
async fn listen(pg: &Postgres) -> (Client, Arc<AtomicU64>, mpsc::UnboundedReceiver<Instant>) {
    let config = db::config(&pg.url(), "bench-listener").unwrap();
    let (client, mut connection) = db::connect(&config).await.unwrap();
    let count = Arc::new(AtomicU64::new(0));
    let counter = count.clone();
    let (arrived, arrivals) = mpsc::unbounded_channel();
    let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
    tokio::spawn(async move {
        while let Some(Ok(message)) = messages.next().await {
            if let AsyncMessage::Notification(_) = message {
                let _ = arrived.send(Instant::now());
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    client.batch_execute("LISTEN events").await.unwrap();
    (client, count, arrivals)
}

/// The testbed runs its clusters with `fsync=off` (fast tests). What makes NOTIFY expensive is that
/// a notifying commit holds the queue lock through its WAL flush, so throughput comparisons need
/// PostgreSQL's default durability (fsync on, synchronous commit). No checkpoint or autovacuum may
/// land in the middle of one case and not another: each case starts with a CHECKPOINT instead.
const DURABLE: &[&str] = &[
    "fsync=on",
    "full_page_writes=on",
    "max_wal_size=20GB",
    "checkpoint_timeout=1h",
    "autovacuum=off",
];

fn main() {
    let seconds: f64 = env_or("BENCH_SECONDS", 1.5);
    let rounds: usize = env_or("BENCH_ROUNDS", 4);
    let samples: usize = env_or("BENCH_LATENCY_SAMPLES", 300);
    let fsync = std::env::var("BENCH_FSYNC").map_or(true, |v| v != "off");
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let pg = if fsync {
        Postgres::start_with(DURABLE)
    } else {
        Postgres::start()
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut admin = db::connect_spawned(&db::config(&pg.url(), "bench").unwrap())
            .await
            .unwrap();
        migrations::run(&mut admin).await.unwrap();
        admin
            .batch_execute("CREATE ROLE p LOGIN IN ROLE events_producer")
            .await
            .unwrap();
        let version: String = admin
            .query_one("SHOW server_version", &[])
            .await
            .unwrap()
            .get(0);
        let (_listener, notifications, arrivals) = listen(&pg).await;
        let mut bench = Bench {
            config: db::config(&pg.url_for("p", None), "bench").unwrap(),
            admin,
            notifications,
            arrivals,
            seconds,
        };
        let only = std::env::var("BENCH_ONLY").unwrap_or_default();
        let cases: Vec<(Case, usize)> = SINGLE
            .iter()
            .chain(BATCHED.iter())
            .copied()
            .filter(|(case, n)| {
                only.is_empty()
                    || only
                        .split(';')
                        .any(|o| format!("{} x{n}", case.label()).contains(o))
            })
            .collect();
        let mut results = vec![Rounds::default(); cases.len()];
        for round in 0..rounds {
            // Alternate the order, so that no case always follows the same neighbour.
            let mut order: Vec<usize> = (0..cases.len()).collect();
            if round % 2 == 1 {
                order.reverse();
            }
            for i in order {
                let (case, connections) = cases[i];
                let m = bench.measure(case, connections).await;
                eprintln!(
                    "round {round}: {:<50} x{connections}: {:>9.0} events/s ({} notifications)",
                    case.label(),
                    m.rate(),
                    m.notifications
                );
                results[i].0.push(m);
            }
        }
        if !only.is_empty() {
            // A partial run (for profiling): the per-round lines above are the result.
            for (i, (case, n)) in cases.iter().enumerate() {
                println!("{} x{n}: {:.0} events/s (median)", case.label(), results[i].rate());
            }
            if !only.contains("latency") {
                return;
            }
        }
        let mut latencies = Vec::new();
        for case in [Case::RawInsertNotify, Case::InTransaction, Case::AfterCommit] {
            let latency = bench.latency(case, samples).await;
            eprintln!(
                "latency: {:<50} wake-up p50 {:.2} ms p99 {:.2} ms",
                case.label(),
                percentile(&latency.wake_up, 0.5),
                percentile(&latency.wake_up, 0.99)
            );
            latencies.push((case, latency));
        }
        if !only.is_empty() {
            return;
        }
        let result = |case: Case, n: usize| {
            let i = cases.iter().position(|c| *c == (case, n)).unwrap();
            &results[i]
        };
        let rate = |case: Case, n: usize| result(case, n).rate();

        println!(
            "PostgreSQL {version} ({}), {} cores, load average at start {}; \
             median of {rounds} rounds × {seconds} s per case\n",
            if fsync {
                "durable commits: fsync on, autovacuum off, a CHECKPOINT before each case"
            } else {
                "testbed settings: fsync off"
            },
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            load.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        );
        println!("Single-event transactions:\n");
        println!("| case | connections | events/s (median) | range over rounds | vs raw INSERT | vs raw INSERT + pg_notify | NOTIFYs per 1k events |");
        println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
        for (case, n) in SINGLE {
            let r = rate(case, n);
            let (lo, hi) = result(case, n).range();
            println!(
                "| {} | {n} | {r:.0} | {lo:.0}–{hi:.0} | {:.2}× | {:.2}× | {:.0} |",
                case.label(),
                r / rate(Case::RawInsert, n),
                r / rate(Case::RawInsertNotify, n),
                result(case, n).notifications_per_1k()
            );
        }
        println!("\nBatched appends, 100 events per transaction:\n");
        println!("| case | connections | events/s (median) | range over rounds | vs raw multi-row INSERT |");
        println!("| --- | ---: | ---: | ---: | ---: |");
        for (case, n) in BATCHED {
            let r = rate(case, n);
            let (lo, hi) = result(case, n).range();
            println!(
                "| {} | {n} | {r:.0} | {lo:.0}–{hi:.0} | {:.2}× |",
                case.label(),
                r / rate(Case::RawBatch, n)
            );
        }
        println!(
            "\nWake-up latency, one connection appending one event at a time, {samples} samples \
             (ms from the start of the append call):\n"
        );
        println!("| case | append returns p50 | wake-up p50 | wake-up p99 | wake-up p50 − append p50 |");
        println!("| --- | ---: | ---: | ---: | ---: |");
        for (case, l) in &latencies {
            let (append, p50, p99) = (
                percentile(&l.append, 0.5),
                percentile(&l.wake_up, 0.5),
                percentile(&l.wake_up, 0.99),
            );
            println!(
                "| {} | {append:.2} | {p50:.2} | {p99:.2} | {:+.2} |",
                case.label(),
                p50 - append
            );
        }
        let single = rate(Case::AfterCommit, 8) / rate(Case::RawInsertNotify, 8);
        let batched_1 = rate(Case::BatchAfterCommit, 1) / rate(Case::RawBatch, 1);
        let batched_8 = rate(Case::BatchAfterCommit, 8) / rate(Case::RawBatch, 8);
        println!("\nTargets:");
        println!(
            "- single-event, default mode, 8 connections ≥ 2× raw INSERT + pg_notify: {single:.2}× {}",
            if single >= 2.0 { "(met)" } else { "(MISSED)" }
        );
        println!(
            "- batched ≥ 0.9× raw multi-row INSERT: {batched_1:.2}× at 1 connection, {batched_8:.2}× at 8 {}",
            if batched_1 >= 0.9 && batched_8 >= 0.9 {
                "(met)"
            } else {
                "(MISSED)"
            }
        );
    });
}
