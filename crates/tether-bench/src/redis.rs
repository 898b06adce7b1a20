//! A `redis-server` of one's own, for a benchmark or a test: on a free loopback port, nothing saved to disk,
//! stopped on drop (`kill -9`).
//!
//! Standard library only, so that the test suites of crates this one depends on include this very file (by
//! `#[path]`) instead of a copy. Read with `redis-cli`; nothing else of this module talks to it.

use std::io;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Redis {
    pub port: u16,
    child: Option<Child>,
    /// The `--requirepass` it was started with, for [`Redis::cli`].
    password: Option<String>,
}

/// Why Redis cannot be started here, if it cannot.
pub fn unavailable() -> Option<String> {
    match Command::new("redis-server").arg("--version").output() {
        Ok(o) if o.status.success() => None,
        _ => Some("needs redis-server (Debian's redis-server; scripts/test installs it)".into()),
    }
}

impl Redis {
    /// Start one on a free port and wait until it answers `PING`.
    pub fn try_start() -> io::Result<Redis> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        Redis::try_start_on(port)
    }

    /// Start one on `port` (again, after [`Redis::kill`]: empty, as after a crash without persistence).
    pub fn try_start_on(port: u16) -> io::Result<Redis> {
        Redis::try_start_with(port, &[])
    }

    /// Start one on `port` with more `redis-server` arguments (`--requirepass PW` among them is then used by
    /// [`Redis::cli`]).
    pub fn try_start_with(port: u16, extra: &[&str]) -> io::Result<Redis> {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--protected-mode", "no", "--loglevel", "warning"])
            // A node catching up after a connect storm must not be cut off from its pub/sub (docs/cluster.md).
            .args(["--client-output-buffer-limit", "pubsub 256mb 64mb 60"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let password = extra.iter().position(|a| *a == "--requirepass").and_then(|i| extra.get(i + 1));
        let r = Redis { port, child: Some(child), password: password.map(|p| p.to_string()) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while r.cli(&["PING"]) != "PONG" {
            if Instant::now() > deadline {
                return Err(io::Error::other(format!("redis-server on port {port} did not answer")));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(r)
    }

    /// [`Redis::try_start`] for a test: a failure to start fails the test.
    pub fn start() -> Redis {
        Redis::try_start().expect("starting redis-server")
    }

    /// [`Redis::try_start_on`] for a test.
    pub fn start_on(port: u16) -> Redis {
        Redis::try_start_on(port).expect("starting redis-server")
    }

    /// [`Redis::try_start_with`] on a free port, for a test.
    pub fn start_with(extra: &[&str]) -> Redis {
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
        Redis::try_start_with(port, extra).expect("starting redis-server")
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// `kill -9`: gone at once, its data with it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A command through `redis-cli`: its output, trimmed (empty when it could not run).
    pub fn cli(&self, args: &[&str]) -> String {
        let mut cmd = Command::new("redis-cli");
        cmd.args(["-p", &self.port.to_string()]);
        if let Some(pw) = &self.password {
            cmd.args(["-a", pw, "--no-auth-warning"]);
        }
        match cmd.args(args).output() {
            Ok(out) => String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            Err(_) => String::new(),
        }
    }

    /// `CLIENT PAUSE ms ALL`: every client's commands wait that long (a stalled Redis); returns at once.
    pub fn pause(&self, ms: u64) {
        let out = self.cli(&["CLIENT", "PAUSE", &ms.to_string(), "ALL"]);
        assert_eq!(out, "OK", "CLIENT PAUSE");
    }

    /// `CLIENT KILL TYPE pubsub`: every subscribed connection is cut; how many were.
    pub fn client_kill_pubsub(&self) -> u64 {
        self.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]).parse().unwrap_or(0)
    }

    /// A numeric field of `INFO`.
    pub fn info(&self, field: &str) -> Option<u64> {
        let text = self.cli(&["INFO", "all"]);
        let prefix = format!("{field}:");
        text.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok())
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}
