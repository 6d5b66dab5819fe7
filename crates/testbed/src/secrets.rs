//! Connection strings with hostile passwords, and the check that a binary printed none of them.
//!
//! Every binary's crate runs its binary with each of [`postgres_urls`] (and, where it talks to
//! MongoDB, [`mongodb_uris`]) — against a server that accepts them (trust authentication ignores
//! the password), one that is not there, and as a string that does not parse — and calls
//! [`assert_clean`] on what it wrote to stdout and stderr.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A connection string and every form of its password that must never be printed.
#[derive(Debug, Clone)]
pub struct Hostile {
    pub url: String,
    pub secrets: Vec<String>,
}

fn hostile(url: String, secrets: &[&str]) -> Hostile {
    Hostile {
        url,
        secrets: secrets.iter().map(|s| s.to_string()).collect(),
    }
}

/// PostgreSQL connection strings for `user` on `127.0.0.1:port`, database `db`: passwords with
/// `/ ? @ # % +`, raw where the URL form allows them and percent-encoded where it does not, in the
/// user-info, in a `password` parameter (also with its name encoded), and in key=value form; plus
/// one that does not parse.
pub fn postgres_urls(port: u16, user: &str, db: &str) -> Vec<Hostile> {
    vec![
        hostile(
            format!("postgres://{user}:Zm9v/YmFy+PgSecret6=@127.0.0.1:{port}/{db}"),
            &["Zm9v/YmFy+PgSecret6="],
        ),
        hostile(
            format!("postgres://{user}:s3?cr#t/p%40ss%25w+rd@127.0.0.1:{port}/{db}"),
            &["s3?cr#t/p%40ss%25w+rd", "s3?cr#t/p@ss%w+rd"],
        ),
        hostile(
            format!("postgresql://{user}@127.0.0.1:{port}/{db}?password=qp%2Fs3cr%3Ft%40x%23y%2Bz"),
            &["qp%2Fs3cr%3Ft%40x%23y%2Bz", "qp/s3cr?t@x#y+z"],
        ),
        hostile(
            format!("postgres://{user}@127.0.0.1:{port}/{db}?pass%77ord=enc0ded%2Fname%40pw"),
            &["enc0ded%2Fname%40pw", "enc0ded/name@pw"],
        ),
        hostile(
            format!("host=127.0.0.1 port={port} user={user} dbname={db} password='kv s3cr/t?@#%+'"),
            &["kv s3cr/t?@#%+"],
        ),
        hostile(
            format!("postgres://{user}:Unp4rse/able?pw@127.0.0.1:notaport/{db}"),
            &["Unp4rse/able?pw"],
        ),
    ]
}

/// MongoDB connection strings for `host:port`: a percent-encoded password with `/ ? @ % +`, and
/// one with an unencoded `?` that the driver misreads (its error quotes what it took for a host).
pub fn mongodb_uris(host_port: &str) -> Vec<Hostile> {
    vec![
        hostile(
            format!(
                "mongodb://consumer:M0ng0%2Fs3cr%3Ft%40pw%25x%2B@{host_port}/?directConnection=true"
            ),
            &["M0ng0%2Fs3cr%3Ft%40pw%25x%2B", "M0ng0/s3cr?t@pw%x+"],
        ),
        hostile(
            format!("mongodb://consumer:Raw?Qm4rkPw@{host_port}/"),
            &["Raw?Qm4rkPw", "Qm4rkPw"],
        ),
    ]
}

/// A port on 127.0.0.1 where nothing listens.
pub fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs `command` (stdout and stderr captured) until it exits or `limit` passes; then SIGTERM,
/// and SIGKILL if it is still there 10 s later.
pub fn run_for(command: &mut Command, limit: Duration) -> Output {
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the binary");
    let pid = Pid::from_raw(child.id() as i32);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let deadline = Instant::now() + limit;
    loop {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(output) => return output.expect("collect the output"),
            Err(_) if Instant::now() < deadline => continue,
            Err(_) => break,
        }
    }
    let _ = kill(pid, Signal::SIGTERM);
    if let Ok(output) = rx.recv_timeout(Duration::from_secs(10)) {
        return output.expect("collect the output");
    }
    let _ = kill(pid, Signal::SIGKILL);
    rx.recv().unwrap().expect("collect the output")
}

/// Fails naming the secret when any of `secrets` is in the binary's stdout or stderr. Returns
/// both, for further checks.
pub fn assert_clean(what: &str, output: &Output, secrets: &[String]) -> String {
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    for secret in secrets {
        assert!(
            !text.contains(secret.as_str()),
            "{what}: the password text {secret:?} was printed:\n{text}"
        );
    }
    text
}
