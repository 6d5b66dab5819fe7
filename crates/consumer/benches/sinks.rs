//! The JetStream and webhook sinks against raw baselines measured in the same run
//! (`cargo bench -p consumer --bench sinks`; `BENCH_ONLY=nats` or `BENCH_ONLY=http` for one).
//!
//! 1. **JetStream, one node** (file storage): the consumer catching up `BENCH_NATS_EVENTS`
//!    (default 200 000) events vs a raw async-nats loop publishing the *same messages* (subject,
//!    payload and the consumer's headers, read from PostgreSQL beforehand) with the same number
//!    of acknowledgements in flight (`--nats-max-in-flight`, default 256), into a fresh server
//!    each run. Runs alternate (`BENCH_ROUNDS`, default 3); the best of each is reported.
//! 2. **JetStream, 3 nodes, R3**: the same, once each, on a 3-node cluster (reported).
//! 3. **Webhook**: the consumer binary (`--sink http`) against a loopback receiver that checks
//!    every signature and answers 200 after 5 ms: events/s at `--http-batch 1`
//!    (`BENCH_HTTP_EVENTS_1`, default 2 000) and `--http-batch 100` (`BENCH_HTTP_EVENTS`,
//!    default 50 000), against the receiver's bound (one request per 5 ms); the binary's peak
//!    RSS against the bound of the MongoDB sink (3 × `--batch-max-bytes` + 20 MB).

#[path = "../tests/common/receiver.rs"]
#[allow(dead_code)]
mod receiver;
mod support;

use std::future::IntoFuture;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use async_nats::HeaderMap;
use bytes::Bytes;
use consumer::{Config, SinkKind};
use event_store::migrations::Role;
use event_store::position::Position;
use event_store::testing::TestDatabase;
use futures_util::stream::{FuturesOrdered, StreamExt};
use support::{generate, last_position};
use testbed::{env_or, Nats};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

const STREAM: &str = "EVENTS";

#[tokio::main]
async fn main() {
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let TestDatabase { pg, admin } =
        TestDatabase::start(&[("bench_consumer", Role::Consumer)]).await;
    let url = pg.url_for("bench_consumer", None);
    if only.is_empty() || only == "nats" {
        jetstream_catch_up(&url, &admin).await;
    }
    if only.is_empty() || only == "http" {
        webhook(&url, &admin).await;
    }
}

/// A message as the consumer publishes it.
struct Message {
    subject: String,
    headers: HeaderMap,
    payload: Bytes,
}

/// Every event in position order, as the JetStream sink would publish it (the same headers).
async fn messages(admin: &Client) -> Vec<Message> {
    admin
        .query(
            "SELECT e.topic, e.payload::text, e.event_id::text, e.tx_id::text || '/' || e.id,
                    e.key, e.type, to_char(e.created_at AT TIME ZONE 'UTC',
                                           'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')
               FROM events e ORDER BY e.tx_id, e.id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| {
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", r.get::<_, &str>(2));
            headers.insert("Pgevents-Consumer", "raw");
            headers.insert("Pgevents-Position", r.get::<_, String>(3).as_str());
            headers.insert("Pgevents-Topic", r.get::<_, &str>(0));
            if let Some(key) = r.get::<_, Option<&str>>(4) {
                headers.insert("Pgevents-Key", key);
            }
            if let Some(kind) = r.get::<_, Option<&str>>(5) {
                headers.insert("Pgevents-Type", kind);
            }
            headers.insert("Pgevents-Created-At", r.get::<_, &str>(6));
            Message {
                subject: format!("events.{}", r.get::<_, &str>(0)),
                headers,
                payload: Bytes::copy_from_slice(r.get::<_, &str>(1).as_bytes()),
            }
        })
        .collect()
}

/// The raw baseline: the stream the consumer would create, then every message with
/// `in_flight` acknowledgements outstanding at most.
async fn raw_publish(
    nats: &Nats,
    messages: &[Message],
    replicas: usize,
    in_flight: usize,
) -> Duration {
    let servers: Vec<async_nats::ServerAddr> =
        nats.url().split(',').map(|u| u.parse().unwrap()).collect();
    let client = async_nats::connect(servers).await.unwrap();
    let js = jetstream::new(client);
    // A fresh cluster answers once it has elected its meta leader.
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(e) = js
        .create_stream(stream::Config {
            name: STREAM.into(),
            subjects: vec!["events.>".into()],
            storage: stream::StorageType::File,
            num_replicas: replicas,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await
    {
        assert!(Instant::now() < deadline, "cannot create the stream: {e}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let started = Instant::now();
    let mut acks = FuturesOrdered::new();
    for m in messages {
        let ack = js
            .publish_with_headers(m.subject.clone(), m.headers.clone(), m.payload.clone())
            .await
            .unwrap();
        acks.push_back(ack.into_future());
        while acks.len() >= in_flight {
            acks.next().await.unwrap().unwrap();
        }
    }
    while let Some(ack) = acks.next().await {
        ack.unwrap();
    }
    started.elapsed()
}

async fn consumer_publish(
    url: &str,
    admin: &Client,
    nats: &Nats,
    name: &str,
    last: Position,
    batch: u32,
) -> Duration {
    let mut config = Config::new(url.to_string(), None);
    config.batch_size = Some(batch);
    config.name = name.to_string();
    config.sink = SinkKind::Nats;
    config.nats_url = Some(nats.url());
    config.nats_stream = Some(STREAM.into());
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let handle = tokio::spawn(consumer::run(config, shutdown.clone()));
    support::wait_published(admin, name, last).await;
    let elapsed = started.elapsed();
    shutdown.cancel();
    handle.await.unwrap().unwrap();
    elapsed
}

async fn jetstream_catch_up(url: &str, admin: &Client) {
    let events = env_or("BENCH_NATS_EVENTS", 200_000);
    let rounds = env_or("BENCH_ROUNDS", 3);
    admin.batch_execute("TRUNCATE events").await.unwrap();
    generate(admin, events).await;
    let last = last_position(admin).await;
    let messages = messages(admin).await;
    let in_flight = Config::new(String::new(), None).nats_max_in_flight as usize;

    // The default --batch-size, and a larger one: the acknowledgements of a batch are awaited
    // before its checkpoint, so the pipeline drains once per batch.
    let default_batch = consumer::config::DEFAULT_BATCH_SIZE;
    let batches = [default_batch, consumer::config::DEFAULT_NATS_BATCH_SIZE];
    let mut raw = Vec::new();
    let mut ours: Vec<Vec<Duration>> = vec![Vec::new(); batches.len()];
    for round in 0..rounds {
        let mut runs: Vec<Option<usize>> = vec![None];
        runs.extend((0..batches.len()).map(Some));
        if round % 2 == 1 {
            runs.reverse();
        }
        for run in runs {
            let nats = Nats::start();
            match run {
                None => raw.push(raw_publish(&nats, &messages, 1, in_flight).await),
                Some(b) => {
                    let name = format!("nats{round}-{b}");
                    let took = consumer_publish(url, admin, &nats, &name, last, batches[b]).await;
                    ours[b].push(took);
                }
            }
        }
    }
    let raw = best(&raw);
    println!(
        "JetStream catch-up, 1 node, {events} events, {in_flight} acks in flight (best of {rounds}): \
         raw async-nats publish loop {:.0} events/s ({raw:.2?})",
        rate(events, raw)
    );
    for (b, runs) in ours.iter().enumerate() {
        let took = best(runs);
        println!(
            "  consumer --batch-size {}: {:.0} events/s ({took:.2?}); ratio {:.2}x raw (target 0.9x)",
            batches[b],
            rate(events, took),
            raw.as_secs_f64() / took.as_secs_f64()
        );
    }
    let ours = best(&ours[1]);

    let cluster = Nats::start_cluster();
    let raw3 = raw_publish(&cluster, &messages, 3, in_flight).await;
    drop(cluster);
    let cluster = Nats::start_cluster();
    let ours3 = consumer_publish(url, admin, &cluster, "nats-r3", last, batches[1]).await;
    println!(
        "JetStream catch-up, 3 nodes, R3, --batch-size {}: consumer {:.0} events/s ({ours3:.2?}), raw {:.0} events/s \
         ({raw3:.2?}); ratio {:.2}x; R3 vs 1 node (consumer) {:.2}x",
        batches[1],
        rate(events, ours3),
        rate(events, raw3),
        raw3.as_secs_f64() / ours3.as_secs_f64(),
        ours.as_secs_f64() / ours3.as_secs_f64()
    );
}

async fn webhook(url: &str, admin: &Client) {
    let secret = "bench-secret-0123456789";
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, secret).unwrap();
    let faults = receiver::Faults {
        stalls: 1.0,
        stall_for: Duration::from_millis(5),
        ..Default::default()
    };
    for (batch, events) in [
        (1, env_or("BENCH_HTTP_EVENTS_1", 2_000)),
        (100, env_or("BENCH_HTTP_EVENTS", 50_000)),
    ] {
        admin.batch_execute("TRUNCATE events").await.unwrap();
        generate(admin, events).await;
        let last = last_position(admin).await;
        let receiver = receiver::Receiver::start(secret, faults.clone()).await;
        let name = format!("hook{batch}");
        let max_bytes = 4 * 1024 * 1024;
        let started = Instant::now();
        let mut child = Command::new(env!("CARGO_BIN_EXE_consumer"))
            .env_clear()
            .env("DATABASE_URL", url)
            .env("CONSUMER_NAME", &name)
            .env("CONSUMER_SINK", "http")
            .env("CONSUMER_HTTP_URL", receiver.url("http"))
            .env("CONSUMER_HTTP_SECRET_FILE", &secret_file)
            .env("CONSUMER_HTTP_BATCH", batch.to_string())
            .env("CONSUMER_BATCH_MAX_BYTES", max_bytes.to_string())
            .env("LOG_LEVEL", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the consumer binary");
        support::wait_published(admin, &name, last).await;
        let elapsed = started.elapsed();
        let hwm_kb = peak_rss_kb(child.id());
        let _ = Command::new("kill").arg(child.id().to_string()).status();
        child.wait().unwrap();
        let bound_kb = (3 * max_bytes + 20 * 1024 * 1024) / 1024;
        let accepted: usize = receiver.accepted().iter().map(|a| a.ids.len()).sum();
        assert!(
            accepted >= events,
            "the receiver took {accepted} of {events}"
        );
        assert_eq!(receiver.bad_signatures(), 0);
        println!(
            "Webhook, receiver answering in 5 ms, --http-batch {batch}: {:.0} events/s over {events} \
             events ({elapsed:.2?}), {:.1} requests/s (the receiver's bound: {:.0} events/s at one \
             request at a time); peak RSS {} MB (bound {} MB)",
            rate(events, elapsed),
            receiver.requests() as f64 / elapsed.as_secs_f64(),
            batch as f64 * 200.0,
            hwm_kb / 1024,
            bound_kb / 1024
        );
    }
}

fn peak_rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn best(runs: &[Duration]) -> Duration {
    *runs.iter().min().unwrap()
}

fn rate(events: usize, took: Duration) -> f64 {
    events as f64 / took.as_secs_f64()
}
