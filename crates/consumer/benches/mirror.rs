//! The MongoDB mirror (`consumer --mirror`): its apply rate against a raw `bulk_write` of the same
//! operations, measured in the same run (`cargo bench -p consumer --bench mirror`).
//!
//! A captured table of `BENCH_ROWS` (default 10 000) rows is backfilled (`read` events), then
//! every second row is updated and every tenth deleted: a stream of replace and delete
//! operations (rows × 1.6). Each run gets a fresh MongoDB-wire test server (it slows down as it
//! fills up, which would favour whichever side runs first):
//!
//! - **raw ops**: `Client::bulk_write` of the mirror's operations (built once, ahead of time,
//!   by `mirror::operations`), one call per batch of `BENCH_BATCH` (1000) events, each in a
//!   transaction of its own as the consumer writes them, with the consumer's write concern
//!   (majority, journaled), no checkpoint — the baseline of the target;
//! - **raw ops, no transaction**: the same calls outside transactions (the test server syncs
//!   every write then, so this is slower than a transaction per batch);
//! - **raw all**: per batch, one transaction with `insert_many` of the change-log documents and
//!   the `bulk_write`;
//! - **consumer + mirror**: the consumer catching up the stream with `--mirror` (change log,
//!   mirror and checkpoint in one transaction per batch);
//! - **consumer, log only**: the same without `--mirror`.
//!
//! The mirror's apply rate is its operations over the time it adds to the consumer (consumer +
//! mirror − log only); the target is ≥ 0.85× the raw `bulk_write` rate. The end-to-end ratio
//! (raw all vs consumer + mirror) is printed too. Rounds alternate the order (`BENCH_ROUNDS`,
//! default 3); medians are reported.

mod support;

use std::time::{Duration, Instant};

use consumer::sink::mongo::document::event_document;
use consumer::sink::mongo::mirror::{self, Mirror};
use consumer::Config;
use event_store::migrations::Role;
use event_store::position::{Position, Reader};
use event_store::testing::TestDatabase;
use mongodb::bson::{doc, DateTime, Document, RawDocumentBuf};
use mongodb::options::{Acknowledgment, ClientOptions, WriteConcern, WriteModel};
use support::{connect, last_position, wait_published};
use testbed::{env_or, Mongo};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

const TOPIC: &str = "bench.items";
const COLLECTION: &str = "items";
const DATABASE: &str = "consumer";

#[tokio::main]
async fn main() {
    let rows: i64 = env_or("BENCH_ROWS", 10_000);
    let rounds: usize = env_or("BENCH_ROUNDS", 3);
    let batch: usize = env_or("BENCH_BATCH", 1000);
    eprintln!("load before: {}", testbed::machine::load());

    let TestDatabase { pg, admin } =
        TestDatabase::start(&[("bench_consumer", Role::Consumer)]).await;
    let url = pg.url_for("bench_consumer", None);
    let started = Instant::now();
    admin
        .batch_execute(&format!(
            "CREATE TABLE items (id bigint PRIMARY KEY, sku text NOT NULL, qty int NOT NULL,
                                 price numeric(12,2), note text, updated_at timestamptz NOT NULL DEFAULT now());
             INSERT INTO items (id, sku, qty, price, note)
               SELECT g, 'sku-' || g, g % 100, (g % 1000) * 0.37 + 0.01, repeat('n', g % 40)
                 FROM generate_series(1, {rows}) g;
             SELECT capture_add('items', '{TOPIC}');
             SELECT capture_backfill('items', 10000);
             UPDATE items SET qty = qty + 1, updated_at = now() WHERE id % 2 = 0;
             DELETE FROM items WHERE id % 10 = 1;"
        ))
        .await
        .unwrap();
    admin.batch_execute("VACUUM ANALYZE events").await.unwrap();
    let last = last_position(&admin).await;
    let table_rows: i64 = admin
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    let batches = batches(&url, batch).await;
    let events: usize = batches.iter().map(|b| b.docs.len()).sum();
    let ops: usize = batches.iter().map(|b| b.ops.len()).sum();
    eprintln!(
        "{events} events ({ops} mirror operations) for {rows} rows in {:?}",
        started.elapsed()
    );

    let mut raw_ops = Vec::new();
    let mut raw_plain = Vec::new();
    let mut raw_all = Vec::new();
    let mut mirrored = Vec::new();
    let mut log_only = Vec::new();
    for round in 0..rounds {
        let mut order = [
            Run::RawOps,
            Run::RawPlain,
            Run::RawAll,
            Run::Mirror,
            Run::LogOnly,
        ];
        let n = order.len();
        order.rotate_left(round % n);
        for run in order {
            let mongo = Mongo::start();
            let took = match run {
                Run::RawOps => raw(&mongo, &batches, false, true).await,
                Run::RawPlain => raw(&mongo, &batches, false, false).await,
                Run::RawAll => raw(&mongo, &batches, true, true).await,
                Run::Mirror | Run::LogOnly => {
                    let mut config = Config::new(url.clone(), Some(mongo.uri()));
                    // Each run its own name: the published position of another would end the wait.
                    config.name = format!("{run:?}{round}").to_lowercase();
                    config.batch_size = Some(batch as u32);
                    if run == Run::Mirror {
                        config.mirror = vec![format!("{TOPIC}={COLLECTION}")];
                    }
                    run_consumer_until(config, &admin, last).await
                }
            };
            if run != Run::LogOnly {
                // Every run that applies the operations leaves the table's state behind.
                let client = mongodb::Client::with_uri_str(mongo.uri()).await.unwrap();
                let n = client
                    .database(DATABASE)
                    .collection::<Document>(COLLECTION)
                    .count_documents(doc! {})
                    .await
                    .unwrap();
                assert_eq!(
                    n as i64, table_rows,
                    "{run:?}: the mirror holds the table's rows"
                );
            }
            eprintln!("round {round}: {run:?} {took:?}");
            match run {
                Run::RawOps => raw_ops.push(took),
                Run::RawPlain => raw_plain.push(took),
                Run::RawAll => raw_all.push(took),
                Run::Mirror => mirrored.push(took),
                Run::LogOnly => log_only.push(took),
            }
        }
    }

    let (t_raw, t_plain, t_all, t_mirror, t_log) = (
        median(&raw_ops),
        median(&raw_plain),
        median(&raw_all),
        median(&mirrored),
        median(&log_only),
    );
    let rate = |n: usize, d: Duration| n as f64 / d.as_secs_f64();
    let raw_rate = rate(ops, t_raw);
    let added = t_mirror.saturating_sub(t_log).max(Duration::from_millis(1));
    let apply_rate = rate(ops, added);
    let ratio = apply_rate / raw_rate;
    println!(
        "\nMirror apply, {rows} rows → {events} events, {ops} replace/delete operations, batch \
         size {batch}, median of {rounds} (load during run: {})\n",
        testbed::machine::load()
    );
    println!("| case | time | rate | ratio | target |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    println!(
        "| raw `bulk_write` of the operations, a transaction per batch | {:.2} s | {raw_rate:.0} ops/s | 1.00× | |",
        t_raw.as_secs_f64()
    );
    println!(
        "| raw `bulk_write`, no transaction | {:.2} s | {:.0} ops/s | {:.2}× | |",
        t_plain.as_secs_f64(),
        rate(ops, t_plain),
        rate(ops, t_plain) / raw_rate
    );
    println!(
        "| consumer, change log only | {:.2} s | {:.0} events/s | | |",
        t_log.as_secs_f64(),
        rate(events, t_log)
    );
    println!(
        "| consumer + mirror | {:.2} s | {:.0} events/s | | |",
        t_mirror.as_secs_f64(),
        rate(events, t_mirror)
    );
    println!(
        "| **mirror apply** (consumer + mirror − log only) | {:.2} s | {apply_rate:.0} ops/s | {ratio:.2}× | ≥ 0.85× ({}) |",
        added.as_secs_f64(),
        if ratio >= 0.85 { "holds" } else { "missed" }
    );
    println!(
        "| end to end: raw `insert_many` + `bulk_write` vs consumer + mirror | {:.2} s | {:.0} events/s | {:.2}× | |",
        t_all.as_secs_f64(),
        rate(events, t_all),
        t_all.as_secs_f64() / t_mirror.as_secs_f64()
    );
    drop(pg);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Run {
    RawOps,
    RawPlain,
    RawAll,
    Mirror,
    LogOnly,
}

/// One batch as the consumer would write it: the change-log documents and the mirror operations.
struct Prepared {
    docs: Vec<RawDocumentBuf>,
    ops: Vec<WriteModel>,
}

/// The stream in batches, read with the shared position SQL, encoded by the consumer's own code.
async fn batches(url: &str, batch: usize) -> Vec<Prepared> {
    let client = connect(url).await;
    let reader = Reader::prepare(&client).await.unwrap();
    let mirrors: Vec<Mirror> = vec![format!("{TOPIC}={COLLECTION}").parse().unwrap()];
    let mut after = Position::START;
    let mut out = Vec::new();
    loop {
        let b = reader.fetch(&client, after, batch, None).await.unwrap();
        let Some(end) = b.end else { break };
        let now = DateTime::now();
        let docs: Vec<RawDocumentBuf> = b
            .events
            .iter()
            .map(|e| event_document(e, now).unwrap())
            .collect();
        let ops = mirror::operations(DATABASE, &mirrors, &b.events, &docs);
        out.push(Prepared { docs, ops });
        after = end;
    }
    out
}

/// The raw baselines: the prepared writes, batch by batch (each batch one transaction when
/// `transactions`), with the consumer's write concern and no checkpoint.
async fn raw(mongo: &Mongo, batches: &[Prepared], with_log: bool, transactions: bool) -> Duration {
    let mut options = ClientOptions::parse(mongo.uri()).await.unwrap();
    let mut durable = WriteConcern::default();
    durable.w = Some(Acknowledgment::Majority);
    durable.journal = Some(true);
    options.write_concern = Some(durable);
    let client = mongodb::Client::with_options(options).unwrap();
    let log = client
        .database(DATABASE)
        .collection::<RawDocumentBuf>("receivedEvents");
    // Not causally consistent: the driver would then add `readConcern: {afterClusterTime}` to
    // the transaction's first command, which the test server refuses on `bulkWrite` (the
    // consumer's transactions start with the change log's `insert`).
    let mut session = client
        .start_session()
        .causal_consistency(false)
        .await
        .unwrap();
    // The driver consumes the models; cloning them is not part of the timed work.
    let prepared: Vec<(Vec<WriteModel>, &[RawDocumentBuf])> = batches
        .iter()
        .map(|b| (b.ops.clone(), b.docs.as_slice()))
        .collect();
    let started = Instant::now();
    for (ops, docs) in prepared {
        if transactions {
            session.start_transaction().await.unwrap();
            if with_log {
                log.insert_many(docs).session(&mut session).await.unwrap();
            }
            if !ops.is_empty() {
                client.bulk_write(ops).session(&mut session).await.unwrap();
            }
            session.commit_transaction().await.unwrap();
        } else {
            if with_log {
                log.insert_many(docs).await.unwrap();
            }
            if !ops.is_empty() {
                client.bulk_write(ops).await.unwrap();
            }
        }
    }
    started.elapsed()
}

/// Runs a consumer in-process until its published position reaches `last`.
async fn run_consumer_until(config: Config, admin: &Client, last: Position) -> Duration {
    let name = config.name.clone();
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let handle = tokio::spawn(consumer::run(config, shutdown.clone()));
    wait_published(admin, &name, last).await;
    let elapsed = started.elapsed();
    shutdown.cancel();
    handle.await.unwrap().unwrap();
    elapsed
}

fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v[v.len() / 2]
}
