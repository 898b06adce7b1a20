//! One event loop's deadlines: a min-heap of (deadline, slot), at most one live entry per connection.
//!
//! # Layout
//! [`Timers`] holds the heap; each connection's entry remembers the deadline it has in the heap ([`Armed`]).
//! A connection's deadline moves with nearly every frame (the silence deadline follows the last one received), so
//! the heap is not touched when a deadline moves *later*: when the old entry reaches the top of the heap, the
//! loop sees the connection's deadline has moved and re-arms it there (`evloop::next_wakeup`), without waking for
//! it. Only a deadline that moves *earlier* pushes a second entry; the old one is then stale (its time is no
//! longer the one its connection holds) and is dropped when it comes up. So the heap holds about one entry per
//! connection, a heartbeat costs at most one pop and one push per interval, and no deadline is ever late:
//! whatever is armed fires no later than the connection's earliest deadline. Nothing scans the connections.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

/// The deadline a connection has in the heap, if any (kept in its slab entry): a [`Tick`] of its loop's
/// timers, 0 for none. Eight bytes rather than an `Option<Instant>`'s sixteen, on every connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Armed(Tick);

/// An instant as nanoseconds after the timers' origin, plus one (so that 0 is free for "none"): exact, and half
/// an `Instant`'s size in the heap and in every slab entry.
type Tick = u64;

pub(crate) struct Timers {
    origin: Instant,
    heap: BinaryHeap<Reverse<(Tick, u32)>>,
}

impl Default for Timers {
    fn default() -> Self {
        Timers { origin: Instant::now(), heap: BinaryHeap::new() }
    }
}

impl Timers {
    /// `t` as a tick; an instant before the origin (already past when the loop began) counts as the origin.
    fn tick(&self, t: Instant) -> Tick {
        let ns = t.saturating_duration_since(self.origin).as_nanos();
        u64::try_from(ns).unwrap_or(u64::MAX - 1).min(u64::MAX - 1) + 1
    }

    fn instant(&self, tick: Tick) -> Instant {
        self.origin + Duration::from_nanos(tick - 1)
    }

    /// Make sure slot `key` is visited no later than `deadline`.
    pub(crate) fn arm(&mut self, key: usize, armed: &mut Armed, deadline: Option<Instant>) {
        let Some(d) = deadline else { return };
        let d = self.tick(d);
        if armed.0 != 0 && armed.0 <= d {
            return;
        }
        *armed = Armed(d);
        self.heap.push(Reverse((d, key as u32)));
    }

    /// Forget what a slot has armed: its entry in the heap is stale from now on.
    pub(crate) fn disarm(armed: &mut Armed) {
        *armed = Armed(0);
    }

    /// Whether `armed` is the live entry for time `t` (as [`peek`](Self::peek) or [`pop_due`](Self::pop_due)
    /// gave it), rather than a stale one.
    pub(crate) fn holds(&self, armed: Armed, t: Instant) -> bool {
        armed.0 != 0 && armed.0 == self.tick(t)
    }

    /// The earliest entry: its slot and the time it was armed for.
    pub(crate) fn peek(&self) -> Option<(usize, Instant)> {
        self.heap.peek().map(|Reverse((t, key))| (*key as usize, self.instant(*t)))
    }

    /// Drop the earliest entry.
    pub(crate) fn pop(&mut self) {
        self.heap.pop();
    }

    /// Take one entry due at `now`: its slot and the time it was armed for. The caller checks the slot still
    /// holds that time ([`fire`](Self::fire)): otherwise the entry is stale.
    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<(usize, Instant)> {
        let Reverse((t, key)) = *self.heap.peek()?;
        if t > self.tick(now) {
            return None;
        }
        self.heap.pop();
        Some((key as usize, self.instant(t)))
    }

    /// A due entry for time `t` came up for a slot holding `armed`: true (and the slot disarmed) if it is the
    /// slot's live entry, false if stale.
    pub(crate) fn fire(&self, armed: &mut Armed, t: Instant) -> bool {
        let live = self.holds(*armed, t);
        if live {
            Self::disarm(armed);
        }
        live
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.heap.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_later_deadline_waits_for_the_armed_one_and_an_earlier_one_supersedes_it() {
        let t0 = Instant::now();
        let s = |n| t0 + Duration::from_secs(n);
        let mut timers = Timers::default();
        let (mut a, mut b) = (Armed::default(), Armed::default());
        timers.arm(0, &mut a, Some(s(10)));
        timers.arm(0, &mut a, Some(s(15))); // later: nothing pushed
        timers.arm(1, &mut b, Some(s(12)));
        timers.arm(1, &mut b, Some(s(5))); // earlier: pushed, the 12 s entry goes stale
        timers.arm(1, &mut b, None); // no deadline: what is armed stays
        assert_eq!(timers.len(), 3);
        assert_eq!(timers.peek(), Some((1, s(5))));
        assert_eq!(timers.pop_due(s(4)), None);
        assert_eq!(timers.pop_due(s(5)), Some((1, s(5))));
        assert!(timers.fire(&mut b, s(5)));
        assert_eq!(b, Armed::default());
        assert_eq!(timers.pop_due(s(11)), Some((0, s(10))));
        assert!(timers.fire(&mut a, s(10)));
        // Slot 1 re-armed after its visit; its old 12 s entry is stale when it comes up.
        timers.arm(1, &mut b, Some(s(20)));
        assert_eq!(timers.pop_due(s(12)), Some((1, s(12))));
        assert!(!timers.fire(&mut b, s(12)));
        assert!(timers.holds(b, s(20)));
        assert_eq!(timers.pop_due(s(19)), None);
        assert_eq!(timers.pop_due(s(20)), Some((1, s(20))));
        assert!(timers.fire(&mut b, s(20)));
        assert_eq!(timers.len(), 0);
    }
}
