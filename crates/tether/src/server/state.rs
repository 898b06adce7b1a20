//! The state every task of one server shares ([`Shared`]), and the reads built from it: events out, stats,
//! the metrics snapshot, one session's details.
//!
//! # Layout
//! - [`Shared`]: the configuration, the hub, the counters, the event sink and watchers, the drain's state, the
//!   per-source counts, the log limiter; one `Arc` per server, cloned into every task.
//! - [`Shared::emit`]: the one way an event leaves the server (to the application's bounded stream and the
//!   admin layer's watchers); it never blocks.
//! - [`Shared::stats`], [`Shared::metrics_snapshot`], [`Shared::session_info`]: what operators read.
//!
//! # Rules
//! Owns no task and does no IO. Its locks: the hub (see [`super::hub`]), then a connection's control lock; the
//! drain lock only on its own. The hub's lock is taken once per snapshot and released before anything is
//! emitted or logged.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant as StdInstant, SystemTime};

use tether_proto::frame::{ext, Extension};
use tether_proto::registry::Registry;
use tether_proto::{Bye, CloseReason, ConnId};
use tokio::sync::Notify;

use super::control::{bye, Control};
use super::forgotten::Forgotten;
use super::held::Held;
use super::hub::Hub;
use super::limits::Sources;
use super::probes::Probes;
use crate::cluster::Cluster;
use crate::config::ServerConfig;
use crate::driver;
use crate::event::{EventKind, EventSink, ServerEvent, Stats};
use crate::loglimit::LogLimiter;
use crate::metrics::{Metrics, MetricsSnapshot};
use crate::ops::{DisconnectRing, DrainStatus, SessionInfo, Watchers};

pub(super) struct Shared {
    pub(super) cfg: ServerConfig,
    /// `cfg.conn`, shared by every connection's state machine.
    pub(super) conn_cfg: Arc<tether_proto::ConnConfig>,
    /// The session hub: read and changed through [`hub`](Self::hub) only.
    hub_lock: Mutex<Hub>,
    pub(super) events: EventSink,
    pub(super) next_conn: AtomicU64,
    /// Connections the server holds at most: `max_connections`, or what the descriptor limit allows if less.
    pub(super) capacity: usize,
    /// `max_handshakes_per_ip`, or its default.
    pub(super) handshakes_per_source: usize,
    /// Connections with a running task (admitted or handshaking); `busy` refusals are not counted.
    pub(super) active: AtomicUsize,
    /// Connections accepted whose `HELLO` is not admitted yet, and the highest that count has been.
    pub(super) handshakes: AtomicUsize,
    pub(super) peak_handshakes: AtomicUsize,
    /// Counters and histograms (refusals, undeliverable and the rest), read by [`crate::ServerHandle::metrics`].
    pub(super) metrics: Metrics,
    /// Recent closed connections, for the operator.
    pub(super) disconnects: DisconnectRing,
    /// Sessions ended for silence and taken over, waiting to see whether the path forgot them.
    pub(super) forgotten: Forgotten,
    /// Live copies of the event stream (admin SSE clients).
    pub(super) watchers: Watchers,
    /// Lame duck: no one is admitted, and a drain task is saying goodbye to everyone.
    pub(super) draining: AtomicBool,
    pub(super) drain: Mutex<DrainState>,
    pub(super) started: SystemTime,
    /// The admin listener's address, for the `listening` event.
    pub(super) admin_addr: OnceLock<SocketAddr>,
    /// Operators' round-trip probes waiting for a `PONG` ([`crate::ServerHandle::probe`]).
    pub(super) probes: Probes,
    /// Handshakes in flight and (when `max_per_ip` is set) connections, per source.
    pub(super) sources: Sources,
    /// Repeated log lines about one client are summarised.
    pub(super) log: LogLimiter,
    /// Wakes the summary task when a line was first held back.
    pub(super) log_wake: Notify,
    /// Base for the `last_rx` timestamps kept in atomics.
    pub(super) origin: StdInstant,
    /// Wakes the presence-grace timer when the registry's next deadline may have moved.
    pub(super) registry_wake: Notify,
    pub(super) shutting_down: AtomicBool,
    /// Cluster mode ([`crate::cluster`]); `None` for a single node.
    pub(super) cluster: Option<Arc<Cluster>>,
    /// Reliable sessions (the `reliable` extension).
    pub(super) held: Held,
}

/// A drain in progress, or the last one.
#[derive(Default)]
pub(super) struct DrainState {
    pub(super) status: Option<DrainStatus>,
    pub(super) task: Option<tokio::task::JoinHandle<()>>,
}

impl Shared {
    /// The session hub, locked. A panic while serving a connection, with the lock held, does not take the server
    /// down with it: the lock is taken over rather than poisoned for everyone (the registry's own operations are
    /// sans IO and fuzzed; what panics is ours, and it leaves through `ServerHooks`'s drop).
    pub(super) fn hub(&self) -> std::sync::MutexGuard<'_, Hub> {
        self.hub_lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The state for a server with `cfg`, holding at most `capacity` connections.
    pub(super) fn new(cfg: ServerConfig, capacity: usize, cluster: Option<Arc<Cluster>>, events: EventSink) -> Shared {
        let handshakes_per_source = cfg.max_handshakes_per_ip.unwrap_or((cfg.max_handshakes / 16).max(2));
        // Round-trip probes feed the metrics: off with them.
        let conn_cfg = tether_proto::ConnConfig {
            rtt_probe_every: cfg.conn.rtt_probe_every.filter(|_| cfg.metrics),
            ..cfg.conn.clone()
        };
        let (cfg_hold, cfg_max_frame) = (cfg.hold, cfg.conn.max_frame);
        Shared {
            conn_cfg: Arc::new(conn_cfg),
            hub_lock: Mutex::new(Hub::new(Registry::new(cfg.registry.clone()), cfg.outbound_queue, cluster.clone())),
            disconnects: DisconnectRing::new(cfg.disconnect_history),
            forgotten: Forgotten::default(),
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
            probes: Probes::default(),
            sources: Sources::default(),
            log: LogLimiter::new(Duration::from_secs(10), 3, 4096),
            log_wake: Notify::new(),
            origin: driver::now(),
            registry_wake: Notify::new(),
            shutting_down: AtomicBool::new(false),
            cluster,
            held: Held::new(cfg_hold, cfg_max_frame),
        }
    }

    /// Emit an event; false when the application's stream was full and it was dropped (and counted).
    pub(super) fn emit(&self, kind: EventKind) -> bool {
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
        let taken = self.events.emit(ev);
        if !taken && self.log_allowed("events dropped", "the application") {
            tracing::warn!(
                "the event reader is not keeping up: events are dropped and counted ({} so far)",
                self.events.dropped()
            );
        }
        taken
    }

    /// Whether a log line of `kind` about `key` may be written now (repeats are summarised later).
    pub(super) fn log_allowed(&self, kind: &'static str, key: &str) -> bool {
        let allowed = self.log.check(driver::now(), kind, key);
        if !allowed {
            self.log_wake.notify_one();
        }
        allowed
    }

    pub(super) fn stats(&self) -> Stats {
        let online = self.hub().registry.online();
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

    pub(super) fn metrics_snapshot(&self) -> MetricsSnapshot {
        let (online, subscriptions, presence_frames, remote_sessions) = {
            let hub = self.hub();
            let remote = self.cluster.as_ref().map(|_| hub.registry.remote_online_count());
            (hub.registry.online(), hub.registry.subscriptions(), hub.presence_frames, remote)
        };
        let m = &self.metrics;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let disconnects = m.disconnects();
        let cluster = self.cluster.as_ref().map(|c| c.snapshot(remote_sessions.unwrap_or(0)));
        let reliable = {
            let table = self.held.table();
            let (sessions, held_messages, held_bytes) = table.totals();
            let st = table.stats();
            // Cluster mode: the sessions and their holds are in Redis; this node counts what it saw of them.
            let [resumed, refused, replayed, expired, overflows] =
                self.cluster.as_ref().map_or([0; 5], |c| c.rel_counts());
            crate::metrics::ReliableSnapshot {
                sessions,
                held_messages,
                held_bytes,
                replayed: st.replayed + replayed,
                duplicates: load(&m.reliable_duplicates),
                expired: st.expired + expired,
                overflows: st.overflows + overflows,
                resumed: st.resumed + resumed,
                resume_refused: st.resume_refused + refused,
            }
        };
        MetricsSnapshot {
            cluster,
            reliable,
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
            task_panics: load(&m.task_panics),
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

    pub(super) fn session_info(&self, client: String, conn: ConnId, c: &Control, suspect: bool) -> Option<SessionInfo> {
        let meta = c.session.get()?;
        let (heartbeat, timeout) = meta.heartbeat();
        let now = driver::now();
        let rtt_us = (c.rtt.load(Ordering::Relaxed) & 0xffff_ffff) as u32;
        Some(SessionInfo {
            client,
            conn,
            peer: c.peer,
            epoch: meta.epoch,
            since: SystemTime::now() - now.saturating_duration_since(meta.since_at(self.origin)),
            connected_for: now.saturating_duration_since(meta.since_at(self.origin)),
            last_frame_ago: now.saturating_duration_since(self.last_rx_of(c)),
            heartbeat,
            timeout,
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
    pub(super) fn drain_bye(&self) -> Bye {
        let mut b = bye(CloseReason::ServerShutdown, self.busy_retry());
        let redirect = self.drain.lock().ok().and_then(|d| d.status.as_ref()?.redirect.clone());
        b.alternative = redirect.unwrap_or_default();
        b
    }

    /// The retry-after for refusals at accept: `busy_retry_after` plus a random share of the spread window.
    pub(super) fn busy_retry(&self) -> Duration {
        self.cfg.busy_retry_after + self.cfg.busy_retry_spread.mul_f64(rand::random::<f64>())
    }

    /// The limits a v2 `WELCOME` announces besides the maximum frame.
    pub(super) fn welcome_extensions(&self) -> Vec<Extension> {
        let mut out = vec![Extension::u32(ext::MAX_SUBSCRIPTIONS, self.cfg.registry.max_subscriptions as u32)];
        if let Some(rate) = self.cfg.conn.max_data_rate {
            out.push(Extension::u32(ext::MAX_DATA_RATE, rate));
        }
        out
    }

    pub(super) fn last_rx_of(&self, control: &Control) -> StdInstant {
        self.origin + Duration::from_millis(control.last_rx_ms.load(Ordering::Relaxed))
    }

    /// A fresh rustls server session when the server speaks TLS. rustls fails here only on a configuration it
    /// accepted at build time, so the error is logged and the connection dropped.
    pub(super) fn tls_session(&self) -> Result<Option<Box<crate::driver::Tls>>, ()> {
        match &self.cfg.tls {
            None => Ok(None),
            Some(t) => {
                t.accept().map(|t| Some(crate::driver::Tls::server(t))).map_err(|e| tracing::error!("tls session: {e}"))
            }
        }
    }
}
