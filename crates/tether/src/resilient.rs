//! A client that stays connected: reconnects with backoff, fails over between servers, keeps its identity,
//! subscriptions and unsent data across outages.
//!
//! # Layout
//! [`ReconnectingClient::start`] spawns a supervisor task. The supervisor asks the sans-IO
//! [`tether_proto::reconnect::Reconnect`] policy what to do, carries it out with [`Client::connect`], and forwards
//! everything as [`LinkEvent`]s (`Connected`, `Disconnected`, `Reconnecting`, `ConnectFailed`, `GaveUp`, and the
//! connection's data and presence). While connected to a backup with `return_to_primary`, it probes the
//! primary with a full handshake and moves back once the primary welcomes it.
//!
//! Continuity: one client id and one instance nonce for the supervisor's whole life (so a reconnect is a
//! takeover on the server, never a conflict); the presence subscriptions are re-sent after every connect; data
//! sent while disconnected waits in a bounded FIFO (`queue_limit`) and is sent first after the next connect, and
//! a full queue refuses with [`LinkError::QueueFull`]. Data handed to a connection that then dies may be lost
//! with it (TCP gives no delivery receipt): without the `reliable` extension, delivery is at most once.
//!
//! With a [`crate::ReliableLink`] in the configuration, every send goes into the link's bounded outbox instead
//! (connected or not: [`Sent::Held`]), each connection offers to resume the session, and what the server has
//! not acknowledged is sent again after the resume: every message arrives once, in order, or is reported
//! ([`LinkEvent::NotDelivered`], [`LinkEvent::InDoubt`]). Such a client does not move back to the primary while
//! connected to a backup (servers outside one cluster do not share sessions, so the move would end it); it
//! returns to the primary at its next reconnect.
//!
//! Events reach the application through one bounded queue for the client's whole life
//! ([`ClientConfig::event_queue`], the rule of [`crate::queue`]): each connection puts its events straight into
//! it, so a slow reader loses only what may be lost (counted, [`LinkEvent::Dropped`]); `Connected`,
//! `Disconnected`, `GaveUp`, `NotSent`, `InDoubt` and a reliable session's messages are never dropped (see
//! [`crate::Client`]). The supervisor never waits for the reader.

use std::collections::{BTreeSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use tether_proto::reconnect::{Next, Reconnect, ReconnectConfig, Target};
use tether_proto::{CloseReason, Presence};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::client::{Client, ClientError, ClientEvent, ConnectError, Disconnect, Route, EVENT_RESERVE};
use crate::config::ClientConfig;
use crate::driver;
use crate::queue::{Events, Queued, Sink};

/// Reconnection settings on top of [`ClientConfig`].
#[derive(Debug, Clone, PartialEq)]
pub struct ResilienceConfig {
    pub reconnect: ReconnectConfig,
    /// Messages held while disconnected; 0 refuses sends while disconnected.
    pub queue_limit: usize,
    /// Seed for the backoff jitter; `None` draws one at random.
    pub seed: Option<u64>,
}

impl Default for ResilienceConfig {
    fn default() -> Self {
        ResilienceConfig { reconnect: ReconnectConfig::default(), queue_limit: 1000, seed: None }
    }
}

/// What the application hears.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    Connected {
        server: String,
        epoch: u64,
        heartbeat: Duration,
        timeout: Duration,
        primary: bool,
        /// The reliable session's grant: whether it resumed, and what was lost if not (`None`: not reliable).
        reliable: Option<tether_proto::reliable::Grant>,
    },
    Disconnected {
        server: String,
        disconnect: Disconnect,
    },
    /// The next attempt will go to `server` after `delay`.
    Reconnecting {
        attempt: u32,
        delay: Duration,
        server: String,
    },
    /// An attempt failed: `disconnect` has the server's refusal (reason and hints), or `None` for a transport error.
    ConnectFailed {
        server: String,
        refused: Option<Disconnect>,
        error: String,
    },
    /// Reconnection stopped (`kicked`, or `max_attempts`); always the last event.
    GaveUp {
        attempts: u32,
        reason: CloseReason,
    },
    Data {
        from: Option<String>,
        payload: Bytes,
    },
    Presence(Presence),
    Undeliverable {
        to: String,
        why: tether_proto::Undeliverable,
    },
    /// A message queued while disconnected could not be sent after reconnecting: the server announced a smaller
    /// maximum than the payload needs (`error` says which). It is not retried.
    NotSent {
        to: Option<String>,
        len: usize,
        error: String,
    },
    Suspect {
        silent_for: Duration,
    },
    Recovered,
    /// `reliable`: the server took every message up to this sequence number.
    Acked {
        upto: u64,
    },
    /// `reliable`, with receipts: `to`'s application took these messages.
    Delivered {
        to: String,
        seqs: Vec<u64>,
    },
    /// `reliable`: these messages to `to` will never arrive.
    NotDelivered {
        to: String,
        seqs: Vec<u64>,
        why: tether_proto::Undeliverable,
    },
    /// `reliable`: the session could not be resumed (or the server does not grant it): what its outbox held,
    /// each sent and unacknowledged (it may or may not have arrived) or never sent (sent again under a new
    /// number, or not sent) — see [`crate::ClientEvent::InDoubt`].
    InDoubt(Vec<crate::reliable::InDoubt>),
    /// The application fell behind: `count` events were dropped since the last one it received.
    Dropped {
        count: u64,
    },
    /// The adaptive heartbeat changed the interval during the session (the server granted it): `timeout` is
    /// the silence after which either side now gives up on the other.
    Heartbeat {
        interval: Duration,
        timeout: Duration,
    },
    /// Why the previous connection ended, concluded once this one was welcomed: for
    /// [`Diagnosis::MiddleboxForgot`](crate::Diagnosis), it ended in silence or a reset (a verdict taken on
    /// time) and the same server welcomed the first attempt after it within one heartbeat interval and a second
    /// (and within a second of the attempt's start), so the path works and something on it forgot the
    /// connection. Follows the `Connected` it was concluded from.
    Diagnosis {
        diagnosis: crate::Diagnosis,
        explanation: String,
    },
}

impl LinkEvent {
    /// A connection's event as the application hears it (`None` for `Disconnected`, which the supervisor reports
    /// with the server's name).
    pub(crate) fn from_client(ev: ClientEvent) -> Option<LinkEvent> {
        Some(match ev {
            ClientEvent::Data { from, payload } => LinkEvent::Data { from, payload },
            ClientEvent::Presence(p) => LinkEvent::Presence(p),
            ClientEvent::Undeliverable { to, why } => LinkEvent::Undeliverable { to, why },
            ClientEvent::Suspect { silent_for } => LinkEvent::Suspect { silent_for },
            ClientEvent::Recovered => LinkEvent::Recovered,
            ClientEvent::Acked { upto } => LinkEvent::Acked { upto },
            ClientEvent::Delivered { to, seqs } => LinkEvent::Delivered { to, seqs },
            ClientEvent::NotDelivered { to, seqs, why } => LinkEvent::NotDelivered { to, seqs, why },
            ClientEvent::InDoubt(msgs) => LinkEvent::InDoubt(msgs),
            ClientEvent::Dropped { count } => LinkEvent::Dropped { count },
            ClientEvent::Heartbeat { interval, timeout } => LinkEvent::Heartbeat { interval, timeout },
            ClientEvent::Disconnected(_) => return None,
        })
    }
}

impl Queued for LinkEvent {
    fn payload_len(&self) -> usize {
        match self {
            LinkEvent::Data { payload, .. } => payload.len(),
            _ => 0,
        }
    }

    fn dropped(count: u64) -> LinkEvent {
        LinkEvent::Dropped { count }
    }
}

/// Where a message went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// Handed to the live connection.
    Now,
    /// Held until the next connection.
    Queued,
    /// `reliable`: kept in the link's outbox under this sequence number until the server acknowledges it.
    Held(u64),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("disconnected and the send queue is full ({0} messages)")]
    QueueFull(usize),
    #[error("the client has stopped (closed or gave up)")]
    Stopped,
    #[error("payload of {len} bytes exceeds the largest the server takes for this destination ({max})")]
    TooLarge { len: usize, max: usize },
    /// `reliable`: the outbox's window is full; wait for acknowledgements.
    #[error("{0}")]
    Full(crate::reliable::SendError),
}

enum Cmd {
    Send { to: Option<String>, payload: Bytes, ack: oneshot::Sender<Result<Sent, LinkError>> },
    Subscribe(Vec<String>),
    Unsubscribe(Vec<String>),
    Close(oneshot::Sender<()>),
}

/// A client that reconnects by itself. Dropping it closes it.
pub struct ReconnectingClient {
    cmds: mpsc::Sender<Cmd>,
    events: Events<LinkEvent>,
    nonce: u64,
    max_frame: u32,
    /// Sends go through a reliable session (their sequence number takes room in the frame).
    reliable: bool,
    /// The supervisor, until `close` joined it.
    task: Option<JoinHandle<()>>,
}

impl ReconnectingClient {
    /// Start connecting to `servers` (primary first; `host:port` each) as `cfg.client_id`.
    pub fn start(servers: Vec<String>, mut cfg: ClientConfig, res: ResilienceConfig) -> ReconnectingClient {
        let nonce = *cfg.nonce.get_or_insert_with(rand::random);
        let max_frame = cfg.conn.max_frame;
        let reliable = cfg.reliable.is_some();
        if let Some(link) = &cfg.reliable {
            // Sends before the first WELCOME are checked against this client's own limit.
            link.set_max_frame(max_frame);
        }
        let (cmd_tx, cmd_rx) = mpsc::channel(cfg.command_queue.max(1));
        let (sink, ev_rx) = Sink::new(cfg.event_queue, EVENT_RESERVE);
        let seed = res.seed.unwrap_or_else(rand::random);
        let policy = Reconnect::new(servers.len(), res.reconnect.clone(), seed);
        let sup = Supervisor {
            servers,
            cfg,
            queue_limit: res.queue_limit,
            policy,
            cmds: cmd_rx,
            route: Route::Link(sink.clone()),
            events: sink,
            subs: BTreeSet::new(),
            queue: VecDeque::new(),
            behind: false,
            forgotten: None,
        };
        let task = tokio::spawn(sup.run());
        ReconnectingClient { cmds: cmd_tx, events: ev_rx, nonce, max_frame, reliable, task: Some(task) }
    }

    /// The instance nonce kept across reconnects.
    pub fn nonce(&self) -> u64 {
        self.nonce
    }

    /// Send now if connected; otherwise queue (bounded) for the next connection. With a reliable session, into its
    /// outbox either way ([`Sent::Held`], bounded by its window).
    pub async fn send(&self, to: Option<&str>, payload: Bytes) -> Result<Sent, LinkError> {
        let to_client = to.is_some_and(|t| !t.is_empty());
        let max = match self.reliable {
            true => tether_proto::frame::max_reliable_payload(self.max_frame, to_client),
            false => tether_proto::frame::max_payload(self.max_frame, to_client),
        };
        if payload.len() > max {
            return Err(LinkError::TooLarge { len: payload.len(), max });
        }
        let (ack, rx) = oneshot::channel();
        let cmd = Cmd::Send { to: to.map(str::to_owned), payload, ack };
        self.cmds.send(cmd).await.map_err(|_| LinkError::Stopped)?;
        rx.await.map_err(|_| LinkError::Stopped)?
    }

    /// Subscribe to presence; kept and re-sent after every reconnect.
    pub async fn subscribe(&self, ids: Vec<String>) -> Result<(), LinkError> {
        self.cmds.send(Cmd::Subscribe(ids)).await.map_err(|_| LinkError::Stopped)
    }

    pub async fn unsubscribe(&self, ids: Vec<String>) -> Result<(), LinkError> {
        self.cmds.send(Cmd::Unsubscribe(ids)).await.map_err(|_| LinkError::Stopped)
    }

    pub async fn next_event(&mut self) -> Option<LinkEvent> {
        self.events.recv().await
    }

    /// Say `BYE` if connected, and stop. The events already queued (the last `Disconnected` among them) can still
    /// be read; [`next_event`](Self::next_event) then returns `None`. A second call does nothing.
    pub async fn close(&mut self) {
        let (tx, rx) = oneshot::channel();
        if self.cmds.send(Cmd::Close(tx)).await.is_ok() {
            let _ = rx.await;
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

struct Supervisor {
    servers: Vec<String>,
    cfg: ClientConfig,
    queue_limit: usize,
    policy: Reconnect,
    cmds: mpsc::Receiver<Cmd>,
    /// The application's queue, and the same as where each connection puts its events.
    events: Sink<LinkEvent>,
    route: Route,
    /// Presence subscriptions to re-establish after every connect.
    subs: BTreeSet<String>,
    /// Data sent while disconnected, oldest first.
    queue: VecDeque<(Option<String>, Bytes)>,
    /// The last connection ended because the application's queue was full: reconnect only once it has drained.
    behind: bool,
    /// The last connection ended in silence or a reset, on time: if the same server welcomes the next attempt
    /// at once (within an interval and a second of that end, and within a second of the attempt's start), the
    /// path forgot it ([`LinkEvent::Diagnosis`]).
    forgotten: Option<Lost>,
}

/// A connection that ended the way one the path forgot does.
struct Lost {
    server: String,
    reason: CloseReason,
    at: std::time::Instant,
    /// The heartbeat interval it had, and how long after its end a welcome counts as at once.
    interval: Duration,
}

/// Added to the heartbeat interval for how long after a connection's end the next welcome counts as at once.
const FORGOTTEN_SLACK: Duration = Duration::from_secs(1);

/// How a connected period ended.
enum Ended {
    Lost(Disconnect),
    Closed,
    /// A probe of the primary was welcomed: this is its connection.
    SwitchToPrimary(Client),
}

type Probe = Pin<Box<dyn Future<Output = Result<Client, ConnectError>> + Send>>;

impl Supervisor {
    /// An event the application may lose to a full queue (counted): `Reconnecting`, `ConnectFailed`.
    fn emit(&self, e: LinkEvent) {
        self.events.emit(e);
    }

    /// An event that must reach the application: `Connected`, `Disconnected`, `GaveUp`, `NotSent`.
    fn emit_kept(&self, e: LinkEvent) {
        self.events.emit_kept(e);
    }

    fn name(&self, t: &Target) -> String {
        match t {
            Target::Listed(i) => self.servers[*i].clone(),
            Target::Alternative(a) => a.clone(),
        }
    }

    async fn run(mut self) {
        let mut next = self.policy.start(driver::now());
        loop {
            let (target, delay, attempt) = match next {
                Next::Connect { target, delay, attempt } => (target, delay, attempt),
                Next::GiveUp { attempts, last } => {
                    self.emit_kept(LinkEvent::GaveUp { attempts, reason: last });
                    return self.refuse_all().await;
                }
            };
            let server = self.name(&target);
            if attempt > 0 {
                self.emit(LinkEvent::Reconnecting { attempt, delay, server: server.clone() });
            }
            if !self.wait_disconnected(delay).await {
                return;
            }
            let attempt_started = driver::now();
            let client = Client::connect_routed(&server, self.cfg.clone(), &self.route).await;
            let mut client = match client {
                Ok(c) => c,
                Err(e) => {
                    // Not at once: the path did not take the next attempt either.
                    self.forgotten = None;
                    let now = driver::now();
                    next = match &e {
                        ConnectError::Refused(d) => {
                            let n =
                                self.policy.failed(now, target, Some(d.reason), d.retry_after, d.alternative.clone());
                            self.emit(LinkEvent::ConnectFailed {
                                server,
                                refused: Some(d.clone()),
                                error: e.to_string(),
                            });
                            n
                        }
                        _ => {
                            let n = self.policy.failed(now, target, None, None, None);
                            self.emit(LinkEvent::ConnectFailed { server, refused: None, error: e.to_string() });
                            n
                        }
                    };
                    continue;
                }
            };
            // A welcome that took long came from a server that was slow to answer (stopped, say): that says
            // nothing about a path that forgot the last connection.
            if driver::now().saturating_duration_since(attempt_started) > FORGOTTEN_SLACK {
                self.forgotten = None;
            }
            let mut target = target;
            let mut server = server;
            loop {
                self.on_connected(&client, &target, &server).await;
                match self.run_connected(&mut client, &target).await {
                    Ended::Closed => return,
                    Ended::Lost(d) => {
                        self.emit_kept(LinkEvent::Disconnected { server: server.clone(), disconnect: d.clone() });
                        // A verdict taken late says this process was stalled (suspended, starved), not the path.
                        // A verdict of silence counts only when the path carried nothing back: a stopped
                        // server's kernel acknowledges our PINGs.
                        let on_time = d.lateness.is_none_or(|l| l <= FORGOTTEN_SLACK);
                        let path = match d.reason {
                            CloseReason::HeartbeatTimeout | CloseReason::WriteTimeout => d.path_silent == Some(true),
                            CloseReason::KeepaliveTimeout | CloseReason::Reset => true,
                            _ => false,
                        };
                        self.forgotten = (on_time && path).then(|| Lost {
                            server: server.clone(),
                            reason: d.reason,
                            at: driver::now(),
                            interval: Duration::from_millis(client.welcome().heartbeat_ms.into()),
                        });
                        // Our own verdict that the application fell behind (a reliable message found its queue
                        // full) says nothing about the server: go back to it once the application has caught up.
                        self.behind = d.reason == CloseReason::SlowConsumer && !d.by_peer;
                        // A new connection to this very server just went through when the path forgot the old
                        // one: nothing against the server, and back at once.
                        let health = if self.behind || d.middlebox_forgot { CloseReason::Bye } else { d.reason };
                        next = match self.policy.lost(driver::now(), target, health, d.retry_after, d.alternative) {
                            Next::Connect { target, attempt, .. } if d.middlebox_forgot => {
                                Next::Connect { target, delay: Duration::ZERO, attempt }
                            }
                            n => n,
                        };
                        break;
                    }
                    // The primary welcomed a probe: leave the backup with a goodbye and carry on there.
                    Ended::SwitchToPrimary(primary) => {
                        let mut old = std::mem::replace(&mut client, primary);
                        if let Some(d) = old.close().await {
                            self.emit_kept(LinkEvent::Disconnected { server: server.clone(), disconnect: d });
                        }
                        target = Target::Listed(0);
                        server = self.name(&target);
                    }
                }
            }
        }
    }

    async fn on_connected(&mut self, client: &Client, target: &Target, server: &str) {
        self.policy.connected(driver::now(), target.clone());
        let w = client.welcome();
        self.emit_kept(LinkEvent::Connected {
            server: server.to_owned(),
            epoch: w.epoch,
            heartbeat: Duration::from_millis(w.heartbeat_ms.into()),
            timeout: Duration::from_millis(w.timeout_ms.into()),
            primary: *target == Target::Listed(0),
            reliable: client.reliable(),
        });
        if let Some(lost) = self.forgotten.take() {
            let after = driver::now().saturating_duration_since(lost.at);
            if lost.server == server && after <= lost.interval + FORGOTTEN_SLACK {
                let explanation = format!(
                    "{}: the connection to {server} ended ({}) and the next attempt was welcomed {:.1} s later, so \
                     the path works; a NAT or firewall on it drops idle connections sooner than the heartbeat \
                     comes (keep the heartbeat interval under its idle timeout)",
                    crate::Diagnosis::MiddleboxForgot.meaning(),
                    lost.reason.as_str(),
                    after.as_secs_f64(),
                );
                let diagnosis = crate::Diagnosis::MiddleboxForgot;
                self.emit_kept(LinkEvent::Diagnosis { diagnosis, explanation });
            }
        }
        client.open_events();
        if !self.subs.is_empty() {
            let _ = client.subscribe(self.subs.iter().cloned().collect()).await;
        }
        while let Some((to, payload)) = self.queue.pop_front() {
            let len = payload.len();
            if let Err(e @ ClientError::TooLarge { .. }) = client.send(to.as_deref(), payload).await {
                self.emit_kept(LinkEvent::NotSent { to, len, error: e.to_string() });
            }
        }
    }

    /// Serve one connection until it ends.
    async fn run_connected(&mut self, client: &mut Client, target: &Target) -> Ended {
        let mut last_probe = None;
        let mut probe: Option<Probe> = None;
        loop {
            let probe_at = if probe.is_none() && self.cfg.reliable.is_none() {
                self.policy.primary_probe_at(last_probe)
            } else {
                None
            };
            let probe_sleep = async {
                match probe_at {
                    Some(t) => tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await,
                    None => std::future::pending().await,
                }
            };
            let probing = async {
                match probe.as_mut() {
                    Some(p) => p.await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                d = client.ended() => return Ended::Lost(d.unwrap_or_else(lost_task)),
                cmd = self.cmds.recv() => match cmd {
                    Some(Cmd::Send { to, payload, ack }) => {
                        let r = match client.reliable() {
                            Some(_) => client.send_reliable(to.as_deref(), payload).map(Sent::Held),
                            None => client.send(to.as_deref(), payload).await.map(|()| Sent::Now),
                        };
                        let _ = ack.send(r.map_err(|e| match e {
                            // The server's announced maximum is below what the caller checked against.
                            ClientError::TooLarge { len, max } => LinkError::TooLarge { len, max },
                            ClientError::Full(e) => LinkError::Full(e),
                            ClientError::Closed | ClientError::NotReliable => LinkError::Stopped,
                        }));
                    }
                    Some(Cmd::Subscribe(ids)) => {
                        self.subs.extend(ids.iter().cloned());
                        let _ = client.subscribe(ids).await;
                    }
                    Some(Cmd::Unsubscribe(ids)) => {
                        for id in &ids {
                            self.subs.remove(id);
                        }
                        let _ = client.unsubscribe(ids).await;
                    }
                    Some(Cmd::Close(done)) => {
                        if let Some(d) = client.close().await {
                            self.emit_kept(LinkEvent::Disconnected { server: self.name(target), disconnect: d });
                        }
                        let _ = done.send(());
                        return Ended::Closed;
                    }
                    None => {
                        client.close().await;
                        return Ended::Closed;
                    }
                },
                () = probe_sleep => {
                    last_probe = Some(driver::now());
                    let primary = self.servers[0].clone();
                    let (cfg, route) = (self.cfg.clone(), self.route.clone());
                    probe = Some(Box::pin(async move { Client::connect_routed(&primary, cfg, &route).await }));
                }
                r = probing => {
                    probe = None;
                    last_probe = Some(driver::now());
                    if let Ok(primary) = r {
                        return Ended::SwitchToPrimary(primary);
                    }
                }
            }
        }
    }

    /// Sleep `delay` (and, when the application fell behind, until it has read half its queue: events and bytes)
    /// while disconnected, queueing sends and recording subscriptions. False when closed.
    async fn wait_disconnected(&mut self, delay: Duration) -> bool {
        let (events, behind) = (self.events.clone(), std::mem::take(&mut self.behind));
        let ready = async move {
            tokio::time::sleep(delay).await;
            if behind {
                events.drained().await;
            }
        };
        tokio::pin!(ready);
        loop {
            tokio::select! {
                () = &mut ready => return true,
                cmd = self.cmds.recv() => match cmd {
                    Some(Cmd::Send { to, payload, ack }) if self.cfg.reliable.is_some() => {
                        let link = self.cfg.reliable.as_ref().expect("checked");
                        let r = link.send(to.as_deref().unwrap_or_default(), payload).map(Sent::Held);
                        let _ = ack.send(r.map_err(LinkError::Full));
                    }
                    Some(Cmd::Send { to, payload, ack }) => {
                        let r = if self.queue.len() < self.queue_limit {
                            self.queue.push_back((to, payload));
                            Ok(Sent::Queued)
                        } else {
                            Err(LinkError::QueueFull(self.queue_limit))
                        };
                        let _ = ack.send(r);
                    }
                    Some(Cmd::Subscribe(ids)) => self.subs.extend(ids),
                    Some(Cmd::Unsubscribe(ids)) => {
                        for id in &ids {
                            self.subs.remove(id);
                        }
                    }
                    Some(Cmd::Close(done)) => {
                        let _ = done.send(());
                        return false;
                    }
                    None => return false,
                },
            }
        }
    }

    /// After giving up: answer every later command with `Stopped` until the handle is dropped.
    /// The application's queue ends here (`next_event` returns `None` once `GaveUp` is read): only the commands'
    /// receiver is kept.
    async fn refuse_all(self) {
        let Supervisor { mut cmds, events, route, .. } = self;
        drop((events, route));
        while let Some(cmd) = cmds.recv().await {
            match cmd {
                Cmd::Send { ack, .. } => {
                    let _ = ack.send(Err(LinkError::Stopped));
                }
                Cmd::Close(done) => {
                    let _ = done.send(());
                    return;
                }
                Cmd::Subscribe(_) | Cmd::Unsubscribe(_) => {}
            }
        }
    }
}

/// A connection task that ended without reporting why (it cannot happen unless it panicked).
fn lost_task() -> Disconnect {
    Disconnect {
        reason: CloseReason::Reset,
        lateness: None,
        by_peer: false,
        retry_after: None,
        alternative: None,
        detail: Some("connection task ended".into()),
        path_silent: None,
        middlebox_forgot: false,
    }
}
