//! Outages: PostgreSQL and MongoDB stopped or crashed mid-stream, the LISTEN backend terminated,
//! and the consumer binary killed at random points many times. After each, everything committed
//! arrives exactly once (checked through psql and an independent MongoDB client).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const RECEIVED: &str = "receivedEvents";

/// Inserts small batches (1–5 events per transaction, each with a wake-up) until stopped,
/// riding out outages; returns how many transactions committed.
fn start_producer(url: String, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut committed = 0u64;
        let mut client: Option<tokio_postgres::Client> = None;
        while !stop.load(Ordering::Relaxed) {
            if client.as_ref().is_none_or(|c| c.is_closed()) {
                client = match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                    Ok((c, conn)) => {
                        tokio::spawn(conn);
                        Some(c)
                    }
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
            }
            let c = client.as_ref().unwrap();
            let n = rand::random_range(1..=5i64);
            let ok = c
                .batch_execute(&format!(
                    "BEGIN;
                     INSERT INTO events (topic, payload)
                       SELECT 'courses', jsonb_build_object('i', g) FROM generate_series(1, {n}) g;
                     SELECT pg_notify('events', '');
                     COMMIT;"
                ))
                .await
                .is_ok();
            if ok {
                committed += 1;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        committed
    })
}

async fn reconnects(addr: std::net::SocketAddr, consumer: &str, database: &str) -> f64 {
    let metrics = http_get(addr, "/metrics")
        .await
        .map(|r| r.1)
        .unwrap_or_default();
    let key =
        format!("consumer_reconnects_total{{consumer=\"{consumer}\",database=\"{database}\"}}");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_stopped_and_crashed_mid_stream() {
    let mut env = setup().await;
    let addr = free_addr();
    let mut config = env.config("pg-outage");
    config.http.http_addr = Some(addr);
    let consumer = spawn(config);
    let stop = Arc::new(AtomicBool::new(false));
    let producer = start_producer(env.pg.url(), stop.clone());

    for crash in [false, true] {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        tokio::task::block_in_place(|| if crash { env.pg.kill() } else { env.pg.stop() });
        wait_until("/healthz reports PostgreSQL down", Duration::from_secs(30), || async {
            matches!(http_get(addr, "/healthz").await, Some((503, body)) if body.contains("postgres"))
        })
        .await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        tokio::task::block_in_place(|| env.pg.restart());
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    assert!(producer.await.unwrap() > 0);

    recovered_and_caught_up(&env, addr, "pg-outage", "postgres", 2.0, 90).await;
    consumer.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mongodb_stopped_and_crashed_mid_stream() {
    let mut env = setup().await;
    if env.mongo.kind() == testbed::MongoKind::External {
        eprintln!("TEST_MONGODB_URI is set: an external server cannot be restarted");
        return;
    }
    let addr = free_addr();
    let mut config = env.config("mongo-outage");
    config.http.http_addr = Some(addr);
    let consumer = spawn(config);
    let stop = Arc::new(AtomicBool::new(false));
    let producer = start_producer(env.pg.url(), stop.clone());

    for crash in [false, true] {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        tokio::task::block_in_place(|| {
            if crash {
                env.mongo.kill()
            } else {
                env.mongo.stop()
            }
        });
        wait_until("/healthz reports MongoDB down", Duration::from_secs(30), || async {
            matches!(http_get(addr, "/healthz").await, Some((503, body)) if body.contains("mongodb"))
        })
        .await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        tokio::task::block_in_place(|| env.mongo.restart());
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    assert!(producer.await.unwrap() > 0);

    recovered_and_caught_up(&env, addr, "mongo-outage", "mongodb", 1.0, 120).await;
    consumer.stop().await;
}

/// A server that acknowledges writes and then loses them (no journal sync, `kill -9`), many times
/// under load: the consumer notices its checkpoint moved back, delivers again from there, and in
/// the end every event is stored exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn mongodb_losing_acknowledged_writes_loses_no_event() {
    let mut env = common::setup_with(testbed::Mongo::start_forgetful()).await;
    if env.mongo.kind() == testbed::MongoKind::External {
        eprintln!("TEST_MONGODB_URI is set: an external server cannot be killed");
        return;
    }
    let addr = free_addr();
    let mut config = env.config("forgetful");
    config.http.http_addr = Some(addr);
    config.batch_size = Some(50);
    let consumer = spawn(config);
    let stop = Arc::new(AtomicBool::new(false));
    let producer = start_producer(env.pg.url(), stop.clone());
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(rand::random_range(400..1500))).await;
        tokio::task::block_in_place(|| {
            env.mongo.kill();
            env.mongo.restart();
        });
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    assert!(producer.await.unwrap() > 0);
    recovered_and_caught_up(&env, addr, "forgetful", "mongodb", 0.0, 120).await;
    let metrics = http_get(addr, "/metrics").await.unwrap().1;
    let rewinds = metrics
        .lines()
        .find(|l| l.starts_with("consumer_checkpoint_rewinds_total{consumer=\"forgetful\"}"))
        .unwrap_or("no rewind");
    eprintln!("checkpoint found moved back after lost writes: {rewinds}");
    consumer.stop().await;
}

/// The LISTEN backend terminated by an operator: the consumer reconnects, LISTENs again, and
/// wake-ups work again (the fallback poll is an hour, so only a wake-up can deliver).
#[tokio::test(flavor = "multi_thread")]
async fn listen_backend_terminated() {
    let env = setup().await;
    let mut config = env.config("listener");
    config.poll_interval = Duration::from_secs(3600);
    let consumer = spawn(config);
    let listen_pid = || {
        env.pg.psql(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'events-consumer:listener:listen'",
        )
    };
    produce(&env.admin, "courses", 10).await;
    wait_delivered(&env, RECEIVED, "", Duration::from_secs(30)).await;
    for round in 0..3 {
        let old = listen_pid();
        assert!(!old.is_empty(), "round {round}: a LISTEN backend exists");
        assert_eq!(
            env.pg.psql(&format!("SELECT pg_terminate_backend({old})")),
            "t"
        );
        // Events committed while the consumer reconnects come with the catch-up fetch.
        produce(&env.admin, "courses", 5).await;
        wait_until("a new LISTEN backend", Duration::from_secs(30), || async {
            let now = listen_pid();
            !now.is_empty() && now != old
        })
        .await;
        wait_delivered(&env, RECEIVED, "", Duration::from_secs(30)).await;
        // And the new connection is woken by NOTIFY.
        produce(&env.admin, "courses", 5).await;
        wait_delivered(&env, RECEIVED, "", Duration::from_secs(30)).await;
    }
    consumer.stop().await;
}

/// The binary SIGKILLed at random points (mid-fetch, mid-transaction, mid-checkpoint) many
/// times while events keep coming, alternating between transactional and idempotent writes: in
/// the end every committed event is stored once and the checkpoint is the last position.
#[tokio::test(flavor = "multi_thread")]
async fn killed_at_random_points_many_times() {
    let env = setup().await;
    let stop = Arc::new(AtomicBool::new(false));
    let producer = start_producer(env.pg.url(), stop.clone());
    for round in 0..14 {
        let mode = if round % 2 == 0 { "auto" } else { "off" };
        let mut child = spawn_binary(&env, "crashy", mode);
        tokio::time::sleep(Duration::from_millis(rand::random_range(300..1500))).await;
        kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
        child.wait().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    assert!(producer.await.unwrap() > 0);
    let delivered_before = env.mongo_count(RECEIVED).await;
    assert!(delivered_before > 0, "the killed runs delivered something");

    let mut child = spawn_binary(&env, "crashy", "auto");
    wait_delivered(&env, RECEIVED, "", Duration::from_secs(120)).await;
    let last = env.pg_last_position("");
    wait_until(
        "the checkpoint reaches the end",
        Duration::from_secs(30),
        || async {
            env.checkpoint("crashy").await.map(|c| checkpoint_text(&c)) == Some(last.clone())
        },
    )
    .await;
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "SIGTERM ends the consumer with 0: {status}"
    );
    assert_eq!(
        env.pg.psql(
            "SELECT tx_id::text || '/' || id FROM consumer_positions WHERE consumer = 'crashy'"
        ),
        last
    );
    // Exactly the committed events, each once (by _id and by event_id).
    let ids = env.mongo_ids(RECEIVED).await;
    assert_eq!(ids, env.pg_ids(""));
    let distinct = env
        .collection(RECEIVED)
        .await
        .distinct("event_id", mongodb::bson::doc! {})
        .await
        .unwrap();
    assert_eq!(distinct.len(), ids.len());
}

/// After an outage: every event delivered, the checkpoint at the last one, at least
/// `min_reconnects` counted for `connection`, and `/healthz` back to 200.
async fn recovered_and_caught_up(
    env: &Env,
    addr: std::net::SocketAddr,
    name: &str,
    connection: &str,
    min_reconnects: f64,
    delivery_secs: u64,
) {
    wait_delivered(env, RECEIVED, "", Duration::from_secs(delivery_secs)).await;
    let last = env.pg_last_position("");
    wait_until(
        "the checkpoint reaches the end",
        Duration::from_secs(30),
        || async { env.checkpoint(name).await.map(|c| checkpoint_text(&c)) == Some(last.clone()) },
    )
    .await;
    assert!(reconnects(addr, name, connection).await >= min_reconnects);
    wait_until("/healthz recovers", Duration::from_secs(30), || async {
        http_get(addr, "/healthz").await.map(|r| r.0) == Some(200)
    })
    .await;
}
