//! `/metrics`: a [`MetricsSnapshot`] rendered in the Prometheus/OpenMetrics text format by `prometheus-client`.
//!
//! # Layout
//! The server counts with its own atomics ([`tether::metrics`]); this module is a `prometheus-client`
//! [`Collector`] that reads one snapshot per scrape and encodes it, so the hot path never touches the exporter.
//! Every [`tether::CloseReason`] is a label value of `tether_disconnects_total` from the first scrape on, zero
//! included, because the snapshot carries every reason slot.

use std::fmt::Error;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tether::metrics::HistogramSnapshot;
use tether::{MetricsSnapshot, ServerHandle};

/// Reads the server's metrics at each scrape.
struct ServerCollector(ServerHandle);

impl std::fmt::Debug for ServerCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerCollector")
    }
}

/// The text exposition of `handle`'s metrics.
pub fn render(handle: &ServerHandle) -> Result<String, Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(ServerCollector(handle.clone())));
    let mut out = String::with_capacity(16 * 1024);
    prometheus_client::encoding::text::encode(&mut out, &registry)?;
    Ok(out)
}

impl Collector for ServerCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), Error> {
        encode_snapshot(&self.0.metrics(), &mut enc)
    }
}

fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> Result<(), Error> {
    let g = ConstGauge::new(v);
    g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)
}

/// `name` without `_total`: the encoder adds it.
fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> Result<(), Error> {
    let c = ConstCounter::new(v);
    c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)
}

fn labelled_counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    values: &[(&str, u64)],
) -> Result<(), Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (value, n) in values {
        let labels = [(label, *value)];
        ConstCounter::new(*n).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

fn histogram(enc: &mut DescriptorEncoder, name: &str, help: &str, h: &HistogramSnapshot) -> Result<(), Error> {
    // The encoder takes per-bucket counts (it accumulates them itself) and writes f64::MAX as `+Inf`.
    let mut buckets = Vec::with_capacity(h.buckets.len() + 1);
    let mut below = 0;
    for (bound, cumulative) in &h.buckets {
        buckets.push((*bound, cumulative - below));
        below = *cumulative;
    }
    buckets.push((f64::MAX, h.count - below));
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
    m.encode_histogram::<prometheus_client::encoding::NoLabelSet>(h.sum, h.count, &buckets, None)
}

fn encode_snapshot(s: &MetricsSnapshot, enc: &mut DescriptorEncoder) -> Result<(), Error> {
    gauge(enc, "tether_connections", "Connections open (admitted or handshaking).", s.connections as i64)?;
    gauge(enc, "tether_sessions_online", "Client ids with a live session.", s.online as i64)?;
    gauge(enc, "tether_handshakes_in_flight", "Connections whose HELLO is not admitted yet.", s.handshakes as i64)?;
    gauge(enc, "tether_presence_subscriptions", "Presence subscriptions held.", s.subscriptions as i64)?;
    gauge(
        enc,
        "tether_outbound_queued_bytes",
        "Bytes encoded for clients and not yet accepted by the kernel.",
        s.outbound_queued as i64,
    )?;
    gauge(enc, "tether_draining", "1 while the server is draining (admitting no one).", i64::from(s.draining))?;
    counter(enc, "tether_connections_accepted", "Sockets accepted, refused or not.", s.accepted)?;
    labelled_counter(
        enc,
        "tether_disconnects",
        "Ended connections by the one reason recorded for each (refusals included).",
        "reason",
        &s.disconnects,
    )?;
    counter(enc, "tether_takeovers", "Sessions replaced by a newer connection for the same id.", s.takeovers)?;
    counter(enc, "tether_id_conflicts", "Newcomers refused with id_conflict.", s.id_conflicts)?;
    labelled_counter(
        enc,
        "tether_refused",
        "Connections refused before a session, by cause.",
        "reason",
        &[
            ("busy", s.refused_busy),
            ("ip_limit", s.refused_ip_limit),
            ("auth_failed", s.refused_auth),
            ("draining", s.refused_draining),
        ],
    )?;
    counter(
        enc,
        "tether_connection_task_panics",
        "Panics while serving a connection (a bug); each connection was closed and gave back its slots and session.",
        s.task_panics,
    )?;
    counter(enc, "tether_relayed_data", "DATA frames relayed to another client.", s.relayed)?;
    counter(enc, "tether_undeliverable", "DATA frames answered UNDELIVERABLE.", s.undeliverable)?;
    gauge(enc, "tether_reliable_sessions", "Reliable sessions, online or offline.", s.reliable.sessions as i64)?;
    gauge(
        enc,
        "tether_held_messages",
        "Messages and reports reliable sessions hold until their clients acknowledge them.",
        s.reliable.held_messages as i64,
    )?;
    gauge(
        enc,
        "tether_held_bytes",
        "Bytes reliable sessions hold, as counted against their bounds.",
        s.reliable.held_bytes as i64,
    )?;
    counter(enc, "tether_reliable_replayed", "Held items sent again after a resume.", s.reliable.replayed)?;
    counter(enc, "tether_reliable_duplicates", "Duplicates of clients' messages dropped.", s.reliable.duplicates)?;
    counter(enc, "tether_reliable_expired", "Reliable sessions ended by expiry.", s.reliable.expired)?;
    counter(
        enc,
        "tether_hold_overflows",
        "Messages refused because a reliable session's hold was full.",
        s.reliable.overflows,
    )?;
    counter(enc, "tether_reliable_resumed", "Resumes that kept continuity.", s.reliable.resumed)?;
    counter(
        enc,
        "tether_reliable_resume_refused",
        "Resumes that could not keep continuity (a fresh session was given).",
        s.reliable.resume_refused,
    )?;
    counter(enc, "tether_presence_frames_sent", "PRESENCE frames handed to subscribers.", s.presence_frames)?;
    counter(enc, "tether_frames_received", "Frames received from clients.", s.frames_in)?;
    counter(enc, "tether_frames_sent", "Frames queued for clients.", s.frames_out)?;
    counter(enc, "tether_received_bytes", "Bytes read from client sockets (TLS records included).", s.bytes_in)?;
    counter(enc, "tether_sent_bytes", "Bytes written to client sockets (TLS records included).", s.bytes_out)?;
    counter(
        enc,
        "tether_events_dropped",
        "Events the application's stream dropped (reader behind).",
        s.events_dropped,
    )?;
    counter(enc, "tether_event_watchers_cut", "Live event watchers (SSE) cut off for falling behind.", s.watchers_cut)?;
    histogram(
        enc,
        "tether_verdict_lateness_seconds",
        "How late each deadline verdict was taken (declared minus deadline).",
        &s.lateness,
    )?;
    histogram(
        enc,
        "tether_heartbeat_rtt_seconds",
        "Heartbeat round trip measured by the server (PING to PONG).",
        &s.app_rtt,
    )?;
    histogram(
        enc,
        "tether_kernel_rtt_seconds",
        "The kernel's smoothed RTT (TCP_INFO) of the same socket, read when a heartbeat round trip completes.",
        &s.kernel_rtt,
    )?;
    histogram(enc, "tether_handshake_duration_seconds", "Accept to WELCOME.", &s.handshake)?;
    histogram(enc, "tether_session_duration_seconds", "WELCOME to the end of the session.", &s.session)?;
    if let Some(c) = &s.cluster {
        encode_cluster(c, enc)?;
    }
    Ok(())
}

/// Cluster mode only: the node's view of Redis and of the other nodes.
fn encode_cluster(c: &tether::cluster::ClusterSnapshot, enc: &mut DescriptorEncoder) -> Result<(), Error> {
    let degraded = "1 while Redis cannot be reached (the node serves its own clients only).";
    gauge(enc, "tether_cluster_degraded", degraded, i64::from(c.degraded))?;
    let nodes = "Nodes in the cluster's table at the last lease renewal (lost ones not reaped yet included).";
    gauge(enc, "tether_cluster_nodes", nodes, c.nodes as i64)?;
    let remote = "Client ids this node knows online on other nodes.";
    gauge(enc, "tether_cluster_remote_sessions", remote, c.remote_sessions as i64)?;
    counter(enc, "tether_cluster_claims", "Ids claimed in Redis for a new session here.", c.claims)?;
    counter(enc, "tether_cluster_asks", "HELLOs for an id held on another node, that node asked.", c.asks)?;
    let timeouts = "Asks the holding node did not answer in time (the id was claimed anyway).";
    counter(enc, "tether_cluster_ask_timeouts", timeouts, c.ask_timeouts)?;
    counter(enc, "tether_cluster_published", "Messages published to other nodes.", c.published)?;
    counter(enc, "tether_cluster_received", "Messages received from other nodes.", c.received)?;
    let reaped = "Sessions of lost nodes this node declared offline (node_lost).";
    counter(enc, "tether_cluster_reaped_sessions", reaped, c.reaped)?;
    let rejoins = "Times this node joined again as a new incarnation (out of touch past its lease, or Redis emptied).";
    counter(enc, "tether_cluster_rejoins", rejoins, c.rejoins)?;
    counter(enc, "tether_cluster_redis_errors", "Redis requests that failed or timed out.", c.redis_errors)?;
    let unpublished = "Publishes and releases not carried out (outbox full, or Redis failed); releases are made good \
                       by the next re-registration, relayed DATA is lost.";
    counter(enc, "tether_cluster_unpublished", unpublished, c.unpublished)?;
    let shed = "Pub/sub messages shed because this node fell behind (its view is repaired from Redis after).";
    counter(enc, "tether_cluster_shed", shed, c.shed)?;
    let repairs = "Repairs of this node's view of other nodes' ids against Redis (pub/sub reconnect, shed \
                   messages, digest differed).";
    counter(enc, "tether_cluster_repairs", repairs, c.repairs)?;
    let repaired = "Ids those repairs changed: messages this node had missed.";
    counter(enc, "tether_cluster_repaired_ids", repaired, c.repaired)?;
    histogram(enc, "tether_cluster_redis_rtt_seconds", "Lease renewal round trip to Redis.", &c.redis_rtt)?;
    let lag = "From a message's publication (the sender's clock) to its arrival here.";
    histogram(enc, "tether_cluster_pubsub_lag_seconds", lag, &c.pubsub_lag)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether::metrics::{Histogram, LATENCY_BUCKETS};

    #[test]
    fn histograms_render_cumulative_with_inf() {
        let h = Histogram::new(LATENCY_BUCKETS);
        h.observe(std::time::Duration::from_micros(50));
        h.observe(std::time::Duration::from_millis(2));
        h.observe(std::time::Duration::from_secs(20));
        let mut registry = Registry::default();
        #[derive(Debug)]
        struct One(HistogramSnapshot);
        impl Collector for One {
            fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), Error> {
                histogram(&mut enc, "x_seconds", "x", &self.0)
            }
        }
        registry.register_collector(Box::new(One(h.snapshot())));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        assert!(out.contains("x_seconds_bucket{le=\"0.0001\"} 1\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"0.0025\"} 2\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"10.0\"} 2\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_seconds_count 3\n"), "{out}");
    }
}
