//! Table-change capture against a real PostgreSQL: the payload contract for every operation,
//! schema changes, hostile names and types, refusals, and privileges (who may write a captured
//! table, who may set capture up, and that a caller cannot hijack the SECURITY DEFINER trigger).

use event_store::capture::{self, CaptureError, CaptureSpec, Op};
use event_store::{db, migrations, Topic};
use serde_json::{json, Value};
use testbed::Postgres;
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

async fn connect(url: &str) -> Client {
    db::connect_spawned(&db::config(url, "capture-test").unwrap())
        .await
        .unwrap()
}

async fn migrated() -> (Postgres, Client) {
    let pg = Postgres::start();
    let mut admin = connect(&pg.url()).await;
    migrations::run(&mut admin).await.unwrap();
    (pg, admin)
}

/// The two statements an UPDATE's events can come from: the generic one (cached plan, used for
/// statements of fewer than `pgevents.capture_bulk_rows` rows) and the one generated from the
/// table's current columns (larger statements). Tests of the payload contract run on both,
/// forcing one with the setting, and expect exactly the same events.
#[derive(Clone, Copy, Debug)]
enum UpdatePath {
    Generic,
    Generated,
}

async fn migrated_on(path: UpdatePath) -> (Postgres, Client) {
    let (pg, admin) = migrated().await;
    let bulk_rows = match path {
        UpdatePath::Generic => 1_000_000_000 - 1,
        UpdatePath::Generated => 0,
    };
    admin
        .batch_execute(&format!(
            "DO $$ BEGIN
                 EXECUTE format('ALTER DATABASE %I SET pgevents.capture_bulk_rows = {bulk_rows}', current_database());
             END $$"
        ))
        .await
        .unwrap();
    let admin = connect(&pg.url()).await;
    (pg, admin)
}

/// One test per [`UpdatePath`] for each named test body `fn(UpdatePath)`.
macro_rules! on_both_update_paths {
    ($($body:ident),* $(,)?) => {
        mod generic {
            $(#[tokio::test]
            async fn $body() {
                super::$body(super::UpdatePath::Generic).await;
            })*
        }
        mod generated {
            $(#[tokio::test]
            async fn $body() {
                super::$body(super::UpdatePath::Generated).await;
            })*
        }
    };
}

on_both_update_paths!(
    every_operation_becomes_the_documented_event,
    schema_changes_never_break_capture_or_leak_an_excluded_column,
    hostile_names_and_every_column_type_arrive_intact,
    updates_pair_each_row_with_itself,
    edge_cases_never_fail_the_write_and_both_paths_agree,
);

/// One captured event as the events table holds it.
#[derive(Debug, PartialEq)]
struct Row {
    topic: String,
    key: Option<String>,
    kind: String,
    payload: Value,
}

/// Events after id `after`, in id order.
async fn events_after(client: &Client, after: i64) -> Vec<Row> {
    client
        .query(
            "SELECT topic, key, type, payload FROM events WHERE id > $1 ORDER BY id",
            &[&after],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| Row {
            topic: r.get(0),
            key: r.get(1),
            kind: r.get(2),
            payload: r.get(3),
        })
        .collect()
}

async fn last_id(client: &Client) -> i64 {
    client
        .query_one("SELECT coalesce(max(id), 0) FROM events", &[])
        .await
        .unwrap()
        .get(0)
}

fn spec(table: &str, topic: &str) -> CaptureSpec {
    CaptureSpec::new(table, Topic::new(topic).unwrap())
}

fn row(topic: &str, key: &str, kind: &str, payload: Value) -> Row {
    Row {
        topic: topic.into(),
        key: Some(key.into()),
        kind: kind.into(),
        payload,
    }
}

async fn every_operation_becomes_the_documented_event(path: UpdatePath) {
    let (_pg, admin) = migrated_on(path).await;
    admin
        .batch_execute(
            "CREATE TABLE orders (id int PRIMARY KEY, status text, amount numeric, card text);",
        )
        .await
        .unwrap();
    capture::add(
        &admin,
        &spec("orders", "orders").exclude_columns(["card"]).unwrap(),
    )
    .await
    .unwrap();
    let table = |op: &str| json!({"op": op, "schema": "public", "table": "orders"});
    let with = |op: &str, extra: Value| {
        let mut v = table(op);
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        v
    };

    // A multi-row INSERT: one event per row, one statement.
    admin
        .batch_execute(
            "INSERT INTO orders VALUES (1, 'new', 10.50, '4111'), (2, 'new', 3, '4222'), (3, 'new', 7, NULL)",
        )
        .await
        .unwrap();
    // An UPDATE: only the changed column under `changed`; an UPDATE of nothing captured (the
    // excluded card, or a value set to itself) emits nothing.
    admin
        .batch_execute(
            "UPDATE orders SET status = 'paid' WHERE id = 1;
             UPDATE orders SET card = '9999';
             UPDATE orders SET status = status;",
        )
        .await
        .unwrap();
    // A key change is a delete of the old key and an insert of the new one; in the same
    // statement row 3 changes without a key change.
    admin
        .batch_execute(
            "UPDATE orders SET id = 20 WHERE id = 2;
             UPDATE orders SET amount = amount + 1 WHERE id = 3;
             DELETE FROM orders WHERE id = 1;",
        )
        .await
        .unwrap();
    // Rolled back: nothing.
    admin
        .batch_execute(
            "BEGIN; INSERT INTO orders VALUES (9, 'ghost', 0, NULL); UPDATE orders SET status = 'x'; ROLLBACK;",
        )
        .await
        .unwrap();
    admin.batch_execute("TRUNCATE orders").await.unwrap();

    let got = events_after(&admin, 0).await;
    let expected = vec![
        row(
            "orders",
            r#"{"id":1}"#,
            "insert",
            with(
                "insert",
                json!({"key": {"id": 1}, "new": {"id": 1, "status": "new", "amount": 10.50}}),
            ),
        ),
        row(
            "orders",
            r#"{"id":2}"#,
            "insert",
            with(
                "insert",
                json!({"key": {"id": 2}, "new": {"id": 2, "status": "new", "amount": 3}}),
            ),
        ),
        row(
            "orders",
            r#"{"id":3}"#,
            "insert",
            with(
                "insert",
                json!({"key": {"id": 3}, "new": {"id": 3, "status": "new", "amount": 7}}),
            ),
        ),
        row(
            "orders",
            r#"{"id":1}"#,
            "update",
            with(
                "update",
                json!({"key": {"id": 1}, "new": {"id": 1, "status": "paid", "amount": 10.50},
                                                                   "changed": {"status": {"old": "new", "new": "paid"}}}),
            ),
        ),
        row(
            "orders",
            r#"{"id":2}"#,
            "delete",
            with(
                "delete",
                json!({"key": {"id": 2}, "old": {"id": 2, "status": "new", "amount": 3}}),
            ),
        ),
        row(
            "orders",
            r#"{"id":20}"#,
            "insert",
            with(
                "insert",
                json!({"key": {"id": 20}, "new": {"id": 20, "status": "new", "amount": 3}}),
            ),
        ),
        row(
            "orders",
            r#"{"id":3}"#,
            "update",
            with(
                "update",
                json!({"key": {"id": 3}, "new": {"id": 3, "status": "new", "amount": 8},
                                                                   "changed": {"amount": {"old": 7, "new": 8}}}),
            ),
        ),
        row(
            "orders",
            r#"{"id":1}"#,
            "delete",
            with(
                "delete",
                json!({"key": {"id": 1}, "old": {"id": 1, "status": "paid", "amount": 10.50}}),
            ),
        ),
        Row {
            topic: "orders".into(),
            key: None,
            kind: "truncate".into(),
            payload: table("truncate"),
        },
    ];
    // A key change is the delete of the old key directly followed by the insert of the new one.
    assert_eq!(got, expected, "{path:?}");
    let dump = serde_json::to_string(&got.iter().map(|r| &r.payload).collect::<Vec<_>>()).unwrap();
    assert!(
        !dump.contains("card") && !dump.contains("4111") && !dump.contains("9999"),
        "{dump}"
    );

    // --full-old: updates carry the whole old row too; a multi-column key renders in key order.
    admin
        .batch_execute(
            "CREATE TABLE lines (order_id int, line int, qty int);
             INSERT INTO lines VALUES (1, 1, 5);",
        )
        .await
        .unwrap();
    capture::add(
        &admin,
        &spec("lines", "lines")
            .key_columns(["order_id", "line"])
            .unwrap()
            .ops(&[Op::Update])
            .full_old(true),
    )
    .await
    .unwrap();
    let before = last_id(&admin).await;
    admin
        .batch_execute("INSERT INTO lines VALUES (1, 2, 1); UPDATE lines SET qty = 6 WHERE line = 1; DELETE FROM lines;")
        .await
        .unwrap();
    assert_eq!(
        events_after(&admin, before).await,
        vec![row(
            "lines",
            r#"{"order_id":1,"line":1}"#,
            "update",
            json!({"op": "update", "schema": "public", "table": "lines",
                   "key": {"order_id": 1, "line": 1},
                   "new": {"order_id": 1, "line": 1, "qty": 6},
                   "old": {"order_id": 1, "line": 1, "qty": 5},
                   "changed": {"qty": {"old": 5, "new": 6}}})
        )],
        "only updates were asked for"
    );

    // The settings read back from the triggers.
    let listed = capture::list(&admin).await.unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(
        (
            listed[0].table.as_str(),
            &listed[0].key_columns,
            listed[0].ops.as_slice(),
            listed[0].full_old
        ),
        (
            "lines",
            &vec!["order_id".to_string(), "line".to_string()],
            [Op::Update].as_slice(),
            true
        )
    );
    assert_eq!(
        (
            listed[1].table.as_str(),
            listed[1].topic.as_str(),
            &listed[1].exclude_columns,
            listed[1].ops.as_slice()
        ),
        (
            "orders",
            "orders",
            &vec!["card".to_string()],
            Op::ALL.as_slice()
        )
    );
}

async fn schema_changes_never_break_capture_or_leak_an_excluded_column(path: UpdatePath) {
    let (_pg, admin) = migrated_on(path).await;
    admin
        .batch_execute(
            "CREATE TABLE accounts (id int PRIMARY KEY, email text, secret text, plan text);
             INSERT INTO accounts VALUES (1, 'a@x', 's1', 'free');",
        )
        .await
        .unwrap();
    capture::add(
        &admin,
        &spec("accounts", "accounts")
            .exclude_columns(["secret"])
            .unwrap(),
    )
    .await
    .unwrap();
    let before = last_id(&admin).await;
    admin
        .batch_execute(
            "ALTER TABLE accounts RENAME COLUMN secret TO token;
             UPDATE accounts SET token = 's2', plan = 'pro';
             ALTER TABLE accounts ADD COLUMN country text DEFAULT 'NL';
             UPDATE accounts SET country = 'BE';
             ALTER TABLE accounts DROP COLUMN email;
             INSERT INTO accounts (id, token, plan) VALUES (2, 's3', 'free');
             ALTER TABLE accounts RENAME COLUMN id TO account_id;
             ALTER TABLE accounts RENAME TO customers;
             DELETE FROM customers WHERE account_id = 2;",
        )
        .await
        .unwrap();
    let got: Vec<Value> = events_after(&admin, before)
        .await
        .into_iter()
        .map(|r| json!([r.key, r.payload]))
        .collect();
    assert_eq!(
        got,
        vec![
            json!([r#"{"id":1}"#, {"op": "update", "schema": "public", "table": "accounts", "key": {"id": 1},
                   "new": {"id": 1, "email": "a@x", "plan": "pro"},
                   "changed": {"plan": {"old": "free", "new": "pro"}}}]),
            json!([r#"{"id":1}"#, {"op": "update", "schema": "public", "table": "accounts", "key": {"id": 1},
                   "new": {"id": 1, "email": "a@x", "plan": "pro", "country": "BE"},
                   "changed": {"country": {"old": "NL", "new": "BE"}}}]),
            json!([r#"{"id":2}"#, {"op": "insert", "schema": "public", "table": "accounts", "key": {"id": 2},
                   "new": {"id": 2, "plan": "free", "country": "NL"}}]),
            json!([r#"{"account_id":2}"#, {"op": "delete", "schema": "public", "table": "customers",
                   "key": {"account_id": 2}, "old": {"account_id": 2, "plan": "free", "country": "NL"}}]),
        ]
    );
    let listed = capture::list(&admin).await.unwrap();
    assert_eq!(listed[0].qualified_name(), "public.customers");
    assert_eq!(listed[0].exclude_columns, ["token"]);
    assert_eq!(listed[0].key_columns, ["account_id"]);
}

async fn hostile_names_and_every_column_type_arrive_intact(path: UpdatePath) {
    let (_pg, admin) = migrated_on(path).await;
    admin
        .batch_execute(
            r#"CREATE SCHEMA "Sales Dept";
               CREATE TABLE "Sales Dept"."Order Items" (
                   "select" int PRIMARY KEY,
                   "Weird ""col""" text,
                   "prix €" numeric,
                   tags text[],
                   doc jsonb,
                   blob bytea,
                   at timestamptz,
                   "null" text,
                   big text);"#,
        )
        .await
        .unwrap();
    capture::add(&admin, &spec(r#""Sales Dept"."Order Items""#, "items"))
        .await
        .unwrap();
    admin
        .batch_execute(
            r#"INSERT INTO "Sales Dept"."Order Items" VALUES
                 (1, 'it''s "quoted"', 12345678901234567890123456789012345678.5, '{a,"b c"}',
                  '{"n": {"deep": [1, 2.5, null]}}', '\x00ff', '2024-01-02 03:04:05+00', NULL, repeat('x', 1048576));
               UPDATE "Sales Dept"."Order Items" SET "null" = 'now set', big = big || 'y';"#,
        )
        .await
        .unwrap();
    let got = events_after(&admin, 0).await;
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].key.as_deref(), Some(r#"{"select":1}"#));
    let new = &got[0].payload["new"];
    assert_eq!(got[0].payload["schema"], "Sales Dept");
    assert_eq!(got[0].payload["table"], "Order Items");
    assert_eq!(new["Weird \"col\""], r#"it's "quoted""#);
    // A jsonb number with every digit (serde_json's f64 would round it, so ask the server).
    let prix = admin
        .query_one(
            "SELECT jsonb_typeof(payload->'new'->'prix €'), (payload->'new'->'prix €')::text
               FROM events ORDER BY id LIMIT 1",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (prix.get::<_, String>(0), prix.get::<_, String>(1)),
        (
            "number".into(),
            "12345678901234567890123456789012345678.5".into()
        )
    );
    assert_eq!(new["tags"], json!(["a", "b c"]));
    assert_eq!(new["doc"], json!({"n": {"deep": [1, 2.5, null]}}));
    assert_eq!(new["blob"], "\\x00ff");
    assert_eq!(new["at"], "2024-01-02T03:04:05+00:00");
    assert_eq!(new["null"], Value::Null);
    assert_eq!(new["big"].as_str().unwrap().len(), 1_048_576);
    let changed = got[1].payload["changed"].as_object().unwrap();
    let mut names: Vec<&str> = changed.keys().map(String::as_str).collect();
    names.sort();
    assert_eq!(names, ["big", "null"]);
    assert_eq!(changed["null"], json!({"old": null, "new": "now set"}));
    assert_eq!(changed["big"]["new"].as_str().unwrap().len(), 1_048_577);

    // Reserved words as table names, through the regclass overload too.
    admin
        .batch_execute(r#"CREATE TABLE "user" (id int PRIMARY KEY); SELECT capture_add('"user"'::regclass, 'users');"#)
        .await
        .unwrap();
    admin
        .batch_execute(r#"INSERT INTO "user" VALUES (7)"#)
        .await
        .unwrap();
    let last = events_after(&admin, 2).await;
    assert_eq!(last[0].payload["table"], "user");
}

/// Old and new rows are paired row by row, not by key: a key that is not unique still gives one
/// event per updated row, and values are compared as their JSON forms are (so a json value that
/// only changed its spacing, or 1.0 becoming 1.00, is no change), whichever path runs.
async fn updates_pair_each_row_with_itself(path: UpdatePath) {
    let (_pg, admin) = migrated_on(path).await;
    admin
        .batch_execute(
            "CREATE TABLE readings (sensor int, note text, doc json, at point, code char(3), val numeric, x xml);
             INSERT INTO readings VALUES
                 (1, 'a', '{\"a\":1}', '(1,2)', 'ab', 1.0, '<a/>'),
                 (1, 'b', '{\"a\":1}', '(1,2)', 'ab', 2.0, '<a/>'),
                 (2, 'c', '[]', '(0,0)', 'zz', 3.0, NULL);",
        )
        .await
        .unwrap();
    capture::add(
        &admin,
        &spec("readings", "readings")
            .key_columns(["sensor"])
            .unwrap()
            .ops(&[Op::Update]),
    )
    .await
    .unwrap();
    admin
        .batch_execute(
            r#"UPDATE readings SET note = note || '!' WHERE sensor = 1;
               UPDATE readings SET doc = '{"a": 1}' WHERE sensor = 1;
               UPDATE readings SET val = val * 1.00, code = CASE WHEN sensor = 1 THEN 'ab' ELSE code END, x = x;
               UPDATE readings SET at = '(3,4)' WHERE sensor = 2;
               UPDATE readings SET sensor = 12, x = '<b/>' WHERE sensor = 2;
               UPDATE readings SET sensor = sensor + 1, note = 'moved' WHERE note IN ('a!', 'b!');"#,
        )
        .await
        .unwrap();
    let got: Vec<Value> = events_after(&admin, 0)
        .await
        .into_iter()
        .map(|r| {
            json!([
                r.key,
                r.kind,
                r.payload.get("changed"),
                r.payload["new"]["note"],
                r.payload.get("old").map(|o| &o["note"])
            ])
        })
        .collect();
    let none = Value::Null;
    assert_eq!(
        got,
        vec![
            json!([r#"{"sensor":1}"#, "update", {"note": {"old": "a", "new": "a!"}}, "a!", none]),
            json!([r#"{"sensor":1}"#, "update", {"note": {"old": "b", "new": "b!"}}, "b!", none]),
            json!([r#"{"sensor":2}"#, "update", {"at": {"old": "(0,0)", "new": "(3,4)"}}, "c", none]),
            json!([r#"{"sensor":2}"#, "delete", none, none, "c"]),
            json!([r#"{"sensor":12}"#, "insert", none, "c", none]),
            json!([r#"{"sensor":1}"#, "delete", none, none, "a!"]),
            json!([r#"{"sensor":2}"#, "insert", none, "moved", none]),
            json!([r#"{"sensor":1}"#, "delete", none, none, "b!"]),
            json!([r#"{"sensor":2}"#, "insert", none, "moved", none]),
        ],
        "{path:?}"
    );
}

/// Corners where the generic and the generated statement could part ways, or a write could fail:
/// a column named like the row alias, a dropped key column, a key of more than 50 columns, floats
/// printed with fewer digits, and an UPDATE whose rows PostgreSQL does not report pairwise (a row
/// moved to a partition whose BEFORE trigger suppressed the insert).
async fn edge_cases_never_fail_the_write_and_both_paths_agree(path: UpdatePath) {
    let (_pg, admin) = migrated_on(path).await;
    let wide_cols: Vec<String> = (1..=51).map(|i| format!("k{i} int")).collect();
    let wide_keys: Vec<String> = (1..=51).map(|i| format!("k{i}")).collect();
    admin
        .batch_execute(&format!(
            "CREATE TABLE aliased (id int PRIMARY KEY, t int, r int);
             INSERT INTO aliased VALUES (1, 5, 6);
             CREATE TABLE pair (a int, b int, v text);
             INSERT INTO pair VALUES (1, 1, 'x');
             CREATE TABLE wide ({}, v text);
             INSERT INTO wide SELECT {}, 'x';
             CREATE TABLE floats (id int PRIMARY KEY, f float8);
             INSERT INTO floats VALUES (1, 0.1);
             CREATE TABLE moved (id int, region text, v text) PARTITION BY LIST (region);
             CREATE TABLE moved_a PARTITION OF moved FOR VALUES IN ('a');
             CREATE TABLE moved_b PARTITION OF moved FOR VALUES IN ('b');
             CREATE FUNCTION drop_one() RETURNS trigger LANGUAGE plpgsql AS $$
                 BEGIN IF NEW.id = 1 THEN RETURN NULL; END IF; RETURN NEW; END $$;
             CREATE TRIGGER drop_one BEFORE INSERT ON moved_b FOR EACH ROW EXECUTE FUNCTION drop_one();
             INSERT INTO moved VALUES (1, 'a', 'x'), (2, 'a', 'y'), (3, 'a', 'z');",
            wide_cols.join(", "),
            (1..=51).map(|i| i.to_string()).collect::<Vec<_>>().join(", ")
        ))
        .await
        .unwrap();
    capture::add(&admin, &spec("aliased", "aliased"))
        .await
        .unwrap();
    capture::add(
        &admin,
        &spec("pair", "pair").key_columns(["a", "b"]).unwrap(),
    )
    .await
    .unwrap();
    capture::add(
        &admin,
        &spec("wide", "wide").key_columns(wide_keys.clone()).unwrap(),
    )
    .await
    .unwrap();
    capture::add(&admin, &spec("floats", "floats"))
        .await
        .unwrap();
    capture::add(&admin, &spec("moved", "moved").key_columns(["id"]).unwrap())
        .await
        .unwrap();
    let before = last_id(&admin).await;
    admin
        .batch_execute(
            "UPDATE aliased SET t = 7;
             INSERT INTO aliased VALUES (2, 8, 9);
             DELETE FROM aliased WHERE id = 2;
             ALTER TABLE pair DROP COLUMN a;
             UPDATE pair SET v = 'y';
             UPDATE wide SET v = 'y';
             SET extra_float_digits = 0;
             UPDATE floats SET f = 0.1000000000000001;
             RESET extra_float_digits;
             UPDATE moved SET region = 'b';",
        )
        .await
        .unwrap();
    let got: Vec<(String, Option<String>, String, Value)> = events_after(&admin, before)
        .await
        .into_iter()
        .map(|r| {
            let changed = r.payload.get("changed").cloned().unwrap_or(Value::Null);
            (r.topic, r.key, r.kind, changed)
        })
        .collect();
    let wide_key = format!(
        "{{{}}}",
        (1..=51)
            .map(|i| format!("\"k{i}\":{i}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    let ev = |topic: &str, key: &str, kind: &str, changed: Value| {
        (
            topic.to_string(),
            Some(key.to_string()),
            kind.to_string(),
            changed,
        )
    };
    assert_eq!(
        got,
        vec![
            ev(
                "aliased",
                r#"{"id":1}"#,
                "update",
                json!({"t": {"old": 5, "new": 7}})
            ),
            ev("aliased", r#"{"id":2}"#, "insert", Value::Null),
            ev("aliased", r#"{"id":2}"#, "delete", Value::Null),
            ev(
                "pair",
                r#"{"........pg.dropped.1........":null,"b":1}"#,
                "update",
                json!({"v": {"old": "x", "new": "y"}})
            ),
            ev(
                "wide",
                &wide_key,
                "update",
                json!({"v": {"old": "x", "new": "y"}})
            ),
            // No event for the floats: printed with 0 extra digits, both values are 0.1.
            ev("moved", r#"{"id":1}"#, "delete", Value::Null),
            ev("moved", r#"{"id":2}"#, "delete", Value::Null),
            ev("moved", r#"{"id":3}"#, "delete", Value::Null),
            ev("moved", r#"{"id":2}"#, "insert", Value::Null),
            ev("moved", r#"{"id":3}"#, "insert", Value::Null),
        ],
        "{path:?}"
    );
    let aliased = admin
        .query_one(
            "SELECT payload FROM events WHERE topic = 'aliased' AND type = 'update' AND id > $1",
            &[&before],
        )
        .await
        .unwrap()
        .get::<_, Value>(0);
    assert_eq!(aliased["new"], json!({"id": 1, "t": 7, "r": 6}), "{path:?}");
}

/// `migrate` as a database owner that is not a superuser (the documented way), with a role prefix
/// of its own: capture's roles are that database's (`<prefix>_capture` owns the trigger
/// functions, `<prefix>_capture_admin` may add capture), and the cluster-wide roles of V5 can do
/// nothing there.
#[tokio::test]
async fn capture_roles_belong_to_one_database_and_a_plain_owner_can_migrate() {
    let pg = Postgres::start();
    pg.psql("CREATE ROLE app_owner LOGIN CREATEROLE; CREATE ROLE stranger LOGIN");
    pg.psql("CREATE DATABASE app OWNER app_owner");
    let url = |user: &str| format!("postgres://{user}@127.0.0.1:{}/app", pg.port());
    let mut owner = connect(&url("app_owner")).await;
    migrations::run_with(&mut owner, "app")
        .await
        .expect("a non-superuser owner migrates");
    let facts = owner
        .query_one(
            "SELECT (SELECT string_agg(job || '=' || role, ',' ORDER BY job) FROM event_stream_roles
                      WHERE job LIKE 'capture%'),
                    (SELECT proowner::regrole::text FROM pg_proc WHERE oid = 'capture_update()'::regprocedure),
                    has_schema_privilege('app_capture', 'public', 'CREATE'),
                    has_schema_privilege('events_capture', 'public', 'CREATE'),
                    has_any_column_privilege('events_capture', 'events', 'INSERT'),
                    has_any_column_privilege('app_capture', 'events', 'INSERT'),
                    has_function_privilege('events_capture_admin', 'capture_add(text, text, text[], text[], text[], boolean)', 'EXECUTE'),
                    pg_has_role('app_owner', 'events_capture', 'MEMBER') OR pg_has_role('app_owner', 'app_capture', 'MEMBER')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            facts.get::<_, String>(0),
            facts.get::<_, String>(1),
            facts.get::<_, bool>(2),
            facts.get::<_, bool>(3),
            facts.get::<_, bool>(4),
            facts.get::<_, bool>(5),
            facts.get::<_, bool>(6),
            facts.get::<_, bool>(7),
        ),
        (
            "capture=app_capture,capture_admin=app_capture_admin".to_string(),
            "app_capture".to_string(),
            false,
            false,
            false,
            true,
            false,
            false
        ),
        "(capture roles; function owner; CREATE on public for app_capture, events_capture; \
         INSERT on events for events_capture, app_capture; EXECUTE capture_add for \
         events_capture_admin; the owner still a member of a capture role)"
    );

    // The owner, made this database's capture admin, captures its table.
    owner
        .batch_execute(
            "GRANT app_capture_admin TO app_owner;
             GRANT CREATE ON SCHEMA public TO stranger;
             GRANT events_capture_admin TO stranger;
             CREATE TABLE orders (id int PRIMARY KEY, status text);",
        )
        .await
        .unwrap();
    capture::add(&owner, &spec("orders", "orders"))
        .await
        .unwrap();
    owner
        .batch_execute("INSERT INTO orders VALUES (1, 'new')")
        .await
        .unwrap();
    assert_eq!(
        events_after(&owner, 0).await,
        vec![row(
            "orders",
            r#"{"id":1}"#,
            "insert",
            json!({"op": "insert", "schema": "public", "table": "orders", "key": {"id": 1},
                   "new": {"id": 1, "status": "new"}})
        )]
    );

    // A member of V5's cluster-wide admin role only, owning a table here, may not; the hint names
    // this database's admin role.
    let stranger = connect(&url("stranger")).await;
    stranger
        .batch_execute("CREATE TABLE mine (id int PRIMARY KEY)")
        .await
        .unwrap();
    let err = capture::add(&stranger, &spec("mine", "mine"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{err}");
    let CaptureError::Refused { hint, .. } = &err else {
        panic!("{err:?}")
    };
    assert!(
        hint.as_deref()
            .unwrap_or_default()
            .contains("GRANT app_capture_admin"),
        "{hint:?}"
    );
}

fn refused(result: Result<impl std::fmt::Debug, CaptureError>, code: SqlState, needle: &str) {
    let err = result.expect_err(needle);
    assert_eq!(err.code(), Some(&code), "{err}");
    assert!(
        err.to_string().contains(needle),
        "{err:?} should mention {needle:?}"
    );
}

#[tokio::test]
async fn bad_requests_are_refused_with_the_cause_and_the_fix() {
    let (_pg, admin) = migrated().await;
    admin
        .batch_execute(
            "CREATE TABLE nopk (a int, b text);
             CREATE TABLE t (id int PRIMARY KEY, v text);
             CREATE VIEW v AS SELECT 1 AS x;",
        )
        .await
        .unwrap();
    refused(
        capture::add(&admin, &spec("nopk", "x")).await,
        SqlState::INVALID_PARAMETER_VALUE,
        "has no primary key",
    );
    let err = capture::add(&admin, &spec("nopk", "x")).await.unwrap_err();
    assert!(err.to_string().contains("--key-columns"), "{err}");
    refused(
        capture::add(&admin, &spec("nopk", "x").key_columns(["nope"]).unwrap()).await,
        SqlState::UNDEFINED_COLUMN,
        "has no column nope",
    );
    refused(
        capture::add(&admin, &spec("missing", "x")).await,
        SqlState::UNDEFINED_TABLE,
        "does not exist",
    );
    refused(
        capture::add(&admin, &spec("v", "x")).await,
        SqlState::WRONG_OBJECT_TYPE,
        "is not a table",
    );
    refused(
        capture::add(&admin, &spec("events", "x")).await,
        SqlState::INVALID_PARAMETER_VALUE,
        "events table itself",
    );
    // The topic rule is enforced in SQL too, for callers of the SQL functions.
    let err = admin
        .execute("SELECT capture_add('t', 'bad topic')", &[])
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&SqlState::INVALID_PARAMETER_VALUE),
        "{err}"
    );
    let err = admin
        .execute("SELECT capture_add('t', 't', ops => ARRAY['upsert'])", &[])
        .await
        .unwrap_err();
    assert!(
        err.as_db_error()
            .unwrap()
            .message()
            .contains("unknown operation"),
        "{err}"
    );

    // Adding twice is an error, not a silent replace; remove, then add again, works.
    capture::add(&admin, &spec("t", "t")).await.unwrap();
    refused(
        capture::add(&admin, &spec("t", "other")).await,
        SqlState::DUPLICATE_OBJECT,
        "already captured",
    );
    admin
        .batch_execute("INSERT INTO t VALUES (1, 'a')")
        .await
        .unwrap();
    assert!(capture::remove(&admin, "t").await.unwrap());
    assert!(
        !capture::remove(&admin, "t").await.unwrap(),
        "a second remove finds nothing"
    );
    admin
        .batch_execute(
            "INSERT INTO t VALUES (2, 'b'); UPDATE t SET v = 'c'; DELETE FROM t WHERE id = 1",
        )
        .await
        .unwrap();
    assert_eq!(
        events_after(&admin, 0).await.len(),
        1,
        "remove stops the events"
    );
    let rows = admin
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap();
    assert_eq!(
        rows.get::<_, i64>(0),
        1,
        "remove leaves the table and its data alone"
    );
    assert!(capture::list(&admin).await.unwrap().is_empty());
    capture::add(&admin, &spec("t", "other")).await.unwrap();
}

#[tokio::test]
async fn writers_need_no_grant_on_events_and_only_owners_who_are_capture_admins_manage_capture() {
    let (pg, admin) = migrated().await;
    admin
        .batch_execute(
            "CREATE ROLE owner_role LOGIN IN ROLE events_capture_admin;
             CREATE ROLE plain_owner LOGIN;
             CREATE ROLE other_admin LOGIN IN ROLE events_capture_admin;
             CREATE ROLE app LOGIN;
             CREATE SCHEMA shop AUTHORIZATION owner_role;
             CREATE SCHEMA app AUTHORIZATION app;
             GRANT CREATE ON SCHEMA public TO plain_owner;",
        )
        .await
        .unwrap();
    let owner = connect(&pg.url_for("owner_role", None)).await;
    owner
        .batch_execute(
            "CREATE TABLE shop.orders (id int PRIMARY KEY, status text);
             GRANT USAGE ON SCHEMA shop TO app, other_admin;
             GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON shop.orders TO app;",
        )
        .await
        .unwrap();

    // A capture admin that does not own the table: refused.
    let other = connect(&pg.url_for("other_admin", None)).await;
    refused(
        capture::add(&other, &spec("shop.orders", "orders")).await,
        SqlState::INSUFFICIENT_PRIVILEGE,
        "must be the owner of table shop.orders",
    );
    // An owner that is not a capture admin: refused (otherwise anyone able to create a table
    // could publish events on any topic).
    let plain = connect(&pg.url_for("plain_owner", None)).await;
    plain
        .batch_execute("CREATE TABLE mine (id int PRIMARY KEY)")
        .await
        .unwrap();
    let err = capture::add(&plain, &spec("mine", "orders"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{err}");
    assert!(
        err.to_string().contains("GRANT events_capture_admin"),
        "{err}"
    );
    // The owner, a capture admin: accepted.
    capture::add(&owner, &spec("shop.orders", "orders"))
        .await
        .unwrap();
    // Removing is the owner's too.
    refused(
        capture::remove(&other, "shop.orders").await,
        SqlState::INSUFFICIENT_PRIVILEGE,
        "must be owner",
    );

    // The application writes the captured table without any privilege on events…
    let app = connect(&pg.url_for("app", None)).await;
    let denied = app
        .execute(
            "INSERT INTO events (topic, payload) VALUES ('orders', '{}')",
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE));
    // …and tries to hijack the trigger: its own `events` table in pg_temp, its own jsonb
    // functions and operators in a schema searched before pg_catalog.
    app.batch_execute(
        "CREATE TEMP TABLE events (topic text, key text, type text, payload jsonb);
         CREATE TABLE app.hijacked (who text);
         CREATE FUNCTION app.to_jsonb(anyelement) RETURNS jsonb LANGUAGE sql
             AS $$ INSERT INTO app.hijacked VALUES (current_user) RETURNING '{}'::jsonb $$;
         CREATE FUNCTION app.jsonb_each(jsonb, OUT key text, OUT value jsonb) RETURNS SETOF record
             LANGUAGE sql AS $$ INSERT INTO app.hijacked VALUES (current_user) RETURNING 'k', '{}'::jsonb $$;
         CREATE FUNCTION app.minus(jsonb, text[]) RETURNS jsonb LANGUAGE sql
             AS $$ INSERT INTO app.hijacked VALUES (current_user) RETURNING '{}'::jsonb $$;
         CREATE OPERATOR app.- (FUNCTION = app.minus, LEFTARG = jsonb, RIGHTARG = text[]);
         SET search_path = pg_temp, app, pg_catalog, public;
         INSERT INTO shop.orders VALUES (1, 'new'), (2, 'new');
         UPDATE shop.orders SET status = 'paid' WHERE id = 1;
         DELETE FROM shop.orders WHERE id = 2;
         TRUNCATE shop.orders;",
    )
    .await
    .expect("the application writes a captured table without any grant on events");
    let hijacked = app
        .query_one("SELECT count(*) FROM app.hijacked", &[])
        .await
        .unwrap();
    assert_eq!(
        hijacked.get::<_, i64>(0),
        0,
        "none of the caller's objects ran"
    );
    let temp = app
        .query_one("SELECT count(*) FROM pg_temp.events", &[])
        .await
        .unwrap();
    assert_eq!(
        temp.get::<_, i64>(0),
        0,
        "the events went to the real table"
    );
    let kinds: Vec<String> = events_after(&admin, 0)
        .await
        .into_iter()
        .map(|r| r.kind)
        .collect();
    assert_eq!(kinds, ["insert", "insert", "update", "delete", "truncate"]);

    // The trigger's owner may only append.
    let owner_of: String = admin
        .query_one(
            "SELECT proowner::regrole::text FROM pg_proc WHERE oid = 'capture_update()'::regprocedure",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(owner_of, "events_capture");
    let privileges: Vec<String> = admin
        .query(
            "SELECT p FROM unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE', 'TRUNCATE']) p
              WHERE CASE WHEN p IN ('DELETE', 'TRUNCATE')
                         THEN has_table_privilege('events_capture', 'events', p)
                         ELSE has_any_column_privilege('events_capture', 'events', p) END",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(privileges, ["INSERT"]);
    // Nobody but capture admins can attach the trigger functions.
    let err = plain
        .batch_execute("CREATE TRIGGER sneaky AFTER INSERT ON mine FOR EACH STATEMENT EXECUTE FUNCTION capture_truncate('payments', '1', '', 'false')")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{err}");
}
