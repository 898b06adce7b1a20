//! Sessions by client id, takeover, id conflicts, and presence subscriptions.
//!
//! # Layout
//! [`Registry`] is the server-wide, sans-IO book of who is online. The IO layer calls it when a `HELLO` needs
//! admission ([`Registry::admit`]), when a connection ends ([`Registry::disconnect`]), when the detector suspects
//! or clears a client, and for `SUBSCRIBE`/`UNSUBSCRIBE`. It answers with [`Output`]s polled by
//! [`Registry::poll_output`]: `PRESENCE` frames to deliver to subscriber connections, and [`SessionEvent`]s for
//! the application. The only timer is the optional presence grace, kept in one ordered set
//! ([`Registry::poll_timeout`]); nothing scans all sessions.
//!
//! Rules (docs/architecture.md has the reasoning):
//! - One live connection per id. A `HELLO` for an online id evicts the holder at once (`takeover`), and the new
//!   session gets the next epoch. Subscribers see no offline/online flap.
//! - Two live devices with one id are an `id_conflict`: when a newcomer's nonce is one that this id was taken
//!   from by another nonce within `conflict_window`, and the holder was heard from within `conflict_liveness`,
//!   the newcomer is refused with a retry-after instead of the two evicting each other forever. A rebooted
//!   device comes back with a new nonce, so reboot loops, however fast, are always takeovers.
//! - With `presence_grace`, `offline` (for any reason but `bye`) is announced only if the id has not come back
//!   within the grace.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use crate::frame::{Presence, PresenceState};
use crate::reason::CloseReason;

/// The IO layer's handle for one connection.
pub type ConnId = u64;

/// Displaced nonces remembered per id for the conflict rule.
const MAX_DISPLACED: usize = 8;

/// The subscription that matches every id.
pub const WILDCARD: &str = "*";

/// Registry policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryConfig {
    /// Delay before announcing `offline` (0: at once). An id that returns within it causes no flap.
    pub presence_grace: Duration,
    /// A holder heard from within this is alive for the id-conflict rule.
    pub conflict_liveness: Duration,
    /// How long a displaced nonce that comes back counts as fighting for the id; also the retry-after.
    pub conflict_window: Duration,
    /// Whether `*` subscriptions are allowed.
    pub allow_wildcard: bool,
    /// Most subscriptions one connection may hold.
    pub max_subscriptions: usize,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            presence_grace: Duration::ZERO,
            conflict_liveness: Duration::from_millis(7500),
            conflict_window: Duration::from_secs(30),
            allow_wildcard: true,
            max_subscriptions: 1024,
        }
    }
}

/// The answer to a `HELLO`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Welcome with this epoch; `evicted` is the holder to close with `takeover`.
    Welcome { epoch: u64, evicted: Option<ConnId> },
    /// Refuse the newcomer with `BYE(id_conflict, retry_after)`; the holder keeps the id.
    Conflict { holder: ConnId, retry_after: Duration },
}

/// Session-level facts for the application's event stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEvent {
    Online {
        client: String,
        conn: ConnId,
        epoch: u64,
    },
    Takeover {
        client: String,
        old: ConnId,
        new: ConnId,
        epoch: u64,
        same_device: bool,
    },
    IdConflict {
        client: String,
        holder: ConnId,
        newcomer: ConnId,
    },
    Suspect {
        client: String,
        conn: ConnId,
    },
    /// The id is offline as far as presence is concerned (after the grace, if any).
    Offline {
        client: String,
        conn: ConnId,
        reason: CloseReason,
    },
}

/// What the IO layer must carry out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Send this `PRESENCE` to connection `to`.
    Notify {
        to: ConnId,
        presence: Presence,
    },
    Event(SessionEvent),
}

/// Why a subscription was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    #[error("wildcard subscriptions are not allowed")]
    WildcardRefused,
    #[error("more than {0} subscriptions")]
    TooMany(usize),
}

#[derive(Debug, Clone)]
struct Session {
    conn: ConnId,
    nonce: u64,
    suspect: bool,
    /// Nonces this id was taken from by a different nonce within `conflict_window`, oldest first (at most
    /// [`MAX_DISPLACED`]); carried from session to session of the id. Only these can be an `id_conflict`.
    displaced: Vec<(u64, Instant)>,
}

#[derive(Debug, Clone)]
struct PendingOffline {
    conn: ConnId,
    deadline: Instant,
    reason: CloseReason,
    last_seen: Instant,
}

/// Sessions and presence for one server.
#[derive(Debug, Default)]
pub struct Registry {
    cfg: RegistryConfig,
    sessions: HashMap<String, Session>,
    /// Epochs are global and monotonic, so they increase for every id without per-id memory.
    next_epoch: u64,
    pending: HashMap<String, PendingOffline>,
    pending_order: BTreeSet<(Instant, String)>,
    subscribers: HashMap<String, HashSet<ConnId>>,
    wildcard: HashSet<ConnId>,
    subscriptions: HashMap<ConnId, HashSet<String>>,
    out: VecDeque<Output>,
}

impl Registry {
    pub fn new(cfg: RegistryConfig) -> Registry {
        Registry { cfg, next_epoch: 1, ..Registry::default() }
    }

    pub fn config(&self) -> &RegistryConfig {
        &self.cfg
    }

    /// Ids with a live session.
    pub fn online(&self) -> usize {
        self.sessions.len()
    }

    /// The connection holding `client`, if online.
    pub fn lookup(&self, client: &str) -> Option<ConnId> {
        self.sessions.get(client).map(|s| s.conn)
    }

    /// Decide on a `HELLO` from `conn`. `holder_last_rx` tells when the current holder (if any) last sent a frame.
    pub fn admit(
        &mut self,
        now: Instant,
        client: &str,
        nonce: u64,
        conn: ConnId,
        holder_last_rx: impl FnOnce(ConnId) -> Option<Instant>,
    ) -> Admission {
        let epoch = self.next_epoch;
        if let Some(holder) = self.sessions.get_mut(client) {
            let same_device = holder.nonce == nonce;
            let window = self.cfg.conflict_window;
            holder.displaced.retain(|(_, at)| now.saturating_duration_since(*at) < window);
            // The newcomer is a device this id was taken from moments ago: it is alive (a rebooted device would
            // come back with a new nonce) and fighting the current holder for the id.
            let fighting_back = !same_device && holder.displaced.iter().any(|(n, _)| *n == nonce);
            if fighting_back {
                let alive = holder_last_rx(holder.conn)
                    .is_some_and(|t| now.saturating_duration_since(t) < self.cfg.conflict_liveness);
                if alive {
                    let holder = holder.conn;
                    self.emit(SessionEvent::IdConflict { client: client.into(), holder, newcomer: conn });
                    return Admission::Conflict { holder, retry_after: window };
                }
            }
            let old = holder.conn;
            let was_suspect = holder.suspect;
            let mut displaced = std::mem::take(&mut holder.displaced);
            if !same_device {
                displaced.retain(|(n, _)| *n != nonce);
                if displaced.len() == MAX_DISPLACED {
                    displaced.remove(0);
                }
                displaced.push((holder.nonce, now));
            }
            self.next_epoch += 1;
            self.sessions.insert(client.into(), Session { conn, nonce, suspect: false, displaced });
            self.emit(SessionEvent::Takeover { client: client.into(), old, new: conn, epoch, same_device });
            if was_suspect {
                self.notify(client, PresenceState::Online, None, 0);
            }
            return Admission::Welcome { epoch, evicted: Some(old) };
        }
        self.next_epoch += 1;
        let came_back = self.cancel_pending(client);
        self.sessions.insert(client.into(), Session { conn, nonce, suspect: false, displaced: Vec::new() });
        self.emit(SessionEvent::Online { client: client.into(), conn, epoch });
        if !came_back {
            self.notify(client, PresenceState::Online, None, 0);
        }
        Admission::Welcome { epoch, evicted: None }
    }

    /// Connection `conn` ended. `client` is its admitted id (None if it never got one); `last_seen` is when its
    /// last frame arrived.
    pub fn disconnect(
        &mut self,
        now: Instant,
        conn: ConnId,
        client: Option<&str>,
        reason: CloseReason,
        last_seen: Instant,
    ) {
        self.drop_subscriptions(conn);
        let Some(client) = client else { return };
        if self.sessions.get(client).is_none_or(|s| s.conn != conn) {
            return; // taken over: the id stays online through its new connection
        }
        self.sessions.remove(client);
        if self.cfg.presence_grace.is_zero() || reason == CloseReason::Bye {
            self.go_offline(now, client, conn, reason, last_seen);
        } else {
            let deadline = now + self.cfg.presence_grace;
            self.cancel_pending(client);
            self.pending_order.insert((deadline, client.into()));
            self.pending.insert(client.into(), PendingOffline { conn, deadline, reason, last_seen });
        }
    }

    /// The detector suspects `conn` (silent for `silent_for`).
    pub fn suspect(&mut self, conn: ConnId, client: &str, silent_for: Duration) {
        if let Some(s) = self.sessions.get_mut(client).filter(|s| s.conn == conn && !s.suspect) {
            s.suspect = true;
            self.emit(SessionEvent::Suspect { client: client.into(), conn });
            self.notify(client, PresenceState::Suspect, None, ms(silent_for));
        }
    }

    /// A suspected `conn` was heard from again.
    pub fn recovered(&mut self, conn: ConnId, client: &str) {
        if let Some(s) = self.sessions.get_mut(client).filter(|s| s.conn == conn && s.suspect) {
            s.suspect = false;
            self.notify(client, PresenceState::Online, None, 0);
        }
    }

    /// Subscribe `conn` to `ids` and queue a snapshot of their current state to it.
    pub fn subscribe(&mut self, conn: ConnId, ids: &[String]) -> Result<(), SubscribeError> {
        if ids.iter().any(|i| i == WILDCARD) && !self.cfg.allow_wildcard {
            return Err(SubscribeError::WildcardRefused);
        }
        let held = self.subscriptions.get(&conn).map_or(0, HashSet::len);
        let new: HashSet<&String> = ids.iter().filter(|i| !self.is_subscribed(conn, i)).collect();
        if held + new.len() > self.cfg.max_subscriptions {
            return Err(SubscribeError::TooMany(self.cfg.max_subscriptions));
        }
        for id in new {
            self.subscriptions.entry(conn).or_default().insert(id.clone());
            if id == WILDCARD {
                self.wildcard.insert(conn);
            } else {
                self.subscribers.entry(id.clone()).or_default().insert(conn);
            }
        }
        // Snapshot: online ids (all of them for `*`), and an explicit offline for named ids that are not.
        let mut snapshot: Vec<Presence> = Vec::new();
        let mut seen = HashSet::new();
        let mut add = |reg: &Registry, id: &str, snapshot: &mut Vec<Presence>| {
            if seen.insert(id.to_owned()) {
                snapshot.push(reg.state_of(id));
            }
        };
        if ids.iter().any(|i| i == WILDCARD) {
            let mut online: Vec<&String> = self.sessions.keys().chain(self.pending.keys()).collect();
            online.sort();
            for id in online {
                add(self, id, &mut snapshot);
            }
        }
        for id in ids.iter().filter(|i| *i != WILDCARD) {
            add(self, id, &mut snapshot);
        }
        for presence in snapshot {
            self.out.push_back(Output::Notify { to: conn, presence });
        }
        Ok(())
    }

    pub fn unsubscribe(&mut self, conn: ConnId, ids: &[String]) {
        for id in ids {
            if let Some(set) = self.subscriptions.get_mut(&conn) {
                set.remove(id);
            }
            if id == WILDCARD {
                self.wildcard.remove(&conn);
            } else if let Some(set) = self.subscribers.get_mut(id) {
                set.remove(&conn);
                if set.is_empty() {
                    self.subscribers.remove(id);
                }
            }
        }
    }

    /// Announce the offlines whose grace has run out.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some((deadline, id)) = self.pending_order.first().cloned() {
            if deadline > now {
                break;
            }
            self.pending_order.pop_first();
            if let Some(p) = self.pending.remove(&id) {
                self.go_offline(now, &id, p.conn, p.reason, p.last_seen);
            }
        }
    }

    /// When [`handle_timeout`](Self::handle_timeout) must next run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.pending_order.first().map(|(t, _)| *t)
    }

    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    fn is_subscribed(&self, conn: ConnId, id: &str) -> bool {
        self.subscriptions.get(&conn).is_some_and(|s| s.contains(id))
    }

    fn state_of(&self, id: &str) -> Presence {
        let (state, last_seen_ago_ms) = match (self.sessions.get(id), self.pending.get(id)) {
            (Some(s), _) if s.suspect => (PresenceState::Suspect, 0),
            (Some(_), _) => (PresenceState::Online, 0),
            // Within the grace the id is still online to subscribers.
            (None, Some(_)) => (PresenceState::Online, 0),
            (None, None) => (PresenceState::Offline, u32::MAX),
        };
        Presence { client_id: id.into(), state, reason: None, last_seen_ago_ms }
    }

    fn go_offline(&mut self, now: Instant, client: &str, conn: ConnId, reason: CloseReason, last_seen: Instant) {
        self.emit(SessionEvent::Offline { client: client.into(), conn, reason });
        self.notify(client, PresenceState::Offline, Some(reason), ms(now.saturating_duration_since(last_seen)));
    }

    fn cancel_pending(&mut self, client: &str) -> bool {
        match self.pending.remove(client) {
            Some(p) => {
                self.pending_order.remove(&(p.deadline, client.to_owned()));
                true
            }
            None => false,
        }
    }

    fn drop_subscriptions(&mut self, conn: ConnId) {
        if let Some(ids) = self.subscriptions.remove(&conn) {
            let ids: Vec<String> = ids.into_iter().collect();
            self.unsubscribe(conn, &ids);
        }
    }

    fn notify(&mut self, client: &str, state: PresenceState, reason: Option<CloseReason>, last_seen_ago_ms: u32) {
        let direct = self.subscribers.get(client).into_iter().flatten();
        let targets: HashSet<ConnId> = direct.chain(self.wildcard.iter()).copied().collect();
        let mut targets: Vec<ConnId> = targets.into_iter().collect();
        targets.sort_unstable();
        for to in targets {
            let presence = Presence { client_id: client.into(), state, reason, last_seen_ago_ms };
            self.out.push_back(Output::Notify { to, presence });
        }
    }

    fn emit(&mut self, e: SessionEvent) {
        self.out.push_back(Output::Event(e));
    }
}

fn ms(d: Duration) -> u32 {
    d.as_millis().min(u32::MAX as u128 - 1) as u32
}

#[cfg(test)]
mod tests;
