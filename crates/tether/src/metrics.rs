//! The server's counters and histograms, kept with atomics and read all at once by an exporter.
//!
//! # Layout
//! [`Metrics`] is one shared block of relaxed atomics: the hot path (a frame read or written, a heartbeat round
//! trip) does a few `fetch_add`s and never takes a lock or allocates. Disconnects are counted per
//! [`CloseReason`] in an array indexed like [`CloseReason::ALL`] (plus one slot for codes this build does not
//! know), so a reason added to the enum is counted and exported without touching this file. A [`Histogram`] has
//! fixed bucket bounds and one atomic per bucket. [`MetricsSnapshot`] is a plain copy for exporters (the admin
//! layer renders it for Prometheus); nothing here knows about HTTP or an exposition format. A leaf: it imports
//! nothing else of this crate; the cluster builds its own [`ClusterSnapshot`], and the `PRESENCE` frame count
//! is kept by the server's hub, under the lock that sends them.
//!
//! A snapshot is not one atomic instant: counters read a moment apart may disagree by the events in between,
//! which scrapers tolerate. Each counter on its own only grows.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use tether_proto::CloseReason;

/// Slots in the per-reason arrays: every known reason, then one for unknown codes.
pub const REASON_SLOTS: usize = CloseReason::ALL.len() + 1;

/// The label of reason slot `i`: the reason's name, or `unknown` for the last slot.
pub fn reason_label(i: usize) -> &'static str {
    CloseReason::ALL.get(i).map_or("unknown", |r| r.as_str())
}

fn reason_slot(r: CloseReason) -> usize {
    CloseReason::ALL.iter().position(|k| *k == r).unwrap_or(REASON_SLOTS - 1)
}

/// Bucket bounds for verdict lateness and round trips: 100 µs to 10 s, about three per decade.
pub const LATENCY_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Bucket bounds for session durations: 1 s to 1 week.
pub const SESSION_BUCKETS: &[f64] =
    &[1.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 6.0 * 3600.0, 24.0 * 3600.0, 7.0 * 24.0 * 3600.0];

/// A histogram over seconds with fixed bucket bounds, observed with atomics.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Per bucket (not cumulative), with one more for observations above the last bound.
    counts: Box<[AtomicU64]>,
    /// Sum of observations in microseconds (in nanoseconds, 20,000 sessions of session time would wrap a u64 in
    /// 11 days; in microseconds it takes 30 years).
    sum_us: AtomicU64,
}

/// A histogram's values at one moment, Prometheus-style.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// `(upper bound in seconds, observations at or below it)`, cumulative, in increasing order.
    pub buckets: Vec<(f64, u64)>,
    /// Every observation, including those above the last bound.
    pub count: u64,
    /// Sum of observations in seconds.
    pub sum: f64,
}

impl HistogramSnapshot {
    /// The upper bound (seconds) of the bucket holding the `p`-th quantile (0 < p <= 1): an estimate from above.
    /// `None` with no observations, or when it lies above the last bound.
    pub fn quantile(&self, p: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = (p.clamp(0.0, 1.0) * self.count as f64).ceil().max(1.0) as u64;
        self.buckets.iter().find(|(_, n)| *n >= rank).map(|(bound, _)| *bound)
    }
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram { bounds, counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(), sum_us: AtomicU64::new(0) }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self.bounds.partition_point(|b| *b < secs);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(d.as_micros().min(u64::MAX as u128) as u64, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut cumulative = 0;
        let mut buckets = Vec::with_capacity(self.bounds.len());
        for (bound, n) in self.bounds.iter().zip(self.counts.iter()) {
            cumulative += n.load(Ordering::Relaxed);
            buckets.push((*bound, cumulative));
        }
        let count = cumulative + self.counts[self.bounds.len()].load(Ordering::Relaxed);
        HistogramSnapshot { buckets, count, sum: self.sum_us.load(Ordering::Relaxed) as f64 / 1e6 }
    }
}

/// Everything the server counts. Shared by every connection task; each field says what moves it.
#[derive(Debug)]
pub struct Metrics {
    /// Sockets returned by `accept`, refused or not.
    pub accepted: AtomicU64,
    /// Ended connections, by reason slot ([`reason_label`]): every close of an accepted socket, refusals
    /// included.
    disconnects: [AtomicU64; REASON_SLOTS],
    pub takeovers: AtomicU64,
    pub id_conflicts: AtomicU64,
    /// Refusals, by cause: `busy` (over capacity, handshake slots or accept rate), `ip_limit`, `auth_failed`,
    /// and newcomers turned away while draining.
    pub refused_busy: AtomicU64,
    pub refused_ip_limit: AtomicU64,
    pub refused_auth: AtomicU64,
    pub refused_draining: AtomicU64,
    /// Panics while serving a connection in its event loop (a bug of ours): each connection was closed and its slots
    /// and session given back.
    pub task_panics: AtomicU64,
    /// `DATA` relayed to another client, and `DATA` answered `UNDELIVERABLE`.
    pub relayed: AtomicU64,
    pub undeliverable: AtomicU64,
    /// `reliable`: duplicates of clients' messages dropped (counted as each connection ends).
    pub reliable_duplicates: AtomicU64,
    /// Frames and bytes over every connection that reached the session layer (refusals at accept not counted).
    pub frames_in: AtomicU64,
    pub frames_out: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Bytes encoded but not yet accepted by the kernel, over all connections.
    pub outbound_queued: AtomicI64,
    /// Event watchers (live streams such as SSE) cut off because they fell behind.
    pub watchers_cut: AtomicU64,
    /// `now - deadline` of each verdict taken at a deadline.
    pub lateness: Histogram,
    /// Heartbeat round trip measured by the server's `PING`/`PONG`, and the kernel's smoothed RTT for the same
    /// socket read at the same moment.
    pub app_rtt: Histogram,
    pub kernel_rtt: Histogram,
    /// Accept to `WELCOME`.
    pub handshake: Histogram,
    /// `WELCOME` to the end of the session.
    pub session: Histogram,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics {
            accepted: AtomicU64::new(0),
            disconnects: std::array::from_fn(|_| AtomicU64::new(0)),
            takeovers: AtomicU64::new(0),
            id_conflicts: AtomicU64::new(0),
            refused_busy: AtomicU64::new(0),
            refused_ip_limit: AtomicU64::new(0),
            refused_auth: AtomicU64::new(0),
            refused_draining: AtomicU64::new(0),
            task_panics: AtomicU64::new(0),
            relayed: AtomicU64::new(0),
            undeliverable: AtomicU64::new(0),
            reliable_duplicates: AtomicU64::new(0),
            frames_in: AtomicU64::new(0),
            frames_out: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            outbound_queued: AtomicI64::new(0),
            watchers_cut: AtomicU64::new(0),
            lateness: Histogram::new(LATENCY_BUCKETS),
            app_rtt: Histogram::new(LATENCY_BUCKETS),
            kernel_rtt: Histogram::new(LATENCY_BUCKETS),
            handshake: Histogram::new(LATENCY_BUCKETS),
            session: Histogram::new(SESSION_BUCKETS),
        }
    }
}

impl Metrics {
    pub fn count_disconnect(&self, reason: CloseReason) {
        self.disconnects[reason_slot(reason)].fetch_add(1, Ordering::Relaxed);
    }

    /// Disconnects so far, per reason slot ([`reason_label`]).
    pub fn disconnects(&self) -> [u64; REASON_SLOTS] {
        std::array::from_fn(|i| self.disconnects[i].load(Ordering::Relaxed))
    }
}

/// The server's metrics at one moment: what an exporter renders.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsSnapshot {
    /// Connection tasks running (admitted or handshaking).
    pub connections: usize,
    /// Ids with a live session.
    pub online: usize,
    /// Connections whose `HELLO` is not admitted yet.
    pub handshakes: usize,
    /// Presence subscriptions held (one per watcher and watched id; `*` counts once).
    pub subscriptions: usize,
    /// Bytes encoded for clients but not yet accepted by the kernel.
    pub outbound_queued: u64,
    /// Whether the server is draining (admitting no one).
    pub draining: bool,
    pub accepted: u64,
    /// Per reason slot: `(label, count)`, every reason present (zero included).
    pub disconnects: Vec<(&'static str, u64)>,
    pub takeovers: u64,
    pub id_conflicts: u64,
    pub refused_busy: u64,
    pub refused_ip_limit: u64,
    pub refused_auth: u64,
    pub refused_draining: u64,
    pub task_panics: u64,
    pub relayed: u64,
    pub undeliverable: u64,
    pub presence_frames: u64,
    pub frames_in: u64,
    pub frames_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Events the application's stream dropped, and live watchers cut off.
    pub events_dropped: u64,
    pub watchers_cut: u64,
    pub lateness: HistogramSnapshot,
    pub app_rtt: HistogramSnapshot,
    pub kernel_rtt: HistogramSnapshot,
    pub handshake: HistogramSnapshot,
    pub session: HistogramSnapshot,
    /// Cluster mode: the node's view of the cluster and Redis.
    pub cluster: Option<ClusterSnapshot>,
    /// Reliable sessions and what they hold.
    pub reliable: ReliableSnapshot,
}

/// Reliable sessions (the `reliable` extension) at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReliableSnapshot {
    /// Sessions, online or offline, and the messages (reports included) and bytes they hold.
    pub sessions: usize,
    pub held_messages: usize,
    pub held_bytes: usize,
    /// Items sent again after a resume.
    pub replayed: u64,
    /// Duplicates of clients' messages dropped.
    pub duplicates: u64,
    /// Sessions ended by expiry, messages refused because a hold was full.
    pub expired: u64,
    pub overflows: u64,
    /// Resumes that kept continuity, and those that could not (a fresh session was given).
    pub resumed: u64,
    pub resume_refused: u64,
}

/// A snapshot of a cluster node's state for operators (built by `Cluster::snapshot`).
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterSnapshot {
    pub node_id: String,
    pub incarnation: String,
    pub degraded: bool,
    /// Members in the node table at the last lease renewal (this one included).
    pub nodes: u64,
    /// Ids this node knows online on other nodes.
    pub remote_sessions: usize,
    pub redis_rtt: HistogramSnapshot,
    pub pubsub_lag: HistogramSnapshot,
    pub published: u64,
    pub received: u64,
    pub claims: u64,
    pub asks: u64,
    pub ask_timeouts: u64,
    pub reaped: u64,
    pub rejoins: u64,
    pub redis_errors: u64,
    pub unpublished: u64,
    /// Pub/sub messages shed because the node fell behind (the view is repaired after).
    pub shed: u64,
    /// Repairs of the view of other nodes' ids, and the ids they changed (messages this node had missed).
    pub repairs: u64,
    pub repaired: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_bucket_upper_bounds() {
        let h = Histogram::new(LATENCY_BUCKETS);
        assert_eq!(h.snapshot().quantile(0.5), None);
        for _ in 0..98 {
            h.observe(Duration::from_micros(300)); // the 0.5 ms bucket
        }
        h.observe(Duration::from_millis(20)); // 25 ms
        h.observe(Duration::from_secs(60)); // beyond the last bound
        let s = h.snapshot();
        assert_eq!(s.quantile(0.5), Some(0.0005));
        assert_eq!(s.quantile(0.99), Some(0.025));
        assert_eq!(s.quantile(1.0), None);
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_bounds_inclusive() {
        let h = Histogram::new(LATENCY_BUCKETS);
        h.observe(Duration::from_micros(100)); // exactly the first bound: counted in it
        h.observe(Duration::from_micros(101));
        h.observe(Duration::from_secs(11)); // above every bound
        let s = h.snapshot();
        assert_eq!(s.buckets[0], (0.0001, 1));
        assert_eq!(s.buckets[1], (0.00025, 2));
        assert_eq!(s.buckets.last().unwrap(), &(10.0, 2));
        assert_eq!(s.count, 3);
        assert!((s.sum - 11.000201).abs() < 1e-9, "{}", s.sum);
    }

    #[test]
    fn every_reason_has_its_own_slot_and_unknown_codes_share_the_last() {
        let m = Metrics::default();
        for r in CloseReason::ALL {
            m.count_disconnect(r);
        }
        m.count_disconnect(CloseReason::Unknown(200));
        m.count_disconnect(CloseReason::Unknown(201));
        let d = m.disconnects();
        assert!(d[..CloseReason::ALL.len()].iter().all(|n| *n == 1));
        assert_eq!(d[REASON_SLOTS - 1], 2);
        let labels: std::collections::HashSet<_> = (0..REASON_SLOTS).map(reason_label).collect();
        assert_eq!(labels.len(), REASON_SLOTS, "labels are distinct");
        assert!(labels.contains("heartbeat_timeout") && labels.contains("unknown"));
    }
}
