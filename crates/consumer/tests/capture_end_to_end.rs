//! Table-change capture end to end: an application role without any privilege on `events` writes a
//! captured table; the change watcher (not the writers) wakes the consumer; the consumer delivers
//! into MongoDB. The consumer's fallback poll is set to an hour, so every event must arrive through
//! a watcher wake-up — including one whose transaction commits after a later one.

mod common;

use std::time::Duration;

use common::*;
use event_store::capture::{self, CaptureSpec};
use event_store::{db, Topic};
use mongodb::bson::{doc, Bson, Document};
use producer::{Channel, Notifier};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

const RECEIVED: &str = "receivedEvents";

/// (type, key, payload) of every delivered document, in `_id` order, read by an independent client.
async fn delivered(env: &Env) -> Vec<(String, Option<String>, Value)> {
    let coll = env.collection(RECEIVED).await;
    let mut cursor = coll.find(doc! {}).sort(doc! {"_id": 1}).await.unwrap();
    let mut out = Vec::new();
    while cursor.advance().await.unwrap() {
        let d: Document = cursor.deserialize_current().unwrap();
        let key = match d.get("key") {
            Some(Bson::String(k)) => Some(k.clone()),
            _ => None,
        };
        out.push((
            d.get_str("type").unwrap().to_string(),
            key,
            d.get("payload").unwrap().clone().into_relaxed_extjson(),
        ));
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn captured_changes_reach_mongodb_woken_by_the_watcher_alone() {
    let env = setup().await;
    env.admin
        .batch_execute(
            "CREATE ROLE shop_owner LOGIN IN ROLE events_capture_admin;
             CREATE ROLE shop_app LOGIN;
             CREATE SCHEMA shop AUTHORIZATION shop_owner;",
        )
        .await
        .unwrap();
    let owner = connect(&env.pg.url_for("shop_owner", None)).await;
    owner
        .batch_execute(
            "CREATE TABLE shop.orders (id int PRIMARY KEY, status text, total numeric, card text);
             GRANT USAGE ON SCHEMA shop TO shop_app;
             GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON shop.orders TO shop_app;",
        )
        .await
        .unwrap();
    capture::add(
        &owner,
        &CaptureSpec::new("shop.orders", Topic::new("orders").unwrap())
            .exclude_columns(["card"])
            .unwrap(),
    )
    .await
    .unwrap();

    // The watcher runs with the consumer's credentials (it only reads events).
    let watch_db = db::config(&env.consumer_url(), "capture-watcher").unwrap();
    let (notifier, notifier_task) = Notifier::spawn(
        watch_db.clone(),
        Channel::default(),
        Duration::from_millis(1),
    );
    let stop_watcher = CancellationToken::new();
    let watcher = tokio::spawn(producer::watcher::run(
        watch_db,
        notifier,
        Duration::from_millis(2),
        stop_watcher.clone(),
    ));
    let mut config = env.config("capture");
    config.poll_interval = Duration::from_secs(3600);
    let consumer = spawn(config);

    let app_url = env.pg.url_for("shop_app", None);
    let app = connect(&app_url).await;
    // One statement per call: a BEGIN inside a multi-statement query would take the statements
    // before it into its transaction (and the ROLLBACK with them).
    for statement in [
        "INSERT INTO shop.orders VALUES (1, 'new', 10, '4111'), (2, 'new', 20, '4222'), (3, 'new', 30, NULL)",
        "UPDATE shop.orders SET status = 'paid' WHERE id = 1",
        "UPDATE shop.orders SET card = '0000'",
        "UPDATE shop.orders SET id = 22 WHERE id = 2",
        "BEGIN; DELETE FROM shop.orders; ROLLBACK",
        "DELETE FROM shop.orders WHERE id = 3",
    ] {
        app.batch_execute(statement)
            .await
            .expect("the application needs no privilege on events");
    }
    wait_delivered(&env, RECEIVED, "", Duration::from_secs(60)).await;

    // Out-of-order commits: `early` writes first (lower event id) and commits last, after `late`
    // has committed and been delivered. Only the watcher can wake the consumer for it.
    let mut early = connect(&app_url).await;
    let early_tx = early.transaction().await.unwrap();
    early_tx
        .batch_execute("INSERT INTO shop.orders VALUES (100, 'early', 1, NULL)")
        .await
        .unwrap();
    app.batch_execute("INSERT INTO shop.orders VALUES (101, 'late', 2, NULL)")
        .await
        .unwrap();
    // `late` stays behind the visibility horizon while `early` is open; give the pipeline time to
    // (wrongly) deliver it before `early` commits.
    tokio::time::sleep(Duration::from_millis(300)).await;
    early_tx.commit().await.unwrap();
    app.batch_execute("TRUNCATE shop.orders").await.unwrap();
    wait_delivered(&env, RECEIVED, "", Duration::from_secs(60)).await;

    let got = delivered(&env).await;
    let summary: Vec<(String, Option<String>)> =
        got.iter().map(|(t, k, _)| (t.clone(), k.clone())).collect();
    let s = |t: &str, k: Option<&str>| (t.to_string(), k.map(str::to_string));
    assert_eq!(
        summary,
        vec![
            s("insert", Some(r#"{"id":1}"#)),
            s("insert", Some(r#"{"id":2}"#)),
            s("insert", Some(r#"{"id":3}"#)),
            s("update", Some(r#"{"id":1}"#)),
            s("delete", Some(r#"{"id":2}"#)),
            s("insert", Some(r#"{"id":22}"#)),
            s("delete", Some(r#"{"id":3}"#)),
            s("insert", Some(r#"{"id":100}"#)),
            s("insert", Some(r#"{"id":101}"#)),
            s("truncate", None),
        ],
        "every change exactly once: no no-op update, nothing rolled back, nothing skipped"
    );
    assert_eq!(
        got[3].2,
        json!({"op": "update", "schema": "shop", "table": "orders", "key": {"id": 1},
               "new": {"id": 1, "status": "paid", "total": 10},
               "changed": {"status": {"old": "new", "new": "paid"}}})
    );
    assert!(
        !serde_json::to_string(&got).unwrap().contains("card"),
        "the excluded column never reaches MongoDB"
    );

    consumer.stop().await;
    stop_watcher.cancel();
    watcher.await.unwrap();
    notifier_task.finished().await;
}
