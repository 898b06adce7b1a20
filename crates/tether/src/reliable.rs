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
    #[error("payload of {len} bytes exceeds the largest a reliable session carries for this destination ({max})")]
    TooLarge { len: usize, max: usize },
}

/// A message this client sent on a session that could not be resumed (or on a server that does not grant
/// reliable sessions): what is known of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InDoubt {
    /// Its sequence number in the old session.
    pub seq: u64,
    /// The target id (empty: the server application).
    pub to: String,
    pub payload: Bytes,
    /// It was on the wire and never acknowledged: it may or may not have arrived, and it is not sent again.
    /// `false`: it never reached the server.
    pub sent: bool,
    /// Never sent before, it was sent again in the new session under this sequence number (`None`: not sent;
    /// the server does not grant reliable sessions).
    pub resent_as: Option<u64>,
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
    /// Which connection carries the session: each `WELCOME` starts a new generation, and calls from a
    /// connection of another one (an old connection still closing) are ignored.
    generation: u64,
    /// The current generation's connection has taken the grant and sends from the outbox.
    live: bool,
    /// The largest frame the server accepts (its `WELCOME`; before that, the client's own limit).
    max_frame: u32,
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
            generation: 0,
            live: false,
            max_frame: tether_proto::frame::DEFAULT_MAX_FRAME,
            waker: None,
            pull: false,
        };
        ReliableLink { inner: Arc::new(Mutex::new(st)) }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Keep a message for `to` (empty: the server application) and have the connection send it (now, or after the
    /// next connect or resume). Returns its sequence number, which receipts and reports name.
    pub fn send(&self, to: &str, payload: Bytes) -> Result<u64, SendError> {
        let mut st = self.state();
        let max = tether_proto::frame::max_reliable_payload(st.max_frame, !to.is_empty());
        if payload.len() > max {
            return Err(SendError::TooLarge { len: payload.len(), max });
        }
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

    /// The largest frame the next server accepts, as far as this client knows (its own limit before a `WELCOME`).
    pub(crate) fn set_max_frame(&self, max_frame: u32) {
        self.state().max_frame = max_frame;
    }

    /// The server's `WELCOME`: its grant, or `None` (the extension is not in effect on this connection). Starts a
    /// new generation (returned): only this connection's calls count from here.
    /// - A session that continues resends what the server has not; what the resume showed acknowledged is
    ///   returned (the last such sequence number, 0 for none).
    /// - A first session keeps what was sent before any connection, numbered from 1 as the server expects.
    /// - A session that does not continue starts afresh: what was on the wire unacknowledged is in doubt, and
    ///   what never left is sent again under new numbers. Not granted, nothing is sent and all of it is returned.
    /// - A grant that says the session continues where this client cannot (the server's stream, or what it
    ///   took of this client's, went backwards: its store lost writes) is refused: the outbox starts afresh as
    ///   above, the token is dropped so that the next connection starts a new session, and the last value is
    ///   true: the caller closes this connection.
    pub(crate) fn welcome(&self, grant: Option<Grant>, max_frame: u32) -> (u64, u64, Vec<InDoubt>, bool) {
        let mut st = self.state();
        st.generation += 1;
        let generation = st.generation;
        st.max_frame = max_frame;
        st.grant = grant;
        let had_session = st.token.is_some();
        let Some(g) = grant else {
            st.live = false;
            st.token = None;
            st.received = 0;
            let old = std::mem::take(&mut st.out);
            return (generation, 0, in_doubt(old, None), false);
        };
        st.token = Some(g.token);
        st.live = true;
        st.pull = true;
        let mut broken = false;
        if g.continues() || !had_session {
            match st.out.resume(g.received) {
                Ok(released) => return (generation, released.last().map_or(0, |(s, _)| *s), Vec::new(), false),
                // The server's word contradicts what it acknowledged before: continuity cannot be trusted. Both
                // sides must start afresh: this client now, the server at the next connection (no token).
                Err(e) => {
                    tracing::warn!("reliable resume: {e}; starting a new session");
                    broken = g.continues();
                }
            }
        }
        st.received = 0;
        if broken {
            st.token = None;
            st.live = false;
        }
        let old = std::mem::take(&mut st.out);
        let limits = st.cfg.window;
        let doubt = in_doubt(old, Some((&mut st.out, limits)));
        (generation, 0, doubt, broken)
    }

    /// Connection `generation` ended: sends wait in the outbox for the next one.
    pub(crate) fn detach(&self, generation: u64) {
        let mut st = self.state();
        if st.generation == generation {
            st.live = false;
            st.waker = None;
        }
    }

    /// A sequenced frame from the server was taken on connection `generation`.
    pub(crate) fn received_seq(&self, generation: u64, seq: u64) {
        let mut st = self.state();
        if st.generation == generation {
            st.received = st.received.max(seq);
        }
    }

    /// The server acknowledged up to `seq` on connection `generation`: how many messages that released.
    pub(crate) fn acked(&self, generation: u64, seq: u64) -> Result<usize, AckError> {
        let mut st = self.state();
        if st.generation != generation {
            return Ok(0);
        }
        st.out.ack(seq).map(|r| r.len())
    }

    /// Register connection `generation`'s task; ready when the outbox has something for it to send.
    pub(crate) fn poll_pull(&self, generation: u64, cx: &mut Context<'_>) -> Poll<()> {
        let mut st = self.state();
        if st.generation != generation {
            return Poll::Pending;
        }
        if st.live && std::mem::take(&mut st.pull) {
            return Poll::Ready(());
        }
        if !st.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            st.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    /// Up to `budget` bytes of unsent messages as `SDATA` frames for connection `generation`, and whether more
    /// wait.
    pub(crate) fn next_frames(&self, generation: u64, budget: usize) -> (Vec<Frame>, bool) {
        let mut st = self.state();
        if !st.live || st.generation != generation {
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

    /// The connection refused to send message `seq` (a server whose maximum frame is below what it was checked
    /// against): it is unsent again, so that the stream keeps no gap.
    pub(crate) fn unsend(&self, generation: u64, seq: u64) {
        let mut st = self.state();
        if st.generation == generation {
            st.out.unsend(seq);
        }
    }
}

/// What an old outbox held, for a session that does not continue: what was sent is in doubt; what was not is
/// pushed into `fresh` (the new session's outbox, under its window) when there is one.
fn in_doubt(
    mut old: Outbox<(String, Bytes)>,
    mut fresh: Option<(&mut Outbox<(String, Bytes)>, Limits)>,
) -> Vec<InDoubt> {
    let sent_up_to = old.sent();
    old.drain()
        .map(|(seq, (to, payload))| {
            let sent = seq <= sent_up_to;
            let resent_as = match (&mut fresh, sent) {
                (Some((out, limits)), false) => {
                    out.push((to.clone(), payload.clone()), payload.len() + to.len(), *limits).ok()
                }
                _ => None,
            };
            InDoubt { seq, to, payload, sent, resent_as }
        })
        .collect()
}

impl State {
    fn wake(&mut self) {
        self.pull = true;
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_proto::reliable::Status;

    fn grant(status: Status, received: u64) -> Grant {
        Grant { token: [7; 16], status, why: None, received, lost: 0 }
    }

    /// A server that says the session continues but has taken less than it acknowledged (its store lost writes)
    /// is not believed: the outbox starts afresh (in doubt), the token goes, and the connection is to be closed,
    /// so that the next one starts a new session on both sides instead of the server dropping the renumbered
    /// messages as duplicates.
    #[test]
    fn a_resume_below_what_was_acknowledged_starts_a_new_session_on_both_sides() {
        let link = ReliableLink::new(ReliableConfig::default());
        for i in 0..3 {
            link.send("peer", Bytes::from(format!("m{i}"))).unwrap();
        }
        let (g1, _, _, broken) = link.welcome(Some(grant(Status::New, 0)), 65_536);
        assert!(!broken);
        assert_eq!(link.next_frames(g1, 1 << 20).0.len(), 3);
        assert_eq!(link.acked(g1, 3), Ok(3));
        link.send("peer", Bytes::from_static(b"m3")).unwrap();
        link.detach(g1);
        // Resumed, but the server says it took only 1 of the 3 it acknowledged.
        let (_, acked, doubt, broken) = link.welcome(Some(grant(Status::Resumed, 1)), 65_536);
        assert!(broken, "a contradicting resume is refused");
        assert_eq!(acked, 0);
        assert_eq!(doubt.len(), 1, "the unacknowledged message is reported: {doubt:?}");
        let offer = Offer::find(&[link.offer()]).expect("an offer");
        assert!(offer.resume.is_none(), "the next HELLO asks for a new session");
        // The new session: the message that never left goes out as its first.
        let (g3, _, _, broken) = link.welcome(Some(grant(Status::New, 0)), 65_536);
        assert!(!broken);
        let frames = link.next_frames(g3, 1 << 20).0;
        assert!(matches!(&frames[..], [Frame::Sdata { seq: 1, .. }]), "{frames:?}");
    }
}
