//! The tokio server: bind, the accept loop and its refusals, the background tickers, graceful shutdown.
//!
//! # Layout
//! [`Server::bind`] opens the listener (options set and read back once, logged); [`Server::run`] accepts until
//! the shutdown future resolves ([`Server::accepting`] tells when it starts), then says `BYE(server_shutdown)` to
//! everyone with retry-after hints spread over a window and waits (bounded) for the goodbyes, logging what it
//! waits for, the longest it will wait and how it ended. Each admitted connection (and each refusal on its way
//! out) goes to one of the event loops (`crate::evloop`), which drive it with its [`Role`]'s hooks. The rooms
//! below hold one idea each, lowest first (a room uses only the rooms above it in this list, and none uses this
//! file):
//! - `limits`: the accept-rate token bucket and the per-source counts (a leaf).
//! - `probes`: operators' round-trip probes in flight, and how a probed session ended during one (a leaf).
//! - `forgotten`: the `middlebox_forgot` diagnosis: a connection the path forgot, told from one the client
//!   dropped (a leaf).
//! - `control`: a connection's control slot, the commands other tasks send it, and the cluster's admission
//!   decision (a leaf: it knows neither the hub nor the shared state).
//! - `held`: the reliable sessions' table behind its lock, and how its decisions reach connections (a leaf
//!   besides `control`).
//! - `hub`: the sans-IO `Registry` and the connection table behind one mutex, and the pump that carries out
//!   the registry's outputs.
//! - `state`: `Shared`, the state every task shares: emit, stats, metrics and session snapshots.
//! - `clustered`: cluster mode's admission and what other nodes' messages do here.
//! - `session`: one connection's life: `open` and the hooks where a `HELLO` is decided, a frame is
//!   relayed, and a verdict becomes an event.
//! - `handle`: [`ServerHandle`], the application's and the operator's API, and the paced drain.
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
//! Log lines about one client are summarised by a [`crate::loglimit::LogLimiter`] when they repeat, and nothing here writes to a
//! stream that could block: the binary's log writer is non-blocking.
//!
//! # Rules
//! This file owns the listener, the event loops' `JoinSet` and the helper tasks; it holds no lock across an
//! `.await`. The lock order everywhere in the server is: the drain lock (only `ServerHandle::drain` holds it
//! while taking another), then the hub, then the reliable sessions' table, then a connection's control slot;
//! the sources, probes and log-limiter locks are leaves taken alone.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant as StdInstant};

use tether_proto::{Bye, CloseReason, ConnId, Connection, Event, Frame};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::net::TcpSocket;
use tokio::task::JoinSet;

use crate::cluster::Cluster;
use crate::config::ServerConfig;
use crate::driver::{self, Hooks};
use crate::event::{EventKind, EventSink, EventStream};
use crate::evloop::{Loops, New};
use crate::fdlimit::{Capacity, Reserve};
use crate::sockopt;

mod clustered;
mod control;
mod forgotten;
mod handle;
mod held;
mod hub;
mod limits;
mod probes;
mod session;
mod state;

use control::{bye, CloseCmd};
pub use handle::{KickError, Receipt, SendToError, ServerHandle};
pub use held::Delivery;
pub use limits::source_of;
use limits::TokenBucket;
use state::Shared;

const LISTEN_BACKLOG: u32 = 4096;

/// How long a graceful shutdown lets the cluster's outbox send the goodbyes' releases before leaving.
const LEAVE_PATIENCE: Duration = Duration::from_secs(2);

/// A bound, not yet running server.
pub struct Server {
    /// Registered with tokio for readiness only: accepted sockets go to the event loops unregistered.
    listener: AsyncFd<std::net::TcpListener>,
    shared: Arc<Shared>,
    events: Option<EventStream>,
    /// Told when the accept loop starts ([`Server::accepting`]), for a service manager's readiness.
    accepting: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Server {
    /// Bind the listener and apply the socket options to it (accepted sockets inherit them and get them again).
    pub async fn bind(cfg: ServerConfig) -> io::Result<Server> {
        let socket = if cfg.listen.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        socket.set_reuseaddr(true)?;
        socket.bind(cfg.listen)?;
        cfg.socket.apply(&socket)?;
        // For the log below: each connection gets its own once its heartbeat is negotiated.
        if let Some(cap) = cfg.socket.rto_max.for_interval(cfg.heartbeat.interval) {
            sockopt::cap_retransmissions(&socket, cap);
        }
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
        cfg.listen = listener.local_addr()?; // port 0 resolved, for `ServerHandle::local_addr`

        // SAFETY: the std listener owns its descriptor, and the `AsyncFd` owns the listener until it is dropped.
        let listener = unsafe { AsyncFd::register_with_interest(listener.into_std()?, Interest::READABLE) }
            .map_err(io::Error::from)?;
        let cluster = match cfg.cluster.clone() {
            Some(cc) => {
                cfg.server_id = cc.node_id.clone();
                let c = Cluster::new(cc).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                let hold = &cfg.hold;
                c.set_rel_bounds(crate::cluster::reliable::Bounds {
                    expiry: hold.expiry,
                    messages: hold.per_session.messages,
                    bytes: hold.per_session.bytes,
                    total_bytes: hold.total_bytes,
                    max_frame: cfg.conn.max_frame,
                });
                Some(Arc::new(c))
            }
            None => None,
        };
        let (events, rx) = EventSink::server(cfg.event_queue);
        let shared = Arc::new(Shared::new(cfg, capacity, cluster, events));
        Ok(Server { listener, shared, events: Some(rx), accepting: None })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.get_ref().local_addr()
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

    pub fn handle(&self) -> ServerHandle {
        ServerHandle { shared: self.shared.clone() }
    }

    /// A future that resolves `true` once [`Server::run`] accepts connections: at once after the `listening` event
    /// on a single node, in cluster mode once the node has joined (or has given up waiting for Redis for one lease
    /// and serves its own clients). It resolves `false` if the server stops before that (it cannot join). Only the
    /// latest call's future is told.
    pub fn accepting(&mut self) -> impl Future<Output = bool> + Send + 'static {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.accepting = Some(tx);
        async move { rx.await.is_ok() }
    }

    /// Accept and serve until `shutdown` resolves, then shut down gracefully.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> io::Result<()> {
        drop(self.events.take());
        let shared = self.shared.clone();
        let admin = shared.admin_addr.get().copied();
        let mut tasks = JoinSet::new();
        let loops = Loops::start(&mut tasks)?;
        let mut helpers =
            vec![tokio::spawn(registry_timer(shared.clone())), tokio::spawn(log_summaries(shared.clone()))];
        if shared.cluster.is_none() {
            helpers.push(tokio::spawn(expiry_timer(shared.clone())));
        }
        if let Some(every) = shared.cfg.stats_interval.filter(|d| !d.is_zero()) {
            helpers.push(tokio::spawn(stats_ticker(shared.clone(), every)));
        }
        let node = shared.cluster.as_ref().map(|c| c.node_id().to_owned());
        tokio::pin!(shutdown);
        // A shutdown asked for while the node is still joining is carried out at once, not after the join.
        let mut stopped = false;
        shared.emit(EventKind::Listening { addr: self.listener.get_ref().local_addr()?, admin, node });
        if let Some(cluster) = &shared.cluster {
            let admin = admin.map(|a| a.to_string()).unwrap_or_default();
            cluster.set_addrs(self.listener.get_ref().local_addr()?.to_string(), admin);
            let host: Arc<dyn crate::cluster::Host> = shared.clone();
            helpers.extend(cluster.start(host));
            // Accept once the node sees the cluster (joined, its view complete); without Redis, after one lease,
            // degraded. Connections wait in the listen queue meanwhile.
            let ready = tokio::select! {
                r = cluster.wait_ready(cluster.lease()) => r,
                () = &mut shutdown => {
                    stopped = true;
                    Ok(true)
                }
            };
            match ready {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(
                        "cluster: not joined within one lease (Redis unreachable, or this node id's previous lease \
                         still running); serving local clients only until it joins"
                    )
                }
                Err(why) => {
                    for h in helpers {
                        h.abort();
                    }
                    return Err(io::Error::other(format!("cannot join the cluster: {why}")));
                }
            }
        }
        let mut bucket = shared.cfg.accept_rate.map(|r| TokenBucket::new(r, driver::now()));
        let mut reserve = Reserve::new();
        let cluster = shared.cluster.clone();
        let fatal = async move {
            match cluster {
                Some(c) => c.wait_fatal().await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(fatal);
        let mut cannot_join = None;
        let mut backoff = Duration::from_millis(10);
        if let Some(tx) = self.accepting.take().filter(|_| !stopped) {
            let _ = tx.send(());
        }
        loop {
            if stopped {
                break;
            }
            tokio::select! {
                () = &mut shutdown => break,
                why = &mut fatal => {
                    tracing::error!("cluster: {why}; shutting down");
                    cannot_join = Some(why);
                    break;
                }
                Some(ended) = tasks.join_next() => {
                    tracing::error!("an event loop ended while the server runs (a bug): {ended:?}");
                }
                r = self.listener.async_io(Interest::READABLE, accept) => match r {
                    Ok((sock, peer)) => {
                        backoff = Duration::from_millis(10);
                        reserve.restore();
                        let allowed = bucket.as_mut().is_none_or(|b| b.take(driver::now()));
                        self.admit_socket(&loops, sock, peer, allowed);
                    }
                    Err(e) if is_resource_error(&e) => {
                        if self.refuse_with_reserve(&mut reserve) {
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
        goodbye_all(&shared, &loops, &mut tasks).await;
        if let Some(cluster) = &shared.cluster {
            cluster.leave(LEAVE_PATIENCE).await;
        }
        for h in helpers {
            h.abort();
        }
        match cannot_join {
            Some(why) => Err(io::Error::other(format!("cannot join the cluster: {why}"))),
            None => Ok(()),
        }
    }

    /// Out of descriptors: free the reserved one, accept one waiting connection, tell it `busy` (a plain `BYE`
    /// written at once; over TLS there is no time for a handshake, so it is just closed) and close it, then take
    /// the reserve back. False when there was no reserve to spend or nothing to accept.
    fn refuse_with_reserve(&self, reserve: &mut Reserve) -> bool {
        if !reserve.release() {
            return false;
        }
        let refused = match self.listener.try_io(Interest::READABLE, accept) {
            Ok((stream, peer)) => {
                let shared = &self.shared;
                let conn = shared.next_conn.fetch_add(1, Ordering::Relaxed);
                shared.metrics.accepted.fetch_add(1, Ordering::Relaxed);
                shared.metrics.refused_busy.fetch_add(1, Ordering::Relaxed);
                shared.metrics.count_disconnect(CloseReason::Busy);
                if shared.cfg.tls.is_none() {
                    let b = Frame::Bye(bye(CloseReason::Busy, shared.busy_retry())).to_bytes();
                    let _ = std::io::Write::write(&mut &stream, &b);
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

    fn admit_socket(&self, loops: &Loops<Role>, sock: mio::net::TcpStream, peer: SocketAddr, rate_ok: bool) {
        let shared = self.shared.clone();
        let conn_id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = shared.cfg.socket.apply(&sock) {
            tracing::debug!(conn = conn_id, %peer, "socket options: {e}");
        }
        shared.metrics.accepted.fetch_add(1, Ordering::Relaxed);
        if shared.draining.load(Ordering::Relaxed) {
            // Lame duck: newcomers are sent where the drain sends everyone.
            shared.metrics.refused_draining.fetch_add(1, Ordering::Relaxed);
            let b = shared.drain_bye();
            refuse(loops, shared, sock, peer, conn_id, b);
            return;
        }
        let full = shared.active.load(Ordering::Relaxed) >= shared.capacity;
        let handshaking = shared.handshakes.load(Ordering::Relaxed) >= shared.cfg.max_handshakes;
        if full || handshaking || !rate_ok {
            shared.metrics.refused_busy.fetch_add(1, Ordering::Relaxed);
            let b = bye(CloseReason::Busy, shared.busy_retry());
            refuse(loops, shared, sock, peer, conn_id, b);
            return;
        }
        // One source may hold a share of the handshake slots (so that a single address stalling handshakes
        // cannot lock everyone else out) and, when configured, a number of connections.
        if !shared.sources.admit(peer.ip(), shared.handshakes_per_source, shared.cfg.max_per_ip) {
            shared.metrics.refused_ip_limit.fetch_add(1, Ordering::Relaxed);
            let b = bye(CloseReason::IpLimit, shared.busy_retry());
            refuse(loops, shared, sock, peer, conn_id, b);
            return;
        }
        shared.active.fetch_add(1, Ordering::Relaxed);
        let now_handshaking = shared.handshakes.fetch_add(1, Ordering::Relaxed) + 1;
        shared.peak_handshakes.fetch_max(now_handshaking, Ordering::Relaxed);
        if let Some((conn, tls, hooks)) = session::open(shared, &sock, peer, conn_id) {
            loops.add(New { sock, conn, tls, hooks: Role::Session(hooks) });
        }
    }
}

/// Accept one connection without registering it anywhere (its event loop registers it), non-blocking and
/// close-on-exec from the start (`accept4` where there is one).
fn accept(listener: &std::net::TcpListener) -> io::Result<(mio::net::TcpStream, SocketAddr)> {
    let listener = socket2::SockRef::from(listener);
    #[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
    let (sock, addr) = listener.accept4(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)?;
    #[cfg(not(any(target_os = "linux", target_os = "android", target_os = "freebsd")))]
    let (sock, addr) = {
        let (sock, addr) = listener.accept()?;
        sock.set_nonblocking(true)?;
        (sock, addr)
    };
    let peer = addr.as_socket().ok_or_else(|| io::Error::other("accepted a socket that is not IP"))?;
    Ok((mio::net::TcpStream::from(std::os::fd::OwnedFd::from(sock)), peer))
}

fn is_resource_error(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}

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
    let next = || shared.hub().registry.poll_timeout();
    let fire = || {
        let mut hub = shared.hub();
        hub.registry.handle_timeout(driver::now());
        hub.pump(None);
    };
    at_deadlines(&shared.registry_wake, next, fire).await
}

/// Ends offline reliable sessions at their expiry: what they held is reported undeliverable (`expired`) to its
/// senders.
async fn expiry_timer(shared: Arc<Shared>) {
    let next = || shared.held.table().poll_timeout();
    let fire = || {
        let fx = {
            let mut table = shared.held.table();
            let fx = table.expire(driver::now());
            shared.held.note_sessions(&table);
            fx
        };
        shared.held.carry_out(fx);
    };
    at_deadlines(&shared.held.wake, next, fire).await
}

/// Call `fire` at each deadline `next` gives (none: wait for `wake`), re-reading it whenever `wake` is notified.
async fn at_deadlines(wake: &tokio::sync::Notify, next: impl Fn() -> Option<StdInstant>, fire: impl Fn()) {
    loop {
        let deadline = next();
        let sleep = async {
            match deadline {
                Some(t) => tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = sleep => fire(),
            () = wake.notified() => {}
        }
    }
}

/// Refused at accept (`busy`, `ip_limit`): the `BYE` is flushed, then the socket closed. Nothing else is read or
/// kept.
fn refuse(
    loops: &Loops<Role>,
    shared: Arc<Shared>,
    sock: mio::net::TcpStream,
    peer: SocketAddr,
    conn_id: ConnId,
    b: Bye,
) {
    let now = driver::now();
    let mut conn = Connection::server(now, shared.conn_cfg.clone());
    conn.reject(now, b);
    let Ok(tls) = shared.tls_session() else { return };
    let hooks = Role::Refusal(Box::new(BusyHooks { shared, conn_id, peer }));
    loops.add(New { sock, conn, tls, hooks });
}

/// What the event loops drive: an admitted connection's session, or a refusal on its way out.
enum Role {
    Session(session::ServerHooks),
    /// Boxed, so that refusals (few, and short-lived) do not widen every slot of the slab.
    Refusal(Box<BusyHooks>),
}

impl Hooks for Role {
    type Cmd = control::Cmd;
    fn on_event(&mut self, conn: &mut Connection, now: StdInstant, event: Event) {
        match self {
            Role::Session(h) => h.on_event(conn, now, event),
            Role::Refusal(h) => h.on_event(event),
        }
    }
    fn on_cmd(&mut self, conn: &mut Connection, now: StdInstant, cmd: control::Cmd) {
        if let Role::Session(h) = self {
            h.on_cmd(conn, now, cmd);
        }
    }
    fn poll_cmd(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<control::Cmd>> {
        match self {
            Role::Session(h) => h.poll_cmd(cx),
            Role::Refusal(_) => std::task::Poll::Ready(None),
        }
    }
    fn on_progress(&mut self, conn: &Connection) {
        if let Role::Session(h) = self {
            h.on_progress(conn);
        }
    }
    fn on_io(&mut self, conn: &Connection, read: usize, written: usize) {
        if let Role::Session(h) = self {
            h.on_io(conn, read, written);
        }
    }
    fn after_flush(&mut self, conn: &mut Connection, now: StdInstant) {
        if let Role::Session(h) = self {
            h.after_flush(conn, now);
        }
    }
    fn socket_options(&self) -> Option<&sockopt::SocketOptions> {
        match self {
            Role::Session(h) => h.socket_options(),
            Role::Refusal(_) => None,
        }
    }
    fn after_panic(&mut self, conn: &Connection, panic: &(dyn std::any::Any + Send)) {
        if let Role::Session(h) = self {
            h.after_panic(conn, panic);
        }
    }
}

struct BusyHooks {
    shared: Arc<Shared>,
    conn_id: ConnId,
    peer: SocketAddr,
}

impl BusyHooks {
    /// The refused connection's only event that matters: how it closed, counted and emitted.
    fn on_event(&self, event: Event) {
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
}

/// `BYE(server_shutdown)` to every connection, retry-after hints spread evenly over `shutdown_spread` and the
/// `shutdown_redirect` address as the alternative, then wait up to `shutdown_grace` for the goodbyes and abort
/// what is left. Logs what it waits for and the longest it will wait (and, in cluster mode, what leaving the
/// cluster will take), then how it ended.
async fn goodbye_all(shared: &Shared, loops: &Loops<Role>, tasks: &mut JoinSet<()>) {
    shared.shutting_down.store(true, Ordering::Relaxed);
    let (conns, online) = {
        let hub = shared.hub();
        let mut ids: Vec<&ConnId> = hub.conns.keys().collect();
        ids.sort_unstable();
        let n = ids.len().max(1) as u32;
        for (i, id) in ids.into_iter().enumerate() {
            let retry = shared.cfg.shutdown_spread * (i as u32 + 1) / n;
            let mut b = bye(CloseReason::ServerShutdown, retry);
            b.alternative = shared.cfg.shutdown_redirect.clone().unwrap_or_default();
            hub.conns[id].request(CloseCmd::Bye(b));
        }
        (hub.conns.len(), hub.registry.online())
    };
    let grace = shared.cfg.shutdown_grace;
    tracing::info!("{}", shutdown_plan(&shared.cfg, conns, online));
    let started = tokio::time::Instant::now();
    loops.end();
    let all_done = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(grace, all_done).await.is_err() {
        let left = count(shared.hub().conns.len(), "connection");
        tracing::warn!("shutting down: gave up after {grace:?} on {left} still saying goodbye; closing them");
        tasks.abort_all();
    } else if conns > 0 {
        tracing::info!("shutting down: all {} closed in {:.2?}", count(conns, "connection"), started.elapsed());
    }
}

/// The line a graceful shutdown starts with: what it waits for, and the longest it will wait.
fn shutdown_plan(cfg: &ServerConfig, conns: usize, online: usize) -> String {
    let (grace, each) = (cfg.shutdown_grace, cfg.conn.close_grace);
    let bound = if each < grace {
        format!("each at most {each:?}, all at most {grace:?}")
    } else {
        format!("at most {grace:?}")
    };
    let mut line = match conns {
        0 => "shutting down: no connections".to_owned(),
        n => format!("shutting down: saying goodbye to {} ({bound})", count(n, "connection")),
    };
    if let Some(c) = &cfg.cluster {
        // The outbox gets LEAVE_PATIENCE, the one script that leaves is bounded by redis_timeout.
        let most = LEAVE_PATIENCE + c.redis_timeout;
        let ids = count(online, "id");
        line.push_str(&format!(", then releasing {ids} in Redis and leaving the cluster (at most {most:?})"));
    }
    line
}

/// "1 connection", "3 connections".
fn count(n: usize, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

#[cfg(test)]
mod size_guard {
    use super::control::Control;
    use super::*;

    /// Every idle connection holds one slot in its event loop's slab (its session's hooks inside) and its
    /// `Control` on the heap: a regression here is memory per connection (see BENCHMARKS.md). Measured with rustc
    /// 1.95 (debug build, where mio's socket carries a selector id: 16 bytes less in release): slot 328 bytes, of
    /// which Connection 216 (what is in flight boxed and released between exchanges, the drain boxed, instants as
    /// 8-byte offsets) and the session's hooks 64 (the client id shared with the registry, a credential's grant
    /// boxed); Control 176 (the operator's view of the session and its traffic counts included, the frame queue,
    /// the slot a cluster admission arrives in and a close request boxed).
    #[test]
    fn per_connection_state_stays_small() {
        let slot = crate::evloop::slot_size::<Role>();
        let hooks = std::mem::size_of::<session::ServerHooks>();
        assert!(slot <= 328, "a slab slot is {slot} bytes");
        assert!(hooks <= 64, "ServerHooks is {hooks} bytes");
        assert!(std::mem::size_of::<Connection>() <= 216, "Connection is {} bytes", std::mem::size_of::<Connection>());
        assert!(std::mem::size_of::<Control>() <= 176, "Control is {} bytes", std::mem::size_of::<Control>());
    }
}
