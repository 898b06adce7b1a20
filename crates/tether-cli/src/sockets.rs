//! `tether sockets`: the kernel's TCP socket table for the server's port, beside tether's own sessions.
//!
//! # Layout
//! [`dump`] asks the kernel for every TCP socket over NETLINK_SOCK_DIAG (inet_diag; IPv4 and IPv6, with
//! `TCP_INFO`), without parsing `ss` or `/proc/net/tcp`; no root is needed. [`run`] keeps the sockets of the
//! server's port (or of one process, by the socket inodes in `/proc/PID/fd`), joins each with the session that
//! holds it from the admin API (`/v1/sessions`, matched by the peer's address), flags the ones the kernel has and
//! tether does not ([`Flag`]), and prints a table or JSON lines. Everything here runs before any runtime starts:
//! the netlink dump and the admin requests are plain blocking calls of a one-shot command. [`lookup`] asks for one
//! socket by its two addresses (`tether probe` reads a local server's receive queue with it, off the runtime).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST};
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP};
use netlink_packet_sock_diag::inet::nlas::Nla;
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, InetResponse, SocketId, StateFlags, Timer};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket};
use serde_json::{json, Value};
use tether::sockopt::tcp_state_name as state_name;

use crate::duration::{human, ms};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The server's port [default: 7400].
    #[arg(long, conflicts_with = "pid")]
    port: Option<u16>,
    /// Every TCP socket of this process instead of one port.
    #[arg(long)]
    pid: Option<u32>,
    /// Only these states, comma-separated (established, close_wait, listen, time_wait, syn_recv, ...).
    #[arg(long, value_delimiter = ',')]
    state: Vec<String>,
    /// Only sockets the kernel holds and tether does not; exit 1 when there are any, or when nothing listens on
    /// the port (a health check).
    #[arg(long)]
    ghosts: bool,
    /// One JSON object per socket instead of the table.
    #[arg(long)]
    json: bool,
    /// The server's admin API, to join sockets with sessions, or `off` [default: 127.0.0.1:7401].
    #[arg(long, value_name = "ADDR|off")]
    admin: Option<String>,
    /// An established socket no session holds is an orphan once it has received nothing for this long: a
    /// connection still saying `HELLO` has no session yet either (the default is the handshake timeout).
    #[arg(long, value_parser = crate::duration::parse, value_name = "DUR", default_value = "5s")]
    orphan_after: Duration,
}

/// One TCP socket as the kernel reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct KernelSocket {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub state: u8,
    /// LISTEN: connections waiting to be accepted, and the backlog. Others: bytes unread, and bytes unacknowledged.
    pub recv_q: u32,
    pub send_q: u32,
    /// The kernel timer running on the socket: its name, when it fires, and its retransmission count.
    pub timer: Option<(&'static str, Duration, u8)>,
    /// 0 for a socket no process holds yet (waiting in an accept queue) or any longer (an orphan the kernel
    /// finishes alone).
    pub inode: u32,
    pub tcp: Option<TcpView>,
}

/// The parts of `TCP_INFO` the table shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpView {
    pub rtt: Duration,
    pub rttvar: Duration,
    pub unacked: u32,
    pub retransmits: u8,
    pub total_retrans: u32,
    pub last_data_recv: Duration,
    pub last_data_sent: Duration,
}

/// Why a socket is listed by `--ghosts`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flag {
    /// Established by the kernel, waiting in the accept queue: nobody has accepted it.
    Unaccepted,
    /// The peer closed and we have not: no kernel timer ends this; only our `close()` does.
    CloseWait,
    /// Established and held by the process, but no session holds it.
    Orphan,
}

impl Flag {
    fn as_str(self) -> &'static str {
        match self {
            Flag::Unaccepted => "unaccepted",
            Flag::CloseWait => "close_wait",
            Flag::Orphan => "orphan",
        }
    }
}

const ESTABLISHED: u8 = 1;
const CLOSE_WAIT: u8 = 8;
const LISTEN: u8 = 10;

/// Every TCP socket of both families.
pub fn dump() -> anyhow::Result<Vec<KernelSocket>> {
    let mut out = Vec::new();
    for family in [AF_INET, AF_INET6] {
        dump_family(family, &mut out).with_context(|| "asking the kernel for its TCP sockets (NETLINK_SOCK_DIAG)")?;
    }
    Ok(out)
}

fn dump_family(family: u8, out: &mut Vec<KernelSocket>) -> anyhow::Result<()> {
    let socket_id = if family == AF_INET { SocketId::new_v4() } else { SocketId::new_v6() };
    let socket = ask(family, NLM_F_REQUEST | NLM_F_DUMP, socket_id)?;
    let mut rx = vec![0u8; 64 * 1024];
    loop {
        let n = socket.recv(&mut &mut rx[..], 0)?;
        if decode(&rx[..n], out)? {
            return Ok(());
        }
    }
}

/// Send one sock_diag request for TCP sockets of `family` (with `TCP_INFO`); the answers are read from the socket
/// returned.
fn ask(family: u8, flags: u16, socket_id: SocketId) -> anyhow::Result<Socket> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&netlink_sys::SocketAddr::new(0, 0))?;
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    let request = SockDiagMessage::InetRequest(InetRequest {
        family,
        protocol: IPPROTO_TCP,
        extensions: ExtensionFlags::INFO,
        states: StateFlags::all(),
        socket_id,
    });
    let mut packet = NetlinkMessage::new(header, request.into());
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf);
    socket.send(&buf, 0)?;
    Ok(socket)
}

/// The one TCP socket of this network namespace whose local address is `local` and whose peer is `remote`:
/// `None` when the kernel holds no such socket here (the address is another host's, or the connection is gone).
/// One exact lookup, not a dump; a blocking call.
pub fn lookup(local: SocketAddr, remote: SocketAddr) -> anyhow::Result<Option<KernelSocket>> {
    let family = match (local, remote) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) => AF_INET,
        (SocketAddr::V6(_), SocketAddr::V6(_)) => AF_INET6,
        _ => bail!("{local} and {remote} are of two address families"),
    };
    let socket_id = SocketId {
        source_port: local.port(),
        destination_port: remote.port(),
        source_address: local.ip(),
        destination_address: remote.ip(),
        interface_id: 0,
        // INET_DIAG_NOCOOKIE: any socket with these four.
        cookie: [0xff; 8],
    };
    let socket = ask(family, NLM_F_REQUEST, socket_id).context("asking the kernel for one TCP socket")?;
    let mut rx = vec![0u8; 8 * 1024];
    let n = socket.recv(&mut &mut rx[..], 0)?;
    let msg = <NetlinkMessage<SockDiagMessage>>::deserialize(&rx[..n])
        .map_err(|e| anyhow::anyhow!("an undecodable sock_diag message: {e}"))?;
    match msg.payload {
        NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => Ok(Some(from_response(&r))),
        NetlinkPayload::Error(e) if e.code.is_some_and(|c| no_such_socket(c.get())) => Ok(None),
        NetlinkPayload::Error(e) => bail!("the kernel refused the lookup: {e:?}"),
        other => bail!("an unexpected answer to a sock_diag lookup: {other:?}"),
    }
}

/// Whether a netlink error code (a negative errno) is ENOENT: the kernel holds no such socket.
fn no_such_socket(code: i32) -> bool {
    std::io::Error::from_raw_os_error(-code).kind() == std::io::ErrorKind::NotFound
}

/// Decode one datagram of a dump into `out`; true when it carried the end of the dump.
pub fn decode(mut bytes: &[u8], out: &mut Vec<KernelSocket>) -> anyhow::Result<bool> {
    while !bytes.is_empty() {
        let msg = <NetlinkMessage<SockDiagMessage>>::deserialize(bytes)
            .map_err(|e| anyhow::anyhow!("an undecodable sock_diag message: {e}"))?;
        let len = msg.header.length as usize;
        match msg.payload {
            NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => out.push(from_response(&r)),
            NetlinkPayload::Done(_) => return Ok(true),
            NetlinkPayload::Error(e) => bail!("the kernel refused the dump: {e:?}"),
            _ => {}
        }
        if len == 0 || len > bytes.len() {
            break;
        }
        bytes = &bytes[(len + 3) & !3..];
    }
    Ok(false)
}

fn from_response(r: &InetResponse) -> KernelSocket {
    let h = &r.header;
    let id = &h.socket_id;
    let timer = h.timer.as_ref().map(|t| match t {
        Timer::Retransmit(d, n) => ("retransmit", *d, *n),
        Timer::KeepAlive(d) => ("keepalive", *d, 0),
        Timer::TimeWait => ("time_wait", Duration::ZERO, 0),
        Timer::Probe(d) => ("zero_window_probe", *d, 0),
    });
    let tcp = r.nlas.iter().find_map(|n| match n {
        Nla::TcpInfo(i) => Some(TcpView {
            rtt: Duration::from_micros(i.rtt.into()),
            rttvar: Duration::from_micros(i.rttvar.into()),
            unacked: i.unacked,
            retransmits: i.retransmits,
            total_retrans: i.total_retrans,
            last_data_recv: Duration::from_millis(i.last_data_recv.into()),
            last_data_sent: Duration::from_millis(i.last_data_sent.into()),
        }),
        _ => None,
    });
    KernelSocket {
        local: SocketAddr::new(id.source_address, id.source_port),
        remote: SocketAddr::new(id.destination_address, id.destination_port),
        state: h.state,
        recv_q: h.recv_queue,
        send_q: h.send_queue,
        timer,
        inode: h.inode,
        tcp,
    }
}

/// What the server knows of the peer on one socket, from `/v1/sessions`.
#[derive(Debug, Clone)]
struct Session {
    client: String,
    epoch: u64,
    last_frame: Duration,
    timeout: Duration,
}

/// How long one admin API request may take: a server that answers none in this time is not answering.
const ADMIN_WAIT: Duration = Duration::from_secs(3);

/// Every online session from the admin API, by the peer's address (all pages), or why there are none to join:
/// nothing listens at `admin`, it listens and does not answer (a stalled server), or it refused us.
fn sessions(admin: SocketAddr) -> anyhow::Result<HashMap<SocketAddr, Session>> {
    let started = std::time::Instant::now();
    all_sessions(admin).map_err(|e| {
        let refused = e
            .chain()
            .filter_map(|c| c.downcast_ref::<std::io::Error>())
            .any(|io| io.kind() == std::io::ErrorKind::ConnectionRefused);
        if refused {
            anyhow::anyhow!("nothing listens at {admin}; give --admin ADDR where the server's admin API listens")
        } else if started.elapsed() >= ADMIN_WAIT {
            anyhow::anyhow!(
                "the admin listener at {admin} did not answer in {}: the server's process is stalled or overloaded",
                human(ADMIN_WAIT)
            )
        } else {
            e.context(format!("the admin API at {admin}"))
        }
    })
}

fn all_sessions(admin: SocketAddr) -> anyhow::Result<HashMap<SocketAddr, Session>> {
    let token = std::env::var("TETHER_ADMIN_TOKEN").ok().filter(|t| !t.is_empty());
    let mut out = HashMap::new();
    let mut after: Option<String> = None;
    loop {
        let path = match &after {
            None => "/v1/sessions?limit=1000".to_owned(),
            Some(a) => format!("/v1/sessions?limit=1000&after={}", percent(a)),
        };
        let (status, body) =
            tether_bench::scrape::request_with(admin, "GET", &path, None, token.as_deref(), ADMIN_WAIT)?;
        match status {
            200 => {}
            401 => bail!("it asks for a token: set TETHER_ADMIN_TOKEN"),
            _ => bail!("GET {path}: {status} {}", body.trim()),
        }
        let page: Value = serde_json::from_str(&body).context("the admin API's answer is not JSON")?;
        for s in page["sessions"].as_array().into_iter().flatten() {
            let Some(peer) = s["peer"].as_str().and_then(|p| p.parse().ok()) else { continue };
            // A value the API should never send (negative, not a number) reads as zero rather than a panic.
            let ms = |k: &str| Duration::try_from_secs_f64(s[k].as_f64().unwrap_or(0.0) / 1000.0).unwrap_or_default();
            let client = s["client"].as_str().unwrap_or_default().to_owned();
            out.insert(
                peer,
                Session {
                    client,
                    epoch: s["epoch"].as_u64().unwrap_or(0),
                    last_frame: ms("last_frame_ms"),
                    timeout: ms("timeout_ms"),
                },
            );
        }
        match page["next"].as_str() {
            Some(n) => after = Some(n.to_owned()),
            None => return Ok(out),
        }
    }
}

/// A client id as a query value.
pub(crate) fn percent(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The socket inodes a process holds (`/proc/PID/fd/*` → `socket:[INODE]`).
fn inodes_of(pid: u32) -> anyhow::Result<HashSet<u32>> {
    let dir = format!("/proc/{pid}/fd");
    let mut out = HashSet::new();
    for e in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let Ok(target) = std::fs::read_link(e?.path()) else { continue };
        let t = target.to_string_lossy();
        if let Some(n) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')).and_then(|n| n.parse().ok()) {
            out.insert(n);
        }
    }
    Ok(out)
}

/// `TcpExt: ListenOverflows` and `ListenDrops` from `/proc/net/netstat`: connections the kernel dropped because an
/// accept queue was full (machine-wide, since boot).
fn listen_drops() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/net/netstat").ok()?;
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next()?, lines.next()?);
    let map: HashMap<&str, u64> = names
        .split_whitespace()
        .zip(values.split_whitespace())
        .filter_map(|(k, v)| Some((k, v.parse().ok()?)))
        .collect();
    Some((*map.get("ListenOverflows")?, *map.get("ListenDrops")?))
}

/// The flag of a server-side socket, if any. `sessions`: `None` when the admin API was not asked.
fn flag(s: &KernelSocket, session: Option<&Session>, sessions_known: bool, orphan_after: Duration) -> Option<Flag> {
    match s.state {
        CLOSE_WAIT => Some(Flag::CloseWait),
        ESTABLISHED if s.inode == 0 => Some(Flag::Unaccepted),
        ESTABLISHED if sessions_known && session.is_none() => {
            let quiet = s.tcp.is_none_or(|t| t.last_data_recv >= orphan_after);
            quiet.then_some(Flag::Orphan)
        }
        _ => None,
    }
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let port = args.port.unwrap_or(7400);
    let mut sockets = dump()?;
    // A health check of a port nothing listens on has no server to pass: a dead server is not a healthy one.
    let listening = args.pid.is_some() || sockets.iter().any(|s| s.state == LISTEN && s.local.port() == port);
    match args.pid {
        Some(pid) => {
            let mine = inodes_of(pid)?;
            sockets.retain(|s| mine.contains(&s.inode));
        }
        // The server side of the port: its listener, its connections, and connections nobody accepted yet.
        None => sockets.retain(|s| s.local.port() == port),
    }
    if !args.state.is_empty() {
        let wanted: Vec<String> = args.state.iter().map(|s| s.trim().to_ascii_lowercase()).collect();
        sockets.retain(|s| wanted.iter().any(|w| w == state_name(s.state)));
    }
    let admin = match args.admin.as_deref() {
        Some("off") => None,
        Some(a) => Some(a.parse::<SocketAddr>().with_context(|| format!("--admin {a:?} is not IP:PORT or off"))?),
        None => Some(SocketAddr::from(([127, 0, 0, 1], 7401))),
    };
    let joined = match admin.filter(|_| listening).map(sessions) {
        Some(Ok(s)) => Some(s),
        Some(Err(e)) => {
            eprintln!("tether sockets: no sessions to join: {e:#}; `orphan` cannot be told");
            None
        }
        None => None,
    };
    sockets.sort_by_key(|s| (s.state != LISTEN, s.remote));
    // The accept queues, whatever is printed: a full one is where unaccepted connections come from.
    let queues: Vec<String> = sockets
        .iter()
        .filter(|s| s.state == LISTEN)
        .map(|s| format!("listener {}: accept queue {} of {}", s.local, s.recv_q, s.send_q))
        .collect();
    let rows: Vec<(KernelSocket, Option<Session>, Option<Flag>)> = sockets
        .into_iter()
        .map(|s| {
            let session = joined.as_ref().and_then(|m| m.get(&s.remote)).cloned();
            let f = flag(&s, session.as_ref(), joined.is_some(), args.orphan_after);
            (s, session, f)
        })
        .filter(|(_, _, f)| !args.ghosts || f.is_some())
        .collect();
    let ghosts = rows.iter().filter(|(_, _, f)| f.is_some()).count();
    if args.json {
        for (s, session, f) in &rows {
            println!("{}", row_json(s, session.as_ref(), *f));
        }
    } else {
        print_table(&rows, &queues, listen_drops());
    }
    if !listening {
        eprintln!("tether sockets: nothing listens on port {port}: no server there (or it runs elsewhere: --port)");
    }
    Ok(if args.ghosts && (ghosts > 0 || !listening) { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

fn row_json(s: &KernelSocket, session: Option<&Session>, f: Option<Flag>) -> Value {
    json!({
        "local": s.local.to_string(), "remote": s.remote.to_string(), "state": state_name(s.state),
        "recv_q": s.recv_q, "send_q": s.send_q,
        "timer": s.timer.map(|(name, d, _)| json!({ "kind": name, "expires_ms": ms(d) })),
        "retransmits": s.timer.map_or(0, |t| t.2), "inode": s.inode,
        "rtt_ms": s.tcp.map(|t| ms(t.rtt)), "rttvar_ms": s.tcp.map(|t| ms(t.rttvar)),
        "unacked": s.tcp.map(|t| t.unacked), "total_retrans": s.tcp.map(|t| t.total_retrans),
        "last_data_recv_ms": s.tcp.map(|t| ms(t.last_data_recv)), "last_data_sent_ms": s.tcp.map(|t| ms(t.last_data_sent)),
        "client": session.map(|x| x.client.clone()), "epoch": session.map(|x| x.epoch),
        "last_frame_ms": session.map(|x| ms(x.last_frame)),
        "verdict_in_ms": session.map(|x| ms(x.timeout.saturating_sub(x.last_frame))),
        "flag": f.map(Flag::as_str),
    })
}

fn print_table(rows: &[(KernelSocket, Option<Session>, Option<Flag>)], queues: &[String], drops: Option<(u64, u64)>) {
    let header = [
        "STATE",
        "LOCAL",
        "REMOTE",
        "RECV-Q",
        "SEND-Q",
        "TIMER",
        "RETR",
        "RTT",
        "LAST-RECV",
        "LAST-SENT",
        "UNACKED",
        "CLIENT",
        "EPOCH",
        "LAST-FRAME",
        "VERDICT-IN",
        "FLAG",
    ];
    let mut table: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    let mut by_state: BTreeMap<&str, usize> = BTreeMap::new();
    for (s, session, f) in rows {
        *by_state.entry(state_name(s.state)).or_default() += 1;
        let dash = || "-".to_owned();
        // A listener's TCP_INFO says nothing about a peer.
        let tcp = |g: &dyn Fn(&TcpView) -> String| s.tcp.as_ref().filter(|_| s.state != LISTEN).map_or_else(dash, g);
        table.push(vec![
            state_name(s.state).to_owned(),
            s.local.to_string(),
            s.remote.to_string(),
            s.recv_q.to_string(),
            s.send_q.to_string(),
            s.timer.map_or_else(dash, |(name, d, _)| format!("{name} {}", human(d))),
            s.timer.map_or(0, |t| t.2).to_string(),
            tcp(&|t| human(t.rtt)),
            tcp(&|t| human(t.last_data_recv)),
            tcp(&|t| human(t.last_data_sent)),
            tcp(&|t| t.unacked.to_string()),
            session.as_ref().map_or_else(dash, |x| x.client.clone()),
            session.as_ref().map_or_else(dash, |x| x.epoch.to_string()),
            session.as_ref().map_or_else(dash, |x| human(x.last_frame)),
            session.as_ref().map_or_else(dash, |x| human(x.timeout.saturating_sub(x.last_frame))),
            f.map_or_else(String::new, |f| f.as_str().to_owned()),
        ]);
        if s.state == LISTEN {
            // A listener's queues are its accept queue and backlog.
            let last = table.last_mut().expect("just pushed");
            last[15] = format!("accept queue {}/{}", s.recv_q, s.send_q);
        }
    }
    let widths: Vec<usize> =
        (0..header.len()).map(|i| table.iter().map(|r| r[i].chars().count()).max().unwrap_or(0)).collect();
    for r in &table {
        let line: Vec<String> = r.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", line.join("  ").trim_end());
    }
    let summary: Vec<String> = by_state.iter().map(|(k, v)| format!("{v} {k}")).collect();
    let ghosts = rows.iter().filter(|r| r.2.is_some()).count();
    println!("{} sockets: {}; {ghosts} flagged", rows.len(), summary.join(", "));
    for q in queues {
        println!("{q}");
    }
    if let Some((overflows, drops)) = drops {
        println!("machine-wide since boot: ListenOverflows {overflows}, ListenDrops {drops}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two messages of a real dump (captured on Linux 6.18 with a listener on 127.0.0.1:47400, backlog 7, and
    /// one connection in its accept queue): the listener, then the unaccepted connection (inode 0).
    const LISTENER: &[&str] = &[
        "98010000140002000100000058640000020a0000b92800007f00000100000000000000000000000000000000000000000000",
        "00000000000000000000fc1902000000000000000000010000000700000000000000ad01c900050008000000000008000f00",
        "000000000c001500010000000000000006001600520000001c0102000a000000000000000000000000000000000000000000",
        "0000010000000700000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
        "00000000000000000a0000000000000003000000000000000000000000000000ffffffffffffffffffffffffffffffff0000",
        "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
        "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
        "0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
        "0000000000000000",
    ];
    const UNACCEPTED: &[&str] = &[
        "9801000014000200010000005864000002010000b928bf527f0000010000000000000000000000007f000001000000000000",
        "00000000000000000000fd190200000000000000000000000000000000000000000000000000050008000000000008000f00",
        "000000000c001500010000000000000006001600520000001c010200010000000007aa01400d030000000000008000001802",
        "0000000000000000000000000000000000000000000000000000000000000000000000000000ffff0000cbff00001d000000",
        "0e000000ffffff7f0a000000cbff00000300000000000000cbff0000000000009ff3bc8407000000ffffffffffffffff0000",
        "00000000000000000000000000000000000002000000000000001d0000000000000000000000000000000000000000000000",
        "0000000000000000000000000000000000000000010000000000000000000000000000000000000000000000000000000000",
        "00000000000000000100cbff0000000000000000000000000000000000000000000000000000000000000000000000000000",
        "0000000000000000",
    ];

    fn bytes(hex: &[&str]) -> Vec<u8> {
        let s: String = hex.concat();
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    #[test]
    fn a_captured_dump_decodes_into_the_listener_and_its_unaccepted_connection() {
        let mut datagram = bytes(LISTENER);
        datagram.extend(bytes(UNACCEPTED));
        let mut out = Vec::new();
        assert!(!decode(&datagram, &mut out).unwrap(), "no end-of-dump message in these two");
        assert_eq!(out.len(), 2);
        let l = &out[0];
        assert_eq!((l.local, l.state, l.recv_q, l.send_q), ("127.0.0.1:47400".parse().unwrap(), LISTEN, 1, 7));
        assert_ne!(l.inode, 0);
        let c = &out[1];
        assert_eq!((c.local, c.remote), ("127.0.0.1:47400".parse().unwrap(), "127.0.0.1:48978".parse().unwrap()));
        assert_eq!((c.state, c.inode), (ESTABLISHED, 0));
        let tcp = c.tcp.expect("TCP_INFO was asked for");
        assert!(tcp.rtt > Duration::ZERO && tcp.unacked == 0, "{tcp:?}");
        assert_eq!(flag(c, None, false, Duration::ZERO), Some(Flag::Unaccepted));
        assert_eq!(flag(l, None, true, Duration::ZERO), None);
    }

    #[test]
    fn flags_follow_state_inode_and_session() {
        let mut s = KernelSocket {
            local: "127.0.0.1:7400".parse().unwrap(),
            remote: "127.0.0.1:5000".parse().unwrap(),
            state: CLOSE_WAIT,
            recv_q: 0,
            send_q: 0,
            timer: None,
            inode: 42,
            tcp: None,
        };
        assert_eq!(flag(&s, None, false, Duration::ZERO), Some(Flag::CloseWait));
        s.state = ESTABLISHED;
        assert_eq!(flag(&s, None, false, Duration::ZERO), None, "without the admin API an orphan cannot be told");
        assert_eq!(flag(&s, None, true, Duration::ZERO), Some(Flag::Orphan));
        let held = Session { client: "a".into(), epoch: 1, last_frame: Duration::ZERO, timeout: Duration::ZERO };
        assert_eq!(flag(&s, Some(&held), true, Duration::ZERO), None);
        assert!(decode(&[1, 2, 3], &mut Vec::new()).is_err(), "garbage is an error, not a panic");
    }
}
