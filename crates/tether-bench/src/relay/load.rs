//! The `relay` scenario's load generator (`tether bench-worker --relay`): pairs of clients in one process, each
//! sender writing to its receiver at full speed within a bounded window, each receiver timing what arrives.
//!
//! # Layout
//! - [`run`] connects every receiver, then every sender (pair `i` is `rs{i}` → `rr{i}`; on Mosquitto `rs{i}`
//!   publishes to topic `rr{i}`, which `rr{i}` subscribes to), prints `connected`, then obeys the coordinator's
//!   lines on stdin: `holders H` (tether reliable: H sessions `rh{j}` opened, then closed with `BYE`, so they
//!   wait offline: `holders_offline`), `fill K` (K messages from one more client, `rf`, spread over those
//!   sessions and each acknowledged by the server, so held: `filled`), `start` (the senders go), `mark` (the
//!   counts so far: `mark`; receivers time messages between the first and the second), `stop` (the senders
//!   stop; once everything sent is accounted for, or nothing moved for 3 s: `done`, with the latencies and the
//!   checks). End of stdin, or `max_seconds`, ends the process.
//! - A tether client is the sans-IO core (`tether_proto::Connection`, client role, protocol v2) on a bare socket
//!   ([`Link`]): the protocol's own acknowledgement rules (an `ACK` per 16 sequenced frames or 20 ms, riding
//!   along with `PING`/`PONG`), and none of `tether::Client`'s channels and tasks. An MQTT client is
//!   [`crate::mqtt`]'s packets on a bare socket ([`MqttLink`]). Both write everything the window allows in one
//!   write per wakeup.
//! - [`Counts`]: what every connection adds up, read by `mark`; [`Latencies`]: a fixed histogram per receiver.
//!
//! # Windows
//! - tether `reliable`: at most `window` messages the server has not acknowledged (the client's window).
//! - Mosquitto QoS 1: at most `window` PUBLISHes without their PUBACK.
//! - In every mode, at most once included, also at most [`GUARD`] × `window` messages sent and not yet taken by
//!   the receiver (the end-to-end bound). Both servers acknowledge on receipt, before delivery, so a receiver
//!   that falls behind slows its sender instead of filling the server's hold or queue. At most once (tether
//!   `DATA`, MQTT QoS 0) nothing is acknowledged and this is the only bound, so the unacknowledged modes never
//!   have less in flight than the acknowledged ones. `guard_waits` against `window_waits` says which bound held
//!   the senders back.
//!
//! # Payload
//! [`PAYLOAD`] bytes: the send instant (nanoseconds on this process's monotonic clock, which sender and receiver
//! share), the message's number in its pair (from 1), then zeros. A receiver checks the numbers: a gap is a
//! message lost, a number seen before a duplicate.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde_json::{json, Value};
use tether_proto::frame::{self, Hello, V2};
use tether_proto::reliable::Offer;
use tether_proto::{Bye, CloseReason, ConnConfig, Connection, Event, Frame};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::worker::{dial, emit, nonce_of, read_until, Target};
use crate::{mqtt, sys};

/// Bytes of every message's payload.
pub const PAYLOAD: usize = 64;
/// The end-to-end bound, in windows (see the module's "Windows").
pub const GUARD: u64 = 4;
/// How long a handshake, a `BYE` or a subscription may take.
const HANDSHAKE: Duration = Duration::from_secs(10);
/// `stop`: how long the counts may stand still before what is missing is called lost, and the longest wait.
const SETTLE_QUIET: Duration = Duration::from_secs(3);
const SETTLE_MAX: Duration = Duration::from_secs(30);
/// `fill`: the longest wait for the server to acknowledge every message.
const FILL_MAX: Duration = Duration::from_secs(60);
/// Bytes read per `read` call.
const READ_CHUNK: usize = 64 * 1024;

#[derive(Debug, Clone)]
pub struct RelayOpts {
    /// The protocol the clients speak.
    pub target: Target,
    /// The server under test (loopback, started by the coordinator).
    pub addr: SocketAddr,
    /// The clients' source address, when given.
    pub source_ip: Option<IpAddr>,
    /// Sender → receiver pairs: two connections each.
    pub pairs: usize,
    /// See the module's "Windows".
    pub window: u64,
    /// tether: `SDATA` on sessions with the `reliable` extension (else `DATA`); Mosquitto: QoS 1 (else QoS 0).
    pub reliable: bool,
    /// tether `reliable`: senders ask for delivery receipts.
    pub receipts: bool,
    /// Heartbeat interval (MQTT keepalive, whole seconds).
    pub interval: Duration,
    /// Messages one sender sends at most, whatever the run's length.
    pub limit: u64,
    /// The process ends at this age whatever it is doing: it never outlives a coordinator that hung.
    pub max_seconds: u64,
}

// ---- the clock and the payload ----

/// Nanoseconds since this process first asked: the clock senders stamp and receivers read.
fn clock_ns() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    ORIGIN.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// Message `n`'s payload, stamped `at_ns`.
fn payload(n: u64, at_ns: u64) -> [u8; PAYLOAD] {
    let mut p = [0u8; PAYLOAD];
    p[..8].copy_from_slice(&at_ns.to_be_bytes());
    p[8..16].copy_from_slice(&n.to_be_bytes());
    p
}

/// A payload's stamp and number; `None` for anything this load generator did not send.
fn unstamp(p: &[u8]) -> Option<(u64, u64)> {
    if p.len() != PAYLOAD {
        return None;
    }
    let mut p = p;
    Some((p.get_u64(), p.get_u64()))
}

/// Payloads as `Bytes` cut from one shared buffer: one allocation per thousand messages, not one each.
#[derive(Default)]
struct Arena(BytesMut);

impl Arena {
    fn payload(&mut self, n: u64, at_ns: u64) -> Bytes {
        if self.0.capacity() < PAYLOAD {
            self.0.reserve(PAYLOAD * 1024);
        }
        self.0.put_slice(&payload(n, at_ns));
        self.0.split().freeze()
    }
}

// ---- latencies ----

/// Latencies in microseconds in a fixed histogram: 1 µs buckets below 1 ms, 10 µs below 10 ms, 100 µs below
/// 100 ms, 1 ms below 10 s, and one bucket beyond. A percentile is its bucket's lower edge: exact below 1 ms and
/// within 1% above. Fixed size, so a long run costs no more memory than a short one.
#[derive(Debug, Clone)]
pub struct Latencies {
    /// Samples per bucket ([`Latencies::bucket`]).
    counts: Box<[u64]>,
    /// Samples in all.
    n: u64,
    /// The largest sample: the exact maximum, and the answer for the bucket beyond 10 s.
    max_us: u64,
}

const BUCKETS: usize = 1000 + 900 + 900 + 9900 + 1;

impl Default for Latencies {
    fn default() -> Self {
        Latencies { counts: vec![0; BUCKETS].into_boxed_slice(), n: 0, max_us: 0 }
    }
}

impl Latencies {
    fn bucket(us: u64) -> usize {
        match us {
            0..1_000 => us as usize,
            1_000..10_000 => 1_000 + (us - 1_000) as usize / 10,
            10_000..100_000 => 1_900 + (us - 10_000) as usize / 100,
            100_000..10_000_000 => 2_800 + (us - 100_000) as usize / 1_000,
            _ => BUCKETS - 1,
        }
    }

    fn lower_edge(b: usize) -> u64 {
        let b = b as u64;
        match b {
            0..1_000 => b,
            1_000..1_900 => 1_000 + (b - 1_000) * 10,
            1_900..2_800 => 10_000 + (b - 1_900) * 100,
            _ => 100_000 + (b - 2_800) * 1_000,
        }
    }

    pub fn record(&mut self, us: u64) {
        self.counts[Self::bucket(us)] += 1;
        self.n += 1;
        self.max_us = self.max_us.max(us);
    }

    pub fn merge(&mut self, other: &Latencies) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += b;
        }
        self.n += other.n;
        self.max_us = self.max_us.max(other.max_us);
    }

    pub fn len(&self) -> u64 {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    pub fn max_us(&self) -> u64 {
        self.max_us
    }

    /// The `p` quantile (0..=1) in microseconds: the smallest recorded value's bucket with at least `p` of the
    /// samples at or below it. `None` without samples.
    pub fn percentile(&self, p: f64) -> Option<u64> {
        if self.n == 0 {
            return None;
        }
        let rank = ((p.clamp(0.0, 1.0) * self.n as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (b, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank && b < BUCKETS - 1 {
                return Some(Self::lower_edge(b).min(self.max_us));
            }
        }
        Some(self.max_us)
    }
}

// ---- what the connections share ----

/// The phase every sender obeys.
const CONNECTED: u8 = 0;
const RUNNING: u8 = 1;
const STOPPING: u8 = 2;

macro_rules! counts {
    ($($(#[$doc:meta])* $field:ident),* $(,)?) => {
        /// What every connection adds up, as it goes (per batch, not per message).
        #[derive(Debug, Default)]
        struct Counts {
            $($(#[$doc])* $field: AtomicU64,)*
        }

        impl Counts {
            fn json(&self) -> Value {
                json!({ $(stringify!($field): self.$field.load(Ordering::Relaxed),)* })
            }
        }
    };
}

counts! {
    /// Messages the senders queued: the offered load.
    sent,
    /// Messages the receivers took: the throughput.
    delivered,
    /// Bytes the clients wrote: the server's TCP payload in.
    bytes_written,
    /// Bytes the clients read: the server's TCP payload out.
    bytes_read,
    /// The server's acknowledgements to senders (tether `ACK`, MQTT PUBACK).
    acks_to_senders,
    /// The receivers' acknowledgements to the server (tether `ACK`, MQTT PUBACK).
    acks_from_receivers,
    /// tether receipts: the server's `REPORT`s to senders.
    reports,
    /// tether receipts: the senders' `ACK`s of those `REPORT`s.
    acks_of_reports,
    /// Sender wakeups that ended with the window full: the window held the sender back.
    window_waits,
    /// Sender wakeups that ended at the end-to-end bound: a receiver behind held the sender back.
    guard_waits,
    /// Message numbers a receiver never saw: lost.
    gaps,
    /// Message numbers a receiver saw again: delivered twice.
    duplicates,
}

/// One sender and its receiver.
#[derive(Default)]
struct Pair {
    /// The sender's last message number (messages queued).
    sent: AtomicU64,
    /// Messages the receiver took.
    received: AtomicU64,
    /// Messages the server acknowledged to the sender (tether `reliable`, MQTT QoS 1).
    acked: AtomicU64,
    /// Messages the sender was told will not be delivered: `UNDELIVERABLE`, or a `REPORT` saying why.
    refused: AtomicU64,
    /// Delivery receipts the sender received (tether `reliable` with receipts).
    receipts: AtomicU64,
    /// Wakes the sender: the phase changed, or its receiver took messages while the sender waited for that.
    wake: Notify,
    /// The sender waits for its receiver (room under the end-to-end bound), not for the server: only then does
    /// the receiver wake it, so that a sender waiting for acknowledgements is not woken per batch received.
    blocked: AtomicBool,
    /// The receiver's latencies between the marks.
    latencies: Mutex<Latencies>,
}

struct Shared {
    opts: RelayOpts,
    /// `CONNECTED`, `RUNNING` or `STOPPING`: whether senders send.
    phase: AtomicU8,
    /// Receivers record latencies only between the first and the second `mark`.
    measuring: AtomicBool,
    pairs: Vec<Pair>,
    /// The counts `mark` reports.
    n: Counts,
    /// Nudged at every batch a receiver takes and every acknowledgement a sender reads: `stop` waits on it.
    progress: Notify,
    /// The relay connections' sockets, for their TCP segment counts (they stay open until the process ends).
    fds: Mutex<Vec<RawFd>>,
    /// The first connection that failed, and why: every later answer carries it.
    failure: Mutex<Option<String>>,
}

impl Pair {
    /// What the receiver took so far, for a sender about to decide whether it may send: marked
    /// [`blocked`](Self::blocked) first, so that a batch the receiver takes after this read wakes the sender
    /// (it is cleared again when the sender is held back by something else, see [`Shared::next`]).
    fn watch_receiver(&self) -> u64 {
        self.blocked.store(true, Ordering::SeqCst);
        self.received.load(Ordering::SeqCst)
    }
}

impl Shared {
    fn running(&self) -> bool {
        self.phase.load(Ordering::Acquire) == RUNNING
    }

    /// The number of the sender's next message, if its bounds let it send one: `unacked` is what its window
    /// counts (`None` at most once, see the module's "Windows"). When they do not, the wait is counted by what
    /// held it back, and a sender held back by its receiver stays marked [`Pair::blocked`].
    fn next(&self, pair: &Pair, sent: u64, received: u64, unacked: Option<u64>) -> Option<u64> {
        if sent - received >= self.opts.window * GUARD {
            self.n.guard_waits.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        if unacked.is_some_and(|u| u >= self.opts.window) {
            self.n.window_waits.fetch_add(1, Ordering::Relaxed);
            pair.blocked.store(false, Ordering::SeqCst);
            return None;
        }
        (sent < self.opts.limit).then_some(sent + 1)
    }

    fn fail(&self, why: String) {
        self.failure.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get_or_insert(why);
        self.progress.notify_one();
    }

    fn failure(&self) -> Option<String> {
        self.failure.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    fn set_phase(&self, phase: u8) {
        self.phase.store(phase, Ordering::Release);
        for p in &self.pairs {
            p.wake.notify_one();
        }
    }

    /// TCP segments out and in over every relay connection so far.
    fn segments(&self) -> (u64, u64) {
        let fds = self.fds.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        fds.iter()
            .filter_map(|fd| sys::tcp_segments(*fd))
            .fold((0, 0), |(o, i), (so, si)| (o + u64::from(so), i + u64::from(si)))
    }

    fn mark(&self) -> Value {
        let (segs_out, segs_in) = self.segments();
        let mut v = self.n.json();
        v["event"] = json!("mark");
        v["at_us"] = json!(crate::sys::epoch_us());
        v["segments_out"] = json!(segs_out);
        v["segments_in"] = json!(segs_in);
        if let Some(e) = self.failure() {
            v["error"] = json!(e);
        }
        v
    }

    /// Whether pair `p` is done: its sender stopped (told to, or at its limit) and every message it sent is
    /// accounted for: taken by its receiver or refused, and where the protocol acknowledges, acknowledged (and
    /// receipted, when asked).
    fn settled(&self, p: &Pair) -> bool {
        let sent = p.sent.load(Ordering::Acquire);
        if self.phase.load(Ordering::Acquire) != STOPPING && sent < self.opts.limit {
            return false;
        }
        let (received, refused) = (p.received.load(Ordering::Acquire), p.refused.load(Ordering::Acquire));
        let acked = !self.opts.reliable || p.acked.load(Ordering::Acquire) >= sent;
        let tether_reliable = self.opts.reliable && self.opts.target == Target::Tether;
        let receipted =
            !(tether_reliable && self.opts.receipts) || p.receipts.load(Ordering::Acquire) + refused >= sent;
        received + refused >= sent && acked && receipted
    }
}

fn receiver_id(i: usize) -> String {
    format!("rr{i}")
}

fn sender_id(i: usize) -> String {
    format!("rs{i}")
}

/// A `BYE` of the client's own.
fn bye() -> Bye {
    Bye { reason: CloseReason::Bye, retry_after_ms: 0, alternative: String::new() }
}

/// What ended a connection's wait.
enum Woke {
    Read,
    Write,
    Timer,
    Nudge,
}

/// Wait for `nudge`, or forever without one.
async fn nudged(nudge: Option<&Notify>) {
    match nudge {
        Some(n) => n.notified().await,
        None => std::future::pending().await,
    }
}

/// Bytes and frames one connection counted since it last added them to the shared [`Counts`].
#[derive(Default)]
struct Local {
    /// Bytes read from and written to the socket: the server's TCP payload on this connection.
    read: u64,
    written: u64,
    /// `ACK`s this side queued (tether) or PUBACKs it sent (MQTT).
    acks_out: u64,
}

impl Local {
    /// Add to the shared counts; `acks` is where this side's acknowledgements count.
    fn publish(&mut self, n: &Counts, acks: &AtomicU64) {
        let l = std::mem::take(self);
        for (count, v) in [(&n.bytes_read, l.read), (&n.bytes_written, l.written), (acks, l.acks_out)] {
            if v > 0 {
                count.fetch_add(v, Ordering::Relaxed);
            }
        }
    }
}

// ---- tether ----

/// A tether client: the core in client role on a bare socket.
struct Link {
    /// The client id, for errors.
    id: String,
    stream: TcpStream,
    /// The protocol's state: what to send, what arrived, when a timer is due.
    conn: Connection,
    /// Bytes at the front of the core's output already counted by kind (whole frames).
    scanned: usize,
    local: Local,
    /// Where reads land before the core takes them (the core keeps only an incomplete frame).
    rbuf: Box<[u8]>,
}

impl Link {
    /// Connect as `id` (protocol v2; offering the `reliable` extension when `reliable`) and wait for `WELCOME`.
    async fn open(opts: &RelayOpts, id: &str, reliable: bool, receipts: bool) -> anyhow::Result<Link> {
        let stream = dial(opts.addr, opts.source_ip).await.with_context(|| format!("{id}: connecting"))?;
        let mut hello = Hello {
            heartbeat_ms: opts.interval.as_millis().min(u32::MAX as u128) as u32,
            ..Hello::new(V2, id, nonce_of(id))
        };
        if reliable {
            hello.extensions.push(Offer { receipts, resume: None }.to_extension());
        }
        let conn = Connection::client(Instant::now(), ConnConfig::default(), hello);
        let rbuf = vec![0u8; READ_CHUNK].into_boxed_slice();
        let mut link = Link { id: id.to_owned(), stream, conn, scanned: 0, local: Local::default(), rbuf };
        let deadline = tokio::time::Instant::now() + HANDSHAKE;
        loop {
            while let Some(ev) = link.conn.poll_event() {
                match ev {
                    Event::Welcome(_) if reliable && !link.conn.is_reliable() => {
                        bail!("{id}: the server did not grant the reliable extension (a build without it)")
                    }
                    Event::Welcome(_) => return Ok(link),
                    Event::Closed(c) => bail!("{id}: refused: {} {}", c.reason, c.detail.unwrap_or_default()),
                    _ => {}
                }
            }
            link.flush()?;
            let woke = tokio::time::timeout_at(deadline, link.wait(None))
                .await
                .map_err(|_| anyhow::anyhow!("{id}: no WELCOME within {HANDSHAKE:?}"))?;
            if !link.on_woke(woke)? {
                bail!("{id}: the server closed the connection during the handshake");
            }
        }
    }

    /// Count the kinds of the frames the core queued since the last scan (the core queues whole frames).
    fn scan(&mut self) {
        let tx = self.conn.poll_transmit();
        while let Some(h) = tx.get(self.scanned..self.scanned + frame::HEADER_LEN + 1) {
            let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
            if h[frame::HEADER_LEN] == frame::kind::ACK {
                self.local.acks_out += 1;
            }
            self.scanned += frame::HEADER_LEN + len;
        }
    }

    /// Write what the core queued, as far as the socket takes it now.
    fn flush(&mut self) -> std::io::Result<()> {
        self.scan();
        loop {
            let tx = self.conn.poll_transmit();
            if tx.is_empty() {
                return Ok(());
            }
            match self.stream.try_write(tx) {
                Ok(n) => {
                    self.local.written += n as u64;
                    self.scanned -= n.min(self.scanned);
                    self.conn.handle_written(Instant::now(), n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    /// Read what the socket has into the core; false at end of stream.
    fn read(&mut self) -> std::io::Result<bool> {
        loop {
            match self.stream.try_read(&mut self.rbuf) {
                Ok(0) => {
                    self.conn.handle_eof(Instant::now());
                    return Ok(false);
                }
                Ok(n) => {
                    self.local.read += n as u64;
                    self.conn.handle_bytes(Instant::now(), &self.rbuf[..n]);
                    if n < self.rbuf.len() {
                        return Ok(true);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(true),
                Err(e) => return Err(e),
            }
        }
    }

    async fn wait(&self, nudge: Option<&Notify>) -> Woke {
        let timer = self.conn.poll_timeout().map(tokio::time::Instant::from_std);
        let far = tokio::time::Instant::now() + Duration::from_secs(3600);
        let pending = !self.conn.poll_transmit().is_empty();
        tokio::select! {
            _ = self.stream.readable() => Woke::Read,
            _ = self.stream.writable(), if pending => Woke::Write,
            () = tokio::time::sleep_until(timer.unwrap_or(far)) => Woke::Timer,
            () = nudged(nudge) => Woke::Nudge,
        }
    }

    /// Act on what ended the wait; false when the server closed the connection.
    fn on_woke(&mut self, woke: Woke) -> std::io::Result<bool> {
        match woke {
            Woke::Read => self.read(),
            Woke::Timer => {
                self.conn.handle_timeout(Instant::now());
                Ok(true)
            }
            Woke::Write | Woke::Nudge => Ok(true),
        }
    }

    /// Wait, act, and flush; an error once the connection is gone.
    async fn turn(&mut self, nudge: Option<&Notify>) -> anyhow::Result<()> {
        let woke = self.wait(nudge).await;
        if !self.on_woke(woke).with_context(|| format!("{}: reading", self.id))? {
            bail!("{}: the server closed the connection", self.id);
        }
        Ok(())
    }

    fn closed(&self, c: &tether_proto::Closed) -> anyhow::Error {
        anyhow::anyhow!("{}: closed: {} {}", self.id, c.reason, c.detail.clone().unwrap_or_default())
    }
}

async fn tether_sender(sh: Arc<Shared>, i: usize, mut link: Link) -> anyhow::Result<()> {
    let pair = &sh.pairs[i];
    let (to, reliable) = (receiver_id(i), sh.opts.reliable);
    let (mut sent, mut acked, mut arena) = (0u64, 0u64, Arena::default());
    loop {
        // Acknowledgements, receipts and refusals all move `stop`'s accounting: any of them nudges it.
        let mut moved = false;
        while let Some(ev) = link.conn.poll_event() {
            match ev {
                Event::Acked(seq) => {
                    acked = acked.max(seq);
                    sh.n.acks_to_senders.fetch_add(1, Ordering::Relaxed);
                }
                Event::Report(r) => {
                    // Taken at once, as a client library takes what it hands its application.
                    link.conn.confirm(Instant::now(), r.seq);
                    sh.n.reports.fetch_add(1, Ordering::Relaxed);
                    let n = r.seqs.len() as u64;
                    match r.outcome {
                        None => pair.receipts.fetch_add(n, Ordering::Release),
                        Some(_) => pair.refused.fetch_add(n, Ordering::Release),
                    };
                }
                Event::Undeliverable { .. } => {
                    pair.refused.fetch_add(1, Ordering::Release);
                }
                Event::Closed(c) => return Err(link.closed(&c)),
                _ => continue,
            }
            moved = true;
        }
        if moved {
            pair.acked.store(acked, Ordering::Release);
            sh.progress.notify_one();
        }
        if sh.running() {
            let (received, at, before) = (pair.watch_receiver(), clock_ns(), sent);
            let now = Instant::now();
            while let Some(n) = sh.next(pair, sent, received, reliable.then(|| sent - acked)) {
                sent = n;
                let payload = arena.payload(sent, at);
                let f = match reliable {
                    true => Frame::Sdata { seq: sent, peer: to.clone(), payload },
                    false => Frame::Data { peer: to.clone(), payload },
                };
                link.conn.send(now, f).with_context(|| format!("{}: sending", link.id))?;
            }
            pair.sent.store(sent, Ordering::Release);
            sh.n.sent.fetch_add(sent - before, Ordering::Relaxed);
        }
        link.flush().with_context(|| format!("{}: writing", link.id))?;
        link.local.publish(&sh.n, &sh.n.acks_of_reports);
        link.turn(Some(&pair.wake)).await?;
    }
}

/// A receiver's bookkeeping: message numbers in order, latencies, its pair's count.
struct Taker {
    sh: Arc<Shared>,
    /// The pair's index.
    i: usize,
    /// The last message number taken.
    last: u64,
    /// When this batch was read.
    now_ns: u64,
    /// This batch's latencies (µs), recorded under the pair's lock once per batch.
    batch: Vec<u64>,
}

impl Taker {
    fn new(sh: Arc<Shared>, i: usize) -> Taker {
        Taker { sh, i, last: 0, now_ns: 0, batch: Vec::new() }
    }

    fn begin(&mut self) {
        self.now_ns = clock_ns();
    }

    fn take(&mut self, payload: &[u8]) -> anyhow::Result<()> {
        let (at, n) = unstamp(payload)
            .with_context(|| format!("{}: a payload of {} bytes", receiver_id(self.i), payload.len()))?;
        let counts = &self.sh.n;
        if n <= self.last {
            counts.duplicates.fetch_add(1, Ordering::Relaxed);
        } else {
            if n > self.last + 1 {
                counts.gaps.fetch_add(n - self.last - 1, Ordering::Relaxed);
            }
            self.last = n;
        }
        self.batch.push(self.now_ns.saturating_sub(at) / 1_000);
        Ok(())
    }

    /// The batch is done: its latencies recorded (between the marks), its sender nudged.
    fn end(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let pair = &self.sh.pairs[self.i];
        if self.sh.measuring.load(Ordering::Relaxed) {
            let mut l = pair.latencies.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            for us in &self.batch {
                l.record(*us);
            }
        }
        let took = self.batch.len() as u64;
        self.batch.clear();
        pair.received.fetch_add(took, Ordering::SeqCst);
        self.sh.n.delivered.fetch_add(took, Ordering::Relaxed);
        if pair.blocked.swap(false, Ordering::SeqCst) {
            pair.wake.notify_one();
        }
        self.sh.progress.notify_one();
    }
}

async fn tether_receiver(sh: Arc<Shared>, i: usize, mut link: Link) -> anyhow::Result<()> {
    let mut taker = Taker::new(sh.clone(), i);
    loop {
        taker.begin();
        while let Some(ev) = link.conn.poll_event() {
            match ev {
                Event::Data { payload, .. } => taker.take(&payload)?,
                Event::Sdata { seq, payload, .. } => {
                    taker.take(&payload)?;
                    link.conn.confirm(Instant::now(), seq);
                }
                Event::Closed(c) => return Err(link.closed(&c)),
                _ => {}
            }
        }
        taker.end();
        link.flush().with_context(|| format!("{}: writing", link.id))?;
        link.local.publish(&sh.n, &sh.n.acks_from_receivers);
        link.turn(None).await?;
    }
}

/// Keep a connection answering (heartbeats, acknowledgements) until the process ends.
async fn keep(mut link: Link) -> anyhow::Result<()> {
    loop {
        while let Some(ev) = link.conn.poll_event() {
            if let Event::Closed(c) = ev {
                return Err(link.closed(&c));
            }
        }
        link.flush()?;
        link.turn(None).await?;
    }
}

/// `holders H`: H reliable sessions `rh{j}`, each opened and closed with `BYE` at once, so the server keeps them
/// offline, holding what arrives for them.
async fn holders(opts: &RelayOpts, h: usize) -> anyhow::Result<()> {
    for j in 0..h {
        let mut link = Link::open(opts, &format!("rh{j}"), true, false).await?;
        link.conn.close(Instant::now(), bye());
        let deadline = tokio::time::Instant::now() + HANDSHAKE;
        link.flush()?;
        while !link.conn.poll_transmit().is_empty() {
            let woke = tokio::time::timeout_at(deadline, link.wait(None))
                .await
                .map_err(|_| anyhow::anyhow!("{}: the BYE was not written within {HANDSHAKE:?}", link.id))?;
            if !link.on_woke(woke)? {
                break;
            }
            link.flush()?;
        }
    }
    Ok(())
}

/// `fill K`: one more reliable client, `rf`, sends K messages spread over the `h` holders, within the window,
/// until the server acknowledged them all (each is then held, or refused with a `REPORT`). Returns the
/// acknowledged and the refused; the client stays connected.
async fn fill(opts: &RelayOpts, k: u64, h: usize) -> anyhow::Result<(u64, u64)> {
    let mut link = Link::open(opts, "rf", true, false).await?;
    let ids: Vec<String> = (0..h.max(1)).map(|j| format!("rh{j}")).collect();
    let (mut sent, mut acked, mut refused, mut arena) = (0u64, 0u64, 0u64, Arena::default());
    let deadline = tokio::time::Instant::now() + FILL_MAX;
    while acked < k {
        while let Some(ev) = link.conn.poll_event() {
            match ev {
                Event::Acked(seq) => acked = acked.max(seq),
                Event::Report(r) => {
                    link.conn.confirm(Instant::now(), r.seq);
                    if r.outcome.is_some() {
                        refused += r.seqs.len() as u64;
                    }
                }
                Event::Closed(c) => return Err(link.closed(&c)),
                _ => {}
            }
        }
        let (now, at) = (Instant::now(), clock_ns());
        while sent < k && sent - acked < opts.window {
            sent += 1;
            let to = ids[(sent as usize - 1) % ids.len()].clone();
            link.conn.send(now, Frame::Sdata { seq: sent, peer: to, payload: arena.payload(sent, at) })?;
        }
        link.flush()?;
        if acked >= k {
            break;
        }
        tokio::time::timeout_at(deadline, link.turn(None))
            .await
            .map_err(|_| anyhow::anyhow!("rf: the server acknowledged {acked} of {k} within {FILL_MAX:?}"))??;
    }
    tokio::spawn(keep(link));
    Ok((acked, refused))
}

// ---- MQTT ----

/// An MQTT client on a bare socket.
struct MqttLink {
    /// The client id, for errors.
    id: String,
    stream: TcpStream,
    /// Bytes read and not yet a whole packet.
    rx: BytesMut,
    /// Bytes to write.
    tx: Vec<u8>,
    /// When this client last wrote: it sends `PINGREQ` after a keepalive without writing.
    last_tx: tokio::time::Instant,
    /// The keepalive the CONNECT announced.
    keepalive: Duration,
    local: Local,
}

impl MqttLink {
    /// CONNECT as `id` (clean session, no Will) and wait for CONNACK.
    async fn open(opts: &RelayOpts, id: &str) -> anyhow::Result<MqttLink> {
        let mut stream = dial(opts.addr, opts.source_ip).await.with_context(|| format!("{id}: connecting"))?;
        let keepalive = opts.interval.as_secs().clamp(1, u16::MAX as u64);
        stream.write_all(&mqtt::connect(id, keepalive as u16, None)).await?;
        let mut rx = BytesMut::new();
        let answer = read_until(&mut stream, &mut rx, |buf| {
            let Some((kind, body, n)) = mqtt::split(buf).map_err(anyhow::Error::msg)? else { return Ok(None) };
            let ok = kind == mqtt::CONNACK && body.get(1) == Some(&0);
            buf.advance(n);
            Ok(Some(ok))
        });
        if !tokio::time::timeout(HANDSHAKE, answer).await.with_context(|| format!("{id}: no CONNACK"))?? {
            bail!("{id}: CONNECT refused");
        }
        let last_tx = tokio::time::Instant::now();
        let keepalive = Duration::from_secs(keepalive);
        Ok(MqttLink { id: id.to_owned(), stream, rx, tx: Vec::new(), last_tx, keepalive, local: Local::default() })
    }

    /// SUBSCRIBE to `topic` at `qos` and wait for the SUBACK granting it.
    async fn subscribe(&mut self, topic: &str, qos: u8) -> anyhow::Result<()> {
        self.stream.write_all(&mqtt::subscribe(1, topic, qos)).await?;
        let answer = read_until(&mut self.stream, &mut self.rx, |buf| {
            let Some((kind, body, n)) = mqtt::split(buf).map_err(anyhow::Error::msg)? else { return Ok(None) };
            let granted = (kind == mqtt::SUBACK).then(|| body.get(2).copied()).flatten();
            buf.advance(n);
            Ok(Some(granted))
        });
        let granted =
            tokio::time::timeout(HANDSHAKE, answer).await.with_context(|| format!("{}: no SUBACK", self.id))??;
        if granted != Some(qos) {
            bail!("{}: SUBSCRIBE {topic} at QoS {qos} granted {granted:?}", self.id);
        }
        Ok(())
    }

    /// Every whole packet read so far, with its first byte, to `each`.
    fn packets(&mut self, mut each: impl FnMut(u8, &[u8], &mut Vec<u8>) -> anyhow::Result<()>) -> anyhow::Result<()> {
        let mut used = 0;
        while let Some((first, body, n)) = mqtt::split_raw(&self.rx[used..]).map_err(anyhow::Error::msg)? {
            each(first, body, &mut self.tx)?;
            used += n;
        }
        self.rx.advance(used);
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let mut done = 0;
        while done < self.tx.len() {
            match self.stream.try_write(&self.tx[done..]) {
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        if done > 0 {
            self.local.written += done as u64;
            self.last_tx = tokio::time::Instant::now();
            self.tx.drain(..done);
        }
        Ok(())
    }

    fn read(&mut self) -> std::io::Result<bool> {
        loop {
            self.rx.reserve(READ_CHUNK);
            match self.stream.try_read_buf(&mut self.rx) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.local.read += n as u64;
                    if n < READ_CHUNK {
                        return Ok(true);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(true),
                Err(e) => return Err(e),
            }
        }
    }

    /// Wait, act (read, or queue a `PINGREQ` when a keepalive passed without writing), and flush.
    async fn turn(&mut self, nudge: Option<&Notify>) -> anyhow::Result<()> {
        let pending = !self.tx.is_empty();
        let woke = tokio::select! {
            _ = self.stream.readable() => Woke::Read,
            _ = self.stream.writable(), if pending => Woke::Write,
            () = tokio::time::sleep_until(self.last_tx + self.keepalive) => Woke::Timer,
            () = nudged(nudge) => Woke::Nudge,
        };
        match woke {
            Woke::Read if !self.read().with_context(|| format!("{}: reading", self.id))? => {
                bail!("{}: the broker closed the connection", self.id)
            }
            Woke::Timer if self.tx.is_empty() => self.tx.extend_from_slice(&mqtt::PINGREQ),
            _ => {}
        }
        Ok(())
    }
}

async fn mqtt_sender(sh: Arc<Shared>, i: usize, mut link: MqttLink) -> anyhow::Result<()> {
    let pair = &sh.pairs[i];
    let (topic, qos1) = (receiver_id(i), sh.opts.reliable);
    let (mut sent, mut acked, mut packet_id) = (0u64, 0u64, 0u16);
    loop {
        let mut acks = 0;
        link.packets(|first, _, _| {
            acks += u64::from(first >> 4 == mqtt::PUBACK);
            Ok(())
        })?;
        if acks > 0 {
            acked += acks;
            pair.acked.store(acked, Ordering::Release);
            sh.n.acks_to_senders.fetch_add(acks, Ordering::Relaxed);
            sh.progress.notify_one();
        }
        if sh.running() {
            let (received, at, before) = (pair.watch_receiver(), clock_ns(), sent);
            while let Some(n) = sh.next(pair, sent, received, qos1.then(|| sent - acked)) {
                sent = n;
                // Packet ids 1..=65535 in turn: the window (at most 1,000) never has one in use twice.
                let id = qos1.then(|| {
                    packet_id = packet_id % u16::MAX + 1;
                    packet_id
                });
                mqtt::publish_into(&mut link.tx, &topic, id, &payload(sent, at));
            }
            pair.sent.store(sent, Ordering::Release);
            sh.n.sent.fetch_add(sent - before, Ordering::Relaxed);
        }
        link.flush().with_context(|| format!("{}: writing", link.id))?;
        link.local.publish(&sh.n, &sh.n.acks_of_reports);
        link.turn(Some(&pair.wake)).await?;
    }
}

async fn mqtt_receiver(sh: Arc<Shared>, i: usize, mut link: MqttLink) -> anyhow::Result<()> {
    let mut taker = Taker::new(sh.clone(), i);
    loop {
        taker.begin();
        let mut acks = 0;
        link.packets(|first, body, tx| {
            if first >> 4 != mqtt::PUBLISH {
                return Ok(());
            }
            let p = mqtt::publish_parts(first, body).context("a malformed PUBLISH")?;
            taker.take(p.payload)?;
            if let Some(id) = p.packet_id {
                mqtt::puback_into(tx, id);
                acks += 1;
            }
            Ok(())
        })?;
        link.local.acks_out += acks;
        taker.end();
        link.flush().with_context(|| format!("{}: writing", link.id))?;
        link.local.publish(&sh.n, &sh.n.acks_from_receivers);
        link.turn(None).await?;
    }
}

// ---- the process ----

/// Open pair `i`'s receiver, then its sender, and start both; their sockets join `sh.fds`.
async fn open_pair(sh: &Arc<Shared>, i: usize) -> anyhow::Result<()> {
    let (o, rx, tx) = (&sh.opts, receiver_id(i), sender_id(i));
    let mut fds = Vec::new();
    match o.target {
        Target::Tether => {
            let r = Link::open(o, &rx, o.reliable, false).await?;
            let s = Link::open(o, &tx, o.reliable, o.receipts).await?;
            fds.extend([r.stream.as_raw_fd(), s.stream.as_raw_fd()]);
            spawn_task(sh, tether_receiver(sh.clone(), i, r));
            spawn_task(sh, tether_sender(sh.clone(), i, s));
        }
        Target::Mosquitto => {
            let mut r = MqttLink::open(o, &rx).await?;
            r.subscribe(&rx, u8::from(o.reliable)).await?;
            let s = MqttLink::open(o, &tx).await?;
            fds.extend([r.stream.as_raw_fd(), s.stream.as_raw_fd()]);
            spawn_task(sh, mqtt_receiver(sh.clone(), i, r));
            spawn_task(sh, mqtt_sender(sh.clone(), i, s));
        }
        Target::Rumqttd | Target::Nats => bail!("the relay load generator speaks tether and Mosquitto's MQTT only"),
    }
    sh.fds.lock().unwrap_or_else(std::sync::PoisonError::into_inner).extend(fds);
    Ok(())
}

/// Run a connection's task; its error is the run's failure.
fn spawn_task(sh: &Arc<Shared>, task: impl std::future::Future<Output = anyhow::Result<()>> + Send + 'static) {
    let sh = sh.clone();
    tokio::spawn(async move {
        if let Err(e) = task.await {
            sh.fail(format!("{e:#}"));
        }
    });
}

pub async fn run(opts: RelayOpts) -> anyhow::Result<()> {
    let limit = Duration::from_secs(opts.max_seconds.max(1));
    match tokio::time::timeout(limit, serve(opts)).await {
        Ok(r) => r,
        Err(_) => bail!("relay worker reached its time limit"),
    }
}

impl Shared {
    fn new(opts: RelayOpts) -> anyhow::Result<Arc<Shared>> {
        if opts.window == 0 || opts.pairs == 0 {
            bail!("a relay needs at least one pair and a window of at least one message");
        }
        clock_ns();
        Ok(Arc::new(Shared {
            pairs: (0..opts.pairs).map(|_| Pair::default()).collect(),
            opts,
            phase: AtomicU8::new(CONNECTED),
            measuring: AtomicBool::new(false),
            n: Counts::default(),
            progress: Notify::new(),
            fds: Mutex::new(Vec::new()),
            failure: Mutex::new(None),
        }))
    }
}

async fn serve(opts: RelayOpts) -> anyhow::Result<()> {
    let sh = Shared::new(opts)?;
    let started = Instant::now();
    for i in 0..sh.opts.pairs {
        if let Err(e) = open_pair(&sh, i).await {
            emit(
                json!({"event": "connected", "n": 2 * i, "failed": 2 * (sh.opts.pairs - i), "first_error": format!("{e:#}")}),
            );
            return Err(e);
        }
    }
    emit(
        json!({"event": "connected", "n": 2 * sh.opts.pairs, "failed": 0, "elapsed_us": started.elapsed().as_micros() as u64}),
    );
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut holders_opened = 0;
    let mut marks = 0;
    while let Some(line) = lines.next_line().await? {
        let words: Vec<&str> = line.split_whitespace().collect();
        let arg = words.get(1).and_then(|w| w.parse::<u64>().ok());
        match (words.first().copied(), arg) {
            (Some("holders"), Some(h)) => {
                holders(&sh.opts, h as usize).await?;
                holders_opened = h as usize;
                emit(json!({"event": "holders_offline", "n": h}));
            }
            (Some("fill"), Some(k)) => {
                let (acked, refused) = fill(&sh.opts, k, holders_opened).await?;
                emit(json!({"event": "filled", "acked": acked, "refused": refused}));
            }
            (Some("start"), _) => {
                sh.set_phase(RUNNING);
                emit(json!({"event": "started"}));
            }
            (Some("mark"), _) => {
                marks += 1;
                sh.measuring.store(marks == 1, Ordering::Relaxed);
                emit(sh.mark());
            }
            (Some("stop"), _) => {
                sh.measuring.store(false, Ordering::Relaxed);
                sh.set_phase(STOPPING);
                emit(settle(&sh).await);
            }
            _ => emit(json!({"event": "error", "detail": format!("unknown command {line:?}")})),
        }
    }
    Ok(())
}

/// After `stop`: wait until every pair is [`Shared::settled`] (or nothing moved for [`SETTLE_QUIET`]), then the
/// totals, the checks, the latencies, and what ended the wait.
async fn settle(sh: &Shared) -> Value {
    let deadline = tokio::time::Instant::now() + SETTLE_MAX;
    let ended = loop {
        if sh.failure().is_some() {
            break "failure";
        }
        if sh.pairs.iter().all(|p| sh.settled(p)) {
            break "accounted";
        }
        let quiet = (tokio::time::Instant::now() + SETTLE_QUIET).min(deadline);
        if tokio::time::timeout_at(quiet, sh.progress.notified()).await.is_err() {
            break if quiet >= deadline { "deadline" } else { "quiet" };
        }
    };
    let sum = |f: fn(&Pair) -> &AtomicU64| sh.pairs.iter().map(|p| f(p).load(Ordering::Acquire)).sum::<u64>();
    let (sent, received, refused) = (sum(|p| &p.sent), sum(|p| &p.received), sum(|p| &p.refused));
    let mut l = Latencies::default();
    for p in &sh.pairs {
        l.merge(&p.latencies.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
    }
    let mut v = sh.n.json();
    v["event"] = json!("done");
    v["settled"] = json!(sh.pairs.iter().all(|p| sh.settled(p)));
    // What ended the wait: everything accounted for, nothing moving for SETTLE_QUIET, SETTLE_MAX, or a failure.
    v["ended"] = json!(ended);
    v["messages_sent"] = json!(sent);
    v["messages_received"] = json!(received);
    v["refused"] = json!(refused);
    v["lost"] = json!(sent.saturating_sub(received + refused));
    v["acked"] = json!(sum(|p| &p.acked));
    v["receipts"] = json!(sum(|p| &p.receipts));
    v["latency_samples"] = json!(l.len());
    v["latency_us_p50"] = json!(l.percentile(0.5));
    v["latency_us_p99"] = json!(l.percentile(0.99));
    v["latency_us_max"] = json!(l.max_us());
    if let Some(e) = sh.failure() {
        v["error"] = json!(e);
    }
    v
}

#[cfg(test)]
mod tests;
