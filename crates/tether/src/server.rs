//! The tokio server: accept loop, one task per connection, the shared session hub, graceful shutdown.
//!
//! # Layout
//! [`Server::bind`] opens the listener (options set and read back once, logged); [`Server::run`] accepts until
//! the shutdown future resolves, then says `BYE(server_shutdown)` to everyone with retry-after hints spread over a
//! window and waits (bounded) for the goodbyes. Each connection runs `driver::drive` with
//! `ServerHooks`, which consult the `Hub`: the sans-IO [`Registry`] plus a handle per connection, under one
//! mutex that is held only for short, non-blocking work. Other tasks reach a connection through its bounded
//! command queue (relayed data, presence; overflow is `slow_consumer`) or its `Control` slot (close requests:
//! takeover, kick, shutdown), so a full queue can never block a takeover.
//!
//! Over `max_connections` (or the connection capacity the descriptor limit allows, if lower), over
//! `max_handshakes` in flight, or over `accept_rate`, a new socket is answered `BYE(busy, retry_after)` (the hint
//! spread over `busy_retry_spread`) and closed. One source (an IPv4 address or an IPv6 /64) may hold at most
//! `max_handshakes_per_ip` of the handshake slots and, when set, `max_per_ip` connections; beyond either it gets
//! `BYE(ip_limit)`. Out of descriptors all the same (EMFILE), the accept loop spends a reserved descriptor to
//! accept, refuse and close one waiting connection at a time; other accept errors back off (10 ms doubling to
//! 1 s) instead of spinning.
//!
//! Events go to the application through a bounded `EventSink` that never blocks (it counts what it drops).
//! Log lines about one client are summarised by a [`LogLimiter`] when they repeat, and nothing here writes to a
//! stream that could block: the binary's log writer is non-blocking.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant as StdInstant, SystemTime};

use bytes::Bytes;
use tether_proto::frame::{ext, Extension};
use tether_proto::registry::{Admission, Output, Registry, SessionEvent};
use tether_proto::{Bye, CloseReason, ConnId, Connection, Event, Frame, Undeliverable, Welcome};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinSet;

use crate::cluster::Cluster;
use crate::config::ServerConfig;
use crate::driver::{self, drive, Hooks};
use crate::event::{EventKind, EventSink, EventStream, ServerEvent, Stats};
use crate::fdlimit::{Capacity, Reserve};
use crate::loglimit::LogLimiter;
use crate::metrics::{Metrics, MetricsSnapshot};
use crate::ops::{
    DisconnectRecord, DisconnectRing, DrainError, DrainStatus, EventWatch, KernelView, ProbeReport, SessionInfo,
    Watchers,
};
use crate::sockopt;

mod clustered;

const LISTEN_BACKLOG: u32 = 4096;

/// A bound, not yet running server.
pub struct Server {
    listener: TcpListener,
    shared: Arc<Shared>,
    events: Option<EventStream>,
}

/// A cheap handle for the application: send to a client, kick one, count sessions.
#[derive(Clone)]
pub struct ServerHandle {
    shared: Arc<Shared>,
}

/// Why [`ServerHandle::send`] did not queue a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendToError {
    #[error("client {0} is not online")]
    Offline(String),
    #[error("client {0} is not draining its queue (closed as slow_consumer)")]
    SlowConsumer(String),
    #[error("payload of {len} bytes exceeds the largest frame a client accepts ({max} bytes of payload)")]
    TooLarge { len: usize, max: usize },
}

struct Shared {
    cfg: ServerConfig,
    /// `cfg.conn`, shared by every connection's state machine.
    conn_cfg: Arc<tether_proto::ConnConfig>,
    hub: Mutex<Hub>,
    events: EventSink,
    next_conn: AtomicU64,
    /// Connections the server holds at most: `max_connections`, or what the descriptor limit allows if less.
    capacity: usize,
    /// `max_handshakes_per_ip`, or its default.
    handshakes_per_source: usize,
    /// Connections with a running task (admitted or handshaking); `busy` refusals are not counted.
    active: AtomicUsize,
    /// Connections accepted whose `HELLO` is not admitted yet, and the highest that count has been.
    handshakes: AtomicUsize,
    peak_handshakes: AtomicUsize,
    /// Counters and histograms (refusals, undeliverable and the rest), read by [`ServerHandle::metrics`].
    metrics: Metrics,
    /// Recent closed connections, for the operator.
    disconnects: DisconnectRing,
    /// Live copies of the event stream (admin SSE clients).
    watchers: Watchers,
    /// Lame duck: no one is admitted, and a drain task is saying goodbye to everyone.
    draining: AtomicBool,
    drain: Mutex<DrainState>,
    started: SystemTime,
    /// The admin listener's address, for the `listening` event.
    admin_addr: OnceLock<SocketAddr>,
    /// Operators' round-trip probes waiting for a `PONG` ([`ServerHandle::probe`]), woken at every round trip
    /// while there are any.
    probe_waiters: AtomicUsize,
    probe_done: Notify,
    /// Handshakes in flight and (when `max_per_ip` is set) connections, per source ([`source_of`]). An entry
    /// exists only while one of its counts is above zero.
    sources: Mutex<HashMap<IpAddr, SourceCount>>,
    /// Repeated log lines about one client are summarised.
    log: LogLimiter,
    /// Wakes the summary task when a line was first held back.
    log_wake: Notify,
    /// Base for the `last_rx` timestamps kept in atomics.
    origin: StdInstant,
    /// Wakes the presence-grace timer when the registry's next deadline may have moved.
    registry_wake: Notify,
    shutting_down: AtomicBool,
    /// Cluster mode ([`crate::cluster`]); `None` for a single node.
    cluster: Option<Arc<Cluster>>,
}

/// The server-wide book: sessions and presence, and how to reach each connection's task.
struct Hub {
    registry: Registry,
    conns: HashMap<ConnId, ConnHandle>,
    /// `ServerConfig::outbound_queue`, for pushes made while holding the hub.
    outbound_queue: usize,
    /// `PRESENCE` frames handed out so far (counted here, under the lock that sends them).
    presence_frames: u64,
    /// Cluster mode: sessions that end here are released in Redis ([`Hub::pump`]).
    cluster: Option<Arc<Cluster>>,
}

/// A drain in progress, or the last one.
#[derive(Default)]
struct DrainState {
    status: Option<DrainStatus>,
    task: Option<tokio::task::JoinHandle<()>>,
}

struct ConnHandle {
    control: Arc<Control>,
}

/// How other tasks reach a connection task: a close request (first wins, never blocked by queued frames) and a
/// bounded frame queue. The queue is a `VecDeque` that allocates only when something is queued and is released
/// when it drains: an idle connection pays nothing for it (a channel would pre-allocate a block of slots).
/// It also carries what the operator may ask about the connection; the task is its only writer.
struct Control {
    state: Mutex<ControlState>,
    /// Milliseconds after `Shared::origin` of the last frame received (for the id-conflict liveness rule).
    last_rx_ms: AtomicU64,
    peer: SocketAddr,
    /// Set once, when the session is admitted.
    session: OnceLock<SessionMeta>,
    /// Bytes on the socket; the core's frame counts last added to the server's totals (received in the high
    /// half, sent in the low); outbound bytes last added to the server's queued gauge.
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    frames_seen: AtomicU64,
    queued: AtomicU64,
    /// The last heartbeat round trip in microseconds (low half, 0 before the first) and how many there were (high
    /// half: a probe waits for it to move), in one word.
    rtt: AtomicU64,
}

/// What a session was admitted with.
struct SessionMeta {
    epoch: u64,
    since_at: StdInstant,
    heartbeat_ms: u32,
    timeout_ms: u32,
    version: u8,
}

struct ControlState {
    close: Option<CloseCmd>,
    frames: VecDeque<Frame>,
    /// The connection task, when it waits for a command.
    waker: Option<std::task::Waker>,
    /// The socket while it is open, -1 after: the kernel's view is read under this lock, and the task clears it
    /// before the socket closes, so a reused descriptor is never read. (A bare descriptor rather than an
    /// `Option`: it keeps this slot, one per connection, a word smaller.)
    fd: RawFd,
    /// An operator asked for a round-trip probe.
    probe: bool,
    /// Cluster mode: the decision about this connection's `HELLO`, waiting for its task.
    admit: Option<Box<clustered::Admit>>,
}

impl ControlState {
    fn new(fd: RawFd) -> ControlState {
        ControlState { close: None, frames: VecDeque::new(), waker: None, fd, probe: false, admit: None }
    }

    /// The socket, if it is still open.
    fn fd(&self) -> Option<RawFd> {
        (self.fd >= 0).then_some(self.fd)
    }

    fn wake(&mut self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    /// The socket is closing: forget it, and hand back a cluster admission that came too late.
    fn close(&mut self) -> Option<Box<clustered::Admit>> {
        self.fd = -1;
        self.admit.take()
    }
}

/// Why a frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PushError {
    /// The queue was full: the connection is now condemned as a slow consumer.
    Full,
}

#[derive(Debug, Clone)]
enum CloseCmd {
    /// Goodbye and linger (takeover, kick, shutdown).
    Bye(Bye),
    /// Refuse: flush the `BYE` and close (a delayed `auth_failed`).
    Reject(Bye),
    Abort(CloseReason),
}

enum Cmd {
    Frame(Frame),
    Close(CloseCmd),
    /// Measure the round trip now ([`ServerHandle::probe`]).
    Probe,
    /// Cluster mode: welcome or refuse the `HELLO` as decided.
    Admit(Box<clustered::Admit>),
}

impl Control {
    fn new(peer: SocketAddr, fd: RawFd, now_ms: u64) -> Control {
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
    fn kernel_view(&self) -> Option<KernelView> {
        let st = self.state.lock().expect("control lock");
        let fd = st.fd()?;
        let info = sockopt::tcp_info(fd)?;
        Some(KernelView { info, send_queue: sockopt::unacked_bytes(fd) })
    }

    /// Ask the task to close; the first request wins.
    fn request(&self, cmd: CloseCmd) {
        let mut st = self.state.lock().expect("control lock");
        if st.close.is_none() {
            st.close = Some(cmd);
            st.wake();
        }
    }

    /// Hand the cluster's decision about the `HELLO` to the task; given back when the connection is already
    /// closed (the caller then releases what it claimed).
    fn admit(&self, a: Box<clustered::Admit>) -> Result<(), Box<clustered::Admit>> {
        let mut st = self.state.lock().expect("control lock");
        if st.fd < 0 {
            return Err(a);
        }
        st.admit = Some(a);
        st.wake();
        Ok(())
    }

    /// The next command: a close request first, then queued frames in order. When there is none, `cx` is woken
    /// by the next push or request.
    fn poll_take(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Cmd> {
        let mut st = self.state.lock().expect("control lock");
        if let Some(c) = st.close.take() {
            return std::task::Poll::Ready(Cmd::Close(c));
        }
        if std::mem::take(&mut st.probe) {
            return std::task::Poll::Ready(Cmd::Probe);
        }
        if let Some(a) = st.admit.take() {
            return std::task::Poll::Ready(Cmd::Admit(a));
        }
        match st.frames.pop_front() {
            Some(f) => {
                if st.frames.is_empty() && st.frames.capacity() > 0 {
                    st.frames = VecDeque::new();
                }
                std::task::Poll::Ready(Cmd::Frame(f))
            }
            None => {
                if !st.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    st.waker = Some(cx.waker().clone());
                }
                std::task::Poll::Pending
            }
        }
    }
}

/// What one source holds.
#[derive(Debug, Default, Clone, Copy)]
struct SourceCount {
    handshakes: usize,
    connections: usize,
}

/// The unit per-address limits count: an IPv4 address, or an IPv6 /64 (what one host or subscriber is usually
/// given, so that an attacker cannot take every slot by walking its own prefix). IPv4-mapped addresses count as
/// IPv4.
pub fn source_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

impl ConnHandle {
    /// Queue a frame for the connection (at most `limit`); a full queue condemns it as a slow consumer.
    fn push(&self, frame: Frame, limit: usize) -> Result<(), PushError> {
        let mut st = self.control.state.lock().expect("control lock");
        if st.frames.len() >= limit.max(1) {
            if st.close.is_none() {
                st.close = Some(CloseCmd::Abort(CloseReason::SlowConsumer));
                st.wake();
            }
            return Err(PushError::Full);
        }
        st.frames.push_back(frame);
        st.wake();
        Ok(())
    }
}

impl Server {
    /// Bind the listener and apply the socket options to it (accepted sockets inherit them and get them again).
    pub async fn bind(cfg: ServerConfig) -> io::Result<Server> {
        let socket = if cfg.listen.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        socket.set_reuseaddr(true)?;
        socket.bind(cfg.listen)?;
        cfg.socket.apply(&socket)?;
        match sockopt::read_back(&socket) {
            Ok(eff) => tracing::info!("socket options in effect: {eff}"),
            Err(e) => tracing::warn!("could not read socket options back: {e}"),
        }
        let listener = socket.listen(LISTEN_BACKLOG)?;
        let capacity = match Capacity::measure() {
            Ok(c) => {
                tracing::info!(
                    "connection capacity {}: max_connections {}, file descriptor limit {} ({} open, {} kept for refusals)",
                    c.connections.min(cfg.max_connections),
                    cfg.max_connections,
                    c.limit,
                    c.open,
                    c.margin
                );
                if cfg.max_connections > c.connections {
                    tracing::warn!(
                        "max_connections {} is more than the file descriptor limit allows: beyond {} connections \
                         newcomers get BYE(busy); raise the limit (ulimit -n, LimitNOFILE= in a systemd unit)",
                        cfg.max_connections,
                        c.connections
                    );
                }
                c.connections.min(cfg.max_connections)
            }
            Err(e) => {
                tracing::warn!("cannot read the file descriptor limit ({e}); trusting max_connections");
                cfg.max_connections
            }
        };
        let mut cfg = cfg;
        let cluster = match cfg.cluster.clone() {
            Some(cc) => {
                cfg.server_id = cc.node_id.clone();
                let c = Cluster::new(cc).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                Some(Arc::new(c))
            }
            None => None,
        };
        let (events, rx) = EventSink::new(cfg.event_queue);
        let handshakes_per_source = cfg.max_handshakes_per_ip.unwrap_or((cfg.max_handshakes / 16).max(2));
        // Round-trip probes feed the metrics: off with them.
        let conn_cfg = tether_proto::ConnConfig {
            rtt_probe_every: cfg.conn.rtt_probe_every.filter(|_| cfg.metrics),
            ..cfg.conn.clone()
        };
        let shared = Arc::new(Shared {
            conn_cfg: Arc::new(conn_cfg),
            hub: Mutex::new(Hub {
                registry: Registry::new(cfg.registry.clone()),
                conns: HashMap::new(),
                outbound_queue: cfg.outbound_queue,
                presence_frames: 0,
                cluster: cluster.clone(),
            }),
            disconnects: DisconnectRing::new(cfg.disconnect_history),
            cfg,
            events,
            next_conn: AtomicU64::new(1),
            capacity,
            handshakes_per_source,
            active: AtomicUsize::new(0),
            handshakes: AtomicUsize::new(0),
            peak_handshakes: AtomicUsize::new(0),
            metrics: Metrics::default(),
            watchers: Watchers::default(),
            draining: AtomicBool::new(false),
            drain: Mutex::new(DrainState::default()),
            started: SystemTime::now(),
            admin_addr: OnceLock::new(),
            probe_waiters: AtomicUsize::new(0),
            probe_done: Notify::new(),
            sources: Mutex::new(HashMap::new()),
            log: LogLimiter::new(Duration::from_secs(10), 3, 4096),
            log_wake: Notify::new(),
            origin: driver::now(),
            registry_wake: Notify::new(),
            shutting_down: AtomicBool::new(false),
            cluster,
        });
        Ok(Server { listener, shared, events: Some(rx) })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The event stream (once). With the default bounded [`crate::EventQueue`], an application that falls
    /// behind loses events and is told how many ([`EventKind::Dropped`]); the server never waits for it. If the
    /// stream is never taken, events are discarded.
    pub fn events(&mut self) -> Option<EventStream> {
        self.events.take()
    }

    /// How many connections this server will hold: `max_connections`, or fewer if the file descriptor limit
    /// leaves room for fewer.
    pub fn capacity(&self) -> usize {
        self.shared.capacity
    }

    /// Announce the admin listener's address in the `listening` event (the HTTP layer lives outside this crate).
    pub fn set_admin_addr(&self, addr: SocketAddr) {
        let _ = self.shared.admin_addr.set(addr);
    }

    pub fn handle(&self) -> ServerHandle {
        ServerHandle { shared: self.shared.clone() }
    }

    /// Accept and serve until `shutdown` resolves, then shut down gracefully.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> io::Result<()> {
        drop(self.events.take());
        let shared = self.shared.clone();
        let admin = shared.admin_addr.get().copied();
        let mut tasks = JoinSet::new();
        let mut helpers =
            vec![tokio::spawn(registry_timer(shared.clone())), tokio::spawn(log_summaries(shared.clone()))];
        if let Some(every) = shared.cfg.stats_interval.filter(|d| !d.is_zero()) {
            helpers.push(tokio::spawn(stats_ticker(shared.clone(), every)));
        }
        if let Some(cluster) = &shared.cluster {
            let admin = admin.map(|a| a.to_string()).unwrap_or_default();
            *cluster.addrs.lock().expect("addrs lock") = (self.listener.local_addr()?.to_string(), admin);
            let host: Arc<dyn crate::cluster::Host> = shared.clone();
            helpers.extend(cluster.start(host));
            // Serve once the node sees the cluster; without Redis, after one lease, degraded.
            if !cluster.wait_ready(cluster.cfg.lease).await {
                tracing::warn!("cluster: Redis unreachable at start; serving local clients only until it answers");
            }
        }
        let node = shared.cluster.as_ref().map(|c| c.node_id().to_owned());
        shared.emit(EventKind::Listening { addr: self.listener.local_addr()?, admin, node });
        let mut bucket = shared.cfg.accept_rate.map(|r| TokenBucket::new(r, driver::now()));
        let mut reserve = Reserve::new();
        tokio::pin!(shutdown);
        let mut backoff = Duration::from_millis(10);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                Some(_) = tasks.join_next() => {}
                r = self.listener.accept() => match r {
                    Ok((stream, peer)) => {
                        backoff = Duration::from_millis(10);
                        reserve.restore();
                        let allowed = bucket.as_mut().is_none_or(|b| b.take(driver::now()));
                        self.admit_socket(&mut tasks, stream, peer, allowed);
                    }
                    Err(e) if is_resource_error(&e) => {
                        if self.refuse_with_reserve(&mut reserve).await {
                            continue;
                        }
                        tracing::warn!("accept: {e}; backing off {backoff:?}");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                        reserve.restore();
                    }
                    Err(e) => tracing::debug!("accept: {e}"),
                },
            }
        }
        drop(self.listener);
        shared.shutdown(&mut tasks).await;
        if let Some(cluster) = &shared.cluster {
            cluster.leave(Duration::from_secs(2)).await;
        }
        for h in helpers {
            h.abort();
        }
        Ok(())
    }

    /// Out of descriptors: free the reserved one, accept one waiting connection, tell it `busy` (a plain `BYE`
    /// written at once; over TLS there is no time for a handshake, so it is just closed) and close it, then take
    /// the reserve back. False when there was no reserve to spend or nothing to accept.
    async fn refuse_with_reserve(&self, reserve: &mut Reserve) -> bool {
        if !reserve.release() {
            return false;
        }
        let accepted = std::future::poll_fn(|cx| std::task::Poll::Ready(self.listener.poll_accept(cx))).await;
        let refused = match accepted {
            std::task::Poll::Ready(Ok((stream, peer))) => {
                let shared = &self.shared;
                let conn = shared.next_conn.fetch_add(1, Ordering::Relaxed);
                shared.metrics.accepted.fetch_add(1, Ordering::Relaxed);
                shared.metrics.refused_busy.fetch_add(1, Ordering::Relaxed);
                shared.metrics.count_disconnect(CloseReason::Busy);
                if shared.cfg.tls.is_none() {
                    let _ = stream.try_write(&Frame::Bye(bye(CloseReason::Busy, shared_retry(shared))).to_bytes());
                }
                drop(stream);
                let detail = Some("out of file descriptors".to_owned());
                shared.emit(EventKind::Closed {
                    client: None,
                    conn,
                    peer,
                    reason: CloseReason::Busy,
                    lateness: None,
                    by_peer: false,
                    detail,
                });
                true
            }
            _ => false,
        };
        reserve.restore();
        refused
    }

    fn admit_socket(&self, tasks: &mut JoinSet<()>, stream: TcpStream, peer: SocketAddr, rate_ok: bool) {
        let shared = self.shared.clone();
        let conn_id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = shared.cfg.socket.apply(&stream) {
            tracing::debug!(conn = conn_id, %peer, "socket options: {e}");
        }
        shared.metrics.accepted.fetch_add(1, Ordering::Relaxed);
        if shared.draining.load(Ordering::Relaxed) {
            // Lame duck: newcomers are sent where the drain sends everyone.
            shared.metrics.refused_draining.fetch_add(1, Ordering::Relaxed);
            let b = shared.drain_bye();
            tasks.spawn(refuse(shared, stream, peer, conn_id, b));
            return;
        }
        let full = shared.active.load(Ordering::Relaxed) >= shared.capacity;
        let handshaking = shared.handshakes.load(Ordering::Relaxed) >= shared.cfg.max_handshakes;
        if full || handshaking || !rate_ok {
            shared.metrics.refused_busy.fetch_add(1, Ordering::Relaxed);
            let b = bye(CloseReason::Busy, shared_retry(&shared));
            tasks.spawn(refuse(shared, stream, peer, conn_id, b));
            return;
        }
        {
            // One source may hold a share of the handshake slots (so that a single address stalling handshakes
            // cannot lock everyone else out) and, when configured, a number of connections.
            let key = source_of(peer.ip());
            let mut sources = shared.sources.lock().expect("sources lock");
            let src = sources.entry(key).or_default();
            let over_conns = shared.cfg.max_per_ip.is_some_and(|cap| src.connections >= cap);
            if over_conns || src.handshakes >= shared.handshakes_per_source {
                if src.handshakes == 0 && src.connections == 0 {
                    sources.remove(&key);
                }
                drop(sources);
                shared.metrics.refused_ip_limit.fetch_add(1, Ordering::Relaxed);
                let b = bye(CloseReason::IpLimit, shared_retry(&shared));
                tasks.spawn(refuse(shared, stream, peer, conn_id, b));
                return;
            }
            src.handshakes += 1;
            if shared.cfg.max_per_ip.is_some() {
                src.connections += 1;
            }
        }
        shared.active.fetch_add(1, Ordering::Relaxed);
        let now_handshaking = shared.handshakes.fetch_add(1, Ordering::Relaxed) + 1;
        shared.peak_handshakes.fetch_max(now_handshaking, Ordering::Relaxed);
        tasks.spawn(serve_conn(shared, stream, peer, conn_id));
    }
}

/// Accept-rate limit: `rate` tokens per second, at most `rate` banked. Only the accept loop touches it.
struct TokenBucket {
    rate: f64,
    tokens: f64,
    last: StdInstant,
}

impl TokenBucket {
    fn new(rate: u32, now: StdInstant) -> TokenBucket {
        TokenBucket { rate: rate.max(1) as f64, tokens: rate.max(1) as f64, last: now }
    }
    fn take(&mut self, now: StdInstant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

fn is_resource_error(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}

impl ServerHandle {
    /// Queue `payload` for `client` (delivered as `DATA` from the server application, with an empty peer). At most
    /// `max_frame - 2` bytes: the largest frame a client must accept.
    pub fn send(&self, client: &str, payload: Bytes) -> Result<(), SendToError> {
        let max = tether_proto::frame::max_payload(self.shared.cfg.conn.max_frame, false);
        if payload.len() > max {
            return Err(SendToError::TooLarge { len: payload.len(), max });
        }
        let payload = {
            let hub = self.shared.hub.lock().expect("hub lock");
            if let Some(h) = hub.registry.lookup(client).and_then(|c| hub.conns.get(&c)) {
                let limit = self.shared.cfg.outbound_queue;
                return h
                    .push(Frame::Data { peer: String::new(), payload }, limit)
                    .map_err(|PushError::Full| SendToError::SlowConsumer(client.into()));
            }
            payload
        };
        // Cluster mode: the node holding it delivers it.
        match self.shared.remote_node_of(client) {
            Some((cluster, node)) => {
                let msg = crate::cluster::wire::Msg::Send { client: client.into(), payload };
                cluster.send_to(&node, &msg).then_some(()).ok_or_else(|| SendToError::Offline(client.into()))
            }
            None => Err(SendToError::Offline(client.into())),
        }
    }

    /// Remove `client` with `BYE(kicked)`. Returns whether it was online.
    pub fn kick(&self, client: &str) -> bool {
        self.kick_with(client, Duration::ZERO)
    }

    /// Remove `client` with `BYE(kicked)` asking it to wait `retry_after` before reconnecting. Returns whether it
    /// was online.
    pub fn kick_with(&self, client: &str, retry_after: Duration) -> bool {
        {
            let hub = self.shared.hub.lock().expect("hub lock");
            if let Some(h) = hub.registry.lookup(client).and_then(|c| hub.conns.get(&c)) {
                h.control.request(CloseCmd::Bye(bye(CloseReason::Kicked, retry_after)));
                return true;
            }
        }
        // Cluster mode: the node holding it kicks it.
        match self.shared.remote_node_of(client) {
            Some((cluster, node)) => {
                let retry_after_ms = retry_after.as_millis().min(u32::MAX as u128) as u32;
                cluster.send_to(&node, &crate::cluster::wire::Msg::Kick { client: client.into(), retry_after_ms })
            }
            None => false,
        }
    }

    /// Cluster mode: the node table from Redis. `None` for a single node; an error when Redis does not answer.
    pub async fn cluster_nodes(&self) -> Option<Result<Vec<crate::cluster::store::NodeStatus>, String>> {
        let c = self.shared.cluster.clone()?;
        Some(c.nodes().await)
    }

    /// Every counter, gauge and histogram, read now.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.shared.metrics_snapshot()
    }

    /// Online sessions whose id starts with `prefix` and sorts after `after`, in id order, at most `limit`. Under
    /// the hub's lock only references are gathered and the first `limit` selected (linear); just those are
    /// copied, and the per-session details are read after.
    pub fn sessions(&self, prefix: &str, after: Option<&str>, limit: usize) -> Vec<SessionInfo> {
        let page: Vec<(String, Arc<Control>, ConnId, bool)> = {
            let hub = self.shared.hub.lock().expect("hub lock");
            let mut matching: Vec<(&str, ConnId, bool)> = hub
                .registry
                .sessions()
                .filter(|(id, _, _)| id.starts_with(prefix) && after.is_none_or(|a| *id > a))
                .collect();
            if matching.len() > limit && limit > 0 {
                matching.select_nth_unstable_by(limit - 1, |a, b| a.0.cmp(b.0));
            }
            matching.truncate(limit);
            matching.sort_unstable_by(|a, b| a.0.cmp(b.0));
            matching
                .into_iter()
                .filter_map(|(id, conn, suspect)| {
                    hub.conns.get(&conn).map(|h| (id.to_owned(), h.control.clone(), conn, suspect))
                })
                .collect()
        };
        page.into_iter()
            .filter_map(|(id, control, conn, suspect)| self.shared.session_info(id, conn, &control, suspect))
            .collect()
    }

    /// One online session and the kernel's view of its socket (`None` where the platform has no `TCP_INFO`).
    pub fn session(&self, client: &str) -> Option<(SessionInfo, Option<KernelView>)> {
        let (control, conn, suspect) = {
            let hub = self.shared.hub.lock().expect("hub lock");
            let (conn, suspect) = hub.registry.session(client)?;
            (hub.conns.get(&conn)?.control.clone(), conn, suspect)
        };
        let info = self.shared.session_info(client.to_owned(), conn, &control, suspect)?;
        Some((info, control.kernel_view()))
    }

    /// Ping `client` now and wait up to `wait` for its `PONG`; then read the kernel's view of its socket. The
    /// report tells a slow network from a client whose program does not answer while its kernel still does
    /// ([`ProbeReport::verdict`]). `None` when the client is not online.
    pub async fn probe(&self, client: &str, wait: Duration) -> Option<ProbeReport> {
        let control = {
            let hub = self.shared.hub.lock().expect("hub lock");
            let conn = hub.registry.lookup(client)?;
            hub.conns.get(&conn)?.control.clone()
        };
        let heartbeat = control.session.get().map(|m| Duration::from_millis(m.heartbeat_ms.into()));
        let shared = &self.shared;
        shared.probe_waiters.fetch_add(1, Ordering::AcqRel);
        let before = control.rtt.load(Ordering::Acquire) >> 32;
        {
            let mut st = control.state.lock().expect("control lock");
            st.probe = true;
            st.wake();
        }
        let started = tokio::time::Instant::now();
        let answered = tokio::time::timeout(wait, async {
            loop {
                let notified = shared.probe_done.notified();
                if control.rtt.load(Ordering::Acquire) >> 32 != before {
                    return;
                }
                notified.await;
            }
        })
        .await
        .is_ok();
        shared.probe_waiters.fetch_sub(1, Ordering::AcqRel);
        let app_rtt = answered.then(|| Duration::from_micros(control.rtt.load(Ordering::Acquire) & 0xffff_ffff));
        Some(ProbeReport {
            client: client.to_owned(),
            app_rtt,
            waited: started.elapsed(),
            heartbeat,
            kernel: control.kernel_view(),
        })
    }

    /// The most recent closed connections, newest first (`reason` only, when given; at most `limit`). Kept:
    /// `ServerConfig::disconnect_history`.
    pub fn disconnects(&self, reason: Option<CloseReason>, limit: usize) -> Vec<DisconnectRecord> {
        self.shared.disconnects.recent(reason, limit)
    }

    /// A live copy of every event from now on, for a watcher that may fall behind: one more than `capacity`
    /// events behind, it is cut off (see [`EventWatch`]), counted in the metrics, and the server goes on.
    pub fn watch_events(&self, capacity: usize) -> EventWatch {
        self.shared.watchers.add(capacity)
    }

    /// Lame duck: admit no one (newcomers get `BYE(server_shutdown)` naming `redirect`), and say
    /// `BYE(server_shutdown, retry_after, redirect)` to every connection in batches paced evenly over `spread`,
    /// so that the server the clients go to is not hit by one wave. Runs on the caller's tokio runtime.
    pub fn drain(&self, redirect: Option<String>, spread: Duration) -> Result<DrainStatus, DrainError> {
        let shared = &self.shared;
        if shared.shutting_down.load(Ordering::Relaxed) {
            return Err(DrainError::ShuttingDown);
        }
        let mut d = shared.drain.lock().expect("drain lock");
        if shared.draining.swap(true, Ordering::Relaxed) {
            return Err(DrainError::AlreadyDraining);
        }
        let mut targets: Vec<(ConnId, Arc<Control>)> = {
            let hub = shared.hub.lock().expect("hub lock");
            hub.conns.iter().map(|(id, h)| (*id, h.control.clone())).collect()
        };
        targets.sort_unstable_by_key(|(id, _)| *id);
        let status = DrainStatus {
            draining: true,
            total: targets.len(),
            sent: 0,
            remaining: targets.len(),
            redirect: redirect.clone(),
            spread,
            started: Some(SystemTime::now()),
        };
        d.status = Some(status.clone());
        tracing::info!("draining {} connections over {spread:?}, redirect {redirect:?}", targets.len());
        d.task = Some(tokio::spawn(drain_paced(shared.clone(), targets, redirect, spread)));
        Ok(status)
    }

    /// Stop draining: admit again. Goodbyes already sent stay sent; the rest are not sent.
    pub fn undrain(&self) -> DrainStatus {
        let mut d = self.shared.drain.lock().expect("drain lock");
        if let Some(t) = d.task.take() {
            t.abort();
        }
        self.shared.draining.store(false, Ordering::Relaxed);
        if let Some(s) = &mut d.status {
            s.draining = false;
        }
        drop(d);
        self.drain_status()
    }

    /// The current (or last) drain's progress.
    pub fn drain_status(&self) -> DrainStatus {
        let d = self.shared.drain.lock().expect("drain lock");
        let mut s = d.status.clone().unwrap_or_default();
        s.draining = self.shared.draining.load(Ordering::Relaxed);
        s.remaining = self.connections();
        s
    }

    /// Accepting new sessions: not draining and not shutting down.
    pub fn is_ready(&self) -> bool {
        !self.shared.draining.load(Ordering::Relaxed) && !self.shared.shutting_down.load(Ordering::Relaxed)
    }

    /// When the server was bound.
    pub fn started(&self) -> SystemTime {
        self.shared.started
    }

    /// The id this server gives in `WELCOME`.
    pub fn server_id(&self) -> &str {
        &self.shared.cfg.server_id
    }

    /// Ids with a live session.
    pub fn online(&self) -> usize {
        self.shared.hub.lock().expect("hub lock").registry.online()
    }

    /// Connection tasks running (admitted or handshaking).
    pub fn connections(&self) -> usize {
        self.shared.active.load(Ordering::Relaxed)
    }

    /// Connections accepted whose `HELLO` is not admitted yet.
    pub fn handshakes(&self) -> usize {
        self.shared.handshakes.load(Ordering::Relaxed)
    }

    /// The most handshakes that were ever in flight at once (never above `max_handshakes`).
    pub fn peak_handshakes(&self) -> usize {
        self.shared.peak_handshakes.load(Ordering::Relaxed)
    }

    /// Connections refused with `busy` so far.
    pub fn refused_busy(&self) -> u64 {
        self.shared.metrics.refused_busy.load(Ordering::Relaxed)
    }

    /// Connections refused with `ip_limit` so far.
    pub fn refused_ip_limit(&self) -> u64 {
        self.shared.metrics.refused_ip_limit.load(Ordering::Relaxed)
    }

    /// Events the application did not receive because it fell behind, so far.
    pub fn events_dropped(&self) -> u64 {
        self.shared.events.dropped()
    }

    /// All counters at once.
    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }
}

fn bye(reason: CloseReason, retry_after: Duration) -> Bye {
    Bye { reason, retry_after_ms: retry_after.as_millis().min(u32::MAX as u128) as u32, alternative: String::new() }
}

impl Shared {
    fn emit(&self, kind: EventKind) {
        let ev = ServerEvent { at: SystemTime::now(), kind };
        if self.watchers.watching() {
            let cut = self.watchers.send(&ev);
            if cut > 0 {
                self.metrics.watchers_cut.fetch_add(cut, Ordering::Relaxed);
                if self.log_allowed("event watcher cut off", "watchers") {
                    tracing::warn!("an event watcher fell behind and was cut off ({cut} so far in this window)");
                }
            }
        }
        if !self.events.emit(ev) && self.log_allowed("events dropped", "the application") {
            tracing::warn!(
                "the event reader is not keeping up: events are dropped and counted ({} so far)",
                self.events.dropped()
            );
        }
    }

    /// Whether a log line of `kind` about `key` may be written now (repeats are summarised later).
    fn log_allowed(&self, kind: &'static str, key: &str) -> bool {
        let allowed = self.log.check(driver::now(), kind, key);
        if !allowed {
            self.log_wake.notify_one();
        }
        allowed
    }

    fn stats(&self) -> Stats {
        let online = self.hub.lock().expect("hub lock").registry.online();
        Stats {
            connections: self.active.load(Ordering::Relaxed),
            online,
            handshakes: self.handshakes.load(Ordering::Relaxed),
            peak_handshakes: self.peak_handshakes.load(Ordering::Relaxed),
            refused_busy: self.metrics.refused_busy.load(Ordering::Relaxed),
            refused_ip_limit: self.metrics.refused_ip_limit.load(Ordering::Relaxed),
            undeliverable: self.metrics.undeliverable.load(Ordering::Relaxed),
            events_dropped: self.events.dropped(),
        }
    }

    fn metrics_snapshot(&self) -> MetricsSnapshot {
        let (online, subscriptions, presence_frames) = {
            let hub = self.hub.lock().expect("hub lock");
            (hub.registry.online(), hub.registry.subscriptions(), hub.presence_frames)
        };
        let m = &self.metrics;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let disconnects = m.disconnects();
        let cluster = self.cluster.as_ref().map(|c| {
            let mut snap = c.snapshot();
            snap.remote_sessions = self.hub.lock().expect("hub lock").registry.remote_online_count();
            snap
        });
        MetricsSnapshot {
            cluster,
            connections: self.active.load(Ordering::Relaxed),
            online,
            handshakes: self.handshakes.load(Ordering::Relaxed),
            subscriptions,
            outbound_queued: m.outbound_queued.load(Ordering::Relaxed).max(0) as u64,
            draining: self.draining.load(Ordering::Relaxed),
            accepted: load(&m.accepted),
            disconnects: (0..disconnects.len()).map(|i| (crate::metrics::reason_label(i), disconnects[i])).collect(),
            takeovers: load(&m.takeovers),
            id_conflicts: load(&m.id_conflicts),
            refused_busy: load(&m.refused_busy),
            refused_ip_limit: load(&m.refused_ip_limit),
            refused_auth: load(&m.refused_auth),
            refused_draining: load(&m.refused_draining),
            relayed: load(&m.relayed),
            undeliverable: load(&m.undeliverable),
            presence_frames,
            frames_in: load(&m.frames_in),
            frames_out: load(&m.frames_out),
            bytes_in: load(&m.bytes_in),
            bytes_out: load(&m.bytes_out),
            events_dropped: self.events.dropped(),
            watchers_cut: load(&m.watchers_cut),
            lateness: m.lateness.snapshot(),
            app_rtt: m.app_rtt.snapshot(),
            kernel_rtt: m.kernel_rtt.snapshot(),
            handshake: m.handshake.snapshot(),
            session: m.session.snapshot(),
        }
    }

    fn session_info(&self, client: String, conn: ConnId, c: &Control, suspect: bool) -> Option<SessionInfo> {
        let meta = c.session.get()?;
        let now = driver::now();
        let rtt_us = (c.rtt.load(Ordering::Relaxed) & 0xffff_ffff) as u32;
        Some(SessionInfo {
            client,
            conn,
            peer: c.peer,
            epoch: meta.epoch,
            since: SystemTime::now() - now.saturating_duration_since(meta.since_at),
            connected_for: now.saturating_duration_since(meta.since_at),
            last_frame_ago: now.saturating_duration_since(self.last_rx_of(c)),
            heartbeat: Duration::from_millis(meta.heartbeat_ms.into()),
            timeout: Duration::from_millis(meta.timeout_ms.into()),
            suspect,
            app_rtt: (rtt_us > 0).then(|| Duration::from_micros(rtt_us.into())),
            tls: self.cfg.tls.is_some(),
            version: meta.version,
            bytes_in: c.bytes_in.load(Ordering::Relaxed),
            bytes_out: c.bytes_out.load(Ordering::Relaxed),
        })
    }

    /// The goodbye for a newcomer while draining: `server_shutdown` with a `busy`-style retry-after, naming the
    /// drain's redirect.
    fn drain_bye(&self) -> Bye {
        let mut b = bye(CloseReason::ServerShutdown, shared_retry(self));
        let redirect = self.drain.lock().ok().and_then(|d| d.status.as_ref()?.redirect.clone());
        b.alternative = redirect.unwrap_or_default();
        b
    }

    /// A connection from `peer` is no longer handshaking.
    fn source_handshake_done(&self, peer: IpAddr) {
        self.release_source(peer, |s| s.handshakes = s.handshakes.saturating_sub(1));
    }

    fn release_source(&self, peer: IpAddr, f: impl FnOnce(&mut SourceCount)) {
        if let Ok(mut sources) = self.sources.lock() {
            let key = source_of(peer);
            if let Some(s) = sources.get_mut(&key) {
                f(s);
                if s.handshakes == 0 && s.connections == 0 {
                    sources.remove(&key);
                }
            }
        }
    }

    /// The limits a v2 `WELCOME` announces besides the maximum frame.
    fn welcome_extensions(&self) -> Vec<Extension> {
        let mut out = vec![Extension::u32(ext::MAX_SUBSCRIPTIONS, self.cfg.registry.max_subscriptions as u32)];
        if let Some(rate) = self.cfg.conn.max_data_rate {
            out.push(Extension::u32(ext::MAX_DATA_RATE, rate));
        }
        out
    }

    fn last_rx_of(&self, control: &Control) -> StdInstant {
        self.origin + Duration::from_millis(control.last_rx_ms.load(Ordering::Relaxed))
    }

    /// `BYE(server_shutdown)` to every connection, retry-after hints spread evenly over `shutdown_spread` and the
    /// `shutdown_redirect` address as the alternative, then wait up to `shutdown_grace` for the goodbyes and abort
    /// what is left.
    async fn shutdown(&self, tasks: &mut JoinSet<()>) {
        self.shutting_down.store(true, Ordering::Relaxed);
        {
            let hub = self.hub.lock().expect("hub lock");
            let mut ids: Vec<&ConnId> = hub.conns.keys().collect();
            ids.sort_unstable();
            let n = ids.len().max(1) as u32;
            for (i, id) in ids.into_iter().enumerate() {
                let retry = self.cfg.shutdown_spread * (i as u32 + 1) / n;
                let mut b = bye(CloseReason::ServerShutdown, retry);
                b.alternative = self.cfg.shutdown_redirect.clone().unwrap_or_default();
                hub.conns[id].control.request(CloseCmd::Bye(b));
            }
        }
        let all_done = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(self.cfg.shutdown_grace, all_done).await.is_err() {
            tracing::warn!("{} connections did not finish their goodbye in time; closing them", tasks.len());
            tasks.abort_all();
        }
    }
}

/// A drain's goodbyes: batches every [`DRAIN_TICK`], each the share of `spread` that tick covers, each `BYE`
/// with a retry-after jittered within the tick so that one batch's reconnects do not arrive as one burst either.
async fn drain_paced(
    shared: Arc<Shared>,
    targets: Vec<(ConnId, Arc<Control>)>,
    redirect: Option<String>,
    spread: Duration,
) {
    let ticks = (spread.as_nanos() / DRAIN_TICK.as_nanos()).max(1) as usize;
    let per_tick = targets.len().div_ceil(ticks).max(1);
    let mut tick = tokio::time::interval(DRAIN_TICK);
    for batch in targets.chunks(per_tick) {
        tick.tick().await;
        for (_, control) in batch {
            let mut b = bye(CloseReason::ServerShutdown, DRAIN_TICK.mul_f64(rand::random::<f64>()));
            b.alternative = redirect.clone().unwrap_or_default();
            control.request(CloseCmd::Bye(b));
        }
        if let Some(s) = shared.drain.lock().expect("drain lock").status.as_mut() {
            s.sent += batch.len();
        }
    }
    tracing::info!("drain: every goodbye sent ({})", targets.len());
}

/// How often a drain sends a batch of goodbyes.
const DRAIN_TICK: Duration = Duration::from_millis(100);

/// Logs a summary for each window of held-back log lines when it ends; sleeps while there are none.
async fn log_summaries(shared: Arc<Shared>) {
    loop {
        match shared.log.next_flush() {
            None => shared.log_wake.notified().await,
            Some(t) => tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await,
        }
        for s in shared.log.flush(driver::now()) {
            tracing::info!("{s}");
        }
    }
}

/// Emits a `stats` event every `every`.
async fn stats_ticker(shared: Arc<Shared>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        shared.emit(EventKind::Stats(shared.stats()));
    }
}

/// Runs `Registry::handle_timeout` at the registry's one deadline (presence grace).
async fn registry_timer(shared: Arc<Shared>) {
    loop {
        let next = shared.hub.lock().expect("hub lock").registry.poll_timeout();
        let sleep = async {
            match next {
                Some(t) => tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = sleep => {
                let mut hub = shared.hub.lock().expect("hub lock");
                hub.registry.handle_timeout(driver::now());
                hub.pump(None);
            }
            () = shared.registry_wake.notified() => {}
        }
    }
}

impl Hub {
    /// Carry out the registry's outputs: deliver `PRESENCE` frames, and return its session events. Frames for
    /// `own` (the calling connection) go straight into its state machine, so a large snapshot does not depend on
    /// its own queue.
    fn pump(&mut self, mut own: Option<(ConnId, &mut Connection, StdInstant)>) -> Vec<SessionEvent> {
        let mut events = Vec::new();
        while let Some(out) = self.registry.poll_output() {
            let (to, presence) = match out {
                Output::Notify { to, presence } => (to, presence),
                Output::Event(e) => {
                    // Cluster mode: a session of this node ended (after the grace): release it in Redis.
                    if let (Some(cluster), SessionEvent::Offline { client, epoch, reason, by_client, silent_for, .. }) =
                        (&self.cluster, &e)
                    {
                        clustered::release(cluster, client, *epoch, *reason, *by_client, *silent_for);
                    }
                    events.push(e);
                    continue;
                }
            };
            match &mut own {
                Some((id, conn, now)) if *id == to => {
                    let _ = conn.send(*now, Frame::Presence(presence));
                }
                _ => {
                    if let Some(h) = self.conns.get(&to) {
                        let _ = h.push(Frame::Presence(presence), self.outbound_queue);
                    }
                }
            }
            self.presence_frames += 1;
        }
        events
    }
}

/// Guard that keeps `active` and the hub's connection table honest however the task ends.
struct ConnGuard {
    shared: Arc<Shared>,
    conn_id: ConnId,
    /// Also holds the peer's address (kept once per connection, here).
    control: Arc<Control>,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        // However the task ended (its close event, or aborted at shutdown), it leaves nothing queued behind.
        if let Ok(mut st) = self.control.state.lock() {
            if let (Some(a), Some(cluster)) = (st.close(), &self.shared.cluster) {
                a.give_back(cluster, CloseReason::Reset, false);
            }
        }
        let queued = self.control.queued.swap(0, Ordering::Relaxed);
        self.shared.metrics.outbound_queued.fetch_sub(queued as i64, Ordering::Relaxed);
        if let Ok(mut hub) = self.shared.hub.lock() {
            hub.conns.remove(&self.conn_id);
        }
        if self.shared.cfg.max_per_ip.is_some() {
            self.shared.release_source(self.control.peer.ip(), |s| s.connections = s.connections.saturating_sub(1));
        }
        self.shared.active.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn serve_conn(shared: Arc<Shared>, stream: TcpStream, peer: SocketAddr, conn_id: ConnId) {
    let control = {
        let now_ms = driver::now().saturating_duration_since(shared.origin).as_millis() as u64;
        Arc::new(Control::new(peer, stream.as_raw_fd(), now_ms))
    };
    let _guard = ConnGuard { shared: shared.clone(), conn_id, control: control.clone() };
    if shared.shutting_down.load(Ordering::Relaxed) {
        control.request(CloseCmd::Bye(bye(CloseReason::ServerShutdown, shared.cfg.shutdown_spread)));
    }
    shared.hub.lock().expect("hub lock").conns.insert(conn_id, ConnHandle { control: control.clone() });
    // Accepted just before a drain began, too late for its list: it leaves like the others. (The hub's lock
    // orders this against the drain's snapshot of the connections.)
    if shared.draining.load(Ordering::Relaxed) {
        control.request(CloseCmd::Bye(shared.drain_bye()));
    }
    let mut conn = Connection::server(driver::now(), shared.conn_cfg.clone());
    // Where in its first 12 intervals the session's first round-trip probe falls.
    conn.set_ping_phase(rand::random::<f64>());
    let tls = tls_session(&shared);
    let mut hooks = ServerHooks { shared, conn_id, client: None, control, handshaking: true, grant: None };
    if let Ok(tls) = tls {
        drive(stream, tls, &mut conn, &mut hooks).await;
    }
    // However the connection ended (even before it started, on a TLS session error), it leaves the handshake
    // counts.
    hooks.handshake_done();
}

/// The retry-after for refusals at accept: `busy_retry_after` plus a random share of the spread window.
fn shared_retry(shared: &Shared) -> Duration {
    shared.cfg.busy_retry_after + shared.cfg.busy_retry_spread.mul_f64(rand::random::<f64>())
}

/// Refused at accept (`busy`, `ip_limit`): the `BYE` is flushed, then the socket closed. Nothing else is read or
/// kept.
async fn refuse(shared: Arc<Shared>, stream: TcpStream, peer: SocketAddr, conn_id: ConnId, b: Bye) {
    let now = driver::now();
    let mut conn = Connection::server(now, shared.conn_cfg.clone());
    conn.reject(now, b);
    let Ok(tls) = tls_session(&shared) else { return };
    let mut hooks = BusyHooks { shared, conn_id, peer };
    drive(stream, tls, &mut conn, &mut hooks).await;
}

/// A fresh rustls server session when the server speaks TLS. rustls fails here only on a configuration it
/// accepted at build time, so the error is logged and the connection dropped.
fn tls_session(shared: &Shared) -> Result<Option<Box<rustls::Connection>>, ()> {
    match &shared.cfg.tls {
        None => Ok(None),
        Some(t) => t.accept().map(Some).map_err(|e| tracing::error!("tls session: {e}")),
    }
}

struct BusyHooks {
    shared: Arc<Shared>,
    conn_id: ConnId,
    peer: SocketAddr,
}

impl Hooks for BusyHooks {
    type Cmd = ();
    fn on_event(&mut self, _conn: &mut Connection, _now: StdInstant, event: Event) {
        if let Event::Closed(c) = event {
            self.shared.metrics.count_disconnect(c.reason);
            let (conn, peer, by_peer) = (self.conn_id, self.peer, c.by_peer);
            let kind = EventKind::Closed {
                client: None,
                conn,
                peer,
                reason: c.reason,
                lateness: None,
                by_peer,
                detail: c.detail,
            };
            self.shared.emit(kind);
        }
    }
    fn on_cmd(&mut self, _conn: &mut Connection, _now: StdInstant, _cmd: ()) {}
    fn poll_cmd(&mut self, _cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<()>> {
        std::task::Poll::Ready(None)
    }
}

struct ServerHooks {
    shared: Arc<Shared>,
    conn_id: ConnId,
    /// The admitted client id, once `WELCOME` was sent.
    client: Option<String>,
    control: Arc<Control>,
    /// Still counted in `Shared::handshakes` (until admitted or closed).
    handshaking: bool,
    /// What the credential allows (no limit without authentication).
    grant: Option<crate::auth::Grant>,
}

impl ServerHooks {
    /// Leave the handshake counts (server-wide and per source), once.
    fn handshake_done(&mut self) {
        if std::mem::take(&mut self.handshaking) {
            self.shared.handshakes.fetch_sub(1, Ordering::Relaxed);
            self.shared.source_handshake_done(self.control.peer.ip());
        }
    }

    fn on_hello(&mut self, conn: &mut Connection, now: StdInstant, hello: tether_proto::Hello) {
        let shared = self.shared.clone();
        if let Some(auth) = &shared.cfg.auth {
            match auth.0.authenticate(&hello.client_id, &hello.credential, SystemTime::now()) {
                Ok(grant) => self.grant = Some(grant),
                Err(e) => {
                    // Refused, but only after a delay, to slow guessing. The connection stays counted as a
                    // handshake meanwhile (bounded by max_handshakes) and its input is capped by the core.
                    shared.metrics.refused_auth.fetch_add(1, Ordering::Relaxed);
                    if shared.log_allowed("auth failed", &hello.client_id) {
                        tracing::info!(conn = self.conn_id, peer = %self.control.peer, client = %hello.client_id, "auth failed: {e}");
                    }
                    let control = self.control.clone();
                    let delay = shared.cfg.auth_fail_delay;
                    tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        control.request(CloseCmd::Reject(bye(CloseReason::AuthFailed, Duration::ZERO)));
                    });
                    return;
                }
            }
        }
        if let Some(cluster) = shared.cluster.clone() {
            // Decided off this task (the holder's node is asked, the id claimed in Redis); the connection stays a
            // handshake until the decision comes back as a command.
            tokio::spawn(clustered::admit(shared, cluster, self.control.clone(), hello));
            return;
        }
        self.handshake_done();
        let mut hub = shared.hub.lock().expect("hub lock");
        let Hub { registry, conns, .. } = &mut *hub;
        let admission = registry.admit(now, &hello.client_id, hello.nonce, self.conn_id, |c| {
            conns.get(&c).map(|h| shared.last_rx_of(&h.control))
        });
        self.conclude(conn, now, hello, admission, hub);
    }

    /// Cluster mode: carry out the decision about this connection's `HELLO`.
    fn on_admit(&mut self, conn: &mut Connection, now: StdInstant, a: clustered::Admit) {
        self.handshake_done();
        let clustered::Admit { hello, decision } = a;
        let shared = self.shared.clone();
        match decision {
            clustered::Decision::Conflict { retry_after, node } => {
                conn.reject(now, bye(CloseReason::IdConflict, retry_after));
                shared.metrics.id_conflicts.fetch_add(1, Ordering::Relaxed);
                if let Some(node) = node {
                    tracing::debug!(conn = self.conn_id, client = %hello.client_id, "id conflict with a device on {node}");
                }
                shared.emit(EventKind::IdConflict {
                    client: hello.client_id,
                    holder_conn: 0,
                    newcomer_conn: self.conn_id,
                    peer: self.control.peer,
                    retry_after,
                });
            }
            clustered::Decision::Welcome { epoch, displaced } => {
                let hub = shared.hub.lock().expect("hub lock");
                // A newer session claimed the id while this one's claim was in flight: it wins.
                let newer_here = hub.registry.local_epoch(&hello.client_id).is_some_and(|e| e > epoch);
                let newer_there = hub.registry.remote_holder(&hello.client_id).is_some_and(|(_, e)| e > epoch);
                if newer_here || newer_there {
                    drop(hub);
                    conn.reject(now, bye(CloseReason::Takeover, Duration::ZERO));
                    return;
                }
                let mut hub = hub;
                // The conflict rule was applied before the claim (here or by the holder's node).
                let admission = hub.registry.admit_cluster(
                    now,
                    &hello.client_id,
                    hello.nonce,
                    self.conn_id,
                    epoch,
                    &displaced,
                    |_| None,
                );
                self.conclude(conn, now, hello, admission, hub);
            }
        }
    }

    /// Welcome or refuse, as the registry admitted; `hub` is held throughout.
    fn conclude(
        &mut self,
        conn: &mut Connection,
        now: StdInstant,
        hello: tether_proto::Hello,
        admission: Admission,
        mut hub: std::sync::MutexGuard<'_, Hub>,
    ) {
        let shared = self.shared.clone();
        match admission {
            Admission::Welcome { epoch, evicted } => {
                let (interval, timeout) = shared.cfg.heartbeat.negotiate(hello.heartbeat_ms);
                let welcome = Welcome {
                    version: tether_proto::frame::PROTOCOL_VERSION,
                    heartbeat_ms: interval.as_millis() as u32,
                    timeout_ms: timeout.as_millis() as u32,
                    epoch,
                    server_id: shared.cfg.server_id.clone(),
                    max_frame: None,
                    // v1 has no room for them: built only for a session that will carry them.
                    extensions: if conn.version() >= tether_proto::frame::V2 {
                        shared.welcome_extensions()
                    } else {
                        Vec::new()
                    },
                };
                let (heartbeat_ms, timeout_ms) = (welcome.heartbeat_ms, welcome.timeout_ms);
                conn.accept(now, welcome);
                shared.metrics.handshake.observe(now.saturating_duration_since(conn.opened()));
                let meta = SessionMeta { epoch, since_at: now, heartbeat_ms, timeout_ms, version: conn.version() };
                let _ = self.control.session.set(meta);
                let client = hello.client_id;
                if let Some(h) = evicted.and_then(|old| hub.conns.get(&old)) {
                    h.control.request(CloseCmd::Bye(bye(CloseReason::Takeover, Duration::ZERO)));
                }
                let session_events = hub.pump(Some((self.conn_id, conn, now)));
                drop(hub);
                for e in session_events {
                    if let SessionEvent::Takeover { old, new, epoch, same_device, .. } = e {
                        shared.metrics.takeovers.fetch_add(1, Ordering::Relaxed);
                        let peer = self.control.peer;
                        let client = client.clone();
                        shared.emit(EventKind::Takeover {
                            client,
                            old_conn: old,
                            new_conn: new,
                            peer,
                            epoch,
                            same_device,
                        });
                    }
                }
                shared.emit(EventKind::Online {
                    client: client.clone(),
                    conn: self.conn_id,
                    peer: self.control.peer,
                    epoch,
                    heartbeat: interval,
                    timeout,
                });
                self.client = Some(client);
            }
            Admission::Conflict { holder, retry_after } => {
                hub.pump(None);
                drop(hub);
                conn.reject(now, bye(CloseReason::IdConflict, retry_after));
                shared.metrics.id_conflicts.fetch_add(1, Ordering::Relaxed);
                shared.emit(EventKind::IdConflict {
                    client: hello.client_id,
                    holder_conn: holder,
                    newcomer_conn: self.conn_id,
                    peer: self.control.peer,
                    retry_after,
                });
            }
        }
    }

    fn on_data(&mut self, conn: &mut Connection, now: StdInstant, to: String, payload: Bytes) {
        let Some(from) = self.client.clone() else { return };
        if to.is_empty() {
            self.shared.emit(EventKind::Data { client: from, conn: self.conn_id, payload });
            return;
        }
        let local = {
            let hub = self.shared.hub.lock().expect("hub lock");
            let limit = self.shared.cfg.outbound_queue;
            match hub.registry.lookup(&to).and_then(|c| hub.conns.get(&c)) {
                Some(h) => Ok(h.push(Frame::Data { peer: from, payload }, limit).is_ok()),
                None => Err((from, payload)),
            }
        };
        let delivered = match local {
            Ok(delivered) => delivered,
            // Cluster mode: the node holding `to` delivers it (or answers that it is online nowhere).
            Err((from, payload)) => self.shared.relay_remote(&from, &to, payload),
        };
        if delivered {
            self.shared.metrics.relayed.fetch_add(1, Ordering::Relaxed);
        }
        if !delivered {
            // Told to the sender and counted; no event per message, which one sender could use to crowd out
            // everyone else's events.
            self.shared.metrics.undeliverable.fetch_add(1, Ordering::Relaxed);
            let _ = conn.send(now, Frame::Undeliverable { to, why: Undeliverable::NotOnline });
        }
    }

    /// The core refused to relay an oversized payload and told the sender; tell the application and the log.
    fn on_relay_too_large(&mut self, to: String, len: usize) {
        let Some(from) = self.client.clone() else { return };
        if self.shared.log_allowed("relay refused: payload too large", &from) {
            let max = tether_proto::frame::max_relay_payload(self.shared.cfg.conn.max_frame);
            tracing::info!(conn = self.conn_id, client = %from, "DATA to {to} not relayed: {len} bytes, relay maximum {max}");
        }
        self.shared.metrics.undeliverable.fetch_add(1, Ordering::Relaxed);
        let why = Undeliverable::TooLarge;
        self.shared.emit(EventKind::Undeliverable { client: from, conn: self.conn_id, to, len, why });
    }

    /// A heartbeat round trip: into the histograms, beside the kernel's smoothed RTT read at the same moment.
    fn on_rtt(&mut self, rtt: Duration) {
        let us = rtt.as_micros().clamp(1, u32::MAX as u128) as u64;
        let count = (self.control.rtt.load(Ordering::Relaxed) >> 32) + 1;
        self.control.rtt.store((count << 32) | us, Ordering::Release);
        if self.shared.probe_waiters.load(Ordering::Acquire) > 0 {
            self.shared.probe_done.notify_waiters();
        }
        if !self.shared.cfg.metrics {
            return;
        }
        let m = &self.shared.metrics;
        m.app_rtt.observe(rtt);
        let fd = self.control.state.lock().expect("control lock").fd();
        if let Some(info) = fd.and_then(sockopt::tcp_info) {
            m.kernel_rtt.observe(info.rtt);
        }
    }

    /// Count a closed connection: by reason, its lateness and session length, and in the ring of recent ones.
    fn record_close(&self, conn: &Connection, now: StdInstant, c: &tether_proto::Closed, last_seen: StdInstant) {
        let m = &self.shared.metrics;
        m.count_disconnect(c.reason);
        if let Some(l) = c.lateness {
            m.lateness.observe(l);
        }
        let session = self.control.session.get();
        if let Some(meta) = session {
            m.session.observe(now.saturating_duration_since(meta.since_at));
        }
        self.shared.disconnects.push(DisconnectRecord {
            at: SystemTime::now(),
            conn: self.conn_id,
            client: self.client.clone(),
            peer: self.control.peer,
            reason: c.reason,
            by_peer: c.by_peer,
            lateness: c.lateness,
            silent_for: session.map(|_| now.saturating_duration_since(last_seen)),
            duration: now.saturating_duration_since(conn.opened()),
            bytes_in: self.control.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.control.bytes_out.load(Ordering::Relaxed),
            detail: c.detail.clone(),
        });
    }

    fn on_closed(&mut self, conn: &Connection, now: StdInstant, c: tether_proto::Closed) {
        self.handshake_done();
        // The socket closes right after this: the operator's view of it ends here.
        // (Its last frame and queued-byte counts settle at the driver's next flush and in `ConnGuard`.)
        let unadmitted = self.control.state.lock().expect("control lock").close();
        // Cluster mode: claimed for this connection, which closed before it could be welcomed.
        if let (Some(a), Some(cluster)) = (unadmitted, &self.shared.cluster) {
            a.give_back(cluster, c.reason, c.by_peer);
        }
        let last_seen = conn.last_rx().unwrap_or(now);
        let by_peer = c.by_peer;
        self.record_close(conn, now, &c, last_seen);
        let holder = {
            let mut hub = self.shared.hub.lock().expect("hub lock");
            let holder = self.client.as_deref().is_some_and(|id| hub.registry.lookup(id) == Some(self.conn_id));
            hub.registry.disconnect(now, self.conn_id, self.client.as_deref(), c.reason, by_peer, last_seen);
            hub.pump(None);
            holder
        };
        self.shared.registry_wake.notify_one();
        let (conn_id, peer, reason, lateness, detail) =
            (self.conn_id, self.control.peer, c.reason, c.lateness, c.detail);
        // Every close is an event (the application's record, which the CLI prints); the log line repeats it for
        // debugging only, so a busy server's INFO log is not one line per connection. Summarised per client (or
        // per address before a session exists) and reason when it repeats.
        if reason != CloseReason::Bye && tracing::enabled!(tracing::Level::DEBUG) {
            let key = match &self.client {
                Some(client) => format!("{client}, {reason}"),
                None => format!("{}, {reason}", peer.ip()),
            };
            if self.shared.log_allowed("closed", &key) {
                let by = if by_peer { "by the peer" } else { "by the server" };
                tracing::debug!(conn = conn_id, %peer, client = ?self.client, detail, "closed {by}: {reason}");
            }
        }
        let kind = match (&self.client, holder) {
            (Some(client), true) => EventKind::Offline {
                client: client.clone(),
                conn: conn_id,
                peer,
                reason,
                lateness,
                silent_for: now.saturating_duration_since(last_seen),
                by_peer,
                detail,
            },
            (client, _) => {
                EventKind::Closed { client: client.clone(), conn: conn_id, peer, reason, lateness, by_peer, detail }
            }
        };
        self.shared.emit(kind);
    }
}

impl Hooks for ServerHooks {
    type Cmd = Cmd;

    fn on_event(&mut self, conn: &mut Connection, now: StdInstant, event: Event) {
        match event {
            Event::Hello(h) => self.on_hello(conn, now, h),
            Event::Data { peer, payload } => self.on_data(conn, now, peer, payload),
            Event::Subscribe(ids) => {
                if let Some(denied) = self.grant.as_ref().and_then(|g| ids.iter().find(|id| !g.allows(id))) {
                    if self.shared.log_allowed("subscription not granted", self.client.as_deref().unwrap_or("")) {
                        tracing::info!(conn = self.conn_id, client = ?self.client, "subscription to {denied} not granted");
                    }
                    conn.reject(now, bye(CloseReason::AuthFailed, Duration::ZERO));
                    return;
                }
                let mut hub = self.shared.hub.lock().expect("hub lock");
                match hub.registry.subscribe(now, self.conn_id, &ids) {
                    Ok(()) => {
                        hub.pump(Some((self.conn_id, conn, now)));
                    }
                    Err(e) => {
                        drop(hub);
                        if self.shared.log_allowed("subscription refused", self.client.as_deref().unwrap_or("")) {
                            tracing::info!(conn = self.conn_id, client = ?self.client, "subscription refused: {e}");
                        }
                        conn.reject(now, bye(CloseReason::SubscriptionRefused, Duration::ZERO));
                    }
                }
            }
            Event::Unsubscribe(ids) => {
                self.shared.hub.lock().expect("hub lock").registry.unsubscribe(self.conn_id, &ids)
            }
            Event::Suspect { silent_for } => {
                let Some(client) = self.client.clone() else { return };
                let mut hub = self.shared.hub.lock().expect("hub lock");
                hub.registry.suspect(self.conn_id, &client, silent_for);
                hub.pump(Some((self.conn_id, conn, now)));
                let own = hub.registry.lookup(&client) == Some(self.conn_id);
                let epoch = hub.registry.local_epoch(&client).filter(|_| own);
                drop(hub);
                if let (Some(cluster), Some(epoch)) = (&self.shared.cluster, epoch) {
                    let silent_ms = silent_for.as_millis().min(u32::MAX as u128) as u32;
                    let msg = crate::cluster::wire::Msg::Suspect { client: client.clone(), epoch, silent_ms };
                    cluster.publish_presence(&msg);
                }
                self.shared.emit(EventKind::Suspect {
                    client,
                    conn: self.conn_id,
                    peer: self.control.peer,
                    silent_for,
                });
            }
            Event::Recovered => {
                let Some(client) = self.client.clone() else { return };
                let mut hub = self.shared.hub.lock().expect("hub lock");
                hub.registry.recovered(self.conn_id, &client);
                hub.pump(Some((self.conn_id, conn, now)));
                let own = hub.registry.lookup(&client) == Some(self.conn_id);
                let epoch = hub.registry.local_epoch(&client).filter(|_| own);
                drop(hub);
                if let (Some(cluster), Some(epoch)) = (&self.shared.cluster, epoch) {
                    let msg = crate::cluster::wire::Msg::Recovered { client: client.clone(), epoch };
                    cluster.publish_presence(&msg);
                }
                self.shared.emit(EventKind::Recovered { client, conn: self.conn_id, peer: self.control.peer });
            }
            Event::Rtt(rtt) => self.on_rtt(rtt),
            Event::RelayTooLarge { to, len } => self.on_relay_too_large(to, len),
            Event::Closed(c) => self.on_closed(conn, now, c),
            // Client-only events cannot come out of a server-role connection.
            Event::Welcome(_) | Event::Presence(_) | Event::Undeliverable { .. } => {}
        }
    }

    fn on_cmd(&mut self, conn: &mut Connection, now: StdInstant, cmd: Cmd) {
        match cmd {
            Cmd::Frame(f) => {
                let _ = conn.send(now, f);
            }
            Cmd::Close(CloseCmd::Bye(b)) => conn.close(now, b),
            Cmd::Close(CloseCmd::Reject(b)) => conn.reject(now, b),
            Cmd::Close(CloseCmd::Abort(r)) => conn.abort(now, r),
            Cmd::Probe => conn.probe_now(now),
            Cmd::Admit(a) => self.on_admit(conn, now, *a),
        }
    }

    fn poll_cmd(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Cmd>> {
        self.control.poll_take(cx).map(Some)
    }

    fn on_progress(&mut self, conn: &Connection) {
        if let Some(t) = conn.last_rx() {
            let ms = t.saturating_duration_since(self.shared.origin).as_millis() as u64;
            self.control.last_rx_ms.store(ms, Ordering::Relaxed);
        }
    }

    /// Traffic into the connection's own counts (the task is their only writer: plain loads and stores) and, with
    /// metrics on, the server's totals (relaxed atomic adds, no lock).
    fn on_io(&mut self, conn: &Connection, read: usize, written: usize) {
        let c = &self.control;
        if read > 0 {
            c.bytes_in.store(c.bytes_in.load(Ordering::Relaxed) + read as u64, Ordering::Relaxed);
        }
        if written > 0 {
            c.bytes_out.store(c.bytes_out.load(Ordering::Relaxed) + written as u64, Ordering::Relaxed);
        }
        if !self.shared.cfg.metrics {
            return;
        }
        let m = &self.shared.metrics;
        if read > 0 {
            m.bytes_in.fetch_add(read as u64, Ordering::Relaxed);
        }
        if written > 0 {
            m.bytes_out.fetch_add(written as u64, Ordering::Relaxed);
        }
        let (rx, tx) = conn.frame_counts();
        let seen = c.frames_seen.load(Ordering::Relaxed);
        let (seen_rx, seen_tx) = ((seen >> 32) as u32, seen as u32);
        if (rx, tx) != (seen_rx, seen_tx) {
            c.frames_seen.store((u64::from(rx) << 32) | u64::from(tx), Ordering::Relaxed);
            if rx != seen_rx {
                m.frames_in.fetch_add(u64::from(rx.wrapping_sub(seen_rx)), Ordering::Relaxed);
            }
            if tx != seen_tx {
                m.frames_out.fetch_add(u64::from(tx.wrapping_sub(seen_tx)), Ordering::Relaxed);
            }
        }
        let pending = if conn.is_closed() { 0 } else { conn.pending_tx() as u64 };
        let reported = c.queued.load(Ordering::Relaxed);
        if pending != reported {
            c.queued.store(pending, Ordering::Relaxed);
            m.outbound_queued.fetch_add(pending as i64 - reported as i64, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod size_guard {
    use super::*;

    /// Every idle connection holds one task whose future is this big: a regression here is memory per
    /// connection (see BENCHMARKS.md), and so is its `Control` on the heap. Measured with rustc 1.95 (debug build):
    /// future 1000 bytes, Connection 384, Control 240 (the operator's view of the session and its traffic
    /// counts included, and the slot a cluster admission arrives in).
    #[tokio::test]
    async fn per_connection_task_stays_small() {
        let cfg = ServerConfig { listen: "127.0.0.1:0".parse().unwrap(), ..Default::default() };
        let server = Server::bind(cfg).await.unwrap();
        let c = TcpStream::connect(server.local_addr().unwrap()).await.unwrap();
        let peer = c.local_addr().unwrap();
        let f = serve_conn(server.shared.clone(), c, peer, 1);
        assert!(std::mem::size_of_val(&f) <= 1024, "serve_conn future is {} bytes", std::mem::size_of_val(&f));
        assert!(std::mem::size_of::<Connection>() <= 384, "Connection is {} bytes", std::mem::size_of::<Connection>());
        assert!(std::mem::size_of::<Control>() <= 240, "Control is {} bytes", std::mem::size_of::<Control>());
        drop(f);
    }
}
