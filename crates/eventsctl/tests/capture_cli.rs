//! `eventsctl capture` against a real PostgreSQL: add, list, remove, and the refusals with their
//! exit codes (2 bad input, 3 refused).

mod common;

use common::cli::{eventsctl, text};
use event_store::{db, migrations};
use testbed::Postgres;

#[tokio::test]
async fn capture_add_list_remove_through_the_cli() {
    let pg = Postgres::start();
    let mut admin = db::connect_spawned(&db::config(&pg.url(), "cli-test").unwrap())
        .await
        .unwrap();
    migrations::run(&mut admin).await.unwrap();
    pg.psql(
        r#"CREATE ROLE shop_owner LOGIN IN ROLE events_capture_admin;
           CREATE ROLE stranger LOGIN;
           CREATE SCHEMA shop AUTHORIZATION shop_owner;
           GRANT USAGE ON SCHEMA shop TO stranger;
           SET ROLE shop_owner;
           CREATE TABLE shop."Order Items" (order_id int, line int, qty int, secret text);"#,
    );
    let owner = pg.url_for("shop_owner", None);
    let table = r#"shop."Order Items""#;

    let no_key = eventsctl(&owner, &["capture", "add", table, "--topic", "items"]);
    assert_eq!(no_key.status.code(), Some(2), "{}", text(&no_key));
    assert!(text(&no_key).contains("--key-columns"), "{}", text(&no_key));

    let bad_topic = eventsctl(&owner, &["capture", "add", table, "--topic", "no spaces"]);
    assert_eq!(bad_topic.status.code(), Some(2), "{}", text(&bad_topic));

    let stranger = eventsctl(
        &pg.url_for("stranger", None),
        &[
            "capture",
            "add",
            table,
            "--topic",
            "items",
            "--key-columns",
            "order_id,line",
        ],
    );
    assert_eq!(stranger.status.code(), Some(3), "{}", text(&stranger));
    assert!(
        text(&stranger).contains("events_capture_admin"),
        "{}",
        text(&stranger)
    );

    let add = [
        "capture",
        "add",
        table,
        "--topic",
        "items",
        "--ops",
        "insert,delete",
        "--key-columns",
        "order_id,line",
        "--exclude-columns",
        "secret",
    ];
    let added = eventsctl(&owner, &add);
    assert_eq!(added.status.code(), Some(0), "{}", text(&added));
    let again = eventsctl(&owner, &add);
    assert_eq!(again.status.code(), Some(3), "{}", text(&again));
    assert!(
        text(&again).contains("already captured"),
        "{}",
        text(&again)
    );

    let listed = eventsctl(&owner, &["capture", "list", "--json"]);
    assert_eq!(listed.status.code(), Some(0), "{}", text(&listed));
    let json: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(
        json,
        serde_json::json!([{"table": "shop.\"Order Items\"", "topic": "items", "ops": ["insert", "delete"],
                             "key_columns": ["order_id", "line"], "exclude_columns": ["secret"],
                             "full_old": false}])
    );
    let table_view = eventsctl(&owner, &["capture", "list"]);
    assert!(
        String::from_utf8_lossy(&table_view.stdout).contains("shop.\"Order Items\"  items"),
        "{}",
        text(&table_view)
    );

    pg.psql(r#"INSERT INTO shop."Order Items" VALUES (1, 1, 2, 'x'); UPDATE shop."Order Items" SET qty = 3"#);
    assert_eq!(
        pg.psql("SELECT string_agg(type || ' ' || key, ';' ORDER BY id) FROM events"),
        r#"insert {"order_id":1,"line":1}"#,
        "only the chosen operations"
    );

    let removed = eventsctl(&owner, &["capture", "remove", table]);
    assert_eq!(removed.status.code(), Some(0), "{}", text(&removed));
    let none = eventsctl(&owner, &["capture", "list"]);
    assert!(
        String::from_utf8_lossy(&none.stdout).contains("no table is captured"),
        "{}",
        text(&none)
    );
    pg.psql(r#"DELETE FROM shop."Order Items""#);
    assert_eq!(
        pg.psql("SELECT count(*) FROM events"),
        "1",
        "removed: no more events"
    );
}
