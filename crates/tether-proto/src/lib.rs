//! Sans-IO core of tether: the wire codec, the connection state machine, failure detectors, the session registry
//! with takeover and presence. No tokio, no clock, no sockets, no OS randomness: time is passed in as `now`.
//!
//! # Layout
//! - [`frame`]: the v1 wire codec (check → parse → encode), specified byte by byte in docs/protocol.md.
//! - [`reason`]: [`CloseReason`], the one reason every disconnect gets, with its wire code and name.
//! - [`detector`]: `fixed` and `phi` failure detectors that answer with exact deadlines.
//! - [`conn`]: [`Connection`], the per-connection state machine (`handle_*` in, `poll_*` out).
//! - [`registry`]: [`Registry`], sessions by client id (takeover, epochs, id conflicts) and presence.
//! - [`reconnect`]: [`reconnect::Reconnect`], backoff with seeded full jitter, failover, and server hints.

pub mod conn;
pub mod detector;
pub mod frame;
pub mod reason;
pub mod reconnect;
pub mod registry;

pub use conn::{Closed, ConnConfig, Connection, Event, HeartbeatPolicy, Role, SendError, State, MAX_PING_STRIKES};
pub use detector::{DetectorConfig, PhiConfig};
pub use frame::{Bye, Frame, FrameError, Hello, Presence, PresenceState, Welcome};
pub use reason::CloseReason;
pub use registry::{Admission, ConnId, Registry, RegistryConfig, SessionEvent};
