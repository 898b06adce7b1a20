//! The `reliable` promise across a cluster node's `kill -9`, with real processes on loopback: a `redis-server`,
//! two `tether serve --cluster` nodes and two `tether connect --reliable --json` clients exchanging numbered
//! stdin lines. The node holding one of them is killed mid-stream; that client resumes its session on the other
//! node, and both streams still arrive exactly once and in order.
//!
//! # Layout
//! - The nodes come from `clusterlab` (heartbeat 1 s / 3 s, lease 3 s), the clients from `endpoint` (shared with
//!   `reliable_lab.rs`): [`Endpoint`] gathers what each printed, [`Pacer`](endpoint::Pacer) paces its stdin,
//!   [`until_complete`] / [`assert_complete`] check each direction whole.
//! - One test: `peer` on n1, `dev` on n2 (n1 its alternative), [`N`] messages each way at [`RATE`]/s, n2
//!   killed once `dev` has received [`KILL_AT`]. It prints a `MEASURED` line (the kill to `dev`'s resume).

mod common;
#[macro_use]
mod clusterlab;
mod endpoint;

use std::process::Command;
use std::time::{Duration, Instant};

use clusterlab::{node, PATIENCE};
use endpoint::{assert_complete, until_complete, Endpoint};
use tether_bench::redis::Redis;

/// Messages each way, and their pace (stdin lines per second, per sender).
const N: usize = 5_000;
const RATE: u32 = 1_000;
/// n2 is killed once `dev` has received this many.
const KILL_AT: usize = 1_500;
/// Filler bytes per message.
const PAD: usize = 32;
/// Every wait for the exchange to complete, from the kill: the lease (3 s) and the reconnect fit many times.
const COMPLETE: Duration = Duration::from_secs(60);

/// The plain `tether` binary (loopback, no namespace).
fn tether() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tether"))
}

/// `peer` on n1 and `dev` on n2 exchange [`N`] messages each way; n2 is killed with `dev`'s session mid-stream.
/// `dev` reconnects to n1 and resumes (`"reliable":{"status":"resumed","lost":0}`), and every message in both
/// directions is received once and in order, acknowledged and receipted once, with nothing undelivered, in
/// doubt or dropped.
#[test]
fn a_reliable_session_resumes_on_another_node_after_kill_9_and_both_streams_arrive_exactly_once() {
    redis_or_skip!("reliable kill -9");
    let redis = Redis::start();
    let (n1, n2) = (node(&redis, "n1", &[]), node(&redis, "n2", &[]));
    let mut peer = Endpoint::spawn(tether(), &n1.addr, "peer", "dev", &["--reconnect", "--to", "dev"]);
    let backoff = ["--backoff-initial", "100ms", "--backoff-max", "500ms"];
    let dev_flags = [&["--reconnect", "--to", "peer"][..], &backoff].concat();
    let mut dev = Endpoint::spawn(tether(), &format!("{},{}", n2.addr, n1.addr), "dev", "peer", &dev_flags);
    for (who, e, on) in [("peer", &peer, &n1), ("dev", &dev, &n2)] {
        // Taken out of the lock, so that a failed assertion leaves the reader threads a usable lock.
        let first = e.until(&format!("{who} connected"), PATIENCE, |h| !h.connected.is_empty()).connected[0].v.clone();
        let status = first["reliable"]["status"].as_str();
        assert_eq!(status, Some("new"), "cluster node did not grant reliable to {who}: {first}");
        assert_eq!(first["server"], on.addr.as_str(), "{who} connected to {}: {first}", on.id);
    }

    let t0 = Instant::now();
    let mut pacers = [dev.pace(N, PAD, Some(RATE)), peer.pace(N, PAD, Some(RATE))];
    dev.wait("the stream under way", PATIENCE, |h| h.data.len() >= KILL_AT);
    n2.proc.signal(libc::SIGKILL);
    let killed = Instant::now();
    let at_kill = dev.heard().data.len();

    let h = dev.until("dev's resume on n1", COMPLETE, |h| h.connected.len() >= 2);
    let again = &h.connected[1];
    assert_eq!(h.reliable_status(1), Some("resumed"), "dev did not resume its session on n1: {}", h.summary());
    assert_eq!(again.v["reliable"]["lost"], 0, "{}", h.summary());
    assert_eq!(again.v["server"], n1.addr.as_str(), "dev's reconnect went to n1: {}", h.summary());
    let verdict = h.disconnected.first().map(|d| (d.v["reason"].clone(), d.at.duration_since(killed)));
    let resumed = again.at.duration_since(killed);
    drop(h);

    for p in &mut pacers {
        p.finish(COMPLETE);
    }
    until_complete(&peer, &dev, N, COMPLETE, "peer to dev");
    until_complete(&dev, &peer, N, COMPLETE, "dev to peer");
    let total = t0.elapsed();
    assert_complete(&peer, &dev, N, PAD, "peer to dev");
    assert_complete(&dev, &peer, N, PAD, "dev to peer");
    let p = peer.heard();
    assert!(p.connected.len() == 1 && p.disconnected.is_empty(), "peer stayed on n1: {}", p.summary());
    drop(p);
    let d = dev.heard();
    let resumes = (1..d.connected.len()).filter(|&i| d.reliable_status(i) == Some("resumed")).count();
    assert!(resumes + 1 == d.connected.len(), "every reconnect of dev resumed: {}", d.summary());
    drop(d);

    let (reason, told) = verdict.expect("dev printed `disconnected` before its reconnect");
    println!(
        "MEASURED cluster kill -9: {N} messages each way at {RATE}/s, peer on n1, dev on n2; n2 killed when dev \
         had received {at_kill}; dev's verdict {reason} {:.3}s after the kill; resumed on n1 {:.3}s after the kill \
         (lost 0); every message once and in order both ways, 1..={N} acknowledged and receipted once each; \
         total {:.1}s",
        told.as_secs_f64(),
        resumed.as_secs_f64(),
        total.as_secs_f64()
    );
}
