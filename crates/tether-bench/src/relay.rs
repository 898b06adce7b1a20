//! The `relay` scenario: messages relayed between pairs of clients over loopback, measured end to end, beside
//! Mosquitto through the same load generator.
//!
//! # Layout
//! - [`run`] (the coordinator) starts the server, one load-generator process ([`load`], `tether bench-worker
//!   --relay`) holding every pair, and then, in order:
//!   1. with `--held K` (tether `reliable`): `K / 10,000` sessions left offline, the server's RSS, K messages
//!      sent to them and acknowledged (held), the RSS again: memory per held message;
//!   2. the senders start; after `--settle` the first mark, after `--hold` the second: the counts, the server's
//!      CPU and the latencies between the marks give the figures;
//!   3. the senders stop, and every message sent must be accounted for: delivered once and in order, or (at most
//!      once) refused or lost, as counted. An acknowledged mode that lost or duplicated a message fails the run.
//! - The figures ([`figures`]): messages per second delivered, latency p50/p99 (send instant in the payload,
//!   read at the receiver), server CPU per message, the server's TCP payload bytes per message both directions,
//!   with an estimate of TCP/IP headers from the sockets' segment counts, and acknowledgement frames per message
//!   on each leg.

pub mod load;

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::{event, ms3, start_server, sys, Child2, Opts, Report, Server, Target};

/// Messages one offline session of a default tether server holds at most (`--hold-messages`).
pub const HOLD_PER_SESSION: usize = 10_000;
/// Bytes of TCP/IP header per segment in the header estimate: IPv4 (20) and TCP (20) with the timestamp option
/// (12), as Linux sends them.
pub const HEADER_BYTES: u64 = 52;

/// What the run measures, as its JSON names it.
pub fn delivery(opts: &Opts) -> &'static str {
    match (opts.target, opts.reliable) {
        (Target::Tether, true) => "reliable",
        (Target::Tether, false) => "at_most_once",
        (_, true) => "qos1",
        (_, false) => "qos0",
    }
}

fn check(opts: &Opts) -> anyhow::Result<()> {
    if !matches!(opts.target, Target::Tether | Target::Mosquitto) {
        bail!("relay compares tether with Mosquitto: --target tether or mosquitto");
    }
    if !(1..=1000).contains(&opts.window) {
        bail!("--window is 1 to 1,000 messages (the end-to-end bound, {} windows, stays within a hold)", load::GUARD);
    }
    if opts.held > 0 && !(opts.target == Target::Tether && opts.reliable) {
        bail!("--held measures a tether server's offline hold: it needs --target tether --reliable");
    }
    if opts.held > 0 && opts.server.is_some() {
        bail!("--held reads the server's offline events: run it without --server");
    }
    if opts.server_exe.is_some() && (opts.target != Target::Tether || opts.server.is_some()) {
        bail!("--server-exe is for the tether server this run starts");
    }
    Ok(())
}

fn spawn_worker(opts: &Opts, server: &Server) -> anyhow::Result<Child2> {
    let max = opts.settle + opts.hold + Duration::from_secs(300);
    let mut cmd = std::process::Command::new(&opts.exe);
    cmd.args(["bench-worker", "--relay", "--addr", &server.addr.to_string(), "--count", "0"])
        .args(["--target", opts.target.name()])
        .args(["--pairs", &opts.pairs.to_string(), "--window", &opts.window.to_string()])
        .args(["--interval", &format!("{}ms", opts.heartbeat_interval.as_millis())])
        .args(["--max-seconds", &max.as_secs().to_string()])
        .env("RUST_LOG", "warn");
    if opts.reliable {
        cmd.arg("--reliable");
    }
    if !opts.receipts {
        cmd.arg("--no-receipts");
    }
    Child2::spawn(&mut cmd)
}

/// A worker's answer, failing on the error it carries.
fn answer(w: &Child2, what: &str, within: Duration) -> anyhow::Result<Value> {
    let v = w.expect(what, within, |v| event(v) == what || event(v) == "error")?;
    if let Some(e) = v["error"].as_str().or(v["detail"].as_str()) {
        bail!("the load generator: {e}");
    }
    Ok(v)
}

/// Wait until the owned tether server said `offline` for `n` of the ids starting with `prefix`.
fn offline(server: &Server, prefix: &str, n: usize, within: Duration) -> anyhow::Result<()> {
    let p = server.proc.as_ref().context("the server's events")?;
    for _ in 0..n {
        p.expect("holders offline", within, |v| {
            event(v) == "offline" && v["client"].as_str().is_some_and(|c| c.starts_with(prefix))
        })?;
    }
    Ok(())
}

/// `tether_held_messages` from the owned server's `/metrics`, when it has an admin listener.
fn held_by_server(server: &Server) -> Option<u64> {
    let body = crate::scrape::get(server.admin?, "/metrics").ok()?;
    let line = body.lines().find(|l| l.starts_with("tether_held_messages "))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

pub fn run(opts: &Opts) -> anyhow::Result<Report> {
    check(opts)?;
    sys::wait_quiet(Duration::from_secs(60));
    let mut server = start_server(opts, None)?;
    let mut w = spawn_worker(opts, &server)?;
    let c = w.expect("connected", Duration::from_secs(60), |v| event(v) == "connected")?;
    if c["failed"].as_u64().unwrap_or(0) > 0 {
        bail!("the pairs could not connect: {}", c["first_error"].as_str().unwrap_or("?"));
    }
    let mut out = json!({
        "scenario": "relay",
        "target": opts.target.name(),
        "delivery": delivery(opts),
        "receipts": opts.target == Target::Tether && opts.reliable && opts.receipts,
        "pairs": opts.pairs,
        "connections": 2 * opts.pairs,
        "window": opts.window,
        "payload_bytes": load::PAYLOAD,
        "heartbeat_interval_ms": opts.heartbeat_interval.as_millis() as u64,
    });
    let mut rows = vec![
        ("target".to_owned(), format!("{} ({})", out["target"].as_str().unwrap_or("?"), delivery(opts))),
        ("pairs × window".to_owned(), format!("{} × {} messages of {} bytes", opts.pairs, opts.window, load::PAYLOAD)),
    ];
    if let Some(v) = opts.variant() {
        out["variant"] = json!(v);
        out["server_args"] = json!(opts.server_args);
        rows.push(("variant".into(), v.into()));
    }
    if let Some(exe) = &opts.server_exe {
        out["server_exe"] = json!(exe.display().to_string());
        rows.push(("server executable".into(), exe.display().to_string()));
    }
    if opts.held > 0 {
        held(opts, &server, &mut w, &mut out, &mut rows)?;
    }

    w.send("start")?;
    answer(&w, "started", Duration::from_secs(10))?;
    std::thread::sleep(opts.settle);
    let (m0, cpu0) = mark(&mut w, server.pid)?;
    std::thread::sleep(opts.hold);
    let (m1, cpu1) = mark(&mut w, server.pid)?;
    w.send("stop")?;
    let done = answer(&w, "done", Duration::from_secs(60))?;
    let cpu = |i: usize| cpu0[i].zip(cpu1[i]).map(|(a, b)| (b - a).as_secs_f64());
    figures(opts, &m0, &m1, [cpu(0), cpu(1)], &done, &mut out, &mut rows)?;
    let _ = server.proc.take();
    Ok(Report { json: out, rows })
}

/// The load generator's counts, and the CPU time of the server and of the load generator, as close together as
/// separate processes allow.
fn mark(w: &mut Child2, pid: u32) -> anyhow::Result<(Value, [Option<Duration>; 2])> {
    let cpu = [sys::cpu_time(pid), sys::cpu_time(w.child.id())];
    w.send("mark")?;
    Ok((answer(w, "mark", Duration::from_secs(10))?, cpu))
}

/// Step 1: the server's RSS for K held messages.
fn held(
    opts: &Opts,
    server: &Server,
    w: &mut Child2,
    out: &mut Value,
    rows: &mut Vec<(String, String)>,
) -> anyhow::Result<()> {
    let sessions = opts.held.div_ceil(HOLD_PER_SESSION);
    w.send(&format!("holders {sessions}"))?;
    answer(w, "holders_offline", Duration::from_secs(60))?;
    offline(server, "rh", sessions, Duration::from_secs(10))?;
    let before = sys::rss_bytes(server.pid);
    let t = Instant::now();
    w.send(&format!("fill {}", opts.held))?;
    let f = answer(w, "filled", Duration::from_secs(120))?;
    let fill_s = t.elapsed().as_secs_f64();
    let after = sys::rss_bytes(server.pid);
    let refused = f["refused"].as_u64().unwrap_or(0);
    if refused > 0 {
        bail!("the server refused {refused} of the {} messages to hold", opts.held);
    }
    let per = before.zip(after).map(|(b, a)| (a as f64 - b as f64) / opts.held as f64);
    out["held_messages"] = json!(opts.held);
    out["held_sessions"] = json!(sessions);
    out["held_rss_before_bytes"] = json!(before);
    out["held_rss_after_bytes"] = json!(after);
    out["rss_per_held_msg_bytes"] = json!(per.map(f64::round));
    out["held_fill_s"] = json!(ms3(fill_s));
    if let Some(n) = held_by_server(server) {
        out["held_messages_by_server"] = json!(n);
    }
    rows.push((
        format!("server RSS per held message ({} in {sessions} offline sessions)", opts.held),
        format!("{:.0} B", per.unwrap_or(f64::NAN)),
    ));
    Ok(())
}

/// The figures from the marks (`m0`, `m1`), the CPU seconds of the server and of the load generator between
/// them, and the final `done`.
fn figures(
    opts: &Opts,
    m0: &Value,
    m1: &Value,
    [cpu_s, load_cpu_s]: [Option<f64>; 2],
    done: &Value,
    out: &mut Value,
    rows: &mut Vec<(String, String)>,
) -> anyhow::Result<()> {
    let d = |k: &str| m1[k].as_u64().unwrap_or(0).saturating_sub(m0[k].as_u64().unwrap_or(0));
    let secs = d("at_us") as f64 / 1e6;
    let msgs = d("delivered");
    if msgs == 0 {
        bail!("no message was delivered between the marks");
    }
    let per = |x: u64| x as f64 / msgs as f64;
    let bytes = d("bytes_written") + d("bytes_read");
    let segments = d("segments_out") + d("segments_in");
    let acks = d("acks_to_senders") + d("acks_from_receivers") + d("acks_of_reports");
    let lat = |k: &str| done[k].as_u64().map(|us| us as f64 / 1000.0);
    out["measured_s"] = json!(ms3(secs));
    out["messages"] = json!(msgs);
    out["msgs_per_s"] = json!((msgs as f64 / secs.max(1e-9)).round());
    out["latency_ms_p50"] = json!(lat("latency_us_p50").map(ms3));
    out["latency_ms_p99"] = json!(lat("latency_us_p99").map(ms3));
    out["latency_ms_max"] = json!(lat("latency_us_max").map(ms3));
    out["server_cpu_s"] = json!(cpu_s.map(ms3));
    out["cpu_us_per_msg"] = json!(cpu_s.map(|c| ms3(c * 1e6 / msgs as f64)));
    out["load_cpu_s"] = json!(load_cpu_s.map(ms3));
    out["load_cpu_us_per_msg"] = json!(load_cpu_s.map(|c| ms3(c * 1e6 / msgs as f64)));
    out["wire_bytes_per_msg"] = json!(ms3(per(bytes)));
    out["segments_per_msg"] = json!(ms3(per(segments)));
    out["wire_bytes_per_msg_with_headers"] = json!(ms3(per(bytes + HEADER_BYTES * segments)));
    out["ack_frames_per_msg"] = json!(ms3(per(acks)));
    for k in ["acks_to_senders", "acks_from_receivers", "reports", "acks_of_reports"] {
        out[format!("{k}_per_msg")] = json!((per(d(k)) * 1e4).round() / 1e4);
    }
    out["window_waits"] = json!(d("window_waits"));
    out["guard_waits"] = json!(d("guard_waits"));
    for k in ["messages_sent", "messages_received", "lost", "gaps", "duplicates", "refused", "receipts"] {
        out[k] = done[k].clone();
    }
    let n = |k: &str| done[k].as_u64().unwrap_or(0);
    let (lost, gaps, dup) = (n("lost"), n("gaps"), n("duplicates"));
    rows.push(("messages per second (end to end)".into(), format!("{:.0}", msgs as f64 / secs.max(1e-9))));
    rows.push((
        "latency p50 / p99 / max".into(),
        format!(
            "{:.3} / {:.3} / {:.3} ms",
            lat("latency_us_p50").unwrap_or(f64::NAN),
            lat("latency_us_p99").unwrap_or(f64::NAN),
            lat("latency_us_max").unwrap_or(f64::NAN)
        ),
    ));
    let us = |c: Option<f64>| c.unwrap_or(f64::NAN) * 1e6 / msgs as f64;
    rows.push(("server CPU per message".into(), format!("{:.3} µs", us(cpu_s))));
    rows.push(("load generator CPU per message (both ends of a pair)".into(), format!("{:.3} µs", us(load_cpu_s))));
    rows.push((
        "server TCP payload per message, both directions".into(),
        format!(
            "{:.1} B ({:.1} B with TCP/IP headers, {:.3} segments)",
            per(bytes),
            per(bytes + HEADER_BYTES * segments),
            per(segments)
        ),
    ));
    rows.push((
        "ack frames per message: to senders / from receivers".into(),
        format!("{:.4} / {:.4}", per(d("acks_to_senders")), per(d("acks_from_receivers"))),
    ));
    if out["receipts"] == true {
        rows.push((
            "receipts: REPORTs / their ACKs per message".into(),
            format!("{:.4} / {:.4}", per(d("reports")), per(d("acks_of_reports"))),
        ));
    }
    rows.push((
        "sender waits: window full / receiver behind".into(),
        format!("{} / {}", d("window_waits"), d("guard_waits")),
    ));
    rows.push((
        "sent / received / refused / lost / skipped / duplicated (whole run)".into(),
        format!("{} / {} / {} / {lost} / {gaps} / {dup}", n("messages_sent"), n("messages_received"), n("refused")),
    ));
    if done["settled"] != true {
        eprintln!("bench: not every message was accounted for within the wait after the senders stopped");
    }
    if opts.reliable && (lost + gaps + dup > 0 || done["settled"] != true) {
        bail!(
            "{}: acknowledged delivery lost {lost}, skipped {gaps} and duplicated {dup} messages: {done}",
            delivery(opts)
        );
    }
    Ok(())
}
