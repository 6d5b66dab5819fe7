//! A checkpoint only means something in the database it was read from. A consumer whose database
//! lost commits (a failover), or that is pointed at another database, refuses to go on — unless
//! told to with `--accept-divergence` — instead of silently skipping events that hide behind its
//! position.

mod common;

use std::time::Duration;

use common::{connect, produce, setup, spawn, wait_delivered, wait_until, CONSUMER_USER};
use event_store::migrations;

const RECEIVED: &str = "receivedEvents";

async fn refused(config: consumer::Config) -> String {
    let running = spawn(config);
    let result = tokio::time::timeout(Duration::from_secs(60), running.handle)
        .await
        .expect("the consumer stops by itself")
        .unwrap();
    result.expect_err("the consumer refuses").to_string()
}

/// The tail of the stream is lost (as in a failover to a replica that had not received it), the
/// new primary's transaction counter passes the checkpoint again and ids are reused: new events
/// now sit at or behind the checkpoint, where a consumer would never look.
#[tokio::test(flavor = "multi_thread")]
async fn a_database_that_lost_commits_is_refused() {
    let env = setup().await;
    produce(&env.admin, "courses", 10).await;
    let consumer = spawn(env.config("c"));
    wait_delivered(&env, RECEIVED, "", Duration::from_secs(30)).await;
    consumer.stop().await;

    // The failover: the last 5 events vanish, their ids and transaction ids are handed out again.
    let first_lost: i64 = env
        .pg
        .psql("SELECT max(id) - 4 FROM events")
        .parse()
        .unwrap();
    env.pg.psql(&format!(
        "DELETE FROM events WHERE id >= {first_lost};
         SELECT setval('events_id_seq', {first_lost} - 1);"
    ));
    env.pg.psql(&"SELECT pg_current_xact_id();\n".repeat(30));
    produce(&env.admin, "courses", 10).await;

    let error = refused(env.config("c")).await;
    assert!(error.contains("refuses to go on"), "{error}");
    assert!(error.contains("--accept-divergence"), "{error}");
    assert!(error.contains("eventsctl reset"), "{error}");
    assert_eq!(
        env.mongo_count(RECEIVED).await,
        10,
        "nothing written meanwhile"
    );

    // The operator accepts it: delivery goes on from the checkpoint.
    let mut config = env.config("c");
    config.accept_divergence = true;
    let consumer = spawn(config);
    let last = env.pg_last_position("");
    wait_until(
        "the checkpoint reaches the new end",
        Duration::from_secs(30),
        || async {
            env.checkpoint("c")
                .await
                .map(|c| common::checkpoint_text(&c))
                == Some(last.clone())
        },
    )
    .await;
    consumer.stop().await;
}

/// Purged is not diverged: the event at the checkpoint may be gone when the purge watermark
/// covers it.
#[tokio::test(flavor = "multi_thread")]
async fn a_purged_checkpoint_event_is_no_divergence() {
    let env = setup().await;
    produce(&env.admin, "courses", 10).await;
    let consumer = spawn(env.config("c"));
    wait_delivered(&env, RECEIVED, "", Duration::from_secs(30)).await;
    consumer.stop().await;
    env.pg.psql(
        "BEGIN;
         INSERT INTO purge_watermark (tx_id, id, forced)
              SELECT tx_id, id, false FROM events ORDER BY tx_id DESC, id DESC LIMIT 1;
         DELETE FROM events;
         COMMIT;",
    );
    produce(&env.admin, "courses", 5).await;
    let consumer = spawn(env.config("c"));
    wait_until("the new events arrive", Duration::from_secs(30), || async {
        env.mongo_count(RECEIVED).await == 15
    })
    .await;
    consumer.stop().await;
}

/// DATABASE_URL now leads to another database (same cluster, its own stream and roles).
#[tokio::test(flavor = "multi_thread")]
async fn another_database_is_refused() {
    let env = setup().await;
    produce(&env.admin, "courses", 3).await;
    let consumer = spawn(env.config("c"));
    wait_delivered(&env, RECEIVED, "", Duration::from_secs(30)).await;
    consumer.stop().await;

    env.pg.psql("CREATE DATABASE other");
    let other_url = env.pg.url().replace("/postgres", "/other");
    let mut other = connect(&other_url).await;
    migrations::run_with(&mut other, "other").await.unwrap();
    other
        .batch_execute(&format!("GRANT other_consumer TO {CONSUMER_USER}"))
        .await
        .unwrap();
    produce(&other, "courses", 50).await;

    let mut config = env.config("c");
    config.postgres.database_url = env
        .pg
        .url_for(CONSUMER_USER, None)
        .replace("/postgres", "/other");
    let error = refused(config).await;
    assert!(error.contains("now leads to database \"other\""), "{error}");
}

/// LISTEN_DATABASE_URL: the dedicated connection goes there, the pool to DATABASE_URL.
#[tokio::test(flavor = "multi_thread")]
async fn the_listen_connection_can_go_elsewhere() {
    let env = setup().await;
    env.admin
        .batch_execute("CREATE ROLE via_proxy LOGIN IN ROLE events_consumer")
        .await
        .unwrap();
    let mut config = env.config("split");
    config.postgres.database_url = env.pg.url_for("via_proxy", None);
    config.listen_database_url = Some(env.consumer_url());
    let consumer = spawn(config);
    produce(&env.admin, "courses", 5).await;
    wait_delivered(&env, RECEIVED, "", Duration::from_secs(30)).await;
    let who = env.pg.psql(
        "SELECT string_agg(DISTINCT usename || ':' || (application_name LIKE '%:listen'), ',' ORDER BY usename || ':' || (application_name LIKE '%:listen'))
           FROM pg_stat_activity WHERE application_name LIKE 'events-consumer:split%'",
    );
    assert_eq!(who, format!("{CONSUMER_USER}:true,via_proxy:false"));
    consumer.stop().await;
}
