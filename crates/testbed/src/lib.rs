//! Throwaway **real** database servers for integration tests and benchmarks.
//!
//! Every test that touches a database starts its own servers here, so tests never share state,
//! two test binaries running at the same time never clash on ports, and nothing is mocked:
//!
//! - [`Postgres`]: `initdb` + `postgres` on a free loopback port with a private socket directory and
//!   a temporary data directory (`fsync=off`: throwaway clusters only). When the tests run as root
//!   the server runs as the `postgres` OS user, because PostgreSQL refuses to run as root.
//! - [`Mongo`]: a MongoDB-wire server. `TEST_MONGODB_URI` wins when set (an external server that the
//!   harness cannot stop); otherwise a real `mongod` from `PATH`; otherwise SecantusDB from the
//!   project's git-ignored virtualenv (`scripts/test` installs it).
//!
//! - [`Postgres::start_tls`]: the same cluster with `ssl=on`, a server certificate signed by a CA
//!   made at start-up ([`Ca`]), and a `pg_hba.conf` that accepts TCP connections over TLS only
//!   (`hostssl`; the superuser without a password, other users with SCRAM passwords).
//!
//! Both can be stopped (cleanly or with `SIGKILL`) and started again on the same port with their
//! data intact, which is what the outage tests need. Dropping a server kills it and removes its
//! directories, also when the test panics.
//!
//! - [`Nats`]: `nats-server` with JetStream, one node or a three-node cluster on loopback.
//! - [`Proxy`]: a loopback TCP proxy that adds latency or cuts a client off.
//!
//! [`reference`] checks the configuration reference (`docs/configuration.md`) against each
//! binary's `--help`.
//!
//! The calls block (they wait for the server to accept connections). From an async test, prefer the
//! multi-threaded runtime (`#[tokio::test(flavor = "multi_thread")]`) so that code under test keeps
//! running while a server restarts.

mod certs;
pub mod machine;
mod mongo;
mod nats;
mod postgres;
mod process;
mod proxy;
pub mod reference;
pub mod secrets;

pub use certs::Ca;
pub use mongo::{Mongo, MongoKind};
pub use nats::Nats;
pub use postgres::Postgres;
pub use proxy::Proxy;

/// The workspace root, where `.venv` and `.tools` live.
pub fn workspace_root() -> std::path::PathBuf {
    let here = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent()
        .and_then(|p| p.parent())
        .expect("testbed lives in <root>/crates/testbed")
        .to_path_buf()
}

/// A benchmark knob: the environment variable `name` parsed as `T`, or `default` when it is unset
/// or does not parse.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
