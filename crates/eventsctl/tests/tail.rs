//! `eventsctl tail` reads like a consumer: from a position, while transactions commit out of id
//! order, it prints every event exactly once and in position order — an event whose transaction
//! commits late is printed late, never skipped.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{assert_exit, produce, setup, stderr, stdout};
use event_store::position;

fn lines(out: &std::process::Output) -> Vec<serde_json::Value> {
    stdout(out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn tail_from_a_position_skips_nothing_while_commits_arrive_out_of_order() {
    let env = setup(false).await;
    produce(&env.admin, "orders", 3).await;
    let from = position::latest(&env.admin).await.unwrap().to_string();

    // A takes its transaction id (and an event id) first, but commits last.
    let late = common::connect(&env.pg.url()).await;
    late.batch_execute(
        "BEGIN; INSERT INTO events (topic, payload) VALUES ('orders', '{\"late\": true}')",
    )
    .await
    .unwrap();
    produce(&env.admin, "orders", 2).await;
    produce(&env.admin, "refunds", 2).await;

    // Follow from the position, as the binary, while A is still open.
    let mut child = Command::new(env!("CARGO_BIN_EXE_eventsctl"))
        .args([
            "tail",
            "--from",
            &from,
            "--follow",
            "--poll-interval",
            "100ms",
        ])
        .env_clear()
        .env("DATABASE_URL", env.pg.url_for("ops", None))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    // Committed events behind A's open transaction must wait for it: had tail printed them, its
    // position would be past A's event, and A's event would never appear below.
    tokio::time::sleep(Duration::from_millis(500)).await;
    late.batch_execute("COMMIT").await.unwrap();
    let mut followed = Vec::new();
    while followed.len() < 5 {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("tail --follow prints every committed event");
        followed.push(serde_json::from_str::<serde_json::Value>(&line).unwrap());
    }
    child.kill().unwrap();
    child.wait().unwrap();

    let expected: Vec<i64> = env
        .admin
        .query(
            "SELECT id FROM events WHERE (tx_id, id) > ($1::text::xid8, $2) ORDER BY tx_id, id",
            &[
                &from.split('/').next().unwrap(),
                &from.split('/').nth(1).unwrap().parse::<i64>().unwrap(),
            ],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let ids = |events: &[serde_json::Value]| -> Vec<i64> {
        events.iter().map(|e| e["id"].as_i64().unwrap()).collect()
    };
    assert_eq!(expected.len(), 5);
    assert_eq!(
        ids(&followed),
        expected,
        "every event once, in position order"
    );
    assert_eq!(
        followed[0]["payload"]["late"], true,
        "the late commit comes first: lowest tx id"
    );
    assert!(followed[0]["id"].as_i64() > Some(0));
    for field in [
        "position",
        "event_id",
        "topic",
        "key",
        "type",
        "created_at",
        "payload",
        "headers",
    ] {
        assert!(
            followed[1].get(field).is_some(),
            "{field} in {}",
            followed[1]
        );
    }

    // Without --follow it stops at the last committed event; --topic and --limit filter.
    let once = env.ctl(&["tail", "--from", &from]).await;
    assert_exit(&once, 0, "tail without --follow");
    assert_eq!(ids(&lines(&once)), expected);
    let refunds = env
        .ctl(&["tail", "--from", &from, "--topic", "refunds"])
        .await;
    assert_eq!(lines(&refunds).len(), 2);
    assert!(lines(&refunds).iter().all(|e| e["topic"] == "refunds"));
    let two = env
        .ctl(&["tail", "--from", "earliest", "--limit", "2"])
        .await;
    assert_eq!(lines(&two).len(), 2);
    let latest = env.ctl(&["tail", "--from", "latest"]).await;
    assert_exit(&latest, 0, "from latest");
    assert!(lines(&latest).is_empty());

    // An open transaction holds committed events back: tail says so instead of skipping them.
    let open = common::connect(&env.pg.url()).await;
    open.batch_execute("BEGIN; INSERT INTO events (topic, payload) VALUES ('orders', '{}')")
        .await
        .unwrap();
    produce(&env.admin, "orders", 1).await;
    let held = env.ctl(&["tail", "--from", "latest"]).await;
    assert_exit(&held, 0, "held back");
    assert!(lines(&held).is_empty());
    assert!(
        stderr(&held).contains("held back by an older open transaction"),
        "{}",
        stderr(&held)
    );
    open.batch_execute("ROLLBACK").await.unwrap();

    for bad in [
        &["tail", "--from", "whenever"][..],
        &["tail", "--topic", "a b"][..],
    ] {
        assert_exit(&env.ctl(bad).await, 2, "bad input");
    }
}

/// Causal order as `tail` prints it: A writes an unrelated row first, B appends, updates a
/// captured row and commits, then A appends and updates the row it now sees. Per key the events
/// come in the order they became visible, and the captured diffs chain.
#[tokio::test(flavor = "multi_thread")]
async fn tail_prints_a_change_made_after_a_commit_after_it() {
    let env = setup(false).await;
    env.admin
        .batch_execute(
            "CREATE TABLE audit (n int);
             CREATE TABLE acct (id int PRIMARY KEY, v bigint NOT NULL);
             INSERT INTO acct VALUES (1, 0);
             SELECT capture_add('acct', 'acct');",
        )
        .await
        .unwrap();
    let a = common::connect(&env.pg.url()).await;
    let b = common::connect(&env.pg.url()).await;
    let append = |seq: i64| {
        format!("INSERT INTO events (topic, key, payload) VALUES ('o', 'k', '{{\"seq\": {seq}}}')")
    };
    for round in 0..3 {
        a.batch_execute("BEGIN; INSERT INTO audit VALUES (1)")
            .await
            .unwrap();
        b.batch_execute(&format!(
            "BEGIN; {}; UPDATE acct SET v = v + 1 WHERE id = 1; COMMIT",
            append(2 * round + 1)
        ))
        .await
        .unwrap();
        a.batch_execute(&format!(
            "{}; UPDATE acct SET v = v * 10 WHERE id = 1; COMMIT",
            append(2 * round + 2)
        ))
        .await
        .unwrap();
    }
    let out = env.ctl(&["tail", "--from", "earliest"]).await;
    assert_exit(&out, 0, "tail");
    let events = lines(&out);
    let seqs: Vec<i64> = events
        .iter()
        .filter(|e| e["topic"] == "o")
        .map(|e| e["payload"]["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5, 6]);
    let diffs: Vec<(i64, i64)> = events
        .iter()
        .filter(|e| e["topic"] == "acct")
        .map(|e| {
            let v = &e["payload"]["changed"]["v"];
            (v["old"].as_i64().unwrap(), v["new"].as_i64().unwrap())
        })
        .collect();
    assert_eq!(
        diffs,
        [
            (0, 1),
            (1, 10),
            (10, 11),
            (11, 110),
            (110, 111),
            (111, 1110)
        ]
    );
}

/// Without `--follow`, tail stops only when nothing more is readable — never because a batch was
/// cut by the byte bound or a topic filter skipped most rows: every stored event is printed, for
/// 8 KiB and 1 MiB payloads (compressible and not), and a filter that skips most rows.
#[tokio::test(flavor = "multi_thread")]
async fn tail_prints_every_stored_event_whatever_cuts_the_batches() {
    let env = setup(false).await;
    // 3,000 events of 8 KiB: a 4 MiB batch holds about 500 of them.
    env.admin
        .batch_execute(
            "INSERT INTO events (topic, payload)
             SELECT 'big', jsonb_build_object('n', g, 'pad', repeat(md5(g::text), 256))
               FROM generate_series(1, 3000) AS g",
        )
        .await
        .unwrap();
    let out = env.ctl(&["tail", "--from", "earliest"]).await;
    assert_exit(&out, 0, "tail of 8 KiB events");
    let printed = lines(&out);
    assert_eq!(printed.len(), 3000, "every 8 KiB event");
    let ns: Vec<i64> = printed
        .iter()
        .map(|e| e["payload"]["n"].as_i64().unwrap())
        .collect();
    assert_eq!(ns, (1..=3000).collect::<Vec<_>>(), "in order, once each");

    // 1 MiB payloads: repeated text (stored compressed, so the server's size bound lets more
    // through than the reader takes) and random-looking text.
    env.admin
        .batch_execute(
            "TRUNCATE events;
             INSERT INTO events (topic, payload)
             SELECT 'huge', jsonb_build_object('n', g, 'pad',
                    CASE WHEN g % 2 = 0 THEN repeat('x', 1 << 20)
                         ELSE (SELECT string_agg(md5(g::text || i::text), '') FROM generate_series(1, 32768) AS i) END)
               FROM generate_series(1, 12) AS g",
        )
        .await
        .unwrap();
    let out = env.ctl(&["tail", "--from", "earliest"]).await;
    assert_exit(&out, 0, "tail of 1 MiB events");
    let ns: Vec<i64> = lines(&out)
        .iter()
        .map(|e| e["payload"]["n"].as_i64().unwrap())
        .collect();
    assert_eq!(ns, (1..=12).collect::<Vec<_>>(), "every 1 MiB event");

    // A filter that skips most rows: 10 wanted among 20,000.
    env.admin
        .batch_execute(
            "TRUNCATE events;
             INSERT INTO events (topic, payload)
             SELECT CASE WHEN g % 2000 = 0 THEN 'wanted' ELSE 'noise' END, jsonb_build_object('n', g)
               FROM generate_series(1, 20000) AS g",
        )
        .await
        .unwrap();
    let out = env
        .ctl(&[
            "tail",
            "--from",
            "earliest",
            "--topic",
            "wanted",
            "--batch-size",
            "500",
        ])
        .await;
    assert_exit(&out, 0, "tail with a filter");
    let ns: Vec<i64> = lines(&out)
        .iter()
        .map(|e| e["payload"]["n"].as_i64().unwrap())
        .collect();
    assert_eq!(ns, (1..=10).map(|i| i * 2000).collect::<Vec<_>>());
}

/// With `--follow`: every stored 8 KiB event, then live ones as they commit.
#[tokio::test(flavor = "multi_thread")]
async fn tail_follow_prints_stored_then_live_events() {
    let env = setup(false).await;
    env.admin
        .batch_execute(
            "INSERT INTO events (topic, payload)
             SELECT 'big', jsonb_build_object('n', g, 'pad', repeat(md5(g::text), 256))
               FROM generate_series(1, 1500) AS g",
        )
        .await
        .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_eventsctl"))
        .args([
            "tail",
            "--from",
            "earliest",
            "--follow",
            "--poll-interval",
            "200ms",
        ])
        .env_clear()
        .env("DATABASE_URL", env.pg.url_for("ops", None))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    let mut ns = Vec::new();
    let next = |ns: &mut Vec<i64>| {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("tail --follow prints every event");
        let event: serde_json::Value = serde_json::from_str(&line).unwrap();
        ns.push(event["payload"]["n"].as_i64().unwrap());
    };
    while ns.len() < 1500 {
        next(&mut ns);
    }
    env.admin
        .batch_execute(
            "INSERT INTO events (topic, payload)
             SELECT 'big', jsonb_build_object('n', g, 'pad', repeat(md5(g::text), 256))
               FROM generate_series(1501, 2000) AS g;
             SELECT pg_notify('events', '')",
        )
        .await
        .unwrap();
    while ns.len() < 2000 {
        next(&mut ns);
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(ns, (1..=2000).collect::<Vec<_>>());
}
