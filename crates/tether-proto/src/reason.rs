//! Why a connection ended: exactly one [`CloseReason`] per disconnect.
//!
//! # Layout
//! Each known variant has a stable snake_case name (used in logs, JSON events and the README table) and a stable
//! one-byte wire code (used in `BYE` and `PRESENCE`). Both mappings live here and nowhere else. Protocol v1 knows
//! exactly the codes in [`CloseReason::ALL`]; from v2 on, a code this build does not know is kept as
//! [`CloseReason::Unknown`] instead of being an error, so a newer peer can add reasons without breaking us.

use std::fmt;
use std::io;

/// The single cause recorded for the end of a connection.
///
/// Names and wire codes are part of the protocol (docs/protocol.md) and never change meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// The peer said goodbye with `BYE`.
    Bye,
    /// The peer closed its write half (FIN) without a `BYE`: process killed or closed abruptly.
    Eof,
    /// The transport was reset (ECONNRESET, EPIPE, ECONNABORTED).
    Reset,
    /// Nothing arrived from the peer within the heartbeat timeout (or the phi detector convicted it).
    HeartbeatTimeout,
    /// The kernel's keepalive probes went unanswered (ETIMEDOUT on an idle socket).
    KeepaliveTimeout,
    /// Written data could not be delivered in time: the write deadline or the kernel's TCP_USER_TIMEOUT expired.
    WriteTimeout,
    /// The network reported the peer unreachable (EHOSTUNREACH, ENETUNREACH).
    Unreachable,
    /// A newer connection for the same client id replaced this one.
    Takeover,
    /// Two live devices claim one client id; the newcomer is told to back off.
    IdConflict,
    /// The peer broke the protocol (malformed frame, unknown kind, frame out of order, oversized length).
    ProtocolError,
    /// No valid `HELLO` arrived within the handshake timeout.
    HandshakeTimeout,
    /// The server is at its connection limit.
    Busy,
    /// The peer did not drain its outbound queue fast enough.
    SlowConsumer,
    /// The server is shutting down.
    ServerShutdown,
    /// The server's operator or application removed the client.
    Kicked,
    /// The credential in `HELLO` was missing, forged, expired, or not for this client id; or a subscription
    /// went beyond what it allows.
    AuthFailed,
    /// The peer sent `PING`s far more often than the negotiated interval allows.
    PingFlood,
    /// The client's source address already holds as many connections as the server allows one address.
    IpLimit,
    /// The peer sent `DATA` faster than the server's per-connection rate limit.
    RateLimited,
    /// The TLS layer failed: no common version or cipher, a certificate that is not trusted, a plaintext peer on
    /// a TLS port, or a corrupt record. Decided by the IO layer, never sent in `BYE` (TLS has its own alerts).
    TlsError,
    /// The peer asked for more presence subscriptions than one connection may hold, or for `*` where the server
    /// does not allow it.
    SubscriptionRefused,
    /// Cluster: the server node holding the client stopped renewing its lease (killed, hung, cut off), and the
    /// cluster declared its sessions offline. Only in `PRESENCE`, from protocol v2 on (a v1 peer is told
    /// `unreachable`).
    NodeLost,
    /// A wire code this build does not know, received from a newer peer (protocol v2 and later only).
    Unknown(u8),
}

impl CloseReason {
    /// Every reason, in wire-code order.
    pub const ALL: [CloseReason; 22] = [
        CloseReason::Bye,
        CloseReason::Eof,
        CloseReason::Reset,
        CloseReason::HeartbeatTimeout,
        CloseReason::KeepaliveTimeout,
        CloseReason::WriteTimeout,
        CloseReason::Unreachable,
        CloseReason::Takeover,
        CloseReason::IdConflict,
        CloseReason::ProtocolError,
        CloseReason::HandshakeTimeout,
        CloseReason::Busy,
        CloseReason::SlowConsumer,
        CloseReason::ServerShutdown,
        CloseReason::Kicked,
        CloseReason::AuthFailed,
        CloseReason::PingFlood,
        CloseReason::IpLimit,
        CloseReason::RateLimited,
        CloseReason::TlsError,
        CloseReason::SubscriptionRefused,
        CloseReason::NodeLost,
    ];

    /// The codes protocol v1 defines (1 to this); later codes are sent to a v1 peer as an older reason.
    pub const V1_CODES: u8 = 21;

    /// The stable snake_case name.
    pub const fn as_str(self) -> &'static str {
        match self {
            CloseReason::Bye => "bye",
            CloseReason::Eof => "eof",
            CloseReason::Reset => "reset",
            CloseReason::HeartbeatTimeout => "heartbeat_timeout",
            CloseReason::KeepaliveTimeout => "keepalive_timeout",
            CloseReason::WriteTimeout => "write_timeout",
            CloseReason::Unreachable => "unreachable",
            CloseReason::Takeover => "takeover",
            CloseReason::IdConflict => "id_conflict",
            CloseReason::ProtocolError => "protocol_error",
            CloseReason::HandshakeTimeout => "handshake_timeout",
            CloseReason::Busy => "busy",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::ServerShutdown => "server_shutdown",
            CloseReason::Kicked => "kicked",
            CloseReason::AuthFailed => "auth_failed",
            CloseReason::PingFlood => "ping_flood",
            CloseReason::IpLimit => "ip_limit",
            CloseReason::RateLimited => "rate_limited",
            CloseReason::TlsError => "tls_error",
            CloseReason::SubscriptionRefused => "subscription_refused",
            CloseReason::NodeLost => "node_lost",
            CloseReason::Unknown(_) => "unknown",
        }
    }

    /// The one-byte wire code: a known reason's position in [`CloseReason::ALL`] plus one, or the code kept by
    /// [`CloseReason::Unknown`].
    pub fn code(self) -> u8 {
        match self {
            CloseReason::Unknown(code) => code,
            known => Self::ALL.iter().position(|r| *r == known).map_or(0, |i| i as u8 + 1),
        }
    }

    /// Whether this build knows the reason (every variant but [`CloseReason::Unknown`]).
    pub fn is_known(self) -> bool {
        !matches!(self, CloseReason::Unknown(_))
    }

    /// Parse a stable name back into a reason.
    pub fn from_name(name: &str) -> Option<CloseReason> {
        Self::ALL.into_iter().find(|r| r.as_str() == name)
    }

    /// Classify a transport error.
    ///
    /// `had_unacked_writes` tells a user timeout (data in flight, `write_timeout`) from a keepalive timeout (idle
    /// socket): the kernel reports both as ETIMEDOUT.
    pub fn from_io_error(err: &io::Error, had_unacked_writes: bool) -> CloseReason {
        match err.kind() {
            io::ErrorKind::TimedOut if had_unacked_writes => CloseReason::WriteTimeout,
            io::ErrorKind::TimedOut => CloseReason::KeepaliveTimeout,
            io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => CloseReason::Unreachable,
            io::ErrorKind::UnexpectedEof => CloseReason::Eof,
            _ => match err.raw_os_error() {
                Some(code) if code == EHOSTUNREACH || code == ENETUNREACH => CloseReason::Unreachable,
                Some(code) if code == ETIMEDOUT && had_unacked_writes => CloseReason::WriteTimeout,
                Some(code) if code == ETIMEDOUT => CloseReason::KeepaliveTimeout,
                _ => CloseReason::Reset,
            },
        }
    }
}

// Linux errno values, spelled out so the core needs no libc. Other platforms are covered by `ErrorKind` above.
const ETIMEDOUT: i32 = 110;
const EHOSTUNREACH: i32 = 113;
const ENETUNREACH: i32 = 101;

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::Unknown(code) => write!(f, "unknown reason code {code}"),
            known => f.write_str(known.as_str()),
        }
    }
}

impl From<CloseReason> for u8 {
    fn from(r: CloseReason) -> u8 {
        r.code()
    }
}

/// A wire code that names no reason this version knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unknown close reason code {0}")]
pub struct UnknownReason(pub u8);

impl TryFrom<u8> for CloseReason {
    type Error = UnknownReason;
    /// The known reason with this code; [`UnknownReason`] for any other (protocol v2 receivers then keep it as
    /// [`CloseReason::Unknown`]).
    fn try_from(code: u8) -> Result<Self, Self::Error> {
        match code {
            1.. if (code as usize) <= Self::ALL.len() => Ok(Self::ALL[code as usize - 1]),
            other => Err(UnknownReason(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_names_round_trip() {
        for (i, r) in CloseReason::ALL.into_iter().enumerate() {
            let code: u8 = r.into();
            assert_eq!(code as usize, i + 1);
            assert_eq!(CloseReason::try_from(code), Ok(r));
            assert_eq!(CloseReason::from_name(r.as_str()), Some(r));
        }
        assert_eq!(CloseReason::try_from(0), Err(UnknownReason(0)));
        let next = CloseReason::ALL.len() as u8 + 1;
        assert_eq!(CloseReason::try_from(next), Err(UnknownReason(next)));
        assert_eq!(CloseReason::from_name("nope"), None);
        assert_eq!(CloseReason::Unknown(200).code(), 200);
        assert_eq!(CloseReason::Unknown(200).to_string(), "unknown reason code 200");
        assert!(!CloseReason::Unknown(200).is_known() && CloseReason::Bye.is_known());
    }

    #[test]
    fn io_errors_classify() {
        let timed_out = io::Error::from_raw_os_error(ETIMEDOUT);
        assert_eq!(CloseReason::from_io_error(&timed_out, false), CloseReason::KeepaliveTimeout);
        assert_eq!(CloseReason::from_io_error(&timed_out, true), CloseReason::WriteTimeout);
        let unreach = io::Error::from_raw_os_error(EHOSTUNREACH);
        assert_eq!(CloseReason::from_io_error(&unreach, true), CloseReason::Unreachable);
        let reset = io::Error::from(io::ErrorKind::ConnectionReset);
        assert_eq!(CloseReason::from_io_error(&reset, false), CloseReason::Reset);
        let pipe = io::Error::from(io::ErrorKind::BrokenPipe);
        assert_eq!(CloseReason::from_io_error(&pipe, true), CloseReason::Reset);
    }
}
