//! Acknowledged delivery and session resume (the v2 `reliable` extension), sans IO: the rules every driver of a
//! connection shares. docs/protocol.md section 5 specifies the wire.
//!
//! # Layout
//! - [`Offer`] and [`Grant`]: the extension's value in `HELLO` (a resume request, or none) and in `WELCOME` (the
//!   resume token and whether continuity holds).
//! - [`Inbox`]: the receiving half of one direction: the last sequence number received in order, duplicates
//!   dropped, a gap refused, and when a cumulative `ACK` is due (after [`ACK_EVERY`] messages or [`ACK_DELAY`],
//!   or riding along with a frame sent anyway). An `ACK` covers only what the inbox's owner confirmed it took
//!   (`Inbox::confirm`): a message the owner could not take (its session moved, a store did not answer) is never
//!   acknowledged. [`crate::Connection`] runs one per reliable connection.
//! - [`Outbox`]: the sending half: sequence numbers assigned, what is unacknowledged kept (bounded in messages
//!   and bytes: a full outbox refuses, it never drops), released by `ACK`, replayed after a resume.
//! - [`Sessions`]: the server's reliable sessions by client id: their outboxes outlive connections (the offline
//!   hold), a resume is decided here ([`Sessions::open`]), sessions expire, and the fate of every held message
//!   (a delivery receipt, or undeliverable with why) is routed back to its sender as a sequenced `REPORT`.
//!
//! # Rules
//! Sequence numbers start at 1 in each direction of each session and never wrap (`u64`). A receiver takes only
//! `last + 1`; a sequence number at or below `last` is a duplicate (a replay that crossed an `ACK`) and is dropped
//! and acknowledged again; anything above `last + 1` is a gap, which a peer that follows these rules never sends:
//! a protocol error. An `ACK` of a sequence number not yet sent is a protocol error too.
//!
//! Resume is binary: [`Status::Resumed`] means every message either side sent is accounted for. Otherwise the
//! client is told that it is not ([`Status::ResumedWithLoss`], [`Status::Fresh`]), why and how many messages
//! were lost when the server knows.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::frame::{ext, Extension, Frame, Report, Undeliverable};

/// A session's resume token: the first 8 bytes name the store that issued it (a server's run, or a cluster's
/// Redis), the last 8 are random.
pub type Token = [u8; 16];

/// Sessions one [`Sessions::expire`] call ends at most, so that one call's work under the caller's lock stays
/// small.
pub const EXPIRE_BATCH: usize = 16;

/// An `ACK` is sent at the latest after this many sequenced frames received.
pub const ACK_EVERY: u32 = 16;
/// An `ACK` is sent at the latest this long after the first sequenced frame it covers.
pub const ACK_DELAY: Duration = Duration::from_millis(20);

/// `HELLO`'s `reliable` extension: `flags: u8` alone (a new session), or `flags: u8`, `token: 16 bytes`,
/// `received: u64` (a resume).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offer {
    /// Flag bit 0: the client wants delivery receipts for the messages it sends.
    pub receipts: bool,
    pub resume: Option<Resume>,
}

/// What a reconnecting client presents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resume {
    pub token: Token,
    /// The last sequence number of the server's stream the client took in order (0: none).
    pub received: u64,
}

impl Offer {
    pub fn to_extension(&self) -> Extension {
        let mut v = vec![u8::from(self.receipts)];
        if let Some(r) = self.resume {
            v.extend_from_slice(&r.token);
            v.extend_from_slice(&r.received.to_be_bytes());
        }
        Extension { kind: ext::RELIABLE, value: Bytes::from(v) }
    }

    /// The offer in `list`, if any; a value of another length is ignored, as for every extension.
    pub fn find(list: &[Extension]) -> Option<Offer> {
        let v = &list.iter().find(|e| e.kind == ext::RELIABLE)?.value;
        let receipts = v.first()? & 1 != 0;
        match v.len() {
            1 => Some(Offer { receipts, resume: None }),
            25 => {
                let token = v[1..17].try_into().expect("16 bytes");
                let received = u64::from_be_bytes(v[17..25].try_into().expect("8 bytes"));
                Some(Offer { receipts, resume: Some(Resume { token, received }) })
            }
            _ => None,
        }
    }
}

/// Whether continuity holds, in `WELCOME`'s `reliable` extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// No resume was asked: a new session, both streams start at 1.
    New,
    /// The session resumed and nothing was lost: the server replays what the client has not received, and the
    /// client resends what the server has not (after `Grant::received`).
    Resumed,
    /// The session resumed, its streams continue, but `Grant::lost` messages to the client were refused while it
    /// was away (its hold was full; their senders were told).
    ResumedWithLoss,
    /// The session could not be resumed (`Grant::why`): this is a new session, and what the old one held is
    /// gone (`Grant::lost` messages, `u32::MAX` when unknown).
    Fresh,
}

impl Status {
    /// The snake_case name used in JSON lines and by libtether.
    pub const fn as_str(self) -> &'static str {
        match self {
            Status::New => "new",
            Status::Resumed => "resumed",
            Status::ResumedWithLoss => "resumed_with_loss",
            Status::Fresh => "fresh",
        }
    }
}

/// Why a resume did not find its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LostWhy {
    /// The session stayed offline longer than the server keeps sessions.
    Expired,
    /// Messages to the client were refused because its hold was full ([`Status::ResumedWithLoss`]).
    HoldOverflow,
    /// The token was issued by an earlier run of the server (or another store): it restarted without a store.
    Restarted,
    /// The server knows nothing of the token (forged, or forgotten long ago).
    Unknown,
    /// Another connection took the id without the session's token (another device, or a client that lost it).
    Replaced,
    /// A code this build does not know.
    Other(u8),
}

impl LostWhy {
    pub fn code(self) -> u8 {
        match self {
            LostWhy::Expired => 1,
            LostWhy::HoldOverflow => 2,
            LostWhy::Restarted => 3,
            LostWhy::Unknown => 4,
            LostWhy::Replaced => 5,
            LostWhy::Other(c) => c,
        }
    }

    pub fn from_code(c: u8) -> LostWhy {
        match c {
            1 => LostWhy::Expired,
            2 => LostWhy::HoldOverflow,
            3 => LostWhy::Restarted,
            4 => LostWhy::Unknown,
            5 => LostWhy::Replaced,
            c => LostWhy::Other(c),
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            LostWhy::Expired => "expired",
            LostWhy::HoldOverflow => "hold_overflow",
            LostWhy::Restarted => "server_restarted",
            LostWhy::Unknown => "unknown_token",
            LostWhy::Replaced => "replaced",
            LostWhy::Other(_) => "unknown",
        }
    }
}

/// `WELCOME`'s `reliable` extension: `token: 16 bytes`, `status: u8`, `why: u8`, `received: u64`, `lost: u32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// The token to present when resuming this session.
    pub token: Token,
    pub status: Status,
    /// Why continuity does not hold (`None` for `New` and `Resumed`).
    pub why: Option<LostWhy>,
    /// The last sequence number of the client's stream the server has: the client resends what follows.
    pub received: u64,
    /// Messages lost ([`Status::ResumedWithLoss`], [`Status::Fresh`]); `u32::MAX` when unknown.
    pub lost: u32,
}

impl Grant {
    pub fn to_extension(&self) -> Extension {
        let mut v = Vec::with_capacity(30);
        v.extend_from_slice(&self.token);
        v.push(match self.status {
            Status::New => 0,
            Status::Resumed => 1,
            Status::ResumedWithLoss => 2,
            Status::Fresh => 3,
        });
        v.push(self.why.map_or(0, LostWhy::code));
        v.extend_from_slice(&self.received.to_be_bytes());
        v.extend_from_slice(&self.lost.to_be_bytes());
        Extension { kind: ext::RELIABLE, value: Bytes::from(v) }
    }

    /// The grant in `list`, if any. A value of another length, or an unknown status, is ignored: the extension
    /// is then not in effect.
    pub fn find(list: &[Extension]) -> Option<Grant> {
        let v = &list.iter().find(|e| e.kind == ext::RELIABLE)?.value;
        if v.len() != 30 {
            return None;
        }
        let status = match v[16] {
            0 => Status::New,
            1 => Status::Resumed,
            2 => Status::ResumedWithLoss,
            3 => Status::Fresh,
            _ => return None,
        };
        Some(Grant {
            token: v[..16].try_into().expect("16 bytes"),
            status,
            why: (v[17] != 0).then(|| LostWhy::from_code(v[17])),
            received: u64::from_be_bytes(v[18..26].try_into().expect("8 bytes")),
            lost: u32::from_be_bytes(v[26..30].try_into().expect("4 bytes")),
        })
    }

    /// Whether the streams continue (the client keeps its own outbox and received count).
    pub fn continues(&self) -> bool {
        matches!(self.status, Status::Resumed | Status::ResumedWithLoss)
    }
}

/// What an [`Inbox`] makes of a sequenced frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accept {
    /// The next in order: deliver it.
    New,
    /// Already taken: drop it (an `ACK` is due again, so the sender stops replaying it).
    Duplicate,
    /// Not the next: a protocol error.
    Gap { expected: u64 },
}

/// The receiving half of one direction of a reliable session.
#[derive(Debug, Clone, Default)]
pub struct Inbox {
    /// The last sequence number received in order.
    last: u64,
    /// The last one its owner confirmed it took (held, handed on, or reported): an `ACK` never covers more.
    taken: u64,
    /// The last sequence number acknowledged to the peer.
    acked: u64,
    /// Confirmed (or received again as duplicates) since `acked` was last sent.
    pending: u32,
    /// When an `ACK` is due, once something is pending.
    due: Option<Instant>,
    /// Duplicates dropped.
    duplicates: u64,
}

impl Inbox {
    /// An inbox whose stream continues after `last` (0 for a new stream).
    pub fn new(last: u64) -> Inbox {
        Inbox { last, taken: last, acked: last, pending: 0, due: None, duplicates: 0 }
    }

    pub fn last(&self) -> u64 {
        self.last
    }

    /// Duplicates dropped so far.
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// The last sequence number its owner confirmed.
    pub fn taken(&self) -> u64 {
        self.taken
    }

    /// Judge sequence number `seq` arriving at `now`. A new one is acknowledged only once its owner confirms it
    /// ([`confirm`](Self::confirm)); a duplicate is acknowledged again (the peer missed our `ACK`).
    pub fn accept(&mut self, now: Instant, seq: u64) -> Accept {
        if seq == self.last + 1 {
            self.last = seq;
            Accept::New
        } else if seq <= self.last {
            self.duplicates += 1;
            self.schedule(now, 1);
            Accept::Duplicate
        } else {
            Accept::Gap { expected: self.last + 1 }
        }
    }

    /// The owner took everything up to `seq` (at most what was received): schedule the `ACK` that covers it.
    pub fn confirm(&mut self, now: Instant, seq: u64) {
        let seq = seq.min(self.last);
        if seq > self.taken {
            let n = u32::try_from(seq - self.taken).unwrap_or(u32::MAX);
            self.taken = seq;
            self.schedule(now, n);
        }
    }

    fn schedule(&mut self, now: Instant, n: u32) {
        self.pending = self.pending.saturating_add(n);
        self.due.get_or_insert(now + ACK_DELAY);
    }

    /// The `ACK` to send now, if one is due at `now` (the delay passed, or [`ACK_EVERY`] are pending).
    pub fn ack_due(&mut self, now: Instant) -> Option<u64> {
        match self.due {
            Some(due) if now >= due || self.pending >= ACK_EVERY => self.take(),
            _ => None,
        }
    }

    /// The `ACK` to send along with a frame sent anyway: anything pending.
    pub fn ack_pending(&mut self) -> Option<u64> {
        self.due.and_then(|_| self.take())
    }

    fn take(&mut self) -> Option<u64> {
        self.due = None;
        self.pending = 0;
        self.acked = self.taken;
        Some(self.taken)
    }

    /// When the next `ACK` falls due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.due
    }
}

/// Bounds on what an outbox keeps unacknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub messages: usize,
    pub bytes: usize,
}

/// Why an outbox refused a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{messages} messages ({bytes} bytes) unacknowledged: the bound is reached")]
pub struct Full {
    pub messages: usize,
    pub bytes: usize,
}

/// An `ACK` or a resume's `received` that no peer following the rules sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    /// It names a sequence number that was never sent.
    #[error("acknowledgement of {acked}, but only {sent} were sent")]
    Unsent { acked: u64, sent: u64 },
    /// A resume below what the peer had already acknowledged: what it claims to lack was released.
    #[error("resume after {received}, but {acked} were acknowledged")]
    Behind { received: u64, acked: u64 },
}

/// The sending half of one direction: sequence numbers, and what waits for acknowledgement.
#[derive(Debug, Clone)]
pub struct Outbox<T> {
    /// The next sequence number to assign.
    next: u64,
    /// The highest sequence number handed to the current connection.
    sent: u64,
    /// The highest sequence number the peer acknowledged.
    acked: u64,
    items: VecDeque<(u64, usize, T)>,
    bytes: usize,
}

impl<T> Default for Outbox<T> {
    fn default() -> Self {
        Outbox { next: 1, sent: 0, acked: 0, items: VecDeque::new(), bytes: 0 }
    }
}

impl<T> Outbox<T> {
    /// Keep `item` (`size` bytes) under the next sequence number, unless `limits` are reached.
    pub fn push(&mut self, item: T, size: usize, limits: Limits) -> Result<u64, Full> {
        if self.items.len() >= limits.messages || self.bytes + size > limits.bytes {
            return Err(Full { messages: self.items.len(), bytes: self.bytes });
        }
        Ok(self.push_unbounded(item, size))
    }

    /// Keep `item` whatever the bounds (the server's reports: a sender must learn the fate of what it sent; the
    /// server bounds them by closing a sender they take past its bound, see [`Sessions::over_bound`]).
    pub fn push_unbounded(&mut self, item: T, size: usize) -> u64 {
        let seq = self.next;
        self.next += 1;
        self.items.push_back((seq, size, item));
        self.bytes += size;
        seq
    }

    /// The peer acknowledged everything up to `seq`: the released items, oldest first.
    pub fn ack(&mut self, seq: u64) -> Result<Vec<(u64, T)>, AckError> {
        if seq > self.sent {
            return Err(AckError::Unsent { acked: seq, sent: self.sent });
        }
        self.acked = self.acked.max(seq);
        let mut out = Vec::new();
        while self.items.front().is_some_and(|(s, _, _)| *s <= seq) {
            let (s, size, item) = self.items.pop_front().expect("front exists");
            self.bytes -= size;
            out.push((s, item));
        }
        Ok(out)
    }

    /// A new connection resumes after `received`: release what it covers, and send everything after it again.
    pub fn resume(&mut self, received: u64) -> Result<Vec<(u64, T)>, AckError> {
        let assigned = self.next - 1;
        if received > assigned {
            return Err(AckError::Unsent { acked: received, sent: assigned });
        }
        if received < self.acked {
            return Err(AckError::Behind { received, acked: self.acked });
        }
        self.sent = assigned;
        let released = self.ack(received);
        self.sent = received;
        released
    }

    /// The next item not yet handed to the current connection, marked sent.
    pub fn next_unsent(&mut self) -> Option<(u64, &T)> {
        // Items hold consecutive sequence numbers from the front's; the front is never past `sent + 1`.
        let first = self.items.front()?.0;
        let idx = usize::try_from((self.sent + 1).saturating_sub(first)).ok()?;
        let (seq, _, item) = self.items.get(idx)?;
        self.sent = *seq;
        Some((*seq, item))
    }

    /// The highest sequence number handed to the current connection.
    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// The current connection could not send `seq` after all: it is the next unsent again (nothing after it was
    /// sent either).
    pub fn unsend(&mut self, seq: u64) {
        if seq <= self.sent && seq > self.acked {
            self.sent = seq - 1;
        }
    }

    /// Whether items wait to be sent on the current connection.
    pub fn has_unsent(&self) -> bool {
        self.items.back().is_some_and(|(s, _, _)| *s > self.sent)
    }

    /// Unacknowledged items (sent or not).
    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Bytes of the unacknowledged items, as sized when pushed.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The last sequence number assigned (0: none).
    pub fn assigned(&self) -> u64 {
        self.next - 1
    }

    /// Take every item out (the session ends).
    pub fn drain(&mut self) -> impl Iterator<Item = (u64, T)> + '_ {
        self.bytes = 0;
        self.items.drain(..).map(|(s, _, t)| (s, t))
    }

    /// The unacknowledged items, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &T)> {
        self.items.iter().map(|(s, _, t)| (*s, t))
    }
}

/// Who is told what became of a held message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A reliable client's message, by its sequence number, in the session that sent it.
    Client { id: String, token: Token, seq: u64 },
    /// The server application's message, by a number of the application's choosing.
    App(u64),
}

/// What a reliable session's stream to its client carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// A message from `from` (empty: the server application).
    Data { from: String, payload: Bytes, origin: Option<Origin> },
    /// The fate of messages this client sent to `peer`.
    Report { peer: String, outcome: Option<Undeliverable>, seqs: Vec<u64> },
}

/// Bytes a held message is counted for: its payload, its sender's id and the bookkeeping around it.
pub fn held_size(payload: usize, from: usize) -> usize {
    payload + from + 96
}

impl Body {
    /// The frame that carries this item as sequence number `seq`.
    pub fn frame(&self, seq: u64) -> Frame {
        match self {
            Body::Data { from, payload, .. } => Frame::Sdata { seq, peer: from.clone(), payload: payload.clone() },
            Body::Report { peer, outcome, seqs } => {
                Frame::Report(Report { seq, peer: peer.clone(), outcome: *outcome, seqs: seqs.clone() })
            }
        }
    }
}

/// The server's bounds on reliable sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldConfig {
    /// How long a session outlives its last connection.
    pub expiry: Duration,
    /// Unacknowledged messages one session may hold (online or offline).
    pub per_session: Limits,
    /// Bytes all sessions together may hold.
    pub total_bytes: usize,
    /// How many ended sessions' tokens are remembered, to tell a late resume why its session is gone.
    pub remember_ended: usize,
}

impl Default for HoldConfig {
    fn default() -> Self {
        HoldConfig {
            expiry: Duration::from_secs(120),
            per_session: Limits { messages: 10_000, bytes: 4 << 20 },
            total_bytes: 256 << 20,
            remember_ended: 16_384,
        }
    }
}

/// Counters since the table was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Items sent again on a resumed connection.
    pub replayed: u64,
    /// Sessions ended by expiry.
    pub expired: u64,
    /// Messages refused because a hold was full.
    pub overflows: u64,
    /// Sessions resumed.
    pub resumed: u64,
    /// Resumes refused (a fresh session was given).
    pub resume_refused: u64,
}

/// One reliable session.
#[derive(Debug)]
pub struct Session<A> {
    token: Token,
    receipts: bool,
    out: Outbox<Body>,
    /// The last sequence number of the client's stream the server took.
    rx: u64,
    /// The connection carrying the session, if any.
    attached: Option<A>,
    /// When an offline session expires.
    expires: Option<Instant>,
    /// Messages refused since the client last resumed (its hold was full).
    lost: u32,
}

/// What a session's hold looks like, for operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldView {
    pub messages: usize,
    pub bytes: usize,
    pub online: bool,
    /// For an offline session, when it expires.
    pub expires: Option<Instant>,
    /// The last sequence number taken from the client, and the last assigned to it.
    pub received: u64,
    pub assigned: u64,
    pub lost: u32,
}

/// What an operation on [`Sessions`] asks its caller to do.
#[derive(Debug)]
pub struct Effects<A> {
    /// Connections with new items to send.
    pub wake: Vec<A>,
    /// Outcomes of the server application's messages (`None`: delivered).
    pub app: Vec<(u64, Option<Undeliverable>)>,
    /// Connections whose session now holds more than its bound (reports on what they sent pile up unread): close
    /// them as slow consumers.
    pub slow: Vec<A>,
}

impl<A> Default for Effects<A> {
    fn default() -> Self {
        Effects { wake: Vec::new(), app: Vec::new(), slow: Vec::new() }
    }
}

/// A session's answer to a `HELLO`.
#[derive(Debug)]
pub struct Opened<A> {
    pub grant: Grant,
    /// The connection that carried the session before (a takeover): it no longer does.
    pub detached: Option<A>,
    pub effects: Effects<A>,
}

/// Why a message was not taken into a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushError {
    /// No reliable session has this id: deliver it another way, or it is undeliverable (not online).
    NoSession,
    /// The session's hold (or the server's total) is full.
    Full,
    /// The message would need a frame larger than the connections accept.
    TooLarge,
}

/// The server's reliable sessions, by client id.
#[derive(Debug)]
pub struct Sessions<A> {
    cfg: HoldConfig,
    /// The first 8 bytes of every token this table issues.
    store: [u8; 8],
    by_id: HashMap<String, Session<A>>,
    /// Offline sessions by expiry.
    expiries: BTreeSet<(Instant, String)>,
    /// Ended sessions' tokens, oldest first, with why and how many messages were lost.
    ended: HashMap<Token, (LostWhy, u32)>,
    ended_order: VecDeque<Token>,
    /// Items and bytes held by all sessions.
    held_messages: usize,
    held_bytes: usize,
    stats: Stats,
    /// The largest frame the connections carrying sessions accept: nothing held may need a larger one.
    max_frame: u32,
}

impl<A: Clone + PartialEq> Sessions<A> {
    /// An empty table whose tokens start with `store` (random per server run when sessions live in memory).
    pub fn new(cfg: HoldConfig, store: [u8; 8]) -> Sessions<A> {
        Sessions {
            cfg,
            store,
            by_id: HashMap::new(),
            expiries: BTreeSet::new(),
            ended: HashMap::new(),
            ended_order: VecDeque::new(),
            held_messages: 0,
            held_bytes: 0,
            stats: Stats::default(),
            max_frame: crate::frame::DEFAULT_MAX_FRAME,
        }
    }

    /// The largest frame the connections accept (their `max_frame`; 65,536 unless told): a message that would
    /// need a larger `SDATA` is refused ([`PushError::TooLarge`]), and reports are split to fit.
    pub fn with_max_frame(mut self, max_frame: u32) -> Sessions<A> {
        self.max_frame = max_frame;
        self
    }

    pub fn config(&self) -> &HoldConfig {
        &self.cfg
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Sessions, and messages and bytes held by all of them.
    pub fn totals(&self) -> (usize, usize, usize) {
        (self.by_id.len(), self.held_messages, self.held_bytes)
    }

    pub fn hold_of(&self, id: &str) -> Option<HoldView> {
        let s = self.by_id.get(id)?;
        Some(HoldView {
            messages: s.out.len(),
            bytes: s.out.bytes(),
            online: s.attached.is_some(),
            expires: s.expires,
            received: s.rx,
            assigned: s.out.assigned(),
            lost: s.lost,
        })
    }

    /// Whether `id` has a session (online or offline).
    pub fn contains(&self, id: &str) -> bool {
        self.by_id.contains_key(id)
    }

    /// The session `id`'s token, while it exists.
    pub fn token_of(&self, id: &str) -> Option<Token> {
        self.by_id.get(id).map(|s| s.token)
    }

    /// A connection for `id` was admitted with `offer`, and will be `attach`. Resume the session its token
    /// names, or start a fresh one under `random` (8 random bytes of the caller's; the core has no randomness),
    /// ending any other session of the id (another device took it without the token: `replaced`).
    pub fn open(&mut self, id: &str, offer: Offer, random: [u8; 8], attach: A) -> Opened<A> {
        let mut effects = Effects::default();
        if let Some(r) = offer.resume {
            let matches = self.by_id.get(id).is_some_and(|s| tokens_equal(&s.token, &r.token));
            if matches {
                let s = self.by_id.get_mut(id).expect("checked");
                if let Ok(released) = s.out.resume(r.received) {
                    self.stats.resumed += 1;
                    let replay = s.out.assigned().saturating_sub(r.received);
                    self.stats.replayed += replay;
                    let detached = s.attached.replace(attach);
                    if let Some(at) = s.expires.take() {
                        self.expiries.remove(&(at, id.to_owned()));
                    }
                    s.receipts = offer.receipts;
                    let lost = std::mem::take(&mut s.lost);
                    let grant = Grant {
                        token: s.token,
                        status: if lost > 0 { Status::ResumedWithLoss } else { Status::Resumed },
                        why: (lost > 0).then_some(LostWhy::HoldOverflow),
                        received: s.rx,
                        lost,
                    };
                    self.release(id, released, &mut effects);
                    return Opened { grant, detached, effects };
                }
                // The client claims messages that were never sent: its state is not this session's.
            }
        }
        let (status, why, lost) = match offer.resume {
            None => (Status::New, None, 0),
            Some(r) => {
                self.stats.resume_refused += 1;
                let (why, lost) = match self.ended.get(&r.token) {
                    Some(&(why, lost)) => (why, lost),
                    None if r.token[..8] != self.store => (LostWhy::Restarted, u32::MAX),
                    None => (LostWhy::Unknown, u32::MAX),
                };
                (Status::Fresh, Some(why), lost)
            }
        };
        let detached = self.end(id, LostWhy::Replaced, &mut effects);
        let mut token = [0u8; 16];
        token[..8].copy_from_slice(&self.store);
        token[8..].copy_from_slice(&random);
        let session = Session {
            token,
            receipts: offer.receipts,
            out: Outbox::default(),
            rx: 0,
            attached: Some(attach),
            expires: None,
            lost: 0,
        };
        self.by_id.insert(id.to_owned(), session);
        Opened { grant: Grant { token, status, why, received: 0, lost }, detached, effects }
    }

    /// End `id`'s session, if any, for a connection that took the id without asking for a reliable session
    /// (`replaced`). Returns the connection it was attached to.
    pub fn replace(&mut self, id: &str) -> (Option<A>, Effects<A>) {
        let mut effects = Effects::default();
        let detached = self.end(id, LostWhy::Replaced, &mut effects);
        (detached, effects)
    }

    /// Connection `attach` of `id` ended: the session, if it was carrying it, is offline from `now` and expires
    /// after [`HoldConfig::expiry`].
    pub fn detach(&mut self, now: Instant, id: &str, attach: &A) {
        let Some(s) = self.by_id.get_mut(id) else { return };
        if s.attached.as_ref() != Some(attach) {
            return;
        }
        s.attached = None;
        let at = now + self.cfg.expiry;
        s.expires = Some(at);
        self.expiries.insert((at, id.to_owned()));
    }

    /// The client `id` sent its message `seq` on `attach`, which the server takes: true, unless `attach` no longer
    /// carries the session (a resume moved it; the client sends the message again there).
    pub fn received(&mut self, id: &str, attach: &A, seq: u64) -> bool {
        match self.by_id.get_mut(id) {
            Some(s) if s.attached.as_ref() == Some(attach) => {
                s.rx = s.rx.max(seq);
                true
            }
            _ => false,
        }
    }

    /// Whether `id` has a session that wants delivery receipts.
    pub fn wants_receipts(&self, id: &str) -> bool {
        self.by_id.get(id).is_some_and(|s| s.receipts)
    }

    /// Hold a message from `from` for `to`'s session. On success, the connection to wake (if it is online).
    pub fn push(
        &mut self,
        to: &str,
        from: &str,
        payload: Bytes,
        origin: Option<Origin>,
    ) -> Result<Option<A>, PushError> {
        let size = held_size(payload.len(), from.len());
        let total_full = self.held_bytes + size > self.cfg.total_bytes;
        let s = self.by_id.get_mut(to).ok_or(PushError::NoSession)?;
        // SDATA: kind, seq, the sender's id as str8, the payload.
        if 1 + 8 + 1 + from.len() + payload.len() > self.max_frame as usize {
            return Err(PushError::TooLarge);
        }
        let limits = if total_full { Limits { messages: 0, bytes: 0 } } else { self.cfg.per_session };
        let body = Body::Data { from: from.to_owned(), payload, origin };
        match s.out.push(body, size, limits) {
            Ok(_) => {
                self.held_messages += 1;
                self.held_bytes += size;
                Ok(s.attached.clone())
            }
            Err(_) => {
                s.lost = s.lost.saturating_add(1);
                self.stats.overflows += 1;
                Err(PushError::Full)
            }
        }
    }

    /// The connection of `to`, if it has a session and it is online.
    pub fn attached(&self, to: &str) -> Option<&A> {
        self.by_id.get(to)?.attached.as_ref()
    }

    /// Tell `to` (a reliable sender) what became of its messages `seqs` to `peer`. Returns the connection to
    /// wake. A session that does not exist (or no longer holds `token`, when given) is told nothing. Reports are
    /// never refused (a sender must learn the fate of what it sent); a session they take past its bound is
    /// [`over_bound`](Self::over_bound), and its connection should be closed as a slow consumer.
    pub fn report(
        &mut self,
        to: &str,
        token: Option<&Token>,
        peer: &str,
        outcome: Option<Undeliverable>,
        seqs: Vec<u64>,
    ) -> Option<A> {
        let s = self.by_id.get_mut(to)?;
        if token.is_some_and(|t| !tokens_equal(t, &s.token)) || seqs.is_empty() {
            return None;
        }
        // REPORT: kind, seq, peer as str8, outcome, count, then 8 bytes per sequence number; split to fit a frame.
        let per_frame = (self.max_frame as usize).saturating_sub(1 + 8 + 1 + peer.len() + 1 + 2) / 8;
        for chunk in seqs.chunks(per_frame.clamp(1, u16::MAX as usize)) {
            let size = held_size(chunk.len() * 8, peer.len());
            s.out.push_unbounded(Body::Report { peer: peer.to_owned(), outcome, seqs: chunk.to_vec() }, size);
            self.held_messages += 1;
            self.held_bytes += size;
        }
        s.attached.clone()
    }

    /// Whether `id`'s session holds more than its per-session bound (possible only through reports).
    pub fn over_bound(&self, id: &str) -> bool {
        let limits = self.cfg.per_session;
        self.by_id.get(id).is_some_and(|s| s.out.len() > limits.messages || s.out.bytes() > limits.bytes)
    }

    /// `id`'s client acknowledged its stream up to `seq` on `attach`: release those items, and route delivery
    /// receipts. An acknowledgement on a connection that no longer carries the session is ignored.
    pub fn ack(&mut self, id: &str, attach: &A, seq: u64) -> Result<Effects<A>, AckError> {
        let mut effects = Effects::default();
        let Some(s) = self.by_id.get_mut(id).filter(|s| s.attached.as_ref() == Some(attach)) else {
            return Ok(effects);
        };
        let released = s.out.ack(seq)?;
        self.release(id, released, &mut effects);
        Ok(effects)
    }

    /// Up to `budget` bytes of `id`'s items not yet sent on `attach`, as frames; and whether more wait. Nothing
    /// for a connection that no longer carries the session.
    pub fn next_frames(&mut self, id: &str, attach: &A, budget: usize) -> (Vec<Frame>, bool) {
        let Some(s) = self.by_id.get_mut(id).filter(|s| s.attached.as_ref() == Some(attach)) else {
            return (Vec::new(), false);
        };
        let mut frames = Vec::new();
        let mut used = 0;
        while used < budget {
            let Some((seq, body)) = s.out.next_unsent() else { break };
            let f = body.frame(seq);
            used += f.encoded_len();
            frames.push(f);
        }
        (frames, s.out.has_unsent())
    }

    /// End the sessions whose expiry is at or before `now`, at most [`EXPIRE_BATCH`] per call (each may hold
    /// thousands of messages, all reported): [`poll_timeout`](Self::poll_timeout) is still due when more are.
    pub fn expire(&mut self, now: Instant) -> Effects<A> {
        let mut effects = Effects::default();
        for _ in 0..EXPIRE_BATCH {
            let Some((at, id)) = self.expiries.first().cloned() else { break };
            if at > now {
                break;
            }
            self.expiries.pop_first();
            self.stats.expired += 1;
            self.end(&id, LostWhy::Expired, &mut effects);
        }
        effects
    }

    /// When the next session expires.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.expiries.first().map(|(at, _)| *at)
    }

    /// Released items: their bytes leave the hold, and their senders learn of the delivery (if they asked).
    fn release(&mut self, id: &str, released: Vec<(u64, Body)>, effects: &mut Effects<A>) {
        let mut receipts: Vec<(String, Token, Vec<u64>)> = Vec::new();
        for (_, body) in released {
            self.held_messages -= 1;
            debug_assert!(self.held_bytes >= body_size(&body), "held bytes drifted");
            self.held_bytes -= body_size(&body).min(self.held_bytes);
            if let Body::Data { origin: Some(origin), .. } = body {
                match origin {
                    Origin::App(n) => effects.app.push((n, None)),
                    Origin::Client { id: from, token, seq } => {
                        if !self.wants_receipts(&from) {
                            continue;
                        }
                        match receipts.iter_mut().find(|(f, t, _)| *f == from && *t == token) {
                            Some((_, _, seqs)) => seqs.push(seq),
                            None => receipts.push((from, token, vec![seq])),
                        }
                    }
                }
            }
        }
        for (from, token, seqs) in receipts {
            self.report_into(&from, &token, id, None, seqs, effects);
        }
    }

    /// [`report`](Self::report) to the session that sent the messages, noting what to wake and what to close.
    fn report_into(
        &mut self,
        from: &str,
        token: &Token,
        peer: &str,
        outcome: Option<Undeliverable>,
        seqs: Vec<u64>,
        effects: &mut Effects<A>,
    ) {
        if let Some(w) = self.report(from, Some(token), peer, outcome, seqs) {
            if self.over_bound(from) {
                effects.slow.push(w.clone());
            }
            effects.wake.push(w);
        }
    }

    /// End `id`'s session: what it held is undeliverable (`why` as the senders hear it), its token remembered.
    fn end(&mut self, id: &str, why: LostWhy, effects: &mut Effects<A>) -> Option<A> {
        let mut s = self.by_id.remove(id)?;
        if let Some(at) = s.expires.take() {
            self.expiries.remove(&(at, id.to_owned()));
        }
        let outcome = match why {
            LostWhy::Expired => Undeliverable::Expired,
            _ => Undeliverable::Replaced,
        };
        let mut lost = 0u32;
        let mut reports: Vec<(String, Token, Vec<u64>)> = Vec::new();
        for (_, body) in s.out.drain() {
            self.held_messages -= 1;
            debug_assert!(self.held_bytes >= body_size(&body), "held bytes drifted");
            self.held_bytes -= body_size(&body).min(self.held_bytes);
            let Body::Data { origin, .. } = body else { continue };
            lost = lost.saturating_add(1);
            match origin {
                Some(Origin::App(n)) => effects.app.push((n, Some(outcome))),
                Some(Origin::Client { id: from, token, seq }) => {
                    match reports.iter_mut().find(|(f, t, _)| *f == from && *t == token) {
                        Some((_, _, seqs)) => seqs.push(seq),
                        None => reports.push((from, token, vec![seq])),
                    }
                }
                None => {}
            }
        }
        for (from, token, seqs) in reports {
            self.report_into(&from, &token, id, Some(outcome), seqs, effects);
        }
        if self.cfg.remember_ended > 0 {
            if self.ended_order.len() >= self.cfg.remember_ended {
                if let Some(old) = self.ended_order.pop_front() {
                    self.ended.remove(&old);
                }
            }
            self.ended.insert(s.token, (why, lost.saturating_add(s.lost)));
            self.ended_order.push_back(s.token);
        }
        s.attached.take()
    }
}

/// The bytes an item was counted for when it was held.
fn body_size(body: &Body) -> usize {
    match body {
        Body::Data { from, payload, .. } => held_size(payload.len(), from.len()),
        Body::Report { peer, seqs, .. } => held_size(seqs.len() * 8, peer.len()),
    }
}

/// Compare tokens in time independent of where they differ.
fn tokens_equal(a: &Token, b: &Token) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests;
