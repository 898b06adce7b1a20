//! The `reliable` extension's sans-IO rules (`tether_proto::reliable`) under operations the fuzz input spells.
//!
//! # Layout
//! The input is read byte by byte; a byte past its end reads as 0. Four bytes of bounds come first (per-session
//! messages and bytes, the total, how many ended tokens are remembered), then at most 256 operations, each an
//! opcode byte (taken modulo 11) and its arguments:
//!
//! | op | what | arguments |
//! |---|---|---|
//! | 0 | a device of `id` connects: `Sessions::open` | id, mode (bit 0 receipts; bits 1-2: no resume, its own token, an earlier grant's, garbage; bit 3: lie about `received`), then the grant index, or 16 garbage bytes, or the lie |
//! | 1 | a connection ends: `detach` | id, stale (bit 0: a connection that no longer carries the session) |
//! | 2 | a message is relayed: `push` | to, from (`""` or an id), payload length / 4, origin (none, the application, the sender's session) |
//! | 3 | the device acknowledges: `ack` | id, mode (0-1 its inbox's `ACK`, 2-3 a number near what was sent) |
//! | 4 | the session's frames go out: `next_frames` | id, budget / 8, lost (bit 0: the connection drops them) |
//! | 5 | the server reports to a sender: `report` | to, token (current, none, garbage), peer, outcome, count |
//! | 6 | a connection without the token takes the id: `replace` | id |
//! | 7 | time passes: `expire` | milliseconds / 8 |
//! | 8 | a standalone `Outbox` | op (push, ack, resume, next_unsent), argument |
//! | 9 | a standalone `Inbox` | op (accept, ack_due, ack_pending, time), argument |
//! | 10 | `Offer::find` and `Grant::find` | kind (RELIABLE or not), length, the value |
//!
//! A model kept beside the table predicts its answers: grants (status, why, received, lost, the connection
//! detached), push refusals from the documented bounds, which acknowledgements are refused, the numbers
//! `next_frames` hands out, the application's outcomes in order, the counters. Reports the table makes
//! itself (receipts, `expired`, `replaced`) are learnt from each session's `assigned`, so the model knows every
//! held item's number and which are messages.
//!
//! Properties checked after every operation:
//! - no panic, and every answer is the model's;
//! - messages held (payload + sender + 96 each) never exceed the total bound: `totals()` bytes stay within
//!   the configured total plus the bytes of the reports held, which are never refused; a session's messages stay
//!   within its own bounds; `totals()` is the sum of the sessions' holds;
//! - a frame handed out is the first held item above the last one sent, re-encodes to itself, and within one
//!   connection the numbers strictly increase; they go up by exactly one unless the connection resumed below
//!   what the peer had already acknowledged (the items that acknowledgement released cannot be sent again, so
//!   today the next number leaves a gap in the peer's inbox);
//! - a device's inbox takes strictly increasing, consecutive numbers, and every message reported to a sender
//!   was pushed with that sender's origin, to the peer named, and is reported at most once;
//! - the standalone `Inbox` takes only `last + 1`, and its `ACK`s fall due exactly after 16 frames or 20 ms;
//! - `Offer::find` and `Grant::find` never panic, and what they find encodes back to itself;
//! - the next expiry is the model's earliest, and none is at or before `now` after `expire(now)`.
#![no_main]

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tether_proto::frame::{ext, Extension, Frame, Undeliverable, V2};
use tether_proto::reliable::{
    held_size, Accept, Effects, Grant, HoldConfig, Inbox, Limits, LostWhy, Offer, Origin, Outbox, PushError, Resume,
    Sessions, Status, Token, ACK_DELAY, ACK_EVERY,
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
}

/// One held item, as the model knows it.
#[derive(Debug, Clone)]
struct Item {
    seq: u64,
    /// `Some` for a message: its sender, payload length, origin. `None` for a report the table made.
    data: Option<(String, usize, Option<Origin>)>,
}

impl Item {
    fn size(&self) -> usize {
        self.data.as_ref().map_or(0, |(from, len, _)| held_size(*len, from.len()))
    }
}

/// What the server's table should hold for one id.
#[derive(Debug)]
struct Model {
    /// What `token_of` and a matching resume must name.
    token: Token,
    /// The connection carrying the session (what `open` detaches, `push` and `report` wake), and when an offline
    /// session expires.
    attached: Option<u32>,
    expires: Option<Instant>,
    /// The held items, oldest first: what `next_frames` may hand out and `hold_of` counts.
    items: VecDeque<Item>,
    /// The highest number handed to the current connection (the outbox's `sent`).
    sent: u64,
    /// The highest number released by an acknowledgement or a resume, and whether this connection resumed
    /// below it.
    floor: u64,
    gapped: bool,
    /// The last number given to an item; the last number of the client's stream taken; messages refused since
    /// the last resume. A resume's grant reports them.
    assigned: u64,
    rx: u64,
    lost: u32,
}

impl Model {
    fn data_bytes(&self) -> usize {
        self.items.iter().map(Item::size).sum()
    }
    fn data_count(&self) -> usize {
        self.items.iter().filter(|i| i.data.is_some()).count()
    }
    /// Release everything up to `seq`: the application's outcomes of the messages released.
    fn release(&mut self, seq: u64) -> Vec<(u64, Option<Undeliverable>)> {
        let mut app = Vec::new();
        while self.items.front().is_some_and(|i| i.seq <= seq) {
            if let Some((_, _, Some(Origin::App(n)))) = self.items.pop_front().expect("front").data {
                app.push((n, None));
            }
        }
        app
    }
}

/// A device using an id: what a client library keeps.
#[derive(Debug, Default)]
struct Device {
    /// The last token it was granted, which it offers to resume.
    token: Option<Token>,
    /// Its half of the server's stream: what it took, and so what it offers as `received`.
    inbox: Inbox,
    /// The connection it holds, and whether frames were lost on it (it takes nothing more from it).
    conn: Option<u32>,
    broken: bool,
    /// Its own stream's next number.
    next_seq: u64,
}

/// The standalone inbox and what it should do.
struct InboxModel {
    inbox: Inbox,
    /// The last number taken; frames taken or dropped since the last `ACK`, and when the first of them came.
    last: u64,
    pending: u32,
    first: Option<Instant>,
}

/// The standalone outbox and what it should do.
struct OutboxModel {
    out: Outbox<u64>,
    /// Unacknowledged (seq, size).
    items: VecDeque<(u64, usize)>,
    /// The next number to assign, and the highest handed out on the current connection.
    next: u64,
    sent: u64,
    /// As in [`Model`].
    floor: u64,
    gapped: bool,
}

const OUTBOX_LIMITS: Limits = Limits { messages: 6, bytes: 60 };

/// Everything one input drives, and the model of what it should do.
struct World {
    /// Virtual time: only `expire` and the standalone inbox move it.
    now: Instant,
    cfg: HoldConfig,
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
    /// Messages pushed with a client origin: (sender's token, its number) → the receiver.
    pushed: HashMap<(Token, u64), String>,
    /// Those a device took a `REPORT` on.
    reported: HashSet<(Token, u64)>,
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
    let now = Instant::now();
    let mut w = World {
        now,
        cfg,
        table: Sessions::new(cfg, STORE),
        models: HashMap::new(),
        devices: IDS.iter().map(|id| (id.to_string(), Device { next_seq: 1, ..Device::default() })).collect(),
        ended: VecDeque::new(),
        grants: Vec::new(),
        next_conn: 1,
        next_app: 1,
        app_pending: HashSet::new(),
        pushed: HashMap::new(),
        reported: HashSet::new(),
        stats: (0, 0, 0, 0, 0),
        inbox: InboxModel { inbox: Inbox::new(0), last: 0, pending: 0, first: None },
        outbox: OutboxModel {
            out: Outbox::default(),
            items: VecDeque::new(),
            next: 1,
            sent: 0,
            floor: 0,
            gapped: false,
        },
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
                let id = IDS[usize::from(r.u8() % 4)];
                let (detached, fx) = w.table.replace(id);
                let (attached, app) = w.end(id, LostWhy::Replaced);
                assert_eq!(detached, attached, "replace {id}: the connection it detached");
                w.effects(fx, app);
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
                let mut app = Vec::new();
                for (_, id) in due {
                    w.stats.2 += 1;
                    app.extend(w.end(&id, LostWhy::Expired).1);
                }
                w.effects(fx, app);
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
});

impl World {
    fn open(&mut self, r: &mut Reader) {
        let id = IDS[usize::from(r.u8() % 4)];
        let mode = r.u8();
        let receipts = mode & 1 != 0;
        let device = self.devices.get_mut(id).expect("device");
        let token = match (mode >> 1) % 4 {
            0 => None,
            1 => Some(device.token.unwrap_or([0; 16])),
            2 => Some(self.grants.get(usize::from(r.u8())).copied().unwrap_or([1; 16])),
            _ => Some(r.bytes::<16>()),
        };
        let received = if mode & 8 != 0 { device.inbox.last() + u64::from(r.u8()) } else { device.inbox.last() };
        let offer = Offer { receipts, resume: token.map(|token| Resume { token, received }) };
        let conn = self.next_conn;
        self.next_conn += 1;
        let random = u64::from(conn).to_be_bytes();
        let opened = self.table.open(id, offer, random, conn);

        // What the model says: a resume of the live session, or a fresh one.
        let live = self.models.get(id).filter(|m| token == Some(m.token) && received <= m.assigned);
        let (expected, app) = if let Some(m) = live {
            let grant = Grant {
                token: m.token,
                status: if m.lost > 0 { Status::ResumedWithLoss } else { Status::Resumed },
                why: (m.lost > 0).then_some(LostWhy::HoldOverflow),
                received: m.rx,
                lost: m.lost,
            };
            let detached = m.attached;
            self.stats.0 += 1;
            self.stats.4 += m.assigned - received;
            let m = self.models.get_mut(id).expect("live");
            let app = m.release(received);
            m.gapped = received < m.floor;
            m.floor = m.floor.max(received);
            m.sent = received;
            m.attached = Some(conn);
            m.expires = None;
            m.lost = 0;
            ((grant, detached), app)
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
            let (detached, app) = self.end(id, LostWhy::Replaced);
            let mut new_token = [0; 16];
            new_token[..8].copy_from_slice(&STORE);
            new_token[8..].copy_from_slice(&random);
            self.models.insert(
                id.to_owned(),
                Model {
                    token: new_token,
                    attached: Some(conn),
                    expires: None,
                    items: VecDeque::new(),
                    sent: 0,
                    floor: 0,
                    gapped: false,
                    assigned: 0,
                    rx: 0,
                    lost: 0,
                },
            );
            ((Grant { token: new_token, status, why, received: 0, lost }, detached), app)
        };
        assert_eq!((opened.grant, opened.detached), expected, "open {id} with {offer:?}");
        self.effects(opened.effects, app);

        // The device takes the grant as a client library does.
        self.grants.push(opened.grant.token);
        let device = self.devices.get_mut(id).expect("device");
        device.token = Some(opened.grant.token);
        if !opened.grant.continues() {
            device.inbox = Inbox::new(0);
            device.next_seq = 1;
        } else {
            device.inbox = Inbox::new(received);
        }
        device.conn = Some(conn);
        device.broken = false;
    }

    fn detach(&mut self, r: &mut Reader) {
        let id = IDS[usize::from(r.u8() % 4)];
        let stale = r.u8() & 1 != 0;
        let device = self.devices.get_mut(id).expect("device");
        let conn = device.conn.unwrap_or(0) + if stale { 1_000_000 } else { 0 };
        if !stale {
            device.conn = None;
        }
        self.table.detach(self.now, id, &conn);
        if let Some(m) = self.models.get_mut(id).filter(|m| m.attached == Some(conn)) {
            m.attached = None;
            m.expires = Some(self.now + EXPIRY);
        }
    }

    fn push(&mut self, r: &mut Reader) {
        let to = TO[usize::from(r.u8() % 5)];
        let from = FROM[usize::from(r.u8() % 5)];
        let len = 4 * usize::from(r.u8());
        let origin = match r.u8() % 3 {
            0 => None,
            1 => Some(Origin::App(self.next_app)),
            _ => self.models.get(from).map(|m| {
                let device = self.devices.get_mut(from).expect("device");
                let seq = device.next_seq;
                device.next_seq += 1;
                Origin::Client { id: from.to_owned(), token: m.token, seq }
            }),
        };
        if let Some(Origin::Client { seq, .. }) = origin {
            self.table.received(from, seq);
            let m = self.models.get_mut(from).expect("sender");
            m.rx = m.rx.max(seq);
        }
        let size = held_size(len, from.len());
        let (_, _, held) = self.table.totals();
        let before = self.table.hold_of(to);
        let got = self.table.push(to, from, Bytes::from(vec![0; len]), origin.clone());
        let Some(m) = self.models.get_mut(to) else {
            assert_eq!(got, Err(PushError::NoSession), "push to {to}, which has no session");
            return;
        };
        let h = before.expect("a session has a hold");
        let cap = self.cfg.per_session;
        let full = held + size > self.cfg.total_bytes || h.messages >= cap.messages || h.bytes + size > cap.bytes;
        if full {
            assert_eq!(got, Err(PushError::Full), "push of {size} bytes to {to} holding {h:?}, {held} in all");
            m.lost = m.lost.saturating_add(1);
            self.stats.3 += 1;
            return;
        }
        assert_eq!(got, Ok(m.attached), "push of {size} bytes to {to} holding {h:?}, {held} in all");
        m.assigned += 1;
        m.items.push_back(Item { seq: m.assigned, data: Some((from.to_owned(), len, origin.clone())) });
        match origin {
            Some(Origin::App(n)) => {
                self.app_pending.insert(n);
                self.next_app += 1;
            }
            Some(Origin::Client { token, seq, .. }) => {
                self.pushed.insert((token, seq), to.to_owned());
            }
            None => {}
        }
    }

    fn ack(&mut self, r: &mut Reader) {
        let id = IDS[usize::from(r.u8() % 4)];
        let mode = r.u8();
        let now = self.now;
        let device = self.devices.get_mut(id).expect("device");
        let seq = match mode % 4 {
            0 => device.inbox.ack_due(now).unwrap_or(device.inbox.last()),
            1 => device.inbox.ack_pending().unwrap_or(device.inbox.last()),
            _ => self.models.get(id).map_or(0, |m| m.sent) + u64::from(mode >> 2) % 3,
        };
        let got = self.table.ack(id, seq);
        let Some(m) = self.models.get_mut(id) else {
            assert!(got.is_ok_and(|fx| fx.wake.is_empty() && fx.app.is_empty()), "ack of {id}, which has no session");
            return;
        };
        if seq > m.sent {
            let e = got.expect_err("an ack beyond what was sent");
            assert_eq!((e.acked, e.sent), (seq, m.sent));
            return;
        }
        let app = m.release(seq);
        m.floor = m.floor.max(seq);
        self.effects(got.expect("an ack of what was sent"), app);
    }

    fn next_frames(&mut self, r: &mut Reader) {
        let id = IDS[usize::from(r.u8() % 4)];
        let budget = 8 * usize::from(r.u8());
        let lost = r.u8() & 1 != 0;
        let (frames, more) = self.table.next_frames(id, budget);
        let Some(m) = self.models.get_mut(id) else {
            assert!(frames.is_empty() && !more, "frames for {id}, which has no session");
            return;
        };
        let mut used = 0;
        for f in &frames {
            assert!(used < budget, "a frame beyond the budget {budget}");
            used += f.encoded_len();
            let seq = match f {
                Frame::Sdata { seq, .. } => *seq,
                Frame::Report(r) => r.seq,
                other => panic!("next_frames gave {other:?}"),
            };
            let item = m.items.iter().find(|i| i.seq > m.sent).expect("a frame of a held item");
            assert_eq!(seq, item.seq, "{id}: the first held item after {}", m.sent);
            assert!(m.gapped || seq == m.sent + 1, "{id}: {seq} after {} on one connection", m.sent);
            m.sent = seq;
            match (&item.data, f) {
                (Some((from, len, _)), Frame::Sdata { peer, payload, .. }) => {
                    assert_eq!((peer, payload.len()), (from, *len), "{id}: message {seq}")
                }
                (None, Frame::Report(_)) => {}
                (d, f) => panic!("{id}: item {seq} is {d:?}, sent as {f:?}"),
            }
            let bytes = f.to_bytes_v(V2);
            assert_eq!(Frame::parse_v(&bytes, V2).as_ref(), Ok(f), "{id}: a frame that does not decode to itself");
        }
        assert_eq!(more, m.items.back().is_some_and(|i| i.seq > m.sent), "{id}: more waiting");
        let token = m.token;
        let attached = m.attached;

        // Delivery to the device, in order, unless this connection lost frames before.
        let device = self.devices.get_mut(id).expect("device");
        if lost {
            device.broken = true;
        }
        if device.broken || device.conn.is_none() || device.conn != attached {
            return;
        }
        for f in frames {
            let seq = match &f {
                Frame::Sdata { seq, .. } => *seq,
                Frame::Report(r) => r.seq,
                _ => unreachable!(),
            };
            let last = device.inbox.last();
            match device.inbox.accept(self.now, seq) {
                Accept::New => assert_eq!(seq, last + 1, "{id}: the inbox took {seq} after {last}"),
                Accept::Duplicate => {
                    assert!(seq <= last, "{id}: {seq} a duplicate after {last}");
                    continue;
                }
                Accept::Gap { expected } => {
                    assert!(seq > last + 1 && expected == last + 1, "{id}: {seq} a gap after {last}");
                    // A protocol error: the connection ends.
                    device.broken = true;
                    return;
                }
            }
            let Frame::Report(rep) = f else { continue };
            for s in rep.seqs.iter().filter(|s| **s < FAKE_SEQS) {
                let to = self.pushed.get(&(token, *s));
                assert_eq!(to, Some(&rep.peer), "{id}: a report on message {s}, never sent to {}", rep.peer);
                assert!(self.reported.insert((token, *s)), "{id}: message {s} reported twice");
            }
        }
    }

    fn report(&mut self, r: &mut Reader) {
        let to = IDS[usize::from(r.u8() % 4)];
        let which = r.u8() % 3;
        let peer = FROM[usize::from(r.u8() % 5)];
        let outcome = match r.u8() {
            0 => None,
            c => Some(Undeliverable::from_code(c)),
        };
        let seqs: Vec<u64> = (0..r.u8() % 3).map(|i| FAKE_SEQS + u64::from(i)).collect();
        let current = self.models.get(to).map(|m| m.token);
        let token = match which {
            0 => current,
            1 => None,
            _ => Some(r.bytes::<16>()),
        };
        let got = self.table.report(to, token.as_ref(), peer, outcome, seqs.clone());
        let Some(m) = self.models.get_mut(to).filter(|_| token.is_none() || token == current) else {
            assert_eq!(got, None, "a report to {to} that is not its session's");
            return;
        };
        if seqs.is_empty() {
            assert_eq!(got, None, "an empty report");
            return;
        }
        assert_eq!(got, m.attached, "report to {to}");
    }

    /// The model's side of `end`: the session's connection and the application's outcomes, in order.
    fn end(&mut self, id: &str, why: LostWhy) -> (Option<u32>, Vec<(u64, Option<Undeliverable>)>) {
        let Some(m) = self.models.remove(id) else { return (None, Vec::new()) };
        let outcome = if why == LostWhy::Expired { Undeliverable::Expired } else { Undeliverable::Replaced };
        let app = m
            .items
            .iter()
            .filter_map(|i| match i.data {
                Some((_, _, Some(Origin::App(n)))) => Some((n, Some(outcome))),
                _ => None,
            })
            .collect();
        if self.cfg.remember_ended > 0 {
            if self.ended.len() >= self.cfg.remember_ended {
                self.ended.pop_front();
            }
            let lost = u32::try_from(m.data_count()).expect("few").saturating_add(m.lost);
            self.ended.push_back((m.token, why, lost));
        }
        (m.attached, app)
    }

    /// Check what an operation asked of its caller: the application's outcomes exactly, each message resolved
    /// once; connections to wake are those of live sessions.
    fn effects(&mut self, fx: Effects<u32>, app: Vec<(u64, Option<Undeliverable>)>) {
        assert_eq!(fx.app, app, "the application's outcomes");
        for (n, _) in &fx.app {
            assert!(self.app_pending.remove(n), "application message {n} resolved twice");
        }
        for c in fx.wake {
            assert!(self.models.values().any(|m| m.attached == Some(c)), "woke connection {c}, which carries nothing");
        }
    }

    fn check(&mut self) {
        // Reports the operation made: numbers the table assigned beyond the model's. (Nothing releases items
        // after an operation made reports, so they are the newest.)
        for id in IDS {
            let (Some(h), Some(m)) = (self.table.hold_of(id), self.models.get_mut(id)) else { continue };
            while m.assigned < h.assigned {
                m.assigned += 1;
                m.items.push_back(Item { seq: m.assigned, data: None });
            }
        }
        let (sessions, messages, held) = self.table.totals();
        let (mut sum_messages, mut sum_bytes, mut data_bytes, mut report_bytes) = (0, 0, 0, 0);
        for id in IDS {
            let (h, m) = match (self.table.hold_of(id), self.models.get(id)) {
                (None, None) => continue,
                (Some(h), Some(m)) => (h, m),
                (h, m) => panic!("{id}: the table has {h:?}, the model {m:?}"),
            };
            assert_eq!(self.table.token_of(id), Some(m.token), "{id}: token");
            assert_eq!(
                (h.messages, h.online, h.expires, h.received, h.assigned, h.lost),
                (m.items.len(), m.attached.is_some(), m.expires, m.rx, m.assigned, m.lost),
                "{id}: messages, online, expiry, received, assigned, lost"
            );
            let (data, reports) = (m.data_bytes(), m.items.len() - m.data_count());
            assert!(data <= self.cfg.per_session.bytes, "{id}: {data} bytes of messages held, bound {:?}", self.cfg);
            assert!(m.data_count() <= self.cfg.per_session.messages, "{id}: {} messages held", m.data_count());
            assert!(h.bytes >= data + reports * held_size(8, 0), "{id}: {} bytes held, {data} of messages", h.bytes);
            sum_messages += h.messages;
            sum_bytes += h.bytes;
            data_bytes += data;
            report_bytes += h.bytes - data;
        }
        assert_eq!((sessions, messages, held), (self.models.len(), sum_messages, sum_bytes), "totals()");
        // The true bound: messages are refused at the total, reports never are.
        assert!(
            held <= self.cfg.total_bytes + report_bytes,
            "{held} bytes held: {data_bytes} of messages, {report_bytes} of reports, total bound {}",
            self.cfg.total_bytes
        );
        let earliest = self.models.values().filter_map(|m| m.expires).min();
        assert_eq!(self.table.poll_timeout(), earliest, "the next expiry");
        let s = self.table.stats();
        assert_eq!((s.resumed, s.resume_refused, s.expired, s.overflows, s.replayed), self.stats, "stats");
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
                if seq > bound {
                    assert_eq!(got.map(|_| ()).map_err(|e| (e.acked, e.sent)), Err((seq, bound)), "outbox ack/resume");
                    return;
                }
                let mut released = Vec::new();
                while o.items.front().is_some_and(|(s, _)| *s <= seq) {
                    released.push(o.items.pop_front().expect("front").0);
                }
                let got: Vec<u64> = got.expect("within what was sent").into_iter().map(|(s, _)| s).collect();
                assert_eq!(got, released, "released by ack/resume of {seq}");
                if op == 2 {
                    o.gapped = seq < o.floor;
                    o.sent = seq;
                }
                o.floor = o.floor.max(seq);
            }
            _ => {
                let expected = o.items.iter().find(|(s, _)| *s > o.sent).map(|(s, _)| *s);
                let got = o.out.next_unsent().map(|(s, item)| {
                    assert_eq!(s, *item, "the item kept under {s}");
                    s
                });
                assert_eq!(got, expected, "next_unsent after {}", o.sent);
                if let Some(s) = got {
                    assert!(s > o.sent, "next_unsent went back");
                    assert!(o.gapped || s == o.sent + 1, "next_unsent gave {s} after {}", o.sent);
                    o.sent = s;
                }
            }
        }
        let bytes: usize = o.items.iter().map(|(_, s)| s).sum();
        assert_eq!((o.out.len(), o.out.bytes(), o.out.assigned()), (o.items.len(), bytes, o.next - 1));
        assert_eq!(o.out.has_unsent(), o.items.back().is_some_and(|(s, _)| *s > o.sent));
    }

    fn inbox_op(&mut self, r: &mut Reader) {
        let (op, arg) = (r.u8() % 4, r.u8());
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
                if got == Accept::New {
                    i.last = seq;
                }
                if !matches!(got, Accept::Gap { .. }) {
                    i.pending += 1;
                    i.first.get_or_insert(now);
                }
            }
            1 => {
                let expected = due(i).then_some(i.last);
                assert_eq!(i.inbox.ack_due(now), expected, "ack_due with {} pending since {:?}", i.pending, i.first);
                if expected.is_some() {
                    (i.pending, i.first) = (0, None);
                }
            }
            2 => {
                let expected = i.first.map(|_| i.last);
                assert_eq!(i.inbox.ack_pending(), expected, "ack_pending");
                (i.pending, i.first) = (0, None);
            }
            _ => self.now += Duration::from_millis(u64::from(arg % 32)),
        }
        let i = &self.inbox;
        assert_eq!(i.inbox.last(), i.last);
        assert_eq!(i.inbox.poll_timeout(), i.first.map(|f| f + ACK_DELAY), "the ACK's deadline");
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
