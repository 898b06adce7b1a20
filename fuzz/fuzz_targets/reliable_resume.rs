//! The `reliable` extension's sans-IO rules (`tether_proto::reliable`) under operations the fuzz input spells.
//!
//! # Layout
//! The input is read byte by byte; a byte past its end reads as 0. Six bytes of configuration come first:
//! per-session messages and bytes, the total, how many ended tokens are remembered, and two bytes `a`, `b` that
//! pick the table's `max_frame`, `min(65536, 256 + (a << (b % 9)) + b / 16)` (256 for `00 00`). At most 256
//! operations follow, each an opcode byte (taken modulo 11) and its arguments. A `conn` argument names the
//! connection an operation comes from: 0-1 the device's current one, 2 the one it had before its last `open` (a
//! resume or takeover moved the session away from it), 3 one that never carried anything.
//!
//! | op | what | arguments |
//! |---|---|---|
//! | 0 | a device of `id` connects: `Sessions::open` | id, mode (bit 0 receipts; bits 1-2: no resume, its own token, an earlier grant's, garbage; bit 3: lie about `received`, bit 4: downwards), then the grant index, or 16 garbage bytes, then the lie |
//! | 1 | a connection ends: `detach` | id, conn |
//! | 2 | a message is relayed: `received` on the sender's connection, then `push`; a refused client message is reported to its sender as the server does | to, from (`""` or an id), payload length / 4, origin (none, the application, the sender's session), conn |
//! | 3 | the device acknowledges: `ack` | id, mode (0-1 its inbox's `ACK`, 2-3 a number near what was sent), conn |
//! | 4 | the session's frames go out: `next_frames` | id, budget / 8, lost (bit 0: the connection drops them), conn |
//! | 5 | the server reports to a sender: `report` | to, token (current, none, garbage), peer, outcome, count (0-255 numbers) |
//! | 6 | a connection without the token takes the id: `replace` | id |
//! | 7 | time passes: `expire` | milliseconds / 8 |
//! | 8 | a standalone `Outbox` | op (push, ack, resume, next_unsent), argument |
//! | 9 | a standalone `Inbox` | op (accept, ack_due, ack_pending, confirm, time), argument |
//! | 10 | `Offer::find` and `Grant::find` | kind (RELIABLE or not), length, the value |
//!
//! A model kept beside the table predicts every answer exactly: grants (status, why, received, lost, the
//! connection detached; a resume below what was acknowledged is refused as `unknown_token` and ends the old
//! session as `replaced`), which calls a connection that no longer carries its session may make (none: they do
//! nothing), push refusals (`TooLarge` from the frame limit, `Full` from the documented bounds), which
//! acknowledgements are refused, every frame `next_frames` hands out (receipts and the reports the table makes
//! itself included, split into `REPORT`s of at most `(max_frame - 13 - peer) / 8` numbers), the effects (the
//! connections to wake and to close as slow, the application's outcomes, in order), the counters.
//!
//! Properties checked after every operation:
//! - no panic, and every answer is the model's;
//! - the held bytes: messages (payload + sender + 96 each) never exceed the total bound, nor a session's
//!   messages its own bounds; reports are never refused, so `totals()` is the messages' bytes plus the reports'
//!   (each report carries numbers of distinct messages, each reported once), and a session they take past its
//!   bound is `over_bound` and named in `Effects::slow` while online;
//! - every frame handed out fits `max_frame`, re-encodes to itself, and within one connection the numbers go up
//!   by exactly one;
//! - a device's inbox takes strictly increasing, consecutive numbers; every message reported to a sender was
//!   sent by it to the peer named, is reported with the fate the model gave it, and once (again only to a device
//!   that resumed before that report, as if it had not received it);
//! - the standalone `Inbox` takes only `last + 1`, counts duplicates, and its `ACK`s cover only what its owner
//!   confirmed and fall due exactly after 16 confirmed frames (or duplicates) or 20 ms; the standalone `Outbox` refuses an acknowledgement of what was not sent and a resume below
//!   what was acknowledged;
//! - `Offer::find` and `Grant::find` never panic, and what they find encodes back to itself;
//! - the next expiry is the model's earliest, and none is at or before `now` after `expire(now)`.
//!
//! And at the end of the input, every message is accounted for: one a client sent is in exactly one hold, or
//! was delivered or refused and a report on it was made exactly once when its sender's session (still the one
//! that sent it) had to be told; the application's messages still held are exactly those not yet resolved.
#![no_main]

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tether_proto::frame::{ext, Extension, Frame, Report, Undeliverable, HEADER_LEN, V2};
use tether_proto::reliable::{
    held_size, Accept, AckError, Effects, Grant, HoldConfig, Inbox, Limits, LostWhy, Offer, Origin, Outbox, PushError,
    Resume, Sessions, Status, Token, ACK_DELAY, ACK_EVERY,
};

const STORE: [u8; 8] = *b"fuzz-run";
const IDS: [&str; 4] = ["a", "b", "c", "d"];
/// Senders: the server application and the ids.
const FROM: [&str; 5] = ["", "a", "b", "c", "d"];
/// Receivers: the ids, and one that never has a session.
const TO: [&str; 5] = ["a", "b", "c", "d", "e"];
const EXPIRY: Duration = Duration::from_secs(1);
/// Sequence numbers the harness's own `report` calls use: far above any real message's.
const FAKE_SEQS: u64 = 1 << 40;
/// A connection number no device ever had (connections are numbered from 1).
const NO_CONN: u32 = 0;

/// The input, read a byte at a time; bytes past the end read as 0.
struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        std::array::from_fn(|_| self.u8())
    }
    fn more(&self) -> bool {
        self.pos < self.data.len()
    }
    fn id(&mut self) -> &'static str {
        IDS[usize::from(self.u8() % 4)]
    }
}

/// What a held item is, as the model knows it.
#[derive(Debug, Clone)]
enum Body {
    /// A message: its sender, payload length (the payload is zeros), and who learns its fate.
    Data { from: String, len: usize, origin: Option<Origin> },
    /// A report to this session's client on messages it sent.
    Report { peer: String, outcome: Option<Undeliverable>, seqs: Vec<u64> },
}

/// One held item, as the model knows it.
#[derive(Debug, Clone)]
struct Item {
    seq: u64,
    body: Body,
}

impl Item {
    fn size(&self) -> usize {
        match &self.body {
            Body::Data { from, len, .. } => held_size(*len, from.len()),
            Body::Report { peer, seqs, .. } => held_size(8 * seqs.len(), peer.len()),
        }
    }
    fn is_data(&self) -> bool {
        matches!(self.body, Body::Data { .. })
    }
    /// The frame the table must hand out for it.
    fn frame(&self) -> Frame {
        match &self.body {
            Body::Data { from, len, .. } => {
                Frame::Sdata { seq: self.seq, peer: from.clone(), payload: Bytes::from(vec![0; *len]) }
            }
            Body::Report { peer, outcome, seqs } => {
                Frame::Report(Report { seq: self.seq, peer: peer.clone(), outcome: *outcome, seqs: seqs.clone() })
            }
        }
    }
}

/// What the server's table should hold for one id.
#[derive(Debug)]
struct Model {
    /// What `token_of` and a matching resume must name.
    token: Token,
    /// Whether the client asked for delivery receipts (its last `open` said).
    receipts: bool,
    /// The connection carrying the session (what `open` detaches, `push` and `report` wake, the only one whose
    /// `received`, `ack` and `next_frames` count), and when an offline session expires.
    attached: Option<u32>,
    expires: Option<Instant>,
    /// The held items, oldest first: what `next_frames` hands out and `hold_of` counts.
    items: VecDeque<Item>,
    /// The highest number handed to the current connection (the outbox's `sent`), and the highest the client
    /// acknowledged or resumed after (its `acked`: a resume below it is refused).
    sent: u64,
    acked: u64,
    /// The last number given to an item; the last number of the client's stream taken; messages refused since
    /// the last resume. A resume's grant reports them.
    assigned: u64,
    rx: u64,
    lost: u32,
}

impl Model {
    fn new(token: Token, receipts: bool, conn: u32) -> Model {
        Model {
            token,
            receipts,
            attached: Some(conn),
            expires: None,
            items: VecDeque::new(),
            sent: 0,
            acked: 0,
            assigned: 0,
            rx: 0,
            lost: 0,
        }
    }
    fn bytes(&self) -> usize {
        self.items.iter().map(Item::size).sum()
    }
    fn data(&self) -> impl Iterator<Item = &Item> {
        self.items.iter().filter(|i| i.is_data())
    }
    /// More than the per-session bound: only reports can do that.
    fn over(&self, cap: Limits) -> bool {
        self.items.len() > cap.messages || self.bytes() > cap.bytes
    }
    fn hold(&mut self, body: Body) {
        self.assigned += 1;
        self.items.push_back(Item { seq: self.assigned, body });
    }
}

/// A message a client sent, by (its session's token, its number).
#[derive(Debug)]
struct Msg {
    /// The receiver it was sent to (what a report on it must name as peer).
    to: String,
    /// `None` while held; then `Some(None)` delivered, `Some(Some(why))` undeliverable.
    fate: Option<Option<Undeliverable>>,
    /// Whether its sender had to be told when it was resolved (the same session, and receipts wanted or the
    /// message lost), and how many reports on it were made.
    tell: bool,
    reports: u32,
}

/// A device using an id: what a client library keeps.
#[derive(Debug, Default)]
struct Device {
    /// The last token it was granted, which it offers to resume.
    token: Option<Token>,
    /// Its half of the server's stream: what it took, and so what it offers as `received`.
    inbox: Inbox,
    /// The connection it holds (none after it ended), and whether frames were lost on it (it takes nothing more
    /// from it).
    conn: Option<u32>,
    broken: bool,
    /// Its latest connection and the one before: stale connections that may still speak for it.
    last: Option<u32>,
    prev: Option<u32>,
    /// Its own stream's next number.
    next_seq: u64,
}

/// The standalone inbox and what it should do.
struct InboxModel {
    inbox: Inbox,
    /// The last number received, and the last its owner confirmed; frames confirmed or dropped as duplicates
    /// since the last `ACK`, and when the first of them came; duplicates dropped.
    last: u64,
    taken: u64,
    pending: u32,
    first: Option<Instant>,
    duplicates: u64,
}

/// The standalone outbox and what it should do.
struct OutboxModel {
    out: Outbox<u64>,
    /// Unacknowledged (seq, size).
    items: VecDeque<(u64, usize)>,
    /// The next number to assign, the highest handed out on the current connection, the highest acknowledged.
    next: u64,
    sent: u64,
    acked: u64,
}

const OUTBOX_LIMITS: Limits = Limits { messages: 6, bytes: 60 };

/// What the model expects an operation's `Effects` to be.
#[derive(Debug, Default)]
struct Fx {
    wake: Vec<u32>,
    app: Vec<(u64, Option<Undeliverable>)>,
    slow: Vec<u32>,
}

/// Everything one input drives, and the model of what it should do.
struct World {
    /// Virtual time: only `expire` and the standalone inbox move it.
    now: Instant,
    cfg: HoldConfig,
    /// The table's frame limit, which bounds messages and splits reports.
    max_frame: usize,
    /// The table under test; connections are numbered `u32`s.
    table: Sessions<u32>,
    /// What the table should hold, by id; the devices that use the ids.
    models: HashMap<String, Model>,
    devices: HashMap<String, Device>,
    /// Ended sessions' tokens as the table should remember them, oldest first.
    ended: VecDeque<(Token, LostWhy, u32)>,
    /// Every token granted, for resumes with someone else's token.
    grants: Vec<Token>,
    /// The next connection's number (also its token's random half, so tokens never repeat), and the next number
    /// of a message of the server application.
    next_conn: u32,
    next_app: u64,
    /// The server application's messages held and not yet resolved.
    app_pending: HashSet<u64>,
    /// Every message a client sent into a push, and those its device took a `REPORT` on (with where in its
    /// stream: a device that resumes before it, claiming not to have it, is sent it again).
    messages: HashMap<(Token, u64), Msg>,
    reported: HashMap<(Token, u64), u64>,
    /// The counters the table should show: resumed, refused, expired, overflows, replayed.
    stats: (u64, u64, u64, u64, u64),
    inbox: InboxModel,
    outbox: OutboxModel,
}

fuzz_target!(|data: &[u8]| {
    let mut r = Reader { data, pos: 0 };
    let cfg = HoldConfig {
        expiry: EXPIRY,
        per_session: Limits { messages: 1 + usize::from(r.u8() % 8), bytes: 100 + 8 * usize::from(r.u8()) },
        total_bytes: 200 + 16 * usize::from(r.u8()),
        remember_ended: usize::from(r.u8() % 4),
    };
    let (a, b) = (u32::from(r.u8()), r.u8());
    let max_frame = (256 + (a << (b % 9)) + u32::from(b >> 4)).min(65_536);
    let now = Instant::now();
    let mut w = World {
        now,
        cfg,
        max_frame: max_frame as usize,
        table: Sessions::new(cfg, STORE).with_max_frame(max_frame),
        models: HashMap::new(),
        devices: IDS.iter().map(|id| (id.to_string(), Device { next_seq: 1, ..Device::default() })).collect(),
        ended: VecDeque::new(),
        grants: Vec::new(),
        next_conn: 1,
        next_app: 1,
        app_pending: HashSet::new(),
        messages: HashMap::new(),
        reported: HashMap::new(),
        stats: (0, 0, 0, 0, 0),
        inbox: InboxModel { inbox: Inbox::new(0), last: 0, taken: 0, pending: 0, first: None, duplicates: 0 },
        outbox: OutboxModel { out: Outbox::default(), items: VecDeque::new(), next: 1, sent: 0, acked: 0 },
    };
    for _ in 0..256 {
        if !r.more() {
            break;
        }
        match r.u8() % 11 {
            0 => w.open(&mut r),
            1 => w.detach(&mut r),
            2 => w.push(&mut r),
            3 => w.ack(&mut r),
            4 => w.next_frames(&mut r),
            5 => w.report(&mut r),
            6 => {
                let id = r.id();
                let (detached, fx) = w.table.replace(id);
                let mut expected = Fx::default();
                let attached = w.end(id, LostWhy::Replaced, &mut expected);
                assert_eq!(detached, attached, "replace {id}: the connection it detached");
                w.effects(fx, expected);
            }
            7 => {
                w.now += Duration::from_millis(8 * u64::from(r.u8()));
                let now = w.now;
                let fx = w.table.expire(now);
                let mut due: Vec<(Instant, String)> = w
                    .models
                    .iter()
                    .filter_map(|(id, m)| m.expires.filter(|at| *at <= now).map(|at| (at, id.clone())))
                    .collect();
                due.sort();
                let mut expected = Fx::default();
                for (_, id) in due {
                    w.stats.2 += 1;
                    w.end(&id, LostWhy::Expired, &mut expected);
                }
                w.effects(fx, expected);
                if let Some(t) = w.table.poll_timeout() {
                    assert!(t > now, "an expiry at or before now after expire(now)");
                }
            }
            8 => w.outbox_op(&mut r),
            9 => w.inbox_op(&mut r),
            _ => find(&mut r),
        }
        w.check();
    }
    w.account();
});

impl World {
    /// The connection a `conn` argument names for `id` (see the module doc).
    fn conn_of(&self, id: &str, pick: u8) -> u32 {
        let Some(d) = self.devices.get(id) else { return NO_CONN };
        match pick % 4 {
            2 => d.prev.unwrap_or(NO_CONN),
            3 => 1_000_000 + u32::from(pick),
            _ => d.conn.unwrap_or(NO_CONN),
        }
    }

    /// The session `id`, if `conn` carries it.
    fn carried(&mut self, id: &str, conn: u32) -> Option<&mut Model> {
        self.models.get_mut(id).filter(|m| m.attached == Some(conn))
    }

    /// Bytes held by all sessions, and those of messages alone.
    fn held(&self) -> (usize, usize) {
        let all = self.models.values().map(Model::bytes).sum();
        let data = self.models.values().flat_map(Model::data).map(Item::size).sum();
        (all, data)
    }

    fn open(&mut self, r: &mut Reader) {
        let id = r.id();
        let mode = r.u8();
        let receipts = mode & 1 != 0;
        let device = &self.devices[id];
        let token = match (mode >> 1) % 4 {
            0 => None,
            1 => Some(device.token.unwrap_or([0; 16])),
            2 => Some(self.grants.get(usize::from(r.u8())).copied().unwrap_or([1; 16])),
            _ => Some(r.bytes::<16>()),
        };
        let last = device.inbox.last();
        let received = match (mode & 8 != 0, mode & 16 != 0) {
            (false, _) => last,
            (true, false) => last + u64::from(r.u8()),
            (true, true) => last.saturating_sub(u64::from(r.u8())),
        };
        let offer = Offer { receipts, resume: token.map(|token| Resume { token, received }) };
        let conn = self.next_conn;
        self.next_conn += 1;
        let random = u64::from(conn).to_be_bytes();
        let opened = self.table.open(id, offer, random, conn);

        // What the model says: a resume of the live session (never below what was acknowledged, never beyond
        // what was assigned), or a fresh one that ends it.
        let mut fx = Fx::default();
        let live = self
            .models
            .get(id)
            .is_some_and(|m| token == Some(m.token) && received <= m.assigned && received >= m.acked);
        let (grant, detached) = if live {
            let m = self.models.get_mut(id).expect("live");
            let grant = Grant {
                token: m.token,
                status: if m.lost > 0 { Status::ResumedWithLoss } else { Status::Resumed },
                why: (m.lost > 0).then_some(LostWhy::HoldOverflow),
                received: m.rx,
                lost: m.lost,
            };
            self.stats.0 += 1;
            self.stats.4 += m.assigned - received;
            let detached = m.attached.replace(conn);
            m.receipts = receipts;
            m.sent = received;
            m.acked = received;
            m.expires = None;
            m.lost = 0;
            self.release(id, received, &mut fx);
            (grant, detached)
        } else {
            let (status, why, lost) = match token {
                None => (Status::New, None, 0),
                Some(t) => {
                    self.stats.1 += 1;
                    let (why, lost) = match self.ended.iter().rev().find(|(e, _, _)| *e == t) {
                        Some(&(_, why, lost)) => (why, lost),
                        None if t[..8] != STORE => (LostWhy::Restarted, u32::MAX),
                        None => (LostWhy::Unknown, u32::MAX),
                    };
                    (Status::Fresh, Some(why), lost)
                }
            };
            let detached = self.end(id, LostWhy::Replaced, &mut fx);
            let mut new_token = [0; 16];
            new_token[..8].copy_from_slice(&STORE);
            new_token[8..].copy_from_slice(&random);
            self.models.insert(id.to_owned(), Model::new(new_token, receipts, conn));
            (Grant { token: new_token, status, why, received: 0, lost }, detached)
        };
        assert_eq!((opened.grant, opened.detached), (grant, detached), "open {id} with {offer:?}");
        self.effects(opened.effects, fx);

        // The device takes the grant as a client library does: a stream that continues resumes where it said,
        // and it sends again what the server did not take.
        self.grants.push(grant.token);
        if grant.continues() {
            self.reported.retain(|(t, _), at| *t != grant.token || *at <= received);
        }
        let device = self.devices.get_mut(id).expect("device");
        device.token = Some(grant.token);
        (device.inbox, device.next_seq) =
            if grant.continues() { (Inbox::new(received), grant.received + 1) } else { (Inbox::new(0), 1) };
        device.prev = device.last.replace(conn);
        device.conn = Some(conn);
        device.broken = false;
    }

    fn detach(&mut self, r: &mut Reader) {
        let id = r.id();
        let conn = self.conn_of(id, r.u8());
        self.table.detach(self.now, id, &conn);
        let (now, expiry) = (self.now, self.cfg.expiry);
        if let Some(m) = self.carried(id, conn) {
            m.attached = None;
            m.expires = Some(now + expiry);
        }
        let device = self.devices.get_mut(id).expect("device");
        if device.conn == Some(conn) {
            device.conn = None;
        }
    }

    fn push(&mut self, r: &mut Reader) {
        let to = TO[usize::from(r.u8() % 5)];
        let from = FROM[usize::from(r.u8() % 5)];
        let len = 4 * usize::from(r.u8());
        let kind = r.u8() % 3;
        let conn = self.conn_of(from, r.u8());
        let origin = match kind {
            0 => None,
            1 => Some(Origin::App(self.next_app)),
            _ if from.is_empty() => None,
            _ => {
                // The sender's SDATA: taken only on the connection that carries its session.
                let seq = self.devices[from].next_seq;
                let taken = self.table.received(from, &conn, seq);
                let Some(m) = self.carried(from, conn) else {
                    assert!(!taken, "{from}'s message {seq} taken on {conn}, which does not carry its session");
                    return;
                };
                assert!(taken, "{from}'s message {seq} refused on {conn}, which carries its session");
                m.rx = m.rx.max(seq);
                let token = m.token;
                self.devices.get_mut(from).expect("device").next_seq += 1;
                Some(Origin::Client { id: from.to_owned(), token, seq })
            }
        };
        let size = held_size(len, from.len());
        let (held, _) = self.held();
        let got = self.table.push(to, from, Bytes::from(vec![0; len]), origin.clone());
        let cap = self.cfg.per_session;
        let expected = match self.models.get_mut(to) {
            None => Err(PushError::NoSession),
            // SDATA: kind, seq, the sender's id as str8, the payload.
            Some(_) if 1 + 8 + 1 + from.len() + len > self.max_frame => Err(PushError::TooLarge),
            Some(m) if held + size > self.cfg.total_bytes || m.items.len() >= cap.messages => Err(PushError::Full),
            Some(m) if m.bytes() + size > cap.bytes => Err(PushError::Full),
            Some(m) => Ok(m.attached),
        };
        assert_eq!(got, expected, "push of {len} bytes from {from:?} to {to}, {held} bytes held in all");
        if let Some(Origin::Client { token, seq, .. }) = &origin {
            let msg = Msg { to: to.to_owned(), fate: None, tell: false, reports: 0 };
            assert!(self.messages.insert((*token, *seq), msg).is_none(), "{from} sent {seq} twice");
        }
        let why = match got {
            Ok(_) => {
                self.models.get_mut(to).expect("held").hold(Body::Data {
                    from: from.to_owned(),
                    len,
                    origin: origin.clone(),
                });
                if let Some(Origin::App(n)) = origin {
                    self.app_pending.insert(n);
                    self.next_app += 1;
                }
                return;
            }
            Err(PushError::Full) => {
                let m = self.models.get_mut(to).expect("full");
                m.lost = m.lost.saturating_add(1);
                self.stats.3 += 1;
                Undeliverable::HoldFull
            }
            Err(PushError::TooLarge) => Undeliverable::TooLarge,
            Err(PushError::NoSession) => Undeliverable::NotOnline,
        };
        // The server tells a client sender on its own stream (the application learns its own way).
        if let Some(Origin::Client { token, seq, .. }) = origin {
            let msg = self.messages.get_mut(&(token, seq)).expect("noted");
            (msg.fate, msg.tell) = (Some(Some(why)), true);
            let got = self.table.report(from, None, to, Some(why), vec![seq]);
            let expected = self.report_model(from, None, to, Some(why), &[seq]);
            assert_eq!(got, expected, "{from} told of its message {seq} to {to}");
        }
    }

    fn ack(&mut self, r: &mut Reader) {
        let id = r.id();
        let mode = r.u8();
        let conn = self.conn_of(id, r.u8());
        let now = self.now;
        let sent = self.models.get(id).map_or(0, |m| m.sent);
        let device = self.devices.get_mut(id).expect("device");
        let seq = match mode % 4 {
            0 => device.inbox.ack_due(now).unwrap_or(device.inbox.last()),
            1 => device.inbox.ack_pending().unwrap_or(device.inbox.last()),
            _ => sent + u64::from(mode >> 2) % 3,
        };
        let got = self.table.ack(id, &conn, seq);
        let Some(m) = self.carried(id, conn) else {
            let fx = got.expect("an ack on a connection without the session is ignored");
            assert!(fx.wake.is_empty() && fx.app.is_empty() && fx.slow.is_empty(), "ack of {id} on {conn}: {fx:?}");
            return;
        };
        if seq > m.sent {
            assert_eq!(got.map(|_| ()), Err(AckError::Unsent { acked: seq, sent: m.sent }), "ack of {id}");
            return;
        }
        m.acked = m.acked.max(seq);
        let mut fx = Fx::default();
        self.release(id, seq, &mut fx);
        self.effects(got.expect("an ack of what was sent"), fx);
    }

    fn next_frames(&mut self, r: &mut Reader) {
        let id = r.id();
        let budget = 8 * usize::from(r.u8());
        let lost = r.u8() & 1 != 0;
        let conn = self.conn_of(id, r.u8());
        let (frames, more) = self.table.next_frames(id, &conn, budget);
        let max_frame = self.max_frame;
        let Some(m) = self.carried(id, conn) else {
            assert!(frames.is_empty() && !more, "frames for {id} on {conn}, which does not carry its session");
            return;
        };
        let mut expected = Vec::new();
        let mut used = 0;
        for item in m.items.iter().filter(|i| i.seq > m.sent) {
            if used >= budget {
                break;
            }
            let f = item.frame();
            used += f.encoded_len();
            expected.push(f);
        }
        assert_eq!(frames, expected, "{id}: the frames after {} within {budget} bytes", m.sent);
        for f in &frames {
            let seq = seq_of(f);
            assert_eq!(seq, m.sent + 1, "{id}: {seq} after {} on one connection", m.sent);
            m.sent = seq;
            let len = f.encoded_len() - HEADER_LEN;
            assert!(len <= max_frame, "{id}: a {len}-byte {} over the limit {max_frame}", f.name());
            let bytes = f.to_bytes_v(V2);
            assert_eq!(Frame::parse_v(&bytes, V2).as_ref(), Ok(f), "{id}: a frame that does not decode to itself");
        }
        assert_eq!(more, m.items.back().is_some_and(|i| i.seq > m.sent), "{id}: more waiting");
        let token = m.token;

        // Delivery to the device, in order, unless this connection lost frames before.
        let device = self.devices.get_mut(id).expect("device");
        assert_eq!(device.conn, Some(conn), "{id}: the session's connection is its device's");
        if lost {
            device.broken = true;
        }
        if device.broken {
            return;
        }
        for f in frames {
            let seq = seq_of(&f);
            // A resume is never below what was acknowledged and replays from what the device offered: its inbox
            // takes every frame of its connection, in order, once.
            let last = device.inbox.last();
            assert_eq!(device.inbox.accept(self.now, seq), Accept::New, "{id}: the inbox at {last} given {seq}");
            // The device's application takes it at once.
            device.inbox.confirm(self.now, seq);
            let Frame::Report(rep) = f else { continue };
            for s in rep.seqs.iter().filter(|s| **s < FAKE_SEQS) {
                let msg = self.messages.get(&(token, *s));
                assert_eq!(msg.map(|m| &m.to), Some(&rep.peer), "{id}: a report on message {s}, never sent there");
                assert_eq!(msg.and_then(|m| m.fate), Some(rep.outcome), "{id}: message {s} reported {rep:?}");
                let again = self.reported.insert((token, *s), seq);
                assert_eq!(again, None, "{id}: message {s} reported twice, in {seq} after {again:?}");
            }
        }
    }

    fn report(&mut self, r: &mut Reader) {
        let to = r.id();
        let which = r.u8() % 3;
        let peer = FROM[usize::from(r.u8() % 5)];
        let outcome = match r.u8() {
            0 => None,
            c => Some(Undeliverable::from_code(c)),
        };
        let seqs: Vec<u64> = (0..u64::from(r.u8())).map(|i| FAKE_SEQS + i).collect();
        let current = self.models.get(to).map(|m| m.token);
        let token = match which {
            0 => current,
            1 => None,
            _ => Some(r.bytes::<16>()),
        };
        let got = self.table.report(to, token.as_ref(), peer, outcome, seqs.clone());
        let expected = self.report_model(to, token, peer, outcome, &seqs);
        assert_eq!(got, expected, "report of {} numbers to {to}", seqs.len());
    }

    /// The model's `report`: `seqs` held for `to`'s session, if it is the one `token` names, in items of at
    /// most as many numbers as fit a `REPORT` frame. The connection to wake.
    fn report_model(
        &mut self,
        to: &str,
        token: Option<Token>,
        peer: &str,
        outcome: Option<Undeliverable>,
        seqs: &[u64],
    ) -> Option<u32> {
        let m = self.models.get_mut(to)?;
        if token.is_some_and(|t| t != m.token) || seqs.is_empty() {
            return None;
        }
        let per_item = self.max_frame.saturating_sub(13 + peer.len()) / 8;
        for chunk in seqs.chunks(per_item.clamp(1, usize::from(u16::MAX))) {
            m.hold(Body::Report { peer: peer.to_owned(), outcome, seqs: chunk.to_vec() });
            for s in chunk {
                if let Some(msg) = self.messages.get_mut(&(m.token, *s)) {
                    msg.reports += 1;
                    assert_eq!(msg.reports, 1, "{to}: a second report on message {s}");
                }
            }
        }
        m.attached
    }

    /// The model's report to the session that sent messages: what to wake, and what to close as slow.
    fn report_into(
        &mut self,
        from: &str,
        token: Token,
        peer: &str,
        outcome: Option<Undeliverable>,
        seqs: &[u64],
        fx: &mut Fx,
    ) {
        if let Some(w) = self.report_model(from, Some(token), peer, outcome, seqs) {
            if self.models[from].over(self.cfg.per_session) {
                fx.slow.push(w);
            }
            fx.wake.push(w);
        }
    }

    /// Items that left `id`'s hold: messages delivered (`outcome` `None`) or undeliverable. The application
    /// learns of its own; each client sender is told in one report per (sender, token), in order, a delivery
    /// only if it wants receipts.
    fn resolve(&mut self, id: &str, items: Vec<Item>, outcome: Option<Undeliverable>, fx: &mut Fx) {
        let mut tell: Vec<(String, Token, Vec<u64>)> = Vec::new();
        for item in items {
            let Body::Data { origin: Some(origin), .. } = item.body else { continue };
            let (from, token, seq) = match origin {
                Origin::App(n) => {
                    fx.app.push((n, outcome));
                    continue;
                }
                Origin::Client { id, token, seq } => (id, token, seq),
            };
            let sender = self.models.get(&from);
            let msg = self.messages.get_mut(&(token, seq)).expect("a client's message was noted");
            assert_eq!(msg.fate, None, "message {seq} of {from} resolved twice");
            msg.fate = Some(outcome);
            if outcome.is_none() && !sender.is_some_and(|m| m.receipts) {
                continue;
            }
            msg.tell = sender.is_some_and(|m| m.token == token);
            match tell.iter_mut().find(|(f, t, _)| *f == from && *t == token) {
                Some((_, _, seqs)) => seqs.push(seq),
                None => tell.push((from, token, vec![seq])),
            }
        }
        for (from, token, seqs) in tell {
            self.report_into(&from, token, id, outcome, &seqs, fx);
        }
    }

    /// The model's side of an acknowledgement (or resume) of `id`'s stream up to `seq`.
    fn release(&mut self, id: &str, seq: u64, fx: &mut Fx) {
        let m = self.models.get_mut(id).expect("a session");
        let mut released = Vec::new();
        while m.items.front().is_some_and(|i| i.seq <= seq) {
            released.push(m.items.pop_front().expect("front"));
        }
        self.resolve(id, released, None, fx);
    }

    /// The model's side of `end`: the session is gone first (so reports to itself are lost with it), what it held
    /// is undeliverable, its token remembered. Returns its connection.
    fn end(&mut self, id: &str, why: LostWhy, fx: &mut Fx) -> Option<u32> {
        let m = self.models.remove(id)?;
        let outcome = if why == LostWhy::Expired { Undeliverable::Expired } else { Undeliverable::Replaced };
        let lost = u32::try_from(m.data().count()).expect("few").saturating_add(m.lost);
        self.resolve(id, m.items.into(), Some(outcome), fx);
        if self.cfg.remember_ended > 0 {
            if self.ended.len() >= self.cfg.remember_ended {
                self.ended.pop_front();
            }
            self.ended.push_back((m.token, why, lost));
        }
        m.attached
    }

    /// Check what an operation asked of its caller against the model, exactly; each application message is
    /// resolved once.
    fn effects(&mut self, fx: Effects<u32>, expected: Fx) {
        assert_eq!((&fx.wake, &fx.app, &fx.slow), (&expected.wake, &expected.app, &expected.slow), "effects");
        for (n, _) in &fx.app {
            assert!(self.app_pending.remove(n), "application message {n} resolved twice");
        }
    }

    fn check(&mut self) {
        let cap = self.cfg.per_session;
        let (sessions, messages, held) = self.table.totals();
        let (mut sum_messages, mut sum_bytes) = (0, 0);
        for id in IDS {
            assert_eq!(self.table.over_bound(id), self.models.get(id).is_some_and(|m| m.over(cap)), "{id}: over bound");
            assert_eq!(
                self.table.wants_receipts(id),
                self.models.get(id).is_some_and(|m| m.receipts),
                "{id}: receipts"
            );
            let (h, m) = match (self.table.hold_of(id), self.models.get(id)) {
                (None, None) => continue,
                (Some(h), Some(m)) => (h, m),
                (h, m) => panic!("{id}: the table has {h:?}, the model {m:?}"),
            };
            assert_eq!(self.table.token_of(id), Some(m.token), "{id}: token");
            assert_eq!(
                (h.messages, h.bytes, h.online, h.expires, h.received, h.assigned, h.lost),
                (m.items.len(), m.bytes(), m.attached.is_some(), m.expires, m.rx, m.assigned, m.lost),
                "{id}: messages, bytes, online, expiry, received, assigned, lost"
            );
            let data: usize = m.data().map(Item::size).sum();
            assert!(data <= cap.bytes && m.data().count() <= cap.messages, "{id}: {data} bytes of messages held");
            sum_messages += h.messages;
            sum_bytes += h.bytes;
        }
        assert_eq!((sessions, messages, held), (self.models.len(), sum_messages, sum_bytes), "totals()");
        // The true bound: messages are refused at the total, reports never are.
        let (all, data) = self.held();
        assert!(data <= self.cfg.total_bytes, "{data} bytes of messages held, total bound {}", self.cfg.total_bytes);
        assert_eq!(held, all, "{held} bytes held: {data} of messages, the rest reports");
        let earliest = self.models.values().filter_map(|m| m.expires).min();
        assert_eq!(self.table.poll_timeout(), earliest, "the next expiry");
        let s = self.table.stats();
        assert_eq!((s.resumed, s.resume_refused, s.expired, s.overflows, s.replayed), self.stats, "stats");
    }

    /// Every message accounted for, at the end of the input.
    fn account(&self) {
        let holds = || self.models.values().flat_map(Model::data);
        for ((token, seq), msg) in &self.messages {
            let held = holds()
                .filter(|i| matches!(&i.body, Body::Data { origin: Some(Origin::Client { token: t, seq: s, .. }), .. } if t == token && s == seq))
                .count();
            let expected = match msg.fate {
                None => (1, 0),
                Some(_) => (0, u32::from(msg.tell)),
            };
            assert_eq!((held, msg.reports), expected, "message {seq}: holds, reports ({msg:?})");
        }
        let app: HashSet<u64> = holds()
            .filter_map(|i| match i.body {
                Body::Data { origin: Some(Origin::App(n)), .. } => Some(n),
                _ => None,
            })
            .collect();
        assert_eq!(app, self.app_pending, "the application's messages held");
    }

    fn outbox_op(&mut self, r: &mut Reader) {
        let (op, arg) = (r.u8() % 4, r.u8());
        let o = &mut self.outbox;
        match op {
            0 => {
                let size = usize::from(arg % 30);
                let bytes: usize = o.items.iter().map(|(_, s)| s).sum();
                let got = o.out.push(o.next, size, OUTBOX_LIMITS);
                if o.items.len() >= OUTBOX_LIMITS.messages || bytes + size > OUTBOX_LIMITS.bytes {
                    let e = got.expect_err("an outbox beyond its bound");
                    assert_eq!((e.messages, e.bytes), (o.items.len(), bytes));
                } else {
                    assert_eq!(got, Ok(o.next), "outbox push");
                    o.items.push_back((o.next, size));
                    o.next += 1;
                }
            }
            1 | 2 => {
                // An ack near what was sent; a resume anywhere up to one past what was assigned.
                let seq = if op == 1 {
                    (o.sent + 1).saturating_sub(u64::from(arg % 4))
                } else {
                    u64::from(arg) % (o.next + 1)
                };
                let got = if op == 1 { o.out.ack(seq) } else { o.out.resume(seq) };
                let bound = if op == 1 { o.sent } else { o.next - 1 };
                let refused = if seq > bound {
                    Some(AckError::Unsent { acked: seq, sent: bound })
                } else if op == 2 && seq < o.acked {
                    Some(AckError::Behind { received: seq, acked: o.acked })
                } else {
                    None
                };
                if let Some(e) = refused {
                    assert_eq!(got.map(|_| ()), Err(e), "outbox ack/resume of {seq}");
                    return;
                }
                let mut released = Vec::new();
                while o.items.front().is_some_and(|(s, _)| *s <= seq) {
                    released.push(o.items.pop_front().expect("front").0);
                }
                let got: Vec<u64> = got.expect("within what was sent").into_iter().map(|(s, _)| s).collect();
                assert_eq!(got, released, "released by ack/resume of {seq}");
                if op == 2 {
                    o.sent = seq;
                }
                o.acked = o.acked.max(seq);
            }
            _ => {
                let expected = o.items.iter().find(|(s, _)| *s > o.sent).map(|(s, _)| *s);
                let got = o.out.next_unsent().map(|(s, item)| {
                    assert_eq!(s, *item, "the item kept under {s}");
                    s
                });
                assert_eq!(got, expected, "next_unsent after {}", o.sent);
                if let Some(s) = got {
                    assert_eq!(s, o.sent + 1, "next_unsent gave {s} after {}", o.sent);
                    o.sent = s;
                }
            }
        }
        let bytes: usize = o.items.iter().map(|(_, s)| s).sum();
        assert_eq!((o.out.len(), o.out.bytes(), o.out.assigned()), (o.items.len(), bytes, o.next - 1));
        assert_eq!(o.out.has_unsent(), o.items.back().is_some_and(|(s, _)| *s > o.sent));
    }

    fn inbox_op(&mut self, r: &mut Reader) {
        let (op, arg) = (r.u8() % 5, r.u8());
        let now = self.now;
        let i = &mut self.inbox;
        let due = |i: &InboxModel| i.first.is_some_and(|f| now >= f + ACK_DELAY || i.pending >= ACK_EVERY);
        match op {
            0 => {
                // Mostly the next number; now and then a duplicate or a gap.
                let seq = match arg % 8 {
                    0 => i.last.saturating_sub(u64::from(arg >> 3)).max(1),
                    1 => i.last + 2 + u64::from(arg >> 3),
                    _ => i.last + 1,
                };
                let got = i.inbox.accept(now, seq);
                let expected = if seq == i.last + 1 {
                    Accept::New
                } else if seq <= i.last {
                    Accept::Duplicate
                } else {
                    Accept::Gap { expected: i.last + 1 }
                };
                assert_eq!(got, expected, "inbox at {} given {seq}", i.last);
                match got {
                    // Acknowledged only once its owner confirms it.
                    Accept::New => i.last = seq,
                    // Acknowledged again at once (the peer missed the ACK).
                    Accept::Duplicate => {
                        i.duplicates += 1;
                        i.pending += 1;
                        i.first.get_or_insert(now);
                    }
                    Accept::Gap { .. } => {}
                }
            }
            3 => {
                // The owner confirms up to some number, at most what was received.
                let upto = i.taken + u64::from(arg % 24);
                i.inbox.confirm(now, upto);
                let upto = upto.min(i.last);
                if upto > i.taken {
                    i.pending = i.pending.saturating_add((upto - i.taken) as u32);
                    i.first.get_or_insert(now);
                    i.taken = upto;
                }
            }
            1 => {
                let expected = due(i).then_some(i.taken);
                assert_eq!(i.inbox.ack_due(now), expected, "ack_due with {} pending since {:?}", i.pending, i.first);
                if expected.is_some() {
                    (i.pending, i.first) = (0, None);
                }
            }
            2 => {
                let expected = i.first.map(|_| i.taken);
                assert_eq!(i.inbox.ack_pending(), expected, "ack_pending");
                (i.pending, i.first) = (0, None);
            }
            _ => self.now += Duration::from_millis(u64::from(arg % 32)),
        }
        let i = &self.inbox;
        assert_eq!((i.inbox.last(), i.inbox.taken(), i.inbox.duplicates()), (i.last, i.taken, i.duplicates));
        assert_eq!(i.inbox.poll_timeout(), i.first.map(|f| f + ACK_DELAY), "the ACK's deadline");
    }
}

/// The sequence number of a frame of a session's stream.
fn seq_of(f: &Frame) -> u64 {
    match f {
        Frame::Sdata { seq, .. } => *seq,
        Frame::Report(r) => r.seq,
        other => panic!("next_frames gave {other:?}"),
    }
}

/// `Offer::find` and `Grant::find` on an arbitrary value: no panic, and what they find encodes back to itself.
fn find(r: &mut Reader) {
    let kind = if r.u8() & 1 == 0 { ext::RELIABLE } else { ext::MAX_SUBSCRIPTIONS };
    let value: Vec<u8> = (0..r.u8() % 40).map(|_| r.u8()).collect();
    let list = [Extension { kind, value: Bytes::from(value.clone()) }];
    if let Some(offer) = Offer::find(&list) {
        assert_eq!(kind, ext::RELIABLE);
        assert!(matches!(value.len(), 1 | 25), "an offer from {} bytes", value.len());
        assert_eq!(Offer::find(&[offer.to_extension()]), Some(offer));
    }
    if let Some(grant) = Grant::find(&list) {
        assert_eq!(grant.to_extension().value, Bytes::from(value), "a grant re-encodes to its bytes");
    }
}
