//! Limits at accept: the accept-rate token bucket and what each source (an address, or an IPv6 /64) holds.
//!
//! # Layout
//! - [`TokenBucket`]: `accept_rate`, owned by the accept loop alone.
//! - [`Sources`]: handshakes in flight and (with `max_per_ip`) connections per source, behind one short lock.
//! - [`source_of`]: the unit those counts are kept for.
//!
//! # Rules
//! A leaf: plain counting, no knowledge of connections, the hub or the server's shared state. The sources lock is
//! held only to count, never while taking another lock.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::time::Instant as StdInstant;

/// Accept-rate limit: `rate` tokens per second, at most `rate` banked. Only the accept loop touches it.
pub(super) struct TokenBucket {
    rate: f64,
    tokens: f64,
    last: StdInstant,
}

impl TokenBucket {
    pub(super) fn new(rate: u32, now: StdInstant) -> TokenBucket {
        TokenBucket { rate: rate.max(1) as f64, tokens: rate.max(1) as f64, last: now }
    }

    pub(super) fn take(&mut self, now: StdInstant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What one source holds.
#[derive(Debug, Default, Clone, Copy)]
struct SourceCount {
    handshakes: usize,
    connections: usize,
}

/// Handshakes in flight and (when `max_per_ip` is set) connections, per source ([`source_of`]). An entry exists
/// only while one of its counts is above zero.
#[derive(Default)]
pub(super) struct Sources {
    counts: Mutex<HashMap<IpAddr, SourceCount>>,
}

impl Sources {
    /// Take a handshake slot for a connection from `peer` (and, when `max_per_ip` is set, a connection slot).
    /// False, taking nothing, when the source already holds `handshakes_per_source` handshakes or `max_per_ip`
    /// connections.
    pub(super) fn admit(&self, peer: IpAddr, handshakes_per_source: usize, max_per_ip: Option<usize>) -> bool {
        let key = source_of(peer);
        let mut sources = self.counts.lock().expect("sources lock");
        let src = sources.entry(key).or_default();
        let over_conns = max_per_ip.is_some_and(|cap| src.connections >= cap);
        if over_conns || src.handshakes >= handshakes_per_source {
            if src.handshakes == 0 && src.connections == 0 {
                sources.remove(&key);
            }
            return false;
        }
        src.handshakes += 1;
        if max_per_ip.is_some() {
            src.connections += 1;
        }
        true
    }

    /// A connection from `peer` is no longer handshaking.
    pub(super) fn handshake_done(&self, peer: IpAddr) {
        self.release(peer, |s| s.handshakes = s.handshakes.saturating_sub(1));
    }

    /// A connection from `peer` counted against `max_per_ip` has ended.
    pub(super) fn connection_done(&self, peer: IpAddr) {
        self.release(peer, |s| s.connections = s.connections.saturating_sub(1));
    }

    fn release(&self, peer: IpAddr, f: impl FnOnce(&mut SourceCount)) {
        if let Ok(mut sources) = self.counts.lock() {
            let key = source_of(peer);
            if let Some(s) = sources.get_mut(&key) {
                f(s);
                if s.handshakes == 0 && s.connections == 0 {
                    sources.remove(&key);
                }
            }
        }
    }
}

/// The unit per-address limits count: an IPv4 address, or an IPv6 /64 (what one host or subscriber is usually
/// given, so that an attacker cannot take every slot by walking its own prefix). IPv4-mapped addresses count as
/// IPv4.
pub fn source_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}
