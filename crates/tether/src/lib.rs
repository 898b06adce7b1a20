//! tether's tokio layer: a server and a client that keep long-lived TCP connections honest.
//!
//! # Layout
//! - [`server`]: [`Server`] (accept loop, connection tasks, session hub, graceful shutdown) and [`ServerHandle`].
//! - [`client`]: [`Client`], connected and handshaken, with its event stream.
//! - [`resilient`]: [`ReconnectingClient`], which reconnects with backoff, fails over, and keeps its identity,
//!   subscriptions and queued data across outages.
//! - [`cluster`]: cluster mode on Redis ([`ClusterConfig`]): one holder per id across nodes, presence and relay
//!   across nodes, lost nodes' clients declared offline.
//! - [`config`]: [`ServerConfig`], [`ClientConfig`] and their defaults.
//! - [`adaptive`]: [`AdaptiveHeartbeat`], the client's search for the longest heartbeat its path allows.
//! - [`auth`]: [`Authenticator`], the credential check in `HELLO`, and the built-in [`HmacTokens`].
//! - [`event`]: [`ServerEvent`], what the server tells its application, through a bounded [`EventStream`].
//! - [`fdlimit`]: the file-descriptor limit, raised at start, and the connection capacity it leaves.
//! - [`loglimit`]: [`loglimit::LogLimiter`], which summarises repeated log lines about one client.
//! - [`metrics`]: the server's counters and histograms (atomics on the hot path) and their snapshot.
//! - [`ops`]: what an operator reads and steers: sessions, the kernel's view of a socket, recent disconnects,
//!   live event watchers, the drain. The HTTP admin layer over them is the `tether-admin` crate.
//! - [`probe`]: the rule a round-trip probe is judged by, from either end: an answer (or none) against the
//!   kernel's view of the same socket.
//! - [`tls`]: [`ServerTls`] and [`ClientTls`], rustls configurations from PEM.
//! - [`sockopt`]: TCP_NODELAY, keepalive and TCP_USER_TIMEOUT on every socket, read back for the logs.
//! - `driver`: the IO pump that carries out a [`tether_proto::Connection`]'s decisions on a socket.
//!
//! All protocol decisions live in [`tether_proto`]; this crate only moves bytes, time and commands.

pub mod adaptive;
pub mod auth;
pub mod client;
pub mod cluster;
pub mod config;
mod driver;
pub mod event;
mod evloop;
mod fault;
pub mod fdlimit;
pub mod loglimit;
pub mod metrics;
pub mod ops;
pub mod probe;
pub mod queue;
pub mod reliable;
pub mod resilient;
pub mod server;
pub mod sockopt;
pub mod tls;

pub use adaptive::{AdaptiveConfig, AdaptiveHeartbeat};
pub use auth::{AuthError, Authenticator, Grant, HmacTokens};
pub use client::{Client, ClientError, ClientEvent, ConnectError, Disconnect};
pub use cluster::ClusterConfig;
pub use config::{Auth, ClientConfig, ServerConfig};
pub use event::{Diagnosis, EventKind, EventQueue, EventStream, ServerEvent, Stats};
pub use metrics::MetricsSnapshot;
pub use ops::{
    DisconnectRecord, DrainError, DrainStatus, EventWatch, HoldInfo, KernelView, ProbeEnded, ProbeReport, ProbeVerdict,
    SessionInfo,
};
pub use reliable::{InDoubt, ReliableConfig, ReliableLink};
pub use resilient::{LinkError, LinkEvent, ReconnectingClient, ResilienceConfig, Sent};
pub use server::{Delivery, KickError, Receipt, SendToError, Server, ServerHandle};
pub use sockopt::{Keepalive, RtoMax, SocketOptions};
pub use tether_proto as proto;
pub use tether_proto::CloseReason;
pub use tls::{ClientTls, DevPki, ServerTls, TlsConfigError, TrustRoots};
