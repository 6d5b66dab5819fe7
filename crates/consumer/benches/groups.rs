//! Consumer groups (`--partitions`): catch-up with 1, 2 and 4 members against one consumer of
//! its own, with MongoDB a few milliseconds away, and the hand-over pause after a member dies
//! (`cargo bench -p consumer --bench groups`).
//!
//! - **Catch-up**: `BENCH_EVENTS` (100 000) stored events, MongoDB-wire behind a loopback proxy
//!   adding `BENCH_DELAY_MS` (2) in each direction ([`testbed::Proxy`]), then without the
//!   proxy. Cases: one consumer of its own (the baseline), and a group of 16 partitions with 1,
//!   2 and 4 members (in-process, each with its own connections). Each case starts from nothing
//!   (a fresh MongoDB database and name) and ends when every partition has published the last
//!   position. Ratios are against the single consumer of the same run.
//! - **The server's own ceiling** (raw baseline): 1 and 16 writers of the Rust driver, each a
//!   loop of transactions of one batch of inserts plus one checkpoint update (what one
//!   partition writes), through the same proxy. A group of 16 partitions runs 16 such
//!   transactions at once, so it cannot beat the 16-writer rate; when that rate is below the
//!   1-writer rate, the server, not the group, is what stops scaling.
//! - **Hand-over**: 3 members (lease timeout `BENCH_LEASE` = 10 s) deliver a stream at 500
//!   events/s; one member is aborted without leaving.
//!   Reported: the time until each of its partitions has delivered an event written after the
//!   death; the target is at most the lease timeout + 2 s. (Aborting the member's task stops its
//!   heartbeats without releasing its leases, which is what a kill -9 leaves behind.)

mod support;

use std::time::{Duration, Instant};

use consumer::Config;
use event_store::migrations::Role;
use event_store::position::Position;
use event_store::testing::TestDatabase;
use support::{generate, last_position};
use testbed::machine::ProcStat;
use testbed::{env_or, Mongo, Proxy};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

const PARTITIONS: u32 = 16;

#[tokio::main]
async fn main() {
    let events: usize = env_or("BENCH_EVENTS", 100_000);
    let delay_ms: u64 = env_or("BENCH_DELAY_MS", 2);
    let lease_s: u64 = env_or("BENCH_LEASE", 10);
    if let Ok(filter) = std::env::var("BENCH_LOG") {
        let _ = services::telemetry::init(&filter);
    }
    eprintln!("load before: {}", testbed::machine::load());
    let TestDatabase { pg, admin } =
        TestDatabase::start(&[("bench_consumer", Role::Consumer)]).await;
    let url = pg.url_for("bench_consumer", None);
    let mongo = Mongo::start();
    generate(&admin, events).await;
    let last = last_position(&admin).await;

    for delay in [Duration::from_millis(delay_ms), Duration::ZERO] {
        let proxy = Proxy::start(mongo.addr(), delay);
        let uri = format!("mongodb://{}/?directConnection=true", proxy.addr());
        println!(
            "\ncatch-up of {events} events, MongoDB {} ms away (each direction):",
            delay.as_millis()
        );
        // The same batch as a consumer's (`BENCH_BATCH` or the default).
        let batch = config(&url, &uri, &mongo, "raw", None).batch_rows();
        for writers in [1, PARTITIONS] {
            let (rate, conflicts) = raw_transactions(&uri, &mongo, writers, events, batch).await;
            println!(
                "  raw: {writers:>2} driver writer(s)       {rate:>9.0} docs/s (the server's ceiling at \
                 this concurrency; {conflicts} write conflicts retried)"
            );
        }
        let (single, busy) = catch_up(&admin, &url, &uri, &mongo, None, last, events).await;
        println!("  one consumer                 {single:>9.0} events/s (baseline); {busy}");
        for members in [1, 2, 4] {
            let (rate, busy) =
                catch_up(&admin, &url, &uri, &mongo, Some(members), last, events).await;
            println!(
                "  group of {PARTITIONS}, {members} member(s)     {rate:>9.0} events/s ({:.2}× one consumer); {busy}",
                rate / single
            );
        }
    }

    let pause = hand_over(&admin, &url, &mongo, Duration::from_secs(lease_s)).await;
    println!(
        "\nhand-over after a member of 3 died (lease timeout {lease_s} s): its partitions \
         delivered again after {:.1} s (target ≤ {} s)",
        pause.as_secs_f64(),
        lease_s + 2
    );
    eprintln!("load after: {}", testbed::machine::load());
}

fn config(url: &str, uri: &str, mongo: &Mongo, name: &str, partitions: Option<u32>) -> Config {
    let mut config = Config::new(url, Some(uri.to_string()));
    config.name = name.to_string();
    config.mongodb_database = mongo.unique_database("bench");
    config.partitions = partitions.map(|_| PARTITIONS);
    config.batch_size = std::env::var("BENCH_BATCH")
        .ok()
        .and_then(|b| b.parse().ok());
    config
}

static RUN: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Events per second for a fresh consumer (or group of `members`) to deliver the whole backlog.
async fn catch_up(
    admin: &Client,
    url: &str,
    uri: &str,
    mongo: &Mongo,
    members: Option<u32>,
    last: Position,
    events: usize,
) -> (f64, Busy) {
    let name = format!(
        "bench{}",
        RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let config = config(url, uri, mongo, &name, members);
    let stop = CancellationToken::new();
    let cpu_before = (server_cpu(mongo), own_cpu());
    let started = Instant::now();
    let handles: Vec<_> = (0..members.unwrap_or(1))
        .map(|_| tokio::spawn(consumer::run(config.clone(), stop.clone())))
        .collect();
    let names: Vec<String> = match members {
        None => vec![name.clone()],
        Some(_) => (0..PARTITIONS)
            .map(|index| {
                event_store::group::Partition {
                    index,
                    count: PARTITIONS,
                }
                .name(&name)
            })
            .collect(),
    };
    wait_all_published(admin, &names, last).await;
    let elapsed = started.elapsed();
    let busy = Busy {
        server: (server_cpu(mongo) - cpu_before.0) / elapsed.as_secs_f64(),
        members: (own_cpu() - cpu_before.1) / elapsed.as_secs_f64(),
    };
    stop.cancel();
    for h in handles {
        h.await.unwrap().unwrap();
    }
    (events as f64 / elapsed.as_secs_f64(), busy)
}

/// Documents per second that `writers` concurrent driver sessions store, each a loop of
/// transactions of one batch of inserts and one checkpoint update, and how many transactions
/// the server refused with a write conflict (retried, as the consumer retries them).
async fn raw_transactions(
    uri: &str,
    mongo: &Mongo,
    writers: u32,
    events: usize,
    batch: usize,
) -> (f64, u64) {
    use mongodb::bson::{doc, Document};
    use mongodb::error::TRANSIENT_TRANSACTION_ERROR;
    let client = mongodb::Client::with_uri_str(uri).await.unwrap();
    let db = client.database(&mongo.unique_database("raw"));
    let conflicts = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|writer| {
            let (client, db, conflicts) = (client.clone(), db.clone(), conflicts.clone());
            tokio::spawn(async move {
                let events_coll = db.collection::<Document>("receivedEvents");
                let checkpoints = db.collection::<Document>("checkpoints");
                let mut session = client.start_session().await.unwrap();
                let share = events / writers as usize;
                for start in (0..share).step_by(batch) {
                    let docs: Vec<Document> = (start..(start + batch).min(share))
                        .map(|i| {
                            doc! {"writer": writer, "seq": i as i64, "topic": "courses",
                            "payload": {"title": format!("Course number {i}"), "credits": (i % 7) as i32}}
                        })
                        .collect();
                    loop {
                        session.start_transaction().await.unwrap();
                        let written = async {
                            events_coll.insert_many(&docs).session(&mut session).await?;
                            checkpoints
                                .update_one(
                                    doc! {"_id": writer},
                                    doc! {"$set": {"seq": start as i64}},
                                )
                                .upsert(true)
                                .session(&mut session)
                                .await?;
                            Ok::<_, mongodb::error::Error>(())
                        }
                        .await;
                        let outcome = match written {
                            Ok(()) => session.commit_transaction().await,
                            Err(e) => {
                                let _ = session.abort_transaction().await;
                                Err(e)
                            }
                        };
                        match outcome {
                            Ok(()) => break,
                            Err(e) if e.contains_label(TRANSIENT_TRANSACTION_ERROR) => {
                                conflicts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                            Err(e) => panic!("raw transaction failed: {e}"),
                        }
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    // Each writer stores an equal share; what does not divide evenly is not written.
    let written = events / writers as usize * writers as usize;
    let rate = written as f64 / started.elapsed().as_secs_f64();
    db.drop().await.unwrap();
    (rate, conflicts.load(std::sync::atomic::Ordering::Relaxed))
}

/// How busy the MongoDB-wire server and this process (the consumers) were during a case, in
/// cores: a server near 1.0 is a single-threaded server at its ceiling, which no number of
/// members can raise.
struct Busy {
    server: f64,
    members: f64,
}

impl std::fmt::Display for Busy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "MongoDB-wire server {:.2} cores, consumers {:.2} cores",
            self.server, self.members
        )
    }
}

/// CPU seconds of the MongoDB-wire server and the processes it started.
fn server_cpu(mongo: &Mongo) -> f64 {
    let Some(pid) = mongo.pid() else {
        return 0.0;
    };
    ProcStat::all()
        .iter()
        .filter(|p| p.pid == pid || p.parent == pid)
        .map(ProcStat::total_cpu)
        .sum()
}

/// CPU seconds of this process (every member runs in it).
fn own_cpu() -> f64 {
    ProcStat::of_self().total_cpu()
}

/// Returns once every consumer in `names` has published `last`.
async fn wait_all_published(admin: &Client, names: &[String], last: Position) {
    loop {
        let done: i64 = admin
            .query_one(
                "SELECT count(*) FROM consumer_positions
                  WHERE consumer = ANY($1) AND (tx_id, id) >= ($2::text::xid8, $3)",
                &[&names, &last.tx_id.to_string(), &last.id],
            )
            .await
            .unwrap()
            .get(0);
        if done as usize == names.len() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Seconds from a member's death until each of its partitions delivered an event written after it.
async fn hand_over(admin: &Client, url: &str, mongo: &Mongo, lease: Duration) -> Duration {
    let mut config = config(url, &mongo.uri(), mongo, "handover", Some(PARTITIONS));
    config.lease_timeout = lease;
    let stop = CancellationToken::new();
    // The first member joins alone (so it is the oldest member), then two more.
    let victim = tokio::spawn(consumer::run(config.clone(), stop.child_token()));
    wait_owned(admin, 1).await;
    let others: Vec<_> = (0..2)
        .map(|_| tokio::spawn(consumer::run(config.clone(), stop.clone())))
        .collect();
    wait_owned(admin, 3).await;
    let victim_id: String = admin
        .query_one(
            "SELECT member FROM consumer_group_members WHERE group_name = 'handover'
              ORDER BY joined_at LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let stream = async {
        // 50 events every 100 ms over 1,000 keys: 500 events/s.
        loop {
            admin
                .batch_execute(
                    "INSERT INTO events (topic, key, payload)
                       SELECT 'handover', 'k' || (random() * 999)::int, '{}'
                         FROM generate_series(1, 50);
                     SELECT pg_notify('events', '')",
                )
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let measured = async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let orphans: Vec<String> = admin
            .query(
                "SELECT 'handover.p' || lpad(partition::text, 2, '0')
                   FROM consumer_group_partitions
                  WHERE group_name = 'handover' AND member = $1",
                &[&victim_id],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        eprintln!("the member that dies owns {} partitions", orphans.len());
        // Dropped without leaving: its connections die with it, as in kill -9.
        victim.abort();
        let died = Instant::now();
        let died_at = last_position(admin).await;
        wait_all_published(admin, &orphans, died_at).await;
        died.elapsed()
    };
    let pause = tokio::select! {
        pause = measured => pause,
        _ = stream => unreachable!(),
    };
    stop.cancel();
    for h in others {
        h.await.unwrap().unwrap();
    }
    pause
}

/// Waits until `members` members have joined and every partition is owned.
async fn wait_owned(admin: &Client, members: i64) {
    loop {
        let row = admin
            .query_one(
                "SELECT (SELECT count(*) FROM consumer_group_members
                          WHERE group_name = 'handover' AND expires_at > now()),
                        (SELECT count(DISTINCT member) FROM consumer_group_partitions
                          WHERE group_name = 'handover' AND expires_at > now()),
                        (SELECT count(*) FROM consumer_group_partitions
                          WHERE group_name = 'handover' AND expires_at > now())",
                &[],
            )
            .await
            .unwrap();
        let (joined, owning, owned): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
        if joined == members && owning == members && owned == i64::from(PARTITIONS) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
