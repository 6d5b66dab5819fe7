// Temporary experiment (not committed): statement shapes for a batch of 100.
use event_store::{db, migrations};
use serde_json::{json, Value};
use std::time::Instant;
use testbed::Postgres;
use tokio_postgres::types::{ToSql, Type};
use uuid::Uuid;

const N: usize = 100;

fn rows(seq: u64) -> Vec<(Uuid, &'static str, Value)> {
    (0..N as u64).map(|i| (Uuid::new_v4(), if i % 2 == 0 {"courses"} else {"policies"}, json!({"seq": seq + i, "text": "a course was updated; here is some text to make ~100 bytes"}))).collect()
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let pg = Postgres::start();
    let mut admin = db::connect_spawned(&db::config(&pg.url(), "x").unwrap())
        .await
        .unwrap();
    migrations::run(&mut admin).await.unwrap();
    let config = db::config(&pg.url(), "x").unwrap();
    let client = db::connect_spawned(&config).await.unwrap();
    let v3: Vec<String> = (0..N)
        .map(|r| format!("(${}, ${}, ${})", 3 * r + 1, 3 * r + 2, 3 * r + 3))
        .collect();
    let v6: Vec<String> = (0..N)
        .map(|r| {
            format!(
                "(${}, ${}, ${}, ${}, ${}::jsonb, coalesce(${}::jsonb, '{{}}'))",
                6 * r + 1,
                6 * r + 2,
                6 * r + 3,
                6 * r + 4,
                6 * r + 5,
                6 * r + 6
            )
        })
        .collect();
    let raw = client
        .prepare(&format!(
            "INSERT INTO events (event_id, topic, payload) VALUES {}",
            v3.join(", ")
        ))
        .await
        .unwrap();
    let raw_ret = client
        .prepare(&format!(
            "INSERT INTO events (event_id, topic, payload) VALUES {} RETURNING id, event_id",
            v3.join(", ")
        ))
        .await
        .unwrap();
    let mut t6 = vec![];
    for _ in 0..N {
        t6.extend([
            Type::UUID,
            Type::TEXT,
            Type::TEXT,
            Type::TEXT,
            Type::TEXT,
            Type::TEXT,
        ]);
    }
    let values6 = client.prepare_typed(&format!("INSERT INTO events (event_id, topic, key, type, payload, headers) VALUES {} RETURNING id, event_id", v6.join(", ")), &t6).await.unwrap();
    let un = |order: &str| {
        format!("INSERT INTO events (event_id, topic, key, type, payload, headers)
             SELECT e.event_id, e.topic, e.key, e.type, e.payload::jsonb, coalesce(e.headers::jsonb, '{{}}')
               FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[])
                    WITH ORDINALITY AS e(event_id, topic, key, type, payload, headers, ord) {order}
             RETURNING id, event_id")
    };
    let ta = [
        Type::UUID_ARRAY,
        Type::TEXT_ARRAY,
        Type::TEXT_ARRAY,
        Type::TEXT_ARRAY,
        Type::TEXT_ARRAY,
        Type::TEXT_ARRAY,
    ];
    let unnest = client
        .prepare_typed(&un("ORDER BY e.ord"), &ta)
        .await
        .unwrap();
    let unnest_noorder = client.prepare_typed(&un(""), &ta).await.unwrap();
    let secs = 1.0;
    let mut totals = std::collections::BTreeMap::<&str, Vec<f64>>::new();
    for _round in 0..6 {
        for variant in [
            "raw",
            "raw+returning",
            "values6+returning",
            "unnest",
            "unnest no-order",
        ] {
            admin.batch_execute("TRUNCATE events").await.unwrap();
            let start = Instant::now();
            let mut n = 0u64;
            while start.elapsed().as_secs_f64() < secs {
                let r = rows(n);
                match variant {
                    "raw" | "raw+returning" => {
                        let params: Vec<&(dyn ToSql + Sync)> = r
                            .iter()
                            .flat_map(|(a, b, c)| [a as &(dyn ToSql + Sync), b as _, c as _])
                            .collect();
                        client
                            .query(if variant == "raw" { &raw } else { &raw_ret }, &params)
                            .await
                            .unwrap();
                    }
                    "values6+returning" => {
                        let payloads: Vec<String> = r
                            .iter()
                            .map(|x| serde_json::to_string(&x.2).unwrap())
                            .collect();
                        let none: Option<&str> = None;
                        let params: Vec<&(dyn ToSql + Sync)> = r
                            .iter()
                            .zip(&payloads)
                            .flat_map(|((a, b, _), p)| {
                                [
                                    a as &(dyn ToSql + Sync),
                                    b as _,
                                    &none as _,
                                    &none as _,
                                    p as _,
                                    &none as _,
                                ]
                            })
                            .collect();
                        client.query(&values6, &params).await.unwrap();
                    }
                    _ => {
                        let ids: Vec<Uuid> = r.iter().map(|x| x.0).collect();
                        let topics: Vec<&str> = r.iter().map(|x| x.1).collect();
                        let nulls: Vec<Option<&str>> = vec![None; N];
                        let payloads: Vec<String> = r
                            .iter()
                            .map(|x| serde_json::to_string(&x.2).unwrap())
                            .collect();
                        client
                            .query(
                                if variant == "unnest" {
                                    &unnest
                                } else {
                                    &unnest_noorder
                                },
                                &[&ids, &topics, &nulls, &nulls, &payloads, &nulls],
                            )
                            .await
                            .unwrap();
                    }
                }
                n += N as u64;
            }
            totals
                .entry(variant)
                .or_default()
                .push(n as f64 / start.elapsed().as_secs_f64());
        }
    }
    for (k, mut v) in totals {
        v.sort_by(f64::total_cmp);
        println!(
            "{k:<22} median {:>8.0}  all {:?}",
            v[v.len() / 2],
            v.iter().map(|x| *x as u64).collect::<Vec<_>>()
        );
    }
}
