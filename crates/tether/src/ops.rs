//! What an operator reads and steers through [`crate::ServerHandle`]: sessions, recent disconnects, live event
//! watchers and the drain.
//!
//! # Layout
//! These are the server's operational records, kept off the connection hot path: a [`DisconnectRing`] written
//! once per closed connection, [`Watchers`] fed once per event (only while someone watches), and the plain types
//! the admin layer renders ([`SessionInfo`], [`KernelView`], [`DisconnectRecord`], [`DrainStatus`]). Nothing here
//! knows about HTTP; `tether-admin` serves them.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tether_proto::{CloseReason, ConnId};
use tokio::sync::{mpsc, Notify};

use crate::event::{Diagnosis, ServerEvent};
use crate::probe::{answered, unanswered, Answered, Unanswered};
use crate::sockopt::TcpInfo;

/// One online session as the server sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionInfo {
    pub client: String,
    pub conn: ConnId,
    pub peer: SocketAddr,
    pub epoch: u64,
    /// When the session was admitted (`WELCOME`), and how long ago that was.
    pub since: SystemTime,
    pub connected_for: Duration,
    /// Time since the last frame arrived from the client.
    pub last_frame_ago: Duration,
    /// Negotiated heartbeat interval and timeout.
    pub heartbeat: Duration,
    pub timeout: Duration,
    /// The phi detector suspects it (silent longer than its history makes likely), not yet convicted.
    pub suspect: bool,
    /// The last heartbeat round trip the server measured (`PING` to `PONG`).
    pub app_rtt: Option<Duration>,
    pub tls: bool,
    /// Negotiated protocol version.
    pub version: u8,
    /// Bytes read from and written to the socket (TLS records included).
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// What a reliable session holds (the `reliable` extension), online or offline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldInfo {
    /// Messages and reports waiting for the client's acknowledgement (sent or not), and their bytes as counted
    /// against the hold's bounds.
    pub messages: usize,
    pub bytes: usize,
    /// Whether a connection carries the session now; if not, how long until it expires.
    pub online: bool,
    pub expires_in: Option<Duration>,
    /// The last sequence number taken from the client, and the last assigned to the server's stream to it.
    pub received: u64,
    pub assigned: u64,
    /// Messages refused since the client last resumed (its hold was full).
    pub lost: u32,
}

/// The kernel's view of a session's socket at the moment it was asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelView {
    pub info: TcpInfo,
    /// Bytes in the socket's send queue not yet acknowledged by the peer (`TIOCOUTQ`).
    pub send_queue: Option<usize>,
}

/// One closed connection, as kept in the ring of recent disconnects.
#[derive(Debug, Clone, PartialEq)]
pub struct DisconnectRecord {
    pub at: SystemTime,
    pub conn: ConnId,
    /// The session's client id, if the connection got as far as one.
    pub client: Option<String>,
    pub peer: SocketAddr,
    pub reason: CloseReason,
    /// The client ended it (its `BYE`, FIN or reset).
    pub by_peer: bool,
    /// For verdicts taken at a deadline: how late the verdict was.
    pub lateness: Option<Duration>,
    /// Time between the last frame received and the close, for connections that had a session.
    pub silent_for: Option<Duration>,
    /// Accept to close.
    pub duration: Duration,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub detail: Option<String>,
    /// What the server concluded about the connection's end after it, from what came next.
    pub diagnosis: Option<Diagnosis>,
}

/// The most recent closed connections, oldest dropped first.
#[derive(Debug)]
pub struct DisconnectRing {
    cap: usize,
    /// Shared records: a reader copies pointers under the lock (10,000 in tens of microseconds), not records, so
    /// every connection's close, which takes the lock too, never waits behind a long copy for the operator.
    ring: Mutex<VecDeque<Arc<DisconnectRecord>>>,
}

impl DisconnectRing {
    pub fn new(cap: usize) -> DisconnectRing {
        DisconnectRing { cap, ring: Mutex::new(VecDeque::new()) }
    }

    pub fn push(&self, r: DisconnectRecord) {
        if self.cap == 0 {
            return;
        }
        let mut ring = self.ring.lock().expect("disconnect ring lock");
        if ring.len() >= self.cap {
            ring.pop_front();
        }
        ring.push_back(Arc::new(r));
    }

    /// Add a diagnosis (and its explanation as the detail) to connection `conn`'s record, if it is still kept.
    /// Searches from the newest: a diagnosis comes moments after the close.
    pub fn annotate(&self, conn: ConnId, diagnosis: Diagnosis, explanation: &str) {
        let mut ring = self.ring.lock().expect("disconnect ring lock");
        if let Some(r) = ring.iter_mut().rev().find(|r| r.conn == conn) {
            let mut annotated = DisconnectRecord::clone(r);
            annotated.diagnosis = Some(diagnosis);
            annotated.detail = Some(explanation.to_owned());
            *r = Arc::new(annotated);
        }
    }

    /// Newest first, at most `limit`, only `reason` when given.
    pub fn recent(&self, reason: Option<CloseReason>, limit: usize) -> Vec<Arc<DisconnectRecord>> {
        let ring = self.ring.lock().expect("disconnect ring lock");
        ring.iter().rev().filter(|r| reason.is_none_or(|x| x == r.reason)).take(limit).cloned().collect()
    }
}

/// A live copy of the server's event stream for one watcher (an SSE client, say), bounded: a watcher that falls
/// `capacity` events behind is cut off, counted, and told so by [`EventWatch::cut_off`]; the server never waits
/// for it and never buffers more for it.
pub struct EventWatch {
    rx: mpsc::Receiver<ServerEvent>,
    cut: Arc<Cut>,
}

#[derive(Default)]
struct Cut {
    done: AtomicBool,
    notify: Notify,
}

impl EventWatch {
    /// The next event; `None` once the watcher was cut off (after the events queued before it) or the server is
    /// gone.
    pub async fn recv(&mut self) -> Option<ServerEvent> {
        self.rx.recv().await
    }

    /// Whether this watcher was cut off for falling behind.
    pub fn is_cut(&self) -> bool {
        self.cut.done.load(Ordering::Relaxed)
    }

    /// Resolves when the watcher is cut off (at once if it already was). Lets the consumer close its transport
    /// even when it is not reading (a stalled HTTP client).
    pub fn cut_off(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let cut = self.cut.clone();
        async move {
            loop {
                let notified = cut.notify.notified();
                if cut.done.load(Ordering::Relaxed) {
                    return;
                }
                notified.await;
            }
        }
    }
}

/// Every live watcher. Emitting costs one atomic load while nobody watches.
#[derive(Default)]
pub(crate) struct Watchers {
    count: AtomicUsize,
    list: Mutex<Vec<(mpsc::Sender<ServerEvent>, Arc<Cut>)>>,
}

impl Watchers {
    pub(crate) fn add(&self, capacity: usize) -> EventWatch {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let cut = Arc::new(Cut::default());
        let mut list = self.list.lock().expect("watchers lock");
        list.push((tx, cut.clone()));
        self.count.store(list.len(), Ordering::Relaxed);
        EventWatch { rx, cut }
    }

    /// Whether anyone watches (one atomic load).
    pub(crate) fn watching(&self) -> bool {
        self.count.load(Ordering::Relaxed) > 0
    }

    /// Hand `ev` to every watcher; returns how many were cut off for being full.
    pub(crate) fn send(&self, ev: &ServerEvent) -> u64 {
        if !self.watching() {
            return 0;
        }
        let mut cut_now = 0;
        let mut list = self.list.lock().expect("watchers lock");
        list.retain(|(tx, cut)| match tx.try_send(ev.clone()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                cut.done.store(true, Ordering::Relaxed);
                // Every `Notified` made before this wakes, polled or not: `cut_off` makes one, then checks `done`.
                cut.notify.notify_waiters();
                cut_now += 1;
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        });
        self.count.store(list.len(), Ordering::Relaxed);
        cut_now
    }
}

/// What a round-trip probe of one client found ([`crate::ServerHandle::probe`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeReport {
    pub client: String,
    /// The `PONG`'s round trip, if it came within the wait.
    pub app_rtt: Option<Duration>,
    /// How long the server waited.
    pub waited: Duration,
    /// The session's heartbeat interval.
    pub heartbeat: Option<Duration>,
    /// The kernel's view of the socket after the wait, or, when the session closed during it, just before its
    /// socket was let go.
    pub kernel: Option<KernelView>,
    /// The session closed during the wait: how.
    pub ended: Option<ProbeEnded>,
}

/// How a probed session ended while the probe waited for its `PONG`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeEnded {
    pub reason: CloseReason,
    /// The client ended it (its `BYE`, FIN or reset), rather than a verdict or command of the server's.
    pub by_client: bool,
}

/// The answer to "is it the network or the client's program?" for one connection: the server's words for what
/// [`crate::probe`] judged about its client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeVerdict {
    /// The client answered, and neither the path nor its program is slow.
    Ok,
    /// The kernel's own smoothed RTT is high: the path is slow, whatever the program does.
    SlowNetwork,
    /// The client answered, but far later than its kernel acknowledged: its program is slow to read.
    ClientSlow,
    /// No answer, yet the client's kernel acknowledged our `PING`: the program is stalled (hung, stopped,
    /// swapping), not the network.
    ClientStalled,
    /// No answer, and our `PING` is not acknowledged either: the path or the client's host is gone. Also the
    /// verdict when there is no answer and no kernel view (see [`ProbeReport::verdict`]).
    PathDown,
    /// No answer: the client closed its session during the wait (its `BYE`, FIN or reset). Its program acted, so
    /// it is not stalled, and whatever reached us came over the path.
    ClientClosed,
}

impl ProbeVerdict {
    pub fn as_str(self) -> &'static str {
        match self {
            ProbeVerdict::Ok => "ok",
            ProbeVerdict::SlowNetwork => "slow_network",
            ProbeVerdict::ClientSlow => "client_slow",
            ProbeVerdict::ClientStalled => "client_stalled",
            ProbeVerdict::PathDown => "path_down",
            ProbeVerdict::ClientClosed => "client_closed",
        }
    }
}

impl ProbeReport {
    /// The verdict and the evidence for it, in one sentence: the `PONG` (or its absence) judged against the
    /// kernel's view of the session's socket by [`answered`] or [`unanswered`], the rule `tether probe` uses from
    /// the other end.
    ///
    /// A session that closed during the wait is judged by the kernel's view read as it closed (a stalled client
    /// convicted of `heartbeat_timeout` meanwhile is still `client_stalled`), unless the client closed it itself
    /// (`client_closed`). No `PONG` and no kernel view at all (a platform without `TCP_INFO`) is `path_down`:
    /// nothing shows that the client's kernel took the `PING`, so `client_stalled`, a claim about the client's
    /// program, would go beyond the evidence.
    pub fn verdict(&self) -> (ProbeVerdict, String) {
        let k = self.kernel.map(|k| k.info);
        let Some(app) = self.app_rtt else {
            if let Some(e) = self.ended.filter(|e| e.by_client) {
                let sentence = format!("no PONG: the client closed its session during the probe ({})", e.reason);
                return (ProbeVerdict::ClientClosed, sentence);
            }
            let meanwhile = match self.ended {
                Some(e) => {
                    format!("; the server closed the session meanwhile ({}), as the kernel saw it then", e.reason)
                }
                None => String::new(),
            };
            return match unanswered(k) {
                Unanswered::Stalled(i) => (
                    ProbeVerdict::ClientStalled,
                    format!(
                        "no PONG in {:.1?}, but the client's kernel acknowledged everything (last ACK {:.1?} ago, RTT {:.1?}){meanwhile}",
                        self.waited, i.since_ack_recv, i.rtt
                    ),
                ),
                Unanswered::PathDown(i) => (
                    ProbeVerdict::PathDown,
                    format!(
                        "no PONG in {:.1?} and {} segments unacknowledged ({} retransmissions, last ACK {:.1?} ago){meanwhile}",
                        self.waited, i.unacked, i.retransmits, i.since_ack_recv
                    ),
                ),
                Unanswered::NoView => {
                    (ProbeVerdict::PathDown, format!("no PONG in {:.1?} and no kernel view{meanwhile}", self.waited))
                }
            };
        };
        let krtt = k.map_or(Duration::ZERO, |i| i.rtt);
        match answered(app, k) {
            Answered::Late => {
                (ProbeVerdict::ClientSlow, format!("the PONG took {app:.1?} against a kernel RTT of {krtt:.1?}"))
            }
            Answered::SlowNetwork(i) => (
                ProbeVerdict::SlowNetwork,
                format!(
                    "the PONG took {app:.1?}, in step with the kernel's smoothed RTT of {:.1?} (rttvar {:.1?})",
                    i.rtt, i.rttvar
                ),
            ),
            Answered::InStep => (ProbeVerdict::Ok, format!("the PONG took {app:.1?}; the kernel's RTT is {krtt:.1?}")),
        }
    }
}

/// Progress of a drain ([`crate::ServerHandle::drain`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DrainStatus {
    /// New connections are refused (`BYE(server_shutdown)` naming the redirect).
    pub draining: bool,
    /// Connections the drain set out to move, and how many have been sent their `BYE` so far.
    pub total: usize,
    pub sent: usize,
    /// Connections still open (a `BYE` sent is followed by the client's close).
    pub remaining: usize,
    pub redirect: Option<String>,
    /// The window the goodbyes are spread over.
    pub spread: Duration,
    pub started: Option<SystemTime>,
}

/// Why a drain was not started.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DrainError {
    #[error("the server is already draining")]
    AlreadyDraining,
    #[error("the server is shutting down")]
    ShuttingDown,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(conn: ConnId, reason: CloseReason) -> DisconnectRecord {
        DisconnectRecord {
            at: SystemTime::UNIX_EPOCH,
            conn,
            client: None,
            peer: "127.0.0.1:1".parse().unwrap(),
            reason,
            by_peer: false,
            lateness: None,
            silent_for: None,
            duration: Duration::ZERO,
            bytes_in: 0,
            bytes_out: 0,
            detail: None,
            diagnosis: None,
        }
    }

    fn report(app_ms: Option<u64>, rtt_ms: u64, unacked: u32) -> ProbeReport {
        let info =
            TcpInfo { state: 1, rtt: Duration::from_millis(rtt_ms), unacked, snd_cwnd: 10, ..TcpInfo::default() };
        ProbeReport {
            client: "c".into(),
            app_rtt: app_ms.map(Duration::from_millis),
            waited: Duration::from_secs(2),
            heartbeat: None,
            kernel: Some(KernelView { info, send_queue: Some(0) }),
            ended: None,
        }
    }

    #[test]
    fn probe_verdicts_follow_the_evidence() {
        assert_eq!(report(Some(1), 1, 0).verdict().0, ProbeVerdict::Ok);
        assert_eq!(report(Some(400), 1, 0).verdict().0, ProbeVerdict::ClientSlow);
        assert_eq!(report(Some(300), 250, 0).verdict().0, ProbeVerdict::SlowNetwork);
        assert_eq!(report(None, 250, 1).verdict().0, ProbeVerdict::PathDown, "silence is judged by what is unacked");
        assert_eq!(report(None, 250, 0).verdict().0, ProbeVerdict::ClientStalled, "a slow path does not explain it");
        assert_eq!(report(None, 1, 0).verdict().0, ProbeVerdict::ClientStalled);
        assert_eq!(report(None, 1, 1).verdict().0, ProbeVerdict::PathDown);
        assert!(report(None, 1, 0).verdict().1.contains("acknowledged everything"));
        let gone = ProbeReport { kernel: None, ..report(None, 1, 0) };
        assert_eq!(gone.verdict().0, ProbeVerdict::PathDown, "no PONG and no kernel view: the socket may be closed");
    }

    #[test]
    fn a_session_that_closed_during_the_probe_is_judged_by_the_kernel_as_it_closed() {
        let convicted = ProbeEnded { reason: CloseReason::HeartbeatTimeout, by_client: false };
        let stalled = ProbeReport { ended: Some(convicted), ..report(None, 1, 0) };
        let (verdict, evidence) = stalled.verdict();
        assert_eq!(verdict, ProbeVerdict::ClientStalled, "convicted meanwhile, but its kernel took the PING");
        assert!(evidence.contains("closed the session meanwhile (heartbeat_timeout)"), "{evidence}");
        let cut = ProbeReport { ended: Some(convicted), ..report(None, 1, 3) };
        assert_eq!(cut.verdict().0, ProbeVerdict::PathDown);
        let left = ProbeEnded { reason: CloseReason::Bye, by_client: true };
        let (verdict, evidence) = ProbeReport { ended: Some(left), ..report(None, 1, 0) }.verdict();
        assert_eq!(verdict, ProbeVerdict::ClientClosed, "its program said goodbye: not stalled");
        assert!(evidence.contains("(bye)"), "{evidence}");
    }

    #[test]
    fn the_ring_keeps_the_newest_and_filters_by_reason() {
        let ring = DisconnectRing::new(3);
        for (i, r) in
            [CloseReason::Eof, CloseReason::Bye, CloseReason::Eof, CloseReason::Kicked].into_iter().enumerate()
        {
            ring.push(rec(i as ConnId, r));
        }
        let all: Vec<ConnId> = ring.recent(None, 10).iter().map(|r| r.conn).collect();
        assert_eq!(all, vec![3, 2, 1]);
        let eof: Vec<ConnId> = ring.recent(Some(CloseReason::Eof), 10).iter().map(|r| r.conn).collect();
        assert_eq!(eof, vec![2]);
        assert_eq!(ring.recent(None, 1).len(), 1);
    }

    #[tokio::test]
    async fn a_watcher_that_falls_behind_is_cut_off_and_others_keep_going() {
        let w = Watchers::default();
        let mut slow = w.add(2);
        let mut fast = w.add(8);
        let ev = ServerEvent { at: SystemTime::UNIX_EPOCH, kind: crate::EventKind::Dropped { count: 1 } };
        let mut cut = 0;
        for _ in 0..3 {
            cut += w.send(&ev);
            assert!(fast.recv().await.is_some());
        }
        assert_eq!(cut, 1);
        assert!(slow.is_cut());
        slow.cut_off().await;
        assert!(slow.recv().await.is_some() && slow.recv().await.is_some());
        assert!(slow.recv().await.is_none(), "after the queued events, the cut watcher's stream ends");
        assert_eq!(w.send(&ev), 0);
        assert!(fast.recv().await.is_some());
    }
}
