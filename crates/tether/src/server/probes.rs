//! Operators' round-trip probes in flight ([`crate::ServerHandle::probe`]), and what a probed session left behind
//! when it closed during the wait.
//!
//! # Layout
//! [`Probes`] counts the probes waiting (the one thing a connection's hot path reads: a round trip wakes them only
//! while there are any), and keeps a slot per probed connection. A probed connection that closes before its
//! `PONG` fills its slot with how the session ended and the kernel's view of its socket at that moment, read
//! just before the socket is let go, then wakes the probes. So a probe longer than the session's own heartbeat
//! timeout still judges the client by the socket its `PING` went out on, not by its absence.
//!
//! # Rules
//! A leaf. Its lock is taken alone, for a map operation; the kernel's view is read before it is taken.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use tether_proto::ConnId;
use tokio::sync::futures::Notified;
use tokio::sync::Notify;

use crate::ops::{KernelView, ProbeEnded};

/// Probes waiting now, and the probed connections' slots.
#[derive(Default)]
pub(super) struct Probes {
    /// How many probes wait: a connection reads only this on its round trips and its close.
    waiting: AtomicUsize,
    /// Woken at every round trip, and when a probed connection closes, while any probe waits.
    done: Notify,
    /// The connections probed now. An entry lives while a probe of it waits.
    slots: Mutex<HashMap<ConnId, Slot>>,
}

#[derive(Default)]
struct Slot {
    /// Probes of this connection waiting (an operator may start two at once).
    probes: usize,
    /// Set when the session closed during the wait.
    end: Option<End>,
}

/// How a probed session ended during the wait, and the kernel's view of its socket at that moment.
#[derive(Debug, Clone, Copy)]
pub(super) struct End {
    pub(super) ended: ProbeEnded,
    pub(super) kernel: Option<KernelView>,
}

impl Probes {
    /// A probe of `conn` starts waiting.
    pub(super) fn begin(&self, conn: ConnId) {
        self.waiting.fetch_add(1, Ordering::AcqRel);
        self.slots.lock().expect("probes lock").entry(conn).or_default().probes += 1;
    }

    /// A probe of `conn` stops waiting: how the session ended, if it closed meanwhile.
    pub(super) fn finish(&self, conn: ConnId) -> Option<End> {
        let mut slots = self.slots.lock().expect("probes lock");
        let end = slots.get_mut(&conn).and_then(|slot| {
            slot.probes -= 1;
            slot.end
        });
        if slots.get(&conn).is_some_and(|slot| slot.probes == 0) {
            slots.remove(&conn);
        }
        drop(slots);
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        end
    }

    /// Whether any probe waits (one atomic load: the connections' fast path).
    pub(super) fn waiting(&self) -> bool {
        self.waiting.load(Ordering::Acquire) > 0
    }

    /// A wake-up for the next round trip or probed close; take it before checking, then await it.
    pub(super) fn notified(&self) -> Notified<'_> {
        self.done.notified()
    }

    /// A round trip was measured: wake the probes (they check whether it was theirs).
    pub(super) fn round_trip(&self) {
        if self.waiting() {
            self.done.notify_waiters();
        }
    }

    /// Whether a probe waits on `conn` (checked before reading the kernel's view for it).
    pub(super) fn watches(&self, conn: ConnId) -> bool {
        self.waiting() && self.slots.lock().expect("probes lock").contains_key(&conn)
    }

    /// `conn` closed during a probe: keep how, and the kernel's view read just before, then wake the probes.
    pub(super) fn closed(&self, conn: ConnId, end: End) {
        if let Some(slot) = self.slots.lock().expect("probes lock").get_mut(&conn) {
            slot.end = Some(end);
        }
        self.done.notify_waiters();
    }

    /// Whether `conn` closed during its probe.
    pub(super) fn has_ended(&self, conn: ConnId) -> bool {
        self.slots.lock().expect("probes lock").get(&conn).is_some_and(|s| s.end.is_some())
    }
}
