//! `tether serve` under a service manager, and its shutdown as an operator sees it: the `$NOTIFY_SOCKET`
//! messages (`READY=1` once the port answers, `STOPPING=1` at the signal), an idle server's prompt exit, and the
//! log lines of a busy shutdown (what it waits for, the longest it will wait, how it ended). Real processes on
//! loopback, real clock; every wait has a deadline.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
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

/// A datagram socket standing in for the service manager's notify socket.
struct Manager {
    socket: UnixDatagram,
    /// The value for `$NOTIFY_SOCKET`.
    name: String,
    /// The directory holding a path socket, removed on drop.
    dir: Option<PathBuf>,
}

impl Manager {
    fn at_path(test: &str) -> Manager {
        let dir = std::env::temp_dir().join(format!("tether-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let socket = UnixDatagram::bind(&path).unwrap();
        Manager { socket, name: path.to_str().unwrap().to_owned(), dir: Some(dir) }
    }

    fn abstract_name(test: &str) -> Manager {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("tether-{test}-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let socket = UnixDatagram::bind_addr(&addr).unwrap();
        Manager { socket, name: format!("@{name}"), dir: None }
    }

    /// The next message, within [`PATIENCE`].
    fn recv(&self) -> String {
        self.socket.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut buf = [0u8; 4096];
        let n = self.socket.recv(&mut buf).expect("a message from tether serve within the patience");
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The listening address a `READY=1` message's status names.
fn ready_addr(msg: &str) -> String {
    assert!(msg.starts_with("READY=1\n"), "{msg:?}");
    let status = msg.lines().find_map(|l| l.strip_prefix("STATUS=")).expect("a STATUS line");
    let rest = status.strip_prefix("listening on ").unwrap_or_else(|| panic!("status {status:?}"));
    rest.split([' ', ';']).next().unwrap().to_owned()
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

/// Connect, say `HELLO`, and return the server's first frame.
fn first_answer(addr: &str, id: &str) -> Frame {
    let mut s = mute_client(addr, id);
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut header = [0u8; 4];
    s.read_exact(&mut header).expect("an answer to HELLO");
    let mut whole = header.to_vec();
    whole.resize(4 + u32::from_be_bytes(header) as usize, 0);
    s.read_exact(&mut whole[4..]).unwrap();
    Frame::parse(&whole).expect("a frame")
}

/// `READY=1` arrives, the port it names answers `HELLO` with `WELCOME` at once, and `STOPPING=1` follows
/// SIGTERM before the process exits.
fn ready_then_stopping(manager: Manager) {
    let mut srv = Serve::start(Some(&manager.name), &[]);
    let ready = manager.recv();
    let addr = ready_addr(&ready);
    assert!(ready.contains("admin API and dashboard on http://127.0.0.1:"), "{ready:?}");
    assert!(matches!(first_answer(&addr, "first"), Frame::Welcome(_)), "the port answers when READY=1 arrives");
    let listening = srv.event("listening", |v| v["event"] == "listening");
    assert_eq!(listening["addr"].as_str(), Some(addr.as_str()));
    let sent = srv.signal(libc::SIGTERM);
    let stopping = manager.recv();
    assert!(stopping.starts_with("STOPPING=1\nSTATUS=shutting down"), "{stopping:?}");
    srv.exited_within(sent, PATIENCE);
}

#[test]
fn ready_is_sent_once_the_port_answers_and_stopping_at_sigterm() {
    ready_then_stopping(Manager::at_path("notify-path"));
}

#[test]
fn ready_and_stopping_reach_an_abstract_notify_socket() {
    ready_then_stopping(Manager::abstract_name("notify-abstract"));
}

#[test]
fn a_cluster_node_is_ready_only_once_it_has_joined() {
    if let Some(why) = tether_bench::redis::unavailable() {
        println!("SKIPPED: {why}");
        return;
    }
    let redis = Redis::start();
    let manager = Manager::at_path("notify-cluster");
    let url = redis.url();
    // Redis holds every command for a second: the node listens at once but cannot join before that.
    let paused = Instant::now();
    redis.pause(1000);
    let mut srv = Serve::start(Some(&manager.name), &["--cluster", &url, "--node-id", "n1", "--admin", "off"]);
    srv.event("listening", |v| v["event"] == "listening");
    let listening = paused.elapsed();
    let ready = manager.recv();
    let ready_after = paused.elapsed();
    println!("listening after {listening:?}, READY=1 after {ready_after:?} (Redis paused for 1 s)");
    assert!(ready_after >= Duration::from_secs(1), "READY=1 while Redis was paused: {ready_after:?}");
    // Joined: the node is in Redis's node table when it says it is ready.
    let members = redis.cli(&["ZRANGE", "tether:nodes", "0", "-1"]);
    assert!(members.starts_with("n1#"), "READY=1 before joining: node table {members:?}");
    assert!(ready.contains("as cluster node n1"), "{ready:?}");
    match first_answer(&ready_addr(&ready), "first") {
        Frame::Welcome(w) => assert_eq!(w.server_id, "n1"),
        other => panic!("expected WELCOME, got {other:?}"),
    }
    let sent = srv.signal(libc::SIGTERM);
    assert!(manager.recv().starts_with("STOPPING=1\n"));
    srv.exited_within(sent, PATIENCE);
}

/// A cluster node that cannot join yet (Redis unreachable: it waits one lease before serving its own clients)
/// stops at once on SIGTERM instead of after that wait, and never says READY.
#[test]
fn a_node_still_joining_stops_at_once_on_sigterm() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let manager = Manager::at_path("notify-joining");
    let url = format!("redis://{closed}");
    let mut srv = Serve::start(Some(&manager.name), &["--cluster", &url, "--node-id", "n1", "--admin", "off"]);
    srv.event("listening", |v| v["event"] == "listening");
    let sent = srv.signal(libc::SIGTERM);
    assert!(manager.recv().starts_with("STOPPING=1\n"), "STOPPING=1 first, and no READY=1");
    let took = srv.exited_within(sent, Duration::from_secs(1));
    println!("a joining node exited {took:?} after SIGTERM");
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
