//! `eventsctl` run against one database URL only (no MongoDB), and its whole outcome as text for
//! assertion messages.

use std::process::{Command, Output};

/// Runs `eventsctl args…` with `DATABASE_URL=url` and without `MONGODB_URI`.
pub fn eventsctl(url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_eventsctl"))
        .env("DATABASE_URL", url)
        .env_remove("MONGODB_URI")
        .args(args)
        .output()
        .expect("run eventsctl")
}

/// Exit code, stdout and stderr, for an assertion's message.
pub fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
