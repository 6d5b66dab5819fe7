//! Single-event appends over TLS vs plaintext, same server, same run
//! (`cargo bench -p producer --bench append_tls`).
//!
//! One throwaway cluster with `ssl=on` (certificates made at start-up by testbed). The producer
//! in its default mode (prepared statements, after-commit wake-ups) appends one event per
//! transaction from `BENCH_CONNECTIONS` tasks (default 8, each with its own connection) for
//! `BENCH_SECONDS` (default 3), once as a login connecting with `sslmode=verify-full` and once as
//! a login that may connect without TLS, alternating over `BENCH_ROUNDS` (default 3) rounds; the
//! median of each is reported, with their ratio. The cluster keeps the testbed's fsync=off, where
//! the round trips (and so TLS) weigh most: with durable commits the ratio can only be closer to 1.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_store::{db, migrations, NewEvent, Topic};
use producer::{Channel, Notifier, Producer};
use serde_json::json;
use testbed::{env_or, Postgres};
use uuid::Uuid;

#[tokio::main]
async fn main() {
    let connections: usize = env_or("BENCH_CONNECTIONS", 8);
    let seconds: f64 = env_or("BENCH_SECONDS", 3.0);
    let rounds: usize = env_or("BENCH_ROUNDS", 3);
    let pg = Postgres::start_tls();
    let ca = pg.tls_ca().display().to_string();
    let port = pg.port();
    let admin_url = format!(
        "postgres://postgres@localhost:{port}/postgres?sslmode=verify-full&sslrootcert={ca}"
    );
    let mut admin = db::connect_spawned(&db::config(&admin_url, "bench").unwrap())
        .await
        .unwrap();
    migrations::run(&mut admin).await.unwrap();
    admin
        .batch_execute(
            "CREATE ROLE tls_app LOGIN PASSWORD 'bench-only' IN ROLE events_producer;
             CREATE ROLE plaintext LOGIN PASSWORD 'bench-only' IN ROLE events_producer;",
        )
        .await
        .unwrap();
    let tls_url = format!(
        "postgres://tls_app:bench-only@localhost:{port}/postgres?sslmode=verify-full&sslrootcert={ca}"
    );
    let plain_url =
        format!("postgres://plaintext:bench-only@127.0.0.1:{port}/postgres?sslmode=disable");

    let (mut plain, mut tls) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        for tls_first in [round % 2 == 1, round % 2 == 0] {
            admin.batch_execute("TRUNCATE events").await.unwrap();
            let url = if tls_first { &tls_url } else { &plain_url };
            let rate = run(url, connections, seconds).await;
            if tls_first {
                tls.push(rate);
            } else {
                plain.push(rate);
            }
        }
        eprintln!(
            "round {round}: plaintext {:.0}/s, TLS {:.0}/s",
            plain[round], tls[round]
        );
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (p, t) = (median(&mut plain), median(&mut tls));
    println!(
        "\nSingle-event appends (producer, after-commit, prepared), {connections} connections, \
         fsync off, median of {rounds}\n"
    );
    println!("| case | plaintext | TLS (verify-full) | ratio |");
    println!("| --- | ---: | ---: | ---: |");
    println!(
        "| 1 event per transaction x{connections} | {p:.0}/s | {t:.0}/s | {:.2}× |",
        t / p
    );
}

/// Events per second appended by `connections` tasks for `seconds`.
async fn run(url: &str, connections: usize, seconds: f64) -> f64 {
    let config = db::config(url, "bench").unwrap();
    let (notifier, notifier_task) =
        Notifier::spawn(config.clone(), Channel::default(), Duration::from_millis(1));
    let producer = Producer::after_commit(notifier);
    let mut clients = Vec::new();
    for _ in 0..connections {
        let client = db::connect_spawned(&config).await.unwrap();
        let prepared = producer.prepare(&client).await.unwrap();
        clients.push((client, prepared));
    }
    drop(producer);
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(task, (client, prepared))| {
            let (stop, count) = (stop.clone(), count.clone());
            tokio::spawn(async move {
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let event = NewEvent::new(
                        Topic::new("courses").unwrap(),
                        json!({ "task": task, "seq": seq, "text": "about a hundred bytes of payload text" }),
                    )
                    .with_event_id(Uuid::new_v4());
                    prepared.append(&client, &[event]).await.unwrap();
                    count.fetch_add(1, Ordering::Relaxed);
                    seq += 1;
                }
                drop(prepared);
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed();
    for task in tasks {
        task.await.unwrap();
    }
    notifier_task.finished().await;
    count.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64()
}
