//! `eventsctl dead-letters` over what a real consumer set aside: list and show them; replay one
//! after its row is corrected (stored through the consumer's mapping, its dead letter removed,
//! refused while it still cannot be stored or once it is purged); discard the rest.

mod common;

use std::time::Duration;

use common::{assert_exit, json, produce, setup, spawn, stderr, stdout, wait_until, Env};
use event_store::position;
use mongodb::bson::{doc, Document};

const NAME: &str = "sink";
/// 40 significant digits: no BSON number holds it exactly, so the consumer sets it aside.
const POISON: &str = r#"{"n": 1234567890123456789012345678901234567890}"#;

async fn poison(env: &Env) -> i64 {
    env.admin
        .query_one(
            "INSERT INTO events (topic, payload) VALUES ('orders', $1::text::jsonb) RETURNING id",
            &[&POISON],
        )
        .await
        .unwrap()
        .get(0)
}

async fn letters(env: &Env) -> u64 {
    env.mongo_db()
        .await
        .collection::<Document>("deadLetters")
        .count_documents(doc! {})
        .await
        .unwrap()
}

async fn deliver(env: &Env, dead: u64) {
    let running = spawn(env.consumer_config(NAME));
    let last = position::latest(&env.admin).await.unwrap().to_string();
    wait_until(
        "the consumer passed every event",
        Duration::from_secs(60),
        || async {
            env.checkpoint(NAME).await.is_some_and(|c| {
                format!(
                    "{}/{}",
                    c.get_i64("tx_id").unwrap(),
                    c.get_i64("id").unwrap()
                ) == last
            }) && letters(env).await == dead
        },
    )
    .await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dead_letters_are_listed_replayed_once_fixed_and_discarded() {
    let env = setup(true).await;
    produce(&env.admin, "orders", 2).await;
    let fixable = poison(&env).await;
    let hopeless = poison(&env).await;
    deliver(&env, 2).await;
    assert_eq!(
        env.mongo_ids().await.len(),
        2,
        "the poison events were set aside"
    );

    let list = env.ctl(&["dead-letters", "list", "--json"]).await;
    assert_exit(&list, 0, "list");
    let listed = json(&list);
    let ids: Vec<i64> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, [fixable, hopeless]);
    assert_eq!(listed[0]["reason"], "number_out_of_range");
    assert_eq!(listed[0]["consumer"], NAME);
    let text = stdout(&env.ctl(&["dead-letters", "list"]).await);
    assert!(
        text.contains("number_out_of_range") && text.contains(&fixable.to_string()),
        "{text}"
    );
    let show = env
        .ctl(&["dead-letters", "show", &fixable.to_string()])
        .await;
    assert_exit(&show, 0, "show");
    assert!(
        stdout(&show).contains("1234567890123456789012345678901234567890"),
        "{}",
        stdout(&show)
    );
    assert_exit(
        &env.ctl(&["dead-letters", "show", "999999"]).await,
        2,
        "show an unknown id",
    );

    // Still not storable: refused, and the dead letter stays.
    let refused = env
        .ctl(&["dead-letters", "replay", &fixable.to_string()])
        .await;
    assert_exit(
        &refused,
        4,
        "replay of an event that still cannot be stored",
    );
    assert!(
        stdout(&refused).contains("still refused (number_out_of_range"),
        "{}",
        stdout(&refused)
    );
    assert_eq!(letters(&env).await, 2);

    // The row is corrected; a dry run says it would work and changes nothing.
    env.admin
        .execute(
            "UPDATE events SET payload = '{\"n\": 1}' WHERE id = $1",
            &[&fixable],
        )
        .await
        .unwrap();
    let dry = env
        .ctl(&["dead-letters", "replay", &fixable.to_string(), "--dry-run"])
        .await;
    assert_exit(&dry, 0, "dry run");
    assert!(stdout(&dry).contains("would replay"), "{}", stdout(&dry));
    assert_eq!(letters(&env).await, 2);
    assert!(!env.mongo_ids().await.contains(&fixable));

    let replay = env
        .ctl(&["dead-letters", "replay", &fixable.to_string(), "--json"])
        .await;
    assert_exit(&replay, 0, "replay");
    assert_eq!(json(&replay)[0]["result"], "replayed");
    let stored = env
        .mongo_db()
        .await
        .collection::<Document>("receivedEvents")
        .find_one(doc! {"_id": fixable})
        .await
        .unwrap()
        .expect("the replayed event is stored");
    assert_eq!(
        stored
            .get_document("payload")
            .unwrap()
            .get_i32("n")
            .unwrap(),
        1
    );
    assert_eq!(letters(&env).await, 1);
    assert_exit(
        &env.ctl(&["dead-letters", "replay", &fixable.to_string()])
            .await,
        2,
        "no dead letter left for it",
    );

    // Discard: a dry run first, then for real.
    let dry = env
        .ctl(&["dead-letters", "discard", "--all", "--dry-run"])
        .await;
    assert!(
        stdout(&dry).contains(&format!("{hopeless}: would discard")),
        "{}",
        stdout(&dry)
    );
    assert_eq!(letters(&env).await, 1);
    assert_exit(
        &env.ctl(&["dead-letters", "discard", "--all"]).await,
        0,
        "discard",
    );
    assert_eq!(letters(&env).await, 0);
    assert!(stdout(&env.ctl(&["dead-letters", "list"]).await).contains("no dead letters"));

    // An event purged from PostgreSQL cannot be replayed; its dead letter stays.
    let purged = poison(&env).await;
    deliver(&env, 1).await;
    env.admin
        .execute("DELETE FROM events WHERE id = $1", &[&purged])
        .await
        .unwrap();
    let gone = env.ctl(&["dead-letters", "replay", "--all"]).await;
    assert_exit(&gone, 4, "replay of a purged event");
    assert!(
        stdout(&gone).contains("not in PostgreSQL"),
        "{}",
        stdout(&gone)
    );
    assert!(
        stderr(&gone).contains("could not be replayed"),
        "{}",
        stderr(&gone)
    );
    assert_eq!(letters(&env).await, 1);
    assert_exit(
        &env.ctl(&["dead-letters", "replay"]).await,
        2,
        "neither ids nor --all",
    );
}

/// Dead letters of a webhook consumer live in PostgreSQL: without MONGODB_URI, `dead-letters`
/// lists and shows them, `replay` asks the consumer to send them again (it holds the receiver's
/// secret), `discard` removes them. Rows are visible to the consumer's own login only.
#[tokio::test(flavor = "multi_thread")]
async fn dead_letters_of_a_webhook_consumer_are_managed_in_postgres() {
    use event_store::sink_state::{record_dead_letter, DeadLetterRow};
    let env = setup(false).await;
    produce(&env.admin, "orders", 3).await;
    let ids: Vec<i64> = env.pg_ids().await;
    let as_consumer = common::connect(&env.pg.url_for("ops", None)).await;
    let at = position::latest(&env.admin).await.unwrap();
    for (i, id) in ids.iter().take(2).enumerate() {
        let position = event_store::Position::new(at.tx_id, *id);
        let detail = format!("the receiver answered 422 Unprocessable Entity: nope {i}");
        record_dead_letter(
            &as_consumer,
            "hooks",
            &DeadLetterRow {
                position,
                event_id: None,
                topic: Some("orders"),
                key: Some("k"),
                event_type: None,
                payload: "{\"n\": 1}",
                reason: "refused_by_receiver",
                detail: &detail,
            },
        )
        .await
        .unwrap();
    }

    let out = env.ctl(&["--json", "dead-letters", "list"]).await;
    assert_exit(&out, 0, "list");
    let listed = json(&out);
    assert_eq!(listed.as_array().unwrap().len(), 2, "{listed}");
    assert_eq!(listed[0]["consumer"], "hooks");
    assert_eq!(listed[0]["reason"], "refused_by_receiver");

    let first = ids[0].to_string();
    let out = env.ctl(&["dead-letters", "show", &first]).await;
    assert_exit(&out, 0, "show");
    assert!(stdout(&out).contains("nope 0") && stdout(&out).contains("{\"n\": 1}"));

    let out = env.ctl(&["dead-letters", "replay", &first]).await;
    assert_exit(&out, 0, "replay");
    assert!(
        stdout(&out).contains("replay requested"),
        "{}",
        stdout(&out)
    );
    assert_eq!(
        env.pg.psql(&format!(
            "SELECT replay_requested_at IS NOT NULL FROM sink_dead_letters WHERE id = {first}"
        )),
        "t"
    );
    // Nobody sends it (no consumer runs): --wait says so and fails.
    let out = env
        .ctl(&["dead-letters", "replay", &first, "--wait", "1s"])
        .await;
    assert!(!out.status.success(), "no answer is a failure");
    assert!(stdout(&out).contains("no answer yet"), "{}", stdout(&out));

    let out = env.ctl(&["dead-letters", "replay", "999999"]).await;
    assert_exit(&out, 2, "an unknown id");
    assert!(stderr(&out).contains("999999"), "{}", stderr(&out));

    let out = env
        .ctl(&["dead-letters", "discard", "--all", "--consumer", "hooks"])
        .await;
    assert_exit(&out, 0, "discard");
    assert_eq!(env.pg.psql("SELECT count(*) FROM sink_dead_letters"), "0");
    // Another login sees none of a consumer's rows (row-level security).
    assert_eq!(
        stdout(&env.ctl_as("ops2", &["dead-letters", "list"], None).await).trim(),
        "no dead letters in PostgreSQL (set MONGODB_URI for the MongoDB sink's)"
    );
}
