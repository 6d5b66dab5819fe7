//! Catch-up over TLS vs plaintext, same server, same backlog, same run
//! (`cargo bench -p consumer --bench catch_up_tls`).
//!
//! One throwaway cluster with `ssl=on` (certificates made at start-up by testbed): the consumer
//! with the null sink catches up `BENCH_EVENTS` (default 500 000) events once as a login that
//! connects with `sslmode=verify-full` and once as a login that may connect without TLS
//! (`sslmode=disable`), alternating over `BENCH_ROUNDS` (default 3) rounds; the best of each is
//! reported, and their ratio (target ≥ 0.9×: TLS should cost little next to the work per row).

mod support;

use std::time::{Duration, Instant};

use consumer::sink::NullSink;
use consumer::Config;
use event_store::migrations;
use event_store::position::Position;
use support::{connect, generate, last_position, wait_published};
use testbed::{env_or, Postgres};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() {
    let total: usize = env_or("BENCH_EVENTS", 500_000);
    let rounds: usize = env_or("BENCH_ROUNDS", 3);
    let batch: u32 = env_or("BENCH_BATCH", 1000);
    let pg = Postgres::start_tls();
    let ca = pg.tls_ca().display().to_string();
    let port = pg.port();
    let mut admin = connect(&format!(
        "postgres://postgres@localhost:{port}/postgres?sslmode=verify-full&sslrootcert={ca}"
    ))
    .await;
    migrations::run(&mut admin).await.unwrap();
    admin
        .batch_execute(
            "CREATE ROLE tls_reader LOGIN PASSWORD 'bench-only' IN ROLE events_consumer;
             CREATE ROLE plaintext LOGIN PASSWORD 'bench-only' IN ROLE events_consumer;",
        )
        .await
        .unwrap();
    generate(&admin, total).await;
    let last = last_position(&admin).await;
    let tls_url = format!(
        "postgres://tls_reader:bench-only@localhost:{port}/postgres?sslmode=verify-full&sslrootcert={ca}"
    );
    let plain_url =
        format!("postgres://plaintext:bench-only@127.0.0.1:{port}/postgres?sslmode=disable");

    let (mut plain, mut tls) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        for tls_first in [round % 2 == 1, round % 2 == 0] {
            let (url, into) = if tls_first {
                (&tls_url, &mut tls)
            } else {
                (&plain_url, &mut plain)
            };
            let mut config = Config::new(url.clone(), None);
            config.name = format!("{}{round}", if tls_first { "tls" } else { "plain" });
            config.batch_size = Some(batch);
            into.push(catch_up(config, &admin, last).await);
        }
        eprintln!(
            "round {round}: plaintext {:?}, TLS {:?}",
            plain[round], tls[round]
        );
    }
    let best = |v: &[Duration]| *v.iter().min().unwrap();
    let rate = |d: Duration| total as f64 / d.as_secs_f64();
    let (p, t) = (rate(best(&plain)), rate(best(&tls)));
    println!("\nCatch-up with the null sink, batch size {batch}, best of {rounds}\n");
    println!("| case | events | plaintext | TLS (verify-full) | ratio | target |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    println!(
        "| consumer, null sink | {total} | {p:.0}/s | {t:.0}/s | {:.2}× | ≥ 0.90× |",
        t / p
    );
}

/// Runs a consumer with the null sink until its published position reaches `last`.
async fn catch_up(config: Config, admin: &Client, last: Position) -> Duration {
    let name = config.name.clone();
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let handle = tokio::spawn(consumer::run_with(
        config,
        NullSink::new(),
        shutdown.clone(),
    ));
    wait_published(admin, &name, last).await;
    let elapsed = started.elapsed();
    shutdown.cancel();
    handle.await.unwrap().unwrap();
    elapsed
}
