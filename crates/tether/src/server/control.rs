//! How other tasks reach one connection: its control slot, the commands it carries, and the cluster's decision
//! about its `HELLO`.
//!
//! # Layout
//! - [`Control`]: one per connection, shared (`Arc`) by its event loop, the hub's table and whoever asks about it. A close
//!   request (first wins, never blocked by queued frames; each asker learns whether it won: [`Requested`]), a
//!   bounded frame queue, a probe request and an admission decision, plus what the operator may read about the
//!   session and its traffic.
//! - [`Cmd`] and [`CloseCmd`]: what its event loop takes out of its slot: a close request first, then a probe request,
//!   then an admission decision, then queued frames in order ([`Control::poll_take`]).
//! - [`Admit`] and [`Decision`]: what the cluster decided about a `HELLO`, handed to the connection as a command.
//!
//! # Rules
//! A leaf: nothing here knows the server's shared state or the hub. The slot's lock is held only to move a
//! command in or out, never while taking another lock, and across no IO but one: the kernel's view of the socket
//! is read under it, so that a descriptor its event loop has closed (and the kernel may have reused) is never read. The
//! event loop is the only writer of the traffic counts and the round trip, so those are plain loads and stores on
//! atomics.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant as StdInstant};

use tether_proto::{Bye, CloseReason, Frame, Hello};

use crate::cluster::Cluster;
use crate::ops::KernelView;
use crate::sockopt;

/// How other tasks reach a connection: a close request (first wins, never blocked by queued frames) and a
/// bounded frame queue. The queue is a `VecDeque` that allocates only when something is queued and is released
/// when it drains: an idle connection pays nothing for it (a channel would pre-allocate a block of slots).
/// It also carries what the operator may ask about the connection; its event loop is its only writer.
pub(super) struct Control {
    state: Mutex<ControlState>,
    /// Milliseconds after `Shared::origin` of the last frame received (for the id-conflict liveness rule).
    pub(super) last_rx_ms: AtomicU64,
    pub(super) peer: SocketAddr,
    /// Set once, when the session is admitted.
    pub(super) session: OnceLock<SessionMeta>,
    /// Bytes on the socket; the core's frame counts last added to the server's totals (received in the high
    /// half, sent in the low); outbound bytes last added to the server's queued gauge.
    pub(super) bytes_in: AtomicU64,
    pub(super) bytes_out: AtomicU64,
    pub(super) frames_seen: AtomicU64,
    pub(super) queued: AtomicU64,
    /// The last heartbeat round trip in microseconds (low half, 0 before the first) and how many there were (high
    /// half: a probe waits for it to move), in one word.
    pub(super) rtt: AtomicU64,
}

/// What a session was admitted with, and its heartbeat now (the client may change it: `heartbeat_update`).
pub(super) struct SessionMeta {
    pub(super) epoch: u64,
    /// When it was admitted, in milliseconds after `Shared::origin` (half an `Instant`).
    since_ms: u64,
    /// Interval (high half) and timeout (low half) in ms, in one word so that a reader never sees half a change.
    heartbeat: AtomicU64,
    pub(super) version: u8,
}

impl SessionMeta {
    /// A session admitted at `since_at`; `origin` is `Shared::origin`.
    pub(super) fn new(
        epoch: u64,
        origin: StdInstant,
        since_at: StdInstant,
        heartbeat_ms: u32,
        timeout_ms: u32,
        version: u8,
    ) -> Self {
        let heartbeat = AtomicU64::new(u64::from(heartbeat_ms) << 32 | u64::from(timeout_ms));
        let since_ms = u64::try_from(since_at.saturating_duration_since(origin).as_millis()).unwrap_or(u64::MAX);
        SessionMeta { epoch, since_ms, heartbeat, version }
    }

    /// When it was admitted (to the millisecond); `origin` is `Shared::origin`.
    pub(super) fn since_at(&self, origin: StdInstant) -> StdInstant {
        origin + Duration::from_millis(self.since_ms)
    }

    /// The heartbeat interval and timeout in effect.
    pub(super) fn heartbeat(&self) -> (Duration, Duration) {
        let v = self.heartbeat.load(Ordering::Relaxed);
        (Duration::from_millis(v >> 32), Duration::from_millis(v & 0xffff_ffff))
    }

    pub(super) fn interval(&self) -> Duration {
        self.heartbeat().0
    }

    pub(super) fn set_heartbeat(&self, interval: Duration, timeout: Duration) {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX).min(u32::MAX.into());
        self.heartbeat.store(ms(interval) << 32 | ms(timeout), Ordering::Relaxed);
    }
}

struct ControlState {
    /// The close request its event loop has not taken yet.
    /// Boxed: a connection is asked to close once, and the slot stays a few words smaller for its whole life.
    close: Option<Box<CloseCmd>>,
    /// A close request was accepted (taken by its event loop or not): the first one decided how the connection ends,
    /// and every later one is told so. Never cleared.
    closing: bool,
    /// Boxed, with its buffer: a connection with nothing queued (almost every one, almost always) carries one
    /// word for it.
    #[allow(clippy::box_collection)] // the point: one word instead of a `VecDeque`'s four
    frames: Option<Box<VecDeque<Frame>>>,
    /// The waker of the connection's slot in its event loop, when it waits for a command.
    waker: Option<Waker>,
    /// The socket while it is open, -1 after: the kernel's view is read under this lock, and its event loop clears it
    /// before the socket closes, so a reused descriptor is never read. (A bare descriptor rather than an
    /// `Option`: it keeps this slot, one per connection, a word smaller.)
    fd: RawFd,
    /// An operator asked for a round-trip probe.
    probe: bool,
    /// Cluster mode: the decision about this connection's `HELLO`, waiting for its event loop.
    admit: Option<Box<Admit>>,
    /// Its reliable session has items to send (its event loop takes them from the table).
    pull: bool,
}

impl ControlState {
    fn new(fd: RawFd) -> ControlState {
        ControlState {
            close: None,
            closing: false,
            frames: None,
            waker: None,
            fd,
            probe: false,
            admit: None,
            pull: false,
        }
    }

    /// The socket, if it is still open.
    fn fd(&self) -> Option<RawFd> {
        (self.fd >= 0).then_some(self.fd)
    }

    /// Accept `cmd` as how the connection ends, unless a close was requested before or the socket is closed.
    fn request(&mut self, cmd: CloseCmd) -> Requested {
        if self.fd < 0 {
            return Requested::Closed;
        }
        if self.closing {
            return Requested::AlreadyClosing;
        }
        self.closing = true;
        self.close = Some(Box::new(cmd));
        self.wake();
        Requested::Accepted
    }

    fn wake(&mut self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    /// The socket is closing: forget it, and hand back a cluster admission that came too late.
    fn close(&mut self) -> Option<Box<Admit>> {
        self.fd = -1;
        self.admit.take()
    }
}

/// Why a frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PushError {
    /// The queue was full: the connection is now condemned as a slow consumer.
    Full,
}

/// What became of a close request ([`Control::request`]), decided under the slot's lock: of several at once,
/// exactly one is accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Requested {
    /// This request decides how the connection ends.
    Accepted,
    /// An earlier request (or a full queue) already decided it; the connection is leaving.
    AlreadyClosing,
    /// The socket is closed already.
    Closed,
}

#[derive(Debug, Clone)]
pub(super) enum CloseCmd {
    /// Goodbye and linger (takeover, kick, shutdown).
    Bye(Bye),
    /// Refuse: flush the `BYE` and close (a delayed `auth_failed`).
    Reject(Bye),
    Abort(CloseReason),
}

pub(super) enum Cmd {
    Frame(Frame),
    Close(CloseCmd),
    /// Measure the round trip now ([`crate::ServerHandle::probe`]).
    Probe,
    /// Cluster mode: welcome or refuse the `HELLO` as decided.
    Admit(Box<Admit>),
    /// Send what the connection's reliable session holds for it.
    Pull,
    /// Cluster mode: what came of a step of the connection's reliable session in Redis.
    Stored(Box<crate::cluster::reliable::Done>),
}

/// A `BYE` with `retry_after` in milliseconds (saturated) and no alternative.
pub(super) fn bye(reason: CloseReason, retry_after: Duration) -> Bye {
    Bye { reason, retry_after_ms: retry_after.as_millis().min(u32::MAX as u128) as u32, alternative: String::new() }
}

impl Control {
    pub(super) fn new(peer: SocketAddr, fd: RawFd, now_ms: u64) -> Control {
        Control {
            state: Mutex::new(ControlState::new(fd)),
            last_rx_ms: AtomicU64::new(now_ms),
            peer,
            session: OnceLock::new(),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            frames_seen: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            rtt: AtomicU64::new(0),
        }
    }

    /// The kernel's view of the socket, if it is still open.
    pub(super) fn kernel_view(&self) -> Option<KernelView> {
        let st = self.state.lock().expect("control lock");
        let fd = st.fd()?;
        let info = sockopt::tcp_info(fd)?;
        Some(KernelView { info, send_queue: sockopt::unacked_bytes(fd) })
    }

    /// The socket, if it is still open.
    pub(super) fn fd(&self) -> Option<RawFd> {
        self.state.lock().expect("control lock").fd()
    }

    /// The socket is closing: the operator's view of it ends here. Returns a cluster admission that came too
    /// late, for the caller to give back.
    pub(super) fn close_socket(&self) -> Option<Box<Admit>> {
        self.state.lock().expect("control lock").close()
    }

    /// [`Control::close_socket`] for a connection that is being torn down (its hooks' `drop`): a poisoned lock is passed
    /// over rather than panicking a second time.
    pub(super) fn close_socket_on_drop(&self) -> Option<Box<Admit>> {
        self.state.lock().ok()?.close()
    }

    /// Ask its event loop to close; the first request wins, and the answer says whether this was it.
    pub(super) fn request(&self, cmd: CloseCmd) -> Requested {
        self.state.lock().expect("control lock").request(cmd)
    }

    /// Ask its event loop to measure a round trip now.
    pub(super) fn request_probe(&self) {
        let mut st = self.state.lock().expect("control lock");
        st.probe = true;
        st.wake();
    }

    /// Tell its event loop that its reliable session has items to send.
    pub(super) fn wake_pull(&self) {
        let mut st = self.state.lock().expect("control lock");
        if !st.pull {
            st.pull = true;
            st.wake();
        }
    }

    /// Queue a frame for the connection (at most `limit`); a full queue condemns it as a slow consumer.
    pub(super) fn push(&self, frame: Frame, limit: usize) -> Result<(), PushError> {
        let mut st = self.state.lock().expect("control lock");
        if st.frames.as_ref().map_or(0, |f| f.len()) >= limit.max(1) {
            st.request(CloseCmd::Abort(CloseReason::SlowConsumer));
            return Err(PushError::Full);
        }
        st.frames.get_or_insert_with(Box::default).push_back(frame);
        st.wake();
        Ok(())
    }

    /// Hand the cluster's decision about the `HELLO` to its event loop; given back when the connection is already
    /// closed (the caller then releases what it claimed).
    pub(super) fn admit(&self, a: Box<Admit>) -> Result<(), Box<Admit>> {
        let mut st = self.state.lock().expect("control lock");
        if st.fd < 0 {
            return Err(a);
        }
        st.admit = Some(a);
        st.wake();
        Ok(())
    }

    /// The next command: a close request first, then a probe request, then the cluster's admission decision, then
    /// queued frames in order, then held items to send. When there is none, `cx` is woken by the next push or request.
    pub(super) fn poll_take(&self, cx: &mut Context<'_>) -> Poll<Cmd> {
        let mut st = self.state.lock().expect("control lock");
        if let Some(c) = st.close.take() {
            return Poll::Ready(Cmd::Close(*c));
        }
        if std::mem::take(&mut st.probe) {
            return Poll::Ready(Cmd::Probe);
        }
        if let Some(a) = st.admit.take() {
            return Poll::Ready(Cmd::Admit(a));
        }
        match st.frames.as_mut().and_then(|f| f.pop_front()) {
            Some(f) => {
                if st.frames.as_ref().is_some_and(|f| f.is_empty()) {
                    st.frames = None;
                }
                Poll::Ready(Cmd::Frame(f))
            }
            None if std::mem::take(&mut st.pull) => Poll::Ready(Cmd::Pull),
            None => {
                if !st.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    st.waker = Some(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }
}

/// What the cluster decided about a `HELLO`, handed back to its connection.
pub(super) struct Admit {
    pub(super) hello: Hello,
    pub(super) decision: Decision,
}

pub(super) enum Decision {
    /// Welcome with this cluster epoch; `displaced` comes with the id from its previous node. `rel`: the reliable
    /// session Redis opened for the connection.
    Welcome { epoch: u64, displaced: Vec<(u64, Duration)>, rel: Option<Box<Stored>> },
    /// Another live device holds the id (here or on `node`).
    Conflict { retry_after: Duration, node: Option<String> },
    /// A newer claim of the id (another connection, here or elsewhere) opened its reliable session first: this
    /// one, claimed with `epoch`, lost the race.
    Superseded { epoch: u64 },
    /// A reliable session was asked for and Redis could not open it: come back after `retry_after` (a session
    /// without its store would break the promise of continuity).
    Unavailable { retry_after: Duration },
}

/// A reliable session opened in Redis for a connection: the grant, how the store names the connection, and how
/// far the stream to the client was sent (what the client said it received, on a resume).
pub(super) struct Stored {
    pub(super) grant: tether_proto::reliable::Grant,
    pub(super) attach: crate::cluster::reliable::Attach,
    pub(super) sent: u64,
}

impl Admit {
    /// The connection this was decided for closed before its `WELCOME`: give back the id claimed for it.
    pub(super) fn give_back(self, cluster: &Cluster, reason: CloseReason, by_client: bool) {
        if let Decision::Superseded { epoch } = self.decision {
            return cluster.admitted(epoch);
        }
        if let Decision::Welcome { epoch, rel, .. } = self.decision {
            cluster.admitted(epoch);
            cluster.release(&self.hello.client_id, epoch, reason, by_client, Duration::ZERO);
            // The session opened for it goes offline (its link, dropped at once, detaches it).
            if let Some(r) = rel {
                drop(cluster.rel_link(&self.hello.client_id, r.grant.token, r.attach, r.sent));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kick() -> CloseCmd {
        CloseCmd::Bye(bye(CloseReason::Kicked, Duration::ZERO))
    }

    #[test]
    fn the_first_close_request_wins_and_every_later_one_is_told() {
        let c = Control::new("127.0.0.1:1".parse().unwrap(), 0, 0);
        assert_eq!(c.request(kick()), Requested::Accepted);
        assert_eq!(c.request(kick()), Requested::AlreadyClosing);
        // Taken by its event loop: still closing, not open to a second close.
        let waker = std::task::Waker::noop();
        assert!(matches!(c.poll_take(&mut Context::from_waker(waker)), Poll::Ready(Cmd::Close(CloseCmd::Bye(_)))));
        assert_eq!(c.request(CloseCmd::Abort(CloseReason::SlowConsumer)), Requested::AlreadyClosing);
        c.close_socket();
        assert_eq!(c.request(kick()), Requested::Closed);
    }

    #[test]
    fn a_full_queue_is_a_close_request_that_a_kick_then_loses() {
        let c = Control::new("127.0.0.1:1".parse().unwrap(), 0, 0);
        assert_eq!(c.push(Frame::Ping { seq: 1, ts_ms: 0 }, 1), Ok(()));
        assert_eq!(c.push(Frame::Ping { seq: 2, ts_ms: 0 }, 1), Err(PushError::Full));
        assert_eq!(c.request(kick()), Requested::AlreadyClosing);
        let waker = std::task::Waker::noop();
        let taken = c.poll_take(&mut Context::from_waker(waker));
        assert!(matches!(taken, Poll::Ready(Cmd::Close(CloseCmd::Abort(CloseReason::SlowConsumer)))));
    }
}
