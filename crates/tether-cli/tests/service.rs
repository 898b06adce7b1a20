//! `tether serve`'s shutdown as an operator sees it: an idle server's prompt exit, and the log lines of a busy
//! shutdown (what it waits for, the longest it will wait, how it ended). Real processes on loopback, real clock;
//! every wait has a deadline.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tether::proto::frame::{self, Frame, Hello};
use tether_bench::redis::Redis;

const PATIENCE: Duration = Duration::from_secs(20);

/// A `tether serve` with JSON events on stdout (read into `out`) and its info log on stderr (read into `err`).
struct Serve {
    child: Child,
    out: mpsc::Receiver<Value>,
    err: mpsc::Receiver<String>,
    /// Every stderr line read so far, for failure messages.
    seen: Vec<String>,
}

impl Serve {
    /// `tether serve --listen 127.0.0.1:0 --events json --insecure-no-auth ARGS`, told about `notify` (a path,
    /// or `@name`) through `$NOTIFY_SOCKET` when given, and not told otherwise.
    fn start(notify: Option<&str>, args: &[&str]) -> Serve {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tether"));
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--events", "json", "--insecure-no-auth"]).args(args);
        match notify {
            Some(n) => cmd.env("NOTIFY_SOCKET", n),
            None => cmd.env_remove("NOTIFY_SOCKET"),
        };
        let mut child = cmd
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tether serve");
        let out = lines(child.stdout.take().unwrap(), |l| serde_json::from_str(&l).expect("a JSON event"));
        let err = lines(child.stderr.take().unwrap(), |l| l);
        Serve { child, out, err, seen: Vec::new() }
    }

    /// The first event satisfying `pred` within [`PATIENCE`].
    fn event(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            match self.out.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(v) if pred(&v) => return v,
                Ok(_) => continue,
                Err(_) => panic!("no event: {what}"),
            }
        }
    }

    /// The first log line containing `text` within `patience`.
    fn log_line(&mut self, text: &str, patience: Duration) -> String {
        let deadline = Instant::now() + patience;
        loop {
            match self.err.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(l) if l.contains(text) => return l,
                Ok(l) => self.seen.push(l),
                Err(_) => panic!("no log line with {text:?} within {patience:?}; saw:\n{}", self.seen.join("\n")),
            }
        }
    }

    fn signal(&self, sig: libc::c_int) -> Instant {
        // SAFETY: kill(2) with our own child's pid and a valid signal number.
        assert_eq!(unsafe { libc::kill(self.child.id() as libc::pid_t, sig) }, 0);
        Instant::now()
    }

    /// How long after `since` the process exited (successfully), polled every millisecond; fails after `bound`.
    fn exited_within(&mut self, since: Instant, bound: Duration) -> Duration {
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                let took = since.elapsed();
                assert!(st.success(), "tether serve exited with {st}");
                return took;
            }
            assert!(since.elapsed() < bound, "tether serve still running {bound:?} after the signal");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Lines of `r`, mapped by `f`, read by a thread into a channel.
fn lines<T: Send + 'static>(r: impl Read + Send + 'static, f: fn(String) -> T) -> mpsc::Receiver<T> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if tx.send(f(line)).is_err() {
                break;
            }
        }
    });
    rx
}

/// A raw client that sends `HELLO` and never reads (so it never answers the server's `BYE` either).
fn mute_client(addr: &str, id: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.write_all(&Frame::Hello(Hello::new(frame::V1, id, 7)).to_bytes()).unwrap();
    s
}

/// A server started with `args`, and three clients that said `HELLO` (online) and never read.
fn serving_mute_clients(args: &[&str]) -> (Serve, Vec<TcpStream>) {
    let srv = Serve::start(None, args);
    let addr = srv.event("listening", |v| v["event"] == "listening")["addr"].as_str().unwrap().to_owned();
    let mute: Vec<TcpStream> = (0..3).map(|i| mute_client(&addr, &format!("mute{i}"))).collect();
    for _ in 0..3 {
        srv.event("online", |v| v["event"] == "online");
    }
    (srv, mute)
}

/// An idle server with its admin listener exits within a second of SIGINT, and of SIGTERM with a dashboard's
/// event stream open, measured on the direct child.
#[test]
fn an_idle_server_exits_within_a_second_of_sigint_or_sigterm() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let mut srv = Serve::start(None, &["--admin", "127.0.0.1:0"]);
        let admin = srv.event("listening", |v| v["event"] == "listening")["admin"].as_str().unwrap().to_owned();
        let mut stream = TcpStream::connect(&admin).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        write!(stream, "GET /v1/events HTTP/1.1\r\nHost: {admin}\r\n\r\n").unwrap();
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"HTTP/1.1 200", "the event stream is open");
        let sent = srv.signal(sig);
        let took = srv.exited_within(sent, Duration::from_secs(1));
        srv.log_line("shutting down: no connections", PATIENCE);
        println!("idle exit after signal {sig}: {took:?}");
    }
}

/// Three clients that never read (so never answer `BYE`): the log says what the shutdown waits for and the
/// longest it will wait, then how it ended, and the process exits within that bound.
#[test]
fn a_busy_shutdown_says_what_it_waits_for_and_ends_within_its_bound() {
    let (mut srv, _mute) = serving_mute_clients(&["--admin", "off", "--close-grace", "1s"]);
    let sent = srv.signal(libc::SIGTERM);
    let plan = srv.log_line("shutting down:", PATIENCE);
    assert!(plan.contains("saying goodbye to 3 connections (each at most 1s, all at most 5s)"), "{plan}");
    let done = srv.log_line("shutting down: all 3 connections closed in ", PATIENCE);
    let took = srv.exited_within(sent, Duration::from_secs(5));
    // Each goodbye waited out its close grace for a FIN that never came.
    assert!(took >= Duration::from_secs(1), "exited after {took:?}, before the close grace");
    println!("{done}\nexited {took:?} after SIGTERM");
}

/// A goodbye allowed longer than the shutdown waits (`--close-grace 10s`): the shutdown gives up at its bound
/// and says on how many.
#[test]
fn a_shutdown_that_gives_up_says_so_at_its_bound() {
    let (mut srv, _mute) = serving_mute_clients(&["--admin", "off", "--close-grace", "10s"]);
    let sent = srv.signal(libc::SIGINT);
    let plan = srv.log_line("shutting down:", PATIENCE);
    assert!(plan.contains("saying goodbye to 3 connections (at most 5s)"), "{plan}");
    let gave_up = srv.log_line("shutting down: gave up after 5s on 3 connections still saying goodbye", PATIENCE);
    assert!(gave_up.contains("WARN"), "{gave_up}");
    let took = srv.exited_within(sent, Duration::from_secs(6));
    assert!(took >= Duration::from_secs(5), "gave up after {took:?}, before its bound");
    println!("{gave_up}\nexited {took:?} after SIGINT");
}

/// In cluster mode the plan also names the ids to release in Redis and that bound, and the end of leaving is
/// logged with how long it took.
#[test]
fn a_cluster_shutdown_says_it_releases_ids_and_how_leaving_ended() {
    if let Some(why) = tether_bench::redis::unavailable() {
        println!("SKIPPED: {why}");
        return;
    }
    let redis = Redis::start();
    let url = redis.url();
    let args = ["--cluster", &url, "--node-id", "n1", "--admin", "off", "--close-grace", "1s"];
    let (mut srv, _mute) = serving_mute_clients(&args);
    let sent = srv.signal(libc::SIGTERM);
    let plan = srv.log_line("shutting down:", PATIENCE);
    let want = "saying goodbye to 3 connections (each at most 1s, all at most 5s), then releasing 3 ids in Redis and \
                leaving the cluster (at most 2.5s)";
    assert!(plan.contains(want), "{plan}");
    srv.log_line("shutting down: all 3 connections closed in ", PATIENCE);
    let left = srv.log_line("cluster: left in ", PATIENCE);
    assert!(left.contains("(0 sessions still registered were declared lost)"), "every release was sent: {left}");
    let took = srv.exited_within(sent, Duration::from_secs(5) + Duration::from_millis(2500));
    assert_eq!(redis.cli(&["KEYS", "tether:id:mute*"]), "", "the ids are released in Redis");
    println!("{left}\nexited {took:?} after SIGTERM");
}
