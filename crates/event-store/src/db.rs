//! Connections: a pool for request-style work and dedicated connections for LISTEN.
//!
//! Every connection goes through [`Database`]: the parsed `DATABASE_URL` plus its TLS policy
//! ([`crate::tls`], libpq's `sslmode`/`sslrootcert`), so the pool, the LISTEN connection and the
//! one-shot tools all encrypt and verify alike. Every connection gets TCP keepalives (a dead peer
//! is noticed in well under a minute, which matters for a LISTEN connection that otherwise only
//! reads), a connect timeout, and an `application_name` so operators can tell our backends apart in
//! `pg_stat_activity`.

use std::ops::{Deref, DerefMut};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{Client, Config, Connection, Socket};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::error::{Error, Result};
use crate::tls::{self, Tls};

/// Where the events database is and how to reach it: tokio-postgres's [`Config`] (reachable
/// through `Deref`, e.g. `db.get_dbname()`, `db.application_name("x")`) and the [`Tls`] policy
/// that tokio-postgres cannot express (`verify-ca`, `verify-full`, `sslrootcert`).
#[derive(Debug, Clone)]
pub struct Database {
    config: Config,
    tls: Tls,
}

impl Database {
    pub fn tls(&self) -> &Tls {
        &self.tls
    }

    /// The tokio-postgres half.
    pub fn pg_config(&self) -> &Config {
        &self.config
    }
}

impl Deref for Database {
    type Target = Config;

    fn deref(&self) -> &Config {
        &self.config
    }
}

impl DerefMut for Database {
    fn deref_mut(&mut self) -> &mut Config {
        &mut self.config
    }
}

/// A dedicated connection's I/O half (TLS or not, decided at connect time by `sslmode`).
pub type PgConnection = Connection<Socket, <MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream>;

/// Parses a `DATABASE_URL` (URL or key=value form, with libpq's `sslmode` and `sslrootcert`) and
/// applies our connection settings. The error never echoes the URL, which may hold a password.
pub fn config(url: &str, application_name: &str) -> Result<Database> {
    let split = tls::split(url);
    let tls = Tls::new(split.sslmode.as_deref(), split.sslrootcert.as_deref())?;
    let mut config: Config = split.rest.parse().map_err(|e: tokio_postgres::Error| {
        Error::Config(format!(
            "DATABASE_URL is not a valid PostgreSQL connection string ({}); expected e.g. \
             postgres://user:password@host:5432/dbname?sslmode=verify-full&sslrootcert=/path/ca.pem",
            crate::redact::scrub(&e.to_string(), url)
        ))
    })?;
    config.ssl_mode(tls.pg_mode());
    if config.get_application_name().is_none() {
        config.application_name(application_name);
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(10));
    }
    config
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(10))
        .keepalives_interval(Duration::from_secs(5))
        .keepalives_retries(3);
    Ok(Database { config, tls })
}

/// Where a config points, for logs and errors: `host:port/dbname as user`, never the password.
pub fn describe(config: &Config) -> String {
    use tokio_postgres::config::Host;
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        Some(Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let described = format!(
        "{host}:{port}/{} as {}",
        config.get_dbname().unwrap_or("(default database)"),
        config.get_user().unwrap_or("(default user)")
    );
    // A password that the parser read into another field (an unencoded `@` in it) stays out too.
    match config.get_password() {
        Some(password) if password.len() >= 3 => crate::redact::scrub_all(
            &described,
            &[String::from_utf8_lossy(password).into_owned()],
        ),
        _ => described,
    }
}

/// A pool of at most `size` connections. Connections are made lazily: a database that is down at
/// start-up shows as errors on use, which callers retry.
pub fn pool(db: Database, size: usize) -> Result<Pool> {
    let manager = Manager::from_config(
        db.config,
        db.tls.connector(),
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size.max(1))
        .wait_timeout(Some(Duration::from_secs(30)))
        .create_timeout(Some(Duration::from_secs(15)))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .map_err(|e| Error::Config(format!("cannot build the connection pool: {e}")))
}

/// A connection of its own (not pooled). The caller must drive `Connection` — spawn it, or poll
/// it for notifications as the consumer's LISTEN loop does.
pub async fn connect(db: &Database) -> Result<(Client, PgConnection)> {
    db.config
        .connect(db.tls.connector())
        .await
        .map_err(|e| Error::connect(describe(db), e))
}

/// A connection whose I/O runs on its own task; for one-shot tools and tests.
pub async fn connect_spawned(db: &Database) -> Result<Client> {
    let (client, connection) = connect(db).await?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "PostgreSQL connection closed.");
        }
    });
    Ok(client)
}

/// The database server's clock. Retention cut-offs and consumer idle times are measured against
/// it, not the local clock, because `created_at` and `updated_at` are stamped by the server: a
/// skewed client clock must not make events look older than they are.
pub async fn now(client: &Client) -> Result<std::time::SystemTime> {
    let row = client
        .query_one("SELECT now()", &[])
        .await
        .map_err(|e| Error::database("read the database clock", e))?;
    Ok(row.get(0))
}
