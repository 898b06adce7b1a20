//! Defects found from outside, each over real loopback sockets: oversized relays refused where the sender sees
//! it, a bounded event stream that reports what it dropped, one address unable to take every handshake slot,
//! late subscribers told when and why an id left, who decided a close, foreign clients answered in their own
//! protocol, version negotiation, and output stuck in the kernel's send queue judged like output stuck in ours.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use support::{hello_frame, offline_reason, test_config, RawPeer, TestServer};
use tether::proto::frame::{self, ext, Extension, PROTOCOL_VERSION, V1, V2};
use tether::proto::{Bye, Frame, PresenceState, Undeliverable};
use tether::{Client, ClientConfig, ClientError, CloseReason, EventKind, EventQueue};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// A raw peer connected from source address `ip` (any 127.0.0.0/8 address works on Linux loopback).
async fn connect_from(ip: &str, addr: SocketAddr) -> TcpStream {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(format!("{ip}:0").parse().unwrap()).unwrap();
    sock.connect(addr).await.unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_payload_too_large_to_relay_is_refused_where_the_sender_sees_it() {
    let mut s = TestServer::start(test_config()).await;
    let long = "L".repeat(128);
    let (mut sender, w) = RawPeer::hello(s.addr, &long, 1).await;
    assert_eq!((w.version, w.max_frame), (V2, Some(65_536)), "the maximum is announced");
    assert_eq!(Extension::find_u32(&w.extensions, ext::MAX_SUBSCRIPTIONS), Some(1024));
    let mut b = Client::connect(s.addr, ClientConfig::new("b")).await.unwrap();
    let max = frame::max_relay_payload(65_536);
    // The largest relayable payload from the longest id to a one-byte id arrives whole: the relayed frame is
    // exactly the maximum.
    sender.send(&Frame::Data { peer: "b".into(), payload: Bytes::from(vec![7; max]) }).await;
    let got = support::next_data(&mut b).await;
    assert_eq!(got.len(), max);
    // One byte more (a frame of 65,409 bytes that the server accepts) would grow past the maximum when relayed:
    // refused, and the sender, the application and the log are told.
    sender.send(&Frame::Data { peer: "b".into(), payload: Bytes::from(vec![7; max + 1]) }).await;
    assert_eq!(
        next_not_ping(&mut sender).await,
        Some(Frame::Undeliverable { to: "b".into(), why: Undeliverable::TooLarge })
    );
    let k = s.wait(|k| matches!(k, EventKind::Undeliverable { .. })).await;
    let EventKind::Undeliverable { client, to, len, why, .. } = k else { unreachable!() };
    assert_eq!((client, to.as_str(), len, why), (long, "b", max + 1, Undeliverable::TooLarge));
    // The sender stays connected; b received nothing more.
    sender.send(&Frame::Data { peer: "b".into(), payload: Bytes::from_static(b"small") }).await;
    assert_eq!(&support::next_data(&mut b).await[..], b"small");
    // The client library refuses such a payload before sending it.
    let c = Client::connect(s.addr, ClientConfig::new("c")).await.unwrap();
    let err = c.send(Some("b"), Bytes::from(vec![0; max + 1])).await.unwrap_err();
    assert_eq!(err, ClientError::TooLarge { len: max + 1, max });
    c.send(None, Bytes::from(vec![0; 65_534])).await.expect("to the server application: max_frame - 2");
    // A v1 sender is told too, with the v1 frame (no reason byte).
    let (mut old, w) = RawPeer::hello_v(s.addr, "old", 2, V1).await;
    assert_eq!((w.version, w.max_frame), (V1, None));
    old.send(&Frame::Data { peer: "b".into(), payload: Bytes::from(vec![7; max + 1]) }).await;
    let unspecified = Frame::Undeliverable { to: "b".into(), why: Undeliverable::Unspecified };
    assert_eq!(next_not_ping(&mut old).await, Some(unspecified));
    // And to an id that is not online, v2 says so.
    sender.send(&Frame::Data { peer: "nobody".into(), payload: Bytes::from_static(b"x") }).await;
    let not_online = Frame::Undeliverable { to: "nobody".into(), why: Undeliverable::NotOnline };
    assert_eq!(next_not_ping(&mut sender).await, Some(not_online));
}

/// The next frame that is not the server's backstop `PING` (a raw peer does not ping, so the server does).
async fn next_not_ping(p: &mut RawPeer) -> Option<Frame> {
    loop {
        match p.next_frame().await {
            Some(Frame::Ping { .. }) => continue,
            other => return other,
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_stalled_event_reader_loses_counted_events_and_stops_nothing() {
    let mut cfg = test_config();
    cfg.event_queue = EventQueue::Bounded(16);
    let mut s = TestServer::start(cfg).await;
    // Nobody reads the event stream while 200 clients come and go.
    for i in 0..200 {
        let mut c = Client::connect(s.addr, ClientConfig::new(format!("c{i}"))).await.expect("admitted throughout");
        c.close().await.expect("a clean goodbye");
    }
    // The server kept judging too: a silent peer is declared dead on time.
    let (mut silent, _) = RawPeer::hello(s.addr, "silent", 1).await;
    let (_, bye) = silent.pings_then_bye().await;
    assert_eq!(bye.reason, CloseReason::HeartbeatTimeout);
    // The reader comes back: the 16 queued events, then the count of what was dropped.
    let mut received = Vec::new();
    while let Some(ev) = s.events.try_recv() {
        received.push(ev.kind);
    }
    let dropped: u64 = received.iter().map(|k| if let EventKind::Dropped { count } = k { *count } else { 0 }).sum();
    let delivered = received.iter().filter(|k| !matches!(k, EventKind::Dropped { .. })).count() as u64;
    assert!(dropped > 300, "dropped {dropped}");
    assert_eq!(s.handle.stats().events_dropped, dropped);
    // Every event was either delivered or counted: 1 listening was read at start; 400 online/offline of the
    // clients, then the silent one's online and offline.
    assert_eq!(delivered + dropped, 400 + 2, "{received:?}");
    let gap = received.iter().position(|k| matches!(k, EventKind::Dropped { .. })).unwrap();
    assert_eq!(gap, 16, "the queue's 16 events first, then the gap");
    // Once the reader keeps up, nothing is lost.
    let (_late, _) = RawPeer::hello(s.addr, "late", 2).await;
    assert!(
        matches!(s.events.recv().await.map(|e| e.kind), Some(EventKind::Online { client, .. }) if client == "late")
    );
}

#[tokio::test(start_paused = true)]
async fn one_address_cannot_take_every_handshake_slot() {
    let mut cfg = test_config();
    cfg.conn.handshake_timeout = Duration::from_secs(60);
    let s = TestServer::start(cfg).await;
    // 520 connections from one address that each send one byte and stall.
    let mut stalled = Vec::new();
    let mut refused = 0;
    for _ in 0..520 {
        let mut p = RawPeer::from_stream(connect_from("127.0.0.2", s.addr).await);
        p.send_raw(&[0]).await;
        stalled.push(p);
    }
    for p in &mut stalled {
        // The address holds its share of the slots (512 / 16 = 32); the rest are refused at once. A stalled one
        // answers nothing: a second of (virtual) silence, far inside its 60 s handshake timeout.
        match tokio::time::timeout(Duration::from_secs(1), p.next_frame()).await {
            Ok(Some(Frame::Bye(Bye { reason: CloseReason::IpLimit, .. }))) => refused += 1,
            Ok(other) => panic!("a stalled handshake got {other:?}"),
            Err(_) => {}
        }
    }
    assert_eq!((refused, s.handle.stats().handshakes, s.handle.stats().refused_ip_limit), (520 - 32, 32, 520 - 32));
    // A newcomer from anywhere else is admitted.
    let mut other = RawPeer::from_stream(connect_from("127.0.0.3", s.addr).await);
    other.send(&hello_frame(PROTOCOL_VERSION, "newcomer", 1)).await;
    assert!(matches!(other.next_frame().await, Some(Frame::Welcome(_))));
}

#[tokio::test(start_paused = true)]
async fn a_late_subscriber_learns_when_and_why_an_id_left_and_who_decided() {
    let mut s = TestServer::start(test_config()).await;
    // a judges the server silent and leaves saying so; b is judged by the server.
    let (mut a, _) = RawPeer::hello(s.addr, "a", 1).await;
    a.send(&Frame::Bye(Bye { reason: CloseReason::HeartbeatTimeout, retry_after_ms: 0, alternative: String::new() }))
        .await;
    let k = s.wait(|k| offline_reason(k, "a").is_some()).await;
    assert!(matches!(k, EventKind::Offline { reason: CloseReason::HeartbeatTimeout, by_peer: true, .. }), "{k:?}");
    let (_b, _) = RawPeer::hello(s.addr, "b", 2).await;
    let k = s.wait(|k| offline_reason(k, "b").is_some()).await;
    assert!(matches!(k, EventKind::Offline { reason: CloseReason::HeartbeatTimeout, by_peer: false, .. }), "{k:?}");
    // 200 ms later a watcher subscribes: both are offline, with their reason, their last-seen, and who decided.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (mut w, _) = RawPeer::hello(s.addr, "watcher", 3).await;
    w.send(&Frame::Subscribe(vec!["a".into(), "b".into(), "never".into()])).await;
    let mut snapshot = Vec::new();
    while snapshot.len() < 3 {
        if let Some(Frame::Presence(p)) = w.next_frame().await {
            snapshot.push(p);
        }
    }
    let a = &snapshot[0];
    assert_eq!((a.state, a.reason, a.by_client()), (PresenceState::Offline, Some(CloseReason::HeartbeatTimeout), true));
    // a left before b's 3 s timeout ran, then 200 ms passed.
    assert!((3200..4000).contains(&a.last_seen_ago_ms), "{a:?}");
    let b = &snapshot[1];
    assert_eq!((b.reason, b.by_client()), (Some(CloseReason::HeartbeatTimeout), false));
    assert!((3200..4000).contains(&b.last_seen_ago_ms), "silent for the 3 s timeout, then 200 ms: {b:?}");
    let never = &snapshot[2];
    assert_eq!((never.state, never.reason, never.last_seen_ago_ms), (PresenceState::Offline, None, u32::MAX));
    // A v1 watcher gets the same facts without the flag byte it cannot read.
    let (mut v1, _) = RawPeer::hello_v(s.addr, "old-watcher", 4, V1).await;
    v1.send(&Frame::Subscribe(vec!["a".into()])).await;
    let Some(Frame::Presence(p)) = v1.next_frame().await else { panic!("no snapshot") };
    assert_eq!((p.reason, p.flags), (Some(CloseReason::HeartbeatTimeout), 0));
}

#[tokio::test(start_paused = true)]
async fn foreign_clients_are_answered_in_their_own_protocol() {
    let mut s = TestServer::start(test_config()).await;
    let mut http = TcpStream::connect(s.addr).await.unwrap();
    http.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
    let mut reply = String::new();
    http.read_to_string(&mut reply).await.unwrap();
    assert!(reply.starts_with("HTTP/1.1 400 Bad Request\r\n") && reply.contains("tether protocol"), "{reply}");
    let k = s.wait(|k| matches!(k, EventKind::Closed { reason: CloseReason::ProtocolError, .. })).await;
    let EventKind::Closed { detail, .. } = k else { unreachable!() };
    assert!(detail.unwrap().ends_with("an HTTP request arrived on the tether port"));

    let mut mqtt = TcpStream::connect(s.addr).await.unwrap();
    let connect =
        [0x10, 0x10, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3c, 0x00, 0x04, b'd', b'e', b'v', b'1'];
    mqtt.write_all(&connect).await.unwrap();
    let mut connack = Vec::new();
    mqtt.read_to_end(&mut connack).await.unwrap();
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x01], "CONNACK: unacceptable protocol version");
    let k = s.wait(|k| matches!(k, EventKind::Closed { reason: CloseReason::ProtocolError, .. })).await;
    let EventKind::Closed { detail, .. } = k else { unreachable!() };
    assert!(detail.unwrap().ends_with("an MQTT CONNECT arrived on the tether port"));
}

#[tokio::test(start_paused = true)]
async fn a_client_offering_a_later_version_gets_v2_and_a_v1_client_gets_v1() {
    let s = TestServer::start(test_config()).await;
    let (_p, w) = RawPeer::hello_v(s.addr, "future", 1, 9).await;
    assert_eq!(w.version, V2);
    let (_p, w) = RawPeer::hello_v(s.addr, "past", 2, V1).await;
    assert_eq!((w.version, w.max_frame, w.extensions.len()), (V1, None, 0));
    let c = Client::connect(s.addr, ClientConfig::new("lib")).await.unwrap();
    assert_eq!((c.welcome().version, c.welcome().max_frame), (V2, Some(65_536)));
}

/// A raw peer with a receive buffer of `bytes`, welcomed as `id`.
async fn welcomed_with_receive_buffer(addr: SocketAddr, id: &str, bytes: usize) -> RawPeer {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(bytes).unwrap();
    sock.set_nonblocking(true).unwrap();
    let sock = TcpSocket::from_std_stream(sock.into());
    let mut peer = RawPeer::from_stream(sock.connect(addr).await.unwrap());
    peer.send(&hello_frame(PROTOCOL_VERSION, id, 1)).await;
    assert!(matches!(peer.next_frame().await, Some(Frame::Welcome(_))));
    peer
}

/// Real clock: the kernel's zero-window probing runs on its own time, not tokio's.
#[tokio::test]
async fn output_stuck_in_the_kernel_is_a_write_timeout_like_output_stuck_in_ours() {
    let mut cfg = test_config();
    cfg.heartbeat.interval = Duration::from_millis(200);
    cfg.heartbeat.timeout = Duration::from_secs(30);
    cfg.conn.write_timeout = Duration::from_secs(1);
    // The kernel's user timeout would end it after 20 s; the write timeout must come first.
    cfg.socket.user_timeout = Some(Duration::from_secs(20));
    let mut s = TestServer::start(cfg).await;
    // A watcher whose application stopped reading: a tiny receive buffer it never drains, while it keeps pinging
    // (so it is alive to the heartbeat rule).
    let mut watcher = welcomed_with_receive_buffer(s.addr, "watcher", 1024).await;
    // Relayed data fills its window; what is left (a few KiB) fits in the server's kernel send buffer, so the
    // server's own queue stays empty and only the kernel holds it.
    let sender = Client::connect(s.addr, ClientConfig::new("sender")).await.unwrap();
    for _ in 0..8 {
        sender.send(Some("watcher"), Bytes::from(vec![b'x'; 1000])).await.unwrap();
    }
    let pinger = tokio::spawn(async move {
        for seq in 0.. {
            let ping = Frame::Ping { seq, ts_ms: 0 }.to_bytes_v(watcher.version);
            if watcher.stream.write_all(&ping).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let started = std::time::Instant::now();
    let k = s.wait(|k| offline_reason(k, "watcher").is_some()).await;
    let EventKind::Offline { reason, detail, .. } = k else { unreachable!() };
    assert_eq!(reason, CloseReason::WriteTimeout, "{detail:?}");
    // The kernel's own state tells the stall (usually its zero-window probes: "the peer's receive window is
    // closed").
    assert!(detail.as_deref().unwrap().contains("the kernel holds"), "{detail:?}");
    assert!(started.elapsed() < Duration::from_secs(5), "judged after {:?}", started.elapsed());
    pinger.abort();
}

/// A client that stops reading while it keeps pinging, the relayed backlog (`kib` KiB) waiting in the server's
/// kernel with the window closed (and, when it is larger than the kernel's send buffer, in the server's own queue
/// too). No user timeout: only the write rule can end it. Returns the verdict's reason and detail, and when.
async fn a_reader_that_stopped(kib: usize, ping_every: Duration) -> (CloseReason, String, Duration) {
    let mut cfg = test_config();
    cfg.heartbeat.interval = Duration::from_millis(500);
    cfg.heartbeat.timeout = Duration::from_secs(60);
    // Long enough that the kernel's zero-window probes back off past the peer's PINGs (each of which resets
    // their count): the kernel's probing no longer shows.
    cfg.conn.write_timeout = Duration::from_secs(3);
    cfg.socket.user_timeout = Some(Duration::ZERO);
    cfg.socket.keepalive = None;
    // Room in our queue for the part the kernel does not take (the slow-consumer rule is not what is tested).
    cfg.outbound_queue = 4096;
    cfg.conn.max_outbound_bytes = 64 << 20;
    let mut s = TestServer::start(cfg).await;
    let mut reader = welcomed_with_receive_buffer(s.addr, "reader", 4096).await;
    // The application's sends: into our queue, then the kernel's, as fast as the window lets them.
    for _ in 0..kib / 8 {
        s.handle.send("reader", Bytes::from(vec![b'x'; 8 * 1024])).unwrap();
    }
    // A fixed-timer heartbeat: one PING per period, whatever comes back (it reads nothing).
    let pinger = tokio::spawn(async move {
        for seq in 0.. {
            let ping = Frame::Ping { seq, ts_ms: 0 }.to_bytes_v(reader.version);
            if reader.stream.write_all(&ping).await.is_err() {
                break;
            }
            tokio::time::sleep(ping_every).await;
        }
    });
    let started = std::time::Instant::now();
    let k = tokio::time::timeout(Duration::from_secs(30), s.wait(|k| offline_reason(k, "reader").is_some()))
        .await
        .expect("no verdict in 30 s");
    pinger.abort();
    let EventKind::Offline { reason, detail, .. } = k else { unreachable!() };
    (reason, detail.unwrap_or_default(), started.elapsed())
}

/// Real clock: the kernel's queue runs on its own time. The window closed, the peer's own segments (its PINGs)
/// keep acknowledging nothing new, so the kernel never probes: what tells the stall is that it holds unsent
/// output and has sent nothing for the write timeout.
#[tokio::test]
async fn a_reader_that_stopped_with_its_backlog_in_the_kernel_is_a_write_timeout() {
    let (reason, detail, took) = a_reader_that_stopped(1600, Duration::from_millis(500)).await;
    assert_eq!(reason, CloseReason::WriteTimeout, "{detail}");
    assert!(detail.contains("the kernel holds"), "{detail}");
    println!("MEASURED a reader that stopped, 1.6 MB in the kernel: write_timeout after {took:?} ({detail})");
}

#[tokio::test]
async fn a_reader_that_stopped_with_its_backlog_split_between_the_kernel_and_our_queue_is_a_write_timeout() {
    let (reason, detail, took) = a_reader_that_stopped(12 * 1024, Duration::from_millis(500)).await;
    assert_eq!(reason, CloseReason::WriteTimeout, "{detail}");
    println!("MEASURED a reader that stopped, 12 MiB between the kernel and our queue: write_timeout after {took:?} ({detail})");
}

/// A client that offers v2 to a server that speaks only v1 (and refuses the HELLO as unknown) is welcomed on its
/// second try, offering v1.
#[tokio::test(start_paused = true)]
async fn a_new_client_falls_back_to_v1_with_a_server_that_speaks_only_v1() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let old_server = tokio::spawn(async move {
        let mut offers = Vec::new();
        for _ in 0..2 {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut p = RawPeer::from_stream(tcp);
            let Some(Frame::Hello(h)) = p.next_frame().await else { panic!("no HELLO") };
            offers.push(h.version);
            if h.version != V1 {
                let bye = Bye { reason: CloseReason::ProtocolError, retry_after_ms: 0, alternative: String::new() };
                p.send(&Frame::Bye(bye)).await;
                continue;
            }
            p.send(&Frame::Welcome(support::v1_welcome("old"))).await;
            return (offers, p);
        }
        panic!("never offered v1: {offers:?}");
    });
    let c = Client::connect(addr, ClientConfig::new("new")).await.expect("welcomed offering v1");
    assert_eq!((c.welcome().version, c.welcome().server_id.as_str()), (V1, "old"));
    let (offers, _p) = old_server.await.unwrap();
    assert_eq!(offers, [V2, V1]);
}

/// The bounded event queue bounds memory in bytes too: DATA to the server application carries its payload.
#[tokio::test(start_paused = true)]
async fn queued_data_events_are_bounded_in_bytes() {
    let mut cfg = test_config();
    cfg.conn.max_frame = 2 << 20;
    cfg.event_queue = EventQueue::Bounded(1000);
    let mut s = TestServer::start(cfg).await;
    let mut ccfg = ClientConfig::new("bulk");
    ccfg.conn.max_outbound_bytes = 32 << 20; // room to queue it all on the sending side
    let c = Client::connect(s.addr, ccfg).await.unwrap();
    // 24 MiB of DATA while nobody reads: 16 MiB may wait.
    for _ in 0..24 {
        c.send(None, Bytes::from(vec![0u8; 1 << 20])).await.unwrap();
    }
    // A goodbye behind them: once the server has closed the connection, it has handled every DATA before it.
    let mut c = c;
    assert_eq!(c.close().await.map(|d| d.reason), Some(CloseReason::Bye));
    let (mut queued_bytes, mut dropped) = (0, 0);
    while let Some(ev) = s.events.try_recv() {
        match ev.kind {
            EventKind::Data { payload, .. } => queued_bytes += payload.len(),
            EventKind::Dropped { count } => dropped += count,
            _ => {}
        }
    }
    assert_eq!(queued_bytes, 16 << 20, "16 MiB of payload waited");
    assert_eq!(dropped, 8, "the other 8 MiB were dropped and counted");
}
