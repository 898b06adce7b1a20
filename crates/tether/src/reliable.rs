//! The client's side of the `reliable` extension: a [`ReliableLink`] keeps one reliable session's state across
//! connections (its token, the last message received, and what it sent that the server has not acknowledged),
//! so that [`crate::Client`] and [`crate::ReconnectingClient`] resume where the last connection stopped.
//!
//! # Layout
//! - [`ReliableLink`]: a cheap handle (clone it into every [`crate::ClientConfig`] of one session) around the
//!   state; [`ReliableLink::send`] keeps a message in the bounded outbox and wakes the connection that sends it.
//! - What a connection's task does with it (crate-internal): the offer for `HELLO`, the grant from `WELCOME`
//!   (continue, or start afresh and report the old outbox as of unknown fate), sequence numbers received,
//!   acknowledgements, and pulling the outbox's unsent messages onto the wire.
//!
//! # Rules
//! The outbox is bounded ([`ReliableConfig::window`]): a full outbox refuses a message ([`SendError::Full`]), it
//! never drops one. The state's lock is held for bookkeeping only, never across IO or an `.await`. The sequence,
//! acknowledgement and resume rules are `tether_proto::reliable`'s; this module only carries them out.

use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use tether_proto::reliable::{AckError, Grant, Limits, Offer, Outbox, Resume, Token};
use tether_proto::Frame;

/// Settings of a reliable session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReliableConfig {
    /// Ask the server for delivery receipts ([`crate::ClientEvent::Delivered`]).
    pub receipts: bool,
    /// Messages (and their payload bytes) sent but not yet acknowledged by the server, at most; beyond it a send
    /// is refused with [`SendError::Full`] until acknowledgements make room.
    pub window: Limits,
}

impl Default for ReliableConfig {
    fn default() -> Self {
        ReliableConfig { receipts: true, window: Limits { messages: 10_000, bytes: 4 << 20 } }
    }
}

/// Why [`ReliableLink::send`] refused a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("{0}: wait for acknowledgements")]
    Full(tether_proto::reliable::Full),
}

/// A message this client sent whose fate is unknown: the server could not resume the session, so it may or may
/// not have been delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InDoubt {
    pub seq: u64,
    /// The target id (empty: the server application).
    pub to: String,
    pub payload: Bytes,
}

/// One reliable session's state, shared by the connections that carry it in turn.
#[derive(Clone)]
pub struct ReliableLink {
    inner: Arc<Mutex<State>>,
}

impl PartialEq for ReliableLink {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

impl std::fmt::Debug for ReliableLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.state();
        write!(f, "ReliableLink(received {}, unacknowledged {})", st.received, st.out.len())
    }
}

struct State {
    cfg: ReliableConfig,
    /// The session's token, once a server granted one.
    token: Option<Token>,
    /// The last sequence number of the server's stream taken in order.
    received: u64,
    /// Sent and not yet acknowledged, and not yet sent: `(to, payload)`.
    out: Outbox<(String, Bytes)>,
    /// The last grant, for the application to read.
    grant: Option<Grant>,
    /// The connection carrying the session has taken the grant and sends from the outbox.
    live: bool,
    /// The connection's task, to wake when the outbox has something to send.
    waker: Option<Waker>,
    pull: bool,
}

impl ReliableLink {
    pub fn new(cfg: ReliableConfig) -> ReliableLink {
        let st = State {
            cfg,
            token: None,
            received: 0,
            out: Outbox::default(),
            grant: None,
            live: false,
            waker: None,
            pull: false,
        };
        ReliableLink { inner: Arc::new(Mutex::new(st)) }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Keep a message for `to` (empty: the server application) and have the connection send it (now, or after the
    /// next resume). Returns its sequence number, which receipts and reports name.
    pub fn send(&self, to: &str, payload: Bytes) -> Result<u64, SendError> {
        let mut st = self.state();
        let size = payload.len() + to.len();
        let limits = st.cfg.window;
        let seq = st.out.push((to.to_owned(), payload), size, limits).map_err(SendError::Full)?;
        st.wake();
        Ok(seq)
    }

    /// The last grant: whether the session continued, and what was lost if not.
    pub fn grant(&self) -> Option<Grant> {
        self.state().grant
    }

    /// Messages sent and not yet acknowledged by the server (sent or waiting to be).
    pub fn unacknowledged(&self) -> usize {
        self.state().out.len()
    }

    /// The last sequence number received from the server.
    pub fn received(&self) -> u64 {
        self.state().received
    }

    /// The `HELLO` extension: a resume when a server granted a session before.
    pub(crate) fn offer(&self) -> tether_proto::Extension {
        let st = self.state();
        let resume = st.token.map(|token| Resume { token, received: st.received });
        Offer { receipts: st.cfg.receipts, resume }.to_extension()
    }

    /// The server's `WELCOME` (its grant, or `None`: the extension is not in effect on this connection). A stream
    /// that continues resends what the server has not; one that does not starts afresh (or, not granted, does
    /// not start), and what the outbox held is returned as of unknown fate. Returns the messages the resume showed delivered (by sequence) and
    /// the messages in doubt.
    pub(crate) fn welcome(&self, grant: Option<Grant>) -> (u64, Vec<InDoubt>) {
        let mut st = self.state();
        st.live = false;
        st.grant = grant;
        let Some(g) = grant else {
            // The server does not grant the extension: the session cannot continue, and what it holds is not sent
            // on this connection.
            st.token = None;
            st.received = 0;
            return (0, take_in_doubt(&mut st.out));
        };
        st.token = Some(g.token);
        st.live = true;
        st.pull = true;
        if g.continues() {
            match st.out.resume(g.received) {
                Ok(released) => return (released.last().map_or(0, |(s, _)| *s), Vec::new()),
                // The server claims messages never sent: continuity cannot be trusted, start afresh.
                Err(e) => tracing::warn!("reliable resume: {e}; starting afresh"),
            }
        }
        st.received = 0;
        (0, take_in_doubt(&mut st.out))
    }

    /// The connection ended: sends wait in the outbox for the next one.
    pub(crate) fn detach(&self) {
        let mut st = self.state();
        st.live = false;
        st.waker = None;
    }

    /// A sequenced frame from the server was taken.
    pub(crate) fn received_seq(&self, seq: u64) {
        let mut st = self.state();
        st.received = st.received.max(seq);
    }

    /// The server acknowledged up to `seq`: how many messages that released.
    pub(crate) fn acked(&self, seq: u64) -> Result<usize, AckError> {
        self.state().out.ack(seq).map(|r| r.len())
    }

    /// Register the connection's task; true when the outbox has something for it to send.
    pub(crate) fn poll_pull(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut st = self.state();
        if st.live && std::mem::take(&mut st.pull) {
            return Poll::Ready(());
        }
        if !st.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            st.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    /// Up to `budget` bytes of unsent messages as `SDATA` frames, and whether more wait.
    pub(crate) fn next_frames(&self, budget: usize) -> (Vec<Frame>, bool) {
        let mut st = self.state();
        if !st.live {
            return (Vec::new(), false);
        }
        let mut frames = Vec::new();
        let mut used = 0;
        while used < budget {
            let Some((seq, (to, payload))) = st.out.next_unsent() else { break };
            used += payload.len() + to.len() + 16;
            frames.push(Frame::Sdata { seq, peer: to.clone(), payload: payload.clone() });
        }
        (frames, st.out.has_unsent())
    }
}

/// Empty the outbox (a session that does not continue): its messages, of unknown fate.
fn take_in_doubt(out: &mut Outbox<(String, Bytes)>) -> Vec<InDoubt> {
    std::mem::take(out).drain().map(|(seq, (to, payload))| InDoubt { seq, to, payload }).collect()
}

impl State {
    fn wake(&mut self) {
        self.pull = true;
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }
}
