//! The `reliable` extension end to end over loopback, with tokio's paused clock: acknowledgements and receipts,
//! resume after a dead link (a relay that goes silent), the offline hold, expiry, a full hold, a forged token,
//! and a takeover by the same device. In every case each message reaches the application once, in order, or its
//! sender is told it never will.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use support::{test_config, RawPeer, TestServer, PATIENCE};
use tether::proto::frame::{self, Frame, Hello, V2};
use tether::proto::reliable::{Grant, Limits, LostWhy, Offer, Resume, Status};
use tether::proto::Undeliverable;
use tether::{Client, ClientConfig, ClientEvent, ReliableConfig, ReliableLink};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn link() -> ReliableLink {
    ReliableLink::new(ReliableConfig::default())
}

async fn connect(addr: std::net::SocketAddr, id: &str, link: &ReliableLink) -> Client {
    let cfg = ClientConfig { reliable: Some(link.clone()), nonce: Some(7), ..ClientConfig::new(id) };
    Client::connect(addr, cfg).await.expect("connect")
}

/// The next event that `pick` accepts, skipping others (a disconnect fails unless picked).
async fn until<T>(c: &mut Client, what: &str, pick: impl Fn(ClientEvent) -> Option<T>) -> T {
    let found = tokio::time::timeout(PATIENCE, async {
        loop {
            let ev = c.next_event().await.unwrap_or_else(|| panic!("stream ended waiting for {what}"));
            if let Some(t) = pick(ev) {
                return t;
            }
        }
    });
    found.await.unwrap_or_else(|_| panic!("no {what}"))
}

/// Collect `n` data payloads (as strings), failing on a disconnect.
async fn data(c: &mut Client, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    while out.len() < n {
        let got = until(c, "data", |e| match e {
            ClientEvent::Data { payload, .. } => Some(Some(String::from_utf8(payload.to_vec()).unwrap())),
            ClientEvent::Disconnected(d) => panic!("disconnected while reading data: {d:?}"),
            _ => None,
        })
        .await;
        out.extend(got);
    }
    out
}

fn numbered(range: std::ops::RangeInclusive<u32>) -> Vec<String> {
    range.map(|i| format!("m{i}")).collect()
}

async fn send_all(c: &Client, to: &str, range: std::ops::RangeInclusive<u32>) {
    for i in range {
        c.send_reliable(Some(to), Bytes::from(format!("m{i}"))).expect("window has room");
    }
}

/// What one client heard, gathered in one pass (a wait for one kind of event must not skip the others).
#[derive(Debug, Default)]
struct Heard {
    data: Vec<String>,
    acked: u64,
    delivered: Vec<u64>,
}

/// Gather `c`'s events until `done` holds, failing on a disconnect.
async fn hear(c: &mut Client, what: &str, done: impl Fn(&Heard) -> bool) -> Heard {
    let mut h = Heard::default();
    let found = tokio::time::timeout(PATIENCE, async {
        while !done(&h) {
            match c.next_event().await {
                Some(ClientEvent::Data { payload, .. }) => h.data.push(String::from_utf8(payload.to_vec()).unwrap()),
                Some(ClientEvent::Acked { upto }) => h.acked = upto,
                Some(ClientEvent::Delivered { seqs, .. }) => h.delivered.extend(seqs),
                Some(ClientEvent::Disconnected(d)) => panic!("disconnected waiting for {what}: {d:?}"),
                Some(_) => {}
                None => panic!("stream ended waiting for {what}"),
            }
        }
    });
    found.await.unwrap_or_else(|_| panic!("no {what}"));
    h
}

#[tokio::test(start_paused = true)]
async fn messages_arrive_once_in_order_and_the_sender_hears_acked_then_delivered() {
    let s = TestServer::start(test_config()).await;
    let (la, lb) = (link(), link());
    let mut a = connect(s.addr, "a", &la).await;
    let mut b = connect(s.addr, "b", &lb).await;
    assert_eq!(a.reliable().map(|g| g.status), Some(Status::New));
    send_all(&a, "b", 1..=200).await;
    assert_eq!(data(&mut b, 200).await, numbered(1..=200));
    let h = hear(&mut a, "acks and receipts", |h| h.acked == 200 && h.delivered.len() == 200).await;
    assert_eq!(h.delivered, (1..=200).collect::<Vec<_>>());
    assert_eq!(la.unacknowledged(), 0);
    // The last receipt is released once a acknowledges it (after the ack delay, virtual time).
    let mut held = s.handle.metrics().reliable;
    for _ in 0..10 {
        if held.held_messages == 0 {
            break;
        }
        tokio::time::sleep(tether::proto::reliable::ACK_DELAY).await;
        held = s.handle.metrics().reliable;
    }
    assert_eq!((held.sessions, held.held_messages, held.held_bytes), (2, 0, 0), "all released: {held:?}");
}

/// A TCP relay that can go silent both ways (a blackholed path: nothing arrives, nothing is refused).
/// Also [`Relay::cut`]: the connections open now go silent for good, and later ones flow (a path that died,
/// and a new one after the reconnect).
struct Relay {
    addr: std::net::SocketAddr,
    silent: Arc<AtomicBool>,
    cuts: Arc<AtomicU64>,
}

impl Relay {
    async fn start(to: std::net::SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let silent = Arc::new(AtomicBool::new(false));
        let cuts = Arc::new(AtomicU64::new(0));
        let (flag, cut) = (silent.clone(), cuts.clone());
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let outbound = TcpStream::connect(to).await.unwrap();
                let (ri, wi) = inbound.into_split();
                let (ro, wo) = outbound.into_split();
                let born = cut.load(Ordering::Relaxed);
                tokio::spawn(pipe(ri, wo, flag.clone(), cut.clone(), born));
                tokio::spawn(pipe(ro, wi, flag.clone(), cut.clone(), born));
            }
        });
        Relay { addr, silent, cuts }
    }

    fn cut(&self) {
        self.cuts.fetch_add(1, Ordering::Relaxed);
    }
}

/// Copy until either side ends; while silent (or cut since this connection was born), what is read is thrown
/// away (and nothing is closed).
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    silent: Arc<AtomicBool>,
    cuts: Arc<AtomicU64>,
    born: u64,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) if silent.load(Ordering::Relaxed) || cuts.load(Ordering::Relaxed) != born => {}
            Ok(n) => {
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_dead_link_loses_nothing_the_resume_replays_what_was_in_flight_once() {
    let mut s = TestServer::start(test_config()).await;
    let relay = Relay::start(s.addr).await;
    let (la, lb) = (link(), link());
    let mut a = connect(s.addr, "a", &la).await;
    let mut b = connect(relay.addr, "b", &lb).await;
    send_all(&a, "b", 1..=50).await;
    assert_eq!(data(&mut b, 50).await, numbered(1..=50));
    // The path dies without a word; both sides keep sending into it.
    relay.silent.store(true, Ordering::Relaxed);
    send_all(&a, "b", 51..=120).await;
    for i in 1..=30 {
        b.send_reliable(Some("a"), Bytes::from(format!("r{i}"))).unwrap();
    }
    let gone = until(&mut b, "the verdict", |e| match e {
        ClientEvent::Disconnected(d) => Some(d.reason),
        _ => None,
    })
    .await;
    assert_eq!(gone, tether::CloseReason::HeartbeatTimeout);
    s.wait(|k| matches!(k, tether::EventKind::Offline { client, .. } if client == "b")).await;
    // The same device comes back on a healthy path and resumes.
    let mut b = connect(s.addr, "b", &lb).await;
    let g = b.reliable().expect("granted");
    assert_eq!((g.status, g.lost), (Status::Resumed, 0));
    assert_eq!(data(&mut b, 70).await, numbered(51..=120), "the rest, once, in order");
    assert_eq!(s.handle.metrics().reliable.replayed, 70, "what went into the dead path was sent again");
    let h = hear(&mut a, "b's messages and receipts", |h| h.data.len() == 30 && h.delivered.len() == 120).await;
    assert_eq!(h.data, (1..=30).map(|i| format!("r{i}")).collect::<Vec<_>>());
    assert_eq!(h.delivered, (1..=120).collect::<Vec<_>>());
    // Nothing more: no message came twice.
    let extra = tokio::time::timeout(Duration::from_secs(5), data(&mut b, 1)).await;
    assert!(extra.is_err(), "a message arrived twice: {extra:?}");
}

/// Two reconnecting clients exchange numbered messages while the receiver's path is cut at random moments (1 to 3
/// times, 8 seeds): each dead path is found by the heartbeat, the client reconnects through a new one and
/// resumes, and each side's application gets the other's messages once, in order.
#[tokio::test(start_paused = true)]
async fn random_cuts_of_a_reconnecting_clients_path_lose_and_repeat_nothing() {
    use rand::{Rng, SeedableRng};
    const N: usize = 300;
    for seed in 0..8u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let s = TestServer::start(test_config()).await;
        let relay = Relay::start(s.addr).await;
        let start = |addr: std::net::SocketAddr, id: &str| {
            let cfg = ClientConfig { reliable: Some(link()), ..ClientConfig::new(id) };
            tether::ReconnectingClient::start(vec![addr.to_string()], cfg, tether::ResilienceConfig::default())
        };
        let (mut a, mut b) = (start(s.addr, "a"), start(relay.addr, "b"));
        // Cut while messages still follow, so that every cut must be found and resumed from.
        let cuts: Vec<usize> = (0..rng.random_range(1..=3)).map(|_| rng.random_range(0..N - 50)).collect();
        let (mut from_a, mut from_b) = (Vec::new(), Vec::new());
        let mut resumes = 0;
        let mut i = 0;
        let collected = tokio::time::timeout(PATIENCE * 4, async {
            while from_a.len() < N || from_b.len() < N {
                if i < N {
                    a.send(Some("b"), Bytes::from(format!("a{i}"))).await.unwrap();
                    b.send(Some("a"), Bytes::from(format!("b{i}"))).await.unwrap();
                    if cuts.contains(&i) {
                        relay.cut();
                    }
                    i += 1;
                }
                let tick = tokio::time::sleep(Duration::from_millis(rng.random_range(0..5)));
                tokio::select! {
                    () = tick => {}
                    ev = a.next_event() => match ev.expect("a stopped") {
                        tether::LinkEvent::Data { payload, .. } => from_b.push(payload),
                        tether::LinkEvent::InDoubt(m) => panic!("seed {seed}: a in doubt: {m:?}"),
                        _ => {}
                    },
                    ev = b.next_event() => match ev.expect("b stopped") {
                        tether::LinkEvent::Data { payload, .. } => from_a.push(payload),
                        tether::LinkEvent::Connected { reliable: Some(g), .. } if g.status != Status::New => {
                            assert_eq!(g.status, Status::Resumed, "seed {seed}: {g:?}");
                            resumes += 1;
                        }
                        tether::LinkEvent::InDoubt(m) => panic!("seed {seed}: b in doubt: {m:?}"),
                        _ => {}
                    },
                }
            }
        })
        .await;
        let text = |v: &[Bytes]| v.iter().map(|b| String::from_utf8(b.to_vec()).unwrap()).collect::<Vec<_>>();
        assert!(
            collected.is_ok(),
            "seed {seed} (cuts {cuts:?}): b got {} of a's, a got {} of b's",
            from_a.len(),
            from_b.len()
        );
        assert_eq!(text(&from_a), (0..N).map(|i| format!("a{i}")).collect::<Vec<_>>(), "seed {seed}, cuts {cuts:?}");
        assert_eq!(text(&from_b), (0..N).map(|i| format!("b{i}")).collect::<Vec<_>>(), "seed {seed}, cuts {cuts:?}");
        assert!(resumes >= 1, "seed {seed}: the cuts {cuts:?} were never resumed from");
        a.close().await;
        b.close().await;
    }
}

/// A path that comes back while the client's connection lingers after its own verdict: the server's kernel
/// delivers what it had queued to the old connection. None of it is handed on (`Disconnected` stays the last
/// event) or counted as received, so the resume brings it, once.
#[tokio::test(start_paused = true)]
async fn frames_read_after_the_verdict_are_not_taken_the_resume_brings_them_once() {
    let mut s = TestServer::start(test_config()).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let path = listener.local_addr().unwrap();
    let down = Arc::new(AtomicBool::new(false));
    let (back, mut is_back) = tokio::sync::oneshot::channel::<()>();
    let (server_addr, d) = (s.addr, down.clone());
    // b's path, for one connection: while down, nothing reaches the server and what the server sends waits;
    // once back, the old connection gets what waited, then the end of the stream.
    tokio::spawn(async move {
        let (device, _) = listener.accept().await.unwrap();
        let server = TcpStream::connect(server_addr).await.unwrap();
        let ((mut from_device, mut to_device), (mut from_server, mut to_server)) =
            (device.into_split(), server.into_split());
        let up = d.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 16 * 1024];
            while let Ok(n @ 1..) = from_device.read(&mut buf).await {
                if !up.load(Ordering::Relaxed) && to_server.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        });
        let (mut waiting, mut buf) = (Vec::new(), vec![0u8; 16 * 1024]);
        let mut server_open = true;
        loop {
            tokio::select! {
                r = from_server.read(&mut buf), if server_open => match r {
                    Ok(n @ 1..) if d.load(Ordering::Relaxed) => waiting.extend_from_slice(&buf[..n]),
                    Ok(n @ 1..) => to_device.write_all(&buf[..n]).await.unwrap(),
                    _ => server_open = false,
                },
                _ = &mut is_back => break,
            }
        }
        to_device.write_all(&waiting).await.unwrap();
        to_device.shutdown().await.unwrap();
    });
    let (la, lb) = (link(), link());
    let a = connect(s.addr, "a", &la).await;
    let mut b = connect(path, "b", &lb).await;
    send_all(&a, "b", 1..=50).await;
    assert_eq!(data(&mut b, 50).await, numbered(1..=50));
    down.store(true, Ordering::Relaxed);
    send_all(&a, "b", 51..=120).await;
    let gone = until(&mut b, "the verdict", |e| match e {
        ClientEvent::Disconnected(d) => Some(d.reason),
        _ => None,
    })
    .await;
    assert_eq!(gone, tether::CloseReason::HeartbeatTimeout);
    // The path is back: the old connection, lingering, reads what the server had sent into it, then the end.
    back.send(()).unwrap();
    let late = tokio::time::timeout(PATIENCE, async {
        let mut late = Vec::new();
        while let Some(ev) = b.next_event().await {
            late.push(format!("{ev:?}"));
        }
        late
    })
    .await
    .expect("the old connection ends");
    assert_eq!(late, Vec::<String>::new(), "events after Disconnected");
    assert_eq!(lb.received(), 50, "only what the application got counts as received");
    s.wait(|k| matches!(k, tether::EventKind::Offline { client, .. } if client == "b")).await;
    let mut b = connect(s.addr, "b", &lb).await;
    let g = b.reliable().expect("granted");
    assert_eq!((g.status, g.lost), (Status::Resumed, 0));
    assert_eq!(data(&mut b, 70).await, numbered(51..=120), "the rest, once, in order");
    let extra = tokio::time::timeout(Duration::from_secs(5), data(&mut b, 1)).await;
    assert!(extra.is_err(), "a message arrived twice: {extra:?}");
}

#[tokio::test(start_paused = true)]
async fn a_takeover_by_the_same_device_resumes_before_any_verdict() {
    let mut s = TestServer::start(test_config()).await;
    let relay = Relay::start(s.addr).await;
    let (la, lb) = (link(), link());
    let a = connect(s.addr, "a", &la).await;
    let mut b1 = connect(relay.addr, "b", &lb).await;
    send_all(&a, "b", 1..=20).await;
    assert_eq!(data(&mut b1, 20).await, numbered(1..=20));
    relay.silent.store(true, Ordering::Relaxed);
    send_all(&a, "b", 21..=40).await;
    // The device reconnects at once, while the server still thinks its old connection is alive.
    let mut b2 = connect(s.addr, "b", &lb).await;
    assert_eq!(b2.reliable().map(|g| g.status), Some(Status::Resumed));
    s.wait(|k| matches!(k, tether::EventKind::Takeover { client, .. } if client == "b")).await;
    assert_eq!(data(&mut b2, 20).await, numbered(21..=40));
    let extra = tokio::time::timeout(Duration::from_secs(5), data(&mut b2, 1)).await;
    assert!(extra.is_err(), "a message arrived twice: {extra:?}");
    drop(b1);
}

#[tokio::test(start_paused = true)]
async fn an_offline_session_holds_its_messages_and_gets_them_at_its_resume() {
    let s = TestServer::start(test_config()).await;
    let (la, lb) = (link(), link());
    let mut a = connect(s.addr, "a", &la).await;
    let mut b = connect(s.addr, "b", &lb).await;
    b.close().await;
    send_all(&a, "b", 1..=10).await;
    // Taken by the server (held), not yet delivered.
    let h = hear(&mut a, "acked", |h| h.acked == 10).await;
    assert!(h.delivered.is_empty());
    let hold = s.handle.metrics().reliable;
    assert_eq!(hold.held_messages, 10, "{hold:?}");
    // Plain DATA from a client without the extension is held too.
    let mut plain = Client::connect(s.addr, ClientConfig::new("plain")).await.unwrap();
    plain.send(Some("b"), Bytes::from_static(b"plain")).await.unwrap();
    tokio::time::sleep(Duration::from_secs(30)).await;
    let mut b = connect(s.addr, "b", &lb).await;
    assert_eq!(b.reliable().map(|g| g.status), Some(Status::Resumed));
    let mut want = numbered(1..=10);
    want.push("plain".into());
    assert_eq!(data(&mut b, 11).await, want);
    assert_eq!(hear(&mut a, "receipts", |h| h.delivered.len() == 10).await.delivered, (1..=10).collect::<Vec<_>>());
    plain.close().await;
}

/// A server whose sessions expire 5 s after their connection, a reliable `a` connected, and `b`'s session
/// offline (its client closed): the server, `a`, and `b`'s link.
async fn b_gone_with_a_5s_expiry() -> (TestServer, Client, ReliableLink) {
    let mut cfg = test_config();
    cfg.hold.expiry = Duration::from_secs(5);
    let s = TestServer::start(cfg).await;
    let (la, lb) = (link(), link());
    let a = connect(s.addr, "a", &la).await;
    connect(s.addr, "b", &lb).await.close().await;
    (s, a, lb)
}

#[tokio::test(start_paused = true)]
async fn expiry_tells_the_sender_why_and_the_late_resume_counts_what_was_lost() {
    let (s, mut a, lb) = b_gone_with_a_5s_expiry().await;
    send_all(&a, "b", 1..=3).await;
    let (seqs, why) = until(&mut a, "not delivered", |e| match e {
        ClientEvent::NotDelivered { to, seqs, why } if to == "b" => Some((seqs, why)),
        _ => None,
    })
    .await;
    assert_eq!((seqs, why), (vec![1, 2, 3], Undeliverable::Expired));
    let b = connect(s.addr, "b", &lb).await;
    let g = b.reliable().unwrap();
    assert_eq!((g.status, g.why, g.lost), (Status::Fresh, Some(LostWhy::Expired), 3));
    assert_eq!(s.handle.metrics().reliable.expired, 1);
}

#[tokio::test(start_paused = true)]
async fn a_full_hold_refuses_with_why_and_the_resume_says_how_many_were_lost() {
    let mut cfg = test_config();
    cfg.hold.per_session = Limits { messages: 5, bytes: 1 << 20 };
    let s = TestServer::start(cfg).await;
    let (la, lb) = (link(), link());
    let mut a = connect(s.addr, "a", &la).await;
    let mut b = connect(s.addr, "b", &lb).await;
    b.close().await;
    send_all(&a, "b", 1..=8).await;
    let (seqs, why) = until(&mut a, "not delivered", |e| match e {
        ClientEvent::NotDelivered { seqs, why, .. } => Some((seqs, why)),
        _ => None,
    })
    .await;
    assert_eq!((seqs, why), (vec![6], Undeliverable::HoldFull));
    let mut b = connect(s.addr, "b", &lb).await;
    let g = b.reliable().unwrap();
    assert_eq!((g.status, g.why, g.lost), (Status::ResumedWithLoss, Some(LostWhy::HoldOverflow), 3));
    assert_eq!(data(&mut b, 5).await, numbered(1..=5));
}

#[tokio::test(start_paused = true)]
async fn a_forged_token_gets_a_fresh_session_never_another_devices_messages() {
    let s = TestServer::start(test_config()).await;
    let (la, lb) = (link(), link());
    let a = connect(s.addr, "a", &la).await;
    let mut b = connect(s.addr, "b", &lb).await;
    let real = b.reliable().unwrap().token;
    b.close().await;
    send_all(&a, "b", 1..=3).await;
    let mut forged = real;
    forged[15] ^= 0x55;
    let mut hello = Hello::new(V2, "b", 99);
    hello.extensions =
        vec![Offer { receipts: false, resume: Some(Resume { token: forged, received: 0 }) }.to_extension()];
    let mut peer = RawPeer::connect(s.addr).await;
    peer.send(&Frame::Hello(hello)).await;
    let Some(Frame::Welcome(w)) = peer.next_frame().await else { panic!("no WELCOME") };
    let g = Grant::find(&w.extensions).expect("granted");
    assert_eq!((g.status, g.why), (Status::Fresh, Some(LostWhy::Unknown)));
    assert_ne!(g.token, real);
    // Nothing of b's stream comes: the next frame is the server's heartbeat, not data.
    match peer.next_frame().await {
        Some(Frame::Ping { .. }) => {}
        Some(Frame::Sdata { .. }) => panic!("another device's message was handed to a forged token"),
        other => panic!("unexpected {other:?}"),
    }
    // The real device's session was replaced by the id's new holder; its held messages went back to a.
    drop(peer);
    let b = connect(s.addr, "b", &lb).await;
    assert_eq!(b.reliable().map(|g| (g.status, g.why)), Some((Status::Fresh, Some(LostWhy::Replaced))));
    drop(a);
}

/// A resume streams a hold far larger than one pull (64 KiB) and one write (256 KiB) at once. The device sends
/// nothing after its `HELLO` (no acknowledgement, no `PING`), so nothing but the server's own output may drive
/// the stream: what the socket took, it takes more of, without waiting for the device or a heartbeat.
#[tokio::test(start_paused = true)]
async fn a_resume_streams_a_large_hold_without_waiting_for_the_device() {
    let mut cfg = test_config();
    cfg.heartbeat.interval = Duration::from_secs(60);
    cfg.heartbeat.timeout = Duration::from_secs(180);
    let s = TestServer::start(cfg).await;
    let lb = link();
    let mut b = connect(s.addr, "b", &lb).await;
    let token = b.reliable().unwrap().token;
    b.close().await;
    const N: usize = 200;
    let payload = Bytes::from(vec![b'x'; 4000]);
    for _ in 0..N {
        s.handle.send("b", payload.clone()).expect("held for b");
    }
    let mut hello = Hello::new(V2, "b", 7);
    hello.extensions = vec![Offer { receipts: false, resume: Some(Resume { token, received: 0 }) }.to_extension()];
    let mut peer = RawPeer::connect(s.addr).await;
    peer.send(&Frame::Hello(hello)).await;
    let Some(Frame::Welcome(w)) = peer.next_frame().await else { panic!("no WELCOME") };
    assert_eq!(Grant::find(&w.extensions).map(|g| g.status), Some(Status::Resumed));
    let started = tokio::time::Instant::now();
    let mut got = 0;
    while got < N {
        match peer.next_frame().await {
            Some(Frame::Sdata { .. }) => got += 1,
            Some(Frame::Ping { .. }) => panic!("the server's heartbeat came before the hold: {got} of {N} sent"),
            Some(_) => {}
            None => panic!("closed after {got} of {N}"),
        }
    }
    // 800 KB, in well under the heartbeat interval of virtual time.
    assert!(started.elapsed() < Duration::from_secs(5), "the hold took {:?}", started.elapsed());
}

#[tokio::test(start_paused = true)]
async fn a_client_without_the_extension_and_a_v1_client_are_served_as_before() {
    let s = TestServer::start(test_config()).await;
    let plain = Client::connect(s.addr, ClientConfig::new("p")).await.unwrap();
    assert!(Grant::find(&plain.welcome().extensions).is_none());
    let cfg = ClientConfig { protocol_version: 1, reliable: Some(link()), ..ClientConfig::new("v1") };
    let v1 = Client::connect(s.addr, cfg).await.unwrap();
    assert_eq!(v1.welcome().version, 1);
    assert!(v1.reliable().is_none());
}

#[tokio::test(start_paused = true)]
async fn the_application_learns_when_its_message_was_taken_or_why_it_never_will_be() {
    let mut cfg = test_config();
    cfg.hold.expiry = Duration::from_secs(5);
    let s = TestServer::start(cfg).await;
    let lb = link();
    let mut b = connect(s.addr, "b", &lb).await;
    let receipt = s.handle.send_with_receipt("b", Bytes::from_static(b"hello")).expect("b is reliable");
    assert_eq!(data(&mut b, 1).await, ["hello"]);
    let outcome = tokio::time::timeout(PATIENCE, receipt).await.expect("no receipt").expect("server gone");
    assert_eq!(outcome, None, "b's application took it");
    // Offline until its session expires: the receipt says so.
    b.close().await;
    let receipt = s.handle.send_with_receipt("b", Bytes::from_static(b"late")).unwrap();
    let outcome = tokio::time::timeout(PATIENCE, receipt).await.expect("no receipt").expect("server gone");
    assert_eq!(outcome, Some(Undeliverable::Expired));
    // No reliable session: no receipt can be promised.
    let _plain = Client::connect(s.addr, ClientConfig::new("p")).await.unwrap();
    assert!(matches!(s.handle.send_with_receipt("p", Bytes::new()), Err(tether::SendToError::NotReliable(_))));
}

// ---- Found by a review: each failed before its fix. ----

/// The first event that is data, a disconnect, in-doubt or not-delivered, as text.
async fn first_outcome(c: &mut Client) -> String {
    let r = tokio::time::timeout(PATIENCE, async {
        loop {
            match c.next_event().await {
                Some(ClientEvent::Data { payload, .. }) => return format!("data({} bytes)", payload.len()),
                Some(ClientEvent::Disconnected(d)) => return format!("disconnected({:?})", d.reason),
                Some(ClientEvent::InDoubt(v)) => {
                    return format!("in_doubt({:?})", v.iter().map(|m| m.seq).collect::<Vec<_>>())
                }
                Some(ClientEvent::NotDelivered { seqs, why, .. }) => {
                    return format!("not_delivered({} seqs, {why:?})", seqs.len())
                }
                Some(_) => {}
                None => return "stream ended".into(),
            }
        }
    })
    .await;
    r.unwrap_or_else(|_| "nothing within PATIENCE".into())
}

/// A message kept by `ReliableLink::send` before the first connection is sent on it, numbered from 1.
#[tokio::test(start_paused = true)]
async fn a_message_kept_before_the_first_connection_is_sent_on_it() {
    let s = TestServer::start(test_config()).await;
    let (la, lb) = (link(), link());
    let mut b = connect(s.addr, "b", &lb).await;
    assert_eq!(la.send("b", Bytes::from_static(b"early")).unwrap(), 1);
    let mut a = connect(s.addr, "a", &la).await;
    let heard_a = first_outcome(&mut a).await;
    let heard_b = first_outcome(&mut b).await;
    assert_eq!((heard_a.as_str(), heard_b.as_str()), ("nothing within PATIENCE", "data(5 bytes)"));
}

/// The application's largest message to a reliable client is 8 bytes less than to a plain one (the sequence
/// number): one byte more is refused up front, never held unsendable.
#[tokio::test(start_paused = true)]
async fn the_applications_largest_message_to_a_reliable_client_arrives_and_one_more_is_refused() {
    let s = TestServer::start(test_config()).await;
    let lb = link();
    let mut b = connect(s.addr, "b", &lb).await;
    let max = frame::max_reliable_payload(frame::DEFAULT_MAX_FRAME, false);
    let over = s.handle.send("b", Bytes::from(vec![0u8; max + 1]));
    assert_eq!(over, Err(tether::SendToError::TooLarge { len: max + 1, max }));
    s.handle.send("b", Bytes::from(vec![0u8; max])).unwrap();
    assert_eq!(first_outcome(&mut b).await, format!("data({max} bytes)"));
}

/// The relay maximum for a reliable sender, from the longest id, fits the receiver's frame; one byte more is
/// refused by the sender's library.
#[tokio::test(start_paused = true)]
async fn the_reliable_relay_maximum_from_the_longest_id_arrives() {
    let s = TestServer::start(test_config()).await;
    let (la, lb) = (link(), link());
    let long = "a".repeat(128);
    let a = connect(s.addr, &long, &la).await;
    let mut b = connect(s.addr, "b", &lb).await;
    let max = frame::max_reliable_relay_payload(frame::DEFAULT_MAX_FRAME);
    assert!(matches!(
        a.send_reliable(Some("b"), Bytes::from(vec![0u8; max + 1])),
        Err(tether::ClientError::TooLarge { .. })
    ));
    a.send_reliable(Some("b"), Bytes::from(vec![0u8; max])).unwrap();
    assert_eq!(first_outcome(&mut b).await, format!("data({max} bytes)"));
}

/// 8,200 messages expiring at once reach their sender as reports that each fit a frame.
#[tokio::test(start_paused = true)]
async fn an_expiry_of_many_messages_reaches_their_sender_in_frames_that_fit() {
    let (_server, mut a, _) = b_gone_with_a_5s_expiry().await;
    for i in 0..8200u32 {
        a.send_reliable(Some("b"), Bytes::from(i.to_string())).unwrap();
    }
    let mut told = Vec::new();
    while told.len() < 8200 {
        match tokio::time::timeout(PATIENCE, a.next_event()).await.expect("no report").expect("ended") {
            ClientEvent::NotDelivered { seqs, why, .. } => {
                assert_eq!(why, tether::proto::Undeliverable::Expired);
                told.extend(seqs);
            }
            ClientEvent::Disconnected(d) => panic!("{d:?}"),
            _ => {}
        }
    }
    assert_eq!(told, (1..=8200).collect::<Vec<_>>());
}

/// The old connection of a takeover by the same device (same link) no longer touches the session's state.
#[tokio::test(start_paused = true)]
async fn after_a_same_device_takeover_the_new_connection_still_sends() {
    let s = TestServer::start(test_config()).await;
    let (la, lb) = (link(), link());
    let mut a = connect(s.addr, "a", &la).await;
    let mut b1 = connect(s.addr, "b", &lb).await;
    let b2 = connect(s.addr, "b", &lb).await;
    assert_eq!(first_outcome(&mut b1).await, "disconnected(Takeover)");
    b2.send_reliable(Some("a"), Bytes::from_static(b"after")).unwrap();
    assert_eq!(first_outcome(&mut a).await, "data(5 bytes)", "unacknowledged on b: {}", lb.unacknowledged());
}

/// A plain HELLO of the same device ends the reliable session; SDATA already in the old connection's socket is
/// never acknowledged, since no session took it.
#[tokio::test(start_paused = true)]
async fn nothing_is_acknowledged_that_no_session_took() {
    let s = TestServer::start(test_config()).await;
    let mut a = RawPeer::connect(s.addr).await;
    let mut hello = Hello::new(V2, "a", 42);
    hello.extensions = vec![Offer { receipts: true, resume: None }.to_extension()];
    a.send(&Frame::Hello(hello)).await;
    let Some(Frame::Welcome(w)) = a.next_frame().await else { panic!("no WELCOME") };
    Grant::find(&w.extensions).expect("granted");
    let mut plain = RawPeer::connect(s.addr).await;
    // Wait (without sleeping) until the server runs a task for the second connection.
    while s.handle.metrics().connections < 2 {
        tokio::task::yield_now().await;
    }
    // The same device (same nonce) takes the id without the extension; then 20 SDATA reach the old socket.
    plain.send(&Frame::Hello(Hello::new(V2, "a", 42))).await;
    let mut burst = Vec::new();
    for seq in 1..=20u64 {
        burst.extend_from_slice(
            &Frame::Sdata { seq, peer: "a".into(), payload: Bytes::from_static(b"x") }.to_bytes_v(V2),
        );
    }
    a.send_raw(&burst).await;
    let mut seen = Vec::new();
    loop {
        match a.next_frame().await {
            Some(Frame::Ping { .. }) => {}
            Some(f) => {
                let end = matches!(f, Frame::Bye(_));
                seen.push(format!("{f:?}").chars().take(60).collect::<String>());
                if end {
                    break;
                }
            }
            None => break,
        }
    }
    let acked = seen.iter().any(|f| f.starts_with("Ack"));
    assert!(!acked, "acknowledged without a session: {seen:?}; hold of a: {:?}", s.handle.hold("a"));
}

/// Reports are never refused; a sender that never acknowledges them is closed, and each resume takes nothing
/// more from it while its hold is over the bound.
#[tokio::test(start_paused = true)]
async fn a_sender_that_never_acknowledges_cannot_grow_its_hold_across_reconnects() {
    let mut cfg = test_config();
    cfg.hold.per_session = Limits { messages: 10, bytes: 1 << 20 };
    let s = TestServer::start(cfg).await;
    let mut token = None;
    for _cycle in 0..5 {
        let mut p = RawPeer::connect(s.addr).await;
        let mut hello = Hello::new(V2, "a", 42);
        let resume = token.map(|token| Resume { token, received: 0 });
        hello.extensions = vec![Offer { receipts: false, resume }.to_extension()];
        p.send(&Frame::Hello(hello)).await;
        let Some(Frame::Welcome(w)) = p.next_frame().await else { panic!("no WELCOME") };
        let g = Grant::find(&w.extensions).expect("granted");
        token = Some(g.token);
        let next = g.received + 1;
        let mut burst = Vec::new();
        for seq in next..next + 100 {
            burst.extend_from_slice(&Frame::Sdata { seq, peer: "nobody".into(), payload: Bytes::new() }.to_bytes_v(V2));
        }
        p.send_raw(&burst).await;
        // Read (never acknowledging) until the server closes.
        while p.next_frame().await.is_some() {}
    }
    let hold = s.handle.hold("a").expect("a's session");
    assert!(hold.messages <= 10 + 100, "a's hold grew to {} messages (bound 10): {hold:?}", hold.messages);
}

/// A message kept before connecting over v1 (which cannot carry the session) is reported, not left behind.
#[tokio::test(start_paused = true)]
async fn a_kept_message_is_reported_when_the_connection_cannot_carry_it() {
    let s = TestServer::start(test_config()).await;
    let la = link();
    la.send("b", Bytes::from_static(b"kept")).unwrap();
    let cfg = ClientConfig { protocol_version: 1, reliable: Some(la.clone()), ..ClientConfig::new("a") };
    let mut a = Client::connect(s.addr, cfg).await.unwrap();
    let heard = first_outcome(&mut a).await;
    assert_eq!((heard.as_str(), la.unacknowledged()), ("in_doubt([1])", 0));
}

/// A message larger than the session can carry is refused by `ReliableLink::send`, never skipped into a gap.
#[tokio::test(start_paused = true)]
async fn a_kept_message_too_large_for_the_server_is_refused_or_reported_not_a_gap() {
    let s = TestServer::start(test_config()).await;
    let (la, lb) = (link(), link());
    let mut a = connect(s.addr, "a", &la).await;
    let _b = connect(s.addr, "b", &lb).await;
    let sent = la.send("b", Bytes::from(vec![0u8; 70_000]));
    la.send("b", Bytes::from_static(b"small")).unwrap();
    let first = first_outcome(&mut a).await;
    let mut again = Vec::new();
    for _ in 0..2 {
        let mut a = connect(s.addr, "a", &la).await;
        again.push(format!("{:?} then {}", a.reliable().map(|g| g.status), first_outcome(&mut a).await));
    }
    assert!(sent.is_err() || first.starts_with("not_delivered"), "send {sent:?}, then {first}, resuming: {again:?}");
}
