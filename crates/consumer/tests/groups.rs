//! Consumer groups (`--partitions`): several consumer processes share one name's work. Through
//! kills (-9), stops (SIGTERM), pauses (SIGSTOP past the lease) and members joining, every event
//! arrives exactly once and, per key, in position order; a stale member's writes are refused;
//! mismatched partition counts, missing grants and an unreachable MongoDB are handled. Checked
//! through psql and an independent MongoDB client.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use consumer::sink::{Delivery, MongoSink, Sink, SinkError};
use event_store::Position;
use mongodb::bson::{doc, Bson, DateTime, Document};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const RECEIVED: &str = "receivedEvents";
const LEASE: &str = "2s";

/// A member process of group `group`, logging to `log`.
fn member(env: &Env, group: &str, partitions: u32, log: &Path, extra: &[(&str, &str)]) -> Child {
    let mut command = Command::new(env!("CARGO_BIN_EXE_consumer"));
    command
        .env("DATABASE_URL", env.consumer_url())
        .env("MONGODB_URI", env.mongo.uri())
        .env("MONGODB_DATABASE", &env.database)
        .env("CONSUMER_NAME", group)
        .env("CONSUMER_PARTITIONS", partitions.to_string())
        .env("CONSUMER_LEASE_TIMEOUT", LEASE)
        .env("CONSUMER_BATCH_SIZE", "200")
        .env("CONSUMER_POLL_INTERVAL", "200ms")
        .env("LOG_LEVEL", "info");
    for (k, v) in extra {
        command.env(k, v);
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("member log");
    command
        .stdout(Stdio::null())
        .stderr(Stdio::from(file))
        .spawn()
        .expect("start a member")
}

fn signal(child: &Child, signal: Signal) {
    kill(Pid::from_raw(child.id() as i32), signal).expect("signal the member");
}

/// Inserts `n` events over `keys` keys in one transaction (keys `k0` … in turn), then wakes
/// consumers.
async fn produce_keyed(client: &tokio_postgres::Client, n: i64, keys: i64) {
    client
        .batch_execute(&format!(
            "BEGIN;
             INSERT INTO events (topic, key, payload)
               SELECT 'orders', 'k' || ((g + (SELECT count(*) FROM events)) % {keys}),
                      jsonb_build_object('g', g)
                 FROM generate_series(1, {n}) g;
             SELECT pg_notify('events', '');
             COMMIT;"
        ))
        .await
        .expect("produce");
}

/// Records, while delivery runs, the poll at which each event first appeared in MongoDB: the
/// delivery sequence, independent of the consumer. Documents are found by `received_at` (set
/// when the consumer read them, just before its write), over a window wide enough for a write.
struct Sequence {
    first_seen: HashMap<i64, u64>,
    polls: u64,
}

impl Sequence {
    fn new() -> Sequence {
        Sequence {
            first_seen: HashMap::new(),
            polls: 0,
        }
    }

    async fn poll(&mut self, coll: &mongodb::Collection<Document>) {
        self.polls += 1;
        let since = DateTime::from_millis(DateTime::now().timestamp_millis() - 300_000);
        let mut cursor = coll
            .find(doc! {"received_at": {"$gte": since}})
            .projection(doc! {"_id": 1})
            .await
            .expect("find");
        while cursor.advance().await.expect("cursor") {
            let d: Document = cursor.deserialize_current().unwrap();
            if let Some(Bson::Int64(id)) = d.get("_id") {
                self.first_seen.entry(*id).or_insert(self.polls);
            }
        }
    }
}

/// Per key, the events in position order (ids), read through psql.
fn keys_in_position_order(env: &Env) -> BTreeMap<String, Vec<i64>> {
    let out = env
        .pg
        .psql("SELECT key || ' ' || id FROM events ORDER BY tx_id, id");
    let mut keys: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for line in out.lines().filter(|l| !l.is_empty()) {
        let (key, id) = line.split_once(' ').unwrap();
        keys.entry(key.into())
            .or_default()
            .push(id.parse().unwrap());
    }
    keys
}

fn log_of(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.log"))
}

/// Who owns each partition now (expired leases show none).
fn owners(env: &Env, group: &str) -> Vec<String> {
    env.pg
        .psql(&format!(
            "SELECT coalesce(CASE WHEN expires_at > now() THEN member END, '-')
               FROM consumer_group_partitions WHERE group_name = '{group}' ORDER BY partition"
        ))
        .lines()
        .map(String::from)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn members_killed_stopped_and_added_deliver_every_event_once_in_per_key_order() {
    let env = setup().await;
    let logs = tempfile::tempdir().unwrap();
    let admin = env.superuser().await;
    let coll = env.collection(RECEIVED).await;
    let mut members: Vec<Option<Child>> = (0..4)
        .map(|i| {
            Some(member(
                &env,
                "orders",
                16,
                &log_of(logs.path(), &format!("m{i}")),
                &[],
            ))
        })
        .collect();
    let mut sequence = Sequence::new();
    // 20,000 events over 1,000 keys, in 40 transactions, while members come and go. The
    // schedule is fixed by a seed (printed), so a failure can be replayed.
    let seed: u64 = std::env::var("TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("fault schedule seed: {seed}");
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
    let mut faults = Vec::new();
    for round in 0..40 {
        produce_keyed(&admin, 500, 1000).await;
        if round % 5 == 4 {
            let i = rand::Rng::random_range(&mut rng, 0..members.len());
            let action = rand::Rng::random_range(&mut rng, 0..3);
            match (members[i].take(), action) {
                (Some(mut child), 0) => {
                    signal(&child, Signal::SIGKILL);
                    child.wait().unwrap();
                    faults.push(format!("kill -9 m{i}"));
                }
                (Some(mut child), 1) => {
                    signal(&child, Signal::SIGTERM);
                    child.wait().unwrap();
                    faults.push(format!("SIGTERM m{i}"));
                }
                (Some(child), _) => {
                    members[i] = Some(child);
                    let n = members.len();
                    let log = log_of(logs.path(), &format!("m{n}"));
                    members.push(Some(member(&env, "orders", 16, &log, &[])));
                    faults.push(format!("add m{n}"));
                }
                (None, _) => {
                    let log = log_of(logs.path(), &format!("m{i}"));
                    members[i] = Some(member(&env, "orders", 16, &log, &[]));
                    faults.push(format!("restart m{i}"));
                }
            }
        }
        sequence.poll(&coll).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    eprintln!("faults: {faults:?}");
    let produced = Instant::now();
    let expected = env.pg_ids("");
    assert_eq!(expected.len(), 20_000);
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        sequence.poll(&coll).await;
        if sequence.first_seen.len() >= expected.len() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    wait_delivered(&env, RECEIVED, "", Duration::from_secs(30)).await;
    eprintln!(
        "delivered {:?} after the last event was written",
        produced.elapsed()
    );
    assert_eq!(
        env.mongo_count(RECEIVED).await,
        20_000,
        "no event stored twice"
    );

    // Per key, the delivery sequence follows position order.
    let mut checked = 0;
    for (key, ids) in keys_in_position_order(&env) {
        let seen: Vec<u64> = ids.iter().map(|id| sequence.first_seen[id]).collect();
        assert!(
            seen.windows(2).all(|w| w[0] <= w[1]),
            "key {key}: events (in position order) {ids:?} first appeared at polls {seen:?}"
        );
        checked += 1;
    }
    assert_eq!(checked, 1000);
    assert!(sequence.polls > 40);

    // The purger's view: one position row per partition, the old name's gone.
    let rows = env
        .pg
        .psql("SELECT count(*) FROM consumer_positions WHERE consumer LIKE 'orders.p%'");
    assert_eq!(rows, "16");
    for child in members.iter_mut().flatten() {
        signal(child, Signal::SIGTERM);
        assert!(
            child.wait().unwrap().success(),
            "a member stops cleanly on SIGTERM"
        );
    }
    assert!(
        owners(&env, "orders").iter().all(|o| o == "-"),
        "leaving members release their partitions"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_paused_past_its_lease_is_fenced_and_rejoins() {
    let env = setup().await;
    let logs = tempfile::tempdir().unwrap();
    let admin = env.superuser().await;
    let a_log = log_of(logs.path(), "a");
    let a = member(&env, "audit", 4, &a_log, &[]);
    let mut b = member(&env, "audit", 4, &log_of(logs.path(), "b"), &[]);
    produce_keyed(&admin, 2000, 100).await;
    wait_delivered(&env, RECEIVED, "", Duration::from_secs(60)).await;
    let a_member = |owners: &[String]| {
        owners
            .iter()
            .find(|o| o.contains(&format!("-{}-", a.id())))
            .cloned()
    };
    wait_until(
        "both members own partitions",
        Duration::from_secs(20),
        || async {
            let o = owners(&env, "audit");
            a_member(&o).is_some()
                && o.iter()
                    .any(|m| m != "-" && a_member(&o).as_ref() != Some(m))
        },
    )
    .await;

    // Paused mid-stream: events keep coming while the other member takes its partitions over.
    signal(&a, Signal::SIGSTOP);
    produce_keyed(&admin, 2000, 100).await;
    wait_until(
        "the other member owns every partition",
        Duration::from_secs(30),
        || async {
            let o = owners(&env, "audit");
            a_member(&o).is_none() && o.iter().all(|m| m != "-")
        },
    )
    .await;
    wait_delivered(&env, RECEIVED, "", Duration::from_secs(60)).await;
    signal(&a, Signal::SIGCONT);
    produce_keyed(&admin, 2000, 100).await;
    wait_until(
        "the paused member rejoins",
        Duration::from_secs(30),
        || async { a_member(&owners(&env, "audit")).is_some() },
    )
    .await;
    wait_delivered(&env, RECEIVED, "", Duration::from_secs(60)).await;
    assert_eq!(env.mongo_count(RECEIVED).await, 6000, "nothing doubled");
    let log = std::fs::read_to_string(&a_log).unwrap();
    // Resumed, it learns it lost them one of two ways: its renewal no longer lists them ("was
    // taken over"), or its heartbeat timer, which ran on while it was stopped, says it has had
    // none for a lease timeout (then it stops them itself).
    assert!(
        log.contains("was taken over") || log.contains("No heartbeat for a lease timeout"),
        "the resumed member noticed it lost its partitions:\n{log}"
    );
    let mut a = a;
    signal(&a, Signal::SIGTERM);
    signal(&b, Signal::SIGTERM);
    assert!(a.wait().unwrap().success());
    assert!(b.wait().unwrap().success());
}

/// The fence itself, on the sink: once a newer owner claimed a partition, the older owner's
/// next checkpoint update is refused, and reading the checkpoint says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_owner_cannot_move_the_checkpoint_after_a_take_over() {
    let env = setup().await;
    let config = env.config("fenced");
    let template = MongoSink::new(config.mongo()).await.unwrap();
    let mut old = template.partition("fenced.p00".into(), 1);
    old.claim("fenced").await.unwrap();
    assert_eq!(old.open().await.unwrap().unwrap().position, Position::START);
    let first = Delivery {
        start: Position::START,
        end: Position::new(10, 1),
        ..Delivery::default()
    };
    old.write(&first).await.expect("the owner writes");

    let mut new = template.partition("fenced.p00".into(), 2);
    new.claim("fenced").await.unwrap();
    assert_eq!(
        new.open().await.unwrap().unwrap().position,
        Position::new(10, 1)
    );
    // A late batch of the stale owner, with an event in it.
    let event = event_store::Event {
        position: Position::new(11, 2),
        event_id: uuid::Uuid::new_v4(),
        topic: "t".into(),
        key: Some("k".into()),
        event_type: None,
        payload: event_store::RawJson::from("{\"late\": true}".to_string()),
        headers: event_store::RawJson::from("{}".to_string()),
        created_at: std::time::SystemTime::now(),
    };
    let second = Delivery {
        start: Position::new(10, 1),
        end: Position::new(11, 2),
        events: vec![event],
        ..Delivery::default()
    };
    let refused = old
        .write(&second)
        .await
        .expect_err("the stale owner is refused");
    assert_eq!(
        env.mongo_count(RECEIVED).await,
        0,
        "the refused batch's event is not stored (same transaction as the checkpoint)"
    );
    assert!(
        matches!(refused, SinkError::CheckpointMoved { .. }),
        "{refused}"
    );
    let reopened = old.open().await.expect_err("the stale owner learns why");
    assert!(
        matches!(
            reopened,
            SinkError::Fenced {
                epoch: 1,
                found: Some(2),
                ..
            }
        ),
        "{reopened}"
    );
    assert!(
        reopened
            .to_string()
            .contains("taken over by another member"),
        "{reopened}"
    );
    let stale_claim = template
        .partition("fenced.p00".into(), 1)
        .claim("fenced")
        .await;
    assert!(matches!(stale_claim, Err(SinkError::Fenced { .. })));
    new.write(&second).await.expect("the new owner writes");
    assert_eq!(env.mongo_count(RECEIVED).await, 1);
    let stored = env.checkpoint("fenced.p00").await.unwrap();
    assert_eq!(checkpoint_text(&stored), "11/2");
    assert_eq!(stored.get_i64("epoch").unwrap(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_takes_over_the_consumer_of_its_name_and_refuses_it_afterwards() {
    let env = setup().await;
    let admin = env.superuser().await;
    produce_keyed(&admin, 1000, 50).await;
    let single = spawn(env.config("billing"));
    wait_delivered(&env, RECEIVED, "", Duration::from_secs(60)).await;
    wait_until(
        "the position is published",
        Duration::from_secs(20),
        || async {
            env.pg
                .psql("SELECT count(*) FROM consumer_positions WHERE consumer = 'billing'")
                == "1"
        },
    )
    .await;
    // A member waits while the consumer of its name runs on its own.
    let mut config = env.config("billing");
    config.partitions = Some(4);
    config.lease_timeout = Duration::from_secs(2);
    let metrics_at = free_addr();
    config.http.http_addr = Some(metrics_at);
    let group = spawn(config.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(env.pg.psql("SELECT count(*) FROM consumer_groups"), "0");
    single.stop().await;
    // Marks what is delivered again: a document overwritten by a re-delivery would lose this.
    env.collection(RECEIVED)
        .await
        .update_many(doc! {}, doc! {"$set": {"before_the_group": true}})
        .await
        .unwrap();

    produce_keyed(&admin, 1000, 50).await;
    wait_delivered(&env, RECEIVED, "", Duration::from_secs(60)).await;
    let old = env
        .collection(RECEIVED)
        .await
        .count_documents(doc! {"before_the_group": true})
        .await
        .unwrap();
    assert_eq!(old, 1000);
    for p in 0..4 {
        let cp = env
            .checkpoint(&format!("billing.p0{p}"))
            .await
            .expect("partition checkpoint");
        assert!(cp.get_i64("epoch").unwrap() >= 1);
    }
    assert_eq!(
        env.pg
            .psql("SELECT string_agg(consumer, ',' ORDER BY consumer) FROM consumer_positions"),
        "billing.p00,billing.p01,billing.p02,billing.p03"
    );

    let (_, metrics) = http_get(metrics_at, "/metrics").await.expect("/metrics");
    for p in 0..4 {
        assert!(
            metrics.contains(&format!(
                "consumer_events_delivered_total{{consumer=\"billing.p0{p}\"}}"
            )),
            "per-partition series:\n{metrics}"
        );
    }

    // The same name without --partitions is refused while the group exists.
    let alone = consumer::run(
        env.config("billing"),
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .expect_err("a consumer of a group's name alone is refused");
    assert!(alone.to_string().contains("--partitions 4"), "{alone}");

    // So is another partition count, naming both and the way to change it.
    config.partitions = Some(8);
    config.http.http_addr = None;
    let mismatch = consumer::run(config, tokio_util::sync::CancellationToken::new())
        .await
        .expect_err("a different count is refused");
    let text = mismatch.to_string();
    assert!(
        text.contains("has 4 partitions") && text.contains("--partitions 8"),
        "{text}"
    );
    assert!(
        text.contains("eventsctl group repartition billing --partitions 8"),
        "{text}"
    );
    group.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_without_the_group_grants_is_told_which() {
    let env = setup().await;
    let role = env
        .pg
        .psql("SELECT role FROM event_stream_roles WHERE job = 'consumer'");
    env.pg.psql(&format!(
        "REVOKE UPDATE ON consumer_group_partitions FROM {role}"
    ));
    let mut config = env.config("nogrants");
    config.partitions = Some(4);
    let err = consumer::run(config, tokio_util::sync::CancellationToken::new())
        .await
        .expect_err("refused at start-up");
    let text = err.to_string();
    assert!(
        text.contains("consumer_group_partitions") && text.contains("UPDATE"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partitions_of_a_member_that_cannot_reach_mongodb_go_to_the_others() {
    let env = setup().await;
    let logs = tempfile::tempdir().unwrap();
    let admin = env.superuser().await;
    let proxy = testbed::Proxy::start(env.mongo.addr(), Duration::ZERO);
    let through_proxy = format!(
        "mongodb://{}/?directConnection=true&serverSelectionTimeoutMS=1000",
        proxy.addr()
    );
    let cut_off_log = log_of(logs.path(), "cut-off");
    let mut cut_off = member(
        &env,
        "ledger",
        8,
        &cut_off_log,
        &[("MONGODB_URI", &through_proxy)],
    );
    let mut healthy = member(&env, "ledger", 8, &log_of(logs.path(), "healthy"), &[]);
    let cut_off_id = format!("-{}-", cut_off.id());
    produce_keyed(&admin, 1000, 200).await;
    wait_delivered(&env, RECEIVED, "", Duration::from_secs(60)).await;
    wait_until(
        "both members own partitions",
        Duration::from_secs(20),
        || async {
            let o = owners(&env, "ledger");
            o.iter().any(|m| m.contains(&cut_off_id))
                && o.iter().any(|m| m != "-" && !m.contains(&cut_off_id))
        },
    )
    .await;

    // Cut off from MongoDB, but not from PostgreSQL: it keeps its heartbeat, and must still
    // give its partitions up within about a lease timeout.
    proxy.cut();
    let cut_at = Instant::now();
    produce_keyed(&admin, 2000, 200).await;
    wait_until(
        "the healthy member owns every partition",
        Duration::from_secs(30),
        || async {
            owners(&env, "ledger")
                .iter()
                .all(|m| m != "-" && !m.contains(&cut_off_id))
        },
    )
    .await;
    eprintln!("partitions moved {:?} after the cut", cut_at.elapsed());
    wait_delivered(&env, RECEIVED, "", Duration::from_secs(60)).await;
    let log = std::fs::read_to_string(&cut_off_log).unwrap();
    assert!(log.contains("giving up this member's partitions"), "{log}");

    // Reachable again: it asks for its share and gets it.
    proxy.restore();
    wait_until(
        "the member that was cut off owns partitions again",
        Duration::from_secs(30),
        || async {
            owners(&env, "ledger")
                .iter()
                .any(|m| m.contains(&cut_off_id))
        },
    )
    .await;
    produce_keyed(&admin, 1000, 200).await;
    wait_delivered(&env, RECEIVED, "", Duration::from_secs(60)).await;
    assert_eq!(env.mongo_count(RECEIVED).await, 4000);
    signal(&cut_off, Signal::SIGTERM);
    signal(&healthy, Signal::SIGTERM);
    assert!(cut_off.wait().unwrap().success());
    assert!(healthy.wait().unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_away_during_a_repartition_stops_instead_of_reading_with_the_old_hash() {
    let env = setup().await;
    let logs = tempfile::tempdir().unwrap();
    let admin = env.superuser().await;
    let log = log_of(logs.path(), "away");
    let mut away = member(&env, "stock", 4, &log, &[]);
    produce_keyed(&admin, 500, 50).await;
    wait_delivered(&env, RECEIVED, "", Duration::from_secs(60)).await;
    signal(&away, Signal::SIGSTOP);
    // Its heartbeat expires; the group is repartitioned meanwhile (as `eventsctl group
    // repartition` does it in PostgreSQL).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut owner = event_store::testing::connect(&env.pg.url()).await;
    event_store::group::repartition(&mut owner, "stock", 8, None)
        .await
        .expect("no live member");
    signal(&away, Signal::SIGCONT);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = away.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the member kept running with the old count"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!status.success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("now has 8 partitions"), "{text}");
    assert_eq!(
        owners(&env, "stock").len(),
        8,
        "the new partitions exist, none taken by the old member"
    );
    assert!(owners(&env, "stock").iter().all(|o| o == "-"));
}
