//! Mobile links in the fault lab (see `netlab/mod.rs`): blips, the path going silent for seconds and coming back,
//! with data in flight both ways; and a carrier NAT that forgets idle connections. They need root (and `nft` for
//! the NAT); `scripts/test` runs them with the rest of the lab.
//!
//! The sweep starts each blip at the heartbeat's worst phase: when the server has heard nothing from the device
//! for almost an interval, so that the device's next `PING` is the first thing lost. The connection then survives
//! when `interval + blip + the wait for the first retransmission after the heal` stays under the timeout, and the
//! retransmission ceiling (`--rto-max`) is what bounds that wait. Each run prints a `MEASURED` line that
//! docs/mobile.md's tables quote.

mod common;
#[macro_use]
mod netlab;

use std::net::SocketAddr;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use netlab::{in_ns, runtime, Forgotten, Lab, DEVICE_IP, NAT_IP, PORT, SERVER_IP};
use serde_json::Value;
use tether::proto::PresenceState;
use tether::{Client, ClientConfig, ClientEvent, RtoMax};

/// One message each way per this, from the moment the path goes silent until the run's end.
const EVERY: Duration = Duration::from_millis(100);
/// The blip starts when the server has heard nothing from the device for `interval − PHASE_MARGIN`.
const PHASE_MARGIN: Duration = Duration::from_millis(250);
/// Scheduling slack on the recovery bound (the ceiling plus one trip across the lab's veths).
const RECOVERY_SLACK: Duration = Duration::from_millis(100);

fn server_addr() -> SocketAddr {
    format!("{SERVER_IP}:{PORT}").parse().unwrap()
}

/// What a peer saw.
enum Seen {
    /// Message `seq` from the other peer arrived at `at`.
    Data { seq: u64, at: Instant },
    /// The connection ended, or the other peer went offline (a verdict somewhere).
    Ended(String),
    /// Answer to [`Ctl::Stop`]: how many messages this peer sent.
    Sent(u64),
}

enum Ctl {
    /// Send a numbered message to this id every [`EVERY`].
    Stream(String),
    Stop,
}

/// A `tether::Client` in a namespace, streaming numbered messages on request and reporting what arrives.
struct Peer {
    seen: mpsc::Receiver<Seen>,
    /// A run sends each peer two commands: a stream, then a stop.
    ctl: tokio::sync::mpsc::Sender<Ctl>,
}

/// Reports a peer keeps for the test thread at most: a run carries a few hundred messages each way. A report that
/// finds the queue full is lost, and the run counts its message as lost: it fails, it never grows.
const SEEN_BOUND: usize = 4096;

impl Peer {
    fn connect(ns: &str, id: &str, watch: &str, interval: Duration, rto: RtoMax) -> Peer {
        let (seen_tx, seen) = mpsc::sync_channel(SEEN_BOUND);
        let (ctl, mut ctl_rx) = tokio::sync::mpsc::channel::<Ctl>(2);
        let (ready_tx, ready) = mpsc::channel();
        let (id, watch) = (id.to_owned(), watch.to_owned());
        in_ns(ns, move || {
            runtime().block_on(async move {
                let mut cfg = ClientConfig::new(id.clone());
                cfg.heartbeat_interval = Some(interval);
                cfg.socket.rto_max = rto;
                let mut c = match Client::connect(server_addr(), cfg).await {
                    Ok(c) => c,
                    Err(e) => return drop(ready_tx.send(Err(e.to_string()))),
                };
                let _ = c.subscribe(vec![watch.clone()]).await;
                let _ = ready_tx.send(Ok(()));
                let mut to: Option<String> = None;
                let mut seq = 0u64;
                // The other peer may connect after this one subscribed: only an offline after online counts.
                let mut online = false;
                let mut tick = tokio::time::interval(EVERY);
                loop {
                    tokio::select! {
                        ev = c.next_event() => match ev {
                            Some(ClientEvent::Data { payload, .. }) => {
                                let n = std::str::from_utf8(&payload).ok().and_then(|s| s.parse().ok());
                                let _ = seen_tx.try_send(Seen::Data { seq: n.unwrap_or(u64::MAX), at: Instant::now() });
                            }
                            Some(ClientEvent::Presence(p)) if p.client_id == watch => match p.state {
                                PresenceState::Online => online = true,
                                PresenceState::Offline if online => {
                                    let why = format!("{watch} went offline ({:?})", p.reason);
                                    let _ = seen_tx.try_send(Seen::Ended(why));
                                }
                                _ => {}
                            },
                            Some(ClientEvent::Disconnected(d)) => {
                                let _ = seen_tx.try_send(Seen::Ended(format!("{id} disconnected: {d:?}")));
                                return;
                            }
                            Some(_) => {}
                            None => return,
                        },
                        _ = tick.tick(), if to.is_some() => {
                            let _ = c.send(to.as_deref(), Bytes::from(seq.to_string())).await;
                            seq += 1;
                        }
                        cmd = ctl_rx.recv() => match cmd {
                            Some(Ctl::Stream(peer)) => {
                                to = Some(peer);
                                tick.reset_immediately();
                            }
                            Some(Ctl::Stop) => {
                                to = None;
                                let _ = seen_tx.try_send(Seen::Sent(seq));
                            }
                            None => { c.close().await; return; }
                        },
                    }
                }
            })
        });
        ready.recv_timeout(common::PATIENCE).expect("connect hung").expect("connect failed");
        Peer { seen, ctl }
    }
}

/// What one blip did.
#[derive(Debug)]
struct Outcome {
    /// Why the connection ended, if it did.
    ended: Option<String>,
    /// From the heal to the first message through, each way: device → watcher, watcher → device.
    up: Option<Duration>,
    down: Option<Duration>,
    /// Messages sent and not received (each way, summed), or received out of order.
    lost: u64,
}

impl Outcome {
    fn recovery(&self) -> Option<Duration> {
        Some(self.up?.max(self.down?))
    }
}

/// Time since the server last heard from the device, from the server namespace's socket table.
fn server_lastrcv(lab: &Lab) -> Option<Duration> {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &lab.server, "ss", "-Htin", "state", "established", "dst", DEVICE_IP])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let ms = text.split_whitespace().find_map(|w| w.strip_prefix("lastrcv:"))?;
    ms.parse().ok().map(Duration::from_millis)
}

/// One run: a fresh lab and server at `interval`/`timeout` with ceiling `rto` on both ends, a device and a watcher
/// subscribed to each other, a blip of `blip` at the worst phase with messages both ways, then the count.
fn blip_run(interval: Duration, timeout: Duration, rto: RtoMax, blip: Duration) -> Outcome {
    let mut lab = Lab::new("blip");
    let (i, t, r) = (format!("{}ms", interval.as_millis()), format!("{}ms", timeout.as_millis()), rto_flag(rto));
    lab.serve(&["--heartbeat-interval", &i, "--heartbeat-timeout", &t, "--rto-max", &r, "--insecure-no-auth"]);
    let device = Peer::connect(&lab.devices.clone(), "phone", "desk", interval, rto);
    let watcher = Peer::connect(&lab.watchers.clone(), "desk", "phone", interval, rto);

    // Let a few heartbeats set the round-trip estimate, then wait for the phase.
    let settle = Instant::now() + interval * 2;
    let patience = settle + interval * 3;
    loop {
        let now = Instant::now();
        assert!(now < patience, "the device never went quiet for an interval: is it pinging?");
        if now >= settle && server_lastrcv(&lab).is_some_and(|d| d + PHASE_MARGIN >= interval) {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    lab.cut(DEVICE_IP);
    device.ctl.try_send(Ctl::Stream("desk".into())).unwrap();
    watcher.ctl.try_send(Ctl::Stream("phone".into())).unwrap();
    std::thread::sleep(blip); // the fault itself lasts this long
    lab.restore(DEVICE_IP);
    let healed = Instant::now();

    // Until the first message through each way after the heal, a verdict, or well past the timeout.
    let mut out = Outcome { ended: None, up: None, down: None, lost: 0 };
    let mut got: [Vec<u64>; 2] = [Vec::new(), Vec::new()];
    let collect = |p: &Peer, k: usize, got: &mut [Vec<u64>; 2], out: &mut Outcome, wait: Duration| -> Option<u64> {
        match p.seen.recv_timeout(wait) {
            Ok(Seen::Data { seq, at }) => {
                got[k].push(seq);
                let first = if k == 0 { &mut out.down } else { &mut out.up };
                if at > healed && first.is_none() {
                    *first = Some(at - healed);
                }
                None
            }
            Ok(Seen::Ended(why)) => {
                out.ended.get_or_insert(why);
                None
            }
            Ok(Seen::Sent(n)) => Some(n),
            Err(_) => None,
        }
    };
    let give_up = healed + timeout + Duration::from_secs(2);
    while (out.up.is_none() || out.down.is_none()) && out.ended.is_none() && Instant::now() < give_up {
        collect(&device, 0, &mut got, &mut out, Duration::from_millis(5));
        collect(&watcher, 1, &mut got, &mut out, Duration::from_millis(5));
    }
    // Then half a second more of traffic, a stop, and everything sent must arrive, in order.
    let more = Instant::now() + Duration::from_millis(500);
    while Instant::now() < more && out.ended.is_none() {
        collect(&device, 0, &mut got, &mut out, Duration::from_millis(5));
        collect(&watcher, 1, &mut got, &mut out, Duration::from_millis(5));
    }
    let _ = device.ctl.try_send(Ctl::Stop);
    let _ = watcher.ctl.try_send(Ctl::Stop);
    let mut sent: [Option<u64>; 2] = [None, None];
    let drain_until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < drain_until {
        // sent[0]: what the watcher sent (the device's inbox); sent[1]: what the device sent.
        if let Some(n) = collect(&device, 0, &mut got, &mut out, Duration::from_millis(5)) {
            sent[1] = Some(n);
        }
        if let Some(n) = collect(&watcher, 1, &mut got, &mut out, Duration::from_millis(5)) {
            sent[0] = Some(n);
        }
        let complete = |k: usize| sent[k].is_some_and(|n| got[k].len() as u64 >= n);
        if out.ended.is_some() || (complete(0) && complete(1)) {
            break;
        }
    }
    for k in 0..2 {
        let n = sent[k].unwrap_or(0);
        let in_order = got[k].iter().enumerate().filter(|(i, s)| *i as u64 == **s).count() as u64;
        out.lost += n.saturating_sub(in_order);
    }
    drop(device);
    drop(watcher);
    out
}

fn rto_flag(rto: RtoMax) -> String {
    match rto {
        RtoMax::Auto => "auto".into(),
        RtoMax::Off => "off".into(),
        RtoMax::Fixed(d) => format!("{}ms", d.as_millis()),
    }
}

/// Whether this kernel takes `TCP_RTO_MAX_MS` (Linux 6.15+), asked on a loopback socket in a fresh namespace.
fn kernel_caps_rto(lab: &Lab) -> bool {
    in_ns(&lab.devices, || {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let s = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        matches!(tether::sockopt::cap_retransmissions(&s, Duration::from_secs(1)), tether::sockopt::RtoCap::Capped(_))
    })
    .join()
    .unwrap()
}

/// The sweep: blip lengths × heartbeat settings × ceiling on or off. With the default ceiling, every blip up to
/// `timeout − interval − 1 s` is survived with nothing lost, and data flows again within the ceiling (1 s) of the
/// heal. The runs without a ceiling, and the blips beyond the goal, are measured and printed, not asserted: they
/// show what the ceiling buys.
#[test]
#[ignore = "fault lab: needs root and network namespaces; scripts/test runs it"]
fn lab_blip_sweep() {
    let lab = lab_or_skip!("blip sweep");
    let capped = kernel_caps_rto(&lab);
    drop(lab);
    if !capped {
        eprintln!("\n*** SKIPPED blip goal: this kernel has no TCP_RTO_MAX_MS (Linux 6.15+); measuring only ***\n");
        println!("SKIPPED: blip goal (no TCP_RTO_MAX_MS)");
    }
    let s = |x: f64| Duration::from_secs_f64(x);
    let runs: &[(f64, f64, RtoMax, f64)] = &[
        (1.0, 3.0, RtoMax::Auto, 0.5),
        (1.0, 3.0, RtoMax::Auto, 1.0),
        (1.0, 3.0, RtoMax::Auto, 1.5),
        (1.0, 3.0, RtoMax::Off, 1.0),
        (1.0, 3.0, RtoMax::Off, 1.5),
        (5.0, 15.0, RtoMax::Auto, 3.0),
        (5.0, 15.0, RtoMax::Auto, 9.0),
        (5.0, 15.0, RtoMax::Off, 9.0),
    ];
    let mut failures = Vec::new();
    for &(interval, timeout, rto, blip) in runs {
        let o = blip_run(s(interval), s(timeout), rto, s(blip));
        let f = |d: Option<Duration>| d.map_or("-".to_owned(), |d| format!("{:.3}s", d.as_secs_f64()));
        println!(
            "MEASURED blip interval={interval}s timeout={timeout}s rto_max={} blip={blip}s: {} recovery={} \
             (device→watcher {}, watcher→device {}) lost={}",
            rto_flag(rto),
            o.ended.as_deref().map_or("survived".to_owned(), |why| format!("ended ({why})")),
            f(o.recovery()),
            f(o.up),
            f(o.down),
            o.lost,
        );
        let goal = blip <= timeout - interval - 1.0 + 1e-9;
        if capped && rto == RtoMax::Auto && goal {
            let ceiling = RtoMax::Auto.for_interval(s(interval)).unwrap();
            if o.ended.is_some() || o.lost > 0 || o.recovery().is_none_or(|r| r > ceiling + RECOVERY_SLACK) {
                failures.push(format!("{interval}s/{timeout}s, blip {blip}s: {o:?}"));
            }
        }
    }
    assert!(failures.is_empty(), "the default ceiling missed the blip goal:\n{}", failures.join("\n"));
}

/// What each side reported when the NAT forgot the device's connection, and how soon the device was back.
struct NatVerdicts {
    /// The device's `disconnected` line and the seconds from its `connected` to it.
    device: Value,
    device_after: f64,
    /// The server's `offline` line for the device's first connection.
    server: Value,
    /// Seconds from the device's `disconnected` to its next `connected`.
    back_after: f64,
    /// The server's `diagnosis` line about the first connection, and the device's.
    diagnosis: Value,
    device_diagnosis: Value,
}

/// A device behind a NAT that forgets a mapping after `nat_idle`, with a heartbeat slower than that.
fn nat_forgets(
    mut lab: Lab,
    forgotten: Forgotten,
    nat_idle: Duration,
    interval: Duration,
    timeout: Duration,
) -> NatVerdicts {
    lab.nat(nat_idle, forgotten);
    let dev = lab.devices.clone();
    let (i, t) = (format!("{}ms", interval.as_millis()), format!("{}ms", timeout.as_millis()));
    let server = lab.serve(&["--heartbeat-interval", &i, "--heartbeat-timeout", &t, "--insecure-no-auth"]);
    let target = format!("{SERVER_IP}:{PORT}");
    let bin = env!("CARGO_BIN_EXE_tether");
    let device = common::Proc::spawn_cmd(
        "ip",
        &["netns", "exec", &dev, bin, "connect", &target, "--id", "phone", "--json", "--reconnect"],
    );
    let patience = timeout * 3;
    device.expect_within("connected", patience, |v| common::event(v) == "connected");
    let connected = Instant::now();
    let online = server.expect("device online", |v| common::event(v) == "online" && v["client"] == "phone");
    assert_eq!(online["peer"].as_str().unwrap().split(':').next(), Some(NAT_IP), "the server sees the NAT");
    let gone = device.expect_within("disconnected", patience, |v| common::event(v) == "disconnected");
    let device_after = connected.elapsed().as_secs_f64();
    let disconnected = Instant::now();
    device.expect_within("connected again", patience, |v| common::event(v) == "connected");
    let back_after = disconnected.elapsed().as_secs_f64();
    let device_diagnosis =
        device.expect_within("the device's diagnosis", Duration::from_secs(2), |v| common::event(v) == "diagnosis");
    // The first connection's end and the diagnosis about it, in whichever order they come.
    let (mut offline, mut diagnosis) = (None, None);
    let deadline = Instant::now() + patience;
    while offline.is_none() || diagnosis.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        let v = server
            .try_expect(left, |v| v["conn"] == online["conn"])
            .expect("the first connection's end and a diagnosis");
        match common::event(&v) {
            "offline" | "closed" => offline = Some(v),
            "diagnosis" => diagnosis = Some(v),
            _ => {}
        }
    }
    let (offline, diagnosis) = (offline.unwrap(), diagnosis.unwrap());
    drop(device);
    NatVerdicts { device: gone, device_after, server: offline, back_after, diagnosis, device_diagnosis }
}

/// What each side reports when a carrier NAT forgets an idle connection: a heartbeat of 4 s through a NAT that
/// forgets after 2 s. Where the NAT drops what it no longer knows, both ends hear nothing more and say
/// `heartbeat_timeout` a whole timeout after the last exchange; where it answers with a reset, the device says
/// `reset` (from the server, as far as it can tell) at its first `PING` after the mapping expired, and its
/// reconnect takes the old connection over on the server. Either way the path itself works: the device is back
/// within a second, and both ends then name the old connection's end `middlebox_forgot`. docs/mobile.md quotes
/// the `MEASURED` lines.
#[test]
#[ignore = "fault lab: needs root and network namespaces; scripts/test runs it"]
fn lab_nat_forgets_an_idle_connection() {
    for forgotten in [Forgotten::Dropped, Forgotten::Reset] {
        let lab = lab_or_skip!("nat", netlab::nat_unavailable);
        let (interval, timeout) = (Duration::from_secs(4), Duration::from_secs(12));
        let v = nat_forgets(lab, forgotten, Duration::from_secs(2), interval, timeout);
        println!(
            "MEASURED nat forgotten={forgotten:?} nat_idle=2s interval=4s timeout=12s: device {} after {:.1}s \
             (by_peer {}, detail {}); server {} {} by {} (silent {} ms, detail {}); device back {:.2}s later",
            v.device["reason"],
            v.device_after,
            v.device["by_peer"],
            v.device["detail"],
            v.server["event"],
            v.server["reason"],
            v.server["by"],
            v.server["silent_ms"],
            v.server["detail"],
            v.back_after
        );
        let said = |v: &Value| (common::event(v).to_owned(), v["reason"].as_str().unwrap_or("").to_owned());
        match forgotten {
            Forgotten::Dropped => {
                assert_eq!(v.device["reason"], "heartbeat_timeout", "{}", v.device);
                assert_eq!(v.device["path_silent"], true, "the server's side acknowledged nothing: {}", v.device);
                assert_eq!(said(&v.server), ("offline".into(), "heartbeat_timeout".into()), "{}", v.server);
                assert!(v.device_after > timeout.as_secs_f64() - interval.as_secs_f64(), "late: {}", v.device_after);
            }
            Forgotten::Reset => {
                assert_eq!(
                    (&v.device["reason"], &v.device["by_peer"]),
                    (&"reset".into(), &true.into()),
                    "{}",
                    v.device
                );
                assert_eq!(said(&v.server), ("closed".into(), "takeover".into()), "{}", v.server);
                assert!(v.device_after < timeout.as_secs_f64() - interval.as_secs_f64(), "early: {}", v.device_after);
            }
        }
        assert!(v.back_after < 1.0, "the path works: the device is back at once, not {:.2}s later", v.back_after);
        println!("MEASURED nat forgotten={forgotten:?}: server diagnosis {}", v.diagnosis);
        println!("MEASURED nat forgotten={forgotten:?}: device diagnosis {}", v.device_diagnosis);
        for d in [&v.diagnosis, &v.device_diagnosis] {
            assert_eq!(d["diagnosis"], "middlebox_forgot", "both sides name it the same way: {d}");
            let why = d["explanation"].as_str().unwrap();
            assert!(why.starts_with("the path's middlebox forgot the connection"), "{why}");
        }
    }
}

/// What one idle connection put on the wire in a window.
#[derive(Debug)]
struct WireCost {
    packets: usize,
    /// IP packet bytes: frames, TCP and IP headers (no link header).
    bytes: usize,
    /// The gaps between bursts: a burst is what follows at least [`BURST_GAP`] of silence.
    gaps: Vec<Duration>,
}

/// Silence that separates two bursts of packets (two wake-ups of a radio with a tail shorter than this).
const BURST_GAP: Duration = Duration::from_millis(1000);

fn wire_cost(seen: &[(Instant, usize)]) -> WireCost {
    let mut starts = Vec::new();
    let mut last: Option<Instant> = None;
    for &(at, _) in seen {
        if last.is_none_or(|l| at - l >= BURST_GAP) {
            starts.push(at);
        }
        last = Some(at);
    }
    WireCost {
        packets: seen.len(),
        bytes: seen.iter().map(|(_, n)| n).sum(),
        gaps: starts.windows(2).map(|w| w[1] - w[0]).collect(),
    }
}

/// An idle device with a 6 s heartbeat, watched on the router's interface towards the devices for three
/// intervals: one burst per heartbeat, and nothing in between. The server (the library, in the server's
/// namespace) has a default keepalive of 2 s, which would probe between two heartbeats: keepalive follows the
/// negotiated heartbeat (at least one and a half intervals), so an idle connection's heartbeat is its only
/// traffic. The bytes and packets per exchange are what docs/mobile.md's cost table is computed from.
#[test]
#[ignore = "fault lab: needs root and network namespaces; scripts/test runs it"]
fn lab_an_idle_connection_wakes_the_path_once_per_heartbeat() {
    let lab = lab_or_skip!("idle cost");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready) = mpsc::channel();
    let server = in_ns(&lab.server, move || {
        runtime().block_on(async move {
            let mut cfg = tether::ServerConfig { listen: server_addr(), ..Default::default() };
            let quick = Duration::from_secs(2);
            cfg.socket.keepalive = Some(tether::Keepalive { idle: quick, interval: Duration::from_secs(1), count: 3 });
            let server = tether::Server::bind(cfg).await.expect("bind in the server namespace");
            let _ = ready_tx.send(());
            let _ = server.run(async move { drop(stopped.await) }).await;
        })
    });
    ready.recv_timeout(common::PATIENCE).expect("the server started");
    let target = format!("{SERVER_IP}:{PORT}");
    let bin = env!("CARGO_BIN_EXE_tether");
    let dev = lab.devices.clone();
    let device = common::Proc::spawn_cmd(
        "ip",
        &["netns", "exec", &dev, bin, "connect", &target, "--id", "phone", "--json", "--heartbeat-interval", "6s"],
    );
    device.expect("connected", |v| common::event(v) == "connected");
    let interval = Duration::from_secs(6);
    let capture = netlab::Capture::start(&lab.router, "to-dev");
    std::thread::sleep(interval * 3); // the measurement window
    let cost = wire_cost(&capture.stop());
    let exchanges = cost.gaps.len() + 1;
    println!(
        "MEASURED idle interval=6s window=18s: {} packets, {} bytes, {exchanges} bursts, gaps {:?}; per exchange \
         {:.1} packets, {:.0} bytes",
        cost.packets,
        cost.bytes,
        cost.gaps,
        cost.packets as f64 / exchanges as f64,
        cost.bytes as f64 / exchanges as f64,
    );
    drop(device);
    let _ = stop.send(());
    server.join().expect("the server thread");
    assert!(cost.packets > 0, "the heartbeat crossed the router");
    assert!(
        cost.gaps.iter().all(|g| *g >= interval * 4 / 5),
        "a burst between two heartbeats (a keepalive probe, or a ping of the server's off the client's phase): {cost:?}"
    );
    assert!((3..=4).contains(&exchanges), "one burst per heartbeat over three intervals: {cost:?}");
}

/// `tether probe --idle` from behind a NAT that forgets after 2 s: idle for 1 s the connection is kept; idle for
/// 3 s its `PING` is lost while a new connection goes through, which the probe names `middlebox_forgot` (exit 23).
#[test]
#[ignore = "fault lab: needs root and network namespaces; scripts/test runs it"]
fn lab_probe_idle_names_a_middlebox_that_forgot() {
    let mut lab = lab_or_skip!("probe idle", netlab::nat_unavailable);
    lab.nat(Duration::from_secs(2), Forgotten::Dropped);
    lab.serve(&["--insecure-no-auth"]);
    let target = format!("{SERVER_IP}:{PORT}");
    let probe = |idle: &str| -> (i32, Value) {
        let out = netlab::tether(Some(&lab.devices))
            .args(["probe", &target, "--idle", idle, "--timeout", "2s", "--count", "1", "--json"])
            .output()
            .expect("tether probe");
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {out:?}"));
        (out.status.code().unwrap_or(-1), v)
    };
    let (code, v) = probe("1s");
    println!("MEASURED probe idle=1s behind a 2s NAT: {} ({})", v["verdict"], v["explanation"]);
    assert_eq!((code, v["verdict"].as_str()), (0, Some("ok")), "{v}");
    assert_eq!(v["layers"]["idle"]["result"], "kept", "{v}");
    let (code, v) = probe("3s");
    println!("MEASURED probe idle=3s behind a 2s NAT: {} ({})", v["verdict"], v["explanation"]);
    assert_eq!((code, v["verdict"].as_str()), (23, Some("middlebox_forgot")), "{v}");
    assert!(v["explanation"].as_str().unwrap().starts_with("the path's middlebox forgot the connection"), "{v}");
    assert_eq!(v["layers"]["idle"]["how"], "no PONG in 2.0s", "{v}");
}

/// What an adaptive device said over time: each interval it used (from its `connected` and `heartbeat` lines),
/// and each connection it lost, in seconds from its start.
#[derive(Debug, Default)]
struct Learning {
    intervals: Vec<(f64, u64)>,
    losses: Vec<(f64, Value)>,
    diagnoses: usize,
}

impl Learning {
    /// Read the device's lines until `until`, or until its interval has held for `quiet` intervals with no line.
    fn follow(&mut self, device: &common::Proc, start: Instant, until: Instant, quiet: u32) {
        loop {
            let current = self.intervals.last().map_or(Duration::from_secs(5), |(_, ms)| Duration::from_millis(*ms));
            let patience =
                (current * quiet + Duration::from_secs(1)).min(until.saturating_duration_since(Instant::now()));
            let Some(v) = device.try_expect(patience, |_| true) else { return };
            let at = start.elapsed().as_secs_f64();
            match common::event(&v) {
                "connected" | "heartbeat" => self.intervals.push((at, v["heartbeat_ms"].as_u64().unwrap())),
                "disconnected" => self.losses.push((at, v)),
                "diagnosis" => self.diagnoses += 1,
                _ => {}
            }
            if Instant::now() >= until {
                return;
            }
        }
    }

    fn current(&self) -> Duration {
        Duration::from_millis(self.intervals.last().map_or(0, |(_, ms)| *ms))
    }

    fn trace(&self) -> String {
        let steps: Vec<String> =
            self.intervals.iter().map(|(at, ms)| format!("{at:.1}s:{:.2}s", *ms as f64 / 1e3)).collect();
        steps.join(" ")
    }
}

/// `tether connect --reconnect --adaptive-heartbeat RANGE` as `phone` in the devices' namespace `dev`.
fn adaptive_device(dev: &str, range: &str) -> common::Proc {
    let (target, bin) = (format!("{SERVER_IP}:{PORT}"), env!("CARGO_BIN_EXE_tether"));
    let connect = [bin, "connect", &target, "--id", "phone", "--json", "--reconnect", "--adaptive-heartbeat", range];
    common::Proc::spawn_cmd("ip", &[&["netns", "exec", dev][..], &connect].concat())
}

/// A device with `--adaptive-heartbeat FLOOR..CEILING` behind a NAT that forgets after `nat`, followed until its
/// interval stays put for three of its intervals (within `patience`), then for four more intervals, in which
/// nothing may be lost or changed. Every loss is checked to be named `middlebox_forgot` on both ends. Returns the
/// device (still connected), what it said, and when it started.
fn adaptive_converges(
    lab: &mut Lab,
    forgotten: Forgotten,
    nat: Duration,
    (floor, ceiling): (Duration, Duration),
    patience: Duration,
) -> (common::Proc, Learning, Instant) {
    lab.nat(nat, forgotten);
    let dev = lab.devices.clone();
    let f = |d: Duration| format!("{}ms", d.as_millis());
    let server = lab.serve(&[
        "--heartbeat-interval",
        &f(floor),
        "--heartbeat-timeout",
        &f(floor * 3),
        "--heartbeat-max",
        &f(ceiling),
        "--insecure-no-auth",
    ]);
    let device = adaptive_device(&dev, &format!("{}..{}", f(floor), f(ceiling)));
    let start = Instant::now();
    let mut l = Learning::default();
    l.follow(&device, start, start + patience, 3);
    let settled = l.current();
    let used = l.intervals.len();
    let name = format!("forgotten={forgotten:?} nat={}s floor={}s", nat.as_secs(), floor.as_secs_f64());
    println!(
        "MEASURED adaptive {name}: settled at {:.2}s after {used} intervals and {} losses, {:.0}s: {}",
        settled.as_secs_f64(),
        l.losses.len(),
        l.intervals.last().map_or(0.0, |(at, _)| *at),
        l.trace()
    );
    for (at, d) in &l.losses {
        println!("MEASURED adaptive {name}: lost at {at:.1}s: {} {}", d["reason"], d["detail"]);
    }
    assert!(settled < nat && settled >= nat / 2, "settled at {settled:?}: {}", l.trace());
    assert!(used <= 10, "converged after {used} intervals: {}", l.trace());
    // Both ends name what the NAT did, each time.
    for (_, d) in &l.losses {
        match forgotten {
            Forgotten::Dropped => {
                let said = (&d["reason"], &d["middlebox_forgot"]);
                assert_eq!(said, (&"heartbeat_timeout".into(), &true.into()), "{d}")
            }
            Forgotten::Reset => assert_eq!(d["reason"], "reset", "{d}"),
        }
    }
    assert_eq!(l.diagnoses, l.losses.len(), "a diagnosis after each loss: {:?}", l.losses);
    if !l.losses.is_empty() {
        let diagnosis = server.try_expect(Duration::from_secs(1), |v| common::event(v) == "diagnosis");
        assert!(diagnosis.is_some_and(|d| d["diagnosis"] == "middlebox_forgot"), "the server names it too");
    }
    // Converged: nothing lost, nothing changed for four more intervals.
    let (losses, changes) = (l.losses.len(), l.intervals.len());
    l.follow(&device, start, Instant::now() + settled * 4, 5);
    assert_eq!((l.losses.len(), l.intervals.len()), (losses, changes), "after converging: {}", l.trace());
    (device, l, start)
}

/// The adaptive heartbeat against a carrier NAT, scaled down tenfold (the 120 s NAT becomes 12 s, and a
/// device that starts at 2 s). The device doubles its heartbeat in the session while each `PING` holds; the first
/// silence the NAT forgets is caught by the path check (an unanswered `PING`, and a new connection that goes
/// through) and the device is back at once, at a shorter interval. It settles below the NAT's timeout within 10
/// intervals and then loses nothing for four intervals. Then the NAT's timeout shrinks to 5 s: the device is
/// back within one interval of the `PING` the NAT lost, and settles again, below 5 s. Where the NAT answers
/// forgotten connections with a reset, the reset teaches the learner the same way. docs/mobile.md quotes the
/// `MEASURED` lines.
#[test]
#[ignore = "fault lab: needs root and network namespaces; scripts/test runs it"]
fn lab_adaptive_heartbeat_learns_the_nat_timeout() {
    let s = Duration::from_secs;
    for forgotten in [Forgotten::Dropped, Forgotten::Reset] {
        let mut lab = lab_or_skip!("adaptive heartbeat", netlab::nat_unavailable);
        let (device, mut l, start) = adaptive_converges(&mut lab, forgotten, s(12), (s(2), s(40)), s(240));
        if forgotten == Forgotten::Reset {
            continue;
        }
        // The NAT's timeout shrinks: the device is back within one interval of its loss, and settles below it.
        let (before, losses) = (l.current(), l.losses.len());
        let shrunk = Instant::now();
        lab.set_nat_idle(s(5));
        l.follow(&device, start, Instant::now() + s(180), 3);
        let (lost_at, lost) = l.losses.get(losses).expect("the shrink costs the connection once").clone();
        let back_at = l.intervals.iter().find(|(at, _)| *at > lost_at).map(|(at, _)| *at).expect("reconnected");
        let since_shrink = back_at - (shrunk - start).as_secs_f64();
        println!(
            "MEASURED adaptive shrink 12s->5s: lost after {:.1}s ({}), back {:.2}s after the loss, {since_shrink:.1}s \
             after the shrink; settled at {:.2}s, {} more losses: {}",
            lost_at - (shrunk - start).as_secs_f64(),
            lost["detail"],
            back_at - lost_at,
            l.current().as_secs_f64(),
            l.losses.len() - losses - 1,
            l.trace()
        );
        // How long the lost PING went unanswered before the device gave up on the connection, as it says.
        let detail = lost["detail"].as_str().unwrap_or_default();
        let unanswered: f64 = detail
            .split_once("unanswered for ")
            .and_then(|(_, rest)| rest.split_once(" s"))
            .and_then(|(n, _)| n.parse().ok())
            .unwrap_or_else(|| panic!("no wait in {detail:?}"));
        let recovery = unanswered + (back_at - lost_at);
        println!("MEASURED adaptive shrink: back {recovery:.2}s after the PING the NAT lost (interval {before:?})");
        assert!(back_at - lost_at < 1.0, "back {:.2}s after the loss", back_at - lost_at);
        assert!(recovery < before.as_secs_f64(), "back {recovery:.2}s after the lost PING, interval {before:?}");
        // conntrack gives an existing mapping the new timeout from its next packet on: the exchange right after
        // the shrink still holds, and the one after it is lost.
        assert!(
            since_shrink < 2.0 * before.as_secs_f64() + recovery + 1.0,
            "recovered {since_shrink:.1}s after the shrink, with an interval of {before:?}"
        );
        assert!(l.current() < s(5), "settled at {:?}: {}", l.current(), l.trace());
        drop(device);
    }
}

/// The figure unscaled, measured once for docs/mobile.md and skipped by `scripts/test` (about 25
/// minutes): a NAT that forgets after 120 s, a device from 30 s up to 15 min. Run it with `cargo test -p
/// tether-cli --test mobile_lab lab_adaptive_heartbeat_against_a_120_s_nat -- --ignored --nocapture`.
#[test]
#[ignore = "fault lab, 25 minutes: run by hand (as root) for docs/mobile.md"]
fn lab_adaptive_heartbeat_against_a_120_s_nat() {
    let s = Duration::from_secs;
    let mut lab = lab_or_skip!("adaptive heartbeat 120 s", netlab::nat_unavailable);
    let (device, _, _) = adaptive_converges(&mut lab, Forgotten::Dropped, s(120), (s(30), s(900)), s(1800));
    drop(device);
}

/// Blips while an adaptive device's `PING` waits: the path check finds the path down for every connection (its
/// connect is not answered), or goes through only as the path heals, when the old connection's next
/// retransmission gets through as well. Either way the connection is kept: the path check never ends a
/// connection that a blip merely delayed. Three blips of 5 s at different phases of a 4 s heartbeat (timeout
/// 16 s, so the heartbeat alone survives them).
#[test]
#[ignore = "fault lab: needs root and network namespaces; scripts/test runs it"]
fn lab_adaptive_heartbeat_rides_out_a_blip() {
    let mut lab = lab_or_skip!("adaptive heartbeat blip");
    let _server = lab.serve(&["--heartbeat-interval", "4s", "--heartbeat-timeout", "16s", "--insecure-no-auth"]);
    let device = adaptive_device(&lab.devices, "4s..4s");
    device.expect_within("connected", Duration::from_secs(10), |v| common::event(v) == "connected");
    for phase in [1.3, 2.6, 3.9] {
        std::thread::sleep(Duration::from_secs_f64(phase)); // where in the heartbeat the blip starts
        lab.cut(DEVICE_IP);
        std::thread::sleep(Duration::from_secs(5)); // the fault itself lasts this long
        lab.restore(DEVICE_IP);
        let lost = device.try_expect(Duration::from_secs(6), |v| common::event(v) == "disconnected");
        println!(
            "MEASURED adaptive blip 5s at +{phase}s: {}",
            lost.as_ref().map_or("kept".to_owned(), |v| v.to_string())
        );
        assert!(lost.is_none(), "a blip ended the connection: {lost:?}");
    }
}
