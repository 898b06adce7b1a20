//! State-machine tests with virtual time: a server and a client joined by a simulated link that can go silent.

use super::*;
use crate::detector::PhiConfig;
use crate::frame::V2;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn hello(id: &str) -> Hello {
    Hello {
        version: PROTOCOL_VERSION,
        heartbeat_ms: 1000,
        nonce: 7,
        client_id: id.into(),
        credential: Bytes::new(),
        extensions: vec![],
    }
}

fn hello_v1(id: &str) -> Hello {
    Hello { version: V1, ..hello(id) }
}

/// What a server's `accept` is given; the core fills in the version and the maximum frame.
fn welcome() -> Welcome {
    Welcome {
        version: PROTOCOL_VERSION,
        heartbeat_ms: 1000,
        timeout_ms: 3000,
        epoch: 1,
        server_id: "s".into(),
        max_frame: Some(frame::DEFAULT_MAX_FRAME),
        extensions: vec![],
    }
}

/// Every frame in `out`, read in protocol `version`.
fn frames_in(mut out: &[u8], version: u8) -> Vec<Frame> {
    let mut frames = vec![];
    while let Ok(Some(n)) = frame::check(out, frame::MAX_MAX_FRAME) {
        frames.push(Frame::parse_v(&out[..n], version).unwrap());
        out = &out[n..];
    }
    frames
}

/// A server and a client connection over a link that delivers instantly while `up`, and drops everything otherwise.
struct Pair {
    now: Instant,
    server: Connection,
    client: Connection,
    up: bool,
    /// When false, the server's transport accepts no bytes (a peer that stopped reading).
    server_can_write: bool,
    s_events: Vec<Event>,
    c_events: Vec<Event>,
    /// What the server answers every `HELLO` with.
    welcome: Welcome,
}

impl Pair {
    fn new(cfg: ConnConfig) -> Pair {
        Pair::new_with(cfg, |_| {})
    }

    /// As [`Pair::new`], with `server` prepared before the handshake.
    fn new_with(cfg: ConnConfig, server: impl FnOnce(&mut Connection)) -> Pair {
        Pair::handshake(cfg, server, hello("a"), welcome())
    }

    /// A pair whose client says `hello` and whose server answers `welcome`.
    fn handshake(cfg: ConnConfig, server: impl FnOnce(&mut Connection), hello: Hello, welcome: Welcome) -> Pair {
        let now = Instant::now();
        let mut s = Connection::server(now, cfg.clone());
        server(&mut s);
        let mut p = Pair {
            now,
            server: s,
            client: Connection::client(now, cfg, hello),
            up: true,
            server_can_write: true,
            s_events: vec![],
            c_events: vec![],
            welcome,
        };
        p.pump();
        p
    }

    /// Move bytes both ways and collect events until nothing changes; the server accepts every HELLO.
    fn pump(&mut self) {
        for _ in 0..100 {
            let c_out = self.client.poll_transmit().to_vec();
            self.client.handle_written(self.now, c_out.len());
            let s_out = if self.server_can_write { self.server.poll_transmit().to_vec() } else { vec![] };
            self.server.handle_written(self.now, s_out.len());
            if self.up {
                self.server.handle_bytes(self.now, &c_out);
                self.client.handle_bytes(self.now, &s_out);
            }
            let mut moved = !c_out.is_empty() || !s_out.is_empty();
            while let Some(e) = self.server.poll_event() {
                if matches!(e, Event::Hello(_)) {
                    self.server.accept(self.now, self.welcome.clone());
                }
                self.s_events.push(e);
                moved = true;
            }
            while let Some(e) = self.client.poll_event() {
                self.c_events.push(e);
                moved = true;
            }
            if !moved {
                return;
            }
        }
        panic!("pair did not settle");
    }

    /// Jump virtual time from deadline to deadline until `until`.
    fn run_until(&mut self, until: Instant) {
        loop {
            let next = [self.server.poll_timeout(), self.client.poll_timeout()].into_iter().flatten().min();
            match next {
                Some(t) if t <= until => {
                    self.now = self.now.max(t);
                    self.server.handle_timeout(self.now);
                    self.client.handle_timeout(self.now);
                    self.pump();
                }
                _ => {
                    self.now = until;
                    return;
                }
            }
        }
    }

    fn run_for(&mut self, d: Duration) {
        self.run_until(self.now + d);
    }

    fn closed(events: &[Event]) -> Vec<&Closed> {
        events.iter().filter_map(|e| if let Event::Closed(c) = e { Some(c) } else { None }).collect()
    }
}

#[test]
fn handshake_establishes_both_sides() {
    let p = Pair::new(ConnConfig::default());
    assert_eq!(p.server.state(), State::Established);
    assert_eq!(p.client.state(), State::Established);
    assert!(matches!(&p.s_events[0], Event::Hello(h) if h.client_id == "a"));
    assert!(matches!(&p.c_events[0], Event::Welcome(w) if w.epoch == 1));
    assert_eq!(p.client.heartbeat(), Some((ms(1000), ms(3000))));
}

#[test]
fn idle_link_is_kept_alive_by_one_ping_per_interval() {
    let mut p = Pair::new(ConnConfig::default());
    p.run_for(Duration::from_secs(3600));
    assert_eq!(p.server.state(), State::Established);
    assert_eq!(p.client.state(), State::Established);
    assert!(Pair::closed(&p.s_events).is_empty());
    // The client drives the heartbeat: one PING per 1 s interval, each answered (an RTT each).
    let client_rtts = p.c_events.iter().filter(|e| matches!(e, Event::Rtt(_))).count();
    assert!((3599..=3600).contains(&client_rtts), "{client_rtts} client pings in an hour");
    // The server, the backstop, never had to ping for liveness: its only PINGs are the round-trip probes, one
    // interval after WELCOME and then one per 60 intervals (about 1.7 % of the heartbeat traffic).
    let server_rtts = p.s_events.iter().filter(|e| matches!(e, Event::Rtt(_))).count();
    assert!((60..=61).contains(&server_rtts), "{server_rtts} server probes in an hour");
    // Without probes, the server never pings an active client.
    let mut p = Pair::new(ConnConfig { rtt_probe_every: None, ..ConnConfig::default() });
    p.run_for(Duration::from_secs(3600));
    assert!(!p.s_events.iter().any(|e| matches!(e, Event::Rtt(_))), "the server pinged an active client");
}

#[test]
fn an_idle_connection_holds_nothing_in_flight_between_exchanges() {
    let mut p = Pair::new(ConnConfig::default());
    p.run_for(Duration::from_secs(10));
    // Every PING answered, every byte written and every event taken: both sides gave their in-flight state back.
    assert!(p.server.busy.is_none() && p.client.busy.is_none());
    // Half a frame is held until the rest comes, then released.
    let mut ping = BytesMut::new();
    Frame::Ping { seq: 7, ts_ms: 1 }.encode_v(&mut ping, p.server.version());
    p.server.handle_bytes(p.now, &ping[..3]);
    assert_eq!(p.server.pending_rx(), 3);
    p.server.handle_bytes(p.now, &ping[3..]);
    assert_eq!(p.server.pending_rx(), 0);
    let pong = p.server.poll_transmit().len();
    assert!(pong > 0);
    p.server.handle_written(p.now, pong);
    while p.server.poll_event().is_some() {}
    assert!(p.server.busy.is_none());
}

#[test]
fn a_side_that_keeps_sending_never_pings_and_a_silent_receiver_does() {
    let mut p = Pair::new(ConnConfig::default());
    // The client sends data every 500 ms; it must never need to ping, but the silent server pings.
    for _ in 0..20 {
        p.run_for(ms(500));
        p.client.send(p.now, Frame::Data { peer: String::new(), payload: Bytes::from_static(b"x") }).unwrap();
        let out = p.client.poll_transmit().to_vec();
        let frame = Frame::parse(&out).unwrap();
        assert!(matches!(frame, Frame::Data { .. }), "client queued {frame:?} besides its data");
        p.pump();
    }
    let datas = p.s_events.iter().filter(|e| matches!(e, Event::Data { .. })).count();
    assert_eq!(datas, 20);
    // The server measured RTT from its own pings: it proved the client → server direction too.
    assert!(p.s_events.iter().any(|e| matches!(e, Event::Rtt(_))));
}

#[test]
fn silent_link_is_declared_dead_exactly_at_the_timeout() {
    let mut p = Pair::new(ConnConfig::default());
    p.run_for(ms(2500));
    let last_heard = p.server.last_rx().unwrap();
    p.up = false;
    p.run_for(Duration::from_secs(10));
    let s = Pair::closed(&p.s_events);
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].reason, CloseReason::HeartbeatTimeout);
    assert_eq!(s[0].lateness, Some(Duration::ZERO), "virtual time: the verdict is exactly on its deadline");
    assert!(!s[0].by_peer);
    let c = Pair::closed(&p.c_events);
    assert_eq!(c[0].reason, CloseReason::HeartbeatTimeout);
    // Closed after close_grace (the peer never answered our FIN).
    assert!(p.server.is_closed() && p.client.is_closed());
    assert!(last_heard + ms(3000) <= p.now);
}

#[test]
fn linger_delivers_late_data_but_never_resurrects() {
    let mut p = Pair::new(ConnConfig::default());
    p.up = false;
    p.run_for(ms(3000));
    assert_eq!(p.server.state(), State::Draining);
    assert!(p.server.poll_shutdown_write(), "BYE flushed: write half may be shut");
    p.server.handle_write_shutdown();
    // Late data arrives during the grace: delivered, but the connection stays condemned.
    let late = Frame::Data { peer: String::new(), payload: Bytes::from_static(b"late") }.to_bytes();
    let ping = Frame::Ping { seq: 9, ts_ms: 0 }.to_bytes();
    p.server.handle_bytes(p.now, &ping);
    p.server.handle_bytes(p.now, &late);
    assert!(p.server.poll_transmit().is_empty(), "no PONG from a condemned connection");
    let mut got = vec![];
    while let Some(e) = p.server.poll_event() {
        got.push(e);
    }
    assert!(got.iter().any(|e| matches!(e, Event::Data { payload, .. } if &payload[..] == b"late")));
    assert_eq!(p.server.state(), State::Draining);
    // The peer's FIN ends the linger early.
    p.server.handle_eof(p.now);
    assert!(p.server.is_closed());
    assert_eq!(p.server.close_reason(), Some(CloseReason::HeartbeatTimeout));
}

#[test]
fn frame_before_hello_is_a_protocol_error_with_bye() {
    let now = Instant::now();
    let mut s = Connection::server(now, ConnConfig::default());
    s.handle_bytes(now, &Frame::Ping { seq: 1, ts_ms: 0 }.to_bytes());
    let Some(Event::Closed(c)) = s.poll_event() else { panic!() };
    assert_eq!(c.reason, CloseReason::ProtocolError);
    assert!(c.detail.unwrap().contains("PING before the handshake"));
    let bye = Frame::parse(s.poll_transmit()).unwrap();
    assert!(matches!(bye, Frame::Bye(Bye { reason: CloseReason::ProtocolError, .. })));
    s.handle_written(now, s.poll_transmit().len());
    assert!(s.is_closed(), "refusals close as soon as BYE is flushed");
}

#[test]
fn tls_bytes_on_a_plaintext_connection_are_named_in_the_error() {
    let now = Instant::now();
    // A TLS alert (what a TLS server sends a plaintext client) and a ClientHello's first bytes.
    let alert = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x32];
    let mut c = Connection::client(now, ConnConfig::default(), hello("a"));
    c.handle_written(now, c.poll_transmit().len());
    c.handle_bytes(now, &alert);
    let Some(Event::Closed(closed)) = c.poll_event() else { panic!() };
    assert_eq!(closed.reason, CloseReason::ProtocolError);
    assert!(closed.detail.unwrap().ends_with("the server speaks TLS; connect with TLS"));

    let mut s = Connection::server(now, ConnConfig::default());
    s.handle_bytes(now, &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]);
    let Some(Event::Closed(closed)) = s.poll_event() else { panic!() };
    assert!(closed.detail.unwrap().ends_with("a TLS handshake arrived on a plaintext port"));

    // An ordinary oversized length says nothing about TLS.
    let mut s = Connection::server(now, ConnConfig::default());
    s.handle_bytes(now, &[0x7f, 0x03, 0x01, 0x02, 0x00]);
    let Some(Event::Closed(closed)) = s.poll_event() else { panic!() };
    assert!(!closed.detail.unwrap().contains("TLS"));
}

#[test]
fn failures_below_the_frames_close_at_once_with_their_detail() {
    let mut p = Pair::new(ConnConfig::default());
    p.server.fail(p.now, CloseReason::TlsError, true, "tls: alert received".into());
    assert!(p.server.is_closed());
    let closed: Vec<Closed> = std::iter::from_fn(|| p.server.poll_event())
        .filter_map(|e| if let Event::Closed(c) = e { Some(c) } else { None })
        .collect();
    assert_eq!(closed.len(), 1);
    assert_eq!((closed[0].reason, closed[0].by_peer), (CloseReason::TlsError, true));
    assert_eq!(closed[0].detail.as_deref(), Some("tls: alert received"));
    assert!(p.server.poll_transmit().is_empty(), "no BYE: TLS carries its own alert");
}

/// Found by the `conn_sequence` fuzz target: bytes that failed to decode while a connection lingered were put
/// back into the receive buffer, and everything the peer sent after them piled up behind them until the grace
/// ended (memory a hostile peer controls, and a quadratic copy).
#[test]
fn garbage_while_lingering_is_dropped_not_buffered() {
    let mut p = Pair::new(ConnConfig { max_frame: 256, ..ConnConfig::default() });
    p.server.close(p.now, Bye { reason: CloseReason::Takeover, retry_after_ms: 0, alternative: String::new() });
    p.server.handle_written(p.now, p.server.poll_transmit().len());
    p.server.handle_bytes(p.now, &[0x61, 0, 0, 0, 28]);
    for _ in 0..100 {
        p.server.handle_bytes(p.now, &[0x55; 1000]);
        assert_eq!(p.server.pending_rx(), 0);
    }
    assert_eq!(p.server.close_reason(), Some(CloseReason::Takeover), "the first reason stands");
    // The peer's FIN still ends the linger.
    assert!(p.server.poll_shutdown_write());
    p.server.handle_write_shutdown();
    p.server.handle_eof(p.now);
    assert!(p.server.is_closed());
}

/// Also found by `conn_sequence`: a connection closed while its HELLO awaited admission kept waiting for that
/// admission, so the frames behind it were never read as late frames.
#[test]
fn frames_after_a_close_during_admission_are_read_as_late_frames() {
    let now = Instant::now();
    let mut s = Connection::server(now, ConnConfig::default());
    s.handle_bytes(now, &Frame::Hello(hello("a")).to_bytes());
    assert!(matches!(s.poll_event(), Some(Event::Hello(_))));
    s.close(now, Bye { reason: CloseReason::Kicked, retry_after_ms: 0, alternative: String::new() });
    assert!(matches!(s.poll_event(), Some(Event::Closed(_))));
    s.handle_bytes(now, &Frame::Data { peer: String::new(), payload: Bytes::from_static(b"late") }.to_bytes());
    assert!(matches!(s.poll_event(), Some(Event::Data { payload, .. }) if &payload[..] == b"late"));
    assert_eq!(s.pending_rx(), 0);
}

#[test]
fn second_hello_is_a_protocol_error() {
    let mut p = Pair::new(ConnConfig::default());
    p.server.handle_bytes(p.now, &Frame::Hello(hello("a")).to_bytes());
    let c = p.server.poll_event();
    assert!(matches!(c, Some(Event::Closed(Closed { reason: CloseReason::ProtocolError, .. }))), "{c:?}");
}

#[test]
fn huge_length_prefix_is_refused_without_buffering() {
    let now = Instant::now();
    let mut s = Connection::server(now, ConnConfig::default());
    s.handle_bytes(now, &[0xff, 0xff, 0xff, 0xff, 1, 2, 3]);
    assert_eq!(s.pending_rx(), 0);
    assert_eq!(s.close_reason(), Some(CloseReason::ProtocolError));
}

#[test]
fn partial_frames_are_reassembled_byte_by_byte() {
    let now = Instant::now();
    let mut s = Connection::server(now, ConnConfig::default());
    let bytes = Frame::Hello(hello("dev")).to_bytes();
    for b in bytes.iter() {
        assert!(s.poll_event().is_none());
        s.handle_bytes(now, &[*b]);
    }
    assert!(matches!(s.poll_event(), Some(Event::Hello(h)) if h.client_id == "dev"));
    assert_eq!(s.pending_rx(), 0);
}

#[test]
fn frames_pipelined_after_hello_wait_for_admission() {
    let now = Instant::now();
    let mut s = Connection::server(now, ConnConfig::default());
    let mut bytes = BytesMut::new();
    Frame::Hello(hello("a")).encode(&mut bytes);
    Frame::Subscribe(vec!["b".into()]).encode(&mut bytes);
    s.handle_bytes(now, &bytes);
    assert!(matches!(s.poll_event(), Some(Event::Hello(_))));
    assert!(s.poll_event().is_none(), "SUBSCRIBE must wait for accept");
    s.accept(now, welcome());
    assert!(matches!(s.poll_event(), Some(Event::Subscribe(ids)) if ids == ["b"]));
}

#[test]
fn silent_handshake_times_out_exactly() {
    let now = Instant::now();
    let mut s = Connection::server(now, ConnConfig::default());
    s.handle_bytes(now, &[0, 0]); // half a header, then silence (slowloris)
    assert_eq!(s.poll_timeout(), Some(now + ms(5000)));
    s.handle_timeout(now + ms(5000));
    let Some(Event::Closed(c)) = s.poll_event() else { panic!() };
    assert_eq!((c.reason, c.lateness), (CloseReason::HandshakeTimeout, Some(Duration::ZERO)));
    assert!(matches!(
        Frame::parse(s.poll_transmit()),
        Ok(Frame::Bye(Bye { reason: CloseReason::HandshakeTimeout, .. }))
    ));
}

#[test]
fn peer_bye_reason_is_taken_as_given() {
    let mut p = Pair::new(ConnConfig::default());
    p.server.close(p.now, Bye { reason: CloseReason::Takeover, retry_after_ms: 0, alternative: String::new() });
    p.pump();
    let c = Pair::closed(&p.c_events);
    assert_eq!(c[0].reason, CloseReason::Takeover);
    assert!(c[0].by_peer);
    assert_eq!(Pair::closed(&p.s_events)[0].reason, CloseReason::Takeover);

    let mut p = Pair::new(ConnConfig::default());
    p.client.close(p.now, Bye { reason: CloseReason::Bye, retry_after_ms: 0, alternative: String::new() });
    p.pump();
    assert_eq!(Pair::closed(&p.s_events)[0].reason, CloseReason::Bye);
    assert!(p.server.is_closed(), "the server flushes and closes on the peer's BYE");
}

#[test]
fn eof_without_bye_flushes_then_closes() {
    let mut p = Pair::new(ConnConfig::default());
    p.server.send(p.now, Frame::Data { peer: String::new(), payload: Bytes::from_static(b"last") }).unwrap();
    p.server.handle_eof(p.now);
    assert_eq!(p.server.close_reason(), Some(CloseReason::Eof));
    assert!(!p.server.poll_transmit().is_empty(), "pending data is still flushed after EOF");
    p.server.handle_written(p.now, p.server.poll_transmit().len());
    assert!(p.server.is_closed());
}

#[test]
fn eof_with_unwritable_transport_closes_within_grace() {
    let mut p = Pair::new(ConnConfig::default());
    p.server_can_write = false;
    p.server.send(p.now, Frame::Data { peer: String::new(), payload: Bytes::from_static(b"x") }).unwrap();
    p.server.handle_eof(p.now);
    let t = p.now;
    p.run_for(Duration::from_secs(10));
    assert!(p.server.is_closed());
    assert!(t + ConnConfig::default().close_grace >= p.now - Duration::from_secs(10));
}

#[test]
fn write_that_cannot_drain_is_a_write_timeout() {
    let cfg = ConnConfig { write_timeout: ms(2000), ..ConnConfig::default() };
    let mut p = Pair::new(cfg);
    p.server_can_write = false;
    let t = p.now;
    p.server.send(t, Frame::Data { peer: String::new(), payload: Bytes::from_static(b"x") }).unwrap();
    p.run_for(Duration::from_secs(5));
    let c = Pair::closed(&p.s_events);
    assert_eq!(c[0].reason, CloseReason::WriteTimeout);
    assert_eq!(c[0].lateness, Some(Duration::ZERO));
    assert!(p.server.is_closed());
}

#[test]
fn outbound_overflow_is_a_slow_consumer() {
    let cfg = ConnConfig { max_outbound_bytes: 1000, ..ConnConfig::default() };
    let mut p = Pair::new(cfg);
    p.server_can_write = false;
    let payload = Bytes::from(vec![0u8; 300]);
    for _ in 0..3 {
        p.server.send(p.now, Frame::Data { peer: String::new(), payload: payload.clone() }).unwrap();
    }
    let err = p.server.send(p.now, Frame::Data { peer: String::new(), payload }).unwrap_err();
    assert_eq!(err, SendError::Closed(CloseReason::SlowConsumer));
    assert!(p.server.is_closed());
}

#[test]
fn transport_errors_are_classified() {
    let mut p = Pair::new(ConnConfig::default());
    p.server.handle_error(p.now, &io::Error::from_raw_os_error(110), false);
    assert_eq!(p.server.close_reason(), Some(CloseReason::KeepaliveTimeout));
    assert!(p.server.is_closed());
    let mut p = Pair::new(ConnConfig::default());
    p.server.handle_error(p.now, &io::Error::from_raw_os_error(110), true);
    assert_eq!(p.server.close_reason(), Some(CloseReason::WriteTimeout));
    let mut p = Pair::new(ConnConfig::default());
    p.server.handle_error(p.now, &io::Error::from(io::ErrorKind::ConnectionReset), false);
    assert_eq!(p.server.close_reason(), Some(CloseReason::Reset));
}

#[test]
fn wrong_direction_and_unestablished_sends_are_refused() {
    let now = Instant::now();
    let mut c = Connection::client(now, ConnConfig::default(), hello("a"));
    let data = Frame::Data { peer: String::new(), payload: Bytes::new() };
    assert_eq!(c.send(now, data), Err(SendError::NotEstablished));
    let mut p = Pair::new(ConnConfig::default());
    let presence = Frame::Undeliverable { to: "x".into(), why: Undeliverable::NotOnline };
    assert_eq!(p.client.send(p.now, presence), Err(SendError::WrongDirection("UNDELIVERABLE")));
    let big = Frame::Data { peer: String::new(), payload: Bytes::from(vec![0; 70_000]) };
    assert!(matches!(p.client.send(p.now, big), Err(SendError::TooLarge { .. })));
}

#[test]
fn phi_suspects_then_recovers_then_convicts() {
    let cfg = ConnConfig { detector: DetectorConfig::Phi(PhiConfig::default()), ..ConnConfig::default() };
    let mut p = Pair::new(cfg);
    p.run_for(Duration::from_secs(60)); // a history of regular 1 s pings
    p.up = false;
    p.run_for(ms(1400));
    assert!(p.s_events.iter().any(|e| matches!(e, Event::Suspect { .. })), "suspect before min_timeout");
    assert_eq!(p.server.state(), State::Established);
    p.up = true;
    p.server.handle_bytes(p.now, &Frame::Pong { seq: 0, ts_ms: 0 }.to_bytes());
    assert!(std::iter::from_fn(|| p.server.poll_event()).any(|e| e == Event::Recovered));
    p.up = false;
    p.run_for(Duration::from_secs(10));
    let c = Pair::closed(&p.s_events);
    assert_eq!(c[0].reason, CloseReason::HeartbeatTimeout);
    assert_eq!(c[0].lateness, Some(Duration::ZERO));
}

#[test]
fn heartbeat_requests_are_clamped_and_keep_the_ratio() {
    let pol = HeartbeatPolicy::default();
    assert_eq!(pol.negotiate(0), (ms(5000), ms(15000)));
    assert_eq!(pol.negotiate(1), (ms(100), ms(300)));
    assert_eq!(pol.negotiate(2000), (ms(2000), ms(6000)));
    assert_eq!(pol.negotiate(u32::MAX), (Duration::from_secs(300), Duration::from_secs(900)));
}

/// A deterministic source of arbitrary input (xorshift64*), so the test needs no OS randomness.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn string(&mut self) -> String {
        let len = self.below(140) as usize;
        (0..len).map(|_| char::from(b'a' + self.below(26) as u8)).collect()
    }
    /// Mostly frames the peer of `role` may legally send, sometimes anything (a BYE rarely).
    fn legal_frame(&mut self, role: Role) -> Frame {
        if self.below(10) == 0 {
            return self.frame();
        }
        match (self.below(6), role) {
            (0, _) => Frame::Ping { seq: self.next() as u32, ts_ms: self.next() },
            (1, _) => Frame::Pong { seq: self.next() as u32, ts_ms: self.below(100_000) },
            (2, Role::Server) => Frame::Subscribe(vec!["x".into()]),
            (2, Role::Client) => Frame::Undeliverable { to: "x".into(), why: Undeliverable::NotOnline },
            (3, Role::Server) => Frame::Unsubscribe(vec!["x".into()]),
            (3, Role::Client) => Frame::Presence(Presence {
                client_id: "x".into(),
                state: crate::frame::PresenceState::Online,
                reason: None,
                last_seen_ago_ms: 0,
                flags: 0,
            }),
            _ => Frame::Data { peer: "x".into(), payload: Bytes::from(vec![1; self.below(3000) as usize]) },
        }
    }

    fn frame(&mut self) -> Frame {
        let reason = CloseReason::ALL[self.below(15) as usize];
        match self.below(10) {
            0 => Frame::Hello(Hello {
                version: self.below(4) as u8,
                heartbeat_ms: self.next() as u32,
                nonce: self.next(),
                client_id: self.string(),
                credential: Bytes::new(),
                extensions: vec![],
            }),
            1 => Frame::Welcome(Welcome {
                version: self.below(4) as u8,
                heartbeat_ms: self.next() as u32,
                timeout_ms: self.next() as u32,
                epoch: self.next(),
                server_id: self.string(),
                max_frame: Some(self.next() as u32),
                extensions: vec![],
            }),
            2 => Frame::Ping { seq: self.next() as u32, ts_ms: self.next() },
            3 => Frame::Pong { seq: self.next() as u32, ts_ms: self.next() },
            4 => Frame::Data { peer: self.string(), payload: Bytes::from(vec![0; self.below(2000) as usize]) },
            5 => Frame::Subscribe((0..self.below(4)).map(|_| self.string()).collect()),
            6 => Frame::Unsubscribe((0..self.below(4)).map(|_| self.string()).collect()),
            7 => Frame::Presence(Presence {
                client_id: self.string(),
                state: crate::frame::PresenceState::Offline,
                reason: Some(reason),
                last_seen_ago_ms: self.next() as u32,
                flags: self.next() as u8,
            }),
            8 => Frame::Bye(Bye { reason, retry_after_ms: self.next() as u32, alternative: self.string() }),
            _ => Frame::Undeliverable { to: self.string(), why: Undeliverable::from_code(self.next() as u8) },
        }
    }
}

#[test]
fn arbitrary_input_never_panics_and_always_ends_with_one_reason() {
    let mut rng = Rng(0x5eed_1234_abcd_ef01);
    let (mut established, mut delivered) = (0, 0);
    for round in 0..2000 {
        let t0 = Instant::now();
        let mut now = t0;
        let mut conn = if round % 2 == 0 {
            Connection::server(now, ConnConfig::default())
        } else {
            Connection::client(now, ConnConfig::default(), hello("c"))
        };
        let mut closed = 0;
        let role = conn.role();
        if rng.below(5) != 0 {
            let opening = match role {
                Role::Server => Frame::Hello(hello("peer")),
                Role::Client => Frame::Welcome(welcome()),
            };
            conn.handle_bytes(now, &opening.to_bytes());
        }
        for _ in 0..rng.below(40) {
            match rng.below(8) {
                0..=3 => {
                    let bytes = rng.legal_frame(role).to_bytes_v(conn.version());
                    // Sometimes split or corrupt the bytes.
                    let cut = rng.below(bytes.len() as u64 + 1) as usize;
                    conn.handle_bytes(now, &bytes[..cut]);
                    conn.handle_bytes(now, &bytes[cut..]);
                }
                4 => {
                    let garbage: Vec<u8> = (0..rng.below(64)).map(|_| rng.next() as u8).collect();
                    conn.handle_bytes(now, &garbage);
                }
                5 => {
                    now += Duration::from_millis(rng.below(20_000));
                    conn.handle_timeout(now);
                }
                6 => conn.handle_written(now, rng.below(4096) as usize),
                _ => {
                    if let Some(Event::Hello(_)) = conn.poll_event() {
                        conn.accept(now, welcome());
                    }
                }
            }
            while let Some(e) = conn.poll_event() {
                if let Event::Hello(_) = e {
                    conn.accept(now, welcome());
                }
                closed += matches!(e, Event::Closed(_)) as u32;
                delivered += matches!(e, Event::Data { .. }) as u32;
            }
            established += (conn.state() == State::Established) as u32;
            assert!(conn.pending_rx() <= ConnConfig::default().max_frame as usize + 4);
        }
        // However it went, a connection is closed at most once, and a closed one has its reason.
        assert!(closed <= 1, "round {round}: {closed} Closed events");
        assert_eq!(conn.close_reason().is_some(), closed == 1);
        // And given enough time it always finishes.
        conn.handle_eof(now);
        conn.handle_timeout(now + Duration::from_secs(3600));
        conn.handle_written(now, usize::MAX);
        conn.handle_timeout(now + Duration::from_secs(7200));
        assert!(conn.is_closed(), "round {round}: state {:?}", conn.state());
    }
    // The input reached deep states, not only handshake refusals.
    assert!(established > 1000 && delivered > 100, "established {established}, delivered {delivered}");
}

#[test]
fn client_ping_phase_spreads_the_first_ping_then_keeps_the_interval() {
    let now = Instant::now();
    let first_ping = |phase: f64| {
        let mut c = Connection::client(now, ConnConfig::default(), hello("a"));
        c.set_ping_phase(phase);
        c.handle_written(now, c.poll_transmit().len()); // HELLO out
        c.handle_bytes(now, &Frame::Welcome(welcome()).to_bytes());
        let due = c.poll_timeout().unwrap();
        c.handle_timeout(due);
        assert!(matches!(Frame::parse(c.poll_transmit()), Ok(Frame::Ping { .. })));
        c.handle_written(due, c.poll_transmit().len());
        (due - now, c.poll_timeout().unwrap() - due)
    };
    // Interval 1 s: the first ping after (1 - phase) s, the next one interval later.
    assert_eq!(first_ping(0.0), (ms(1000), ms(1000)));
    assert_eq!(first_ping(0.25), (ms(750), ms(1000)));
    assert_eq!(first_ping(0.9), (ms(100), ms(1000)));
    assert_eq!(first_ping(f64::NAN).0, ms(1000), "nonsense is ignored");
}

#[test]
fn bytes_pipelined_behind_a_pending_hello_are_bounded() {
    let now = Instant::now();
    let mut s = Connection::server(now, ConnConfig::default());
    s.handle_bytes(now, &Frame::Hello(hello("a")).to_bytes());
    assert!(matches!(s.poll_event(), Some(Event::Hello(_))));
    // The admission decision is not in yet (an authenticator may be slow, or deliberately delaying a refusal):
    // a flood behind the HELLO is cut off once it exceeds one largest frame.
    let chunk = vec![0u8; 16 * 1024];
    for _ in 0..8 {
        s.handle_bytes(now, &chunk);
    }
    assert_eq!(s.close_reason(), Some(CloseReason::ProtocolError));
    assert!(s.pending_rx() <= ConnConfig::default().max_frame as usize + 4);
}

#[test]
fn a_ping_flood_is_cut_off_and_normal_pinging_is_not() {
    // A flooding peer: a PING every 10 ms against a 1 s interval.
    let mut p = Pair::new(ConnConfig::default());
    let mut sent = 0;
    while p.server.state() == State::Established && sent < 100 {
        p.now += ms(10);
        p.server.handle_bytes(p.now, &Frame::Ping { seq: sent, ts_ms: 0 }.to_bytes());
        sent += 1;
    }
    assert_eq!(p.server.close_reason(), Some(CloseReason::PingFlood));
    // Interval 1 s, timeout 3 s: an allowance of 3 + 2; the sixth PING of the flood is one too many.
    assert_eq!(ping_allowance(ms(1000), ms(3000)), 5);
    assert_eq!(sent, 6, "cut off right after the allowance");
    // The queued output ends with the goodbye that says why.
    let last = frames_in(p.server.poll_transmit(), p.server.version()).pop();
    assert!(matches!(last, Some(Frame::Bye(Bye { reason: CloseReason::PingFlood, .. }))), "{last:?}");
    // An occasional early ping is forgiven: the allowance refills.
    let mut p = Pair::new(ConnConfig::default());
    for i in 0..50 {
        p.now += if i % 3 == 0 { ms(100) } else { ms(1000) };
        p.server.handle_bytes(p.now, &Frame::Ping { seq: i, ts_ms: 0 }.to_bytes());
    }
    assert_eq!(p.server.state(), State::Established);
    // And an hour of ordinary heartbeats never trips it.
    let mut p = Pair::new(ConnConfig::default());
    p.run_for(Duration::from_secs(3600));
    assert!(Pair::closed(&p.s_events).is_empty() && Pair::closed(&p.c_events).is_empty());
}

#[test]
fn data_above_the_rate_limit_is_cut_off_and_data_within_it_is_not() {
    let cfg = ConnConfig { max_data_rate: Some(1000), max_frame: 1024, ..ConnConfig::default() };
    let data = |n: usize| Frame::Data { peer: String::new(), payload: Bytes::from(vec![0u8; n]) }.to_bytes();
    // 500 bytes/s for a minute: always within the limit.
    let mut p = Pair::new(cfg.clone());
    for _ in 0..120 {
        p.now += ms(1000);
        p.server.handle_bytes(p.now, &data(500));
    }
    assert_eq!(p.server.state(), State::Established);
    // 2,000 bytes/s: the burst (1,024 bytes) goes first, then the limit bites within about a second.
    let mut p = Pair::new(cfg);
    let mut sent = 0;
    while p.server.state() == State::Established && sent < 100 {
        p.now += ms(100);
        p.server.handle_bytes(p.now, &data(200));
        sent += 1;
    }
    assert_eq!(p.server.close_reason(), Some(CloseReason::RateLimited));
    assert!(sent <= 12, "cut off after {sent} frames of 200 bytes");
    let delivered = std::iter::from_fn(|| p.server.poll_event()).filter(|e| matches!(e, Event::Data { .. })).count();
    assert_eq!(delivered, sent as usize - 1, "everything within the limit was delivered, the excess was not");
}

/// The server stalled (SIGSTOP, a long GC, an overloaded host) while a peer kept pinging once per interval: when
/// it resumes it reads the whole backlog at once. That is the server's stall, not the peer's flood.
#[test]
fn a_backlog_of_pings_read_after_our_own_stall_is_not_a_flood() {
    let mut p = Pair::new(ConnConfig::default());
    p.run_for(Duration::from_secs(60));
    // Stalled for just under the 3 s timeout: the peer sent a PING each second meanwhile, plus one on the edge.
    p.now += ms(2999);
    for seq in 0..4 {
        p.server.handle_bytes(p.now, &Frame::Ping { seq, ts_ms: 0 }.to_bytes_v(p.server.version()));
    }
    assert_eq!(p.server.state(), State::Established, "{:?}", Pair::closed(&p.s_events));
    let pongs = frames_in(p.server.poll_transmit(), p.server.version());
    assert_eq!(pongs.iter().filter(|f| matches!(f, Frame::Pong { .. })).count(), 4, "every PING answered");
    // Even the largest backlog a peer can leave (it gives up after the timeout) fits the allowance.
    let mut p = Pair::new(ConnConfig::default());
    p.now += Duration::from_secs(30);
    for seq in 0..ping_allowance(ms(1000), ms(3000)) {
        p.server.handle_bytes(p.now, &Frame::Ping { seq, ts_ms: 0 }.to_bytes_v(p.server.version()));
    }
    assert_eq!(p.server.state(), State::Established);
}

/// Field clients often ping on a fixed timer, answered or not. When this side stalls for longer than the
/// timeout (6 s and 20 s against 1 s / 3 s), such a peer leaves one `PING` per second in our receive queue. It
/// earns no verdict: its `PING`s are paid for by the time we were late. A flood is still cut, stall or not, and
/// the stall's credit does not outlive the backlog.
#[test]
fn a_fixed_timer_pinger_is_not_a_flood_whatever_our_own_stall() {
    let ping = |p: &Pair, seq: u32| Frame::Ping { seq, ts_ms: u64::from(seq) * 1000 }.to_bytes_v(p.server.version());
    for stall in [6, 20] {
        let mut p = Pair::new(ConnConfig::default());
        p.run_for(Duration::from_secs(10));
        // Our stall begins right after the peer's last PING was answered; it pings once a second throughout and
        // once more as we resume: `stall + 1` PINGs, read at one instant (and in two reads, as a large backlog is).
        p.now += Duration::from_secs(stall);
        let backlog: Vec<u8> = (0..=stall as u32).flat_map(|seq| ping(&p, seq)).collect();
        let (first, rest) = backlog.split_at(backlog.len() / 2 + 3);
        p.server.handle_bytes(p.now, first);
        p.server.handle_bytes(p.now + ms(1), rest);
        assert_eq!(p.server.state(), State::Established, "{stall} s: {:?}", Pair::closed(&p.s_events));
        let pongs = frames_in(p.server.poll_transmit(), p.server.version());
        assert_eq!(pongs.iter().filter(|f| matches!(f, Frame::Pong { .. })).count(), stall as usize + 1);
        // The credit went with the backlog: half an interval later a burst beyond the allowance is a flood.
        p.now += ms(600);
        let cap = ping_allowance(ms(1000), ms(3000));
        for seq in 0..=cap {
            p.server.handle_bytes(p.now, &ping(&p, seq));
        }
        assert_eq!(p.server.close_reason(), Some(CloseReason::PingFlood), "{stall} s");
    }
    // A flood during our stall, with honest or forged timestamps, is cut: 1,000 PINGs in 6 s.
    for forged in [false, true] {
        let mut p = Pair::new(ConnConfig::default());
        p.run_for(Duration::from_secs(10));
        p.now += Duration::from_secs(6);
        let ts = |i: u64| if forged { i * 1_000_000 } else { i * 6 };
        let flood: Vec<u8> = (0..1000u32)
            .flat_map(|seq| Frame::Ping { seq, ts_ms: ts(u64::from(seq)) }.to_bytes_v(p.server.version()))
            .collect();
        p.server.handle_bytes(p.now, &flood);
        assert_eq!(p.server.close_reason(), Some(CloseReason::PingFlood), "forged: {forged}");
    }
}

/// The stall credit cannot be aimed at: a burst that arrives just as one of the server's deadlines falls due (1 ms
/// after it, which a peer can time) is judged by the ordinary caps; only a real stall of ours earns credit.
#[test]
fn a_burst_timed_for_a_deadline_earns_no_stall_credit() {
    let cfg = ConnConfig { max_data_rate: Some(1000), max_frame: 1024, ..ConnConfig::default() };
    let data = Frame::Data { peer: String::new(), payload: Bytes::from(vec![0u8; 400]) }.to_bytes();
    let pings: Vec<u8> = (0..7).flat_map(|seq| Frame::Ping { seq, ts_ms: 0 }.to_bytes()).collect();
    for (burst, reason) in [(pings, CloseReason::PingFlood), (data.repeat(5), CloseReason::RateLimited)] {
        let mut p = Pair::new(cfg.clone());
        p.run_for(Duration::from_secs(10));
        let due = p.server.poll_timeout().expect("a deadline");
        p.server.handle_bytes(due + ms(1), &burst);
        assert_eq!(p.server.close_reason(), Some(reason), "1 ms after a deadline");
        // The same burst after a stall of ours (the deadline passed 2 s before) is the stall's backlog.
        let mut p = Pair::new(cfg.clone());
        p.run_for(Duration::from_secs(10));
        let due = p.server.poll_timeout().expect("a deadline");
        p.server.handle_bytes(due + ms(2000), &burst);
        assert_eq!(p.server.close_reason(), None, "after a stall of ours");
    }
}

/// The `DATA` rate limit judges the sender over time too: a peer within the limit whose `DATA` waited out our
/// 6 s stall is not rate limited, and one above it still is.
#[test]
fn data_within_the_rate_limit_is_not_cut_for_waiting_out_our_stall() {
    let cfg = ConnConfig { max_data_rate: Some(1000), max_frame: 1024, ..ConnConfig::default() };
    let data = |n: usize| Frame::Data { peer: String::new(), payload: Bytes::from(vec![0u8; n]) }.to_bytes();
    for (per_second, cut) in [(900, false), (3000, true)] {
        let mut p = Pair::new(cfg.clone());
        p.run_for(Duration::from_secs(10));
        p.now += Duration::from_secs(6);
        // Seven seconds of it, in frames of a third of a second: the stall and the second before it.
        let backlog: Vec<u8> = (0..21).flat_map(|_| data(per_second / 3)).collect();
        p.server.handle_bytes(p.now, &backlog);
        let reason = p.server.close_reason();
        assert_eq!(reason == Some(CloseReason::RateLimited), cut, "{per_second} B/s: {reason:?}");
    }
}

#[test]
fn the_version_is_negotiated_down_and_v1_peers_get_v1_frames() {
    let now = Instant::now();
    // A v1 client: WELCOME v1 (no maximum frame), PRESENCE without flags, UNDELIVERABLE without a reason.
    let mut s = Connection::server(now, ConnConfig::default());
    s.handle_bytes(now, &Frame::Hello(hello_v1("a")).to_bytes());
    assert!(matches!(s.poll_event(), Some(Event::Hello(h)) if h.version == V1));
    s.accept(now, welcome());
    assert_eq!(s.version(), V1);
    let presence = Presence {
        client_id: "b".into(),
        state: frame::PresenceState::Offline,
        reason: Some(CloseReason::Eof),
        last_seen_ago_ms: 5,
        flags: frame::presence_flags::BY_CLIENT,
    };
    s.send(now, Frame::Presence(presence.clone())).unwrap();
    let out = s.poll_transmit().to_vec();
    let frames = frames_in(&out, V1);
    assert!(matches!(&frames[0], Frame::Welcome(w) if w.version == V1 && w.max_frame.is_none()));
    assert_eq!(frames[1], Frame::Presence(Presence { flags: 0, ..presence.clone() }), "v1 has no flags");
    assert_eq!(out.len(), frames[0].encoded_len() + frames[1].encoded_len());

    // A v2 client gets v2, with the server's maximum; a client offering a later version gets v2 too.
    for offered in [V2, 7] {
        let mut s = Connection::server(now, ConnConfig { max_frame: 4096, ..ConnConfig::default() });
        s.handle_bytes(now, &Frame::Hello(Hello { version: offered, ..hello("a") }).to_bytes());
        s.poll_event();
        s.accept(now, Welcome { version: 1, max_frame: None, ..welcome() });
        let frames = frames_in(s.poll_transmit(), V2);
        assert!(matches!(&frames[0], Frame::Welcome(w) if w.version == V2 && w.max_frame == Some(4096)), "{frames:?}");
        s.send(now, Frame::Presence(presence.clone())).unwrap();
    }

    // A client reads the answer in the version it offered, and refuses a higher one.
    let mut c = Connection::client(now, ConnConfig::default(), hello("a"));
    c.handle_written(now, c.poll_transmit().len());
    c.handle_bytes(now, &Frame::Welcome(Welcome { version: 3, ..welcome() }).to_bytes());
    let Some(Event::Closed(closed)) = c.poll_event() else { panic!() };
    assert_eq!(closed.reason, CloseReason::ProtocolError);
    assert!(closed.detail.unwrap().contains("version 3 to an offer of 2"));
}

#[test]
fn a_v2_client_learns_the_servers_maximum_frame() {
    let now = Instant::now();
    let mut c = Connection::client(now, ConnConfig::default(), hello("a"));
    c.handle_written(now, c.poll_transmit().len());
    let w = Welcome { max_frame: Some(200_000), ..welcome() };
    c.handle_bytes(now, &Frame::Welcome(w).to_bytes());
    assert_eq!((c.version(), c.peer_max_frame()), (V2, 200_000));
    // It accepts frames up to the server's maximum, which is above its own default.
    let big = Frame::Data { peer: String::new(), payload: Bytes::from(vec![7; 150_000]) };
    c.handle_bytes(now, &big.to_bytes_v(V2));
    assert!(matches!(c.poll_event(), Some(Event::Welcome(_))));
    assert!(matches!(c.poll_event(), Some(Event::Data { payload, .. }) if payload.len() == 150_000));
    // And it refuses, before sending, what the server would not relay: at most 200,000 - 130 payload bytes.
    let relay = |n: usize| Frame::Data { peer: "b".into(), payload: Bytes::from(vec![1; n]) };
    assert!(c.send(now, relay(199_870)).is_ok());
    assert_eq!(c.send(now, relay(199_871)), Err(SendError::TooLargeToRelay { len: 199_871, max: 199_870 }));
}

#[test]
fn a_payload_too_large_to_relay_is_answered_undeliverable_and_reported() {
    let mut p = Pair::new(ConnConfig::default());
    let max = frame::max_relay_payload(frame::DEFAULT_MAX_FRAME);
    assert_eq!(max, 65_406);
    p.s_events.clear();
    let v = p.server.version();
    let data = |peer: &str, n: usize| Frame::Data { peer: peer.into(), payload: Bytes::from(vec![0; n]) }.to_bytes_v(v);
    // Exactly the relay maximum to a client with a one-byte id: delivered (for the IO layer to relay).
    p.server.handle_bytes(p.now, &data("b", max));
    assert!(matches!(p.server.poll_event(), Some(Event::Data { payload, .. }) if payload.len() == max));
    // One byte more: the sender is told, the server application is told, nothing is relayed.
    p.server.handle_bytes(p.now, &data("b", max + 1));
    assert_eq!(p.server.poll_event(), Some(Event::RelayTooLarge { to: "b".into(), len: max + 1 }));
    let out = frames_in(p.server.poll_transmit(), v);
    assert_eq!(out, vec![Frame::Undeliverable { to: "b".into(), why: Undeliverable::TooLarge }]);
    assert_eq!(p.server.state(), State::Established, "a refused relay costs the sender nothing else");
    // To the server application (empty peer) the whole frame is usable: max_frame - 2 bytes.
    p.server.handle_bytes(p.now, &data("", frame::DEFAULT_MAX_FRAME as usize - 2));
    assert!(matches!(p.server.poll_event(), Some(Event::Data { payload, .. }) if payload.len() == 65_534));
}

#[test]
fn foreign_clients_are_named_and_answered_in_their_own_protocol() {
    let now = Instant::now();
    let refuse = |bytes: &[u8]| {
        let mut s = Connection::server(now, ConnConfig::default());
        s.handle_bytes(now, bytes);
        let Some(Event::Closed(c)) = s.poll_event() else { panic!("not refused") };
        assert_eq!(c.reason, CloseReason::ProtocolError);
        let reply = s.poll_transmit().to_vec();
        s.handle_written(now, reply.len());
        assert!(s.is_closed(), "refusals close once the reply is flushed");
        (c.detail.unwrap(), reply)
    };
    let (detail, reply) = refuse(b"GET / HTTP/1.1\r\nHost: localhost:7400\r\n\r\n");
    assert!(detail.ends_with("an HTTP request arrived on the tether port"), "{detail}");
    let reply = String::from_utf8(reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 400 Bad Request\r\n") && reply.ends_with("not HTTP.\n"), "{reply}");
    // MQTT 3.1.1 CONNECT (protocol level 4): CONNACK, return code 1 (unacceptable protocol version).
    let connect = [0x10, 0x10, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3c, 0x00, 0x04, b'd', b'e'];
    let (detail, reply) = refuse(&connect);
    assert!(detail.ends_with("an MQTT CONNECT arrived on the tether port"), "{detail}");
    assert_eq!(reply, [0x20, 0x02, 0x00, 0x01]);
    // MQTT 5: CONNACK with reason 0x84 (unsupported protocol version).
    let mut v5 = connect;
    v5[8] = 5;
    assert_eq!(refuse(&v5).1, [0x20, 0x03, 0x00, 0x84, 0x00]);
    // SSH: named; there is no cheap answer in its terms, so the tether BYE it is.
    let (detail, reply) = refuse(b"SSH-2.0-OpenSSH_9.2\r\n");
    assert!(detail.ends_with("an SSH client arrived on the tether port"), "{detail}");
    assert!(matches!(Frame::parse(&reply), Ok(Frame::Bye(Bye { reason: CloseReason::ProtocolError, .. }))));
    // A client that reached an HTTP server says so.
    let mut c = Connection::client(now, ConnConfig::default(), hello("a"));
    c.handle_written(now, c.poll_transmit().len());
    c.handle_bytes(now, b"HTTP/1.1 400 Bad Request\r\n");
    let Some(Event::Closed(closed)) = c.poll_event() else { panic!() };
    assert!(closed.detail.unwrap().ends_with("the server answered in HTTP; this is not a tether port"));
}

#[test]
fn a_bye_claiming_a_tls_error_is_a_protocol_error() {
    let mut p = Pair::new(ConnConfig::default());
    let bye = Frame::Bye(Bye { reason: CloseReason::TlsError, retry_after_ms: 0, alternative: String::new() });
    p.server.handle_bytes(p.now, &bye.to_bytes_v(p.server.version()));
    let Some(Event::Closed(c)) = p.server.poll_event() else { panic!() };
    assert_eq!(c.reason, CloseReason::ProtocolError);
    assert!(!c.by_peer);
}

#[test]
fn unknown_reason_codes_are_kept_in_v2_and_refused_in_v1() {
    let bye = [0, 0, 0, 7, 0x09, 0xee, 0, 0, 0, 0, 0];
    assert_eq!(Frame::parse(&bye), Err(frame::FrameError::BadReason(0xee)));
    let mut p = Pair::new(ConnConfig::default());
    p.client.handle_bytes(p.now, &bye);
    let c = Pair::closed(&std::iter::from_fn(|| p.client.poll_event()).collect::<Vec<_>>()).pop().cloned();
    assert_eq!(c.map(|c| (c.reason, c.by_peer)), Some((CloseReason::Unknown(0xee), true)));
}

#[test]
fn who_decided_is_kept() {
    // A peer's reset is the peer's doing; a timeout or an unreachable route is our kernel's verdict.
    for (err, by_peer) in [
        (io::Error::from(io::ErrorKind::ConnectionReset), true),
        (io::Error::from_raw_os_error(110), false),
        (io::Error::from_raw_os_error(113), false),
    ] {
        let mut p = Pair::new(ConnConfig::default());
        p.server.handle_error(p.now, &err, false);
        let closed = std::iter::from_fn(|| p.server.poll_event()).find_map(|e| match e {
            Event::Closed(c) => Some(c),
            _ => None,
        });
        assert_eq!(closed.map(|c| c.by_peer), Some(by_peer), "{err}");
    }
    // A peer that judged us dead says so in its BYE: the reason is its verdict, and it is the peer's.
    let mut p = Pair::new(ConnConfig::default());
    p.client.close(p.now, Bye { reason: CloseReason::HeartbeatTimeout, retry_after_ms: 0, alternative: String::new() });
    p.pump();
    let c = Pair::closed(&p.s_events);
    assert_eq!((c[0].reason, c[0].by_peer), (CloseReason::HeartbeatTimeout, true));
}

/// A server connection that has welcomed client "a" at `t0`, its output written.
fn established_server(t0: Instant) -> Connection {
    let mut s = Connection::server(t0, ConnConfig::default());
    s.handle_bytes(t0, &Frame::Hello(hello("a")).to_bytes());
    assert!(matches!(s.poll_event(), Some(Event::Hello(_))));
    s.accept(t0, welcome());
    s.handle_written(t0, s.poll_transmit().len());
    s
}

#[test]
fn the_servers_probe_rides_on_the_pong_to_the_clients_ping() {
    let t0 = Instant::now();
    let mut s = established_server(t0);
    let frames_after_ping = |s: &mut Connection, at: Instant, seq: u32| {
        s.handle_bytes(at, &Frame::Ping { seq, ts_ms: 1 }.to_bytes_v(s.version()));
        let out = frames_in(s.poll_transmit(), s.version());
        s.handle_written(at, s.poll_transmit().len());
        out
    };
    // Before the probe is due (one interval after WELCOME at phase 0), a PING gets its PONG only.
    let out = frames_after_ping(&mut s, t0 + ms(900), 1);
    assert!(matches!(out[..], [Frame::Pong { seq: 1, .. }]), "{out:?}");
    // Once it is due, the probe goes in the same write as the PONG: no timer of its own.
    assert!(s.poll_timeout().unwrap() > t0 + ms(1900), "no wakeup is armed for the probe");
    let out = frames_after_ping(&mut s, t0 + ms(1900), 2);
    assert!(matches!(out[..], [Frame::Pong { seq: 2, .. }, Frame::Ping { .. }]), "{out:?}");
    // The next one is 60 intervals later.
    let out = frames_after_ping(&mut s, t0 + ms(2900), 3);
    assert!(matches!(out[..], [Frame::Pong { seq: 3, .. }]), "{out:?}");
    let out = frames_after_ping(&mut s, t0 + ms(61_950), 4);
    assert!(matches!(out[..], [Frame::Pong { seq: 4, .. }, Frame::Ping { .. }]), "{out:?}");
}

#[test]
fn the_servers_first_probe_falls_at_its_phase_within_twelve_intervals() {
    let first_probe_ms = |phase: f64| {
        let mut p = Pair::new_with(ConnConfig::default(), |server| server.set_ping_phase(phase));
        let start = p.now;
        while !p.s_events.iter().any(|e| matches!(e, Event::Rtt(_))) {
            assert!(p.now - start < Duration::from_secs(60), "no probe within a minute");
            p.run_for(ms(10));
        }
        (p.now - start).as_millis()
    };
    // Interval 1 s, the client pinging every second: the probe rides on the first client PING at or after
    // 1 s + phase × 11 s.
    assert!((1000..=1010).contains(&first_probe_ms(0.0)), "{}", first_probe_ms(0.0));
    assert!((7000..=7010).contains(&first_probe_ms(0.5)), "{}", first_probe_ms(0.5));
    assert!((12_000..=12_010).contains(&first_probe_ms(0.99)), "{}", first_probe_ms(0.99));
}

#[test]
fn only_the_answer_to_our_last_ping_is_a_round_trip_measured_in_microseconds() {
    let t0 = Instant::now();
    let mut c = Connection::client(t0, ConnConfig::default(), hello("a"));
    c.handle_written(t0, c.poll_transmit().len());
    c.handle_bytes(t0, &Frame::Welcome(welcome()).to_bytes());
    assert!(matches!(c.poll_event(), Some(Event::Welcome(_))));
    let rtts =
        |c: &mut Connection| std::iter::from_fn(|| c.poll_event()).filter(|e| matches!(e, Event::Rtt(_))).count();
    // Unsolicited PONGs (no PING of ours outstanding) are no round trip, whatever they claim.
    c.handle_bytes(t0 + ms(10), &Frame::Pong { seq: 0, ts_ms: 0 }.to_bytes_v(c.version()));
    assert_eq!(rtts(&mut c), 0);
    // Our PING one interval later, answered 250 µs after: that exact round trip, once.
    let at = t0 + ms(1000);
    c.handle_timeout(at);
    let out = frames_in(c.poll_transmit(), c.version());
    c.handle_written(at, c.poll_transmit().len());
    let [Frame::Ping { seq, ts_ms }] = out[..] else { panic!("{out:?}") };
    let back = at + Duration::from_micros(250);
    c.handle_bytes(back, &Frame::Pong { seq: seq.wrapping_add(1), ts_ms }.to_bytes_v(c.version()));
    assert_eq!(rtts(&mut c), 0, "a PONG for another seq is ignored");
    c.handle_bytes(back, &Frame::Pong { seq, ts_ms }.to_bytes_v(c.version()));
    assert_eq!(c.rtt(), Some(Duration::from_micros(250)));
    c.handle_bytes(back + ms(1), &Frame::Pong { seq, ts_ms: 0 }.to_bytes_v(c.version()));
    assert_eq!(c.rtt(), Some(Duration::from_micros(250)), "a repeated PONG is not a second round trip");
}

#[test]
fn probes_stop_rather_than_fire_on_every_ping_beyond_49_days() {
    let t0 = Instant::now();
    let mut s = established_server(t0);
    // Fifty days on (no timer was run, so no verdict was taken meanwhile): PINGs at the interval get PONGs, and
    // a probe at most once, not one per PING.
    let old = t0 + Duration::from_secs(50 * 86_400);
    s.handle_bytes(old, &Frame::Ping { seq: 1, ts_ms: 1 }.to_bytes_v(s.version()));
    s.handle_written(old, s.poll_transmit().len());
    for i in 0..5u32 {
        let at = old + ms(1000 * (i as u64 + 1));
        s.handle_bytes(at, &Frame::Ping { seq: 2 + i, ts_ms: 1 }.to_bytes_v(s.version()));
        let out = frames_in(s.poll_transmit(), s.version());
        s.handle_written(at, s.poll_transmit().len());
        assert!(matches!(out[..], [Frame::Pong { .. }]), "PING {i}: {out:?}");
    }
    assert!(!s.is_closed());
}

#[test]
fn a_probe_on_request_measures_the_next_pong_only() {
    let t0 = Instant::now();
    let mut s = established_server(t0);
    let at = t0 + ms(100);
    s.probe_now(at);
    let out = frames_in(s.poll_transmit(), s.version());
    s.handle_written(at, s.poll_transmit().len());
    let [Frame::Ping { seq, ts_ms }] = out[..] else { panic!("{out:?}") };
    s.handle_bytes(at + ms(3), &Frame::Pong { seq, ts_ms }.to_bytes_v(s.version()));
    assert_eq!(s.rtt(), Some(ms(3)));
    // Not established: nothing is sent.
    let mut fresh = Connection::server(t0, ConnConfig::default());
    fresh.probe_now(t0);
    assert!(fresh.poll_transmit().is_empty());
}

#[test]
fn the_kernel_queue_is_stalled_when_output_waits_with_nothing_in_flight_whether_or_not_it_probes() {
    let q = |unacked, notsent, probing, since_data_sent_ms| KernelQueue {
        unacked,
        notsent,
        retransmitting: false,
        zero_window: probing,
        since_ack: Duration::from_millis(10),
        since_data_sent: Duration::from_millis(since_data_sent_ms),
    };
    // The window closed, and the peer's own segments keep resetting the probe count: nothing sent for 3 s.
    assert_eq!(q(0, 1_600_000, false, 3000).stalled_for(), Duration::from_millis(3000));
    // The same while the kernel probes.
    assert_eq!(q(0, 1_600_000, true, 3000).stalled_for(), Duration::from_millis(3000));
    // Data in flight and acknowledged as it goes (the last ACK 10 ms ago): progress.
    assert_eq!(q(10, 1_600_000, false, 3000).stalled_for(), Duration::ZERO);
    // Nothing held: nothing stalled.
    assert_eq!(q(0, 0, false, 3000).stalled_for(), Duration::ZERO);
}

/// The `reliable` extension on a connection: sequence checks, cumulative acks, and its refusal when not granted.
mod reliable_ext {
    use super::*;
    use crate::reliable::{Grant, Offer, Resume, Status, ACK_DELAY};

    fn offer_hello(resume: Option<Resume>) -> Hello {
        let mut h = hello("a");
        h.extensions = vec![Offer { receipts: false, resume }.to_extension()];
        h
    }

    fn grant(status: Status, received: u64) -> Grant {
        Grant { token: [1; 16], status, why: None, received, lost: 0 }
    }

    /// A server and a client joined directly; `granted`: the server's `WELCOME` carries the grant.
    fn pair(now: Instant, hello: Hello, granted: Option<Grant>) -> (Connection, Connection) {
        let cfg = ConnConfig::default();
        let mut s = Connection::server(now, cfg.clone());
        let mut c = Connection::client(now, cfg, hello);
        s.handle_bytes(now, &take(&mut c, now));
        assert!(matches!(s.poll_event(), Some(Event::Hello(_))));
        let mut w = welcome();
        w.extensions = granted.iter().map(Grant::to_extension).collect();
        s.accept(now, w);
        c.handle_bytes(now, &take(&mut s, now));
        assert!(matches!(c.poll_event(), Some(Event::Welcome(_))));
        (s, c)
    }

    fn take(c: &mut Connection, now: Instant) -> Vec<u8> {
        let out = c.poll_transmit().to_vec();
        c.handle_written(now, out.len());
        out
    }

    fn sdata(seq: u64) -> Frame {
        Frame::Sdata { seq, peer: "b".into(), payload: Bytes::from_static(b"m") }
    }

    fn events(c: &mut Connection) -> Vec<Event> {
        std::iter::from_fn(|| c.poll_event()).collect()
    }

    #[test]
    fn sequenced_data_arrives_once_in_order_and_is_acknowledged_once_per_sixteen() {
        let now = Instant::now();
        let (mut s, mut c) = pair(now, offer_hello(None), Some(grant(Status::New, 0)));
        for seq in 1..=40 {
            c.send(now, sdata(seq)).unwrap();
        }
        s.handle_bytes(now, &take(&mut c, now));
        let got: Vec<u64> = events(&mut s)
            .into_iter()
            .map(|e| match e {
                Event::Sdata { seq, .. } => seq,
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(got, (1..=40).collect::<Vec<_>>());
        assert!(s.poll_transmit().is_empty(), "nothing acknowledged before the owner took it");
        // The owner takes them one by one, as the server does.
        for seq in got {
            s.confirm(now, seq);
        }
        let acks = frames_in(&take(&mut s, now), V2);
        assert_eq!(acks, vec![Frame::Ack { seq: 16 }, Frame::Ack { seq: 32 }], "one ACK per 16, none per message");
        // The rest is acknowledged when the delay is up, exactly then.
        assert_eq!(s.poll_timeout(), Some(now + ACK_DELAY));
        s.handle_timeout(now + ACK_DELAY);
        assert_eq!(frames_in(&take(&mut s, now), V2), vec![Frame::Ack { seq: 40 }]);
        c.handle_bytes(now, &Frame::Ack { seq: 40 }.to_bytes_v(V2));
        assert_eq!(events(&mut c), vec![Event::Acked(40)]);
    }

    #[test]
    fn a_duplicate_is_dropped_and_a_gap_is_a_protocol_error() {
        let now = Instant::now();
        let (mut s, mut c) = pair(now, offer_hello(None), Some(grant(Status::New, 0)));
        c.send(now, sdata(1)).unwrap();
        c.send(now, sdata(1)).unwrap();
        s.handle_bytes(now, &take(&mut c, now));
        assert_eq!(events(&mut s).len(), 1, "the replayed 1 is dropped");
        c.send(now, sdata(3)).unwrap();
        s.handle_bytes(now, &take(&mut c, now));
        match events(&mut s).as_slice() {
            [Event::Closed(cl)] => {
                assert_eq!(cl.reason, CloseReason::ProtocolError);
                assert_eq!(cl.detail.as_deref(), Some("sequence number 3 where 2 was next"));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn a_pending_ack_rides_with_the_ping_sent_anyway() {
        let now = Instant::now();
        let (mut s, mut c) = pair(now, offer_hello(None), Some(grant(Status::New, 0)));
        s.send(now, sdata(1)).unwrap();
        c.handle_bytes(now, &take(&mut s, now));
        c.confirm(now, 1);
        // The client's PING falls due before the ack delay would: the ACK goes in the same write.
        let ping_at = c.poll_timeout().unwrap();
        assert!(ping_at <= now + ACK_DELAY);
        let later = now + ACK_DELAY / 2;
        c.probe_now(later);
        let out = frames_in(&take(&mut c, later), V2);
        assert_eq!(out[0], Frame::Ack { seq: 1 });
        assert!(matches!(out[1], Frame::Ping { .. }));
    }

    #[test]
    fn a_continued_stream_starts_after_what_the_client_said_it_had() {
        let now = Instant::now();
        let resume = Resume { token: [1; 16], received: 7 };
        let (mut s, mut c) = pair(now, offer_hello(Some(resume)), Some(grant(Status::Resumed, 3)));
        s.send(now, sdata(7)).unwrap();
        s.send(now, sdata(8)).unwrap();
        c.handle_bytes(now, &take(&mut s, now));
        assert!(matches!(events(&mut c).as_slice(), [Event::Sdata { seq: 8, .. }]), "7 it had: dropped");
        // The server resumes the client's stream after 3.
        c.send(now, sdata(4)).unwrap();
        s.handle_bytes(now, &take(&mut c, now));
        assert!(matches!(events(&mut s).as_slice(), [Event::Sdata { seq: 4, .. }]));
        // A stream that does not continue starts again at 1.
        let (mut s, mut c) = pair(now, offer_hello(Some(resume)), Some(grant(Status::Fresh, 0)));
        s.send(now, sdata(1)).unwrap();
        c.handle_bytes(now, &take(&mut s, now));
        assert!(matches!(events(&mut c).as_slice(), [Event::Sdata { seq: 1, .. }]));
    }

    #[test]
    fn a_client_that_closes_before_welcome_takes_nothing_into_the_stream_it_offered() {
        let now = Instant::now();
        let cfg = ConnConfig::default();
        let resume = Resume { token: [1; 16], received: 7 };
        let mut c = Connection::client(now, cfg, offer_hello(Some(resume)));
        take(&mut c, now);
        let bye = Bye { reason: CloseReason::Bye, retry_after_ms: 0, alternative: String::new() };
        c.close(now, bye);
        // The server's WELCOME (restarting the stream) and its first SDATA arrive as the client lingers.
        let mut w = welcome();
        w.extensions = vec![grant(Status::Fresh, 0).to_extension()];
        let mut bytes = Frame::Welcome(w).to_bytes_v(V2).to_vec();
        bytes.extend_from_slice(&sdata(8).to_bytes_v(V2));
        c.handle_bytes(now, &bytes);
        assert!(!c.is_reliable());
        assert!(events(&mut c).iter().all(|e| !matches!(e, Event::Sdata { .. })), "nothing taken into the old stream");
    }

    #[test]
    fn without_the_grant_sequenced_frames_are_refused_both_ways() {
        let now = Instant::now();
        let (mut s, mut c) = pair(now, offer_hello(None), None);
        assert_eq!(c.send(now, sdata(1)), Err(SendError::NotReliable));
        s.handle_bytes(now, &sdata(1).to_bytes_v(V2));
        match events(&mut s).as_slice() {
            [Event::Closed(cl)] => {
                assert_eq!(cl.detail.as_deref(), Some("SDATA without the reliable extension"))
            }
            other => panic!("unexpected {other:?}"),
        }
        // A v1 session never has it, whatever was asked.
        let mut h = offer_hello(None);
        h.version = V1;
        let (_, mut c) = pair(now, h, Some(grant(Status::New, 0)));
        assert_eq!(c.send(now, sdata(1)), Err(SendError::NotReliable));
    }
}

/// A pair with `heartbeat_update` granted for 500 ms to 60 s, and the client watching its `PING`s.
fn updatable_pair() -> Pair {
    updatable_pair_with(welcome())
}

fn updatable_pair_with(welcome: Welcome) -> Pair {
    let cfg = ConnConfig { pong_grace: Some(ms(300)), rtt_probe_every: None, ..ConnConfig::default() };
    let hello = Hello { extensions: vec![HeartbeatRange::offer()], ..hello("a") };
    let range = HeartbeatRange { min_ms: 500, max_ms: 60_000 };
    let welcome = Welcome { extensions: vec![range.extension()], ..welcome };
    Pair::handshake(cfg, |_| {}, hello, welcome)
}

#[test]
fn a_granted_heartbeat_change_moves_both_sides_and_their_deadlines() {
    let mut p = updatable_pair();
    p.run_for(ms(2500));
    p.client.request_heartbeat(p.now, Duration::from_secs(10)).unwrap();
    p.pump();
    let asked = p.s_events.iter().find_map(|e| match e {
        Event::HeartbeatRequest { interval_ms } => Some(*interval_ms),
        _ => None,
    });
    assert_eq!(asked, Some(10_000));
    // Until the server answers, neither side changed.
    assert_eq!(p.client.heartbeat(), Some((ms(1000), ms(3000))));
    p.server.set_heartbeat(p.now, Duration::from_secs(10), Duration::from_secs(30));
    p.pump();
    assert_eq!(p.server.heartbeat(), Some((ms(10_000), ms(30_000))));
    assert_eq!(p.client.heartbeat(), Some((ms(10_000), ms(30_000))));
    assert!(p.c_events.contains(&Event::HeartbeatChanged { interval: ms(10_000), timeout: ms(30_000) }));
    // One PING per 10 s now: each answered after about 10 s of silence, and neither side convicts.
    p.c_events.clear();
    p.run_for(Duration::from_secs(60));
    let held: Vec<Duration> =
        p.c_events.iter().filter_map(|e| if let Event::PathHeld { idle } = e { Some(*idle) } else { None }).collect();
    assert_eq!(held.len(), 6, "{held:?}");
    assert!(held.iter().all(|i| *i >= ms(9_900) && *i <= ms(10_000)), "{held:?}");
    assert!(Pair::closed(&p.s_events).is_empty() && Pair::closed(&p.c_events).is_empty());
    // The server's new deadline: silence is convicted 30 s after the last frame, not 3 s.
    let last = p.server.last_rx().unwrap();
    p.up = false;
    p.run_until(last + Duration::from_secs(30) - ms(1));
    assert!(Pair::closed(&p.s_events).is_empty(), "convicted before the new timeout");
    p.run_for(ms(1));
    let s = Pair::closed(&p.s_events);
    assert_eq!(s[0].reason, CloseReason::HeartbeatTimeout);
}

#[test]
fn a_ping_the_path_lost_is_reported_late_once_per_grace_with_the_first_silence() {
    // A 10 s timeout: several PINGs go unanswered before any verdict.
    let mut p = updatable_pair_with(Welcome { timeout_ms: 10_000, ..welcome() });
    p.run_for(ms(2500));
    p.up = false;
    p.c_events.clear();
    p.run_for(ms(1000));
    let late = |p: &Pair| -> Vec<(Duration, Duration)> {
        p.c_events
            .iter()
            .filter_map(|e| if let Event::PongLate { idle, waited } = e { Some((*idle, *waited)) } else { None })
            .collect()
    };
    assert_eq!(late(&p).len(), 1, "{:?}", p.c_events);
    let (idle, waited) = late(&p)[0];
    assert!(idle >= ms(900) && idle <= ms(1000), "{idle:?}");
    assert_eq!(waited, ms(300));
    assert_eq!(p.client.unanswered_ping(), Some(idle));
    // Still down: each later PING, unanswered too, is reported again, with the silence before the first one
    // (the later PINGs follow our own unanswered ones, not a silence of the path).
    p.run_for(ms(2000));
    let all = late(&p);
    assert_eq!(all.len(), 3, "{all:?}");
    assert!(all.iter().all(|(i, _)| *i == idle), "{all:?}");
    // The path is back: the PONG says it held after that first silence.
    p.up = true;
    p.run_for(ms(1000));
    assert!(p.c_events.contains(&Event::PathHeld { idle }), "{:?}", p.c_events);
    assert_eq!(p.client.unanswered_ping(), None);
}

#[test]
fn the_ping_phase_is_set_before_the_handshake_only() {
    let mut p = updatable_pair();
    p.run_for(ms(2500));
    let before = p.client.unanswered_ping();
    p.client.set_ping_phase(0.9);
    p.up = false;
    p.run_for(ms(1000));
    let idle = p.client.unanswered_ping().expect("a PING waits");
    assert!(idle <= ms(1000), "the phase was read as a silence: {idle:?} (before: {before:?})");
}

#[test]
fn heartbeat_frames_need_the_extension_and_the_right_direction() {
    // Not granted: the client may not ask, and a HEARTBEAT from it is a protocol error.
    let mut p = Pair::new(ConnConfig::default());
    assert_eq!(p.client.request_heartbeat(p.now, ms(5000)), Err(SendError::NoHeartbeatUpdate));
    let bytes = Frame::Heartbeat { interval_ms: 5000, timeout_ms: 0 }.to_bytes_v(V2);
    p.server.handle_bytes(p.now, &bytes);
    p.pump();
    let s = Pair::closed(&p.s_events);
    assert_eq!(s[0].reason, CloseReason::ProtocolError);
    assert!(s[0].detail.as_deref().unwrap().contains("without the heartbeat_update extension"), "{s:?}");
    // Granted: a server's grant that makes no sense is a protocol error on the client.
    let mut p = updatable_pair();
    let bytes = Frame::Heartbeat { interval_ms: 5000, timeout_ms: 1000 }.to_bytes_v(V2);
    p.client.handle_bytes(p.now, &bytes);
    p.pump();
    assert_eq!(Pair::closed(&p.c_events)[0].reason, CloseReason::ProtocolError);
    // Requests are policed with the PINGs.
    let mut p = updatable_pair();
    for _ in 0..20 {
        let bytes = Frame::Heartbeat { interval_ms: 5000, timeout_ms: 0 }.to_bytes_v(V2);
        p.server.handle_bytes(p.now, &bytes);
    }
    p.pump();
    assert_eq!(Pair::closed(&p.s_events)[0].reason, CloseReason::PingFlood);
}
