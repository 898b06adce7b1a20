//! What the server tells its application, one [`ServerEvent`] per fact.
//!
//! # Layout
//! Events are per connection and emitted the moment the fact is decided: `Online` when a session is admitted,
//! `Offline` when the connection holding an id ends (with the one [`CloseReason`] and, for deadline verdicts, the
//! lateness), `Closed` when a connection ends without taking an id offline (it was taken over, refused, or never
//! said `HELLO`). Presence subscribers get their `PRESENCE` frames from the registry, which applies
//! `presence_grace`; the application's stream does not wait for the grace.
//!
//! The stream is an [`EventStream`]: bounded by default ([`EventQueue`]), in events and in the payload bytes of
//! queued `Data` events. When the application falls behind by a whole bound, further events are dropped and
//! counted, never blocking a connection or a verdict, and the
//! application is told with a [`EventKind::Dropped`] event carrying the count: in place of the first event that
//! finds room again, or when it has read everything queued, whichever comes first.
//! [`EventQueue::Unbounded`] never drops, at the price of memory that grows for as long as nobody reads.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tether_proto::{CloseReason, ConnId, Undeliverable};
use tokio::sync::mpsc;

/// One event, stamped with the wall-clock time it was emitted.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerEvent {
    pub at: SystemTime,
    pub kind: EventKind,
}

#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum EventKind {
    Listening {
        addr: SocketAddr,
        /// Where the admin API listens, when the application recorded one before running the server
        /// ([`crate::ServerHandle::set_admin_addr`]).
        admin: Option<SocketAddr>,
        /// Cluster mode: this node's id.
        node: Option<String>,
    },
    Online {
        client: String,
        conn: ConnId,
        peer: SocketAddr,
        epoch: u64,
        heartbeat: Duration,
        timeout: Duration,
    },
    Offline {
        client: String,
        conn: ConnId,
        peer: SocketAddr,
        reason: CloseReason,
        /// `declared - deadline` for verdicts taken at a deadline (heartbeat, handshake, write timeouts).
        lateness: Option<Duration>,
        /// Time between the last frame received and the verdict.
        silent_for: Duration,
        /// The client ended the connection itself (its `BYE`, FIN or reset): `reason` is then its word (a client's
        /// `BYE(heartbeat_timeout)` means it judged the server silent), not the server's verdict.
        by_peer: bool,
        detail: Option<String>,
    },
    Closed {
        client: Option<String>,
        conn: ConnId,
        peer: SocketAddr,
        reason: CloseReason,
        lateness: Option<Duration>,
        by_peer: bool,
        detail: Option<String>,
    },
    Takeover {
        client: String,
        old_conn: ConnId,
        new_conn: ConnId,
        peer: SocketAddr,
        epoch: u64,
        /// Same instance nonce: the same process reconnected (its old socket was a ghost).
        same_device: bool,
    },
    IdConflict {
        client: String,
        holder_conn: ConnId,
        newcomer_conn: ConnId,
        peer: SocketAddr,
        retry_after: Duration,
    },
    Suspect {
        client: String,
        conn: ConnId,
        peer: SocketAddr,
        silent_for: Duration,
    },
    Recovered {
        client: String,
        conn: ConnId,
        peer: SocketAddr,
    },
    /// `DATA` addressed to the server application.
    Data {
        client: String,
        conn: ConnId,
        payload: Bytes,
    },
    /// A `DATA` from `client` to `to` was not relayed because its payload is larger than the server relays (the
    /// sender was told with `UNDELIVERABLE`). `DATA` to an id that is not online is answered `UNDELIVERABLE` too,
    /// and only counted ([`Stats::undeliverable`]): one sender could otherwise fill the event queue.
    Undeliverable {
        client: String,
        conn: ConnId,
        to: String,
        /// Payload bytes.
        len: usize,
        why: Undeliverable,
    },
    /// The application fell behind: `count` events were dropped since the last one it received (bounded
    /// [`EventQueue`] only).
    Dropped {
        count: u64,
    },
    /// Periodic counters ([`crate::ServerConfig::stats_interval`]).
    Stats(Stats),
    /// Cluster mode: Redis became unreachable (`degraded`: the node serves its own clients only) or answers
    /// again (its sessions are registered again).
    Cluster {
        degraded: bool,
        detail: String,
    },
    /// Cluster mode: this node declared the sessions of a lost node offline (`node_lost`).
    NodeLost {
        node: String,
        sessions: u64,
    },
}

/// The server's counters at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// Connection tasks running (admitted or handshaking).
    pub connections: usize,
    /// Ids with a live session.
    pub online: usize,
    /// Connections whose `HELLO` is not admitted yet, and the most there ever were at once.
    pub handshakes: usize,
    pub peak_handshakes: usize,
    /// Newcomers refused with `busy` / `ip_limit` so far.
    pub refused_busy: u64,
    pub refused_ip_limit: u64,
    /// `DATA` answered `UNDELIVERABLE` so far (target not online, or payload too large to relay).
    pub undeliverable: u64,
    /// Events the application did not receive because it fell behind, so far.
    pub events_dropped: u64,
}

impl EventKind {
    /// The stable snake_case name used in JSON event lines.
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::Listening { .. } => "listening",
            EventKind::Online { .. } => "online",
            EventKind::Offline { .. } => "offline",
            EventKind::Closed { .. } => "closed",
            EventKind::Takeover { .. } => "takeover",
            EventKind::IdConflict { .. } => "id_conflict",
            EventKind::Suspect { .. } => "suspect",
            EventKind::Recovered { .. } => "recovered",
            EventKind::Data { .. } => "data",
            EventKind::Undeliverable { .. } => "undeliverable",
            EventKind::Dropped { .. } => "dropped",
            EventKind::Stats(_) => "stats",
            EventKind::Cluster { .. } => "cluster",
            EventKind::NodeLost { .. } => "node_lost",
        }
    }
}

/// Payload bytes of `Data` events that may wait for the application in a bounded queue (16 MiB): with
/// 64 KiB payloads, a full queue of events would otherwise hold a gigabyte.
pub const QUEUED_DATA_BYTES: usize = 16 << 20;

/// How the server's event stream is buffered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventQueue {
    /// At most this many events, and [`QUEUED_DATA_BYTES`] of `Data` payload, wait for the application; beyond
    /// that, events are dropped, counted, and reported with [`EventKind::Dropped`]. Memory stays bounded and
    /// nothing the server does ever waits for the reader.
    Bounded(usize),
    /// Every event is kept until read: nothing is lost, but an application that stops reading grows the
    /// server's memory without limit.
    Unbounded,
}

impl Default for EventQueue {
    /// 16,384 events: more than the default connection limit going offline at once; about 4 MiB at worst, plus
    /// the `Data` payloads (at most [`QUEUED_DATA_BYTES`]).
    fn default() -> Self {
        EventQueue::Bounded(16_384)
    }
}

/// The receiving end of the server's events (see [`crate::Server::events`]).
pub struct EventStream {
    rx: Rx,
    /// Payload bytes of the `Data` events queued (bounded queue only), shared with the sink.
    data_bytes: Arc<AtomicUsize>,
    /// The sink's count of events dropped and not reported yet: when the queue runs empty, the stream reports
    /// them itself, so a reader that catches up learns of the gap even if the server has nothing more to say.
    unreported: Arc<AtomicU64>,
}

enum Rx {
    Bounded(mpsc::Receiver<ServerEvent>),
    Unbounded(mpsc::UnboundedReceiver<ServerEvent>),
}

impl EventStream {
    /// The next event; `None` once the server has stopped and everything was read.
    pub async fn recv(&mut self) -> Option<ServerEvent> {
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
    pub fn try_recv(&mut self) -> Option<ServerEvent> {
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
    pub fn blocking_recv(&mut self) -> Option<ServerEvent> {
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
    fn taken(&self, ev: ServerEvent) -> ServerEvent {
        if let (Rx::Bounded(_), EventKind::Data { payload, .. }) = (&self.rx, &ev.kind) {
            self.data_bytes.fetch_sub(payload.len(), Ordering::AcqRel);
        }
        ev
    }

    /// A `Dropped` event for what was dropped and not reported yet, if anything.
    fn gap(&self) -> Option<ServerEvent> {
        let count = self.unreported.swap(0, Ordering::AcqRel);
        (count > 0).then(|| ServerEvent { at: SystemTime::now(), kind: EventKind::Dropped { count } })
    }
}

/// The sending end: never blocks, counts what it has to drop.
pub(crate) struct EventSink {
    tx: Tx,
    /// Dropped since the last `Dropped` event that got through (shared with the stream).
    unreported: Arc<AtomicU64>,
    /// Dropped since the start.
    total_dropped: AtomicU64,
    /// Payload bytes of the `Data` events queued (shared with the stream), against [`QUEUED_DATA_BYTES`].
    data_bytes: Arc<AtomicUsize>,
}

enum Tx {
    Bounded(mpsc::Sender<ServerEvent>),
    Unbounded(mpsc::UnboundedSender<ServerEvent>),
}

impl EventSink {
    pub(crate) fn new(queue: EventQueue) -> (EventSink, EventStream) {
        let (tx, rx) = match queue {
            EventQueue::Bounded(n) => {
                let (tx, rx) = mpsc::channel(n.max(1));
                (Tx::Bounded(tx), Rx::Bounded(rx))
            }
            EventQueue::Unbounded => {
                let (tx, rx) = mpsc::unbounded_channel();
                (Tx::Unbounded(tx), Rx::Unbounded(rx))
            }
        };
        let unreported = Arc::new(AtomicU64::new(0));
        let data_bytes = Arc::new(AtomicUsize::new(0));
        let sink = EventSink {
            tx,
            unreported: unreported.clone(),
            total_dropped: AtomicU64::new(0),
            data_bytes: data_bytes.clone(),
        };
        (sink, EventStream { rx, unreported, data_bytes })
    }

    /// Queue `kind` for the application, or count it as dropped when the bounded queue is full. Returns false
    /// when it was dropped for that reason. The first event that fits after a gap is preceded by `Dropped`.
    pub(crate) fn emit(&self, ev: ServerEvent) -> bool {
        let tx = match &self.tx {
            Tx::Unbounded(tx) => {
                let _ = tx.send(ev);
                return true;
            }
            Tx::Bounded(tx) => tx,
        };
        // A load first: the swap (a read-modify-write every emitter would contend on) only after a drop.
        let gap = match self.unreported.load(Ordering::Acquire) {
            0 => 0,
            _ => self.unreported.swap(0, Ordering::AcqRel),
        };
        if gap > 0 {
            let dropped = ServerEvent { at: ev.at, kind: EventKind::Dropped { count: gap } };
            match tx.try_send(dropped) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.unreported.fetch_add(gap + 1, Ordering::AcqRel);
                    self.total_dropped.fetch_add(1, Ordering::Relaxed);
                    return false;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return true,
            }
        }
        let len = match &ev.kind {
            EventKind::Data { payload, .. } => payload.len(),
            _ => 0,
        };
        if len > 0 && self.data_bytes.fetch_add(len, Ordering::AcqRel) + len > QUEUED_DATA_BYTES {
            self.data_bytes.fetch_sub(len, Ordering::AcqRel);
            return self.dropped_one();
        }
        match tx.try_send(ev) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.data_bytes.fetch_sub(len, Ordering::AcqRel);
                self.dropped_one()
            }
        }
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
