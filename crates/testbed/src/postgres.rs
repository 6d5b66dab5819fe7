//! A throwaway PostgreSQL cluster.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use tempfile::TempDir;

use crate::process::{free_port, own_dir, retry_start, run, RunAs, ServerProcess};

/// A real PostgreSQL server on `127.0.0.1:<port>`, superuser `postgres` with trust authentication,
/// database `postgres`. Dropped: killed, directories removed.
pub struct Postgres {
    bindir: PathBuf,
    run_as: Option<RunAs>,
    port: u16,
    /// Extra `name=value` server settings, applied after (so overriding) the defaults.
    settings: Vec<String>,
    /// The CA file of a TLS cluster.
    tls_ca: Option<PathBuf>,
    // Field order matters on drop: the server dies before its directories go.
    process: Option<ServerProcess>,
    socket_dir: TempDir,
    data_root: TempDir,
}

impl Postgres {
    /// initdb + start. Panics with a message naming what is missing when it cannot.
    pub fn start() -> Postgres {
        Postgres::start_with(&[])
    }

    /// [`Postgres::start`] with extra server settings (`"name=value"`) that override the test
    /// defaults, kept across restarts. Benchmarks use it for durable commits:
    /// `Postgres::start_with(&["fsync=on", "full_page_writes=on"])`.
    pub fn start_with(settings: &[&str]) -> Postgres {
        let mut pg = Postgres::init(settings);
        pg.start_on_fresh_port();
        pg
    }

    /// A cluster that takes TCP connections over TLS only: `ssl=on` with a server certificate for
    /// `localhost` and `127.0.0.1` signed by a CA made now ([`Postgres::tls_ca`] is its PEM file,
    /// for `sslrootcert`), and a `pg_hba.conf` of `hostssl` lines only: the superuser `postgres`
    /// without a password, every other user with a SCRAM password. A plaintext connection gets
    /// "no pg_hba.conf entry … no encryption" — except for a login named `plaintext` (if a test
    /// creates one), which benchmarks use to compare TLS with plaintext on the same server.
    pub fn start_tls() -> Postgres {
        let mut pg = Postgres::init(&[]);
        let ca = crate::Ca::new("testbed CA");
        let (cert, key) = ca.server_cert(&["localhost", "127.0.0.1"]);
        let data = pg.data_dir();
        let ca_path = pg.data_root.path().join("root.crt");
        ca.write(&ca_path);
        write_owned(pg.run_as, &data.join("server.crt"), &cert, 0o644);
        write_owned(pg.run_as, &data.join("server.key"), &key, 0o600);
        write_owned(
            pg.run_as,
            &data.join("pg_hba.conf"),
            "local all all trust\n\
             hostssl all postgres 127.0.0.1/32 trust\n\
             hostnossl all plaintext 127.0.0.1/32 scram-sha-256\n\
             hostssl all all 127.0.0.1/32 scram-sha-256\n",
            0o600,
        );
        pg.settings.extend(
            [
                "ssl=on",
                "ssl_cert_file=server.crt",
                "ssl_key_file=server.key",
                "password_encryption=scram-sha-256",
            ]
            .map(String::from),
        );
        pg.tls_ca = Some(ca_path);
        pg.start_on_fresh_port();
        pg
    }

    /// The CA that signed a [`Postgres::start_tls`] server's certificate (PEM file).
    pub fn tls_ca(&self) -> &Path {
        self.tls_ca
            .as_deref()
            .expect("tls_ca: this cluster was not started with Postgres::start_tls")
    }

    fn init(settings: &[&str]) -> Postgres {
        let bindir = find_bindir();
        let run_as = RunAs::detect();
        let data_root = tempfile::Builder::new()
            .prefix("testbed-pg-")
            .tempdir()
            .expect("create a temporary data directory");
        own_dir(run_as, data_root.path());
        let socket_dir = tempfile::Builder::new()
            .prefix("testbed-pgsock-")
            .tempdir()
            .expect("create a socket directory");
        own_dir(run_as, socket_dir.path());

        let mut initdb = Command::new(bindir.join("initdb"));
        initdb
            .arg("-D")
            .arg(data_root.path().join("data"))
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .env("LC_ALL", "C");
        run(initdb, run_as, "initdb");

        Postgres {
            bindir,
            run_as,
            port: 0,
            settings: settings.iter().map(|s| s.to_string()).collect(),
            tls_ca: None,
            process: None,
            socket_dir,
            data_root,
        }
    }

    fn start_on_fresh_port(&mut self) {
        retry_start(5, Duration::ZERO, || {
            self.port = free_port();
            self.spawn();
        });
    }

    fn data_dir(&self) -> PathBuf {
        self.data_root.path().join("data")
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(self.bindir.join("postgres"));
        cmd.arg("-D")
            .arg(self.data_dir())
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(self.socket_dir.path())
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "fsync=off", "-c", "full_page_writes=off"])
            .args(["-c", "max_connections=200", "-c", "shared_buffers=128MB"])
            .args(self.settings.iter().flat_map(|s| ["-c", s.as_str()]))
            .env("LC_ALL", "C");
        let log = self.data_root.path().join("postgres.log");
        let mut process = ServerProcess::spawn("postgres", cmd, self.run_as, log);
        let isready = self.bindir.join("pg_isready");
        let port = self.port;
        process.wait_ready(Duration::from_secs(30), port, || {
            Command::new(&isready)
                .args([
                    "-q",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port.to_string(),
                    "-U",
                    "postgres",
                ])
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        });
        self.process = Some(process);
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres` (superuser).
    pub fn url(&self) -> String {
        self.url_for("postgres", None)
    }

    /// A URL for another login role of this server.
    pub fn url_for(&self, user: &str, password: Option<&str>) -> String {
        match password {
            Some(pw) => format!("postgres://{user}:{pw}@127.0.0.1:{}/postgres", self.port),
            None => format!("postgres://{user}@127.0.0.1:{}/postgres", self.port),
        }
    }

    /// Runs SQL as superuser through `psql` and returns its unaligned, tuples-only output.
    /// Handy for setup and for checking results independently of the code under test.
    pub fn psql(&self, sql: &str) -> String {
        let out = Command::new(self.bindir.join("psql"))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d"])
            .arg(self.url())
            .arg("-c")
            .arg(sql)
            .output()
            .expect("run psql");
        if !out.status.success() {
            panic!(
                "psql failed: {sql}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    pub fn is_running(&self) -> bool {
        self.process.is_some()
    }

    /// Clean ("fast") shutdown, keeping the data. Connected clients see their connections close.
    pub fn stop(&mut self) {
        if let Some(p) = self.process.take() {
            p.stop(Signal::SIGINT, Duration::from_secs(30));
        }
    }

    /// Crash: SIGKILL to the postmaster (its backends exit on their own); recovery runs on restart.
    pub fn kill(&mut self) {
        if let Some(p) = self.process.take() {
            p.stop(Signal::SIGKILL, Duration::from_secs(5));
            // Backends notice the postmaster's death within moments; give them time to go before
            // a restart checks for a still-attached shared memory segment.
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Starts the server again on the same port with the same data.
    pub fn restart(&mut self) {
        self.stop();
        retry_start(20, Duration::from_millis(250), || self.spawn());
    }

    /// Where the server's log is (to attach to failure messages).
    pub fn log_path(&self) -> PathBuf {
        self.data_root.path().join("postgres.log")
    }

    /// The temporary directory holding the data directory, socket-free; removed on drop.
    pub fn root_dir(&self) -> &Path {
        self.data_root.path()
    }

    /// The directory holding `psql`, `pgbench` and the server binaries in use.
    pub fn bindir(&self) -> &Path {
        &self.bindir
    }
}

/// Writes a file the server reads, owned by the server's user with `mode` (PostgreSQL refuses a
/// key file that others can read).
fn write_owned(run_as: Option<RunAs>, path: &Path, text: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
    if let Some(run_as) = run_as {
        run_as.own(path);
    }
}

/// `TEST_PG_BINDIR`, else `pg_config --bindir`, else the newest `/usr/lib/postgresql/*/bin`.
fn find_bindir() -> PathBuf {
    let has_server = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
    if let Some(dir) = std::env::var_os("TEST_PG_BINDIR").map(PathBuf::from) {
        assert!(
            has_server(&dir),
            "TEST_PG_BINDIR={} has no initdb/postgres",
            dir.display()
        );
        return dir;
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if has_server(&dir) {
            return dir;
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse().ok()?;
            Some((v, e.path().join("bin")))
        })
        .filter(|(_, dir)| has_server(dir))
        .collect();
    versions.sort();
    versions.pop().map(|(_, dir)| dir).unwrap_or_else(|| {
        panic!(
            "no PostgreSQL server binaries found (initdb, postgres): install them with \
             `apt-get install -y postgresql` (scripts/test does this), or point TEST_PG_BINDIR \
             at the directory that holds them"
        )
    })
}
