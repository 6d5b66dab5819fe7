//! `eventsctl reset` against real PostgreSQL and MongoDB-wire servers and a real consumer: the
//! plan changes nothing, --yes moves the checkpoint and the published position together, the
//! consumer then re-delivers (or skips) exactly that range without duplicates, and a running
//! consumer or bad input is refused.

mod common;

use std::time::Duration;

use common::{assert_exit, json, produce, setup, spawn, stderr, stdout, wait_until, Env};
use event_store::{lease, position};
use mongodb::bson::{doc, Document};

const NAME: &str = "sink";

/// Runs the consumer until it has delivered every event and checkpointed the last one.
async fn deliver_all(env: &Env) {
    let running = spawn(env.consumer_config(NAME));
    let expected = env.pg_ids().await;
    let last = position::latest(&env.admin).await.unwrap().to_string();
    wait_until(
        "the consumer delivered every event",
        Duration::from_secs(60),
        || async {
            env.checkpoint(NAME)
                .await
                .map(|c| checkpoint_text(&Some(c)))
                == Some(last.clone())
                && env.mongo_ids().await == expected
        },
    )
    .await;
    running.stop().await;
}

fn checkpoint_text(doc: &Option<Document>) -> String {
    let doc = doc.as_ref().expect("a checkpoint");
    format!(
        "{}/{}",
        doc.get_i64("tx_id").unwrap(),
        doc.get_i64("id").unwrap()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn reset_plans_then_moves_both_positions_and_the_consumer_redelivers_once() {
    let env = setup(true).await;
    produce(&env.admin, "orders", 10).await;
    // Events created from `since` on are the second batch.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let since: String = env
        .admin
        .query_one(
            "SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    tokio::time::sleep(Duration::from_millis(50)).await;
    produce(&env.admin, "orders", 10).await;
    deliver_all(&env).await;
    let delivered = checkpoint_text(&env.checkpoint(NAME).await);
    assert_eq!(
        env.published(NAME).await.as_deref(),
        Some(delivered.as_str())
    );

    // The plan alone changes nothing.
    let plan = env.ctl(&["reset", NAME, "--to", "earliest"]).await;
    assert_exit(&plan, 0, "plan");
    assert!(
        stdout(&plan).contains("20 events will be delivered again"),
        "{}",
        stdout(&plan)
    );
    assert!(
        stdout(&plan).contains("Nothing changed"),
        "{}",
        stdout(&plan)
    );
    assert_eq!(checkpoint_text(&env.checkpoint(NAME).await), delivered);
    assert_eq!(
        env.published(NAME).await.as_deref(),
        Some(delivered.as_str())
    );

    // Replay the second batch (after "fixing a mapping"): its documents are gone from MongoDB.
    let second: Vec<i64> = env.pg_ids().await[10..].to_vec();
    env.mongo_db()
        .await
        .collection::<Document>("receivedEvents")
        .delete_many(doc! {"_id": {"$in": &second}})
        .await
        .unwrap();
    let by_time = env
        .ctl(&["reset", NAME, "--to", &since, "--yes", "--json"])
        .await;
    assert_exit(&by_time, 0, "reset to a time");
    let applied = json(&by_time);
    assert_eq!(applied["applied"], true);
    assert_eq!(applied["direction"], "re-deliver");
    assert_eq!(applied["events"], 10, "{applied}");
    let to = format!("{}/{}", applied["to"]["tx_id"], applied["to"]["id"]);
    assert_eq!(checkpoint_text(&env.checkpoint(NAME).await), to);
    assert_eq!(env.published(NAME).await, Some(to));
    deliver_all(&env).await;

    // To the earliest: every event again, each present once.
    let earliest = env.ctl(&["reset", NAME, "--to", "earliest", "--yes"]).await;
    assert_exit(&earliest, 0, "reset to earliest");
    assert_eq!(checkpoint_text(&env.checkpoint(NAME).await), "0/0");
    assert_eq!(env.published(NAME).await.as_deref(), Some("0/0"));
    deliver_all(&env).await;
    assert_eq!(env.mongo_ids().await, env.pg_ids().await);
    assert_eq!(checkpoint_text(&env.checkpoint(NAME).await), delivered);

    // Forward: five new events are skipped and never delivered.
    produce(&env.admin, "orders", 5).await;
    let skip = env.ctl(&["reset", NAME, "--to", "latest", "--yes"]).await;
    assert_exit(&skip, 0, "reset to latest");
    assert!(
        stdout(&skip).contains("5 events will be skipped"),
        "{}",
        stdout(&skip)
    );
    let running = spawn(env.consumer_config(NAME));
    produce(&env.admin, "orders", 1).await;
    let newest = *env.pg_ids().await.last().unwrap();
    wait_until(
        "the consumer delivered the newest event",
        Duration::from_secs(60),
        || async { env.mongo_ids().await.contains(&newest) },
    )
    .await;
    running.stop().await;
    assert_eq!(
        env.mongo_ids().await.len(),
        21,
        "the 5 skipped events were not delivered"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn reset_is_refused_while_the_consumer_runs_and_for_bad_input() {
    let env = setup(true).await;
    produce(&env.admin, "orders", 3).await;
    deliver_all(&env).await;
    let delivered = checkpoint_text(&env.checkpoint(NAME).await);

    // Running: its LISTEN connection is there.
    let running = spawn(env.consumer_config(NAME));
    wait_until("the consumer is connected", Duration::from_secs(30), || async {
        env.admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'events-consumer:sink:listen'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 1
    })
    .await;
    let refused = env.ctl(&["reset", NAME, "--to", "earliest", "--yes"]).await;
    assert_exit(&refused, 3, "reset while the consumer runs");
    assert!(
        stderr(&refused).contains("is running"),
        "{}",
        stderr(&refused)
    );
    // The plan may still be looked at, and says why it cannot be applied.
    let plan = env.ctl(&["reset", NAME, "--to", "earliest"]).await;
    assert_exit(&plan, 0, "plan while running");
    assert!(
        stdout(&plan).contains("stop it before --yes"),
        "{}",
        stdout(&plan)
    );
    running.stop().await;

    // Another session holds the consumer's lease (a consumer starting up elsewhere).
    let other = common::connect(&env.pg.url()).await;
    assert!(lease::try_acquire(&other, NAME).await.unwrap());
    let leased = env.ctl(&["reset", NAME, "--to", "earliest", "--yes"]).await;
    assert_exit(&leased, 3, "reset while the lease is held");
    assert!(stderr(&leased).contains("lease"), "{}", stderr(&leased));
    assert_eq!(
        checkpoint_text(&env.checkpoint(NAME).await),
        delivered,
        "nothing moved"
    );
    assert_eq!(
        env.published(NAME).await.as_deref(),
        Some(delivered.as_str())
    );
    lease::release(&other, NAME).await.unwrap();

    // Another consumer login may not move this consumer (its position row is not theirs), in
    // either direction; MongoDB is not touched either.
    produce(&env.admin, "orders", 2).await;
    for to in ["earliest", "latest"] {
        let foreign = env
            .ctl_as("ops2", &["reset", NAME, "--to", to, "--yes"], None)
            .await;
        assert_exit(&foreign, 4, "another consumer login");
        assert!(
            stderr(&foreign).contains("belongs to another login"),
            "{to}: {}",
            stderr(&foreign)
        );
        assert_eq!(
            checkpoint_text(&env.checkpoint(NAME).await),
            delivered,
            "nothing moved"
        );
        assert_eq!(
            env.published(NAME).await.as_deref(),
            Some(delivered.as_str())
        );
    }

    for (to, what) in [
        ("yesterday", "an RFC 3339 time"),
        ("12/x", "is not a position"),
        ("2026-12-04T18:00:00", "a time zone is required"),
        (
            "99999999999/1",
            "ahead of this cluster's transaction counter",
        ),
    ] {
        let out = env.ctl(&["reset", NAME, "--to", to, "--yes"]).await;
        assert_exit(&out, 2, to);
        assert!(stderr(&out).contains(what), "{to}: {}", stderr(&out));
    }
    assert_exit(
        &env.ctl(&["reset", "no spaces", "--to", "earliest"]).await,
        2,
        "bad name",
    );
    let no_mongo = env
        .ctl_as(
            "ops",
            &["--mongodb-uri", "", "reset", NAME, "--to", "earliest"],
            None,
        )
        .await;
    assert_ne!(no_mongo.status.code(), Some(0), "reset needs MongoDB");
    assert_eq!(
        checkpoint_text(&env.checkpoint(NAME).await),
        delivered,
        "nothing moved"
    );
}

/// A webhook or JetStream consumer's checkpoint lives in PostgreSQL: reset moves it (and the
/// published position) without MONGODB_URI, forgets the request in flight, and the plan says
/// where the checkpoint is.
#[tokio::test(flavor = "multi_thread")]
async fn reset_moves_a_checkpoint_kept_in_postgres() {
    use event_store::position::Position;
    use event_store::sink_state::{begin_request, commit_request, load};
    let env = setup(false).await;
    produce(&env.admin, "orders", 5).await;
    let last = position::latest(&env.admin).await.unwrap();
    let mut hooks = common::connect(&env.pg.url_for("ops", None)).await;
    position::register(&hooks, "hooks", last).await.unwrap();
    begin_request(&hooks, "hooks", "http", Position::START, last)
        .await
        .unwrap()
        .unwrap();
    commit_request(&mut hooks, "hooks", Position::START, last, None, None, &[])
        .await
        .unwrap()
        .unwrap();
    // A request in flight past the checkpoint when the consumer stopped.
    let later = Position::new(last.tx_id, last.id + 100);
    begin_request(&hooks, "hooks", "http", last, later)
        .await
        .unwrap()
        .unwrap();

    let plan = env.ctl(&["reset", "hooks", "--to", "earliest"]).await;
    assert_exit(&plan, 0, "the plan");
    assert!(
        stdout(&plan).contains("(PostgreSQL checkpoint"),
        "{}",
        stdout(&plan)
    );
    let out = env
        .ctl(&["reset", "hooks", "--to", "earliest", "--yes", "--json"])
        .await;
    assert_exit(&out, 0, "reset --yes");
    assert_eq!(json(&out)["checkpoint_in"], "PostgreSQL");
    let stored = load(&hooks, "hooks").await.unwrap().unwrap();
    assert_eq!(stored.position, Position::START);
    assert_eq!(stored.pending, None, "the request in flight is forgotten");
    assert_eq!(
        env.published("hooks").await.as_deref(),
        Some(Position::START.to_string().as_str())
    );
}
