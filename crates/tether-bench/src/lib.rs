//! `tether bench`: scenarios that measure a tether server (or a peer: Mosquitto, rumqttd, nats-server) under load,
//! and the load generator.
//!
//! # Layout
//! - [`run`] is the coordinator. It starts and owns the server under test (or uses `--server ADDR
//!   --server-pid PID`), spreads the connections over worker processes (at most `per_worker` each, every worker
//!   on its own 127.0.0.x source address when the target is on loopback), drives the scenario, and returns a
//!   [`Report`]: the JSON object scripts compare, plus human rows.
//! - [`worker`]: one load-generator process (`tether bench-worker`).
//! - [`peer`]: the peers a run starts (executable, generated config, detection rule).
//! - [`mqtt`]: the MQTT 3.1.1 packets used against Mosquitto and rumqttd. [`nats`]: NATS's text protocol, and
//!   nats-server's closed connections from its monitoring endpoint. [`sys`]: /proc readers.
//! - [`redis`]: a `redis-server` of the run's own (the `cluster` scenario; the cluster tests use it too).
//! - [`scrape`]: after an `idle` hold, `GET /metrics` from an owned tether server's admin listener, timed.
//! - [`relay`]: the `relay` scenario, messages between pairs of clients (its own coordinator and load generator).
//! - [`tls`]: `idle --tls`, tether over TLS 1.3: the run's certificates, the load generator's TLS client.
//!
//! Every run is bounded: waits have deadlines, workers die with their coordinator (end of stdin) and at their
//! own time limit, and the target address is only ever the one given (or the loopback server the run started).
//! This crate is an application (the body of a CLI subcommand), so it reports errors with `anyhow`.

pub mod cluster;
pub mod mqtt;
pub mod nats;
pub mod peer;
pub mod redis;
pub mod relay;
pub mod scrape;
pub mod sys;
pub mod tls;
pub mod worker;

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

pub use worker::{Target, WorkerOpts};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    Idle,
    Connect,
    Detect,
    Takeover,
    Storm,
    /// Several tether nodes on one Redis ([`cluster`]).
    Cluster,
    /// Messages relayed between pairs of clients ([`relay`]).
    Relay,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Idle => "idle",
            Scenario::Connect => "connect",
            Scenario::Detect => "detect",
            Scenario::Takeover => "takeover",
            Scenario::Storm => "storm",
            Scenario::Cluster => "cluster",
            Scenario::Relay => "relay",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Opts {
    pub scenario: Scenario,
    pub target: Target,
    pub connections: usize,
    pub heartbeat_interval: Duration,
    /// How long `idle` holds the connections while measuring.
    pub hold: Duration,
    /// `idle`: how long to wait after the last connection is up before the hold starts. One interval and a
    /// second lets the first heartbeats and a tether server's first round-trip probe (one interval after
    /// `WELCOME`) pass, so the hold sees the steady state between probes.
    pub settle: Duration,
    /// `detect`: how many connections go silent.
    pub silent: usize,
    /// `takeover`: how many live ids reconnect.
    pub takeovers: usize,
    /// Connections per worker process (each process may hold at most 20,000 descriptors here).
    pub per_worker: usize,
    /// Handshakes each worker keeps in flight while connecting.
    pub concurrency: usize,
    /// An existing server instead of one this run starts.
    pub server: Option<SocketAddr>,
    pub server_pid: Option<u32>,
    /// The `tether` executable (for workers and the owned server).
    pub exe: PathBuf,
    /// Extra arguments for the owned tether server (`tether serve … ARGS`), e.g. `--admin off`.
    pub server_args: Vec<String>,
    /// `cluster`: how many nodes (at least 4: the scenario uses four of them in distinct roles).
    pub nodes: usize,
    /// `relay`: sender → receiver pairs.
    pub pairs: usize,
    /// `relay`: each sender's window in messages ([`relay::load`] says what each mode's window counts).
    pub window: u64,
    /// `relay`: acknowledged delivery (tether `reliable`, MQTT QoS 1) instead of at most once.
    pub reliable: bool,
    /// `relay`, tether `reliable`: senders ask for delivery receipts.
    pub receipts: bool,
    /// `relay`, tether `reliable`: messages to hold in offline sessions first, for memory per held message.
    pub held: usize,
    /// The executable of the tether server this run starts, when not `exe` (an older build, for before/after
    /// comparisons under the same load generator).
    pub server_exe: Option<PathBuf>,
    /// `idle` against tether: the server serves TLS and every connection makes a full TLS 1.3 handshake first.
    pub tls: bool,
}

impl Opts {
    /// What the result is labelled with: `metrics off` for an owned tether server started with `--admin off`
    /// (no admin listener, no per-frame counting, no round-trip probes), else `metrics on`. `None` for Mosquitto
    /// and for a server this run did not start.
    pub fn variant(&self) -> Option<&'static str> {
        if self.target != Target::Tether || self.server.is_some() || self.scenario == Scenario::Cluster {
            return None;
        }
        let a = &self.server_args;
        let off = a.iter().any(|x| x == "--admin=off") || a.windows(2).any(|w| w[0] == "--admin" && w[1] == "off");
        Some(if off { "metrics off" } else { "metrics on" })
    }

    /// The scenario's name in the results: `idle_tls` for `idle --tls`, so that no reader mixes its figures with
    /// plain `idle`'s.
    pub fn scenario_name(&self) -> &'static str {
        if self.tls && self.scenario == Scenario::Idle {
            "idle_tls"
        } else {
            self.scenario.name()
        }
    }
}

/// What a scenario measured: `json` carries the documented keys; `rows` are the human table.
#[derive(Debug, Clone)]
pub struct Report {
    pub json: Value,
    pub rows: Vec<(String, String)>,
}

/// A child process whose stdout is JSON lines, read on a thread.
struct Child2 {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<Value>,
}

impl Child2 {
    fn spawn(cmd: &mut Command) -> anyhow::Result<Child2> {
        let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().context("spawning")?;
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    if tx.send(v).is_err() {
                        return;
                    }
                }
            }
        });
        let stdin = child.stdin.take();
        Ok(Child2 { child, stdin, lines: rx })
    }

    fn send(&mut self, line: &str) -> anyhow::Result<()> {
        let stdin = self.stdin.as_mut().context("stdin closed")?;
        writeln!(stdin, "{line}")?;
        stdin.flush()?;
        Ok(())
    }

    fn expect(&self, what: &str, within: Duration, pred: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
        let deadline = Instant::now() + within;
        loop {
            match self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(v) if pred(&v) => return Ok(v),
                Ok(_) => {}
                Err(_) => bail!("timed out waiting for {what}"),
            }
        }
    }
}

impl Drop for Child2 {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn event(v: &Value) -> &str {
    v["event"].as_str().unwrap_or("")
}

/// The server under test.
struct Server {
    addr: SocketAddr,
    pid: u32,
    /// The owned tether server's admin listener (from its `listening` event), if it has one.
    admin: Option<SocketAddr>,
    /// nats-server's HTTP monitoring listener: `detect` reads its verdicts there.
    monitor: Option<SocketAddr>,
    /// A peer's version line, for the results.
    version: Option<String>,
    /// How the run started the server: a peer's config file, tether's `serve` arguments. For the results.
    config: Option<String>,
    /// Owned server processes (the last one is current; `storm` restarts).
    proc: Option<Child2>,
    _dir: Option<TempDir>,
}

/// A scratch directory removed on drop (a peer's config).
struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The deadline after a client's last frame: for tether its `--heartbeat-timeout`; for a peer its own rule
/// ([`peer::detection_rule`]), which `detect` measures lateness against.
fn timeout_for(opts: &Opts) -> Duration {
    match opts.scenario {
        // Detection parity with MQTT: the broker declares a client dead after 1.5 × keepalive.
        Scenario::Detect => peer::detection_rule(opts.target, opts.heartbeat_interval).1,
        // Elsewhere tether's own default ratio (3 intervals): load generators sharing two cores with the server
        // must not have healthy connections declared dead by a tight timeout.
        _ => opts.heartbeat_interval * 3,
    }
}

/// The arguments of the tether server a run starts (before `--listen`).
fn tether_args(opts: &Opts) -> Vec<String> {
    let interval = format!("{}ms", opts.heartbeat_interval.as_millis());
    let timeout = format!("{}ms", timeout_for(opts).as_millis());
    let max = (opts.connections + 1000).to_string();
    let handshakes = if opts.scenario == Scenario::Storm { "512".to_owned() } else { max.clone() };
    let mut args: Vec<String> = ["--events", "json", "--stats-interval", "250ms"].map(String::from).to_vec();
    args.extend(["--heartbeat-interval".into(), interval, "--heartbeat-timeout".into(), timeout]);
    args.extend(["--heartbeat-min", "100ms", "--max-connections"].map(String::from));
    args.extend([max, "--max-handshakes".into(), handshakes.clone()]);
    // Thousands of simulated devices share each worker's source address: no per-address share.
    args.extend(["--max-handshakes-per-ip".into(), handshakes]);
    args.extend(opts.server_args.iter().cloned());
    args
}

fn spawn_tether(opts: &Opts, listen: &str, extra: &[String]) -> anyhow::Result<Child2> {
    let mut cmd = Command::new(opts.server_exe.as_ref().unwrap_or(&opts.exe));
    cmd.args(["serve", "--listen", listen]).args(tether_args(opts)).args(extra);
    cmd.env("RUST_LOG", "warn").stderr(Stdio::null());
    Child2::spawn(&mut cmd)
}

/// `pki`: serve TLS with its certificate (`idle --tls`).
fn start_server(opts: &Opts, pki: Option<&tls::Pki>) -> anyhow::Result<Server> {
    if let Some(addr) = opts.server {
        let pid = opts.server_pid.context("--server needs --server-pid (to read its RSS and CPU)")?;
        return Ok(Server {
            addr,
            pid,
            admin: None,
            monitor: None,
            version: None,
            config: None,
            proc: None,
            _dir: None,
        });
    }
    if opts.target != Target::Tether {
        return peer::start(opts);
    }
    let tls_args: Vec<String> = match pki {
        Some(pki) => vec!["--tls-cert".into(), path(&pki.cert), "--tls-key".into(), path(&pki.key)],
        None => Vec::new(),
    };
    let p = spawn_tether(opts, "127.0.0.1:0", &tls_args)?;
    let l = p.expect("listening", Duration::from_secs(10), |v| event(v) == "listening")?;
    let addr: SocketAddr = l["addr"].as_str().context("listening addr")?.parse()?;
    let admin = l["admin"].as_str().map(str::parse).transpose().context("listening admin")?;
    let mut config = format!("tether serve --listen 127.0.0.1:0 {}", tether_args(opts).join(" "));
    if pki.is_some() {
        config.push_str(" --tls-cert server.pem --tls-key server.key");
    }
    let config = Some(config);
    Ok(Server { addr, pid: p.child.id(), admin, monitor: None, version: None, config, proc: Some(p), _dir: None })
}

fn path(p: &std::path::Path) -> String {
    p.to_string_lossy().into_owned()
}

/// `tls_ca`: the workers' tether connections are TLS, trusting this CA.
fn spawn_workers(
    opts: &Opts,
    addr: SocketAddr,
    reconnect: bool,
    tls_ca: Option<&std::path::Path>,
) -> anyhow::Result<Vec<Child2>> {
    let per = opts.per_worker.max(1);
    let n = opts.connections.div_ceil(per).max(1);
    let mut workers = Vec::new();
    for w in 0..n {
        let first = w * per;
        let count = per.min(opts.connections - first);
        let mut cmd = Command::new(&opts.exe);
        cmd.args(["bench-worker", "--addr", &addr.to_string(), "--count", &count.to_string()])
            .args(["--first", &first.to_string(), "--interval", &format!("{}ms", opts.heartbeat_interval.as_millis())])
            .args(["--concurrency", &opts.concurrency.to_string(), "--max-seconds", "900"])
            .args(["--target", opts.target.name()])
            .env("RUST_LOG", "warn");
        if addr.ip().is_loopback() && addr.is_ipv4() {
            // Spread over source addresses: each has its own ephemeral port range towards the server.
            cmd.args(["--source-ip", &Ipv4Addr::new(127, 0, 1, (w % 250) as u8 + 1).to_string()]);
        }
        if reconnect {
            cmd.arg("--reconnect");
        }
        if let Some(ca) = tls_ca {
            cmd.args(["--tls-ca", &path(ca)]);
        }
        workers.push(Child2::spawn(&mut cmd)?);
    }
    Ok(workers)
}

/// Wait for every worker's `connected` line; returns (handshake latencies µs, slowest worker's connect time).
fn connected(workers: &[Child2], within: Duration) -> anyhow::Result<(Vec<u64>, Duration, usize)> {
    let mut lat = Vec::new();
    let mut slowest = Duration::ZERO;
    let mut failed = 0;
    for w in workers {
        let v = w.expect("workers connected", within, |v| event(v) == "connected")?;
        failed += v["failed"].as_u64().unwrap_or(0) as usize;
        if let Some(e) = v["first_error"].as_str() {
            eprintln!("bench: a worker could not open every connection: {e}");
        }
        lat.extend(v["latencies_us"].as_array().into_iter().flatten().filter_map(Value::as_u64));
        slowest = slowest.max(Duration::from_micros(v["elapsed_us"].as_u64().unwrap_or(0)));
    }
    Ok((lat, slowest, failed))
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Run one scenario.
pub fn run(opts: &Opts) -> anyhow::Result<Report> {
    if opts.tls && (opts.scenario != Scenario::Idle || opts.target != Target::Tether || opts.server.is_some()) {
        bail!("--tls is for the idle scenario against the tether server this run starts");
    }
    if opts.scenario == Scenario::Cluster {
        if opts.target != Target::Tether || opts.server.is_some() {
            bail!("cluster runs tether nodes of its own");
        }
        return cluster::run(opts);
    }
    if opts.target != Target::Tether && opts.scenario == Scenario::Storm {
        bail!("storm is measured for tether only");
    }
    if opts.target == Target::Nats && opts.scenario == Scenario::Takeover {
        bail!("NATS has no session takeover: a second connection with the same name is a second client");
    }
    if !opts.server_args.is_empty() && (opts.server.is_some() || opts.target != Target::Tether) {
        bail!("--server-arg is for the tether server this run starts");
    }
    if opts.scenario == Scenario::Relay {
        return relay::run(opts);
    }
    // Every process the run starts (server, workers) inherits this: the most descriptors the machine allows.
    sys::raise_nofile();
    // Not while the kernel still tears down a previous run's connections (that skews every figure).
    sys::wait_quiet(Duration::from_secs(60));
    let rss0_machine_slab = sys::slab_bytes();
    let pki = if opts.tls { Some(tls::Pki::generate()?) } else { None };
    let mut server = start_server(opts, pki.as_ref())?;
    let rss0 = sys::rss_bytes(server.pid);
    let connect_limit = Duration::from_secs(60) + Duration::from_millis(opts.connections as u64 * 5);
    let ca = pki.as_ref().map(|p| p.ca.as_path());
    let mut workers = spawn_workers(opts, server.addr, opts.scenario == Scenario::Storm, ca)?;
    let (lat, slowest, failed) = connected(&workers, connect_limit)?;
    let n = opts.connections - failed;
    let mut rows = vec![("target".into(), opts.target.name().to_owned()), ("connections".into(), n.to_string())];
    let mut out = json!({
        "scenario": opts.scenario_name(),
        "target": opts.target.name(),
        "connections": n,
        "failed_connections": failed,
        "heartbeat_interval_ms": opts.heartbeat_interval.as_millis() as u64,
    });
    if let Some(v) = opts.variant() {
        out["variant"] = json!(v);
        out["server_args"] = json!(opts.server_args);
        rows.push(("variant".into(), v.into()));
    }
    if opts.tls {
        out["tls"] = json!("TLS 1.3");
        rows.push(("transport".into(), "TLS 1.3 (a full handshake per connection)".into()));
    }
    if let Some(v) = &server.version {
        out["server_version"] = json!(v);
        rows.push(("server".into(), v.clone()));
    }
    if let Some(c) = &server.config {
        out["server_config"] = json!(c);
    }
    match opts.scenario {
        Scenario::Connect => {
            let l = sorted_ms(&lat);
            let hps = n as f64 / slowest.as_secs_f64().max(1e-9);
            out["handshakes_per_s"] = json!(hps.round());
            out["handshake_ms_p50"] = json!(ms3(pct(&l, 0.5)));
            out["handshake_ms_p99"] = json!(ms3(pct(&l, 0.99)));
            rows.push(("handshakes per second".into(), format!("{hps:.0}")));
            rows.push(("handshake p50 / p99".into(), format!("{:.3} / {:.3} ms", pct(&l, 0.5), pct(&l, 0.99))));
        }
        Scenario::Idle => {
            std::thread::sleep(opts.settle);
            let ex0 = exchanges(&mut workers)?;
            let cpu0 = sys::cpu_time(server.pid);
            let t0 = Instant::now();
            std::thread::sleep(opts.hold);
            let ex1 = exchanges(&mut workers)?;
            let cpu1 = sys::cpu_time(server.pid);
            let held = t0.elapsed().as_secs_f64();
            let rss1 = sys::rss_bytes(server.pid);
            let slab1 = sys::slab_bytes();
            let hb = ex1.heartbeats.saturating_sub(ex0.heartbeats) as f64;
            let server_pings = ex1.server_pings.saturating_sub(ex0.server_pings);
            let rss_per = rss0.zip(rss1).map(|(a, b)| (b as f64 - a as f64) / n.max(1) as f64);
            let slab_per = rss0_machine_slab.zip(slab1).map(|(a, b)| (b as f64 - a as f64) / n.max(1) as f64);
            let cpu = cpu0.zip(cpu1).map(|(a, b)| (b - a).as_secs_f64());
            out["rss_bytes"] = json!(rss1);
            out["rss_per_conn_bytes"] = json!(rss_per.map(f64::round));
            out["slab_per_conn_bytes"] = json!(slab_per.map(f64::round));
            out["cpu_s"] = json!(cpu.map(ms3));
            out["cpu_s_per_10k_heartbeats"] = json!(cpu.map(|c| ms3(c / hb.max(1.0) * 10_000.0)));
            out["heartbeats_per_s"] = json!((hb / held).round());
            out["server_pings"] = json!(server_pings);
            out["settle_s"] = json!(ms3(opts.settle.as_secs_f64()));
            out["held_s"] = json!(ms3(held));
            if opts.target == Target::Tether {
                out["alive_connections"] = json!(ex1.answered);
                rows.push((
                    "connections whose PING was answered in the hold".into(),
                    format!("{} of {n}", ex1.answered),
                ));
            }
            rows.push(("server RSS per connection".into(), format!("{:.0} B", rss_per.unwrap_or(f64::NAN))));
            rows.push((
                "kernel slab per connection (both ends)".into(),
                format!("{:.0} B", slab_per.unwrap_or(f64::NAN)),
            ));
            rows.push((
                "server CPU per 10k heartbeats".into(),
                format!("{:.3} s", cpu.unwrap_or(f64::NAN) / hb.max(1.0) * 1e4),
            ));
            rows.push(("heartbeats handled per second".into(), format!("{:.0}", hb / held)));
            rows.push(("server PINGs answered during the hold".into(), server_pings.to_string()));
            // Every connection pings at least once in two intervals: each must have had its answer.
            if opts.target == Target::Tether && opts.hold >= 2 * opts.heartbeat_interval && (ex1.answered as usize) < n
            {
                bail!("only {} of {n} connections had a PING answered during the hold", ex1.answered);
            }
            // The scrapes are plain `idle`'s: the admin listener is the same with or without TLS.
            if let (Some(admin), true, false) = (server.admin, server.proc.is_some(), opts.tls) {
                // After the figures above: the scrapes must not touch them. The server's CPU during the hold is
                // its background rate, subtracted from the CPU it used while scraped.
                let s = scrape::measure(admin, server.pid, SCRAPES, cpu.map(|c| c / held))?;
                out["metrics_scrapes"] = json!(SCRAPES);
                out["metrics_scrape_ms_p50"] = json!(ms3(s.ms_p50));
                out["metrics_scrape_ms_max"] = json!(ms3(s.ms_max));
                out["metrics_scrape_cpu_ms"] = json!(s.cpu_ms.map(ms3));
                out["metrics_bytes"] = json!(s.bytes);
                rows.push((
                    format!("GET /metrics ×{SCRAPES}: p50 / max"),
                    format!("{:.3} / {:.3} ms", s.ms_p50, s.ms_max),
                ));
                rows.push((
                    "server CPU per scrape (background subtracted)".into(),
                    format!("{:.3} ms", s.cpu_ms.unwrap_or(f64::NAN)),
                ));
                rows.push(("/metrics body".into(), format!("{} bytes", s.bytes)));
            }
        }
        Scenario::Detect => detect(opts, &mut server, &mut workers, n, &mut out, &mut rows)?,
        Scenario::Takeover => {
            let k = opts.takeovers.min(n);
            let per = k.div_ceil(workers.len());
            let mut lat = Vec::new();
            let mut left = k;
            for w in &mut workers {
                let share = per.min(left);
                left -= share;
                w.send(&format!("takeover {share}"))?;
            }
            for w in &workers {
                let v = w.expect("takeover done", Duration::from_secs(60), |v| event(v) == "takeover")?;
                lat.extend(v["latencies_us"].as_array().into_iter().flatten().filter_map(Value::as_u64));
            }
            let l = sorted_ms(&lat);
            // Every evicted connection must be gone from the server's table: exactly n ESTABLISHED, no CLOSE_WAIT.
            let deadline = Instant::now() + Duration::from_secs(10);
            let (mut est, mut cw) = sys::server_socket_counts(server.addr);
            while (est != n || cw != 0) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
                (est, cw) = sys::server_socket_counts(server.addr);
            }
            let ghosts = est.abs_diff(n) + cw;
            out["takeovers"] = json!(l.len());
            out["latency_ms_p50"] = json!(ms3(pct(&l, 0.5)));
            out["latency_ms_p99"] = json!(ms3(pct(&l, 0.99)));
            out["ghosts"] = json!(ghosts);
            rows.push(("takeovers".into(), l.len().to_string()));
            let what = if opts.target == Target::Tether { "HELLO→WELCOME" } else { "CONNECT→CONNACK" };
            rows.push((format!("{what} p50 / p99"), format!("{:.3} / {:.3} ms", pct(&l, 0.5), pct(&l, 0.99))));
            rows.push(("ghosts after (server table)".into(), format!("{ghosts} ({est} ESTABLISHED, {cw} CLOSE_WAIT)")));
        }
        Scenario::Storm => storm(opts, &mut server, &mut workers, n, &mut out, &mut rows)?,
        Scenario::Cluster => unreachable!("run by cluster::run"),
        Scenario::Relay => unreachable!("run by relay::run"),
    }
    for w in &mut workers {
        let _ = w.send("stop");
    }
    Ok(Report { json: out, rows })
}

/// `GET /metrics` requests after an `idle` hold.
const SCRAPES: usize = 50;

/// What the workers counted so far.
#[derive(Debug, Clone, Copy, Default)]
struct Exchanges {
    /// Heartbeats the clients drove: their ping and its answer.
    heartbeats: u64,
    /// The server's own pings the clients answered (tether's round-trip probes): server work, not heartbeats.
    server_pings: u64,
    /// tether: connections that had a `PONG` to a `PING` of their own since the previous reading.
    answered: u64,
}

fn exchanges<'a>(workers: impl IntoIterator<Item = &'a mut Child2>) -> anyhow::Result<Exchanges> {
    let mut total = Exchanges::default();
    for v in ask(workers, "report", "report", Duration::from_secs(10))? {
        total.heartbeats += v["exchanges"].as_u64().unwrap_or(0);
        total.server_pings += v["server_pings"].as_u64().unwrap_or(0);
        total.answered += v["answered_since_last_report"].as_u64().unwrap_or(0);
    }
    Ok(total)
}

/// Send `cmd` to every worker at once, then collect each one's `reply` line (in the workers' order).
fn ask<'a>(
    workers: impl IntoIterator<Item = &'a mut Child2>,
    cmd: &str,
    reply: &str,
    within: Duration,
) -> anyhow::Result<Vec<Value>> {
    let mut workers: Vec<&mut Child2> = workers.into_iter().collect();
    for w in workers.iter_mut() {
        w.send(cmd)?;
    }
    workers.iter().map(|w| w.expect(reply, within, |v| event(v) == reply)).collect()
}

/// Microsecond latencies as milliseconds, sorted (for [`pct`]).
fn sorted_ms(us: &[u64]) -> Vec<f64> {
    let mut l: Vec<f64> = us.iter().map(|u| *u as f64 / 1000.0).collect();
    l.sort_by(f64::total_cmp);
    l
}

fn detect(
    opts: &Opts,
    server: &mut Server,
    workers: &mut [Child2],
    n: usize,
    out: &mut Value,
    rows: &mut Vec<(String, String)>,
) -> anyhow::Result<()> {
    let m = opts.silent.min(n);
    let timeout = timeout_for(opts);
    // tether: the server's own verdict events; MQTT: a watcher subscribed to the Wills; NATS: closed connections.
    let mut watcher = match opts.target {
        Target::Tether => Verdicts::Events,
        Target::Mosquitto | Target::Rumqttd => Verdicts::Wills(MqttWatcher::connect(server.addr)?),
        Target::Nats => {
            let monitor = server.monitor.context("detect against NATS reads its monitoring endpoint")?;
            Verdicts::Closed(NatsWatcher {
                monitor,
                limit: n + 1000,
                seen: Default::default(),
                queue: Default::default(),
            })
        }
    };
    std::thread::sleep(steady_after(opts.target, opts.heartbeat_interval));
    let per = m.div_ceil(workers.len());
    let mut left = m;
    for w in workers.iter_mut() {
        let share = per.min(left);
        left -= share;
        w.send(&format!("silence {share}"))?;
    }
    let mut last_tx = std::collections::HashMap::new();
    for w in workers.iter() {
        let v = w.expect("silenced", Duration::from_secs(10), |v| event(v) == "silenced")?;
        let ids = v["ids"].as_array().cloned().unwrap_or_default();
        let lasts = v["last_tx_us"].as_array().cloned().unwrap_or_default();
        for (id, t) in ids.iter().zip(lasts.iter()) {
            last_tx.insert(id.as_str().unwrap_or("").to_owned(), t.as_u64().unwrap_or(0));
        }
    }
    let wait = timeout + Duration::from_secs(10) + opts.heartbeat_interval;
    let deadline = Instant::now() + wait;
    let mut lateness = Vec::new();
    let mut false_verdicts = 0;
    let mut declared = std::collections::HashSet::new();
    while declared.len() < m && Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        // A peer's verdict at `at_us`, against its rule's deadline: the client's last frame + `timeout`.
        let late = |(id, at_us): (String, u64)| {
            let deadline_us = last_tx.get(&id).copied().unwrap_or(0) + timeout.as_micros() as u64;
            (id, (at_us as f64 - deadline_us as f64) / 1000.0)
        };
        let verdict: Option<(String, f64)> = match (&mut watcher, server.proc.as_ref()) {
            (Verdicts::Wills(w), _) => w.next_will(left)?.map(late),
            (Verdicts::Closed(w), _) => w.next_stale(left)?.map(late),
            (Verdicts::Events, Some(p)) => match p.lines.recv_timeout(left) {
                Ok(v) if event(&v) == "offline" => {
                    Some((v["client"].as_str().unwrap_or("").to_owned(), v["lateness_ms"].as_f64().unwrap_or(f64::NAN)))
                }
                Ok(_) => continue,
                Err(_) => None,
            },
            (Verdicts::Events, None) => {
                bail!("detect with --server needs the server's events: run it without --server")
            }
        };
        let Some((id, late)) = verdict else { break };
        if last_tx.contains_key(&id) {
            if declared.insert(id) {
                lateness.push(late);
            }
        } else {
            false_verdicts += 1;
        }
    }
    lateness.sort_by(f64::total_cmp);
    out["silenced"] = json!(m);
    out["declared"] = json!(declared.len());
    out["false_verdicts"] = json!(false_verdicts);
    out["timeout_ms"] = json!(timeout.as_millis() as u64);
    out["detection_rule"] = json!(peer::detection_rule(opts.target, opts.heartbeat_interval).0);
    out["lateness_ms_p50"] = json!(ms3(pct(&lateness, 0.5)));
    out["lateness_ms_p99"] = json!(ms3(pct(&lateness, 0.99)));
    out["lateness_ms_max"] = json!(ms3(lateness.last().copied().unwrap_or(f64::NAN)));
    rows.push(("silenced / declared / false verdicts".into(), format!("{m} / {} / {false_verdicts}", declared.len())));
    rows.push((
        "verdict lateness p50 / p99 / max".into(),
        format!(
            "{:.3} / {:.3} / {:.3} ms",
            pct(&lateness, 0.5),
            pct(&lateness, 0.99),
            lateness.last().copied().unwrap_or(f64::NAN)
        ),
    ));
    Ok(())
}

fn storm(
    opts: &Opts,
    server: &mut Server,
    workers: &mut [Child2],
    n: usize,
    out: &mut Value,
    rows: &mut Vec<(String, String)>,
) -> anyhow::Result<()> {
    let Some(old) = server.proc.take() else { bail!("storm restarts the server: run it without --server") };
    let listen = server.addr.to_string();
    drop(old); // SIGKILL: the crash
    let t0 = sys::epoch_us();
    let started = Instant::now();
    let p = spawn_tether(opts, &listen, &[])?;
    p.expect("listening again", Duration::from_secs(10), |v| event(v) == "listening")?;
    server.pid = p.child.id();
    server.proc = Some(p);
    let mut back = std::collections::HashSet::new();
    let mut last_at = t0;
    let deadline = started + Duration::from_secs(120);
    while back.len() < n && Instant::now() < deadline {
        for w in workers.iter() {
            while let Ok(v) = w.lines.try_recv() {
                if event(&v) == "reconnected" && back.insert(v["id"].as_u64().unwrap_or(u64::MAX)) {
                    last_at = last_at.max(v["at_us"].as_u64().unwrap_or(0));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut peak = 0;
    if let Some(p) = &server.proc {
        while let Ok(v) = p.lines.try_recv() {
            if event(&v) == "stats" {
                peak = peak.max(v["peak_handshakes"].as_u64().unwrap_or(0));
            }
        }
        // One more stats line covers the end of the storm.
        if let Ok(v) = p.expect("stats", Duration::from_secs(2), |v| event(v) == "stats") {
            peak = peak.max(v["peak_handshakes"].as_u64().unwrap_or(0));
        }
    }
    let all_back = (last_at.saturating_sub(t0)) as f64 / 1e6;
    out["back"] = json!(back.len());
    out["all_back_s"] = json!(ms3(all_back));
    out["peak_handshakes_in_flight"] = json!(peak);
    rows.push(("clients back after restart".into(), format!("{} of {n}", back.len())));
    rows.push(("all back after".into(), format!("{all_back:.3} s")));
    rows.push(("peak handshakes in flight (cap 512)".into(), peak.to_string()));
    if back.len() < n {
        bail!("only {} of {n} clients came back within 120 s", back.len());
    }
    Ok(())
}

/// How long `detect` waits after the connections are up before it silences some. nats-server's first `PING`
/// to a client comes 1 to 1.2 × min(interval, 2 s) after its `CONNECT` (a timer of its own per connection), or
/// an interval later if that is under one interval: a client silenced before it has answered one is declared
/// by the timer's phase, not one interval after a `PING` it left unanswered. So NATS waits until every client
/// has answered one; the others, as before, one interval (at most 2 s).
fn steady_after(target: Target, interval: Duration) -> Duration {
    match target {
        Target::Nats => interval.min(Duration::from_secs(2)).mul_f64(1.2) + interval + Duration::from_millis(500),
        _ => interval.min(Duration::from_secs(2)),
    }
}

/// Where `detect` hears each verdict.
enum Verdicts {
    /// tether: the owned server's `offline` events, each with its own lateness.
    Events,
    /// Mosquitto, rumqttd: the Wills, at a subscriber.
    Wills(MqttWatcher),
    /// nats-server: its closed connections, from the monitoring endpoint.
    Closed(NatsWatcher),
}

/// nats-server's `Stale Connection` verdicts, polled from `/connz?state=closed`.
struct NatsWatcher {
    monitor: SocketAddr,
    /// How many closed connections to ask for (the server keeps at most 10,000).
    limit: usize,
    /// (name, stop) of the verdicts already queued: each poll returns every closed connection again.
    seen: std::collections::HashSet<(String, u64)>,
    queue: std::collections::VecDeque<(String, u64)>,
}

impl NatsWatcher {
    /// The next connection closed as stale: (its name, epoch µs of its `stop`).
    fn next_stale(&mut self, within: Duration) -> anyhow::Result<Option<(String, u64)>> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(v) = self.queue.pop_front() {
                return Ok(Some(v));
            }
            for c in nats::closed(self.monitor, self.limit)? {
                if c.reason == nats::STALE && self.seen.insert((c.name.clone(), c.stop_us)) {
                    self.queue.push_back((c.name, c.stop_us));
                }
            }
            if self.queue.is_empty() {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(None);
                }
                // The verdict times come from the server: polling more often only adds load.
                std::thread::sleep(left.min(Duration::from_millis(250)));
            }
        }
    }
}

/// An MQTT subscriber to every Will the bench's clients registered.
struct MqttWatcher {
    stream: std::net::TcpStream,
    buf: Vec<u8>,
}

impl MqttWatcher {
    fn connect(addr: SocketAddr) -> anyhow::Result<MqttWatcher> {
        let mut stream = std::net::TcpStream::connect(addr)?;
        stream.write_all(&mqtt::connect("tether-bench-watcher", 600, None))?;
        stream.write_all(&mqtt::subscribe(1, "tether-bench/will/#", 0))?;
        let mut w = MqttWatcher { stream, buf: Vec::new() };
        let mut got_suback = false;
        while !got_suback {
            let (kind, _) = w.next_packet(Duration::from_secs(10))?.context("no SUBACK from the broker")?;
            got_suback = kind == mqtt::SUBACK;
        }
        Ok(w)
    }

    fn next_packet(&mut self, within: Duration) -> anyhow::Result<Option<(u8, Vec<u8>)>> {
        use std::io::Read;
        let deadline = Instant::now() + within;
        loop {
            if let Some((kind, body, used)) = mqtt::split(&self.buf).map_err(anyhow::Error::msg)? {
                let body = body.to_vec();
                self.buf.drain(..used);
                return Ok(Some((kind, body)));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.stream.set_read_timeout(Some(left))?;
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => bail!("the broker closed the watcher"),
                Ok(k) => self.buf.extend_from_slice(&chunk[..k]),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    return Ok(None)
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The next Will delivered: (client id, epoch µs of receipt).
    fn next_will(&mut self, within: Duration) -> anyhow::Result<Option<(String, u64)>> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some((kind, body)) = self.next_packet(left)? else { return Ok(None) };
            if kind == mqtt::PUBLISH {
                if let Some((topic, _)) = mqtt::publish_topic(&body) {
                    if let Some(id) = topic.strip_prefix("tether-bench/will/") {
                        return Ok(Some((id.to_owned(), sys::epoch_us())));
                    }
                }
            }
        }
    }
}

/// Parse a `--source-ip` value.
pub fn parse_ip(s: &str) -> anyhow::Result<IpAddr> {
    s.parse().with_context(|| format!("{s:?} is not an IP address"))
}
