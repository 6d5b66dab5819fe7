//! Causal order (migration V8): an event written by a statement that could see another
//! transaction's commit comes after every event of that transaction in the stream — for outbox
//! INSERTs (single and multi-row), captured changes, subtransactions and prepared transactions —
//! and nothing is ever skipped while an older writer is still open.
//!
//! The stream order is read the way every reader reads it: `Reader::fetch` from the start, below
//! the visibility horizon.

use std::time::Duration;

use event_store::position::{Position, Reader};
use event_store::{db, migrations};
use serde_json::Value;
use testbed::Postgres;
use tokio_postgres::Client;

async fn connect(url: &str) -> Client {
    db::connect_spawned(&db::config(url, "causal-order-test").unwrap())
        .await
        .unwrap()
}

async fn migrated(settings: &[&str]) -> (Postgres, Client) {
    let pg = Postgres::start_with(settings);
    let mut admin = connect(&pg.url()).await;
    migrations::run(&mut admin).await.unwrap();
    admin
        .batch_execute(
            "CREATE TABLE audit (n int);
             CREATE TABLE acct (id int PRIMARY KEY, v bigint NOT NULL);
             INSERT INTO acct VALUES (1, 0);
             SELECT capture_add('acct', 'acct');",
        )
        .await
        .unwrap();
    (pg, admin)
}

/// Every readable event from the start, in stream order: (topic, key, payload).
async fn stream(client: &Client) -> Vec<(String, Option<String>, Value)> {
    let reader = Reader::prepare(client).await.unwrap();
    let mut at = Position::START;
    let mut out = Vec::new();
    loop {
        let batch = reader.fetch(client, at, 100, None).await.unwrap();
        let Some(end) = batch.end else { break };
        for event in batch.events {
            out.push((
                event.topic.clone(),
                event.key.clone(),
                event.payload.parse().unwrap(),
            ));
        }
        at = end;
    }
    out
}

/// The `seq` of every outbox event of topic `o`, in stream order.
fn seqs(events: &[(String, Option<String>, Value)]) -> Vec<i64> {
    events
        .iter()
        .filter(|(topic, _, _)| topic == "o")
        .map(|(_, _, payload)| payload["seq"].as_i64().unwrap())
        .collect()
}

/// The captured `acct.v` changes, in stream order, as (old, new).
fn changes(events: &[(String, Option<String>, Value)]) -> Vec<(i64, i64)> {
    events
        .iter()
        .filter(|(topic, _, p)| topic == "acct" && p["op"] == "update")
        .map(|(_, _, p)| {
            let v = &p["changed"]["v"];
            (v["old"].as_i64().unwrap(), v["new"].as_i64().unwrap())
        })
        .collect()
}

fn insert_event(seq: i64) -> String {
    format!("INSERT INTO events (topic, key, payload) VALUES ('o', 'k', '{{\"seq\": {seq}}}')")
}

/// The reproduction, three rounds: A writes an unrelated row first (taking its
/// transaction id), B appends and updates the captured row and commits, then A appends and
/// updates the row it now sees. A's events must come after B's, and the captured diffs chain.
#[tokio::test]
async fn a_change_made_after_a_commit_comes_after_it() {
    let (pg, admin) = migrated(&[]).await;
    let a = connect(&pg.url()).await;
    let b = connect(&pg.url()).await;
    for round in 0..3 {
        let first = 2 * round + 1;
        a.batch_execute("BEGIN; INSERT INTO audit VALUES (1)")
            .await
            .unwrap();
        b.batch_execute(&format!(
            "BEGIN; {}; UPDATE acct SET v = v + 1 WHERE id = 1; COMMIT",
            insert_event(first)
        ))
        .await
        .unwrap();
        a.batch_execute(&format!(
            "{}; UPDATE acct SET v = v * 10 WHERE id = 1; COMMIT",
            insert_event(first + 1)
        ))
        .await
        .unwrap();
    }
    let events = stream(&admin).await;
    assert_eq!(seqs(&events), [1, 2, 3, 4, 5, 6], "outbox events per key");
    let diffs = changes(&events);
    assert_eq!(
        diffs,
        [
            (0, 1),
            (1, 10),
            (10, 11),
            (11, 110),
            (110, 111),
            (111, 1110)
        ],
        "each captured change starts where the previous one ended"
    );
    let table: i64 = admin
        .query_one("SELECT v FROM acct WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        diffs.last().unwrap().1,
        table,
        "the last event equals the table"
    );
}

/// Multi-row INSERTs and subtransactions: each statement sorts after every commit it could see,
/// a rolled-back savepoint's event never appears, and one transaction's statements keep their
/// order even when other transactions' events fall between them.
#[tokio::test]
async fn batches_and_savepoints_follow_what_each_statement_saw() {
    let (pg, admin) = migrated(&[]).await;
    let a = connect(&pg.url()).await;
    let b = connect(&pg.url()).await;
    a.batch_execute("BEGIN; INSERT INTO audit VALUES (1)")
        .await
        .unwrap();
    b.batch_execute(&insert_event(1)).await.unwrap();
    a.batch_execute(
        "INSERT INTO events (topic, key, payload)
         SELECT 'o', 'k', jsonb_build_object('seq', g) FROM generate_series(2, 4) AS g",
    )
    .await
    .unwrap();
    b.batch_execute(&insert_event(5)).await.unwrap();
    a.batch_execute(&format!("SAVEPOINT s1; {}; RELEASE s1", insert_event(6)))
        .await
        .unwrap();
    a.batch_execute(&format!(
        "SAVEPOINT s2; {}; ROLLBACK TO s2",
        insert_event(99)
    ))
    .await
    .unwrap();
    b.batch_execute(&insert_event(7)).await.unwrap();
    a.batch_execute(&format!("SAVEPOINT s3; {}; COMMIT", insert_event(8)))
        .await
        .unwrap();
    assert_eq!(seqs(&stream(&admin).await), [1, 2, 3, 4, 5, 6, 7, 8]);
}

/// A prepared transaction holds its events back (they are never read early, so never skipped),
/// and when it commits they come in the order of what its statements saw.
#[tokio::test]
async fn a_prepared_transaction_is_never_skipped() {
    let (pg, admin) = migrated(&["max_prepared_transactions=4"]).await;
    let p = connect(&pg.url()).await;
    let b = connect(&pg.url()).await;
    p.batch_execute("BEGIN; INSERT INTO audit VALUES (1)")
        .await
        .unwrap();
    b.batch_execute(&insert_event(1)).await.unwrap();
    p.batch_execute(&format!("{}; PREPARE TRANSACTION 'held'", insert_event(2)))
        .await
        .unwrap();
    b.batch_execute(&insert_event(3)).await.unwrap();

    // While it is prepared, nothing after its transaction id is readable, and a reader is told
    // rows are held back rather than being allowed past them.
    let reader = Reader::prepare(&admin).await.unwrap();
    let batch = reader
        .fetch(&admin, Position::START, 100, None)
        .await
        .unwrap();
    assert!(
        batch.end.is_none(),
        "nothing is readable past the prepared transaction"
    );
    assert!(reader
        .pending_beyond_horizon(&admin, Position::START)
        .await
        .unwrap());
    tokio::time::sleep(Duration::from_millis(300)).await;
    admin.batch_execute("COMMIT PREPARED 'held'").await.unwrap();
    b.batch_execute(&insert_event(4)).await.unwrap();
    assert_eq!(seqs(&stream(&admin).await), [1, 2, 3, 4]);
}

/// REPEATABLE READ: a statement "could see" what the transaction's snapshot (taken at its first
/// statement) sees. An event written after that snapshot saw a commit comes after it; one whose
/// transaction wrote, and took its snapshot, before the other committed may come before it —
/// it could not see it.
#[tokio::test]
async fn repeatable_read_follows_the_transaction_snapshot() {
    let (pg, admin) = migrated(&[]).await;
    let a = connect(&pg.url()).await;
    let b = connect(&pg.url()).await;
    // The snapshot is taken after 1 commits: 2 comes after 1.
    a.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .await
        .unwrap();
    b.batch_execute(&insert_event(1)).await.unwrap();
    a.batch_execute(&format!(
        "INSERT INTO audit VALUES (1); {}; COMMIT",
        insert_event(2)
    ))
    .await
    .unwrap();
    // The snapshot is taken before 3 commits (the audit row): 4 did not see 3 and sorts first.
    a.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; INSERT INTO audit VALUES (2)")
        .await
        .unwrap();
    b.batch_execute(&insert_event(3)).await.unwrap();
    a.batch_execute(&format!("{}; COMMIT", insert_event(4)))
        .await
        .unwrap();
    assert_eq!(seqs(&stream(&admin).await), [1, 2, 4, 3]);
}

/// Within one transaction, events keep the order they were written in, and a sort key is never
/// below the writer's own transaction id (what keeps open transactions' rows at or above every
/// reader's horizon).
#[tokio::test]
async fn keys_never_fall_below_the_writers_own_id() {
    let (pg, admin) = migrated(&[]).await;
    let a = connect(&pg.url()).await;
    let b = connect(&pg.url()).await;
    a.batch_execute("BEGIN; INSERT INTO audit VALUES (1)")
        .await
        .unwrap();
    for n in 0..5 {
        b.batch_execute(&insert_event(100 + n)).await.unwrap();
        a.batch_execute(&insert_event(n)).await.unwrap();
    }
    let rows = a
        .query(
            "SELECT tx_id::text, pg_current_xact_id()::text FROM events
              WHERE (payload->>'seq')::int < 100 ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    let mut last = 0u64;
    for row in rows {
        let key: u64 = row.get::<_, &str>(0).parse().unwrap();
        let own: u64 = row.get::<_, &str>(1).parse().unwrap();
        assert!(key >= own, "key {key} below the writer's id {own}");
        assert!(key >= last, "a transaction's keys never go back");
        last = key;
    }
    a.batch_execute("COMMIT").await.unwrap();
    assert_eq!(
        seqs(&stream(&admin).await),
        [100, 0, 101, 1, 102, 2, 103, 3, 104, 4]
    );
}

/// One statement that waits for another transaction's row lock and then builds on its commit
/// (`WITH u AS (UPDATE … RETURNING …) INSERT INTO events …`): its event comes after that commit's,
/// although the statement began before it. The key is taken when the row is written, with a
/// fresh snapshot, not from the statement's snapshot.
#[tokio::test]
async fn a_statement_that_waited_for_a_commit_sorts_after_it() {
    let (pg, admin) = migrated(&[]).await;
    let a = connect(&pg.url()).await;
    let b = connect(&pg.url()).await;
    a.batch_execute("BEGIN; INSERT INTO audit VALUES (1)")
        .await
        .unwrap();
    b.batch_execute(&format!(
        "BEGIN; UPDATE acct SET v = v + 1 WHERE id = 1; {}",
        insert_event(1)
    ))
    .await
    .unwrap();
    let waiting = tokio::spawn(async move {
        a.batch_execute(
            "WITH u AS (UPDATE acct SET v = v * 10 WHERE id = 1 RETURNING v)
             INSERT INTO events (topic, key, payload)
             SELECT 'o', 'k', jsonb_build_object('seq', 2, 'v', v) FROM u;
             COMMIT",
        )
        .await
        .unwrap();
    });
    // B commits only once A's statement is waiting for B's row lock.
    let started = std::time::Instant::now();
    loop {
        let blocked: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE wait_event_type = 'Lock' AND query LIKE 'WITH u AS%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if blocked == 1 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "A never waited"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    b.batch_execute("COMMIT").await.unwrap();
    waiting.await.unwrap();
    let events = stream(&admin).await;
    assert_eq!(seqs(&events), [1, 2]);
    assert_eq!(changes(&events), [(0, 1), (1, 10)]);
}
