//! What the consumer's catch-up benchmarks share: a backlog of realistic events, where it ends,
//! and waiting for a consumer to publish that end.
// Each benchmark uses a part of this module.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use event_store::db;
use event_store::position::Position;
use tokio_postgres::Client;

pub async fn connect(url: &str) -> Client {
    db::connect_spawned(&db::config(url, "bench").unwrap())
        .await
        .unwrap()
}

/// `n` events of ~200-byte payloads, 10 000 per transaction.
pub async fn generate(admin: &Client, n: usize) {
    let started = Instant::now();
    let mut left = n as i64;
    while left > 0 {
        let chunk = left.min(10_000);
        admin
            .execute(
                "INSERT INTO events (topic, key, type, payload, headers)
                 SELECT CASE WHEN g % 2 = 0 THEN 'courses' ELSE 'policies' END,
                        'key-' || g, 'updated',
                        jsonb_build_object('seq', g, 'title', 'Course number ' || g,
                                           'credits', g % 7, 'active', g % 3 = 0,
                                           'tags', jsonb_build_array('a', 'b', g % 10),
                                           'teacher', jsonb_build_object('id', g % 97, 'name', 'Teacher ' || g % 97)),
                        jsonb_build_object('trace_id', md5(g::text))
                   FROM generate_series(1, $1::bigint) g",
                &[&chunk],
            )
            .await
            .unwrap();
        left -= chunk;
    }
    admin.batch_execute("VACUUM ANALYZE events").await.unwrap();
    eprintln!("generated {n} events in {:?}", started.elapsed());
}

pub async fn last_position(admin: &Client) -> Position {
    let row = admin
        .query_one(
            "SELECT e.tx_id::text, e.id FROM events e ORDER BY e.tx_id DESC, e.id DESC LIMIT 1",
            &[],
        )
        .await
        .unwrap();
    Position::new(row.get::<_, &str>(0).parse().unwrap(), row.get(1))
}

/// Returns once consumer `name` has published `last` (its whole backlog delivered).
pub async fn wait_published(admin: &Client, name: &str, last: Position) {
    let want = format!("{}/{}", last.tx_id, last.id);
    loop {
        let row = admin
            .query_opt(
                "SELECT tx_id::text || '/' || id FROM consumer_positions WHERE consumer = $1",
                &[&name],
            )
            .await
            .unwrap();
        if row.map(|r| r.get::<_, String>(0)) == Some(want.clone()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
