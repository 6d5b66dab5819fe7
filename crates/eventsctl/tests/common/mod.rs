//! Test support: real PostgreSQL and MongoDB-wire servers (testbed), the `eventsctl` binary run
//! as an operator would run it, a consumer run in-process, and independent checks through plain
//! SQL and the MongoDB driver.
#![allow(dead_code)]

pub mod cli;

use std::future::Future;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use event_store::db;
use event_store::migrations::Role;
use event_store::testing::TestDatabase;
use mongodb::bson::{doc, Document};
use testbed::{Mongo, Postgres};
use tokio::task::JoinHandle;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

pub struct Env {
    pub pg: Postgres,
    pub mongo: Option<Mongo>,
    pub database: String,
    pub admin: Client,
}

pub async fn connect(url: &str) -> Client {
    db::connect_spawned(&db::config(url, "eventsctl-test").unwrap())
        .await
        .expect("connect to PostgreSQL")
}

/// Migrated PostgreSQL with logins `ops` and `ops2` (events_consumer), `app` (events_producer) and
/// `keeper` (events_purger); a MongoDB-wire server when `with_mongo`.
pub async fn setup(with_mongo: bool) -> Env {
    setup_with(with_mongo, &[]).await
}

pub async fn setup_with(with_mongo: bool, settings: &[&str]) -> Env {
    let TestDatabase { pg, admin } = TestDatabase::on(
        Postgres::start_with(settings),
        &[
            ("ops", Role::Consumer),
            ("ops2", Role::Consumer),
            ("app", Role::Producer),
            ("keeper", Role::Purger),
        ],
    )
    .await;
    let mongo = with_mongo.then(Mongo::start);
    let database = mongo
        .as_ref()
        .map_or_else(String::new, |m| m.unique_database("eventsctl"));
    Env {
        pg,
        mongo,
        database,
        admin,
    }
}

impl Env {
    /// Runs `eventsctl args…` as the `ops` login (events_consumer), with MONGODB_URI when there
    /// is a server.
    pub async fn ctl(&self, args: &[&str]) -> Output {
        self.ctl_as("ops", args, None).await
    }

    /// [`Env::ctl`] as `keeper`, a purger login: it reads every consumer's position (status, lag).
    pub async fn keeper(&self, args: &[&str]) -> Output {
        self.ctl_as("keeper", args, None).await
    }

    /// [`Env::ctl`] as `user`, with `stdin` piped in when given.
    pub async fn ctl_as(&self, user: &str, args: &[&str], stdin: Option<&str>) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_eventsctl"));
        cmd.args(args)
            .env_clear()
            .env("DATABASE_URL", self.pg.url_for(user, None))
            .env("MONGODB_DATABASE", &self.database)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(mongo) = &self.mongo {
            cmd.env("MONGODB_URI", mongo.uri());
        }
        let stdin = stdin.map(str::to_string);
        tokio::task::spawn_blocking(move || {
            let mut child = cmd.spawn().expect("run eventsctl");
            if let Some(text) = stdin {
                use std::io::Write;
                let mut pipe = child.stdin.take().unwrap();
                pipe.write_all(text.as_bytes()).unwrap();
            }
            child.wait_with_output().expect("eventsctl output")
        })
        .await
        .unwrap()
    }

    pub fn consumer_config(&self, name: &str) -> consumer::Config {
        let mut config = consumer::Config::new(
            self.pg.url_for("ops", None),
            Some(self.mongo.as_ref().expect("a MongoDB-wire server").uri()),
        );
        config.name = name.to_string();
        config.mongodb_database = self.database.clone();
        config.poll_interval = Duration::from_millis(200);
        config
    }

    pub async fn mongo_db(&self) -> mongodb::Database {
        let uri = self.mongo.as_ref().unwrap().uri();
        mongodb::Client::with_uri_str(&uri)
            .await
            .unwrap()
            .database(&self.database)
    }

    /// The ids in the events collection, sorted, duplicates kept (there must be none).
    pub async fn mongo_ids(&self) -> Vec<i64> {
        use futures_util::TryStreamExt;
        let docs: Vec<Document> = self
            .mongo_db()
            .await
            .collection::<Document>("receivedEvents")
            .find(doc! {})
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        let mut ids: Vec<i64> = docs.iter().map(|d| d.get_i64("_id").unwrap()).collect();
        ids.sort_unstable();
        ids
    }

    pub async fn checkpoint(&self, name: &str) -> Option<Document> {
        self.mongo_db()
            .await
            .collection::<Document>("checkpoints")
            .find_one(doc! {"_id": name})
            .await
            .unwrap()
    }

    /// Every event id in PostgreSQL, ascending.
    pub async fn pg_ids(&self) -> Vec<i64> {
        self.admin
            .query("SELECT id FROM events ORDER BY id", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    /// `consumer_positions` of `name` as `tx/id`.
    pub async fn published(&self, name: &str) -> Option<String> {
        self.admin
            .query_opt(
                "SELECT tx_id::text || '/' || id FROM consumer_positions WHERE consumer = $1",
                &[&name],
            )
            .await
            .unwrap()
            .map(|r| r.get(0))
    }
}

/// Inserts `n` events of `topic` in one transaction.
pub async fn produce(client: &Client, topic: &str, n: i64) {
    client
        .execute(
            "INSERT INTO events (topic, key, type, payload)
             SELECT $1, 'key-' || g, 'created', jsonb_build_object('n', g)
               FROM generate_series(1, $2::bigint) AS g",
            &[&topic, &n],
        )
        .await
        .expect("insert events");
    client
        .execute("SELECT pg_notify('events', '')", &[])
        .await
        .unwrap();
}

/// A consumer running in-process.
pub struct Running {
    pub shutdown: CancellationToken,
    pub handle: JoinHandle<consumer::Result<()>>,
}

pub fn spawn(config: consumer::Config) -> Running {
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(consumer::run(config, shutdown.clone()));
    Running { shutdown, handle }
}

impl Running {
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(60), self.handle)
            .await
            .expect("the consumer stops within a minute")
            .expect("no panic")
            .expect("the consumer stops without an error");
    }
}

pub async fn wait_until<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The exit code, and the output when it is not the expected one.
#[track_caller]
pub fn assert_exit(output: &Output, code: i32, what: &str) {
    assert_eq!(
        output.status.code(),
        Some(code),
        "{what}: exit code\n--- stdout\n{}\n--- stderr\n{}",
        stdout(output),
        stderr(output)
    );
}

pub fn json(output: &Output) -> serde_json::Value {
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}\n{}", stdout(output), stderr(output)))
}
