//! Mirrors end to end: a captured table with rows from before capture, a backfill running while
//! eight writers insert, update (keys too), delete, truncate and roll back, and the consumer
//! binary killed mid-way; afterwards the MongoDB mirror equals the table exactly and the change
//! log is causal per key.

mod common;

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use event_store::backfill::{self, BackfillSpec};
use mongo_format::event::json_text_to_bson;
use mongodb::bson::{doc, Bson, Document};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

const MIRROR: &str = "itemsMirror";

fn spawn_mirroring(env: &Env, transactions: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_consumer"))
        .env("DATABASE_URL", env.consumer_url())
        .env("MONGODB_URI", env.mongo.uri())
        .env("MONGODB_DATABASE", &env.database)
        .env("MONGODB_TRANSACTIONS", transactions)
        .env("CONSUMER_NAME", "mirror")
        .env("CONSUMER_BATCH_SIZE", "50")
        .env("CONSUMER_POLL_INTERVAL", "50ms")
        .env("CONSUMER_MIRROR", format!("items={MIRROR},other"))
        .env(
            "LOG_LEVEL",
            std::env::var("TEST_CONSUMER_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the consumer binary")
}

/// The table as the mirror should hold it: `_id` = id, every captured column, values converted
/// as the change log converts them.
async fn table_documents(env: &Env) -> BTreeMap<String, Document> {
    let rows = env
        .admin
        .query(
            "SELECT id::text, (to_jsonb(t) - 'secret')::text FROM shop.items t",
            &[],
        )
        .await
        .unwrap();
    rows.iter()
        .map(|r| {
            let id: String = r.get(0);
            let Bson::Document(mut row) = json_text_to_bson(r.get::<_, &str>(1), 1).unwrap() else {
                panic!("a row is an object")
            };
            let mut d = doc! {"_id": row.get("id").cloned().unwrap()};
            d.extend(std::mem::take(&mut row));
            (id, sorted(d))
        })
        .collect()
}

fn sorted(d: Document) -> Document {
    let map: BTreeMap<String, Bson> = d.into_iter().collect();
    map.into_iter().collect()
}

async fn mirror_documents(env: &Env) -> BTreeMap<String, Document> {
    let coll = env.collection(MIRROR).await;
    let mut cursor = coll.find(doc! {}).await.unwrap();
    let mut out = BTreeMap::new();
    while cursor.advance().await.unwrap() {
        let d: Document = cursor.deserialize_current().unwrap();
        let id = match d.get("_id") {
            Some(Bson::Int32(i)) => i.to_string(),
            other => panic!("_id should be the key's value, is {other:?}"),
        };
        out.insert(id, sorted(d));
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn the_mirror_equals_the_table_after_a_backfill_under_load_and_a_kill() {
    let env = setup().await;
    env.admin
        .batch_execute(
            "CREATE ROLE shop_owner LOGIN IN ROLE events_capture_admin;
             CREATE SCHEMA shop AUTHORIZATION shop_owner;",
        )
        .await
        .unwrap();
    let owner_url = env.pg.url_for("shop_owner", None);
    let owner = connect(&owner_url).await;
    // Rows from before capture; exact numbers no double holds; an excluded column.
    owner
        .batch_execute(
            "CREATE TABLE shop.items (id int PRIMARY KEY, v int NOT NULL, big numeric, note text,
                                      doc jsonb, secret text);
             CREATE TABLE shop.side (n int);
             INSERT INTO shop.items
             SELECT i, 0, (i::text || '.000000000000000000001')::numeric, 'n' || i,
                    jsonb_build_object('i', i, 'l', jsonb_build_array(1.5, 'x')), 'pin'
               FROM generate_series(1, 4000) i;
             SELECT capture_add('shop.items', 'items', exclude_columns => ARRAY['secret']);",
        )
        .await
        .unwrap();

    let mut consumer = spawn_mirroring(&env, "auto");

    let stop = CancellationToken::new();
    let truncated = Arc::new(AtomicBool::new(true));
    let mut writers = Vec::new();
    for w in 0..8u64 {
        let (url, stop, truncated) = (owner_url.clone(), stop.clone(), truncated.clone());
        writers.push(tokio::spawn(async move {
            let client = connect(&url).await;
            let mut seed = w * 104_729 + 17;
            let mut next = move || {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (seed >> 33) as i64
            };
            let mut n = 0;
            while !stop.is_cancelled() {
                n += 1;
                let id = next() % 4400 + 1;
                let sql = match next() % 20 {
                    // The transaction writes an unrelated row first, then the captured one.
                    0..=7 => format!(
                        "BEGIN; INSERT INTO shop.side VALUES (1);
                         UPDATE shop.items SET v = v + 1, big = big + 1, doc = doc || '{{\"w\": {w}}}' WHERE id = {id};
                         SELECT pg_sleep(0.001); COMMIT"
                    ),
                    8..=9 => format!(
                        "BEGIN; INSERT INTO shop.side VALUES (1);
                         UPDATE shop.items SET id = id + 5000 WHERE id = {id}; COMMIT"
                    ),
                    10..=11 => format!("DELETE FROM shop.items WHERE id = {id}"),
                    12..=14 => format!(
                        "INSERT INTO shop.items VALUES ({id}, {n}, 12345678901234567890123456789.5, NULL, NULL, 's')
                         ON CONFLICT (id) DO UPDATE SET note = 'again', v = shop.items.v + 1"
                    ),
                    15..=16 => format!("BEGIN; UPDATE shop.items SET v = -1 WHERE id = {id}; DELETE FROM shop.items WHERE id = {id} + 1; ROLLBACK"),
                    17 => "BEGIN; TRUNCATE shop.items; ROLLBACK".to_string(),
                    // Once, when the backfill is half-way (it flips `truncated` to false then).
                    18 if w == 0 && !truncated.swap(true, Ordering::SeqCst) => {
                        "TRUNCATE shop.items".to_string()
                    }
                    _ => format!("UPDATE shop.items SET note = note || '+' WHERE id BETWEEN {id} AND {id} + 30"),
                };
                // Deadlocks and conflicts between writers are theirs; the next statement goes on.
                if client.batch_execute(&sql).await.is_err() {
                    let _ = client.batch_execute("ROLLBACK").await;
                }
            }
        }));
    }

    // The backfill, chunk by chunk, while the writers run; the consumer is killed once.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut runner = connect(&owner_url).await;
    let id = backfill::start(
        &runner,
        &BackfillSpec::new("shop.items").chunk_rows(100).unwrap(),
    )
    .await
    .unwrap();
    let mut chunks = 0;
    loop {
        let chunk = backfill::chunk(&mut runner, id).await.unwrap();
        chunks += 1;
        if chunks == 25 {
            truncated.store(false, Ordering::SeqCst);
        }
        if chunks == 10 {
            consumer.kill().unwrap(); // SIGKILL, mid-batch most likely
            consumer.wait().unwrap();
            consumer = spawn_mirroring(&env, "auto");
        }
        if chunk.finished {
            break;
        }
    }
    assert!(chunks > 25, "the backfill ran {chunks} chunks");
    // Rows again after the truncate, in one bulk statement, while the writers go on.
    owner
        .batch_execute(
            "INSERT INTO shop.items SELECT i, 7, i * 0.5, 'bulk', NULL, 's' FROM generate_series(1, 4000) i
             ON CONFLICT (id) DO NOTHING",
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    for w in writers {
        w.await.unwrap();
    }
    assert!(
        truncated.load(Ordering::SeqCst),
        "the table was truncated once"
    );
    // One more row on the second mirrored topic's neighbour: events of other topics never reach
    // this mirror.
    env.admin
        .batch_execute(
            "INSERT INTO events (topic, key, type, payload) VALUES ('other', '{\"id\":1}', 'insert', '{\"new\": {\"id\": 1}}')",
        )
        .await
        .unwrap();

    wait_checkpoint_at_end(&env, "mirror", Duration::from_secs(120)).await;
    consumer.kill().unwrap();
    consumer.wait().unwrap();

    let table = table_documents(&env).await;
    let mirror = mirror_documents(&env).await;
    assert!(table.len() > 1000, "{} rows left", table.len());
    let differ: Vec<_> = table
        .iter()
        .filter(|(k, d)| mirror.get(*k) != Some(d))
        .map(|(k, d)| (k, d, mirror.get(k)))
        .take(3)
        .collect();
    let extra: Vec<_> = mirror
        .keys()
        .filter(|k| !table.contains_key(*k))
        .take(5)
        .collect();
    assert!(
        differ.is_empty() && extra.is_empty(),
        "mirror ≠ table: {} rows vs {} documents; differing e.g. {differ:?}; extra {extra:?}",
        table.len(),
        mirror.len()
    );
    // Exact numbers: a 30-digit numeric is a Decimal128 with every digit.
    let exact = mirror.values().find_map(|d| match d.get("big") {
        Some(Bson::Decimal128(n)) if n.to_string().contains("12345678901234567890123456789") => {
            Some(())
        }
        _ => None,
    });
    assert!(
        exact.is_some(),
        "some row carries the 30-digit number exactly"
    );
    assert!(mirror.values().all(|d| !d.contains_key("secret")));
    assert_eq!(env.mongo_count("other").await, 1);

    // The change log, in stream order, is causal per key: every read and every update starts
    // from the state the changes before it left.
    let log = env.collection("receivedEvents").await;
    let mut cursor = log
        .find(doc! {"topic": "items"})
        .sort(doc! {"position.tx_id": 1, "position.id": 1})
        .await
        .unwrap();
    let mut state: BTreeMap<String, Value> = BTreeMap::new();
    let (mut reads, mut checked) = (0, 0);
    while cursor.advance().await.unwrap() {
        let d: Document = cursor.deserialize_current().unwrap();
        let payload = d.get("payload").unwrap().clone().into_relaxed_extjson();
        let ty = d.get_str("type").unwrap();
        let key = d.get_str("key").map(str::to_string).unwrap_or_default();
        match ty {
            "truncate" => state.clear(),
            "read" => {
                reads += 1;
                if let Some(now) = state.get(&key) {
                    assert_eq!(&payload["new"], now, "a read of {key} went back in time");
                    checked += 1;
                }
                state.insert(key, payload["new"].clone());
            }
            "insert" => {
                state.insert(key, payload["new"].clone());
            }
            "update" => {
                if let Some(before) = state.get(&key) {
                    for (column, change) in payload["changed"].as_object().unwrap() {
                        assert_eq!(
                            &before[column], &change["old"],
                            "the update of {key} does not start from the previous state"
                        );
                    }
                }
                state.insert(key, payload["new"].clone());
            }
            "delete" => {
                state.remove(&key);
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert!(
        reads > 1000 && checked > 20,
        "{reads} reads, {checked} after a change"
    );
}
