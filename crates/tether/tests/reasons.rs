//! One loopback test per close reason that loopback can produce, over real sockets, with tokio's paused clock
//! driving both the server and the core (timers fire exactly; lateness is measured in virtual time).

mod support;

use std::time::Duration;

use bytes::Bytes;
use socket2::SockRef;
use support::{hello_frame, next_disconnect, offline_reason, test_config, RawPeer, TestServer};
use tether::proto::{Frame, PresenceState};
use tether::{Client, ClientConfig, ClientEvent, CloseReason, ConnectError, Diagnosis, EventKind};

fn client_cfg(id: &str) -> ClientConfig {
    let mut c = ClientConfig::new(id);
    c.heartbeat_interval = Some(Duration::from_secs(1));
    c
}

#[tokio::test(start_paused = true)]
async fn bye_is_a_clean_goodbye() {
    let mut s = TestServer::start(test_config()).await;
    let mut c = Client::connect(s.addr, client_cfg("a")).await.unwrap();
    s.wait(|k| matches!(k, EventKind::Online { client, .. } if client == "a")).await;
    support::close_cleanly(&mut s, &mut c, "a").await;
}

#[tokio::test(start_paused = true)]
async fn eof_without_bye_and_no_close_wait_left() {
    let mut s = TestServer::start(test_config()).await;
    let (p, _) = RawPeer::hello(s.addr, "a", 1).await;
    // Half-close: FIN without BYE, socket kept open (as a killed process's kernel would send FIN).
    SockRef::from(&p.stream).shutdown(std::net::Shutdown::Write).unwrap();
    let k = s.wait(|k| offline_reason(k, "a").is_some()).await;
    assert_eq!(offline_reason(&k, "a"), Some(CloseReason::Eof));
    let states = support::until_sockets(s.addr.port(), |st| !st.contains(&"CLOSE_WAIT")).await;
    assert!(!states.contains(&"CLOSE_WAIT"), "{states:?}");
    drop(p);
}

#[tokio::test(start_paused = true)]
async fn reset_on_zero_linger_close() {
    let mut s = TestServer::start(test_config()).await;
    let (p, _) = RawPeer::hello(s.addr, "a", 1).await;
    SockRef::from(&p.stream).set_linger(Some(Duration::ZERO)).unwrap();
    drop(p); // RST
    let k = s.wait(|k| offline_reason(k, "a").is_some()).await;
    assert_eq!(offline_reason(&k, "a"), Some(CloseReason::Reset));
}

#[tokio::test(start_paused = true)]
async fn heartbeat_timeout_for_a_silent_but_open_socket() {
    let mut s = TestServer::start(test_config()).await;
    // The hung-process case: the socket stays open (its kernel would ACK), nothing is sent.
    let (mut p, w) = RawPeer::hello(s.addr, "a", 1).await;
    assert_eq!((w.heartbeat_ms, w.timeout_ms), (1000, 3000));
    let t0 = tokio::time::Instant::now();
    let k = s.wait(|k| offline_reason(k, "a").is_some()).await;
    let EventKind::Offline { reason, lateness, silent_for, .. } = k else { unreachable!() };
    assert_eq!(reason, CloseReason::HeartbeatTimeout);
    assert_eq!(lateness, Some(Duration::ZERO), "one exact deadline: the verdict is on time");
    assert_eq!(silent_for, Duration::from_secs(3));
    assert_eq!(t0.elapsed(), Duration::from_secs(3));
    // The server pinged the silent peer (after 1.5 intervals of its own silence), then said why it closed.
    let (pings, bye) = p.pings_then_bye().await;
    assert!(pings >= 1, "server pinged {pings} times");
    assert_eq!(bye.reason, CloseReason::HeartbeatTimeout);
}

#[tokio::test(start_paused = true)]
async fn client_detects_a_silent_server() {
    // A "server" that welcomes and then never says anything again.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let fake = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut p = RawPeerServer(stream);
        p.welcome().await;
        // Hold the socket open, silent.
        tokio::time::sleep(Duration::from_secs(3600)).await;
        drop(p);
    });
    let mut c = Client::connect(addr, client_cfg("a")).await.unwrap();
    let d = next_disconnect(&mut c).await;
    assert_eq!(d.reason, CloseReason::HeartbeatTimeout);
    assert_eq!(d.lateness, Some(Duration::ZERO));
    fake.abort();
}

struct RawPeerServer(tokio::net::TcpStream);
impl RawPeerServer {
    async fn welcome(&mut self) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = [0u8; 256];
        let _ = self.0.read(&mut buf).await.unwrap(); // the HELLO
        self.0.write_all(&Frame::Welcome(support::v1_welcome("fake")).to_bytes()).await.unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn takeover_evicts_the_old_connection_and_subscribers_see_no_flap() {
    let mut s = TestServer::start(test_config()).await;
    let mut watcher = Client::connect(s.addr, client_cfg("w")).await.unwrap();
    watcher.subscribe(vec!["x".into()]).await.unwrap();
    let mut old = Client::connect(s.addr, ClientConfig { nonce: Some(42), ..client_cfg("x") }).await.unwrap();
    let old_epoch = old.welcome().epoch;
    let new = Client::connect(s.addr, ClientConfig { nonce: Some(42), ..client_cfg("x") }).await.unwrap();
    assert!(new.welcome().epoch > old_epoch);
    let d = next_disconnect(&mut old).await;
    assert_eq!(d.reason, CloseReason::Takeover, "old connection got BYE(takeover)");
    let k = s.wait(|k| matches!(k, EventKind::Takeover { .. })).await;
    assert!(matches!(k, EventKind::Takeover { same_device: true, .. }));
    let k = s.wait(|k| matches!(k, EventKind::Closed { .. } | EventKind::Offline { .. })).await;
    assert!(matches!(k, EventKind::Closed { reason: CloseReason::Takeover, .. }), "{k:?}");
    // The watcher saw x offline (snapshot) then online, and nothing else: send it a marker to prove the order.
    new.send(Some("w"), Bytes::from_static(b"marker")).await.unwrap();
    let mut presence = vec![];
    loop {
        match watcher.next_event().await.unwrap() {
            ClientEvent::Presence(p) => presence.push(p.state),
            ClientEvent::Data { from, payload } => {
                assert_eq!((from.as_deref(), &payload[..]), (Some("x"), &b"marker"[..]));
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(presence, [PresenceState::Offline, PresenceState::Online], "no offline/online flap on takeover");
}

#[tokio::test(start_paused = true)]
async fn two_live_devices_on_one_id_get_id_conflict() {
    let mut s = TestServer::start(test_config()).await;
    let mut a = Client::connect(s.addr, ClientConfig { nonce: Some(1), ..client_cfg("x") }).await.unwrap();
    // Device B (another nonce) takes the id over once: it might be A rebooted.
    let _b = Client::connect(s.addr, ClientConfig { nonce: Some(2), ..client_cfg("x") }).await.unwrap();
    assert_eq!(next_disconnect(&mut a).await.reason, CloseReason::Takeover);
    // A comes straight back while B is alive: conflict, A is told to back off.
    let err = Client::connect(s.addr, ClientConfig { nonce: Some(1), ..client_cfg("x") }).await.err().unwrap();
    let ConnectError::Refused(d) = err else { panic!("{err:?}") };
    assert_eq!(d.reason, CloseReason::IdConflict);
    assert_eq!(d.retry_after, Some(Duration::from_secs(30)));
    let k = s.wait(|k| matches!(k, EventKind::IdConflict { .. })).await;
    assert!(matches!(k, EventKind::IdConflict { client, .. } if client == "x"));
    assert_eq!(s.handle.stats().online, 1);
}

#[tokio::test(start_paused = true)]
async fn silent_handshake_times_out() {
    let mut cfg = test_config();
    cfg.conn.handshake_timeout = Duration::from_secs(2);
    let mut s = TestServer::start(cfg).await;
    let mut p = RawPeer::connect(s.addr).await;
    p.send_raw(&[0, 0]).await; // half a header, then nothing (slowloris)
    let k = s.wait(|k| matches!(k, EventKind::Closed { .. })).await;
    let EventKind::Closed { reason, lateness, client, .. } = k else { unreachable!() };
    assert_eq!((reason, lateness, client), (CloseReason::HandshakeTimeout, Some(Duration::ZERO), None));
    assert_eq!(p.expect_bye().await.reason, CloseReason::HandshakeTimeout);
}

#[tokio::test(start_paused = true)]
async fn a_trickled_hello_ends_at_the_handshake_deadline_and_spares_a_good_client() {
    let mut s = TestServer::start(test_config()).await;
    let mut good = Client::connect(s.addr, client_cfg("good")).await.unwrap();
    let hello = hello_frame(1, "a-slowloris-whose-hello-never-completes", 1).to_bytes();
    // Ten slowloris peers, one byte each every 200 ms: 25 bytes by the 5 s deadline, never a whole HELLO.
    let mut peers = Vec::new();
    for _ in 0..10 {
        peers.push(RawPeer::connect(s.addr).await);
    }
    let t0 = tokio::time::Instant::now();
    let mut sent = 0;
    let mut closed = 0;
    while closed < peers.len() {
        tokio::select! {
            k = s.events.recv() => match k.expect("server events").kind {
                EventKind::Closed { reason, lateness, .. } => {
                    assert_eq!((reason, lateness), (CloseReason::HandshakeTimeout, Some(Duration::ZERO)));
                    assert_eq!(t0.elapsed(), Duration::from_secs(5));
                    closed += 1;
                }
                EventKind::Offline { client, reason, .. } => panic!("{client} went offline: {reason}"),
                _ => {}
            },
            _ = tokio::time::sleep(Duration::from_millis(200)), if sent < 25 => {
                for p in &mut peers {
                    p.send_raw(&hello[sent..sent + 1]).await;
                }
                sent += 1;
            }
        }
    }
    assert!(sent < hello.len());
    for p in &mut peers {
        assert_eq!(p.expect_bye().await.reason, CloseReason::HandshakeTimeout);
    }
    good.send(Some("good"), Bytes::from_static(b"unaffected")).await.unwrap();
    assert_eq!(&support::next_data(&mut good).await[..], b"unaffected");
}

#[tokio::test(start_paused = true)]
async fn protocol_errors_close_only_the_offender() {
    let mut s = TestServer::start(test_config()).await;
    let mut good = Client::connect(s.addr, client_cfg("good")).await.unwrap();
    // Garbage: an unknown kind.
    let mut p = RawPeer::connect(s.addr).await;
    p.send_raw(&[0, 0, 0, 3, 0x7f, 1, 2]).await;
    assert_eq!(p.expect_bye().await.reason, CloseReason::ProtocolError);
    // A 4 GiB length prefix: refused from the header, nothing allocated for it.
    let mut p = RawPeer::connect(s.addr).await;
    p.send_raw(&[0xff, 0xff, 0xff, 0xff]).await;
    assert_eq!(p.expect_bye().await.reason, CloseReason::ProtocolError);
    // A frame before HELLO, and a second HELLO.
    let mut p = RawPeer::connect(s.addr).await;
    p.send(&Frame::Ping { seq: 1, ts_ms: 0 }).await;
    assert_eq!(p.expect_bye().await.reason, CloseReason::ProtocolError);
    let (mut p, _) = RawPeer::hello(s.addr, "twice", 1).await;
    p.send(&hello_frame(1, "twice", 1)).await;
    assert_eq!(p.expect_bye().await.reason, CloseReason::ProtocolError);
    let k = s.wait(|k| offline_reason(k, "twice").is_some()).await;
    assert_eq!(offline_reason(&k, "twice"), Some(CloseReason::ProtocolError));
    // The good client never noticed: it still round-trips data to itself through the relay.
    good.send(Some("good"), Bytes::from_static(b"still here")).await.unwrap();
    assert_eq!(&support::next_data(&mut good).await[..], b"still here");
    let closed: Vec<_> = s.drain().into_iter().filter(|k| offline_reason(k, "good").is_some()).collect();
    assert!(closed.is_empty());
}

#[tokio::test(start_paused = true)]
async fn busy_refuses_newcomers_and_spares_existing_clients() {
    let mut cfg = test_config();
    cfg.max_connections = 2;
    cfg.busy_retry_after = Duration::from_secs(7);
    cfg.busy_retry_spread = Duration::ZERO;
    let mut s = TestServer::start(cfg).await;
    let mut a = Client::connect(s.addr, client_cfg("a")).await.unwrap();
    let _b = Client::connect(s.addr, client_cfg("b")).await.unwrap();
    let err = Client::connect(s.addr, client_cfg("c")).await.err().unwrap();
    let ConnectError::Refused(d) = err else { panic!("{err:?}") };
    assert_eq!((d.reason, d.retry_after), (CloseReason::Busy, Some(Duration::from_secs(7))));
    let k = s.wait(|k| matches!(k, EventKind::Closed { .. })).await;
    assert!(matches!(k, EventKind::Closed { reason: CloseReason::Busy, .. }));
    // Existing clients are unaffected.
    a.send(Some("a"), Bytes::from_static(b"ok")).await.unwrap();
    assert_eq!(&support::next_data(&mut a).await[..], b"ok");
    assert_eq!(s.handle.stats().online, 2);
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_stops_reading_is_a_slow_consumer() {
    let mut cfg = test_config();
    cfg.conn.max_outbound_bytes = 256 * 1024;
    cfg.outbound_queue = 64;
    let mut s = TestServer::start(cfg).await;
    // The raw peer answers nothing and reads nothing; its receive buffer fills, then the server's send buffer.
    let (p, _) = RawPeer::hello(s.addr, "sink", 1).await;
    SockRef::from(&p.stream).set_recv_buffer_size(4096).unwrap();
    let refused = support::send_until_refused(&s.handle, "sink", Bytes::from(vec![7u8; 16 * 1024]), 20_000).await;
    assert!(refused, "the server kept queueing for a peer that does not read");
    let k = s.wait(|k| offline_reason(k, "sink").is_some()).await;
    assert_eq!(offline_reason(&k, "sink"), Some(CloseReason::SlowConsumer));
}

#[tokio::test(start_paused = true)]
async fn kicked_client_is_told_why() {
    let mut s = TestServer::start(test_config()).await;
    let mut c = Client::connect(s.addr, client_cfg("a")).await.unwrap();
    s.wait(|k| matches!(k, EventKind::Online { .. })).await;
    assert!(s.handle.kick("a"));
    assert!(!s.handle.kick("nobody"));
    assert_eq!(next_disconnect(&mut c).await.reason, CloseReason::Kicked);
    let k = s.wait(|k| offline_reason(k, "a").is_some()).await;
    assert_eq!(offline_reason(&k, "a"), Some(CloseReason::Kicked));
}

#[tokio::test(start_paused = true)]
async fn shutdown_says_goodbye_with_spread_retry_hints() {
    let mut cfg = test_config();
    cfg.shutdown_spread = Duration::from_secs(10);
    let s = TestServer::start(cfg).await;
    let mut clients = Vec::new();
    for i in 0..5 {
        clients.push(Client::connect(s.addr, client_cfg(&format!("c{i}"))).await.unwrap());
    }
    let events = s.shutdown().await;
    let mut hints = Vec::new();
    for c in &mut clients {
        let d = next_disconnect(c).await;
        assert_eq!(d.reason, CloseReason::ServerShutdown);
        hints.push(d.retry_after.expect("retry-after hint"));
    }
    hints.sort();
    hints.dedup();
    assert_eq!(hints.len(), 5, "hints are spread, not one wave: {hints:?}");
    assert!(hints.iter().all(|h| *h <= Duration::from_secs(10)));
    let offline = events.iter().filter(|k| matches!(k, EventKind::Offline { reason: CloseReason::ServerShutdown, .. }));
    assert_eq!(offline.count(), 5);
}

#[tokio::test(start_paused = true)]
async fn write_that_cannot_drain_is_a_write_timeout() {
    let mut s = TestServer::start(support::write_stall_config()).await;
    let (p, _) = RawPeer::hello(s.addr, "stuck", 1).await;
    SockRef::from(&p.stream).set_recv_buffer_size(4096).unwrap();
    // Fill the kernel buffers once; then nothing drains (zero window) and the write deadline expires.
    support::send_until_refused(&s.handle, "stuck", Bytes::from(vec![1u8; 32 * 1024]), 400).await;
    let k = s.wait(|k| offline_reason(k, "stuck").is_some()).await;
    let EventKind::Offline { reason, lateness, .. } = k else { unreachable!() };
    assert_eq!(reason, CloseReason::WriteTimeout);
    assert_eq!(lateness, Some(Duration::ZERO));
}

#[tokio::test(start_paused = true)]
async fn handshakes_in_flight_are_capped() {
    let mut cfg = test_config();
    cfg.max_handshakes = 2;
    let mut s = TestServer::start(cfg).await;
    let mut good = Client::connect(s.addr, client_cfg("good")).await.unwrap();
    // Two connections that have not said HELLO yet fill the cap.
    let mut slow1 = RawPeer::connect(s.addr).await;
    let _slow2 = RawPeer::connect(s.addr).await;
    let err = Client::connect(s.addr, client_cfg("c")).await.err().unwrap();
    assert!(matches!(err, ConnectError::Refused(ref d) if d.reason == CloseReason::Busy), "{err:?}");
    assert_eq!(
        (s.handle.stats().handshakes, s.handle.stats().peak_handshakes, s.handle.stats().refused_busy),
        (2, 2, 1)
    );
    // One finishes its handshake: room again.
    slow1.send(&hello_frame(1, "slow1", 1)).await;
    assert!(matches!(slow1.next_frame().await, Some(Frame::Welcome(_))));
    let _c = Client::connect(s.addr, client_cfg("c")).await.unwrap();
    assert_eq!(s.handle.stats().peak_handshakes, 2, "never above the cap");
    s.wait(|k| matches!(k, EventKind::Online { client, .. } if client == "c")).await;
    // The established client never noticed.
    good.send(Some("good"), Bytes::from_static(b"unaffected")).await.unwrap();
    assert_eq!(&support::next_data(&mut good).await[..], b"unaffected");
    assert!(s.drain().iter().all(|k| offline_reason(k, "good").is_none()));
}

#[tokio::test(start_paused = true)]
async fn accept_rate_is_limited_and_busy_hints_are_spread() {
    let mut cfg = test_config();
    cfg.accept_rate = Some(5);
    cfg.busy_retry_after = Duration::from_secs(1);
    cfg.busy_retry_spread = Duration::from_secs(10);
    let s = TestServer::start(cfg).await;
    let mut ok = Vec::new();
    for i in 0..5 {
        ok.push(Client::connect(s.addr, client_cfg(&format!("ok{i}"))).await.unwrap());
    }
    let mut hints = Vec::new();
    for i in 0..20 {
        match Client::connect(s.addr, client_cfg(&format!("late{i}"))).await {
            Err(ConnectError::Refused(d)) if d.reason == CloseReason::Busy => hints.push(d.retry_after.unwrap()),
            other => panic!("expected busy: {:?}", other.map(|_| ())),
        }
    }
    assert!(hints.iter().all(|h| *h >= Duration::from_secs(1) && *h <= Duration::from_secs(11)), "{hints:?}");
    hints.sort();
    hints.dedup();
    assert!(hints.len() >= 18, "hints should be spread, not one value: {hints:?}");
    // One second later the bucket has refilled.
    tokio::time::sleep(Duration::from_secs(1)).await;
    Client::connect(s.addr, client_cfg("next")).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_ping_flood_is_cut_off_while_a_good_client_is_unaffected() {
    let mut s = TestServer::start(test_config()).await;
    let mut good = Client::connect(s.addr, client_cfg("good")).await.unwrap();
    let (mut flood, _) = RawPeer::hello(s.addr, "flooder", 1).await;
    for seq in 0..20 {
        use tokio::io::AsyncWriteExt;
        if flood.stream.write_all(&Frame::Ping { seq, ts_ms: 0 }.to_bytes()).await.is_err() {
            break; // cut off
        }
        tokio::time::sleep(Duration::from_millis(5)).await; // virtual time: 200 pings a second
    }
    let k = s.wait(|k| offline_reason(k, "flooder").is_some()).await;
    assert_eq!(offline_reason(&k, "flooder"), Some(CloseReason::PingFlood));
    let bye = loop {
        match flood.next_frame().await {
            Some(Frame::Bye(b)) => break b,
            Some(_) => continue, // the PONGs it got before the strikes ran out
            None => panic!("no BYE before the close"),
        }
    };
    assert_eq!(bye.reason, CloseReason::PingFlood);
    // The good client kept its session and still round-trips data, with no verdict against it.
    good.send(Some("good"), Bytes::from_static(b"fine")).await.unwrap();
    assert_eq!(&support::next_data(&mut good).await[..], b"fine");
    assert!(!s.drain().iter().any(|k| offline_reason(k, "good").is_some()));
}

#[tokio::test(start_paused = true)]
async fn one_source_address_is_capped_and_others_are_not() {
    let mut cfg = test_config();
    cfg.max_per_ip = Some(2);
    let mut s = TestServer::start(cfg).await;
    let mut a = Client::connect(s.addr, client_cfg("a")).await.unwrap();
    let _b = Client::connect(s.addr, client_cfg("b")).await.unwrap();
    let err = Client::connect(s.addr, client_cfg("c")).await.err().unwrap();
    let ConnectError::Refused(d) = err else { panic!("{err:?}") };
    assert_eq!(d.reason, CloseReason::IpLimit);
    assert!(d.retry_after.is_some());
    let k = s.wait(|k| matches!(k, EventKind::Closed { reason: CloseReason::IpLimit, .. })).await;
    assert!(matches!(k, EventKind::Closed { client: None, .. }));
    // Another source address is not affected.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut other = RawPeer::from_stream(sock.connect(s.addr).await.unwrap());
    other.send(&hello_frame(1, "elsewhere", 9)).await;
    assert!(matches!(other.next_frame().await, Some(Frame::Welcome(_))));
    // A freed slot is usable again, and the capped clients were never disturbed.
    a.close().await;
    s.wait(|k| matches!(k, EventKind::Offline { client, .. } if client == "a")).await;
    Client::connect(s.addr, client_cfg("c")).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_data_flood_is_rate_limited_while_a_good_client_is_unaffected() {
    let mut cfg = test_config();
    cfg.conn.max_data_rate = Some(4096);
    cfg.conn.max_frame = 4096;
    let mut s = TestServer::start(cfg).await;
    let mut good = Client::connect(s.addr, client_cfg("good")).await.unwrap();
    let (mut flood, _) = RawPeer::hello(s.addr, "flooder", 1).await;
    let chunk = Frame::Data { peer: String::new(), payload: Bytes::from(vec![b'x'; 1000]) }.to_bytes();
    for _ in 0..100 {
        use tokio::io::AsyncWriteExt;
        if flood.stream.write_all(&chunk).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await; // virtual time: 100 KB/s against 4 KB/s
                                                             // The good client sends well within the limit meanwhile.
        good.send(None, Bytes::from_static(b"ok")).await.unwrap();
    }
    let k = s.wait(|k| offline_reason(k, "flooder").is_some()).await;
    assert_eq!(offline_reason(&k, "flooder"), Some(CloseReason::RateLimited));
    let bye = loop {
        match flood.next_frame().await {
            Some(Frame::Bye(b)) => break b,
            Some(_) => continue,
            None => panic!("no BYE before the close"),
        }
    };
    assert_eq!(bye.reason, CloseReason::RateLimited);
    good.send(Some("good"), Bytes::from_static(b"still fine")).await.unwrap();
    assert_eq!(&support::next_data(&mut good).await[..], b"still fine");
    assert!(!s.drain().iter().any(|k| offline_reason(k, "good").is_some()));
}

#[tokio::test(start_paused = true)]
async fn too_many_subscriptions_are_refused_while_a_good_client_is_unaffected() {
    let mut cfg = test_config();
    cfg.registry.max_subscriptions = 3;
    let mut s = TestServer::start(cfg).await;
    let mut good = Client::connect(s.addr, client_cfg("good")).await.unwrap();
    good.subscribe(vec!["a".into(), "b".into()]).await.unwrap();
    let mut greedy = Client::connect(s.addr, client_cfg("greedy")).await.unwrap();
    greedy.subscribe(vec!["a".into(), "b".into(), "c".into()]).await.unwrap();
    greedy.subscribe(vec!["d".into()]).await.unwrap();
    let d = next_disconnect(&mut greedy).await;
    assert_eq!((d.reason, d.by_peer), (CloseReason::SubscriptionRefused, true));
    let k = s.wait(|k| offline_reason(k, "greedy").is_some()).await;
    assert_eq!(offline_reason(&k, "greedy"), Some(CloseReason::SubscriptionRefused));
    good.send(Some("good"), Bytes::from_static(b"unaffected")).await.unwrap();
    assert_eq!(&support::next_data(&mut good).await[..], b"unaffected");
    assert!(s.drain().iter().all(|k| offline_reason(k, "good").is_none()));
}

/// A connection the path forgot: the same device comes straight back from the same address while the server
/// still holds its old connection, silent for half an interval or more (it gave the connection up). That is
/// diagnosed in an event and in the ring of recent disconnects; a live connection taken over is not, nor a
/// stalled client (its kernel acknowledged the server's PING) back at once after the server's verdict.
#[tokio::test(start_paused = true)]
async fn the_same_device_straight_back_means_the_path_forgot_the_connection() {
    let mut s = TestServer::start(test_config()).await;
    let diagnosed = |s: &TestServer, reason, conn| {
        let recs = s.handle.disconnects(Some(reason), 10);
        recs.iter().find(|r| r.conn == conn).map(|r| (r.diagnosis, r.detail.clone())).expect("the record is kept")
    };
    let takeover_of = |k: &EventKind| match k {
        EventKind::Closed { reason: CloseReason::Takeover, conn, .. } => Some(*conn),
        _ => None,
    };
    let with_nonce = |id: &str, nonce| ClientConfig { nonce: Some(nonce), ..client_cfg(id) };

    // A live connection taken over by its own device: nothing was forgotten.
    let _live = Client::connect(s.addr, with_nonce("w", 6)).await.unwrap();
    let _w = Client::connect(s.addr, with_nonce("w", 6)).await.unwrap();
    let k = s.wait(|k| takeover_of(k).is_some() || matches!(k, EventKind::Diagnosis { .. })).await;
    let live = takeover_of(&k).unwrap_or_else(|| panic!("a live connection was diagnosed: {k:?}"));
    assert_eq!(diagnosed(&s, CloseReason::Takeover, live).0, None);

    // The old connection silent for 0.8 of an interval when its device takes it over.
    let (_gone, _) = RawPeer::hello(s.addr, "x", 7).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let _x = Client::connect(s.addr, with_nonce("x", 7)).await.unwrap();
    let k = s.wait(|k| matches!(k, EventKind::Diagnosis { .. })).await;
    let EventKind::Diagnosis { client, conn, diagnosis, explanation, .. } = k else { unreachable!() };
    assert_eq!((client.as_str(), diagnosis), ("x", Diagnosis::MiddleboxForgot));
    assert!(explanation.starts_with("the path's middlebox forgot the connection"), "{explanation}");
    assert!(explanation.contains("still open here, 0.8 s after its last frame"), "{explanation}");
    let closed = takeover_of(&s.wait(|k| takeover_of(k).is_some()).await).unwrap();
    assert_eq!(closed, conn);
    assert_eq!(diagnosed(&s, CloseReason::Takeover, conn), (Some(Diagnosis::MiddleboxForgot), Some(explanation)));

    // The server ends a silent session whose socket still acknowledged everything (a stalled client: the path
    // carried the server's PING), and its client is back at once: not the path, so no diagnosis. (A path that
    // goes silent needs a real one: the fault lab's NAT proves that rule.)
    let (_stalled, _) = RawPeer::hello(s.addr, "y", 8).await;
    let k = s.wait(|k| offline_reason(k, "y").is_some()).await;
    let EventKind::Offline { conn: old, reason: CloseReason::HeartbeatTimeout, .. } = k else { panic!("{k:?}") };
    let _y = Client::connect(s.addr, with_nonce("y", 8)).await.unwrap();
    let k = s
        .wait(|k| {
            matches!(k, EventKind::Online { client, .. } if client == "y") || matches!(k, EventKind::Diagnosis { .. })
        })
        .await;
    assert!(matches!(k, EventKind::Online { .. }), "{k:?}");
    assert_eq!(diagnosed(&s, CloseReason::HeartbeatTimeout, old).0, None);
}
