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

/// The tail of the stream is lost (as in a failover to a replica that had not received it) and
/// the new primary's transaction counter passes the checkpoint again: the event the checkpoint
/// recorded is gone without a purge. (A real failover also hands out the lost transaction ids
/// again, so new events can sit behind the checkpoint; one cluster cannot turn its counter back,
/// but the evidence the consumer checks is the same.)
#[tokio::test(flavor = "multi_thread")]
async fn a_database_that_lost_commits_is_refused() {
    let env = setup().await;
    produce(&env.admin, "courses", 10).await;
    let consumer = spawn(env.config("c"));
    wait_delivered(&env, RECEIVED, "", Duration::from_secs(30)).await;
    consumer.stop().await;

    // The failover: the last 5 events vanish; transaction ids go on past the checkpoint.
    env.pg
        .psql("DELETE FROM events WHERE id > (SELECT max(id) - 5 FROM events)");
    env.pg.psql(&"SELECT pg_current_xact_id();\n".repeat(30));
    produce(&env.admin, "courses", 10).await;

    let error = refused(env.config("c")).await;
    assert!(error.contains("refuses to go on"), "{error}");
    assert!(error.contains("is gone and no purge removed it"), "{error}");
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
    common::wait_checkpoint_at_end(&env, "c", Duration::from_secs(30)).await;
    consumer.stop().await;
}

/// The row at the checkpoint now holds another event (ids handed out again).
#[tokio::test(flavor = "multi_thread")]
async fn a_replaced_checkpoint_event_is_refused() {
    let env = setup().await;
    produce(&env.admin, "courses", 4).await;
    let consumer = spawn(env.config("c"));
    wait_delivered(&env, RECEIVED, "", Duration::from_secs(30)).await;
    consumer.stop().await;
    env.pg.psql(
        "UPDATE events SET event_id = gen_random_uuid() WHERE id = (SELECT max(id) FROM events)",
    );
    let error = refused(env.config("c")).await;
    assert!(error.contains("but the database now holds"), "{error}");
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
    let other_db = |url: String| format!("{}/other", url.rsplit_once('/').unwrap().0);
    let other_url = other_db(env.pg.url());
    let mut other = connect(&other_url).await;
    migrations::run_with(&mut other, "other").await.unwrap();
    other
        .batch_execute(&format!("GRANT other_consumer TO {CONSUMER_USER}"))
        .await
        .unwrap();
    produce(&other, "courses", 50).await;

    let mut config = env.config("c");
    config.postgres.database_url = other_db(env.pg.url_for(CONSUMER_USER, None));
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
