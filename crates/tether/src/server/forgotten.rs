//! Telling a connection the path forgot from one the client dropped: the `middlebox_forgot` diagnosis.
//!
//! # Layout
//! A NAT or firewall that forgets an idle connection leaves both ends with a connection that hears nothing more
//! (or gets a reset), while the path itself works: the client's next connection goes through at once. The server
//! sees that in two ways, and [`Forgotten`] decides both:
//! - **Before its own verdict** ([`Forgotten::taken_over`]): the same device (same instance nonce) takes its id
//!   over from the same address while the old connection is still open here, silent for at least half a
//!   heartbeat interval. The client gave it up (a reset, or its own verdict came first) and the server had
//!   nothing to end it for: the path broke it.
//! - **After its own verdict** ([`Forgotten::silenced`], then [`Forgotten::welcomed`]): the server ended a
//!   session for silence (`heartbeat_timeout`, `keepalive_timeout`, `write_timeout`) while the path carried
//!   nothing back (the caller checks the kernel: our own bytes unacknowledged), and the same id comes back
//!   from the same address within one heartbeat interval and a second of that verdict (a verdict taken more than
//!   a second after its deadline is left out: the server itself was stalled). A path that was really
//!   down for the whole timeout rarely comes back exactly then; a NAT that forgot makes both ends give up at the
//!   same moment and lets the next connection through at once. (A cut that heals in that second is
//!   misnamed; the detail says what was seen.)
//!
//! # Rules
//! A leaf: its lock is taken alone. The table holds at most one entry per id that went silent within the last
//! window, and never more than [`MAX_SILENCED`] (and as many explanations waiting for a taken-over connection's
//! close, each for a minute at most); the handshake and close paths take the lock only while it is not empty.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tether_proto::{CloseReason, ConnId};

use crate::event::Diagnosis;

/// Ids remembered at once after a verdict of silence; beyond it, a verdict is not remembered (no diagnosis).
pub(super) const MAX_SILENCED: usize = 65_536;
/// Added to the heartbeat interval for how long after its verdict the id's return counts.
const SLACK: Duration = Duration::from_secs(1);
/// A verdict of silence taken later than this after its deadline is not remembered: the server was stalled.
const MAX_LATENESS: Duration = Duration::from_secs(1);

/// A session the server ended for silence, waiting to see whether its client comes straight back.
struct Silenced {
    conn: ConnId,
    ip: IpAddr,
    /// The verdict, and how long after it the id's return counts.
    at: Instant,
    until: Instant,
    silent_for: Duration,
    reason: CloseReason,
}

#[derive(Default)]
struct Table {
    by_id: HashMap<Box<str>, Silenced>,
    /// (expiry, id) in the order they were added: expired entries are dropped from the front.
    order: VecDeque<(Instant, Box<str>)>,
    /// Explanations for connections being taken over, until their close is recorded ([`Forgotten::closing`]);
    /// with their expiry, in case the close was recorded first.
    pending: HashMap<ConnId, String>,
    pending_order: VecDeque<(Instant, ConnId)>,
}

/// How long an explanation waits for its connection's close to be recorded.
const PENDING_FOR: Duration = Duration::from_secs(60);

/// See the module docs.
#[derive(Default)]
pub(super) struct Forgotten {
    table: Mutex<Table>,
    /// Entries in `by_id`, and in `pending`: the hot paths look at these before taking the lock.
    len: AtomicUsize,
    pending: AtomicUsize,
}

/// A diagnosis made: about connection `conn`, with its explanation.
pub(super) struct Found {
    pub(super) conn: ConnId,
    pub(super) diagnosis: Diagnosis,
    pub(super) explanation: String,
}

impl Forgotten {
    /// The server ended `client`'s session on `conn` (from `ip`, heartbeat `interval`) with `reason`, after
    /// `silent_for` without a frame, `lateness` after its deadline (`ended`).
    pub(super) fn silenced(
        &self,
        now: Instant,
        client: &str,
        (conn, ip): (ConnId, IpAddr),
        interval: Duration,
        ended: (CloseReason, Duration, Option<Duration>),
    ) {
        let (reason, silent_for, lateness) = ended;
        if !matches!(reason, CloseReason::HeartbeatTimeout | CloseReason::KeepaliveTimeout | CloseReason::WriteTimeout)
        {
            return;
        }
        // A verdict taken late says the server itself was stalled (stopped, starved): its clients' silence is
        // its own, not the path's.
        if lateness.is_some_and(|l| l > MAX_LATENESS) {
            return;
        }
        let mut t = self.table.lock().expect("forgotten lock");
        Self::expire(&mut t, now);
        if t.by_id.len() >= MAX_SILENCED {
            return;
        }
        let until = now + interval + SLACK;
        t.by_id.insert(client.into(), Silenced { conn, ip, at: now, until, silent_for, reason });
        t.order.push_back((until, client.into()));
        self.len.store(t.by_id.len(), Ordering::Relaxed);
    }

    /// `client` was welcomed from `ip` with no connection to take over: did the server just end its previous
    /// one for a silence that a middlebox explains?
    pub(super) fn welcomed(&self, now: Instant, client: &str, ip: IpAddr) -> Option<Found> {
        if self.len.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let mut t = self.table.lock().expect("forgotten lock");
        let s = t.by_id.remove(client);
        Self::expire(&mut t, now);
        self.len.store(t.by_id.len(), Ordering::Relaxed);
        let s = s.filter(|s| s.ip == ip && now <= s.until)?;
        let explanation = format!(
            "{}: after {:.1} s without a frame the server ended it ({}), and the client was back from the same \
             address {:.1} s later, so the path works; a NAT or firewall on it drops idle connections sooner than \
             the heartbeat comes (keep the heartbeat interval under its idle timeout)",
            Diagnosis::MiddleboxForgot.meaning(),
            s.silent_for.as_secs_f64(),
            s.reason.as_str(),
            now.saturating_duration_since(s.at).as_secs_f64(),
        );
        Some(Found { conn: s.conn, diagnosis: Diagnosis::MiddleboxForgot, explanation })
    }

    /// The same device took its id over on `old` (its heartbeat `interval`, silent for `silent_for`), the old
    /// connection's address and the new one's in `ips`. The explanation also waits for `old`'s close to be
    /// recorded ([`Forgotten::closing`]).
    pub(super) fn taken_over(
        &self,
        now: Instant,
        old: ConnId,
        ips: (IpAddr, IpAddr),
        silent_for: Duration,
        interval: Duration,
    ) -> Option<Found> {
        // Half an interval without a frame: a connection in the middle of its heartbeat was not forgotten.
        if ips.0 != ips.1 || interval.is_zero() || silent_for < interval / 2 {
            return None;
        }
        let explanation = format!(
            "{}: the same device came back from the same address while this connection was still open here, \
             {:.1} s after its last frame; it gave the connection up and the server had no reason to, so the path \
             broke it, as a NAT or firewall does that drops idle connections (keep the heartbeat interval under \
             its idle timeout)",
            Diagnosis::MiddleboxForgot.meaning(),
            silent_for.as_secs_f64(),
        );
        let mut t = self.table.lock().expect("forgotten lock");
        while t.pending_order.front().is_some_and(|(until, _)| *until <= now) {
            let (_, conn) = t.pending_order.pop_front().expect("front exists");
            t.pending.remove(&conn);
        }
        if t.pending.len() < MAX_SILENCED {
            t.pending.insert(old, explanation.clone());
            t.pending_order.push_back((now + PENDING_FOR, old));
        }
        self.pending.store(t.pending.len(), Ordering::Relaxed);
        Some(Found { conn: old, diagnosis: Diagnosis::MiddleboxForgot, explanation })
    }

    /// Connection `conn`'s close is being recorded: its explanation, when a takeover diagnosed it.
    pub(super) fn closing(&self, conn: ConnId) -> Option<String> {
        if self.pending.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let mut t = self.table.lock().expect("forgotten lock");
        let found = t.pending.remove(&conn);
        self.pending.store(t.pending.len(), Ordering::Relaxed);
        found
    }

    fn expire(t: &mut Table, now: Instant) {
        while let Some((until, _)) = t.order.front() {
            if *until > now {
                break;
            }
            let (until, id) = t.order.pop_front().expect("front exists");
            // Only the entry this position was written for: a newer one for the same id stays.
            if t.by_id.get(&id).is_some_and(|s| s.until == until) {
                t.by_id.remove(&id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_silence_verdict_then_the_same_address_at_once_is_forgotten() {
        let f = Forgotten::default();
        let t0 = Instant::now();
        let (ip, other): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let silenced = |id: &str, conn, lateness| {
            f.silenced(t0, id, (conn, ip), 5 * S, (CloseReason::HeartbeatTimeout, 15 * S, lateness))
        };
        silenced("a", 1, Some(Duration::ZERO));
        let found = f.welcomed(t0 + S / 2, "a", ip).expect("back at once from the same address");
        assert_eq!((found.conn, found.diagnosis), (1, Diagnosis::MiddleboxForgot));
        assert!(found.explanation.contains("back from the same address 0.5 s later"), "{}", found.explanation);
        assert!(f.welcomed(t0 + S, "a", ip).is_none(), "said once");

        silenced("b", 2, None);
        assert!(f.welcomed(t0 + S, "b", other).is_none(), "another address: not the same path");
        silenced("c", 3, Some(2 * S));
        assert!(f.welcomed(t0 + S, "c", ip).is_none(), "a late verdict: the server was stalled");
        silenced("d", 4, None);
        assert!(f.welcomed(t0 + 6 * S + S / 10, "d", ip).is_none(), "back after an interval and a second");
        f.silenced(t0, "e", (5, ip), 5 * S, (CloseReason::Eof, 15 * S, None));
        assert!(f.welcomed(t0 + S, "e", ip).is_none(), "the client closed it: not silence");
        assert_eq!(f.len.load(Ordering::Relaxed), 0, "every entry expired or taken");
    }

    #[test]
    fn a_takeover_of_a_connection_silent_for_half_an_interval_is_forgotten() {
        let f = Forgotten::default();
        let now = Instant::now();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        assert!(f.taken_over(now, 1, (ip, ip), S, 5 * S).is_none(), "live: mid-heartbeat");
        assert!(f.taken_over(now, 2, (ip, "10.0.0.9".parse().unwrap()), 4 * S, 5 * S).is_none());
        let found = f.taken_over(now, 3, (ip, ip), 3 * S, 5 * S).expect("silent for 3 s of a 5 s interval");
        assert_eq!(found.conn, 3);
        assert_eq!(f.closing(3), Some(found.explanation), "the close record gets the explanation");
        assert_eq!(f.closing(3), None);
    }
}
