//! `tether connect`: one client id; stdin lines go out as `DATA`, everything heard is printed.
//!
//! # Layout
//! [`run`] parses `ADDR[,ADDR...]` (primary first) and picks a mode:
//! - without `--reconnect` ([`once`]): connect to the first address that accepts; a refusal or a lost
//!   connection is printed as `disconnected` and exits 1;
//! - with `--reconnect` ([`resilient`]): a [`ReconnectingClient`] with the backoff, failover and queue flags;
//!   prints `connected`, `disconnected`, `reconnecting`, `connect_failed`, `gave_up`; exits 1 only on `gave_up`.
//!
//! In both, end of stdin stops sending but keeps the connection, and SIGINT/SIGTERM say `BYE` and exit 0.
//! Output goes through writer threads ([`crate::output::Lines`]): a stalled reader of our stdout or stderr never
//! stalls the connection's heartbeats.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use serde_json::json;
use tether::proto::reconnect::{BackoffConfig, ReconnectConfig};
use tether::proto::reliable::{Grant, Status};
use tether::proto::{CloseReason, Presence, PresenceState, Undeliverable};
use tether::{
    AdaptiveConfig, AdaptiveHeartbeat, Client, ClientConfig, ClientEvent, ClientTls, ConnectError, Disconnect, InDoubt,
    LinkEvent, ReconnectingClient, ReliableConfig, ReliableLink, ResilienceConfig, Sent, TrustRoots,
};
use tokio::io::{AsyncBufReadExt, BufReader, Lines, Stdin};

use crate::duration::{self, ms};
use crate::output::Lines as Writer;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Server addresses, HOST:PORT, comma-separated, primary first.
    #[arg(value_delimiter = ',', required = true, value_name = "ADDR[,ADDR...]")]
    addrs: Vec<String>,
    /// This client's id.
    #[arg(long)]
    id: String,
    /// Presence subscriptions: comma-separated ids, or `*`.
    #[arg(long, value_delimiter = ',', value_name = "ID,ID|*")]
    subscribe: Vec<String>,
    /// Send stdin lines to this client id (default: to the server application).
    #[arg(long, value_name = "ID")]
    to: Option<String>,
    /// Requested heartbeat interval (the server clamps it).
    #[arg(long, value_parser = duration::parse, value_name = "DUR")]
    heartbeat_interval: Option<Duration>,
    /// Learn the longest heartbeat interval the path's NATs allow, per network, between FLOOR and CEILING
    /// (e.g. 30s..15m), and change it during the session where the server grants that. Not with
    /// --heartbeat-interval.
    #[arg(long, value_parser = duration::range, value_name = "FLOOR..CEILING", conflicts_with = "heartbeat_interval")]
    adaptive_heartbeat: Option<(Duration, Duration)>,
    /// With --adaptive-heartbeat: how far below the shortest silence the path failed the interval stays.
    #[arg(long, value_name = "PERCENT", default_value_t = 10, value_parser = clap::value_parser!(u8).range(0..=50))]
    adaptive_margin: u8,
    /// Ceiling on TCP's retransmission backoff: auto (a fifth of the heartbeat interval, at least 1s), off, or
    /// 1s–120s.
    #[arg(long, value_parser = duration::rto_max, value_name = "auto|off|DUR", default_value = "auto")]
    rto_max: tether::RtoMax,
    /// Print one JSON object per line.
    #[arg(long)]
    json: bool,
    /// File holding this client's token (from `tether token`), for a server that requires one.
    #[arg(long, value_name = "FILE")]
    token_file: Option<std::path::PathBuf>,
    #[command(flatten)]
    tls: TlsArgs,
    /// Reconnect by itself, with backoff and failover over the addresses.
    #[arg(long)]
    reconnect: bool,
    /// Backoff: ceiling of the first retry's random delay [default: 200ms].
    #[arg(long, value_parser = duration::parse, value_name = "DUR", requires = "reconnect")]
    backoff_initial: Option<Duration>,
    /// Backoff: largest ceiling [default: 30s].
    #[arg(long, value_parser = duration::parse, value_name = "DUR", requires = "reconnect")]
    backoff_max: Option<Duration>,
    /// Backoff: growth of the ceiling per failed attempt [default: 2].
    #[arg(long, value_name = "F", requires = "reconnect")]
    backoff_multiplier: Option<f64>,
    /// Give up after this many failed attempts in a row [default: never].
    #[arg(long, value_name = "N", requires = "reconnect")]
    max_attempts: Option<u32>,
    /// Skip a server that failed for this long while others are available [default: 30s].
    #[arg(long, value_parser = duration::parse, value_name = "DUR", requires = "reconnect")]
    skip_failed_for: Option<Duration>,
    /// While on a backup, probe the primary this often and go back to it; 0 stays [default: 30s].
    #[arg(long, value_parser = duration::parse, value_name = "DUR", requires = "reconnect")]
    return_to_primary: Option<Duration>,
    /// Reconnect even after being kicked.
    #[arg(long, requires = "reconnect")]
    reconnect_after_kick: bool,
    /// Messages held while disconnected; beyond it sends are refused [default: 1000].
    #[arg(long, value_name = "N", requires = "reconnect")]
    queue: Option<usize>,
    /// Ask for a reliable session: every line is acknowledged (`acked`), receipts say when the receiver took it
    /// (`delivered`), and with --reconnect the session resumes after an outage without losing or repeating a
    /// message.
    #[arg(long)]
    reliable: bool,
    /// Reliable: messages sent and not yet acknowledged, at most; beyond it a line is refused [default: 10000].
    #[arg(long, value_name = "N", requires = "reliable")]
    window: Option<usize>,
}

/// The TLS flags of the commands that connect to a server (`connect`, `probe`).
#[derive(clap::Args, Debug)]
pub struct TlsArgs {
    /// Use TLS, trusting the CAs in this PEM file (e.g. `ca.pem` from `tether cert`).
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<std::path::PathBuf>,
    /// Use TLS, trusting the operating system's CA store.
    #[arg(long, conflicts_with = "tls_ca")]
    tls: bool,
    /// Check the server's certificate against this name [default: the host of ADDR].
    #[arg(long, value_name = "NAME")]
    tls_server_name: Option<String>,
    /// Present this client certificate (PEM), for a server started with --tls-client-ca.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
}

impl TlsArgs {
    /// The TLS settings the flags ask for; `None` for plain TCP.
    pub fn client_tls(&self) -> anyhow::Result<Option<ClientTls>> {
        let any = self.tls || self.tls_ca.is_some() || self.tls_server_name.is_some() || self.tls_cert.is_some();
        if !any {
            return Ok(None);
        }
        let ca = self.tls_ca.as_deref().map(crate::read_file).transpose()?;
        let roots = match &ca {
            Some(pem) => TrustRoots::Pem(pem),
            None if self.tls => TrustRoots::System,
            None => bail!("TLS needs trust roots: --tls-ca FILE, or --tls for the system store"),
        };
        let cert = self.tls_cert.as_deref().map(crate::read_file).transpose()?;
        let key = self.tls_key.as_deref().map(crate::read_file).transpose()?;
        let mut tls = ClientTls::new(roots, cert.as_deref().zip(key.as_deref()))?;
        if let Some(name) = &self.tls_server_name {
            tls = tls.with_server_name(name)?;
        }
        Ok(Some(tls))
    }

    /// Whether `--tls-server-name` was given.
    pub fn has_server_name(&self) -> bool {
        self.tls_server_name.is_some()
    }
}

fn whole_ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// The flags and the client's configuration, its files read: done before the runtime starts (a file read may
/// block).
pub struct Prepared {
    args: Args,
    cfg: ClientConfig,
}

pub fn prepare(args: Args) -> anyhow::Result<Prepared> {
    let mut cfg = ClientConfig::new(args.id.clone());
    cfg.heartbeat_interval = args.heartbeat_interval;
    cfg.socket.rto_max = args.rto_max;
    if let Some((floor, ceiling)) = args.adaptive_heartbeat {
        let margin = f64::from(args.adaptive_margin) / 100.0;
        cfg.adaptive_heartbeat = Some(AdaptiveHeartbeat::new(AdaptiveConfig { floor, ceiling, margin }));
    }
    if let Some(path) = &args.token_file {
        let token = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        cfg.credential = token.trim().as_bytes().to_vec();
    }
    cfg.tls = args.tls.client_tls()?;
    if args.reliable {
        let mut rc = ReliableConfig::default();
        rc.window.messages = args.window.unwrap_or(rc.window.messages);
        cfg.reliable = Some(ReliableLink::new(rc));
    }
    Ok(Prepared { args, cfg })
}

pub async fn run(p: Prepared) -> anyhow::Result<ExitCode> {
    let Prepared { args, cfg } = p;
    let shutdown = crate::shutdown_signal()?;
    let out = Printer::new(args.json);
    let stdin = BufReader::new(tokio::io::stdin()).lines();
    let code = if args.reconnect {
        resilient(&args, cfg, &out, stdin, shutdown).await
    } else {
        once(&args, cfg, &out, stdin, shutdown).await
    };
    out.finish();
    code
}

/// One connection: the first address that accepts.
async fn once(
    args: &Args,
    cfg: ClientConfig,
    out: &Printer,
    mut stdin: Lines<BufReader<Stdin>>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<ExitCode> {
    let mut connected = None;
    for server in &args.addrs {
        match Client::connect_to(server, cfg.clone()).await {
            Ok(c) => {
                connected = Some((c, server.clone()));
                break;
            }
            Err(ConnectError::Refused(d)) => {
                out.disconnected(Some(server), &d);
                // `busy` to a reliable client has two causes the protocol does not tell apart.
                let hint = match (d.reason, args.reliable) {
                    (CloseReason::Busy, true) => {
                        " (the server is full, or it is a cluster node that cannot reach Redis, where reliable \
                         sessions are kept)"
                    }
                    _ => "",
                };
                out.error(format!("{server} refused the connection: {}{}{hint}", d.reason, detail(&d)));
            }
            Err(e) => {
                out.line(
                    json!({"event": "connect_failed", "server": server, "reason": null, "error": e.to_string()}),
                    &format!("cannot connect to {server}: {e}"),
                );
                out.error(format!("cannot connect to {server}: {e}"));
            }
        }
    }
    let Some((mut client, server)) = connected else { return Ok(ExitCode::FAILURE) };
    let w = client.welcome().clone();
    let primary = server == args.addrs[0];
    out.connected(&server, &args.id, w.epoch, w.heartbeat_ms.into(), w.timeout_ms.into(), primary, client.reliable());
    if !args.subscribe.is_empty() {
        client.subscribe(args.subscribe.clone()).await.context("subscribing")?;
    }
    let mut stdin_open = true;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => {
                if let Some(d) = client.close().await {
                    out.disconnected(Some(&server), &d);
                }
                return Ok(ExitCode::SUCCESS);
            }
            line = stdin.next_line(), if stdin_open => match line {
                Ok(Some(line)) => {
                    if let Err(e) = client.send(args.to.as_deref(), Bytes::from(line)).await {
                        out.error(format!("not sent: {e}"));
                    }
                }
                Ok(None) | Err(_) => stdin_open = false,
            },
            ev = client.next_event() => match ev {
                Some(ClientEvent::Disconnected(d)) => {
                        out.disconnected(Some(&server), &d);
                    out.error(format!("disconnected: {}{}", d.reason, detail(&d)));
                    return Ok(ExitCode::FAILURE);
                }
                Some(ev) => out.client_event(&ev),
                None => return Ok(ExitCode::FAILURE),
            },
        }
    }
}

/// Stay connected: reconnect, fail over, queue.
async fn resilient(
    args: &Args,
    cfg: ClientConfig,
    out: &Printer,
    mut stdin: Lines<BufReader<Stdin>>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<ExitCode> {
    let d = ReconnectConfig::default();
    let backoff = BackoffConfig {
        initial: args.backoff_initial.unwrap_or(d.backoff.initial),
        max: args.backoff_max.unwrap_or(d.backoff.max),
        multiplier: args.backoff_multiplier.unwrap_or(d.backoff.multiplier),
    };
    if !(backoff.multiplier >= 1.0 && backoff.max >= backoff.initial) {
        bail!("backoff needs multiplier >= 1 and max >= initial");
    }
    let reconnect = ReconnectConfig {
        backoff,
        max_attempts: args.max_attempts,
        skip_failed_for: args.skip_failed_for.unwrap_or(d.skip_failed_for),
        return_to_primary: match args.return_to_primary {
            Some(z) if z.is_zero() => None,
            Some(p) => Some(p),
            None => d.return_to_primary,
        },
        reconnect_after_kick: args.reconnect_after_kick,
    };
    let res = ResilienceConfig { reconnect, queue_limit: args.queue.unwrap_or(1000), seed: None };
    let mut rc = ReconnectingClient::start(args.addrs.clone(), cfg, res);
    if !args.subscribe.is_empty() {
        rc.subscribe(args.subscribe.clone()).await.context("subscribing")?;
    }
    let mut stdin_open = true;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => {
                rc.close().await;
                return Ok(ExitCode::SUCCESS);
            }
            line = stdin.next_line(), if stdin_open => match line {
                Ok(Some(line)) => match rc.send(args.to.as_deref(), Bytes::from(line)).await {
                    Ok(Sent::Now | Sent::Held(_)) => {}
                    Ok(Sent::Queued) => out.line(json!({"event": "queued"}), "(queued until reconnected)"),
                    Err(e) => out.error(format!("not sent: {e}")),
                },
                Ok(None) | Err(_) => stdin_open = false,
            },
            ev = rc.next_event() => match ev {
                Some(LinkEvent::GaveUp { attempts, reason }) => {
                    out.line(
                        json!({"event": "gave_up", "attempts": attempts, "reason": reason.as_str()}),
                        &format!("gave up after {attempts} attempts ({reason})"),
                    );
                    out.error(format!("gave up reconnecting: {reason}"));
                    return Ok(ExitCode::FAILURE);
                }
                Some(ev) => out.link_event(&args.id, &args.addrs[0], &ev),
                None => return Ok(ExitCode::FAILURE),
            },
        }
    }
}

/// ` (detail)` when the disconnect has one.
fn detail(d: &Disconnect) -> String {
    d.detail.as_deref().map(|x| format!(" ({x})")).unwrap_or_default()
}

/// Lines waiting for stdout at most: as many as the client's own event queue holds, so that a burst the client
/// may hand on at once (a resume's replay: up to a session's hold of messages and their receipts) fits.
const OUTPUT_LINES: usize = 16_384;
/// Lines waiting for stderr at most.
const ERROR_LINES: usize = 4096;

struct Printer {
    json: bool,
    out: Writer,
    err: Writer,
}

impl Printer {
    fn new(json: bool) -> Printer {
        let dropped: fn(u64) -> String = if json {
            |n| json!({"event": "dropped", "count": n}).to_string()
        } else {
            |n| format!("({n} lines dropped: stdout was not keeping up)")
        };
        Printer {
            json,
            out: Writer::spawn("stdout", std::io::stdout(), OUTPUT_LINES, dropped),
            err: Writer::spawn("stderr", std::io::stderr(), ERROR_LINES, |n| format!("tether: {n} messages dropped")),
        }
    }

    fn line(&self, v: serde_json::Value, human: &str) {
        self.out.line(if self.json { v.to_string() } else { human.to_owned() });
    }

    /// A message for the user on stderr.
    fn error(&self, msg: String) {
        self.err.line(format!("tether: {msg}"));
    }

    /// Write what is queued, bounded: a stalled reader must not keep the process alive.
    fn finish(self) {
        self.out.finish(Duration::from_secs(2));
        self.err.finish(Duration::from_secs(1));
    }

    #[allow(clippy::too_many_arguments)]
    fn connected(
        &self,
        server: &str,
        id: &str,
        epoch: u64,
        heartbeat_ms: u64,
        timeout_ms: u64,
        primary: bool,
        reliable: Option<Grant>,
    ) {
        let rel = reliable.map(|g| {
            let lost = (g.lost != u32::MAX).then_some(g.lost);
            json!({"status": Status::as_str(g.status), "why": g.why.map(|w| w.as_str()), "lost": lost})
        });
        let rel_human = match reliable {
            None => String::new(),
            Some(g) => match (g.status, g.why) {
                (Status::New, _) => ", reliable session".to_owned(),
                (Status::Resumed, _) => ", reliable session resumed, nothing lost".to_owned(),
                (_, why) => {
                    format!(
                        ", reliable session {}: {} ({})",
                        Status::as_str(g.status),
                        if g.lost == u32::MAX { "an unknown number of".to_owned() } else { g.lost.to_string() },
                        why.map_or("unknown", |w| w.as_str())
                    ) + " messages lost"
                }
            },
        };
        self.line(
            json!({
                "event": "connected", "server": server, "client": id, "epoch": epoch,
                "heartbeat_ms": heartbeat_ms, "timeout_ms": timeout_ms, "primary": primary, "reliable": rel,
            }),
            &format!("connected to {server} as {id} (epoch {epoch}, heartbeat {heartbeat_ms} ms{rel_human})"),
        );
    }

    /// The reliable session's word on what this client sent.
    fn acked(&self, upto: u64) {
        self.line(json!({"event": "acked", "upto": upto}), &format!("acked up to {upto}"));
    }

    fn delivered(&self, to: &str, seqs: &[u64], why: Option<Undeliverable>) {
        let to_name = if to.is_empty() { "(server)" } else { to };
        match why {
            None => self.line(
                json!({"event": "delivered", "to": to, "seqs": seqs}),
                &format!("delivered to {to_name}: {seqs:?}"),
            ),
            Some(why) => self.line(
                json!({"event": "not_delivered", "to": to, "seqs": seqs, "why": why.as_str()}),
                &format!("never delivered to {to_name} ({}): {seqs:?}", why.as_str()),
            ),
        }
    }

    fn in_doubt(&self, msgs: &[InDoubt]) {
        let doubt: Vec<u64> = msgs.iter().filter(|m| m.sent).map(|m| m.seq).collect();
        let resent: Vec<(u64, u64)> = msgs.iter().filter_map(|m| Some((m.seq, m.resent_as?))).collect();
        let unsent: Vec<u64> = msgs.iter().filter(|m| !m.sent && m.resent_as.is_none()).map(|m| m.seq).collect();
        self.line(
            json!({"event": "in_doubt", "seqs": doubt, "resent": resent, "not_sent": unsent}),
            &format!(
                "the session could not be resumed: may or may not have arrived {doubt:?}; sent again as \
                 (old, new) {resent:?}; not sent {unsent:?}"
            ),
        );
    }

    fn disconnected(&self, server: Option<&str>, d: &Disconnect) {
        self.line(
            json!({
                "event": "disconnected", "server": server, "reason": d.reason.as_str(), "by_peer": d.by_peer,
                "lateness_ms": d.lateness.map(ms), "retry_after_ms": d.retry_after.map(whole_ms),
                "alternative": d.alternative, "detail": d.detail, "path_silent": d.path_silent,
                "middlebox_forgot": d.middlebox_forgot,
            }),
            &match &d.detail {
                Some(detail) => format!("disconnected from {}: {} ({detail})", server.unwrap_or("server"), d.reason),
                None => format!("disconnected from {}: {}", server.unwrap_or("server"), d.reason),
            },
        );
    }

    fn link_event(&self, id: &str, primary: &str, ev: &LinkEvent) {
        match ev {
            LinkEvent::Connected { server, epoch, heartbeat, timeout, reliable, .. } => self.connected(
                server,
                id,
                *epoch,
                whole_ms(*heartbeat),
                whole_ms(*timeout),
                server == primary,
                *reliable,
            ),
            LinkEvent::Disconnected { server, disconnect } => self.disconnected(Some(server), disconnect),
            LinkEvent::Reconnecting { attempt, delay, server } => self.line(
                json!({"event": "reconnecting", "attempt": attempt, "delay_ms": whole_ms(*delay), "server": server}),
                &format!("reconnecting to {server} in {delay:?} (attempt {attempt})"),
            ),
            LinkEvent::ConnectFailed { server, refused, error } => {
                let refused = refused.clone();
                let detail = refused.as_ref().and_then(|d| d.detail.clone());
                self.line(
                    json!({
                        "event": "connect_failed", "server": server, "error": error,
                        "reason": refused.as_ref().map(|d| d.reason.as_str()),
                        "retry_after_ms": refused.as_ref().and_then(|d| d.retry_after).map(whole_ms),
                        "detail": detail,
                    }),
                    &match &detail {
                        Some(x) => format!("could not connect to {server}: {error} ({x})"),
                        None => format!("could not connect to {server}: {error}"),
                    },
                )
            }
            LinkEvent::GaveUp { attempts, reason } => self.line(
                json!({"event": "gave_up", "attempts": attempts, "reason": reason.as_str()}),
                &format!("gave up after {attempts} attempts ({reason})"),
            ),
            LinkEvent::Data { from, payload } => self.data(from.as_deref(), payload),
            LinkEvent::Presence(p) => self.presence(p),
            LinkEvent::Undeliverable { to, why } => self.undeliverable(to, *why),
            LinkEvent::NotSent { to, len, error } => self.line(
                json!({"event": "not_sent", "to": to, "len": len, "error": error}),
                &format!("queued message of {len} bytes not sent after reconnecting: {error}"),
            ),
            LinkEvent::Suspect { silent_for } => self.suspect(*silent_for),
            LinkEvent::Recovered => self.line(json!({"event": "recovered"}), "server recovered"),
            LinkEvent::Acked { upto } => self.acked(*upto),
            LinkEvent::Delivered { to, seqs } => self.delivered(to, seqs, None),
            LinkEvent::NotDelivered { to, seqs, why } => self.delivered(to, seqs, Some(*why)),
            LinkEvent::InDoubt(msgs) => self.in_doubt(msgs),
            LinkEvent::Dropped { count } => self.dropped(*count),
            LinkEvent::Heartbeat { interval, timeout } => self.heartbeat(*interval, *timeout),
            LinkEvent::Diagnosis { diagnosis, explanation } => self.line(
                json!({"event": "diagnosis", "diagnosis": diagnosis.as_str(), "explanation": explanation}),
                &format!("diagnosis of the last connection: {explanation}"),
            ),
        }
    }

    /// The output fell behind (stdout blocked, say) by a whole event queue: `count` events were lost.
    fn dropped(&self, count: u64) {
        self.line(
            json!({"event": "dropped", "count": count}),
            &format!("{count} events dropped: this program fell behind by a whole queue"),
        );
    }

    fn client_event(&self, ev: &ClientEvent) {
        match ev {
            ClientEvent::Dropped { count } => self.dropped(*count),
            ClientEvent::Data { from, payload } => self.data(from.as_deref(), payload),
            ClientEvent::Presence(p) => self.presence(p),
            ClientEvent::Undeliverable { to, why } => self.undeliverable(to, *why),
            ClientEvent::Suspect { silent_for } => self.suspect(*silent_for),
            ClientEvent::Recovered => self.line(json!({"event": "recovered"}), "server recovered"),
            ClientEvent::Acked { upto } => self.acked(*upto),
            ClientEvent::Delivered { to, seqs } => self.delivered(to, seqs, None),
            ClientEvent::NotDelivered { to, seqs, why } => self.delivered(to, seqs, Some(*why)),
            ClientEvent::InDoubt(msgs) => self.in_doubt(msgs),
            ClientEvent::Heartbeat { interval, timeout } => self.heartbeat(*interval, *timeout),
            ClientEvent::Disconnected(d) => self.disconnected(None, d),
        }
    }

    fn heartbeat(&self, interval: Duration, timeout: Duration) {
        self.line(
            json!({"event": "heartbeat", "heartbeat_ms": whole_ms(interval), "timeout_ms": whole_ms(timeout)}),
            &format!("heartbeat now {interval:?} (timeout {timeout:?})"),
        );
    }

    fn data(&self, from: Option<&str>, payload: &Bytes) {
        let text = String::from_utf8_lossy(payload);
        self.line(
            json!({"event": "data", "from": from, "payload": text}),
            &format!("{}: {text}", from.unwrap_or("(server)")),
        );
    }

    fn undeliverable(&self, to: &str, why: Undeliverable) {
        let human = match why {
            Undeliverable::TooLarge => format!("not delivered to {to}: too large for the server to relay"),
            Undeliverable::NotOnline => format!("not delivered: {to} is offline"),
            _ => format!("not delivered to {to}"),
        };
        self.line(json!({"event": "undeliverable", "to": to, "why": why.as_str()}), &human);
    }

    fn suspect(&self, silent_for: Duration) {
        self.line(
            json!({"event": "suspect", "silent_ms": ms(silent_for)}),
            &format!("server suspected (silent {silent_for:?})"),
        );
    }

    fn presence(&self, p: &Presence) {
        let last_seen = (p.last_seen_ago_ms != u32::MAX).then_some(p.last_seen_ago_ms);
        let reason = p.reason.map(|r| r.as_str());
        let offline = p.state == PresenceState::Offline;
        let by = (offline && reason.is_some()).then(|| if p.by_client() { "client" } else { "server" });
        self.line(
            json!({
                "event": "presence", "client": p.client_id, "state": p.state.as_str(), "reason": reason,
                "last_seen_ms": last_seen, "by": by,
            }),
            &format!(
                "presence {} {}{}",
                p.client_id,
                p.state.as_str(),
                reason.map(|r| format!(" ({r}, by the {})", by.unwrap_or("server"))).unwrap_or_default()
            ),
        );
    }
}
