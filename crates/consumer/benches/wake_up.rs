//! Wake-up latency: commit → delivered, at a steady rate, with the null sink
//! (`cargo bench -p consumer --bench wake_up`).
//!
//! A producer task commits one event per transaction (INSERT, `pg_notify` in the transaction) at
//! `BENCH_RATE` events/s (default 500) for `BENCH_SECONDS` (default 20), timestamping the moment
//! it sends COMMIT. The consumer runs in-process with a null sink that timestamps each delivered
//! batch. The baseline, in the same run and for the same commits: a bare LISTEN connection
//! (driven with `poll_message`) timestamping each notification's arrival — the floor any
//! NOTIFY-woken reader shares. The first second is warm-up and not counted.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use consumer::sink::{Delivered, NullSink, Observed};
use consumer::Config;
use event_store::{db, migrations};
use futures_util::future::poll_fn;
use testbed::{env_or, Postgres};
use tokio::sync::mpsc;
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() {
    let rate = env_or("BENCH_RATE", 500);
    let seconds = env_or("BENCH_SECONDS", 20);
    eprintln!("load before: {}", testbed::machine::load());
    let pg = Postgres::start();
    let config = db::config(&pg.url(), "bench").unwrap();
    let mut admin = db::connect_spawned(&config).await.unwrap();
    migrations::run(&mut admin).await.unwrap();
    admin
        .batch_execute("CREATE ROLE bench_consumer LOGIN IN ROLE events_consumer")
        .await
        .unwrap();

    // The baseline listener: notification arrival times, by payload (the event id).
    let (raw_tx, mut raw_rx) = mpsc::unbounded_channel::<(i64, Instant)>();
    let (listen_client, mut connection) = db::connect(&config).await.unwrap();
    tokio::spawn(async move {
        while let Some(Ok(message)) = poll_fn(|cx| connection.poll_message(cx)).await {
            if let AsyncMessage::Notification(n) = message {
                let at = Instant::now();
                if let Ok(id) = n.payload().parse() {
                    let _ = raw_tx.send((id, at));
                }
            }
        }
    });
    listen_client.batch_execute("LISTEN events").await.unwrap();

    // The consumer, in-process, null sink.
    let (tx, mut delivered) = mpsc::unbounded_channel::<Delivered>();
    let shutdown = CancellationToken::new();
    let consumer = tokio::spawn(consumer::run_with(
        Config::new(pg.url_for("bench_consumer", None), None),
        Observed::new(NullSink::new(), tx),
        shutdown.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The producer: one event per transaction, timestamped as COMMIT is sent.
    let producer = db::connect_spawned(&config).await.unwrap();
    let insert = producer
        .prepare(
            "INSERT INTO events (topic, payload) VALUES ('courses', '{\"n\": 1}') RETURNING id",
        )
        .await
        .unwrap();
    let notify = producer
        .prepare("SELECT pg_notify('events', $1)")
        .await
        .unwrap();
    let mut committed: HashMap<i64, Instant> = HashMap::new();
    let total = rate * seconds;
    let warm_up = rate;
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut ids = Vec::new();
    for _ in 0..total {
        ticks.tick().await;
        producer.batch_execute("BEGIN").await.unwrap();
        let id: i64 = producer.query_one(&insert, &[]).await.unwrap().get(0);
        producer.execute(&notify, &[&id.to_string()]).await.unwrap();
        let at = Instant::now();
        producer.batch_execute("COMMIT").await.unwrap();
        committed.insert(id, at);
        ids.push(id);
    }
    let produce_time = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    shutdown.cancel();
    consumer.await.unwrap().unwrap();

    let counted: Vec<i64> = ids[warm_up as usize..].to_vec();
    let mut delivered_at = HashMap::new();
    while let Ok(batch) = delivered.try_recv() {
        for id in batch.ids {
            assert!(delivered_at.insert(id, batch.at).is_none(), "{id} twice");
        }
    }
    let mut notified_at = HashMap::new();
    while let Ok((id, at)) = raw_rx.try_recv() {
        notified_at.insert(id, at);
    }
    let latencies = |arrivals: &HashMap<i64, Instant>| {
        let mut v: Vec<Duration> = counted
            .iter()
            .map(|id| {
                arrivals
                    .get(id)
                    .unwrap_or_else(|| panic!("event {id} never arrived"))
                    .duration_since(committed[id])
            })
            .collect();
        v.sort();
        v
    };
    let ours = latencies(&delivered_at);
    let raw = latencies(&notified_at);
    let pct = |v: &[Duration], p: f64| {
        let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
        v[i].as_secs_f64() * 1000.0
    };
    println!(
        "\nWake-up latency, COMMIT sent → delivered, {} events at {rate}/s ({:.0}/s achieved), \
         null sink (load during run: {})\n",
        counted.len(),
        total as f64 / produce_time.as_secs_f64(),
        testbed::machine::load()
    );
    println!("| reader | p50 | p90 | p99 | max | target |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for (label, v, target) in [
        ("bare LISTEN connection (NOTIFY floor)", &raw, ""),
        ("consumer (null sink)", &ours, "p99 ≤ 2.5 ms"),
    ] {
        println!(
            "| {label} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {target} |",
            pct(v, 0.5),
            pct(v, 0.9),
            pct(v, 0.99),
            pct(v, 1.0)
        );
    }
    println!(
        "\nconsumer − floor: p50 +{:.2} ms, p99 +{:.2} ms",
        pct(&ours, 0.5) - pct(&raw, 0.5),
        pct(&ours, 0.99) - pct(&raw, 0.99)
    );
}
