//! The admin port cannot take the devices' CPU: a real `tether serve` process, its admin listener hammered at full
//! tilt by keep-alive clients asking for the largest answers it gives, while healthy devices ping on time and
//! newcomers connect. Real clock, so it is ignored by default (the attribute says why) and run alone in the serial "fault lab" step of
//! `scripts/test`: beside other tests its timings mean nothing. Every wait has a deadline; the load is bounded in
//! count and time (about 15 s in all).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{event, serve_with_admin, Proc};
use tether::proto::frame::{self, Frame, Hello};

/// Closed connections kept by the server and asked for in one request: about 2 MB of JSON.
const HISTORY: usize = 10_000;
const HEALTHY: usize = 30;
const ABUSERS: usize = 32;
const HEARTBEAT: Duration = Duration::from_millis(500);
const ABUSE: Duration = Duration::from_secs(6);
/// Newcomers timed before the abuse and during it.
const NEWCOMERS: usize = 20;
/// The slowest `WELCOME` allowed under abuse. Without abuse it is a few milliseconds on loopback.
const WELCOME_BOUND: Duration = Duration::from_millis(100);
/// How long a newcomer waits for `WELCOME` (far beyond the bound; keeps a failing run short).
const WELCOME_PATIENCE: Duration = Duration::from_secs(1);

/// Lower this thread's priority (nice 19): the test's own abusers must not take the CPU the server's devices and
/// the healthy clients need, or the test would measure itself.
fn nice_this_thread() {
    // SAFETY: setpriority(2) on this thread's own id.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19) };
    assert_eq!(rc, 0, "setpriority");
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

fn hello(s: &mut TcpStream, id: &str) {
    s.write_all(&Frame::Hello(Hello::new(frame::V1, id, 1)).to_bytes()).expect("send HELLO");
}

/// The next frame; `None` on end of stream, an error or the read timeout.
fn next_frame(s: &mut TcpStream) -> Option<Frame> {
    let mut header = [0u8; 4];
    s.read_exact(&mut header).ok()?;
    let len = u32::from_be_bytes(header) as usize;
    let mut whole = header.to_vec();
    whole.resize(4 + len, 0);
    s.read_exact(&mut whole[4..]).ok()?;
    Some(Frame::parse(&whole).expect("a frame the server sent"))
}

/// Connect as `id` and time `HELLO` to `WELCOME`; a newcomer not welcomed within [`WELCOME_PATIENCE`] counts as
/// that long.
fn time_welcome(addr: SocketAddr, id: &str) -> Duration {
    let mut s = connect(addr);
    s.set_read_timeout(Some(WELCOME_PATIENCE)).unwrap();
    let started = Instant::now();
    hello(&mut s, id);
    match next_frame(&mut s) {
        Some(Frame::Welcome(_)) => started.elapsed(),
        other => {
            println!("{id}: no WELCOME but {other:?} after {:?}", started.elapsed());
            started.elapsed().max(WELCOME_PATIENCE)
        }
    }
}

/// Up to `count` newcomers one after another, `pace` apart, until `until`; their `WELCOME` times, sorted.
fn newcomers(addr: SocketAddr, prefix: &str, count: usize, pace: Duration, until: Instant) -> Vec<Duration> {
    let mut times = Vec::new();
    while times.len() < count && Instant::now() < until {
        times.push(time_welcome(addr, &format!("{prefix}-{}", times.len())));
        // Pacing, not synchronisation: spread the newcomers over the abuse.
        std::thread::sleep(pace);
    }
    times.sort();
    times
}

/// One keep-alive HTTP/1.1 connection to the admin listener.
struct Http {
    r: BufReader<TcpStream>,
    host: String,
}

impl Http {
    fn connect(addr: SocketAddr) -> Http {
        let s = connect(addr);
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        Http { r: BufReader::new(s), host: addr.to_string() }
    }

    /// `GET path`: the status and the body (the admin API always sends `Content-Length`).
    fn get(&mut self, path: &str) -> (u16, Vec<u8>) {
        self.try_get(path).expect("an answer")
    }

    fn try_get(&mut self, path: &str) -> std::io::Result<(u16, Vec<u8>)> {
        let req = format!("GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n", self.host);
        self.r.get_mut().write_all(req.as_bytes())?;
        let mut line = String::new();
        self.r.read_line(&mut line)?;
        let status = line.split(' ').nth(1).and_then(|s| s.parse().ok());
        let status = status.ok_or_else(|| std::io::Error::other(format!("not a status line: {line:?}")))?;
        let mut len = None;
        loop {
            line.clear();
            self.r.read_line(&mut line)?;
            if line == "\r\n" || line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse::<usize>().ok();
                }
            }
        }
        let mut body = vec![0; len.ok_or_else(|| std::io::Error::other("no Content-Length"))?];
        self.r.read_exact(&mut body)?;
        Ok((status, body))
    }
}

/// The sum of a Prometheus counter over its labels.
fn metric_sum(admin: SocketAddr, name: &str) -> f64 {
    let (status, body) = Http::connect(admin).get("/metrics");
    assert_eq!(status, 200);
    String::from_utf8(body)
        .unwrap()
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// CPU time (user + system) the process has used, from `/proc/PID/stat`.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("the server's stat");
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    // After the command: state is field 3, utime 14 and stime 15 (1-based), in clock ticks.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf with a valid name.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_micros(ticks * 1_000_000 / hz)
}

/// Fill the server's history of closed connections: `HISTORY` short connections (a `HELLO`, then gone), from a
/// few threads; returns once the server counted them all.
fn fill_history(addr: SocketAddr, admin: SocketAddr) {
    const THREADS: usize = 4;
    let fillers: Vec<_> = (0..THREADS)
        .map(|t| {
            std::thread::spawn(move || {
                for i in 0..HISTORY / THREADS {
                    let mut s = connect(addr);
                    hello(&mut s, &format!("gone-{t}-{i}-with-a-longer-id-as-devices-have"));
                    assert!(matches!(next_frame(&mut s), Some(Frame::Welcome(_))));
                }
            })
        })
        .collect();
    for f in fillers {
        f.join().expect("a filler");
    }
    let deadline = Instant::now() + common::PATIENCE;
    while metric_sum(admin, "tether_disconnects_total") < HISTORY as f64 {
        assert!(Instant::now() < deadline, "the server did not count {HISTORY} disconnects");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `HEALTHY` devices pinging every `HEARTBEAT` until `stop`; returns the frames they saw that were not `PONG` or
/// `PING` (a `BYE` would be a verdict against one).
fn healthy_devices(addr: SocketAddr, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<String>> {
    let mut peers: Vec<(TcpStream, Vec<u8>)> = (0..HEALTHY)
        .map(|i| {
            let mut s = connect(addr);
            hello(&mut s, &format!("healthy-{i}"));
            assert!(matches!(next_frame(&mut s), Some(Frame::Welcome(_))), "healthy-{i} not welcomed");
            s.set_nonblocking(true).unwrap();
            (s, Vec::new())
        })
        .collect();
    std::thread::spawn(move || {
        let mut odd = Vec::new();
        let mut seq = 0;
        let mut next = Instant::now();
        let mut buf = [0u8; 4096];
        while !stop.load(Ordering::Relaxed) {
            for (i, (s, pending)) in peers.iter_mut().enumerate() {
                if s.write_all(&Frame::Ping { seq, ts_ms: 0 }.to_bytes()).is_err() {
                    odd.push(format!("healthy-{i}: its connection is gone"));
                }
                // Read what came (PONGs, the server's PINGs) without waiting, and take the whole frames.
                while let Ok(n @ 1..) = s.read(&mut buf) {
                    pending.extend_from_slice(&buf[..n]);
                }
                while pending.len() >= 4 {
                    let len = 4 + u32::from_be_bytes(pending[..4].try_into().unwrap()) as usize;
                    if pending.len() < len {
                        break;
                    }
                    match Frame::parse(&pending[..len]).expect("a frame the server sent") {
                        Frame::Pong { .. } => {}
                        Frame::Ping { seq, .. } => {
                            let _ = s.write_all(&Frame::Pong { seq, ts_ms: 0 }.to_bytes());
                        }
                        other => odd.push(format!("healthy-{i}: {other:?}")),
                    }
                    pending.drain(..len);
                }
            }
            seq += 1;
            // Pacing: one PING per heartbeat interval, on schedule however long the round took.
            next += HEARTBEAT;
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
        odd
    })
}

/// `ABUSERS` keep-alive connections, niced, each asking in a loop for the whole history (most of them), the
/// metrics or the first sessions page. Counts the answers in `answers`; returns the threads and their sockets,
/// which the caller shuts down to stop them at once (instead of waiting for the answers queued).
fn abuse(admin: SocketAddr, answers: Arc<AtomicU64>) -> Vec<(std::thread::JoinHandle<()>, TcpStream)> {
    (0..ABUSERS)
        .map(|i| {
            let answers = answers.clone();
            let mut http = Http::connect(admin);
            let socket = http.r.get_ref().try_clone().unwrap();
            let thread = std::thread::spawn(move || {
                nice_this_thread();
                let path = match i % 8 {
                    0 => "/metrics",
                    1 => "/v1/sessions?limit=1000",
                    _ => "/v1/disconnects?limit=10000",
                };
                // Until the caller shuts the socket down.
                while let Ok((status, _)) = http.try_get(path) {
                    assert_eq!(status, 200, "{path}");
                    answers.fetch_add(1, Ordering::Relaxed);
                }
            });
            (thread, socket)
        })
        .collect()
}

/// The server's verdicts against the healthy devices (their own leaving at the end is theirs, not a verdict).
fn verdicts_against_healthy(srv: &Proc) -> Vec<String> {
    srv.drain()
        .into_iter()
        .filter(|e| event(e) == "offline" && e["by"] == "server")
        .filter(|e| e["client"].as_str().is_some_and(|c| c.starts_with("healthy-")))
        .map(|e| e.to_string())
        .collect()
}

#[test]
#[ignore = "CPU-timing-sensitive: run alone (scripts/test, fault lab step)"]
fn admin_abuse_at_full_tilt_leaves_devices_their_cpu() {
    let (srv, addr, admin) = serve_with_admin(&[
        "--heartbeat-interval",
        "500ms",
        "--heartbeat-timeout",
        "1500ms",
        "--disconnect-history",
        &HISTORY.to_string(),
    ]);
    let (addr, admin): (SocketAddr, SocketAddr) = (addr.parse().unwrap(), admin.parse().unwrap());
    let pid = srv.child.id();
    fill_history(addr, admin);

    // The cost of the heaviest request, alone.
    let mut http = Http::connect(admin);
    let (_, body) = http.get("/v1/disconnects?limit=10000");
    let before = cpu_time(pid);
    const ROUNDS: u32 = 5;
    for _ in 0..ROUNDS {
        http.get("/v1/disconnects?limit=10000");
    }
    let one = (cpu_time(pid) - before) / ROUNDS;
    println!("GET /v1/disconnects?limit=10000: {} bytes, {one:?} of server CPU each", body.len());
    assert!(body.len() > 1_000_000, "the answer is large: {} bytes", body.len());

    let stop = Arc::new(AtomicBool::new(false));
    let healthy = healthy_devices(addr, stop.clone());
    // The usual latency, without abuse.
    let calm = newcomers(addr, "calm", NEWCOMERS, Duration::from_millis(20), Instant::now() + common::PATIENCE);
    println!("WELCOME without abuse: median {:?}, slowest {:?}", calm[calm.len() / 2], calm[calm.len() - 1]);

    let cpu_before = cpu_time(pid);
    let started = Instant::now();
    let answers = Arc::new(AtomicU64::new(0));
    let abusers = abuse(admin, answers.clone());
    let pace = ABUSE / NEWCOMERS as u32;
    let busy = newcomers(addr, "busy", NEWCOMERS, pace, started + ABUSE);
    while started.elapsed() < ABUSE {
        std::thread::sleep(Duration::from_millis(50));
    }
    let cpu = cpu_time(pid) - cpu_before;
    let window = started.elapsed();
    for (thread, socket) in abusers {
        let _ = socket.shutdown(std::net::Shutdown::Both);
        thread.join().expect("an abuser");
    }
    stop.store(true, Ordering::Relaxed);
    let odd = healthy.join().expect("the healthy devices");
    println!(
        "under abuse: {} admin answers, server CPU {:.0}% of one core over {window:?}; WELCOME median {:?}, \
         slowest {:?}",
        answers.load(Ordering::Relaxed),
        cpu.as_secs_f64() / window.as_secs_f64() * 100.0,
        busy[busy.len() / 2],
        busy[busy.len() - 1]
    );
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let peak = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap_or_default();
    println!("server's peak resident memory: {}", peak.trim_start_matches("VmHWM:").trim());
    let verdicts = verdicts_against_healthy(&srv);
    println!("verdicts against the {HEALTHY} healthy devices: {}", verdicts.len());
    assert!(verdicts.is_empty(), "healthy devices were judged: {verdicts:#?}");
    assert!(odd.is_empty(), "healthy devices saw: {odd:#?}");
    assert!(
        busy[busy.len() - 1] < WELCOME_BOUND,
        "WELCOME took up to {:?} under admin abuse (without: up to {:?})",
        busy[busy.len() - 1],
        calm[calm.len() - 1]
    );
}
