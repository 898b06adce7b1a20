//! `tether probe`: is it the network or the program? Each layer in order, then one verdict with its evidence.
//!
//! # Layout
//! [`run`] picks the form:
//! - `tether probe ADDR` ([`probe`]) tests, from here, each layer towards a server: [`path`] (ICMP echo),
//!   [`transport`] (TCP connect), [`tls`] (when asked), [`app`] (`HELLO` → `WELCOME`) and [`round_trips`]
//!   (`PING`/`PONG` beside the kernel's `TCP_INFO` for the same socket). The layers fill an [`Evidence`]; the
//!   pure [`Evidence::verdict`] turns it into a [`Verdict`], whose exit code is stable ([`evidence`] holds both,
//!   and how they print).
//! - `tether probe --server ADMIN --id ID` ([`from_server`]) asks a server's admin API to ping one of its
//!   clients now (`POST /v1/sessions/{id}/probe`): the network or the client's program?
//!
//! A `HELLO` that the server's kernel acknowledged and its program did not answer gets a [`second_look`] before
//! it is called a stall: the server's receive queue when its socket is visible from here, else a nudge that a
//! listener waiting for the rest of a request answers.
//!
//! The probe speaks the protocol with the codec itself rather than through [`tether::Client`]: it must see the
//! bytes a foreign service answers, time each step, and read `TCP_INFO` of its own socket. It connects as a
//! throwaway id (`probe-` and random hex) unless `--id` is given; a live client's id would be taken over.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::{Bytes, BytesMut};
use serde_json::{json, Value};
use tether::probe::{unanswered, Unanswered};
use tether::proto::frame::{self, Bye, Frame, Hello, PROTOCOL_VERSION};
use tether::proto::{ping_allowance, CloseReason};
use tether::sockopt::tcp_info;
use tether::ClientTls;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::duration::{self, ms};
use crate::output::Lines;

mod evidence;

pub use evidence::Verdict;
use evidence::{
    describe_app, describe_path, describe_round_trips, describe_tls, describe_transport, evidence_json, App, Ended,
    Evidence, Idle, Path, RoundTrips, Tls, Transport,
};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The server, HOST:PORT (the port defaults to 7400).
    #[arg(required_unless_present = "server", conflicts_with = "server")]
    addr: Option<String>,
    /// The client id to say `HELLO` as [default: `probe-` and random hex]. A live client's id would be taken
    /// over; with `--server`, the id of the connected client to probe.
    #[arg(long, value_parser = client_id)]
    id: Option<String>,
    /// File holding the token for `--id`, for a server that requires one.
    #[arg(long, value_name = "FILE")]
    token_file: Option<std::path::PathBuf>,
    #[command(flatten)]
    tls: crate::connect::TlsArgs,
    /// Round trips (`PING`/`PONG`) after the handshake.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    count: u32,
    /// Time between round trips (stretched when the server's `PING` allowance asks for it).
    #[arg(long, value_parser = duration::parse, value_name = "DUR", default_value = "200ms")]
    interval: Duration,
    /// How long each step may take: the TCP connect, the TLS handshake, the `WELCOME`, each `PONG` (the ICMP
    /// echo gets at most one second).
    #[arg(long, value_parser = duration::parse, value_name = "DUR", default_value = "5s")]
    timeout: Duration,
    /// After the round trips, leave the connection idle this long, then ping once more: whether the path keeps an
    /// idle connection. A NAT or firewall that forgets idle connections sooner is `middlebox_forgot`. The probe
    /// asks the server for a heartbeat of this interval, so the server stays quiet meanwhile.
    #[arg(long, value_parser = idle_duration, value_name = "DUR")]
    idle: Option<Duration>,
    /// Print only one JSON object: the verdict, each layer's evidence and the timings.
    #[arg(long)]
    json: bool,
    /// Ask this server's admin API (HOST:PORT) to probe its client `--id` instead.
    #[arg(long, value_name = "ADMIN", requires = "id")]
    server: Option<String>,
    /// With `--server`: the admin API's bearer token, from this file [default: $TETHER_ADMIN_TOKEN].
    #[arg(long, value_name = "FILE", requires = "server")]
    admin_token_file: Option<std::path::PathBuf>,
}

/// The ICMP layer's whole wait: three echoes, a third of it apart.
const ICMP_WAIT: Duration = Duration::from_secs(1);
/// Bytes of a foreign answer kept as evidence.
const FOREIGN_BYTES: usize = 48;
/// Sent after a `HELLO` that the server's process read and did not answer: the end of a line, and of an empty
/// header block. A listener that waits for the client to finish its request (an HTTP server waits for the end of
/// its request line, Redis for the end of a command) answers this; a tether server answers `HELLO` first.
const NUDGE: &[u8] = b"\r\n\r\n";
/// How long the nudge is given (at most `--timeout`).
const NUDGE_WAIT: Duration = Duration::from_secs(1);
/// How long the kernel may take to say what the server's socket holds.
const LOOKUP_WAIT: Duration = Duration::from_secs(1);

// ---- running it ----

/// `--idle`: at least a second (NATs forget in seconds or minutes; shorter says nothing).
fn idle_duration(s: &str) -> Result<Duration, String> {
    let d = duration::parse(s)?;
    if d < Duration::from_secs(1) {
        return Err(format!("--idle {s}: at least 1s"));
    }
    Ok(d)
}

/// A client id the server can accept: 1 to 128 bytes of UTF-8.
fn client_id(s: &str) -> Result<String, String> {
    match s.len() {
        1..=frame::MAX_ID_LEN => Ok(s.to_owned()),
        n => Err(format!("a client id is 1 to {} bytes, not {n}", frame::MAX_ID_LEN)),
    }
}

impl Args {
    /// `--server`: a blocking request to the admin API, run before any runtime starts.
    pub fn is_from_server(&self) -> bool {
        self.server.is_some()
    }
}

/// What `run` needs from files, read before the runtime starts (nothing that can block runs on it).
pub struct Prepared {
    args: Args,
    target: String,
    credential: Vec<u8>,
    tls: Option<ClientTls>,
}

/// Read the token and TLS files and settle the target's port.
pub fn prepare(args: Args) -> anyhow::Result<Prepared> {
    let target = args.addr.clone().context("an address to probe (HOST:PORT)")?;
    let target = with_port(&target);
    let mut credential = Vec::new();
    if let Some(path) = &args.token_file {
        let token = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        credential = token.trim().as_bytes().to_vec();
    }
    let tls = client_tls(&args, &target)?;
    Ok(Prepared { args, target, credential, tls })
}

pub async fn run(p: Prepared) -> anyhow::Result<ExitCode> {
    let Prepared { args, target, credential, tls } = p;
    // The resolver runs on tokio's blocking pool, never on a runtime thread; a resolver that does not answer
    // gets the same patience as every other step.
    let addr = tokio::time::timeout(args.timeout, tokio::net::lookup_host(&target))
        .await
        .map_err(|_| anyhow::anyhow!("cannot resolve {target}: no answer in {}", duration::human(args.timeout)))?
        .with_context(|| format!("cannot resolve {target}"))?
        .next()
        .with_context(|| format!("{target} resolves to no address"))?;
    let out =
        Lines::spawn("stdout", std::io::stdout(), 64, |n| format!("({n} lines dropped: stdout was not keeping up)"));
    let human = (!args.json).then_some(&out);
    if let Some(o) = human {
        o.line(format!("probe {target} ({addr})"));
    }
    let started = Instant::now();
    let id = args.id.clone().unwrap_or_else(|| format!("probe-{:016x}", rand::random::<u64>()));
    let ev = probe(addr, &id, credential, tls, &args, human).await;
    let (verdict, why) = ev.verdict();
    if args.json {
        let mut v = evidence_json(&ev);
        v["target"] = json!(target);
        v["address"] = json!(addr.to_string());
        v["id"] = json!(id);
        v["verdict"] = json!(verdict.as_str());
        v["exit_code"] = json!(verdict.exit_code());
        v["explanation"] = json!(why);
        v["took_ms"] = json!(ms(started.elapsed()));
        out.line(v.to_string());
    } else {
        out.line(format!("verdict    {}: {why}", verdict.as_str()));
    }
    out.finish(Duration::from_secs(2));
    Ok(ExitCode::from(verdict.exit_code()))
}

/// `target` with the default port when it names none (an IPv6 address in brackets).
fn with_port(target: &str) -> String {
    match target.parse::<IpAddr>() {
        Ok(IpAddr::V6(ip)) => format!("[{ip}]:7400"),
        _ if has_port(target) => target.to_owned(),
        _ => format!("{target}:7400"),
    }
}

fn has_port(target: &str) -> bool {
    if target.parse::<SocketAddr>().is_ok() {
        return true;
    }
    if target.starts_with('[') || target.parse::<IpAddr>().is_ok() {
        return false;
    }
    target.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok())
}

fn client_tls(args: &Args, target: &str) -> anyhow::Result<Option<ClientTls>> {
    let Some(tls) = args.tls.client_tls()? else { return Ok(None) };
    // As `tether connect`: the certificate is checked against the host name the address was given with.
    let host = target.rsplit_once(':').map_or(target, |(h, _)| h).trim_start_matches('[').trim_end_matches(']');
    if args.tls.has_server_name() || host.parse::<IpAddr>().is_ok() {
        return Ok(Some(tls));
    }
    Ok(Some(tls.with_server_name(host)?))
}

/// Every layer in order; a layer that fails ends the probe.
async fn probe(
    addr: SocketAddr,
    id: &str,
    credential: Vec<u8>,
    tls: Option<ClientTls>,
    args: &Args,
    out: Option<&Lines>,
) -> Evidence {
    let say = |layer: &str, s: String| {
        if let Some(o) = out {
            o.line(format!("{layer:<10} {s}"));
        }
    };
    let path = path(addr.ip(), ICMP_WAIT).await;
    say("path", describe_path(&path));
    let mut ev = Evidence {
        path,
        transport: Transport::TimedOut { waited: args.timeout },
        tls: None,
        app: None,
        round_trips: None,
        idle: None,
        kernel: None,
    };
    let (transport, tcp) = transport(addr, args.timeout).await;
    say("transport", describe_transport(&transport));
    ev.transport = transport;
    let Some(tcp) = tcp else { return ev };
    let ends = tcp.local_addr().ok().zip(tcp.peer_addr().ok());
    // A second descriptor of the same socket: the kernel's view stays readable after a failed TLS handshake has
    // dropped the stream (and its descriptor number cannot be reused by another socket meanwhile).
    let kernel_fd = match socket2::SockRef::from(&tcp).try_clone() {
        Ok(dup) => dup,
        Err(e) => {
            ev.transport = Transport::Failed { took: Duration::ZERO, error: format!("duplicating the socket: {e}") };
            return ev;
        }
    };
    let fd = kernel_fd.as_raw_fd();
    match tls {
        None => {
            let mut wire = Wire::new(tcp);
            session(&mut wire, fd, ends, id, credential, args, &mut ev, &say).await;
        }
        Some(cfg) => {
            let started = Instant::now();
            let connector = tokio_rustls::TlsConnector::from(cfg.rustls_config());
            let handshake = connector.connect(cfg.server_name_for(addr), tcp);
            let t = match tokio::time::timeout(args.timeout, handshake).await {
                Ok(Ok(s)) => {
                    let version = s.get_ref().1.protocol_version().map_or("?".into(), |v| format!("{v:?}"));
                    Ok((s, Tls::Done { took: started.elapsed(), version }))
                }
                Ok(Err(e)) => {
                    let rustls = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
                    let hint = rustls.and_then(tether::tls::explain).map(str::to_owned);
                    Err(Tls::Failed { took: started.elapsed(), error: e.to_string(), hint })
                }
                Err(_) => Err(Tls::NoAnswer { waited: args.timeout }),
            };
            match t {
                Ok((stream, done)) => {
                    say("tls", describe_tls(&done));
                    ev.tls = Some(done);
                    let mut wire = Wire::new(stream);
                    session(&mut wire, fd, ends, id, credential, args, &mut ev, &say).await;
                }
                Err(failed) => {
                    say("tls", describe_tls(&failed));
                    ev.tls = Some(failed);
                    ev.kernel = tcp_info(fd);
                }
            }
        }
    }
    ev
}

/// Layers 4 and 5 on an open stream; `fd` is its TCP socket, for `TCP_INFO`, and `ends` its (local, peer)
/// addresses.
#[allow(clippy::too_many_arguments)]
async fn session<S: AsyncRead + AsyncWrite + Unpin>(
    wire: &mut Wire<S>,
    fd: RawFd,
    ends: Option<(SocketAddr, SocketAddr)>,
    id: &str,
    credential: Vec<u8>,
    args: &Args,
    ev: &mut Evidence,
    say: &impl Fn(&str, String),
) {
    let heartbeat_ms = args.idle.map_or(0, |d| u32::try_from(d.as_millis()).unwrap_or(u32::MAX));
    let mut app = app(wire, id, credential, heartbeat_ms, args.timeout).await;
    // The kernel's view when HELLO went unanswered: whether HELLO itself was acknowledged.
    let mut kernel = None;
    if let App::NoAnswer { waited, .. } = app {
        kernel = tcp_info(fd);
        if !matches!(unanswered(kernel), Unanswered::PathDown(_)) {
            app = second_look(wire, ends, waited, args.timeout).await;
        }
    }
    say("app", describe_app(&app));
    let welcomed = match &app {
        App::Welcome { heartbeat, timeout, .. } => Some((*heartbeat, *timeout)),
        _ => None,
    };
    ev.app = Some(app);
    if let Some((heartbeat, timeout)) = welcomed {
        // The probe reads only while it waits for a PONG: a PING at least once a heartbeat keeps the server from
        // judging the probe itself silent.
        let interval = if heartbeat.is_zero() { args.interval } else { args.interval.min(heartbeat) };
        if interval < args.interval {
            say("round trip", format!("interval cut to the server's heartbeat, {}", duration::human(interval)));
        }
        let r = round_trips(wire, args.count, interval, args.timeout, heartbeat, timeout, say).await;
        ev.kernel = tcp_info(fd);
        say("round trip", describe_round_trips(&r, ev.kernel.as_ref()));
        let fine = r.ended.is_none() && r.unanswered.is_none();
        ev.round_trips = Some(r);
        if let (Some(idle), true, Some((_, peer))) = (args.idle, fine, ends) {
            // The server quiets down for as long as its heartbeat allows: never longer than the negotiated interval.
            let idle = if heartbeat.is_zero() { idle } else { idle.min(heartbeat) };
            if idle < args.idle.unwrap_or_default() {
                say(
                    "idle",
                    format!("the server allows a heartbeat of {} at most: idle for that", duration::human(idle)),
                );
            }
            let i = idle_check(wire, idle, args.timeout, peer).await;
            say("idle", evidence::describe_idle(&i));
            let lost = matches!(i, Idle::Lost { .. });
            ev.idle = Some(i);
            if lost {
                ev.kernel = tcp_info(fd);
                return;
            }
        }
        if ev.round_trips.as_ref().is_some_and(|r| r.ended.is_none()) {
            let bye = Frame::Bye(Bye { reason: CloseReason::Bye, retry_after_ms: 0, alternative: String::new() });
            let _ = tokio::time::timeout(Duration::from_secs(1), wire.send(&bye)).await;
            let _ = tokio::time::timeout(Duration::from_secs(1), wire.io.shutdown()).await;
        }
    } else {
        ev.kernel = kernel.or_else(|| tcp_info(fd));
    }
}

/// `HELLO` was acknowledged by the server's kernel and got no answer: before calling the program stalled, look
/// again. A stalled process never reads, so its socket still holds `HELLO`: when the server is on this host (and
/// in this network namespace), the kernel says how many bytes wait unread in its receive queue, and a non-zero
/// count settles it. Otherwise (its process read `HELLO`, or its socket is not visible from here) the server gets
/// [`NUDGE`]: a listener that waits for the client to finish a request answers it, and what answers it is not
/// tether.
async fn second_look<S: AsyncRead + AsyncWrite + Unpin>(
    wire: &mut Wire<S>,
    ends: Option<(SocketAddr, SocketAddr)>,
    waited: Duration,
    wait: Duration,
) -> App {
    let unread = match ends {
        Some((local, peer)) => {
            let lookup = tokio::task::spawn_blocking(move || crate::sockets::lookup(peer, local));
            match tokio::time::timeout(LOOKUP_WAIT, lookup).await {
                Ok(Ok(Ok(Some(socket)))) => Some(socket.recv_q),
                _ => None,
            }
        }
        None => None,
    };
    if unread.is_some_and(|n| n > 0) {
        return App::NoAnswer { waited, unread, nudged: None };
    }
    let started = Instant::now();
    let nudge_wait = wait.min(NUDGE_WAIT);
    let sent = async {
        wire.io.write_all(NUDGE).await?;
        wire.io.flush().await
    };
    let answer = match tokio::time::timeout(nudge_wait, sent).await {
        Ok(Ok(())) => match wire.recv(started + nudge_wait).await {
            Got::Timeout => return App::NoAnswer { waited, unread, nudged: Some(nudge_wait) },
            got => answer(wire, got, started.elapsed(), nudge_wait),
        },
        Ok(Err(e)) => App::Closed { took: started.elapsed(), reset: e.kind() != std::io::ErrorKind::UnexpectedEof },
        Err(_) => return App::NoAnswer { waited, unread, nudged: Some(nudge_wait) },
    };
    App::Nudged { waited, answer: Box::new(answer) }
}

/// Layer 1: up to three ICMP echoes, the first answer wins.
async fn path(ip: IpAddr, wait: Duration) -> Path {
    use surge_ping::{Config, PingIdentifier, PingSequence, SurgeError, ICMP};
    let kind = if ip.is_ipv4() { ICMP::V4 } else { ICMP::V6 };
    let client = match surge_ping::Client::new(&Config::builder().kind(kind).build()) {
        Ok(c) => c,
        Err(e) => {
            let e = e.to_string();
            return Path::Unavailable {
                why: format!("no ICMP socket: {}", e.lines().next().unwrap_or("unknown error")),
            };
        }
    };
    let socket =
        if client.get_socket().get_type() == socket2::Type::RAW { "raw socket" } else { "unprivileged ICMP socket" };
    let mut pinger = client.pinger(ip, PingIdentifier(rand::random())).await;
    let started = Instant::now();
    for seq in 0..3u16 {
        let left = wait.saturating_sub(started.elapsed());
        pinger.timeout(if seq < 2 { wait / 3 } else { left });
        match pinger.ping(PingSequence(seq), &[0x74; 16]).await {
            Ok((_, rtt)) => return Path::Reply { rtt, socket },
            Err(SurgeError::Timeout { .. }) => {}
            Err(e) => {
                let e = e.to_string();
                return Path::Error { error: e.lines().next().unwrap_or("unknown error").to_owned(), socket };
            }
        }
    }
    Path::NoAnswer { waited: started.elapsed(), socket }
}

/// Layer 2: the TCP connect, classified by what answered it.
async fn transport(addr: SocketAddr, wait: Duration) -> (Transport, Option<TcpStream>) {
    let started = Instant::now();
    match tokio::time::timeout(wait, TcpStream::connect(addr)).await {
        Err(_) => (Transport::TimedOut { waited: wait }, None),
        Ok(Ok(s)) => {
            let took = started.elapsed();
            let _ = s.set_nodelay(true);
            let local = s.local_addr().unwrap_or(SocketAddr::new(IpAddr::from([0, 0, 0, 0]), 0));
            (Transport::Connected { took, local }, Some(s))
        }
        Ok(Err(e)) => {
            let took = started.elapsed();
            let t = match e.kind() {
                std::io::ErrorKind::ConnectionRefused => Transport::Refused { took },
                std::io::ErrorKind::HostUnreachable => Transport::HostUnreachable { took },
                std::io::ErrorKind::NetworkUnreachable => Transport::NetUnreachable { took },
                _ => Transport::Failed { took, error: e.to_string() },
            };
            (t, None)
        }
    }
}

/// A random nonce with no `\r` or `\n` byte. A listener that reads lines then always waits after `HELLO` for the
/// rest of its line and answers only the [`NUDGE`], so the same listener gets the same report on every run
/// (about one random nonce in thirty would otherwise end its line early).
fn line_free_nonce() -> u64 {
    loop {
        let nonce: u64 = rand::random();
        if !nonce.to_be_bytes().iter().any(|b| matches!(b, b'\r' | b'\n')) {
            return nonce;
        }
    }
}

/// Layer 4: `HELLO`, and what came back.
async fn app<S: AsyncRead + AsyncWrite + Unpin>(
    wire: &mut Wire<S>,
    id: &str,
    credential: Vec<u8>,
    heartbeat_ms: u32,
    wait: Duration,
) -> App {
    let started = Instant::now();
    let mut hello = Hello::new(PROTOCOL_VERSION, id, line_free_nonce());
    hello.credential = credential.into();
    hello.heartbeat_ms = heartbeat_ms;
    if let Err(e) = wire.send(&Frame::Hello(hello)).await {
        return App::Closed { took: started.elapsed(), reset: e.kind() != std::io::ErrorKind::UnexpectedEof };
    }
    let got = wire.recv(started + wait).await;
    answer(wire, got, started.elapsed(), wait)
}

/// What one read brought, as the answer to a `HELLO` sent `took` ago (given `wait`).
fn answer<S>(wire: &mut Wire<S>, got: Got, took: Duration, wait: Duration) -> App {
    let took = || took;
    match got {
        Got::Frame(Frame::Welcome(w)) => {
            wire.version = w.version;
            if let Some(max) = w.max_frame {
                wire.max = frame::peer_max_frame(max).max(frame::DEFAULT_MAX_FRAME);
            }
            App::Welcome {
                took: took(),
                server_id: w.server_id,
                epoch: w.epoch,
                version: w.version,
                heartbeat: Duration::from_millis(w.heartbeat_ms.into()),
                timeout: Duration::from_millis(w.timeout_ms.into()),
            }
        }
        Got::Frame(Frame::Bye(b)) => App::Refused {
            took: took(),
            reason: b.reason,
            retry_after: Duration::from_millis(b.retry_after_ms.into()),
            alternative: b.alternative,
        },
        Got::Frame(other) => App::Unexpected { took: took(), frame: other.name() },
        Got::Foreign(first) => App::Foreign { took: took(), what: protocol(&first), first },
        Got::Closed { reset } => App::Closed { took: took(), reset },
        Got::Timeout => App::NoAnswer { waited: wait, unread: None, nudged: None },
    }
}

/// Layer 5: `count` round trips. The server allows a burst of `PING`s and then one per half heartbeat interval
/// (its flood rule); the pacing stays inside that, so `--count` is never punished with `BYE(ping_flood)`.
async fn round_trips<S: AsyncRead + AsyncWrite + Unpin>(
    wire: &mut Wire<S>,
    count: u32,
    interval: Duration,
    wait: Duration,
    heartbeat: Duration,
    timeout: Duration,
    say: &impl Fn(&str, String),
) -> RoundTrips {
    let mut r = RoundTrips { interval, ..RoundTrips::default() };
    // The server starts a session with a full allowance; refilling at 3/4 of its rate keeps a margin against
    // jitter between the two clocks.
    let cap = ping_allowance(heartbeat, timeout).max(1) as f64;
    let refill = if heartbeat.is_zero() { f64::INFINITY } else { 1.5 / heartbeat.as_secs_f64() };
    let mut tokens = cap;
    let origin = Instant::now();
    let mut last = origin;
    let mut next = origin;
    for seq in 1..=count {
        let now = Instant::now();
        tokens = (tokens + refill * (now - last).as_secs_f64()).min(cap);
        last = now;
        if tokens < 1.0 {
            let gap = Duration::from_secs_f64(1.0 / refill);
            next = next.max(now + Duration::from_secs_f64((1.0 - tokens) / refill));
            if r.interval < gap {
                r.interval = gap;
                say(
                    "round trip",
                    format!(
                        "paced: the server allows {cap} PINGs at once, then the probe sends one every {}",
                        duration::human(gap)
                    ),
                );
            }
        }
        tokio::time::sleep_until(next).await;
        let now = Instant::now();
        tokens = (tokens + refill * (now - last).as_secs_f64()).min(cap) - 1.0;
        last = now;
        let sent = Instant::now();
        let ts = (sent - origin).as_micros() as u64;
        if let Err(e) = wire.send(&Frame::Ping { seq, ts_ms: ts }).await {
            r.ended = Some(Ended::Failed(e.to_string()));
            return r;
        }
        r.sent = seq;
        loop {
            let ended = match wire.recv(sent + wait).await {
                Got::Frame(Frame::Pong { seq: s, .. }) if s == seq => {
                    r.rtts.push(sent.elapsed());
                    break;
                }
                // The server's own round-trip probe: answer it like any client.
                Got::Frame(Frame::Ping { seq: s, ts_ms }) => match wire.send(&Frame::Pong { seq: s, ts_ms }).await {
                    Ok(()) => continue,
                    Err(e) => Ended::Failed(e.to_string()),
                },
                Got::Frame(Frame::Bye(b)) => Ended::Bye(b.reason),
                Got::Frame(_) => continue,
                Got::Foreign(first) => Ended::Foreign(first),
                Got::Closed { reset } => Ended::Closed { reset },
                Got::Timeout => {
                    r.unanswered = Some(wait);
                    return r;
                }
            };
            r.ended = Some(ended);
            return r;
        }
        next = sent + interval;
    }
    r
}

/// Layer 6 (`--idle`): say nothing for `idle`, then `PING` and wait up to `wait` for the `PONG`. When it does not
/// come, a new TCP connection to `peer` tells a path that works from one that does not; it is closed at once.
/// (Whether the server's kernel took the `PING`, which tells a stalled server from a forgotten connection, is
/// the kernel's view the caller reads next.)
async fn idle_check<S: AsyncRead + AsyncWrite + Unpin>(
    wire: &mut Wire<S>,
    idle: Duration,
    wait: Duration,
    peer: SocketAddr,
) -> Idle {
    tokio::time::sleep(idle).await;
    let sent = Instant::now();
    let seq = u32::MAX;
    let mut no_answer = None;
    let how = match wire.send(&Frame::Ping { seq, ts_ms: 0 }).await {
        Err(e) => format!("an error ({e})"),
        Ok(()) => loop {
            match wire.recv(sent + wait).await {
                Got::Frame(Frame::Pong { seq: s, .. }) if s == seq => {
                    return Idle::Kept { idle, rtt: sent.elapsed() };
                }
                Got::Frame(Frame::Ping { seq: s, ts_ms }) => {
                    let _ = wire.send(&Frame::Pong { seq: s, ts_ms }).await;
                }
                Got::Frame(Frame::Bye(b)) => break format!("BYE({})", b.reason.as_str()),
                Got::Frame(_) => {}
                Got::Foreign(_) => break "bytes that are not tether".into(),
                Got::Closed { reset: true } => break "a reset".into(),
                Got::Closed { reset: false } => break "a close".into(),
                Got::Timeout => {
                    no_answer = Some(wait);
                    break format!("no PONG in {}", duration::human(wait));
                }
            }
        },
    };
    let started = Instant::now();
    let fresh = match tokio::time::timeout(wait, TcpStream::connect(peer)).await {
        Ok(Ok(_)) => Ok(started.elapsed()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer in {}", duration::human(wait))),
    };
    Idle::Lost { idle, how, no_answer, fresh }
}

/// The protocol foreign bytes speak, when it can be told: as the codec sniffs it, or an HTML page (an HTTP server
/// that answers a request it cannot parse with a bare page, as HTTP/0.9 did).
fn protocol(first: &[u8]) -> Option<&'static str> {
    let html = |b: &[u8]| {
        let start: Vec<u8> = b.iter().take(14).map(u8::to_ascii_lowercase).collect();
        start.starts_with(b"<!doctype html") || start.starts_with(b"<html")
    };
    frame::sniff(first).map(|f| f.name()).or_else(|| html(first).then_some("HTML"))
}

/// What one read brought.
#[derive(Debug)]
enum Got {
    Frame(Frame),
    /// Bytes that are no tether frame: the first few.
    Foreign(Bytes),
    Closed {
        reset: bool,
    },
    Timeout,
}

/// Frames over any byte stream, read by the codec.
struct Wire<S> {
    io: S,
    buf: BytesMut,
    /// The largest frame accepted: the default until the `WELCOME` says otherwise. A foreign answer's first four
    /// bytes read as a length far above it, so it is recognised at once.
    max: u32,
    version: u8,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Wire<S> {
    fn new(io: S) -> Wire<S> {
        Wire { io, buf: BytesMut::with_capacity(4096), max: frame::DEFAULT_MAX_FRAME, version: PROTOCOL_VERSION }
    }

    async fn send(&mut self, f: &Frame) -> std::io::Result<()> {
        self.io.write_all(&f.to_bytes_v(self.version)).await?;
        self.io.flush().await
    }

    async fn recv(&mut self, deadline: Instant) -> Got {
        loop {
            match frame::check(&self.buf, self.max) {
                Ok(Some(n)) => {
                    let bytes = self.buf.split_to(n);
                    return match Frame::parse_v(&bytes, self.version) {
                        Ok(f) => Got::Frame(f),
                        Err(_) => Got::Foreign(bytes.freeze().slice(..n.min(FOREIGN_BYTES))),
                    };
                }
                Ok(None) => {}
                Err(_) => return Got::Foreign(self.first()),
            }
            match tokio::time::timeout_at(deadline, self.io.read_buf(&mut self.buf)).await {
                // Bytes that stopped short of a frame are an answer too: whatever sent them is no tether server.
                Err(_) if !self.buf.is_empty() => return Got::Foreign(self.first()),
                Err(_) => return Got::Timeout,
                Ok(Ok(0)) if !self.buf.is_empty() => return Got::Foreign(self.first()),
                Ok(Ok(0)) => return Got::Closed { reset: false },
                Ok(Ok(_)) => {}
                Ok(Err(_)) if !self.buf.is_empty() => return Got::Foreign(self.first()),
                Ok(Err(_)) => return Got::Closed { reset: true },
            }
        }
    }

    fn first(&self) -> Bytes {
        Bytes::copy_from_slice(&self.buf[..self.buf.len().min(FOREIGN_BYTES)])
    }
}

// ---- output ----
// ---- from the server's side ----

/// `--server ADMIN --id ID`: the server pings its client now; the verdict is the server's.
pub fn from_server(args: &Args) -> anyhow::Result<ExitCode> {
    use std::net::ToSocketAddrs;
    let admin = args.server.as_deref().context("--server ADMIN")?;
    let id = args.id.as_deref().context("--server needs --id")?;
    let addr = admin
        .to_socket_addrs()
        .with_context(|| format!("the admin address {admin}"))?
        .next()
        .with_context(|| format!("{admin} resolves to no address"))?;
    let token = match &args.admin_token_file {
        Some(p) => {
            Some(std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?.trim().to_owned())
        }
        None => std::env::var("TETHER_ADMIN_TOKEN").ok().filter(|t| !t.is_empty()),
    };
    let wait = args.timeout.min(Duration::from_secs(30));
    let body = json!({ "timeout": format!("{}ms", wait.as_millis()) }).to_string();
    let path = format!("/v1/sessions/{}/probe", crate::sockets::percent(id));
    let (status, answer) = tether_bench::scrape::request_with(
        addr,
        "POST",
        &path,
        Some(&body),
        token.as_deref(),
        wait + Duration::from_secs(5),
    )?;
    let v: Value =
        serde_json::from_str(&answer).with_context(|| format!("the admin API answered {status}: {answer}"))?;
    if status != 200 {
        bail!("the admin API answered {status}: {}", v["error"].as_str().unwrap_or(answer.trim()));
    }
    let name = v["verdict"].as_str().unwrap_or_default();
    let verdict = Verdict::from_name(name).with_context(|| format!("unknown verdict {name:?} from the server"))?;
    let line = if args.json {
        let mut v = v;
        v["exit_code"] = json!(verdict.exit_code());
        v.to_string()
    } else {
        // Durations as the server's evidence writes them (`{:.1?}`: 135.0µs, 1.2ms), one style in every line.
        let d = |x: &Value| match x.as_f64().and_then(|ms| Duration::try_from_secs_f64(ms / 1e3).ok()) {
            Some(d) => format!("{d:.1?}"),
            None => "?".to_owned(),
        };
        let mut s = format!("probe of client {id} from {admin}\n");
        if !v["app_rtt_ms"].is_null() {
            let _ = writeln!(s, "{:<10} PONG in {}", "app", d(&v["app_rtt_ms"]));
        } else {
            let _ = writeln!(s, "{:<10} no PONG in {}", "app", d(&v["waited_ms"]));
        }
        let k = &v["kernel"];
        if k.is_object() {
            let _ = writeln!(
                s,
                "{:<10} {} RTT {} ± {}, {} unacknowledged, {} retransmits",
                "kernel",
                k["state"].as_str().unwrap_or("?"),
                d(&k["rtt_ms"]),
                d(&k["rttvar_ms"]),
                k["unacked"],
                k["retransmits"]
            );
        }
        let _ = write!(s, "verdict    {name}: {}", v["evidence"].as_str().unwrap_or_default());
        s
    };
    crate::emit_line(&line);
    Ok(ExitCode::from(verdict.exit_code()))
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_without_a_port_take_the_default() {
        assert!(has_port("127.0.0.1:7400") && has_port("[::1]:1") && has_port("example.net:80"));
        assert!(!has_port("127.0.0.1") && !has_port("::1") && !has_port("example.net"));
        assert_eq!(with_port("::1"), "[::1]:7400");
        assert_eq!(with_port("example.net"), "example.net:7400");
        assert_eq!(with_port("[::1]:9"), "[::1]:9");
    }

    /// What one `recv` makes of `parts` written one after another (then closed when `close`).
    async fn read_parts(parts: &[&[u8]], close: bool) -> Got {
        let (mut a, b) = tokio::io::duplex(1024);
        let parts: Vec<Vec<u8>> = parts.iter().map(|p| p.to_vec()).collect();
        let writer = tokio::spawn(async move {
            for p in parts {
                a.write_all(&p).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            if !close {
                std::future::pending::<()>().await;
            }
        });
        let mut w = Wire::new(b);
        let got = w.recv(Instant::now() + Duration::from_millis(50)).await;
        writer.abort();
        got
    }

    async fn read_from(bytes: &'static [u8], close: bool) -> Got {
        read_parts(&[bytes], close).await
    }

    #[tokio::test(start_paused = true)]
    async fn reads_tell_frames_from_foreign_bytes() {
        let bye = Frame::Bye(Bye { reason: CloseReason::Busy, retry_after_ms: 0, alternative: String::new() });
        let bytes: &'static [u8] = Box::leak(bye.to_bytes_v(PROTOCOL_VERSION).to_vec().into_boxed_slice());
        assert!(matches!(read_from(bytes, false).await, Got::Frame(Frame::Bye(_))));
        // One frame in three reads: the header split, then the body.
        let split = read_parts(&[&bytes[..2], &bytes[2..6], &bytes[6..]], false).await;
        assert!(matches!(split, Got::Frame(Frame::Bye(_))), "{split:?}");
        // A length far beyond the limit is foreign at once, before anything is allocated for it.
        assert!(matches!(read_from(b"\x7f\xff\xff\xff\x05", false).await, Got::Foreign(_)));
        match read_from(b"HTTP/1.1 400 Bad Request\r\n\r\n", false).await {
            Got::Foreign(b) => assert_eq!(frame::sniff(&b).map(|f| f.name()), Some("HTTP")),
            other => panic!("{other:?}"),
        }
        assert!(matches!(read_from(b"", true).await, Got::Closed { reset: false }));
        assert!(matches!(read_from(b"", false).await, Got::Timeout));
        // Three bytes and silence: short of a frame header, still an answer that is not tether.
        assert!(matches!(read_from(b"ok\n", false).await, Got::Foreign(_)));
    }
}
