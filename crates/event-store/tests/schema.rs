//! The schema against a real PostgreSQL: migrations, least-privilege roles, constraints, and the
//! position SQL's central promise (nothing is read behind a position).

use event_store::position::{self, Position, Reader};
use event_store::{db, migrations};
use testbed::Postgres;
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

async fn connect(url: &str) -> Client {
    db::connect_spawned(&db::config(url, "schema-test").unwrap())
        .await
        .unwrap()
}

async fn migrated() -> (Postgres, Client) {
    let pg = Postgres::start();
    let mut admin = connect(&pg.url()).await;
    migrations::run(&mut admin)
        .await
        .expect("migrations apply to an empty database");
    (pg, admin)
}

/// A login user holding one group role, connected.
async fn login_as(pg: &Postgres, admin: &Client, user: &str, group: &str) -> Client {
    admin
        .batch_execute(&format!("CREATE ROLE {user} LOGIN IN ROLE {group}"))
        .await
        .unwrap();
    connect(&pg.url_for(user, None)).await
}

fn assert_denied(result: Result<u64, tokio_postgres::Error>, what: &str) {
    let err = result.expect_err(what);
    assert_eq!(
        err.code(),
        Some(&SqlState::INSUFFICIENT_PRIVILEGE),
        "{what}: {err}"
    );
}

#[tokio::test]
async fn migrations_apply_once_and_rerun_is_a_no_op() {
    let pg = Postgres::start();
    let mut admin = connect(&pg.url()).await;
    let first = migrations::run(&mut admin).await.unwrap();
    assert_eq!(first.applied[..2], ["V1__events", "V2__roles"]);
    assert!(
        [
            "V4__least_privilege",
            "V5__capture",
            "V6__capture_pairs_by_row"
        ]
        .iter()
        .all(|m| first.applied.iter().any(|a| a == m)),
        "{:?}",
        first.applied
    );
    assert_eq!(first.version, Some(migrations::latest_version()));
    let second = migrations::run(&mut admin).await.unwrap();
    assert!(
        second.applied.is_empty(),
        "second run applied {:?}",
        second.applied
    );
    assert_eq!(second.version, first.version);
    assert_eq!(pg.psql("SELECT count(*) FROM events"), "0");
}

#[tokio::test]
async fn roles_have_least_privilege() {
    let (pg, admin) = migrated().await;
    let producer = login_as(&pg, &admin, "app_producer", "events_producer").await;
    let consumer = login_as(&pg, &admin, "app_consumer", "events_consumer").await;
    let purger = login_as(&pg, &admin, "app_purger", "events_purger").await;

    // The producer appends (and learns id and event_id), nothing else.
    let row = producer
        .query_one(
            "INSERT INTO events (topic, payload) VALUES ('orders', '{}') RETURNING id, event_id",
            &[],
        )
        .await
        .expect("producer may insert");
    let id: i64 = row.get(0);
    assert_denied(
        producer.execute("DELETE FROM events", &[]).await,
        "producer DELETE",
    );
    assert_denied(
        producer.execute("UPDATE events SET topic = 'x'", &[]).await,
        "producer UPDATE",
    );
    assert_denied(
        producer
            .execute(
                "INSERT INTO events (tx_id, topic, payload) VALUES ('1', 'a', '{}')",
                &[],
            )
            .await,
        "producer choosing tx_id",
    );

    // The consumer reads events and writes only positions.
    let n = consumer
        .query_one("SELECT count(*) FROM events", &[])
        .await
        .unwrap();
    assert_eq!(n.get::<_, i64>(0), 1);
    assert_denied(
        consumer
            .execute(
                "INSERT INTO events (topic, payload) VALUES ('a', '{}')",
                &[],
            )
            .await,
        "consumer INSERT",
    );
    assert_denied(
        consumer.execute("DELETE FROM events", &[]).await,
        "consumer DELETE",
    );
    position::publish(&consumer, "c1", Position::new(1, id))
        .await
        .expect("consumer publishes");
    assert_denied(
        consumer.execute("DELETE FROM purge_watermark", &[]).await,
        "consumer touching the watermark",
    );

    // The purger deletes and reads positions, but cannot append or move positions.
    assert_eq!(
        position::published_positions(&purger).await.unwrap().len(),
        1
    );
    assert_denied(
        purger
            .execute(
                "INSERT INTO events (topic, payload) VALUES ('a', '{}')",
                &[],
            )
            .await,
        "purger INSERT",
    );
    assert_denied(
        purger.execute("DELETE FROM consumer_positions", &[]).await,
        "purger positions",
    );
    assert_eq!(purger.execute("DELETE FROM events", &[]).await.unwrap(), 1);

    // The start-up checks agree with the grants.
    migrations::check(&producer, migrations::Role::Producer)
        .await
        .unwrap();
    migrations::check(&consumer, migrations::Role::Consumer)
        .await
        .unwrap();
    migrations::check(&purger, migrations::Role::Purger)
        .await
        .unwrap();
    let err = migrations::check(&consumer, migrations::Role::Purger)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("lacks DELETE on \"events\""),
        "{err}"
    );
}

#[tokio::test]
async fn the_start_up_check_names_a_missing_schema() {
    let pg = Postgres::start();
    let admin = connect(&pg.url()).await;
    let err = migrations::check(&admin, migrations::Role::Consumer)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("run `migrate`"), "{err}");
}

#[tokio::test]
async fn the_topic_check_rejects_bad_topics() {
    let (_pg, admin) = migrated().await;
    for bad in ["", " spaces ", "-lead", "semi;colon", &"x".repeat(129)] {
        let err = admin
            .execute(
                "INSERT INTO events (topic, payload) VALUES ($1, '{}')",
                &[&bad],
            )
            .await
            .expect_err(bad);
        assert_eq!(
            err.code(),
            Some(&SqlState::CHECK_VIOLATION),
            "{bad:?}: {err}"
        );
    }
    admin
        .execute(
            "INSERT INTO events (topic, payload) VALUES ($1, '{}')",
            &[&"ok.topic-1_x"],
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn a_reader_never_passes_an_open_transaction() {
    let (pg, admin) = migrated().await;
    let mut slow = connect(&pg.url()).await;
    let reader = Reader::prepare(&admin).await.unwrap();

    // `slow` takes the smaller id and stays open; a later transaction commits first.
    let slow_tx = slow.transaction().await.unwrap();
    slow_tx
        .execute("INSERT INTO events (topic, payload) VALUES ('t', '1')", &[])
        .await
        .unwrap();
    admin
        .execute("INSERT INTO events (topic, payload) VALUES ('t', '2')", &[])
        .await
        .unwrap();

    let batch = reader
        .fetch(&admin, Position::START, 100, None)
        .await
        .unwrap();
    assert!(
        batch.events.is_empty(),
        "the later commit is held back by the open transaction"
    );
    assert!(reader
        .pending_beyond_horizon(&admin, Position::START)
        .await
        .unwrap());
    let blocker = position::horizon_blocker(&admin)
        .await
        .unwrap()
        .expect("a blocker");
    assert!(blocker.to_string().contains("has had a transaction open"));

    slow_tx.commit().await.unwrap();
    let batch = reader
        .fetch(&admin, Position::START, 100, None)
        .await
        .unwrap();
    let payloads: Vec<_> = batch
        .events
        .iter()
        .map(|e| e.payload.parse().unwrap())
        .collect();
    assert_eq!(
        payloads,
        vec![serde_json::json!(1), serde_json::json!(2)],
        "commit order"
    );
    assert!(batch.events[0].position < batch.events[1].position);
    assert_eq!(batch.end, Some(batch.events[1].position));
    assert!(!reader
        .pending_beyond_horizon(&admin, batch.end.unwrap())
        .await
        .unwrap());
}

#[tokio::test]
async fn a_topic_filter_still_advances_the_position() {
    let (_pg, admin) = migrated().await;
    admin
        .batch_execute(
            "INSERT INTO events (topic, payload) VALUES ('a', '1'), ('b', '2'), ('b', '3')",
        )
        .await
        .unwrap();
    let reader = Reader::prepare(&admin).await.unwrap();
    let only_a = vec!["a".to_string()];
    let batch = reader
        .fetch(&admin, Position::START, 10, Some(&only_a))
        .await
        .unwrap();
    assert_eq!(batch.events.len(), 1);
    assert_eq!(batch.scanned, 3);
    let end = batch.end.unwrap();
    assert_eq!(end.id, 3, "the position passes the skipped rows");
    let next = reader.fetch(&admin, end, 10, Some(&only_a)).await.unwrap();
    assert_eq!(next.scanned, 0);
}

#[tokio::test]
async fn xid8_positions_compare_numerically_not_as_text() {
    // The classic bug: '999' > '1000' as text. Positions across a digit-count boundary must sort
    // by number, both in Rust and in the SQL.
    let (_pg, admin) = migrated().await;
    assert!(Position::new(999, 5) < Position::new(1000, 1));
    let reader = Reader::prepare(&admin).await.unwrap();
    admin
        .batch_execute("INSERT INTO events (topic, payload) VALUES ('t', '1')")
        .await
        .unwrap();
    let batch = reader
        .fetch(&admin, Position::new(9, i64::MAX), 10, None)
        .await
        .unwrap();
    let first = batch.events[0].position;
    assert!(
        first.tx_id >= 10,
        "a fresh cluster's xids are past 9: {first}"
    );
    // Read from a position whose tx_id has fewer digits than the row's: must still be found.
    let digits = first.tx_id.to_string().len() as u32;
    let shorter = Position::new(10u64.pow(digits - 1) - 1, i64::MAX);
    let batch = reader.fetch(&admin, shorter, 10, None).await.unwrap();
    assert_eq!(batch.events.len(), 1, "{shorter} must be before {first}");
}

#[tokio::test]
async fn published_positions_move_forward_unless_a_consumer_registers_again() {
    let (_pg, admin) = migrated().await;
    let at = |n: i64| Position::new(1000, n);
    let stored = |positions: Vec<position::PublishedPosition>| positions[0].position;
    position::publish(&admin, "c", at(10)).await.unwrap();
    position::publish(&admin, "c", at(5)).await.unwrap();
    assert_eq!(
        stored(position::published_positions(&admin).await.unwrap()),
        at(10),
        "a late, older publish never moves the position back"
    );
    // A consumer restarting from an older checkpoint (reset, restored backup) must be protected
    // from there on.
    position::register(&admin, "c", at(3)).await.unwrap();
    assert_eq!(
        stored(position::published_positions(&admin).await.unwrap()),
        at(3)
    );
}
