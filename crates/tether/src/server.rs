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
//! Over `max_connections`, over `max_handshakes` in flight, or over `accept_rate`, a new socket is answered
//! `BYE(busy, retry_after)` (the hint spread over `busy_retry_spread`) and closed; accept errors such as EMFILE
//! back off (10 ms doubling to 1 s) instead of spinning.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant as StdInstant, SystemTime};

use bytes::Bytes;
use tether_proto::registry::{Admission, Output, Registry, SessionEvent};
use tether_proto::{Bye, CloseReason, ConnId, Connection, Event, Frame, Welcome};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinSet;

use crate::config::ServerConfig;
use crate::driver::{self, drive, Hooks};
use crate::event::{EventKind, ServerEvent};
use crate::sockopt;

const LISTEN_BACKLOG: u32 = 4096;

/// A bound, not yet running server.
pub struct Server {
    listener: TcpListener,
    shared: Arc<Shared>,
    events: Option<mpsc::UnboundedReceiver<ServerEvent>>,
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
}

struct Shared {
    cfg: ServerConfig,
    /// `cfg.conn`, shared by every connection's state machine.
    conn_cfg: Arc<tether_proto::ConnConfig>,
    hub: Mutex<Hub>,
    events: mpsc::UnboundedSender<ServerEvent>,
    next_conn: AtomicU64,
    /// Connections with a running task (admitted or handshaking); `busy` refusals are not counted.
    active: AtomicUsize,
    /// Connections accepted whose `HELLO` is not admitted yet, and the highest that count has been.
    handshakes: AtomicUsize,
    peak_handshakes: AtomicUsize,
    /// `busy` refusals so far.
    refused_busy: AtomicU64,
    /// Connections per source address (only kept when `max_per_ip` is set).
    per_ip: Mutex<HashMap<std::net::IpAddr, usize>>,
    /// Base for the `last_rx` timestamps kept in atomics.
    origin: StdInstant,
    /// Wakes the presence-grace timer when the registry's next deadline may have moved.
    registry_wake: Notify,
    shutting_down: AtomicBool,
}

/// The server-wide book: sessions and presence, and how to reach each connection's task.
struct Hub {
    registry: Registry,
    conns: HashMap<ConnId, ConnHandle>,
    /// `ServerConfig::outbound_queue`, for pushes made while holding the hub.
    outbound_queue: usize,
}

struct ConnHandle {
    control: Arc<Control>,
}

/// How other tasks reach a connection task: a close request (first wins, never blocked by queued frames) and a
/// bounded frame queue. The queue is a `VecDeque` that allocates only when something is queued and is released
/// when it drains: an idle connection pays nothing for it (a channel would pre-allocate a block of slots).
#[derive(Default)]
struct Control {
    state: Mutex<ControlState>,
    /// Milliseconds after `Shared::origin` of the last frame received (for the id-conflict liveness rule).
    last_rx_ms: AtomicU64,
}

#[derive(Default)]
struct ControlState {
    close: Option<CloseCmd>,
    frames: VecDeque<Frame>,
    /// The connection task, when it waits for a command.
    waker: Option<std::task::Waker>,
}

impl ControlState {
    fn wake(&mut self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
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
}

impl Control {
    /// Ask the task to close; the first request wins.
    fn request(&self, cmd: CloseCmd) {
        let mut st = self.state.lock().expect("control lock");
        if st.close.is_none() {
            st.close = Some(cmd);
            st.wake();
        }
    }

    /// The next command: a close request first, then queued frames in order. When there is none, `cx` is woken
    /// by the next push or request.
    fn poll_take(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Cmd> {
        let mut st = self.state.lock().expect("control lock");
        if let Some(c) = st.close.take() {
            return std::task::Poll::Ready(Cmd::Close(c));
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
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            conn_cfg: Arc::new(cfg.conn.clone()),
            hub: Mutex::new(Hub {
                registry: Registry::new(cfg.registry.clone()),
                conns: HashMap::new(),
                outbound_queue: cfg.outbound_queue,
            }),
            cfg,
            events: tx,
            next_conn: AtomicU64::new(1),
            active: AtomicUsize::new(0),
            handshakes: AtomicUsize::new(0),
            peak_handshakes: AtomicUsize::new(0),
            refused_busy: AtomicU64::new(0),
            per_ip: Mutex::new(HashMap::new()),
            origin: driver::now(),
            registry_wake: Notify::new(),
            shutting_down: AtomicBool::new(false),
        });
        Ok(Server { listener, shared, events: Some(rx) })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The event stream (once). The application must keep reading it: events are never dropped. If it is never
    /// taken, events are discarded.
    pub fn events(&mut self) -> Option<mpsc::UnboundedReceiver<ServerEvent>> {
        self.events.take()
    }

    pub fn handle(&self) -> ServerHandle {
        ServerHandle { shared: self.shared.clone() }
    }

    /// Accept and serve until `shutdown` resolves, then shut down gracefully.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> io::Result<()> {
        drop(self.events.take());
        let shared = self.shared.clone();
        shared.emit(EventKind::Listening { addr: self.listener.local_addr()? });
        let mut tasks = JoinSet::new();
        let timer = tokio::spawn(registry_timer(shared.clone()));
        let mut bucket = shared.cfg.accept_rate.map(|r| TokenBucket::new(r, driver::now()));
        tokio::pin!(shutdown);
        let mut backoff = Duration::from_millis(10);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                Some(_) = tasks.join_next() => {}
                r = self.listener.accept() => match r {
                    Ok((stream, peer)) => {
                        backoff = Duration::from_millis(10);
                        let allowed = bucket.as_mut().is_none_or(|b| b.take(driver::now()));
                        self.admit_socket(&mut tasks, stream, peer, allowed);
                    }
                    Err(e) if is_resource_error(&e) => {
                        tracing::warn!("accept: {e}; backing off {backoff:?}");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                    }
                    Err(e) => tracing::debug!("accept: {e}"),
                },
            }
        }
        drop(self.listener);
        shared.shutdown(&mut tasks).await;
        timer.abort();
        Ok(())
    }

    fn admit_socket(&self, tasks: &mut JoinSet<()>, stream: TcpStream, peer: SocketAddr, rate_ok: bool) {
        let shared = self.shared.clone();
        let conn_id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = shared.cfg.socket.apply(&stream) {
            tracing::debug!(conn = conn_id, %peer, "socket options: {e}");
        }
        let full = shared.active.load(Ordering::Relaxed) >= shared.cfg.max_connections;
        let handshaking = shared.handshakes.load(Ordering::Relaxed) >= shared.cfg.max_handshakes;
        if full || handshaking || !rate_ok {
            shared.refused_busy.fetch_add(1, Ordering::Relaxed);
            let b = bye(CloseReason::Busy, shared_retry(&shared));
            tasks.spawn(refuse(shared, stream, peer, conn_id, b));
            return;
        }
        if let Some(cap) = shared.cfg.max_per_ip {
            let mut per_ip = shared.per_ip.lock().expect("per-ip lock");
            let n = per_ip.entry(peer.ip()).or_insert(0);
            if *n >= cap {
                drop(per_ip);
                let b = bye(CloseReason::IpLimit, shared_retry(&shared));
                tasks.spawn(refuse(shared, stream, peer, conn_id, b));
                return;
            }
            *n += 1;
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
    /// Queue `payload` for `client` (delivered as `DATA` from the server application, with an empty peer).
    pub fn send(&self, client: &str, payload: Bytes) -> Result<(), SendToError> {
        let hub = self.shared.hub.lock().expect("hub lock");
        let handle = hub.registry.lookup(client).and_then(|c| hub.conns.get(&c));
        let handle = handle.ok_or_else(|| SendToError::Offline(client.into()))?;
        let limit = self.shared.cfg.outbound_queue;
        handle
            .push(Frame::Data { peer: String::new(), payload }, limit)
            .map_err(|PushError::Full| SendToError::SlowConsumer(client.into()))
    }

    /// Remove `client` with `BYE(kicked)`. Returns whether it was online.
    pub fn kick(&self, client: &str) -> bool {
        let hub = self.shared.hub.lock().expect("hub lock");
        let handle = hub.registry.lookup(client).and_then(|c| hub.conns.get(&c));
        if let Some(h) = handle {
            h.control.request(CloseCmd::Bye(bye(CloseReason::Kicked, Duration::ZERO)));
        }
        handle.is_some()
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
        self.shared.refused_busy.load(Ordering::Relaxed)
    }
}

fn bye(reason: CloseReason, retry_after: Duration) -> Bye {
    Bye { reason, retry_after_ms: retry_after.as_millis().min(u32::MAX as u128) as u32, alternative: String::new() }
}

impl Shared {
    fn emit(&self, kind: EventKind) {
        let _ = self.events.send(ServerEvent { at: SystemTime::now(), kind });
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
        }
        events
    }
}

/// Guard that keeps `active` and the hub's connection table honest however the task ends.
struct ConnGuard {
    shared: Arc<Shared>,
    conn_id: ConnId,
    peer: SocketAddr,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        if let Ok(mut hub) = self.shared.hub.lock() {
            hub.conns.remove(&self.conn_id);
        }
        if self.shared.cfg.max_per_ip.is_some() {
            if let Ok(mut per_ip) = self.shared.per_ip.lock() {
                if let Some(n) = per_ip.get_mut(&self.peer.ip()) {
                    *n -= 1;
                    if *n == 0 {
                        per_ip.remove(&self.peer.ip());
                    }
                }
            }
        }
        self.shared.active.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn serve_conn(shared: Arc<Shared>, stream: TcpStream, peer: SocketAddr, conn_id: ConnId) {
    let _guard = ConnGuard { shared: shared.clone(), conn_id, peer };
    let control = Arc::new(Control::default());
    control
        .last_rx_ms
        .store(driver::now().saturating_duration_since(shared.origin).as_millis() as u64, Ordering::Relaxed);
    if shared.shutting_down.load(Ordering::Relaxed) {
        control.request(CloseCmd::Bye(bye(CloseReason::ServerShutdown, shared.cfg.shutdown_spread)));
    }
    shared.hub.lock().expect("hub lock").conns.insert(conn_id, ConnHandle { control: control.clone() });
    let mut conn = Connection::server(driver::now(), shared.conn_cfg.clone());
    let tls = match tls_session(&shared) {
        Ok(tls) => tls,
        Err(()) => return,
    };
    let mut hooks = ServerHooks { shared, conn_id, peer, client: None, control, handshaking: true, grant: None };
    drive(stream, tls, &mut conn, &mut hooks).await;
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
            let (conn, peer) = (self.conn_id, self.peer);
            let kind =
                EventKind::Closed { client: None, conn, peer, reason: c.reason, lateness: None, detail: c.detail };
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
    peer: SocketAddr,
    /// The admitted client id, once `WELCOME` was sent.
    client: Option<String>,
    control: Arc<Control>,
    /// Still counted in `Shared::handshakes` (until admitted or closed).
    handshaking: bool,
    /// What the credential allows (no limit without authentication).
    grant: Option<crate::auth::Grant>,
}

impl ServerHooks {
    /// Leave the handshake count, once.
    fn handshake_done(&mut self) {
        if std::mem::take(&mut self.handshaking) {
            self.shared.handshakes.fetch_sub(1, Ordering::Relaxed);
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
                    tracing::info!(conn = self.conn_id, peer = %self.peer, client = %hello.client_id, "auth failed: {e}");
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
        self.handshake_done();
        let mut hub = shared.hub.lock().expect("hub lock");
        let Hub { registry, conns, .. } = &mut *hub;
        let admission = registry.admit(now, &hello.client_id, hello.nonce, self.conn_id, |c| {
            conns.get(&c).map(|h| shared.last_rx_of(&h.control))
        });
        match admission {
            Admission::Welcome { epoch, evicted } => {
                let (interval, timeout) = shared.cfg.heartbeat.negotiate(hello.heartbeat_ms);
                let welcome = Welcome {
                    version: tether_proto::frame::PROTOCOL_VERSION,
                    heartbeat_ms: interval.as_millis() as u32,
                    timeout_ms: timeout.as_millis() as u32,
                    epoch,
                    server_id: shared.cfg.server_id.clone(),
                };
                conn.accept(now, welcome);
                let client = hello.client_id;
                if let Some(h) = evicted.and_then(|old| hub.conns.get(&old)) {
                    h.control.request(CloseCmd::Bye(bye(CloseReason::Takeover, Duration::ZERO)));
                }
                let session_events = hub.pump(Some((self.conn_id, conn, now)));
                drop(hub);
                for e in session_events {
                    if let SessionEvent::Takeover { old, new, epoch, same_device, .. } = e {
                        let peer = self.peer;
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
                    peer: self.peer,
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
                shared.emit(EventKind::IdConflict {
                    client: hello.client_id,
                    holder_conn: holder,
                    newcomer_conn: self.conn_id,
                    peer: self.peer,
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
        let delivered = {
            let hub = self.shared.hub.lock().expect("hub lock");
            let target = hub.registry.lookup(&to).and_then(|c| hub.conns.get(&c));
            let limit = self.shared.cfg.outbound_queue;
            target.is_some_and(|h| h.push(Frame::Data { peer: from, payload }, limit).is_ok())
        };
        if !delivered {
            let _ = conn.send(now, Frame::Undeliverable { to });
        }
    }

    fn on_closed(&mut self, conn: &Connection, now: StdInstant, c: tether_proto::Closed) {
        self.handshake_done();
        let last_seen = conn.last_rx().unwrap_or(now);
        let holder = {
            let mut hub = self.shared.hub.lock().expect("hub lock");
            let holder = self.client.as_deref().is_some_and(|id| hub.registry.lookup(id) == Some(self.conn_id));
            hub.registry.disconnect(now, self.conn_id, self.client.as_deref(), c.reason, last_seen);
            hub.pump(None);
            holder
        };
        self.shared.registry_wake.notify_one();
        let (conn_id, peer, reason, lateness, detail) = (self.conn_id, self.peer, c.reason, c.lateness, c.detail);
        let kind = match (&self.client, holder) {
            (Some(client), true) => EventKind::Offline {
                client: client.clone(),
                conn: conn_id,
                peer,
                reason,
                lateness,
                silent_for: now.saturating_duration_since(last_seen),
                detail,
            },
            (client, _) => EventKind::Closed { client: client.clone(), conn: conn_id, peer, reason, lateness, detail },
        };
        if reason != CloseReason::Bye {
            let detail = match &kind {
                EventKind::Offline { detail, .. } | EventKind::Closed { detail, .. } => detail.as_deref(),
                _ => None,
            };
            tracing::info!(conn = conn_id, %peer, client = ?self.client, detail, "closed: {reason}");
        }
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
                    tracing::info!(conn = self.conn_id, client = ?self.client, "subscription to {denied} not granted");
                    conn.reject(now, bye(CloseReason::AuthFailed, Duration::ZERO));
                    return;
                }
                let mut hub = self.shared.hub.lock().expect("hub lock");
                match hub.registry.subscribe(self.conn_id, &ids) {
                    Ok(()) => {
                        hub.pump(Some((self.conn_id, conn, now)));
                    }
                    Err(e) => {
                        drop(hub);
                        tracing::info!(conn = self.conn_id, client = ?self.client, "subscription refused: {e}");
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
                drop(hub);
                self.shared.emit(EventKind::Suspect { client, conn: self.conn_id, peer: self.peer, silent_for });
            }
            Event::Recovered => {
                let Some(client) = self.client.clone() else { return };
                let mut hub = self.shared.hub.lock().expect("hub lock");
                hub.registry.recovered(self.conn_id, &client);
                hub.pump(Some((self.conn_id, conn, now)));
                drop(hub);
                self.shared.emit(EventKind::Recovered { client, conn: self.conn_id, peer: self.peer });
            }
            Event::Rtt(rtt) => tracing::trace!(conn = self.conn_id, ?rtt, "rtt"),
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
}

#[cfg(test)]
mod size_guard {
    use super::*;

    /// Every idle connection holds one task whose future is this big: a regression here is memory per
    /// connection (see BENCHMARKS.md). Measured 992 bytes (Connection 328) with rustc 1.95, TLS support included.
    #[tokio::test]
    async fn per_connection_task_stays_small() {
        let cfg = ServerConfig { listen: "127.0.0.1:0".parse().unwrap(), ..Default::default() };
        let server = Server::bind(cfg).await.unwrap();
        let c = TcpStream::connect(server.local_addr().unwrap()).await.unwrap();
        let peer = c.local_addr().unwrap();
        let f = serve_conn(server.shared.clone(), c, peer, 1);
        assert!(std::mem::size_of_val(&f) <= 1024, "serve_conn future is {} bytes", std::mem::size_of_val(&f));
        assert!(std::mem::size_of::<Connection>() <= 384, "Connection is {} bytes", std::mem::size_of::<Connection>());
        drop(f);
    }
}
