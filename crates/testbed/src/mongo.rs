//! A throwaway MongoDB-wire server.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use nix::sys::signal::Signal;
use tempfile::TempDir;

use crate::process::{free_port, on_path, port_accepts, retry_start, ServerProcess};

/// Which server is behind a [`Mongo`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MongoKind {
    /// `TEST_MONGODB_URI`: somebody else's server; it cannot be stopped or restarted from here.
    External,
    /// A real `mongod` from PATH (standalone: no transactions).
    Mongod,
    /// SecantusDB from the project's virtualenv (reports itself as a replica set; transactions work).
    Secantus,
}

/// A MongoDB-wire server for one test. Dropped: killed, storage removed.
pub struct Mongo {
    kind: MongoKind,
    external_uri: Option<String>,
    program: Option<PathBuf>,
    port: u16,
    process: Option<ServerProcess>,
    storage: Option<TempDir>,
    /// Whether acknowledged writes survive `kill -9` (always, except [`Mongo::start_forgetful`]).
    durable: bool,
}

static DATABASE_COUNTER: AtomicU32 = AtomicU32::new(0);

impl Mongo {
    /// Starts (or, with `TEST_MONGODB_URI`, adopts) a server. Panics naming what is missing.
    pub fn start() -> Mongo {
        Mongo::start_with(true)
    }

    /// A server that acknowledges writes before they are durable, so `kill -9` loses some it
    /// acknowledged: SecantusDB without `--sync-on-commit` — a cheap stand-in for a crash before
    /// the journal sync, or a failover that rolls back what the majority never saw. With `mongod`
    /// or an external server this is a normal (durable) server, and tests relying on lost writes
    /// prove less; they still must not lose anything.
    pub fn start_forgetful() -> Mongo {
        Mongo::start_with(false)
    }

    fn start_with(durable: bool) -> Mongo {
        if let Ok(uri) = std::env::var("TEST_MONGODB_URI") {
            return Mongo {
                kind: MongoKind::External,
                external_uri: Some(uri),
                program: None,
                port: 0,
                process: None,
                storage: None,
                durable: true,
            };
        }
        let (kind, program) = match on_path("mongod") {
            Some(mongod) => (MongoKind::Mongod, mongod),
            None => (MongoKind::Secantus, find_secantus()),
        };
        let storage = tempfile::Builder::new()
            .prefix("testbed-mongo-")
            .tempdir()
            .expect("create a temporary storage directory");
        let mut mongo = Mongo {
            kind,
            external_uri: None,
            program: Some(program),
            port: 0,
            process: None,
            storage: Some(storage),
            durable,
        };
        retry_start(5, Duration::ZERO, || {
            mongo.port = free_port();
            mongo.spawn();
        });
        mongo
    }

    fn spawn(&mut self) {
        let storage = self.storage.as_ref().expect("owned server").path();
        let data = storage.join("data");
        std::fs::create_dir_all(&data).expect("create mongo data dir");
        let program = self.program.as_ref().expect("owned server");
        let mut cmd = Command::new(program);
        cmd.current_dir(storage);
        match self.kind {
            MongoKind::Mongod => {
                cmd.arg("--dbpath").arg(&data).args([
                    "--bind_ip",
                    "127.0.0.1",
                    "--port",
                    &self.port.to_string(),
                ]);
            }
            MongoKind::Secantus => {
                cmd.args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
                    .args(["--log-level", "WARNING"])
                    .arg("--storage-path")
                    .arg(&data)
                    // A private HOME keeps ~/.secantus/secantusd.toml from being picked up.
                    .env("HOME", storage);
            }
            MongoKind::External => unreachable!("external servers are not spawned"),
        }
        if self.durable && self.kind == MongoKind::Secantus {
            // Acknowledged writes must survive kill -9, as they do with mongod's journal.
            cmd.arg("--sync-on-commit");
        }
        let mut process = ServerProcess::spawn(
            "the MongoDB-wire server",
            cmd,
            None,
            storage.join("server.log"),
        );
        let port = self.port;
        process.wait_ready(Duration::from_secs(60), port, || port_accepts(port));
        self.process = Some(process);
    }

    /// The temporary storage directory (None for an external server); removed on drop.
    pub fn root_dir(&self) -> Option<&std::path::Path> {
        self.storage.as_ref().map(|d| d.path())
    }

    pub fn kind(&self) -> MongoKind {
        self.kind
    }

    /// A connection string for the official driver (`directConnection=true`: one node, no
    /// discovery).
    pub fn uri(&self) -> String {
        match &self.external_uri {
            Some(uri) => uri.clone(),
            None => format!("mongodb://127.0.0.1:{}/?directConnection=true", self.port),
        }
    }

    /// The server's address (for a [`crate::Proxy`] in front of it); not for an external server.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.owned("proxy");
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// A database name no other test in this process (or, for an external server, any other
    /// process) uses.
    pub fn unique_database(&self, prefix: &str) -> String {
        let n = DATABASE_COUNTER.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}_{}_{n}", std::process::id())
    }

    fn owned(&self, what: &str) {
        assert!(
            self.kind != MongoKind::External,
            "cannot {what} the external server from TEST_MONGODB_URI; unset it to let the \
             harness start its own"
        );
    }

    /// The server's process id, when this harness started it (benchmarks read its CPU time).
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(|p| p.pid().as_raw() as u32)
    }

    pub fn is_running(&self) -> bool {
        self.kind == MongoKind::External || self.process.is_some()
    }

    /// Clean shutdown (SIGTERM), keeping the data.
    pub fn stop(&mut self) {
        self.owned("stop");
        if let Some(p) = self.process.take() {
            p.stop(Signal::SIGTERM, Duration::from_secs(20));
        }
    }

    /// Crash: SIGKILL.
    pub fn kill(&mut self) {
        self.owned("kill");
        if let Some(p) = self.process.take() {
            p.stop(Signal::SIGKILL, Duration::from_secs(5));
        }
    }

    /// Starts the server again on the same port with the same data.
    pub fn restart(&mut self) {
        self.stop();
        retry_start(20, Duration::from_millis(250), || self.spawn());
    }
}

impl Drop for Mongo {
    fn drop(&mut self) {
        if let Some(p) = self.process.take() {
            p.stop(Signal::SIGKILL, Duration::from_secs(5));
        }
    }
}

/// `SECANTUSD` or `<workspace>/.venv/bin/secantusd-py`.
fn find_secantus() -> PathBuf {
    if let Some(path) = std::env::var_os("SECANTUSD").map(PathBuf::from) {
        return path;
    }
    let venv = crate::workspace_root().join(".venv/bin/secantusd-py");
    if venv.is_file() {
        return venv;
    }
    on_path("secantusd-py").unwrap_or_else(|| {
        panic!(
            "no MongoDB-wire server found: no `mongod` on PATH, TEST_MONGODB_URI unset, and no \
             SecantusDB at {}. Run ./scripts/test (it installs SecantusDB==0.7.0b3 into .venv), \
             or `python3 -m venv .venv && .venv/bin/pip install SecantusDB==0.7.0b3`",
            venv.display()
        )
    })
}
