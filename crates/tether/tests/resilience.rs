//! The reconnecting client over loopback with tokio's paused clock: outages, restarts, failover, and the
//! server's hints. Backoff delays are real sleeps on the virtual clock, so they are checked exactly.

mod support;

use std::time::Duration;

use bytes::Bytes;
use support::{test_config, TestServer};
use tether::proto::reconnect::{BackoffConfig, ReconnectConfig};
use tether::proto::{Frame, PresenceState};
use tether::{
    Client, ClientConfig, CloseReason, EventKind, LinkError, LinkEvent, ReconnectingClient, ResilienceConfig, Sent,
    ServerConfig,
};

fn res(queue_limit: usize) -> ResilienceConfig {
    ResilienceConfig {
        reconnect: ReconnectConfig {
            backoff: BackoffConfig {
                initial: Duration::from_millis(100),
                max: Duration::from_secs(2),
                multiplier: 2.0,
            },
            max_attempts: None,
            skip_failed_for: Duration::from_secs(30),
            return_to_primary: Some(Duration::from_secs(1)),
            reconnect_after_kick: false,
        },
        queue_limit,
        seed: Some(42),
    }
}

async fn next(c: &mut ReconnectingClient) -> LinkEvent {
    tokio::time::timeout(support::PATIENCE, c.next_event()).await.expect("no event").expect("stream ended")
}

async fn until(c: &mut ReconnectingClient, what: &str, pred: impl Fn(&LinkEvent) -> bool) -> LinkEvent {
    let mut seen = Vec::new();
    loop {
        let ev = tokio::time::timeout(support::PATIENCE, c.next_event())
            .await
            .unwrap_or_else(|_| panic!("no {what}; saw {seen:#?}"))
            .expect("stream ended");
        if pred(&ev) {
            return ev;
        }
        seen.push(ev);
    }
}

fn at(addr: std::net::SocketAddr) -> ServerConfig {
    ServerConfig { listen: addr, ..test_config() }
}

#[tokio::test(start_paused = true)]
async fn data_sent_during_an_outage_is_queued_then_delivered_in_order() {
    let s = TestServer::start(test_config()).await;
    let addr = s.addr;
    let mut rc = ReconnectingClient::start(vec![addr.to_string()], ClientConfig::new("dev"), res(3));
    until(&mut rc, "connected", |e| matches!(e, LinkEvent::Connected { .. })).await;
    s.crash().await;
    let d = until(&mut rc, "disconnected", |e| matches!(e, LinkEvent::Disconnected { .. })).await;
    let LinkEvent::Disconnected { disconnect, .. } = d else { unreachable!() };
    assert!(matches!(disconnect.reason, CloseReason::Eof | CloseReason::Reset), "{disconnect:?}");
    for i in 0..3 {
        assert_eq!(rc.send(None, Bytes::from(format!("m{i}"))).await, Ok(Sent::Queued));
    }
    assert_eq!(rc.send(None, Bytes::from_static(b"m3")).await, Err(LinkError::QueueFull(3)), "refused, not dropped");
    let mut s2 = TestServer::start(at(addr)).await;
    until(&mut rc, "reconnected", |e| matches!(e, LinkEvent::Connected { .. })).await;
    for i in 0..3 {
        let k = s2.wait(|k| matches!(k, EventKind::Data { .. })).await;
        let EventKind::Data { client, payload, .. } = k else { unreachable!() };
        assert_eq!((client.as_str(), &payload[..]), ("dev", format!("m{i}").as_bytes()));
    }
    assert_eq!(rc.send(None, Bytes::from_static(b"live")).await, Ok(Sent::Now));
}

#[tokio::test(start_paused = true)]
async fn identity_and_subscriptions_survive_a_restart() {
    let s = TestServer::start(test_config()).await;
    let addr = s.addr;
    let mut rc = ReconnectingClient::start(vec![addr.to_string()], ClientConfig::new("watcher"), res(10));
    until(&mut rc, "connected", |e| matches!(e, LinkEvent::Connected { .. })).await;
    rc.subscribe(vec!["x".into()]).await.unwrap();
    until(&mut rc, "snapshot", |e| matches!(e, LinkEvent::Presence(p) if p.client_id == "x")).await;
    s.crash().await;
    let mut s2 = TestServer::start(at(addr)).await;
    let LinkEvent::Connected { epoch, .. } =
        until(&mut rc, "reconnected", |e| matches!(e, LinkEvent::Connected { .. })).await
    else {
        unreachable!()
    };
    assert!(epoch >= 1);
    // The subscription was re-sent: x coming online on the new server reaches the watcher.
    until(&mut rc, "snapshot again", |e| matches!(e, LinkEvent::Presence(p) if p.client_id == "x")).await;
    let _x = Client::connect(addr, ClientConfig::new("x")).await.unwrap();
    let p = until(&mut rc, "x online", |e| matches!(e, LinkEvent::Presence(p) if p.client_id == "x")).await;
    assert!(matches!(p, LinkEvent::Presence(p) if p.state == PresenceState::Online));
    // And the same nonce was used: the server saw one instance of "watcher" (a takeover would say same_device).
    let k = s2.wait(|k| matches!(k, EventKind::Online { client, .. } if client == "watcher")).await;
    assert!(matches!(k, EventKind::Online { .. }));
}

#[tokio::test(start_paused = true)]
async fn fails_over_to_the_backup_and_returns_to_the_primary() {
    let primary = TestServer::start(test_config()).await;
    let p_addr = primary.addr;
    let backup = TestServer::start(test_config()).await;
    let servers = vec![p_addr.to_string(), backup.addr.to_string()];
    let mut rc = ReconnectingClient::start(servers, ClientConfig::new("dev"), res(10));
    let c = until(&mut rc, "connected", |e| matches!(e, LinkEvent::Connected { .. })).await;
    assert!(matches!(c, LinkEvent::Connected { primary: true, .. }));
    primary.crash().await;
    until(&mut rc, "lost primary", |e| matches!(e, LinkEvent::Disconnected { .. })).await;
    let r = until(&mut rc, "reconnecting", |e| matches!(e, LinkEvent::Reconnecting { .. })).await;
    let LinkEvent::Reconnecting { server, delay, attempt } = r else { unreachable!() };
    assert_eq!((server, attempt), (backup.addr.to_string(), 1), "the failed primary is skipped");
    assert!(delay <= Duration::from_millis(100));
    let c = until(&mut rc, "on backup", |e| matches!(e, LinkEvent::Connected { .. })).await;
    assert!(matches!(c, LinkEvent::Connected { primary: false, .. }));
    // The primary comes back; within one probe interval the client is home again, and leaves the backup politely.
    let _primary2 = TestServer::start(at(p_addr)).await;
    let c = until(&mut rc, "back on primary", |e| matches!(e, LinkEvent::Connected { .. })).await;
    assert!(matches!(c, LinkEvent::Connected { primary: true, .. }), "{c:?}");
    let mut backup = backup;
    let k = backup.wait(|k| matches!(k, EventKind::Offline { .. })).await;
    assert!(matches!(k, EventKind::Offline { reason: CloseReason::Bye, .. }), "{k:?}");
}

#[tokio::test(start_paused = true)]
async fn kicked_gives_up_unless_configured() {
    let s = TestServer::start(test_config()).await;
    let mut rc = ReconnectingClient::start(vec![s.addr.to_string()], ClientConfig::new("k"), res(10));
    until(&mut rc, "connected", |e| matches!(e, LinkEvent::Connected { .. })).await;
    assert!(s.handle.kick("k"));
    let g = until(&mut rc, "gave up", |e| matches!(e, LinkEvent::GaveUp { .. })).await;
    assert_eq!(g, LinkEvent::GaveUp { attempts: 0, reason: CloseReason::Kicked });
    // The last event: the stream ends (nothing more will come), and sends are refused.
    assert_eq!(tokio::time::timeout(support::PATIENCE, rc.next_event()).await.expect("the stream ends"), None);
    assert_eq!(rc.send(None, Bytes::new()).await, Err(LinkError::Stopped));

    let mut r = res(10);
    r.reconnect.reconnect_after_kick = true;
    let mut rc = ReconnectingClient::start(vec![s.addr.to_string()], ClientConfig::new("k2"), r);
    until(&mut rc, "connected", |e| matches!(e, LinkEvent::Connected { .. })).await;
    assert!(s.handle.kick("k2"));
    until(&mut rc, "connected again", |e| matches!(e, LinkEvent::Connected { .. })).await;
}

#[tokio::test(start_paused = true)]
async fn busy_and_id_conflict_retry_after_are_honoured() {
    let mut cfg = test_config();
    cfg.max_connections = 1;
    cfg.busy_retry_after = Duration::from_millis(1500);
    cfg.busy_retry_spread = Duration::ZERO;
    let s = TestServer::start(cfg).await;
    let mut holder = Client::connect(s.addr, ClientConfig::new("holder")).await.unwrap();
    let mut rc = ReconnectingClient::start(vec![s.addr.to_string()], ClientConfig::new("b"), res(10));
    let f = until(&mut rc, "refused", |e| matches!(e, LinkEvent::ConnectFailed { .. })).await;
    assert!(matches!(f, LinkEvent::ConnectFailed { refused: Some(ref d), .. } if d.reason == CloseReason::Busy));
    let r = next(&mut rc).await;
    assert!(matches!(r, LinkEvent::Reconnecting { delay, .. } if delay == Duration::from_millis(1500)), "{r:?}");
    holder.close().await;
    until(&mut rc, "connected", |e| matches!(e, LinkEvent::Connected { .. })).await;
    rc.close().await;

    // id_conflict: a device displaced by another nonce comes back while the other is alive.
    let s = TestServer::start(test_config()).await;
    let mut a = Client::connect(s.addr, ClientConfig { nonce: Some(1), ..ClientConfig::new("x") }).await.unwrap();
    let _b = Client::connect(s.addr, ClientConfig { nonce: Some(2), ..ClientConfig::new("x") }).await.unwrap();
    a.close().await;
    let cfg = ClientConfig { nonce: Some(1), ..ClientConfig::new("x") };
    let mut rc = ReconnectingClient::start(vec![s.addr.to_string()], cfg, res(10));
    let f = until(&mut rc, "conflict", |e| matches!(e, LinkEvent::ConnectFailed { .. })).await;
    assert!(matches!(f, LinkEvent::ConnectFailed { refused: Some(ref d), .. } if d.reason == CloseReason::IdConflict));
    let r = next(&mut rc).await;
    assert!(matches!(r, LinkEvent::Reconnecting { delay, .. } if delay == Duration::from_secs(30)), "{r:?}");
}

#[tokio::test(start_paused = true)]
async fn a_draining_server_sends_clients_to_its_alternative() {
    let b = TestServer::start(test_config()).await;
    let mut cfg = test_config();
    cfg.shutdown_redirect = Some(b.addr.to_string());
    cfg.shutdown_spread = Duration::from_secs(2);
    let a = TestServer::start(cfg).await;
    // The client only knows A.
    let mut rc = ReconnectingClient::start(vec![a.addr.to_string()], ClientConfig::new("dev"), res(10));
    until(&mut rc, "connected to A", |e| matches!(e, LinkEvent::Connected { .. })).await;
    a.shutdown().await;
    let d = until(&mut rc, "drained", |e| matches!(e, LinkEvent::Disconnected { .. })).await;
    let LinkEvent::Disconnected { disconnect, .. } = d else { unreachable!() };
    assert_eq!(disconnect.reason, CloseReason::ServerShutdown);
    assert_eq!(disconnect.alternative.as_deref(), Some(b.addr.to_string().as_str()));
    let r = next(&mut rc).await;
    let LinkEvent::Reconnecting { server, delay, .. } = r else { panic!("{r:?}") };
    assert_eq!(server, b.addr.to_string(), "the BYE's alternative is followed");
    assert_eq!(Some(delay), disconnect.retry_after, "after the server's spread retry-after");
    let c = until(&mut rc, "connected to B", |e| matches!(e, LinkEvent::Connected { .. })).await;
    assert!(matches!(c, LinkEvent::Connected { ref server, primary: false, .. } if *server == b.addr.to_string()));
}

/// A server that welcomes and then never answers, while its kernel acknowledges every PING (a stopped or hung
/// server): the client's verdict says the path was not silent, so a welcome at once afterwards is not called a
/// forgotten connection. (A path that goes silent needs a real one: the fault lab's NAT proves that side.)
#[tokio::test(start_paused = true)]
async fn a_stalled_server_welcoming_again_is_not_a_path_that_forgot() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let fake = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let mut p = support::RawPeer::from_stream(l.accept().await.unwrap().0);
            let Some(Frame::Hello(_)) = p.next_frame().await else { panic!("no HELLO") };
            p.send(&Frame::Welcome(support::v1_welcome("fake"))).await;
            held.push(p);
        }
    });
    let mut rc = ReconnectingClient::start(vec![addr.to_string()], ClientConfig::new("phone"), res(10));
    until(&mut rc, "connected", |e| matches!(e, LinkEvent::Connected { .. })).await;
    let LinkEvent::Disconnected { disconnect, .. } =
        until(&mut rc, "the verdict", |e| matches!(e, LinkEvent::Disconnected { .. })).await
    else {
        unreachable!()
    };
    assert_eq!(disconnect.reason, CloseReason::HeartbeatTimeout);
    assert_eq!(disconnect.path_silent, Some(false), "the server's kernel acknowledged the PINGs");
    until(&mut rc, "connected again", |e| matches!(e, LinkEvent::Connected { .. })).await;
    match next(&mut rc).await {
        LinkEvent::Disconnected { disconnect, .. } => assert_eq!(disconnect.reason, CloseReason::HeartbeatTimeout),
        other => panic!("a stalled server is not a forgotten path: {other:?}"),
    }
    fake.abort();
}
