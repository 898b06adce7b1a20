//! `tether_next_event` and the flat C struct it fills.

use std::collections::VecDeque;
use std::ffi::{c_char, CStr, CString};
use std::ptr;
use std::time::Duration;

use bytes::Bytes;
use tether_core::{InDoubt, LinkEvent};

use crate::client::{tether_client, Popped};
use crate::status::*;

/// Connected to `server` (`flag`: 1 if it is the primary): `epoch`, `heartbeat_ms`, `timeout_ms` (the silence
/// after which either side declares the other dead); reliable: `reason` is "new", "resumed", "resumed_with_loss"
/// or "fresh", `count` the messages lost, and `text` why the session did not resume ("expired", "replaced",
/// "server_restarted", ...); all "" and 0 when not reliable.
pub const TETHER_EVENT_CONNECTED: i32 = 1;
/// The connection to `server` ended: `reason` (e.g. "heartbeat_timeout", "eof", "reset", "bye"), `flag` 1 if the
/// server ended it (its `BYE`, FIN or reset) and 0 if this client decided, `retry_after_ms` and `alternative`
/// (the server's hints, 0 and "" when none), `text` the detail. The client reconnects unless it was closed.
pub const TETHER_EVENT_DISCONNECTED: i32 = 2;
/// The next attempt (`attempt`) goes to `server` in `delay_ms`.
pub const TETHER_EVENT_RECONNECTING: i32 = 3;
/// An attempt on `server` failed: `text` says why; `reason` and `retry_after_ms` are the server's refusal, if it
/// refused ("" otherwise).
pub const TETHER_EVENT_CONNECT_FAILED: i32 = 4;
/// Reconnecting stopped after `attempt` failed retries (`reason`: "kicked", or the last failure's when the
/// configured attempts ran out: "reset" for a connection refused or cut, the server's reason when it refused
/// us). Sends fail with `TETHER_ERR_CLOSED` from now on; `TETHER_CLOSED` follows.
pub const TETHER_EVENT_GAVE_UP: i32 = 5;
/// A message: `data`/`len` from `peer` ("" for the server's application).
pub const TETHER_EVENT_DATA: i32 = 6;
/// Presence of `peer`: `state` (`TETHER_ONLINE`, `TETHER_SUSPECT`, `TETHER_OFFLINE`), `reason` why it went
/// offline, `flag` 1 if it ended its connection itself, `last_seen_ms` since its last frame (`UINT32_MAX`:
/// unknown).
pub const TETHER_EVENT_PRESENCE: i32 = 7;
/// A message to `peer` was not delivered: `reason` ("not_online", "too_large", ...).
pub const TETHER_EVENT_UNDELIVERABLE: i32 = 8;
/// A message of `len` bytes to `peer`, held while disconnected, could not be sent after reconnecting (`text`);
/// `data` is NULL.
pub const TETHER_EVENT_NOT_SENT: i32 = 9;
/// The server has been silent for `silent_ms`, longer than usual: it may be gone.
pub const TETHER_EVENT_SUSPECT: i32 = 10;
/// The server was heard again after `TETHER_EVENT_SUSPECT`.
pub const TETHER_EVENT_RECOVERED: i32 = 11;
/// Reliable: the server took every message up to sequence number `seq`. Cumulative: when the application has
/// fallen behind, one event reports the latest position in place of several (never dropped).
pub const TETHER_EVENT_ACKED: i32 = 12;
/// Reliable, with receipts: `peer`'s application took the messages numbered `seqs[0..nseqs]`.
pub const TETHER_EVENT_DELIVERED: i32 = 13;
/// Reliable: the messages numbered `seqs[0..nseqs]` to `peer` will never arrive: `reason`.
pub const TETHER_EVENT_NOT_DELIVERED: i32 = 14;
/// Reliable: the session could not be resumed, and its message `seq` to `peer` (`data`/`len`) is in doubt: `flag`
/// 1 if it was sent and never acknowledged (it may or may not have arrived), 0 if it never left; `resent_as` its
/// number in the new session when it was sent again (0: not sent).
pub const TETHER_EVENT_IN_DOUBT: i32 = 15;
/// The application fell behind by a whole event queue: `count` events were dropped.
pub const TETHER_EVENT_DROPPED: i32 = 16;
/// Why the previous connection ended, concluded once this one was welcomed: `reason` names the diagnosis
/// (`"middlebox_forgot"`: it ended in silence or a reset, and the same server welcomed the next attempt at once,
/// so the path works and a NAT or firewall on it forgot the connection), `text` explains it. Follows the
/// `TETHER_EVENT_CONNECTED` it was concluded from.
pub const TETHER_EVENT_DIAGNOSIS: i32 = 17;
/// The adaptive heartbeat changed the interval during the session: `heartbeat_ms` from now on, and `timeout_ms`,
/// the silence after which either side gives up on the other.
pub const TETHER_EVENT_HEARTBEAT: i32 = 18;

/// `state` of `TETHER_EVENT_PRESENCE`.
pub const TETHER_ONLINE: i32 = 1;
pub const TETHER_SUSPECT: i32 = 2;
pub const TETHER_OFFLINE: i32 = 3;

/// One event, filled by `tether_next_event`. Which fields mean something depends on `kind` (see each
/// `TETHER_EVENT_*`); the others are 0, or "" for strings (never NULL). `data` is NULL when the event carries
/// no bytes (an empty message, or `TETHER_EVENT_NOT_SENT`, whose `len` is the size of the message it could not
/// send); `seqs` is NULL when `nseqs` is 0. Strings are UTF-8 and NUL-terminated. Every pointer belongs to the library and stays valid until
/// the next `tether_next_event` on the same client, or `tether_free`.
#[repr(C)]
pub struct tether_event {
    pub kind: i32,
    pub flag: i32,
    pub state: i32,
    pub attempt: u32,
    pub heartbeat_ms: u32,
    pub timeout_ms: u32,
    pub retry_after_ms: u32,
    pub delay_ms: u32,
    pub silent_ms: u32,
    pub last_seen_ms: u32,
    pub epoch: u64,
    pub seq: u64,
    pub resent_as: u64,
    pub count: u64,
    pub server: *const c_char,
    pub peer: *const c_char,
    pub reason: *const c_char,
    pub alternative: *const c_char,
    pub text: *const c_char,
    pub data: *const u8,
    pub len: usize,
    pub seqs: *const u64,
    pub nseqs: usize,
}

const EMPTY: &CStr = c"";

impl tether_event {
    fn blank(kind: i32) -> tether_event {
        tether_event {
            kind,
            flag: 0,
            state: 0,
            attempt: 0,
            heartbeat_ms: 0,
            timeout_ms: 0,
            retry_after_ms: 0,
            delay_ms: 0,
            silent_ms: 0,
            last_seen_ms: 0,
            epoch: 0,
            seq: 0,
            resent_as: 0,
            count: 0,
            server: EMPTY.as_ptr(),
            peer: EMPTY.as_ptr(),
            reason: EMPTY.as_ptr(),
            alternative: EMPTY.as_ptr(),
            text: EMPTY.as_ptr(),
            data: ptr::null(),
            len: 0,
            seqs: ptr::null(),
            nseqs: 0,
        }
    }
}

/// What the last event handed out points into, and the in-doubt messages not handed out yet.
#[derive(Default)]
pub(crate) struct Taken {
    strings: Vec<CString>,
    payload: Bytes,
    seqs: Vec<u64>,
    doubt: VecDeque<InDoubt>,
}

impl Taken {
    /// Keep `s` and return its pointer ("" stays the static empty string).
    fn keep(&mut self, s: &str) -> *const c_char {
        if s.is_empty() {
            return EMPTY.as_ptr();
        }
        self.strings.push(c_string(s));
        self.strings.last().expect("just pushed").as_ptr()
    }

    fn keep_payload(&mut self, ev: &mut tether_event, payload: Bytes) {
        ev.len = payload.len();
        ev.data = if payload.is_empty() { ptr::null() } else { payload.as_ptr() };
        self.payload = payload;
    }

    fn keep_seqs(&mut self, ev: &mut tether_event, seqs: Vec<u64>) {
        ev.nseqs = seqs.len();
        ev.seqs = if seqs.is_empty() { ptr::null() } else { seqs.as_ptr() };
        self.seqs = seqs;
    }

    fn doubt(&mut self, m: InDoubt) -> tether_event {
        let mut ev = tether_event::blank(TETHER_EVENT_IN_DOUBT);
        ev.peer = self.keep(&m.to);
        ev.seq = m.seq;
        ev.flag = m.sent.into();
        ev.resent_as = m.resent_as.unwrap_or(0);
        self.keep_payload(&mut ev, m.payload);
        ev
    }

    /// `ev` as the C struct, its strings and bytes kept here.
    fn fill(&mut self, ev: LinkEvent) -> tether_event {
        let ms = |d: Duration| d.as_millis().min(u32::MAX.into()) as u32;
        let mut e;
        match ev {
            LinkEvent::Connected { server, epoch, heartbeat, timeout, primary, reliable } => {
                e = tether_event::blank(TETHER_EVENT_CONNECTED);
                e.server = self.keep(&server);
                e.epoch = epoch;
                e.heartbeat_ms = ms(heartbeat);
                e.timeout_ms = ms(timeout);
                e.flag = primary.into();
                if let Some(g) = reliable {
                    e.reason = self.keep(g.status.as_str());
                    e.count = g.lost.into();
                    e.text = self.keep(g.why.map_or("", |w| w.as_str()));
                }
            }
            LinkEvent::Disconnected { server, disconnect: d } => {
                e = tether_event::blank(TETHER_EVENT_DISCONNECTED);
                e.server = self.keep(&server);
                e.reason = self.keep(d.reason.as_str());
                e.flag = d.by_peer.into();
                e.retry_after_ms = d.retry_after.map_or(0, ms);
                e.alternative = self.keep(d.alternative.as_deref().unwrap_or_default());
                e.text = self.keep(d.detail.as_deref().unwrap_or_default());
            }
            LinkEvent::Reconnecting { attempt, delay, server } => {
                e = tether_event::blank(TETHER_EVENT_RECONNECTING);
                e.attempt = attempt;
                e.delay_ms = ms(delay);
                e.server = self.keep(&server);
            }
            LinkEvent::ConnectFailed { server, refused, error } => {
                e = tether_event::blank(TETHER_EVENT_CONNECT_FAILED);
                e.server = self.keep(&server);
                e.text = self.keep(&error);
                if let Some(d) = refused {
                    e.reason = self.keep(d.reason.as_str());
                    e.retry_after_ms = d.retry_after.map_or(0, ms);
                    e.alternative = self.keep(d.alternative.as_deref().unwrap_or_default());
                }
            }
            LinkEvent::GaveUp { attempts, reason } => {
                e = tether_event::blank(TETHER_EVENT_GAVE_UP);
                e.attempt = attempts;
                e.reason = self.keep(reason.as_str());
            }
            LinkEvent::Data { from, payload } => {
                e = tether_event::blank(TETHER_EVENT_DATA);
                e.peer = self.keep(from.as_deref().unwrap_or_default());
                self.keep_payload(&mut e, payload);
            }
            LinkEvent::Presence(p) => {
                e = tether_event::blank(TETHER_EVENT_PRESENCE);
                e.peer = self.keep(&p.client_id);
                e.state = p.state as i32;
                e.reason = self.keep(p.reason.map_or("", |r| r.as_str()));
                e.flag = p.by_client().into();
                e.last_seen_ms = p.last_seen_ago_ms;
            }
            LinkEvent::Undeliverable { to, why } => {
                e = tether_event::blank(TETHER_EVENT_UNDELIVERABLE);
                e.peer = self.keep(&to);
                e.reason = self.keep(why.as_str());
            }
            LinkEvent::NotSent { to, len, error } => {
                e = tether_event::blank(TETHER_EVENT_NOT_SENT);
                e.peer = self.keep(to.as_deref().unwrap_or_default());
                e.len = len;
                e.text = self.keep(&error);
            }
            LinkEvent::Suspect { silent_for } => {
                e = tether_event::blank(TETHER_EVENT_SUSPECT);
                e.silent_ms = ms(silent_for);
            }
            LinkEvent::Recovered => e = tether_event::blank(TETHER_EVENT_RECOVERED),
            LinkEvent::Acked { upto } => {
                e = tether_event::blank(TETHER_EVENT_ACKED);
                e.seq = upto;
            }
            LinkEvent::Delivered { to, seqs } => {
                e = tether_event::blank(TETHER_EVENT_DELIVERED);
                e.peer = self.keep(&to);
                self.keep_seqs(&mut e, seqs);
            }
            LinkEvent::NotDelivered { to, seqs, why } => {
                e = tether_event::blank(TETHER_EVENT_NOT_DELIVERED);
                e.peer = self.keep(&to);
                e.reason = self.keep(why.as_str());
                self.keep_seqs(&mut e, seqs);
            }
            LinkEvent::InDoubt(msgs) => {
                self.doubt.extend(msgs);
                let first = self.doubt.pop_front().expect("an in-doubt event lists at least one message");
                e = self.doubt(first);
            }
            LinkEvent::Dropped { count } => {
                e = tether_event::blank(TETHER_EVENT_DROPPED);
                e.count = count;
            }
            LinkEvent::Heartbeat { interval, timeout } => {
                e = tether_event::blank(TETHER_EVENT_HEARTBEAT);
                e.heartbeat_ms = ms(interval);
                e.timeout_ms = ms(timeout);
            }
            LinkEvent::Diagnosis { diagnosis, explanation } => {
                e = tether_event::blank(TETHER_EVENT_DIAGNOSIS);
                e.reason = self.keep(diagnosis.as_str());
                e.text = self.keep(&explanation);
            }
        }
        e
    }

    /// Forget what the last event pointed into.
    fn clear(&mut self) {
        self.strings.clear();
        self.payload = Bytes::new();
        self.seqs = Vec::new();
    }
}

/// Wait up to `timeout_ms` (0: do not wait; -1: wait for ever) for the client's next event and fill `*event`.
/// Returns `TETHER_OK` with an event, `TETHER_TIMEOUT` without one, or `TETHER_CLOSED` once the client is closed
/// (or gave up) and every event was pulled. Events come from one consumer at a time: calls on the same client
/// from several threads take turns, and each call ends the validity of what the previous one handed out. Must
/// not wait on the library's thread (the wake-up callback).
#[no_mangle]
pub unsafe extern "C" fn tether_next_event(
    client: *mut tether_client,
    timeout_ms: i32,
    event: *mut tether_event,
) -> i32 {
    guard(|| {
        // SAFETY: a client from `tether_client_start`, not freed (the header's rule).
        let c = unsafe { arg_ref(client, "client") }?;
        if event.is_null() {
            return Err(Error::new(TETHER_ERR_NULL, "event is NULL"));
        }
        let timeout = match timeout_ms {
            -1 => None,
            t if t >= 0 => Some(Duration::from_millis(t as u64)),
            t => return Err(Error::new(TETHER_ERR_INVALID, format!("timeout_ms {t}: give -1, 0 or more"))),
        };
        if timeout != Some(Duration::ZERO) {
            crate::runtime::not_on_runtime("tether_next_event with a timeout")?;
        }
        let mut taken = c.taken.lock().unwrap_or_else(|p| p.into_inner());
        taken.clear();
        let e = match taken.doubt.pop_front() {
            Some(m) => taken.doubt(m),
            None => match c.handoff.pop(timeout) {
                Popped::Event(ev) => taken.fill(ev),
                Popped::Timeout => return Ok(TETHER_TIMEOUT),
                Popped::Ended => return Ok(TETHER_CLOSED),
            },
        };
        // SAFETY: the caller's struct, checked non-NULL.
        unsafe { event.write(e) };
        Ok(TETHER_OK)
    })
}
