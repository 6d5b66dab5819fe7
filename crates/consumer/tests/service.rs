//! The service around the loop: exit codes and messages of the binary, SIGTERM, purge gaps in
//! /healthz and /metrics, and the refusal to run on a checkpoint from another cluster.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use common::*;
use mongodb::bson::doc;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use testbed::Postgres;

const RECEIVED: &str = "receivedEvents";

/// Runs the binary to completion (it must exit on its own within a minute).
fn run_binary(envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_consumer"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("LOG_LEVEL", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the consumer did not exit on bad configuration: {envs:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

fn assert_refused(output: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "should fail: {stderr}");
    assert!(
        stderr.contains(needle),
        "stderr should mention {needle:?}: {stderr}"
    );
}

#[test]
fn bad_configuration_exits_non_zero_with_a_clear_message() {
    // Nothing listens here: the configuration is refused before anything is contacted.
    let mongo = "mongodb://127.0.0.1:9/?directConnection=true";
    let pg_nowhere = "postgres://u@127.0.0.1:9/db";

    let out = run_binary(&[
        ("DATABASE_URL", "postgres://u@h:notaport/db"),
        ("MONGODB_URI", mongo),
    ]);
    assert_refused(
        &out,
        "error: invalid configuration: DATABASE_URL is not a valid",
    );
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("notaport/db"),
        "no URL echoed"
    );

    let out = run_binary(&[
        ("DATABASE_URL", pg_nowhere),
        ("MONGODB_URI", "mongo://nope"),
    ]);
    assert_refused(&out, "MONGODB_URI is not a valid MongoDB connection string");

    let out = run_binary(&[("DATABASE_URL", pg_nowhere)]);
    assert_refused(&out, "MONGODB_URI (--mongodb-uri) is required");

    let out = run_binary(&[
        ("DATABASE_URL", pg_nowhere),
        ("MONGODB_URI", mongo),
        ("CONSUMER_NAME", "no spaces"),
    ]);
    assert_refused(&out, "CONSUMER_NAME");

    let out = run_binary(&[
        ("DATABASE_URL", pg_nowhere),
        ("MONGODB_URI", mongo),
        ("CONSUMER_BATCH_SIZE", "0"),
    ]);
    assert_refused(&out, "--batch-size");

    let out = run_binary(&[
        ("DATABASE_URL", pg_nowhere),
        ("MONGODB_URI", mongo),
        ("CONSUMER_POLL_INTERVAL", "often"),
    ]);
    assert_refused(&out, "expected a duration");

    let out = run_binary(&[
        ("DATABASE_URL", pg_nowhere),
        ("CONSUMER_SINK", "null"),
        ("CONSUMER_MIRROR", "public.orders"),
    ]);
    assert_refused(
        &out,
        "needs --sink mongodb (this consumer uses --sink null)",
    );

    let out = run_binary(&[
        ("DATABASE_URL", pg_nowhere),
        ("MONGODB_URI", mongo),
        ("CONSUMER_TOPICS", "billing"),
        ("CONSUMER_MIRROR", "public.orders=orders"),
    ]);
    assert_refused(&out, "the topic is not among --topics");

    // A real server: schema missing, then a role without the consumer's grants.
    let pg = Postgres::start();
    let out = run_binary(&[("DATABASE_URL", &pg.url()), ("MONGODB_URI", mongo)]);
    assert_refused(&out, "the schema is not migrated; run `migrate`");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut admin = connect(&pg.url()).await;
        event_store::migrations::run(&mut admin).await.unwrap();
    });
    pg.psql("CREATE ROLE intruder LOGIN");
    let out = run_binary(&[
        ("DATABASE_URL", &pg.url_for("intruder", None)),
        ("MONGODB_URI", mongo),
    ]);
    assert_refused(&out, "GRANT events_consumer TO \"intruder\"");

    let out = run_binary(&[
        ("DATABASE_URL", &pg.url()),
        ("MONGODB_URI", mongo),
        ("HTTP_ADDR", "not-an-address"),
    ]);
    assert_refused(&out, "--http-addr");
}

/// SIGTERM mid-stream: exit 0 between batches; a restart continues without loss or doubling.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_cleanly_and_a_restart_continues() {
    let env = setup().await;
    for _ in 0..6 {
        produce(&env.admin, "courses", 1000).await;
    }
    let consumer_url = env.consumer_url();
    let mongo_uri = env.mongo.uri();
    let spawn = || {
        Command::new(env!("CARGO_BIN_EXE_consumer"))
            .env("DATABASE_URL", &consumer_url)
            .env("MONGODB_URI", &mongo_uri)
            .env("MONGODB_DATABASE", &env.database)
            .env("CONSUMER_BATCH_SIZE", "100")
            .env("LOG_LEVEL", "info")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let child = spawn();
    wait_until(
        "some events are delivered",
        Duration::from_secs(60),
        || async { env.mongo_count(RECEIVED).await > 0 },
    )
    .await;
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "SIGTERM exits 0: {}\n{stderr}",
        out.status
    );
    assert!(stderr.contains("SIGTERM received"), "{stderr}");
    assert!(stderr.contains("Stopped."), "{stderr}");
    // The checkpoint matches what is stored: nothing past it, nothing missing before it.
    let checkpoint = env.checkpoint("consumer").await.expect("a checkpoint");
    let at: i64 = checkpoint.get_i64("id").unwrap();
    let stored = env.mongo_ids(RECEIVED).await;
    assert_eq!(stored, env.pg_ids(&format!("WHERE id <= {at}")));

    let mut child = spawn();
    wait_delivered(&env, RECEIVED, "", Duration::from_secs(120)).await;
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    assert!(child.wait().unwrap().success());
}

/// Events purged before delivery: reported in the log, /metrics and /healthz (until restart), and
/// delivery continues from the oldest event still stored. Detected on start-up and mid-run.
#[tokio::test(flavor = "multi_thread")]
async fn purge_gaps_are_reported_and_delivery_continues() {
    let env = setup().await;
    produce(&env.admin, "courses", 100).await;
    let consumer = spawn(env.config("gappy"));
    wait_delivered(&env, RECEIVED, "", Duration::from_secs(30)).await;
    consumer.stop().await;

    // While it is stopped, a forced purge takes events it has not delivered.
    produce(&env.admin, "courses", 100).await;
    let first_lost: i64 = env
        .pg
        .psql("SELECT min(id) + 100 FROM events")
        .parse()
        .unwrap();
    let last_lost = first_lost + 49;
    let purge = |from: i64, to: i64| {
        env.pg.psql(&format!(
            "BEGIN;
             INSERT INTO purge_watermark (tx_id, id, forced)
                  SELECT tx_id, id, true FROM events WHERE id = {to}
             ON CONFLICT (singleton) DO UPDATE SET tx_id = EXCLUDED.tx_id, id = EXCLUDED.id, forced = true;
             DELETE FROM events WHERE id BETWEEN {from} AND {to};
             COMMIT;"
        ));
    };
    let lost_position = env.pg.psql(&format!(
        "SELECT tx_id::text || '/' || id FROM events WHERE id = {last_lost}"
    ));
    purge(first_lost, last_lost);

    let addr = free_addr();
    let mut config = env.config("gappy");
    config.http.http_addr = Some(addr);
    config.poll_interval = Duration::from_secs(3600);
    let consumer = spawn(config);
    wait_delivered(&env, RECEIVED, "", Duration::from_secs(30)).await;
    assert_eq!(env.mongo_count(RECEIVED).await, 150);
    let (status, body) = http_get(addr, "/healthz").await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("gap:") && body.contains(&lost_position),
        "{body}"
    );
    let metrics = http_get(addr, "/metrics").await.unwrap().1;
    assert!(
        metrics.contains("consumer_gaps_total{consumer=\"gappy\"} 1"),
        "{metrics}"
    );
    // (Both runs share this process's recorder: 100 + 50.)
    assert!(
        metrics.contains("consumer_events_delivered_total{consumer=\"gappy\"} 150"),
        "{metrics}"
    );

    // Mid-run: events commit without a wake-up, are purged, then a wake-up comes.
    produce_silently(&env, 20);
    let from: i64 = env
        .pg
        .psql("SELECT max(id) - 19 FROM events")
        .parse()
        .unwrap();
    purge(from, from + 9);
    env.pg.psql("SELECT pg_notify('events', '')");
    wait_delivered(&env, RECEIVED, "", Duration::from_secs(30)).await;
    wait_until(
        "the second gap is counted",
        Duration::from_secs(10),
        || async {
            let metrics = http_get(addr, "/metrics").await.unwrap().1;
            metrics.contains("consumer_gaps_total{consumer=\"gappy\"} 2")
        },
    )
    .await;
    // Later events flow on; health stays degraded until restart.
    produce(&env.admin, "courses", 5).await;
    wait_delivered(&env, RECEIVED, "", Duration::from_secs(30)).await;
    assert_eq!(http_get(addr, "/healthz").await.unwrap().0, 503);
    consumer.stop().await;

    // Every unread event purged: nothing is stored past the gap, and it is still reported.
    produce(&env.admin, "courses", 10).await;
    let (from, to): (i64, i64) = {
        let ids = env
            .pg
            .psql("SELECT max(id) - 9 || ' ' || max(id) FROM events");
        let (a, b) = ids.split_once(' ').unwrap();
        (a.parse().unwrap(), b.parse().unwrap())
    };
    let lost_position = env.pg.psql(&format!(
        "SELECT tx_id::text || '/' || id FROM events WHERE id = {to}"
    ));
    purge(from, to);
    let addr = free_addr();
    let mut config = env.config("gappy");
    config.http.http_addr = Some(addr);
    let consumer = spawn(config);
    wait_until(
        "the gap with nothing past it is reported",
        Duration::from_secs(30),
        || async {
            let metrics = http_get(addr, "/metrics").await.map(|r| r.1);
            metrics.is_some_and(|m| m.contains("consumer_gaps_total{consumer=\"gappy\"} 3"))
        },
    )
    .await;
    let (status, body) = http_get(addr, "/healthz").await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains(&lost_position), "{body}");
    produce(&env.admin, "courses", 5).await;
    wait_delivered(&env, RECEIVED, "", Duration::from_secs(30)).await;
    assert_eq!(env.mongo_count(RECEIVED).await, 150 + 10 + 5 + 5);
    consumer.stop().await;

    // A consumer without a checkpoint starts at the oldest event and reports no gap.
    let addr = free_addr();
    let mut config = env.config("newcomer");
    config.http.http_addr = Some(addr);
    config.mongodb_collection = "newcomer".into();
    let consumer = spawn(config);
    wait_delivered(&env, "newcomer", "", Duration::from_secs(30)).await;
    wait_until("/healthz is ok", Duration::from_secs(30), || async {
        http_get(addr, "/healthz").await.map(|r| r.0) == Some(200)
    })
    .await;
    consumer.stop().await;
}

fn produce_silently(env: &Env, n: i64) {
    env.pg.psql(&format!(
        "INSERT INTO events (topic, payload) SELECT 'courses', '{{}}' FROM generate_series(1, {n})"
    ));
}

/// A checkpoint ahead of the cluster's transaction counter (a dump restored into a new cluster)
/// is refused with the re-base hint, instead of silently skipping every new event.
#[tokio::test(flavor = "multi_thread")]
async fn a_checkpoint_from_another_cluster_is_refused() {
    let env = setup().await;
    produce(&env.admin, "courses", 3).await;
    env.collection("checkpoints")
        .await
        .insert_one(doc! {"_id": "restored", "tx_id": 9_000_000_000_i64, "id": 3_i64})
        .await
        .unwrap();
    let out = tokio::task::spawn_blocking({
        let (url, uri, db) = (env.consumer_url(), env.mongo.uri(), env.database.clone());
        move || {
            run_binary(&[
                ("DATABASE_URL", &url),
                ("MONGODB_URI", &uri),
                ("MONGODB_DATABASE", &db),
                ("CONSUMER_NAME", "restored"),
            ])
        }
    })
    .await
    .unwrap();
    assert_refused(&out, "Restoring into a new cluster");
    assert_refused(&out, "9000000000/3");
    assert_eq!(env.mongo_count(RECEIVED).await, 0, "nothing delivered");
}

/// The "Restoring into a new cluster" procedure of docs/consumer.md, end to end: a dump of a
/// cluster whose transaction ids are far ahead is restored into a fresh cluster; the consumer
/// refuses to run there; after the re-base it delivers the undelivered restored events and the new
/// ones, and nothing twice.
#[tokio::test(flavor = "multi_thread")]
async fn the_documented_rebase_after_a_restore_works() {
    let env = setup().await;
    // Push the old cluster's transaction counter well past a fresh cluster's.
    for _ in 0..3000 {
        env.admin
            .batch_execute("SELECT pg_current_xact_id()")
            .await
            .unwrap();
    }
    produce(&env.admin, "courses", 200).await;
    let consumer = spawn(env.config("consumer"));
    wait_delivered(&env, RECEIVED, "", Duration::from_secs(30)).await;
    consumer.stop().await;
    produce(&env.admin, "courses", 100).await; // not delivered before the move

    let dump = Command::new(env.pg.bindir().join("pg_dump"))
        .arg("-d")
        .arg(env.pg.url())
        .output()
        .unwrap();
    assert!(
        dump.status.success(),
        "{}",
        String::from_utf8_lossy(&dump.stderr)
    );
    // Roles are cluster-wide and not in a database's dump: carried over first, as an operator
    // does (`pg_dumpall --roles-only`; the superuser already exists there, so its line fails).
    let roles = Command::new(env.pg.bindir().join("pg_dumpall"))
        .args(["--roles-only", "-d"])
        .arg(env.pg.url())
        .output()
        .unwrap();
    assert!(
        roles.status.success(),
        "{}",
        String::from_utf8_lossy(&roles.stderr)
    );
    let new = Postgres::start();
    let roles_file = tempfile_path("roles.sql");
    std::fs::write(&roles_file, &roles.stdout).unwrap();
    let applied = Command::new(new.bindir().join("psql"))
        .args(["-X", "-q", "-d"])
        .arg(new.url())
        .arg("-f")
        .arg(&roles_file)
        .output()
        .unwrap();
    assert!(applied.status.success());
    let _ = std::fs::remove_file(&roles_file);
    let dump_file = tempfile_path("dump.sql");
    std::fs::write(&dump_file, &dump.stdout).unwrap();
    let restore = Command::new(new.bindir().join("psql"))
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d"])
        .arg(new.url())
        .arg("-f")
        .arg(&dump_file)
        .output()
        .unwrap();
    assert!(
        restore.status.success(),
        "{}",
        String::from_utf8_lossy(&restore.stderr)
    );
    let _ = std::fs::remove_file(&dump_file);

    let mut config = env.config("consumer");
    config.postgres.database_url = new.url_for("mongo_sink", None);
    let refused = consumer::run(config.clone(), Default::default()).await;
    let err = refused
        .expect_err("a checkpoint from the old cluster")
        .to_string();
    assert!(err.contains("Restoring into a new cluster"), "{err}");

    // The procedure, as documented (consumers, producers and the purger stopped).
    let checkpoint = env.checkpoint("consumer").await.unwrap();
    let (tx, id) = (
        checkpoint.get_i64("tx_id").unwrap(),
        checkpoint.get_i64("id").unwrap(),
    );
    let resume: i64 = new
        .psql(&format!(
            "SELECT coalesce(min(id) - 1, (SELECT coalesce(max(id), 0) FROM events))
               FROM events WHERE (tx_id, id) > ('{tx}'::xid8, {id})"
        ))
        .parse()
        .unwrap();
    new.psql(
        "BEGIN; UPDATE events SET tx_id = '1'; DELETE FROM consumer_positions;
         DELETE FROM purge_watermark; COMMIT;",
    );
    env.collection("checkpoints")
        .await
        .update_one(
            doc! {"_id": "consumer"},
            doc! {"$set": {"tx_id": 1_i64, "id": resume}, "$unset": {"event_id": "", "origin": ""}},
        )
        .await
        .unwrap();

    let producer = connect(&new.url()).await;
    produce(&producer, "courses", 50).await;
    let running = spawn(config);
    let expected = new.psql("SELECT string_agg(id::text, ',' ORDER BY id) FROM events");
    wait_until(
        "the restored and the new events are delivered",
        Duration::from_secs(60),
        || async {
            let ids = env.mongo_ids(RECEIVED).await;
            ids.iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(",")
                == expected
        },
    )
    .await;
    running.stop().await;
    assert_eq!(env.mongo_count(RECEIVED).await, 350);
    let last = new
        .psql("SELECT tx_id::text || '/' || id FROM events ORDER BY tx_id DESC, id DESC LIMIT 1");
    assert_eq!(
        checkpoint_text(&env.checkpoint("consumer").await.unwrap()),
        last
    );
}

fn tempfile_path(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("consumer-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// The heartbeat: a consumer that is alive but cannot move (its MongoDB is away) refreshes its
/// `consumer_positions` row, so a purger with a short consumer expiry still keeps every event it
/// has not delivered, however many expiry periods pass.
#[tokio::test(flavor = "multi_thread")]
async fn an_idle_consumer_is_not_expired_by_the_purger() {
    let mut env = setup().await;
    env.admin
        .batch_execute("CREATE ROLE idle_purger LOGIN IN ROLE events_purger")
        .await
        .unwrap();
    let mut config = env.config("idle");
    config.heartbeat_interval = Duration::from_millis(200);
    let consumer = spawn(config);
    produce(&env.admin, "courses", 10).await;
    wait_delivered(&env, RECEIVED, "", Duration::from_secs(30)).await;

    tokio::task::block_in_place(|| env.mongo.stop());
    produce(&env.admin, "courses", 10).await;
    // Several expiry periods without a single delivery.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let purger = purger::Config::try_parse_from([
        "purger",
        "--database-url",
        &env.pg.url_for("idle_purger", None),
        "--once",
        "--retention",
        "0s",
        "--consumer-expiry",
        "1s",
    ])
    .unwrap();
    purger::run(purger, tokio_util::sync::CancellationToken::new())
        .await
        .expect("the purger pass");
    assert_eq!(
        env.pg.psql("SELECT count(*) FROM events"),
        "10",
        "the delivered events are purged, the undelivered ones kept"
    );

    tokio::task::block_in_place(|| env.mongo.restart());
    wait_until("all 20 delivered", Duration::from_secs(60), || async {
        env.mongo_count(RECEIVED).await == 20
    })
    .await;
    consumer.stop().await;
}

/// The lease: a second consumer with the same name waits (and says why on `/healthz`) instead of
/// writing beside the first; it takes over when the first stops.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_consumer_with_the_same_name_waits_for_the_lease() {
    let env = setup().await;
    let first = spawn(env.config("twin"));
    produce(&env.admin, "courses", 20).await;
    wait_delivered(&env, RECEIVED, "", Duration::from_secs(30)).await;

    let addr = free_addr();
    let mut config = env.config("twin");
    config.http.http_addr = Some(addr);
    let second = spawn(config);
    wait_until(
        "the second one reports the held lease",
        Duration::from_secs(30),
        || async {
            matches!(http_get(addr, "/healthz").await, Some((503, body)) if body.contains("lease"))
        },
    )
    .await;
    first.stop().await;
    produce(&env.admin, "courses", 20).await;
    wait_delivered(&env, RECEIVED, "", Duration::from_secs(60)).await;
    second.stop().await;
}
