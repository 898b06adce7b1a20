//! Shared test support: a server on port 0, event waiting, a hand-driven raw peer, the kernel's socket table.
#![allow(dead_code)]

#[path = "../../../tether-bench/src/redis.rs"]
pub mod redis;

/// Skip the calling test loudly when Redis is not installed.
#[macro_export]
macro_rules! redis_or_skip {
    ($name:expr) => {
        if let Some(why) = support::redis::unavailable() {
            eprintln!("\n*** SKIPPED cluster test {}: {why} ***\n", $name);
            println!("SKIPPED: {} ({why})", $name);
            return;
        }
    };
}

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tether::proto::frame::{self, Hello, PROTOCOL_VERSION};
use tether::proto::{Bye, Frame, Welcome};
use tether::{Client, ClientEvent, CloseReason, EventKind, EventStream, Server, ServerConfig, ServerHandle};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How long any wait in a test may take before it fails (virtual time under `start_paused`).
pub const PATIENCE: Duration = Duration::from_secs(60);

pub struct TestServer {
    pub addr: SocketAddr,
    pub events: EventStream,
    pub handle: ServerHandle,
    stop: Option<oneshot::Sender<()>>,
    pub task: JoinHandle<std::io::Result<()>>,
}

/// A config for tests: loopback, port 0, a 1 s heartbeat with a 3 s timeout.
pub fn test_config() -> ServerConfig {
    let mut cfg = ServerConfig { listen: "127.0.0.1:0".parse().unwrap(), ..ServerConfig::default() };
    cfg.heartbeat.interval = Duration::from_secs(1);
    cfg.heartbeat.timeout = Duration::from_secs(3);
    cfg.registry.conflict_liveness = Duration::from_millis(1500);
    cfg
}

/// [`test_config`] for a write that cannot drain: heartbeats too slow to matter, a 2 s write deadline, and room
/// to queue far more than the kernel's buffers take (so the write deadline, not the queue, ends it).
pub fn write_stall_config() -> ServerConfig {
    let mut cfg = test_config();
    cfg.heartbeat.interval = Duration::from_secs(60);
    cfg.heartbeat.timeout = Duration::from_secs(600);
    cfg.conn.write_timeout = Duration::from_secs(2);
    cfg.conn.max_outbound_bytes = 64 << 20;
    cfg.outbound_queue = 100_000;
    cfg
}

/// Queue `payload` for `client` through the application's API, yielding between sends, until the server refuses
/// (the client's queue is full or it is gone), at most `max` times. Whether it refused.
pub async fn send_until_refused(handle: &ServerHandle, client: &str, payload: Bytes, max: usize) -> bool {
    for _ in 0..max {
        if handle.send(client, payload.clone()).is_err() {
            return true;
        }
        tokio::task::yield_now().await;
    }
    false
}

impl TestServer {
    pub async fn start(cfg: ServerConfig) -> TestServer {
        let mut server = Server::bind(cfg).await.expect("bind");
        let addr = server.local_addr().unwrap();
        let events = server.events().unwrap();
        let handle = server.handle();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async move {
            let _ = stopped.await;
        }));
        let mut s = TestServer { addr, events, handle, stop: Some(stop), task };
        s.wait(|k| matches!(k, EventKind::Listening { .. })).await;
        s
    }

    /// Wait for the first event matching `pred`, skipping others; fails after [`PATIENCE`].
    pub async fn wait(&mut self, pred: impl Fn(&EventKind) -> bool) -> EventKind {
        let found = tokio::time::timeout(PATIENCE, async {
            loop {
                let ev = self.events.recv().await.expect("server event stream ended");
                if pred(&ev.kind) {
                    return ev.kind;
                }
            }
        });
        found.await.expect("timed out waiting for a server event")
    }

    /// Everything emitted so far without waiting.
    pub fn drain(&mut self) -> Vec<EventKind> {
        std::iter::from_fn(|| self.events.try_recv()).map(|e| e.kind).collect()
    }

    /// Crash: stop the server abruptly (every socket closed, no goodbye) and wait until its port is free.
    pub async fn crash(self) {
        self.task.abort();
        let _ = self.task.await;
    }

    /// Trigger the graceful shutdown and wait for `run` to return.
    pub async fn shutdown(mut self) -> Vec<EventKind> {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(PATIENCE, &mut self.task).await.expect("shutdown hung").unwrap().unwrap();
        self.drain()
    }
}

/// The client's next event; fails after [`PATIENCE`].
pub async fn next_event(c: &mut Client) -> ClientEvent {
    tokio::time::timeout(PATIENCE, c.next_event()).await.expect("no event").expect("stream ended")
}

/// The client's next `PRESENCE`, skipping other events (a disconnect fails the test).
pub async fn next_presence(c: &mut Client) -> tether::proto::Presence {
    loop {
        match next_event(c).await {
            ClientEvent::Presence(p) => return p,
            ClientEvent::Disconnected(d) => panic!("disconnected: {d:?}"),
            _ => {}
        }
    }
}

/// The client's `Disconnected`, skipping other events; fails after [`PATIENCE`].
pub async fn next_disconnect(c: &mut Client) -> tether::Disconnect {
    loop {
        match tokio::time::timeout(PATIENCE, c.next_event()).await.expect("no disconnect") {
            Some(ClientEvent::Disconnected(d)) => return d,
            Some(_) => continue,
            None => panic!("event stream ended without Disconnected"),
        }
    }
}

/// The reason of an `offline` event for `id`.
pub fn offline_reason(k: &EventKind, id: &str) -> Option<CloseReason> {
    match k {
        EventKind::Offline { client, reason, .. } if client == id => Some(*reason),
        _ => None,
    }
}

/// Close `c` (connected as `id`) and check both sides call it a clean `bye`.
pub async fn close_cleanly(s: &mut TestServer, c: &mut Client, id: &str) {
    let d = c.close().await.expect("close reports how it ended");
    assert_eq!(d.reason, CloseReason::Bye);
    let k = s.wait(|k| offline_reason(k, id).is_some()).await;
    assert_eq!(offline_reason(&k, id), Some(CloseReason::Bye));
}

/// The payload of the client's next `DATA`; fails if the client is disconnected first.
pub async fn next_data(c: &mut tether::Client) -> Bytes {
    loop {
        match tokio::time::timeout(PATIENCE, c.next_event()).await.expect("no DATA").expect("stream ended") {
            tether::ClientEvent::Data { payload, .. } => return payload,
            tether::ClientEvent::Disconnected(d) => panic!("disconnected while waiting for DATA: {d:?}"),
            _ => {}
        }
    }
}

/// A peer driven by hand, frame by frame, to misbehave on purpose; over TCP, or over any stream (TLS).
pub struct RawPeer<S = TcpStream> {
    pub stream: S,
    buf: BytesMut,
    /// The protocol version frames are read and written in: 1 until a `WELCOME` says otherwise.
    pub version: u8,
}

/// The `WELCOME` a fake version-1 server sends: a 1 s heartbeat, a 3 s timeout, epoch 1.
pub fn v1_welcome(server_id: &str) -> Welcome {
    Welcome {
        version: frame::V1,
        heartbeat_ms: 1000,
        timeout_ms: 3000,
        epoch: 1,
        server_id: server_id.into(),
        max_frame: None,
        extensions: Vec::new(),
    }
}

/// A `HELLO` offering `version`, asking for the server's default heartbeat.
pub fn hello_frame(version: u8, id: &str, nonce: u64) -> Frame {
    Frame::Hello(Hello::new(version, id, nonce))
}

impl<S: AsyncRead + AsyncWrite + Unpin> RawPeer<S> {
    /// A peer over a stream the test opened itself (e.g. from another source address, or a TLS stream).
    pub fn from_stream(stream: S) -> RawPeer<S> {
        RawPeer { stream, buf: BytesMut::new(), version: frame::V1 }
    }

    /// The stream under the peer (a TLS stream's session, for example).
    pub fn stream_mut(&mut self) -> &mut S {
        &mut self.stream
    }
}

impl RawPeer {
    pub async fn connect(addr: SocketAddr) -> RawPeer {
        RawPeer::from_stream(TcpStream::connect(addr).await.unwrap())
    }

    /// Connect and complete the handshake as `id`, offering the highest protocol version.
    pub async fn hello(addr: SocketAddr, id: &str, nonce: u64) -> (RawPeer, Welcome) {
        RawPeer::hello_v(addr, id, nonce, PROTOCOL_VERSION).await
    }

    /// Connect and complete the handshake as `id`, offering protocol `version`.
    pub async fn hello_v(addr: SocketAddr, id: &str, nonce: u64, version: u8) -> (RawPeer, Welcome) {
        let mut p = RawPeer::connect(addr).await;
        p.send(&hello_frame(version, id, nonce)).await;
        match p.next_frame().await {
            Some(Frame::Welcome(w)) => (p, w),
            other => panic!("expected WELCOME, got {other:?}"),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> RawPeer<S> {
    pub async fn send(&mut self, f: &Frame) {
        self.send_raw(&f.to_bytes_v(self.version)).await;
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
        self.stream.flush().await.unwrap();
    }

    /// The next frame, or `None` at end of stream or on a reset.
    pub async fn next_frame(&mut self) -> Option<Frame> {
        loop {
            if let Some(n) = frame::check(&self.buf, frame::DEFAULT_MAX_FRAME).expect("server sent a bad frame") {
                let f = Frame::parse_v(&self.buf[..n], self.version).expect("server sent a bad frame");
                self.buf.advance(n);
                if let Frame::Welcome(w) = &f {
                    self.version = w.version;
                }
                return Some(f);
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout(PATIENCE, self.stream.read(&mut chunk)).await.expect("peer read hung") {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// The server's `BYE` and how many `PING`s came before it; any other frame fails the test.
    pub async fn pings_then_bye(&mut self) -> (usize, Bye) {
        let mut pings = 0;
        loop {
            match self.next_frame().await {
                Some(Frame::Ping { .. }) => pings += 1,
                Some(Frame::Bye(b)) => return (pings, b),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    /// Read until the server's `BYE`, skipping pings and other frames; then expect end of stream.
    pub async fn expect_bye(&mut self) -> Bye {
        loop {
            match self.next_frame().await {
                Some(Frame::Bye(b)) => {
                    assert_eq!(self.next_frame().await, None, "frames after BYE");
                    return b;
                }
                Some(_) => continue,
                None => panic!("connection ended without BYE"),
            }
        }
    }
}

/// Sockets in the kernel's table whose local port is `port`, by TCP state name (from /proc/net/tcp and tcp6).
pub fn socket_states(port: u16) -> Vec<&'static str> {
    let mut states = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else { continue };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(st)) = (cols.get(1), cols.get(3)) else { continue };
            let Some(p) = local.rsplit(':').next().and_then(|h| u16::from_str_radix(h, 16).ok()) else { continue };
            if p != port {
                continue;
            }
            states.push(match *st {
                "01" => "ESTABLISHED",
                "06" => "TIME_WAIT",
                "07" => "CLOSE",
                "08" => "CLOSE_WAIT",
                "09" => "LAST_ACK",
                "0A" => "LISTEN",
                "04" => "FIN_WAIT1",
                "05" => "FIN_WAIT2",
                "0B" => "CLOSING",
                _ => "OTHER",
            });
        }
    }
    states
}

/// Poll the socket table until `pred` holds (bounded by [`PATIENCE`] of real time). The kernel's table is not
/// an event source, so this is the one place a test polls; it never sleeps to synchronise with tether itself.
pub async fn until_sockets(port: u16, pred: impl Fn(&[&str]) -> bool) -> Vec<&'static str> {
    let start = std::time::Instant::now();
    loop {
        let s = socket_states(port);
        if pred(&s) {
            return s;
        }
        assert!(start.elapsed() < PATIENCE, "socket table never satisfied the condition: {s:?}");
        tokio::task::yield_now().await;
        std::thread::sleep(Duration::from_millis(5));
    }
}
