//! The `consumer` command line. Every option has an environment twin (the names the compose file
//! uses) and a doc comment, which becomes `--help`.

use std::time::Duration;

use clap::Parser;
use event_store::event::{validate_name, Topic};
use services::config::{parse_bytes, parse_duration, ChannelArgs, HttpArgs, LogArgs, PostgresArgs};

use crate::error::{Error, Result};
pub use crate::sink::http::HttpConfig;
pub use crate::sink::mongo::{Mirror, MongoConfig, Transactions};
pub use crate::sink::nats::NatsConfig;
pub use crate::sink::OnPoison;

/// Copies every committed event from the PostgreSQL outbox into MongoDB, in commit order, exactly
/// once: woken by NOTIFY, catching up from its checkpoint after any downtime or outage.
#[derive(Debug, Clone, Parser)]
#[command(name = "consumer", version)]
pub struct Config {
    #[command(flatten)]
    pub postgres: PostgresArgs,

    /// Connection string for the consumer's dedicated connection (LISTEN, the fetches, its lease)
    /// when DATABASE_URL leads through a transaction-pooling proxy such as PgBouncer, which cannot
    /// LISTEN: point this one at the server directly. Default: DATABASE_URL.
    #[arg(
        long = "listen-database-url",
        env = "LISTEN_DATABASE_URL",
        hide_env_values = true
    )]
    pub listen_database_url: Option<String>,
    /// MongoDB connection string, e.g. mongodb://mongo:27017/?replicaSet=rs0 (a replica set, or a
    /// single-node one, gives transactional batches; a standalone server works with idempotent
    /// writes). Required unless --sink null.
    #[arg(long = "mongodb-uri", env = "MONGODB_URI", hide_env_values = true)]
    pub mongodb_uri: Option<String>,

    /// MongoDB database holding the events collection and the `checkpoints` collection.
    #[arg(
        long = "mongodb-database",
        env = "MONGODB_DATABASE",
        default_value = "consumer"
    )]
    pub mongodb_database: String,

    /// MongoDB collection the events are written to (document `_id` = the event's `id`).
    #[arg(
        long = "mongodb-collection",
        env = "MONGODB_COLLECTION",
        default_value = "receivedEvents"
    )]
    pub mongodb_collection: String,

    /// `auto`: write each batch and the checkpoint in one transaction when the server supports
    /// transactions (a replica set or sharded cluster), else idempotent inserts then the
    /// checkpoint. `off`: always the latter (no duplicates either way; transactions make a batch
    /// appear all at once).
    #[arg(
        long = "mongodb-transactions",
        env = "MONGODB_TRANSACTIONS",
        value_enum,
        default_value_t = Transactions::Auto
    )]
    pub mongodb_transactions: Transactions,

    /// This consumer's name: the `_id` of its checkpoint in MongoDB and its row in the PostgreSQL
    /// `consumer_positions` table. Consumers with different names run side by side, each at its
    /// own position. Letters, digits, '_', '.', '-'.
    #[arg(long = "name", env = "CONSUMER_NAME", default_value = "consumer")]
    pub name: String,

    /// Run as a member of consumer group --name with this many partitions (1 to 1024): every
    /// process started with the same name and count shares the work. An event belongs to
    /// partition hashtextextended(coalesce(key, event_id::text), 0) mod N (made non-negative);
    /// each partition is delivered by one member at a time, in stream order, so per-key order is
    /// kept. MongoDB sink only. Default: no group (one process per name).
    #[arg(long = "partitions", env = "CONSUMER_PARTITIONS")]
    pub partitions: Option<u32>,

    /// A group member that stops heartbeating (killed, paused, cut off) loses its partitions
    /// after this long; one that cannot reach MongoDB this long gives them up. Members heartbeat
    /// every tenth of it (200 ms to 1 s).
    #[arg(
        long = "lease-timeout",
        env = "CONSUMER_LEASE_TIMEOUT",
        default_value = "10s",
        value_parser = parse_duration
    )]
    pub lease_timeout: Duration,

    /// Deliver only these topics (comma-separated); default: all. The position still advances over
    /// events of other topics.
    #[arg(long = "topics", env = "CONSUMER_TOPICS", value_delimiter = ',')]
    pub topics: Vec<String>,

    /// Keep a MongoDB collection equal to a captured table: captured events of TOPIC are applied
    /// by key to COLLECTION (default: the topic's name) — insert, read, update replace the
    /// document `_id` = key with the row, delete removes it, truncate removes all — in the same
    /// transaction as the batch and the checkpoint. Repeatable, or comma-separated. The change
    /// log (--mongodb-collection) is kept as well.
    #[arg(
        long = "mirror",
        env = "CONSUMER_MIRROR",
        value_delimiter = ',',
        value_name = "TOPIC[=COLLECTION]"
    )]
    pub mirror: Vec<String>,

    /// Events fetched from PostgreSQL and written to the sink per batch (one MongoDB
    /// transaction, one webhook request at most --http-batch, one JetStream checkpoint). Default:
    /// 1000; 5000 with --sink nats, whose acknowledgements are all awaited before each batch's
    /// checkpoint (larger batches keep the publish pipeline full).
    #[arg(
        long = "batch-size",
        env = "CONSUMER_BATCH_SIZE",
        value_parser = clap::value_parser!(u32).range(1..=100_000)
    )]
    pub batch_size: Option<u32>,
    /// Bytes of payload and headers per batch, as well as --batch-size: a run of large events
    /// never builds a request over MongoDB's limits, and memory stays bounded (about three
    /// batches are in flight). A single larger event still goes alone. Accepts B, KiB, MiB.
    #[arg(
        long = "batch-max-bytes",
        env = "CONSUMER_BATCH_MAX_BYTES",
        default_value = "4MiB",
        value_parser = parse_bytes
    )]
    pub batch_max_bytes: usize,
    /// What to do with an event that cannot be stored (a number no BSON type holds exactly,
    /// nesting over 100 levels, a document over 16 MiB, a document the server refuses):
    /// `dead-letter` records it in the `deadLetters` collection, with the reason, in the same
    /// transaction as the batch and goes on; `stop` halts with an error naming the event.
    #[arg(
        long = "on-poison",
        env = "CONSUMER_ON_POISON",
        value_enum,
        default_value_t = OnPoison::DeadLetter
    )]
    pub on_poison: OnPoison,
    /// How often the consumer refreshes its `consumer_positions` row even when idle, so the
    /// purger (and operators) can tell an idle consumer from a dead one.
    #[arg(
        long = "heartbeat-interval",
        env = "CONSUMER_HEARTBEAT_INTERVAL",
        default_value = "10s",
        value_parser = parse_duration
    )]
    pub heartbeat_interval: Duration,

    /// Fallback poll: the longest a lost or never-sent wake-up can delay delivery (e.g. 500ms, 1s).
    #[arg(
        long = "poll-interval",
        env = "CONSUMER_POLL_INTERVAL",
        default_value = "1s",
        value_parser = parse_duration
    )]
    pub poll_interval: Duration,

    #[command(flatten)]
    pub channel: ChannelArgs,

    /// /healthz reports delivery as stuck when events are waiting and none has been delivered for
    /// this long (a MongoDB that refuses writes, a transaction holding the horizon back, ...).
    #[arg(
        long = "stall-timeout",
        env = "CONSUMER_STALL_TIMEOUT",
        default_value = "1m",
        value_parser = parse_duration
    )]
    pub stall_timeout: Duration,

    /// How often the lag is measured (for /metrics) and both databases are probed (for /healthz).
    #[arg(
        long = "monitor-interval",
        env = "CONSUMER_MONITOR_INTERVAL",
        default_value = "5s",
        value_parser = parse_duration
    )]
    pub monitor_interval: Duration,

    /// Where events go: `mongodb`; `nats` to publish them to a JetStream stream (--nats-*);
    /// `http` to POST them to a webhook (--http-*; checkpoint and dead
    /// letters in PostgreSQL); or `null` to discard them and keep the position in memory only (for
    /// benchmarks and for measuring the PostgreSQL side alone).
    #[arg(long = "sink", env = "CONSUMER_SINK", value_enum, default_value_t = SinkKind::Mongodb)]
    pub sink: SinkKind,

    /// --sink nats: NATS server URLs, comma-separated (nats://h1:4222,nats://h2:4222; tls://
    /// for TLS). User and password in a URL are never logged.
    #[arg(long = "nats-url", env = "CONSUMER_NATS_URL", hide_env_values = true)]
    pub nats_url: Option<String>,

    /// --sink nats: the JetStream stream. Created when missing (subjects <prefix>.>, file
    /// storage, 3 replicas on a cluster of 3 or more nodes, else 1; a 2-minute duplicate
    /// window); checked when present.
    #[arg(long = "nats-stream", env = "CONSUMER_NATS_STREAM")]
    pub nats_stream: Option<String>,

    /// --sink nats: events go to subject <prefix>.<topic>.
    #[arg(
        long = "nats-subject-prefix",
        env = "CONSUMER_NATS_SUBJECT_PREFIX",
        default_value = "events"
    )]
    pub nats_subject_prefix: String,

    /// --sink nats: a NATS credentials file (JWT and NKey seed).
    #[arg(
        long = "nats-creds",
        env = "CONSUMER_NATS_CREDS",
        conflicts_with = "nats_token_file"
    )]
    pub nats_creds: Option<std::path::PathBuf>,

    /// --sink nats: a file holding the server's authentication token.
    #[arg(long = "nats-token-file", env = "CONSUMER_NATS_TOKEN_FILE")]
    pub nats_token_file: Option<std::path::PathBuf>,

    /// --sink nats: PEM file of the CA that signed the servers' certificates; makes TLS
    /// required.
    #[arg(long = "nats-tls-ca", env = "CONSUMER_NATS_TLS_CA")]
    pub nats_tls_ca: Option<std::path::PathBuf>,

    /// --sink nats: replicas of a stream the consumer creates. Default: 3 on a cluster of 3
    /// nodes or more, else 1.
    #[arg(
        long = "nats-replicas",
        env = "CONSUMER_NATS_REPLICAS",
        value_parser = clap::value_parser!(u8).range(1..=5)
    )]
    pub nats_replicas: Option<u8>,

    /// --sink nats: publishes awaiting JetStream's acknowledgement at most.
    #[arg(
        long = "nats-max-in-flight",
        env = "CONSUMER_NATS_MAX_IN_FLIGHT",
        default_value_t = 256,
        value_parser = clap::value_parser!(u32).range(1..=65_536)
    )]
    pub nats_max_in_flight: u32,

    /// --sink http: the receiver's URL (http:// or https://); each batch is POSTed to it as JSON,
    /// signed with --http-secret-file. Credentials and query strings are never logged.
    #[arg(long = "http-url", env = "CONSUMER_HTTP_URL", hide_env_values = true)]
    pub http_url: Option<String>,

    /// --sink http: events per request at most; one request is one batch (at most
    /// --batch-size), its checkpoint written after the receiver's 2xx.
    #[arg(
        long = "http-batch",
        env = "CONSUMER_HTTP_BATCH",
        default_value_t = 100,
        value_parser = clap::value_parser!(u32).range(1..=10_000)
    )]
    pub http_batch: u32,

    /// --sink http: how long one request may take, connecting included; a request that takes
    /// longer is retried (same idempotency key).
    #[arg(
        long = "http-timeout",
        env = "CONSUMER_HTTP_TIMEOUT",
        default_value = "10s",
        value_parser = parse_duration
    )]
    pub http_timeout: Duration,

    /// --sink http: file holding the secret that signs every request (header
    /// Pgevents-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">). Required;
    /// surrounding whitespace is ignored.
    #[arg(long = "http-secret-file", env = "CONSUMER_HTTP_SECRET_FILE")]
    pub http_secret_file: Option<std::path::PathBuf>,

    /// --sink http: PEM file of the CA that signed the receiver's certificate, for an https://
    /// receiver with a private CA. Default: the public web roots. Certificates are always
    /// verified.
    #[arg(long = "http-tls-ca", env = "CONSUMER_HTTP_TLS_CA")]
    pub http_tls_ca: Option<std::path::PathBuf>,

    /// Go on when the database no longer matches the checkpoint (the event recorded at the
    /// checkpoint is gone or replaced, e.g. after a failover that lost commits; or DATABASE_URL
    /// leads to another database or cluster), accepting that events may have been lost or
    /// skipped. Without it the consumer stops and says what it found.
    #[arg(long = "accept-divergence", env = "CONSUMER_ACCEPT_DIVERGENCE")]
    pub accept_divergence: bool,
    #[command(flatten)]
    pub http: HttpArgs,

    #[command(flatten)]
    pub log: LogArgs,
}

/// The `--sink` choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SinkKind {
    /// MongoDB (the product).
    Mongodb,
    /// An HTTP webhook.
    Http,
    /// A NATS JetStream stream.
    Nats,
    /// Discard events (benchmarks).
    Null,
}

/// `--batch-size` when it is not set, by sink.
pub const DEFAULT_BATCH_SIZE: u32 = 1000;
pub const DEFAULT_NATS_BATCH_SIZE: u32 = 5000;

impl SinkKind {
    /// The name `--sink` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            SinkKind::Mongodb => "mongodb",
            SinkKind::Http => "http",
            SinkKind::Nats => "nats",
            SinkKind::Null => "null",
        }
    }
}

impl Config {
    /// A configuration with every default, for tests and benchmarks (the binary parses its own).
    pub fn new(database_url: impl Into<String>, mongodb_uri: Option<String>) -> Config {
        let mut args = vec![
            "consumer".to_string(),
            "--database-url".into(),
            database_url.into(),
        ];
        match mongodb_uri {
            Some(uri) => args.extend(["--mongodb-uri".into(), uri]),
            None => args.extend(["--sink".into(), "null".into()]),
        }
        Config::try_parse_from(args).expect("the defaults parse")
    }

    /// Checks what clap cannot: names, topics, the channel. Errors are configuration errors.
    pub fn validate(&self) -> Result<()> {
        validate_name(&self.name).map_err(|reason| {
            Error::Config(format!("--name / CONSUMER_NAME {:?}: {reason}", self.name))
        })?;
        for topic in &self.topics {
            Topic::new(topic.as_str())
                .map_err(|e| Error::Config(format!("--topics / CONSUMER_TOPICS: {e}")))?;
        }
        if self.sink == SinkKind::Mongodb {
            if self.mongodb_uri.as_deref().unwrap_or("").is_empty() {
                return Err(Error::Config(
                    "MONGODB_URI (--mongodb-uri) is required, e.g. \
                     mongodb://127.0.0.1:27017/?directConnection=true"
                        .into(),
                ));
            }
            for (what, name) in [
                ("MONGODB_DATABASE", &self.mongodb_database),
                ("MONGODB_COLLECTION", &self.mongodb_collection),
            ] {
                if name.is_empty() || name.contains(['$', '\0', '/', ' ']) {
                    return Err(Error::Config(format!(
                        "{what} {name:?} is not a usable MongoDB name"
                    )));
                }
            }
        }
        if self.sink == SinkKind::Nats {
            if self.nats_url.as_deref().unwrap_or("").trim().is_empty() {
                return Err(Error::Config(
                    "--nats-url / CONSUMER_NATS_URL is required with --sink nats, e.g. \
                     nats://127.0.0.1:4222"
                        .into(),
                ));
            }
            let stream = self.nats_stream.as_deref().unwrap_or("");
            if stream.is_empty()
                || !stream
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                return Err(Error::Config(format!(
                    "--nats-stream / CONSUMER_NATS_STREAM {stream:?}: required with --sink nats; \
                     letters, digits, '_' and '-'"
                )));
            }
            let prefix = &self.nats_subject_prefix;
            if prefix.split('.').any(|t| {
                t.is_empty()
                    || !t
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            }) {
                return Err(Error::Config(format!(
                    "--nats-subject-prefix {prefix:?}: tokens of letters, digits, '_' and '-' \
                     separated by dots, e.g. events or app.events"
                )));
            }
        }
        if self.sink == SinkKind::Http {
            if self.http_url.is_none() {
                return Err(Error::Config(
                    "--http-url / CONSUMER_HTTP_URL is required with --sink http, e.g. \
                     https://hooks.example.com/events"
                        .into(),
                ));
            }
            if self.http_secret_file.is_none() {
                return Err(Error::Config(
                    "--http-secret-file / CONSUMER_HTTP_SECRET_FILE is required with --sink http: \
                     a file holding the secret that signs every request"
                        .into(),
                ));
            }
            if self.http_timeout.is_zero() {
                return Err(Error::Config(
                    "--http-timeout must be greater than zero".into(),
                ));
            }
        }
        let mirrors = self.mirrors()?;
        if !mirrors.is_empty() && self.sink != SinkKind::Mongodb {
            return Err(Error::Config(format!(
                "--mirror / CONSUMER_MIRROR applies captured tables to MongoDB collections, so it \
                 needs --sink mongodb (this consumer uses --sink {}); run a second consumer for \
                 the mirror",
                self.sink.as_str()
            )));
        }
        for (i, m) in mirrors.iter().enumerate() {
            if [
                self.mongodb_collection.as_str(),
                mongo_format::checkpoint::CHECKPOINTS,
                mongo_format::dead_letter::DEAD_LETTERS,
            ]
            .contains(&m.collection.as_str())
                || mirrors[..i]
                    .iter()
                    .any(|o| o.collection == m.collection || o.topic == m.topic)
            {
                return Err(Error::Config(format!(
                    "--mirror / CONSUMER_MIRROR {}={}: each mirror needs a topic and a collection \
                     of its own (not the change log's, checkpoints or deadLetters)",
                    m.topic, m.collection
                )));
            }
            if !self.topics.is_empty() && !self.topics.contains(&m.topic) {
                return Err(Error::Config(format!(
                    "--mirror {}: the topic is not among --topics / CONSUMER_TOPICS, so nothing \
                     would reach the mirror; add it there",
                    m.topic
                )));
            }
        }
        if let Some(partitions) = self.partitions {
            event_store::group::validate_group_name(&self.name).map_err(|e| {
                Error::Config(format!("--name / CONSUMER_NAME with --partitions: {e}"))
            })?;
            event_store::group::check_count(partitions)
                .map_err(|e| Error::Config(format!("CONSUMER_PARTITIONS: {e}")))?;
            if !matches!(self.sink, SinkKind::Mongodb) {
                return Err(Error::Config(format!(
                    "--partitions works with --sink mongodb only (this is --sink {}): its \
                     fencing needs the checkpoint in the same transaction as the events",
                    self.sink.as_str()
                )));
            }
            // A paused member's late writes are refused by the checkpoint update in the same
            // transaction as its events; without transactions they would land first.
            if self.mongodb_transactions == Transactions::Off {
                return Err(Error::Config(
                    "--partitions needs MongoDB transactions (a replica set, single-node included): \
                     drop --mongodb-transactions off"
                        .into(),
                ));
            }
            // A truncate is one event, in one partition, but empties the whole mirror: the other
            // partitions' changes around it would land in the wrong order.
            if !self.mirror.is_empty() {
                return Err(Error::Config(
                    "--mirror cannot be used with --partitions (a truncate would be applied out of \
                     order with the other partitions' changes): run the mirror as a consumer of \
                     its own"
                        .into(),
                ));
            }
            if self.lease_timeout < std::time::Duration::from_secs(1) {
                return Err(Error::Config(
                    "--lease-timeout / CONSUMER_LEASE_TIMEOUT must be at least 1s".into(),
                ));
            }
        }
        if self.poll_interval.is_zero()
            || self.monitor_interval.is_zero()
            || self.heartbeat_interval.is_zero()
        {
            return Err(Error::Config(
                "--poll-interval, --monitor-interval and --heartbeat-interval must be greater \
                 than zero"
                    .into(),
            ));
        }
        Ok(())
    }

    /// `--batch-size`, or its default for the sink.
    pub fn batch_rows(&self) -> usize {
        self.batch_size.unwrap_or(match self.sink {
            SinkKind::Nats => DEFAULT_NATS_BATCH_SIZE,
            _ => DEFAULT_BATCH_SIZE,
        }) as usize
    }

    /// The `--mirror` settings, parsed.
    pub fn mirrors(&self) -> Result<Vec<Mirror>> {
        self.mirror
            .iter()
            .map(|m| m.parse::<Mirror>().map_err(Error::Config))
            .collect()
    }

    /// The topic filter as the position SQL takes it: `None` for all topics.
    pub fn topic_filter(&self) -> Option<Vec<String>> {
        (!self.topics.is_empty()).then(|| self.topics.clone())
    }
}

impl Config {
    /// The MongoDB sink's settings.
    pub fn mongo(&self) -> MongoConfig {
        MongoConfig {
            uri: self.mongodb_uri.clone().unwrap_or_default(),
            database: self.mongodb_database.clone(),
            collection: self.mongodb_collection.clone(),
            name: self.name.clone(),
            transactions: self.mongodb_transactions,
            on_poison: self.on_poison,
            // Checked by validate(), which runs before any sink is made.
            mirrors: self.mirrors().unwrap_or_default(),
            // A group member's partitions share one client: a connection each, and some to spare
            // for probes.
            max_pool_size: self.partitions.map(|p| p.saturating_add(4)),
        }
    }
}

impl Config {
    /// The JetStream sink's settings, the token file read (a missing or empty file is a start-up
    /// error naming the file, never the token).
    pub fn nats(&self) -> Result<NatsConfig> {
        let token = match &self.nats_token_file {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    Error::Config(format!(
                        "--nats-token-file {}: cannot read it ({e})",
                        path.display()
                    ))
                })?;
                let token = text.trim().to_string();
                if token.is_empty() {
                    return Err(Error::Config(format!(
                        "--nats-token-file {} is empty",
                        path.display()
                    )));
                }
                Some(token)
            }
        };
        Ok(NatsConfig {
            urls: self.nats_url.clone().unwrap_or_default(),
            stream: self.nats_stream.clone().unwrap_or_default(),
            subject_prefix: self.nats_subject_prefix.clone(),
            creds: self.nats_creds.clone(),
            token,
            tls_ca: self.nats_tls_ca.clone(),
            replicas: self.nats_replicas.map(usize::from),
            max_in_flight: self.nats_max_in_flight as usize,
            name: self.name.clone(),
            on_poison: self.on_poison,
        })
    }

    /// The webhook sink's settings: the URL checked, the secret read (a missing or empty file is
    /// a start-up error naming the file, never the secret).
    pub fn webhook(&self) -> Result<HttpConfig> {
        let text = self.http_url.as_deref().unwrap_or_default();
        let url = reqwest::Url::parse(text).map_err(|e| {
            Error::Config(format!(
                "--http-url / CONSUMER_HTTP_URL is not a URL ({e}); expected e.g. \
                 https://hooks.example.com/events"
            ))
        })?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(Error::Config(format!(
                "--http-url / CONSUMER_HTTP_URL must be an http:// or https:// URL with a host, \
                 not {}",
                crate::sink::http::describe_url(&url)
            )));
        }
        let path = self.http_secret_file.clone().unwrap_or_default();
        let secret = std::fs::read(&path).map_err(|e| {
            Error::Config(format!(
                "--http-secret-file {}: cannot read it ({e}); write the signing secret to that \
                 file",
                path.display()
            ))
        })?;
        let secret = secret.trim_ascii();
        if secret.is_empty() {
            return Err(Error::Config(format!(
                "--http-secret-file {} is empty: write the signing secret to it",
                path.display()
            )));
        }
        Ok(HttpConfig {
            url,
            batch: self.http_batch as usize,
            timeout: self.http_timeout,
            secret: secret.into(),
            tls_ca: self.http_tls_ca.clone(),
            name: self.name.clone(),
            on_poison: self.on_poison,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> std::result::Result<Config, clap::Error> {
        let mut all = vec!["consumer", "--database-url", "postgres://u@h/db"];
        all.extend_from_slice(args);
        Config::try_parse_from(all)
    }

    #[test]
    fn a_group_needs_mongodb_transactions_no_mirror_and_a_plain_name() {
        let ok = parse(&["--mongodb-uri", "mongodb://m", "--partitions", "16"]).unwrap();
        ok.validate().unwrap();
        for (extra, says) in [
            (
                &["--mongodb-transactions", "off"][..],
                "needs MongoDB transactions",
            ),
            (
                &["--mirror", "app.items=items", "--topics", "app.items"][..],
                "--mirror cannot",
            ),
            (&["--name", "a.b"][..], "no '.'"),
            (&["--sink", "null"][..], "--sink mongodb only"),
        ] {
            let mut args = vec!["--mongodb-uri", "mongodb://m", "--partitions", "16"];
            args.extend_from_slice(extra);
            let err = parse(&args).unwrap().validate().unwrap_err().to_string();
            assert!(err.contains(says), "{extra:?}: {err}");
        }
        let zero = parse(&["--mongodb-uri", "mongodb://m", "--partitions", "0"]).unwrap();
        assert!(zero
            .validate()
            .unwrap_err()
            .to_string()
            .contains("1 to 1024"));
    }

    #[test]
    fn defaults_follow_the_contract() {
        let c = parse(&["--mongodb-uri", "mongodb://m"]).unwrap();
        assert_eq!(c.mongodb_database, "consumer");
        assert_eq!(c.mongodb_collection, "receivedEvents");
        assert_eq!(c.name, "consumer");
        assert_eq!(c.channel.notify_channel.as_str(), "events");
        assert_eq!(c.poll_interval, Duration::from_secs(1));
        assert!(c.topic_filter().is_none());
        c.validate().unwrap();
    }

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_bytes("4MiB"), Ok(4 << 20));
        assert_eq!(parse_bytes("512KiB"), Ok(512 << 10));
        assert_eq!(parse_bytes("1048576"), Ok(1 << 20));
        assert!(parse_bytes("0").is_err());
        assert!(parse_bytes("4 parsecs").is_err());
        assert!(parse_bytes("MiB").is_err());
        let c = parse(&["--sink", "null"]).unwrap();
        assert_eq!(c.batch_max_bytes, 4 << 20);
        assert_eq!(c.on_poison, OnPoison::DeadLetter);
        assert_eq!(c.heartbeat_interval, Duration::from_secs(10));
    }

    #[test]
    fn topics_split_on_commas_and_are_checked() {
        let c = parse(&["--mongodb-uri", "m", "--topics", "courses,policies"]).unwrap();
        assert_eq!(c.topic_filter().unwrap(), vec!["courses", "policies"]);
        let bad = parse(&["--mongodb-uri", "m", "--topics", "ok,not ok"]).unwrap();
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains("CONSUMER_TOPICS"), "{err}");
    }

    #[test]
    fn bad_values_are_refused_with_the_option_named() {
        assert!(parse(&["--mongodb-uri", "m", "--batch-size", "0"]).is_err());
        assert!(parse(&["--mongodb-uri", "m", "--poll-interval", "soon"]).is_err());
        let err = parse(&[]).unwrap().validate().unwrap_err().to_string();
        assert!(err.contains("MONGODB_URI"), "{err}");
        let err = parse(&["--mongodb-uri", "m", "--name=-x"])
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("CONSUMER_NAME"), "{err}");
        parse(&["--sink", "null"]).unwrap().validate().unwrap();
    }
}
