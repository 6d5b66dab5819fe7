//! The purger service loop (`purger::run`) with producers and a consumer running beside it, and
//! through a database outage.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use clap::Parser;
use common::{connect, Db, DAY};
use event_store::position::{self, Position, Reader};
use tokio_util::sync::CancellationToken;

fn config(url: &str, args: &[&str]) -> purger::Config {
    let mut argv = vec!["purger", "--database-url", url];
    argv.extend_from_slice(args);
    purger::Config::try_parse_from(argv).unwrap()
}

/// Waits (up to a generous limit, for liveness only) until `done` holds.
async fn eventually<F, Fut>(what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn count(db: &Db) -> i64 {
    db.admin
        .query_one("SELECT count(*) FROM events", &[])
        .await
        .unwrap()
        .get(0)
}

/// Producers append while a consumer reads and publishes its position and the purger deletes
/// everything it may (retention zero, a pass every few milliseconds). The consumer must still
/// read every event exactly once and never find the watermark past its position.
#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn purging_beside_a_producer_and_a_consumer_loses_nothing_the_consumer_needs() {
    const PRODUCERS: usize = 2;
    const PER_PRODUCER: usize = 600;
    let db = Db::start().await;
    let consumer = connect(&db.pg.url_for("app_consumer", None)).await;
    // A consumer holds purging back from the moment it publishes a position; it registers
    // before anything is produced.
    position::publish(&consumer, "sink", Position::START)
        .await
        .unwrap();
    let shutdown = CancellationToken::new();
    let purger = tokio::spawn(purger::run(
        config(
            &db.purger_url(),
            &[
                "--retention",
                "0s",
                "--interval",
                "5ms",
                "--batch-size",
                "50",
            ],
        ),
        shutdown.clone(),
    ));

    let mut producers = Vec::new();
    for p in 0..PRODUCERS {
        let mut client = connect(&db.pg.url_for("app_producer", None)).await;
        producers.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            let mut i = 0;
            while ids.len() < PER_PRODUCER {
                // Transactions of 1–3 events from two producers: commits land out of id order.
                let n = (1 + (i + p) % 3).min(PER_PRODUCER - ids.len());
                let tx = client.transaction().await.unwrap();
                for _ in 0..n {
                    let row = tx
                        .query_one(
                            "INSERT INTO events (topic, payload) VALUES ('t', '{}') RETURNING id",
                            &[],
                        )
                        .await
                        .unwrap();
                    ids.push(row.get::<_, i64>(0));
                }
                tx.commit().await.unwrap();
                i += 1;
                if i % 7 == 0 {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
            ids
        }));
    }

    let reader = Reader::prepare(&consumer).await.unwrap();
    let mut at = Position::START;
    let mut read: Vec<i64> = Vec::new();
    let mut fetches = 0u64;
    let mut seen_purged_while_reading = false;
    while read.len() < PRODUCERS * PER_PRODUCER {
        // What a real consumer checks on every fetch: has anything past my position gone?
        if let Some(w) = position::watermark(&consumer).await.unwrap() {
            assert!(
                w.position <= at,
                "the purger deleted past the consumer: watermark {} > position {at}",
                w.position
            );
            seen_purged_while_reading = true;
        }
        let batch = reader.fetch(&consumer, at, 40, None).await.unwrap();
        read.extend(batch.events.iter().map(|e| e.position.id));
        if let Some(end) = batch.end {
            at = end;
            position::publish(&consumer, "sink", at).await.unwrap();
        }
        fetches += 1;
        // Lag behind now and then, so the purger finds old events the consumer still needs.
        if batch.scanned == 0 || fetches % 5 == 0 {
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
    }
    let mut produced = Vec::new();
    for p in producers {
        produced.extend(p.await.unwrap());
    }
    produced.sort_unstable();
    let unique: BTreeSet<i64> = read.iter().copied().collect();
    assert_eq!(unique.len(), read.len(), "no event read twice");
    assert_eq!(
        unique.into_iter().collect::<Vec<_>>(),
        produced,
        "every event read"
    );
    assert!(
        seen_purged_while_reading,
        "the purger ran while the consumer read"
    );

    // Once the consumer has everything, the purger clears the table.
    eventually("the purger has deleted everything", || async {
        count(&db).await == 0
    })
    .await;
    let watermark = position::watermark(&consumer).await.unwrap().unwrap();
    assert!(watermark.position <= at && !watermark.forced);
    shutdown.cancel();
    let summary = purger.await.unwrap().unwrap();
    assert_eq!(summary.purged as usize, PRODUCERS * PER_PRODUCER);
    assert!(summary.passes > 1);
}

/// A database outage is a transient error: the purger keeps retrying and carries on afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_purger_rides_out_a_database_restart() {
    let mut db = Db::start().await;
    let first = db.append(5).await;
    db.backdate(&first, 10 * DAY).await;
    let shutdown = CancellationToken::new();
    let purger = tokio::spawn(purger::run(
        config(
            &db.purger_url(),
            &["--retention", "1d", "--interval", "50ms"],
        ),
        shutdown.clone(),
    ));
    eventually("the first events are purged", || async {
        count(&db).await == 0
    })
    .await;

    let mut pg = db.pg;
    let pg = tokio::task::spawn_blocking(move || {
        pg.stop();
        std::thread::sleep(Duration::from_millis(500));
        pg.restart();
        pg
    })
    .await
    .unwrap();
    db.pg = pg;
    db.admin = connect(&db.pg.url()).await;
    db.producer = connect(&db.pg.url_for("app_producer", None)).await;
    let second = db.append(7).await;
    db.backdate(&second, 10 * DAY).await;
    eventually("events are purged after the restart", || async {
        count(&db).await == 0
    })
    .await;
    assert!(
        !purger.is_finished(),
        "a transient error never stops the purger"
    );
    shutdown.cancel();
    let summary = purger.await.unwrap().unwrap();
    assert_eq!(summary.purged, 12);
}
