//! `tether serve`: configuration layering (defaults < TOML file < flags) and the event printer.
//!
//! # Layout
//! [`Args`] are the flags; [`FileConfig`] is the TOML file, with the same names in snake_case and durations as
//! strings. [`prepare`], before the runtime starts, reads the file and every file it names (certificates, secrets)
//! and resolves the listen address; [`build_config`] layers them onto [`ServerConfig::default`]. [`run`] raises the
//! file-descriptor limit, binds, prints events until SIGINT/SIGTERM, then shuts down gracefully; under a service
//! manager it says `READY=1` once the server accepts and `STOPPING=1` at the signal ([`crate::sd_notify`]). JSON
//! events are printed by a thread of their own from the server's bounded event stream, so a stalled reader of
//! stdout loses events (counted, and reported with a `dropped` event when it catches up) but never stalls the
//! server; human event lines go through the non-blocking log.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::ValueEnum;
use serde::Deserialize;
use tether::loglimit::LogLimiter;
use tether::proto::{DetectorConfig, PhiConfig};
use tether::{EventKind, EventQueue, EventStream, Keepalive, Server, ServerConfig};

use crate::cluster::redacted;
use crate::duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Detector {
    Fixed,
    Phi,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum EventsFormat {
    Json,
}

#[derive(clap::Args, Debug, Default)]
pub struct Args {
    /// TOML file with the same settings (flags override it).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to listen on, IP:PORT or HOST:PORT (a name is resolved at start; tether listens on its first IPv4
    /// address, else its first address) [default: 127.0.0.1:7400].
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Server id sent in WELCOME [default: tether].
    #[arg(long)]
    server_id: Option<String>,
    /// Default heartbeat interval; clients may ask for another within [min, max] [default: 5s].
    #[arg(long, value_parser = duration::parse, value_name = "DUR")]
    heartbeat_interval: Option<Duration>,
    /// Silence after which a client is declared dead [default: 15s].
    #[arg(long, value_parser = duration::parse, value_name = "DUR")]
    heartbeat_timeout: Option<Duration>,
    /// Smallest heartbeat interval a client may ask for [default: 100ms].
    #[arg(long, value_parser = duration::parse, value_name = "DUR")]
    heartbeat_min: Option<Duration>,
    /// Largest heartbeat interval a client may ask for [default: 300s].
    #[arg(long, value_parser = duration::parse, value_name = "DUR")]
    heartbeat_max: Option<Duration>,
    /// Failure detector [default: fixed].
    #[arg(long, value_enum)]
    detector: Option<Detector>,
    /// phi at which `suspect` is raised (phi detector) [default: 3].
    #[arg(long, value_name = "PHI")]
    phi_suspect: Option<f64>,
    /// phi at which the client is declared dead (phi detector) [default: 8].
    #[arg(long, value_name = "PHI")]
    phi_convict: Option<f64>,
    /// Kernel keepalive: idle time before the first probe [default: 15s].
    #[arg(long, value_parser = duration::parse, value_name = "DUR")]
    keepalive_idle: Option<Duration>,
    /// Kernel keepalive: time between probes [default: 5s].
    #[arg(long, value_parser = duration::parse, value_name = "DUR")]
    keepalive_interval: Option<Duration>,
    /// Kernel keepalive: unanswered probes before the kernel gives up [default: 3].
    #[arg(long, value_name = "N")]
    keepalive_count: Option<u32>,
    /// TCP_USER_TIMEOUT; 0 leaves the kernel default [default: idle + interval × count].
    #[arg(long, value_parser = duration::parse, value_name = "DUR")]
    user_timeout: Option<Duration>,
    /// Ceiling on TCP's retransmission backoff, so a connection carries data again within it after a blip
    /// heals: auto (a fifth of the connection's heartbeat interval, at least 1s), off, or 1s–120s [default: auto].
    #[arg(long, value_parser = duration::rto_max, value_name = "auto|off|DUR")]
    rto_max: Option<tether::RtoMax>,
    /// Pending output that makes no progress for this long ends the connection [default: 15s].
    #[arg(long, value_parser = duration::parse, value_name = "DUR")]
    write_timeout: Option<Duration>,
    /// How long a goodbye may take (flush BYE, wait for the peer's FIN) [default: 2s].
    #[arg(long, value_parser = duration::parse, value_name = "DUR")]
    close_grace: Option<Duration>,
    /// HELLO must arrive within this [default: 5s].
    #[arg(long, value_parser = duration::parse, value_name = "DUR")]
    handshake_timeout: Option<Duration>,
    /// Delay before announcing offline to subscribers; 0 announces at once [default: 0].
    #[arg(long, value_parser = duration::parse, value_name = "DUR")]
    presence_grace: Option<Duration>,
    /// Event loops, as many as the runtime's worker threads [default: one per CPU, or TOKIO_WORKER_THREADS].
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// Connections held at once; beyond it newcomers get BYE(busy) [default: 10000].
    #[arg(long, value_name = "N")]
    max_connections: Option<usize>,
    /// Connections one source address may hold; beyond it newcomers get BYE(ip_limit) [default: no cap].
    #[arg(long, value_name = "N")]
    max_per_ip: Option<usize>,
    /// Connections whose HELLO is not admitted yet; beyond it newcomers get BYE(busy) [default: 512].
    #[arg(long, value_name = "N")]
    max_handshakes: Option<usize>,
    /// Handshakes one source address (IPv6: one /64) may have in flight; beyond it, BYE(ip_limit)
    /// [default: max_handshakes / 16, at least 2].
    #[arg(long, value_name = "N")]
    max_handshakes_per_ip: Option<usize>,
    /// Offline ids remembered (with reason and last seen) for later subscribers [default: 16384].
    #[arg(long, value_name = "N")]
    remember_offline: Option<usize>,
    /// How long an offline id is remembered [default: 1h].
    #[arg(long, value_parser = duration::parse, value_name = "DUR")]
    remember_offline_for: Option<Duration>,
    /// Events waiting for the printer at most; beyond it they are dropped and counted [default: 16384].
    #[arg(long, value_name = "N")]
    event_buffer: Option<usize>,
    /// New connections accepted per second; excess get BYE(busy) [default: unlimited].
    #[arg(long, value_name = "N")]
    accept_rate: Option<u32>,
    /// Smallest retry-after sent with busy [default: 1s].
    #[arg(long, value_parser = duration::parse, value_name = "DUR")]
    busy_retry_after: Option<Duration>,
    /// busy retry-after hints are spread uniformly over this window on top [default: 5s].
    #[arg(long, value_parser = duration::parse, value_name = "DUR")]
    busy_retry_spread: Option<Duration>,
    /// Require client tokens signed with the secret in this file (see `tether token`). Without it, the
    /// TETHER_AUTH_SECRET environment variable is used; without either, the server is open.
    #[arg(long, value_name = "FILE")]
    auth_secret_file: Option<PathBuf>,
    /// Run without authentication, knowingly: any client may claim (and take over) any id. For local demos.
    #[arg(long)]
    insecure_no_auth: bool,
    /// A refused credential is answered only after this long [default: 1s].
    #[arg(long, value_parser = duration::parse, value_name = "DUR")]
    auth_fail_delay: Option<Duration>,
    /// On shutdown, tell clients to reconnect to this address instead (server-directed drain).
    #[arg(long, value_name = "ADDR")]
    shutdown_redirect: Option<String>,
    /// Serve TLS with this certificate chain (PEM, leaf first); needs --tls-key.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The server certificate's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require client certificates signed by a CA in this PEM file (client-certificate authentication).
    #[arg(long, value_name = "FILE")]
    tls_client_ca: Option<PathBuf>,
    /// DATA bytes per second one connection may send; beyond it, BYE(rate_limited) [default: no limit].
    #[arg(long, value_name = "BYTES")]
    max_data_rate: Option<u32>,
    /// Presence subscriptions one connection may hold; beyond it, BYE(subscription_refused) [default: 1024].
    #[arg(long, value_name = "N")]
    max_subscriptions: Option<usize>,
    /// Largest frame accepted, in bytes [default: 65536].
    #[arg(long, value_name = "BYTES")]
    max_frame: Option<u32>,
    /// Print events as JSON lines on stdout.
    #[arg(long, value_enum)]
    events: Option<EventsFormat>,
    /// Also emit a `stats` event this often (connections, online, handshakes in flight and their peak, busy).
    #[arg(long, value_parser = duration::parse, value_name = "DUR")]
    stats_interval: Option<Duration>,
    /// Admin API, /metrics and dashboard address, or `off` [default: 127.0.0.1:7401 with the default --listen,
    /// else an ephemeral loopback port].
    #[arg(long, value_name = "ADDR|off")]
    admin: Option<String>,
    /// Bearer token for the admin API, from this file (required on a non-loopback --admin). Without it, the
    /// TETHER_ADMIN_TOKEN environment variable is used.
    #[arg(long, value_name = "FILE")]
    admin_token_file: Option<PathBuf>,
    /// Serve /metrics, /healthz and /readyz without the admin token (for scrapers).
    #[arg(long)]
    admin_open_metrics: bool,
    /// Closed connections kept for the admin API's /v1/disconnects [default: 10000].
    #[arg(long, value_name = "N")]
    disconnect_history: Option<usize>,
    /// A reliable session outlives its connection this long, holding its messages for a resume [default: 2m].
    #[arg(long, value_parser = duration::parse, value_name = "DUR")]
    session_expiry: Option<Duration>,
    /// Messages one reliable session may hold unacknowledged, online or offline [default: 10000].
    #[arg(long, value_name = "N")]
    hold_messages: Option<usize>,
    /// Bytes one reliable session may hold [default: 4194304].
    #[arg(long, value_name = "BYTES")]
    hold_bytes: Option<usize>,
    /// Bytes all reliable sessions together may hold [default: 268435456].
    #[arg(long, value_name = "BYTES")]
    hold_total: Option<usize>,
    /// Join a cluster on Redis: redis://HOST:PORT/DB [default: none, a single node in memory].
    #[arg(long, value_name = "URL")]
    cluster: Option<String>,
    /// This node's id in the cluster (in WELCOME, events, the admin API) [default: node- and random hex].
    #[arg(long, value_name = "ID", requires = "cluster")]
    node_id: Option<String>,
    /// A node that has not renewed its lease in Redis for this long is lost [default: 3s].
    #[arg(long, value_parser = duration::parse, value_name = "DUR", requires = "cluster")]
    node_lease: Option<Duration>,
}

/// The TOML file: every field optional, durations as strings ("500ms", "1.5s").
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    listen: Option<String>,
    server_id: Option<String>,
    heartbeat_interval: Option<String>,
    heartbeat_timeout: Option<String>,
    heartbeat_min: Option<String>,
    heartbeat_max: Option<String>,
    detector: Option<Detector>,
    phi_suspect: Option<f64>,
    phi_convict: Option<f64>,
    keepalive_idle: Option<String>,
    keepalive_interval: Option<String>,
    keepalive_count: Option<u32>,
    user_timeout: Option<String>,
    rto_max: Option<String>,
    write_timeout: Option<String>,
    close_grace: Option<String>,
    handshake_timeout: Option<String>,
    presence_grace: Option<String>,
    threads: Option<usize>,
    max_connections: Option<usize>,
    max_handshakes: Option<usize>,
    max_handshakes_per_ip: Option<usize>,
    remember_offline: Option<usize>,
    remember_offline_for: Option<String>,
    event_buffer: Option<usize>,
    max_per_ip: Option<usize>,
    accept_rate: Option<u32>,
    busy_retry_after: Option<String>,
    busy_retry_spread: Option<String>,
    shutdown_redirect: Option<String>,
    auth_secret_file: Option<PathBuf>,
    insecure_no_auth: Option<bool>,
    auth_fail_delay: Option<String>,
    max_data_rate: Option<u32>,
    max_frame: Option<u32>,
    max_subscriptions: Option<usize>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_client_ca: Option<PathBuf>,
    admin: Option<String>,
    admin_token_file: Option<PathBuf>,
    admin_open_metrics: Option<bool>,
    disconnect_history: Option<usize>,
    session_expiry: Option<String>,
    hold_messages: Option<usize>,
    hold_bytes: Option<usize>,
    hold_total: Option<usize>,
    cluster: Option<String>,
    node_id: Option<String>,
    node_lease: Option<String>,
}

/// `tether serve` made ready before the runtime starts: everything that reads a file or the resolver (which
/// may block, and nothing that can block runs on the runtime) is done, and the settings are checked.
pub struct Prepared {
    args: Args,
    cfg: ServerConfig,
    /// The admin listener's address and settings; `None` with `--admin off`.
    admin: Option<(SocketAddr, tether_admin::AdminConfig)>,
    /// The runtime's worker threads (`--threads`), `None` for tokio's default.
    pub threads: Option<usize>,
}

/// Read the file (once), resolve the listen address, and build the server's and the admin listener's settings.
pub fn prepare(mut args: Args) -> anyhow::Result<Prepared> {
    let file = load_file(&args.config)?;
    resolve_listen(&mut args, &file)?;
    let threads = threads(&args, &file)?;
    let cfg = build_config(&args, &file)?;
    let admin = match admin_addr(&args, &file)? {
        None => None,
        Some(addr) => Some((addr, admin_config(&args, &file)?)),
    };
    Ok(Prepared { args, cfg, admin, threads })
}

/// Resolve a host name given as `--listen` (or `listen` in the file) to the address tether will listen on, the
/// first IPv4 address it resolves to, else its first address, and say which.
fn resolve_listen(args: &mut Args, file: &FileConfig) -> anyhow::Result<()> {
    use std::net::ToSocketAddrs;
    let Some(listen) = args.listen.clone().or(file.listen.clone()) else { return Ok(()) };
    if listen.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    let Some((host, _)) = listen.rsplit_once(':').filter(|(_, p)| p.parse::<u16>().is_ok()) else {
        bail!("--listen {listen:?} is neither IP:PORT nor HOST:PORT");
    };
    let all: Vec<SocketAddr> =
        listen.to_socket_addrs().with_context(|| format!("--listen {listen}: cannot resolve {host:?}"))?.collect();
    let chosen = all
        .iter()
        .find(|a| a.is_ipv4())
        .or(all.first())
        .copied()
        .with_context(|| format!("--listen {listen}: {host:?} resolves to no address"))?;
    let ip = chosen.ip();
    let others: Vec<String> = all.iter().map(|a| a.ip()).filter(|a| *a != ip).map(|a| a.to_string()).collect();
    if others.is_empty() {
        tracing::info!("--listen {listen}: {host} is {ip}");
    } else {
        let others = others.join(", ");
        tracing::info!("--listen {listen}: {host} is {ip} and {others}; listening on {ip} only (give an IP to choose)");
    }
    args.listen = Some(chosen.to_string());
    Ok(())
}

/// More worker threads than this is taken for a mistake: the runtime would try to start them all at once.
const MAX_THREADS: usize = 1024;

/// How many worker threads the runtime gets, and so how many event loops the server runs (`None`: tokio's
/// default, one per CPU).
fn threads(args: &Args, file: &FileConfig) -> anyhow::Result<Option<usize>> {
    match args.threads.or(file.threads) {
        Some(0) => bail!("threads must be at least 1 (leave it out for one per CPU)"),
        Some(n) if n > MAX_THREADS => bail!("threads must be at most {MAX_THREADS}, not {n}"),
        n => Ok(n),
    }
}

fn dur(field: &str, v: &Option<String>) -> anyhow::Result<Option<Duration>> {
    v.as_deref().map(duration::parse).transpose().map_err(|e| anyhow::anyhow!("{field}: {e}"))
}

/// Defaults, then the file, then the flags.
pub fn build_config(args: &Args, file: &FileConfig) -> anyhow::Result<ServerConfig> {
    let mut cfg = ServerConfig::default();
    macro_rules! pick {
        ($flag:expr, $file:expr) => {
            $flag.or($file)
        };
    }
    if let Some(listen) = pick!(args.listen.clone(), file.listen.clone()) {
        cfg.listen = listen.parse().with_context(|| format!("--listen {listen:?} is not an IP:PORT address"))?;
    }
    if let Some(id) = pick!(args.server_id.clone(), file.server_id.clone()) {
        cfg.server_id = id;
    }
    let hb = &mut cfg.heartbeat;
    hb.interval =
        pick!(args.heartbeat_interval, dur("heartbeat_interval", &file.heartbeat_interval)?).unwrap_or(hb.interval);
    hb.timeout =
        pick!(args.heartbeat_timeout, dur("heartbeat_timeout", &file.heartbeat_timeout)?).unwrap_or(hb.timeout);
    hb.min_interval = pick!(args.heartbeat_min, dur("heartbeat_min", &file.heartbeat_min)?).unwrap_or(hb.min_interval);
    hb.max_interval = pick!(args.heartbeat_max, dur("heartbeat_max", &file.heartbeat_max)?).unwrap_or(hb.max_interval);
    if hb.interval.is_zero() || hb.timeout <= hb.interval {
        bail!("heartbeat timeout ({:?}) must be longer than the interval ({:?})", hb.timeout, hb.interval);
    }
    cfg.registry.conflict_liveness = hb.interval.mul_f64(1.5);
    match pick!(args.detector, file.detector).unwrap_or(Detector::Fixed) {
        Detector::Fixed => cfg.conn.detector = DetectorConfig::Fixed,
        Detector::Phi => {
            let mut p = PhiConfig::default();
            p.suspect_threshold = pick!(args.phi_suspect, file.phi_suspect).unwrap_or(p.suspect_threshold);
            p.convict_threshold = pick!(args.phi_convict, file.phi_convict).unwrap_or(p.convict_threshold);
            if !(p.suspect_threshold > 0.0 && p.convict_threshold > p.suspect_threshold) {
                bail!("phi thresholds must satisfy 0 < suspect < convict");
            }
            cfg.conn.detector = DetectorConfig::Phi(p);
        }
    }
    let ka = cfg.socket.keepalive.get_or_insert(Keepalive {
        idle: Duration::from_secs(15),
        interval: Duration::from_secs(5),
        count: 3,
    });
    let asked_idle = pick!(args.keepalive_idle, dur("keepalive_idle", &file.keepalive_idle)?);
    ka.idle = asked_idle.unwrap_or(ka.idle);
    ka.interval =
        pick!(args.keepalive_interval, dur("keepalive_interval", &file.keepalive_interval)?).unwrap_or(ka.interval);
    ka.count = pick!(args.keepalive_count, file.keepalive_count).unwrap_or(ka.count);
    if ka.idle.as_secs() < 1 || ka.interval.as_secs() < 1 || ka.count == 0 {
        bail!("keepalive idle and interval must be at least 1s and count at least 1 (the kernel counts in seconds)");
    }
    // An idle time the operator gave is kept as given; the default one follows each connection's heartbeat.
    cfg.socket.keepalive_follows_heartbeat = asked_idle.is_none();
    if let Some(uto) = pick!(args.user_timeout, dur("user_timeout", &file.user_timeout)?) {
        cfg.socket.user_timeout = Some(uto);
    }
    let file_rto = file.rto_max.as_deref().map(duration::rto_max).transpose().map_err(|e| anyhow::anyhow!(e))?;
    cfg.socket.rto_max = pick!(args.rto_max, file_rto).unwrap_or(cfg.socket.rto_max);
    let c = &mut cfg.conn;
    c.write_timeout = pick!(args.write_timeout, dur("write_timeout", &file.write_timeout)?).unwrap_or(c.write_timeout);
    c.close_grace = pick!(args.close_grace, dur("close_grace", &file.close_grace)?).unwrap_or(c.close_grace);
    c.handshake_timeout = pick!(args.handshake_timeout, dur("handshake_timeout", &file.handshake_timeout)?)
        .unwrap_or(c.handshake_timeout);
    c.max_frame = pick!(args.max_frame, file.max_frame).unwrap_or(c.max_frame);
    c.max_data_rate = pick!(args.max_data_rate, file.max_data_rate).or(c.max_data_rate);
    if c.max_data_rate == Some(0) {
        bail!("max_data_rate must be at least 1 byte per second (leave it out for no limit)");
    }
    let (min, max) = (tether::proto::frame::MIN_MAX_FRAME, tether::proto::frame::MAX_MAX_FRAME);
    if !(min..=max).contains(&c.max_frame) {
        bail!("max_frame must be between {min} and {max} bytes");
    }
    cfg.registry.max_subscriptions =
        pick!(args.max_subscriptions, file.max_subscriptions).unwrap_or(cfg.registry.max_subscriptions);
    cfg.registry.presence_grace =
        pick!(args.presence_grace, dur("presence_grace", &file.presence_grace)?).unwrap_or(cfg.registry.presence_grace);
    cfg.max_connections = pick!(args.max_connections, file.max_connections).unwrap_or(cfg.max_connections);
    cfg.max_handshakes = pick!(args.max_handshakes, file.max_handshakes).unwrap_or(cfg.max_handshakes).max(1);
    cfg.max_handshakes_per_ip = pick!(args.max_handshakes_per_ip, file.max_handshakes_per_ip);
    if cfg.max_handshakes_per_ip == Some(0) {
        bail!("max_handshakes_per_ip must be at least 1 (leave it out for the default)");
    }
    let reg = &mut cfg.registry;
    reg.remember_offline = pick!(args.remember_offline, file.remember_offline).unwrap_or(reg.remember_offline);
    reg.remember_offline_for =
        pick!(args.remember_offline_for, dur("remember_offline_for", &file.remember_offline_for)?)
            .unwrap_or(reg.remember_offline_for);
    if let Some(n) = pick!(args.event_buffer, file.event_buffer) {
        cfg.event_queue = EventQueue::Bounded(n.max(1));
    }
    cfg.max_per_ip = pick!(args.max_per_ip, file.max_per_ip).or(cfg.max_per_ip);
    if cfg.max_per_ip == Some(0) {
        bail!("max_per_ip must be at least 1 (leave it out for no cap)");
    }
    cfg.accept_rate = pick!(args.accept_rate, file.accept_rate).or(cfg.accept_rate);
    if cfg.accept_rate == Some(0) {
        bail!("accept_rate must be at least 1 per second (leave it out for no limit)");
    }
    cfg.busy_retry_after =
        pick!(args.busy_retry_after, dur("busy_retry_after", &file.busy_retry_after)?).unwrap_or(cfg.busy_retry_after);
    cfg.busy_retry_spread = pick!(args.busy_retry_spread, dur("busy_retry_spread", &file.busy_retry_spread)?)
        .unwrap_or(cfg.busy_retry_spread);
    cfg.shutdown_redirect = pick!(args.shutdown_redirect.clone(), file.shutdown_redirect.clone());
    if let Some(a) = &cfg.shutdown_redirect {
        if let Err(what) = tether::config::check_address(a) {
            bail!("shutdown_redirect {a:?} {what}");
        }
    }
    cfg.auth_fail_delay =
        pick!(args.auth_fail_delay, dur("auth_fail_delay", &file.auth_fail_delay)?).unwrap_or(cfg.auth_fail_delay);
    let insecure = args.insecure_no_auth || file.insecure_no_auth.unwrap_or(false);
    let secret_file = args.auth_secret_file.clone().or(file.auth_secret_file.clone());
    match (crate::token::secret(secret_file.as_deref())?, insecure) {
        (Some(_), true) => bail!("an auth secret is configured and --insecure-no-auth is given: choose one"),
        (Some(secret), false) => {
            cfg.auth = Some(tether::Auth(std::sync::Arc::new(crate::token::tokens(secret)?)));
        }
        (None, true) => {}
        (None, false) => tracing::warn!(
            "no auth secret: any client may claim and take over any id (give --auth-secret-file, or \
             --insecure-no-auth to say this is intended)"
        ),
    }
    cfg.tls = server_tls(args, file)?;
    cfg.disconnect_history = pick!(args.disconnect_history, file.disconnect_history).unwrap_or(cfg.disconnect_history);
    let hold = &mut cfg.hold;
    hold.expiry = pick!(args.session_expiry, dur("session_expiry", &file.session_expiry)?).unwrap_or(hold.expiry);
    hold.per_session.messages = pick!(args.hold_messages, file.hold_messages).unwrap_or(hold.per_session.messages);
    hold.per_session.bytes = pick!(args.hold_bytes, file.hold_bytes).unwrap_or(hold.per_session.bytes);
    hold.total_bytes = pick!(args.hold_total, file.hold_total).unwrap_or(hold.total_bytes);
    if hold.expiry.is_zero() || hold.per_session.messages == 0 || hold.per_session.bytes == 0 {
        bail!("session_expiry, hold_messages and hold_bytes must be above zero");
    }
    if let Some(url) = pick!(args.cluster.clone(), file.cluster.clone()) {
        crate::cluster::check_url("--cluster", &url)?;
        let mut cc = tether::ClusterConfig::new(url);
        if let Some(id) = pick!(args.node_id.clone(), file.node_id.clone()) {
            if id.is_empty() || id.contains('#') || id.len() > 64 {
                bail!("--node-id {id:?}: 1 to 64 characters, no '#'");
            }
            cc.node_id = id;
        }
        if let Some(lease) = pick!(args.node_lease, dur("node_lease", &file.node_lease)?) {
            if lease < Duration::from_millis(300) {
                bail!("--node-lease {lease:?}: at least 300ms (it is renewed every third of it)");
            }
            cc.lease = lease;
        }
        cfg.cluster = Some(cc);
    }
    // Per-frame counting serves the admin listener's /metrics; without it the hot path skips that work.
    cfg.metrics = admin_addr(args, file)?.is_some();
    Ok(cfg)
}

/// The admin listener's address: `--admin` (or `off`), else 127.0.0.1:7401 when the server listens on its
/// default address, else an ephemeral loopback port (so that several servers on one machine never collide).
pub fn admin_addr(args: &Args, file: &FileConfig) -> anyhow::Result<Option<SocketAddr>> {
    match args.admin.as_deref().or(file.admin.as_deref()) {
        Some("off") => Ok(None),
        Some(a) => Ok(Some(a.parse().with_context(|| format!("--admin {a:?} is neither an IP:PORT address nor off"))?)),
        None if args.listen.is_none() && file.listen.is_none() => Ok(Some(SocketAddr::from(([127, 0, 0, 1], 7401)))),
        None => Ok(Some(SocketAddr::from(([127, 0, 0, 1], 0)))),
    }
}

/// The admin listener's settings: its token (from `--admin-token-file`, else `TETHER_ADMIN_TOKEN`), whether the
/// scrape endpoints are open.
fn admin_config(args: &Args, file: &FileConfig) -> anyhow::Result<tether_admin::AdminConfig> {
    let token = match args.admin_token_file.as_ref().or(file.admin_token_file.as_ref()) {
        Some(path) => {
            let raw = crate::read_file(path)?;
            let t = String::from_utf8(raw).with_context(|| format!("{} is not UTF-8", path.display()))?;
            let t = t.trim().to_owned();
            if t.is_empty() {
                bail!("{} holds no token", path.display());
            }
            Some(t)
        }
        None => std::env::var("TETHER_ADMIN_TOKEN").ok().map(|t| t.trim().to_owned()).filter(|t| !t.is_empty()),
    };
    Ok(tether_admin::AdminConfig {
        token,
        open_metrics: args.admin_open_metrics || file.admin_open_metrics.unwrap_or(false),
    })
}

/// The TLS settings from the flags or the file (flags win, as a set); `None` serves plain TCP.
fn server_tls(args: &Args, file: &FileConfig) -> anyhow::Result<Option<tether::ServerTls>> {
    let (cert, key, client_ca) = if args.tls_cert.is_some() {
        (&args.tls_cert, &args.tls_key, args.tls_client_ca.as_ref().or(file.tls_client_ca.as_ref()))
    } else {
        (&file.tls_cert, &file.tls_key, args.tls_client_ca.as_ref().or(file.tls_client_ca.as_ref()))
    };
    let (cert, key) = match (cert, key) {
        (Some(c), Some(k)) => (c, k),
        (None, None) if client_ca.is_none() => return Ok(None),
        (None, None) => bail!("--tls-client-ca needs --tls-cert and --tls-key"),
        _ => bail!("TLS needs both a certificate (tls_cert) and its key (tls_key)"),
    };
    let ca = client_ca.map(|p| crate::read_file(p)).transpose()?;
    let tls = tether::ServerTls::from_pem(&crate::read_file(cert)?, &crate::read_file(key)?, ca.as_deref())?;
    Ok(Some(tls))
}

fn load_file(path: &Option<PathBuf>) -> anyhow::Result<FileConfig> {
    let Some(path) = path else { return Ok(FileConfig::default()) };
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// How long, once the server has stopped, the event printer may take to write what is left.
const PRINTER_PATIENCE: Duration = Duration::from_secs(5);

pub async fn run(prepared: Prepared) -> anyhow::Result<ExitCode> {
    let Prepared { args, mut cfg, admin, threads: _ } = prepared;
    match tether::fdlimit::raise_fd_limit() {
        Ok((before, after)) if after.soft > before.soft => {
            tracing::info!("file descriptor limit raised from {} to {}", before.soft, after.soft)
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("cannot raise the file descriptor limit: {e}"),
    }
    let hb = &cfg.heartbeat;
    tracing::info!(
        "heartbeat {:?}/{:?} ({}; clients may ask {}), user timeout {}, retransmission ceiling {}, close grace \
         {:?}, handshake timeout {:?}, max {} connections",
        hb.interval,
        hb.timeout,
        match cfg.conn.detector {
            tether::proto::detector::DetectorConfig::Fixed => "fixed timeout",
            tether::proto::detector::DetectorConfig::Phi(_) => "phi accrual",
        },
        match hb.updates() {
            Some(_) => format!("{:?} to {:?}, also during the session", hb.min_interval, hb.max_interval),
            None => format!("{:?} only", hb.max_interval),
        },
        cfg.socket.effective_user_timeout().map_or("off".to_owned(), |t| format!("{t:?}")),
        match cfg.socket.rto_max.for_interval(cfg.heartbeat.interval) {
            Some(cap) if cfg.socket.rto_max == tether::RtoMax::Auto => format!("auto ({cap:?} at this heartbeat)"),
            Some(cap) => format!("{cap:?}"),
            None => "the kernel's (120s)".to_owned(),
        },
        cfg.conn.close_grace,
        cfg.conn.handshake_timeout,
        cfg.max_connections
    );
    match &cfg.tls {
        None => tracing::info!("plain TCP: frames, tokens included, travel in clear text (give --tls-cert/--tls-key)"),
        Some(t) if t.requires_client_cert() => tracing::info!("TLS, client certificates required"),
        Some(_) => tracing::info!("TLS"),
    }
    match tokio::runtime::Handle::current().metrics().num_workers() {
        1 => tracing::info!("1 event loop, on one worker thread"),
        n => tracing::info!("{n} event loops, one per worker thread"),
    }
    if let Some(c) = &cfg.cluster {
        tracing::info!("cluster on {} as node {}, lease {:?}", redacted(&c.url), c.node_id, c.lease);
    }
    tracing::info!(
        "reliable sessions in {}: kept {:?} offline, {} messages / {} bytes each, {} bytes in all",
        if cfg.cluster.is_some() { "Redis" } else { "memory" },
        cfg.hold.expiry,
        cfg.hold.per_session.messages,
        cfg.hold.per_session.bytes,
        cfg.hold.total_bytes
    );
    let notifier = std::sync::Arc::new(crate::sd_notify::Notifier::from_env());
    let shutdown = crate::shutdown_signal()?;
    let json = args.events == Some(EventsFormat::Json);
    cfg.stats_interval = args.stats_interval.filter(|d| !d.is_zero());
    let mut server = Server::bind(cfg.clone()).await.with_context(|| format!("binding {}", cfg.listen))?;
    // Before `run`, so that the `listening` event names the admin address.
    let admin = match admin {
        None => None,
        Some((addr, admin_cfg)) => {
            let auth = if admin_cfg.token.is_some() { "bearer token required" } else { "no token: loopback only" };
            let admin = tether_admin::start(addr, admin_cfg, server.handle()).await?;
            tracing::info!("admin API, /metrics and dashboard on http://{}/ ({auth})", admin.addr());
            Some(admin)
        }
    };
    let events = server.events().expect("fresh server has its event stream");
    let node = cfg.cluster.as_ref().map(|c| c.node_id.clone());
    let shutdown = tell_manager(&mut server, node, notifier, shutdown);
    if json {
        // JSON lines go to stdout, where a write may block: on a thread of its own.
        let printer = std::thread::Builder::new()
            .name("events".into())
            .spawn(move || print_json(events))
            .context("starting the event printer")?;
        let ran = server.run(shutdown).await;
        stop_admin(admin).await;
        // The stream ends once the server's last handle is gone (the admin listener held one); the printer then
        // writes what is left and stops, also when the server stopped on an error (its `listening` line first). A
        // reader that stalled for good must not keep the process alive: wait a bounded time.
        let printed = tokio::task::spawn_blocking(move || printer.join());
        if tokio::time::timeout(PRINTER_PATIENCE, printed).await.is_err() {
            tracing::warn!("stdout is not read: exiting with events unprinted after {PRINTER_PATIENCE:?}");
        }
        ran?;
    } else {
        // Human lines go through the log, whose writer never blocks: a task will do.
        let printer = tokio::spawn(log_events(events));
        let ran = server.run(shutdown).await;
        stop_admin(admin).await;
        if tokio::time::timeout(PRINTER_PATIENCE, printer).await.is_err() {
            tracing::warn!("exiting with event lines unwritten after {PRINTER_PATIENCE:?}");
        }
        ran?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Tell a service manager (`$NOTIFY_SOCKET`) `READY=1` once the server accepts, and `STOPPING=1` as soon as the
/// signal to stop arrives: returns the shutdown future to run the server with.
fn tell_manager(
    server: &mut Server,
    node: Option<String>,
    notifier: std::sync::Arc<crate::sd_notify::Notifier>,
    shutdown: impl std::future::Future<Output = ()>,
) -> impl std::future::Future<Output = ()> {
    let handle = server.handle();
    let listening = EventKind::Listening { addr: handle.local_addr(), admin: handle.admin_addr(), node };
    let accepting = server.accepting();
    let ready = notifier.clone();
    tokio::spawn(async move {
        if accepting.await {
            ready.ready(&event_human(&listening));
        }
    });
    async move {
        shutdown.await;
        let conns = handle.stats().connections;
        let s = if conns == 1 { "" } else { "s" };
        notifier.stopping(&format!("shutting down: saying goodbye to {conns} connection{s}"));
    }
}

/// After the server stopped: end the admin listener and its connections, which hold handles on the server (and
/// so keep its event stream open).
async fn stop_admin(admin: Option<tether_admin::AdminListener>) {
    if let Some(admin) = admin {
        admin.stop().await;
    }
}

/// The JSON event printer's loop, on a thread of its own: one line per event on stdout.
fn print_json(mut events: EventStream) {
    use std::io::Write;
    let mut out = std::io::stdout();
    while let Some(ev) = events.blocking_recv() {
        let _ = writeln!(out, "{}", event_json(&ev));
        let _ = out.flush();
    }
}

/// Human event lines through the non-blocking log. Repeats of one kind of event about one client are written
/// three times per 10 s, then summarised with their count when the window ends.
async fn log_events(mut events: EventStream) {
    let limiter = LogLimiter::new(Duration::from_secs(10), 3, 4096);
    loop {
        let far = tokio::time::Instant::now() + Duration::from_secs(3600);
        let next_summary = limiter.next_flush().map_or(far, tokio::time::Instant::from_std);
        let ev = tokio::select! {
            ev = events.recv() => ev,
            () = tokio::time::sleep_until(next_summary) => {
                for summary in limiter.flush(std::time::Instant::now()) {
                    tracing::info!("{summary}");
                }
                continue;
            }
        };
        let Some(ev) = ev else { break };
        // The library logs the cluster's state changes itself (a warning when degraded): one line, not two.
        if matches!(ev.kind, EventKind::Cluster { .. }) {
            continue;
        }
        if limiter.check(std::time::Instant::now(), ev.kind.name(), &event_key(&ev.kind)) {
            tracing::info!("{}", event_human(&ev.kind));
        }
    }
    for summary in limiter.flush(std::time::Instant::now() + Duration::from_secs(3600)) {
        tracing::info!("{summary}");
    }
}

/// What repeats of an event are counted by: the client id it is about, or the peer's address for a connection
/// that never had a session.
fn event_key(k: &EventKind) -> String {
    match k {
        EventKind::Online { client, .. }
        | EventKind::Offline { client, .. }
        | EventKind::Takeover { client, .. }
        | EventKind::Diagnosis { client, .. }
        | EventKind::Heartbeat { client, .. }
        | EventKind::IdConflict { client, .. }
        | EventKind::Suspect { client, .. }
        | EventKind::Recovered { client, .. }
        | EventKind::Data { client, .. }
        | EventKind::Undeliverable { client, .. } => client.clone(),
        EventKind::Closed { client: Some(client), .. } => client.clone(),
        EventKind::Closed { client: None, peer, .. } => peer.ip().to_string(),
        _ => String::new(),
    }
}

use tether_admin::json::{decider, event_json, ms};

fn event_human(k: &EventKind) -> String {
    match k {
        EventKind::Listening { addr, admin, node } => {
            let mut line = format!("listening on {addr}");
            if let Some(node) = node {
                line.push_str(&format!(" as cluster node {node}"));
            }
            if let Some(admin) = admin {
                line.push_str(&format!("; admin API and dashboard on http://{admin}/"));
            }
            line
        }
        EventKind::Online { client, peer, epoch, heartbeat, .. } => {
            format!("online  {client} from {peer} (epoch {epoch}, heartbeat {heartbeat:?})")
        }
        EventKind::Offline { client, peer, reason, lateness, silent_for, by_peer, detail, .. } => {
            let late = lateness.map(|l| format!(", {:.3} ms after its deadline", ms(l))).unwrap_or_default();
            let detail = detail.as_deref().map(|d| format!(": {d}")).unwrap_or_default();
            // How long it had been silent says something only of a verdict of ours; a client that left was heard
            // from as it left.
            let how = if *by_peer { String::new() } else { format!(" (silent {silent_for:.1?}{late})") };
            format!("offline {client} from {peer}: {reason} by the {}{how}{detail}", decider(*by_peer))
        }
        EventKind::Closed { client, peer, reason, by_peer, detail, .. } => {
            let detail = detail.as_deref().map(|d| format!(": {d}")).unwrap_or_default();
            let who = client.as_deref().unwrap_or("(no session)");
            format!("closed  {who} from {peer}: {reason} by the {}{detail}", decider(*by_peer))
        }
        EventKind::Takeover { client, peer, epoch, same_device, .. } => {
            let who = if *same_device { "same device" } else { "new instance" };
            format!("takeover {client} by {peer} ({who}, epoch {epoch})")
        }
        EventKind::IdConflict { client, peer, retry_after, .. } => {
            format!("id_conflict {client}: {peer} told to retry after {retry_after:?}")
        }
        EventKind::Diagnosis { client, conn, explanation, .. } => {
            format!("diagnosis {client} (connection {conn}): {explanation}")
        }
        EventKind::Heartbeat { client, asked, heartbeat, timeout, .. } => {
            format!("heartbeat {client}: asked {asked:?}, now {heartbeat:?} (timeout {timeout:?})")
        }
        EventKind::Suspect { client, silent_for, .. } => format!("suspect {client} (silent {silent_for:?})"),
        EventKind::Recovered { client, .. } => format!("recovered {client}"),
        EventKind::Data { client, payload, .. } => format!("data from {client}: {} bytes", payload.len()),
        EventKind::Undeliverable { client, to, len, why, .. } => {
            format!("undeliverable {client} -> {to}: {len} bytes, {}", why.as_str())
        }
        EventKind::Dropped { count } => format!("{count} events dropped: the event printer was not keeping up"),
        EventKind::Stats(s) => format!("stats {s:?}"),
        EventKind::Cluster { degraded: true, detail } => format!("cluster degraded: {detail}"),
        EventKind::Cluster { degraded: false, detail } => format!("cluster: {detail}"),
        EventKind::NodeLost { node, sessions } => format!("node {node} lost: {sessions} sessions declared offline"),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file_which_overrides_defaults() {
        let file: FileConfig = toml::from_str(
            r#"
            listen = "127.0.0.1:0"
            heartbeat_interval = "2s"
            heartbeat_timeout = "6s"
            detector = "phi"
            keepalive_count = 5
            close_grace = "1.5s"
            max_handshakes = 64
            busy_retry_spread = "20s"
            "#,
        )
        .unwrap();
        let args = Args { heartbeat_timeout: Some(Duration::from_secs(9)), ..Args::default() };
        let cfg = build_config(&args, &file).unwrap();
        assert_eq!(cfg.heartbeat.interval, Duration::from_secs(2));
        assert_eq!(cfg.heartbeat.timeout, Duration::from_secs(9), "flag wins over file");
        assert!(matches!(cfg.conn.detector, DetectorConfig::Phi(_)));
        assert_eq!(cfg.socket.keepalive.unwrap().count, 5);
        assert_eq!(cfg.conn.close_grace, Duration::from_millis(1500));
        assert_eq!(cfg.socket.effective_user_timeout(), Some(Duration::from_secs(15 + 5 * 5)));
        assert_eq!(cfg.conn.handshake_timeout, Duration::from_secs(5), "default kept");
        assert_eq!((cfg.max_handshakes, cfg.busy_retry_spread), (64, Duration::from_secs(20)));
        assert_eq!(cfg.accept_rate, None);
    }

    #[test]
    fn the_admin_listener_defaults_to_7401_only_with_the_default_listen_address() {
        let none = FileConfig::default();
        assert_eq!(admin_addr(&Args::default(), &none).unwrap(), Some("127.0.0.1:7401".parse().unwrap()));
        let listen = Args { listen: Some("127.0.0.1:9000".into()), ..Args::default() };
        assert_eq!(admin_addr(&listen, &none).unwrap(), Some("127.0.0.1:0".parse().unwrap()));
        let file: FileConfig = toml::from_str(r#"listen = "0.0.0.0:7400""#).unwrap();
        assert_eq!(admin_addr(&Args::default(), &file).unwrap(), Some("127.0.0.1:0".parse().unwrap()));
        let off = Args { admin: Some("off".into()), ..Args::default() };
        assert_eq!(admin_addr(&off, &none).unwrap(), None);
        assert!(!build_config(&off, &none).unwrap().metrics, "no admin listener: no per-frame counting");
        let bad = Args { admin: Some("localhost".into()), ..Args::default() };
        assert!(admin_addr(&bad, &none).unwrap_err().to_string().contains("--admin"));
    }

    /// packaging/tether.toml names every setting, and each `#name = value` line in it is the real default: the
    /// file parses as it is, and with those lines uncommented it gives the same server as no file at all.
    #[test]
    fn the_packaged_example_config_shows_the_defaults() {
        let text = include_str!("../../../packaging/tether.toml");
        let as_shipped: FileConfig = toml::from_str(text).unwrap();
        let none = Args::default();
        assert_eq!(build_config(&none, &as_shipped).unwrap(), build_config(&none, &FileConfig::default()).unwrap());
        let defaults: String = text
            .lines()
            .filter_map(|l| l.strip_prefix('#').filter(|rest| rest.starts_with(|c: char| c.is_ascii_lowercase())))
            .map(|l| format!("{l}\n"))
            .collect();
        let uncommented: FileConfig = toml::from_str(&defaults).unwrap();
        assert!(uncommented.listen.is_some() && uncommented.close_grace.is_some(), "{defaults}");
        assert_eq!(build_config(&none, &uncommented).unwrap(), build_config(&none, &FileConfig::default()).unwrap());
        assert_eq!(admin_addr(&none, &uncommented).unwrap(), admin_addr(&none, &FileConfig::default()).unwrap());
        // Every setting is named, as a default or an example: the names are the ones serde lists when it refuses
        // an unknown one.
        let refusal = toml::from_str::<FileConfig>("not_a_setting = 1").unwrap_err().to_string();
        let expected = refusal.split_once("expected one of").expect("serde lists the fields").1;
        let fields: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
        assert!(fields.len() > 40 && fields.contains(&"node_lease"), "{refusal}");
        for field in fields {
            let named = |prefix: &str| text.lines().any(|l| l.starts_with(&format!("{prefix}{field} = ")));
            assert!(named("#") || named("# "), "packaging/tether.toml does not name {field}");
        }
    }

    #[test]
    fn bad_settings_are_refused_with_a_reason() {
        let bad: Result<FileConfig, _> = toml::from_str("heartbeat = 5");
        assert!(bad.unwrap_err().to_string().contains("unknown field"));
        let file: FileConfig = toml::from_str(r#"heartbeat_interval = "soon""#).unwrap();
        let err = build_config(&Args::default(), &file).unwrap_err().to_string();
        assert!(err.contains("heartbeat_interval"), "{err}");
        let args = Args { heartbeat_interval: Some(Duration::from_secs(20)), ..Args::default() };
        assert!(build_config(&args, &FileConfig::default()).unwrap_err().to_string().contains("longer than"));
    }
}
