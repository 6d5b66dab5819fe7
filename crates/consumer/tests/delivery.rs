//! Delivery against real servers: catch-up, live wake-ups, commit order, topic filters, named
//! consumers, re-delivery. Results are checked through psql and an independent MongoDB client.

mod common;

use std::time::Duration;

use common::*;
use mongodb::bson::{doc, Bson};

const RECEIVED: &str = "receivedEvents";

#[tokio::test(flavor = "multi_thread")]
async fn catches_up_after_being_stopped_while_10k_events_were_produced() {
    let env = setup().await;
    produce(&env.admin, "courses", 50).await;
    let consumer = spawn(env.config("catcher"));
    wait_delivered(&env, RECEIVED, "", Duration::from_secs(60)).await;
    consumer.stop().await;

    // Stopped: 10k events arrive in several transactions.
    for _ in 0..10 {
        produce(&env.admin, "courses", 1000).await;
    }
    assert_eq!(
        env.mongo_count(RECEIVED).await,
        50,
        "nothing delivered while stopped"
    );

    let consumer = spawn(env.config("catcher"));
    wait_delivered(&env, RECEIVED, "", Duration::from_secs(120)).await;
    // Live delivery after catching up, woken by NOTIFY.
    produce(&env.admin, "courses", 3).await;
    wait_delivered(&env, RECEIVED, "", Duration::from_secs(30)).await;

    // The checkpoint is the last position, and the purger can see it.
    let last = env.pg_last_position("");
    wait_until(
        "the checkpoint reaches the last event",
        Duration::from_secs(10),
        || async {
            env.checkpoint("catcher").await.map(|c| checkpoint_text(&c)) == Some(last.clone())
        },
    )
    .await;
    let checkpoint = env.checkpoint("catcher").await.unwrap();
    assert!(matches!(checkpoint.get("tx_id"), Some(Bson::Int64(_))));
    assert!(checkpoint.get_datetime("updated_at").is_ok());
    wait_until("the position is published to PostgreSQL", Duration::from_secs(10), || async {
        env.pg.psql("SELECT tx_id::text || '/' || id FROM consumer_positions WHERE consumer = 'catcher'")
            == last
    })
    .await;
    consumer.stop().await;

    // The document shape: payload and headers are BSON documents, dates are dates.
    let id: i64 = env.pg.psql("SELECT min(id) FROM events").parse().unwrap();
    let stored = env
        .collection(RECEIVED)
        .await
        .find_one(doc! {"_id": id})
        .await
        .unwrap()
        .expect("the first event is stored");
    let payload = stored
        .get_document("payload")
        .expect("payload is a document");
    assert_eq!(payload.get("n"), Some(&Bson::Int32(1)));
    assert_eq!(
        payload.get_document("nested").unwrap().get_bool("ok"),
        Ok(true)
    );
    assert_eq!(
        payload.get_array("list").unwrap(),
        &vec![Bson::Int32(1), Bson::String("two".into())]
    );
    assert_eq!(
        stored.get_document("headers").unwrap().get_str("trace"),
        Ok("abc")
    );
    assert_eq!(stored.get_str("topic"), Ok("courses"));
    assert_eq!(stored.get_str("key"), Ok("key-1"));
    assert_eq!(stored.get_str("type"), Ok("created"));
    let event_id = env
        .pg
        .psql(&format!("SELECT event_id FROM events WHERE id = {id}"));
    match stored.get("event_id") {
        Some(Bson::Binary(b)) => {
            assert_eq!(
                uuid::Uuid::from_slice(&b.bytes).unwrap().to_string(),
                event_id
            )
        }
        other => panic!("event_id should be a UUID, is {other:?}"),
    }
    let created_ms: i64 = env
        .pg
        .psql(&format!(
            "SELECT (extract(epoch FROM created_at) * 1000)::bigint FROM events WHERE id = {id}"
        ))
        .parse()
        .unwrap();
    let stored_ms = stored
        .get_datetime("created_at")
        .unwrap()
        .timestamp_millis();
    assert!(
        (stored_ms - created_ms).abs() <= 1,
        "{stored_ms} vs {created_ms}"
    );
    assert!(stored.get_datetime("received_at").is_ok());
    // The stream position, as Int64s, equal to the row's.
    let position = env.pg.psql(&format!(
        "SELECT tx_id || '/' || id FROM events WHERE id = {id}"
    ));
    let stored_position = stored
        .get_document("position")
        .expect("a position document");
    assert_eq!(
        format!(
            "{}/{}",
            stored_position.get_i64("tx_id").unwrap(),
            stored_position.get_i64("id").unwrap()
        ),
        position
    );
}

/// Many concurrent transactions insert, sleep a random time, and commit or roll back in random
/// order: every committed event arrives exactly once, no rolled-back one ever does.
#[tokio::test(flavor = "multi_thread")]
async fn out_of_order_commits_arrive_exactly_once() {
    let env = setup().await;
    let consumer = spawn(env.config("ordered"));
    let mut writers = Vec::new();
    for writer in 0..24u64 {
        let url = env.pg.url();
        writers.push(tokio::spawn(async move {
            let mut client = connect(&url).await;
            let mut committed = 0;
            for round in 0..6u64 {
                let tx = client.transaction().await.unwrap();
                let n = 1 + (writer + round) % 4;
                tx.execute(
                    "INSERT INTO events (topic, payload)
                     SELECT 'courses', jsonb_build_object('writer', $1::bigint, 'round', $2::bigint, 'i', g)
                       FROM generate_series(1, $3::bigint) g",
                    &[&(writer as i64), &(round as i64), &(n as i64)],
                )
                .await
                .unwrap();
                tx.execute("SELECT pg_notify('events', '')", &[]).await.unwrap();
                // Some transactions stay open long enough to hold the horizon across many fetches.
                let pause = rand::random_range(0..if round == 2 { 1500 } else { 250 });
                tokio::time::sleep(Duration::from_millis(pause)).await;
                if rand::random_bool(0.75) {
                    tx.commit().await.unwrap();
                    committed += n;
                } else {
                    tx.rollback().await.unwrap();
                }
            }
            committed
        }));
    }
    let mut committed = 0;
    for w in writers {
        committed += w.await.unwrap();
    }
    assert_eq!(env.pg_ids("").len() as u64, committed);
    wait_delivered(&env, RECEIVED, "", Duration::from_secs(60)).await;
    // The ids are not contiguous (rollbacks burn ids), and each one arrived once.
    let ids = env.mongo_ids(RECEIVED).await;
    assert_eq!(ids.len() as u64, committed);
    consumer.stop().await;
    let last = env.pg_last_position("");
    assert_eq!(
        checkpoint_text(&env.checkpoint("ordered").await.unwrap()),
        last
    );
}

/// A NOTIFY payload is a hint from anyone: whatever it holds, it only wakes the consumer.
#[tokio::test(flavor = "multi_thread")]
async fn garbage_notify_payloads_only_wake() {
    let env = setup().await;
    let mut config = env.config("woken");
    // No fallback poll to speak of: only a wake-up can deliver.
    config.poll_interval = Duration::from_secs(3600);
    let consumer = spawn(config);
    produce(&env.admin, "courses", 5).await;
    wait_delivered(&env, RECEIVED, "", Duration::from_secs(30)).await;

    let garbage = [
        String::new(),
        "{\"id\": -1, \"position\": \"18446744073709551615/-1\"}".into(),
        "not json at all \u{1}\u{7f} ünïcödé".into(),
        "x".repeat(7900),
        "DROP TABLE events;".into(),
    ];
    for payload in garbage {
        // Events committed without a wake-up of their own...
        env.admin
            .execute(
                "INSERT INTO events (topic, payload) VALUES ('courses', '{}')",
                &[],
            )
            .await
            .unwrap();
        // ...are delivered when any payload wakes the consumer.
        env.admin
            .execute("SELECT pg_notify('events', $1)", &[&payload])
            .await
            .unwrap();
        wait_delivered(&env, RECEIVED, "", Duration::from_secs(30)).await;
    }
    // Bursts are fine too.
    env.admin
        .batch_execute(
            "INSERT INTO events (topic, payload) VALUES ('courses', '{}');
             SELECT pg_notify('events', g::text) FROM generate_series(1, 500) g;",
        )
        .await
        .unwrap();
    wait_delivered(&env, RECEIVED, "", Duration::from_secs(30)).await;
    assert!(!consumer.handle.is_finished(), "still running");
    consumer.stop().await;
}

/// A topic filter delivers only its topics, and the position still advances over the others.
#[tokio::test(flavor = "multi_thread")]
async fn topic_filter_delivers_only_its_topics_and_still_advances() {
    let env = setup().await;
    let mut config = env.config("courses-only");
    config.topics = vec!["courses".into(), "grades".into()];
    config.batch_size = Some(50);
    let consumer = spawn(config);
    for round in 0..5 {
        produce(&env.admin, "courses", 30 + round).await;
        produce(&env.admin, "policies", 70).await;
        produce(&env.admin, "grades", 3).await;
    }
    // A long run of other topics at the end: the checkpoint must pass them all.
    produce(&env.admin, "policies", 400).await;
    let wanted = "WHERE topic IN ('courses', 'grades')";
    wait_delivered(&env, RECEIVED, wanted, Duration::from_secs(60)).await;
    let last = env.pg_last_position("");
    wait_until(
        "the checkpoint passes the skipped events",
        Duration::from_secs(30),
        || async {
            env.checkpoint("courses-only")
                .await
                .map(|c| checkpoint_text(&c))
                == Some(last.clone())
        },
    )
    .await;
    let policies = env
        .collection(RECEIVED)
        .await
        .count_documents(doc! {"topic": "policies"})
        .await
        .unwrap();
    assert_eq!(policies, 0);
    consumer.stop().await;
}

/// Two named consumers, one much slower (tiny batches, started later), each with its own
/// checkpoint and published position, both complete.
#[tokio::test(flavor = "multi_thread")]
async fn two_named_consumers_at_different_speeds() {
    let env = setup().await;
    let mut fast = env.config("fast");
    fast.mongodb_collection = "fastEvents".into();
    let mut slow = env.config("slow");
    slow.mongodb_collection = "slowEvents".into();
    slow.batch_size = Some(7);
    let fast = spawn(fast);
    produce(&env.admin, "courses", 600).await;
    wait_delivered(&env, "fastEvents", "", Duration::from_secs(60)).await;
    assert_eq!(env.mongo_count("slowEvents").await, 0);

    let slow = spawn(slow);
    produce(&env.admin, "policies", 400).await;
    wait_delivered(&env, "fastEvents", "", Duration::from_secs(60)).await;
    wait_delivered(&env, "slowEvents", "", Duration::from_secs(120)).await;
    fast.stop().await;
    slow.stop().await;

    let last = env.pg_last_position("");
    for name in ["fast", "slow"] {
        assert_eq!(
            checkpoint_text(&env.checkpoint(name).await.unwrap()),
            last,
            "{name}"
        );
    }
    assert_eq!(
        env.pg.psql("SELECT string_agg(consumer || '=' || tx_id::text || '/' || id, ' ' ORDER BY consumer) FROM consumer_positions"),
        format!("fast={last} slow={last}")
    );
}

/// Events already stored (a batch whose commit acknowledgement was lost) are recognised, not
/// duplicated; a document holding a *different* event under one of our ids stops the consumer
/// rather than being skipped or overwritten. Both write modes.
#[tokio::test(flavor = "multi_thread")]
async fn redelivery_is_recognised_and_foreign_documents_stop_the_consumer() {
    let env = setup().await;
    produce(&env.admin, "courses", 300).await;
    for mode in [consumer::Transactions::Auto, consumer::Transactions::Off] {
        let collection = format!("events{mode:?}");
        let events = env.collection(&collection).await;
        // Pretend an earlier run stored some events of the first and of a later batch.
        let rows = env
            .pg
            .psql("SELECT id || ' ' || event_id FROM events WHERE id % 40 = 3 ORDER BY id");
        for row in rows.lines() {
            let (id, event_id) = row.split_once(' ').unwrap();
            let uuid = uuid::Uuid::parse_str(event_id).unwrap();
            events
                .insert_one(doc! {"_id": id.parse::<i64>().unwrap(), "event_id": mongodb::bson::Binary {
                    subtype: mongodb::bson::spec::BinarySubtype::Uuid, bytes: uuid.as_bytes().to_vec() }})
                .await
                .unwrap();
        }
        let mut config = env.config(&format!("re-{mode:?}"));
        config.mongodb_collection = collection.clone();
        config.mongodb_transactions = mode;
        config.batch_size = Some(100);
        let consumer = spawn(config.clone());
        wait_delivered(&env, &collection, "", Duration::from_secs(60)).await;
        consumer.stop().await;
        // The pre-stored ones stay as they were; the rest are full documents.
        let full = events
            .count_documents(doc! {"topic": "courses"})
            .await
            .unwrap();
        assert_eq!(
            full as usize,
            env.pg_ids("").len() - rows.lines().count(),
            "{mode:?}"
        );

        // A foreign document under the next event's id.
        let next: i64 = env
            .pg
            .psql("SELECT nextval('events_id_seq')")
            .parse::<i64>()
            .unwrap()
            + 1;
        events
            .insert_one(doc! {"_id": next, "event_id": "someone else's"})
            .await
            .unwrap();
        produce(&env.admin, "courses", 1).await;
        let stopped = tokio::time::timeout(
            Duration::from_secs(60),
            consumer::run(config, Default::default()),
        )
        .await
        .expect("the consumer stops on a foreign document");
        let err = stopped
            .expect_err("a foreign document is an error")
            .to_string();
        assert!(
            err.contains(&format!("_id {next}")) && err.contains("another event store"),
            "{err}"
        );
        // Nothing was overwritten.
        let kept = events.find_one(doc! {"_id": next}).await.unwrap().unwrap();
        assert_eq!(kept.get_str("event_id"), Ok("someone else's"));
    }
}

/// An open writing transaction holds delivery of later commits back (they sit above the
/// visibility horizon); the consumer re-polls on its own, names the blocking backend in /healthz
/// once delivery counts as stuck, and delivers everything in order when it commits.
#[tokio::test(flavor = "multi_thread")]
async fn an_open_transaction_holds_delivery_back_and_is_named() {
    let env = setup().await;
    let addr = free_addr();
    let mut config = env.config("held");
    config.http.http_addr = Some(addr);
    config.stall_timeout = Duration::from_secs(2);
    let consumer = spawn(config);
    produce(&env.admin, "courses", 2).await;
    wait_delivered(&env, RECEIVED, "", Duration::from_secs(30)).await;

    let mut blocker = env.superuser().await;
    let pid: i32 = blocker
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let open = blocker.transaction().await.unwrap();
    open.execute(
        "INSERT INTO events (topic, payload) VALUES ('courses', '{\"early\": true}')",
        &[],
    )
    .await
    .unwrap();
    // Committed after the open transaction started: it must wait for it.
    produce(&env.admin, "courses", 1).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        env.mongo_count(RECEIVED).await,
        2,
        "nothing past an open transaction is delivered"
    );
    wait_until(
        "/healthz names the blocking backend",
        Duration::from_secs(30),
        || async {
            match http_get(addr, "/healthz").await {
                Some((503, body)) => body.contains(&format!("backend pid {pid}")),
                _ => false,
            }
        },
    )
    .await;
    let metrics = http_get(addr, "/metrics").await.unwrap().1;
    assert!(
        metrics.contains("consumer_held_back_seconds{consumer=\"held\"}"),
        "{metrics}"
    );

    // No NOTIFY on commit: the consumer's own re-polling finds it.
    open.commit().await.unwrap();
    wait_delivered(&env, RECEIVED, "", Duration::from_secs(30)).await;
    wait_until("/healthz recovers", Duration::from_secs(30), || async {
        http_get(addr, "/healthz").await.map(|r| r.0) == Some(200)
    })
    .await;
    consumer.stop().await;
}

/// Transaction ids crossing a power of ten (9999 → 10000): positions compare as xid8, never as
/// text, so batches come in position order and nothing is read twice or skipped.
#[tokio::test(flavor = "multi_thread")]
async fn positions_compare_as_numbers_across_a_digit_boundary() {
    let env = setup().await;
    loop {
        let row = env
            .admin
            .query_one("SELECT pg_current_xact_id()::text::bigint", &[])
            .await
            .unwrap();
        if row.get::<_, i64>(0) >= 9990 {
            break;
        }
    }
    // One event per transaction, across the boundary.
    for _ in 0..30 {
        produce(&env.admin, "courses", 1).await;
    }
    let crossing = env.pg.psql(
        "SELECT min(tx_id::text::bigint) < 10000 AND max(tx_id::text::bigint) >= 10000 FROM events",
    );
    assert_eq!(crossing, "t", "the events straddle the boundary");

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut config = consumer::Config::new(env.consumer_url(), None);
    config.batch_size = Some(7);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(consumer::run_with(
        config,
        consumer::sink::Observed::new(consumer::sink::NullSink::new(), tx),
        shutdown.clone(),
    ));
    let expected: Vec<i64> = env
        .pg
        .psql("SELECT id FROM events ORDER BY tx_id, id")
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    let mut delivered = Vec::new();
    while delivered.len() < expected.len() {
        let batch = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .expect("deliveries keep coming")
            .unwrap();
        delivered.extend(batch.ids);
    }
    // Nothing more arrives: no batch is read twice.
    produce(&env.admin, "courses", 1).await;
    let next = tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .unwrap()
        .unwrap();
    shutdown.cancel();
    running.await.unwrap().unwrap();
    assert_eq!(delivered, expected, "position order, each once");
    assert_eq!(next.ids.len(), 1);
}
