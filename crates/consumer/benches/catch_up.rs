//! Catch-up throughput and memory, each against a raw baseline measured in the same run
//! (`cargo bench -p consumer --bench catch_up`).
//!
//! 1. **Into MongoDB** (the MongoDB-wire test server): the consumer catching up a backlog of
//!    `BENCH_MONGO_EVENTS` (default 100 000 — the server takes ~10k documents/s, so a million
//!    would take minutes per run) vs raw `insert_many` of the *same documents* (built by the
//!    consumer's own `event_document`) in batches of the same size, without transaction or
//!    checkpoint. Each run gets a fresh server (the test server slows down as it fills up).
//! 2. **Null sink**: the consumer catching up `BENCH_EVENTS` (default 1 000 000) with the null
//!    sink vs a raw keyset `SELECT` of the same rows and columns in the same batch size, decoded
//!    into the same Rust types.
//! 3. **Peak RSS**: the `consumer` binary (`--sink null`) as a child process catching up the
//!    Mongo-sized backlog and then the full one; `VmHWM` from `/proc/<pid>/status` once caught up.
//! 4. **Large payloads**: `BENCH_LARGE_EVENTS` (default 200) events of 1 MiB each, on a fresh
//!    cluster: the consumer binary (`--sink null`, `--batch-max-bytes` `BENCH_BATCH_MAX_BYTES`,
//!    default 4 MiB) vs a raw keyset `SELECT` of the same rows, 4 per page; events/s, MB/s and the
//!    binary's peak RSS against its bound (3 × `--batch-max-bytes` + 20 MB).
//!
//! `BENCH_ONLY=large` runs only the last.
//!
//! Runs alternate (raw, consumer, raw, consumer, …; `BENCH_ROUNDS`, default 3) and the best of
//! each is reported. Batch size `BENCH_BATCH` (default 1000, the consumer's default).

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use consumer::sink::{mongo::document::event_document, Delivered, NullSink, Observed};
use consumer::Config;
use event_store::migrations::Role;
use event_store::position::{Position, Reader};
use event_store::testing::TestDatabase;
use mongodb::bson::{DateTime, RawDocumentBuf};
use support::{connect, generate, last_position, wait_published};
use testbed::{env_or, Mongo};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() {
    if std::env::var("BENCH_ONLY").as_deref() == Ok("large") {
        return large_payloads(env_or("BENCH_ROUNDS", 3)).await;
    }
    let total = env_or("BENCH_EVENTS", 1_000_000);
    let mongo_events = env_or("BENCH_MONGO_EVENTS", 100_000).min(total);
    let rounds = env_or("BENCH_ROUNDS", 3);
    let batch = env_or("BENCH_BATCH", 1000);
    eprintln!("load before: {}", testbed::machine::load());

    let TestDatabase { pg, admin } =
        TestDatabase::start(&[("bench_consumer", Role::Consumer)]).await;
    let url = pg.url_for("bench_consumer", None);

    // --- into MongoDB, on the first part of the backlog --------------------------------------
    // Every run gets a fresh server: the test server slows down as its storage fills, which
    // would favour whichever side runs first.
    generate(&admin, mongo_events).await;
    let last = last_position(&admin).await;
    let docs = documents(&url, batch).await;
    let mut raw_mongo = Vec::new();
    let mut ours_mongo = Vec::new();
    for round in 0..rounds {
        for consumer_first in [round % 2 == 1, round % 2 == 0] {
            let mongo = Mongo::start();
            if consumer_first {
                let mut config = Config::new(url.clone(), Some(mongo.uri()));
                config.name = format!("mongo{round}");
                config.batch_size = Some(batch as u32);
                ours_mongo.push(run_consumer_until(config, None, &admin, last).await);
            } else {
                let client = mongodb::Client::with_uri_str(mongo.uri()).await.unwrap();
                let coll = client
                    .database("consumer")
                    .collection::<RawDocumentBuf>("receivedEvents");
                let started = Instant::now();
                for chunk in &docs {
                    coll.insert_many(chunk).await.unwrap();
                }
                raw_mongo.push(started.elapsed());
            }
        }
        eprintln!(
            "round {round}: mongo raw {:?}, consumer {:?}",
            raw_mongo[round], ours_mongo[round]
        );
    }
    let rss_small = binary_rss(&url, &admin, last, &[]).await;
    drop(docs);

    // --- null sink, on the whole backlog -----------------------------------------------------
    generate(&admin, total - mongo_events).await;
    let last = last_position(&admin).await;
    let mut raw_null = Vec::new();
    let mut ours_null = Vec::new();
    for round in 0..rounds {
        let (rows, elapsed) = raw_select(&url, batch).await;
        assert_eq!(rows, total);
        raw_null.push(elapsed);
        let mut config = Config::new(url.clone(), None);
        config.name = format!("null{round}");
        config.batch_size = Some(batch as u32);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Delivered>();
        let counter = tokio::spawn(async move {
            let mut n = 0usize;
            while let Some(d) = rx.recv().await {
                n += d.ids.len();
            }
            n
        });
        let elapsed = run_consumer_until(
            config,
            Some(Observed::new(NullSink::new(), tx)),
            &admin,
            last,
        )
        .await;
        assert_eq!(counter.await.unwrap(), total, "every event delivered once");
        ours_null.push(elapsed);
        eprintln!(
            "round {round}: null raw {:?}, consumer {:?}",
            raw_null[round], elapsed
        );
    }
    let rss_large = binary_rss(&url, &admin, last, &[]).await;

    let best = |v: &[Duration]| *v.iter().min().unwrap();
    let rate = |n: usize, d: Duration| n as f64 / d.as_secs_f64();
    let (rm, om) = (
        rate(mongo_events, best(&raw_mongo)),
        rate(mongo_events, best(&ours_mongo)),
    );
    let (rn, on) = (rate(total, best(&raw_null)), rate(total, best(&ours_null)));
    println!(
        "\nCatch-up, batch size {batch}, best of {rounds} (load during run: {})\n",
        testbed::machine::load()
    );
    println!("| case | events | raw baseline | consumer | ratio | target |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    println!(
        "| null sink vs raw keyset SELECT | {total} | {rn:.0}/s | {on:.0}/s | {:.2}× | ≥ 0.80× |",
        on / rn
    );
    println!(
        "| MongoDB-wire server vs raw insert_many | {mongo_events} | {rm:.0}/s | {om:.0}/s | {:.2}× | ≥ 0.85× |",
        om / rm
    );
    println!("\nPeak RSS of the `consumer` binary (`--sink null`), VmHWM once caught up\n");
    println!("| backlog | peak RSS | catch-up time | target |");
    println!("| ---: | ---: | ---: | ---: |");
    for (n, (kb, took)) in [(mongo_events, rss_small), (total, rss_large)] {
        println!(
            "| {n} | {:.1} MB | {:.1} s | ≤ 30 MB, flat |",
            kb as f64 / 1024.0,
            took.as_secs_f64()
        );
    }
    drop(pg);
    large_payloads(rounds).await;
}

/// Catch-up of 1 MiB payloads in byte-bounded batches: rate against a raw SELECT, and peak RSS.
async fn large_payloads(rounds: usize) {
    let events = env_or("BENCH_LARGE_EVENTS", 200usize);
    let max_bytes = env_or("BENCH_BATCH_MAX_BYTES", 4usize << 20);
    let TestDatabase { pg, admin } =
        TestDatabase::start(&[("bench_consumer", Role::Consumer)]).await;
    let url = pg.url_for("bench_consumer", None);
    admin
        .execute(
            // 1 MiB of hex per payload, one transaction per 20 events.
            "INSERT INTO events (topic, payload)
             SELECT 'blobs', jsonb_build_object('n', g, 'blob', repeat(md5(g::text), 32768))
               FROM generate_series(1, $1::bigint) g",
            &[&(events as i64)],
        )
        .await
        .unwrap();
    admin.batch_execute("VACUUM ANALYZE events").await.unwrap();
    let last = last_position(&admin).await;
    let per_page = (max_bytes >> 20).max(1);
    let mut raw = Vec::new();
    let mut ours = Vec::new();
    let mut rss = Vec::new();
    for _ in 0..rounds {
        let (rows, elapsed) = raw_select(&url, per_page).await;
        assert_eq!(rows, events);
        raw.push(elapsed);
        let max = max_bytes.to_string();
        let (kb, took) = binary_rss(&url, &admin, last, &["--batch-max-bytes", &max]).await;
        ours.push(took);
        rss.push(kb);
    }
    let best = |v: &[Duration]| *v.iter().min().unwrap();
    let rate = |d: Duration| events as f64 / d.as_secs_f64();
    let (r, o) = (rate(best(&raw)), rate(best(&ours)));
    let peak_mb = *rss.iter().max().unwrap() as f64 / 1024.0;
    let bound_mb = 3.0 * max_bytes as f64 / (1 << 20) as f64 + 20.0;
    println!(
        "\nCatch-up of {events} events of 1 MiB, --batch-max-bytes {max_bytes}, best of {rounds}\n"
    );
    println!("| case | raw SELECT ({per_page} per page) | consumer (`--sink null`, binary) | ratio | peak RSS | RSS bound |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    println!(
        "| 1 MiB payloads | {r:.0}/s ({:.0} MB/s) | {o:.0}/s ({:.0} MB/s, incl. start-up) | {:.2}× | {peak_mb:.1} MB | ≤ {bound_mb:.0} MB |",
        r,
        o,
        o / r
    );
}

/// The documents the consumer would write, in batches, read with the shared position SQL.
async fn documents(url: &str, batch: usize) -> Vec<Vec<RawDocumentBuf>> {
    let client = connect(url).await;
    let reader = Reader::prepare(&client).await.unwrap();
    let mut after = Position::START;
    let mut out = Vec::new();
    loop {
        let b = reader.fetch(&client, after, batch, None).await.unwrap();
        let Some(end) = b.end else { break };
        let now = DateTime::now();
        out.push(
            b.events
                .iter()
                .map(|e| event_document(e, now).unwrap())
                .collect(),
        );
        after = end;
    }
    out
}

/// The raw baseline: a keyset SELECT of the same rows and columns, decoded into the same types.
async fn raw_select(url: &str, batch: usize) -> (usize, Duration) {
    let client = connect(url).await;
    let stmt = client
        .prepare(
            // Qualified: a bare `tx_id` in ORDER BY would mean the output column `tx_id::text`.
            "SELECT e.id, e.tx_id::text, e.event_id, e.topic, e.key, e.type, e.created_at,
                    e.payload, e.headers
               FROM events e
              WHERE (e.tx_id, e.id) > ($1::text::xid8, $2::bigint)
              ORDER BY e.tx_id, e.id
              LIMIT $3",
        )
        .await
        .unwrap();
    let started = Instant::now();
    let (mut tx, mut id, mut rows) = ("0".to_string(), 0i64, 0usize);
    loop {
        let page = client
            .query(&stmt, &[&tx, &id, &(batch as i64)])
            .await
            .unwrap();
        if page.is_empty() {
            break;
        }
        for row in &page {
            let decoded: (
                i64,
                String,
                uuid::Uuid,
                String,
                Option<String>,
                Option<String>,
                SystemTime,
                serde_json::Value,
                serde_json::Value,
            ) = (
                row.get(0),
                row.get(1),
                row.get(2),
                row.get(3),
                row.get(4),
                row.get(5),
                row.get(6),
                row.get(7),
                row.get(8),
            );
            std::hint::black_box(&decoded);
            id = decoded.0;
            tx = decoded.1;
        }
        rows += page.len();
    }
    (rows, started.elapsed())
}

/// Runs a consumer in-process until its published position reaches `last`.
async fn run_consumer_until(
    config: Config,
    sink: Option<Observed<NullSink>>,
    admin: &Client,
    last: Position,
) -> Duration {
    let name = config.name.clone();
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let handle = match sink {
        Some(sink) => tokio::spawn(consumer::run_with(config, sink, shutdown.clone())),
        None => tokio::spawn(consumer::run(config, shutdown.clone())),
    };
    wait_published(admin, &name, last).await;
    let elapsed = started.elapsed();
    shutdown.cancel();
    handle.await.unwrap().unwrap();
    elapsed
}

/// Peak RSS (kB) of the binary catching up everything, and how long it took.
async fn binary_rss(url: &str, admin: &Client, last: Position, extra: &[&str]) -> (u64, Duration) {
    static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let name = format!(
        "rss{}",
        RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let started = Instant::now();
    let mut child: Child = Command::new(env!("CARGO_BIN_EXE_consumer"))
        .args(["--sink", "null", "--name", &name, "--log-level", "warn"])
        .args(extra)
        .env("DATABASE_URL", url)
        .stdin(Stdio::null())
        .spawn()
        .expect("start the consumer binary");
    wait_published(admin, &name, last).await;
    let took = started.elapsed();
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    let hwm = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(child.wait().unwrap().success());
    (hwm, took)
}
