//! The connection state machine, shared by server and client.
//!
//! # Layout
//! A [`Connection`] is driven by the IO layer through `handle_*` calls (bytes arrived, bytes written, end of
//! stream, transport error, timer fired, application commands) and read back through `poll_*` calls (bytes to
//! write, whether to shut down the write half, the single next deadline, events). It never reads a clock: every
//! call takes `now`.
//!
//! States: `Handshake` → `Established` → `Draining` → `Closed`. The first decision that ends a connection fixes its
//! [`CloseReason`] and emits [`Event::Closed`] at once; `Draining` then only finishes the goodbye (flush a `BYE`,
//! half-close, read late data) within `close_grace`, and nothing in it can resurrect the connection.
//!
//! Buffers are lazy: the receive buffer holds only an incomplete frame, the transmit buffer only unwritten bytes,
//! and the event queue only undelivered events; each is released when it empties, so an idle connection pins no
//! buffer memory.
//!
//! Write progress is judged on both sides of the socket: bytes still in `tx` that make no progress for
//! `write_timeout`, and bytes the kernel holds ([`KernelQueue`]) that it can neither deliver nor send for as long.
//! Small frames to a peer that stopped reading fit in the kernel's send buffer and never stall `tx`; the kernel's
//! retransmission and zero-window-probe state tells how long its queue has been stuck. The IO layer reads that
//! state only when [`Connection::kernel_check_due`] says so: at most once per `write_timeout` of output, at a
//! moment the connection was awake anyway.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};

use crate::detector::{Deadlines, Detector, DetectorConfig};
use crate::frame::{
    self, Bye, Foreign, Frame, HeartbeatRange, Hello, Presence, Report, Undeliverable, Welcome, PROTOCOL_VERSION, V1,
};
use crate::reason::CloseReason;
use crate::reliable::{self, Accept, Inbox};

/// How far past one of its own deadlines a connection must be when input is handled to take it as its own stall
/// (stopped, starved of CPU) rather than timing: a timer that fires on time is late by a millisecond or two.
pub const OWN_STALL: Duration = Duration::from_millis(50);

/// The most `PING`s a peer may send in a burst with a heartbeat of `interval` and `timeout`:
/// `⌈timeout / interval⌉ + 2`. A peer pings at most once per interval and gives up after `timeout` of silence, so
/// even when this side stalled (and read a whole backlog of `PING`s at once) a well-behaved peer never has more
/// than `timeout / interval + 1` waiting. The allowance refills at one `PING` per half interval.
pub fn ping_allowance(interval: Duration, timeout: Duration) -> u32 {
    let ratio = timeout.as_nanos().div_ceil(interval.as_nanos().max(1));
    ratio.min(u32::MAX as u128 - 2) as u32 + 2
}

/// What the kernel holds of a connection's output (from `TCP_INFO` on Linux), for the write-progress rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KernelQueue {
    /// Segments sent and not acknowledged.
    pub unacked: u32,
    /// Bytes written to the socket and not sent yet.
    pub notsent: u32,
    /// The kernel is retransmitting on its timer: nothing it sent was acknowledged for `since_ack`.
    pub retransmitting: bool,
    /// The peer's window is closed: output waits and nothing is in flight, or the kernel is probing the window.
    /// No data was sent for `since_data_sent`.
    pub zero_window: bool,
    /// Time since the last acknowledgement arrived.
    pub since_ack: Duration,
    /// Time since data was last sent.
    pub since_data_sent: Duration,
}

impl KernelQueue {
    /// Whether the kernel still holds any of our output.
    pub fn holds_output(&self) -> bool {
        self.unacked > 0 || self.notsent > 0
    }

    /// How long the kernel's queue has made no progress, as far as its own state tells: since it last sent data
    /// while output waits with nothing in flight (the window is closed, whether or not the kernel is probing it:
    /// the peer's own segments reset the probe count), or since the last acknowledgement (retransmitting); zero
    /// while it makes progress.
    pub fn stalled_for(&self) -> Duration {
        if !self.holds_output() {
            return Duration::ZERO;
        }
        let mut stalled = Duration::ZERO;
        if self.notsent > 0 && (self.zero_window || self.unacked == 0) {
            stalled = stalled.max(self.since_data_sent);
        }
        if self.retransmitting && self.unacked > 0 {
            stalled = stalled.max(self.since_ack);
        }
        stalled
    }
}

/// Which end of the connection this state machine plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Server,
    Client,
}

/// Per-connection limits and timers.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnConfig {
    /// Largest accepted `len` field (kind byte + body); checked from the header, before any allocation.
    pub max_frame: u32,
    /// Server: `HELLO` must arrive within this. Client: `WELCOME` must arrive within this.
    pub handshake_timeout: Duration,
    /// How long a goodbye may take: flushing `BYE`, waiting for the peer's FIN, reading late data.
    pub close_grace: Duration,
    /// Pending outbound bytes that make no progress for this long end the connection with `write_timeout`.
    pub write_timeout: Duration,
    /// Pending outbound bytes above this end the connection with `slow_consumer`.
    pub max_outbound_bytes: usize,
    /// `DATA` payload bytes per second the peer may send (a token bucket holding one second's worth, or one
    /// largest frame if that is more); beyond it, `rate_limited`. `None`: no limit.
    pub max_data_rate: Option<u32>,
    pub detector: DetectorConfig,
    /// Server: also send a `PING` of our own this many heartbeat intervals after the last one (the first between
    /// 1 and 12 intervals after `WELCOME`, see [`Connection::set_ping_phase`]), even while the client's `PING`s keep us busy answering, so that the round trip
    /// is measured ([`Event::Rtt`]) for every session. The probe is sent with the `PONG` to the client's next
    /// `PING` once it is due: no timer and no write of its own, and it follows the client's own phase. A quiet
    /// client gets the backstop `PING`, which measures it anyway. `None`: only the backstop.
    pub rtt_probe_every: Option<u32>,
    /// Client: watch the path after each `PING`. Its `PONG` is reported with the silence that preceded the
    /// `PING` ([`Event::PathHeld`]); a `PONG` still missing this long after the `PING` (or three round trips, if
    /// longer) is reported once ([`Event::PongLate`]). `None`: neither (the adaptive heartbeat sets it).
    pub pong_grace: Option<Duration>,
}

impl Default for ConnConfig {
    fn default() -> Self {
        ConnConfig {
            max_frame: frame::DEFAULT_MAX_FRAME,
            handshake_timeout: Duration::from_secs(5),
            close_grace: Duration::from_secs(2),
            write_timeout: Duration::from_secs(15),
            max_outbound_bytes: 1 << 20,
            max_data_rate: None,
            detector: DetectorConfig::Fixed,
            rtt_probe_every: Some(60),
            pong_grace: None,
        }
    }
}

/// The server's rule for heartbeat intervals: a client's request is clamped to `[min, max]`, and the timeout keeps
/// the configured `timeout / interval` ratio.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatPolicy {
    pub interval: Duration,
    pub timeout: Duration,
    pub min_interval: Duration,
    pub max_interval: Duration,
}

impl Default for HeartbeatPolicy {
    fn default() -> Self {
        HeartbeatPolicy {
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(15),
            min_interval: Duration::from_millis(100),
            max_interval: Duration::from_secs(300),
        }
    }
}

impl HeartbeatPolicy {
    /// The range granted to a client that asks for `heartbeat_update`, or `None` when the interval is fixed
    /// (`min_interval` not below `max_interval`). A request is then answered with [`negotiate`](Self::negotiate).
    pub fn updates(&self) -> Option<HeartbeatRange> {
        (self.min_interval < self.max_interval)
            .then(|| HeartbeatRange { min_ms: ms_field(self.min_interval), max_ms: ms_field(self.max_interval) })
    }

    /// The `(interval, timeout)` granted for a `HELLO` that asked for `requested_ms` (0: the default).
    pub fn negotiate(&self, requested_ms: u32) -> (Duration, Duration) {
        if requested_ms == 0 {
            return (self.interval, self.timeout);
        }
        let min = self.min_interval.min(self.max_interval);
        let interval = Duration::from_millis(requested_ms.into()).clamp(min, self.max_interval);
        let ratio = self.timeout.as_secs_f64() / self.interval.as_secs_f64().max(1e-3);
        (interval, interval.mul_f64(ratio.max(1.0)))
    }
}

/// Coarse state, for the IO layer and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Handshake,
    Established,
    Draining,
    Closed,
}

/// How the end of a connection was decided, emitted once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closed {
    pub reason: CloseReason,
    /// For verdicts taken at a deadline: how late the verdict was (`now - deadline`).
    pub lateness: Option<Duration>,
    /// The peer ended it (its `BYE`, FIN or reset), as opposed to our own verdict or command.
    pub by_peer: bool,
    /// The peer's `BYE`, when it sent one (carries retry-after and alternative-server hints).
    pub peer_bye: Option<Bye>,
    /// Human detail, e.g. the protocol error.
    pub detail: Option<String>,
}

/// What the connection tells the IO layer and application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Server: a `HELLO` arrived; answer with [`Connection::accept`] or [`Connection::reject`].
    Hello(Hello),
    /// Client: the server welcomed us; the connection is established.
    Welcome(Welcome),
    Data {
        peer: String,
        payload: Bytes,
    },
    Subscribe(Vec<String>),
    Unsubscribe(Vec<String>),
    Presence(Presence),
    Undeliverable {
        to: String,
        why: Undeliverable,
    },
    /// Round-trip time measured by a `PONG` echoing our `PING`.
    Rtt(Duration),
    /// Server, `heartbeat_update`: the client asks for this heartbeat interval (0: the server's default). Answer
    /// with [`Connection::set_heartbeat`]; the client keeps its old heartbeat until then.
    HeartbeatRequest {
        interval_ms: u32,
    },
    /// Client, `heartbeat_update`: the server granted a new heartbeat; both sides keep it from now on.
    HeartbeatChanged {
        interval: Duration,
        timeout: Duration,
    },
    /// Client, with [`ConnConfig::pong_grace`]: our `PING` was answered, after `idle` in which the path carried
    /// nothing either way (a middlebox on it kept the connection for at least that long).
    PathHeld {
        idle: Duration,
    },
    /// Client, with [`ConnConfig::pong_grace`]: our `PING`, sent after `idle` of silence, is still unanswered
    /// `waited` after it left (once per `PING`). Either the path lost it or a middlebox forgot the connection.
    PongLate {
        idle: Duration,
        waited: Duration,
    },
    /// The phi detector suspects the peer (silent longer than its history makes likely).
    Suspect {
        silent_for: Duration,
    },
    /// A suspected peer was heard from again.
    Recovered,
    /// Server: a `DATA` for client `to` carried a payload of `len` bytes, more than the server relays
    /// ([`frame::max_relay_payload`]); the sender was answered `UNDELIVERABLE`.
    RelayTooLarge {
        to: String,
        len: usize,
    },
    /// `reliable`: the next message of the peer's stream, in order, exactly once (duplicates are dropped here).
    /// It is acknowledged once the owner confirms it took it ([`Connection::confirm`]).
    Sdata {
        seq: u64,
        peer: String,
        payload: Bytes,
    },
    /// Server, `reliable`: message `seq` for client `to` carried a payload of `len` bytes, more than the server
    /// relays. It was taken (its sequence number is used); the session reports it undeliverable.
    SdataTooLarge {
        seq: u64,
        to: String,
        len: usize,
    },
    /// `reliable`: the peer acknowledged our stream up to this sequence number (not yet checked against what
    /// was sent: the owner of the outbox does that).
    Acked(u64),
    /// Client, `reliable`: the server's word on messages we sent, in order, exactly once.
    Report(Report),
    Closed(Closed),
}

/// Why an application command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    #[error("the connection is not established yet")]
    NotEstablished,
    #[error("the connection is closed ({0})")]
    Closed(CloseReason),
    #[error("frame of {len} bytes exceeds the maximum {max}")]
    TooLarge { len: usize, max: u32 },
    #[error("payload of {len} bytes exceeds the largest the server relays to another client ({max})")]
    TooLargeToRelay { len: usize, max: usize },
    #[error("this side may not send {0}")]
    WrongDirection(&'static str),
    #[error("the reliable extension is not in effect on this connection")]
    NotReliable,
    #[error("the server did not grant heartbeat updates on this connection")]
    NoHeartbeatUpdate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CloseMode {
    /// Drop pending output and close now (transport already broken, or the peer is not draining).
    Immediate,
    /// Flush pending output (with our `BYE`, if any), then close.
    Flush,
    /// Flush, shut down the write half, and keep reading (late data is delivered) until the peer's FIN.
    Linger,
}

#[derive(Debug, Clone, Copy)]
struct Drain {
    until: Instant,
    linger: bool,
    write_shut: bool,
    peer_eof: bool,
    /// The peer sent something undecodable while we lingered: what it sends is dropped unread until it closes
    /// or the grace ends (nothing is buffered on a broken stream's word).
    garbage: bool,
}

/// An instant kept as signed nanoseconds after its connection's `origin`: exact, and half the size of an
/// `Instant` (every idle connection carries several). [`Stamp::NONE`] stands for no instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp(i64);

impl Stamp {
    const NONE: Stamp = Stamp(i64::MIN);
}

/// One tether connection's protocol state.
#[derive(Debug)]
pub struct Connection {
    role: Role,
    /// Shared by every connection of a server (one allocation, not one copy per connection).
    cfg: Arc<ConnConfig>,
    state: State,
    /// The protocol version frames are read and written in: 1 until the handshake, then the negotiated one (a
    /// client reads the server's answer in the version it offered).
    version: u8,
    /// Largest frame accepted from the peer: our `max_frame`, or for a client also what a v2 server announced.
    rx_max: u32,
    /// Largest frame the peer accepts: what a v2 server announced, else our own `max_frame`.
    tx_max: u32,
    /// Creation instant: the base of the handshake deadline and of `PING` timestamps.
    origin: Instant,
    /// Inbound bytes of an incomplete frame, output not yet taken, events not yet taken: `None` while all are
    /// empty (see [`Busy`]).
    busy: Option<Box<Busy>>,
    /// When `tx` last went from empty to non-empty or last made progress; drives `write_timeout`.
    tx_stalled_since: Stamp,
    /// When output was first handed to the kernel since its queue was last seen empty (a stall in the kernel
    /// cannot be older), and when that queue is next worth a look ([`Connection::kernel_check_due`]); in
    /// milliseconds after `origin`, 0 for none (kept small: every idle connection carries them).
    kq_since_ms: u64,
    kq_due_ms: u64,
    /// When we last queued a frame: a `PING` is due one interval after it.
    last_tx: Stamp,
    /// Until the handshake: how far into its first ping cycle (client) or probe window (server) the connection
    /// starts, in thousandths ([`Connection::set_ping_phase`]). After it, for a client with `pong_grace`: the
    /// silence before our last `PING`, in tenths of a second (saturating at 6,553.5 s). One field, since the two
    /// never overlap and every idle connection carries it.
    phase_or_idle: u16,
    /// Heartbeat interval and timeout in milliseconds (as negotiated on the wire), once negotiated; 0 before.
    interval_ms: u32,
    timeout_ms: u32,
    detector: Option<Detector>,
    /// Cached detector deadlines, recomputed only when a frame arrives: when to raise `suspect` (`NONE` for
    /// none) and when to convict (`NONE` until the detector runs).
    suspect_at: Stamp,
    convict_at: Stamp,
    suspected: bool,
    /// Server: a `HELLO` was reported and awaits `accept`/`reject`; frames after it wait in `rx`.
    admission_pending: bool,
    /// Boxed: a connection drains once, at its end.
    drain: Option<Box<Drain>>,
    reason: Option<CloseReason>,
    /// Our last `PING`'s sequence number, and whether its `PONG` is still to come: only that `PONG` counts as a
    /// round trip, once (a peer cannot make up round trips by sending `PONG`s of its own).
    ping_seq: u32,
    awaiting_pong: bool,
    /// The peer's `PING` allowance ([`ping_allowance`]): `PING`s it may send now, and when that was last refilled.
    ping_tokens: f32,
    ping_refilled: Stamp,
    /// The `DATA` rate limit's bucket: bytes allowed now, and when it was last refilled.
    data_tokens: f64,
    data_refilled: Stamp,
    /// The last round trip in nanoseconds, [`NO_RTT`] before the first.
    rtt_ns: u64,
    /// The `heartbeat_update` extension is in effect (granted in `WELCOME`).
    hb_update: bool,
    /// One timer per role, in milliseconds after `origin`, 0 for none (one field: every idle connection carries
    /// it). Server: when the next round-trip probe is due ([`ConnConfig::rtt_probe_every`]; probes stop after 49
    /// days of one connection, where that no longer fits). Client, with `pong_grace`: when the `PONG` to our last
    /// `PING` is late (0 once reported).
    due_ms: u32,
    /// Frames parsed and frames queued, wrapping: the IO layer counts them into its metrics by difference.
    frames_rx: u32,
    frames_tx: u32,
    /// The `reliable` extension's receiving half, once granted (a client keeps the stream it asked to resume here
    /// until `WELCOME` says whether it continues). Boxed: most connections have none.
    rel: Option<Box<Inbox>>,
}

/// What a connection holds only while it has something in flight: the bytes of an incomplete inbound frame
/// (kept between frames only), encoded output the transport has not taken, and events the IO layer has not taken.
/// Boxed, and released as soon as all three are empty: an idle connection carries one word for them instead of
/// three handles (96 bytes), at the cost of one small allocation per exchange.
#[derive(Debug, Default)]
struct Busy {
    rx: BytesMut,
    tx: BytesMut,
    events: VecDeque<Event>,
}

/// [`Connection::rtt_ns`] before the first round trip.
const NO_RTT: u64 = u64::MAX;

impl Connection {
    /// A freshly accepted server-side connection, waiting for `HELLO`.
    pub fn server(now: Instant, cfg: impl Into<Arc<ConnConfig>>) -> Connection {
        Connection::new(Role::Server, now, cfg)
    }

    /// A client-side connection; `HELLO` is queued at once.
    pub fn client(now: Instant, cfg: impl Into<Arc<ConnConfig>>, hello: Hello) -> Connection {
        let mut c = Connection::new(Role::Client, now, cfg);
        // The server answers in the version we offer or a lower one; its refusal `BYE` too.
        c.version = hello.version.clamp(V1, PROTOCOL_VERSION);
        // Asked for a reliable session: where our side of the server's stream stands if it continues.
        if let Some(offer) = reliable::Offer::find(&hello.extensions).filter(|_| hello.version >= frame::V2) {
            c.rel = Some(Box::new(Inbox::new(offer.resume.map_or(0, |r| r.received))));
        }
        c.queue(now, &Frame::Hello(hello));
        c
    }

    fn new(role: Role, now: Instant, cfg: impl Into<Arc<ConnConfig>>) -> Connection {
        let cfg: Arc<ConnConfig> = cfg.into();
        Connection {
            role,
            version: V1,
            rx_max: cfg.max_frame,
            tx_max: cfg.max_frame,
            cfg,
            state: State::Handshake,
            origin: now,
            busy: None,
            tx_stalled_since: Stamp::NONE,
            kq_since_ms: 0,
            kq_due_ms: 0,
            last_tx: Stamp(0),
            phase_or_idle: 0,
            interval_ms: 0,
            timeout_ms: 0,
            detector: None,
            suspect_at: Stamp::NONE,
            convict_at: Stamp::NONE,
            suspected: false,
            admission_pending: false,
            drain: None,
            reason: None,
            ping_seq: 0,
            awaiting_pong: false,
            ping_tokens: 0.0,
            ping_refilled: Stamp(0),
            data_tokens: 0.0,
            data_refilled: Stamp(0),
            rtt_ns: NO_RTT,
            due_ms: 0,
            hb_update: false,
            frames_rx: 0,
            frames_tx: 0,
            rel: None,
        }
    }

    pub fn role(&self) -> Role {
        self.role
    }
    pub fn state(&self) -> State {
        self.state
    }
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }
    /// The reason fixed by the first decision to end the connection.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.reason
    }
    /// The protocol version in use (1 before the handshake completes).
    pub fn version(&self) -> u8 {
        self.version
    }
    /// The largest frame the peer accepts (what a v2 server announced; otherwise our own limit).
    pub fn peer_max_frame(&self) -> u32 {
        self.tx_max
    }
    /// Negotiated heartbeat `(interval, timeout)`.
    pub fn heartbeat(&self) -> Option<(Duration, Duration)> {
        (self.interval_ms > 0).then(|| (ms(self.interval_ms), ms(self.timeout_ms)))
    }
    /// When the connection was created (for a server, when the socket was accepted).
    pub fn opened(&self) -> Instant {
        self.origin
    }
    /// Frames received and frames queued for sending so far, each wrapping at `u32::MAX`: count by difference.
    pub fn frame_counts(&self) -> (u32, u32) {
        (self.frames_rx, self.frames_tx)
    }
    /// The last measured round-trip time.
    /// `reliable`: duplicates of the peer's messages dropped on this connection (0 without the extension).
    pub fn reliable_duplicates(&self) -> u64 {
        self.rel.as_ref().map_or(0, |r| r.duplicates())
    }

    /// Whether the `reliable` extension is in effect.
    pub fn is_reliable(&self) -> bool {
        self.rel.is_some()
    }

    /// `reliable`: the owner took the peer's messages up to `seq` (held them, handed them on, or reported on
    /// them). Only what is confirmed is acknowledged; an `ACK` goes out once [`reliable::ACK_EVERY`] are
    /// confirmed, else after [`reliable::ACK_DELAY`] or with the next `PING`/`PONG`.
    pub fn confirm(&mut self, now: Instant, seq: u64) {
        let Some(inbox) = self.rel.as_mut() else { return };
        inbox.confirm(now, seq);
        if self.state == State::Established {
            if let Some(ack) = inbox.ack_due(now) {
                self.queue(now, &Frame::Ack { seq: ack });
            }
        }
    }

    pub fn rtt(&self) -> Option<Duration> {
        (self.rtt_ns != NO_RTT).then(|| Duration::from_nanos(self.rtt_ns))
    }
    /// When the last frame arrived (once established).
    /// Client, with [`ConnConfig::pong_grace`]: the silence before our last `PING`, while its `PONG` is still to
    /// come (also after the connection ended: what it was waiting for when it did).
    pub fn unanswered_ping(&self) -> Option<Duration> {
        (self.role == Role::Client && self.awaiting_pong && self.cfg.pong_grace.is_some())
            .then(|| deciseconds(self.phase_or_idle))
    }

    pub fn last_rx(&self) -> Option<Instant> {
        self.detector.as_ref().and_then(Detector::last_arrival)
    }
    /// Whether the IO layer should keep reading from the transport.
    pub fn wants_read(&self) -> bool {
        self.reading()
    }
    /// Bytes queued but not yet written to the transport.
    pub fn pending_tx(&self) -> usize {
        self.tx().len()
    }
    /// Bytes held for an incomplete inbound frame.
    pub fn pending_rx(&self) -> usize {
        self.rx().len()
    }

    // ---- inputs ----

    /// Bytes arrived from the transport.
    pub fn handle_bytes(&mut self, now: Instant, data: &[u8]) {
        if !self.reading() || self.discarding() {
            return;
        }
        // A deadline of ours passed well before these bytes were handled: this side was stopped or starved of
        // CPU, and what the peer sent meanwhile waited for it.
        let late = self.poll_timeout().map_or(Duration::ZERO, |due| now.saturating_duration_since(due));
        if late >= OWN_STALL && self.state == State::Established {
            self.credit_own_stall(now);
        }
        if self.rx().is_empty() {
            let used = self.process(now, data);
            if self.reading() && !self.discarding() && used < data.len() {
                self.busy().rx.extend_from_slice(&data[used..]);
            }
        } else {
            self.busy().rx.extend_from_slice(data);
            self.process_buffered(now);
        }
        // While a HELLO awaits admission, frames after it wait here: at most one largest frame's worth.
        if self.admission_pending && self.rx().len() > self.rx_max as usize + frame::HEADER_LEN {
            self.admission_pending = false;
            self.protocol_error(now, format!("{} bytes sent before the WELCOME", self.rx().len()));
        }
    }

    /// The peer closed its write half (read returned 0).
    pub fn handle_eof(&mut self, now: Instant) {
        match self.state {
            State::Closed => {}
            State::Draining => {
                if let Some(d) = self.drain.as_deref_mut() {
                    d.peer_eof = true;
                }
                self.clear_rx();
                self.maybe_finish();
            }
            State::Handshake | State::Established => {
                let detail =
                    (!self.rx().is_empty()).then(|| format!("{} bytes of an incomplete frame", self.rx().len()));
                self.clear_rx();
                self.decide(now, CloseReason::Eof, CloseMode::Flush, None, true, None, detail, None);
                if let Some(d) = self.drain.as_deref_mut() {
                    d.peer_eof = true;
                }
                self.maybe_finish();
            }
        }
    }

    /// The transport failed. `unacked` says whether the kernel still held data we had written (it tells a user
    /// timeout from a keepalive timeout, both ETIMEDOUT).
    pub fn handle_error(&mut self, now: Instant, err: &io::Error, unacked: bool) {
        let reason = CloseReason::from_io_error(err, unacked || !self.tx().is_empty());
        // A reset (or FIN) comes from the peer's side; a timeout or an unreachable route is our kernel's verdict.
        let by_peer = matches!(reason, CloseReason::Reset | CloseReason::Eof);
        match self.state {
            State::Closed => {}
            State::Draining => self.finish(),
            _ => self.decide(now, reason, CloseMode::Immediate, None, by_peer, None, Some(err.to_string()), None),
        }
    }

    /// The transport accepted `n` bytes from the front of [`poll_transmit`](Self::poll_transmit).
    pub fn handle_written(&mut self, now: Instant, n: usize) {
        let n = n.min(self.tx().len());
        if n == 0 {
            return;
        }
        if self.kq_since_ms == 0 && self.state == State::Established {
            self.kq_since_ms = self.ms_since_origin(now);
            self.kq_due_ms = self.ms_since_origin(now + self.cfg.write_timeout);
        }
        self.busy().tx.advance(n);
        if self.tx().is_empty() {
            self.clear_tx();
            self.tx_stalled_since = Stamp::NONE;
            self.maybe_finish();
        } else {
            self.tx_stalled_since = self.stamp(now);
        }
    }

    /// Whether the IO layer should read the kernel's queue ([`KernelQueue`]) and report it with
    /// [`handle_kernel_queue`](Self::handle_kernel_queue) now: output was handed to the kernel at least
    /// `write_timeout` ago, or the last look found a stall that could reach `write_timeout` by now. The IO layer
    /// asks at moments it is awake anyway (a read, a timer, a command), so this costs no wakeup of its own.
    pub fn kernel_check_due(&self, now: Instant) -> bool {
        self.state == State::Established && self.kq_due_ms != 0 && self.ms_since_origin(now) >= self.kq_due_ms
    }

    /// The kernel's queue, as asked by [`kernel_check_due`](Self::kernel_check_due) (`None`: the platform cannot
    /// tell). Output the kernel has held without progress for `write_timeout` ends the connection with
    /// `write_timeout`, exactly as output stuck in our own buffer does.
    pub fn handle_kernel_queue(&mut self, now: Instant, queue: Option<KernelQueue>) {
        let since = Duration::from_millis(self.ms_since_origin(now).saturating_sub(self.kq_since_ms));
        let Some(q) = queue.filter(|q| q.holds_output() && self.kq_since_ms != 0) else {
            self.kq_since_ms = 0;
            self.kq_due_ms = 0;
            return;
        };
        let stalled = q.stalled_for().min(since);
        let wt = self.cfg.write_timeout;
        if stalled < wt {
            self.kq_due_ms = self.ms_since_origin(now + (wt - stalled));
            return;
        }
        let how = if q.zero_window { "the peer's receive window is closed" } else { "nothing acknowledged" };
        let detail = format!(
            "the kernel holds {} unacknowledged segments and {} unsent bytes; {how} for {} ms",
            q.unacked,
            q.notsent,
            stalled.as_millis()
        );
        self.write_timeout(now, detail, now - (stalled - wt));
    }

    /// The IO layer finished shutting down the write half, as asked by [`poll_shutdown_write`](Self::poll_shutdown_write).
    pub fn handle_write_shutdown(&mut self) {
        if let Some(d) = self.drain.as_deref_mut() {
            d.write_shut = true;
        }
        self.maybe_finish();
    }

    /// A timer fired: act on every deadline at or before `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(d) = self.drain() {
            if now >= d.until {
                self.finish();
            }
            return;
        }
        if self.state == State::Closed {
            return;
        }
        if let Some(since) = self.at_opt(self.tx_stalled_since) {
            let deadline = since + self.cfg.write_timeout;
            if now >= deadline {
                let detail = format!("{} bytes unwritten", self.tx().len());
                self.write_timeout(now, detail, deadline);
                return;
            }
        }
        match self.state {
            State::Handshake => {
                let deadline = self.origin + self.cfg.handshake_timeout;
                if now >= deadline && !self.admission_pending {
                    let bye = self.bye_if_server(CloseReason::HandshakeTimeout);
                    self.decide(
                        now,
                        CloseReason::HandshakeTimeout,
                        CloseMode::Flush,
                        bye,
                        false,
                        None,
                        None,
                        Some(deadline),
                    );
                }
            }
            State::Established => {
                let Some(dl) = self.deadlines() else { return };
                if now >= dl.convict_at {
                    let bye = Some(Bye {
                        reason: CloseReason::HeartbeatTimeout,
                        retry_after_ms: 0,
                        alternative: String::new(),
                    });
                    self.decide(
                        now,
                        CloseReason::HeartbeatTimeout,
                        CloseMode::Linger,
                        bye,
                        false,
                        None,
                        None,
                        Some(dl.convict_at),
                    );
                    return;
                }
                if let Some(s) = dl.suspect_at {
                    if now >= s && !self.suspected {
                        self.suspected = true;
                        let last = self.last_rx().unwrap_or(self.origin);
                        self.emit(Event::Suspect { silent_for: now.saturating_duration_since(last) });
                    }
                }
                if self.role == Role::Client && self.due_ms != 0 && self.ms_since_origin(now) >= u64::from(self.due_ms)
                {
                    self.due_ms = 0;
                    if self.awaiting_pong {
                        let waited = self.grace().unwrap_or_default();
                        self.emit(Event::PongLate { idle: deciseconds(self.phase_or_idle), waited });
                    }
                }
                if let Some(due) = self.ping_due() {
                    if now >= due {
                        self.send_ping(now);
                    }
                }
                if let Some(ack) = self.rel.as_mut().and_then(|r| r.ack_due(now)) {
                    self.queue(now, &Frame::Ack { seq: ack });
                }
            }
            State::Draining | State::Closed => {}
        }
    }

    // ---- commands ----

    /// Client: start the ping cycle `fraction` (0..1) of an interval in, so the first `PING` comes after
    /// `(1 - fraction) × interval`. Clients that connect together (after a server restart) then do not ping in
    /// phase forever. Server: how far into its 12-interval window the first round-trip probe falls
    /// ([`ConnConfig::rtt_probe_every`]). The IO layer draws the fraction; the core has no randomness of its own.
    /// Ignored once the handshake is over.
    pub fn set_ping_phase(&mut self, fraction: f64) {
        // Read only when the handshake completes; after it, the field holds something else.
        if self.state == State::Handshake {
            self.phase_or_idle =
                if fraction.is_finite() { (fraction.clamp(0.0, 0.999) * 1000.0).round() as u16 } else { 0 };
        }
    }

    /// Send a `PING` now, to measure the round trip on request (an operator asking "is this client's program
    /// answering?"). Its `PONG` ends in [`Event::Rtt`]; a `PONG` still due for an earlier `PING` no longer counts.
    /// Ignored unless the connection is established.
    pub fn probe_now(&mut self, now: Instant) {
        if self.state == State::Established {
            self.send_ping(now);
        }
    }

    /// Client, `heartbeat_update`: ask the server for a heartbeat of `interval`. The current one stays until the
    /// server's answer ([`Event::HeartbeatChanged`]), which may differ (the server clamps it to its range).
    pub fn request_heartbeat(&mut self, now: Instant, interval: Duration) -> Result<(), SendError> {
        self.established()?;
        if self.role != Role::Client {
            return Err(SendError::WrongDirection("a HEARTBEAT request"));
        }
        if !self.hb_update {
            return Err(SendError::NoHeartbeatUpdate);
        }
        self.queue(now, &Frame::Heartbeat { interval_ms: ms_field(interval).max(1), timeout_ms: 0 });
        Ok(())
    }

    /// Server, `heartbeat_update`: keep `interval` and `timeout` from now on, and tell the client (the answer to
    /// [`Event::HeartbeatRequest`]; the caller applies its policy). The silence deadline restarts from `now`.
    pub fn set_heartbeat(&mut self, now: Instant, interval: Duration, timeout: Duration) {
        if self.role != Role::Server || self.state != State::Established || !self.hb_update {
            return;
        }
        let interval_ms = ms_field(interval).max(1);
        let timeout_ms = ms_field(timeout).max(interval_ms);
        self.retime(now, interval_ms, timeout_ms);
        self.queue(now, &Frame::Heartbeat { interval_ms, timeout_ms });
    }

    /// Server: admit the session announced by [`Event::Hello`] and send `WELCOME`. The core fills in the
    /// negotiated version and, from v2 on, its maximum frame; extensions are the caller's.
    pub fn accept(&mut self, now: Instant, mut welcome: Welcome) {
        if !(self.role == Role::Server && self.state == State::Handshake && self.admission_pending) {
            return;
        }
        self.admission_pending = false;
        welcome.version = self.version;
        welcome.max_frame = (self.version >= frame::V2).then_some(self.cfg.max_frame);
        if let Some(g) = reliable::Grant::find(&welcome.extensions).filter(|_| self.version >= frame::V2) {
            self.rel = Some(Box::new(Inbox::new(g.received)));
        }
        self.hb_update = self.version >= frame::V2 && HeartbeatRange::find(&welcome.extensions).is_some();
        self.establish(now, welcome.heartbeat_ms, welcome.timeout_ms);
        self.queue(now, &Frame::Welcome(welcome));
        self.process_buffered(now);
    }

    /// Refuse or end the connection with a `BYE`, flushing it and closing without waiting for the peer.
    /// Used for `busy`, `id_conflict` and other refusals.
    pub fn reject(&mut self, now: Instant, bye: Bye) {
        self.admission_pending = false;
        let reason = bye.reason;
        self.decide(now, reason, CloseMode::Flush, Some(bye), false, None, None, None);
    }

    /// End the connection with a `BYE`: flush it, half-close, and read until the peer closes or `close_grace`
    /// passes. Used for the application's close (`bye`), `takeover`, `kicked`, `server_shutdown`.
    pub fn close(&mut self, now: Instant, bye: Bye) {
        let reason = bye.reason;
        self.decide(now, reason, CloseMode::Linger, Some(bye), false, None, None, None);
    }

    /// End the connection at once without a goodbye (e.g. `slow_consumer` decided outside the connection).
    pub fn abort(&mut self, now: Instant, reason: CloseReason) {
        self.decide(now, reason, CloseMode::Immediate, None, false, None, None, None);
    }

    /// End the connection at once for a failure the IO layer found below the frames (a TLS error), with a
    /// human detail; `by_peer` when the peer reported it (a TLS alert). Nothing more is written by the core.
    pub fn fail(&mut self, now: Instant, reason: CloseReason, by_peer: bool, detail: String) {
        match self.state {
            State::Closed => {}
            State::Draining => self.finish(),
            _ => self.decide(now, reason, CloseMode::Immediate, None, by_peer, None, Some(detail), None),
        }
    }

    /// Queue an application frame: `DATA`, `SUBSCRIBE`/`UNSUBSCRIBE` (client), `PRESENCE`/`UNDELIVERABLE` (server).
    pub fn send(&mut self, now: Instant, frame: Frame) -> Result<(), SendError> {
        self.established()?;
        let allowed = matches!(
            (&frame, self.role),
            (Frame::Data { .. }, _)
                | (Frame::Subscribe(_) | Frame::Unsubscribe(_), Role::Client)
                | (Frame::Presence(_) | Frame::Undeliverable { .. }, Role::Server)
        ) || (self.rel.is_some()
            && matches!((&frame, self.role), (Frame::Sdata { .. }, _) | (Frame::Report(_), Role::Server)));
        if !allowed && matches!(frame, Frame::Sdata { .. } | Frame::Report(_)) && self.rel.is_none() {
            return Err(SendError::NotReliable);
        }
        if !allowed {
            return Err(SendError::WrongDirection(frame.name()));
        }
        let len = frame.encoded_len_v(self.version) - frame::HEADER_LEN;
        if len > self.tx_max as usize {
            return Err(SendError::TooLarge { len, max: self.tx_max });
        }
        if let (Role::Client, Frame::Data { peer, payload } | Frame::Sdata { peer, payload, .. }) = (self.role, &frame)
        {
            // The server relays no larger payload than this, whoever the sender and receiver are.
            let relay_max = match frame {
                Frame::Sdata { .. } => frame::max_reliable_relay_payload(self.tx_max),
                _ => frame::max_relay_payload(self.tx_max),
            };
            if !peer.is_empty() && payload.len() > relay_max {
                return Err(SendError::TooLargeToRelay { len: payload.len(), max: relay_max });
            }
        }
        self.queue(now, &frame);
        if self.tx().len() > self.cfg.max_outbound_bytes {
            let detail = format!("{} bytes queued, limit {}", self.tx().len(), self.cfg.max_outbound_bytes);
            self.decide(now, CloseReason::SlowConsumer, CloseMode::Immediate, None, false, None, Some(detail), None);
            return Err(SendError::Closed(CloseReason::SlowConsumer));
        }
        Ok(())
    }

    // ---- outputs ----

    /// Bytes to write now; report what the transport took with [`handle_written`](Self::handle_written).
    pub fn poll_transmit(&self) -> &[u8] {
        self.tx()
    }

    /// True once, when the IO layer should shut down the write half (our `BYE` is flushed and we linger).
    pub fn poll_shutdown_write(&self) -> bool {
        self.state == State::Draining
            && matches!(self.drain(), Some(d) if d.linger && !d.write_shut && self.tx().is_empty())
    }

    /// The single instant at which [`handle_timeout`](Self::handle_timeout) must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if let Some(d) = self.drain() {
            return (self.state != State::Closed).then_some(d.until);
        }
        let write = self.at_opt(self.tx_stalled_since).map(|s| s + self.cfg.write_timeout);
        let other = match self.state {
            State::Handshake if !self.admission_pending => Some(self.origin + self.cfg.handshake_timeout),
            State::Established => {
                let dl = self.deadlines()?;
                let suspect = dl.suspect_at.filter(|_| !self.suspected);
                let ping = self.ping_due();
                let ack = self.rel.as_ref().and_then(|r| r.poll_timeout());
                let late = (self.role == Role::Client && self.due_ms != 0).then(|| self.origin + ms(self.due_ms));
                [Some(dl.convict_at), suspect, ping, ack, late].into_iter().flatten().min()
            }
            _ => None,
        };
        [write, other].into_iter().flatten().min()
    }

    /// The next event. The queue's buffer is released once it is drained: an idle connection holds none (it
    /// kept room for four events, about 400 bytes, for the rest of its life before).
    pub fn poll_event(&mut self) -> Option<Event> {
        let busy = self.busy.as_mut()?;
        let event = busy.events.pop_front();
        if event.is_none() {
            busy.events = VecDeque::new();
            self.release();
        }
        event
    }

    // ---- internals ----

    /// Whether the application may send now: established, else why not.
    fn established(&self) -> Result<(), SendError> {
        match self.state {
            State::Established => Ok(()),
            State::Handshake => Err(SendError::NotEstablished),
            State::Draining | State::Closed => Err(SendError::Closed(self.reason.unwrap_or(CloseReason::Bye))),
        }
    }

    /// Take `len` bytes from the `DATA` rate limit's bucket; false when the peer is over the limit.
    fn data_allowed(&mut self, now: Instant, len: usize) -> bool {
        if self.cfg.max_data_rate.is_none() {
            return true;
        }
        self.refill_data(now);
        if (len as f64) > self.data_tokens {
            return false;
        }
        self.data_tokens -= len as f64;
        true
    }

    /// Refill the `DATA` bucket up to `now`, to its burst; a stall's credit above it lasts as a `PING` one does.
    fn refill_data(&mut self, now: Instant) {
        let Some(rate) = self.cfg.max_data_rate else { return };
        let burst = (rate as f64).max(self.cfg.max_frame as f64);
        let elapsed = now.saturating_duration_since(self.at(self.data_refilled));
        self.data_refilled = self.stamp(now);
        let limit = if self.reading_backlog(elapsed) { burst.max(self.data_tokens) } else { burst };
        self.data_tokens = (self.data_tokens + elapsed.as_secs_f64() * rate as f64).min(limit);
    }

    /// Whether frames `elapsed` apart can belong to one backlog read after a stall: less than half an interval.
    fn reading_backlog(&self, elapsed: Duration) -> bool {
        self.heartbeat().is_some_and(|(interval, _)| elapsed < interval / 2)
    }

    /// Police the peer's pings (like gRPC's `too_many_pings`) with a token bucket: the peer may send
    /// [`ping_allowance`] `PING`s at once, and earns one back per half interval, twice the rate at which a
    /// legitimate peer pings (once per interval for a client, per 1.5 intervals for a server). It judges what the
    /// peer sent over time, not how we read it: see [`credit_own_stall`](Self::credit_own_stall).
    fn ping_flooded(&mut self, now: Instant) -> bool {
        if self.heartbeat().is_none() {
            return false;
        }
        self.refill_pings(now);
        if self.ping_tokens < 1.0 {
            return true;
        }
        self.ping_tokens -= 1.0;
        false
    }

    /// A `PING` (or a `HEARTBEAT` request, policed with them) beyond the allowance ends the connection with
    /// `ping_flood`; true when it did. `what` names them in the detail.
    fn cut_ping_flood(&mut self, now: Instant, what: &str) -> bool {
        if !self.ping_flooded(now) {
            return false;
        }
        let bye = Some(Bye { reason: CloseReason::PingFlood, retry_after_ms: 0, alternative: String::new() });
        let allowance = self.heartbeat().map_or(0, |(i, t)| ping_allowance(i, t));
        let detail = Some(format!("{what} beyond the allowance ({allowance} at once, one per half interval)"));
        self.decide(now, CloseReason::PingFlood, CloseMode::Flush, bye, false, None, detail, None);
        true
    }

    /// Refill the `PING` bucket up to `now`, to the allowance. Tokens above it (a stall's credit) stay while one
    /// backlog is read ([`reading_backlog`](Self::reading_backlog)), and are gone after.
    fn refill_pings(&mut self, now: Instant) {
        let Some((interval, timeout)) = self.heartbeat() else { return };
        let cap = ping_allowance(interval, timeout) as f32;
        let elapsed = now.saturating_duration_since(self.at(self.ping_refilled));
        self.ping_refilled = self.stamp(now);
        let limit = if self.reading_backlog(elapsed) { cap.max(self.ping_tokens) } else { cap };
        let earned = 2.0 * elapsed.as_secs_f64() / interval.as_secs_f64();
        self.ping_tokens = (self.ping_tokens + earned as f32).min(limit);
    }

    /// This side was [`OWN_STALL`] or more past one of its own deadlines: it was not running (stopped, starved of
    /// CPU), so it neither read nor answered. A peer that kept pinging on a fixed timer meanwhile (as field
    /// clients do, answers or not) left one `PING` per interval in our receive queue, and one sending `DATA` within
    /// the rate limit left that much `DATA`; we cannot see how it was spaced. So both buckets are refilled past
    /// their caps at their own rates (two `PING`s per interval, the rate limit's bytes per second) for the time
    /// since the peer's last frame was read (all it sent since waited in the backlog), while that backlog is
    /// read. A flood (far more than that) is still cut, and a peer cannot aim for the credit: it comes only with a
    /// real stall of ours, not with bytes that merely arrive as a deadline falls due.
    fn credit_own_stall(&mut self, now: Instant) {
        let Some((interval, _)) = self.heartbeat() else { return };
        let window = now.saturating_duration_since(self.last_rx().unwrap_or(self.origin));
        let (pings, since) = (self.ping_tokens, now.saturating_duration_since(self.at(self.ping_refilled)).min(window));
        self.refill_pings(now);
        self.ping_tokens = self.ping_tokens.max(pings + (2.0 * since.as_secs_f64() / interval.as_secs_f64()) as f32);
        if let Some(rate) = self.cfg.max_data_rate {
            let (bytes, since) =
                (self.data_tokens, now.saturating_duration_since(self.at(self.data_refilled)).min(window));
            self.refill_data(now);
            self.data_tokens = self.data_tokens.max(bytes + since.as_secs_f64() * f64::from(rate));
        }
    }

    /// When our next `PING` is due. The client drives the heartbeat: it pings after one interval without sending.
    /// The server is the backstop and waits one and a half intervals, so that it pings only a client that has
    /// gone quiet, and the two never ping each other at the same instant (which doubles the traffic).
    fn ping_due(&self) -> Option<Instant> {
        let (interval, _) = self.heartbeat()?;
        let wait = match self.role {
            Role::Client => interval,
            Role::Server => interval + interval / 2,
        };
        Some(self.at(self.last_tx) + wait)
    }

    /// Queue a `PING`; a server's `PING` is also its round-trip probe, so the next probe is due a probe period
    /// later.
    fn send_ping(&mut self, now: Instant) {
        if self.role == Role::Client {
            if let Some(grace) = self.grace() {
                // The silence that counts is the one before the first PING still unanswered: a PING sent while
                // one waits keeps it (and a PONG to either shows the path kept the connection through it).
                if !self.awaiting_pong {
                    let last_tx = self.at(self.last_tx);
                    let last = self.last_rx().map_or(last_tx, |rx| rx.max(last_tx));
                    let idle = now.saturating_duration_since(last).as_millis() / 100;
                    self.phase_or_idle = u16::try_from(idle).unwrap_or(u16::MAX);
                }
                // A late PONG is reported once per grace: a report still pending stays as it is.
                if !self.awaiting_pong || self.due_ms == 0 {
                    self.due_ms = u32::try_from(self.ms_since_origin(now + grace)).unwrap_or(0);
                }
            }
        }
        self.ack_along(now);
        self.ping_seq = self.ping_seq.wrapping_add(1);
        self.awaiting_pong = true;
        // Microseconds: the field is ours to fill and the peer echoes it, so the round trip is exact to the µs.
        let ts_ms = now.saturating_duration_since(self.origin).as_micros() as u64;
        self.queue(now, &Frame::Ping { seq: self.ping_seq, ts_ms });
        if let (Some((interval, _)), Some(every)) = (self.heartbeat(), self.cfg.rtt_probe_every) {
            self.schedule_probe(now, interval * every);
        }
    }

    /// How long a `PING` may wait for its `PONG` before [`Event::PongLate`]: [`ConnConfig::pong_grace`], or three
    /// round trips if longer. `None` when not watched.
    fn grace(&self) -> Option<Duration> {
        let grace = self.cfg.pong_grace?;
        Some(self.rtt().map_or(grace, |rtt| grace.max(rtt * 3)))
    }

    /// Server: the next round-trip probe `after` from `now` (none for zero, and none beyond 49 days of one
    /// connection, where the due instant no longer fits: the backstop `PING` still measures a quiet client).
    fn schedule_probe(&mut self, now: Instant, after: Duration) {
        if self.role != Role::Server || after.is_zero() {
            return;
        }
        self.due_ms = u32::try_from(self.ms_since_origin(now + after)).unwrap_or(0);
    }

    /// The in-flight state, allocated if there was none.
    fn busy(&mut self) -> &mut Busy {
        self.busy.get_or_insert_with(Box::default)
    }

    /// Give the in-flight state back once nothing is in flight.
    fn release(&mut self) {
        if self.busy.as_ref().is_some_and(|b| b.rx.is_empty() && b.tx.is_empty() && b.events.is_empty()) {
            self.busy = None;
        }
    }

    fn rx(&self) -> &[u8] {
        self.busy.as_ref().map_or(&[], |b| &b.rx[..])
    }

    fn tx(&self) -> &[u8] {
        self.busy.as_ref().map_or(&[], |b| &b.tx[..])
    }

    /// Drop the bytes of an incomplete inbound frame.
    fn clear_rx(&mut self) {
        if let Some(b) = &mut self.busy {
            b.rx = BytesMut::new();
        }
        self.release();
    }

    /// Drop the output, written or not.
    fn clear_tx(&mut self) {
        if let Some(b) = &mut self.busy {
            b.tx = BytesMut::new();
        }
        self.release();
    }

    fn emit(&mut self, event: Event) {
        self.busy().events.push_back(event);
    }

    fn drain(&self) -> Option<Drain> {
        self.drain.as_deref().copied()
    }

    fn deadlines(&self) -> Option<Deadlines> {
        let suspect_at = self.at_opt(self.suspect_at);
        self.at_opt(self.convict_at).map(|convict_at| Deadlines { suspect_at, convict_at })
    }

    fn set_deadlines(&mut self, dl: Deadlines) {
        self.suspect_at = dl.suspect_at.map_or(Stamp::NONE, |t| self.stamp(t));
        self.convict_at = self.stamp(dl.convict_at);
    }

    /// `t` as a [`Stamp`].
    fn stamp(&self, t: Instant) -> Stamp {
        let ns = |d: Duration| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX);
        match t.checked_duration_since(self.origin) {
            Some(after) => Stamp(ns(after)),
            None => Stamp(-ns(self.origin.duration_since(t))),
        }
    }

    /// The instant a [`Stamp`] (not `NONE`) stands for.
    fn at(&self, s: Stamp) -> Instant {
        let d = Duration::from_nanos(s.0.unsigned_abs());
        if s.0 >= 0 {
            self.origin + d
        } else {
            self.origin.checked_sub(d).unwrap_or(self.origin)
        }
    }

    fn at_opt(&self, s: Stamp) -> Option<Instant> {
        (s != Stamp::NONE).then(|| self.at(s))
    }

    /// Milliseconds from `origin` to `t`, at least 1 (0 means "none" in the fields that use this).
    fn ms_since_origin(&self, t: Instant) -> u64 {
        (t.saturating_duration_since(self.origin).as_millis() as u64).max(1)
    }

    fn discarding(&self) -> bool {
        matches!(self.drain(), Some(d) if d.garbage)
    }

    fn reading(&self) -> bool {
        match self.state {
            State::Closed => false,
            State::Draining => self.drain().is_some_and(|d| d.linger && !d.peer_eof),
            _ => true,
        }
    }

    fn process_buffered(&mut self, now: Instant) {
        if self.rx().is_empty() {
            return;
        }
        let rx = self.busy.as_mut().map(|b| std::mem::take(&mut b.rx)).unwrap_or_default();
        let used = self.process(now, &rx);
        if self.reading() && !self.discarding() && used < rx.len() {
            // Keep only the incomplete tail; a fresh buffer sized to it, so a past burst pins nothing.
            self.busy().rx = BytesMut::from(&rx[used..]);
        } else {
            self.release();
        }
    }

    /// Parse and handle whole frames from `buf`; returns the bytes consumed.
    fn process(&mut self, now: Instant, buf: &[u8]) -> usize {
        let mut pos = 0;
        while self.reading() && !self.admission_pending && !self.discarding() {
            match frame::check(&buf[pos..], self.rx_max) {
                Ok(Some(n)) => {
                    let parsed = Frame::parse_v(&buf[pos..pos + n], self.version);
                    let start = pos;
                    pos += n;
                    match parsed {
                        Ok(f) => {
                            self.frames_rx = self.frames_rx.wrapping_add(1);
                            self.on_frame(now, f)
                        }
                        Err(e) => self.decode_error(now, e, &buf[start..]),
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    self.decode_error(now, e, &buf[pos..]);
                    break;
                }
            }
        }
        pos
    }

    /// Bytes that are no frame. During the handshake, a foreign protocol is named in the detail and, on the
    /// server, answered in its own terms where that is cheap (an HTTP 400, an MQTT `CONNACK` refusing the
    /// protocol version), so that the wrong client tells its user what happened; tether peers get
    /// `BYE(protocol_error)`.
    fn decode_error(&mut self, now: Instant, e: frame::FrameError, at: &[u8]) {
        let foreign = if self.state == State::Handshake { frame::sniff(at) } else { None };
        let Some(foreign) = foreign else { return self.protocol_error(now, e.to_string()) };
        let detail = match (self.role, foreign) {
            (Role::Client, Foreign::Tls) => format!("{e}: the server speaks TLS; connect with TLS"),
            (Role::Server, Foreign::Tls) => format!("{e}: a TLS handshake arrived on a plaintext port"),
            (Role::Client, f) => format!("{e}: the server answered in {}; this is not a tether port", f.name()),
            (Role::Server, f) => format!("{e}: {} arrived on the tether port", foreign_greeting(f)),
        };
        let reply = if self.role == Role::Server { foreign_reply(foreign) } else { None };
        match reply {
            Some(reply) if self.drain.is_none() => {
                self.clear_rx();
                if self.tx().is_empty() {
                    self.tx_stalled_since = self.stamp(now);
                }
                self.busy().tx.extend_from_slice(&reply);
                self.decide(now, CloseReason::ProtocolError, CloseMode::Flush, None, false, None, Some(detail), None);
            }
            _ => self.protocol_error(now, detail),
        }
    }

    fn on_frame(&mut self, now: Instant, f: Frame) {
        match self.state {
            State::Handshake => self.on_handshake_frame(now, f),
            State::Established => {
                if let Some(d) = &mut self.detector {
                    d.heartbeat(now);
                    let dl = d.deadlines(self.origin);
                    self.set_deadlines(dl);
                }
                if std::mem::take(&mut self.suspected) {
                    self.emit(Event::Recovered);
                }
                self.on_established_frame(now, f);
            }
            // Late frames after a verdict: data is still delivered, nothing else counts.
            State::Draining => match f {
                Frame::Data { peer, payload } => self.emit(Event::Data { peer, payload }),
                // Handed to the owner, never acknowledged (the write half is done). Whether it counts as taken is
                // the owner's word, given in its resume: the server's table takes it only while the session is
                // still this connection's; the tokio client, whose `Disconnected` came first, does not take it.
                Frame::Sdata { seq, peer, payload } => {
                    if let Some(Accept::New) = self.rel.as_mut().map(|r| r.accept(now, seq)) {
                        self.emit(Event::Sdata { seq, peer, payload });
                    }
                }
                _ => {}
            },
            State::Closed => {}
        }
    }

    fn on_handshake_frame(&mut self, now: Instant, f: Frame) {
        match (self.role, f) {
            (Role::Server, Frame::Hello(h)) => {
                // The client offers its highest version (at least 1, checked by the codec); we speak the lower.
                self.version = h.version.min(PROTOCOL_VERSION);
                self.admission_pending = true;
                self.emit(Event::Hello(h));
            }
            (Role::Client, Frame::Welcome(w)) => {
                if w.version > self.version {
                    let detail = format!("the server answered version {} to an offer of {}", w.version, self.version);
                    return self.protocol_error(now, detail);
                }
                self.version = w.version;
                if let Some(max) = w.max_frame {
                    if max < frame::MIN_MAX_FRAME {
                        return self.protocol_error(now, format!("the server's maximum frame {max} is below 256"));
                    }
                    // The server never sends more than it accepts; we accept at least that much (bounded).
                    self.tx_max = frame::peer_max_frame(max);
                    self.rx_max = self.rx_max.max(self.tx_max);
                }
                // The reliable extension is in effect only if granted; a stream that does not continue restarts at 1.
                self.rel = match (self.rel.take(), reliable::Grant::find(&w.extensions)) {
                    (Some(inbox), Some(g)) if g.continues() && w.version >= frame::V2 => Some(inbox),
                    (Some(_), Some(_)) if w.version >= frame::V2 => Some(Box::new(Inbox::new(0))),
                    _ => None,
                };
                self.hb_update = w.version >= frame::V2 && HeartbeatRange::find(&w.extensions).is_some();
                self.establish(now, w.heartbeat_ms, w.timeout_ms);
                self.emit(Event::Welcome(w));
            }
            (Role::Client, Frame::Bye(b)) => self.peer_bye(now, b),
            (_, other) => self.protocol_error(now, format!("{} before the handshake completed", other.name())),
        }
    }

    fn on_established_frame(&mut self, now: Instant, f: Frame) {
        match (self.role, f) {
            (_, Frame::Ping { seq, ts_ms }) => {
                if self.cut_ping_flood(now, "PINGs") {
                    return;
                }
                self.ack_along(now);
                self.queue(now, &Frame::Pong { seq, ts_ms });
                // A due round-trip probe rides along with the answer: same write, no wakeup of its own.
                if self.role == Role::Server && self.due_ms != 0 && self.ms_since_origin(now) >= u64::from(self.due_ms)
                {
                    self.send_ping(now);
                }
            }
            (_, Frame::Pong { seq, ts_ms }) => {
                // Only the answer to our last PING, once. Its echoed timestamp is still the peer's word: anything
                // not in our past is ignored, never trusted.
                if !self.awaiting_pong || seq != self.ping_seq {
                    return;
                }
                self.awaiting_pong = false;
                if self.role == Role::Client {
                    self.due_ms = 0;
                }
                if self.role == Role::Client && self.cfg.pong_grace.is_some() {
                    self.emit(Event::PathHeld { idle: deciseconds(self.phase_or_idle) });
                }
                let sent = self.origin.checked_add(Duration::from_micros(ts_ms));
                if let Some(sent) = sent.filter(|s| *s <= now) {
                    let rtt = now - sent;
                    self.rtt_ns = u64::try_from(rtt.as_nanos()).unwrap_or(NO_RTT - 1);
                    self.emit(Event::Rtt(rtt));
                }
            }
            (role, Frame::Data { peer, payload }) => {
                if !self.data_allowed(now, payload.len()) {
                    return self.rate_limited(now);
                }
                if role == Role::Server && !peer.is_empty() && payload.len() > frame::max_relay_payload(self.rx_max) {
                    let len = payload.len();
                    self.queue(now, &Frame::Undeliverable { to: peer.clone(), why: Undeliverable::TooLarge });
                    return self.emit(Event::RelayTooLarge { to: peer, len });
                }
                self.emit(Event::Data { peer, payload })
            }
            (role, Frame::Sdata { seq, peer, payload }) if self.rel.is_some() => {
                if !self.data_allowed(now, payload.len()) {
                    return self.rate_limited(now);
                }
                if !self.take_seq(now, seq) {
                    return;
                }
                let relay_max = frame::max_reliable_relay_payload(self.rx_max);
                if role == Role::Server && !peer.is_empty() && payload.len() > relay_max {
                    // Taken (and acknowledged): the session answers with its sequenced REPORT.
                    let len = payload.len();
                    return self.emit(Event::SdataTooLarge { seq, to: peer, len });
                }
                self.emit(Event::Sdata { seq, peer, payload })
            }
            (_, Frame::Ack { seq }) if self.rel.is_some() => self.emit(Event::Acked(seq)),
            (_, f @ Frame::Heartbeat { .. }) if !self.hb_update => {
                self.protocol_error(now, format!("{} without the heartbeat_update extension", f.name()))
            }
            (Role::Server, Frame::Heartbeat { interval_ms, .. }) => {
                // Answered like a PING, and policed with them.
                if self.cut_ping_flood(now, "HEARTBEAT requests and PINGs") {
                    return;
                }
                self.emit(Event::HeartbeatRequest { interval_ms })
            }
            (Role::Client, Frame::Heartbeat { interval_ms, timeout_ms }) => {
                if interval_ms == 0 || timeout_ms < interval_ms {
                    let detail = format!("HEARTBEAT granting {interval_ms} ms with a timeout of {timeout_ms} ms");
                    return self.protocol_error(now, detail);
                }
                self.retime(now, interval_ms, timeout_ms);
                self.emit(Event::HeartbeatChanged { interval: ms(interval_ms), timeout: ms(timeout_ms) });
            }
            (Role::Client, Frame::Report(r)) if self.rel.is_some() => {
                if self.take_seq(now, r.seq) {
                    self.emit(Event::Report(r));
                }
            }
            (_, f @ (Frame::Sdata { .. } | Frame::Ack { .. } | Frame::Report(_))) if self.rel.is_none() => {
                self.protocol_error(now, format!("{} without the reliable extension", f.name()))
            }
            (_, Frame::Bye(b)) => self.peer_bye(now, b),
            (Role::Server, Frame::Subscribe(ids)) => self.emit(Event::Subscribe(ids)),
            (Role::Server, Frame::Unsubscribe(ids)) => self.emit(Event::Unsubscribe(ids)),
            (Role::Client, Frame::Presence(p)) => self.emit(Event::Presence(p)),
            (Role::Client, Frame::Undeliverable { to, why }) => self.emit(Event::Undeliverable { to, why }),
            (_, other) => self.protocol_error(now, format!("unexpected {} on an established connection", other.name())),
        }
    }

    fn rate_limited(&mut self, now: Instant) {
        let bye = Some(Bye { reason: CloseReason::RateLimited, retry_after_ms: 0, alternative: String::new() });
        let detail = Some(format!("DATA above {} bytes/s", self.cfg.max_data_rate.unwrap_or(0)));
        self.decide(now, CloseReason::RateLimited, CloseMode::Flush, bye, false, None, detail, None);
    }

    /// A sequenced frame arrived: true when it is the next in order (deliver it; its owner confirms it with
    /// [`Connection::confirm`]). A duplicate is dropped and acknowledged again; a gap is a protocol error.
    fn take_seq(&mut self, now: Instant, seq: u64) -> bool {
        let Some(inbox) = self.rel.as_mut() else { return false };
        let verdict = inbox.accept(now, seq);
        if let Some(ack) = inbox.ack_due(now) {
            self.queue(now, &Frame::Ack { seq: ack });
        }
        match verdict {
            Accept::New => true,
            Accept::Duplicate => false,
            Accept::Gap { expected } => {
                self.protocol_error(now, format!("sequence number {seq} where {expected} was next"));
                false
            }
        }
    }

    /// Before a frame sent anyway (`PING`, `PONG`): the pending `ACK` rides along in the same write.
    fn ack_along(&mut self, now: Instant) {
        if let Some(ack) = self.rel.as_mut().and_then(|r| r.ack_pending()) {
            self.queue(now, &Frame::Ack { seq: ack });
        }
    }

    fn establish(&mut self, now: Instant, interval_ms: u32, timeout_ms: u32) {
        let (interval_ms, timeout_ms) = (interval_ms.max(1), timeout_ms.max(1));
        let (interval, timeout) = self.start_detector(now, interval_ms, timeout_ms);
        self.state = State::Established;
        self.data_refilled = self.stamp(now);
        self.data_tokens = self.cfg.max_data_rate.map_or(0.0, |r| (r as f64).max(self.cfg.max_frame as f64));
        self.ping_refilled = self.stamp(now);
        self.ping_tokens = ping_allowance(interval, timeout) as f32;
        if self.role == Role::Client && self.phase_or_idle > 0 {
            self.last_tx = self.stamp(now.checked_sub(interval * u32::from(self.phase_or_idle) / 1000).unwrap_or(now));
        }
        if self.cfg.rtt_probe_every.is_some() {
            // The first probe is due somewhere in the 12 intervals after `WELCOME`, at the phase the IO layer drew
            // (`set_ping_phase`), so that a mass connect's probes do not all come in its first interval.
            let spread = interval * 11 * u32::from(self.phase_or_idle) / 1000;
            self.schedule_probe(now, interval + spread);
        }
    }

    /// Keep this heartbeat, with a detector that heard the peer `now`; returns it as durations.
    fn start_detector(&mut self, now: Instant, interval_ms: u32, timeout_ms: u32) -> (Duration, Duration) {
        let (interval, timeout) = (ms(interval_ms), ms(timeout_ms));
        let mut det = Detector::new(&self.cfg.detector, interval, timeout);
        det.heartbeat(now);
        self.set_deadlines(det.deadlines(now));
        self.detector = Some(det);
        self.interval_ms = interval_ms;
        self.timeout_ms = timeout_ms;
        (interval, timeout)
    }

    /// A new heartbeat from `now` on (`heartbeat_update`): the detector starts over as if a frame arrived now, and
    /// the `PING` allowance is capped at the new one.
    fn retime(&mut self, now: Instant, interval_ms: u32, timeout_ms: u32) {
        let (interval, timeout) = self.start_detector(now, interval_ms, timeout_ms);
        self.suspected = false;
        self.refill_pings(now);
        self.ping_tokens = self.ping_tokens.min(ping_allowance(interval, timeout) as f32);
    }

    /// Output made no progress until `deadline` (ours or the kernel's): give up on the transport at once.
    fn write_timeout(&mut self, now: Instant, detail: String, deadline: Instant) {
        let reason = CloseReason::WriteTimeout;
        self.decide(now, reason, CloseMode::Immediate, None, false, None, Some(detail), Some(deadline));
    }

    fn peer_bye(&mut self, now: Instant, b: Bye) {
        if b.reason == CloseReason::TlsError {
            // TLS reports its own failures with alerts; a `BYE` claiming one is a confused or lying peer.
            return self.protocol_error(now, "BYE(tls_error) is never sent: TLS failures are TLS alerts".into());
        }
        self.decide(now, b.reason, CloseMode::Flush, None, true, Some(b), None, None);
    }

    fn protocol_error(&mut self, now: Instant, detail: String) {
        let bye = Some(Bye { reason: CloseReason::ProtocolError, retry_after_ms: 0, alternative: String::new() });
        self.clear_rx();
        if let Some(d) = self.drain.as_deref_mut() {
            // Already closing for another reason, which stands: stop decoding the peer's stream.
            d.garbage = true;
            return;
        }
        self.decide(now, CloseReason::ProtocolError, CloseMode::Flush, bye, false, None, Some(detail), None);
    }

    fn bye_if_server(&self, reason: CloseReason) -> Option<Bye> {
        (self.role == Role::Server).then(|| Bye { reason, retry_after_ms: 0, alternative: String::new() })
    }

    /// Fix the reason (first decision wins), emit `Closed`, and start the goodbye.
    #[allow(clippy::too_many_arguments)]
    fn decide(
        &mut self,
        now: Instant,
        reason: CloseReason,
        mode: CloseMode,
        bye: Option<Bye>,
        by_peer: bool,
        peer_bye: Option<Bye>,
        detail: Option<String>,
        deadline: Option<Instant>,
    ) {
        if matches!(self.state, State::Draining | State::Closed) {
            return;
        }
        if self.state == State::Handshake {
            // No session began: a client's offered stream is not this connection's, and nothing late is taken
            // into it.
            self.rel = None;
        }
        self.reason = Some(reason);
        // A HELLO awaiting admission will never be admitted now; frames behind it are read as late frames.
        self.admission_pending = false;
        let lateness = deadline.map(|d| now.saturating_duration_since(d));
        self.emit(Event::Closed(Closed { reason, lateness, by_peer, peer_bye, detail }));
        if mode == CloseMode::Immediate {
            return self.finish();
        }
        if let Some(b) = bye {
            self.queue(now, &Frame::Bye(b));
        }
        self.state = State::Draining;
        self.tx_stalled_since = Stamp::NONE;
        let linger = mode == CloseMode::Linger;
        if !linger {
            self.clear_rx();
        }
        self.drain = Some(Box::new(Drain {
            until: now + self.cfg.close_grace,
            linger,
            write_shut: false,
            peer_eof: false,
            garbage: false,
        }));
        self.maybe_finish();
    }

    fn maybe_finish(&mut self) {
        if let Some(d) = self.drain() {
            if self.state == State::Draining && self.tx().is_empty() && (!d.linger || (d.write_shut && d.peer_eof)) {
                self.finish();
            }
        }
    }

    fn finish(&mut self) {
        self.state = State::Closed;
        self.clear_rx();
        self.clear_tx();
        self.tx_stalled_since = Stamp::NONE;
    }

    fn queue(&mut self, now: Instant, f: &Frame) {
        if self.tx().is_empty() {
            self.tx_stalled_since = self.stamp(now);
        }
        let version = self.version;
        f.encode_v(&mut self.busy().tx, version);
        self.frames_tx = self.frames_tx.wrapping_add(1);
        self.last_tx = self.stamp(now);
    }
}

/// A duration as a milliseconds field on the wire, saturating.
fn ms_field(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

fn deciseconds(n: u16) -> Duration {
    Duration::from_millis(u64::from(n) * 100)
}

fn ms(n: u32) -> Duration {
    Duration::from_millis(n.into())
}

/// How a foreign client's greeting is named in the close detail.
fn foreign_greeting(f: Foreign) -> &'static str {
    match f {
        Foreign::Tls => "a TLS handshake",
        Foreign::Http => "an HTTP request",
        Foreign::Mqtt { .. } => "an MQTT CONNECT",
        Foreign::Ssh => "an SSH client",
    }
}

/// What the server answers a foreign client in its own protocol, where one short reply says "wrong server".
fn foreign_reply(f: Foreign) -> Option<Vec<u8>> {
    const BODY: &str = "This port speaks the tether protocol (docs/protocol.md), not HTTP.\n";
    match f {
        Foreign::Http => Some(
            format!(
                "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{BODY}",
                BODY.len()
            )
            .into_bytes(),
        ),
        // CONNACK refusing the protocol version: MQTT 5 (reason 0x84 and an empty property list), else 3.1.x
        // (return code 1).
        Foreign::Mqtt { level: 5 } => Some(vec![0x20, 0x03, 0x00, 0x84, 0x00]),
        Foreign::Mqtt { .. } => Some(vec![0x20, 0x02, 0x00, 0x01]),
        Foreign::Tls | Foreign::Ssh => None,
    }
}

#[cfg(test)]
mod tests;
