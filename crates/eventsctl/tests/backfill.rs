//! `eventsctl capture backfill` against a real PostgreSQL: `read` events with the insert's
//! payload contract (hostile names, no primary key, a TOASTed value, a type the owner made),
//! NULL keys refused, a killed backfill resumed without reading a finished chunk again, `capture
//! list`, the refusals, and causal order per key while writers keep changing the rows.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::cli::{eventsctl, text};
use event_store::{db, migrations};
use serde_json::Value;
use testbed::Postgres;
use tokio_postgres::Client;

async fn connect(url: &str) -> Client {
    db::connect_spawned(&db::config(url, "backfill-test").unwrap())
        .await
        .unwrap()
}

/// A migrated cluster with `shop_owner` (a capture admin owning schema `shop`) and `stranger`
/// (a capture admin too, owning nothing).
async fn setup() -> (Postgres, Client) {
    let pg = Postgres::start();
    let mut admin = connect(&pg.url()).await;
    migrations::run(&mut admin).await.unwrap();
    pg.psql(
        r#"CREATE ROLE shop_owner LOGIN IN ROLE events_capture_admin;
           CREATE ROLE stranger LOGIN IN ROLE events_capture_admin;
           CREATE SCHEMA shop AUTHORIZATION shop_owner;
           GRANT USAGE ON SCHEMA shop TO stranger;"#,
    );
    (pg, admin)
}

/// (type, key text, payload) of every event, in stream order.
async fn events(client: &Client) -> Vec<(String, Option<String>, Value)> {
    client
        .query(
            "SELECT type, key, payload FROM events ORDER BY tx_id, id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

#[tokio::test]
async fn read_events_carry_what_an_insert_carries_in_key_order() {
    let (pg, admin) = setup().await;
    // Hostile names everywhere, no primary key (key columns given), a column called like the
    // chunk's row alias, an excluded column, a type the owner made (text output), exact numbers,
    // and a ~1 MB value that PostgreSQL keeps TOASTed.
    pg.psql(
        r#"CREATE SCHEMA "we""ird" AUTHORIZATION shop_owner;
           SET ROLE shop_owner;
           CREATE TYPE shop.mood AS ENUM ('ok', 'bad');
           CREATE TABLE "we""ird"."Order Items" (
               "tenant id" int NOT NULL, "line;--" text NOT NULL, backfill_row int,
               "select" numeric, "Big" text, mood shop.mood, doc jsonb, raw bytea, f float8,
               secret text);
           INSERT INTO "we""ird"."Order Items"
           SELECT i % 3, 'l' || (i / 3), i, (i::text || '12345678901234567890.000000000000000001')::numeric,
                  CASE WHEN i = 4 THEN (SELECT string_agg(md5(random()::text || j), '') FROM generate_series(1, 32768) j) END,
                  CASE WHEN i % 2 = 0 THEN 'ok' ELSE 'bad' END::shop.mood,
                  jsonb_build_object('n', i, 'deep', jsonb_build_array(1e400, 'x')), '\x00ff'::bytea, i / 7.0,
                  'pin' || i
             FROM generate_series(1, 11) i;"#,
    );
    assert_eq!(
        pg.psql(r#"SELECT pg_column_size("Big") > 400000 AND length("Big") > 1000000 FROM "we""ird"."Order Items" WHERE backfill_row = 4"#),
        "t"
    );
    let owner = pg.url_for("shop_owner", None);
    let table = r#""we""ird"."Order Items""#;
    let added = eventsctl(
        &owner,
        &[
            "capture",
            "add",
            table,
            "--topic",
            "items",
            "--key-columns",
            "tenant id,line;--",
            "--exclude-columns",
            "secret",
        ],
    );
    assert_eq!(added.status.code(), Some(0), "{}", text(&added));

    let out = eventsctl(&owner, &["capture", "backfill", table, "--chunk-rows", "3"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("11 rows read"), "{}", text(&out));

    let reads: Vec<(String, Option<String>)> = admin
        .query("SELECT type, key FROM events ORDER BY tx_id, id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(reads.len(), 11);
    assert!(reads.iter().all(|(t, _)| t == "read"));
    // Key order: (tenant id, line;--), as the table sorts them.
    let expected_keys: Vec<String> = pg
        .psql(r#"SELECT string_agg(format('{"tenant id":%s,"line;--":%s}', "tenant id", to_json("line;--")), E'\n' ORDER BY "tenant id", "line;--") FROM "we""ird"."Order Items""#)
        .lines()
        .map(str::to_string)
        .collect();
    let keys: Vec<String> = reads.iter().map(|(_, k)| k.clone().unwrap()).collect();
    assert_eq!(keys, expected_keys);
    assert_eq!(
        pg.psql("SELECT count(DISTINCT tx_id) FROM events"),
        "4",
        "chunks of 3 rows, one transaction each"
    );

    // The same rows inserted again: every read's key, `key` and `new` equal the insert's.
    pg.psql(
        r#"CREATE TABLE copy AS SELECT * FROM "we""ird"."Order Items";
           DELETE FROM "we""ird"."Order Items";
           INSERT INTO "we""ird"."Order Items" SELECT * FROM copy;"#,
    );
    // Compared in SQL: jsonb equality is exact for numbers no double holds (1e400).
    let compared = admin
        .query_one(
            r#"SELECT count(*), count(*) FILTER (WHERE r.payload->'key' = i.payload->'key'
                                                   AND r.payload->'new' = i.payload->'new'
                                                   AND r.payload->>'schema' = 'we"ird'
                                                   AND r.payload->>'table' = 'Order Items'
                                                   AND r.payload->>'op' = 'read'
                                                   AND NOT r.payload->'new' ? 'secret')
                 FROM events r JOIN events i ON i.key = r.key AND i.type = 'insert'
                WHERE r.type = 'read'"#,
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (compared.get::<_, i64>(0), compared.get::<_, i64>(1)),
        (11, 11)
    );
    let facts = admin
        .query_one(
            r#"SELECT length(payload->'new'->>'Big'), payload->'new'->>'mood', payload->'new'->'doc'->'deep'->>0
                 FROM events WHERE type = 'read' AND payload->'new'->>'backfill_row' = '4'"#,
            &[],
        )
        .await
        .unwrap();
    assert_eq!(facts.get::<_, i32>(0), 32 * 32768);
    assert_eq!(
        facts.get::<_, String>(1),
        "ok",
        "the owner's type as its text output"
    );
    assert!(
        facts.get::<_, String>(2).starts_with("1000000000"),
        "1e400, every digit"
    );
    // Finished: listed with its counts, and a second run is a new backfill.
    let listed = eventsctl(&owner, &["capture", "list", "--json"]);
    let json: Value = serde_json::from_slice(&listed.stdout).unwrap();
    let b = &json[0]["backfills"][0];
    assert_eq!(b["state"], "finished", "{json}");
    assert_eq!(b["rows_done"], 11);
    assert_eq!(b["rows_remaining"], 0);
    assert_eq!(b["chunks_done"], 4);
}

#[tokio::test]
async fn null_keys_missing_capture_and_strangers_are_refused_clearly() {
    let (pg, admin) = setup().await;
    pg.psql(
        r#"SET ROLE shop_owner;
           CREATE TABLE shop.audit (tenant int, seq int, what text);
           INSERT INTO shop.audit VALUES (1, 1, 'a'), (1, NULL, 'b');
           CREATE TABLE shop.plain (id int PRIMARY KEY);"#,
    );
    let owner = pg.url_for("shop_owner", None);

    let not_captured = eventsctl(&owner, &["capture", "backfill", "shop.plain"]);
    assert_eq!(
        not_captured.status.code(),
        Some(2),
        "{}",
        text(&not_captured)
    );
    assert!(
        text(&not_captured).contains("is not captured"),
        "{}",
        text(&not_captured)
    );

    let added = eventsctl(
        &owner,
        &[
            "capture",
            "add",
            "shop.audit",
            "--topic",
            "audit",
            "--key-columns",
            "tenant,seq",
        ],
    );
    assert_eq!(added.status.code(), Some(0), "{}", text(&added));
    let nulls = eventsctl(&owner, &["capture", "backfill", "shop.audit"]);
    assert_eq!(nulls.status.code(), Some(2), "{}", text(&nulls));
    assert!(
        text(&nulls).contains("rows whose key (tenant, seq) is NULL")
            && text(&nulls).contains("--where"),
        "{}",
        text(&nulls)
    );
    // A condition that leaves them out works.
    let some = eventsctl(
        &owner,
        &[
            "capture",
            "backfill",
            "shop.audit",
            "--where",
            "seq IS NOT NULL",
        ],
    );
    assert_eq!(some.status.code(), Some(0), "{}", text(&some));
    assert_eq!(
        pg.psql("SELECT string_agg(key, ',') FROM events WHERE type = 'read'"),
        r#"{"tenant":1,"seq":1}"#
    );
    let bad_where = eventsctl(
        &owner,
        &[
            "capture",
            "backfill",
            "shop.audit",
            "--where",
            "no_such_column > 1",
        ],
    );
    assert_eq!(bad_where.status.code(), Some(2), "{}", text(&bad_where));

    // Another capture admin may not read the owner's rows into events, neither through the
    // command nor by calling the writer with rows it made up.
    let stranger_url = pg.url_for("stranger", None);
    let stranger = eventsctl(
        &stranger_url,
        &[
            "capture",
            "backfill",
            "shop.audit",
            "--where",
            "seq IS NOT NULL",
        ],
    );
    assert_eq!(stranger.status.code(), Some(3), "{}", text(&stranger));
    let stranger_client = connect(&stranger_url).await;
    let forged = stranger_client
        .execute(
            "SELECT capture_backfill_write('shop.audit'::regclass, ARRAY[ROW(9, 9, 'forged')::shop.audit])",
            &[],
        )
        .await
        .unwrap_err();
    assert!(
        forged.to_string().contains("must be the owner")
            || format!("{forged:?}").contains("must be the owner"),
        "{forged:?}"
    );
    let owner_client = connect(&owner).await;
    let wrong_type = owner_client
        .execute(
            "SELECT capture_backfill_write('shop.audit'::regclass, ARRAY[ROW(9)::shop.plain])",
            &[],
        )
        .await
        .unwrap_err();
    assert!(
        format!("{wrong_type:?}").contains("array of rows of table"),
        "{wrong_type:?}"
    );
    // And nobody outside the capture admin role may call it at all.
    pg.psql("CREATE ROLE nobody LOGIN");
    let nobody = connect(&pg.url_for("nobody", None)).await;
    assert!(nobody
        .execute("SELECT capture_backfill_start('shop.audit')", &[])
        .await
        .is_err());
    assert_eq!(
        admin
            .query_one("SELECT count(*) FROM events WHERE key LIKE '%9%'", &[])
            .await
            .unwrap()
            .get::<_, i64>(0),
        0
    );
}

#[tokio::test]
async fn a_killed_backfill_resumes_after_its_last_finished_chunk() {
    let (pg, admin) = setup().await;
    let rows = 30_000;
    pg.psql(&format!(
        "SET ROLE shop_owner;
         CREATE TABLE shop.orders (id bigint PRIMARY KEY, note text);
         INSERT INTO shop.orders SELECT i, repeat('x', 200) FROM generate_series(1, {rows}) i;
         SELECT capture_add('shop.orders', 'orders');"
    ));
    let owner = pg.url_for("shop_owner", None);
    let mut child = Command::new(env!("CARGO_BIN_EXE_eventsctl"))
        .env("DATABASE_URL", &owner)
        .args(["capture", "backfill", "shop.orders", "--chunk-rows", "200"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let done: i64 = admin
            .query_one(
                "SELECT COALESCE(max(chunks_done), 0) FROM capture_backfills",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if done >= 3 {
            break;
        }
        assert!(Instant::now() < deadline, "the backfill never got going");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.kill().unwrap(); // SIGKILL: mid-chunk, most likely
    child.wait().unwrap();

    let row = admin
        .query_one(
            "SELECT rows_done, finished_at IS NULL, (SELECT count(*) FROM events) FROM capture_backfills",
            &[],
        )
        .await
        .unwrap();
    let (done_at_kill, unfinished, events_at_kill): (i64, bool, i64) =
        (row.get(0), row.get(1), row.get(2));
    assert!(
        unfinished && done_at_kill < rows,
        "killed mid-run: {done_at_kill}"
    );
    assert_eq!(
        events_at_kill, done_at_kill,
        "a chunk's events and its progress commit together"
    );
    let running = eventsctl(&owner, &["capture", "list"]);
    let listed = String::from_utf8_lossy(&running.stdout).to_string();
    assert!(
        listed.contains("running") && listed.contains(&format!("{done_at_kill}")),
        "{listed}"
    );

    // Resumed by running the same command: every row exactly once.
    let resumed = eventsctl(
        &owner,
        &["capture", "backfill", "shop.orders", "--chunk-rows", "5000"],
    );
    assert_eq!(resumed.status.code(), Some(0), "{}", text(&resumed));
    assert!(
        text(&resumed).contains(&format!("({} in this run", rows - done_at_kill)),
        "{}",
        text(&resumed)
    );
    let check = admin
        .query_one(
            "SELECT count(*), count(DISTINCT key), min((key::jsonb->>'id')::int8), max((key::jsonb->>'id')::int8)
               FROM events WHERE type = 'read'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (check.get::<_, i64>(0), check.get::<_, i64>(1)),
        (rows, rows),
        "no row missing, none read twice"
    );
    assert_eq!((check.get::<_, i64>(2), check.get::<_, i64>(3)), (1, rows));
    let ids_in_order = admin
        .query_one(
            "SELECT bool_and(k > prev) FROM (SELECT (key::jsonb->>'id')::int8 AS k,
                    lag((key::jsonb->>'id')::int8) OVER (ORDER BY tx_id, id) AS prev FROM events) x
              WHERE prev IS NOT NULL",
            &[],
        )
        .await
        .unwrap();
    assert!(
        ids_in_order.get::<_, bool>(0),
        "key order across the resume"
    );
}

/// Writers keep inserting, updating (also keys), deleting and rolling back while the backfill
/// runs in small chunks; afterwards, per key in stream order, every `read` equals the row as the
/// changes before it left it, the first change after a `read` starts from the read's values, and
/// replaying everything gives the table.
#[tokio::test]
async fn reads_are_causal_per_key_while_writers_run() {
    let (pg, admin) = setup().await;
    pg.psql(
        "SET ROLE shop_owner;
         CREATE TABLE shop.hot (id int PRIMARY KEY, v int NOT NULL, other int);
         CREATE TABLE shop.side (n int);
         INSERT INTO shop.hot SELECT i, 0, 0 FROM generate_series(1, 3000) i;
         SELECT capture_add('shop.hot', 'hot', full_old => true);",
    );
    let owner = pg.url_for("shop_owner", None);
    let stop = tokio_util::sync::CancellationToken::new();
    let mut writers = Vec::new();
    for w in 0..6u64 {
        let owner = owner.clone();
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let client = connect(&owner).await;
            let mut seed = w * 7919 + 1;
            let mut next = || {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (seed >> 33) as i32
            };
            while !stop.is_cancelled() {
                let id = next() % 3200 + 1;
                let sql = match next() % 10 {
                    // Writes something unrelated first (its own transaction id is old by then),
                    // and stays open a moment after the change: a chunk that did not wait for it
                    // would read the value from before.
                    0..=4 => format!("BEGIN; INSERT INTO shop.side VALUES (1); UPDATE shop.hot SET v = v + 1 WHERE id = {id}; SELECT pg_sleep(0.002); COMMIT"),
                    5 => format!("BEGIN; INSERT INTO shop.side VALUES (1); UPDATE shop.hot SET id = id + 10000 WHERE id = {id}; COMMIT"),
                    6 => format!("DELETE FROM shop.hot WHERE id = {id}"),
                    7 => format!("INSERT INTO shop.hot VALUES ({id}, 100, 1) ON CONFLICT DO NOTHING"),
                    8 => format!("BEGIN; UPDATE shop.hot SET v = -1 WHERE id = {id}; ROLLBACK"),
                    _ => format!("UPDATE shop.hot SET other = other + 1, v = v + 1 WHERE id BETWEEN {id} AND {id} + 20"),
                };
                // Deadlocks between writers are theirs, not the backfill's: retried by the next
                // iteration.
                let _ = client.batch_execute(&sql).await;
                if client.is_closed() {
                    break;
                }
                let _ = client.batch_execute("ROLLBACK").await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let out = eventsctl(
        &owner,
        &["capture", "backfill", "shop.hot", "--chunk-rows", "50"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.cancel();
    for w in writers {
        w.await.unwrap();
    }

    let mut state: BTreeMap<String, Value> = BTreeMap::new();
    let (mut reads, mut checked) = (0, 0);
    let mut read_pending: HashMap<String, Value> = HashMap::new();
    for (ty, key, p) in events(&admin).await {
        let key = key.unwrap();
        match ty.as_str() {
            "read" => {
                reads += 1;
                if let Some(now) = state.get(&key) {
                    assert_eq!(&p["new"], now, "a read of {key} went back in time");
                    checked += 1;
                }
                read_pending.insert(key.clone(), p["new"].clone());
                state.insert(key, p["new"].clone());
            }
            "insert" => {
                state.insert(key.clone(), p["new"].clone());
                read_pending.remove(&key);
            }
            "update" => {
                if let Some(read) = read_pending.remove(&key) {
                    assert_eq!(
                        p["old"], read,
                        "the change after the read of {key} did not start from it"
                    );
                }
                state.insert(key, p["new"].clone());
            }
            "delete" => {
                if let Some(read) = read_pending.remove(&key) {
                    assert_eq!(p["old"], read, "the delete after the read of {key}");
                }
                state.remove(&key);
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert!(reads > 2000, "{reads} reads");
    assert!(
        checked > 50,
        "only {checked} reads had a change before them"
    );
    let table: BTreeMap<String, Value> = admin
        .query(
            "SELECT format('{\"id\":%s}', id), to_jsonb(h) FROM shop.hot h",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    // Rows that existed before capture and were never read nor changed cannot be in the replay;
    // the backfill reads every row, so there are none.
    assert_eq!(state, table, "replaying the stream gives the table");
}

/// The two interleavings the row lock exists for, made to happen: a chunk that meets a row an
/// open transaction changed waits and reads the committed value (never the one before, after the
/// change in the stream), and a change to a row the open chunk read waits for the chunk and
/// follows its `read`.
#[tokio::test]
async fn a_chunk_waits_for_writers_of_its_rows_and_they_wait_for_it() {
    let (pg, _admin) = setup().await;
    pg.psql(
        "SET ROLE shop_owner;
         CREATE TABLE shop.hot (id int PRIMARY KEY, v int NOT NULL);
         CREATE TABLE shop.side (n int);
         INSERT INTO shop.hot SELECT i, 0 FROM generate_series(1, 10) i;
         SELECT capture_add('shop.hot', 'hot');",
    );
    let owner = pg.url_for("shop_owner", None);
    let writer = connect(&owner).await;
    let mut runner = connect(&owner).await;

    // 1. The writer's transaction got its id first and changes row 5 (a non-key UPDATE) but
    //    has not committed when the chunk reads.
    writer
        .batch_execute(
            "BEGIN; INSERT INTO shop.side VALUES (1); UPDATE shop.hot SET v = 1 WHERE id = 5",
        )
        .await
        .unwrap();
    let id = event_store::backfill::start(
        &runner,
        &event_store::backfill::BackfillSpec::new("shop.hot")
            .chunk_rows(6)
            .unwrap(),
    )
    .await
    .unwrap();
    let chunk = tokio::spawn(async move {
        let c = event_store::backfill::chunk(&mut runner, id).await.unwrap();
        (runner, c)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !chunk.is_finished(),
        "the chunk must wait for the open writer of row 5"
    );
    writer.batch_execute("COMMIT").await.unwrap();
    let (runner, first) = chunk.await.unwrap();
    assert_eq!((first.rows_read, first.finished), (6, false));

    // 2. The next chunk (rows 7..10) stays open; a change to row 8 waits for it.
    runner
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL READ COMMITTED; SELECT * FROM capture_backfill_chunk({id})"
        ))
        .await
        .unwrap();
    let late = tokio::spawn(async move {
        writer
            .batch_execute("UPDATE shop.hot SET v = 2 WHERE id = 8")
            .await
            .unwrap();
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !late.is_finished(),
        "the change to row 8 must wait for the open chunk"
    );
    runner.batch_execute("COMMIT").await.unwrap();
    late.await.unwrap();

    let order = pg.psql(
        "SELECT string_agg(type || ' ' || (key::jsonb->>'id') || ' v=' || (payload->'new'->>'v'), ', ' ORDER BY tx_id, id)
           FROM events WHERE key::jsonb->>'id' IN ('5', '8')",
    );
    assert_eq!(order, "update 5 v=1, read 5 v=1, read 8 v=0, update 8 v=2");
}

/// From a migration: `capture_backfill` runs every chunk in the caller's transaction, and rolls
/// back with it.
#[tokio::test]
async fn the_sql_function_backfills_inside_a_migration_transaction() {
    let (pg, _admin) = setup().await;
    pg.psql(
        "SET ROLE shop_owner;
         CREATE TABLE shop.small (id int PRIMARY KEY, v text);
         INSERT INTO shop.small SELECT i, 'v' || i FROM generate_series(1, 25) i;
         SELECT capture_add('shop.small', 'small');",
    );
    pg.psql("SET ROLE shop_owner; BEGIN; SELECT capture_backfill('shop.small', 10); ROLLBACK;");
    assert_eq!(
        pg.psql("SELECT count(*) FROM events"),
        "0",
        "rolled back with it"
    );
    // A bare name resolves on the caller's search_path, as in any migration.
    pg.psql("SET ROLE shop_owner; SET search_path = shop, public; BEGIN; SELECT capture_backfill('small', 10); COMMIT;");
    assert_eq!(
        pg.psql("SELECT count(*), count(DISTINCT key) FROM events WHERE type = 'read'"),
        "25|25"
    );
    assert_eq!(
        pg.psql("SELECT chunks_done, finished_at IS NOT NULL FROM capture_backfills"),
        "3|t"
    );
}

/// A backfill's condition is SQL that runs with the rights of whoever runs a chunk. Another
/// capture admin who may act as the table's owner cannot rewrite it under its starter, and
/// neither the database owner (a superuser here) nor anyone else runs the starter's chunks; the
/// starter does, and anyone who sees the backfill may cancel it.
#[tokio::test(flavor = "multi_thread")]
async fn only_the_role_that_started_a_backfill_runs_its_condition() {
    let (pg, admin) = setup().await;
    pg.psql(
        "CREATE ROLE deputy LOGIN IN ROLE events_capture_admin, shop_owner;
         SET ROLE shop_owner;
         CREATE TABLE shop.items (id int PRIMARY KEY, v text);
         INSERT INTO shop.items SELECT i, 'v' || i FROM generate_series(1, 30) i;
         SELECT capture_add('shop.items', 'items');",
    );
    let owner = connect(&pg.url_for("shop_owner", None)).await;
    let id: i64 = owner
        .query_one(
            "SELECT capture_backfill_start('shop.items', 10, 'id > 0')",
            &[],
        )
        .await
        .unwrap()
        .get(0);

    let deputy = connect(&pg.url_for("deputy", None)).await;
    let planted = deputy
        .execute(
            "UPDATE capture_backfills SET condition = 'pg_catalog.pg_sleep(0) IS NOT NULL' \
              WHERE id = $1",
            &[&id],
        )
        .await
        .expect_err("another admin rewrites the condition");
    let planted = format!("{planted:?}");
    assert!(planted.contains("row-level security"), "{planted}");
    let chunk = "SELECT rows_read FROM capture_backfill_chunk($1)";
    for (who, client) in [("the database owner", &admin), ("deputy", &deputy)] {
        let refused = client
            .query_one(chunk, &[&id])
            .await
            .expect_err("someone else runs the starter's chunk");
        let text = format!("{refused:?}");
        assert!(
            text.contains("was started by shop_owner") && text.contains("only that role"),
            "{who}: {text}"
        );
    }
    let read: i64 = owner.query_one(chunk, &[&id]).await.unwrap().get(0);
    assert_eq!(read, 10, "the starter runs its own chunk");
    deputy
        .execute("SELECT capture_backfill_cancel('shop.items')", &[])
        .await
        .expect("another admin may cancel it");
    assert_eq!(
        pg.psql("SELECT count(*) FROM capture_backfills WHERE finished_at IS NULL"),
        "0"
    );
}
