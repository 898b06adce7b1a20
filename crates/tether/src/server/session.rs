//! One connection's life on the server: how it starts ([`open`]) and what the server does at each thing the
//! core reports ([`ServerHooks`]).
//!
//! # Layout
//! - [`open`]: registers the connection's control slot in the hub, builds its `Connection` and the
//!   [`ServerHooks`] an event loop (`crate::evloop`) drives it with until it closes. Dropping the hooks undoes the
//!   registration however the connection ends (a close, or its loop aborted at shutdown). A panic while
//!   visiting it (a bug of ours) is caught by its loop and closes the connection as any close does
//!   ([`ServerHooks::after_panic`]).
//! - Where a `HELLO` is decided: [`ServerHooks::on_hello`] checks the credential, then admits through the
//!   registry under the hub's lock (a single node) or hands the decision to `clustered::admit` (cluster mode),
//!   whose answer comes back as a command ([`ServerHooks::on_admit`]); [`ServerHooks::conclude`] sends `WELCOME`
//!   or the refusal and announces takeovers.
//! - Where a frame is relayed: [`ServerHooks::on_data`] holds `DATA` in the receiver's reliable session, or
//!   pushes it into the receiver's queue here, or through the cluster to the node holding it, or answers
//!   `UNDELIVERABLE`.
//! - A reliable session (the `reliable` extension, single node): [`ServerHooks::open_reliable`] resumes or opens
//!   it as the `HELLO` is welcomed; [`ServerHooks::on_sdata`] takes the client's sequenced messages (held for a
//!   reliable receiver, pushed to a plain one, or reported on the sender's own stream);
//!   [`ServerHooks::on_acked`] releases what the client acknowledged and routes the receipts;
//!   [`ServerHooks::pull`] sends what the session holds, a budget at a time. When the connection closes the
//!   session is detached and waits offline for a resume.
//! - Where a verdict becomes an event: the core's `Event::Closed` (a heartbeat timeout, a `BYE`, a reset, each
//!   with its reason) reaches [`ServerHooks::on_closed`], which records it, tells the registry (presence and the
//!   grace) and emits `offline` for the session's holder or `closed` for anyone else. `Suspect` and `Recovered`
//!   become events and, in cluster mode, presence messages in the same place.
//!
//! # Rules
//! Runs inside an event loop that serves many connections, so nothing here may block or wait: the hub's lock only
//! for a registry call and its pump, work that can wait (a delayed `auth_failed`, a cluster admission) is
//! spawned, and events and log lines leave after the hub's lock is released. The loop is the only writer of a
//! connection's `Control` counts.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant as StdInstant, SystemTime};

use bytes::Bytes;
use tether_proto::registry::{Admission, SessionEvent};
use tether_proto::reliable;
use tether_proto::{CloseReason, ConnId, Connection, Event, Frame, HeartbeatRange, Undeliverable, Welcome};

use super::clustered;
use super::control::{bye, Admit, CloseCmd, Cmd, Control, Decision, SessionMeta};
use super::held::{Attached, PULL_BUDGET};
use super::hub::Hub;
use super::probes;
use super::state::Shared;
use crate::cluster::reliable::{Done, Link, Taken};
use crate::driver::{self, Hooks};
use crate::event::EventKind;
use crate::ops::{DisconnectRecord, ProbeEnded};
use crate::sockopt;

/// A new connection's session: its control slot registered in the hub, its core built, its TLS session, and
/// the hooks an event loop drives it with. `None` if no TLS session could be made (the connection is then
/// closed at once, having left every count it entered).
pub(super) fn open(
    shared: Arc<Shared>,
    sock: &mio::net::TcpStream,
    peer: SocketAddr,
    conn_id: ConnId,
) -> Option<(Connection, Option<Box<crate::driver::Tls>>, ServerHooks)> {
    let control = {
        let now_ms = driver::now().saturating_duration_since(shared.origin).as_millis() as u64;
        Arc::new(Control::new(peer, sock.as_raw_fd(), now_ms))
    };
    if shared.shutting_down.load(Ordering::Relaxed) {
        control.request(CloseCmd::Bye(bye(CloseReason::ServerShutdown, shared.cfg.shutdown_spread)));
    }
    shared.hub().conns.insert(conn_id, control.clone());
    // Accepted just before a drain began, too late for its list: it leaves like the others. (The hub's lock
    // orders this against the drain's snapshot of the connections.)
    if shared.draining.load(Ordering::Relaxed) {
        control.request(CloseCmd::Bye(shared.drain_bye()));
    }
    let mut conn = Connection::server(driver::now(), shared.conn_cfg.clone());
    // Where in its first 12 intervals the session's first round-trip probe falls.
    conn.set_ping_phase(rand::random::<f64>());
    let tls = shared.tls_session();
    let hooks = ServerHooks {
        shared,
        conn_id,
        client: None,
        control,
        handshaking: true,
        grant: None,
        rel: false,
        rel_more: false,
        stored: None,
    };
    // Without a TLS session the hooks are dropped here, which undoes the registration.
    let tls = tls.ok()?;
    Some((conn, tls, hooks))
}

/// However the connection ends (closed, its loop aborted at shutdown, or never started), it leaves the handshake
/// counts, the hub's table and the server's counts, with nothing queued behind.
impl Drop for ServerHooks {
    fn drop(&mut self) {
        self.handshake_done();
        if let (Some(a), Some(cluster)) = (self.control.close_socket_on_drop(), &self.shared.cluster) {
            a.give_back(cluster, CloseReason::Reset, false);
        }
        let queued = self.control.queued.swap(0, Ordering::Relaxed);
        self.shared.metrics.outbound_queued.fetch_sub(queued as i64, Ordering::Relaxed);
        self.shared.hub().conns.remove(&self.conn_id);
        if self.shared.cfg.max_per_ip.is_some() {
            self.shared.sources.connection_done(self.control.peer.ip());
        }
        self.shared.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Cluster mode: a client's messages (and their payload bytes) on their way to Redis at most; beyond, it is not
/// following its window.
const MAX_IN_FLIGHT: u32 = 65_536;
const MAX_IN_FLIGHT_BYTES: usize = 16 << 20;

/// What became of a reliable client's message, decided under the sessions' lock ([`ServerHooks::on_sdata`]).
enum Step {
    /// The sender's own hold is over its bound: close it, take nothing.
    Slow,
    /// This connection no longer carries the session: not taken, never acknowledged.
    Moved,
    /// For the server application.
    App {
        receipts: bool,
    },
    /// Held for the receiver's session; its connection to wake.
    Held(Option<Attached>),
    /// The receiver's hold is full; its connection, if online.
    Full(Option<Attached>),
    TooLarge,
    /// The receiver has no reliable session.
    NoSession,
}

pub(super) struct ServerHooks {
    shared: Arc<Shared>,
    conn_id: ConnId,
    /// The admitted client id, once `WELCOME` was sent.
    /// Shared with the registry's key (one allocation for both).
    client: Option<Arc<str>>,
    control: Arc<Control>,
    /// Still counted in `Shared::handshakes` (until admitted or closed).
    handshaking: bool,
    /// What the credential allows (no limit without authentication).
    grant: Option<Box<crate::auth::Grant>>,
    /// The session is reliable (the extension was granted), and the table holds items it has not sent yet.
    rel: bool,
    rel_more: bool,
    /// Cluster mode: the reliable session in Redis (its grant until the `WELCOME` carries it, then the way to
    /// it), and the client's messages sent to Redis whose outcome has not come back.
    stored: Option<Box<StoredRel>>,
}

/// A connection's reliable session in Redis (cluster mode).
struct StoredRel {
    grant: Option<reliable::Grant>,
    link: Link,
    /// The client's messages sent to Redis whose outcome has not come back, and their payload bytes.
    in_flight: u32,
    in_flight_bytes: usize,
    /// The highest item of the stream to the client sent on this connection, and the highest acknowledgement
    /// passed on to Redis.
    sent: u64,
    acked: u64,
}

/// What a client's message that Redis took asks of its connection.
enum ForConn {
    Confirm,
    Close(CloseReason, Duration),
    Abort(CloseReason),
}

/// Cluster mode: carry out what Redis decided about client `from`'s message `seq`, all but the connection's part
/// (returned). The application gets its message, a client without a reliable session its `DATA`, the sender its
/// report through `link`: also after the connection closed ([`settle`]), since Redis counts the message taken.
#[allow(clippy::too_many_arguments)]
fn carry_taken(
    shared: &Shared,
    conn_id: ConnId,
    from: &str,
    link: &Link,
    seq: u64,
    to: String,
    payload: Bytes,
    taken: Taken,
) -> ForConn {
    let report = |peer: String, outcome: Option<Undeliverable>| {
        if outcome.is_some() {
            shared.metrics.undeliverable.fetch_add(1, Ordering::Relaxed);
        }
        link.report(peer, outcome, seq);
    };
    match taken {
        // Another connection carries the session now (a resume elsewhere, or this node was declared lost
        // meanwhile): this one leaves, and its client resumes.
        Taken::Moved => return ForConn::Close(CloseReason::Takeover, Duration::ZERO),
        // Redis lost what came before (it restarted empty, or failed over): the client resumes and learns where
        // the stream stands.
        Taken::Gap => return ForConn::Close(CloseReason::Busy, Duration::from_secs(1)),
        // Its reports pile up unacknowledged: it does not read what it is told. Nothing more is taken.
        Taken::Slow => return ForConn::Abort(CloseReason::SlowConsumer),
        Taken::Again => {}
        Taken::Held => _ = shared.metrics.relayed.fetch_add(1, Ordering::Relaxed),
        Taken::App { receipts } => {
            let taken = shared.emit(EventKind::Data { client: from.to_owned(), conn: conn_id, payload });
            if !taken || receipts {
                report(String::new(), (!taken).then_some(Undeliverable::AppBusy));
            }
        }
        Taken::NoSession => {
            // No reliable session: an online plain client gets it as DATA, at most once from here.
            let local = {
                let hub = shared.hub();
                let data = || Frame::Data { peer: from.to_owned(), payload: payload.clone() };
                hub.holder(&to).map(|h| h.push(data(), shared.cfg.outbound_queue).is_ok())
            };
            if local.unwrap_or_else(|| shared.relay_remote(from, &to, payload)) {
                shared.metrics.relayed.fetch_add(1, Ordering::Relaxed);
            } else {
                report(to, Some(Undeliverable::NotOnline));
            }
        }
        Taken::TooLarge => _ = shared.metrics.undeliverable.fetch_add(1, Ordering::Relaxed),
        Taken::Full => {
            shared.metrics.undeliverable.fetch_add(1, Ordering::Relaxed);
            if let Some(c) = &shared.cluster {
                c.rel_overflow();
            }
        }
    }
    ForConn::Confirm
}

/// Cluster mode: connection `conn_id` of `from` ended with messages on their way to Redis. What Redis decided
/// about each is carried out all the same ([`carry_taken`]); then the link goes, which detaches the session
/// after the reports just asked for.
async fn settle(shared: Arc<Shared>, conn_id: ConnId, from: String, mut st: Box<StoredRel>) {
    while st.in_flight > 0 {
        match st.link.done.recv().await {
            Some(Done::Taken { seq, to, payload, taken }) => {
                st.in_flight -= 1;
                carry_taken(&shared, conn_id, &from, &st.link, seq, to, payload, taken);
            }
            Some(Done::Failed(_)) | None => return,
            Some(_) => {}
        }
    }
}

impl ServerHooks {
    /// Leave the handshake counts (server-wide and per source), once.
    fn handshake_done(&mut self) {
        if std::mem::take(&mut self.handshaking) {
            self.shared.handshakes.fetch_sub(1, Ordering::Relaxed);
            self.shared.sources.handshake_done(self.control.peer.ip());
        }
    }

    fn on_hello(&mut self, conn: &mut Connection, now: StdInstant, hello: tether_proto::Hello) {
        crate::fault::panic_at("hello", &hello.client_id);
        let shared = self.shared.clone();
        if let Some(auth) = &shared.cfg.auth {
            match auth.0.authenticate(&hello.client_id, &hello.credential, SystemTime::now()) {
                Ok(grant) => self.grant = Some(Box::new(grant)),
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
            tokio::spawn(clustered::admit(shared, cluster, self.control.clone(), self.conn_id, hello));
            return;
        }
        self.handshake_done();
        let mut hub = shared.hub();
        crate::fault::panic_at("hub", &hello.client_id);
        let Hub { registry, conns, .. } = &mut *hub;
        let admission = registry
            .admit(now, &hello.client_id, hello.nonce, self.conn_id, |c| conns.get(&c).map(|h| shared.last_rx_of(h)));
        self.conclude(conn, now, hello, admission, hub);
    }

    /// Cluster mode: carry out the decision about this connection's `HELLO`.
    fn on_admit(&mut self, conn: &mut Connection, now: StdInstant, a: Admit) {
        self.handshake_done();
        let Admit { hello, decision } = a;
        let shared = self.shared.clone();
        match decision {
            Decision::Conflict { retry_after, node } => {
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
            Decision::Unavailable { retry_after } => {
                // `busy` alone would read as a full server: the log says why.
                if shared.log_allowed("reliable session unavailable", "") {
                    tracing::warn!(conn = self.conn_id, client = %hello.client_id, "reliable session refused: Redis, where sessions are kept, does not answer; told busy, retry after {retry_after:?} (repeats summarised)");
                }
                conn.reject(now, bye(CloseReason::Busy, retry_after))
            }
            Decision::Superseded { epoch } => {
                if let Some(cluster) = &shared.cluster {
                    cluster.admitted(epoch);
                }
                conn.reject(now, bye(CloseReason::Takeover, Duration::ZERO));
            }
            Decision::Welcome { epoch, displaced, rel } => {
                if let (Some(r), Some(cluster)) = (rel, &shared.cluster) {
                    match cluster.rel_link(&hello.client_id, r.grant.token, r.attach, r.sent) {
                        Some(link) => {
                            let (grant, sent) = (Some(r.grant), r.sent);
                            let st = StoredRel { grant, link, in_flight: 0, in_flight_bytes: 0, sent, acked: sent };
                            self.stored = Some(Box::new(st))
                        }
                        // Redis went away since it opened the session: come back later (the lease's reaper or the
                        // next resume settles the session).
                        None => return conn.reject(now, bye(CloseReason::Busy, Duration::from_secs(1))),
                    }
                }
                let hub = shared.hub();
                // From here the registry knows the claim (admitted, or refused and then released as ended).
                if let Some(cluster) = &shared.cluster {
                    cluster.admitted(epoch);
                }
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
                // The session exists from here on: however this task ends, it is closed as this client's.
                let id = hub.registry.shared_id(&hello.client_id);
                self.client = Some(id.unwrap_or_else(|| hello.client_id.as_str().into()));
                let (interval, timeout) = shared.cfg.heartbeat.negotiate(hello.heartbeat_ms);
                let v2 = conn.version() >= tether_proto::frame::V2;
                // v1 has no room for them: built only for a session that will carry them.
                let mut extensions = if v2 { shared.welcome_extensions() } else { Vec::new() };
                let (rel_grant, rel_fx) = self.open_reliable(&hello, v2);
                if let Some(g) = &rel_grant {
                    extensions.push(g.to_extension());
                }
                if let Some(range) = shared.cfg.heartbeat.updates() {
                    if v2 && HeartbeatRange::offered(&hello.extensions) {
                        extensions.push(range.extension());
                    }
                }
                let welcome = Welcome {
                    version: tether_proto::frame::PROTOCOL_VERSION,
                    heartbeat_ms: interval.as_millis() as u32,
                    timeout_ms: timeout.as_millis() as u32,
                    epoch,
                    server_id: shared.cfg.server_id.clone(),
                    max_frame: None,
                    extensions,
                };
                let (heartbeat_ms, timeout_ms) = (welcome.heartbeat_ms, welcome.timeout_ms);
                conn.accept(now, welcome);
                if let Some(g) = rel_grant {
                    self.rel = true;
                    let _ = g;
                    // A resumed session's replay follows the WELCOME at once.
                    self.pull(conn, now);
                }
                shared.metrics.handshake.observe(now.saturating_duration_since(conn.opened()));
                let meta = SessionMeta::new(epoch, shared.origin, now, heartbeat_ms, timeout_ms, conn.version());
                let _ = self.control.session.set(meta);
                let client = hello.client_id;
                // The connection taken over: where it came from and when it last sent a frame.
                let mut evicted_seen = None;
                if let Some(h) = evicted.and_then(|old| hub.conns.get(&old)) {
                    h.request(CloseCmd::Bye(bye(CloseReason::Takeover, Duration::ZERO)));
                    let interval = h.session.get().map_or(Duration::ZERO, SessionMeta::interval);
                    evicted_seen = Some((h.peer, shared.last_rx_of(h), interval));
                }
                let session_events = hub.pump(Some((self.conn_id, conn, now)));
                drop(hub);
                shared.held.carry_out(rel_fx);
                crate::fault::panic_at("welcome", &client);
                let peer = self.control.peer;
                let mut found = None;
                for e in session_events {
                    if let SessionEvent::Takeover { old, new, epoch, same_device, .. } = e {
                        shared.metrics.takeovers.fetch_add(1, Ordering::Relaxed);
                        if let (true, Some((old_peer, last_rx, interval))) = (same_device, evicted_seen) {
                            let silent = now.saturating_duration_since(last_rx);
                            let (ips, f) = ((old_peer.ip(), peer.ip()), &shared.forgotten);
                            found = f.taken_over(now, old, ips, silent, interval);
                        }
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
                if evicted.is_none() {
                    found = shared.forgotten.welcomed(now, &client, peer.ip());
                    if let Some(f) = &found {
                        shared.disconnects.annotate(f.conn, f.diagnosis, &f.explanation);
                    }
                }
                if let Some(f) = found {
                    let (conn, diagnosis, explanation) = (f.conn, f.diagnosis, f.explanation);
                    shared.emit(EventKind::Diagnosis { client: client.clone(), conn, peer, diagnosis, explanation });
                }
                shared.emit(EventKind::Online {
                    client: client.clone(),
                    conn: self.conn_id,
                    peer: self.control.peer,
                    epoch,
                    heartbeat: interval,
                    timeout,
                });
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
        let Some(from) = self.client.as_deref().map(str::to_owned) else { return };
        crate::fault::panic_at("data", &from);
        if to.is_empty() {
            self.shared.emit(EventKind::Data { client: from, conn: self.conn_id, payload });
            return;
        }
        // A reliable session (online or offline) holds it.
        let payload = match self.shared.held.push_from(&to, &from, payload, None) {
            Ok(Ok(())) => return self.relayed(),
            Ok(Err(why)) => return self.undeliverable(conn, now, to, why),
            Err(payload) => payload,
        };
        let local = {
            let hub = self.shared.hub();
            let limit = self.shared.cfg.outbound_queue;
            match hub.holder(&to) {
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
            self.relayed();
        } else {
            self.undeliverable(conn, now, to, Undeliverable::NotOnline);
        }
    }

    fn relayed(&self) {
        self.shared.metrics.relayed.fetch_add(1, Ordering::Relaxed);
    }

    /// A plain `DATA` was not delivered: told to the sender and counted; no event per message, which one sender
    /// could use to crowd out everyone else's events.
    fn undeliverable(&self, conn: &mut Connection, now: StdInstant, to: String, why: Undeliverable) {
        self.shared.metrics.undeliverable.fetch_add(1, Ordering::Relaxed);
        let _ = conn.send(now, Frame::Undeliverable { to, why });
    }

    /// Decide this `HELLO`'s reliable session (a session exists from here on, under the hub's lock, which the
    /// caller holds): resume or open one when it offers the extension (a v2 single node grants it), or end the
    /// id's session when it does not (another device, or a client that lost its state, took the id). What the
    /// table asks for is carried out by the caller once the hub is released.
    fn open_reliable(
        &mut self,
        hello: &tether_proto::Hello,
        v2: bool,
    ) -> (Option<reliable::Grant>, reliable::Effects<Attached>) {
        if self.shared.cluster.is_some() {
            // Opened in Redis before the decision came (`clustered::admit`).
            let grant = self.stored.as_mut().and_then(|s| s.grant.take()).filter(|_| v2);
            return (grant, reliable::Effects::default());
        }
        let offer = reliable::Offer::find(&hello.extensions).filter(|_| v2);
        let mut table = self.shared.held.table();
        let opened = match offer {
            Some(offer) => {
                let opened = table.open(&hello.client_id, offer, rand::random(), Attached(self.control.clone()));
                (Some(opened.grant), opened.effects)
            }
            None => (None, table.replace(&hello.client_id).1),
        };
        self.shared.held.note_sessions(&table);
        opened
    }

    /// Put a `REPORT` on this client's own stream about its message `seq` to `peer`, and send it.
    fn report(&mut self, conn: &mut Connection, now: StdInstant, peer: &str, outcome: Option<Undeliverable>, seq: u64) {
        let Some(from) = &self.client else { return };
        if outcome.is_some() {
            self.shared.metrics.undeliverable.fetch_add(1, Ordering::Relaxed);
        }
        let over = {
            let mut table = self.shared.held.table();
            table.report(from, None, peer, outcome, vec![seq]);
            table.over_bound(from)
        };
        if over {
            // Its reports pile up unacknowledged: it does not read what it is told.
            return conn.abort(now, CloseReason::SlowConsumer);
        }
        self.pull(conn, now);
    }

    /// A reliable client's message: for the server application, held for a reliable receiver, or pushed to an
    /// online plain one; its fate, when it is not held, goes back on the sender's own stream. Whether this
    /// connection still carries the session (a resume may have moved it: the client sends the message again
    /// there) and what became of the message are decided under one lock. Only a message taken is confirmed, so
    /// only it is ever acknowledged.
    fn on_sdata(&mut self, conn: &mut Connection, now: StdInstant, seq: u64, to: String, payload: Bytes) {
        let Some(from) = self.client.as_deref().map(str::to_owned) else { return };
        crate::fault::panic_at("data", &from);
        if let Some(st) = &mut self.stored {
            // Cluster mode: Redis decides; the outcome comes back in order ([`Self::on_stored`]).
            st.in_flight += 1;
            st.in_flight_bytes += payload.len();
            st.link.take(seq, to, payload);
            if st.in_flight > MAX_IN_FLIGHT || st.in_flight_bytes > MAX_IN_FLIGHT_BYTES {
                // No client following the rules has more unacknowledged than its window.
                conn.abort(now, CloseReason::RateLimited);
            }
            return;
        }
        let attach = Attached(self.control.clone());
        let step = {
            let mut table = self.shared.held.table();
            if table.over_bound(&from) {
                Step::Slow
            } else if !table.received(&from, &attach, seq) {
                Step::Moved
            } else if to.is_empty() {
                Step::App { receipts: table.wants_receipts(&from) }
            } else {
                match table.token_of(&from) {
                    None => Step::Moved,
                    Some(token) => {
                        let origin = reliable::Origin::Client { id: from.clone(), token, seq };
                        match table.push(&to, &from, payload.clone(), Some(origin)) {
                            Ok(wake) => Step::Held(wake),
                            Err(reliable::PushError::Full) => Step::Full(table.attached(&to).cloned()),
                            Err(reliable::PushError::TooLarge) => Step::TooLarge,
                            Err(reliable::PushError::NoSession) => Step::NoSession,
                        }
                    }
                }
            }
        };
        match step {
            // Its reports pile up unacknowledged: it does not read what it is told. Nothing more is taken.
            Step::Slow => return conn.abort(now, CloseReason::SlowConsumer),
            Step::Moved => return,
            Step::App { receipts } => {
                let taken = self.shared.emit(EventKind::Data { client: from, conn: self.conn_id, payload });
                if !taken || receipts {
                    self.report(conn, now, "", (!taken).then_some(Undeliverable::AppBusy), seq);
                }
            }
            Step::Held(wake) => {
                self.relayed();
                if let Some(a) = wake {
                    a.0.wake_pull();
                }
            }
            Step::Full(receiver) => {
                // An online receiver whose hold fills is not reading: it leaves, and learns at its resume.
                if let Some(a) = receiver {
                    a.0.request(CloseCmd::Abort(CloseReason::SlowConsumer));
                }
                self.report(conn, now, &to, Some(Undeliverable::HoldFull), seq);
            }
            Step::TooLarge => self.report(conn, now, &to, Some(Undeliverable::TooLarge), seq),
            Step::NoSession => {
                // No reliable session: an online plain client gets it as DATA, at most once from here.
                let delivered = {
                    let hub = self.shared.hub();
                    let limit = self.shared.cfg.outbound_queue;
                    hub.holder(&to).is_some_and(|h| h.push(Frame::Data { peer: from, payload }, limit).is_ok())
                };
                if delivered {
                    self.relayed();
                } else {
                    self.report(conn, now, &to, Some(Undeliverable::NotOnline), seq);
                }
            }
        }
        conn.confirm(now, seq);
    }

    /// A reliable client's message too large to relay: taken (under the same rules as any), and reported.
    fn on_sdata_too_large(&mut self, conn: &mut Connection, now: StdInstant, seq: u64, to: String, len: usize) {
        let Some(from) = self.client.clone() else { return };
        if let Some(st) = &mut self.stored {
            st.link.take_too_large(seq, to.clone());
            st.in_flight += 1;
            return self.on_relay_too_large(to, len);
        }
        let taken = self.shared.held.table().received(&from, &Attached(self.control.clone()), seq);
        if taken {
            self.report(conn, now, &to, Some(Undeliverable::TooLarge), seq);
            self.on_relay_too_large(to, len);
            conn.confirm(now, seq);
        }
    }

    /// The client acknowledged our stream up to `seq`: release, and deliver the receipts that follow.
    fn on_acked(&mut self, conn: &mut Connection, now: StdInstant, seq: u64) {
        let Some(client) = &self.client else { return };
        if let Some(st) = &mut self.stored {
            // Checked here, as the single node's outbox does: an acknowledgement of what this connection never
            // sent is a protocol error, and one that releases nothing costs Redis nothing.
            if seq > st.sent {
                if self.shared.log_allowed("bad acknowledgement", client) {
                    tracing::info!(conn = self.conn_id, client = %client, "protocol error: acknowledgement of {seq}, but only {} were sent", st.sent);
                }
                return conn.reject(now, bye(CloseReason::ProtocolError, Duration::ZERO));
            }
            if seq > st.acked {
                st.acked = seq;
                st.link.ack(seq);
            }
            return;
        }
        let acked = self.shared.held.table().ack(client, &Attached(self.control.clone()), seq);
        match acked {
            Ok(fx) => self.shared.held.carry_out(fx),
            Err(e) => {
                if self.shared.log_allowed("bad acknowledgement", client) {
                    tracing::info!(conn = self.conn_id, client = %client, "protocol error: {e}");
                }
                conn.reject(now, bye(CloseReason::ProtocolError, Duration::ZERO));
            }
        }
    }

    /// Cluster mode: what came of a step of this connection's reliable session in Redis, in the order asked. A
    /// client's message is confirmed (and so acknowledged) only now that Redis has it.
    fn on_stored(&mut self, conn: &mut Connection, now: StdInstant, done: Done) {
        let (Some(from), Some(st)) = (self.client.clone(), self.stored.as_mut()) else { return };
        match done {
            Done::Taken { seq, to, payload, taken } => {
                st.in_flight -= 1;
                st.in_flight_bytes -= payload.len();
                match carry_taken(&self.shared, self.conn_id, &from, &st.link, seq, to, payload, taken) {
                    ForConn::Confirm => conn.confirm(now, seq),
                    ForConn::Close(reason, retry) => conn.close(now, bye(reason, retry)),
                    ForConn::Abort(reason) => conn.abort(now, reason),
                }
            }
            Done::Items(frames) => {
                for f in frames {
                    if let Frame::Sdata { seq, .. } | Frame::Report(tether_proto::Report { seq, .. }) = &f {
                        st.sent = st.sent.max(*seq);
                    }
                    if let Err(e) = conn.send(now, f) {
                        // What follows was fetched too: skipping it would leave a gap. The client resumes.
                        if self.shared.log_allowed("reliable item refused", &from) {
                            tracing::warn!(conn = self.conn_id, client = %from, "a held item could not be sent ({e}); closing, the client will resume (do the nodes share one max frame?)");
                        }
                        return conn.close(now, bye(CloseReason::Busy, Duration::from_secs(1)));
                    }
                }
                // More may wait: asked for once the output drains ([`Hooks::after_flush`]).
                self.rel_more = true;
            }
            Done::Moved => conn.close(now, bye(CloseReason::Takeover, Duration::ZERO)),
            Done::Failed(e) => {
                if self.shared.log_allowed("reliable session store failed", &from) {
                    tracing::warn!(conn = self.conn_id, client = %from, "reliable session: Redis failed ({e}); the client will resume");
                }
                conn.close(now, bye(CloseReason::Busy, Duration::from_secs(1)));
            }
        }
    }

    /// Send what the session holds and this connection has not sent, up to [`PULL_BUDGET`] bytes; the rest
    /// follows as the output drains ([`Hooks::after_flush`]).
    fn pull(&mut self, conn: &mut Connection, now: StdInstant) {
        let Some(client) = &self.client else { return };
        if !self.rel {
            return;
        }
        if conn.pending_tx() >= PULL_BUDGET {
            // A path that does not drain: the items wait in the hold (bounded), not in the connection's output
            // (whose limit would end it as a slow consumer before its heartbeat verdict).
            self.rel_more = true;
            return;
        }
        if let Some(st) = &self.stored {
            // Cluster mode: the items come from Redis as a command ([`Self::on_stored`]).
            self.rel_more = false;
            return st.link.fetch();
        }
        let (frames, more) = self.shared.held.table().next_frames(client, &Attached(self.control.clone()), PULL_BUDGET);
        self.rel_more = more;
        for f in frames {
            if conn.send(now, f).is_err() {
                break;
            }
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
        self.shared.emit(EventKind::Undeliverable { client: from.to_string(), conn: self.conn_id, to, len, why });
    }

    /// The client asked for a new heartbeat (`heartbeat_update`): granted within the policy, like a `HELLO`'s,
    /// and the session's view and the event log follow.
    fn on_heartbeat_request(&mut self, conn: &mut Connection, now: StdInstant, interval_ms: u32) {
        let (Some(client), Some(meta)) = (self.client.clone(), self.control.session.get()) else { return };
        let (interval, timeout) = self.shared.cfg.heartbeat.negotiate(interval_ms);
        let before = conn.heartbeat();
        // Answered even when nothing changes: the client waits for the answer.
        conn.set_heartbeat(now, interval, timeout);
        let Some((interval, timeout)) = conn.heartbeat().filter(|h| Some(*h) != before) else { return };
        meta.set_heartbeat(interval, timeout);
        let asked = Duration::from_millis(interval_ms.into());
        let (conn, peer) = (self.conn_id, self.control.peer);
        self.shared.emit(EventKind::Heartbeat {
            client: client.to_string(),
            conn,
            peer,
            asked,
            heartbeat: interval,
            timeout,
        });
    }

    /// A heartbeat round trip: into the histograms, beside the kernel's smoothed RTT read at the same moment.
    fn on_rtt(&mut self, rtt: Duration) {
        let us = rtt.as_micros().clamp(1, u32::MAX as u128) as u64;
        let count = (self.control.rtt.load(Ordering::Relaxed) >> 32) + 1;
        self.control.rtt.store((count << 32) | us, Ordering::Release);
        self.shared.probes.round_trip();
        if !self.shared.cfg.metrics {
            return;
        }
        let m = &self.shared.metrics;
        m.app_rtt.observe(rtt);
        let fd = self.control.fd();
        if let Some(info) = fd.and_then(sockopt::tcp_info) {
            m.kernel_rtt.observe(info.rtt);
        }
    }

    /// Count a closed connection: by reason, its lateness and session length, and in the ring of recent ones.
    /// `path_silent`: a verdict of silence the path explains (see `on_closed`), which the diagnosis of a forgotten
    /// connection waits on.
    fn record_close(
        &self,
        conn: &Connection,
        now: StdInstant,
        c: &tether_proto::Closed,
        last_seen: StdInstant,
        path_silent: bool,
    ) {
        let m = &self.shared.metrics;
        m.count_disconnect(c.reason);
        if let Some(l) = c.lateness {
            m.lateness.observe(l);
        }
        let session = self.control.session.get();
        if let Some(meta) = session {
            m.session.observe(now.saturating_duration_since(meta.since_at(self.shared.origin)));
        }
        // A takeover by the same device, from the same address, explained why it ended (`forgotten`).
        let forgot = self.shared.forgotten.closing(self.conn_id);
        let silent_for = session.map(|_| now.saturating_duration_since(last_seen));
        self.shared.disconnects.push(DisconnectRecord {
            at: SystemTime::now(),
            conn: self.conn_id,
            client: self.client.as_deref().map(str::to_string),
            peer: self.control.peer,
            reason: c.reason,
            by_peer: c.by_peer,
            lateness: c.lateness,
            silent_for,
            duration: now.saturating_duration_since(conn.opened()),
            bytes_in: self.control.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.control.bytes_out.load(Ordering::Relaxed),
            diagnosis: forgot.as_ref().map(|_| crate::Diagnosis::MiddleboxForgot),
            detail: forgot.or_else(|| c.detail.clone()),
        });
        // Ended here for silence: whether its client comes straight back decides if the path forgot it.
        if let (Some(meta), Some(client), Some(silent), true) = (session, &self.client, silent_for, path_silent) {
            let interval = meta.interval();
            let ip = self.control.peer.ip();
            let ended = (c.reason, silent, c.lateness);
            self.shared.forgotten.silenced(now, client, (self.conn_id, ip), interval, ended);
        }
    }

    fn on_closed(&mut self, conn: &Connection, now: StdInstant, c: tether_proto::Closed) {
        self.handshake_done();
        // An operator's probe waiting on this connection judges it by the kernel's view as it closes.
        if self.shared.probes.watches(self.conn_id) {
            let ended = ProbeEnded { reason: c.reason, by_client: c.by_peer };
            self.shared.probes.closed(self.conn_id, probes::End { ended, kernel: self.control.kernel_view() });
        }
        // A verdict of silence the path explains: it carried nothing back (a client that stalled still has its
        // kernel acknowledge our PING). Read before the socket goes.
        let path_silent = !c.by_peer
            && match (c.reason, self.control.session.get()) {
                (CloseReason::KeepaliveTimeout, _) => true,
                (CloseReason::HeartbeatTimeout | CloseReason::WriteTimeout, Some(meta)) => {
                    let interval = meta.interval();
                    let kernel = self.control.kernel_view().map(|k| k.info);
                    matches!(crate::probe::unanswered_since(kernel, interval), crate::probe::Unanswered::PathDown(_))
                }
                _ => false,
            };
        // The socket closes right after this: the operator's view of it ends here.
        // (Its last frame and queued-byte counts settle at the pump's next flush and in `ServerHooks`'s drop.)
        let unadmitted = self.control.close_socket();
        // Cluster mode: claimed for this connection, which closed before it could be welcomed.
        if let (Some(a), Some(cluster)) = (unadmitted, &self.shared.cluster) {
            a.give_back(cluster, c.reason, c.by_peer);
        }
        let last_seen = conn.last_rx().unwrap_or(now);
        let by_peer = c.by_peer;
        self.record_close(conn, now, &c, last_seen, path_silent);
        // Cluster mode: the link's task detaches the session in Redis after every step asked before, once the
        // outcomes still on their way are carried out.
        if let (Some(st), Some(from)) = (self.stored.take(), &self.client) {
            if st.in_flight > 0 {
                tokio::spawn(settle(self.shared.clone(), self.conn_id, from.to_string(), st));
            }
        }
        if let (true, Some(client)) = (self.rel, &self.client) {
            // The session outlives the connection: offline, it holds what arrives until it resumes or expires.
            self.shared.held.table().detach(now, client, &Attached(self.control.clone()));
            self.shared.held.wake.notify_one();
            self.shared.metrics.reliable_duplicates.fetch_add(conn.reliable_duplicates(), Ordering::Relaxed);
        }
        let holder = {
            let mut hub = self.shared.hub();
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
                client: client.to_string(),
                conn: conn_id,
                peer,
                reason,
                lateness,
                silent_for: now.saturating_duration_since(last_seen),
                by_peer,
                detail,
            },
            (client, _) => EventKind::Closed {
                client: client.as_deref().map(str::to_string),
                conn: conn_id,
                peer,
                reason,
                lateness,
                by_peer,
                detail,
            },
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
                let mut hub = self.shared.hub();
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
            Event::Unsubscribe(ids) => self.shared.hub().registry.unsubscribe(self.conn_id, &ids),
            Event::Suspect { silent_for } => {
                let Some(client) = self.client.clone() else { return };
                let mut hub = self.shared.hub();
                hub.registry.suspect(self.conn_id, &client, silent_for);
                hub.pump(Some((self.conn_id, conn, now)));
                let own = hub.registry.lookup(&client) == Some(self.conn_id);
                let epoch = hub.registry.local_epoch(&client).filter(|_| own);
                drop(hub);
                if let (Some(cluster), Some(epoch)) = (&self.shared.cluster, epoch) {
                    cluster.publish_suspect(&client, epoch, silent_for);
                }
                self.shared.emit(EventKind::Suspect {
                    client: client.to_string(),
                    conn: self.conn_id,
                    peer: self.control.peer,
                    silent_for,
                });
            }
            Event::Recovered => {
                let Some(client) = self.client.clone() else { return };
                let mut hub = self.shared.hub();
                hub.registry.recovered(self.conn_id, &client);
                hub.pump(Some((self.conn_id, conn, now)));
                let own = hub.registry.lookup(&client) == Some(self.conn_id);
                let epoch = hub.registry.local_epoch(&client).filter(|_| own);
                drop(hub);
                if let (Some(cluster), Some(epoch)) = (&self.shared.cluster, epoch) {
                    cluster.publish_recovered(&client, epoch);
                }
                self.shared.emit(EventKind::Recovered {
                    client: client.to_string(),
                    conn: self.conn_id,
                    peer: self.control.peer,
                });
            }
            Event::Rtt(rtt) => self.on_rtt(rtt),
            Event::HeartbeatRequest { interval_ms } => self.on_heartbeat_request(conn, now, interval_ms),
            Event::RelayTooLarge { to, len } => self.on_relay_too_large(to, len),
            Event::Closed(c) => self.on_closed(conn, now, c),
            // Client-only events cannot come out of a server-role connection.
            Event::Sdata { seq, peer, payload } => self.on_sdata(conn, now, seq, peer, payload),
            Event::SdataTooLarge { seq, to, len } => self.on_sdata_too_large(conn, now, seq, to, len),
            Event::Acked(seq) => self.on_acked(conn, now, seq),
            Event::Welcome(_)
            | Event::Presence(_)
            | Event::Undeliverable { .. }
            | Event::Report(_)
            | Event::HeartbeatChanged { .. }
            | Event::PathHeld { .. }
            | Event::PongLate { .. } => {}
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
            Cmd::Pull => self.pull(conn, now),
            Cmd::Stored(done) => self.on_stored(conn, now, *done),
        }
    }

    fn socket_options(&self) -> Option<&crate::sockopt::SocketOptions> {
        Some(&self.shared.cfg.socket)
    }

    fn after_flush(&mut self, conn: &mut Connection, now: StdInstant) {
        if self.rel_more && conn.pending_tx() < PULL_BUDGET {
            self.pull(conn, now);
        }
    }

    /// Visiting the connection panicked (the event loop closes its socket right after): log
    /// and count it, and close as any close does ([`on_closed`](Self::on_closed)): the handshake slot, the session
    /// (announced `offline`, reason `reset`, the detail saying why), the history's record and a waiting probe.
    fn after_panic(&mut self, conn: &Connection, panic: &(dyn std::any::Any + Send)) {
        let what = panic
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("a panic");
        tracing::error!(conn = self.conn_id, peer = %self.control.peer, client = ?self.client, "serving this connection panicked (a bug): {what}; closing it");
        self.shared.metrics.task_panics.fetch_add(1, Ordering::Relaxed);
        let detail = Some("the server's work for this connection panicked; see its log".to_owned());
        let closed =
            tether_proto::Closed { reason: CloseReason::Reset, lateness: None, by_peer: false, peer_bye: None, detail };
        self.on_closed(conn, driver::now(), closed);
    }

    fn poll_cmd(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Cmd>> {
        if let std::task::Poll::Ready(cmd) = self.control.poll_take(cx) {
            return std::task::Poll::Ready(Some(cmd));
        }
        match self.stored.as_mut().map(|st| st.link.done.poll_recv(cx)) {
            Some(std::task::Poll::Ready(Some(done))) => std::task::Poll::Ready(Some(Cmd::Stored(Box::new(done)))),
            _ => std::task::Poll::Pending,
        }
    }

    fn on_progress(&mut self, conn: &Connection) {
        if let Some(t) = conn.last_rx() {
            let ms = t.saturating_duration_since(self.shared.origin).as_millis() as u64;
            self.control.last_rx_ms.store(ms, Ordering::Relaxed);
        }
    }

    /// Traffic into the connection's own counts (its event loop is their only writer: plain loads and stores) and, with
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
