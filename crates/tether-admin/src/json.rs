//! The JSON shapes of the admin API and of `tether serve --events json`: one definition for both.
//!
//! # Layout
//! [`event_json`] is the object of one server event (the same on stdout and on the SSE stream); the other
//! functions render the admin API's records. Durations are milliseconds with microsecond precision (`*_ms`),
//! wall-clock times RFC 3339 with milliseconds.

use std::time::{Duration, SystemTime};

use serde_json::json;
use tether::metrics::HistogramSnapshot;
use tether::sockopt::tcp_state_name;
use tether::{
    DisconnectRecord, DrainStatus, EventKind, HoldInfo, KernelView, MetricsSnapshot, ProbeReport, ServerEvent,
    SessionInfo,
};

/// RFC 3339 in UTC with milliseconds.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// A duration in milliseconds with microsecond precision.
pub fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// One event as the JSON object documented in docs/operations.md ("Events").
pub fn event_json(ev: &ServerEvent) -> serde_json::Value {
    let mut v = json!({ "ts": rfc3339(ev.at), "event": ev.kind.name() });
    let fields = match &ev.kind {
        EventKind::Listening { addr, admin, node } => {
            json!({ "addr": addr.to_string(), "admin": admin.map(|a| a.to_string()), "node": node })
        }
        EventKind::Online { client, conn, peer, epoch, heartbeat, timeout } => json!({
            "client": client, "conn": conn, "peer": peer.to_string(), "epoch": epoch,
            "heartbeat_ms": heartbeat.as_millis() as u64, "timeout_ms": timeout.as_millis() as u64,
        }),
        EventKind::Offline { client, conn, peer, reason, lateness, silent_for, by_peer, detail } => json!({
            "client": client, "conn": conn, "peer": peer.to_string(), "reason": reason.as_str(),
            "by": decider(*by_peer), "lateness_ms": lateness.map(ms), "silent_ms": ms(*silent_for), "detail": detail,
        }),
        EventKind::Closed { client, conn, peer, reason, lateness, by_peer, detail } => json!({
            "client": client, "conn": conn, "peer": peer.to_string(), "reason": reason.as_str(),
            "by": decider(*by_peer), "lateness_ms": lateness.map(ms), "detail": detail,
        }),
        EventKind::Takeover { client, old_conn, new_conn, peer, epoch, same_device } => json!({
            "client": client, "conn": new_conn, "old_conn": old_conn, "peer": peer.to_string(),
            "epoch": epoch, "same_device": same_device,
        }),
        EventKind::Diagnosis { client, conn, peer, diagnosis, explanation } => json!({
            "client": client, "conn": conn, "peer": peer.to_string(), "diagnosis": diagnosis.as_str(),
            "explanation": explanation,
        }),
        EventKind::Heartbeat { client, conn, peer, asked, heartbeat, timeout } => json!({
            "client": client, "conn": conn, "peer": peer.to_string(), "asked_ms": asked.as_millis() as u64,
            "heartbeat_ms": heartbeat.as_millis() as u64, "timeout_ms": timeout.as_millis() as u64,
        }),
        EventKind::IdConflict { client, holder_conn, newcomer_conn, peer, retry_after } => json!({
            "client": client, "conn": newcomer_conn, "holder_conn": holder_conn, "peer": peer.to_string(),
            "retry_after_ms": retry_after.as_millis() as u64,
        }),
        EventKind::Suspect { client, conn, peer, silent_for } => json!({
            "client": client, "conn": conn, "peer": peer.to_string(), "silent_ms": ms(*silent_for),
        }),
        EventKind::Recovered { client, conn, peer } => json!({
            "client": client, "conn": conn, "peer": peer.to_string(),
        }),
        EventKind::Data { client, conn, payload } => json!({
            "client": client, "conn": conn, "payload": String::from_utf8_lossy(payload),
        }),
        EventKind::Undeliverable { client, conn, to, len, why } => json!({
            "client": client, "conn": conn, "to": to, "len": len, "why": why.as_str(),
        }),
        EventKind::Dropped { count } => json!({ "count": count }),
        EventKind::Stats(s) => json!({
            "connections": s.connections, "online": s.online, "handshakes": s.handshakes,
            "peak_handshakes": s.peak_handshakes, "refused_busy": s.refused_busy,
            "refused_ip_limit": s.refused_ip_limit, "undeliverable": s.undeliverable,
            "events_dropped": s.events_dropped,
        }),
        EventKind::Cluster { degraded, detail } => json!({ "degraded": degraded, "detail": detail }),
        EventKind::NodeLost { node, sessions } => json!({ "node": node, "sessions": sessions }),
        _ => json!({}),
    };
    if let (Some(obj), serde_json::Value::Object(f)) = (v.as_object_mut(), fields) {
        obj.extend(f);
    }
    // A reason this build does not know (from a newer client's BYE) keeps its number.
    if let EventKind::Offline { reason, .. } | EventKind::Closed { reason, .. } = &ev.kind {
        if !reason.is_known() {
            v["reason_code"] = json!(reason.code());
        }
    }
    v
}

/// Who decided a close: `client` (its `BYE`, FIN or reset) or `server` (a verdict or command of ours).
pub fn decider(by_peer: bool) -> &'static str {
    if by_peer {
        "client"
    } else {
        "server"
    }
}

/// One online session.
pub fn session_json(s: &SessionInfo) -> serde_json::Value {
    json!({
        "client": s.client, "conn": s.conn, "peer": s.peer.to_string(), "epoch": s.epoch,
        "since": rfc3339(s.since), "connected_ms": ms(s.connected_for), "last_frame_ms": ms(s.last_frame_ago),
        "heartbeat_ms": s.heartbeat.as_millis() as u64, "timeout_ms": s.timeout.as_millis() as u64,
        "state": if s.suspect { "suspect" } else { "online" }, "app_rtt_ms": s.app_rtt.map(ms),
        "tls": s.tls, "protocol": s.version, "bytes_in": s.bytes_in, "bytes_out": s.bytes_out,
    })
}

/// What a reliable session holds.
pub fn hold_json(h: &HoldInfo) -> serde_json::Value {
    json!({
        "messages": h.messages, "bytes": h.bytes, "online": h.online, "expires_in_ms": h.expires_in.map(ms),
        "received": h.received, "assigned": h.assigned, "lost": h.lost,
    })
}

/// The kernel's view of a socket (`TCP_INFO`, `TIOCOUTQ`).
pub fn kernel_json(k: &KernelView) -> serde_json::Value {
    let i = &k.info;
    json!({
        "state": tcp_state_name(i.state), "rtt_ms": ms(i.rtt), "rttvar_ms": ms(i.rttvar), "unacked": i.unacked,
        "retransmits": i.retransmits, "total_retrans": i.total_retrans, "probes": i.probes,
        "send_queue_bytes": k.send_queue, "notsent_bytes": i.notsent_bytes,
        "last_data_recv_ms": ms(i.since_data_recv), "last_data_sent_ms": ms(i.since_data_sent),
        "last_ack_recv_ms": ms(i.since_ack_recv), "snd_wnd": i.snd_wnd, "rcv_wnd": i.rcv_wnd, "cwnd": i.snd_cwnd,
        "bytes_acked": i.bytes_acked, "bytes_received": i.bytes_received,
    })
}

/// One closed connection from the ring of recent disconnects.
pub fn disconnect_json(r: &DisconnectRecord) -> serde_json::Value {
    let mut v = json!({
        "at": rfc3339(r.at), "conn": r.conn, "client": r.client, "peer": r.peer.to_string(),
        "reason": r.reason.as_str(), "by": decider(r.by_peer), "lateness_ms": r.lateness.map(ms),
        "silent_ms": r.silent_for.map(ms), "duration_ms": ms(r.duration), "bytes_in": r.bytes_in,
        "bytes_out": r.bytes_out, "detail": r.detail, "diagnosis": r.diagnosis.map(|d| d.as_str()),
    });
    if !r.reason.is_known() {
        v["reason_code"] = json!(r.reason.code());
    }
    v
}

pub fn drain_json(d: &DrainStatus) -> serde_json::Value {
    json!({
        "draining": d.draining, "total": d.total, "sent": d.sent, "remaining": d.remaining,
        "redirect": d.redirect, "spread_ms": d.spread.as_millis() as u64, "started": d.started.map(rfc3339),
    })
}

fn histogram_json(h: &HistogramSnapshot) -> serde_json::Value {
    json!({ "buckets": h.buckets, "count": h.count, "sum": h.sum })
}

/// Everything the dashboard draws, at one moment.
pub fn overview_json(m: &MetricsSnapshot, server: serde_json::Value) -> serde_json::Value {
    let disconnects: serde_json::Map<String, serde_json::Value> =
        m.disconnects.iter().map(|(k, v)| ((*k).to_owned(), json!(v))).collect();
    json!({
        "server": server,
        "now": {
            "connections": m.connections, "online": m.online, "handshakes": m.handshakes,
            "subscriptions": m.subscriptions, "outbound_queued_bytes": m.outbound_queued,
        },
        "totals": {
            "accepted": m.accepted, "disconnects": disconnects, "takeovers": m.takeovers,
            "id_conflicts": m.id_conflicts, "task_panics": m.task_panics,
            "refused": {
                "busy": m.refused_busy, "ip_limit": m.refused_ip_limit, "auth_failed": m.refused_auth,
                "draining": m.refused_draining,
            },
            "relayed": m.relayed, "undeliverable": m.undeliverable, "presence_frames": m.presence_frames,
            "frames_in": m.frames_in, "frames_out": m.frames_out, "bytes_in": m.bytes_in, "bytes_out": m.bytes_out,
            "events_dropped": m.events_dropped, "sse_cut": m.watchers_cut,
        },
        "reliable": {
            "sessions": m.reliable.sessions, "held_messages": m.reliable.held_messages,
            "held_bytes": m.reliable.held_bytes, "replayed": m.reliable.replayed,
            "duplicates": m.reliable.duplicates, "expired": m.reliable.expired, "overflows": m.reliable.overflows,
            "resumed": m.reliable.resumed, "resume_refused": m.reliable.resume_refused,
        },
        "histograms": {
            "lateness_seconds": histogram_json(&m.lateness), "app_rtt_seconds": histogram_json(&m.app_rtt),
            "kernel_rtt_seconds": histogram_json(&m.kernel_rtt),
            "handshake_seconds": histogram_json(&m.handshake), "session_seconds": histogram_json(&m.session),
        },
    })
}

/// A round-trip probe's report and its verdict.
pub fn probe_json(p: &ProbeReport) -> serde_json::Value {
    let (verdict, evidence) = p.verdict();
    json!({
        "client": p.client, "verdict": verdict.as_str(), "evidence": evidence, "app_rtt_ms": p.app_rtt.map(ms),
        "waited_ms": ms(p.waited), "heartbeat_ms": p.heartbeat.map(|h| h.as_millis() as u64),
        "kernel": p.kernel.as_ref().map(kernel_json),
        "ended": p.ended.map(|e| json!({ "reason": e.reason.as_str(), "by": if e.by_client { "client" } else { "server" } })),
    })
}

/// One row of the cluster's node table (`/v1/cluster`, `tether cluster status --json`).
pub fn node_json(n: &tether::cluster::store::NodeStatus) -> serde_json::Value {
    json!({
        "node": n.node, "member": n.member, "lease_left_ms": n.lease_left_ms, "lease_ms": n.lease_ms,
        "lost": n.lease_left_ms < 0, "sessions": n.sessions, "addr": n.addr, "admin": n.admin,
        "started_ms": n.started_ms, "synced": n.synced,
    })
}

/// `/v1/cluster`: the node's view, its Redis figures, and the node table (or why Redis could not give it).
pub fn cluster_json(
    c: &tether::cluster::ClusterSnapshot,
    nodes: Result<Vec<tether::cluster::store::NodeStatus>, String>,
) -> serde_json::Value {
    let q = |h: &tether::metrics::HistogramSnapshot, p: f64| h.quantile(p).map(|s| s * 1e3);
    let nodes = match nodes {
        Ok(list) => json!(list.iter().map(node_json).collect::<Vec<_>>()),
        Err(e) => json!({ "error": e }),
    };
    json!({
        "node": c.node_id, "incarnation": c.incarnation, "degraded": c.degraded, "node_count": c.nodes,
        "remote_sessions": c.remote_sessions, "claims": c.claims, "asks": c.asks, "ask_timeouts": c.ask_timeouts,
        "published": c.published, "received": c.received, "reaped": c.reaped, "rejoins": c.rejoins,
        "redis_errors": c.redis_errors, "unpublished": c.unpublished, "shed": c.shed, "repairs": c.repairs,
        "repaired": c.repaired,
        "redis_rtt_ms": { "p50": q(&c.redis_rtt, 0.5), "p99": q(&c.redis_rtt, 0.99) },
        "pubsub_lag_ms": { "p50": q(&c.pubsub_lag, 0.5), "p99": q(&c.pubsub_lag, 0.99) },
        "nodes": nodes,
    })
}
