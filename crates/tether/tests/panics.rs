//! A panic in a connection's task (a bug of ours, injected here with the `fault-injection` feature) leaks
//! nothing: not a handshake slot, not a registry entry, not a descriptor, and not the session hub's lock. One
//! test in its own binary, so that the descriptor count is this test's alone.

mod support;

use std::time::Duration;

use bytes::Bytes;
use support::{test_config, RawPeer, TestServer};
use tether::proto::frame::V2;
use tether::proto::Frame;
use tether::{CloseReason, EventKind};

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Wait (in virtual time) until `pred` holds of the server's stats.
async fn until_stats(s: &TestServer, what: &str, pred: impl Fn(&tether::Stats) -> bool) {
    for _ in 0..1000 {
        if pred(&s.handle.stats()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{what}: {:?}", s.handle.stats());
}

#[tokio::test(start_paused = true)]
async fn a_panicking_connection_task_leaks_no_slot_session_descriptor_or_lock() {
    // Heartbeats too slow to matter: the raw peers here never ping on their own.
    let mut cfg = test_config();
    (cfg.heartbeat.interval, cfg.heartbeat.timeout) = (Duration::from_secs(600), Duration::from_secs(1800));
    let mut s = TestServer::start(cfg).await;
    let fds = open_fds();
    let mut live = Vec::new();
    // While handshaking, and while holding the hub's lock: the peer's connection is closed, the slot is back.
    for id in ["panic-at-hello", "panic-at-hub"] {
        let mut p = RawPeer::connect(s.addr).await;
        p.send(&support::hello_frame(V2, id, 1)).await;
        assert_eq!(p.next_frame().await, None, "{id}: the connection is closed");
        let others = live.len();
        until_stats(&s, id, |st| st.handshakes == 0 && st.connections == others).await;
        // The server goes on: a newcomer is admitted (the hub's lock was not left poisoned).
        let (mut ok, _) = RawPeer::hello(s.addr, &format!("after-{id}"), 1).await;
        ok.send(&Frame::Ping { seq: 1, ts_ms: 0 }).await;
        assert!(matches!(ok.next_frame().await, Some(Frame::Pong { seq: 1, .. })));
        live.push(ok);
    }
    // Admitted by the registry, and the task panics before its `online` event: the session is not left behind.
    let mut p = RawPeer::connect(s.addr).await;
    p.send(&support::hello_frame(V2, "panic-at-welcome", 1)).await;
    let off = s.wait(|k| matches!(k, EventKind::Offline { client, .. } if client == "panic-at-welcome")).await;
    assert!(matches!(off, EventKind::Offline { reason: CloseReason::Reset, .. }), "{off:?}");
    assert!(s.handle.session("panic-at-welcome").is_none(), "no session is left behind");
    let others = live.len();
    until_stats(&s, "welcome", |st| st.handshakes == 0 && st.connections == others && st.online == others).await;
    drop(p);
    // An admitted client: its session ends as a close would, announced offline, and its id is free again.
    let (mut p, _) = RawPeer::hello(s.addr, "panic-at-data", 1).await;
    s.wait(|k| matches!(k, EventKind::Online { client, .. } if client == "panic-at-data")).await;
    p.send(&Frame::Data { peer: String::new(), payload: Bytes::from_static(b"boom") }).await;
    let off = s.wait(|k| matches!(k, EventKind::Offline { client, .. } if client == "panic-at-data")).await;
    let EventKind::Offline { reason, detail, .. } = off else { unreachable!() };
    assert_eq!(reason, CloseReason::Reset);
    assert!(detail.unwrap_or_default().contains("panicked"));
    assert_eq!(p.next_frame().await, None, "the connection is closed");
    assert!(s.handle.session("panic-at-data").is_none(), "no session is left behind");
    let (again, _) = RawPeer::hello(s.addr, "panic-at-data", 2).await;
    live.push(again);
    s.wait(|k| matches!(k, EventKind::Online { client, .. } if client == "panic-at-data")).await;
    assert!(
        !s.drain().iter().any(|k| matches!(k, EventKind::Takeover { .. })),
        "a fresh session, not a takeover of a ghost"
    );
    // Nothing left behind: three live clients, the panicked tasks' descriptors closed, four panics counted.
    drop(p);
    until_stats(&s, "settled", |st| st.handshakes == 0 && st.online == 3).await;
    assert_eq!(s.handle.metrics().task_panics, 4);
    // Each is in the disconnect history, as any close is.
    let history = s.handle.disconnects(Some(CloseReason::Reset), 10);
    assert_eq!(history.len(), 4, "{history:?}");
    assert!(history.iter().all(|r| r.detail.as_deref().is_some_and(|d| d.contains("panicked"))));
    assert_eq!(open_fds(), fds + 3 * 2, "each of the three live clients holds two descriptors (ours and the server's)");
}
