//! The adaptive heartbeat over real loopback sockets, with tokio's paused clock: the client stretches its
//! heartbeat in the session, the server grants within its policy, and both sides' deadlines and the operator's
//! view follow. (What a NAT does to it is the fault lab's: `mobile_lab.rs`.)

mod support;

use std::time::Duration;

use support::{next_event, test_config, RawPeer, TestServer};
use tether::proto::frame::{HeartbeatRange, V2};
use tether::proto::{Frame, Hello};
use tether::{AdaptiveConfig, AdaptiveHeartbeat, Client, ClientConfig, ClientEvent, EventKind};

const S: fn(u64) -> Duration = Duration::from_secs;

fn adaptive(floor: u64, ceiling: u64) -> ClientConfig {
    let mut c = ClientConfig::new("phone");
    c.adaptive_heartbeat =
        Some(AdaptiveHeartbeat::new(AdaptiveConfig { floor: S(floor), ceiling: S(ceiling), margin: 0.1 }));
    c
}

#[tokio::test(start_paused = true)]
async fn a_path_that_keeps_everything_takes_the_heartbeat_to_the_ceiling_in_the_session() {
    let mut cfg = test_config();
    cfg.heartbeat.max_interval = S(6);
    let mut s = TestServer::start(cfg).await;
    let mut c = Client::connect(s.addr, adaptive(1, 30)).await.unwrap();
    // The floor is asked for in HELLO; the grant names the server's range.
    assert_eq!(c.welcome().heartbeat_ms, 1000);
    assert_eq!(HeartbeatRange::find(&c.welcome().extensions), Some(HeartbeatRange { min_ms: 100, max_ms: 6000 }));
    // Doubling after every PING that held, in the same connection, up to the server's maximum.
    let mut granted = Vec::new();
    while granted.last() != Some(&S(6)) {
        match next_event(&mut c).await {
            ClientEvent::Heartbeat { interval, timeout } => {
                assert_eq!(timeout, interval * 3, "the server keeps its ratio");
                granted.push(interval);
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(granted, [S(2), S(4), S(6)], "no more than the maximum the WELCOME announced");
    // The server said so, and its view of the session follows.
    let asked: Vec<(Duration, Duration)> = s
        .drain()
        .into_iter()
        .filter_map(|k| match k {
            EventKind::Heartbeat { asked, heartbeat, .. } => Some((asked, heartbeat)),
            _ => None,
        })
        .collect();
    assert_eq!(asked, [(S(2), S(2)), (S(4), S(4)), (S(6), S(6))]);
    let view = s.handle.sessions("phone", None, 1);
    assert_eq!((view[0].heartbeat, view[0].timeout), (S(6), S(18)));
    // Settled at the maximum: a minute more asks nothing.
    tokio::time::sleep(S(60)).await;
    assert!(!s.drain().iter().any(|k| matches!(k, EventKind::Heartbeat { .. })), "asked again after settling");
    assert!(c.close().await.is_some());
}

#[tokio::test(start_paused = true)]
async fn the_servers_deadline_follows_a_granted_heartbeat() {
    let mut s = TestServer::start(test_config()).await;
    let mut p = RawPeer::connect(s.addr).await;
    let hello = Hello { extensions: vec![HeartbeatRange::offer()], ..Hello::new(V2, "dev", 1) };
    p.send(&Frame::Hello(hello)).await;
    let Some(Frame::Welcome(w)) = p.next_frame().await else { panic!("no welcome") };
    assert!(HeartbeatRange::find(&w.extensions).is_some());
    p.send(&Frame::Heartbeat { interval_ms: 10_000, timeout_ms: 0 }).await;
    assert_eq!(p.next_frame().await, Some(Frame::Heartbeat { interval_ms: 10_000, timeout_ms: 30_000 }));
    // Silent from here: convicted at 30 s, not at the 3 s of the handshake.
    let t0 = tokio::time::Instant::now();
    let k = s.wait(|k| support::offline_reason(k, "dev").is_some()).await;
    let EventKind::Offline { silent_for, lateness, .. } = k else { unreachable!() };
    assert_eq!((silent_for, lateness), (S(30), Some(Duration::ZERO)));
    assert_eq!(t0.elapsed(), S(30));
}

#[tokio::test(start_paused = true)]
async fn a_server_with_a_fixed_heartbeat_does_not_grant_updates_and_the_client_keeps_what_it_learned() {
    let mut cfg = test_config();
    cfg.heartbeat.min_interval = S(1);
    cfg.heartbeat.max_interval = S(1);
    let s = TestServer::start(cfg).await;
    let a = adaptive(1, 30);
    let mut c = Client::connect(s.addr, a.clone()).await.unwrap();
    assert_eq!(HeartbeatRange::find(&c.welcome().extensions), None);
    // Its PINGs hold; nothing is asked in the session (the server would not have it).
    tokio::time::sleep(S(10)).await;
    assert!(c.close().await.is_some());
    let learner = a.adaptive_heartbeat.unwrap();
    assert!(learner.interval_for("127.0.0.1:1".parse().unwrap()) > S(1), "what held is learned all the same");
}
