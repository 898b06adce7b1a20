//! Test support shared by the CLI and lab tests: a child process whose stdout is JSON lines.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

pub const PATIENCE: Duration = Duration::from_secs(20);

pub struct Proc {
    pub child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<Value>,
}

impl Proc {
    /// Run the `tether` binary with `args`.
    pub fn spawn(args: &[&str]) -> Proc {
        Proc::spawn_cmd(env!("CARGO_BIN_EXE_tether"), args)
    }

    /// Run any program whose stdout is JSON lines (e.g. `ip netns exec NS tether ...`).
    pub fn spawn_cmd(program: impl AsRef<OsStr>, args: &[&str]) -> Proc {
        let mut child = Command::new(program)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        Proc { child, stdin, lines: rx }
    }

    /// The first line satisfying `pred` within [`PATIENCE`] (earlier lines are skipped).
    pub fn expect(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        self.expect_within(what, PATIENCE, pred)
    }

    /// The first line satisfying `pred` within `patience`.
    pub fn expect_within(&self, what: &str, patience: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        self.try_expect(patience, pred).unwrap_or_else(|| panic!("no line for: {what}"))
    }

    /// The first line satisfying `pred` within `patience`, or `None`.
    pub fn try_expect(&self, patience: Duration, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        let deadline = Instant::now() + patience;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) if pred(&v) => return Some(v),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    }

    /// Every line received so far, without waiting.
    pub fn drain(&self) -> Vec<Value> {
        std::iter::from_fn(|| self.lines.try_recv().ok()).collect()
    }

    /// Send `sig`. For SIGSTOP, return only once every thread of the process is stopped: kill(2) returns when
    /// the signal is queued, and a thread running on another core can still answer a frame until it stops.
    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) with our own child's pid and a valid signal number.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill({sig})");
        if sig == libc::SIGSTOP {
            until_stopped(self.child.id());
        }
    }

    pub fn send_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < deadline, "process did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Poll `/proc/PID/task/*/stat` until every thread is in state `T` (stopped), within [`PATIENCE`].
pub fn until_stopped(pid: u32) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the process's threads");
        let all_stopped = tasks.flatten().all(|t| {
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            // The state follows the command name, which is in parentheses and may contain spaces.
            stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()) == Some("T")
        });
        if all_stopped {
            return;
        }
        assert!(Instant::now() < deadline, "process {pid} did not stop");
        std::thread::sleep(Duration::from_millis(1));
    }
}

pub fn event(v: &Value) -> &str {
    v["event"].as_str().unwrap_or("")
}

/// `tether serve` on ephemeral loopback ports with JSON events, open auth and an admin listener, plus `extra`;
/// returns it with its address and its admin listener's address (from the `listening` event).
pub fn serve_with_admin(extra: &[&str]) -> (Proc, String, String) {
    let mut args = vec!["serve", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--events", "json"];
    args.push("--insecure-no-auth");
    args.extend_from_slice(extra);
    let p = Proc::spawn(&args);
    let first = p.expect("listening", |v| event(v) == "listening");
    let addr = first["addr"].as_str().expect("the listening address").to_owned();
    let admin = first["admin"].as_str().expect("the admin address").to_owned();
    (p, addr, admin)
}
