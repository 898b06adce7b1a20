//! `tether connect --reliable --json` processes for the tests that prove the `reliable` promise through the
//! binary (`reliable_lab.rs` through one server, `cluster_reliable.rs` through a cluster): numbered stdin lines
//! in, and what each process printed, checked for every message exactly once and in order.
//!
//! # Layout
//! - [`Endpoint`]: one `tether connect` process, started from a [`Command`] for the `tether` binary (the plain
//!   binary, or one inside a lab namespace), its stdout gathered by a reader thread into [`Heard`] (data,
//!   acknowledgements, receipts, connects, disconnects), waited on with a deadline.
//! - [`Pacer`]: a thread writing an endpoint's numbered stdin lines ([`line`]) at a given rate.
//! - [`assert_complete`] / [`until_complete`]: one direction of an exchange, whole, from the receiver's and the
//!   sender's side.

#![allow(dead_code)]

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{self, event};

/// What one `tether connect` process printed, gathered as it printed it.
#[derive(Default)]
pub struct Heard {
    /// Payloads of `data` events from the expected sender, in the order printed.
    pub data: Vec<String>,
    /// `data` events from anyone else: there should be none.
    pub strangers: Vec<Value>,
    /// The highest `acked.upto`.
    pub acked: u64,
    /// Every sequence number named by a `delivered` event, in the order printed (duplicates kept, to be caught).
    pub delivered: Vec<u64>,
    /// `not_delivered`, `in_doubt` and `dropped` events: each one breaks the promise this file checks.
    pub broken: Vec<Value>,
    /// `connected` events as they were read.
    pub connected: Vec<Seen>,
    /// `disconnected` events as they were read.
    pub disconnected: Vec<Seen>,
    /// The last few lines of any kind, for a failure's message.
    pub recent: std::collections::VecDeque<String>,
    /// The process's stderr lines (its errors, e.g. a refused send).
    pub stderr: Vec<String>,
    /// Stdout ended (the process exited).
    pub closed: bool,
}

impl Heard {
    pub fn summary(&self) -> String {
        format!(
            "data {} (first out of place: {:?}), strangers {}, acked {}, delivered {}, broken {:?}, connected {:?}, \
             disconnected {:?}, closed {}, last lines {:?}, stderr {:?}",
            self.data.len(),
            self.data.iter().enumerate().find_map(|(i, p)| {
                let number = p.get(1..6).and_then(|d| d.parse::<usize>().ok());
                (number != Some(i + 1)).then(|| (i, p.get(..6).unwrap_or(p).to_owned()))
            }),
            self.strangers.len(),
            self.acked,
            self.delivered.len(),
            self.broken.iter().take(5).collect::<Vec<_>>(),
            self.connected.iter().map(|s| (s.data, &s.v)).collect::<Vec<_>>(),
            self.disconnected.iter().map(|s| (s.data, &s.v)).collect::<Vec<_>>(),
            self.closed,
            self.recent,
            self.stderr.iter().rev().take(10).collect::<Vec<_>>(),
        )
    }

    fn take(&mut self, line: &str, from: &str) {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        match event(&v) {
            "data" if v["from"] == from => self.data.push(v["payload"].as_str().unwrap_or_default().to_owned()),
            "data" => self.strangers.push(v),
            "acked" => self.acked = self.acked.max(v["upto"].as_u64().unwrap_or(0)),
            "delivered" => self.delivered.extend(v["seqs"].as_array().into_iter().flatten().filter_map(Value::as_u64)),
            "not_delivered" | "in_doubt" | "dropped" => self.broken.push(v),
            "connected" => self.connected.push(Seen { at: Instant::now(), data: self.data.len(), v }),
            "disconnected" => self.disconnected.push(Seen { at: Instant::now(), data: self.data.len(), v }),
            _ => {}
        }
        if self.recent.len() == 8 {
            self.recent.pop_front();
        }
        self.recent.push_back(line.chars().take(200).collect());
    }

    /// Every one of `n` messages received once, in order: the first difference, described, otherwise `None`.
    pub fn exactly_once(&self, n: usize, pad: usize) -> Option<String> {
        if self.data.len() == n && self.data.iter().enumerate().all(|(i, p)| *p == line(i + 1, pad)) {
            return None;
        }
        let at = self.data.iter().enumerate().position(|(i, p)| *p != line(i + 1, pad));
        let distinct: HashSet<&String> = self.data.iter().collect();
        let shown = |i: usize| self.data.get(i).map(|p| p.split(' ').next().unwrap_or_default().to_owned());
        Some(format!(
            "received {} ({} distinct) of {n}; first out of place at index {at:?}: {:?} (before it {:?})",
            self.data.len(),
            distinct.len(),
            at.and_then(shown),
            at.and_then(|i| i.checked_sub(1)).and_then(shown),
        ))
    }

    /// Receipts name each of `1..=n` exactly once.
    pub fn delivered_once(&self, n: u64) -> bool {
        let mut seen = self.delivered.clone();
        seen.sort_unstable();
        seen == (1..=n).collect::<Vec<_>>()
    }

    pub fn reliable_status(&self, i: usize) -> Option<&str> {
        self.connected.get(i).and_then(|s| s.v["reliable"]["status"].as_str())
    }
}

/// One event line, when it was read and how many messages had been received by then.
pub struct Seen {
    /// When the reader thread took it: what the time figures measure.
    pub at: Instant,
    /// Messages received before it: where in the stream a reconnect fell.
    pub data: usize,
    /// The event itself, for assertions and failure messages.
    pub v: Value,
}

/// Message `i` (from 1): its number, then `pad` bytes of filler.
pub fn line(i: usize, pad: usize) -> String {
    format!("m{i:05} {}", "x".repeat(pad))
}

/// One `tether connect --reliable --json` process; dropping it kills it.
pub struct Endpoint {
    /// The `tether` process.
    child: Child,
    /// Its stdin, until a [`Pacer`] takes it.
    stdin: Option<ChildStdin>,
    /// What it printed, and a wake-up for waiters when it prints more.
    heard: Arc<(Mutex<Heard>, Condvar)>,
}

impl Endpoint {
    /// `tether connect ADDR --id ID --json --reliable` plus `extra`, run by `tether` (a [`Command`] for the
    /// binary, e.g. `netlab::tether(ns)`); its `data` events are counted as received when they come from `from`.
    /// `addr` may name several servers, comma-separated, primary first.
    pub fn spawn(mut tether: Command, addr: &str, id: &str, from: &str, extra: &[&str]) -> Endpoint {
        let mut child = tether
            .args(["connect", addr, "--id", id, "--json", "--reliable"])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tether connect");
        let heard = Arc::new((Mutex::new(Heard::default()), Condvar::new()));
        let (out, err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
        let (h, from) = (heard.clone(), from.to_owned());
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                h.0.lock().unwrap().take(&l, &from);
                h.1.notify_all();
            }
            h.0.lock().unwrap().closed = true;
            h.1.notify_all();
        });
        let h = heard.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                h.0.lock().unwrap().stderr.push(l);
            }
        });
        Endpoint { stdin: child.stdin.take(), child, heard }
    }

    pub fn heard(&self) -> MutexGuard<'_, Heard> {
        self.heard.0.lock().unwrap()
    }

    /// Wait until `done` holds, at most `patience`; a failure names `what` and what was heard.
    pub fn until(&self, what: &str, patience: Duration, done: impl Fn(&Heard) -> bool) -> MutexGuard<'_, Heard> {
        self.try_until(patience, done).unwrap_or_else(|h| panic!("no {what} within {patience:?}: {h}"))
    }

    /// Wait until `done` holds, at most `patience`; otherwise what was heard, summarised.
    pub fn try_until(
        &self,
        patience: Duration,
        done: impl Fn(&Heard) -> bool,
    ) -> Result<MutexGuard<'_, Heard>, String> {
        let deadline = Instant::now() + patience;
        let mut h = self.heard();
        while !done(&h) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(h.summary());
            }
            h = self.heard.1.wait_timeout(h, left).unwrap().0;
        }
        Ok(h)
    }

    /// [`until`](Self::until), without keeping the lock.
    pub fn wait(&self, what: &str, patience: Duration, done: impl Fn(&Heard) -> bool) {
        drop(self.until(what, patience, done));
    }

    /// Write `n` numbered lines at `rate` per second (all at once when `None`), then close stdin.
    pub fn pace(&mut self, n: usize, pad: usize, rate: Option<u32>) -> Pacer {
        let mut stdin = self.stdin.take().expect("stdin not taken yet");
        let written = Arc::new(AtomicUsize::new(0));
        let w = written.clone();
        let handle = std::thread::spawn(move || {
            let t0 = Instant::now();
            let mut i = 0;
            while i < n {
                // Everything due by now, then wait for the next tick: a rate, not a synchronisation.
                let due = rate.map_or(n, |r| ((t0.elapsed().as_secs_f64() * f64::from(r)) as usize + 1).min(n));
                let mut batch = String::new();
                for k in i..due {
                    batch.push_str(&line(k + 1, pad));
                    batch.push('\n');
                }
                // A process that exited ends the pacing; the test's checks say what was lost.
                if stdin.write_all(batch.as_bytes()).is_err() {
                    return;
                }
                i = due;
                w.store(i, Ordering::Relaxed);
                if i < n {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        });
        Pacer { handle: Some(handle), written }
    }

    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid with a valid signal number.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill({sig})");
        if sig == libc::SIGSTOP {
            common::until_stopped(self.child.id());
        }
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A thread writing numbered lines to a process's stdin.
pub struct Pacer {
    /// The writing thread, until joined.
    handle: Option<std::thread::JoinHandle<()>>,
    /// Lines written so far.
    written: Arc<AtomicUsize>,
}

impl Pacer {
    pub fn written(&self) -> usize {
        self.written.load(Ordering::Relaxed)
    }

    /// Wait (bounded) for the pacing to end.
    pub fn finish(&mut self, patience: Duration) {
        let deadline = Instant::now() + patience;
        while self.handle.as_ref().is_some_and(|h| !h.is_finished()) {
            assert!(Instant::now() < deadline, "pacing unfinished after {patience:?}: {} written", self.written());
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Some(h) = self.handle.take() {
            h.join().expect("pacer");
        }
    }
}

/// Both the receiver's and the sender's side of `n` messages from `sender` to `receiver`: every message
/// received exactly once, in order; the sender's acknowledgements up to `n`; receipts for each of `1..=n` once;
/// nothing undelivered, in doubt or dropped.
pub fn assert_complete(sender: &Endpoint, receiver: &Endpoint, n: usize, pad: usize, what: &str) {
    let r = receiver.heard();
    assert_eq!(r.exactly_once(n, pad), None, "{what}: receiver");
    assert!(r.strangers.is_empty() && r.broken.is_empty(), "{what}: receiver: {}", r.summary());
    drop(r);
    let s = sender.heard();
    assert_eq!(s.acked, n as u64, "{what}: sender's acknowledgements: {}", s.summary());
    assert!(s.delivered_once(n as u64), "{what}: receipts are not 1..={n} once each: {}", s.summary());
    assert!(s.broken.is_empty(), "{what}: sender: {}", s.summary());
}

/// Wait until `receiver` has all `n` messages and `sender` acknowledgements and receipts for them.
pub fn until_complete(sender: &Endpoint, receiver: &Endpoint, n: usize, patience: Duration, what: &str) {
    let deadline = Instant::now() + patience;
    if let Err(r) = receiver.try_until(patience, |h| h.data.len() >= n || !h.broken.is_empty()) {
        // What the sender heard says whether the missing messages left it (its stderr names refusals).
        let s = sender.heard().summary();
        panic!("{what}: not all {n} received within {patience:?}: receiver: {r}; sender: {s}");
    }
    let left = deadline.saturating_duration_since(Instant::now());
    sender.wait(&format!("{what}: {n} acknowledged and delivered"), left, |h| {
        (h.acked >= n as u64 && h.delivered.len() >= n) || !h.broken.is_empty()
    });
}
