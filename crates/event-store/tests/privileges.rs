//! Least privilege, per database (migration V4), against a real server: for every rule, the
//! forbidden action fails with SQLSTATE 42501 and the allowed one works.

use std::time::{Duration, SystemTime};

use event_store::position::{self, Position};
use event_store::{db, migrations};
use testbed::Postgres;
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

async fn connect(url: &str) -> Client {
    db::connect_spawned(&db::config(url, "privileges-test").unwrap())
        .await
        .unwrap()
}

fn url_in(pg: &Postgres, user: &str, database: &str) -> String {
    format!("postgres://{user}@127.0.0.1:{}/{database}", pg.port())
}

fn assert_denied<T: std::fmt::Debug>(result: Result<T, tokio_postgres::Error>, what: &str) {
    let err = result.expect_err(what);
    assert_eq!(
        err.code(),
        Some(&SqlState::INSUFFICIENT_PRIVILEGE),
        "{what}: {err}"
    );
}

async fn migrated() -> (Postgres, Client) {
    let pg = Postgres::start();
    let mut admin = connect(&pg.url()).await;
    migrations::run(&mut admin).await.unwrap();
    (pg, admin)
}

#[tokio::test(flavor = "multi_thread")]
async fn group_roles_belong_to_one_database() {
    let (pg, _admin) = migrated().await;
    pg.psql("CREATE DATABASE orders");
    let mut orders_admin = connect(&url_in(&pg, "postgres", "orders")).await;

    // The default prefix's roles already serve database "postgres": migrate refuses to reuse them.
    let err = migrations::run(&mut orders_admin)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("role events_producer already holds privileges in database postgres")
            && err.contains("--role-prefix"),
        "{err}"
    );
    migrations::run_with(&mut orders_admin, "orders")
        .await
        .expect("a prefix of its own");
    assert_eq!(
        migrations::group_role(&orders_admin, migrations::Role::Consumer)
            .await
            .unwrap(),
        "orders_consumer"
    );

    pg.psql(
        "CREATE ROLE main_reader LOGIN IN ROLE events_consumer;
         CREATE ROLE orders_reader LOGIN IN ROLE orders_consumer;",
    );
    // Each login reads its own database's stream…
    connect(&url_in(&pg, "main_reader", "postgres"))
        .await
        .query_one("SELECT count(*) FROM events", &[])
        .await
        .unwrap();
    let orders_reader = connect(&url_in(&pg, "orders_reader", "orders")).await;
    orders_reader
        .query_one("SELECT count(*) FROM events", &[])
        .await
        .unwrap();
    // …and not the other's, even while CONNECT is still open to PUBLIC.
    let cross = connect(&url_in(&pg, "main_reader", "orders")).await;
    assert_denied(
        cross.query_one("SELECT count(*) FROM events", &[]).await,
        "reading another database's stream",
    );
    drop(cross);
    // With CONNECT revoked from PUBLIC (docs/security.md), the login cannot even connect, and the
    // report says what to grant.
    pg.psql("REVOKE CONNECT ON DATABASE orders FROM PUBLIC");
    let config = db::config(&url_in(&pg, "main_reader", "orders"), "privileges-test").unwrap();
    let err = db::connect_spawned(&config).await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{err}");
    assert!(err.is_permanent());
    assert!(
        err.to_string().contains("permission denied for database")
            && err.to_string().contains("may not connect to this database"),
        "{err}"
    );
    // The group role has CONNECT.
    connect(&url_in(&pg, "orders_reader", "orders")).await;

    // Re-running with another prefix moves the grants: the old roles lose what they held.
    let mut admin = connect(&pg.url()).await;
    migrations::run_with(&mut admin, "shop").await.unwrap();
    let old = connect(&url_in(&pg, "main_reader", "postgres")).await;
    assert_denied(
        old.query_one("SELECT count(*) FROM events", &[]).await,
        "the previous prefix's role",
    );
    pg.psql("CREATE ROLE shop_reader LOGIN IN ROLE shop_consumer");
    connect(&url_in(&pg, "shop_reader", "postgres"))
        .await
        .query_one("SELECT count(*) FROM events", &[])
        .await
        .unwrap();
    let err = migrations::run_with(&mut admin, "Bad-Prefix")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("invalid role prefix"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_consumer_login_writes_only_its_own_position_rows() {
    let (pg, admin) = migrated().await;
    pg.psql(
        "CREATE ROLE c1 LOGIN IN ROLE events_consumer;
         CREATE ROLE c2 LOGIN IN ROLE events_consumer;
         CREATE ROLE p1 LOGIN IN ROLE events_purger;",
    );
    let c1 = connect(&pg.url_for("c1", None)).await;
    let c2 = connect(&pg.url_for("c2", None)).await;

    position::publish(&c1, "alpha", Position::new(5, 5))
        .await
        .unwrap();
    position::register(&c1, "alpha", Position::new(3, 3))
        .await
        .unwrap();
    let err = position::publish(&c2, "alpha", Position::new(9, 9))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{err}");
    assert!(err.to_string().contains("row-level security"), "{err}");
    // c1's row is invisible to c2, and a row written in another login's name is refused.
    let moved = c2
        .execute("UPDATE consumer_positions SET id = 0", &[])
        .await
        .unwrap();
    assert_eq!(moved, 0, "c2 sees no row of c1's to update");
    assert_denied(
        c2.execute(
            "INSERT INTO consumer_positions (consumer, tx_id, id, owner) VALUES ('gamma', '1', 1, 'c1')",
            &[],
        )
        .await,
        "writing a row in another login's name",
    );
    position::publish(&c2, "beta", Position::new(7, 7))
        .await
        .unwrap();

    // A row from before V4 has no owner: the first login to publish claims it.
    admin
        .execute(
            "INSERT INTO consumer_positions (consumer, tx_id, id, owner) VALUES ('legacy', '1', 1, NULL)",
            &[],
        )
        .await
        .unwrap();
    position::publish(&c2, "legacy", Position::new(2, 2))
        .await
        .unwrap();
    assert_denied(
        position::publish(&c1, "legacy", Position::new(8, 8))
            .await
            .map_err(|e| match e {
                event_store::Error::Database { source, .. } => source,
                other => panic!("{other}"),
            }),
        "publishing into a claimed legacy row",
    );

    // Each login sees its own rows; the purger sees all.
    let seen: i64 = c1
        .query_one("SELECT count(*) FROM consumer_positions", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(seen, 1);
    let purger = connect(&pg.url_for("p1", None)).await;
    let all = position::published_positions(&purger).await.unwrap();
    let names: Vec<&str> = all.iter().map(|p| p.consumer.as_str()).collect();
    assert_eq!(names, ["legacy", "alpha", "beta"]);
    assert_eq!(all[1].position, Position::new(3, 3));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_purger_reads_only_the_columns_it_needs() {
    let (pg, admin) = migrated().await;
    pg.psql("CREATE ROLE p1 LOGIN IN ROLE events_purger");
    admin
        .batch_execute(
            "INSERT INTO events (topic, payload) VALUES ('t', '{\"secret\": 1}'), ('t', '{}')",
        )
        .await
        .unwrap();
    let purger = connect(&pg.url_for("p1", None)).await;
    for column in ["payload", "headers", "key", "topic", "event_id", "*"] {
        assert_denied(
            purger
                .query(&format!("SELECT {column} FROM events"), &[])
                .await,
            &format!("purger reading {column}"),
        );
    }
    purger
        .query("SELECT id, tx_id, created_at FROM events", &[])
        .await
        .unwrap();
    migrations::check(&purger, migrations::Role::Purger)
        .await
        .unwrap();
    // The real purge statement works with those columns alone.
    let cutoff = SystemTime::now() + Duration::from_secs(3600);
    let step = position::purge_step(&purger, cutoff, None, None, 10, false)
        .await
        .unwrap();
    assert_eq!(step.deleted, 2);
    assert!(position::watermark(&purger).await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_horizon_question_needs_no_view_of_other_sessions() {
    let (pg, _admin) = migrated().await;
    pg.psql(
        "CREATE ROLE c1 LOGIN IN ROLE events_consumer;
         CREATE ROLE w1 LOGIN IN ROLE events_producer;",
    );
    let consumer = connect(&pg.url_for("c1", None)).await;
    let member: bool = consumer
        .query_one("SELECT pg_has_role('pg_read_all_stats', 'MEMBER')", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!member, "the consumer role no longer reads every session");
    let query: Option<String> = consumer
        .query_one(
            "SELECT query FROM pg_stat_activity WHERE usename = 'postgres' LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(query.as_deref(), Some("<insufficient privilege>"));

    // A writer keeps a transaction open; the consumer learns who, without seeing its query.
    let mut writer = connect(&pg.url_for("w1", None)).await;
    let tx = writer.transaction().await.unwrap();
    tx.execute(
        "INSERT INTO events (topic, payload) VALUES ('t', '{}')",
        &[],
    )
    .await
    .unwrap();
    let blocker = position::horizon_blocker(&consumer)
        .await
        .unwrap()
        .expect("the open writer is named");
    assert_eq!(blocker.user.as_deref(), Some("w1"));
    assert_eq!(blocker.application_name, "privileges-test");
    tx.rollback().await.unwrap();
    assert!(position::horizon_blocker(&consumer)
        .await
        .unwrap()
        .is_none());

    // Only the consumer role may ask; the function's search_path is pinned.
    let producer = connect(&pg.url_for("w1", None)).await;
    assert_denied(
        producer
            .query("SELECT * FROM events_horizon_blocker()", &[])
            .await,
        "a producer asking who holds the horizon",
    );
    let config = pg.psql(
        "SELECT array_to_string(proconfig, ',') || ' ' || prosecdef FROM pg_proc
          WHERE proname = 'events_horizon_blocker'",
    );
    assert_eq!(config, "search_path=pg_catalog, pg_temp true");
    migrations::check(&consumer, migrations::Role::Consumer)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_start_up_check_compares_schema_versions() {
    let (pg, admin) = migrated().await;
    pg.psql("CREATE ROLE c1 LOGIN IN ROLE events_consumer; CREATE ROLE nobody LOGIN");
    let consumer = connect(&pg.url_for("c1", None)).await;
    migrations::check(&consumer, migrations::Role::Consumer)
        .await
        .unwrap();
    let needed = migrations::latest_version();

    // A login without its group role is told which one to grant.
    let nobody = connect(&pg.url_for("nobody", None)).await;
    let err = migrations::check(&nobody, migrations::Role::Consumer)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("lacks SELECT on \"events\"")
            && err.contains("GRANT events_consumer TO \"nobody\""),
        "{err}"
    );

    // A database whose history ends at V2 (as before this release).
    admin
        .execute("DELETE FROM refinery_schema_history WHERE version > 2", &[])
        .await
        .unwrap();
    let err = migrations::check(&consumer, migrations::Role::Consumer)
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "schema at V2, this consumer needs V{needed}: run `migrate` with DATABASE_URL \
             pointing at the same database (as its owner)"
        )
    );
    assert!(err.is_permanent());
}

fn denied_publish(result: event_store::Result<()>, what: &str) {
    let err = result.expect_err(what);
    assert_eq!(
        err.code(),
        Some(&SqlState::INSUFFICIENT_PRIVILEGE),
        "{what}: {err}"
    );
}

/// Issue 25, part 5: a position row written under `SET ROLE events_consumer` would belong to the
/// group, and every member could move it; and a login could take any name. Now only roles that can
/// log in write rows, and once the owner registers names in `consumer_names`, each login may
/// create or claim only its own.
#[tokio::test(flavor = "multi_thread")]
async fn consumer_names_are_tied_to_logins_and_group_roles_own_no_position() {
    let (pg, admin) = migrated().await;
    pg.psql(
        "CREATE ROLE c1 LOGIN IN ROLE events_consumer;
         CREATE ROLE c2 LOGIN IN ROLE events_consumer;",
    );
    let c1 = connect(&pg.url_for("c1", None)).await;
    let c2 = connect(&pg.url_for("c2", None)).await;

    // As the group role: no row is created.
    c1.batch_execute("SET ROLE events_consumer").await.unwrap();
    denied_publish(
        position::publish(&c1, "shared", Position::new(5, 5)).await,
        "publishing as the group role",
    );
    c1.batch_execute("RESET ROLE").await.unwrap();
    // A row the group role owns (as V4 let one be made): no member can move it now, as itself or
    // as the group.
    admin
        .execute(
            "INSERT INTO consumer_positions (consumer, tx_id, id, owner) VALUES ('shared', '9', 9, 'events_consumer')",
            &[],
        )
        .await
        .unwrap();
    // V4's policy, `owner = current_user`, matched it for every member under SET ROLE.
    let v4_would_match: i64 = admin
        .query_one(
            "SELECT count(*) FROM consumer_positions WHERE owner = 'events_consumer'::name",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(v4_would_match, 1);
    for client in [&c1, &c2] {
        client
            .batch_execute("SET ROLE events_consumer")
            .await
            .unwrap();
        let moved = client
            .execute("UPDATE consumer_positions SET id = 0", &[])
            .await
            .unwrap();
        assert_eq!(moved, 0, "the group role moves nothing");
        client.batch_execute("RESET ROLE").await.unwrap();
        denied_publish(
            position::publish(client, "shared", Position::new(10, 10)).await,
            "publishing into the group's row",
        );
    }

    // Without registered names, first come, first served (V4).
    position::publish(&c2, "anything", Position::new(1, 1))
        .await
        .unwrap();
    // Names registered: each login creates and claims only its own.
    admin
        .batch_execute(
            "INSERT INTO consumer_names VALUES ('alpha', 'c1');
             INSERT INTO consumer_positions (consumer, tx_id, id, owner) VALUES ('legacy', '1', 1, NULL);
             INSERT INTO consumer_names VALUES ('legacy', 'c1');",
        )
        .await
        .unwrap();
    position::publish(&c1, "alpha", Position::new(3, 3))
        .await
        .unwrap();
    denied_publish(
        position::publish(&c2, "alpha", Position::new(4, 4)).await,
        "another login's registered name",
    );
    denied_publish(
        position::publish(&c1, "squat", Position::new(4, 4)).await,
        "a name registered to nobody",
    );
    denied_publish(
        position::publish(&c2, "legacy", Position::new(4, 4)).await,
        "claiming another login's unowned legacy row",
    );
    position::publish(&c1, "legacy", Position::new(4, 4))
        .await
        .unwrap();
    denied_publish(
        position::publish(&c2, "anything", Position::new(2, 2)).await,
        "a row whose name is not registered to its owner",
    );
    admin
        .batch_execute("INSERT INTO consumer_names VALUES ('beta', 'c2'), ('anything', 'c2')")
        .await
        .unwrap();
    position::publish(&c2, "beta", Position::new(2, 2))
        .await
        .unwrap();
    position::publish(&c2, "anything", Position::new(2, 2))
        .await
        .unwrap();
    // Nobody but the owner touches the registry.
    assert_denied(
        c1.execute("INSERT INTO consumer_names VALUES ('gamma', 'c1')", &[])
            .await,
        "registering a name as a consumer",
    );
    migrations::check(&c1, migrations::Role::Consumer)
        .await
        .unwrap();
}
