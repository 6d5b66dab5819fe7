//! The producer library and the consumer together, with the producer's default wake-ups (one
//! NOTIFY after commit from a side connection). The consumer's fallback poll is set to an hour, so
//! every event must arrive through a wake-up: a wake-up lost between commit and NOTIFY would leave
//! events behind and fail the test.

mod common;

use std::time::Duration;

use common::*;
use event_store::{db, NewEvent, Topic};
use producer::{Channel, Notifier, NotifyMode, Producer};

const RECEIVED: &str = "receivedEvents";

#[tokio::test(flavor = "multi_thread")]
async fn after_commit_wake_ups_deliver_every_event_without_the_fallback_poll() {
    let env = setup().await;
    env.admin
        .batch_execute("CREATE ROLE app LOGIN IN ROLE events_producer")
        .await
        .unwrap();
    let app = db::config(&env.pg.url_for("app", None), "end-to-end").unwrap();
    let (notifier, _task) =
        Notifier::spawn(app.clone(), Channel::default(), Duration::from_millis(1));
    let producer = Producer::after_commit(notifier);
    assert_eq!(
        producer.notify_mode(),
        NotifyMode::AfterCommit,
        "the default under test"
    );

    let mut config = env.config("e2e");
    config.poll_interval = Duration::from_secs(3600);
    let consumer = spawn(config);

    // Waves of concurrent single-event and batched transactions, some inside a caller's
    // transaction with other writes, with pauses so the consumer is caught up and idle (waiting
    // only for a wake-up) when each wave commits.
    let topic = Topic::new("courses").unwrap();
    for wave in 0..6 {
        let mut writers = Vec::new();
        for writer in 0..4 {
            let (producer, topic, app) = (producer.clone(), topic.clone(), app.clone());
            writers.push(tokio::spawn(async move {
                let mut client = db::connect_spawned(&app).await.unwrap();
                for n in 0..25 {
                    let event = NewEvent::new(
                        topic.clone(),
                        serde_json::json!({"wave": wave, "writer": writer, "n": n}),
                    );
                    if n % 5 == 0 {
                        let batch = vec![event.clone(), event.clone(), event];
                        producer.append(&client, &batch).await.unwrap();
                    } else {
                        let tx = client.transaction().await.unwrap();
                        let appended = producer.append_in(&tx, &event).await.unwrap();
                        producer.commit(tx, appended).await.unwrap();
                    }
                }
            }));
        }
        for writer in writers {
            writer.await.unwrap();
        }
        wait_delivered(&env, RECEIVED, "", Duration::from_secs(30)).await;
        tokio::time::sleep(Duration::from_millis(100 * wave)).await;
    }
    // 6 waves × 4 writers × (20 single events + 5 batches of 3).
    assert_eq!(env.pg.psql("SELECT count(*) FROM events"), "840");
    assert_eq!(env.mongo_count(RECEIVED).await, 840);
    consumer.stop().await;
}
