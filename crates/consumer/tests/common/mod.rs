//! Test support: real servers, a consumer run in-process or as the binary, and independent
//! checks through psql and a separate MongoDB client (never through the consumer's own code).
#![allow(dead_code)]

pub mod receiver;
pub mod sink_binary;

use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use consumer::Config;
use event_store::migrations::Role;
use event_store::testing::TestDatabase;
use mongodb::bson::{doc, Bson, Document};
use testbed::{Mongo, Postgres};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

/// The login role the consumer runs as: only what `events_consumer` grants.
pub const CONSUMER_USER: &str = "mongo_sink";

pub struct Env {
    pub pg: Postgres,
    pub mongo: Mongo,
    pub database: String,
    pub admin: Client,
}

pub fn init_logging() {
    let _ = services::telemetry::init(
        &std::env::var("TEST_LOG").unwrap_or_else(|_| "info,consumer=debug".into()),
    );
}

/// Migrated PostgreSQL with a consumer login, and a MongoDB-wire server.
pub async fn setup() -> Env {
    setup_with(Mongo::start()).await
}

/// [`setup`] with a MongoDB-wire server of the caller's choosing.
pub async fn setup_with(mongo: Mongo) -> Env {
    init_logging();
    let TestDatabase { pg, admin } = TestDatabase::start(&[(CONSUMER_USER, Role::Consumer)]).await;
    let database = mongo.unique_database("consumer");
    Env {
        pg,
        mongo,
        database,
        admin,
    }
}

pub use event_store::testing::connect;

impl Env {
    pub fn consumer_url(&self) -> String {
        self.pg.url_for(CONSUMER_USER, None)
    }

    /// The consumer's configuration: defaults, this test's database, a quick monitor.
    pub fn config(&self, name: &str) -> Config {
        let mut config = Config::new(self.consumer_url(), Some(self.mongo.uri()));
        config.name = name.to_string();
        config.mongodb_database = self.database.clone();
        config.monitor_interval = Duration::from_millis(500);
        config
    }

    /// A fresh superuser connection (the admin one dies with a PostgreSQL restart).
    pub async fn superuser(&self) -> Client {
        connect(&self.pg.url()).await
    }

    pub async fn mongo_client(&self) -> mongodb::Client {
        mongodb::Client::with_uri_str(self.mongo.uri())
            .await
            .expect("independent MongoDB client")
    }

    pub async fn collection(&self, name: &str) -> mongodb::Collection<Document> {
        self.mongo_client()
            .await
            .database(&self.database)
            .collection(name)
    }

    /// The `_id`s stored in `collection`, read by an independent client.
    pub async fn mongo_ids(&self, collection: &str) -> Vec<i64> {
        let coll = self.collection(collection).await;
        let mut cursor = coll
            .find(doc! {})
            .projection(doc! {"_id": 1})
            .await
            .expect("find");
        let mut ids = Vec::new();
        while cursor.advance().await.expect("cursor") {
            let d: Document = cursor.deserialize_current().unwrap();
            match d.get("_id") {
                Some(Bson::Int64(id)) => ids.push(*id),
                other => panic!("unexpected _id {other:?}"),
            }
        }
        ids.sort();
        ids
    }

    pub async fn mongo_count(&self, collection: &str) -> u64 {
        self.collection(collection)
            .await
            .count_documents(doc! {})
            .await
            .expect("count")
    }

    pub async fn checkpoint(&self, name: &str) -> Option<Document> {
        self.collection("checkpoints")
            .await
            .find_one(doc! {"_id": name})
            .await
            .expect("read checkpoint")
    }

    /// Committed event ids, per psql.
    pub fn pg_ids(&self, filter: &str) -> Vec<i64> {
        let out = self
            .pg
            .psql(&format!("SELECT id FROM events {filter} ORDER BY id"));
        out.lines()
            .filter(|l| !l.is_empty())
            .map(|l| l.parse().unwrap())
            .collect()
    }

    /// The last position in (tx_id, id) order, as `tx/id`, per psql.
    pub fn pg_last_position(&self, filter: &str) -> String {
        self.pg.psql(&format!(
            "SELECT tx_id::text || '/' || id FROM events {filter} ORDER BY tx_id DESC, id DESC LIMIT 1"
        ))
    }
}

/// `tx/id` of a checkpoint document.
pub fn checkpoint_text(doc: &Document) -> String {
    let tx = match doc.get("tx_id") {
        Some(Bson::Int64(v)) => v.to_string(),
        Some(Bson::String(s)) => s.clone(),
        other => panic!("tx_id should be Int64 or a string, is {other:?}"),
    };
    let id = doc.get_i64("id").expect("id is Int64");
    format!("{tx}/{id}")
}

/// Inserts `n` events of `topic` in one transaction, then wakes consumers.
pub async fn produce(client: &Client, topic: &str, n: i64) {
    client
        .execute(
            "INSERT INTO events (topic, key, type, payload, headers)
             SELECT $1, 'key-' || g, 'created',
                    jsonb_build_object('n', g, 'nested', jsonb_build_object('ok', true), 'list', jsonb_build_array(1, 'two')),
                    '{\"trace\": \"abc\"}'
               FROM generate_series(1, $2::bigint) AS g",
            &[&topic, &n],
        )
        .await
        .expect("insert events");
    client
        .execute("SELECT pg_notify('events', '')", &[])
        .await
        .expect("notify");
}

/// A consumer running in-process.
pub struct Running {
    pub shutdown: CancellationToken,
    pub handle: JoinHandle<consumer::Result<()>>,
}

pub fn spawn(config: Config) -> Running {
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(consumer::run(config, shutdown.clone()));
    Running { shutdown, handle }
}

impl Running {
    /// Cancels and waits; the consumer must stop cleanly.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let result = tokio::time::timeout(Duration::from_secs(60), self.handle)
            .await
            .expect("the consumer stops within a minute")
            .expect("no panic");
        result.expect("the consumer stops without an error");
    }
}

/// Polls `check` until it returns true, failing the test after `limit` with `what`.
pub async fn wait_until<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        if Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the collection holds exactly the committed events (by id).
pub async fn wait_delivered(env: &Env, collection: &str, filter: &str, limit: Duration) {
    let expected = env.pg_ids(filter);
    let deadline = Instant::now() + limit;
    loop {
        let got = env.mongo_ids(collection).await;
        if got == expected {
            return;
        }
        if Instant::now() > deadline {
            let want: BTreeSet<_> = expected.iter().collect();
            let have: BTreeSet<_> = got.iter().collect();
            let missing: Vec<_> = want.difference(&have).take(10).collect();
            let extra: Vec<_> = have.difference(&want).take(10).collect();
            panic!(
                "after {limit:?}: {} of {} events delivered; missing e.g. {missing:?}, extra {extra:?}",
                got.len(),
                expected.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until consumer `name`'s checkpoint is at the last event in PostgreSQL.
pub async fn wait_checkpoint_at_end(env: &Env, name: &str, limit: Duration) {
    let last = env.pg_last_position("");
    wait_until("the checkpoint reaches the last event", limit, || async {
        env.checkpoint(name).await.map(|c| checkpoint_text(&c)) == Some(last.clone())
    })
    .await;
}

/// A loopback port that was free a moment ago.
pub fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// `GET path` → (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let body = response.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    Some((status, body))
}

/// The consumer binary as consumer `name` (`MONGODB_TRANSACTIONS` = `transactions`), batches of 50.
pub fn spawn_binary(env: &Env, name: &str, transactions: &str) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_consumer"))
        .env("DATABASE_URL", env.consumer_url())
        .env("MONGODB_URI", env.mongo.uri())
        .env("MONGODB_DATABASE", &env.database)
        .env("MONGODB_TRANSACTIONS", transactions)
        .env("CONSUMER_NAME", name)
        .env("CONSUMER_BATCH_SIZE", "50")
        .env(
            "LOG_LEVEL",
            std::env::var("TEST_CONSUMER_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("start the consumer binary")
}
