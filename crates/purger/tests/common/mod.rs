//! What the purger tests share: a migrated throwaway PostgreSQL with one login user per role,
//! producers simulated with INSERTs, consumers with `Reader` + `position::publish`, and old events
//! made by backdating `created_at` as superuser.

#![allow(dead_code)]

use std::time::Duration;

use event_store::migrations::Role;
use event_store::position::{self, Position, Reader};
use event_store::testing::TestDatabase;
use testbed::Postgres;
use tokio_postgres::Client;

pub const DAY: Duration = Duration::from_secs(86_400);
pub const WEEK: Duration = Duration::from_secs(7 * 86_400);

pub use event_store::testing::connect;

/// A migrated database with login users `app_producer`, `app_consumer` and `app_purger`, each
/// holding only its group role.
pub struct Db {
    pub pg: Postgres,
    /// Superuser: backdating and independent checks.
    pub admin: Client,
    pub producer: Client,
    pub consumer: Client,
}

impl Db {
    pub async fn start() -> Db {
        let TestDatabase { pg, admin } = TestDatabase::start(&[
            ("app_producer", Role::Producer),
            ("app_consumer", Role::Consumer),
            ("app_purger", Role::Purger),
        ])
        .await;
        let producer = connect(&pg.url_for("app_producer", None)).await;
        let consumer = connect(&pg.url_for("app_consumer", None)).await;
        Db {
            pg,
            admin,
            producer,
            consumer,
        }
    }

    pub fn purger_url(&self) -> String {
        self.pg.url_for("app_purger", None)
    }

    /// Appends `n` events, one transaction each, as the producer role; returns their ids.
    pub async fn append(&self, n: usize) -> Vec<i64> {
        let mut ids = Vec::with_capacity(n);
        for i in 0..n {
            let row = self
                .producer
                .query_one(
                    "INSERT INTO events (topic, payload) VALUES ('orders', jsonb_build_object('n', $1::int)) RETURNING id",
                    &[&(i as i32)],
                )
                .await
                .unwrap();
            ids.push(row.get(0));
        }
        ids
    }

    /// Makes events look `age` old (superuser: nobody else may touch created_at).
    pub async fn backdate(&self, ids: &[i64], age: Duration) {
        let n = self
            .admin
            .execute(
                "UPDATE events SET created_at = now() - make_interval(secs => $1) WHERE id = ANY($2)",
                &[&age.as_secs_f64(), &ids],
            )
            .await
            .unwrap();
        assert_eq!(n as usize, ids.len(), "backdated every id");
    }

    /// Ids still in the table, ascending.
    pub async fn remaining(&self) -> Vec<i64> {
        self.admin
            .query("SELECT id FROM events ORDER BY id", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    pub async fn position_of(&self, id: i64) -> Position {
        let row = self
            .admin
            .query_one("SELECT tx_id::text FROM events WHERE id = $1", &[&id])
            .await
            .unwrap();
        Position::new(row.get::<_, &str>(0).parse().unwrap(), id)
    }

    /// Reads up to `limit` events past `after` as the consumer role and publishes the position
    /// reached under `name`; returns the ids read and the new position.
    pub async fn consume(&self, name: &str, after: Position, limit: usize) -> (Vec<i64>, Position) {
        let reader = Reader::prepare(&self.consumer).await.unwrap();
        let batch = reader
            .fetch(&self.consumer, after, limit, None)
            .await
            .unwrap();
        let end = batch.end.unwrap_or(after);
        position::publish(&self.consumer, name, end).await.unwrap();
        (batch.events.iter().map(|e| e.position.id).collect(), end)
    }

    /// Makes a consumer's published position look `idle` old.
    pub async fn idle(&self, consumer: &str, idle: Duration) {
        let n = self
            .admin
            .execute(
                "UPDATE consumer_positions SET updated_at = now() - make_interval(secs => $1)
                  WHERE consumer = $2",
                &[&idle.as_secs_f64(), &consumer],
            )
            .await
            .unwrap();
        assert_eq!(n, 1);
    }

    pub async fn watermark(&self) -> Option<position::Watermark> {
        position::watermark(&self.admin).await.unwrap()
    }
}
