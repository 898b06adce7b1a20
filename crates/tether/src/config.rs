//! Server and client configuration.
//!
//! # Layout
//! [`ServerConfig`] gathers everything `tether serve` can set: the listen address, the heartbeat policy, the
//! per-connection limits ([`ConnConfig`]), socket options, the registry policy, and server-wide limits. Defaults
//! are documented in docs/configuration.md and chosen for mobile/IoT fleets: a 5 s heartbeat with a
//! 15 s timeout (MQTT's 1.5 × keepalive would be 7.5 s; we allow three missed intervals to ride out cellular
//! jitter), kernel keepalive 15 s + 3 × 5 s, user timeout derived as 30 s.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tether_proto::registry::RegistryConfig;
use tether_proto::{ConnConfig, HeartbeatPolicy};

use crate::auth::Authenticator;
use crate::event::EventQueue;
use crate::sockopt::SocketOptions;
use crate::tls::{ClientTls, ServerTls};

/// The server's credential check, shared by every connection. Compared by identity.
#[derive(Clone)]
pub struct Auth(pub Arc<dyn Authenticator>);

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Auth(..)")
    }
}

impl PartialEq for Auth {
    fn eq(&self, other: &Auth) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// Everything a server needs.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Sent in `WELCOME`, so clients of a cluster can tell servers apart.
    pub server_id: String,
    pub heartbeat: HeartbeatPolicy,
    /// Per-connection limits and the detector.
    pub conn: ConnConfig,
    pub socket: SocketOptions,
    pub registry: RegistryConfig,
    /// Connections held at once (handshaking included); beyond it new ones get `BYE(busy)`.
    pub max_connections: usize,
    /// Connections one source address may hold at once; beyond it new ones get `BYE(ip_limit)`. `None`: no cap.
    pub max_per_ip: Option<usize>,
    /// Connections accepted whose `HELLO` has not been admitted yet; beyond it newcomers get `BYE(busy)`. Bounds
    /// the work a reconnect storm can put in flight at once.
    pub max_handshakes: usize,
    /// Of those, how many one source (an IPv4 address or IPv6 /64) may hold; beyond it its newcomers get
    /// `BYE(ip_limit)`. `None`: a sixteenth of `max_handshakes`, at least 2 (32 by default), so that one address
    /// that stalls its handshakes cannot lock everyone else out.
    pub max_handshakes_per_ip: Option<usize>,
    /// New connections accepted per second (a token bucket with one second of burst); `None` = unlimited.
    pub accept_rate: Option<u32>,
    /// The smallest retry-after hint sent with `busy`.
    pub busy_retry_after: Duration,
    /// `busy` hints are `busy_retry_after` plus a uniform random share of this window, so refused clients come
    /// back spread out instead of in one wave.
    pub busy_retry_spread: Duration,
    /// Frames waiting for one connection's task (relayed data, presence); overflow is `slow_consumer`.
    pub outbound_queue: usize,
    /// Reliable sessions (the `reliable` extension): how long one outlives its connection, and how much it and
    /// all of them may hold. A single node keeps them in memory; cluster nodes keep them in Redis, with these bounds.
    pub hold: tether_proto::reliable::HoldConfig,
    /// How long a graceful shutdown waits for connections to finish their goodbye.
    pub shutdown_grace: Duration,
    /// `BYE(server_shutdown)` retry-after hints are spread evenly over this window.
    pub shutdown_spread: Duration,
    /// Server-directed drain: the address shutdown `BYE`s name as the alternative (clients go there).
    pub shutdown_redirect: Option<String>,
    /// Who may claim a client id. `None` admits any `HELLO` (open mode: anyone who knows an id can take it over).
    pub auth: Option<Auth>,
    /// A refused credential is answered `BYE(auth_failed)` only after this long, to slow down guessing.
    pub auth_fail_delay: Duration,
    /// Serve TLS instead of plain TCP. The handshake counts against `handshake_timeout` like the `HELLO`.
    pub tls: Option<ServerTls>,
    /// How events wait for the application ([`crate::Server::events`]): bounded (the default; drops are counted
    /// and reported) or unbounded.
    pub event_queue: EventQueue,
    /// Emit an [`crate::EventKind::Stats`] event this often. `None`: never.
    pub stats_interval: Option<Duration>,
    /// Count per-frame traffic (frames, bytes, queued bytes) and sample round trips into the histograms. Off, the
    /// hot path skips that work; disconnects, refusals and the other per-connection counts are kept either way.
    pub metrics: bool,
    /// Closed connections kept for [`crate::ServerHandle::disconnects`] (about 200 bytes each).
    pub disconnect_history: usize,
    /// Join a cluster on Redis ([`crate::cluster`]); `None`: a single node, in memory. The node id replaces
    /// `server_id` in `WELCOME`.
    pub cluster: Option<crate::cluster::ClusterConfig>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        let heartbeat = HeartbeatPolicy::default();
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 7400)),
            server_id: "tether".into(),
            registry: RegistryConfig { conflict_liveness: heartbeat.interval.mul_f64(1.5), ..Default::default() },
            heartbeat,
            conn: ConnConfig::default(),
            socket: SocketOptions::default(),
            max_connections: 10_000,
            max_per_ip: None,
            max_handshakes: 512,
            max_handshakes_per_ip: None,
            accept_rate: None,
            busy_retry_after: Duration::from_secs(1),
            busy_retry_spread: Duration::from_secs(5),
            outbound_queue: 1024,
            hold: tether_proto::reliable::HoldConfig::default(),
            shutdown_grace: Duration::from_secs(5),
            shutdown_spread: Duration::from_secs(10),
            shutdown_redirect: None,
            auth: None,
            auth_fail_delay: Duration::from_secs(1),
            tls: None,
            event_queue: EventQueue::default(),
            stats_interval: None,
            metrics: true,
            disconnect_history: 10_000,
            cluster: None,
        }
    }
}

/// Everything a client needs besides the server address.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientConfig {
    pub client_id: String,
    /// The instance nonce; `None` draws a random one (one per process start is the intended use).
    pub nonce: Option<u64>,
    /// Requested heartbeat interval; `None` takes the server's default.
    pub heartbeat_interval: Option<Duration>,
    /// The credential sent in `HELLO` (a token for [`crate::HmacTokens`] servers).
    pub credential: Vec<u8>,
    pub conn: ConnConfig,
    pub socket: SocketOptions,
    /// Bound on the TCP connect.
    pub connect_timeout: Duration,
    /// Commands (sends, subscriptions) waiting for the connection's task.
    pub command_queue: usize,
    /// Start the ping cycle at a random phase, so clients that connect together do not ping in phase.
    pub ping_jitter: bool,
    /// Connect with TLS. `None`: plain TCP.
    pub tls: Option<ClientTls>,
    /// The protocol version offered in `HELLO` (the highest this library speaks by default); a server that
    /// refuses it as unknown is asked again with version 1.
    pub protocol_version: u8,
    /// Ask for a reliable session (acknowledged delivery, resume) carried by this link's state; v2 only. Clone
    /// one link into every connection of the session ([`crate::ReconnectingClient`] does).
    pub reliable: Option<crate::reliable::ReliableLink>,
    /// The events that may wait for the application ([`crate::queue`]'s rule): beyond the bound they are
    /// dropped and counted (`Dropped`), except `Disconnected` and reliable messages (see [`crate::Client`]).
    pub event_queue: crate::EventQueue,
    /// Learn the longest heartbeat interval the path's middleboxes allow, per network, and change it during the
    /// session where the server grants that (docs/mobile.md). Overrides `heartbeat_interval`. Clone one handle
    /// into every connection ([`crate::ReconnectingClient`] does), so what one learned serves the next.
    pub adaptive_heartbeat: Option<crate::AdaptiveHeartbeat>,
}

impl ClientConfig {
    pub fn new(client_id: impl Into<String>) -> ClientConfig {
        ClientConfig {
            client_id: client_id.into(),
            nonce: None,
            heartbeat_interval: None,
            credential: Vec::new(),
            conn: ConnConfig::default(),
            socket: SocketOptions::default(),
            connect_timeout: Duration::from_secs(10),
            command_queue: 1024,
            ping_jitter: true,
            tls: None,
            protocol_version: tether_proto::frame::PROTOCOL_VERSION,
            reliable: None,
            event_queue: crate::EventQueue::default(),
            adaptive_heartbeat: None,
        }
    }
}

/// `host:port` as `BYE.alternative` carries it (docs/protocol.md, section 1), at most 255 bytes: `host` an IPv4
/// address, an IPv6 address in brackets or a DNS name ([`check_name`]), `port` 1 to 65535; nothing else (no
/// scheme, userinfo, path or spaces). Otherwise what is wrong, worded to follow the address.
pub fn check_address(s: &str) -> Result<(), String> {
    if s.len() > 255 {
        return Err(format!("is {} bytes, more than the 255 bytes BYE.alternative carries", s.len()));
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("contains a space or control character".into());
    }
    if s.contains("://") {
        return Err("has a scheme: give only host:port".into());
    }
    if s.contains('@') {
        return Err("has userinfo (user@): give only host:port".into());
    }
    if s.contains(['/', '?', '#', '\\']) {
        return Err("has a path: give only host:port".into());
    }
    let (host, port) = match s.strip_prefix('[') {
        Some(rest) => {
            let (ip, after) = rest.split_once(']').ok_or("has no ] after its IPv6 address")?;
            if ip.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(format!("has [{ip}], which is not an IPv6 address"));
            }
            (None, after.strip_prefix(':').ok_or("has no :port after its ]")?)
        }
        None => {
            let (host, port) = s.rsplit_once(':').ok_or("has no :port")?;
            (Some(host), port)
        }
    };
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) || !matches!(port.parse::<u16>(), Ok(1..)) {
        return Err(format!("has port {port:?}: a port is a number from 1 to 65535"));
    }
    match host {
        None => Ok(()),
        Some("") => Err("has no host before its :port".into()),
        Some(h) if h.contains(':') => Err("has an IPv6 address without brackets: write [address]:port".into()),
        Some(h) => check_name(h),
    }
}

/// A host that is not bracketed: an IPv4 address, or a DNS name of RFC 1123 labels (letters, digits and
/// hyphens, 1 to 63 bytes, no hyphen first or last; at most 253 bytes in all). A name whose last label is all
/// digits must be an IPv4 address: no top-level domain is numeric, so `999.1.1.1` is a typo, not a name.
fn check_name(host: &str) -> Result<(), String> {
    let last = host.rsplit('.').next().unwrap_or_default();
    if !last.is_empty() && last.bytes().all(|b| b.is_ascii_digit()) {
        return match host.parse::<std::net::Ipv4Addr>() {
            Ok(_) => Ok(()),
            Err(_) => Err(format!("has {host:?}, which is not an IPv4 address (and a name cannot end in digits)")),
        };
    }
    if host.len() > 253 {
        return Err(format!("has a name of {} bytes; a DNS name is at most 253", host.len()));
    }
    for label in host.split('.') {
        if label.is_empty() {
            return Err(format!("has {host:?}, with an empty label (two dots in a row, or a dot at an end)"));
        }
        if label.len() > 63 {
            return Err(format!("has a label of {} bytes; a label is at most 63", label.len()));
        }
        if !label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(format!("has the label {label:?}: a label is letters, digits and hyphens only"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("has the label {label:?}: a label does not start or end with a hyphen"));
        }
    }
    Ok(())
}
