//! The connection state machine under structured input: a server and a client `Connection` joined by a
//! simulated link, with the fuzzer choosing, step by step, what the link delivers (and how it is split), what an
//! attacker injects (well-formed frames of any kind, or raw bytes), how time moves, transport failures, and what
//! the applications do.
//!
//! Properties checked after every step, on both sides:
//! - no panic;
//! - at most one `Closed` event per connection, and once it is out, the close reason never changes;
//! - after `handle_timeout(now)`, the next deadline is later than `now` (a deadline at or before `now` would make
//!   the IO driver spin);
//! - the bytes held for an incomplete frame stay within one largest frame plus its header (nothing is buffered
//!   on the word of a length prefix; a v2 client's largest is what the server announced, at most 16 MiB);
//! - a closed connection asks for nothing: no deadline, no reads.
#![no_main]

use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tether_proto::frame::{self, Bye, Extension, Frame, Hello, Presence, PresenceState, Undeliverable, Welcome};
use tether_proto::{CloseReason, ConnConfig, Connection, DetectorConfig, Event, PhiConfig};

const MAX_FRAME: u32 = 512;

#[derive(Debug, Arbitrary)]
struct Input {
    phi: bool,
    /// The client offers protocol version 1 instead of the highest.
    v1: bool,
    /// Data rate limit in bytes/s, 0 = none.
    rate: u16,
    hello_heartbeat_ms: u16,
    steps: Vec<Step>,
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
    fn build(self) -> Frame {
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
        }
    }
}

struct Side2 {
    conn: Connection,
    closed_events: usize,
    reason: Option<CloseReason>,
    hello_pending: bool,
}

impl Side2 {
    fn check(&mut self, now: Instant, after_timeout: bool) {
        while let Some(ev) = self.conn.poll_event() {
            match ev {
                Event::Closed(c) => {
                    self.closed_events += 1;
                    assert_eq!(self.closed_events, 1, "a second Closed event: {c:?}");
                    self.reason = Some(c.reason);
                }
                Event::Hello(_) => self.hello_pending = true,
                _ => {}
            }
        }
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
        extensions: Vec::new(),
    };
    let mut server =
        Side2 { conn: Connection::server(now, cfg.clone()), closed_events: 0, reason: None, hello_pending: false };
    let mut client =
        Side2 { conn: Connection::client(now, cfg, hello), closed_events: 0, reason: None, hello_pending: false };
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
                dst.conn.handle_bytes(now, &chunk);
            }
            Step::Inject { to, frame } => {
                let dst = pick(&mut server, &mut client, to);
                let bytes = frame.build().to_bytes_v(dst.conn.version());
                dst.conn.handle_bytes(now, &bytes)
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
                            extensions: Vec::new(),
                        };
                        server.conn.accept(now, w);
                    } else {
                        server
                            .conn
                            .reject(now, Bye { reason: reason(r), retry_after_ms: 0, alternative: String::new() });
                    }
                }
            }
            Step::Send { side, frame } => {
                let _ = pick(&mut server, &mut client, side).conn.send(now, frame.build());
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
