//! `eventsctl` on a large table, each against a raw baseline measured in the same run
//! (`cargo bench -p eventsctl --bench operator`).
//!
//! 1. **status** on `BENCH_STATUS_EVENTS` (default 10 000 000) events with 5 consumers spread
//!    over the stream: wall time of the `eventsctl status --json` binary (connect, every query,
//!    print; target < 1 s) vs the `SELECT count(*) FROM events` an operator would otherwise type.
//! 2. **tail** of the first `BENCH_TAIL_EVENTS` (default 1 000 000) events, the binary writing
//!    JSON lines into a pipe that is read and counted, vs the consumer's null-sink catch-up of the
//!    same events (in-process, batch size 1000 for both).
//!
//! Runs alternate and the best of `BENCH_ROUNDS` (default 3) is reported.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use consumer::sink::{Delivered, NullSink, Observed};
use consumer::Config;
use event_store::position::{self, Position};
use event_store::{db, migrations};
use testbed::{env_or, Postgres};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() {
    let total: i64 = env_or("BENCH_STATUS_EVENTS", 10_000_000);
    let tail_n: i64 = env_or("BENCH_TAIL_EVENTS", 1_000_000).min(total);
    let rounds: usize = env_or("BENCH_ROUNDS", 3);
    eprintln!("load before: {}", testbed::machine::load());

    let pg = Postgres::start();
    let mut admin = db::connect_spawned(&db::config(&pg.url(), "bench").unwrap())
        .await
        .unwrap();
    migrations::run(&mut admin).await.unwrap();
    admin
        .batch_execute("CREATE ROLE bench_consumer LOGIN IN ROLE events_consumer")
        .await
        .unwrap();

    let started = Instant::now();
    generate(&admin, tail_n).await;
    let tail_end = position::latest(&admin).await.unwrap();
    generate(&admin, total - tail_n).await;
    admin.batch_execute("VACUUM ANALYZE events").await.unwrap();
    eprintln!("generated {total} events in {:?}", started.elapsed());
    let size: i64 = admin
        .query_one("SELECT pg_total_relation_size('events')", &[])
        .await
        .unwrap()
        .get(0);

    // Five consumers: at the start, a quarter, half, 90 % and the end.
    for (name, fraction) in [
        ("c0", 0.0),
        ("c25", 0.25),
        ("c50", 0.5),
        ("c90", 0.9),
        ("c100", 1.0),
    ] {
        let id = (total as f64 * fraction) as i64;
        let at = if id == 0 {
            Position::START
        } else {
            let row = admin
                .query_one(
                    "SELECT tx_id::text, id FROM events WHERE id >= $1 ORDER BY id LIMIT 1",
                    &[&id],
                )
                .await
                .unwrap();
            Position::new(row.get::<_, &str>(0).parse().unwrap(), row.get(1))
        };
        position::register(&admin, name, at).await.unwrap();
    }

    let mut count_star = Vec::new();
    let mut status = Vec::new();
    let mut tail = Vec::new();
    let mut catch_up = Vec::new();
    for round in 0..rounds {
        let t = Instant::now();
        let n: i64 = admin
            .query_one("SELECT count(*) FROM events", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, total);
        count_star.push(t.elapsed());

        let t = Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_eventsctl"))
            .args(["--database-url", &pg.url(), "status", "--json"])
            .output()
            .unwrap();
        status.push(t.elapsed());
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        // The five, plus the null-sink consumers of earlier rounds.
        assert_eq!(report["consumers"].as_array().unwrap().len(), 5 + round);

        let limit = tail_n.to_string();
        let url = pg.url_for("bench_consumer", None);
        let t = Instant::now();
        let lines = tokio::task::spawn_blocking(move || {
            let mut child = Command::new(env!("CARGO_BIN_EXE_eventsctl"))
                .args([
                    "--database-url",
                    &url,
                    "tail",
                    "--from",
                    "earliest",
                    "--limit",
                    &limit,
                ])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let mut stdout = child.stdout.take().unwrap();
            let mut buf = vec![0u8; 1 << 20];
            let mut lines = 0usize;
            loop {
                let n = stdout.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                lines += buf[..n].iter().filter(|&&b| b == b'\n').count();
            }
            assert!(child.wait().unwrap().success());
            lines
        })
        .await
        .unwrap();
        tail.push(t.elapsed());
        assert_eq!(lines as i64, tail_n);

        let elapsed = null_catch_up(pg.url_for("bench_consumer", None), round, tail_end).await;
        catch_up.push(elapsed);
        eprintln!(
            "round {round}: count(*) {:?}, status {:?}, tail {:?}, consumer {:?}",
            count_star[round], status[round], tail[round], catch_up[round]
        );
    }

    let best = |v: &[Duration]| *v.iter().min().unwrap();
    let rate = |d: Duration| tail_n as f64 / d.as_secs_f64();
    println!(
        "\neventsctl on {total} events ({:.1} GiB with indexes), 5 consumers, best of {rounds} (load: {})\n",
        size as f64 / (1u64 << 30) as f64,
        testbed::machine::load()
    );
    println!("| what | eventsctl | raw baseline (same run) | ratio |");
    println!("| --- | ---: | ---: | ---: |");
    println!(
        "| `status --json`, wall time of the binary | {:.0} ms | `SELECT count(*) FROM events`: {:.0} ms | {:.3}× the time |",
        best(&status).as_secs_f64() * 1000.0,
        best(&count_star).as_secs_f64() * 1000.0,
        best(&status).as_secs_f64() / best(&count_star).as_secs_f64()
    );
    println!(
        "| `tail --from earliest` of {tail_n} events into a pipe | {:.0} events/s | consumer null-sink catch-up: {:.0} events/s | {:.2}× |",
        rate(best(&tail)),
        rate(best(&catch_up)),
        rate(best(&tail)) / rate(best(&catch_up))
    );
}

/// Inserts `n` events (~130-byte payloads) in statements of 100 000.
async fn generate(admin: &Client, n: i64) {
    let mut left = n;
    while left > 0 {
        let chunk = left.min(100_000);
        admin
            .execute(
                "INSERT INTO events (topic, key, type, payload)
                 SELECT CASE WHEN g % 2 = 0 THEN 'courses' ELSE 'policies' END, 'key-' || g,
                        'updated', jsonb_build_object('seq', g, 'title', 'Course number ' || g,
                                                      'credits', g % 7, 'active', g % 3 = 0)
                   FROM generate_series(1, $1::bigint) g",
                &[&chunk],
            )
            .await
            .unwrap();
        left -= chunk;
    }
}

/// The consumer (null sink, in-process) from the start until it has delivered `last`.
async fn null_catch_up(url: String, round: usize, last: Position) -> Duration {
    let mut config = Config::new(url, None);
    config.name = format!("bench{round}");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Delivered>();
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let handle = tokio::spawn(consumer::run_with(
        config,
        Observed::new(NullSink::new(), tx),
        shutdown.clone(),
    ));
    let mut elapsed = None;
    while let Some(d) = rx.recv().await {
        if d.end >= last {
            elapsed = Some(started.elapsed());
            break;
        }
    }
    shutdown.cancel();
    drop(rx);
    let _ = handle.await;
    elapsed.expect("the consumer reached the end of the tail range")
}
