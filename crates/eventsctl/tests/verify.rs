//! `eventsctl capture verify` against a real PostgreSQL and MongoDB-wire server, on a mirror the
//! consumer keeps without transactions (idempotent writes, then the checkpoint): a key of two
//! columns becomes an `_id` document in key order; verify passes on equality (exit 0) and names
//! each kind of difference (exit 1).

mod common;

use std::time::Duration;

use common::*;
use consumer::config::Transactions;
use mongodb::bson::{doc, Bson, Document};

#[tokio::test(flavor = "multi_thread")]
async fn verify_passes_on_an_equal_mirror_and_names_what_differs() {
    let env = setup(true).await;
    env.admin
        .batch_execute(
            r#"CREATE ROLE shop_owner LOGIN IN ROLE events_capture_admin;
               CREATE SCHEMA shop AUTHORIZATION shop_owner;
               SET ROLE shop_owner;
               CREATE TABLE shop."Order Lines" (tenant int NOT NULL, "line no" text NOT NULL, qty numeric,
                                                 doc jsonb, card text, PRIMARY KEY (tenant, "line no"));
               INSERT INTO shop."Order Lines"
               SELECT i % 4, 'l' || i, i * 1.25 + 0.000000000000000000001, jsonb_build_object('i', i), 'card'
                 FROM generate_series(1, 300) i;
               SELECT capture_add('shop."Order Lines"', 'lines', exclude_columns => ARRAY['card']);
               RESET ROLE;"#,
        )
        .await
        .unwrap();
    let table = r#"shop."Order Lines""#;

    let mut config = env.consumer_config("mirror");
    config.mongodb_transactions = Transactions::Off;
    config.mirror = vec!["lines=lines".into()];
    let consumer = spawn(config);

    let backfill = env
        .ctl_as(
            "shop_owner",
            &["capture", "backfill", table, "--chunk-rows", "70"],
            None,
        )
        .await;
    assert_exit(&backfill, 0, "backfill");
    env.admin
        .batch_execute(
            r#"UPDATE shop."Order Lines" SET qty = qty + 1 WHERE tenant = 1;
               DELETE FROM shop."Order Lines" WHERE tenant = 2 AND "line no" < 'l2';
               UPDATE shop."Order Lines" SET "line no" = "line no" || '-moved' WHERE tenant = 3 AND "line no" < 'l2';
               INSERT INTO shop."Order Lines" VALUES (9, 'new', 99999999999999999999999999.5, NULL, 'x');"#,
        )
        .await
        .unwrap();
    let last: i64 = env
        .admin
        .query_one(
            "SELECT id FROM events ORDER BY tx_id DESC, id DESC LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    wait_until(
        "the mirror consumer caught up",
        Duration::from_secs(60),
        || async {
            env.checkpoint("mirror")
                .await
                .is_some_and(|c| c.get_i64("id") == Ok(last))
        },
    )
    .await;
    consumer.stop().await;

    let verify = ["capture", "verify", table, "--collection", "lines"];
    let equal = env.ctl_as("shop_owner", &verify, None).await;
    assert_exit(&equal, 0, "verify an equal mirror");
    let rows = env.pg.psql(r#"SELECT count(*) FROM shop."Order Lines""#);
    assert!(rows.parse::<i64>().unwrap() > 250);
    assert!(
        stdout(&equal).contains(&format!("are equal: {rows} rows, all {rows} rows compared")),
        "{}",
        stdout(&equal)
    );
    let sampled = env
        .ctl_as(
            "shop_owner",
            &[
                "capture",
                "verify",
                table,
                "--collection",
                "lines",
                "--sample",
                "25",
            ],
            None,
        )
        .await;
    assert_exit(&sampled, 0, "verify a sample");
    assert!(
        stdout(&sampled).contains("a sample of 25 rows"),
        "{}",
        stdout(&sampled)
    );

    let lines = env.mongo_db().await.collection::<Document>("lines");
    let moved = lines
        .find_one(doc! {"_id": {"tenant": 3, "line no": "l11-moved"}})
        .await
        .unwrap()
        .expect("a key of two columns is an _id document in key order; a moved key is there");
    assert!(moved.get("card").is_none(), "excluded columns stay out");
    let big = lines
        .find_one(doc! {"_id": {"tenant": 9, "line no": "new"}})
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(big.get("qty"), Some(Bson::Decimal128(d)) if d.to_string().starts_with("99999999999999999999999999.5")),
        "{big:?}"
    );
    assert!(
        lines
            .find_one(doc! {"_id": {"tenant": 3, "line no": "l11"}})
            .await
            .unwrap()
            .is_none(),
        "the old key of a moved row is gone"
    );

    // Three kinds of difference, each named.
    lines
        .update_one(
            doc! {"_id": {"tenant": 1, "line no": "l1"}},
            doc! {"$set": {"qty": 0}},
        )
        .await
        .unwrap();
    lines
        .delete_one(doc! {"_id": {"tenant": 0, "line no": "l4"}})
        .await
        .unwrap();
    lines
        .insert_one(doc! {"_id": {"tenant": 7, "line no": "ghost"}, "tenant": 7})
        .await
        .unwrap();
    let differs = env.ctl_as("shop_owner", &verify, None).await;
    assert_exit(&differs, 1, "verify a changed mirror");
    let out = stdout(&differs);
    assert!(out.contains("different values"), "{out}");
    assert!(out.contains("missing in the mirror"), "{out}");
    assert!(out.contains("not in the table"), "{out}");
    assert!(
        !out.contains("counts differ"),
        "one missing, one extra: {out}"
    );
}
