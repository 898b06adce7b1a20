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
        }
    }
}
