//! No row stops the stream: the poison matrix. Each bad row is inserted by plain SQL between
//! good events; the consumer stays up, every good event arrives exactly once, and each bad one is
//! either delivered exactly (where BSON can hold it) or recorded in `deadLetters` with its reason.

mod common;

use std::time::Duration;

use common::{setup, spawn, wait_until, Env};
use consumer::OnPoison;
use mongodb::bson::{doc, Bson, Document};

/// Appends one event with `payload` (SQL text, e.g. `'{"a":1}'::jsonb`) between two good ones;
/// returns the bad event's id.
async fn between_good(env: &Env, payload_sql: &str) -> i64 {
    env.admin
        .batch_execute("INSERT INTO events (topic, payload) VALUES ('good', '{\"ok\": 1}')")
        .await
        .unwrap();
    let row = env
        .admin
        .query_one(
            &format!(
                "INSERT INTO events (topic, payload) VALUES ('bad', {payload_sql}) RETURNING id"
            ),
            &[],
        )
        .await
        .unwrap();
    env.admin
        .batch_execute("INSERT INTO events (topic, payload) VALUES ('good', '{\"ok\": 2}')")
        .await
        .unwrap();
    row.get(0)
}

/// The stored document of event `id`, read by an independent client.
async fn stored(env: &Env, id: i64) -> Option<Document> {
    env.collection("receivedEvents")
        .await
        .find_one(doc! {"_id": id})
        .await
        .unwrap()
}

async fn dead_letter(env: &Env, id: i64) -> Option<Document> {
    env.collection("deadLetters")
        .await
        .find_one(doc! {"_id": id})
        .await
        .unwrap()
}

/// Makes the server refuse documents whose payload has a `forbidden` field (a validator: the
/// document is fine as BSON, only this server says no), then appends `before` good events, one
/// forbidden one and `after` good ones; returns the forbidden event's id.
async fn around_a_refused_event(env: &Env, before: i64, after: i64) -> i64 {
    env.mongo_client()
        .await
        .database(&env.database)
        .create_collection("receivedEvents")
        .validator(doc! {"payload.forbidden": {"$exists": false}})
        .await
        .unwrap();
    env.admin
        .batch_execute(&format!(
            "INSERT INTO events (topic, payload)
             SELECT 'good', jsonb_build_object('n', g) FROM generate_series(1, {before}) g;
             INSERT INTO events (topic, payload) VALUES ('bad', '{{\"forbidden\": true}}');
             INSERT INTO events (topic, payload)
             SELECT 'good', jsonb_build_object('n', g) FROM generate_series(1, {after}) g;"
        ))
        .await
        .unwrap();
    env.pg_ids("WHERE topic = 'bad'")[0]
}

/// Runs `config` until the consumer stops by itself; its error, as text.
async fn stopped_with(config: consumer::Config) -> String {
    let running = spawn(config);
    let result = tokio::time::timeout(Duration::from_secs(60), running.handle)
        .await
        .expect("the consumer stops by itself")
        .unwrap();
    result
        .expect_err("--on-poison stop ends with an error")
        .to_string()
}

fn nested(open: &str, close: &str, depth: usize) -> String {
    format!("'{}1{}'::jsonb", open.repeat(depth), close.repeat(depth))
}

#[tokio::test(flavor = "multi_thread")]
async fn no_row_stops_the_stream() {
    let env = setup().await;
    let big = between_good(
        &env,
        "'{\"a\": 1e400, \"b\": -1e400, \"c\": 1e-400}'::jsonb",
    )
    .await;
    let forty = between_good(
        &env,
        "'{\"n\": 1234567890123456789012345678901234567891}'::jsonb",
    )
    .await;
    let tenth = between_good(
        &env,
        "'{\"x\": 0.1, \"y\": 1.5, \"z\": 12345678901234567890}'::jsonb",
    )
    .await;
    let arrays = between_good(&env, &nested("[", "]", 200)).await;
    let objects = between_good(&env, &nested("{\"a\": ", "}", 200)).await;
    let names = between_good(&env, "'{\"$where\": \"1\", \"a.b\": 2, \"\": 0}'::jsonb").await;
    // 17 MiB: over MongoDB's document limit.
    let huge = between_good(
        &env,
        "jsonb_build_object('blob', repeat('x', 17 * 1024 * 1024))",
    )
    .await;
    // A 17 MiB key: the event is too large, and its dead letter must still fit.
    let huge_key: i64 = env
        .admin
        .query_one(
            "INSERT INTO events (topic, key, payload)
             VALUES ('bad', repeat('k', 17 * 1024 * 1024), '{}') RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    env.admin
        .batch_execute("INSERT INTO events (topic, payload) VALUES ('good', '{\"ok\": 3}')")
        .await
        .unwrap();
    let good_ids = env.pg_ids("WHERE topic = 'good'");
    assert_eq!(good_ids.len(), 15);

    let mut config = env.config("c");
    config.batch_max_bytes = 1 << 20; // the 17 MiB row goes alone
    let running = spawn(config);
    common::wait_checkpoint_at_end(&env, "c", Duration::from_secs(120)).await;

    // Every good event exactly once.
    let ids = env.mongo_ids("receivedEvents").await;
    for id in &good_ids {
        assert_eq!(
            ids.iter().filter(|i| *i == id).count(),
            1,
            "good event {id}"
        );
    }

    // Delivered exactly: numbers beyond doubles as Decimal128, strange names as they are.
    let doc = stored(&env, big).await.expect("1e400 is delivered");
    let payload = doc.get_document("payload").unwrap();
    assert_eq!(
        payload.get("a"),
        Some(&Bson::Decimal128("1E+400".parse().unwrap()))
    );
    assert_eq!(
        payload.get("b"),
        Some(&Bson::Decimal128("-1E+400".parse().unwrap()))
    );
    assert_eq!(
        payload.get("c"),
        Some(&Bson::Decimal128("1E-400".parse().unwrap()))
    );
    let doc = stored(&env, tenth).await.expect("0.1 is delivered");
    let payload = doc.get_document("payload").unwrap();
    assert_eq!(
        payload.get("x"),
        Some(&Bson::Decimal128("0.1".parse().unwrap()))
    );
    assert_eq!(payload.get("y"), Some(&Bson::Double(1.5)));
    assert_eq!(
        payload.get("z"),
        Some(&Bson::Decimal128("12345678901234567890".parse().unwrap()))
    );
    let doc = stored(&env, names)
        .await
        .expect("odd field names are stored as they are");
    let payload = doc.get_document("payload").unwrap();
    assert_eq!(payload.get_str("$where"), Ok("1"));
    assert_eq!(payload.get_i32("a.b"), Ok(2));
    assert_eq!(payload.get_i32(""), Ok(0));

    // Set aside, with the reason, the payload's length and hash.
    for (id, reason) in [
        (forty, "number_out_of_range"),
        (arrays, "too_deep"),
        (objects, "too_deep"),
        (huge, "too_large"),
    ] {
        assert!(
            stored(&env, id).await.is_none(),
            "event {id} is not in receivedEvents"
        );
        let letter = dead_letter(&env, id)
            .await
            .unwrap_or_else(|| panic!("dead letter {id}"));
        assert_eq!(letter.get_str("reason"), Ok(reason), "{letter}");
        assert_eq!(letter.get_str("topic"), Ok("bad"));
        assert!(letter
            .get_str("position")
            .unwrap()
            .ends_with(&format!("/{id}")));
        assert_eq!(letter.get_str("payload_sha256").unwrap().len(), 64);
        assert!(letter.get_datetime("first_seen_at").is_ok());
    }
    let letter = dead_letter(&env, huge).await.unwrap();
    assert!(letter.get_i64("payload_bytes").unwrap() > 17 * 1024 * 1024);
    assert_eq!(letter.get_bool("payload_truncated"), Ok(true));
    assert!(letter.get_str("payload_text").unwrap().len() <= 64 * 1024);
    let letter = dead_letter(&env, huge_key)
        .await
        .expect("the huge key's dead letter");
    assert_eq!(letter.get_str("reason"), Ok("too_large"));
    assert_eq!(letter.get_str("key").unwrap().len(), 4096);
    assert_eq!(env.mongo_count("deadLetters").await, 5);

    // The stream goes on after them.
    common::produce(&env.admin, "good", 3).await;
    wait_until("later events arrive", Duration::from_secs(30), || async {
        env.mongo_count("receivedEvents").await == (good_ids.len() + 3 + 3) as u64
    })
    .await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn on_poison_stop_halts_naming_the_event() {
    let env = setup().await;
    let bad = between_good(
        &env,
        "'{\"n\": 1234567890123456789012345678901234567891}'::jsonb",
    )
    .await;
    let mut config = env.config("c");
    config.on_poison = OnPoison::Stop;
    let error = stopped_with(config).await;
    assert!(error.contains(&format!("id {bad}")), "{error}");
    assert!(error.contains("number_out_of_range"), "{error}");
    assert!(error.contains("--on-poison dead-letter"), "{error}");
    // The good event before it was delivered; nothing after it, and no dead letter.
    assert_eq!(env.mongo_count("receivedEvents").await, 1);
    assert_eq!(env.mongo_count("deadLetters").await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_the_server_refuses_is_split_around_the_bad_event() {
    let env = setup().await;
    let bad = around_a_refused_event(&env, 40, 40).await;
    let running = spawn(env.config("c"));
    common::wait_checkpoint_at_end(&env, "c", Duration::from_secs(60)).await;
    assert_eq!(
        env.mongo_ids("receivedEvents").await,
        env.pg_ids("WHERE topic = 'good'")
    );
    let letter = dead_letter(&env, bad)
        .await
        .expect("the refused event is a dead letter");
    assert_eq!(letter.get_str("reason"), Ok("rejected_by_server"));
    assert!(letter
        .get_str("payload_text")
        .unwrap()
        .contains("forbidden"));
    assert!(
        letter.get_str("detail").unwrap().contains("121"),
        "{letter}"
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn large_payloads_go_in_byte_bounded_batches() {
    let env = setup().await;
    // Eight 5 MiB payloads: 40 MiB, more than MongoDB takes in one request.
    env.admin
        .batch_execute(
            "INSERT INTO events (topic, payload)
             SELECT 'big', jsonb_build_object('n', g, 'blob', repeat(md5(g::text), 5 * 1024 * 1024 / 32))
               FROM generate_series(1, 8) g",
        )
        .await
        .unwrap();
    let mut config = env.config("c");
    config.batch_max_bytes = 6 << 20;
    let running = spawn(config);
    common::wait_delivered(&env, "receivedEvents", "", Duration::from_secs(120)).await;
    assert_eq!(env.mongo_count("deadLetters").await, 0);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn on_poison_stop_also_stops_at_an_event_the_server_refuses() {
    let env = setup().await;
    around_a_refused_event(&env, 10, 10).await;
    let mut config = env.config("c");
    config.on_poison = OnPoison::Stop;
    let error = stopped_with(config).await;
    assert!(error.contains("rejected_by_server"), "{error}");
    assert_eq!(
        env.mongo_count("receivedEvents").await,
        10,
        "the events before it"
    );
    assert_eq!(env.mongo_count("deadLetters").await, 0);
}
