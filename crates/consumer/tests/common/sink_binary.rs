//! The consumer binary for sinks that keep their state in PostgreSQL (webhooks, JetStream): a
//! command with the settings every such test shares, and the checkpoint read back through psql.

use std::process::{Child, Command, Stdio};

use event_store::testing::TestDatabase;

/// The consumer binary as `user` on `db`, with `sink_env` (the sink's own settings) and quick
/// polling; `TEST_CONSUMER_LOG` sets its log level.
pub fn command(db: &TestDatabase, user: &str, name: &str, sink_env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_consumer"));
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", db.pg.url_for(user, None))
        .env("CONSUMER_NAME", name)
        .env("CONSUMER_POLL_INTERVAL", "200ms")
        .env(
            "LOG_LEVEL",
            std::env::var("TEST_CONSUMER_LOG").unwrap_or_else(|_| "info".into()),
        );
    for (k, v) in sink_env {
        command.env(k, v);
    }
    command
}

/// Starts `command` with its log on the test's stderr.
pub fn spawn(mut command: Command) -> Child {
    command
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the consumer binary")
}

/// `name`'s stored checkpoint, "tx/id", or "" before its first batch.
pub fn checkpoint(db: &TestDatabase, name: &str) -> String {
    db.pg.psql(&format!(
        "SELECT tx_id || '/' || id FROM sink_checkpoints WHERE consumer = '{name}'"
    ))
}

/// The newest event's position, "tx/id".
pub fn last_position(db: &TestDatabase) -> String {
    db.pg
        .psql("SELECT tx_id || '/' || id FROM events ORDER BY tx_id DESC, id DESC LIMIT 1")
}
