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
//!   device comes back with a new nonce, so reboot loops, however fast, are always takeovers. The displaced
//!   nonces of an id are kept exactly up to [`DISPLACED_EXACT`]; beyond that, in a `StampFilter` of fixed size,
//!   so the rule holds for any number of devices with bounded memory per id (at the cost of rare false
//!   positives, only on ids that many devices fight over).
//! - With `presence_grace`, `offline` (for any reason but `bye`) is announced only if the id has not come back
//!   within the grace.
//! - Ids that went offline are remembered (at most `remember_offline` of them, each for at most
//!   `remember_offline_for`), so that a late subscriber learns when and why an id left.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use compact_str::CompactString;

use crate::frame::{presence_flags, Presence, PresenceState};
use crate::reason::CloseReason;

mod cluster;
pub use cluster::{digest_of, NodeDigest, RemoteOffline, Yield};

/// The IO layer's handle for one connection.
pub type ConnId = u64;

/// Displaced nonces remembered exactly per id for the conflict rule; older ones go into a `StampFilter`.
pub const DISPLACED_EXACT: usize = 16;

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
    /// Offline ids remembered (with reason and last-seen) for late subscribers; the oldest are forgotten first.
    pub remember_offline: usize,
    /// How long an offline id is remembered.
    pub remember_offline_for: Duration,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            presence_grace: Duration::ZERO,
            conflict_liveness: Duration::from_millis(7500),
            conflict_window: Duration::from_secs(30),
            allow_wildcard: true,
            max_subscriptions: 1024,
            remember_offline: 16_384,
            remember_offline_for: Duration::from_secs(3600),
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
        /// The session's epoch.
        epoch: u64,
        reason: CloseReason,
        /// The client ended the connection itself (its `BYE`, FIN or reset), not the server.
        by_client: bool,
        /// From its last frame to the announcement.
        silent_for: Duration,
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
    epoch: u64,
    nonce: u64,
    suspect: bool,
    /// Nonces this id was taken from by a different nonce within `conflict_window`; carried from session to
    /// session of the id. Only these can be an `id_conflict`.
    displaced: Displaced,
}

/// The displaced nonces of one id: the newest [`DISPLACED_EXACT`] exactly, older ones in a filter allocated only
/// for ids that more devices than that fight over. Boxed, and only once a nonce was displaced: most ids never
/// are, and every online id's session pays one pointer for it.
#[derive(Debug, Clone, Default)]
struct Displaced(Option<Box<Nonces>>);

#[derive(Debug, Clone, Default)]
struct Nonces {
    /// Oldest first.
    exact: Vec<(u64, Instant)>,
    overflow: Option<Box<StampFilter>>,
}

impl Displaced {
    /// Forget what is older than `window`.
    fn expire(&mut self, now: Instant, window: Duration) {
        let Some(n) = self.0.as_mut() else { return };
        n.exact.retain(|(_, at)| now.saturating_duration_since(*at) < window);
        if n.overflow.as_ref().is_some_and(|f| now.saturating_duration_since(f.newest) >= window) {
            n.overflow = None;
        }
        if n.exact.is_empty() && n.overflow.is_none() {
            self.0 = None;
        }
    }

    fn contains(&self, nonce: u64, now: Instant, window: Duration) -> bool {
        self.0.as_ref().is_some_and(|n| {
            n.exact.iter().any(|(x, _)| *x == nonce)
                || n.overflow.as_ref().is_some_and(|f| f.contains(nonce, now, window))
        })
    }

    fn insert(&mut self, nonce: u64, now: Instant) {
        let n = self.0.get_or_insert_default();
        n.exact.retain(|(x, _)| *x != nonce);
        if n.exact.len() == DISPLACED_EXACT {
            let (old, at) = n.exact.remove(0);
            n.overflow.get_or_insert_with(|| Box::new(StampFilter::new(at))).insert(old, at);
        }
        n.exact.push((nonce, now));
    }

    /// The nonces kept exactly, oldest first.
    fn exact(&self) -> &[(u64, Instant)] {
        self.0.as_ref().map_or(&[], |n| &n.exact)
    }
}

/// A fixed-size set of nonces with insertion times, for the `id_conflict` rule on ids fought over by more than
/// [`DISPLACED_EXACT`] devices: [`StampFilter::SLOTS`] time stamps (4 KiB), each nonce hashed to
/// [`StampFilter::HASHES`] of them (a Bloom filter whose bits are times). A nonce inserted within the window is
/// always found (no false negatives); a nonce never inserted is found only if other nonces stamped all its slots
/// within the window: with 100 devices in one window, about 1 in 60. Such a false positive refuses a rebooted
/// device with `id_conflict` for one window, on an id that many live devices are fighting over anyway.
#[derive(Debug, Clone)]
struct StampFilter {
    /// Zero: empty; otherwise tenths of a second since `base`, plus one.
    slots: [u32; StampFilter::SLOTS],
    base: Instant,
    /// The latest insertion: once it is older than the window, the whole filter is dropped.
    newest: Instant,
}

impl StampFilter {
    const SLOTS: usize = 1024;
    const HASHES: u64 = 3;

    fn new(base: Instant) -> StampFilter {
        StampFilter { slots: [0; Self::SLOTS], base, newest: base }
    }

    fn stamp(&self, t: Instant) -> u32 {
        (t.saturating_duration_since(self.base).as_millis() / 100).min(u32::MAX as u128 - 1) as u32 + 1
    }

    fn slot(nonce: u64, i: u64) -> usize {
        // SplitMix64's finaliser: every bit of the nonce moves every bit of the slot index.
        let mut z = nonce ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) % Self::SLOTS as u64) as usize
    }

    fn insert(&mut self, nonce: u64, at: Instant) {
        let stamp = self.stamp(at);
        for i in 0..Self::HASHES {
            let slot = &mut self.slots[Self::slot(nonce, i)];
            *slot = (*slot).max(stamp);
        }
        self.newest = self.newest.max(at);
    }

    fn contains(&self, nonce: u64, now: Instant, window: Duration) -> bool {
        let now = self.stamp(now);
        // Stamps are tenths of a second, truncated: an entry is kept up to one tenth longer than the window, never
        // shorter.
        let window = window.as_millis().div_ceil(100).min(u32::MAX as u128) as u32;
        (0..Self::HASHES).all(|i| {
            let s = self.slots[Self::slot(nonce, i)];
            s != 0 && now.saturating_sub(s) <= window
        })
    }
}

#[derive(Debug, Clone)]
struct PendingOffline {
    /// The connection that held the id here; `None` for an id held by another node (cluster).
    conn: Option<ConnId>,
    deadline: Instant,
    gone: Gone,
}

/// How and when an id went offline, kept for late subscribers.
#[derive(Debug, Clone, Copy)]
struct Gone {
    /// The epoch of the session that ended.
    epoch: u64,
    reason: CloseReason,
    by_client: bool,
    /// When its last frame arrived.
    last_seen: Instant,
    /// When it went offline (for subscribers: after the presence grace); the age bound counts from here.
    left: Instant,
    /// Position in `Registry::gone_order`.
    seq: u64,
}

/// Sessions and presence for one server.
#[derive(Debug, Default)]
pub struct Registry {
    cfg: RegistryConfig,
    /// Keyed by a shared id: the serving connection keeps the same allocation ([`Registry::shared_id`]).
    sessions: HashMap<Arc<str>, Session>,
    /// Epochs are global and monotonic, so they increase for every id without per-id memory.
    next_epoch: u64,
    pending: HashMap<String, PendingOffline>,
    pending_order: BTreeSet<(Instant, String)>,
    /// Offline ids remembered for late subscribers, and their order of going offline (oldest first). Both hold
    /// the same allocation of the id.
    gone: HashMap<Arc<str>, Gone>,
    gone_order: BTreeMap<u64, Arc<str>>,
    gone_seq: u64,
    /// Cluster: ids online on other nodes, as their presence messages said ([`cluster`]).
    /// Ids inline up to 24 bytes, and each entry names its node by number (16 bytes in all): the view holds
    /// every id online elsewhere in the cluster, and most ids are short.
    remote: HashMap<CompactString, cluster::Remote>,
    /// The other nodes the view holds ids of, by number: each one's name, its ids in `remote` counted and
    /// digested ([`digest_of`]). A number is free (`None`) once its node's last id has left the view.
    nodes: Vec<Option<cluster::RemoteNode>>,
    subscribers: HashMap<String, HashSet<ConnId>>,
    wildcard: HashSet<ConnId>,
    subscriptions: HashMap<ConnId, HashSet<String>>,
    /// Entries of `subscriptions`, all connections together (for metrics without a scan).
    subscriptions_held: usize,
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

    /// Online sessions in no particular order: id, connection, and whether the detector suspects it.
    pub fn sessions(&self) -> impl Iterator<Item = (&str, ConnId, bool)> {
        self.sessions.iter().map(|(id, s)| (&**id, s.conn, s.suspect))
    }

    /// The connection holding `client` and whether the detector suspects it, if online.
    pub fn session(&self, client: &str) -> Option<(ConnId, bool)> {
        self.sessions.get(client).map(|s| (s.conn, s.suspect))
    }

    /// Presence subscriptions held, over all connections (a `*` counts as one).
    pub fn subscriptions(&self) -> usize {
        self.subscriptions_held
    }

    /// The connection holding `client`, if online.
    pub fn lookup(&self, client: &str) -> Option<ConnId> {
        self.sessions.get(client).map(|s| s.conn)
    }

    /// The id of an online session as the registry keeps it, for its connection to share rather than copy.
    pub fn shared_id(&self, client: &str) -> Option<Arc<str>> {
        self.sessions.get_key_value(client).map(|(k, _)| k.clone())
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
        self.admit_at(now, client, nonce, conn, None, Displaced::default(), holder_last_rx)
    }

    /// [`admit`](Self::admit) with the epoch given (a cluster's fencing token, when `Some`) and the displaced nonces
    /// the id carries from another node.
    #[allow(clippy::too_many_arguments)]
    fn admit_at(
        &mut self,
        now: Instant,
        client: &str,
        nonce: u64,
        conn: ConnId,
        given_epoch: Option<u64>,
        inherited: Displaced,
        holder_last_rx: impl FnOnce(ConnId) -> Option<Instant>,
    ) -> Admission {
        let epoch = given_epoch.unwrap_or(self.next_epoch);
        if let Some((holder, retry_after)) = self.fighting_back(now, client, nonce, holder_last_rx) {
            self.emit(SessionEvent::IdConflict { client: client.into(), holder, newcomer: conn });
            return Admission::Conflict { holder, retry_after };
        }
        if let Some(holder) = self.sessions.get_mut(client) {
            let same_device = holder.nonce == nonce;
            let old = holder.conn;
            let was_suspect = holder.suspect;
            let mut displaced = std::mem::take(&mut holder.displaced);
            if !same_device {
                displaced.insert(holder.nonce, now);
            }
            // The key stays: whoever shares it keeps sharing it.
            *holder = Session { conn, epoch, nonce, suspect: false, displaced };
            self.next_epoch = self.next_epoch.max(epoch + 1);
            self.emit(SessionEvent::Takeover { client: client.into(), old, new: conn, epoch, same_device });
            if was_suspect {
                self.notify(client, PresenceState::Online, None, 0, 0);
            }
            return Admission::Welcome { epoch, evicted: Some(old) };
        }
        self.next_epoch = self.next_epoch.max(epoch + 1);
        let came_back = self.cancel_pending(client);
        // (A single node never has remote ids: no lookup for it.)
        let was_remote = if self.remote.is_empty() { None } else { self.remote_take(client) };
        self.forget_gone(client);
        self.sessions.insert(client.into(), Session { conn, epoch, nonce, suspect: false, displaced: inherited });
        self.emit(SessionEvent::Online { client: client.into(), conn, epoch });
        // An id that was online on another node moved here: no flap, unless it was suspect there.
        match was_remote {
            Some(r) if r.suspect => self.notify(client, PresenceState::Online, None, 0, 0),
            Some(_) => {}
            None if came_back => {}
            None => self.notify(client, PresenceState::Online, None, 0, 0),
        }
        Admission::Welcome { epoch, evicted: None }
    }

    /// Whether a `HELLO` with `nonce` for `client` would be refused as an `id_conflict` now, and the retry-after
    /// (for a cluster node that must know before it claims the id elsewhere).
    pub fn would_conflict(
        &mut self,
        now: Instant,
        client: &str,
        nonce: u64,
        holder_last_rx: impl FnOnce(ConnId) -> Option<Instant>,
    ) -> Option<Duration> {
        self.fighting_back(now, client, nonce, holder_last_rx).map(|(_, retry)| retry)
    }

    /// The `id_conflict` rule: is a newcomer with `nonce` a device this id was taken from moments ago (alive: a
    /// rebooted device would come back with a new nonce) fighting a holder that is alive too? Then the holder
    /// and the retry-after.
    fn fighting_back(
        &mut self,
        now: Instant,
        client: &str,
        nonce: u64,
        holder_last_rx: impl FnOnce(ConnId) -> Option<Instant>,
    ) -> Option<(ConnId, Duration)> {
        let window = self.cfg.conflict_window;
        let holder = self.sessions.get_mut(client)?;
        holder.displaced.expire(now, window);
        if holder.nonce == nonce || !holder.displaced.contains(nonce, now, window) {
            return None;
        }
        let alive =
            holder_last_rx(holder.conn).is_some_and(|t| now.saturating_duration_since(t) < self.cfg.conflict_liveness);
        alive.then_some((holder.conn, window))
    }

    /// Connection `conn` ended. `client` is its admitted id (None if it never got one); `by_client` says the
    /// client ended it itself (its `BYE`, FIN or reset); `last_seen` is when its last frame arrived.
    pub fn disconnect(
        &mut self,
        now: Instant,
        conn: ConnId,
        client: Option<&str>,
        reason: CloseReason,
        by_client: bool,
        last_seen: Instant,
    ) {
        self.drop_subscriptions(conn);
        let Some(client) = client else { return };
        if self.sessions.get(client).is_none_or(|s| s.conn != conn) {
            return; // taken over: the id stays online through its new connection
        }
        let epoch = self.sessions.remove(client).map_or(0, |s| s.epoch);
        let gone = Gone { epoch, reason, by_client, last_seen, left: now, seq: 0 };
        if self.cfg.presence_grace.is_zero() || reason == CloseReason::Bye {
            self.go_offline(now, client, conn, gone);
        } else {
            let deadline = now + self.cfg.presence_grace;
            self.cancel_pending(client);
            self.pending_order.insert((deadline, client.into()));
            self.pending.insert(client.into(), PendingOffline { conn: Some(conn), deadline, gone });
        }
    }

    /// The detector suspects `conn` (silent for `silent_for`).
    pub fn suspect(&mut self, conn: ConnId, client: &str, silent_for: Duration) {
        if let Some(s) = self.sessions.get_mut(client).filter(|s| s.conn == conn && !s.suspect) {
            s.suspect = true;
            self.emit(SessionEvent::Suspect { client: client.into(), conn });
            self.notify(client, PresenceState::Suspect, None, ms(silent_for), 0);
        }
    }

    /// A suspected `conn` was heard from again.
    pub fn recovered(&mut self, conn: ConnId, client: &str) {
        if let Some(s) = self.sessions.get_mut(client).filter(|s| s.conn == conn && s.suspect) {
            s.suspect = false;
            self.notify(client, PresenceState::Online, None, 0, 0);
        }
    }

    /// Subscribe `conn` to `ids` and queue a snapshot of their current state to it.
    pub fn subscribe(&mut self, now: Instant, conn: ConnId, ids: &[String]) -> Result<(), SubscribeError> {
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
            self.subscriptions_held += 1;
            if id == WILDCARD {
                self.wildcard.insert(conn);
            } else {
                self.subscribers.entry(id.clone()).or_default().insert(conn);
            }
        }
        // Snapshot: online ids (all of them for `*`), and an explicit offline for named ids that are not.
        let mut snapshot: Vec<Presence> = Vec::new();
        let mut seen = HashSet::new();
        self.expire_gone(now);
        let mut add = |reg: &Registry, id: &str, snapshot: &mut Vec<Presence>| {
            if seen.insert(id.to_owned()) {
                snapshot.push(reg.state_of(now, id));
            }
        };
        if ids.iter().any(|i| i == WILDCARD) {
            let pending = self.pending.keys().map(String::as_str).chain(self.remote.keys().map(CompactString::as_str));
            let mut online: Vec<&str> = self.sessions.keys().map(|k| &**k).chain(pending).collect();
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
            if self.subscriptions.get_mut(&conn).is_some_and(|set| set.remove(id)) {
                self.subscriptions_held -= 1;
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
            match self.pending.remove(&id) {
                Some(PendingOffline { conn: Some(conn), gone, .. }) => self.go_offline(now, &id, conn, gone),
                Some(PendingOffline { conn: None, gone, .. }) => self.remote_gone(now, &id, gone),
                None => {}
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

    /// How `id` stands now: online or suspect; offline with its reason and last-seen if it is remembered; else
    /// offline with no reason and an unknown last-seen (never seen, or forgotten).
    fn state_of(&self, now: Instant, id: &str) -> Presence {
        let online = |state| Presence { client_id: id.into(), state, reason: None, last_seen_ago_ms: 0, flags: 0 };
        if let Some(r) = self.remote.get(id) {
            return online(if r.suspect { PresenceState::Suspect } else { PresenceState::Online });
        }
        match (self.sessions.get(id), self.pending.get(id), self.gone.get(id)) {
            (Some(s), _, _) if s.suspect => online(PresenceState::Suspect),
            (Some(_), _, _) => online(PresenceState::Online),
            // Within the grace the id is still online to subscribers.
            (None, Some(_), _) => online(PresenceState::Online),
            (None, None, Some(g)) => offline_presence(now, id, g),
            (None, None, None) => Presence {
                client_id: id.into(),
                state: PresenceState::Offline,
                reason: None,
                last_seen_ago_ms: u32::MAX,
                flags: 0,
            },
        }
    }

    fn go_offline(&mut self, now: Instant, client: &str, conn: ConnId, gone: Gone) {
        let Gone { reason, by_client, epoch, last_seen, .. } = gone;
        let silent_for = now.saturating_duration_since(last_seen);
        self.emit(SessionEvent::Offline { client: client.into(), conn, epoch, reason, by_client, silent_for });
        let p = offline_presence(now, client, &gone);
        self.notify(client, PresenceState::Offline, Some(reason), p.last_seen_ago_ms, p.flags);
        self.remember_gone(now, client, gone);
    }

    /// Remember `client` as offline, forgetting the oldest entries beyond the count and age bounds.
    fn remember_gone(&mut self, now: Instant, client: &str, mut gone: Gone) {
        if self.cfg.remember_offline == 0 {
            return;
        }
        self.forget_gone(client);
        self.gone_seq += 1;
        gone.seq = self.gone_seq;
        gone.left = now;
        let id: Arc<str> = client.into();
        self.gone_order.insert(gone.seq, id.clone());
        self.gone.insert(id, gone);
        while self.gone.len() > self.cfg.remember_offline {
            let Some((_, id)) = self.gone_order.pop_first() else { break };
            self.gone.remove(&id);
        }
        self.expire_gone(now);
    }

    /// Forget offline ids remembered for longer than `remember_offline_for`, oldest first (the order of going
    /// offline). Amortised: each entry is removed once.
    fn expire_gone(&mut self, now: Instant) {
        while let Some((_, id)) = self.gone_order.first_key_value() {
            let ttl = self.cfg.remember_offline_for;
            let expired = self.gone.get(id).is_none_or(|g| now.saturating_duration_since(g.left) >= ttl);
            if !expired {
                break;
            }
            let (_, id) = self.gone_order.pop_first().expect("checked above");
            self.gone.remove(&id);
        }
    }

    fn forget_gone(&mut self, client: &str) {
        if let Some(g) = self.gone.remove(client) {
            self.gone_order.remove(&g.seq);
        }
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
            self.subscriptions_held -= ids.len();
            let ids: Vec<String> = ids.into_iter().collect();
            self.unsubscribe(conn, &ids);
        }
    }

    fn notify(
        &mut self,
        client: &str,
        state: PresenceState,
        reason: Option<CloseReason>,
        last_seen_ago_ms: u32,
        flags: u8,
    ) {
        let direct = self.subscribers.get(client).into_iter().flatten();
        let targets: HashSet<ConnId> = direct.chain(self.wildcard.iter()).copied().collect();
        let mut targets: Vec<ConnId> = targets.into_iter().collect();
        targets.sort_unstable();
        for to in targets {
            let presence = Presence { client_id: client.into(), state, reason, last_seen_ago_ms, flags };
            self.out.push_back(Output::Notify { to, presence });
        }
    }

    fn emit(&mut self, e: SessionEvent) {
        self.out.push_back(Output::Event(e));
    }
}

/// The `PRESENCE` telling that `id` went offline as `gone` says.
fn offline_presence(now: Instant, id: &str, gone: &Gone) -> Presence {
    Presence {
        client_id: id.into(),
        state: PresenceState::Offline,
        reason: Some(gone.reason),
        last_seen_ago_ms: ms(now.saturating_duration_since(gone.last_seen)),
        flags: if gone.by_client { presence_flags::BY_CLIENT } else { 0 },
    }
}

fn ms(d: Duration) -> u32 {
    d.as_millis().min(u32::MAX as u128 - 1) as u32
}

#[cfg(test)]
mod tests;
