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
//! queued `Data` events, with the rule of [`crate::queue`]: when the application falls behind by a whole bound,
//! further events are dropped and counted, never blocking a connection or a verdict, and the application is told
//! with a [`EventKind::Dropped`] event carrying the count.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tether_proto::{CloseReason, ConnId, Undeliverable};

pub use crate::queue::{Events, QUEUED_DATA_BYTES};
use crate::queue::{Queued, Sink};

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
    /// The server concluded why an earlier connection of `client` ended, from what came after: `conn` is that
    /// connection, `peer` the address of the one that revealed it.
    Diagnosis {
        client: String,
        conn: ConnId,
        peer: SocketAddr,
        diagnosis: Diagnosis,
        explanation: String,
    },
    /// The client changed its heartbeat during the session (`heartbeat_update`): it asked for `asked`, and
    /// `heartbeat` and `timeout` (the server's silence deadline) are in effect from now on.
    Heartbeat {
        client: String,
        conn: ConnId,
        peer: SocketAddr,
        asked: Duration,
        heartbeat: Duration,
        timeout: Duration,
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
            EventKind::Diagnosis { .. } => "diagnosis",
            EventKind::Heartbeat { .. } => "heartbeat",
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

/// What the server concluded about why a connection ended, beyond its reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Diagnosis {
    /// The path's middlebox (a NAT or a firewall) forgot the connection: the same client came straight back from
    /// the same address, so the path works, after this connection went silent here (`heartbeat_timeout`,
    /// `keepalive_timeout`, `write_timeout`) or while it was still open here (it gave the connection up first: a
    /// `takeover` by the same device).
    MiddleboxForgot,
}

impl Diagnosis {
    /// The name on the wire of events and the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            Diagnosis::MiddleboxForgot => "middlebox_forgot",
        }
    }

    /// What it means, in a sentence.
    pub fn meaning(self) -> &'static str {
        match self {
            Diagnosis::MiddleboxForgot => "the path's middlebox forgot the connection",
        }
    }
}

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

/// The receiving end of the server's events (see [`crate::Server::events`]): `recv`, `try_recv`, and
/// `blocking_recv` for a thread that is not a runtime thread.
pub type EventStream = Events<ServerEvent>;

/// The sending end: never blocks, counts what it has to drop.
pub(crate) type EventSink = Sink<ServerEvent>;

impl EventSink {
    /// The server's sink: no reserve (every event may be dropped when the application falls behind).
    pub(crate) fn server(queue: EventQueue) -> (EventSink, EventStream) {
        Sink::new(queue, 0)
    }
}

impl Queued for ServerEvent {
    /// Only `Data` events carry a payload.
    fn payload_len(&self) -> usize {
        match &self.kind {
            EventKind::Data { payload, .. } => payload.len(),
            _ => 0,
        }
    }

    fn dropped(count: u64) -> ServerEvent {
        ServerEvent { at: SystemTime::now(), kind: EventKind::Dropped { count } }
    }
}
