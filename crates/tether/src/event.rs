//! What the server tells its application, one [`ServerEvent`] per fact.
//!
//! # Layout
//! Events are per connection and emitted the moment the fact is decided: `Online` when a session is admitted,
//! `Offline` when the connection holding an id ends (with the one [`CloseReason`] and, for deadline verdicts, the
//! lateness), `Closed` when a connection ends without taking an id offline (it was taken over, refused, or never
//! said `HELLO`). Presence subscribers get their `PRESENCE` frames from the registry, which applies
//! `presence_grace`; the application's stream does not wait for the grace.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tether_proto::{CloseReason, ConnId};

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
        detail: Option<String>,
    },
    Closed {
        client: Option<String>,
        conn: ConnId,
        peer: SocketAddr,
        reason: CloseReason,
        lateness: Option<Duration>,
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
        }
    }
}
