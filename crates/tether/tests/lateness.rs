//! Verdict lateness on the real clock: many silent peers, each declared dead at its own exact deadline.
//!
//! This is the one liveness test on the real clock: lateness is a property of real timers. It asserts the
//! verdicts (all of them, the right reason, nobody else) and a loose bound that a periodic scan could not meet
//! (a 1 s scan would put the median near 500 ms); the figures it prints are measurements, not goals.

mod support;

use std::time::Duration;

use support::{test_config, RawPeer, TestServer};
use tether::{Client, ClientConfig, ClientEvent, CloseReason, EventKind};

const SILENT: usize = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_peers_are_declared_on_time() {
    let mut cfg = test_config();
    cfg.heartbeat.interval = Duration::from_millis(200);
    cfg.heartbeat.timeout = Duration::from_millis(600);
    let mut s = TestServer::start(cfg).await;
    // A live client that must survive the whole run with no false verdict.
    let mut live = Client::connect(s.addr, ClientConfig::new("live")).await.unwrap();
    let mut silent = Vec::new();
    for i in 0..SILENT {
        silent.push(RawPeer::hello(s.addr, &format!("silent-{i}"), 1).await.0);
    }
    let mut lateness = Vec::new();
    while lateness.len() < SILENT {
        match s.wait(|k| matches!(k, EventKind::Offline { .. } | EventKind::Closed { .. })).await {
            EventKind::Offline { client, reason, lateness: Some(l), .. } if client.starts_with("silent-") => {
                assert_eq!(reason, CloseReason::HeartbeatTimeout);
                lateness.push(l);
            }
            other => panic!("unexpected verdict: {other:?}"),
        }
    }
    lateness.sort();
    let pct = |p: f64| lateness[((lateness.len() - 1) as f64 * p).round() as usize];
    let (p50, p99, max) = (pct(0.5), pct(0.99), lateness[lateness.len() - 1]);
    println!("lateness over {} verdicts: p50 {p50:?}, p99 {p99:?}, max {max:?}", lateness.len());
    assert!(p50 < Duration::from_millis(100), "median verdict {p50:?} late");
    assert!(max < Duration::from_secs(1), "worst verdict {max:?} late");
    // The live client never noticed, and the server never judged it.
    assert!(!matches!(live_event(&mut live).await, Some(ClientEvent::Disconnected(_))));
    assert_eq!(s.handle.stats().online, 1);
    drop(silent);
}

async fn live_event(c: &mut Client) -> Option<ClientEvent> {
    tokio::time::timeout(Duration::from_millis(50), c.next_event()).await.ok().flatten()
}
