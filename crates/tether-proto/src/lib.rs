//! Sans-IO core of tether: the wire codec, the connection state machine, failure detectors, the session registry
//! with takeover and presence. No tokio, no clock, no sockets, no OS randomness: time is passed in as `now`.
//!
//! # Layout
//! - [`frame`]: the wire codec, versions 1 and 2 (check → parse → encode), specified byte by byte in
//!   docs/protocol.md.
//! - [`reason`]: [`CloseReason`], the one reason every disconnect gets, with its wire code and name.
//! - [`detector`]: `fixed` and `phi` failure detectors that answer with exact deadlines.
//! - [`conn`]: [`Connection`], the per-connection state machine (`handle_*` in, `poll_*` out).
//! - [`registry`]: [`Registry`], sessions by client id (takeover, epochs, id conflicts) and presence.
//! - [`adaptive`]: [`adaptive::Learner`], the adaptive heartbeat's search for the longest interval a path allows.
//! - [`reconnect`]: [`reconnect::Reconnect`], backoff with seeded full jitter, failover, and server hints.

pub mod adaptive;
pub mod conn;
pub mod detector;
pub mod frame;
pub mod reason;
pub mod reconnect;
pub mod registry;
pub mod reliable;

pub use conn::{
    ping_allowance, Closed, ConnConfig, Connection, Event, HeartbeatPolicy, KernelQueue, Role, SendError, State,
};
pub use detector::{DetectorConfig, PhiConfig};
pub use frame::{
    Bye, Extension, Frame, FrameError, HeartbeatRange, Hello, Presence, PresenceState, Report, Undeliverable, Welcome,
};
pub use reason::CloseReason;
pub use registry::{Admission, ConnId, Registry, RegistryConfig, SessionEvent};
