//! Causal order end to end into MongoDB: per key, the documents sorted by their `position` replay
//! the changes in the order they became visible — outbox events and captured row changes alike —
//! through consumer kills and restarts, with transactions that write an unrelated row first.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use mongodb::bson::{doc, Document};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

const RECEIVED: &str = "receivedEvents";

/// Hot rows of the captured table `hot`.
const HOT_ROWS: i32 = 5;

async fn create_tables(env: &Env) {
    env.admin
        .batch_execute(&format!(
            "CREATE TABLE audit (n int);
             CREATE TABLE hot (id int PRIMARY KEY, v text NOT NULL);
             INSERT INTO hot SELECT g, '' FROM generate_series(1, {HOT_ROWS}) AS g;
             SELECT capture_add('hot', 'hot');"
        ))
        .await
        .unwrap();
}

/// Every stored document as (topic, key, payload), sorted by `position` (delivery order), read by
/// an independent client; also checks each `_id` is stored once and matches its position.
async fn by_position(env: &Env) -> Vec<(String, String, Value)> {
    let coll = env.collection(RECEIVED).await;
    let mut cursor = coll
        .find(doc! {})
        .sort(doc! {"position.tx_id": 1, "position.id": 1})
        .await
        .unwrap();
    let mut out = Vec::new();
    while cursor.advance().await.unwrap() {
        let d: Document = cursor.deserialize_current().unwrap();
        let position = d.get_document("position").unwrap();
        assert_eq!(position.get_i64("id").unwrap(), d.get_i64("_id").unwrap());
        out.push((
            d.get_str("topic").unwrap().to_string(),
            d.get_str("key").unwrap_or_default().to_string(),
            d.get("payload").unwrap().clone().into_relaxed_extjson(),
        ));
    }
    out
}

/// The table's `v` per hot row id.
fn table(env: &Env) -> HashMap<i32, String> {
    env.pg
        .psql("SELECT id || '=' || v FROM hot")
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (id, v) = l.split_once('=').unwrap();
            (id.parse().unwrap(), v.to_string())
        })
        .collect()
}

/// Replays the stream per key and checks it against the table: every outbox event's `v` extends
/// the previous one by exactly one element, every captured update starts where the previous
/// ended, and the last of each equals the table.
fn assert_replay_reproduces_the_table(env: &Env, events: &[(String, String, Value)]) {
    let mut outbox: HashMap<i32, String> = HashMap::new();
    let mut captured: HashMap<i32, String> = HashMap::new();
    for (topic, key, payload) in events {
        match topic.as_str() {
            "o" => {
                let id: i32 = key.parse().unwrap();
                let v = payload["v"].as_str().unwrap().to_string();
                let before = outbox.entry(id).or_default();
                let rest = v
                    .strip_prefix(before.as_str())
                    .and_then(|r| r.strip_prefix(','));
                assert!(
                    rest.is_some_and(|r| !r.contains(',')),
                    "outbox key {id}: {v:?} does not follow {before:?}"
                );
                *before = v;
            }
            "hot" => {
                assert_eq!(payload["op"], "update");
                let id = payload["key"]["id"].as_i64().unwrap() as i32;
                let change = &payload["changed"]["v"];
                let before = captured.entry(id).or_default();
                assert_eq!(
                    change["old"].as_str().unwrap(),
                    before.as_str(),
                    "captured row {id}: the change's old value is the previous new value"
                );
                *before = change["new"].as_str().unwrap().to_string();
            }
            other => panic!("unexpected topic {other}"),
        }
    }
    let table = table(env);
    for id in 1..=HOT_ROWS {
        let want = &table[&id];
        if want.is_empty() {
            continue;
        }
        assert_eq!(outbox.get(&id), Some(want), "outbox replay of row {id}");
        assert_eq!(captured.get(&id), Some(want), "capture replay of row {id}");
    }
}

/// 8 writers, 500 transactions: each writes an unrelated row first (taking its transaction id),
/// sleeps a random time, then appends to one of 5 hot rows of a captured table and an outbox event
/// with the row's new value. Meanwhile the consumer binary is SIGKILLed at random points. In the
/// end MongoDB holds every event once, and replaying it per key in position order reproduces the
/// table exactly, from the outbox events and from the captured changes.
#[tokio::test(flavor = "multi_thread")]
async fn per_key_replay_reproduces_the_table_through_kills() {
    let env = setup().await;
    create_tables(&env).await;
    const WRITERS: usize = 8;
    const TRANSACTIONS: usize = 500;
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let url = env.pg.url();
        let mine = TRANSACTIONS / WRITERS + usize::from(w < TRANSACTIONS % WRITERS);
        writers.push(tokio::spawn(async move {
            let client = connect(&url).await;
            for j in 0..mine {
                let row = rand::random_range(1..=HOT_ROWS);
                let n = w * 1000 + j;
                client
                    .batch_execute(&format!("BEGIN; INSERT INTO audit VALUES ({w})"))
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(rand::random_range(0..50))).await;
                client
                    .batch_execute(&format!(
                        "UPDATE hot SET v = v || ',' || '{n}' WHERE id = {row};
                         INSERT INTO events (topic, key, payload)
                           SELECT 'o', id::text, jsonb_build_object('v', v) FROM hot WHERE id = {row};
                         SELECT pg_notify('events', '');
                         COMMIT"
                    ))
                    .await
                    .unwrap();
            }
        }));
    }
    let mut kills = 0;
    while !writers.iter().all(|w| w.is_finished()) {
        let mut child = spawn_binary(&env, "causal", "auto");
        tokio::time::sleep(Duration::from_millis(rand::random_range(200..700))).await;
        kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
        child.wait().unwrap();
        kills += 1;
    }
    for w in writers {
        w.await.unwrap();
    }
    assert!(kills > 0);
    let mut child = spawn_binary(&env, "causal", "auto");
    wait_delivered(&env, RECEIVED, "", Duration::from_secs(120)).await;
    wait_checkpoint_at_end(&env, "causal", Duration::from_secs(30)).await;
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    assert!(child.wait().unwrap().success());

    let events = by_position(&env).await;
    assert_eq!(
        events.iter().filter(|(t, _, _)| t == "o").count(),
        TRANSACTIONS,
        "one outbox event per transaction"
    );
    assert_eq!(
        env.mongo_ids(RECEIVED).await,
        env.pg_ids(""),
        "each event once"
    );
    assert_replay_reproduces_the_table(&env, &events);
}

/// The interleaving end to end (A writes first, B appends and updates the row and
/// commits, A appends and updates the row it now sees), then a transaction held open across a
/// consumer restart: delivered once each, per key in the order the changes became visible.
#[tokio::test(flavor = "multi_thread")]
async fn interleaved_writers_and_a_transaction_open_across_a_restart() {
    let env = setup().await;
    create_tables(&env).await;
    let a = connect(&env.pg.url()).await;
    let b = connect(&env.pg.url()).await;
    let append = |row: i32, n: i32| {
        format!(
            "UPDATE hot SET v = v || ',' || '{n}' WHERE id = {row};
             INSERT INTO events (topic, key, payload)
               SELECT 'o', id::text, jsonb_build_object('v', v, 'seq', {n}) FROM hot WHERE id = {row};
             SELECT pg_notify('events', '')"
        )
    };
    let consumer = spawn(env.config("interleaved"));
    for round in 0..3 {
        a.batch_execute("BEGIN; INSERT INTO audit VALUES (1)")
            .await
            .unwrap();
        b.batch_execute(&format!("BEGIN; {}; COMMIT", append(1, 2 * round + 1)))
            .await
            .unwrap();
        a.batch_execute(&format!("{}; COMMIT", append(1, 2 * round + 2)))
            .await
            .unwrap();
    }
    wait_delivered(&env, RECEIVED, "", Duration::from_secs(30)).await;

    // A transaction open across a consumer restart: it changes row 2, B then changes row 1 and
    // commits, the consumer restarts, A changes row 2 again (having seen B) and commits.
    a.batch_execute(&format!(
        "BEGIN; INSERT INTO audit VALUES (2); {}",
        append(2, 7)
    ))
    .await
    .unwrap();
    b.batch_execute(&format!("BEGIN; {}; COMMIT", append(1, 8)))
        .await
        .unwrap();
    consumer.stop().await;
    let consumer = spawn(env.config("interleaved"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.batch_execute(&format!("{}; COMMIT", append(2, 9)))
        .await
        .unwrap();
    wait_delivered(&env, RECEIVED, "", Duration::from_secs(30)).await;
    wait_checkpoint_at_end(&env, "interleaved", Duration::from_secs(30)).await;
    consumer.stop().await;

    let events = by_position(&env).await;
    let seqs: Vec<i64> = events
        .iter()
        .filter(|(t, _, _)| t == "o")
        .map(|(_, _, p)| p["seq"].as_i64().unwrap())
        .collect();
    // 7 was written before 8 committed (A could not see it), 9 after.
    assert_eq!(seqs, [1, 2, 3, 4, 5, 6, 7, 8, 9]);
    assert_eq!(
        env.mongo_ids(RECEIVED).await,
        env.pg_ids(""),
        "each event once"
    );
    assert_replay_reproduces_the_table(&env, &events);
}

/// The upgrade to the causal key (what migration V8 does to the table: one `ALTER … SET DEFAULT`,
/// no rewrite) under a running consumer, with writers appending throughout and a transaction
/// that wrote under the old key and commits only once the upgrade waits for it: every event is
/// delivered once, none skipped.
#[tokio::test(flavor = "multi_thread")]
async fn a_consumer_running_across_the_upgrade_loses_and_duplicates_nothing() {
    let env = setup().await;
    create_tables(&env).await;
    // The default before V8.
    env.admin
        .batch_execute("ALTER TABLE events ALTER COLUMN tx_id SET DEFAULT pg_current_xact_id()")
        .await
        .unwrap();
    let consumer = spawn(env.config("upgraded"));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4 {
        let (url, stop) = (env.pg.url(), stop.clone());
        writers.push(tokio::spawn(async move {
            let client = connect(&url).await;
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                client
                    .batch_execute(&format!("BEGIN; INSERT INTO audit VALUES ({w})"))
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(rand::random_range(0..20))).await;
                client
                    .batch_execute(&format!(
                        "INSERT INTO events (topic, key, payload)
                           SELECT 'o', '{w}', jsonb_build_object('v', '{n}')
                             FROM generate_series(1, {}) AS g;
                         SELECT pg_notify('events', '');
                         COMMIT",
                        rand::random_range(1..4)
                    ))
                    .await
                    .unwrap();
                n += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    let open = connect(&env.pg.url()).await;
    open.batch_execute(
        "BEGIN; INSERT INTO events (topic, key, payload) VALUES ('o', 'open', '{\"v\": \"old key\"}')",
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let upgrade = {
        let url = env.pg.url();
        tokio::spawn(async move {
            connect(&url)
                .await
                .batch_execute(
                    "ALTER TABLE events ALTER COLUMN tx_id SET DEFAULT events_sort_key()",
                )
                .await
                .unwrap();
        })
    };
    // The ALTER waits for the open writer; commit it, then let the writers run on the new key.
    tokio::time::sleep(Duration::from_millis(300)).await;
    open.batch_execute("COMMIT").await.unwrap();
    upgrade.await.unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    wait_delivered(&env, RECEIVED, "", Duration::from_secs(60)).await;
    wait_checkpoint_at_end(&env, "upgraded", Duration::from_secs(30)).await;
    consumer.stop().await;
    assert_eq!(
        env.mongo_ids(RECEIVED).await,
        env.pg_ids(""),
        "each event once"
    );
    assert!(
        env.pg
            .psql("SELECT pg_get_expr(adbin, adrelid) FROM pg_attrdef WHERE adrelid = 'events'::regclass AND adnum = 2")
            .contains("events_sort_key"),
        "the upgrade took effect"
    );
}
