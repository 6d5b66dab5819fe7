//! What the causal sort key (migration V8, `events_sort_key()`) costs writers, against the key it
//! replaced (`pg_current_xact_id()`), in one run on one durable cluster
//! (`cargo bench -p producer --bench sort_key`).
//!
//! Both keys are measured on the same cluster by switching the column default between
//! measurements (`ALTER TABLE events ALTER COLUMN tx_id SET DEFAULT …`, as the superuser).
//! Rounds alternate the order of the two keys; each case reports the median of the rounds.
//!
//! - raw INSERT x8: a prepared single-row INSERT, autocommit, no NOTIFY: the floor, as fast as
//!   plain SQL appends;
//! - producer x8: `Producer::after_commit`, one event per transaction (the default producer);
//! - producer batch of 100 x8: one `append` of 100 events per transaction;
//! - captured UPDATE of 100k rows: one statement over a captured table (its trigger writes 100k
//!   event rows), in seconds.
//!
//! Environment: `BENCH_SECONDS` (per measurement, default 3), `BENCH_ROUNDS` (default 3),
//! `BENCH_CAPTURE_ROWS` (default 100000).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_store::db::Database;
use event_store::{db, migrations, NewEvent, Topic};
use producer::{Channel, Notifier, Producer};
use serde_json::json;
use testbed::{env_or, Postgres};
use tokio_postgres::Client;
use uuid::Uuid;

const BATCH: usize = 100;

/// As the append benchmark: durable commits, no checkpoint or autovacuum in the middle of a case.
const DURABLE: &[&str] = &[
    "fsync=on",
    "full_page_writes=on",
    "max_wal_size=20GB",
    "checkpoint_timeout=1h",
    "autovacuum=off",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    /// Before V8: the writer's own transaction id.
    Own,
    /// V8: `events_sort_key()`.
    Causal,
}

impl Key {
    fn label(self) -> &'static str {
        match self {
            Key::Own => "before (pg_current_xact_id)",
            Key::Causal => "after (events_sort_key)",
        }
    }

    fn default_sql(self) -> &'static str {
        match self {
            Key::Own => "pg_current_xact_id()",
            Key::Causal => "events_sort_key()",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Case {
    RawInsert,
    Producer,
    ProducerBatch,
}

impl Case {
    fn label(self) -> &'static str {
        match self {
            Case::RawInsert => "raw INSERT x8, no NOTIFY",
            Case::Producer => "producer x8, 1 event per transaction",
            Case::ProducerBatch => "producer batch of 100 x8",
        }
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

fn new_event(i: u64) -> NewEvent {
    NewEvent::new(
        Topic::new("courses").unwrap(),
        json!({ "seq": i, "text": "a course was updated; here is some text to make ~100 bytes" }),
    )
    .with_event_id(Uuid::new_v4())
}

async fn set_key(admin: &Client, key: Key) {
    admin
        .batch_execute(&format!(
            "ALTER TABLE events ALTER COLUMN tx_id SET DEFAULT {}",
            key.default_sql()
        ))
        .await
        .unwrap();
}

/// Events per second of `case` over 8 connections for `seconds`.
async fn throughput(config: &Database, admin: &Client, case: Case, seconds: f64) -> f64 {
    admin
        .batch_execute("TRUNCATE events; CHECKPOINT")
        .await
        .unwrap();
    let (notifier, notifier_task) =
        Notifier::spawn(config.clone(), Channel::default(), Duration::from_millis(1));
    let producer = Producer::after_commit(notifier.clone());
    drop(notifier);
    let stop = Arc::new(AtomicBool::new(false));
    let counting = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let client = db::connect_spawned(config).await.unwrap();
        let (producer, stop, counting) = (producer.clone(), stop.clone(), counting.clone());
        tasks.push(tokio::spawn(async move {
            let insert = client
                .prepare("INSERT INTO events (event_id, topic, payload) VALUES ($1, $2, $3)")
                .await
                .unwrap();
            let prepared = producer.prepare(&client).await.unwrap();
            let (mut seq, mut counted) = (0u64, 0u64);
            while !stop.load(Ordering::Acquire) {
                let n = match case {
                    Case::RawInsert => {
                        let payload = json!({ "seq": seq, "text": "a course was updated" });
                        client
                            .execute(&insert, &[&Uuid::new_v4(), &"courses", &payload])
                            .await
                            .unwrap();
                        1
                    }
                    Case::Producer => {
                        prepared.append(&client, &[new_event(seq)]).await.unwrap();
                        1
                    }
                    Case::ProducerBatch => {
                        let events: Vec<NewEvent> =
                            (0..BATCH as u64).map(|i| new_event(seq + i)).collect();
                        prepared.append(&client, &events).await.unwrap();
                        BATCH as u64
                    }
                };
                seq += n;
                if counting.load(Ordering::Acquire) {
                    counted += n;
                }
            }
            counted
        }));
    }
    drop(producer);
    tokio::time::sleep(Duration::from_millis(300)).await;
    counting.store(true, Ordering::Release);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    counting.store(false, Ordering::Release);
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Release);
    let mut events = 0;
    for task in tasks {
        events += task.await.unwrap();
    }
    notifier_task.finished().await;
    events as f64 / elapsed
}

/// Seconds for one UPDATE of every row of the captured table.
async fn captured_update(admin: &Client) -> f64 {
    // One statement each: VACUUM cannot run in the implicit transaction of a multi-statement batch.
    for sql in ["TRUNCATE events", "VACUUM captured", "CHECKPOINT"] {
        admin.batch_execute(sql).await.unwrap();
    }
    let started = Instant::now();
    admin
        .batch_execute("UPDATE captured SET n = n + 1")
        .await
        .unwrap();
    started.elapsed().as_secs_f64()
}

fn main() {
    let seconds: f64 = env_or("BENCH_SECONDS", 3.0);
    let rounds: usize = env_or("BENCH_ROUNDS", 3);
    let capture_rows: i64 = env_or("BENCH_CAPTURE_ROWS", 100_000);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let pg = Postgres::start_with(DURABLE);
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
        admin
            .execute(
                "CREATE TABLE captured AS
                 SELECT g AS id, 0 AS n, md5(g::text) AS label FROM generate_series(1, $1::bigint) AS g",
                &[&capture_rows],
            )
            .await
            .unwrap();
        admin
            .batch_execute(
                "ALTER TABLE captured ADD PRIMARY KEY (id);
                 SELECT capture_add('captured', 'captured', ARRAY['update']);",
            )
            .await
            .unwrap();
        let config = db::config(&pg.url_for("p", None), "bench").unwrap();
        let cases = [Case::RawInsert, Case::Producer, Case::ProducerBatch];
        let keys = [Key::Own, Key::Causal];
        // rates[case][key] over rounds; update[key] over rounds.
        let mut rates = vec![vec![Vec::new(); keys.len()]; cases.len()];
        let mut updates = vec![Vec::new(); keys.len()];
        for round in 0..rounds {
            let mut order: Vec<usize> = (0..keys.len()).collect();
            if round % 2 == 1 {
                order.reverse();
            }
            for &k in &order {
                set_key(&admin, keys[k]).await;
                for (c, &case) in cases.iter().enumerate() {
                    let rate = throughput(&config, &admin, case, seconds).await;
                    eprintln!(
                        "round {round}: {:<40} {:<28} {rate:>9.0} events/s",
                        case.label(),
                        keys[k].label()
                    );
                    rates[c][k].push(rate);
                }
                let secs = captured_update(&admin).await;
                eprintln!(
                    "round {round}: {:<40} {:<28} {secs:>9.2} s",
                    "captured UPDATE of all rows",
                    keys[k].label()
                );
                updates[k].push(secs);
            }
        }
        set_key(&admin, Key::Causal).await;

        println!(
            "\nsort key cost: PostgreSQL with fsync on, 8 connections, {rounds} rounds of {seconds} s \
             (alternating), medians; load before: {}",
            load.trim()
        );
        println!(
            "| case | before (events/s) | after (events/s) | after / before | after / raw INSERT (after) |"
        );
        println!("| --- | ---: | ---: | ---: | ---: |");
        let raw_after = median(&mut rates[0][1].clone());
        for (c, case) in cases.iter().enumerate() {
            let before = median(&mut rates[c][0]);
            let after = median(&mut rates[c][1]);
            println!(
                "| {} | {before:.0} | {after:.0} | {:.3} | {:.3} |",
                case.label(),
                after / before,
                after / raw_after
            );
        }
        let before = median(&mut updates[0]);
        let after = median(&mut updates[1]);
        println!(
            "| captured UPDATE of {capture_rows} rows (s; ratio = before/after time) | {before:.2} s | {after:.2} s | {:.3} | |",
            before / after
        );
    });
}
