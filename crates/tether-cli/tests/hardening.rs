//! The server process under conditions found from outside: readers of its own output that stall, a
//! file-descriptor limit below its connection limit, its own stall (SIGSTOP) while clients keep pinging, and a
//! storm of devices fighting for one id. Real `tether serve` processes on loopback, real clock; every wait has a
//! deadline, and the load is bounded in count.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{event, PATIENCE};
use serde_json::Value;
use tether::proto::frame::{self, Frame, Hello};
use tether::proto::{Bye, CloseReason};

/// A `tether serve` whose stdout and stderr are pipes: lines are read into channels by threads, or, with
/// `stall`, left unread after the first stdout line (the listening event) so that the pipes fill up.
struct Server {
    child: Child,
    addr: SocketAddr,
    /// Kept open and unread when stalled: the pipes stay full instead of breaking.
    _unread: Vec<Box<dyn Read + Send>>,
    out: Option<mpsc::Receiver<Value>>,
    err: Option<mpsc::Receiver<String>>,
}

impl Server {
    /// `tether serve ARGS` under `sh -c 'ulimit ...; exec ...'` when `ulimit` is given; with `--events json`
    /// unless ARGS has `--human` (events as log lines), and `RUST_LOG=info`, or `debug` with `--debug-log`.
    fn start(args: &[&str], ulimit: Option<&str>, stall: bool) -> Server {
        let bin = env!("CARGO_BIN_EXE_tether");
        let mut cmd = match ulimit {
            Some(u) => {
                let mut c = Command::new("sh");
                c.args(["-c", &format!("{u} && exec \"$0\" \"$@\""), bin]);
                c
            }
            None => Command::new(bin),
        };
        let mut child = cmd
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(if args.contains(&"--human") { &[][..] } else { &["--events", "json"][..] })
            .args(args.iter().filter(|a| !["--human", "--debug-log"].contains(*a)))
            // `--debug-log`: every close is also a log line on stderr (they are DEBUG), so stderr fills too.
            .env("RUST_LOG", if args.contains(&"--debug-log") { "debug" } else { "info" })
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tether serve");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let addr = if args.contains(&"--human") {
            // Human mode: events are log lines on stderr; the address is in "listening on ADDR".
            loop {
                let mut line = String::new();
                assert!(stderr.read_line(&mut line).expect("stderr") > 0, "no listening line");
                // "listening on ADDR; admin API and dashboard on http://…/"
                if let Some(a) = line.trim_end().split("listening on ").nth(1) {
                    break a.split(';').next().unwrap().parse().unwrap();
                }
            }
        } else {
            let mut first = String::new();
            stdout.read_line(&mut first).expect("the listening event");
            let listening: Value = serde_json::from_str(&first).unwrap();
            assert_eq!(event(&listening), "listening");
            listening["addr"].as_str().unwrap().parse().unwrap()
        };
        if stall {
            return Server { child, addr, _unread: vec![Box::new(stdout), Box::new(stderr)], out: None, err: None };
        }
        let (otx, orx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                let _ = otx.send(serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")));
            }
        });
        let (etx, erx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                let _ = etx.send(line);
            }
        });
        Server { child, addr, _unread: Vec::new(), out: Some(orx), err: Some(erx) }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child with a valid signal number.
        assert_eq!(unsafe { libc::kill(self.child.id() as libc::pid_t, sig) }, 0);
    }

    /// The first stderr line containing `needle`, within `patience`.
    fn log_line(&self, needle: &str, patience: Duration) -> Option<String> {
        let rx = self.err.as_ref().expect("stderr is read");
        let deadline = Instant::now() + patience;
        loop {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(l) if l.contains(needle) => return Some(l),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    }

    /// Every stdout event so far.
    fn events(&self) -> Vec<Value> {
        self.out.as_ref().expect("stdout is read").try_iter().collect()
    }

    /// The first stdout event satisfying `pred`, within [`PATIENCE`].
    fn expect(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let rx = self.out.as_ref().expect("stdout is read");
        let deadline = Instant::now() + PATIENCE;
        loop {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(v) if pred(&v) => return v,
                Ok(_) => continue,
                Err(_) => panic!("no event: {what}"),
            }
        }
    }

    /// Resident memory, in KiB.
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A raw v1 peer on a blocking socket.
struct Peer {
    s: TcpStream,
}

impl Peer {
    fn connect(addr: SocketAddr) -> Peer {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.set_nodelay(true).unwrap();
        Peer { s }
    }

    fn send(&mut self, f: &Frame) -> std::io::Result<()> {
        self.s.write_all(&f.to_bytes())
    }

    fn hello(&mut self, id: &str, nonce: u64) {
        self.send(&Frame::Hello(Hello::new(frame::V1, id, nonce))).expect("send HELLO");
    }

    /// The next frame; `None` on end of stream, an error, or the read timeout.
    fn next(&mut self) -> Option<Frame> {
        let mut header = [0u8; 4];
        self.s.read_exact(&mut header).ok()?;
        let len = u32::from_be_bytes(header) as usize;
        assert!((1..=frame::DEFAULT_MAX_FRAME as usize).contains(&len), "bad length {len}");
        let mut whole = header.to_vec();
        whole.resize(4 + len, 0);
        self.s.read_exact(&mut whole[4..]).ok()?;
        Some(Frame::parse(&whole).expect("a frame the server sent"))
    }

    /// Still connected and answered: read what waits (PONGs, the server's own PINGs, no BYE) up to the answer to
    /// one more `PING`.
    fn still_answered(&mut self, i: usize) {
        self.s.set_nonblocking(false).unwrap();
        self.send(&Frame::Ping { seq: 9999, ts_ms: 0 }).expect("still connected");
        loop {
            match self.next() {
                Some(Frame::Pong { seq: 9999, .. }) => break,
                Some(Frame::Pong { .. }) | Some(Frame::Ping { .. }) => continue,
                other => panic!("client p{i} got {other:?}"),
            }
        }
    }

    /// The answer to `HELLO`: `Ok` for `WELCOME`, the `BYE` otherwise.
    fn answer(&mut self) -> Result<(), Bye> {
        match self.next() {
            Some(Frame::Welcome(_)) => Ok(()),
            Some(Frame::Bye(b)) => Err(b),
            other => panic!("expected WELCOME or BYE, got {other:?} (the server is not answering)"),
        }
    }
}

/// A stalled reader of the server's events and logs must never freeze it. The freeze was a race (about 1 run in
/// 12 froze), so the case runs many times: each run fills both pipes with short connections that leave without
/// `BYE` (an `online` and an `offline` event and a log line each), checking that every newcomer is welcomed in
/// time, and then that a silent client is still judged on time.
#[test]
fn a_stalled_reader_of_events_and_logs_never_freezes_the_server() {
    const RUNS: usize = 8;
    const PER_THREAD: usize = 250;
    let mut growth = Vec::new();
    for run in 0..RUNS {
        let srv = Server::start(
            &["--debug-log", "--heartbeat-interval", "200ms", "--heartbeat-timeout", "600ms", "--event-buffer", "1024"],
            None,
            true,
        );
        let addr = srv.addr;
        let rss_before = srv.rss_kib();
        let workers: Vec<_> = (0..4)
            .map(|t| {
                std::thread::spawn(move || {
                    for i in 0..PER_THREAD {
                        let mut p = Peer::connect(addr);
                        p.hello(&format!("r{run}-t{t}-{i}"), (t * PER_THREAD + i) as u64);
                        assert_eq!(p.answer(), Ok(()), "run {run}: connection {i} of thread {t} refused");
                        // Leaves without BYE: offline (eof), and a DEBUG line on stderr.
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().expect("every newcomer was welcomed in time");
        }
        // Still judging: a client that goes silent is declared dead within its 600 ms timeout.
        let mut silent = Peer::connect(addr);
        silent.hello("silent", 1);
        assert_eq!(silent.answer(), Ok(()));
        let started = Instant::now();
        let bye = loop {
            match silent.next() {
                Some(Frame::Ping { .. }) => continue,
                Some(Frame::Bye(b)) => break b,
                other => panic!("run {run}: expected the verdict, got {other:?}"),
            }
        };
        assert_eq!(bye.reason, CloseReason::HeartbeatTimeout, "run {run}");
        assert!(started.elapsed() < Duration::from_secs(3), "run {run}: verdict after {:?}", started.elapsed());
        growth.push(srv.rss_kib().saturating_sub(rss_before));
    }
    // 1,000 short connections each: memory grows by a bounded amount (the 1,024-event buffer and the bounded
    // log queue), not by 175 bytes per event forever.
    let worst = growth.iter().max().unwrap();
    eprintln!("RSS growth per run (KiB): {growth:?}");
    assert!(*worst < 32 * 1024, "RSS grew {worst} KiB in one run");
}

/// With a soft limit of 64 descriptors and the default 10,000-connection limit, the server works out how many
/// connections it can really hold, says so, and answers everyone beyond that with `BYE(busy)` at once, even
/// when a burst exhausts its descriptors: nobody is left hanging in the backlog.
#[test]
fn at_the_descriptor_limit_newcomers_hear_busy_instead_of_hanging() {
    let srv = Server::start(&["--handshake-timeout", "30s"], Some("ulimit -n 64"), false);
    let line = srv.log_line("connection capacity", PATIENCE).expect("the capacity is logged at start");
    let capacity: usize =
        line.split("connection capacity ").nth(1).unwrap().split(':').next().unwrap().parse().unwrap();
    assert!((20..64).contains(&capacity), "{line}");
    assert!(srv.log_line("more than the file descriptor limit allows", PATIENCE).is_some());
    // One at a time: exactly `capacity` are welcomed, the rest told busy, each at once.
    let mut held = Vec::new();
    let (mut welcomed, mut busy) = (0, 0);
    for i in 0..capacity + 20 {
        let mut p = Peer::connect(srv.addr);
        p.hello(&format!("c{i}"), i as u64);
        match p.answer() {
            Ok(()) => {
                welcomed += 1;
                held.push(p);
            }
            Err(b) => {
                assert_eq!(b.reason, CloseReason::Busy);
                assert!(b.retry_after_ms >= 1000);
                busy += 1;
            }
        }
    }
    assert_eq!((welcomed, busy), (capacity, 20));
    // A burst of 60 at once, while the server is full: every one is answered busy, none waits unanswered.
    let burst: Vec<TcpStream> = (0..60).map(|_| Peer::connect(srv.addr).s).collect();
    for s in burst {
        let mut p = Peer { s };
        let _ = p.send(&Frame::Ping { seq: 0, ts_ms: 0 });
        match p.next() {
            Some(Frame::Bye(b)) => assert_eq!(b.reason, CloseReason::Busy),
            // Refused with the reserved descriptor while out of descriptors: BYE written at once, then closed.
            other => panic!("a newcomer got {other:?} instead of BYE(busy)"),
        }
    }
    // The connections held were never disturbed, and a freed slot is usable again.
    drop(held.pop());
    let mut p = Peer::connect(srv.addr);
    p.hello("after", 1);
    // The freed slot may take a moment to be released by the server: retry while it says busy.
    let deadline = Instant::now() + PATIENCE;
    while let Err(b) = p.answer() {
        assert_eq!(b.reason, CloseReason::Busy);
        assert!(Instant::now() < deadline, "the freed slot never came back");
        p = Peer::connect(srv.addr);
        p.hello("after", 1);
    }
    assert!(srv.events().iter().all(|e| e["reason"] != "protocol_error"));
}

/// A service started with a low soft limit (1,024 is the common default) gets the hard limit.
#[test]
fn the_soft_descriptor_limit_is_raised_to_the_hard_limit() {
    let hard = tether::fdlimit::fd_limit().unwrap().hard;
    let srv = Server::start(&[], Some("ulimit -S -n 64"), false);
    assert!(srv.log_line(&format!("file descriptor limit raised from 64 to {hard}"), PATIENCE).is_some());
    let line = srv.log_line("connection capacity", PATIENCE).unwrap();
    assert!(line.contains(&format!("file descriptor limit {hard}")), "{line}");
}

/// `n` clients `p0`..`p{n-1}`, each welcomed, with non-blocking sockets (their answers wait unread).
fn welcomed_nonblocking(addr: SocketAddr, n: u64) -> Vec<Peer> {
    (0..n)
        .map(|i| {
            let mut p = Peer::connect(addr);
            p.hello(&format!("p{i}"), i);
            assert_eq!(p.answer(), Ok(()));
            p.s.set_nonblocking(true).unwrap();
            p
        })
        .collect()
}

/// The server is stopped for 2 s while 50 clients keep pinging every 200 ms: on resume it reads about ten `PING`s
/// from each at once. That is its own stall, not their flood: nobody is cut off, everybody gets answers.
#[test]
fn a_stalled_server_does_not_blame_its_clients_for_the_pings_it_did_not_read() {
    let srv = Server::start(&["--heartbeat-interval", "200ms", "--heartbeat-timeout", "10s"], None, false);
    let mut peers = welcomed_nonblocking(srv.addr, 50);
    let ping_all = |peers: &mut Vec<Peer>, seq: u32| {
        for p in peers.iter_mut() {
            p.send(&Frame::Ping { seq, ts_ms: 0 }).expect("send PING");
        }
    };
    let start = Instant::now();
    let mut seq = 0;
    let mut stopped = false;
    let mut resumed = false;
    while start.elapsed() < Duration::from_secs(5) {
        let t = start.elapsed();
        if !stopped && t >= Duration::from_secs(1) {
            srv.signal(libc::SIGSTOP);
            stopped = true;
        }
        if stopped && !resumed && t >= Duration::from_secs(3) {
            srv.signal(libc::SIGCONT);
            resumed = true;
        }
        ping_all(&mut peers, seq);
        seq += 1;
        // Pace the loop: the pings are the load under test, not a synchronisation.
        std::thread::sleep(Duration::from_millis(200));
    }
    // Everyone is still connected and answered: read what is waiting, expect PONGs and no BYE.
    peers.iter_mut().enumerate().for_each(|(i, p)| p.still_answered(i));
    let floods = srv.events().into_iter().filter(|e| e["reason"] == "ping_flood").count();
    assert_eq!(floods, 0);
}

/// Clients that ping on a fixed timer, answered or not (the field's heartbeat threads do), while the server is
/// stopped for 6 s and then for 20 s against a 1 s / 3 s heartbeat: on each resume it reads six, then twenty
/// `PING`s from each at once. None of them earns a verdict; the one client that fell silent with the first stall
/// earns `heartbeat_timeout`, and a client that floods back-to-back `PING`s afterwards is still cut.
#[test]
fn a_stalled_server_convicts_no_fixed_timer_pinger_after_6_or_20_s() {
    let srv = Server::start(&["--heartbeat-interval", "1s", "--heartbeat-timeout", "3s"], None, false);
    let mut peers = welcomed_nonblocking(srv.addr, 200);
    // (stop at, resume at) in seconds from the start; the pinging ends 3 s after the last resume.
    let stalls = [(2, 8), (11, 31)];
    let start = Instant::now();
    let mut next_ping = Duration::ZERO;
    let mut seq = 0;
    for (stop, resume) in stalls {
        for (at, sig) in [(stop, libc::SIGSTOP), (resume, libc::SIGCONT)] {
            while start.elapsed() < Duration::from_secs(at) {
                if start.elapsed() >= next_ping {
                    // p0 falls silent with the first stall; everyone else pings once a second, whatever happens.
                    let pinging = if seq < 2 { &mut peers[..] } else { &mut peers[1..] };
                    for p in pinging {
                        p.send(&Frame::Ping { seq, ts_ms: u64::from(seq) * 1000 }).expect("send PING");
                    }
                    seq += 1;
                    next_ping += Duration::from_secs(1);
                }
                // Pace the loop: the pings are the load under test, not a synchronisation.
                std::thread::sleep(Duration::from_millis(20));
            }
            srv.signal(sig);
        }
    }
    let silent = srv.expect("p0's verdict", |e| event(e) == "offline" && e["client"] == "p0");
    assert_eq!(silent["reason"], "heartbeat_timeout", "{silent}");
    // Everyone else is still connected and answered: read what is waiting, expect PONGs and no BYE.
    peers.iter_mut().enumerate().skip(1).for_each(|(i, p)| p.still_answered(i));
    let verdicts: Vec<Value> = srv.events().into_iter().filter(|e| event(e) == "offline").collect();
    assert!(verdicts.is_empty(), "{} verdicts, the first {:?}", verdicts.len(), verdicts.first());
    // A flood is still a flood.
    let mut f = Peer::connect(srv.addr);
    f.hello("flooder", 1);
    assert_eq!(f.answer(), Ok(()));
    let burst: Vec<u8> = (0..100).flat_map(|seq| Frame::Ping { seq, ts_ms: 0 }.to_bytes()).collect();
    let _ = f.s.write_all(&burst);
    let cut = srv.expect("the flooder's verdict", |e| event(e) == "offline" && e["client"] == "flooder");
    assert_eq!(cut["reason"], "ping_flood", "{cut}");
}

/// Ten live devices configured with one id, each reconnecting the moment it is evicted or refused and pinging
/// while it holds the id. Each takes the id over once (it could have been a rebooted device); after that, all
/// are refused with `id_conflict` while the holder is alive, for any number of devices. The log summarises the
/// storm per client instead of writing a line per refusal.
#[test]
fn ten_devices_fighting_for_one_id_take_turns_and_the_log_summarises_the_storm() {
    // Human event lines on stderr: the log is where a storm would flood. A 1 s interval: the holder counts as alive
    // while heard from within 1.5 s, with room for a loaded machine; the devices ping every 400 ms, inside their
    // allowance (5 + 2, two more per second).
    let srv = Server::start(&["--human", "--heartbeat-interval", "1s", "--heartbeat-timeout", "5s"], None, false);
    let addr = srv.addr;
    let storm = Duration::from_secs(3);
    let devices: Vec<_> = (0..10u64)
        .map(|d| {
            std::thread::spawn(move || {
                let started = Instant::now();
                let (mut welcomes, mut conflicts) = (0, 0);
                while started.elapsed() < storm {
                    let mut p = Peer::connect(addr);
                    p.hello("shared", 1000 + d);
                    match p.answer() {
                        Ok(()) => {
                            welcomes += 1;
                            // Hold it, pinging, until evicted.
                            p.s.set_read_timeout(Some(Duration::from_millis(400))).unwrap();
                            let mut seq = 0;
                            while started.elapsed() < storm {
                                match p.next() {
                                    Some(Frame::Bye(_)) => break,
                                    Some(_) => {}
                                    None => {
                                        seq += 1;
                                        if p.send(&Frame::Ping { seq, ts_ms: 0 }).is_err() {
                                            break;
                                        }
                                    }
                                }
                            }
                        }
                        Err(b) => {
                            assert_eq!(b.reason, CloseReason::IdConflict);
                            conflicts += 1;
                        }
                    }
                }
                (welcomes, conflicts)
            })
        })
        .collect();
    let (mut welcomes, mut conflicts) = (0, 0);
    for d in devices {
        let (w, c) = d.join().unwrap();
        welcomes += w;
        conflicts += c;
    }
    eprintln!("{welcomes} holder changes and {conflicts} refusals in {storm:?}");
    assert!(welcomes <= 10, "{welcomes} holder changes: the devices kept evicting each other");
    assert!(conflicts > 100, "the devices kept trying: {conflicts}");
    // The log: a few lines per kind and client, then one summary when the 10 s window ends.
    let rx = srv.err.as_ref().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut conflict_lines = 0;
    let summary = loop {
        let line = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).expect("a summary line");
        if line.contains("id_conflict") && line.contains("one by one") {
            break line;
        }
        conflict_lines += usize::from(line.contains("id_conflict"));
    };
    assert!(summary.contains("more in 10s"), "{summary}");
    assert!(conflict_lines <= 10, "{conflict_lines} id_conflict log lines for {conflicts} refusals");
}

/// Events say who decided: a client that judged the server silent and left, against the server's own verdict.
#[test]
fn events_say_who_decided() {
    let srv = Server::start(&["--heartbeat-interval", "200ms", "--heartbeat-timeout", "600ms"], None, false);
    let mut p = Peer::connect(srv.addr);
    p.hello("leaver", 1);
    assert_eq!(p.answer(), Ok(()));
    let bye = Bye { reason: CloseReason::HeartbeatTimeout, retry_after_ms: 0, alternative: String::new() };
    p.send(&Frame::Bye(bye)).unwrap();
    let off = srv.expect("offline", |e| event(e) == "offline");
    assert_eq!((off["reason"].as_str(), off["by"].as_str()), (Some("heartbeat_timeout"), Some("client")));
    // And one the server judged.
    let mut q = Peer::connect(srv.addr);
    q.hello("silent", 2);
    assert_eq!(q.answer(), Ok(()));
    let off = srv.expect("offline", |e| event(e) == "offline" && e["client"] == "silent");
    assert_eq!((off["reason"].as_str(), off["by"].as_str()), (Some("heartbeat_timeout"), Some("server")));
}

/// Without `--events json`, events are human lines in the log (written by a task: the log never blocks), with
/// who decided.
#[test]
fn human_event_lines_go_to_the_log() {
    let srv = Server::start(&["--human", "--heartbeat-interval", "200ms", "--heartbeat-timeout", "600ms"], None, false);
    let mut p = Peer::connect(srv.addr);
    p.hello("human", 1);
    assert_eq!(p.answer(), Ok(()));
    assert!(srv.log_line("online  human from 127.0.0.1:", PATIENCE).is_some());
    drop(p);
    let line = srv.log_line("offline human from 127.0.0.1:", PATIENCE).expect("the offline line");
    assert!(line.contains("eof by the client"), "{line}");
}
