//! `eventsctl capture backfill` on a large table, against baselines measured in the same run
//! (`cargo bench -p eventsctl --bench backfill`). PostgreSQL runs with fsync on.
//!
//! A captured table of `BENCH_ROWS` (default 1 000 000) rows (six columns, ~80 bytes a row).
//! Each round (`BENCH_ROUNDS`, default 3; medians are reported):
//!
//! 1. **COPY**: `COPY (SELECT * FROM bf ORDER BY id) TO STDOUT`, read to the end by the client:
//!    the cost of reading the same rows in the same order, with no events; and the **floor**: one
//!    `INSERT INTO events … SELECT` writing the same `read` events (what the events cost, with
//!    no chunks and no row locks).
//! 2. Per chunk size (`BENCH_CHUNK_ROWS`, comma-separated, default `10000,1000`), **backfill
//!    alone**: the chunk loop `eventsctl capture backfill` runs (`event_store::backfill`), rows/s.
//! 3. **Writers alone**: `BENCH_WRITERS` (4) connections commit small transactions on the
//!    captured table for `BENCH_SECONDS` (5): nine single-row UPDATEs of a random row for every
//!    INSERT of a new one, each its own transaction (so each commit also writes its event).
//! 4. **Backfill + writers**: the same backfill with the writers running; the writers' commit rate
//!    during it against 3., measured just before (target ≥ 0.8×; median of the rounds' ratios),
//!    and the backfill's rate against 2.
//!
//! The events table is emptied between rounds.

use std::time::{Duration, Instant};

use event_store::backfill::{self, BackfillSpec};
use event_store::db::{self, Database};
use event_store::migrations;
use futures_util::{pin_mut, StreamExt};
use testbed::{env_or, Postgres};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() {
    let rows: i64 = env_or("BENCH_ROWS", 1_000_000);
    let rounds: usize = env_or("BENCH_ROUNDS", 3);
    let writers: usize = env_or("BENCH_WRITERS", 4);
    let seconds: u64 = env_or("BENCH_SECONDS", 5);
    // Comma-separated: each size is measured (the default's and a tenth of it).
    let chunk_sizes: Vec<u32> = std::env::var("BENCH_CHUNK_ROWS")
        .unwrap_or_else(|_| {
            format!(
                "{},{}",
                backfill::DEFAULT_CHUNK_ROWS,
                backfill::DEFAULT_CHUNK_ROWS / 10
            )
        })
        .split(',')
        .map(|n| {
            n.trim()
                .parse()
                .expect("BENCH_CHUNK_ROWS: numbers, comma-separated")
        })
        .collect();
    eprintln!("load before: {}", testbed::machine::load());

    let pg = Postgres::start_with(&["fsync=on", "full_page_writes=on", "synchronous_commit=on"]);
    let config = db::config(&pg.url(), "bench").unwrap();
    let mut admin = db::connect_spawned(&config).await.unwrap();
    migrations::run(&mut admin).await.unwrap();
    let started = Instant::now();
    admin
        .batch_execute(&format!(
            "CREATE TABLE bf (id bigint PRIMARY KEY, sku text NOT NULL, qty int NOT NULL,
                              price numeric(12,2), note text, updated_at timestamptz NOT NULL DEFAULT now());
             INSERT INTO bf (id, sku, qty, price, note)
               SELECT g, 'sku-' || g, g % 100, (g % 1000) * 0.37 + 0.01, repeat('n', g % 40)
                 FROM generate_series(1, {rows}) g;
             SELECT capture_add('bf', 'bench.bf');"
        ))
        .await
        .unwrap();
    admin.batch_execute("VACUUM ANALYZE bf").await.unwrap();
    let size: i64 = admin
        .query_one("SELECT pg_relation_size('bf')", &[])
        .await
        .unwrap()
        .get(0);
    eprintln!("{rows} rows ({} MB) in {:?}", size >> 20, started.elapsed());

    let mut copy = Vec::new();
    let mut floor = Vec::new();
    // Per chunk size: backfill alone, backfill with writers, the writers during it.
    let mut alone = vec![Vec::new(); chunk_sizes.len()];
    let mut with_writers = vec![Vec::new(); chunk_sizes.len()];
    let mut writers_during = vec![Vec::new(); chunk_sizes.len()];
    let mut writers_alone = vec![Vec::new(); chunk_sizes.len()];
    let mut run = 0;
    for round in 0..rounds {
        let (n, took) = copy_out(&admin).await;
        assert_eq!(n, rows as u64, "COPY returns every row");
        copy.push(rows as f64 / took.as_secs_f64());
        floor.push(rows as f64 / sql_floor(&admin).await.as_secs_f64());

        eprintln!(
            "round {round}: COPY {:.0} rows/s; INSERT … SELECT floor {:.0} rows/s",
            copy[round], floor[round]
        );

        for (i, &chunk_rows) in chunk_sizes.iter().enumerate() {
            let (read, took) = run_backfill(&config, chunk_rows).await;
            alone[i].push(read as f64 / took.as_secs_f64());

            // The writers' own rate right before they meet the backfill: the machine's load
            // drifts over minutes, so each comparison gets its own baseline.
            let stop = CancellationToken::new();
            run += 1;
            let load = start_writers(&config, writers, rows, run, stop.clone());
            tokio::time::sleep(Duration::from_secs(seconds)).await;
            stop.cancel();
            writers_alone[i].push(load.await.unwrap());

            let stop = CancellationToken::new();
            run += 1;
            let load = start_writers(&config, writers, rows, run, stop.clone());
            let (read, took) = run_backfill(&config, chunk_rows).await;
            stop.cancel();
            with_writers[i].push(read as f64 / took.as_secs_f64());
            writers_during[i].push(load.await.unwrap());
            eprintln!(
                "round {round}, {chunk_rows} rows per chunk: backfill alone {:.0} rows/s; \
                 writers alone {:.0} tx/s; backfill + writers {:.0} rows/s, writers {:.0} tx/s",
                alone[i][round],
                writers_alone[i][round],
                with_writers[i][round],
                writers_during[i][round]
            );
        }
        // Back to the same table and an empty stream for the next round.
        admin
            .execute("DELETE FROM bf WHERE id > $1", &[&rows])
            .await
            .unwrap();
        admin.batch_execute("TRUNCATE events").await.unwrap();
        admin.batch_execute("VACUUM ANALYZE bf").await.unwrap();
    }

    let (copy, floor) = (median(&copy), median(&floor));
    println!(
        "\nBackfill of {rows} rows, fsync on, {writers} writer connections, median of {rounds} \
         (load during run: {})\n",
        testbed::machine::load()
    );
    println!("| case | rate | vs COPY | vs INSERT … SELECT | writers' commits | writers vs alone | target ≥ 0.80× |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    println!(
        "| `COPY (SELECT * FROM bf ORDER BY id) TO STDOUT` | {copy:.0} rows/s | 1.00× | | | | |"
    );
    println!(
        "| floor: one `INSERT INTO events … SELECT` of the same read events | {floor:.0} rows/s | {:.3}× | 1.00× | | | |",
        floor / copy
    );
    for (i, chunk_rows) in chunk_sizes.iter().enumerate() {
        let (a, w, d, w_alone) = (
            median(&alone[i]),
            median(&with_writers[i]),
            median(&writers_during[i]),
            median(&writers_alone[i]),
        );
        println!(
            "| backfill alone, {chunk_rows} rows per chunk | {a:.0} rows/s | {:.3}× | {:.2}× | | | |",
            a / copy,
            a / floor
        );
        // Per round, against the baseline measured just before it.
        let ratios: Vec<f64> = writers_during[i]
            .iter()
            .zip(&writers_alone[i])
            .map(|(d, a)| d / a)
            .collect();
        let ratio = median(&ratios);
        println!(
            "| writers alone, just before (single-row commits on the captured table) | | | | {w_alone:.0} tx/s | 1.00× | |"
        );
        println!(
            "| **backfill while the writers run**, {chunk_rows} rows per chunk | {w:.0} rows/s | {:.3}× | {:.2}× | {d:.0} tx/s | {ratio:.2}× | {} |",
            w / copy,
            w / floor,
            if ratio >= 0.8 { "holds" } else { "missed" }
        );
    }
    drop(pg);
}

/// Reads the rows the backfill reads, in the same order, as COPY text; returns rows and time.
async fn copy_out(client: &Client) -> (u64, Duration) {
    let started = Instant::now();
    let stream = client
        .copy_out("COPY (SELECT * FROM bf ORDER BY id) TO STDOUT")
        .await
        .unwrap();
    pin_mut!(stream);
    let mut lines = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        lines += chunk.iter().filter(|&&b| b == b'\n').count() as u64;
    }
    (lines, started.elapsed())
}

/// The floor: the same `read` events written by one statement (no chunks, no locks, no
/// progress), then removed again (it runs first in a round, on an empty stream).
async fn sql_floor(client: &Client) -> Duration {
    let started = Instant::now();
    client
        .batch_execute(
            "INSERT INTO events (topic, key, type, payload)
             SELECT 'bench.floor', jsonb_build_object('id', t.id)::text, 'read',
                    jsonb_build_object('op', 'read', 'schema', 'public', 'table', 'bf',
                                       'key', jsonb_build_object('id', t.id), 'new', to_jsonb(t))
               FROM bf t ORDER BY t.id",
        )
        .await
        .unwrap();
    let took = started.elapsed();
    client.batch_execute("TRUNCATE events").await.unwrap();
    took
}

/// A whole backfill of `bf`, chunk by chunk as `eventsctl capture backfill` drives it.
async fn run_backfill(config: &Database, chunk_rows: u32) -> (i64, Duration) {
    let mut client = db::connect_spawned(config).await.unwrap();
    let spec = BackfillSpec::new("bf").chunk_rows(chunk_rows).unwrap();
    let started = Instant::now();
    let id = backfill::start(&client, &spec).await.unwrap();
    let mut read = 0;
    loop {
        let chunk = backfill::chunk(&mut client, id).await.unwrap();
        read += chunk.rows_read;
        if chunk.finished {
            return (read, started.elapsed());
        }
    }
}

/// Writers committing small transactions on the captured table until `stop`; returns their
/// commits per second.
fn start_writers(
    config: &Database,
    connections: usize,
    rows: i64,
    run: usize,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<f64> {
    let config = config.clone();
    tokio::spawn(async move {
        let started = Instant::now();
        let mut tasks = Vec::new();
        for c in 0..connections {
            let config = config.clone();
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                let client = db::connect_spawned(&config).await.unwrap();
                let update = client
                    .prepare("UPDATE bf SET qty = qty + 1, updated_at = now() WHERE id = $1")
                    .await
                    .unwrap();
                let insert = client
                    .prepare("INSERT INTO bf (id, sku, qty) VALUES ($1, 'new', 0)")
                    .await
                    .unwrap();
                let mut n = 0i64;
                // A fixed stride through the keys (a prime): every connection touches rows all
                // over the table, so the chunks' row locks meet it wherever they are.
                let mut id = (c as i64 * 7919) % rows;
                // New ids above the table's, apart per connection and run.
                let mut next_new = rows + 1 + ((run * connections + c) as i64) * 1_000_000_000;
                while !stop.is_cancelled() {
                    if n % 10 == 9 {
                        client.execute(&insert, &[&next_new]).await.unwrap();
                        next_new += 1;
                    } else {
                        id = (id + 104_729) % rows + 1;
                        client.execute(&update, &[&id]).await.unwrap();
                    }
                    n += 1;
                }
                n
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await.unwrap();
        }
        total as f64 / started.elapsed().as_secs_f64()
    })
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}
