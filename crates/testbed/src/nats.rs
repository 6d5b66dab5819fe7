//! Real NATS servers with JetStream: one node, or a cluster of three on loopback (the routes
//! between them on their own ports), each with its own store directory, killable and restartable
//! on the same ports with their data intact. `nats-server` comes from `TEST_NATS_SERVER`, `PATH`
//! or /usr/sbin (Debian's package; `scripts/bootstrap --nats` installs it).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use tempfile::TempDir;

use crate::process::{free_port, on_path, port_accepts, retry_start, ServerProcess};

/// One node of a [`Nats`] deployment.
struct Node {
    port: u16,
    cluster_port: u16,
    monitor_port: u16,
    process: Option<ServerProcess>,
}

pub struct Nats {
    program: PathBuf,
    nodes: Vec<Node>,
    /// `--user`/`--pass` of every node, when the deployment requires them.
    auth: Option<(String, String)>,
    dir: TempDir,
}

impl Nats {
    /// One JetStream node.
    pub fn start() -> Nats {
        Nats::start_nodes(1, None)
    }

    /// Three JetStream nodes in one cluster (an R3 stream survives any one of them killed).
    pub fn start_cluster() -> Nats {
        Nats::start_nodes(3, None)
    }

    /// One node that requires this user and password.
    pub fn start_with_password(user: &str, password: &str) -> Nats {
        Nats::start_nodes(1, Some((user.to_string(), password.to_string())))
    }

    fn start_nodes(count: usize, auth: Option<(String, String)>) -> Nats {
        let program = find_nats_server();
        let dir = tempfile::Builder::new()
            .prefix("testbed-nats-")
            .tempdir()
            .expect("create a temporary NATS directory");
        let mut nats = Nats {
            program,
            nodes: Vec::new(),
            auth,
            dir,
        };
        retry_start(5, Duration::ZERO, || {
            for node in &mut nats.nodes {
                if let Some(p) = node.process.take() {
                    p.stop(Signal::SIGKILL, Duration::from_secs(1));
                }
            }
            nats.nodes = (0..count)
                .map(|_| Node {
                    port: free_port(),
                    cluster_port: free_port(),
                    monitor_port: free_port(),
                    process: None,
                })
                .collect();
            for i in 0..count {
                nats.spawn(i);
            }
            for i in 0..count {
                nats.wait(i);
            }
        });
        nats
    }

    fn spawn(&mut self, i: usize) {
        let node = &self.nodes[i];
        let store = self.dir.path().join(format!("node{i}"));
        std::fs::create_dir_all(&store).expect("create the NATS store");
        let mut cmd = Command::new(&self.program);
        cmd.args(["-a", "127.0.0.1", "-p", &node.port.to_string()])
            .args(["-m", &node.monitor_port.to_string()])
            .args(["-n", &format!("node{i}")])
            .arg("-js")
            .arg("-sd")
            .arg(&store);
        if let Some((user, pass)) = &self.auth {
            cmd.args(["--user", user, "--pass", pass]);
        }
        if self.nodes.len() > 1 {
            let routes: Vec<String> = self
                .nodes
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, n)| format!("nats://127.0.0.1:{}", n.cluster_port))
                .collect();
            cmd.args(["--cluster_name", "testbed"])
                .args([
                    "--cluster",
                    &format!("nats://127.0.0.1:{}", node.cluster_port),
                ])
                .args(["--routes", &routes.join(",")]);
        }
        let process = ServerProcess::spawn(
            "nats-server",
            cmd,
            None,
            self.dir.path().join(format!("node{i}.log")),
        );
        self.nodes[i].process = Some(process);
    }

    fn wait(&mut self, i: usize) {
        let port = self.nodes[i].port;
        let monitor = self.nodes[i].monitor_port;
        let process = self.nodes[i].process.as_mut().expect("spawned");
        process.wait_ready(Duration::from_secs(30), port, || port_accepts(monitor));
    }

    /// `nats://127.0.0.1:P,nats://127.0.0.1:Q,…`: every node.
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The client port of node `i`.
    pub fn port(&self, i: usize) -> u16 {
        self.nodes[i].port
    }

    /// The monitoring port of node `i` (`/jsz`, `/varz`).
    pub fn monitor_port(&self, i: usize) -> u16 {
        self.nodes[i].monitor_port
    }

    pub fn nodes(&self) -> usize {
        self.nodes.len()
    }

    /// `kill -9` of node `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(p) = self.nodes[i].process.take() {
            p.stop(Signal::SIGKILL, Duration::from_secs(1));
        }
    }

    /// Starts node `i` again on its ports, with its store.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
        self.wait(i);
    }

    pub fn is_running(&mut self, i: usize) -> bool {
        self.nodes[i]
            .process
            .as_mut()
            .is_some_and(|p| p.exited().is_none())
    }

    /// The last lines of node `i`'s log.
    pub fn log_tail(&self, i: usize) -> String {
        crate::process::log_tail(&self.dir.path().join(format!("node{i}.log")))
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}

fn find_nats_server() -> PathBuf {
    if let Ok(path) = std::env::var("TEST_NATS_SERVER") {
        return PathBuf::from(path);
    }
    on_path("nats-server")
        .or_else(|| {
            let sbin = PathBuf::from("/usr/sbin/nats-server");
            sbin.exists().then_some(sbin)
        })
        .expect(
            "nats-server is not installed: run scripts/bootstrap --nats (Debian's nats-server), \
             or set TEST_NATS_SERVER to its path",
        )
}
