//! Presence snapshots and events, relay, server-application data, presence grace, and ghost-free closing, over
//! loopback with tokio's paused clock.

mod support;

use std::time::Duration;

use bytes::Bytes;
use socket2::SockRef;
use support::{next_event as next, next_presence, test_config, RawPeer, TestServer};
use tether::proto::{DetectorConfig, PhiConfig, PresenceState};
use tether::{Client, ClientConfig, ClientEvent, CloseReason, EventKind};

#[tokio::test(start_paused = true)]
async fn snapshot_then_online_then_offline_with_reason_and_last_seen() {
    let mut s = TestServer::start(test_config()).await;
    let _a = Client::connect(s.addr, ClientConfig::new("a")).await.unwrap();
    let mut w = Client::connect(s.addr, ClientConfig::new("watcher")).await.unwrap();
    w.subscribe(vec!["a".into(), "b".into()]).await.unwrap();
    let snap = [next_presence(&mut w).await, next_presence(&mut w).await];
    assert_eq!((snap[0].client_id.as_str(), snap[0].state), ("a", PresenceState::Online));
    assert_eq!((snap[1].client_id.as_str(), snap[1].state), ("b", PresenceState::Offline));
    // b arrives, then hangs (socket open, silent).
    let (_b, _) = RawPeer::hello(s.addr, "b", 9).await;
    let p = next_presence(&mut w).await;
    assert_eq!((p.client_id.as_str(), p.state), ("b", PresenceState::Online));
    let p = next_presence(&mut w).await;
    assert_eq!(
        (p.client_id.as_str(), p.state, p.reason),
        ("b", PresenceState::Offline, Some(CloseReason::HeartbeatTimeout))
    );
    assert_eq!(p.last_seen_ago_ms, 3000, "last seen when the HELLO arrived, 3 s before the verdict");
    s.wait(|k| matches!(k, EventKind::Offline { client, .. } if client == "b")).await;
}

#[tokio::test(start_paused = true)]
async fn wildcard_sees_everyone() {
    let s = TestServer::start(test_config()).await;
    let _a = Client::connect(s.addr, ClientConfig::new("a")).await.unwrap();
    let mut w = Client::connect(s.addr, ClientConfig::new("w")).await.unwrap();
    w.subscribe(vec!["*".into()]).await.unwrap();
    let mut snapshot = vec![next_presence(&mut w).await.client_id, next_presence(&mut w).await.client_id];
    snapshot.sort();
    assert_eq!(snapshot, ["a", "w"]);
    let mut c = Client::connect(s.addr, ClientConfig::new("c")).await.unwrap();
    let p = next_presence(&mut w).await;
    assert_eq!((p.client_id.as_str(), p.state), ("c", PresenceState::Online));
    c.close().await;
    let p = next_presence(&mut w).await;
    assert_eq!((p.client_id.as_str(), p.state, p.reason), ("c", PresenceState::Offline, Some(CloseReason::Bye)));
}

#[tokio::test(start_paused = true)]
async fn relay_to_online_and_offline_targets() {
    let s = TestServer::start(test_config()).await;
    let mut a = Client::connect(s.addr, ClientConfig::new("a")).await.unwrap();
    let mut b = Client::connect(s.addr, ClientConfig::new("b")).await.unwrap();
    for i in 0..100u32 {
        a.send(Some("b"), Bytes::from(i.to_be_bytes().to_vec())).await.unwrap();
    }
    for i in 0..100u32 {
        match next(&mut b).await {
            ClientEvent::Data { from, payload } => {
                assert_eq!(from.as_deref(), Some("a"));
                assert_eq!(&payload[..], &i.to_be_bytes(), "relayed in order");
            }
            other => panic!("{other:?}"),
        }
    }
    a.send(Some("nobody"), Bytes::from_static(b"hello?")).await.unwrap();
    assert_eq!(
        next(&mut a).await,
        ClientEvent::Undeliverable { to: "nobody".into(), why: tether::proto::Undeliverable::NotOnline }
    );
}

#[tokio::test(start_paused = true)]
async fn data_between_client_and_server_application() {
    let mut s = TestServer::start(test_config()).await;
    let mut a = Client::connect(s.addr, ClientConfig::new("a")).await.unwrap();
    a.send(None, Bytes::from_static(b"to the app")).await.unwrap();
    let k = s.wait(|k| matches!(k, EventKind::Data { .. })).await;
    assert!(matches!(k, EventKind::Data { client, payload, .. } if client == "a" && &payload[..] == b"to the app"));
    s.handle.send("a", Bytes::from_static(b"from the app")).unwrap();
    assert_eq!(next(&mut a).await, ClientEvent::Data { from: None, payload: Bytes::from_static(b"from the app") });
    assert!(matches!(s.handle.send("nobody", Bytes::new()), Err(tether::SendToError::Offline(_))));
}

#[tokio::test(start_paused = true)]
async fn presence_grace_hides_a_quick_reconnect() {
    let mut cfg = test_config();
    cfg.registry.presence_grace = Duration::from_secs(5);
    let s = TestServer::start(cfg).await;
    let mut w = Client::connect(s.addr, ClientConfig::new("w")).await.unwrap();
    let (p, _) = RawPeer::hello(s.addr, "d", 1).await;
    w.subscribe(vec!["d".into()]).await.unwrap();
    assert_eq!(next_presence(&mut w).await.state, PresenceState::Online);
    // The device drops (reset) and is back 2 s later: subscribers see nothing.
    SockRef::from(&p.stream).set_linger(Some(Duration::ZERO)).unwrap();
    drop(p);
    tokio::time::sleep(Duration::from_secs(2)).await; // virtual time: the device's own reboot delay
    let (p2, _) = RawPeer::hello(s.addr, "d", 2).await;
    // It drops again and stays away: offline exactly when the grace runs out.
    let t = tokio::time::Instant::now();
    SockRef::from(&p2.stream).set_linger(Some(Duration::ZERO)).unwrap();
    drop(p2);
    let p = next_presence(&mut w).await;
    assert_eq!((p.state, p.reason), (PresenceState::Offline, Some(CloseReason::Reset)), "no flap before: {p:?}");
    assert_eq!(t.elapsed(), Duration::from_secs(5));
}

#[tokio::test(start_paused = true)]
async fn phi_suspect_reaches_subscribers() {
    let mut cfg = test_config();
    cfg.conn.detector = DetectorConfig::Phi(PhiConfig::default());
    let s = TestServer::start(cfg).await;
    let mut w = Client::connect(s.addr, ClientConfig::new("w")).await.unwrap();
    w.subscribe(vec!["h".into()]).await.unwrap();
    assert_eq!(next_presence(&mut w).await.state, PresenceState::Offline);
    let (_h, _) = RawPeer::hello(s.addr, "h", 1).await; // then silent
    assert_eq!(next_presence(&mut w).await.state, PresenceState::Online);
    let p = next_presence(&mut w).await;
    assert_eq!(p.state, PresenceState::Suspect);
    let p = next_presence(&mut w).await;
    assert_eq!((p.state, p.reason), (PresenceState::Offline, Some(CloseReason::HeartbeatTimeout)));
}

#[tokio::test(start_paused = true)]
async fn half_closed_peers_leave_no_close_wait() {
    let mut s = TestServer::start(test_config()).await;
    let mut peers = Vec::new();
    for i in 0..50 {
        let (p, _) = RawPeer::hello(s.addr, &format!("p{i}"), 1).await;
        peers.push(p);
    }
    for p in &peers {
        SockRef::from(&p.stream).shutdown(std::net::Shutdown::Write).unwrap();
    }
    for _ in 0..50 {
        s.wait(|k| matches!(k, EventKind::Offline { reason: CloseReason::Eof, .. })).await;
    }
    let port = s.addr.port();
    let states = support::until_sockets(port, |st| st.iter().all(|s| *s != "CLOSE_WAIT" && *s != "ESTABLISHED")).await;
    assert_eq!(states.iter().filter(|s| **s == "CLOSE_WAIT").count(), 0, "{states:?}");
    drop(peers);
}
