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
}
