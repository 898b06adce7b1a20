//! One load-generator process: holds a share of the connections and obeys the coordinator.
//!
//! # Layout
//! [`run`] opens `count` connections from `source_ip` (bounded concurrency), prints one `connected` line with the
//! handshake latencies, then serves commands read from stdin, one per line:
//! `report` (heartbeat exchanges and server pings answered so far), `silence M` (the first M connections stop sending, socket open),
//! `takeover K [ADDR]` (the last K ids reconnect from fresh sockets while their old connection is live, to ADDR if
//! given: another node of a cluster), `close M` (the next M connections not closed yet say `BYE` and close), `stop`.
//! Replies are JSON lines on stdout. End of stdin, `stop`, or `max_seconds` ends the process: it never outlives
//! its coordinator.
//!
//! A tether connection here is deliberately lean, not a full `tether::Client`: it says `HELLO`, sends `PING` when
//! it has sent nothing for one interval, answers `PING` with `PONG`, and reads everything else. With `tls` it
//! first makes a full TLS 1.3 handshake ([`crate::tls`]) and then does the same inside TLS. `report` also says how
//! many tether connections had a `PONG` to one of their own `PING`s since the previous `report`: the connections
//! alive and answered. An MQTT connection
//! (Mosquitto, rumqttd) sends CONNECT with a Will and PINGREQ every keepalive. A NATS connection reads `INFO`,
//! sends `CONNECT` and `PING`, waits for the `PONG`, then only answers the server's `PING`s: nats-server drives
//! the heartbeat itself. A "heartbeat exchange" is one ping and its answer, one per connection per interval: the
//! client's ping for tether and MQTT, the server's for NATS. It is the unit every system is charged per. A `PING` of the server's own (tether's round-trip probe) is
//! answered and counted apart, as server work; answering it does not move the connection's ping phase, as it
//! would not for a device whose probe comes right after its own ping (see [`Heartbeat::tether`]).
//! In `reconnect` mode each id is a `tether::ReconnectingClient` instead, reporting every reconnection.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::{Buf, BytesMut};
use serde_json::json;
use tether_proto::frame::{self, Frame, Hello};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Notify, Semaphore};

use crate::sys::epoch_us;
use crate::tls::Io;
use crate::{mqtt, nats};

/// Which server the run measures, and so which protocol the worker speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Tether,
    /// MQTT 3.1.1 ([`mqtt`]).
    Mosquitto,
    /// MQTT 3.1.1, the same client as Mosquitto's.
    Rumqttd,
    /// NATS's text protocol ([`crate::nats`]).
    Nats,
}

impl Target {
    /// Its name on the command line (`--target`) and in results.
    pub fn name(self) -> &'static str {
        match self {
            Target::Tether => "tether",
            Target::Mosquitto => "mosquitto",
            Target::Rumqttd => "rumqttd",
            Target::Nats => "nats",
        }
    }

    /// An MQTT broker: keepalive in whole seconds, a Will for detection, takeover by client id.
    pub fn is_mqtt(self) -> bool {
        matches!(self, Target::Mosquitto | Target::Rumqttd)
    }
}

#[derive(Debug, Clone)]
pub struct WorkerOpts {
    pub target: Target,
    pub addr: SocketAddr,
    pub source_ip: Option<IpAddr>,
    pub count: usize,
    /// Ids are `{prefix}{first + i}`.
    pub first: usize,
    pub prefix: String,
    pub interval: Duration,
    pub concurrency: usize,
    /// Use `tether::ReconnectingClient` per id (the storm scenario).
    pub reconnect: bool,
    pub max_seconds: u64,
    /// tether over TLS: every connection makes a full TLS 1.3 handshake with this configuration first.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// One connection's controls, shared with its task.
struct Conn {
    id: String,
    silent: Arc<AtomicBool>,
    /// Say `BYE` and close.
    bye: Arc<AtomicBool>,
    wake: Arc<Notify>,
    /// Epoch µs of the last frame this connection sent.
    last_tx_us: Arc<AtomicU64>,
    /// `PONG`s to this connection's own `PING`s (tether).
    answered: Arc<AtomicU64>,
}

pub(crate) fn emit(v: serde_json::Value) {
    println!("{v}");
}

/// A nonce that is the same for an id every time: a takeover by this worker is the same device reconnecting.
pub(crate) fn nonce_of(id: &str) -> u64 {
    id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

pub async fn run(opts: WorkerOpts) -> anyhow::Result<()> {
    let limit = Duration::from_secs(opts.max_seconds.max(1));
    match tokio::time::timeout(limit, serve(opts)).await {
        Ok(r) => r,
        Err(_) => bail!("worker reached its time limit"),
    }
}

async fn serve(opts: WorkerOpts) -> anyhow::Result<()> {
    if opts.reconnect {
        return reconnecting(opts).await;
    }
    let exchanges = Arc::new(Counts::default());
    let gate = Arc::new(Semaphore::new(opts.concurrency.max(1)));
    let started = Instant::now();
    let mut conns = Vec::with_capacity(opts.count);
    let mut waits = Vec::with_capacity(opts.count);
    for i in 0..opts.count {
        let c = Conn {
            id: format!("{}{}", opts.prefix, opts.first + i),
            silent: Arc::new(AtomicBool::new(false)),
            bye: Arc::new(AtomicBool::new(false)),
            wake: Arc::new(Notify::new()),
            last_tx_us: Arc::new(AtomicU64::new(0)),
            answered: Arc::new(AtomicU64::new(0)),
        };
        waits.push(spawn_conn(&opts, &c, exchanges.clone(), Some(gate.clone())));
        conns.push(c);
    }
    let mut latencies = Vec::with_capacity(opts.count);
    let mut failed = Vec::new();
    for w in waits {
        match w.await {
            Ok(Ok((d, _))) => latencies.push(d.as_micros() as u64),
            Ok(Err(e)) => failed.push(e),
            Err(_) => failed.push("connection task ended".into()),
        }
    }
    emit(json!({
        "event": "connected", "n": latencies.len(), "failed": failed.len(),
        "first_error": failed.first(), "elapsed_us": started.elapsed().as_micros() as u64,
        "latencies_us": latencies,
    }));
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut closed = 0;
    // Each connection's `answered` at the previous `report`.
    let mut answered_before = vec![0u64; conns.len()];
    while let Some(line) = lines.next_line().await? {
        let mut words = line.split_whitespace();
        let (cmd, count) = (words.next(), words.next().and_then(|n| n.parse::<usize>().ok()));
        let other: Option<SocketAddr> = words.next().and_then(|a| a.parse().ok());
        match (cmd, count) {
            (Some("report"), _) => {
                let mut alive = 0;
                for (c, before) in conns.iter().zip(answered_before.iter_mut()) {
                    let now = c.answered.load(Ordering::Relaxed);
                    alive += usize::from(now > *before);
                    *before = now;
                }
                emit(json!({
                    "event": "report",
                    "exchanges": exchanges.heartbeats.load(Ordering::Relaxed),
                    "server_pings": exchanges.server_pings.load(Ordering::Relaxed),
                    "answered_since_last_report": alive,
                }))
            }
            (Some("silence"), Some(m)) => {
                let chosen = &conns[..m.min(conns.len())];
                for c in chosen {
                    c.silent.store(true, Ordering::SeqCst);
                    c.wake.notify_one();
                }
                let ids: Vec<&str> = chosen.iter().map(|c| c.id.as_str()).collect();
                let last: Vec<u64> = chosen.iter().map(|c| c.last_tx_us.load(Ordering::SeqCst)).collect();
                emit(json!({"event": "silenced", "ids": ids, "last_tx_us": last, "at_us": epoch_us()}));
            }
            (Some("close"), Some(m)) => {
                let end = (closed + m).min(conns.len());
                let chosen = &conns[closed..end];
                closed = end;
                let at = epoch_us();
                for c in chosen {
                    c.bye.store(true, Ordering::SeqCst);
                    c.wake.notify_one();
                }
                let ids: Vec<&str> = chosen.iter().map(|c| c.id.as_str()).collect();
                emit(json!({"event": "closed", "ids": ids, "at_us": at}));
            }
            (Some("takeover"), Some(k)) => {
                // One at a time: the latency of a takeover, not of a queue of them.
                let from = conns.len().saturating_sub(k);
                let mut lat = Vec::new();
                let mut errors = 0;
                let to = WorkerOpts { addr: other.unwrap_or(opts.addr), ..opts.clone() };
                for c in &mut conns[from..] {
                    c.silent = Arc::new(AtomicBool::new(false));
                    c.bye = Arc::new(AtomicBool::new(false));
                    c.wake = Arc::new(Notify::new());
                    match spawn_conn(&to, c, exchanges.clone(), None).await {
                        Ok(Ok((_, hello_rtt))) => lat.push(hello_rtt.as_micros() as u64),
                        _ => errors += 1,
                    }
                }
                emit(json!({"event": "takeover", "latencies_us": lat, "failed": errors}));
            }
            (Some("stop"), _) => break,
            _ => emit(json!({"event": "error", "detail": format!("unknown command {line:?}")})),
        }
    }
    Ok(())
}

/// A finished handshake: connect → WELCOME/CONNACK, and HELLO/CONNECT → WELCOME/CONNACK alone.
type Timings = (Duration, Duration);
type Handshake = tokio::sync::oneshot::Receiver<Result<Timings, String>>;

/// Start one connection's task; the receiver yields its handshake timings.
fn spawn_conn(opts: &WorkerOpts, c: &Conn, exchanges: Arc<Counts>, gate: Option<Arc<Semaphore>>) -> Handshake {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (target, addr, src, interval) = (opts.target, opts.addr, opts.source_ip, opts.interval);
    let (id, silent, wake, last) = (c.id.clone(), c.silent.clone(), c.wake.clone(), c.last_tx_us.clone());
    let (bye, answered, tls) = (c.bye.clone(), c.answered.clone(), opts.tls.clone());
    tokio::spawn(async move {
        let permit = match gate {
            Some(g) => Some(g.acquire_owned().await),
            None => None,
        };
        let started = Instant::now();
        let opened = match target {
            Target::Tether => open_tether(addr, src, &id, interval, tls.as_ref()).await,
            Target::Mosquitto | Target::Rumqttd => open_mqtt(addr, src, &id, interval).await.map(plain),
            Target::Nats => open_nats(addr, src, &id).await.map(plain),
        };
        drop(permit);
        let (stream, leftover, hello_rtt) = match opened {
            Ok(s) => s,
            Err(e) => return drop(tx.send(Err(format!("{e:#}")))),
        };
        last.store(epoch_us(), Ordering::SeqCst);
        let _ = tx.send(Ok((started.elapsed(), hello_rtt)));
        // Devices connect over time, so their ping phases are spread over the interval; a burst-opened load
        // generator would otherwise ping (and fall due) all at once. The phase comes from the id: repeatable.
        let phase = interval.mul_f64((nonce_of(&id) % 1000) as f64 / 1000.0);
        let hb = Heartbeat { silent, bye, wake, last_tx_us: last, answered, exchanges, interval, phase };
        let _ = match target {
            Target::Tether => hb.tether(stream, leftover).await,
            Target::Mosquitto | Target::Rumqttd => hb.mqtt(stream).await,
            Target::Nats => hb.nats(stream, leftover).await,
        };
    });
    rx
}

/// An MQTT or NATS connection's opening, as plain TCP.
fn plain((stream, buf, rtt): (TcpStream, BytesMut, Duration)) -> (Io, BytesMut, Duration) {
    (Io::Tcp(stream), buf, rtt)
}

/// IP_BIND_ADDRESS_NO_PORT: choose the source port at connect() (against the whole 4-tuple), not at bind().
/// Without it, binding a source address with port 0 must find a port no socket on that address holds, TIME_WAIT
/// ones from the previous run included, and tens of thousands of connections exhaust and slow that search.
#[cfg(target_os = "linux")]
fn bind_address_no_port(sock: &TcpSocket) {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with a valid fd and a pointer to a c_int that lives for the call.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn bind_address_no_port(_sock: &TcpSocket) {}

pub(crate) async fn dial(addr: SocketAddr, src: Option<IpAddr>) -> anyhow::Result<TcpStream> {
    let sock = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    if let Some(ip) = src {
        bind_address_no_port(&sock);
        sock.bind(SocketAddr::new(ip, 0)).with_context(|| format!("binding {ip}"))?;
    }
    let stream = sock.connect(addr).await.context("connect")?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Connect (and with `tls`, the TLS handshake), `HELLO` → `WELCOME`; the duration is `HELLO` → `WELCOME` alone.
async fn open_tether(
    addr: SocketAddr,
    src: Option<IpAddr>,
    id: &str,
    interval: Duration,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> anyhow::Result<(Io, BytesMut, Duration)> {
    let stream = dial(addr, src).await?;
    let mut stream = match tls {
        Some(config) => crate::tls::handshake(config, stream, addr).await?,
        None => Io::Tcp(stream),
    };
    let sent = Instant::now();
    // Version 1: the load generator reads frames with the v1 codec (what it uses, PING/PONG, is the same in v2).
    let hello = Hello { heartbeat_ms: interval.as_millis() as u32, ..Hello::new(frame::V1, id, nonce_of(id)) };
    stream.write_all(&Frame::Hello(hello).to_bytes()).await?;
    stream.flush().await?;
    let mut buf = BytesMut::new();
    read_until(&mut stream, &mut buf, |buf| {
        let Some(n) = frame::check(buf, frame::DEFAULT_MAX_FRAME)? else { return Ok(None) };
        let f = Frame::parse(&buf[..n])?;
        buf.advance(n);
        match f {
            Frame::Welcome(_) => Ok(Some(())),
            Frame::Bye(b) => bail!("refused: {}", b.reason),
            other => bail!("expected WELCOME, got {}", other.name()),
        }
    })
    .await?;
    Ok((stream, buf, sent.elapsed()))
}

/// Read into `buf` until `parse` finds what it waits for in it (a handshake answer).
pub(crate) async fn read_until<T>(
    stream: &mut (impl AsyncRead + Unpin),
    buf: &mut BytesMut,
    mut parse: impl FnMut(&mut BytesMut) -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    loop {
        if let Some(t) = parse(buf)? {
            return Ok(t);
        }
        if stream.read_buf(buf).await? == 0 {
            bail!("closed during the handshake");
        }
    }
}

async fn open_mqtt(
    addr: SocketAddr,
    src: Option<IpAddr>,
    id: &str,
    interval: Duration,
) -> anyhow::Result<(TcpStream, BytesMut, Duration)> {
    let mut stream = dial(addr, src).await?;
    let sent = Instant::now();
    let keepalive = interval.as_secs().clamp(1, u16::MAX as u64) as u16;
    let topic = format!("tether-bench/will/{id}");
    stream.write_all(&mqtt::connect(id, keepalive, Some((&topic, id.as_bytes())))).await?;
    let mut buf = BytesMut::new();
    read_until(&mut stream, &mut buf, |buf| {
        let Some((kind, body, n)) = mqtt::split(buf).map_err(anyhow::Error::msg)? else { return Ok(None) };
        if kind != mqtt::CONNACK || body.get(1) != Some(&0) {
            bail!("CONNECT refused (type {kind}, body {body:?})");
        }
        buf.advance(n);
        Ok(Some(()))
    })
    .await?;
    Ok((stream, buf, sent.elapsed()))
}

/// Connect → the server's `INFO`, then `CONNECT` + `PING` → `PONG` (any `-ERR` first refuses the connection).
async fn open_nats(addr: SocketAddr, src: Option<IpAddr>, id: &str) -> anyhow::Result<(TcpStream, BytesMut, Duration)> {
    let mut stream = dial(addr, src).await?;
    let sent = Instant::now();
    let mut buf = BytesMut::new();
    let mut said_connect = false;
    loop {
        while let Some((op, n)) = nats::split(&buf).map_err(anyhow::Error::msg)? {
            let reply = match op {
                nats::Op::Info(_) if !said_connect => {
                    said_connect = true;
                    nats::connect(id)
                }
                nats::Op::Pong if said_connect => {
                    buf.advance(n);
                    return Ok((stream, buf, sent.elapsed()));
                }
                nats::Op::Ping => nats::PONG.to_vec(),
                nats::Op::Err(e) => bail!("refused: -ERR {e}"),
                other => bail!("unexpected {other:?} during the handshake"),
            };
            buf.advance(n);
            stream.write_all(&reply).await?;
        }
        if stream.read_buf(&mut buf).await? == 0 {
            bail!("closed during the handshake");
        }
    }
}

/// What a worker's connections counted.
#[derive(Debug, Default)]
struct Counts {
    /// Heartbeat exchanges: the clients' own pings (tether `PING`, MQTT `PINGREQ`), and for NATS the server's
    /// `PING`s answered.
    heartbeats: AtomicU64,
    /// The server's own `PING`s answered.
    server_pings: AtomicU64,
}

struct Heartbeat {
    silent: Arc<AtomicBool>,
    bye: Arc<AtomicBool>,
    wake: Arc<Notify>,
    last_tx_us: Arc<AtomicU64>,
    answered: Arc<AtomicU64>,
    exchanges: Arc<Counts>,
    interval: Duration,
    /// How far into its cycle this connection starts (the first ping comes `interval - phase` after connect).
    phase: Duration,
}

impl Heartbeat {
    /// A ping of this client's went out.
    fn sent(&self) {
        self.exchanges.heartbeats.fetch_add(1, Ordering::Relaxed);
        self.last_tx_us.store(epoch_us(), Ordering::SeqCst);
    }

    /// Ping when idle for one interval, answer pings, until the server closes.
    ///
    /// The ping phase stays where it started when the server pings: the phase stands for when the device
    /// connected, and a tether server's round-trip probe arrives right behind the `PONG` to this connection's own
    /// `PING`, so answering it moves the phase by next to nothing anyway.
    async fn tether(self, mut stream: impl AsyncRead + AsyncWrite + Unpin, mut buf: BytesMut) -> anyhow::Result<()> {
        let now = tokio::time::Instant::now();
        let mut last_tx = now.checked_sub(self.phase).unwrap_or(now);
        let mut seq = 0u32;
        loop {
            let silent = self.silent.load(Ordering::SeqCst);
            tokio::select! {
                r = stream.read_buf(&mut buf) => {
                    if r? == 0 {
                        return Ok(());
                    }
                    while let Some(n) = frame::check(&buf, frame::DEFAULT_MAX_FRAME)? {
                        let f = Frame::parse(&buf[..n])?;
                        buf.advance(n);
                        match f {
                            Frame::Ping { seq, ts_ms } if !self.silent.load(Ordering::SeqCst) => {
                                stream.write_all(&Frame::Pong { seq, ts_ms }.to_bytes()).await?;
                                stream.flush().await?;
                                self.exchanges.server_pings.fetch_add(1, Ordering::Relaxed);
                                self.last_tx_us.store(epoch_us(), Ordering::SeqCst);
                            }
                            Frame::Pong { .. } => {
                                self.answered.fetch_add(1, Ordering::Relaxed);
                            }
                            Frame::Bye(_) => return Ok(()),
                            _ => {}
                        }
                    }
                    if buf.is_empty() {
                        buf = BytesMut::new();
                    }
                }
                () = tokio::time::sleep_until(last_tx + self.interval), if !silent => {
                    seq = seq.wrapping_add(1);
                    stream.write_all(&Frame::Ping { seq, ts_ms: 0 }.to_bytes()).await?;
                    stream.flush().await?;
                    last_tx = tokio::time::Instant::now();
                    self.sent();
                }
                () = self.wake.notified() => {
                    if self.bye.load(Ordering::SeqCst) {
                        let bye = tether_proto::Bye {
                            reason: tether_proto::CloseReason::Bye,
                            retry_after_ms: 0,
                            alternative: String::new(),
                        };
                        stream.write_all(&Frame::Bye(bye).to_bytes()).await?;
                        stream.flush().await?;
                        return Ok(());
                    }
                }
            }
        }
    }

    /// PINGREQ every keepalive, read and drop what comes back, until the broker closes.
    async fn mqtt(self, mut stream: impl AsyncRead + AsyncWrite + Unpin) -> anyhow::Result<()> {
        let mut next = tokio::time::Instant::now() + self.interval.saturating_sub(self.phase);
        let mut discard = BytesMut::new();
        loop {
            let silent = self.silent.load(Ordering::SeqCst);
            tokio::select! {
                r = stream.read_buf(&mut discard) => {
                    if r? == 0 {
                        return Ok(());
                    }
                    discard.clear();
                }
                () = tokio::time::sleep_until(next), if !silent => {
                    stream.write_all(&mqtt::PINGREQ).await?;
                    next += self.interval;
                    self.sent();
                }
                () = self.wake.notified() => {}
            }
        }
    }
}

impl Heartbeat {
    /// Answer each of the server's `PING`s with `PONG` (one heartbeat exchange each) until the server closes;
    /// a silent connection reads and answers nothing, as a dead device would.
    async fn nats(self, mut stream: impl AsyncRead + AsyncWrite + Unpin, mut buf: BytesMut) -> anyhow::Result<()> {
        loop {
            tokio::select! {
                r = stream.read_buf(&mut buf) => {
                    if r? == 0 {
                        return Ok(());
                    }
                    while let Some((op, n)) = nats::split(&buf).map_err(anyhow::Error::msg)? {
                        if op == nats::Op::Ping && !self.silent.load(Ordering::SeqCst) {
                            stream.write_all(nats::PONG).await?;
                            self.sent();
                        }
                        buf.advance(n);
                    }
                }
                () = self.wake.notified() => {
                    if self.bye.load(Ordering::SeqCst) {
                        return Ok(()); // NATS has no goodbye: closing is the end
                    }
                }
            }
        }
    }
}

/// Storm mode: one `ReconnectingClient` per id; every reconnection after the first is reported.
async fn reconnecting(opts: WorkerOpts) -> anyhow::Result<()> {
    use tether::proto::reconnect::{BackoffConfig, ReconnectConfig};
    use tether::{ClientConfig, LinkEvent, ReconnectingClient, ResilienceConfig};
    if opts.target != Target::Tether {
        bail!("reconnect mode is for tether only");
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, bool)>();
    let mut handles = Vec::new();
    for i in 0..opts.count {
        let id = format!("{}{}", opts.prefix, opts.first + i);
        let mut cfg = ClientConfig::new(id.clone());
        cfg.nonce = Some(nonce_of(&id));
        cfg.heartbeat_interval = Some(opts.interval);
        let res = ResilienceConfig {
            reconnect: ReconnectConfig {
                backoff: BackoffConfig {
                    initial: Duration::from_millis(200),
                    max: Duration::from_secs(5),
                    multiplier: 2.0,
                },
                return_to_primary: None,
                ..ReconnectConfig::default()
            },
            queue_limit: 0,
            seed: Some(nonce_of(&id)),
        };
        let mut rc = ReconnectingClient::start(vec![opts.addr.to_string()], cfg, res);
        let tx = tx.clone();
        handles.push(tokio::spawn(async move {
            while let Some(ev) = rc.next_event().await {
                if let LinkEvent::Connected { .. } = ev {
                    let _ = tx.send((i, true));
                }
            }
        }));
    }
    let mut up = vec![false; opts.count];
    let mut n = 0;
    while n < opts.count {
        let Some((i, _)) = rx.recv().await else { bail!("clients ended") };
        if !std::mem::replace(&mut up[i], true) {
            n += 1;
        }
    }
    emit(json!({"event": "connected", "n": n, "failed": 0, "latencies_us": []}));
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    loop {
        tokio::select! {
            line = lines.next_line() => match line? {
                Some(l) if l.trim() == "stop" => break,
                Some(_) => {}
                None => break,
            },
            Some((i, _)) = rx.recv() => {
                emit(json!({"event": "reconnected", "id": opts.first + i, "at_us": epoch_us()}));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tether server in this process serving TLS with a fresh dev certificate, on a loopback port of its own,
    /// and a load-generator client configuration trusting its CA (written to `dir`).
    async fn tls_server(dir: &std::path::Path) -> (SocketAddr, Arc<rustls::ClientConfig>) {
        let pki = tether::DevPki::generate(&["127.0.0.1"], "client").unwrap();
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, &pki.ca_cert).unwrap();
        let mut cfg = tether::ServerConfig { listen: "127.0.0.1:0".parse().unwrap(), ..Default::default() };
        cfg.tls =
            Some(tether::ServerTls::from_pem(pki.server_cert.as_bytes(), pki.server_key.as_bytes(), None).unwrap());
        let server = tether::Server::bind(cfg).await.unwrap();
        let addr = server.local_addr().unwrap();
        tokio::spawn(server.run(std::future::pending()));
        (addr, crate::tls::client_config(&ca).unwrap())
    }

    #[tokio::test]
    async fn a_tls_connection_says_hello_and_has_its_ping_answered() {
        let dir = std::env::temp_dir().join(format!("tether-bench-test-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let _dir = crate::TempDir(dir.clone());
        let (addr, config) = tls_server(&dir).await;
        let within = Duration::from_secs(10);
        let (mut stream, mut buf, _) =
            tokio::time::timeout(within, open_tether(addr, None, "tls-1", Duration::from_secs(5), Some(&config)))
                .await
                .unwrap()
                .unwrap();
        let Io::Tls(tls) = &stream else { panic!("a plain connection") };
        assert_eq!(tls.get_ref().1.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(tether::tls::ALPN));
        stream.write_all(&Frame::Ping { seq: 7, ts_ms: 0 }.to_bytes()).await.unwrap();
        stream.flush().await.unwrap();
        let pong = read_until(&mut stream, &mut buf, |buf| {
            let Some(n) = frame::check(buf, frame::DEFAULT_MAX_FRAME)? else { return Ok(None) };
            let f = Frame::parse(&buf[..n])?;
            buf.advance(n);
            Ok(match f {
                Frame::Pong { seq, .. } => Some(seq),
                _ => None,
            })
        });
        assert_eq!(tokio::time::timeout(within, pong).await.unwrap().unwrap(), 7);
    }

    #[tokio::test]
    async fn a_tls_client_refuses_a_plain_server() {
        let cfg = tether::ServerConfig { listen: "127.0.0.1:0".parse().unwrap(), ..Default::default() };
        let server = tether::Server::bind(cfg).await.unwrap();
        let addr = server.local_addr().unwrap();
        tokio::spawn(server.run(std::future::pending()));
        let dir = std::env::temp_dir().join(format!("tether-bench-test-plain-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let _dir = crate::TempDir(dir.clone());
        let pki = tether::DevPki::generate(&["127.0.0.1"], "client").unwrap();
        std::fs::write(dir.join("ca.pem"), &pki.ca_cert).unwrap();
        let config = crate::tls::client_config(&dir.join("ca.pem")).unwrap();
        let opened = open_tether(addr, None, "tls-2", Duration::from_secs(5), Some(&config));
        assert!(tokio::time::timeout(Duration::from_secs(10), opened).await.unwrap().is_err());
    }
}
