//! The connection state machine under structured input: a server and a client `Connection` joined by a
//! simulated link, with the fuzzer choosing, step by step, what the link delivers (and how it is split), what an
//! attacker injects (well-formed frames of any kind, or raw bytes), how time moves, transport failures, and what
//! the applications do.
//!
//! # Layout
//! `Input` (read with `arbitrary`) sets the client's `HELLO` and, for the `reliable` extension, the client's
//! offer (a new session or a resume after some received number) and the grant the server's `WELCOME` carries
//! when `Admit` accepts (its status, `received` and the rest from the input; a status this build does not know
//! makes it ignored; the server grants whether or not the client offered, as a confused server would). Then come
//! the steps. `SDATA`, `ACK` and `REPORT` name their sequence number relative to the side's stream: the next one
//! the receiver expects (for an `ACK`: the last the receiver sent), some before it (a duplicate), some after it
//! (a gap), or any number. Each side is watched: its events, and every frame it queues, read back from
//! `poll_transmit`.
//!
//! Properties checked after every step, on both sides:
//! - no panic;
//! - at most one `Closed` event per connection, and once it is out, the close reason never changes;
//! - after `handle_timeout(now)`, the next deadline is later than `now` (a deadline at or before `now` would make
//!   the IO driver spin);
//! - the bytes held for an incomplete frame stay within one largest frame plus its header (nothing is buffered
//!   on the word of a length prefix; a v2 client's largest is what the server announced, at most 16 MiB);
//! - a closed connection asks for nothing: no deadline, no reads;
//! - `reliable` is in effect exactly when the harness expects it (a v2 `WELCOME` with a grant this build reads,
//!   and for the client, its own offer), and only then does a side give `Sdata`, `SdataTooLarge`, `Report` or
//!   `Acked` events or queue an `ACK`; without it, an injected `SDATA`, `ACK` or `REPORT` on an established
//!   connection ends it with `protocol_error`;
//! - the sequenced events (`Sdata`, `SdataTooLarge`, `Report`) come with strictly consecutive numbers, starting
//!   after the grant's `received` (server) or the resumed stream's (client, when it continues; else 0);
//! - every `ACK` a side queues is at most the last number it took, and never below the one before;
//! - a side queues at most `S / 16 + P + (now - t0) / 20 ms` `ACK`s, where `S` is the sequenced frames it took
//!   (new or duplicates), `P` the `PING`s and `PONG`s it queued (a pending `ACK` rides along with each), and `t0`
//!   when it took the first: each `ACK` covers at least one frame taken since the one before, a full 16 or a
//!   batch whose 20 ms delay ran out (such batches start after the previous `ACK`, so they are 20 ms apart) or
//!   one carried along.
#![no_main]

use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tether_proto::frame::{
    self, Bye, Extension, Frame, Hello, Presence, PresenceState, Report, Undeliverable, Welcome,
};
use tether_proto::reliable::{Grant, LostWhy, Offer, Resume, Status, ACK_DELAY, ACK_EVERY};
use tether_proto::{CloseReason, ConnConfig, Connection, DetectorConfig, Event, PhiConfig, Role, State};

const MAX_FRAME: u32 = 512;

#[derive(Debug, Arbitrary)]
struct Input {
    phi: bool,
    /// The client offers protocol version 1 instead of the highest.
    v1: bool,
    /// Data rate limit in bytes/s, 0 = none.
    rate: u16,
    hello_heartbeat_ms: u16,
    /// The client's `reliable` offer in `HELLO`, if any.
    offer: Option<OfferSpec>,
    /// The `reliable` grant in the server's `WELCOME`, if any.
    grant: Option<GrantSpec>,
    steps: Vec<Step>,
}

#[derive(Debug, Arbitrary)]
struct OfferSpec {
    receipts: bool,
    /// A resume after this many of the server's messages received; none: a new session.
    resume: Option<u16>,
}

#[derive(Debug, Arbitrary)]
struct GrantSpec {
    /// Modulo 5: `New`, `Resumed`, `ResumedWithLoss`, `Fresh`, or a status this build does not know.
    status: u8,
    why: u8,
    received: u16,
    lost: u32,
}

/// The token both specs use: the harness has no session table, only the two connections.
const TOKEN: [u8; 16] = *b"conn-sequence-fz";

impl OfferSpec {
    fn offer(&self) -> Offer {
        let resume = self.resume.map(|r| Resume { token: TOKEN, received: r.into() });
        Offer { receipts: self.receipts, resume }
    }
}

impl GrantSpec {
    fn extension(&self) -> Extension {
        let status =
            [Status::New, Status::Resumed, Status::ResumedWithLoss, Status::Fresh].get(usize::from(self.status % 5));
        let grant = Grant {
            token: TOKEN,
            status: status.copied().unwrap_or(Status::New),
            why: (self.why != 0).then(|| LostWhy::from_code(self.why)),
            received: self.received.into(),
            lost: self.lost,
        };
        let mut e = grant.to_extension();
        if status.is_none() {
            let mut v = e.value.to_vec();
            v[16] = 4 + self.status % 252;
            e.value = Bytes::from(v);
        }
        e
    }
}

/// A sequence number relative to a stream's position (see the module doc).
#[derive(Debug, Arbitrary, Clone, Copy)]
enum Seq {
    Next,
    Back(u8),
    Ahead(u8),
    Any(u64),
}

impl Seq {
    fn at(self, base: u64) -> u64 {
        match self {
            Seq::Next => base,
            Seq::Back(n) => base.saturating_sub(1 + u64::from(n)),
            Seq::Ahead(n) => base.saturating_add(1 + u64::from(n)),
            Seq::Any(n) => n,
        }
    }
}

#[derive(Debug, Arbitrary, Clone, Copy)]
enum Side {
    Server,
    Client,
}

#[derive(Debug, Arbitrary)]
enum Step {
    /// Deliver up to `max` bytes of what `from` has queued to the other side.
    Deliver {
        from: Side,
        max: u16,
    },
    /// An attacker's well-formed frame, delivered to `to`.
    Inject {
        to: Side,
        frame: FrameSpec,
    },
    /// Raw bytes delivered to `to`.
    Raw {
        to: Side,
        bytes: Vec<u8>,
    },
    /// Time passes; both sides' timers are run.
    Advance {
        ms: u16,
    },
    Eof {
        to: Side,
    },
    Error {
        to: Side,
        kind: u8,
        unacked: bool,
    },
    /// The IO layer reports the write half shut, if the side asked for it.
    ShutDone {
        side: Side,
    },
    /// Server application: answer a pending `HELLO`.
    Admit {
        accept: bool,
        reason: u8,
    },
    /// An application sends a frame.
    Send {
        side: Side,
        frame: FrameSpec,
    },
    Close {
        side: Side,
        reason: u8,
    },
    Abort {
        side: Side,
        reason: u8,
    },
    Fail {
        side: Side,
        reason: u8,
    },
    PingPhase {
        fraction: u8,
    },
}

#[derive(Debug, Arbitrary)]
enum FrameSpec {
    Hello {
        version: u8,
        heartbeat_ms: u32,
        nonce: u64,
        id: String,
        credential: Vec<u8>,
        extensions: Vec<(u16, Vec<u8>)>,
    },
    Welcome {
        version: u8,
        heartbeat_ms: u32,
        timeout_ms: u32,
        epoch: u64,
        server_id: String,
        max_frame: u32,
        extensions: Vec<(u16, Vec<u8>)>,
    },
    Ping {
        seq: u32,
        ts_ms: u64,
    },
    Pong {
        seq: u32,
        ts_ms: u64,
    },
    Data {
        peer: String,
        payload: Vec<u8>,
    },
    Subscribe(Vec<String>),
    Unsubscribe(Vec<String>),
    Presence {
        id: String,
        state: u8,
        reason: u8,
        last_seen: u32,
        flags: u8,
    },
    Bye {
        reason: u8,
        retry_after_ms: u32,
        alternative: String,
    },
    Undeliverable {
        to: String,
        why: u8,
    },
    Sdata {
        seq: Seq,
        peer: String,
        payload: Vec<u8>,
    },
    Ack {
        seq: Seq,
    },
    Report {
        seq: Seq,
        peer: String,
        outcome: u8,
        seqs: Vec<u64>,
    },
}

/// A known reason, or now and then one this build does not know (as a newer peer would send).
fn reason(code: u8) -> CloseReason {
    if code >= 240 {
        return CloseReason::Unknown(code);
    }
    CloseReason::ALL[code as usize % CloseReason::ALL.len()]
}

/// At most four extensions, distinct types, short values.
fn extensions(list: Vec<(u16, Vec<u8>)>) -> Vec<Extension> {
    let mut out: Vec<Extension> = Vec::new();
    for (kind, value) in list.into_iter().take(4) {
        if !out.iter().any(|e| e.kind == kind) {
            out.push(Extension { kind, value: Bytes::from(value.into_iter().take(16).collect::<Vec<_>>()) });
        }
    }
    out
}

fn short(s: String) -> String {
    s.chars().take(40).collect()
}

fn id(s: String) -> String {
    let s = short(s);
    if s.is_empty() {
        "x".into()
    } else {
        s
    }
}

impl FrameSpec {
    fn sequenced(&self) -> bool {
        matches!(self, FrameSpec::Sdata { .. } | FrameSpec::Ack { .. } | FrameSpec::Report { .. })
    }

    /// The frame, its sequence number (if any) taken relative to `side`'s streams: what it sends next when
    /// `outgoing` (the application sends it), else what it expects next (an attacker injects it). An application
    /// numbers from 1, as the in-tree ones do (`send` does not check it; the peer's decoder refuses a 0).
    fn build_for(self, side: &Side2, outgoing: bool) -> Frame {
        let base = match (&self, outgoing) {
            (_, true) => side.next_out,
            (FrameSpec::Ack { .. }, false) => side.next_out - 1,
            (_, false) => side.last_in + 1,
        };
        match self.build(base) {
            Frame::Sdata { seq, peer, payload } if outgoing => Frame::Sdata { seq: seq.max(1), peer, payload },
            Frame::Report(mut r) if outgoing => {
                r.seq = r.seq.max(1);
                r.seqs.iter_mut().for_each(|s| *s = (*s).max(1));
                Frame::Report(r)
            }
            f => f,
        }
    }

    fn build(self, base: u64) -> Frame {
        match self {
            FrameSpec::Hello { version, heartbeat_ms, nonce, id: i, credential, extensions: e } => {
                Frame::Hello(Hello {
                    version,
                    heartbeat_ms,
                    nonce,
                    client_id: id(i),
                    credential: Bytes::from(credential.into_iter().take(64).collect::<Vec<_>>()),
                    extensions: extensions(e),
                })
            }
            FrameSpec::Welcome { version, heartbeat_ms, timeout_ms, epoch, server_id, max_frame, extensions: e } => {
                Frame::Welcome(Welcome {
                    version,
                    heartbeat_ms,
                    timeout_ms,
                    epoch,
                    server_id: short(server_id),
                    max_frame: Some(max_frame),
                    extensions: extensions(e),
                })
            }
            FrameSpec::Ping { seq, ts_ms } => Frame::Ping { seq, ts_ms },
            FrameSpec::Pong { seq, ts_ms } => Frame::Pong { seq, ts_ms },
            FrameSpec::Data { peer, payload } => Frame::Data {
                peer: short(peer),
                payload: Bytes::from(payload.into_iter().take(400).collect::<Vec<_>>()),
            },
            FrameSpec::Subscribe(ids) => Frame::Subscribe(ids.into_iter().take(4).map(id).collect()),
            FrameSpec::Unsubscribe(ids) => Frame::Unsubscribe(ids.into_iter().take(4).map(id).collect()),
            FrameSpec::Presence { id: i, state, reason: r, last_seen, flags } => {
                let state = [PresenceState::Online, PresenceState::Suspect, PresenceState::Offline][state as usize % 3];
                let reason = (state == PresenceState::Offline).then(|| reason(r));
                Frame::Presence(Presence { client_id: id(i), state, reason, last_seen_ago_ms: last_seen, flags })
            }
            FrameSpec::Bye { reason: r, retry_after_ms, alternative } => {
                Frame::Bye(Bye { reason: reason(r), retry_after_ms, alternative: short(alternative) })
            }
            FrameSpec::Undeliverable { to, why } => {
                Frame::Undeliverable { to: id(to), why: Undeliverable::from_code(why) }
            }
            FrameSpec::Sdata { seq, peer, payload } => Frame::Sdata {
                seq: seq.at(base),
                peer: short(peer),
                payload: Bytes::from(payload.into_iter().take(400).collect::<Vec<_>>()),
            },
            FrameSpec::Ack { seq } => Frame::Ack { seq: seq.at(base) },
            FrameSpec::Report { seq, peer, outcome, seqs } => Frame::Report(Report {
                seq: seq.at(base),
                peer: short(peer),
                outcome: (outcome != 0).then(|| Undeliverable::from_code(outcome)),
                seqs: seqs.into_iter().take(8).collect(),
            }),
        }
    }
}

struct Side2 {
    conn: Connection,
    closed_events: usize,
    reason: Option<CloseReason>,
    hello_pending: bool,
    /// `reliable` as the harness expects it: whether it is in effect (decided at `WELCOME`); for a client that
    /// offered it (v2), where its inbox starts if its stream continues; the last number the side took, and the
    /// next its application sends.
    reliable: bool,
    resume_from: Option<u64>,
    last_in: u64,
    next_out: u64,
    /// Sequenced frames taken in order, and when the first frame (new or a duplicate) was taken.
    taken: u64,
    first_taken: Option<Instant>,
    /// What it queued, read back: the bytes of `poll_transmit` already read as frames; whether it queued bytes
    /// that are no frame (an answer to a foreign greeting), after which nothing more is read; the `ACK`s (how
    /// many, the last) and the `PING`s and `PONG`s.
    seen: usize,
    opaque: bool,
    acks: u64,
    last_ack: u64,
    pings: u64,
    /// Whether it was ever seen established.
    established: bool,
}

impl Side2 {
    fn new(conn: Connection, resume_from: Option<u64>) -> Side2 {
        Side2 {
            conn,
            closed_events: 0,
            reason: None,
            hello_pending: false,
            reliable: false,
            resume_from,
            last_in: 0,
            next_out: 1,
            taken: 0,
            first_taken: None,
            seen: 0,
            opaque: false,
            acks: 0,
            last_ack: 0,
            pings: 0,
            established: false,
        }
    }

    fn check(&mut self, now: Instant, after_timeout: bool) {
        while let Some(ev) = self.conn.poll_event() {
            match ev {
                Event::Closed(c) => {
                    self.closed_events += 1;
                    assert_eq!(self.closed_events, 1, "a second Closed event: {c:?}");
                    self.reason = Some(c.reason);
                }
                Event::Hello(_) => self.hello_pending = true,
                Event::Welcome(w) => self.welcomed(&w),
                // The owner takes each message at once (as tether's server and client do) and confirms it.
                Event::Sdata { seq, .. } => self.took(now, seq),
                Event::SdataTooLarge { seq, .. } => {
                    assert_eq!(self.conn.role(), Role::Server, "SdataTooLarge({seq}) on a client");
                    self.took(now, seq)
                }
                Event::Report(r) => {
                    assert_eq!(self.conn.role(), Role::Client, "a Report({}) on the server", r.seq);
                    self.took(now, r.seq)
                }
                Event::Acked(seq) => assert!(self.reliable, "Acked({seq}) without the reliable extension"),
                _ => {}
            }
        }
        if self.taken + self.conn.reliable_duplicates() > 0 {
            self.first_taken.get_or_insert(now);
        }
        self.established |= self.conn.state() == State::Established;
        self.read_back(now);
        if let Some(r) = self.reason {
            assert_eq!(self.conn.close_reason(), Some(r), "the close reason changed");
        }
        let largest = MAX_FRAME.max(self.conn.peer_max_frame()) as usize;
        assert!(largest <= frame::MAX_MAX_FRAME as usize, "told to accept {largest}-byte frames");
        assert!(
            self.conn.pending_rx() <= largest + frame::HEADER_LEN,
            "{} bytes buffered for an incomplete frame",
            self.conn.pending_rx()
        );
        if after_timeout {
            if let Some(t) = self.conn.poll_timeout() {
                assert!(t > now, "deadline {:?} not after now after handle_timeout", now - t);
            }
        }
        if self.conn.is_closed() {
            assert_eq!(self.conn.poll_timeout(), None, "a closed connection asks for a timer");
            assert!(!self.conn.wants_read(), "a closed connection asks for reads");
        }
    }

    /// The client's `WELCOME`: `reliable` holds when it offered it and the server granted it in v2; its inbox
    /// continues from its offer if the grant says so, and the server has its stream up to the grant's `received`.
    fn welcomed(&mut self, w: &Welcome) {
        let grant = Grant::find(&w.extensions).filter(|_| w.version >= frame::V2);
        if let (Some(from), Some(g)) = (self.resume_from, grant) {
            self.reliable = true;
            self.last_in = if g.continues() { from } else { 0 };
            self.next_out = g.received.saturating_add(1);
        }
        assert_eq!(self.conn.is_reliable(), self.reliable, "reliable after {w:?}, offered {:?}", self.resume_from);
    }

    /// The server admitted the client with `welcome`: `reliable` holds when it carries a grant in v2, and the
    /// server's inbox starts at its `received`.
    fn admitted(&mut self, welcome: &Welcome, client_from: Option<u64>) {
        let grant = Grant::find(&welcome.extensions).filter(|_| self.conn.version() >= frame::V2);
        if let Some(g) = grant {
            self.reliable = true;
            self.last_in = g.received;
            self.next_out = client_from.filter(|_| g.continues()).unwrap_or(0) + 1;
        }
        assert_eq!(self.conn.is_reliable(), self.reliable, "reliable after admitting with {welcome:?}");
    }

    /// A sequenced event: only with `reliable`, and the next number of the stream.
    fn took(&mut self, now: Instant, seq: u64) {
        assert!(self.reliable && self.conn.is_reliable(), "sequenced event {seq} without the reliable extension");
        assert_eq!(seq, self.last_in + 1, "sequenced event {seq} after {}", self.last_in);
        self.last_in = seq;
        self.taken += 1;
        self.conn.confirm(now, seq);
    }

    /// Read back what the side queued since the last step, and check its `ACK`s.
    fn read_back(&mut self, now: Instant) {
        let tx = self.conn.poll_transmit();
        if tx.len() < self.seen {
            // The connection finished: its output was dropped.
            self.seen = 0;
        }
        while !self.opaque {
            let rest = &tx[self.seen..];
            let parsed = match frame::check(rest, frame::MAX_MAX_FRAME) {
                Ok(None) => break,
                Ok(Some(n)) => Frame::parse_v(&rest[..n], self.conn.version()).map(|f| (f, n)),
                Err(e) => Err(e),
            };
            let Ok((f, n)) = parsed else {
                assert!(!self.established, "queued bytes that are no frame: {parsed:?}");
                self.opaque = true;
                break;
            };
            self.seen += n;
            match f {
                Frame::Ack { seq } => {
                    assert!(self.reliable, "an ACK of {seq} without the reliable extension");
                    assert!(
                        self.last_ack <= seq && seq <= self.last_in,
                        "ACK of {seq} after one of {}, {} taken",
                        self.last_ack,
                        self.last_in
                    );
                    self.acks += 1;
                    self.last_ack = seq;
                }
                Frame::Ping { .. } | Frame::Pong { .. } => self.pings += 1,
                _ => {}
            }
        }
        let taken = self.taken + self.conn.reliable_duplicates();
        let delays = self.first_taken.map_or(0, |t| ((now - t).as_nanos() / ACK_DELAY.as_nanos()) as u64);
        let bound = taken / u64::from(ACK_EVERY) + self.pings + delays;
        assert!(
            self.acks <= bound,
            "{} ACKs for {taken} frames taken, {} PINGs and PONGs, {delays} delays",
            self.acks,
            self.pings
        );
    }
}

fuzz_target!(|input: Input| {
    let mut cfg = ConnConfig { max_frame: MAX_FRAME, ..ConnConfig::default() };
    if input.phi {
        cfg.detector = DetectorConfig::Phi(PhiConfig::default());
    }
    cfg.max_data_rate = (input.rate > 0).then_some(input.rate as u32);
    let mut now = Instant::now();
    let hello = Hello {
        version: if input.v1 { frame::V1 } else { frame::PROTOCOL_VERSION },
        heartbeat_ms: input.hello_heartbeat_ms as u32,
        nonce: 7,
        client_id: "c".into(),
        credential: Bytes::new(),
        extensions: input.offer.iter().map(|o| o.offer().to_extension()).collect(),
    };
    // A v2 client that offers keeps its side of the server's stream from its offer until WELCOME.
    let client_from = input.offer.as_ref().filter(|_| !input.v1).map(|o| o.resume.map_or(0, u64::from));
    let grant: Vec<Extension> = input.grant.iter().map(GrantSpec::extension).collect();
    let mut server = Side2::new(Connection::server(now, cfg.clone()), None);
    let mut client = Side2::new(Connection::client(now, cfg, hello), client_from);
    client.check(now, false);
    for step in input.steps.into_iter().take(200) {
        let mut after_timeout = false;
        match step {
            Step::Deliver { from, max } => {
                let (src, dst) = match from {
                    Side::Server => (&mut server, &mut client),
                    Side::Client => (&mut client, &mut server),
                };
                let out = src.conn.poll_transmit();
                let n = out.len().min(max as usize);
                let chunk = out[..n].to_vec();
                src.conn.handle_written(now, n);
                src.seen = src.seen.saturating_sub(n);
                dst.conn.handle_bytes(now, &chunk);
            }
            Step::Inject { to, frame } => {
                let dst = pick(&mut server, &mut client, to);
                // Without the extension, a sequenced frame on an established connection is a protocol error.
                let refused = frame.sequenced()
                    && dst.conn.state() == State::Established
                    && !dst.conn.is_reliable()
                    && dst.conn.pending_rx() == 0;
                let f = frame.build_for(dst, false);
                dst.conn.handle_bytes(now, &f.to_bytes_v(dst.conn.version()));
                if refused {
                    assert_eq!(dst.conn.close_reason(), Some(CloseReason::ProtocolError), "{f:?} without reliable");
                }
            }
            Step::Raw { to, bytes } => pick(&mut server, &mut client, to).conn.handle_bytes(now, &bytes),
            Step::Advance { ms } => {
                now += Duration::from_millis(ms as u64);
                server.conn.handle_timeout(now);
                client.conn.handle_timeout(now);
                after_timeout = true;
            }
            Step::Eof { to } => pick(&mut server, &mut client, to).conn.handle_eof(now),
            Step::Error { to, kind, unacked } => {
                let kinds = [
                    std::io::Error::from_raw_os_error(110),
                    std::io::Error::from_raw_os_error(113),
                    std::io::ErrorKind::ConnectionReset.into(),
                    std::io::ErrorKind::BrokenPipe.into(),
                ];
                let e = &kinds[kind as usize % kinds.len()];
                pick(&mut server, &mut client, to).conn.handle_error(now, e, unacked);
            }
            Step::ShutDone { side } => {
                let s = pick(&mut server, &mut client, side);
                if s.conn.poll_shutdown_write() {
                    s.conn.handle_write_shutdown();
                }
            }
            Step::Admit { accept, reason: r } => {
                if std::mem::take(&mut server.hello_pending) {
                    if accept {
                        let w = Welcome {
                            version: frame::PROTOCOL_VERSION,
                            heartbeat_ms: 1000,
                            timeout_ms: 3000,
                            epoch: 1,
                            server_id: "s".into(),
                            max_frame: None,
                            extensions: grant.clone(),
                        };
                        let before = server.conn.state();
                        server.conn.accept(now, w.clone());
                        if before == State::Handshake && server.conn.state() != State::Handshake {
                            server.admitted(&w, client_from);
                        }
                    } else {
                        server
                            .conn
                            .reject(now, Bye { reason: reason(r), retry_after_ms: 0, alternative: String::new() });
                    }
                }
            }
            Step::Send { side, frame } => {
                let src = pick(&mut server, &mut client, side);
                let f = frame.build_for(src, true);
                let seq = match &f {
                    Frame::Sdata { seq, .. } => Some(*seq),
                    Frame::Report(r) => Some(r.seq),
                    _ => None,
                };
                if let (Ok(()), Some(seq)) = (src.conn.send(now, f), seq) {
                    src.next_out = src.next_out.max(seq.saturating_add(1));
                }
            }
            Step::Close { side, reason: r } => {
                let bye = Bye { reason: reason(r), retry_after_ms: 0, alternative: String::new() };
                pick(&mut server, &mut client, side).conn.close(now, bye);
            }
            Step::Abort { side, reason: r } => pick(&mut server, &mut client, side).conn.abort(now, reason(r)),
            Step::Fail { side, reason: r } => {
                pick(&mut server, &mut client, side).conn.fail(now, reason(r), false, "fuzz".into())
            }
            Step::PingPhase { fraction } => client.conn.set_ping_phase(fraction as f64 / 255.0),
        }
        server.check(now, after_timeout);
        client.check(now, after_timeout);
    }
});

fn pick<'a>(server: &'a mut Side2, client: &'a mut Side2, side: Side) -> &'a mut Side2 {
    match side {
        Side::Server => server,
        Side::Client => client,
    }
}
