//! Table-change capture: what it costs the writer, and how fast its events arrive
//! (`cargo bench -p consumer --bench capture`). PostgreSQL runs with fsync on; every number is
//! printed next to its baseline from the same run.
//!
//! 1. Single-row UPDATE transactions over `BENCH_CONNECTIONS` (8) connections for `BENCH_SECONDS`
//!    (5) per variant, `BENCH_ROUNDS` (3) interleaved rounds, medians: uncaptured; the floor (the
//!    same UPDATE writing its own event row in the same statement, no trigger: what any event
//!    costs); captured (what ships); captured with the change watcher probing every millisecond
//!    (the default) and every 5 ms;
//!    captured plus a `pg_notify` in a statement trigger (the NOTIFY-in-trigger alternative); the
//!    seeds' design, a row trigger doing INSERT + `pg_notify(row_to_json(NEW))` per row.
//! 2. One UPDATE of all `BENCH_BULK_ROWS` (100k) rows, medians of `BENCH_ROUNDS`: uncaptured; the
//!    floor (a bare `INSERT … SELECT` of as many event rows); a statement trigger writing only the
//!    new row; captured with diffs; the seeds' row trigger.
//! 3. COMMIT sent → stored by an in-process consumer (fallback poll off) at `BENCH_RATE` (500)
//!    captured changes/s for `BENCH_LATENCY_SECONDS` (10): woken by the change watcher (what ships)
//!    vs by a `pg_notify` in the capture transaction; into MongoDB (the MongoDB-wire test server,
//!    majority + journal write concern, the default) and into the null sink (the wake-up alone).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use consumer::sink::{Delivered, MongoSink, NullSink, Observed};
use consumer::Config;
use event_store::db::{self, Database};
use event_store::migrations;
use producer::{Channel, Notifier};
use testbed::{env_or, Mongo, Postgres};
use tokio::sync::mpsc;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

const ACCOUNTS: i32 = 10_000;

/// Extra objects the variants switch on and off (created once).
const FIXTURES: &str = "
CREATE TABLE acc (id int PRIMARY KEY, balance int NOT NULL, owner text, note text);
INSERT INTO acc SELECT g, 0, 'owner ' || g, 'x' FROM generate_series(1, 10000) g;
CREATE TABLE bulk (id int PRIMARY KEY, status text, amount numeric, note text, updated_at timestamptz);
CREATE FUNCTION bench_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_notify('events', TG_TABLE_NAME); RETURN NULL; END $$;
CREATE FUNCTION seed_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO events (topic, key, type, payload)
    VALUES (TG_TABLE_NAME, NEW.id::text, lower(TG_OP), row_to_json(NEW)::jsonb);
    PERFORM pg_notify('events', row_to_json(NEW)::text);
    RETURN NULL;
END $$;
CREATE FUNCTION new_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO events (topic, key, type, payload)
    SELECT TG_TABLE_NAME, '{\"id\":' || n.id || '}', 'update',
           jsonb_build_object('op', 'update', 'new', to_jsonb(n))
      FROM capture_new n;
    RETURN NULL;
END $$;
";

#[derive(Debug, Clone, Copy, PartialEq)]
enum Variant {
    Uncaptured,
    OwnEvent,
    Captured,
    CapturedWatched,
    CapturedWatched5,
    CapturedNotify,
    SeedRow,
    NewOnly,
    Floor,
}

impl Variant {
    fn label(self) -> &'static str {
        match self {
            Variant::Uncaptured => "uncaptured",
            Variant::OwnEvent => "floor: the UPDATE writes its event row itself (no trigger)",
            Variant::Captured => "captured (statement triggers, diffs)",
            Variant::CapturedWatched => "captured + change watcher (1 ms probe) — ships",
            Variant::CapturedWatched5 => "captured + change watcher (5 ms probe)",
            Variant::CapturedNotify => "captured + pg_notify in the trigger",
            Variant::SeedRow => "seeds' row trigger (INSERT + pg_notify per row)",
            Variant::NewOnly => "statement trigger, new row only (no diffs)",
            Variant::Floor => "floor: bare INSERT … SELECT of the event rows",
        }
    }

    /// Switches `table` to this variant's triggers.
    /// How often this variant's change watcher probes, if it runs one.
    fn watch_interval(self) -> Option<Duration> {
        match self {
            Variant::CapturedWatched => Some(Duration::from_millis(1)),
            Variant::CapturedWatched5 => Some(Duration::from_millis(5)),
            _ => None,
        }
    }

    /// The single-row statement this variant's writers run.
    fn single_row_update(self) -> &'static str {
        match self {
            // The event a trigger would write for this row, written by the statement itself.
            Variant::OwnEvent => {
                "WITH u AS (UPDATE acc SET balance = balance + 1 WHERE id = $1 RETURNING *)
                 INSERT INTO events (topic, key, type, payload)
                 SELECT 'acc', '{\"id\":' || u.id || '}', 'update',
                        jsonb_build_object('op', 'update', 'schema', 'public', 'table', 'acc',
                                           'key', jsonb_build_object('id', u.id), 'new', to_jsonb(u))
                   FROM u"
            }
            _ => "UPDATE acc SET balance = balance + 1 WHERE id = $1",
        }
    }

    async fn install(self, admin: &Client, table: &str) {
        admin
            .batch_execute(&format!(
                "SELECT capture_remove('{table}');
                 DROP TRIGGER IF EXISTS zz_notify ON {table};
                 DROP TRIGGER IF EXISTS seed ON {table};
                 DROP TRIGGER IF EXISTS new_only ON {table};"
            ))
            .await
            .unwrap();
        let sql = match self {
            Variant::Uncaptured | Variant::OwnEvent | Variant::Floor => String::new(),
            Variant::Captured | Variant::CapturedWatched | Variant::CapturedWatched5 => {
                format!("SELECT capture_add('{table}', '{table}')")
            }
            Variant::CapturedNotify => format!(
                "SELECT capture_add('{table}', '{table}');
                 CREATE TRIGGER zz_notify AFTER INSERT OR UPDATE OR DELETE ON {table}
                     FOR EACH STATEMENT EXECUTE FUNCTION bench_notify();"
            ),
            Variant::SeedRow => format!(
                "CREATE TRIGGER seed AFTER INSERT OR UPDATE ON {table}
                     FOR EACH ROW EXECUTE FUNCTION seed_row();"
            ),
            Variant::NewOnly => format!(
                "CREATE TRIGGER new_only AFTER UPDATE ON {table} REFERENCING NEW TABLE AS capture_new
                     FOR EACH STATEMENT EXECUTE FUNCTION new_only();"
            ),
        };
        admin.batch_execute(&sql).await.unwrap();
    }
}

#[tokio::main]
async fn main() {
    let connections: usize = env_or("BENCH_CONNECTIONS", 8);
    let seconds: u64 = env_or("BENCH_SECONDS", 5);
    let rounds: usize = env_or("BENCH_ROUNDS", 3);
    let bulk_rows: i64 = env_or("BENCH_BULK_ROWS", 100_000);
    let rate: u64 = env_or("BENCH_RATE", 500);
    let latency_seconds: u64 = env_or("BENCH_LATENCY_SECONDS", 10);
    eprintln!("load before: {}", testbed::machine::load());

    let pg = Postgres::start_with(&["fsync=on", "full_page_writes=on", "synchronous_commit=on"]);
    let config = db::config(&pg.url(), "bench").unwrap();
    let mut admin = db::connect_spawned(&config).await.unwrap();
    migrations::run(&mut admin).await.unwrap();
    admin.batch_execute(FIXTURES).await.unwrap();
    admin
        .batch_execute("CREATE ROLE bench_consumer LOGIN IN ROLE events_consumer")
        .await
        .unwrap();
    let watcher_db = db::config(&pg.url_for("bench_consumer", None), "bench-watcher").unwrap();

    // 1. Single-row commits.
    let variants = [
        Variant::Uncaptured,
        Variant::OwnEvent,
        Variant::Captured,
        Variant::CapturedWatched,
        Variant::CapturedWatched5,
        Variant::CapturedNotify,
        Variant::SeedRow,
    ];
    let mut rates: HashMap<&str, Vec<f64>> = HashMap::new();
    for round in 0..rounds {
        for variant in variants {
            variant.install(&admin, "acc").await;
            let watcher = variant
                .watch_interval()
                .map(|interval| start_watcher(watcher_db.clone(), interval));
            let rate = commit_rate(
                &config,
                variant.single_row_update(),
                connections,
                Duration::from_secs(seconds),
            )
            .await;
            if let Some(w) = watcher {
                w.stop().await;
            }
            eprintln!("round {round}: {:<50} {rate:>8.0} tx/s", variant.label());
            rates.entry(variant.label()).or_default().push(rate);
        }
        admin.batch_execute("TRUNCATE events").await.unwrap();
        admin.batch_execute("VACUUM acc").await.unwrap();
    }
    let median_rate = |v: Variant| median(&rates[v.label()]);
    let base = median_rate(Variant::Uncaptured);
    let seeds = median_rate(Variant::SeedRow);
    let floor = median_rate(Variant::OwnEvent);
    println!(
        "\nSingle-row UPDATE transactions, {connections} connections, fsync on, median of {rounds} × {seconds} s \
         (load during run: {})\n",
        testbed::machine::load()
    );
    println!("| variant | commits/s | × uncaptured | × floor | × seeds' row trigger |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for v in variants {
        let r = median_rate(v);
        println!(
            "| {} | {r:.0} | {:.2} | {:.2} | {:.2} |",
            v.label(),
            r / base,
            r / floor,
            r / seeds
        );
    }

    // 2. One bulk UPDATE.
    admin
        .execute(
            "INSERT INTO bulk SELECT g, 'new', g * 1.5, 'note ' || g, now() FROM generate_series(1, $1::bigint) g",
            &[&bulk_rows],
        )
        .await
        .unwrap();
    let bulk_variants = [
        Variant::Uncaptured,
        Variant::Floor,
        Variant::NewOnly,
        Variant::Captured,
        Variant::SeedRow,
    ];
    let mut times: HashMap<&str, Vec<f64>> = HashMap::new();
    for round in 0..rounds {
        for variant in bulk_variants {
            variant.install(&admin, "bulk").await;
            admin.batch_execute("TRUNCATE events").await.unwrap();
            admin.batch_execute("VACUUM ANALYZE bulk").await.unwrap();
            let sql = if variant == Variant::Floor {
                "INSERT INTO events (topic, key, type, payload)
                 SELECT 'bulk', '{\"id\":' || id || '}', 'update', to_jsonb(b) FROM bulk b"
                    .to_string()
            } else {
                format!("UPDATE bulk SET status = 'r{round}', amount = amount + 1")
            };
            let started = Instant::now();
            admin.batch_execute(&sql).await.unwrap();
            let took = started.elapsed().as_secs_f64();
            let events: i64 = admin
                .query_one("SELECT count(*) FROM events", &[])
                .await
                .unwrap()
                .get(0);
            let expected = if variant == Variant::Uncaptured {
                0
            } else {
                bulk_rows
            };
            assert_eq!(events, expected, "{}: one event per row", variant.label());
            eprintln!("round {round}: {:<50} {took:>8.2} s", variant.label());
            times.entry(variant.label()).or_default().push(took);
        }
    }
    let median_time = |v: Variant| median(&times[v.label()]);
    let captured = median_time(Variant::Captured);
    println!(
        "\nOne UPDATE of {bulk_rows} rows, fsync on, median of {rounds} (load during run: {})\n",
        testbed::machine::load()
    );
    println!("| variant | seconds | × uncaptured | captured ÷ this |");
    println!("| --- | ---: | ---: | ---: |");
    for v in bulk_variants {
        let t = median_time(v);
        println!(
            "| {} | {t:.2} | {:.2} | {:.2} |",
            v.label(),
            t / median_time(Variant::Uncaptured),
            captured / t
        );
    }
    println!(
        "\ncaptured with diffs ÷ new-row-only trigger: {:.2} (target ≤ 1.3); seeds' row trigger ÷ captured: {:.2} (target ≥ 1.3)",
        captured / median_time(Variant::NewOnly),
        median_time(Variant::SeedRow) / captured
    );

    // 3. Delivery latency.
    let mongo = Mongo::start();
    let mut lines = Vec::new();
    for (round, (into, woken_by, variant)) in [
        (
            "MongoDB",
            "change watcher, 1 ms probe (ships)",
            Variant::CapturedWatched,
        ),
        (
            "MongoDB",
            "change watcher, 5 ms probe",
            Variant::CapturedWatched5,
        ),
        (
            "MongoDB",
            "pg_notify in the capture trigger",
            Variant::CapturedNotify,
        ),
        (
            "null sink",
            "change watcher, 1 ms probe",
            Variant::CapturedWatched,
        ),
        (
            "null sink",
            "pg_notify in the capture trigger",
            Variant::CapturedNotify,
        ),
    ]
    .into_iter()
    .enumerate()
    {
        // Each run's consumer starts from nothing: only its own events to deliver.
        admin.batch_execute("TRUNCATE events").await.unwrap();
        variant.install(&admin, "acc").await;
        let watcher = variant
            .watch_interval()
            .map(|interval| start_watcher(watcher_db.clone(), interval));
        let mut consumer_config = Config::new(
            pg.url_for("bench_consumer", None),
            (into == "MongoDB").then(|| mongo.uri()),
        );
        consumer_config.name = format!("latency{round}");
        consumer_config.poll_interval = Duration::from_secs(3600);
        let v = latencies(&config, consumer_config, rate, latency_seconds).await;
        if let Some(w) = watcher {
            w.stop().await;
        }
        lines.push(format!(
            "| {into} | {woken_by} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms |",
            pct(&v, 0.5),
            pct(&v, 0.9),
            pct(&v, 0.99),
            pct(&v, 1.0)
        ));
    }
    println!(
        "\nCOMMIT sent → stored (in-process consumer, fallback poll off), {rate} captured changes/s \
         for {latency_seconds} s (load during run: {})\n",
        testbed::machine::load()
    );
    println!("| into | woken by | p50 | p90 | p99 | max |");
    println!("| --- | --- | ---: | ---: | ---: | ---: |");
    for line in lines {
        println!("{line}");
    }
}

/// Commits/s of single-row UPDATEs over `connections` connections.
async fn commit_rate(
    config: &Database,
    sql: &'static str,
    connections: usize,
    run: Duration,
) -> f64 {
    let deadline = Instant::now() + run;
    let mut tasks = Vec::new();
    for c in 0..connections {
        let config = config.clone();
        tasks.push(tokio::spawn(async move {
            let client = db::connect_spawned(&config).await.unwrap();
            let update = client.prepare(sql).await.unwrap();
            let mut n = 0u64;
            let mut id = (c as i32 * 7919) % ACCOUNTS;
            while Instant::now() < deadline {
                id = (id + 104_729) % ACCOUNTS + 1;
                client.execute(&update, &[&id]).await.unwrap();
                n += 1;
            }
            n
        }));
    }
    let started = Instant::now();
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total as f64 / started.elapsed().as_secs_f64()
}

/// Commit → stored latencies of captured single-row updates at `rate`/s, through a consumer
/// configured by `consumer_config` (MongoDB when it has a URI, else the null sink); the first
/// second is warm-up.
async fn latencies(
    config: &Database,
    consumer_config: Config,
    rate: u64,
    seconds: u64,
) -> Vec<Duration> {
    let (tx, mut delivered) = mpsc::unbounded_channel::<Delivered>();
    let shutdown = CancellationToken::new();
    let consumer = if consumer_config.mongodb_uri.is_some() {
        let sink = MongoSink::new(consumer_config.mongo()).await.unwrap();
        tokio::spawn(consumer::run_with(
            consumer_config,
            Observed::new(sink, tx),
            shutdown.clone(),
        ))
    } else {
        tokio::spawn(consumer::run_with(
            consumer_config,
            Observed::new(NullSink::new(), tx),
            shutdown.clone(),
        ))
    };
    tokio::time::sleep(Duration::from_millis(500)).await;

    let writer = db::connect_spawned(config).await.unwrap();
    let update = writer
        .prepare("UPDATE acc SET balance = balance + 1 WHERE id = $1")
        .await
        .unwrap();
    // The trigger's INSERT took the id in this session: currval names the event just written.
    let event_id = writer
        .prepare("SELECT currval('events_id_seq')")
        .await
        .unwrap();
    let mut committed: HashMap<i64, Instant> = HashMap::new();
    let mut ids = Vec::new();
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for n in 0..rate * seconds {
        ticks.tick().await;
        writer.batch_execute("BEGIN").await.unwrap();
        writer
            .execute(&update, &[&((n % ACCOUNTS as u64) as i32 + 1)])
            .await
            .unwrap();
        let id: i64 = writer.query_one(&event_id, &[]).await.unwrap().get(0);
        let at = Instant::now();
        writer.batch_execute("COMMIT").await.unwrap();
        committed.insert(id, at);
        ids.push(id);
    }
    let mut arrived = HashMap::new();
    let last = *ids.last().unwrap();
    while !arrived.contains_key(&last) {
        match tokio::time::timeout(Duration::from_secs(30), delivered.recv()).await {
            Ok(Some(batch)) => {
                for id in batch.ids {
                    arrived.insert(id, batch.at);
                }
            }
            _ => panic!("event {last} did not arrive within 30 s"),
        }
    }
    shutdown.cancel();
    consumer.await.unwrap().unwrap();
    let mut v: Vec<Duration> = ids[rate as usize..]
        .iter()
        .map(|id| {
            arrived
                .get(id)
                .unwrap_or_else(|| panic!("event {id} never arrived"))
                .duration_since(committed[id])
        })
        .collect();
    v.sort();
    v
}

struct RunningWatcher {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    notifier: producer::NotifierTask,
}

impl RunningWatcher {
    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap();
        self.notifier.finished().await;
    }
}

fn start_watcher(db: Database, interval: Duration) -> RunningWatcher {
    let (notifier, task) = Notifier::spawn(db.clone(), Channel::default(), interval);
    let stop = CancellationToken::new();
    let watcher = tokio::spawn(producer::watcher::run(db, notifier, interval, stop.clone()));
    RunningWatcher {
        stop,
        task: watcher,
        notifier: task,
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn pct(v: &[Duration], p: f64) -> f64 {
    let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
    v[i].as_secs_f64() * 1000.0
}
