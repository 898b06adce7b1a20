//! [`ServerHandle`]: what the application and the operator do to a running server, and the paced drain.
//!
//! # Layout
//! - Steering one client: [`ServerHandle::send`], [`ServerHandle::kick`], [`ServerHandle::probe`]; in cluster
//!   mode a client held by another node is reached through it.
//! - Reading: [`ServerHandle::stats`], [`ServerHandle::metrics`], [`ServerHandle::sessions`],
//!   [`ServerHandle::session`], [`ServerHandle::disconnects`], [`ServerHandle::watch_events`].
//! - Lame duck: [`ServerHandle::drain`] spawns `drain_paced`, which says goodbye in batches.
//!
//! # Rules
//! Nothing here runs in an event loop: a connection is reached only through its control slot (a close
//! request, a queued frame, a probe request), so no operator call can block a heartbeat. Under the hub's lock
//! references are gathered, or one frame pushed or one close requested; copies and the kernel's view are made
//! after it is released. The drain lock is the one taken before the hub's (by `drain`, to snapshot the
//! connections it will say goodbye to).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tether_proto::{CloseReason, ConnId, Frame};

use super::control::{bye, CloseCmd, Control, PushError, Requested, SessionMeta};
use super::state::Shared;
use crate::event::Stats;
use crate::metrics::MetricsSnapshot;
use crate::ops::{
    DisconnectRecord, DrainError, DrainStatus, EventWatch, HoldInfo, KernelView, ProbeReport, SessionInfo,
};

/// A cheap handle for the application: send to a client, kick one, count sessions.
#[derive(Clone)]
pub struct ServerHandle {
    pub(super) shared: Arc<Shared>,
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
    #[error("client {0}'s reliable session holds as much as the server allows")]
    HoldFull(String),
    #[error("client {0} has no reliable session: no receipt can be given")]
    NotReliable(String),
}

/// What [`ServerHandle::send_with_receipt`] returns: resolves when the client's application took the message
/// (`None`), or with why it never will (`Some`: the session expired, or was replaced by another device). A
/// server that stops before either resolves it with `Err`.
pub type Receipt = tokio::sync::oneshot::Receiver<super::held::Delivery>;

/// Why [`ServerHandle::kick_with`] did not kick a client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KickError {
    #[error("client {0} is not online")]
    Offline(String),
    /// Its connection is already closing: another kick, a takeover, a drain or the shutdown came first, and that
    /// goodbye is the one it gets.
    #[error("client {0} is already being disconnected")]
    Leaving(String),
}

/// How often a drain sends a batch of goodbyes.
const DRAIN_TICK: Duration = Duration::from_millis(100);

impl ServerHandle {
    /// Queue `payload` for `client` (delivered as `DATA` from the server application, with an empty peer). At most
    /// `max_frame - 2` bytes: the largest frame a client must accept (`max_frame - 10` to a client with a reliable
    /// session, whose frames carry a sequence number). A client with a reliable session gets it
    /// through its session: held while it is offline, sent again after a resume, until it acknowledges it
    /// ([`send_with_receipt`](Self::send_with_receipt) also tells when it did).
    pub fn send(&self, client: &str, payload: Bytes) -> Result<(), SendToError> {
        let max = tether_proto::frame::max_payload(self.shared.cfg.conn.max_frame, false);
        if payload.len() > max {
            return Err(SendToError::TooLarge { len: payload.len(), max });
        }
        // A reliable session, online or offline, holds it until its client acknowledges it.
        let len = payload.len();
        let payload = match self.shared.held.push_from(client, "", payload, None) {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(why)) => return Err(self.refused(client, why, len)),
            Err(payload) => payload,
        };
        let payload = {
            let hub = self.shared.hub();
            if let Some(h) = hub.holder(client) {
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
                cluster.deliver(&node, client, payload).then_some(()).ok_or_else(|| SendToError::Offline(client.into()))
            }
            None => Err(SendToError::Offline(client.into())),
        }
    }

    /// [`send`](Self::send) to a client with a reliable session, with a receipt that resolves when its
    /// application took the message, or with why it never will. The message is held while the client is offline
    /// (until its session expires).
    pub fn send_with_receipt(&self, client: &str, payload: Bytes) -> Result<Receipt, SendToError> {
        let max = tether_proto::frame::max_payload(self.shared.cfg.conn.max_frame, false);
        if payload.len() > max {
            return Err(SendToError::TooLarge { len: payload.len(), max });
        }
        let held = &self.shared.held;
        let (n, receipt) = held.new_receipt();
        let len = payload.len();
        match held.push_from(client, "", payload, Some(n)) {
            Ok(Ok(())) => Ok(receipt),
            other => {
                held.drop_receipt(n);
                Err(match other {
                    Ok(Err(why)) => self.refused(client, why, len),
                    _ => SendToError::NotReliable(client.into()),
                })
            }
        }
    }

    /// Why a reliable session did not take the application's message of `len` bytes.
    fn refused(&self, client: &str, why: tether_proto::Undeliverable, len: usize) -> SendToError {
        match why {
            tether_proto::Undeliverable::TooLarge => {
                let max = tether_proto::frame::max_reliable_payload(self.shared.cfg.conn.max_frame, false);
                SendToError::TooLarge { len, max }
            }
            _ => SendToError::HoldFull(client.into()),
        }
    }

    /// Remove `client` with `BYE(kicked)`. Returns whether this call kicked it (see [`ServerHandle::kick_with`]).
    pub fn kick(&self, client: &str) -> bool {
        self.kick_with(client, Duration::ZERO).is_ok()
    }

    /// Remove `client` with `BYE(kicked)` asking it to wait `retry_after` before reconnecting. Of several calls at
    /// once (or a kick racing a takeover, a drain or the shutdown), exactly one decides how the connection ends:
    /// its control slot accepts the first close request and tells every later one [`KickError::Leaving`]. In
    /// cluster mode a client held by another node is kicked through it: `Ok` then means the request was sent,
    /// and that node applies the same rule.
    pub fn kick_with(&self, client: &str, retry_after: Duration) -> Result<(), KickError> {
        {
            let hub = self.shared.hub();
            if let Some(h) = hub.holder(client) {
                return match h.request(CloseCmd::Bye(bye(CloseReason::Kicked, retry_after))) {
                    Requested::Accepted => Ok(()),
                    Requested::AlreadyClosing => Err(KickError::Leaving(client.into())),
                    Requested::Closed => Err(KickError::Offline(client.into())),
                };
            }
        }
        // Cluster mode: the node holding it kicks it.
        match self.shared.remote_node_of(client) {
            Some((cluster, node)) if cluster.kick(&node, client, retry_after) => Ok(()),
            _ => Err(KickError::Offline(client.into())),
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
            let hub = self.shared.hub();
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
                    hub.conns.get(&conn).map(|h| (id.to_owned(), h.clone(), conn, suspect))
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
            let hub = self.shared.hub();
            let (conn, suspect) = hub.registry.session(client)?;
            (hub.conns.get(&conn)?.clone(), conn, suspect)
        };
        let info = self.shared.session_info(client.to_owned(), conn, &control, suspect)?;
        Some((info, control.kernel_view()))
    }

    /// What `client`'s reliable session holds, online or offline, wherever it is kept: this server's memory, or
    /// Redis for a cluster node (one script call, bounded by the Redis timeout); `None` when it has none.
    pub async fn hold_anywhere(&self, client: &str) -> Option<HoldInfo> {
        match &self.shared.cluster {
            Some(cluster) => cluster.rel_hold(client).await,
            None => self.hold(client),
        }
    }

    /// What `client`'s reliable session holds, online or offline, in this server's memory (a single node); `None`
    /// when it has none.
    pub fn hold(&self, client: &str) -> Option<HoldInfo> {
        let h = self.shared.held.table().hold_of(client)?;
        let now = crate::driver::now();
        Some(HoldInfo {
            messages: h.messages,
            bytes: h.bytes,
            online: h.online,
            expires_in: h.expires.map(|at| at.saturating_duration_since(now)),
            received: h.received,
            assigned: h.assigned,
            lost: h.lost,
        })
    }

    /// Ping `client` now and wait up to `wait` for its `PONG`; then read the kernel's view of its socket. The
    /// report tells a slow network from a client whose program does not answer while its kernel still does
    /// ([`ProbeReport::verdict`]). `None` when the client is not online.
    pub async fn probe(&self, client: &str, wait: Duration) -> Option<ProbeReport> {
        let (conn, control) = {
            let hub = self.shared.hub();
            let conn = hub.registry.lookup(client)?;
            (conn, hub.conns.get(&conn)?.clone())
        };
        let heartbeat = control.session.get().map(SessionMeta::interval);
        let probes = &self.shared.probes;
        probes.begin(conn);
        let before = control.rtt.load(Ordering::Acquire) >> 32;
        control.request_probe();
        let started = tokio::time::Instant::now();
        let answered = tokio::time::timeout(wait, async {
            loop {
                let notified = probes.notified();
                if control.rtt.load(Ordering::Acquire) >> 32 != before {
                    return true;
                }
                if probes.has_ended(conn) {
                    return false;
                }
                notified.await;
            }
        })
        .await
        .unwrap_or(false);
        let end = probes.finish(conn);
        let app_rtt = answered.then(|| Duration::from_micros(control.rtt.load(Ordering::Acquire) & 0xffff_ffff));
        Some(ProbeReport {
            client: client.to_owned(),
            app_rtt,
            waited: started.elapsed(),
            heartbeat,
            kernel: match end {
                Some(e) => e.kernel,
                None => control.kernel_view(),
            },
            ended: end.map(|e| e.ended),
        })
    }

    /// The most recent closed connections, newest first (`reason` only, when given; at most `limit`). Kept:
    /// `ServerConfig::disconnect_history`.
    pub fn disconnects(&self, reason: Option<CloseReason>, limit: usize) -> Vec<Arc<DisconnectRecord>> {
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
            let hub = shared.hub();
            hub.conns.iter().map(|(id, h)| (*id, h.clone())).collect()
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
        s.remaining = self.shared.active.load(Ordering::Relaxed);
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

    /// The address the server listens on (port 0 resolved).
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.cfg.listen
    }

    /// Record the admin listener's address (the HTTP layer lives outside this crate): [`ServerHandle::admin_addr`]
    /// returns it, and, when this comes before [`crate::Server::run`], the `listening` event and (in cluster mode)
    /// the node table name it too. The first one stays.
    pub fn set_admin_addr(&self, addr: SocketAddr) {
        let _ = self.shared.admin_addr.set(addr);
    }

    /// The admin listener's address, once recorded by [`ServerHandle::set_admin_addr`].
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.shared.admin_addr.get().copied()
    }

    /// Every counter at once: connections, online ids, handshakes (now and at most), refusals, undeliverable
    /// messages, events the application did not take.
    pub fn stats(&self) -> Stats {
        self.shared.stats()
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
