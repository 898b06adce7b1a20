//! The tokio client: connect, handshake, heartbeats, data, presence, goodbye.
//!
//! # Layout
//! [`Client::connect`] opens the socket (options applied), sends `HELLO` and returns once `WELCOME` arrives, or
//! the server's refusal as [`ConnectError::Refused`] with its reason and hints. A background task then runs the
//! same driver and state machine as the server, so a dead server is reported with the same reasons
//! (`heartbeat_timeout`, `eof`, `reset`, `keepalive_timeout`, `write_timeout`, `unreachable`, or the server's
//! `BYE` reason) as [`ClientEvent::Disconnected`], always the last event. One `Client` is one connection;
//! [`crate::ReconnectingClient`] reconnects, fails over and follows the `Disconnect`'s retry-after and
//! alternative-address hints.
//!
//! # The event queue
//! Events wait for the application in a bounded queue ([`ClientConfig::event_queue`], the rule of
//! [`crate::queue`]): an application that stops reading loses events, counted and reported with
//! [`ClientEvent::Dropped`], rather than growing its process. Two kinds are never dropped: `Disconnected` (a
//! reserve beyond the bound keeps room for it), and a reliable session's messages and receipts. The client
//! acknowledges those as it queues them, so it takes one only when the queue has room; when it has none, the
//! client ends the connection with `slow_consumer` instead, and the session's resume brings the message again.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant as StdInstant};

use bytes::Bytes;
use tether_proto::frame::{HeartbeatRange, Hello, V1, V2};
use tether_proto::{Bye, CloseReason, Closed, Connection, Event, Frame, Presence, Undeliverable, Welcome};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::adaptive::{AdaptiveHeartbeat, Spare};
use crate::config::ClientConfig;
use crate::driver::{self, drive, Hooks};
use crate::queue::{Events, Queued, Sink, QUEUED_DATA_BYTES};
use crate::reliable::{InDoubt, ReliableLink};
use crate::resilient::LinkEvent;
use tether_proto::reliable;

/// A connected client.
pub struct Client {
    cmds: mpsc::Sender<ClientCmd>,
    /// The application's events; `None` when they go to a [`crate::ReconnectingClient`]'s queue.
    events: Option<Events<ClientEvent>>,
    /// How the connection ended, and the gate its events wait behind until `Connected` was said, when its events
    /// go to a reconnecting client's queue.
    ended: Option<oneshot::Receiver<Disconnect>>,
    gate: Option<(Arc<Gate>, Sink<LinkEvent>)>,
    welcome: Welcome,
    nonce: u64,
    local_addr: SocketAddr,
    /// The server's maximum frame: announced in a v2 `WELCOME`, else our own limit.
    max_frame: u32,
    task: JoinHandle<()>,
    /// `close` has run (the task is joined).
    closed: bool,
    /// The reliable session this connection carries (the server granted the extension).
    reliable: Option<ReliableLink>,
}

/// How a connection ended, from the client's side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disconnect {
    pub reason: CloseReason,
    /// For verdicts taken at a deadline: how late.
    pub lateness: Option<Duration>,
    /// The server ended it (its `BYE`, FIN or reset).
    pub by_peer: bool,
    /// The server's hint: do not come back before this.
    pub retry_after: Option<Duration>,
    /// The server's hint: go to this address instead.
    pub alternative: Option<String>,
    pub detail: Option<String>,
    /// For a verdict of silence this client took (`heartbeat_timeout`, `write_timeout`): whether the path
    /// carried nothing back, as the kernel tells: our bytes unacknowledged and no acknowledgement from the server's
    /// side for 1.5 heartbeat intervals or more (`Some(true)`), or the server's kernel still answers
    /// (`Some(false)`: its program is stopped or hung, not the path). `None` for other ends, or where the kernel
    /// cannot tell.
    pub path_silent: Option<bool>,
    /// This client concluded that a middlebox on the path forgot the connection: a `PING` sent after a silence
    /// went unanswered, with nothing acknowledged since, while a new TCP connection to the same server went
    /// through (the adaptive heartbeat's path check). The reason is then `heartbeat_timeout`, taken early.
    pub middlebox_forgot: bool,
}

impl From<Closed> for Disconnect {
    fn from(c: Closed) -> Disconnect {
        let retry_after = c.peer_bye.as_ref().map(|b| b.retry_after_ms).filter(|&ms| ms > 0);
        let alternative = c.peer_bye.as_ref().map(|b| b.alternative.clone()).filter(|a| !a.is_empty());
        Disconnect {
            reason: c.reason,
            lateness: c.lateness,
            by_peer: c.by_peer,
            retry_after: retry_after.map(|ms| Duration::from_millis(ms.into())),
            alternative,
            detail: c.detail,
            path_silent: None,
            middlebox_forgot: false,
        }
    }
}

/// What the client hears.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// `from` is the sending client id, or `None` for the server application.
    Data {
        from: Option<String>,
        payload: Bytes,
    },
    Presence(Presence),
    /// A `DATA` we addressed to `to` was not delivered: that id is not online, or (v2 servers say which) the
    /// payload was larger than the server relays.
    Undeliverable {
        to: String,
        why: Undeliverable,
    },
    /// The phi detector suspects the server.
    Suspect {
        silent_for: Duration,
    },
    Recovered,
    /// `reliable`: the server took every message this client sent up to sequence number `upto`: held for a
    /// reliable receiver (its fate will be reported), pushed to an online plain one (at most once from there,
    /// no receipt), handed to the server application, or reported undeliverable.
    Acked {
        upto: u64,
    },
    /// `reliable`, with receipts: the application of `to` (empty: the server application) took these messages.
    Delivered {
        to: String,
        seqs: Vec<u64>,
    },
    /// `reliable`: these messages to `to` will never arrive, and why.
    NotDelivered {
        to: String,
        seqs: Vec<u64>,
        why: Undeliverable,
    },
    /// `reliable`: the server could not resume the session (the grant says why), or does not grant reliable
    /// sessions: what the old session's outbox held. Each message says whether it was on the wire
    /// unacknowledged (it may or may not have arrived; not sent again), or never sent (sent again in the new
    /// session under `resent_as`, or, not granted, not sent).
    InDoubt(Vec<InDoubt>),
    /// The application fell behind: `count` events were dropped since the last one it received.
    Dropped {
        count: u64,
    },
    /// The heartbeat changed during the session (the adaptive heartbeat asked the server, which granted this):
    /// `timeout` is the silence after which either side now gives up on the other.
    Heartbeat {
        interval: Duration,
        timeout: Duration,
    },
    /// Always the last event.
    Disconnected(Disconnect),
}

impl Queued for ClientEvent {
    fn payload_len(&self) -> usize {
        match self {
            ClientEvent::Data { payload, .. } => payload.len(),
            _ => 0,
        }
    }

    fn dropped(count: u64) -> ClientEvent {
        ClientEvent::Dropped { count }
    }
}

/// Places kept beyond an event queue's bound for the events that must not be dropped (`Disconnected`, and a
/// reconnecting client's `Connected`, `Disconnected` and `GaveUp`).
pub(crate) const EVENT_RESERVE: usize = 64;

/// Where a connection's events go.
#[derive(Clone)]
pub(crate) enum Route {
    /// Its own queue, read with [`Client::next_event`].
    Own,
    /// A reconnecting client's queue; its end is told through [`Client::ended`].
    Link(Sink<LinkEvent>),
}

/// The connection task's end of a [`Route`].
enum Out {
    Own(Sink<ClientEvent>),
    Link { sink: Sink<LinkEvent>, gate: Arc<Gate>, ended: Option<oneshot::Sender<Disconnect>> },
}

/// A linked connection's events wait here from its `WELCOME` until the supervisor has said `Connected` (so that
/// nothing the connection hears comes before it), then go straight to the queue.
#[derive(Default)]
pub(crate) struct Gate {
    open: AtomicBool,
    held: Mutex<Held>,
}

/// What a closed gate holds: each event with whether it must not be dropped, their payload bytes, and how many
/// of them may be dropped (only those count against [`GATE_HOLDS`]: a resume's replay can put thousands of
/// reliable messages ahead of them).
#[derive(Default)]
struct Held {
    events: Vec<(LinkEvent, bool)>,
    bytes: usize,
    droppable: usize,
}

/// Events a closed gate holds at most, besides those that must not be dropped (and [`QUEUED_DATA_BYTES`] of
/// their payload); more are dropped and counted.
const GATE_HOLDS: usize = 1024;

impl Gate {
    fn put(&self, sink: &Sink<LinkEvent>, ev: LinkEvent, kept: bool) {
        if self.open.load(Ordering::Acquire) {
            sink.put(ev, kept);
            return;
        }
        let mut held = self.held.lock().expect("gate lock");
        let len = ev.payload_len();
        if self.open.load(Ordering::Acquire) {
            sink.put(ev, kept);
        } else if kept || (held.droppable < GATE_HOLDS && held.bytes + len <= QUEUED_DATA_BYTES) {
            held.events.push((ev, kept));
            held.bytes += len;
            held.droppable += usize::from(!kept);
        } else {
            sink.count_dropped();
        }
    }

    /// Hand on what was held, in order, and let later events through.
    fn open(&self, sink: &Sink<LinkEvent>) {
        let mut held = self.held.lock().expect("gate lock");
        for (ev, kept) in held.events.drain(..) {
            sink.put(ev, kept);
        }
        (held.bytes, held.droppable) = (0, 0);
        self.open.store(true, Ordering::Release);
    }

    /// Events held, and their payload bytes: they will take room in the queue when the gate opens.
    fn holds(&self) -> (usize, usize) {
        if self.open.load(Ordering::Acquire) {
            return (0, 0);
        }
        let held = self.held.lock().expect("gate lock");
        (held.events.len(), held.bytes)
    }
}

impl Out {
    /// An event the application may lose to a full queue (counted).
    fn emit(&self, ev: ClientEvent) {
        self.put(ev, false);
    }

    /// An event that must not be lost: a reliable message or receipt (after [`has_room`](Self::has_room)), or
    /// what an outbox held.
    fn emit_kept(&self, ev: ClientEvent) {
        self.put(ev, true);
    }

    fn put(&self, ev: ClientEvent, kept: bool) {
        match self {
            Out::Own(sink) => {
                sink.put(ev, kept);
            }
            Out::Link { sink, gate, .. } => {
                if let Some(ev) = LinkEvent::from_client(ev) {
                    gate.put(sink, ev, kept);
                }
            }
        }
    }

    fn has_room(&self, len: usize) -> bool {
        match self {
            Out::Own(sink) => sink.has_room(len, 0, 0),
            Out::Link { sink, gate, .. } => {
                let (held, held_bytes) = gate.holds();
                sink.has_room(len, held, held_bytes)
            }
        }
    }

    /// The connection ended: the last event.
    fn end(&mut self, d: Disconnect) {
        match self {
            Out::Own(sink) => {
                sink.emit_kept(ClientEvent::Disconnected(d));
            }
            Out::Link { ended, .. } => {
                if let Some(tx) = ended.take() {
                    let _ = tx.send(d);
                }
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect: {0}")]
    Io(#[from] io::Error),
    #[error("connect timed out")]
    Timeout,
    #[error("refused by the server: {}", .0.reason)]
    Refused(Disconnect),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    #[error("the connection is closed")]
    Closed,
    #[error("payload of {len} bytes exceeds the largest the server takes for this destination ({max})")]
    TooLarge { len: usize, max: usize },
    /// `reliable`: as many messages as the window allows are unacknowledged.
    #[error("{0}")]
    Full(#[from] crate::reliable::SendError),
    #[error("the reliable extension is not in effect on this connection")]
    NotReliable,
}

enum ClientCmd {
    Frame(Frame),
    Close,
    /// Send what the reliable outbox has not sent.
    Pull,
    /// The path check after a late `PONG` is done: the new connection, if it went through, for the `PING` sent
    /// at `sent` after `idle` of silence.
    PathChecked {
        spare: Option<Spare>,
        idle: Duration,
        sent: StdInstant,
    },
}

/// Bytes of the reliable outbox put on the wire at once; more follow as the output drains.
const PULL_BUDGET: usize = 64 * 1024;

impl Client {
    /// Resolve `server` (`host:port`, the first address found) and [`connect`](Self::connect). Over TLS, the
    /// server's certificate is checked against `host` when it is a DNS name, unless a server name is configured.
    pub async fn connect_to(server: &str, cfg: ClientConfig) -> Result<Client, ConnectError> {
        Client::connect_routed(server, cfg, &Route::Own).await
    }

    /// [`connect_to`](Self::connect_to), with the events going where `route` says.
    pub(crate) async fn connect_routed(
        server: &str,
        mut cfg: ClientConfig,
        route: &Route,
    ) -> Result<Client, ConnectError> {
        let addr = resolve(server).await?;
        if let Some(tls) = cfg.tls.take() {
            let host = server.rsplit_once(':').map_or(server, |(h, _)| h);
            cfg.tls = Some(tls.for_host(host.trim_start_matches('[').trim_end_matches(']')));
        }
        Client::connect_with(addr, cfg, route).await
    }

    /// Connect to `addr`, say `HELLO`, and wait for `WELCOME` (bounded by the handshake timeout).
    ///
    /// The client offers `cfg.protocol_version`. A server that speaks only version 1 refuses a v2 `HELLO` with
    /// `protocol_error`; the client then tries once more offering version 1, so new clients work with old
    /// servers.
    pub async fn connect(addr: SocketAddr, cfg: ClientConfig) -> Result<Client, ConnectError> {
        Client::connect_with(addr, cfg, &Route::Own).await
    }

    async fn connect_with(addr: SocketAddr, mut cfg: ClientConfig, route: &Route) -> Result<Client, ConnectError> {
        let nonce = *cfg.nonce.get_or_insert_with(rand::random);
        match Client::connect_offering(addr, &cfg, nonce, cfg.protocol_version, route).await {
            Err(ConnectError::Refused(d)) if d.reason == CloseReason::ProtocolError && cfg.protocol_version > V1 => {
                tracing::debug!(nonce, "{addr} refused a v{} HELLO ({d:?}); offering version 1", cfg.protocol_version);
                Client::connect_offering(addr, &cfg, nonce, V1, route).await
            }
            other => other,
        }
    }

    async fn connect_offering(
        addr: SocketAddr,
        cfg: &ClientConfig,
        nonce: u64,
        version: u8,
        route: &Route,
    ) -> Result<Client, ConnectError> {
        let spare = cfg.adaptive_heartbeat.as_ref().and_then(|a| a.take_spare(addr, driver::now()));
        let stream = match spare {
            Some(s) => s,
            None => tokio::time::timeout(cfg.connect_timeout, TcpStream::connect(addr))
                .await
                .map_err(|_| ConnectError::Timeout)??,
        };
        if let Err(e) = cfg.socket.apply(&stream) {
            tracing::warn!("socket options: {e}");
        }
        let local_addr = stream.local_addr()?;
        let tls = match &cfg.tls {
            Some(t) => Some(crate::driver::Tls::client(
                t.connect(addr).map_err(|e| ConnectError::Io(io::Error::other(format!("tls: {e}"))))?,
            )),
            None => None,
        };
        // The adaptive heartbeat offers what it learned about this network, and asks to change it in the session.
        let adaptive = cfg.adaptive_heartbeat.clone().map(|a| {
            let (key, interval) = a.start(local_addr);
            Adaptive { interval, learner: a, key, server: addr, local: local_addr, granted: false, forgot: false }
        });
        let mut extensions: Vec<_> = cfg.reliable.iter().filter(|_| version >= V2).map(ReliableLink::offer).collect();
        let mut conn_cfg = cfg.conn.clone();
        let mut heartbeat = cfg.heartbeat_interval;
        if let Some(a) = &adaptive {
            heartbeat = Some(a.interval);
            conn_cfg.pong_grace = Some(a.learner.grace());
            if version >= V2 {
                extensions.push(HeartbeatRange::offer());
            }
        }
        let hello = Hello {
            version,
            heartbeat_ms: heartbeat.map_or(0, |d| d.as_millis().clamp(1, u32::MAX as u128) as u32),
            nonce,
            client_id: cfg.client_id.clone(),
            credential: Bytes::from(cfg.credential.clone()),
            extensions,
        };
        let mut conn = Connection::client(driver::now(), conn_cfg, hello);
        if cfg.ping_jitter {
            conn.set_ping_phase(rand::random::<f64>());
        }
        let (cmd_tx, cmd_rx) = mpsc::channel(cfg.command_queue.max(1));
        let check_tx = adaptive.as_ref().map(|_| cmd_tx.downgrade());
        let (out, events, ended, gate) = match route {
            Route::Own => {
                let (sink, events) = Sink::new(cfg.event_queue, EVENT_RESERVE);
                (Out::Own(sink), Some(events), None, None)
            }
            Route::Link(sink) => {
                let (tx, rx) = oneshot::channel();
                let gate = Arc::new(Gate::default());
                let out = Out::Link { sink: sink.clone(), gate: gate.clone(), ended: Some(tx) };
                (out, None, Some(rx), Some((gate, sink.clone())))
            }
        };
        let (welcome_tx, welcome_rx) = oneshot::channel();
        // Also to a v1 connection, which cannot carry it: its WELCOME then reports what the session held.
        let link = cfg.reliable.clone();
        let socket = cfg.socket;
        let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
        let task = tokio::spawn(async move {
            let mut hooks = ClientHooks {
                out,
                cmds: cmd_rx,
                welcome: Some(welcome_tx),
                close_requested: false,
                link,
                generation: None,
                more: false,
                ended: false,
                refused: false,
                pending_ack: None,
                socket,
                fd,
                adaptive,
                check_tx,
                checking: false,
            };
            drive(stream, tls, &mut conn, &mut hooks).await;
        });
        match welcome_rx.await {
            Ok(Ok(welcome)) => {
                // Held to what the core holds the server to.
                let max_frame = welcome.max_frame.map_or(cfg.conn.max_frame, tether_proto::frame::peer_max_frame);
                let reliable = cfg.reliable.clone().filter(|_| reliable::Grant::find(&welcome.extensions).is_some());
                Ok(Client {
                    cmds: cmd_tx,
                    events,
                    ended,
                    gate,
                    welcome,
                    nonce,
                    local_addr,
                    max_frame,
                    task,
                    closed: false,
                    reliable,
                })
            }
            Ok(Err(d)) => Err(ConnectError::Refused(d)),
            Err(_) => Err(ConnectError::Io(io::Error::other("client task ended during the handshake"))),
        }
    }

    /// The server's `WELCOME`: negotiated heartbeat, epoch, server id.
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }
    pub fn nonce(&self) -> u64 {
        self.nonce
    }
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Send `payload` to client `to`, or to the server application when `to` is `None`. The payload may be at
    /// most `max_frame - 130` bytes to a client and `max_frame - 2` to the server application, with the server's
    /// `max_frame` (see docs/protocol.md); on a reliable session 8 bytes less (`max_frame - 138`, `- 10`).
    ///
    /// On a reliable session the message goes through its outbox ([`send_reliable`](Self::send_reliable)).
    pub async fn send(&self, to: Option<&str>, payload: Bytes) -> Result<(), ClientError> {
        if self.reliable.is_some() {
            return self.send_reliable(to, payload).map(|_| ());
        }
        let peer = to.unwrap_or_default().to_owned();
        self.check_size(&peer, &payload)?;
        self.command(ClientCmd::Frame(Frame::Data { peer, payload })).await
    }

    /// Send through the reliable session: the message is kept until the server acknowledges it, sent again
    /// after a resume, and reported on ([`ClientEvent::Acked`], [`ClientEvent::Delivered`],
    /// [`ClientEvent::NotDelivered`]). Returns its sequence number. Refused when the window is full
    /// ([`ClientError::Full`]: wait for acknowledgements) or the server did not grant the extension.
    pub fn send_reliable(&self, to: Option<&str>, payload: Bytes) -> Result<u64, ClientError> {
        let link = self.reliable.as_ref().ok_or(ClientError::NotReliable)?;
        let peer = to.unwrap_or_default();
        let max = tether_proto::frame::max_reliable_payload(self.max_frame, !peer.is_empty());
        if payload.len() > max {
            return Err(ClientError::TooLarge { len: payload.len(), max });
        }
        Ok(link.send(peer, payload)?)
    }

    /// Whether the server granted a reliable session, and how it resumed.
    pub fn reliable(&self) -> Option<reliable::Grant> {
        self.reliable.as_ref().and_then(ReliableLink::grant)
    }

    fn check_size(&self, peer: &str, payload: &Bytes) -> Result<(), ClientError> {
        let max = tether_proto::frame::max_payload(self.max_frame, !peer.is_empty());
        if payload.len() > max {
            return Err(ClientError::TooLarge { len: payload.len(), max });
        }
        Ok(())
    }

    /// Subscribe to the presence of `ids` (`*` for everyone, where the server allows it).
    pub async fn subscribe(&self, ids: Vec<String>) -> Result<(), ClientError> {
        self.command(ClientCmd::Frame(Frame::Subscribe(ids))).await
    }

    pub async fn unsubscribe(&self, ids: Vec<String>) -> Result<(), ClientError> {
        self.command(ClientCmd::Frame(Frame::Unsubscribe(ids))).await
    }

    /// The next event; `None` after `Disconnected` has been returned.
    pub async fn next_event(&mut self) -> Option<ClientEvent> {
        match &mut self.events {
            Some(events) => events.recv().await,
            None => None,
        }
    }

    /// A connection whose events go to a reconnecting client: `Connected` was said, let its events through.
    pub(crate) fn open_events(&self) {
        if let Some((gate, sink)) = &self.gate {
            gate.open(sink);
        }
    }

    /// A connection whose events go to a reconnecting client: how it ended, once it has.
    pub(crate) async fn ended(&mut self) -> Option<Disconnect> {
        match &mut self.ended {
            Some(rx) => rx.await.ok(),
            None => std::future::pending().await,
        }
    }

    /// Say `BYE`, wait (bounded by `close_grace`) for the server to close, and return how it ended (`None` if
    /// that was already reported, or on a second call).
    pub async fn close(&mut self) -> Option<Disconnect> {
        if std::mem::replace(&mut self.closed, true) {
            return None;
        }
        let _ = self.cmds.send(ClientCmd::Close).await;
        let _ = (&mut self.task).await;
        if let Some(rx) = &mut self.ended {
            return rx.try_recv().ok();
        }
        let mut last = None;
        while let Some(ev) = self.events.as_mut().and_then(Events::try_recv) {
            if let ClientEvent::Disconnected(d) = ev {
                last = Some(d);
            }
        }
        last
    }

    async fn command(&self, cmd: ClientCmd) -> Result<(), ClientError> {
        self.cmds.send(cmd).await.map_err(|_| ClientError::Closed)
    }
}

struct ClientHooks {
    out: Out,
    cmds: mpsc::Receiver<ClientCmd>,
    /// Completes `connect` with the `WELCOME`, or with the refusal.
    welcome: Option<oneshot::Sender<Result<Welcome, Disconnect>>>,
    close_requested: bool,
    /// The reliable session, its generation once this connection was welcomed (its calls count only then),
    /// and whether its outbox has more to send than was pulled.
    link: Option<ReliableLink>,
    generation: Option<u64>,
    more: bool,
    /// `Disconnected` was emitted: it stays the last event. What the connection still reads while it lingers
    /// after its verdict is not handed on: a reliable session does not count it, so its resume brings it again.
    ended: bool,
    /// A reliable message found the application's queue full: the connection is ending, and no later message
    /// (already read in the same batch) may be taken either, or its acknowledgement would cover the one refused.
    refused: bool,
    /// `reliable`: the highest acknowledgement the full queue could not take yet. Acknowledgements are cumulative:
    /// it is handed on (in place of those it covers) before the next event, at the latest with the next
    /// heartbeat's, or before `Disconnected`; none is dropped.
    pending_ack: Option<u64>,
    /// The socket options, whose per-connection part is applied once the heartbeat is negotiated.
    socket: crate::sockopt::SocketOptions,
    /// The connection's socket, open for as long as the driver runs (its events included), for `TCP_INFO`.
    fd: std::os::fd::RawFd,
    /// The adaptive heartbeat, when configured.
    adaptive: Option<Adaptive>,
    /// Where a path check reports (weak: the connection still ends when the `Client` is dropped), and whether
    /// one is under way.
    check_tx: Option<mpsc::WeakSender<ClientCmd>>,
    checking: bool,
}

/// One connection's part in the adaptive heartbeat.
struct Adaptive {
    learner: AdaptiveHeartbeat,
    /// The network this connection is on, and the interval in effect.
    key: String,
    interval: Duration,
    /// The server's address, and the local one (a path check leaves from there, so it tests the same path).
    server: SocketAddr,
    local: SocketAddr,
    /// The server granted `heartbeat_update`.
    granted: bool,
    /// The path check concluded a middlebox forgot the connection.
    forgot: bool,
}

impl ClientHooks {
    fn emit(&self, ev: ClientEvent) {
        self.out.emit(ev);
    }

    /// The server took every message up to `upto`: tell the application, or keep it for when its queue has room.
    fn acked(&mut self, upto: u64) {
        self.pending_ack = Some(upto);
        self.flush_ack();
    }

    fn flush_ack(&mut self) {
        if self.pending_ack.is_some() && self.out.has_room(0) {
            let upto = self.pending_ack.take().expect("checked");
            self.emit(ClientEvent::Acked { upto });
        }
    }

    /// Whether a reliable message or receipt of `len` payload bytes can be handed on. If not, the application is
    /// behind by a whole queue: the connection ends with `slow_consumer` (the message is neither handed on nor
    /// acknowledged, so the session's resume brings it again).
    fn room_for_reliable(&mut self, conn: &mut Connection, now: StdInstant, len: usize) -> bool {
        if self.refused {
            return false;
        }
        if self.out.has_room(len) {
            return true;
        }
        self.refused = true;
        tracing::warn!("the application's event queue is full: ending the connection; its resume brings the rest");
        let bye = Bye { reason: CloseReason::SlowConsumer, retry_after_ms: 0, alternative: String::new() };
        conn.reject(now, bye);
        false
    }

    /// The server's grant, or none: continue or restart the session, and send what it holds.
    fn on_welcome(&mut self, conn: &mut Connection, now: StdInstant, w: &Welcome) {
        let Some(link) = &self.link else { return };
        let grant = reliable::Grant::find(&w.extensions).filter(|_| conn.is_reliable());
        let (generation, acked, doubt, broken) = link.welcome(grant, conn.peer_max_frame());
        self.generation = Some(generation);
        if grant.is_none() {
            self.link = None;
        }
        if acked > 0 {
            self.acked(acked);
        }
        if !doubt.is_empty() {
            self.out.emit_kept(ClientEvent::InDoubt(doubt));
        }
        if broken {
            // The server resumed a session its own earlier word contradicts: leave, and start a new one.
            let bye = Bye { reason: CloseReason::ProtocolError, retry_after_ms: 0, alternative: String::new() };
            return conn.reject(now, bye);
        }
        self.pull(conn, now);
    }

    /// Put up to [`PULL_BUDGET`] bytes of the outbox's unsent messages on the wire.
    fn pull(&mut self, conn: &mut Connection, now: StdInstant) {
        let (Some(link), Some(generation)) = (&self.link, self.generation) else { return };
        if conn.pending_tx() >= PULL_BUDGET {
            // A path that does not drain: the messages wait in the outbox (bounded by the window), not in the
            // connection's output (whose limit would end it before its heartbeat verdict).
            self.more = true;
            return;
        }
        let (frames, more) = link.next_frames(generation, PULL_BUDGET);
        self.more = more;
        for f in frames {
            let seq = match &f {
                Frame::Sdata { seq, .. } => *seq,
                _ => 0,
            };
            if let Err(e) = conn.send(now, f) {
                // Only a message kept before this server announced a smaller maximum frame is refused here. It
                // and what follows stay unsent (skipping it would leave a gap in the stream): the session stalls
                // rather than losing or reordering anything.
                tracing::warn!("reliable send refused: {e}; the session's outbox waits");
                link.unsend(generation, seq);
                self.more = false;
                break;
            }
        }
    }

    /// Adaptive heartbeat: a `PING` held after `idle` of silence. The learner's next interval, if it changed, is
    /// asked for at once (right behind the `PONG`, while the radio is awake).
    fn path_held(&mut self, conn: &mut Connection, now: StdInstant, idle: Duration) {
        let Some(a) = &mut self.adaptive else { return };
        let Some(next) = a.learner.held(&a.key, idle) else { return };
        if a.granted {
            if let Err(e) = conn.request_heartbeat(now, next) {
                tracing::debug!("heartbeat request refused: {e}");
            }
        }
        tracing::debug!(?idle, ?next, settled = a.learner.settled(&a.key), "adaptive heartbeat: the path held");
    }

    /// Adaptive heartbeat: a `PING` sent after `idle` of silence is unanswered after `waited`. If the kernel has
    /// had nothing acknowledged since (our bytes wait), check the path with a new connection to the server.
    fn pong_late(&mut self, now: StdInstant, idle: Duration, waited: Duration, rtt: Option<Duration>) {
        let (Some(a), Some(tx)) = (&self.adaptive, self.check_tx.clone()) else { return };
        if self.checking {
            return;
        }
        use crate::probe::{unanswered_for, Unanswered};
        // Where the kernel can tell, only a PING it holds unacknowledged, with nothing acknowledged since, is
        // worth a check; where it cannot (no TCP_INFO), the missing PONG is all there is to go by.
        let rtt = match unanswered_for(crate::sockopt::tcp_info(self.fd), waited) {
            Unanswered::PathDown(kernel) => kernel.rtt,
            Unanswered::NoView => rtt.unwrap_or_default(),
            Unanswered::Stalled(_) => return,
        };
        self.checking = true;
        let sent = now.checked_sub(waited).unwrap_or(now);
        // A check that goes through right after a blip healed must not condemn a connection that merely waits
        // for its next retransmission: that comes within the retransmission ceiling.
        let check = crate::adaptive::PATH_CHECK_TIMEOUT;
        let ceiling = self.socket.rto_max.for_interval(a.interval).unwrap_or(check).min(check);
        let settle = ceiling + rtt * 2 + Duration::from_millis(100);
        let (server, local) = (a.server, a.local);
        tokio::spawn(async move {
            let spare = crate::adaptive::path_check(local, server, settle).await;
            if let Some(tx) = tx.upgrade() {
                let _ = tx.send(ClientCmd::PathChecked { spare, idle, sent }).await;
            }
        });
    }

    /// The path check is done: a new connection went through while ours stays unanswered, so a middlebox
    /// forgot ours. End it now, and teach the learner. Otherwise the path is down for everyone: ride it out.
    fn path_checked(
        &mut self,
        conn: &mut Connection,
        now: StdInstant,
        spare: Option<Spare>,
        idle: Duration,
        sent: StdInstant,
    ) {
        self.checking = false;
        let Some(a) = &mut self.adaptive else { return };
        use crate::probe::{unanswered_for, Unanswered};
        // Still the same PING unanswered, on a connection still up? The PONG may have come while the check ran.
        let since = now.saturating_duration_since(sent);
        let silent = conn.state() == tether_proto::State::Established
            && conn.unanswered_ping().is_some()
            && match unanswered_for(crate::sockopt::tcp_info(self.fd), since) {
                Unanswered::PathDown(_) | Unanswered::NoView => true,
                Unanswered::Stalled(_) => false,
            };
        let Some(spare) = spare.filter(|_| silent) else {
            tracing::debug!(silent, "adaptive heartbeat: the path check found nothing forgotten");
            return;
        };
        let next = a.learner.forgot(&a.key, idle);
        // The next connect to this server starts on it.
        a.learner.keep_spare(a.server, spare);
        a.forgot = true;
        let next =
            next.map_or(String::new(), |n| format!("; the heartbeat on this network is now {:.1} s", n.as_secs_f64()));
        let detail = format!(
            "{}: our PING after {:.1} s of silence went unanswered for {:.1} s while a new connection to the \
             server went through{next}",
            crate::Diagnosis::MiddleboxForgot.meaning(),
            idle.as_secs_f64(),
            since.as_secs_f64(),
        );
        conn.fail(now, CloseReason::HeartbeatTimeout, false, detail);
    }

    /// A sequenced frame was handed to the application: it may be acknowledged.
    fn took(&self, conn: &mut Connection, now: StdInstant, seq: u64) {
        if let (Some(link), Some(generation)) = (&self.link, self.generation) {
            link.received_seq(generation, seq);
        }
        conn.confirm(now, seq);
    }
}

impl Hooks for ClientHooks {
    type Cmd = ClientCmd;

    fn on_event(&mut self, conn: &mut Connection, now: StdInstant, event: Event) {
        if self.ended {
            if matches!(event, Event::Data { .. }) {
                tracing::debug!("DATA read after the connection's verdict: not handed on (delivery is at most once)");
            }
            return;
        }
        self.flush_ack();
        let ev = match event {
            Event::Welcome(w) => {
                if let Some(a) = &mut self.adaptive {
                    let range = HeartbeatRange::find(&w.extensions).filter(|_| conn.version() >= V2);
                    a.granted = range.is_some();
                    // What the server granted, and the most it grants in this session (without the extension,
                    // the interval stays; the learner's next step waits for the next connection's HELLO).
                    a.interval = Duration::from_millis(w.heartbeat_ms.max(1).into());
                    let max = range.map_or(Duration::MAX, |r| Duration::from_millis(r.max_ms.into()));
                    a.learner.connected(&a.key, a.interval, max);
                }
                self.on_welcome(conn, now, &w);
                if let Some(tx) = self.welcome.take() {
                    let _ = tx.send(Ok(w));
                }
                return;
            }
            Event::Closed(c) => {
                self.ended = true;
                // Nothing this connection reads from now on counts as received by the session.
                if let (Some(link), Some(generation)) = (&self.link, self.generation.take()) {
                    link.detach(generation);
                }
                let mut d = Disconnect::from(c);
                if let Some(a) = &mut self.adaptive {
                    d.middlebox_forgot = a.forgot;
                    // A reset in answer to a PING after a silence as long as the interval: what a NAT that answers
                    // the segments of connections it forgot does. The learner hears of it as of a silent loss.
                    let idle = conn.unanswered_ping();
                    if let (false, CloseReason::Reset, true, Some(idle)) = (a.forgot, d.reason, d.by_peer, idle) {
                        let next = a.learner.forgot(&a.key, idle);
                        tracing::debug!(?idle, ?next, "adaptive heartbeat: reset after a silence");
                    }
                }
                // The socket is still open: the kernel tells a path that carried nothing back from a server whose
                // kernel still acknowledged our PINGs (the same rule as the server's, `probe::unanswered_since`).
                if d.middlebox_forgot {
                    d.path_silent = Some(true);
                } else if !d.by_peer && matches!(d.reason, CloseReason::HeartbeatTimeout | CloseReason::WriteTimeout) {
                    if let Some((interval, _)) = conn.heartbeat() {
                        use crate::probe::{unanswered_since, Unanswered};
                        d.path_silent = match unanswered_since(crate::sockopt::tcp_info(self.fd), interval) {
                            Unanswered::PathDown(_) => Some(true),
                            Unanswered::Stalled(_) => Some(false),
                            Unanswered::NoView => None,
                        };
                    }
                }
                match self.welcome.take() {
                    Some(tx) => {
                        let _ = tx.send(Err(d));
                    }
                    None => {
                        if let Some(upto) = self.pending_ack.take() {
                            self.out.emit_kept(ClientEvent::Acked { upto });
                        }
                        self.out.end(d)
                    }
                }
                return;
            }
            Event::Data { peer, payload } => ClientEvent::Data { from: (!peer.is_empty()).then_some(peer), payload },
            Event::Presence(p) => ClientEvent::Presence(p),
            Event::Undeliverable { to, why } => ClientEvent::Undeliverable { to, why },
            Event::Suspect { silent_for } => ClientEvent::Suspect { silent_for },
            Event::Recovered => ClientEvent::Recovered,
            Event::Rtt(rtt) => {
                tracing::trace!(?rtt, "rtt");
                return;
            }
            Event::PathHeld { idle } => return self.path_held(conn, now, idle),
            Event::PongLate { idle, waited } => return self.pong_late(now, idle, waited, conn.rtt()),
            Event::HeartbeatChanged { interval, timeout } => {
                if let Some(a) = &mut self.adaptive {
                    a.interval = interval;
                    a.learner.granted(&a.key, interval);
                }
                ClientEvent::Heartbeat { interval, timeout }
            }
            // Server-only events cannot come out of a client-role connection.
            Event::Hello(_)
            | Event::HeartbeatRequest { .. }
            | Event::Subscribe(_)
            | Event::Unsubscribe(_)
            | Event::RelayTooLarge { .. }
            | Event::SdataTooLarge { .. } => return,
            Event::Sdata { seq, peer, payload } => {
                if !self.room_for_reliable(conn, now, payload.len()) {
                    return;
                }
                self.out.emit_kept(ClientEvent::Data { from: (!peer.is_empty()).then_some(peer), payload });
                return self.took(conn, now, seq);
            }
            Event::Report(r) => {
                if !self.room_for_reliable(conn, now, 0) {
                    return;
                }
                let seq = r.seq;
                self.out.emit_kept(match r.outcome {
                    None => ClientEvent::Delivered { to: r.peer, seqs: r.seqs },
                    Some(why) => ClientEvent::NotDelivered { to: r.peer, seqs: r.seqs, why },
                });
                return self.took(conn, now, seq);
            }
            Event::Acked(seq) => {
                let (Some(link), Some(generation)) = (&self.link, self.generation) else { return };
                match link.acked(generation, seq) {
                    Ok(0) => return,
                    Ok(_) => return self.acked(seq),
                    Err(e) => {
                        tracing::warn!("protocol error from the server: {e}");
                        let bye =
                            Bye { reason: CloseReason::ProtocolError, retry_after_ms: 0, alternative: String::new() };
                        return conn.reject(now, bye);
                    }
                }
            }
        };
        self.emit(ev);
    }

    fn on_cmd(&mut self, conn: &mut Connection, now: StdInstant, cmd: ClientCmd) {
        match cmd {
            ClientCmd::Frame(f) => {
                if let Err(e) = conn.send(now, f) {
                    tracing::debug!("send refused: {e}");
                }
            }
            ClientCmd::Close => {
                conn.close(now, Bye { reason: CloseReason::Bye, retry_after_ms: 0, alternative: String::new() })
            }
            ClientCmd::Pull => self.pull(conn, now),
            ClientCmd::PathChecked { spare, idle, sent } => self.path_checked(conn, now, spare, idle, sent),
        }
    }

    fn socket_options(&self) -> Option<&crate::sockopt::SocketOptions> {
        Some(&self.socket)
    }

    fn after_flush(&mut self, conn: &mut Connection, now: StdInstant) {
        if self.more && conn.pending_tx() < PULL_BUDGET {
            self.pull(conn, now);
        }
    }

    fn poll_cmd(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<ClientCmd>> {
        if let (Some(link), Some(generation)) = (&self.link, self.generation) {
            if link.poll_pull(generation, cx).is_ready() {
                return std::task::Poll::Ready(Some(ClientCmd::Pull));
            }
        }
        self.cmds.poll_recv(cx).map(|c| match c {
            Some(c) => Some(c),
            // The `Client` was dropped: say goodbye once, then run on until closed.
            None if !self.close_requested => {
                self.close_requested = true;
                Some(ClientCmd::Close)
            }
            None => None,
        })
    }
}

/// The first address `server` (`host:port`) resolves to.
async fn resolve(server: &str) -> io::Result<SocketAddr> {
    if let Ok(a) = server.parse() {
        return Ok(a);
    }
    tokio::net::lookup_host(server)
        .await?
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{server} resolves to nothing")))
}
