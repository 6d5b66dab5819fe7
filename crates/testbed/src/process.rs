//! What both servers share: free ports, running as an unprivileged OS user, child processes that
//! are signalled and reaped, and waiting for readiness with a useful failure message.

use std::fs::File;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::{Gid, Pid, Uid, User};

/// A loopback port that was free a moment ago. Another process may take it before the server binds
/// it, so callers retry start-up on a fresh port when the server fails to bind.
pub(crate) fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind an ephemeral port");
    listener.local_addr().expect("local address").port()
}

/// Does process `pid` hold a listening TCP socket on `port`? (Linux: the socket inodes of
/// /proc/net/tcp and tcp6 against the process's file descriptors.) Where /proc cannot tell, it
/// says yes and leaves readiness to the caller's probe.
fn listens_on(pid: u32, port: u16) -> bool {
    let mut inodes = Vec::new();
    let mut readable = false;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        readable = true;
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // local_address is ADDR:PORT in hex; st 0A is LISTEN; the inode is the tenth field.
            let listening_here = fields.len() > 9
                && fields[3] == "0A"
                && fields[1]
                    .rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
                    == Some(port);
            if listening_here {
                inodes.push(format!("socket:[{}]", fields[9]));
            }
        }
    }
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return !readable;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .map(|target| inodes.iter().any(|i| target.as_os_str() == i.as_str()))
            .unwrap_or(false)
    })
}

pub(crate) fn port_accepts(port: u16) -> bool {
    TcpStream::connect_timeout(
        &(Ipv4Addr::LOCALHOST, port).into(),
        Duration::from_millis(200),
    )
    .is_ok()
}

/// The OS user a server runs as: ourselves, or `postgres` when we are root (PostgreSQL refuses to
/// run as root, and a throwaway MongoDB-wire server has no business running as root either).
#[derive(Clone, Copy)]
pub(crate) struct RunAs {
    pub uid: Uid,
    pub gid: Gid,
}

impl RunAs {
    pub fn detect() -> Option<RunAs> {
        if !Uid::effective().is_root() {
            return None;
        }
        let user = User::from_name("postgres")
            .ok()
            .flatten()
            .unwrap_or_else(|| {
                panic!(
                "the tests run as root, and PostgreSQL refuses to run as root, but there is no \
                 `postgres` OS user to run it as: install the server (`apt-get install -y \
                 postgresql`), which creates the user, or run the tests as an unprivileged user"
            )
            });
        Some(RunAs {
            uid: user.uid,
            gid: user.gid,
        })
    }

    /// Gives a directory we created to the server's user.
    pub fn own(self, dir: &Path) {
        nix::unistd::chown(dir, Some(self.uid), Some(self.gid))
            .unwrap_or_else(|e| panic!("chown {} to the server user: {e}", dir.display()));
    }

    pub fn apply(self, cmd: &mut Command) {
        use std::os::unix::process::CommandExt;
        cmd.uid(self.uid.as_raw()).gid(self.gid.as_raw());
    }
}

pub(crate) fn own_dir(run_as: Option<RunAs>, dir: &Path) {
    if let Some(run_as) = run_as {
        run_as.own(dir);
    }
}

/// A running server process whose output goes to a log file, killed when dropped.
pub(crate) struct ServerProcess {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl ServerProcess {
    pub fn spawn(
        name: &'static str,
        mut cmd: Command,
        run_as: Option<RunAs>,
        log: PathBuf,
    ) -> ServerProcess {
        let out = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap_or_else(|e| panic!("open {}: {e}", log.display()));
        let err = out.try_clone().expect("clone log handle");
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        if let Some(run_as) = run_as {
            run_as.apply(&mut cmd);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({:?}): {e}", cmd.get_program()));
        ServerProcess { name, child, log }
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// Has the process exited (start-up failure)?
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Sends `signal` and waits for the process to exit; escalates to SIGKILL after `grace`.
    pub fn stop(mut self, signal: Signal, grace: Duration) {
        self.stop_in_place(signal, grace);
    }

    fn stop_in_place(&mut self, signal: Signal, grace: Duration) {
        if self.exited().is_some() {
            return;
        }
        let _ = kill(self.pid(), signal);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The last lines of the server's log, for failure messages.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log)
    }

    /// Waits until this process listens on `port` and `ready()` holds, panicking with the server's
    /// log if it exits or times out. The ownership check matters: `free_port` only picks a port
    /// that was free a moment ago, and when another test's server takes it first, that server
    /// would answer `ready()` while ours fails to bind (then exits, and the caller retries).
    pub fn wait_ready(&mut self, timeout: Duration, port: u16, mut ready: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            if listens_on(self.child.id(), port) && ready() {
                return;
            }
            if let Some(status) = self.exited() {
                panic!(
                    "{} exited during start-up ({status}); its log:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "{} did not become ready within {timeout:?}; its log:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        // Immediate stop: a test is over (or panicking), nothing to preserve.
        self.stop_in_place(Signal::SIGQUIT, Duration::from_secs(5));
    }
}

pub(crate) fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Runs a short command to completion, panicking with its output when it fails.
pub(crate) fn run(mut cmd: Command, run_as: Option<RunAs>, what: &str) {
    if let Some(run_as) = run_as {
        run_as.apply(&mut cmd);
    }
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what} ({:?}): {e}", cmd.get_program()));
    if !out.status.success() {
        panic!(
            "{what} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Looks for an executable on PATH.
pub(crate) fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Runs `start` until it returns without panicking, at most `attempts` times, pausing between
/// tries: a port can be taken between choosing and binding it, and a server that just stopped may
/// still hold its port for a moment. The last failure propagates with its message.
pub(crate) fn retry_start(attempts: u32, pause: Duration, mut start: impl FnMut()) {
    for attempt in 1..=attempts {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(&mut start)) {
            Ok(()) => return,
            Err(e) if attempt == attempts => std::panic::resume_unwind(e),
            Err(_) => std::thread::sleep(pause),
        }
    }
}

#[cfg(test)]
mod listener_tests {
    use super::*;

    #[test]
    fn a_listener_belongs_to_the_process_that_holds_it_and_to_no_other() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        assert!(listens_on(std::process::id(), port));
        // Another process (a short-lived child) does not hold it: a server that lost the race
        // for this port is not taken for ready.
        let mut other = Command::new("sleep").arg("5").spawn().unwrap();
        assert!(!listens_on(other.id(), port));
        let _ = other.kill();
        let _ = other.wait();
        drop(listener);
        assert!(!listens_on(std::process::id(), port));
    }
}
