//! Capture against hostile owners of tables and types (issue 25, part 1), on a real PostgreSQL:
//! the SECURITY DEFINER trigger functions never run code anyone but a superuser wrote, never
//! write an event nobody's change caused, and any change to them is reported by `migrate` and by
//! every service's start-up check.
//!
//! Each attack first shows that it is real: the same expression the triggers used to evaluate
//! (`to_jsonb` of the value) runs the attacker's code when the attacker evaluates it.

use event_store::{db, migrations};
use serde_json::{json, Value};
use testbed::Postgres;
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

async fn connect(url: &str) -> Client {
    db::connect_spawned(&db::config(url, "capture-security-test").unwrap())
        .await
        .unwrap()
}

/// A migrated database with `app_owner`, a capture admin owning schema `app`, whose code records
/// `current_user` in `app.seen` (writable by everyone) whenever it runs.
async fn with_hostile_owner() -> (Postgres, Client, Client) {
    let pg = Postgres::start();
    let mut admin = connect(&pg.url()).await;
    migrations::run(&mut admin).await.unwrap();
    admin
        .batch_execute(
            "CREATE ROLE app_owner LOGIN IN ROLE events_capture_admin;
             CREATE SCHEMA app AUTHORIZATION app_owner;",
        )
        .await
        .unwrap();
    let owner = connect(&pg.url_for("app_owner", None)).await;
    owner
        .batch_execute(
            "CREATE TABLE app.seen (who text, what text);
             GRANT USAGE ON SCHEMA app TO PUBLIC;
             GRANT ALL ON app.seen TO PUBLIC;
             CREATE FUNCTION app.record(what text) RETURNS void LANGUAGE sql
                 AS $$ INSERT INTO app.seen VALUES (current_user, what) $$;
             GRANT EXECUTE ON FUNCTION app.record(text) TO PUBLIC;",
        )
        .await
        .unwrap();
    (pg, admin, owner)
}

/// Who ran the attacker's code, and for what.
async fn seen(client: &Client) -> Vec<(String, String)> {
    client
        .query("SELECT who, what FROM app.seen ORDER BY 1, 2", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

async fn events(client: &Client) -> Vec<(String, String, Value)> {
    client
        .query("SELECT topic, type, payload FROM events ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// The issue's reproduction and its variants: a cast to json of the owner's enum, reached
/// directly, through a domain, an array and a composite, and a range type with a cast of its
/// own; one recording who runs it and trying to forge an event, one raising. None of it runs in
/// the trigger; the events carry the values' text output; another table's capture is intact.
#[tokio::test]
async fn a_cast_to_json_of_the_owners_type_never_runs_in_the_trigger() {
    let (_pg, admin, owner) = with_hostile_owner().await;
    owner
        .batch_execute(
            "CREATE TYPE app.mood AS ENUM ('ok', 'bad');
             CREATE FUNCTION app.mood_json(app.mood) RETURNS json LANGUAGE plpgsql AS $$
             BEGIN
                 PERFORM app.record('mood cast');
                 BEGIN -- what the capture role could do: forge an event
                     INSERT INTO public.events (topic, payload) VALUES ('forged', '{}');
                 EXCEPTION WHEN insufficient_privilege THEN NULL;
                 END;
                 RETURN to_json($1::text);
             END $$;
             CREATE CAST (app.mood AS json) WITH FUNCTION app.mood_json(app.mood);
             CREATE DOMAIN app.dmood AS app.mood;
             CREATE TYPE app.pair AS (a int, m app.mood);
             CREATE TYPE app.moodrange AS RANGE (subtype = app.mood);
             CREATE FUNCTION app.range_json(app.moodrange) RETURNS json LANGUAGE sql
                 AS $$ SELECT app.record('range cast'); SELECT '\"r\"'::json $$;
             CREATE CAST (app.moodrange AS json) WITH FUNCTION app.range_json(app.moodrange);
             CREATE TABLE app.gadget (id int PRIMARY KEY, m app.mood, d app.dmood, arr app.mood[],
                                      p app.pair, r app.moodrange, note text);
             CREATE TYPE app.angry AS ENUM ('grr');
             CREATE FUNCTION app.angry_json(app.angry) RETURNS json LANGUAGE plpgsql
                 AS $$ BEGIN RAISE EXCEPTION 'angry cast ran as %', current_user; END $$;
             CREATE CAST (app.angry AS json) WITH FUNCTION app.angry_json(app.angry);
             CREATE TABLE app.angry_table (id int PRIMARY KEY, a app.angry[]);",
        )
        .await
        .unwrap();

    // The attack is real: to_jsonb consults the casts, through every wrapper.
    owner
        .batch_execute(
            "SELECT to_jsonb('ok'::app.mood), to_jsonb('ok'::app.dmood), to_jsonb('{ok}'::app.mood[]),
                    to_jsonb('(1,ok)'::app.pair), to_jsonb('[ok,bad]'::app.moodrange)",
        )
        .await
        .unwrap();
    let ran = seen(&owner).await;
    assert_eq!(ran.len(), 5, "{ran:?}");
    assert!(ran.iter().all(|(who, _)| who == "app_owner"), "{ran:?}");
    let err = owner
        .batch_execute("SELECT to_jsonb('{grr}'::app.angry[])")
        .await
        .unwrap_err();
    assert_eq!(
        err.as_db_error().map(|e| e.message()),
        Some("angry cast ran as app_owner")
    );
    owner.batch_execute("DELETE FROM app.seen").await.unwrap();

    // Another table, another owner, captured alongside; its enum and the enum's cast are a
    // superuser's (as an extension's would be), so to_jsonb runs and the cast is used.
    admin
        .batch_execute(
            "CREATE TYPE trusted AS ENUM ('t');
             CREATE FUNCTION trusted_json(trusted) RETURNS json LANGUAGE sql
                 AS $$ SELECT '{\"by\": \"cast\"}'::json $$;
             CREATE CAST (trusted AS json) WITH FUNCTION trusted_json(trusted);
             CREATE TABLE orders (id int PRIMARY KEY, status text, tr trusted);
             SELECT capture_add('orders', 'orders');",
        )
        .await
        .unwrap();
    owner
        .batch_execute(
            "SELECT capture_add('app.gadget', 'gadget');
             SELECT capture_add('app.angry_table', 'angry');
             INSERT INTO app.gadget VALUES (1, 'ok', 'ok', '{ok,bad}', '(1,ok)', '[ok,bad]', 'x'),
                                           (2, NULL, NULL, NULL, NULL, NULL, NULL);
             UPDATE app.gadget SET m = 'bad', note = 'y' WHERE id = 1;
             UPDATE app.gadget SET id = 20 WHERE id = 2;
             DELETE FROM app.gadget WHERE id = 1;
             INSERT INTO app.angry_table VALUES (1, '{grr}');
             UPDATE app.angry_table SET a = NULL;",
        )
        .await
        .expect("writes to tables with hostile casts succeed");
    // A superuser writing the table (the issue's escalation waited for one) runs nothing either.
    admin
        .batch_execute(
            "INSERT INTO app.gadget VALUES (3, 'ok'); UPDATE app.gadget SET m = 'bad';
             INSERT INTO orders VALUES (1, 'new', 't');",
        )
        .await
        .unwrap();
    assert_eq!(seen(&admin).await, vec![], "no cast ran, as anyone");

    let got = events(&admin).await;
    let topics: Vec<&str> = got.iter().map(|(t, _, _)| t.as_str()).collect();
    assert_eq!(
        topics,
        [
            "gadget", "gadget", "gadget", "gadget", "gadget", "gadget", "angry", "angry", "gadget",
            "gadget", "gadget", "orders"
        ],
        "no forged event: {got:?}"
    );
    let text_output = json!({"id": 1, "m": "ok", "d": "ok", "arr": "{ok,bad}", "p": "(1,ok)",
                             "r": "[ok,bad]", "note": "x"});
    assert_eq!(got[0].2["new"], text_output);
    assert_eq!(
        got[1].2["new"],
        json!({"id": 2, "m": null, "d": null, "arr": null, "p": null, "r": null, "note": null})
    );
    assert_eq!(got[2].1, "update");
    assert_eq!(
        got[2].2["changed"],
        json!({"m": {"old": "ok", "new": "bad"}, "note": {"old": "x", "new": "y"}})
    );
    assert_eq!((got[3].1.as_str(), got[4].1.as_str()), ("delete", "insert"));
    assert_eq!(got[4].2["key"], json!({"id": 20}));
    assert_eq!(got[5].1, "delete");
    assert_eq!(got[5].2["old"]["m"], "bad");
    assert_eq!(got[6].2["new"], json!({"id": 1, "a": "{grr}"}));
    assert_eq!(
        got[7].2["changed"],
        json!({"a": {"old": "{grr}", "new": null}})
    );
    assert_eq!(
        got[11].2["new"],
        json!({"id": 1, "status": "new", "tr": {"by": "cast"}})
    );
}

/// The writer's search_path leads to its own operators and functions, named like the ones the
/// triggers use (`=`, `<>`, `||`, `->`, `-`, to_jsonb, format, num_nulls, jsonb_build_object),
/// and the owner's type has an `=` of its own: on every path (generic and generated UPDATE,
/// text output) none of them runs.
#[tokio::test]
async fn operators_and_functions_of_the_callers_search_path_never_run() {
    let (pg, admin, owner) = with_hostile_owner().await;
    owner
        .batch_execute(
            "CREATE TYPE app.mood AS ENUM ('ok', 'bad');
             CREATE FUNCTION app.mood_eq(app.mood, app.mood) RETURNS boolean LANGUAGE sql
                 AS $$ SELECT app.record('mood ='); SELECT $1::text = $2::text $$;
             CREATE OPERATOR app.= (FUNCTION = app.mood_eq, LEFTARG = app.mood, RIGHTARG = app.mood);
             CREATE OPERATOR app.<> (FUNCTION = app.mood_eq, LEFTARG = app.mood, RIGHTARG = app.mood);
             CREATE TABLE app.plain (id int PRIMARY KEY, v text, n numeric, j jsonb);
             CREATE TABLE app.typed (id int PRIMARY KEY, m app.mood, v text);
             GRANT ALL ON app.plain, app.typed TO PUBLIC;
             SELECT capture_add('app.plain', 'plain');
             SELECT capture_add('app.typed', 'typed');",
        )
        .await
        .unwrap();
    admin
        .batch_execute("CREATE ROLE writer LOGIN; CREATE SCHEMA w AUTHORIZATION writer")
        .await
        .unwrap();
    let writer = connect(&pg.url_for("writer", None)).await;
    let mut hijack = String::new();
    for (op, left, right, ret) in [
        ("=", "jsonb", "jsonb", "boolean"),
        ("<>", "jsonb", "jsonb", "boolean"),
        ("=", "bigint", "bigint", "boolean"),
        ("=", "text", "text", "boolean"),
        ("<>", "text", "text", "boolean"),
        ("=", "int4", "int4", "boolean"),
        ("||", "text", "text", "text"),
        ("||", "jsonb", "jsonb", "jsonb"),
        ("->", "jsonb", "text", "jsonb"),
        ("-", "jsonb", "text[]", "jsonb"),
    ] {
        let f = format!(
            "w.op_{}_{}",
            left.replace("[]", "s"),
            op.len() * 7 + op.as_bytes()[0] as usize
        );
        hijack.push_str(&format!(
            "CREATE FUNCTION {f}({left}, {right}) RETURNS {ret} LANGUAGE sql
                 AS $$ SELECT app.record('{op} on {left}'); SELECT NULL::{ret} $$;
             CREATE OPERATOR w.{op} (FUNCTION = {f}, LEFTARG = {left}, RIGHTARG = {right});"
        ));
    }
    for (name, args, ret) in [
        ("to_jsonb", "anyelement", "jsonb"),
        ("format", "text, VARIADIC \"any\"", "text"),
        ("num_nulls", "VARIADIC \"any\"", "int4"),
        ("jsonb_build_object", "VARIADIC \"any\"", "jsonb"),
    ] {
        if args.contains("any\"") {
            // "any" arguments need C; a plpgsql function of text stands in.
            hijack.push_str(&format!(
                "CREATE FUNCTION w.{name}(text) RETURNS {ret} LANGUAGE sql
                     AS $$ SELECT app.record('{name}'); SELECT NULL::{ret} $$;"
            ));
        } else {
            hijack.push_str(&format!(
                "CREATE FUNCTION w.{name}({args}) RETURNS {ret} LANGUAGE sql
                     AS $$ SELECT app.record('{name}'); SELECT NULL::{ret} $$;"
            ));
        }
    }
    writer.batch_execute(&hijack).await.unwrap();
    // The hijack works on the writer's own SQL.
    writer
        .batch_execute(
            "SET search_path = w, app, pg_catalog;
             SELECT '{}'::jsonb = '{}'::jsonb, 'ok'::mood = 'ok'::mood, to_jsonb(1)",
        )
        .await
        .unwrap();
    let ran: Vec<String> = seen(&writer)
        .await
        .into_iter()
        .map(|(_, what)| what)
        .collect();
    // (mood_eq's own `=` on text is the writer's too, found first on its search_path.)
    assert_eq!(ran, ["= on jsonb", "= on text", "mood =", "to_jsonb"]);
    writer.batch_execute("DELETE FROM app.seen").await.unwrap();

    // The writer's own statements name pg_catalog's operators: whatever ran would be the trigger's.
    for bulk_rows in ["1000000", "0"] {
        writer
            .batch_execute(&format!(
                "SET search_path = w, app, pg_catalog;
                 SET pgevents.capture_bulk_rows = {bulk_rows};
                 INSERT INTO app.plain VALUES (1, 'a', 1.5, '{{\"k\": 1}}'), (2, 'b', 2, NULL);
                 UPDATE app.plain SET v = v OPERATOR(pg_catalog.||) 'x', j = '{{\"k\": 2}}';
                 UPDATE app.plain SET id = id + 10 WHERE id OPERATOR(pg_catalog.=) 1;
                 DELETE FROM app.plain;
                 INSERT INTO app.typed VALUES (1, 'ok', 'a'), (2, 'bad', 'b');
                 UPDATE app.typed SET m = 'bad';
                 DELETE FROM app.typed;"
            ))
            .await
            .expect("the writes succeed");
    }
    assert_eq!(
        seen(&admin).await,
        vec![],
        "none of the writer's objects ran"
    );
    let got = events(&admin).await;
    assert_eq!(got.len(), 2 * (2 + 2 + 2 + 2 + 2 + 1 + 2), "{got:?}");
    assert_eq!(
        got[0].2["new"],
        json!({"id": 1, "v": "a", "n": 1.5, "j": {"k": 1}})
    );
}

/// Every change the issue's attacker made to the capture functions (as their owner), and other
/// things the capture role must never hold, is reported by the start-up check of every service
/// and by `migrate`, naming the object and what changed; put back, both pass again.
#[tokio::test]
async fn a_changed_capture_function_stops_migrate_and_every_service() {
    let pg = Postgres::start();
    let mut admin = connect(&pg.url()).await;
    migrations::run(&mut admin).await.unwrap();
    admin
        .batch_execute("CREATE ROLE c1 LOGIN IN ROLE events_consumer")
        .await
        .unwrap();
    let consumer = connect(&pg.url_for("c1", None)).await;
    migrations::check(&consumer, migrations::Role::Consumer)
        .await
        .expect("a fresh migration passes");
    let nothing: i64 = admin
        .query_one("SELECT count(*) FROM capture_check()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(nothing, 0);

    let cases: &[(&str, &str, &str)] = &[
        (
            "ALTER FUNCTION capture_update() SECURITY INVOKER",
            "capture_update() is SECURITY INVOKER, not SECURITY DEFINER",
            "ALTER FUNCTION capture_update() SECURITY DEFINER",
        ),
        (
            "ALTER FUNCTION capture_update() SET search_path = app, pg_catalog",
            "capture_update() has settings {\"search_path=app, pg_catalog\",jit=off}",
            "ALTER FUNCTION capture_update() SET search_path = pg_catalog, pg_temp",
        ),
        (
            "GRANT EXECUTE ON FUNCTION capture_insert() TO PUBLIC",
            "capture_insert() may be executed by PUBLIC:EXECUTE, events_capture_admin:EXECUTE",
            "REVOKE EXECUTE ON FUNCTION capture_insert() FROM PUBLIC",
        ),
        (
            "CREATE ROLE other NOLOGIN; ALTER FUNCTION capture_delete() OWNER TO other",
            "capture_delete() is owned by other, not events_capture",
            "ALTER FUNCTION capture_delete() OWNER TO events_capture; DROP ROLE other",
        ),
        (
            "ALTER FUNCTION capture_key_text(jsonb, text[]) OWNER TO events_capture",
            "capture_key_text(jsonb,text[]) is owned by events_capture, not postgres",
            // Giving it back loses the capture role's EXECUTE, which the check reports too.
            "ALTER FUNCTION capture_key_text(jsonb, text[]) OWNER TO postgres;
             GRANT EXECUTE ON FUNCTION capture_key_text(jsonb, text[]) TO events_capture",
        ),
        (
            "CREATE FUNCTION public.planted() RETURNS int LANGUAGE sql AS 'SELECT 1';
             ALTER FUNCTION public.planted() OWNER TO events_capture",
            "function public.planted() is owned by the capture role events_capture",
            "DROP FUNCTION public.planted()",
        ),
        (
            "GRANT events_capture TO c1",
            "role events_capture has member c1",
            "REVOKE events_capture FROM c1",
        ),
        (
            "GRANT CREATE ON SCHEMA public TO events_capture",
            "schema public grants CREATE to the capture role events_capture",
            "REVOKE CREATE ON SCHEMA public FROM events_capture",
        ),
        (
            "DO $$ BEGIN EXECUTE replace(pg_get_functiondef('capture_truncate()'::regprocedure),
                                         'RETURN NULL;', 'RETURN NULL; -- changed'); END $$",
            "capture_truncate() has a changed body",
            "DO $$ BEGIN EXECUTE replace(pg_get_functiondef('capture_truncate()'::regprocedure),
                                         'RETURN NULL; -- changed', 'RETURN NULL;'); END $$",
        ),
        (
            "ALTER FUNCTION capture_text_columns(oid) RENAME TO gone",
            "capture_text_columns(oid) is missing",
            "ALTER FUNCTION gone(oid) RENAME TO capture_text_columns",
        ),
    ];
    for (tamper, reported, restore) in cases {
        admin.batch_execute(tamper).await.unwrap();
        let err = migrations::check(&consumer, migrations::Role::Consumer)
            .await
            .expect_err(tamper)
            .to_string();
        assert!(
            err.contains(reported) && err.contains("changed outside `migrate`"),
            "{tamper}: {err}"
        );
        let err = migrations::run(&mut admin)
            .await
            .expect_err(tamper)
            .to_string();
        assert!(err.contains(reported), "migrate after {tamper}: {err}");
        // …and repaired nothing.
        let err = migrations::check(&consumer, migrations::Role::Consumer)
            .await
            .expect_err(tamper)
            .to_string();
        assert!(err.contains(reported), "after migrate, {tamper}: {err}");
        admin.batch_execute(restore).await.unwrap();
        migrations::check(&consumer, migrations::Role::Consumer)
            .await
            .unwrap_or_else(|e| panic!("after {restore}: {e}"));
    }
    migrations::run(&mut admin).await.unwrap();
}

/// Under REPEATABLE READ the catalog look-ups see the transaction's snapshot: a column of the
/// owner's type added after it must not slip past them. The write fails with 40001 (retry) and
/// nothing runs; retried, it is captured with the value's text output.
#[tokio::test]
async fn a_column_added_after_a_repeatable_read_snapshot_is_not_missed() {
    let (pg, admin, owner) = with_hostile_owner().await;
    owner
        .batch_execute(
            "CREATE TYPE app.mood AS ENUM ('ok');
             CREATE FUNCTION app.mood_json(app.mood) RETURNS json LANGUAGE sql
                 AS $$ SELECT app.record('mood cast'); SELECT '\"x\"'::json $$;
             CREATE CAST (app.mood AS json) WITH FUNCTION app.mood_json(app.mood);
             CREATE TABLE app.gadget (id int PRIMARY KEY, v text);
             GRANT ALL ON app.gadget TO PUBLIC;
             SELECT capture_add('app.gadget', 'gadget');",
        )
        .await
        .unwrap();
    let writer = connect(&pg.url_for("app_owner", None)).await;
    for (isolation, before, change) in [
        ("REPEATABLE READ", None, "ADD COLUMN m app.mood"),
        (
            "SERIALIZABLE",
            Some("ALTER COLUMN m TYPE text"),
            "ALTER COLUMN m TYPE app.mood USING m::app.mood",
        ),
    ] {
        if let Some(before) = before {
            owner
                .batch_execute(&format!("ALTER TABLE app.gadget {before}"))
                .await
                .unwrap();
        }
        writer
            .batch_execute(&format!(
                "BEGIN ISOLATION LEVEL {isolation}; SELECT count(*) FROM app.seen"
            ))
            .await
            .unwrap();
        owner
            .batch_execute(&format!("ALTER TABLE app.gadget {change}"))
            .await
            .unwrap();
        let err = writer
            .batch_execute("INSERT INTO app.gadget (id, m) VALUES (1, 'ok')")
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Some(&SqlState::T_R_SERIALIZATION_FAILURE),
            "{isolation}: {err:?}"
        );
        writer.batch_execute("ROLLBACK").await.unwrap();
        assert_eq!(seen(&admin).await, vec![], "{isolation}");
    }
    writer
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; INSERT INTO app.gadget (id, m) VALUES (1, 'ok'); COMMIT")
        .await
        .unwrap();
    assert_eq!(seen(&admin).await, vec![]);
    let got = events(&admin).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].2["new"], json!({"id": 1, "v": null, "m": "ok"}));
}
