//! The adaptive heartbeat, client side: one [`Learner`] shared by every connection of a client, so what one
//! connection learned about a network serves the next.
//!
//! # Layout
//! [`AdaptiveHeartbeat`] is a handle (cheap to clone) put in [`crate::ClientConfig::adaptive_heartbeat`]. Each
//! connection asks it for the interval to offer in `HELLO`, tells it what the server granted and the most it
//! grants, and, once the server granted `heartbeat_update`, reports every `PING` that held and asks the server
//! for the next interval in the session, right behind the `PONG` (the radio is awake anyway).
//!
//! A `PING` still unanswered after the grace, on a socket whose kernel has had no acknowledgement since (or where
//! the kernel cannot tell), is checked with a TCP connect to the same server from the same local address:
//! - it does not go through: the path itself is down (a blip), and the connection is left to ride it out;
//! - it goes through: the client waits the retransmission ceiling more (at most 3 s), so that after a blip that
//!   healed just before, the old connection's next retransmission gets through; if it did not, a middlebox on
//!   the path forgot the connection, which ends at once (`heartbeat_timeout`,
//!   [`crate::Disconnect::middlebox_forgot`]) and is reported to the learner.
//!
//! The check's connection is kept for the next connect to that server, which then starts with its `HELLO` (no
//! second handshake, and the server sees one connection, not a stray one); one not taken within [`SPARE_FOR`] of
//! its connect is closed.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use tether_proto::adaptive::AdaptiveConfig;
use tether_proto::adaptive::Learner;

/// How long a connect that checks the path may take: a SYN and one retransmission.
pub const PATH_CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// How long after its connect a path check's connection may still be taken by the next connect: well inside a
/// server's handshake timeout (5 s by default), which runs from its accept.
pub const SPARE_FOR: Duration = Duration::from_secs(4);

/// A path check's connection, and when it was connected.
#[derive(Debug)]
pub(crate) struct Spare {
    stream: tokio::net::TcpStream,
    connected: Instant,
}

/// The default grace for a `PONG` before the path is checked (or three round trips, if longer).
pub const DEFAULT_PONG_GRACE: Duration = Duration::from_secs(2);

/// The adaptive heartbeat's shared state: the learner, and the network the application says the device is on.
#[derive(Debug, Clone)]
pub struct AdaptiveHeartbeat {
    inner: Arc<Mutex<Inner>>,
    grace: Duration,
}

impl Inner {
    /// The network a connection from `local` is on: the one the application named, else `local`'s address.
    fn key(&self, local: SocketAddr) -> String {
        self.network.clone().unwrap_or_else(|| local.ip().to_string())
    }
}

/// Two handles are equal when they share one learner.
impl PartialEq for AdaptiveHeartbeat {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner) && self.grace == other.grace
    }
}

#[derive(Debug)]
struct Inner {
    learner: Learner,
    network: Option<String>,
    /// A path check's connection, for the next connect to its server, and its number (a spare's timer closes
    /// only its own).
    spare: Option<(u64, SocketAddr, Spare)>,
    spares: u64,
}

impl AdaptiveHeartbeat {
    /// Learn within `cfg`; a `PONG` later than [`DEFAULT_PONG_GRACE`] has the path checked.
    pub fn new(cfg: AdaptiveConfig) -> AdaptiveHeartbeat {
        AdaptiveHeartbeat::with_grace(cfg, DEFAULT_PONG_GRACE)
    }

    /// As [`new`](Self::new), with the grace after which an unanswered `PING` has the path checked.
    pub fn with_grace(cfg: AdaptiveConfig, grace: Duration) -> AdaptiveHeartbeat {
        let inner = Inner { learner: Learner::new(cfg), network: None, spare: None, spares: 0 };
        AdaptiveHeartbeat { inner: Arc::new(Mutex::new(inner)), grace: grace.max(Duration::from_millis(100)) }
    }

    /// Say which network the device is on (a Wi-Fi SSID, a carrier), for connections made from now on. `None`
    /// (the default): the connection's local address names it, which tells interfaces apart but not two
    /// networks that hand out the same private address.
    pub fn set_network(&self, network: Option<String>) {
        self.lock().network = network;
    }

    /// The interval the next connection from `local` would start with.
    pub fn interval_for(&self, local: SocketAddr) -> Duration {
        self.start(local).1
    }

    /// Whether the search for `local`'s network is over.
    pub fn settled_for(&self, local: SocketAddr) -> bool {
        let inner = self.lock();
        inner.learner.settled(&inner.key(local))
    }

    pub(crate) fn grace(&self) -> Duration {
        self.grace
    }

    /// The network a connection from `local` is on, and the interval it starts with there.
    pub(crate) fn start(&self, local: SocketAddr) -> (String, Duration) {
        let mut inner = self.lock();
        let key = inner.key(local);
        let interval = inner.learner.interval(&key);
        (key, interval)
    }

    pub(crate) fn held(&self, key: &str, idle: Duration) -> Option<Duration> {
        self.lock().learner.held(key, idle)
    }

    pub(crate) fn forgot(&self, key: &str, idle: Duration) -> Option<Duration> {
        self.lock().learner.forgot(key, idle)
    }

    pub(crate) fn connected(&self, key: &str, granted: Duration, max: Duration) {
        self.lock().learner.connected(key, granted, max)
    }

    pub(crate) fn granted(&self, key: &str, interval: Duration) {
        self.lock().learner.granted(key, interval)
    }

    pub(crate) fn settled(&self, key: &str) -> bool {
        self.lock().learner.settled(key)
    }

    /// Keep a path check's connection to `server` for the next connect, until [`SPARE_FOR`] after its connect.
    pub(crate) fn keep_spare(&self, server: SocketAddr, spare: Spare) {
        let expires = tokio::time::Instant::from_std(spare.connected + SPARE_FOR);
        let n = {
            let mut inner = self.lock();
            inner.spares += 1;
            let n = inner.spares;
            inner.spare = Some((n, server, spare));
            n
        };
        let inner = self.inner.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(expires).await;
            let mut inner = inner.lock().unwrap_or_else(|e| e.into_inner());
            if inner.spare.as_ref().is_some_and(|(k, _, _)| *k == n) {
                inner.spare = None;
            }
        });
    }

    /// The kept connection to `server`, if there is one young enough at `now`.
    pub(crate) fn take_spare(&self, server: SocketAddr, now: Instant) -> Option<tokio::net::TcpStream> {
        let mut inner = self.lock();
        match inner.spare.take() {
            Some((_, to, spare)) if to == server => {
                (now.saturating_duration_since(spare.connected) < SPARE_FOR).then_some(spare.stream)
            }
            other => {
                inner.spare = other;
                None
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The learner's state is consistent after every call: a panic elsewhere leaves nothing half done.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A fresh TCP connection from `local`'s address to `server` (the old connection's path, not whatever route is
/// the default now), if one goes through within [`PATH_CHECK_TIMEOUT`], handed back `settle` after it did: the
/// time the old connection gets to show that its path healed too.
pub(crate) async fn path_check(local: SocketAddr, server: SocketAddr, settle: Duration) -> Option<Spare> {
    let socket = match server {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .ok()?;
    // An address that is gone (the interface went away) fails here: that path is down.
    socket.bind(SocketAddr::new(local.ip(), 0)).ok()?;
    let stream = tokio::time::timeout(PATH_CHECK_TIMEOUT, socket.connect(server)).await.ok()?.ok()?;
    let connected = crate::driver::now();
    tokio::time::sleep(settle).await;
    Some(Spare { stream, connected })
}
