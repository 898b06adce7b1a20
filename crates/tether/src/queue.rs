//! The bounded queue between tether and an application: the server's [`crate::EventStream`], the client's
//! [`crate::ClientEvent`]s and the reconnecting client's [`crate::LinkEvent`]s all go through one.
//!
//! # The rule
//! A queue holds at most a number of events ([`EventQueue::Bounded`]) and [`QUEUED_DATA_BYTES`] of payload. The
//! sending side never waits for the reader: when the application has fallen behind by a whole bound, further
//! events are dropped and counted, and the application is told with a `Dropped { count }` event, in place of the
//! first event that finds room again, or when it has read everything queued, whichever comes first.
//!
//! A few events must not be lost to a slow reader (a client's `Disconnected`, a reliable message the client has
//! already acknowledged): a sink made with a `reserve` keeps that many places beyond the bound for them
//! ([`Sink::emit_kept`]). A client tests for room before it takes a reliable message ([`Sink::has_room`]), and
//! when there is none it ends the connection instead, so that the session's resume brings the message again.
//!
//! [`EventQueue::Unbounded`] never drops, at the price of memory that grows for as long as nobody reads.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, Notify};

use crate::event::EventQueue;

/// Payload bytes of events that may wait for the application in a bounded queue (16 MiB): with 64 KiB payloads,
/// a full queue of events would otherwise hold a gigabyte.
pub const QUEUED_DATA_BYTES: usize = 16 << 20;

/// The largest bound a queue takes (a larger one is this).
const MAX_BOUND: usize = 1 << 30;

/// Payload bytes of the events queued (bounded queue only), shared by the sinks and the receiver, and a wake-up
/// for a sink waiting for them to drain ([`Sink::drained`]).
#[derive(Default)]
struct Payload {
    bytes: AtomicUsize,
    draining: AtomicBool,
    drained: Notify,
}

/// An event a queue carries.
pub trait Queued: Send + 'static {
    /// Payload bytes it holds, counted against [`QUEUED_DATA_BYTES`].
    fn payload_len(&self) -> usize;
    /// The event that tells the application `count` events were dropped.
    fn dropped(count: u64) -> Self;
}

/// The receiving end: the application's.
pub struct Events<T> {
    rx: Rx<T>,
    payload: Arc<Payload>,
    /// The sink's count of events dropped and not reported yet: when the queue runs empty, the receiver reports
    /// them itself, so a reader that catches up learns of the gap even if nothing more is said.
    unreported: Arc<AtomicU64>,
}

enum Rx<T> {
    Bounded(mpsc::Receiver<T>),
    Unbounded(mpsc::UnboundedReceiver<T>),
}

impl<T: Queued> Events<T> {
    /// The next event; `None` once every sink is gone and everything was read.
    pub async fn recv(&mut self) -> Option<T> {
        if let Some(ev) = self.try_recv() {
            return Some(ev);
        }
        let ev = match &mut self.rx {
            Rx::Bounded(rx) => rx.recv().await,
            Rx::Unbounded(rx) => rx.recv().await,
        };
        ev.map(|ev| self.taken(ev))
    }

    /// The next event if one is waiting (or the count of dropped events, once the queue has run empty).
    pub fn try_recv(&mut self) -> Option<T> {
        let queued = match &mut self.rx {
            Rx::Bounded(rx) => rx.try_recv().ok(),
            Rx::Unbounded(rx) => rx.try_recv().ok(),
        };
        match queued {
            Some(ev) => Some(self.taken(ev)),
            None => self.gap(),
        }
    }

    /// Wait for the next event on a thread that is not a runtime thread (e.g. a thread that writes events to a
    /// pipe and may block there).
    pub fn blocking_recv(&mut self) -> Option<T> {
        if let Some(ev) = self.try_recv() {
            return Some(ev);
        }
        let ev = match &mut self.rx {
            Rx::Bounded(rx) => rx.blocking_recv(),
            Rx::Unbounded(rx) => rx.blocking_recv(),
        };
        ev.map(|ev| self.taken(ev))
    }

    /// `ev` left the queue: its payload no longer counts against the byte bound.
    fn taken(&self, ev: T) -> T {
        let len = ev.payload_len();
        if len > 0 && matches!(self.rx, Rx::Bounded(_)) {
            self.payload.bytes.fetch_sub(len, Ordering::SeqCst);
            if self.payload.draining.load(Ordering::SeqCst) {
                self.payload.drained.notify_waiters();
            }
        }
        ev
    }

    /// A `Dropped` event for what was dropped and not reported yet, if anything.
    fn gap(&self) -> Option<T> {
        let count = self.unreported.swap(0, Ordering::AcqRel);
        (count > 0).then(|| T::dropped(count))
    }
}

/// The sending end: never blocks, counts what it has to drop. Clones feed the same queue.
pub(crate) struct Sink<T> {
    tx: Tx<T>,
    /// Places beyond the bound kept for [`Sink::emit_kept`].
    reserve: usize,
    /// Dropped since the last `Dropped` event that got through (shared with the receiver).
    unreported: Arc<AtomicU64>,
    /// Dropped since the start.
    total_dropped: Arc<AtomicU64>,
    /// Payload bytes of the events queued (shared with the receiver), against [`QUEUED_DATA_BYTES`].
    payload: Arc<Payload>,
}

impl<T> Clone for Sink<T> {
    fn clone(&self) -> Self {
        Sink {
            tx: match &self.tx {
                Tx::Bounded(tx) => Tx::Bounded(tx.clone()),
                Tx::Unbounded(tx) => Tx::Unbounded(tx.clone()),
            },
            reserve: self.reserve,
            unreported: self.unreported.clone(),
            total_dropped: self.total_dropped.clone(),
            payload: self.payload.clone(),
        }
    }
}

enum Tx<T> {
    Bounded(mpsc::Sender<T>),
    Unbounded(mpsc::UnboundedSender<T>),
}

impl<T: Queued> Sink<T> {
    /// A queue of `queue`'s bound, plus `reserve` places for events that must not be dropped.
    pub(crate) fn new(queue: EventQueue, reserve: usize) -> (Sink<T>, Events<T>) {
        let (tx, rx) = match queue {
            EventQueue::Bounded(n) => {
                let (tx, rx) = mpsc::channel(n.clamp(1, MAX_BOUND) + reserve);
                (Tx::Bounded(tx), Rx::Bounded(rx))
            }
            EventQueue::Unbounded => {
                let (tx, rx) = mpsc::unbounded_channel();
                (Tx::Unbounded(tx), Rx::Unbounded(rx))
            }
        };
        let unreported = Arc::new(AtomicU64::new(0));
        let payload = Arc::new(Payload::default());
        let sink = Sink {
            tx,
            reserve,
            unreported: unreported.clone(),
            total_dropped: Arc::new(AtomicU64::new(0)),
            payload: payload.clone(),
        };
        (sink, Events { rx, unreported, payload })
    }

    /// Queue `ev` for the application, or count it as dropped when the bounded queue is full. Returns false
    /// when it was dropped for that reason. The first event that fits after a gap is preceded by `Dropped`.
    pub(crate) fn emit(&self, ev: T) -> bool {
        let tx = match &self.tx {
            Tx::Unbounded(tx) => {
                let _ = tx.send(ev);
                return true;
            }
            Tx::Bounded(tx) => tx,
        };
        if self.reserve > 0 && tx.capacity() <= self.reserve {
            return self.dropped_one();
        }
        // A load first: the swap (a read-modify-write every emitter would contend on) only after a drop.
        let gap = match self.unreported.load(Ordering::Acquire) {
            0 => 0,
            _ => self.unreported.swap(0, Ordering::AcqRel),
        };
        if gap > 0 {
            match tx.try_send(T::dropped(gap)) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.unreported.fetch_add(gap + 1, Ordering::AcqRel);
                    self.total_dropped.fetch_add(1, Ordering::Relaxed);
                    return false;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return true,
            }
        }
        let len = ev.payload_len();
        if len > 0 && self.payload.bytes.fetch_add(len, Ordering::AcqRel) + len > QUEUED_DATA_BYTES {
            self.payload.bytes.fetch_sub(len, Ordering::AcqRel);
            return self.dropped_one();
        }
        match tx.try_send(ev) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.payload.bytes.fetch_sub(len, Ordering::AcqRel);
                self.dropped_one()
            }
        }
    }

    /// Whether an event with `len` payload bytes fits within the bound now (always, unbounded), behind `ahead`
    /// events of `ahead_bytes` that are on their way to the queue.
    pub(crate) fn has_room(&self, len: usize, ahead: usize, ahead_bytes: usize) -> bool {
        match &self.tx {
            Tx::Unbounded(_) => true,
            Tx::Bounded(tx) => {
                tx.capacity() > self.reserve + ahead
                    && self.payload.bytes.load(Ordering::Acquire) + ahead_bytes + len <= QUEUED_DATA_BYTES
            }
        }
    }

    /// [`emit_kept`](Self::emit_kept) or [`emit`](Self::emit).
    pub(crate) fn put(&self, ev: T, kept: bool) -> bool {
        match kept {
            true => self.emit_kept(ev),
            false => self.emit(ev),
        }
    }

    /// Queue an event that must not be dropped: into the reserve when the bound is reached (its payload counts,
    /// but is not refused). Only when the reserve too is used up (an application that stopped reading for that
    /// many such events) is it dropped and counted.
    pub(crate) fn emit_kept(&self, ev: T) -> bool {
        let Tx::Bounded(tx) = &self.tx else {
            return self.emit(ev);
        };
        // What was dropped before it is reported before it (it may be the last event).
        let gap = match self.unreported.load(Ordering::Acquire) {
            0 => 0,
            _ => self.unreported.swap(0, Ordering::AcqRel),
        };
        if gap > 0 && tx.try_send(T::dropped(gap)).is_err() {
            self.unreported.fetch_add(gap, Ordering::AcqRel);
        }
        let len = ev.payload_len();
        self.payload.bytes.fetch_add(len, Ordering::AcqRel);
        match tx.try_send(ev) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.payload.bytes.fetch_sub(len, Ordering::AcqRel);
                self.dropped_one()
            }
        }
    }

    /// Wait until at most half the bound is in use (at once when unbounded): an application that fell behind has
    /// caught up enough to be sent more.
    pub(crate) async fn drained(&self) {
        let Tx::Bounded(tx) = &self.tx else { return };
        let bound = tx.max_capacity() - self.reserve;
        let _ = tx.reserve_many(self.reserve + bound.div_ceil(2)).await;
        // And half the payload bytes: a queue full of large messages has room in count long before.
        self.payload.draining.store(true, Ordering::SeqCst);
        loop {
            let notified = self.payload.drained.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.payload.bytes.load(Ordering::SeqCst) <= QUEUED_DATA_BYTES / 2 {
                break;
            }
            notified.await;
        }
        self.payload.draining.store(false, Ordering::SeqCst);
    }

    /// Count an event dropped before it reached the queue.
    pub(crate) fn count_dropped(&self) {
        self.dropped_one();
    }

    /// Count one dropped event; always false (for [`emit`](Self::emit) to return).
    fn dropped_one(&self) -> bool {
        self.unreported.fetch_add(1, Ordering::AcqRel);
        self.total_dropped.fetch_add(1, Ordering::Relaxed);
        false
    }

    /// Events dropped since the start.
    pub(crate) fn dropped(&self) -> u64 {
        self.total_dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    enum Ev {
        Data(usize),
        Kept,
        Dropped(u64),
    }

    impl Queued for Ev {
        fn payload_len(&self) -> usize {
            match self {
                Ev::Data(n) => *n,
                _ => 0,
            }
        }
        fn dropped(count: u64) -> Ev {
            Ev::Dropped(count)
        }
    }

    #[test]
    fn a_reader_that_stops_loses_counted_events_and_the_kept_ones_use_the_reserve() {
        let (sink, mut events) = Sink::<Ev>::new(EventQueue::Bounded(4), 2);
        for _ in 0..10 {
            sink.emit(Ev::Data(1));
        }
        // Four fit; six are dropped and counted. The reserve is not for them.
        assert!(!sink.has_room(0, 0, 0));
        assert_eq!(sink.dropped(), 6);
        // A kept event goes into the reserve, after the count of what was dropped before it.
        assert!(sink.emit_kept(Ev::Kept));
        // Beyond the reserve even a kept event is dropped (an application that stopped reading for that long).
        assert!(!sink.emit_kept(Ev::Kept));
        assert_eq!(sink.dropped(), 7);
        let got: Vec<Ev> = std::iter::from_fn(|| events.try_recv()).collect();
        assert_eq!(got, [Ev::Data(1), Ev::Data(1), Ev::Data(1), Ev::Data(1), Ev::Dropped(6), Ev::Kept, Ev::Dropped(1)]);
        // Read up: the next event that fits is not preceded by a gap already reported.
        assert!(sink.has_room(0, 0, 0));
        assert!(sink.emit(Ev::Data(1)));
        assert_eq!(events.try_recv(), Some(Ev::Data(1)));
        assert_eq!(events.try_recv(), None);
    }

    #[test]
    fn payload_bytes_are_bounded_too_and_freed_as_they_are_read() {
        let (sink, mut events) = Sink::<Ev>::new(EventQueue::Bounded(100), 0);
        assert!(sink.emit(Ev::Data(QUEUED_DATA_BYTES - 10)));
        assert!(!sink.has_room(11, 0, 0));
        assert!(!sink.emit(Ev::Data(11)));
        // The gap is reported before the next event that fits.
        assert!(sink.emit(Ev::Data(10)));
        assert_eq!(events.try_recv(), Some(Ev::Data(QUEUED_DATA_BYTES - 10)));
        assert!(sink.has_room(QUEUED_DATA_BYTES - 10, 0, 0));
        assert!(sink.emit(Ev::Data(1)));
        let got: Vec<Ev> = std::iter::from_fn(|| events.try_recv()).collect();
        assert_eq!(got, [Ev::Dropped(1), Ev::Data(10), Ev::Data(1)]);
    }

    #[tokio::test]
    async fn drained_waits_for_half_the_count_and_half_the_bytes() {
        let (sink, mut events) = Sink::<Ev>::new(EventQueue::Bounded(100), 4);
        // Two large events: a full queue by bytes, though nearly empty by count.
        assert!(sink.emit(Ev::Data(QUEUED_DATA_BYTES / 2)));
        assert!(sink.emit(Ev::Data(QUEUED_DATA_BYTES / 2)));
        let waiting = {
            let sink = sink.clone();
            tokio::spawn(async move { sink.drained().await })
        };
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!waiting.is_finished(), "drained while the payload bytes are at the bound");
        assert_eq!(events.try_recv(), Some(Ev::Data(QUEUED_DATA_BYTES / 2)));
        tokio::time::timeout(std::time::Duration::from_secs(10), waiting)
            .await
            .expect("drained once half the bytes were read")
            .unwrap();
    }
}
