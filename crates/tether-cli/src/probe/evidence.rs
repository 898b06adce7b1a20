//! What each layer of a probe found, the verdict it adds up to, and how both are printed.
//!
//! [`Evidence::verdict`] is pure: the first layer that failed decides, and the kernel's view of the probe's own
//! socket says whether silence is the path's or the program's, by [`tether::probe`], the rule the server's
//! own probe of a client uses from the other end (here the peer is the server).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{json, Value};
use tether::probe::{answered, unanswered, Answered, Unanswered};
use tether::proto::CloseReason;
use tether::sockopt::{tcp_state_name, TcpInfo};

use crate::duration::{human, ms};

/// The answer, a stable snake_case name and a stable exit code each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Every layer answered, in time.
    Ok,
    /// Nothing answered (no SYN-ACK, no ICMP), or no route to the network, or the path failed after the connect.
    PathDown,
    /// A router or firewall answered that the host cannot be reached (ICMP host unreachable or prohibited).
    HostDown,
    /// The host answered the connect with a reset: it is up, and nothing listens on the port.
    PortClosed,
    /// The host answers ICMP echo, but the port never answers the connect: a firewall drops it, or the
    /// listener's accept queue is full.
    PortFiltered,
    /// Something answered on the port, but not tether.
    NotTether,
    /// The tether server answered `BYE` with a reason.
    Refused,
    /// The TLS handshake failed.
    TlsFailed,
    /// TCP connects and the kernel answers in time, but the program does not, or late.
    ServerStalled,
    /// The kernel's own round-trip time is high.
    SlowNetwork,
    /// `--server`: the client answered far later than its kernel acknowledged.
    ClientSlow,
    /// `--server`: the client's kernel acknowledged the `PING`, its program did not answer.
    ClientStalled,
    /// `--server`: the client closed its session during the probe.
    ClientClosed,
    /// The server welcomed the probe, then closed or reset the connection without `BYE`: its process ended.
    ServerLost,
    /// `--idle`: the connection, left idle, was lost, while a new one to the same address went through at once:
    /// the path's middlebox (a NAT or firewall) forgot it.
    MiddleboxForgot,
}

impl Verdict {
    pub const ALL: [Verdict; 15] = [
        Verdict::Ok,
        Verdict::PathDown,
        Verdict::HostDown,
        Verdict::PortClosed,
        Verdict::PortFiltered,
        Verdict::NotTether,
        Verdict::Refused,
        Verdict::TlsFailed,
        Verdict::ServerStalled,
        Verdict::SlowNetwork,
        Verdict::ClientSlow,
        Verdict::ClientStalled,
        Verdict::ServerLost,
        Verdict::ClientClosed,
        Verdict::MiddleboxForgot,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::PathDown => "path_down",
            Verdict::HostDown => "host_down",
            Verdict::PortClosed => "port_closed",
            Verdict::PortFiltered => "port_filtered",
            Verdict::NotTether => "not_tether",
            Verdict::Refused => "refused",
            Verdict::TlsFailed => "tls_failed",
            Verdict::ServerStalled => "server_stalled",
            Verdict::SlowNetwork => "slow_network",
            Verdict::ClientSlow => "client_slow",
            Verdict::ClientStalled => "client_stalled",
            Verdict::ServerLost => "server_lost",
            Verdict::ClientClosed => "client_closed",
            Verdict::MiddleboxForgot => "middlebox_forgot",
        }
    }

    /// The process's exit code: 0 for `ok`; 1 and 2 stay for errors and usage.
    pub fn exit_code(self) -> u8 {
        match self {
            Verdict::Ok => 0,
            Verdict::PathDown => 10,
            Verdict::HostDown => 11,
            Verdict::PortClosed => 12,
            Verdict::PortFiltered => 13,
            Verdict::NotTether => 14,
            Verdict::Refused => 15,
            Verdict::TlsFailed => 16,
            Verdict::ServerStalled => 17,
            Verdict::SlowNetwork => 18,
            Verdict::ClientSlow => 19,
            Verdict::ClientStalled => 20,
            Verdict::ServerLost => 21,
            Verdict::ClientClosed => 22,
            Verdict::MiddleboxForgot => 23,
        }
    }

    pub(super) fn from_name(name: &str) -> Option<Verdict> {
        Verdict::ALL.into_iter().find(|v| v.as_str() == name)
    }
}

/// Layer 1: ICMP echo.
#[derive(Debug, Clone, PartialEq)]
pub enum Path {
    Reply {
        rtt: Duration,
        socket: &'static str,
    },
    NoAnswer {
        waited: Duration,
        socket: &'static str,
    },
    /// Sending failed at once (a local route says unreachable, say).
    Error {
        error: String,
        socket: &'static str,
    },
    /// No ICMP socket could be opened: not root, and `net.ipv4.ping_group_range` excludes us.
    Unavailable {
        why: String,
    },
}

/// Layer 2: the TCP connect.
#[derive(Debug, Clone, PartialEq)]
pub enum Transport {
    Connected {
        took: Duration,
        local: SocketAddr,
    },
    /// RST: the host is up and nothing listens.
    Refused {
        took: Duration,
    },
    TimedOut {
        waited: Duration,
    },
    /// EHOSTUNREACH: an ICMP host unreachable or prohibited answered the SYN (or ARP failed on the last hop).
    HostUnreachable {
        took: Duration,
    },
    /// ENETUNREACH: no route to the network, here or at a router.
    NetUnreachable {
        took: Duration,
    },
    Failed {
        took: Duration,
        error: String,
    },
}

/// Layer 3: TLS, when asked.
#[derive(Debug, Clone, PartialEq)]
pub enum Tls {
    Done {
        took: Duration,
        version: String,
    },
    Failed {
        took: Duration,
        error: String,
        hint: Option<String>,
    },
    /// No answer to the ClientHello: judged like a missing `WELCOME`.
    NoAnswer {
        waited: Duration,
    },
}

/// Layer 4: `HELLO` → `WELCOME`.
#[derive(Debug, Clone, PartialEq)]
pub enum App {
    Welcome {
        took: Duration,
        server_id: String,
        epoch: u64,
        version: u8,
        heartbeat: Duration,
        timeout: Duration,
    },
    /// `BYE` instead of `WELCOME`.
    Refused {
        took: Duration,
        reason: CloseReason,
        retry_after: Duration,
        alternative: String,
    },
    /// Bytes that are no tether frame; `what` names the protocol when it is recognisable.
    Foreign {
        took: Duration,
        what: Option<&'static str>,
        first: Bytes,
    },
    /// A tether frame, but not one that answers `HELLO`.
    Unexpected {
        took: Duration,
        frame: &'static str,
    },
    /// The peer closed without `BYE`, or reset.
    Closed {
        took: Duration,
        reset: bool,
    },
    /// No answer to `HELLO` in `waited`, though its kernel acknowledged it (or no kernel view says otherwise).
    NoAnswer {
        waited: Duration,
        /// Bytes waiting unread in the server's receive queue, when its socket is visible from here (a server on
        /// this host): more than zero means its process never read `HELLO`.
        unread: Option<u32>,
        /// How long the nudge after `HELLO` then waited in vain, when one was sent.
        nudged: Option<Duration>,
    },
    /// No answer to `HELLO` in `waited`; the nudge after it got `answer`.
    Nudged {
        waited: Duration,
        answer: Box<App>,
    },
}

/// How a session ended before its round trips did.
#[derive(Debug, Clone, PartialEq)]
pub enum Ended {
    Bye(CloseReason),
    /// Bytes that are no tether frame.
    Foreign(Bytes),
    /// A close or reset without `BYE`.
    Closed {
        reset: bool,
    },
    /// Writing failed.
    Failed(String),
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ended::Bye(reason) => write!(f, "BYE({reason})"),
            Ended::Foreign(first) => write!(f, "bytes that are no tether frame: {}", escape(first)),
            Ended::Closed { reset: false } => f.write_str("closed without BYE"),
            Ended::Closed { reset: true } => f.write_str("reset without BYE"),
            Ended::Failed(e) => write!(f, "the connection failed: {e}"),
        }
    }
}

/// Layer 5: `PING`/`PONG`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RoundTrips {
    pub sent: u32,
    /// Each answered round trip, in order.
    pub rtts: Vec<Duration>,
    /// The last `PING` was not answered within this wait.
    pub unanswered: Option<Duration>,
    /// The session ended before the round trips did.
    pub ended: Option<Ended>,
    /// The time between `PING`s actually used.
    pub interval: Duration,
}

/// Everything the layers found.
#[derive(Debug, Clone, PartialEq)]
pub struct Evidence {
    pub path: Path,
    pub transport: Transport,
    pub tls: Option<Tls>,
    pub app: Option<App>,
    pub round_trips: Option<RoundTrips>,
    /// `--idle`: what became of the connection left idle.
    pub idle: Option<Idle>,
    /// `TCP_INFO` of the probe's socket, read after the last step.
    pub kernel: Option<TcpInfo>,
}

/// Layer 6 (`--idle`): the connection left idle after the round trips, then pinged once more.
#[derive(Debug, Clone, PartialEq)]
pub enum Idle {
    /// The `PING` after `idle` was answered in `rtt`.
    Kept { idle: Duration, rtt: Duration },
    /// It was not (`how`: no answer in the wait, a reset, a close; `no_answer`: the wait, when nothing came); a
    /// new connection to the same address then went through in this long, or failed.
    Lost { idle: Duration, how: String, no_answer: Option<Duration>, fresh: Result<Duration, String> },
}

/// min, median, max.
fn spread(rtts: &[Duration]) -> Option<(Duration, Duration, Duration)> {
    let mut v = rtts.to_vec();
    v.sort_unstable();
    Some((*v.first()?, v[(v.len() - 1) / 2], *v.last()?))
}

const STALLED_NOTE: &str = "(from outside, a silent service that is not tether looks the same)";

impl Evidence {
    /// The verdict and the evidence for it, in one sentence. The first layer that fails decides.
    pub fn verdict(&self) -> (Verdict, String) {
        let icmp_answered = matches!(self.path, Path::Reply { .. });
        match &self.transport {
            Transport::Connected { .. } => {}
            Transport::Refused { took } => {
                return (
                    Verdict::PortClosed,
                    format!("the host reset the connect in {}: nothing listens on the port", human(*took)),
                )
            }
            Transport::HostUnreachable { took } => {
                return (
                    Verdict::HostDown,
                    format!(
                        "after {} the network answered the connect with \"host unreachable\": the host is down or off \
                         its network (or a firewall rejects it)",
                        human(*took)
                    ),
                )
            }
            Transport::NetUnreachable { took } => {
                return (Verdict::PathDown, format!("after {} there was no route to the host's network", human(*took)))
            }
            Transport::TimedOut { waited } if icmp_answered => {
                return (
                    Verdict::PortFiltered,
                    format!(
                        "the host answers ICMP echo, but the connect got no answer in {}: a firewall drops it, or \
                         the listener's accept queue is full (a stalled server behind a full backlog looks the same)",
                        human(*waited)
                    ),
                )
            }
            Transport::TimedOut { waited } => {
                return (
                    Verdict::PathDown,
                    format!(
                        "nothing answered: no reply to the connect in {} and none to ICMP echo; the path or the host \
                         is down, and from here the two look the same",
                        human(*waited)
                    ),
                )
            }
            Transport::Failed { error, .. } => return (Verdict::PathDown, format!("the connect failed: {error}")),
        }
        let k = self.kernel;
        // Answers that say what they are decide first, whatever the round-trip time.
        match &self.tls {
            Some(Tls::Failed { error, hint, .. }) => {
                let hint = hint.as_ref().map(|h| format!("; {h}")).unwrap_or_default();
                return (Verdict::TlsFailed, format!("the TLS handshake failed: {error}{hint}"));
            }
            Some(Tls::NoAnswer { waited }) => return silent(k, "the TLS ClientHello", *waited),
            _ => {}
        }
        match &self.app {
            Some(App::Welcome { .. }) | None => {}
            Some(App::Refused { reason, retry_after, alternative, .. }) => {
                return (Verdict::Refused, refusal(*reason, *retry_after, alternative));
            }
            Some(App::Foreign { what, first, .. }) => return foreign(*what, first, self.tls.is_some()),
            Some(App::Unexpected { frame, .. }) => {
                return (
                    Verdict::NotTether,
                    format!("the peer answered HELLO with {frame}, not WELCOME or BYE: not tether, or a broken one"),
                );
            }
            Some(App::Closed { reset, .. }) => {
                let how = if *reset { "reset the connection" } else { "closed the connection" };
                return (Verdict::NotTether, format!("the peer {how} without BYE: tether always says why it closes"));
            }
            Some(App::NoAnswer { waited, unread, nudged }) => return unanswered_hello(k, *waited, *unread, *nudged),
            Some(App::Nudged { waited, answer }) => return nudged(*waited, answer, self.tls.is_some()),
        }
        let Some(r) = &self.round_trips else {
            return (Verdict::Ok, "connected".into());
        };
        let after = r.sent.saturating_sub(1);
        match &r.ended {
            None => {}
            Some(Ended::Bye(reason)) => {
                let why = refusal(*reason, Duration::ZERO, "");
                return (
                    Verdict::Refused,
                    format!("after {after} round trips {}", why.replacen("the server", "it", 1)),
                );
            }
            Some(Ended::Foreign(first)) => return foreign(None, first, self.tls.is_some()),
            Some(Ended::Closed { reset }) => {
                let how = if *reset { "reset" } else { "closed" };
                return match unanswered(k) {
                    Unanswered::PathDown(i) => path_failed(&format!("PING {}", r.sent), None, i),
                    _ => (
                        Verdict::ServerLost,
                        format!(
                            "after {after} round trips the server {how} the connection without BYE: its process \
                             ended or crashed (tether always says why it closes)"
                        ),
                    ),
                };
            }
            Some(Ended::Failed(error)) => {
                return match unanswered(k) {
                    Unanswered::PathDown(i) => path_failed(&format!("PING {}", r.sent), None, i),
                    _ => (Verdict::PathDown, format!("after {after} round trips the connection failed: {error}")),
                };
            }
        }
        if let Some(waited) = r.unanswered {
            return silent(k, &format!("PING {}", r.sent), waited);
        }
        let mut kept = String::new();
        match &self.idle {
            // The server's kernel took the PING and its program never answered: stalled, whatever a new connection
            // (which its kernel accepts too) shows.
            Some(Idle::Lost { idle, no_answer: Some(waited), .. })
                if matches!(unanswered(k), Unanswered::Stalled(_)) =>
            {
                return silent(k, &format!("the PING after {} idle", human(*idle)), *waited);
            }
            Some(Idle::Lost { idle, how, fresh: Ok(took), .. }) => {
                return (
                    Verdict::MiddleboxForgot,
                    format!(
                        "the path's middlebox forgot the connection: after {} idle the PING got {how}, while a new \
                         connection to the same address went through in {}; a NAT or firewall on the path drops \
                         idle connections sooner than that (keep the heartbeat interval under it)",
                        human(*idle),
                        human(*took)
                    ),
                )
            }
            Some(Idle::Lost { idle, how, fresh: Err(e), .. }) => {
                return (
                    Verdict::PathDown,
                    format!("after {} idle the PING got {how}, and a new connection failed too ({e})", human(*idle)),
                )
            }
            Some(Idle::Kept { idle, .. }) => kept = format!("; the path kept the connection {} idle", human(*idle)),
            None => {}
        }
        let krtt = k.map_or(Duration::ZERO, |i| i.rtt);
        let Some((min, median, max)) = spread(&r.rtts) else {
            return (Verdict::Ok, "connected".into());
        };
        match answered(median, k) {
            Answered::Late => (
                Verdict::ServerStalled,
                format!(
                    "the server's PONGs took {} (median) against a kernel RTT of {}: the program answers late \
                     {STALLED_NOTE}",
                    human(median),
                    human(krtt)
                ),
            ),
            Answered::SlowNetwork(i) => (
                Verdict::SlowNetwork,
                format!(
                    "the server answers in step with its kernel, but the kernel's smoothed RTT is {} (rttvar {}): \
                     the path is slow",
                    human(i.rtt),
                    human(i.rttvar)
                ),
            ),
            Answered::InStep => {
                let icmp = if icmp_answered {
                    ""
                } else {
                    " (ICMP echo unanswered or unavailable: that alone proves nothing)"
                };
                (
                    Verdict::Ok,
                    format!(
                        "the path, the port and the tether server answer: {} round trips in {} / {} / {} \
                         (min / median / max), kernel RTT {}{icmp}{kept}",
                        r.rtts.len(),
                        human(min),
                        human(median),
                        human(max),
                        human(krtt)
                    ),
                )
            }
        }
    }
}

/// No answer to `step` within `waited`: the kernel's view of the probe's socket says whether the path still
/// carries our bytes (then the program is silent) or not ([`unanswered`]).
///
/// No answer and no kernel view is `server_stalled`: this comes after a TCP connect that succeeded, so the path
/// and the server's kernel answered moments before, and the probe's own socket is still open; a missing view
/// means only that `TCP_INFO` cannot be read here, not that the path failed. The sentence says the view is
/// missing. (The server's own probe says `path_down` in that case, where the view is missing because the
/// session's socket closed.)
fn silent(k: Option<TcpInfo>, step: &str, waited: Duration) -> (Verdict, String) {
    match unanswered(k) {
        Unanswered::PathDown(i) => path_failed(step, Some(waited), i),
        Unanswered::Stalled(i) => (
            Verdict::ServerStalled,
            format!(
                "TCP connects and the server's kernel acknowledged {step} (RTT {}), but the program did not answer in \
                 {} {STALLED_NOTE}",
                human(i.rtt),
                human(waited)
            ),
        ),
        Unanswered::NoView => (
            Verdict::ServerStalled,
            format!(
                "TCP connects, but nothing answered {step} in {} (the kernel's view of the socket is not available \
                 here) {STALLED_NOTE}",
                human(waited)
            ),
        ),
    }
}

/// `HELLO` acknowledged and not answered: what the second look found decides how sure the verdict is.
fn unanswered_hello(
    k: Option<TcpInfo>,
    waited: Duration,
    unread: Option<u32>,
    nudged: Option<Duration>,
) -> (Verdict, String) {
    if let Unanswered::PathDown(i) = unanswered(k) {
        return path_failed("HELLO", Some(waited), i);
    }
    match (unread, nudged) {
        (Some(n), _) if n > 0 => (
            Verdict::ServerStalled,
            format!(
                "TCP connects and the server's kernel took HELLO, but its process has not read it: after {} its {n} \
                 bytes still wait in the server's receive queue (the process is stopped or hung, or does not accept \
                 connections)",
                human(waited)
            ),
        ),
        (Some(_), Some(more)) => (
            Verdict::ServerStalled,
            format!(
                "the server's process read HELLO and an empty line after it, and answered neither in {}: a tether \
                 server holding its answer (a long --auth-fail-delay, a cluster claim waiting on Redis), or a \
                 service that is not tether and waits for something else",
                human(waited + more)
            ),
        ),
        (_, Some(more)) => silent(k, "HELLO and an empty line after it", waited + more),
        _ => silent(k, "HELLO", waited),
    }
}

/// `HELLO` went unanswered for `waited`, and the nudge after it got `answer`.
fn nudged(waited: Duration, answer: &App, tls: bool) -> (Verdict, String) {
    let before = format!("HELLO got no answer in {}, and an empty line after it", human(waited));
    let answered = format!("HELLO got no answer in {}, but an empty line after it did", human(waited));
    match answer {
        App::Welcome { took, .. } => (
            Verdict::ServerStalled,
            format!(
                "the server answered HELLO with WELCOME only after {}: the program answers late",
                human(waited + *took)
            ),
        ),
        App::Refused { took, reason, retry_after, alternative } => (
            Verdict::Refused,
            format!("{} after {}", refusal(*reason, *retry_after, alternative), human(waited + *took)),
        ),
        App::Foreign { what, first, .. } => {
            let (v, why) = foreign(*what, first, tls);
            (v, format!("{answered}: {why}"))
        }
        App::Closed { reset, .. } => {
            let how = if *reset { "a reset" } else { "a close" };
            (
                Verdict::NotTether,
                format!(
                    "{before} got {how} without BYE: it read HELLO and waited for more, as a tether server never does"
                ),
            )
        }
        App::Unexpected { frame, .. } => {
            (Verdict::NotTether, format!("{before} got {frame}, not WELCOME or BYE: not tether, or a broken one"))
        }
        App::NoAnswer { .. } | App::Nudged { .. } => (Verdict::ServerStalled, format!("{before} got no answer either")),
    }
}

/// Our bytes are not acknowledged: the path (or the host) went away after the connect.
fn path_failed(step: &str, waited: Option<Duration>, i: TcpInfo) -> (Verdict, String) {
    let within = waited.map(|w| format!(" in {}", human(w))).unwrap_or_default();
    (
        Verdict::PathDown,
        format!(
            "no answer to {step}{within} and {} segments unacknowledged ({} retransmissions): the path failed after \
             the connect",
            i.unacked, i.retransmits
        ),
    )
}

fn refusal(reason: CloseReason, retry_after: Duration, alternative: &str) -> String {
    let mut s = format!("the server answered BYE({reason})");
    if !retry_after.is_zero() {
        let _ = write!(s, ", retry after {}", human(retry_after));
    }
    if !alternative.is_empty() {
        let _ = write!(s, ", go to {alternative}");
    }
    s
}

fn foreign(what: Option<&'static str>, first: &[u8], tls: bool) -> (Verdict, String) {
    let hint = if what == Some("TLS") && !tls {
        " (a TLS service: if it is a tether server with TLS, add --tls or --tls-ca)"
    } else {
        ""
    };
    let what = what.map_or("bytes that are no tether frame".to_owned(), |w| format!("{w}, not tether"));
    (Verdict::NotTether, format!("something answered {what}: {}{hint}", escape(first)))
}

/// Printable evidence of foreign bytes: text as text, the rest as `\xNN`.
pub(super) fn escape(b: &[u8]) -> String {
    let mut s = String::from("\"");
    for &c in b {
        match c {
            b'\r' => s.push_str("\\r"),
            b'\n' => s.push_str("\\n"),
            b'"' => s.push_str("\\\""),
            0x20..=0x7e => s.push(c as char),
            _ => {
                let _ = write!(s, "\\x{c:02x}");
            }
        }
    }
    s.push('"');
    s
}

pub(super) fn describe_path(p: &Path) -> String {
    match p {
        Path::Reply { rtt, socket } => format!("ICMP echo answered in {} ({socket})", human(*rtt)),
        Path::NoAnswer { waited, socket } => {
            format!("no ICMP echo reply in {} ({socket}): filtered or down; alone this proves nothing", human(*waited))
        }
        Path::Error { error, socket } => format!("ICMP echo failed: {error} ({socket})"),
        Path::Unavailable { why } => format!("ICMP unknown: {why}"),
    }
}

pub(super) fn describe_transport(t: &Transport) -> String {
    match t {
        Transport::Connected { took, local } => format!("TCP connected in {} from {local}", human(*took)),
        Transport::Refused { took } => format!("TCP connect refused (RST) in {}", human(*took)),
        Transport::TimedOut { waited } => format!("TCP connect: no answer in {}", human(*waited)),
        Transport::HostUnreachable { took } => format!("TCP connect: host unreachable after {}", human(*took)),
        Transport::NetUnreachable { took } => format!("TCP connect: network unreachable after {}", human(*took)),
        Transport::Failed { took, error } => format!("TCP connect failed after {}: {error}", human(*took)),
    }
}

pub(super) fn describe_tls(t: &Tls) -> String {
    match t {
        Tls::Done { took, version } => format!("handshake done in {} ({version})", human(*took)),
        Tls::Failed { took, error, hint } => {
            format!(
                "handshake failed after {}: {error}{}",
                human(*took),
                hint.as_ref().map(|h| format!(" ({h})")).unwrap_or_default()
            )
        }
        Tls::NoAnswer { waited } => format!("no answer to the ClientHello in {}", human(*waited)),
    }
}

pub(super) fn describe_app(a: &App) -> String {
    match a {
        App::Welcome { took, server_id, epoch, version, heartbeat, .. } => format!(
            "WELCOME in {}: server {server_id:?}, epoch {epoch}, protocol v{version}, heartbeat {}",
            human(*took),
            humantime::format_duration(*heartbeat)
        ),
        App::Refused { took, reason, .. } => format!("BYE({reason}) in {}", human(*took)),
        App::Foreign { took, what, first } => {
            format!("{} in {}: {}", what.unwrap_or("bytes that are no tether frame"), human(*took), escape(first))
        }
        App::Unexpected { took, frame } => format!("{frame} instead of WELCOME or BYE, in {}", human(*took)),
        App::Closed { took, reset: false } => format!("closed without BYE after {}", human(*took)),
        App::Closed { took, reset: true } => format!("reset without BYE after {}", human(*took)),
        App::NoAnswer { waited, unread, nudged } => {
            let mut s = format!("no answer to HELLO in {}", human(*waited));
            match unread {
                Some(0) => s.push_str("; the server's process read it (its socket holds nothing unread)"),
                Some(n) => {
                    let _ = write!(s, "; its {n} bytes wait unread in the server's socket");
                }
                None => {}
            }
            if let Some(more) = nudged {
                let _ = write!(s, "; nor to an empty line after it in {}", human(*more));
            }
            s
        }
        App::Nudged { waited, answer } => {
            format!("no answer to HELLO in {}; an empty line after it got {}", human(*waited), describe_app(answer))
        }
    }
}

pub(super) fn describe_round_trips(r: &RoundTrips, k: Option<&TcpInfo>) -> String {
    let mut s = format!("{} of {} PONGs", r.rtts.len(), r.sent);
    if let Some((min, median, max)) = spread(&r.rtts) {
        let _ = write!(s, ": {} / {} / {} (min / median / max)", human(min), human(median), human(max));
    }
    if let Some(i) = k {
        let _ = write!(s, "; kernel RTT {} ± {}, {} unacknowledged", human(i.rtt), human(i.rttvar), i.unacked);
    }
    if let Some(end) = &r.ended {
        let _ = write!(s, "; ended: {end}");
    }
    s
}

pub(super) fn describe_idle(i: &Idle) -> String {
    match i {
        Idle::Kept { idle, rtt } => format!("kept {} idle: PONG in {}", human(*idle), human(*rtt)),
        Idle::Lost { idle, how, fresh: Ok(took), .. } => {
            format!("after {} idle: {how}; a new connection went through in {}", human(*idle), human(*took))
        }
        Idle::Lost { idle, how, fresh: Err(e), .. } => {
            format!("after {} idle: {how}; a new connection failed too: {e}", human(*idle))
        }
    }
}

pub(super) fn evidence_json(ev: &Evidence) -> Value {
    let path = match &ev.path {
        Path::Reply { rtt, socket } => json!({"result": "reply", "rtt_ms": ms(*rtt), "socket": socket}),
        Path::NoAnswer { waited, socket } => json!({"result": "no_answer", "waited_ms": ms(*waited), "socket": socket}),
        Path::Error { error, socket } => json!({"result": "error", "error": error, "socket": socket}),
        Path::Unavailable { why } => json!({"result": "unavailable", "error": why}),
    };
    let transport = match &ev.transport {
        Transport::Connected { took, local } => {
            json!({"result": "connected", "ms": ms(*took), "local": local.to_string()})
        }
        Transport::Refused { took } => json!({"result": "refused", "ms": ms(*took)}),
        Transport::TimedOut { waited } => json!({"result": "timed_out", "ms": ms(*waited)}),
        Transport::HostUnreachable { took } => json!({"result": "host_unreachable", "ms": ms(*took)}),
        Transport::NetUnreachable { took } => json!({"result": "network_unreachable", "ms": ms(*took)}),
        Transport::Failed { took, error } => json!({"result": "failed", "ms": ms(*took), "error": error}),
    };
    let tls = match &ev.tls {
        None => json!({"result": "not_asked"}),
        Some(Tls::Done { took, version }) => json!({"result": "done", "ms": ms(*took), "version": version}),
        Some(Tls::Failed { took, error, hint }) => {
            json!({"result": "failed", "ms": ms(*took), "error": error, "hint": hint})
        }
        Some(Tls::NoAnswer { waited }) => json!({"result": "no_answer", "ms": ms(*waited)}),
    };
    let app = ev.app.as_ref().map(app_json);
    let round_trips = ev.round_trips.as_ref().map(|r| {
        let s = spread(&r.rtts);
        json!({
            "sent": r.sent, "answered": r.rtts.len(), "unanswered": r.unanswered.is_some(),
            "ended": r.ended.as_ref().map(|e| e.to_string()),
            "interval_ms": ms(r.interval),
            "app_rtt_ms": s.map(|(a, b, c)| json!({"min": ms(a), "median": ms(b), "max": ms(c)})),
        })
    });
    let kernel = ev.kernel.map(|i| {
        json!({
            "state": tcp_state_name(i.state), "rtt_ms": ms(i.rtt), "rttvar_ms": ms(i.rttvar),
            "unacked": i.unacked, "retransmits": i.retransmits, "total_retrans": i.total_retrans,
            "last_ack_recv_ms": ms(i.since_ack_recv),
        })
    });
    let idle = ev.idle.as_ref().map(|i| match i {
        Idle::Kept { idle, rtt } => json!({"result": "kept", "idle_ms": ms(*idle), "rtt_ms": ms(*rtt)}),
        Idle::Lost { idle, how, fresh, .. } => json!({
            "result": "lost", "idle_ms": ms(*idle), "how": how,
            "fresh_connect_ms": fresh.as_ref().ok().map(|d| ms(*d)), "fresh_error": fresh.as_ref().err(),
        }),
    });
    json!({"layers": {"path": path, "transport": transport, "tls": tls, "app": app, "round_trips": round_trips, "idle": idle, "kernel": kernel}})
}

fn app_json(a: &App) -> Value {
    match a {
        App::Welcome { took, server_id, epoch, version, heartbeat, timeout } => json!({
            "result": "welcome", "ms": ms(*took), "server_id": server_id, "epoch": epoch, "version": version,
            "heartbeat_ms": heartbeat.as_millis() as u64, "timeout_ms": timeout.as_millis() as u64,
        }),
        App::Refused { took, reason, retry_after, alternative } => json!({
            "result": "bye", "ms": ms(*took), "reason": reason.as_str(),
            "retry_after_ms": retry_after.as_millis() as u64, "alternative": alternative,
        }),
        App::Foreign { took, what, first } => {
            json!({"result": "foreign", "ms": ms(*took), "protocol": what, "first_bytes": escape(first)})
        }
        App::Unexpected { took, frame } => json!({"result": "unexpected", "ms": ms(*took), "frame": frame}),
        App::Closed { took, reset } => json!({"result": if *reset { "reset" } else { "closed" }, "ms": ms(*took)}),
        App::NoAnswer { waited, unread, nudged } => json!({
            "result": "no_answer", "ms": ms(*waited), "peer_unread_bytes": unread,
            "nudge_ms": nudged.map(ms),
        }),
        App::Nudged { waited, answer } => {
            let mut v = app_json(answer);
            v["hello_unanswered_ms"] = json!(ms(*waited));
            v["nudged"] = json!(true);
            v
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(rtt_ms: u64, unacked: u32) -> TcpInfo {
        TcpInfo {
            state: 1,
            rtt: Duration::from_millis(rtt_ms),
            rttvar: Duration::from_millis(rtt_ms / 2),
            unacked,
            snd_cwnd: 10,
            ..TcpInfo::default()
        }
    }

    const T: Duration = Duration::from_millis(1);

    /// `WELCOME` after `T`, with the default heartbeat.
    fn welcome() -> App {
        App::Welcome {
            took: T,
            server_id: "s".into(),
            epoch: 1,
            version: 2,
            heartbeat: Duration::from_secs(5),
            timeout: Duration::from_secs(15),
        }
    }

    fn connected() -> Evidence {
        Evidence {
            path: Path::Reply { rtt: T, socket: "raw socket" },
            transport: Transport::Connected { took: T, local: "127.0.0.1:1".parse().unwrap() },
            tls: None,
            app: Some(welcome()),
            round_trips: Some(RoundTrips { sent: 3, rtts: vec![T, T, T], interval: T, ..Default::default() }),
            idle: None,
            kernel: Some(info(1, 0)),
        }
    }

    fn at(transport: Transport, path: Path) -> Verdict {
        let ev = Evidence { path, transport, tls: None, app: None, round_trips: None, idle: None, kernel: None };
        ev.verdict().0
    }

    #[test]
    fn each_layer_decides_its_verdict() {
        let no_icmp = || Path::NoAnswer { waited: T, socket: "raw socket" };
        let icmp = || Path::Reply { rtt: T, socket: "raw socket" };
        assert_eq!(at(Transport::Refused { took: T }, no_icmp()), Verdict::PortClosed);
        assert_eq!(at(Transport::HostUnreachable { took: T }, no_icmp()), Verdict::HostDown);
        assert_eq!(at(Transport::NetUnreachable { took: T }, icmp()), Verdict::PathDown);
        assert_eq!(at(Transport::TimedOut { waited: T }, no_icmp()), Verdict::PathDown);
        assert_eq!(at(Transport::TimedOut { waited: T }, icmp()), Verdict::PortFiltered);
        let unavailable = Path::Unavailable { why: "x".into() };
        assert_eq!(at(Transport::TimedOut { waited: T }, unavailable), Verdict::PathDown);

        let ok = connected();
        assert_eq!(ok.verdict().0, Verdict::Ok);
        let mut no_icmp_ok = connected();
        no_icmp_ok.path = Path::Unavailable { why: "x".into() };
        let (v, why) = no_icmp_ok.verdict();
        assert_eq!(v, Verdict::Ok, "an ICMP layer that cannot run never makes the verdict worse");
        assert!(why.contains("proves nothing"), "{why}");

        let with_app = |app: App, kernel: TcpInfo| Evidence {
            app: Some(app),
            round_trips: None,
            kernel: Some(kernel),
            ..connected()
        };
        let silent = App::NoAnswer { waited: Duration::from_secs(5), unread: None, nudged: None };
        let (v, why) = with_app(silent.clone(), info(1, 0)).verdict();
        assert_eq!(v, Verdict::ServerStalled);
        assert!(why.contains("not tether looks the same"), "{why}");
        assert_eq!(with_app(silent.clone(), info(1, 1)).verdict().0, Verdict::PathDown, "HELLO never acknowledged");
        let (v, why) = with_app(silent, info(300, 0)).verdict();
        assert_eq!(v, Verdict::ServerStalled, "a 300 ms RTT does not explain 5 s of silence: {why}");
        // The second look: HELLO unread in the server's socket is a stall for certain; read, then silent to the
        // nudge too, is said to be either; a nudge answered with foreign bytes or a close is not tether.
        let second = |unread, nudged| App::NoAnswer { waited: Duration::from_secs(1), unread, nudged };
        let (v, why) = with_app(second(Some(45), None), info(1, 0)).verdict();
        assert_eq!(v, Verdict::ServerStalled);
        assert!(why.contains("has not read it") && !why.contains("looks the same"), "{why}");
        let (v, why) = with_app(second(Some(0), Some(T)), info(1, 0)).verdict();
        assert_eq!(v, Verdict::ServerStalled);
        assert!(why.contains("read HELLO") && why.contains("not tether"), "{why}");
        let (v, why) = with_app(second(None, Some(T)), info(1, 0)).verdict();
        assert_eq!(v, Verdict::ServerStalled);
        assert!(why.contains("an empty line after it") && why.contains("looks the same"), "{why}");
        assert_eq!(with_app(second(None, Some(T)), info(1, 1)).verdict().0, Verdict::PathDown);
        let nudged = |answer: App| App::Nudged { waited: Duration::from_secs(1), answer: Box::new(answer) };
        let page = App::Foreign { took: T, what: Some("HTML"), first: Bytes::from_static(b"<!DOCTYPE HTML>") };
        let (v, why) = with_app(nudged(page), info(1, 0)).verdict();
        assert_eq!(v, Verdict::NotTether);
        assert!(why.contains("an empty line after it did") && why.contains("HTML, not tether"), "{why}");
        let closed = nudged(App::Closed { took: T, reset: false });
        assert_eq!(with_app(closed, info(1, 0)).verdict().0, Verdict::NotTether);
        let late = welcome();
        assert_eq!(with_app(nudged(late), info(1, 0)).verdict().0, Verdict::ServerStalled, "WELCOME, late");
        let bye = || App::Refused {
            took: T,
            reason: CloseReason::Busy,
            retry_after: Duration::from_secs(3),
            alternative: String::new(),
        };
        let (v, why) = with_app(bye(), info(1, 0)).verdict();
        assert_eq!((v, why.contains("busy") && why.contains("retry after")), (Verdict::Refused, true), "{why}");
        assert_eq!(with_app(bye(), info(400, 0)).verdict().0, Verdict::Refused, "an answer decides over the RTT");
        let http =
            App::Foreign { took: T, what: Some("HTTP"), first: Bytes::from_static(b"HTTP/1.1 400 Bad Request\r\n") };
        let (v, why) = with_app(http, info(1, 0)).verdict();
        assert_eq!(v, Verdict::NotTether);
        assert!(why.contains("HTTP/1.1 400"), "{why}");
        let tls =
            App::Foreign { took: T, what: Some("TLS"), first: Bytes::from_static(b"\x15\x03\x03\x00\x02\x02\x32") };
        assert!(with_app(tls, info(1, 0)).verdict().1.contains("add --tls"));
        assert_eq!(with_app(App::Closed { took: T, reset: false }, info(1, 0)).verdict().0, Verdict::NotTether);
        let unexpected = with_app(App::Unexpected { took: T, frame: "PING" }, info(1, 0)).verdict();
        assert_eq!(unexpected.0, Verdict::NotTether);
        assert!(unexpected.1.contains("PING"), "{}", unexpected.1);

        let mut late = connected();
        late.round_trips.as_mut().unwrap().rtts = vec![Duration::from_millis(400); 3];
        assert_eq!(late.verdict().0, Verdict::ServerStalled, "PONGs far behind the kernel's RTT");
        let mut unanswered = connected();
        unanswered.round_trips.as_mut().unwrap().unanswered = Some(Duration::from_secs(5));
        assert_eq!(unanswered.verdict().0, Verdict::ServerStalled);
        let mut slow = connected();
        slow.kernel = Some(info(250, 0));
        slow.round_trips.as_mut().unwrap().rtts = vec![Duration::from_millis(260); 3];
        assert_eq!(slow.verdict().0, Verdict::SlowNetwork);
        let ended = |how: Ended, kernel: TcpInfo| {
            let mut ev = connected();
            ev.round_trips.as_mut().unwrap().ended = Some(how);
            ev.kernel = Some(kernel);
            ev.verdict()
        };
        let (v, why) = ended(Ended::Bye(CloseReason::ServerShutdown), info(1, 0));
        assert_eq!(v, Verdict::Refused);
        assert!(why.contains("server_shutdown"), "{why}");
        let (v, why) = ended(Ended::Closed { reset: true }, info(1, 0));
        assert_eq!(v, Verdict::ServerLost, "welcomed, then closed without BYE: {why}");
        assert_eq!(ended(Ended::Closed { reset: false }, info(1, 2)).0, Verdict::PathDown);
        assert_eq!(ended(Ended::Failed("broken pipe".into()), info(1, 0)).0, Verdict::PathDown);
        assert_eq!(ended(Ended::Foreign(Bytes::from_static(b"junk")), info(1, 0)).0, Verdict::NotTether);
        let mut slow_ok = connected();
        slow_ok.kernel = Some(info(250, 0));
        assert_eq!(slow_ok.verdict().0, Verdict::SlowNetwork, "fast answers on a slow path");
        let mut no_kernel = connected();
        no_kernel.app = Some(App::NoAnswer { waited: T, unread: None, nudged: None });
        no_kernel.kernel = None;
        let (v, why) = no_kernel.verdict();
        assert_eq!(v, Verdict::ServerStalled);
        assert!(!why.contains("acknowledged"), "no kernel view, no claim of an ACK: {why}");

        let mut tls_failed = connected();
        tls_failed.tls = Some(Tls::Failed { took: T, error: "invalid peer certificate".into(), hint: None });
        tls_failed.kernel = Some(info(300, 0));
        assert_eq!(tls_failed.verdict().0, Verdict::TlsFailed);
    }

    #[test]
    fn names_and_exit_codes_are_distinct() {
        let names: std::collections::HashSet<_> = Verdict::ALL.iter().map(|v| v.as_str()).collect();
        let codes: std::collections::HashSet<_> = Verdict::ALL.iter().map(|v| v.exit_code()).collect();
        assert_eq!((names.len(), codes.len()), (Verdict::ALL.len(), Verdict::ALL.len()));
        assert!(!codes.contains(&1) && !codes.contains(&2), "1 and 2 mean error and usage");
        for v in Verdict::ALL {
            assert_eq!(Verdict::from_name(v.as_str()), Some(v));
        }
    }
    #[test]
    fn an_idle_connection_lost_while_a_new_one_goes_through_is_a_middlebox_that_forgot() {
        let s = Duration::from_secs;
        let with = |idle: Idle| Evidence { idle: Some(idle), ..connected() };
        // The PING after the idle is unacknowledged: the path carried it nowhere.
        let lost = |fresh| Idle::Lost { idle: s(60), how: "no PONG in 5.0s".into(), no_answer: Some(s(5)), fresh };
        let unacked = |idle: Idle| Evidence { kernel: Some(info(1, 1)), ..with(idle) };
        let (v, why) = unacked(lost(Ok(T))).verdict();
        assert_eq!((v, v.exit_code()), (Verdict::MiddleboxForgot, 23));
        assert!(why.starts_with("the path's middlebox forgot the connection: after 60.0s idle"), "{why}");
        // The server's kernel acknowledged it: a stalled server, though a new connection goes through.
        let (v, why) = with(lost(Ok(T))).verdict();
        assert_eq!(v, Verdict::ServerStalled, "{why}");
        assert!(why.contains("acknowledged the PING after 60.0s idle"), "{why}");
        let reset = Idle::Lost { idle: s(60), how: "a reset".into(), no_answer: None, fresh: Err("timed out".into()) };
        let (v, _) = with(reset).verdict();
        assert_eq!(v, Verdict::PathDown, "a new connection failing too is the path");
        let (v, why) = with(Idle::Kept { idle: s(60), rtt: T }).verdict();
        assert_eq!(v, Verdict::Ok);
        assert!(why.ends_with("the path kept the connection 60.0s idle"), "{why}");
        let json = evidence_json(&with(Idle::Kept { idle: s(60), rtt: T }));
        assert_eq!(json["layers"]["idle"]["result"], "kept");
    }
}
