//! Cluster: ids held by other nodes, and the hand-over of an id from one node to another.
//!
//! The IO layer feeds the registry what other nodes publish: [`Registry::remote_online`], `remote_suspect`,
//! `remote_recovered` and [`Registry::remote_offline`], each with the session's epoch (the cluster's fencing
//! token). Subscribers here then see every id wherever it is connected, under the same rules as local sessions:
//! an id that moves between nodes causes no flap, and a message older than what is known (a smaller epoch) is
//! ignored, so the order in which two nodes' messages arrive does not matter.
//!
//! The view is checked against the cluster's state, not only fed by messages: each node's ids carry a digest
//! ([`digest_of`], XORed per node and kept up to date with every change), which the IO layer compares with the
//! digest Redis keeps for that node. When they differ, the IO layer reads the node's sessions and repairs the view
//! with the same calls ([`Registry::remote_ids_of`] gives what the view holds).
//!
//! When a `HELLO` arrives for an id another node holds, that node decides, because only it knows how recently
//! its holder was heard from: [`Registry::yield_to`] applies the `id_conflict` rule there and, if the newcomer
//! may have the id, lets it go with the nonces it displaced; the newcomer's node then admits it with
//! [`Registry::admit_cluster`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Admission, ConnId, Displaced, Gone, PendingOffline, Registry, Session};
use crate::frame::PresenceState;
use crate::reason::CloseReason;

/// An id online on another node: the node's number in [`Registry::nodes`], the session's epoch.
#[derive(Debug, Clone)]
pub(super) struct Remote {
    node: u32,
    epoch: u64,
    pub(super) suspect: bool,
}

/// Another node the view holds ids of.
#[derive(Debug)]
pub(super) struct RemoteNode {
    name: Arc<str>,
    digest: NodeDigest,
}

/// One id's share of its node's digest: the first 32 bits of SHA-1(`client:epoch`, the epoch in ASCII decimal).
/// A node's digest is the XOR of its ids' shares, so it changes in O(1) per change, and two views of a node agree
/// exactly when they hold the same sessions (but for a chance of 2^-32). Redis's scripts compute the same with
/// `redis.sha1hex`.
pub fn digest_of(client: &str, epoch: u64) -> u32 {
    let mut h = sha1_smol::Sha1::new();
    h.update(client.as_bytes());
    h.update(b":");
    h.update(epoch.to_string().as_bytes());
    let b = h.digest().bytes();
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// What the view holds of one node: how many ids, and the XOR of their [`digest_of`] shares.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeDigest {
    pub ids: usize,
    pub xor: u32,
}

/// Another node's news that an id went offline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteOffline {
    /// The epoch of the session that ended: an offline for an older session than the one known is ignored.
    pub epoch: u64,
    pub reason: CloseReason,
    pub by_client: bool,
    /// Since the id's last frame, as the publishing node saw it.
    pub last_seen_ago: Duration,
    /// The presence grace is still to run here (the holding node could not apply it: it was lost).
    pub grace: bool,
}

/// The answer of the node holding an id to another node's `HELLO` for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Yield {
    /// No session here (it ended, or moved on): the newcomer may claim the id.
    NotHere,
    /// Two live devices claim the id: the newcomer must back off.
    Conflict { holder: ConnId, retry_after: Duration },
    /// The newcomer may have the id: close `evicted` with `takeover`. `displaced` (nonce, age) goes with the id.
    Granted { evicted: ConnId, displaced: Vec<(u64, Duration)> },
}

impl Registry {
    /// The node and epoch of `client`, if it is online on another node.
    pub fn remote_holder(&self, client: &str) -> Option<(&str, u64)> {
        self.remote.get(client).map(|r| (self.node_name(r.node), r.epoch))
    }

    /// Ids online on other nodes.
    pub fn remote_online_count(&self) -> usize {
        self.remote.len()
    }

    /// Each other node the view holds ids of, with their count and digest.
    pub fn remote_digests(&self) -> impl Iterator<Item = (&str, NodeDigest)> {
        self.nodes.iter().flatten().map(|n| (&*n.name, n.digest))
    }

    /// The ids the view holds on the nodes `wanted` picks, with their epochs, per node (one scan of every
    /// remote id: for a repair, not per message).
    pub fn remote_ids_of(&self, wanted: impl Fn(&str) -> bool) -> HashMap<String, Vec<(String, u64)>> {
        let mut out: HashMap<String, Vec<(String, u64)>> = HashMap::new();
        for (id, r) in self.remote.iter().filter(|(_, r)| wanted(self.node_name(r.node))) {
            out.entry(self.node_name(r.node).to_string()).or_default().push((id.to_string(), r.epoch));
        }
        out
    }

    fn node_name(&self, node: u32) -> &str {
        self.nodes[node as usize].as_ref().map_or("", |n| &n.name)
    }

    /// `client` is online on `node` in session `epoch` (not suspect): its entry, inserted or replaced.
    fn remote_set(&mut self, client: &str, node: &str, epoch: u64) {
        let number = match self.nodes.iter().position(|n| n.as_ref().is_some_and(|n| &*n.name == node)) {
            Some(i) => i,
            None => {
                // A new node (its count is raised at once, below): the first free number, else a new one. The
                // nodes are few, so a scan is cheaper than a second map.
                let fresh = Some(RemoteNode { name: node.into(), digest: NodeDigest::default() });
                match self.nodes.iter().position(Option::is_none) {
                    Some(i) => {
                        self.nodes[i] = fresh;
                        i
                    }
                    None => {
                        self.nodes.push(fresh);
                        self.nodes.len() - 1
                    }
                }
            }
        };
        let node = u32::try_from(number).expect("fewer than 2^32 nodes");
        self.remote_put(client, Remote { node, epoch, suspect: false });
    }

    /// Insert or replace `client`'s remote entry, keeping the digests.
    fn remote_put(&mut self, client: &str, r: Remote) {
        self.flip(r.node, client, r.epoch, true);
        if let Some(old) = self.remote.insert(client.into(), r) {
            self.flip(old.node, client, old.epoch, false);
        }
    }

    /// Remove `client`'s remote entry, keeping the digests.
    pub(super) fn remote_take(&mut self, client: &str) -> Option<Remote> {
        let r = self.remote.remove(client)?;
        self.flip(r.node, client, r.epoch, false);
        Some(r)
    }

    /// Count `client`'s entry into its node's digest, or out of it; a node whose last id leaves frees its number.
    fn flip(&mut self, node: u32, client: &str, epoch: u64, added: bool) {
        let slot = &mut self.nodes[node as usize];
        let Some(n) = slot else { return };
        n.digest.xor ^= digest_of(client, epoch);
        match added {
            true => n.digest.ids += 1,
            false => n.digest.ids -= 1,
        }
        if n.digest.ids == 0 {
            *slot = None;
        }
    }

    /// The epoch of `client`'s session here, if it has one.
    pub fn local_epoch(&self, client: &str) -> Option<u64> {
        self.sessions.get(client).map(|s| s.epoch)
    }

    /// Local sessions that ended and wait out the presence grace, with their epochs: still registered in the
    /// cluster until the grace ends (their release comes then).
    pub fn graced_sessions(&self) -> impl Iterator<Item = (&str, u64)> {
        self.pending.iter().filter(|(_, p)| p.conn.is_some()).map(|(id, p)| (id.as_str(), p.gone.epoch))
    }

    /// Whether the local session of `client` with `epoch` ended and waits out the presence grace.
    pub fn in_grace(&self, client: &str, epoch: u64) -> bool {
        self.pending.get(client).is_some_and(|p| p.conn.is_some() && p.gone.epoch == epoch)
    }

    /// Local sessions with their epochs, in no particular order: id, connection, epoch.
    pub fn local_sessions(&self) -> impl Iterator<Item = (&str, ConnId, u64)> {
        self.sessions.iter().map(|(id, s)| (&**id, s.conn, s.epoch))
    }

    /// `client` is online on `node` in session `epoch`. Returns the local connection that held it under an
    /// older epoch: the id moved away, and that connection must close with `takeover` (its end then announces
    /// nothing).
    pub fn remote_online(&mut self, client: &str, node: &str, epoch: u64) -> Option<ConnId> {
        if let Some(s) = self.sessions.get(client) {
            if s.epoch >= epoch {
                return None;
            }
            let s = self.sessions.remove(client).expect("checked above");
            self.remote_set(client, node, epoch);
            if s.suspect {
                self.notify(client, PresenceState::Online, None, 0, 0);
            }
            return Some(s.conn);
        }
        if let Some(r) = self.remote.get(client) {
            if r.epoch > epoch {
                return None;
            }
            let was_suspect = r.suspect;
            self.remote_set(client, node, epoch);
            if was_suspect {
                self.notify(client, PresenceState::Online, None, 0, 0);
            }
            return None;
        }
        // A session known to have ended (here, or as another node said) does not come back with a late message
        // or a snapshot read before it ended. One declared lost with its node, or found gone from Redis without a
        // reason (`Unknown`), may: the node was cut off or Redis lost its writes, and the node registers it again
        // under the same epoch.
        let for_good = |r: CloseReason| !matches!(r, CloseReason::NodeLost | CloseReason::Unknown(_));
        let ended = |g: &Gone| g.epoch > epoch || (g.epoch == epoch && for_good(g.reason));
        if self.pending.get(client).is_some_and(|p| ended(&p.gone)) || self.gone.get(client).is_some_and(ended) {
            return None;
        }
        let came_back = self.cancel_pending(client);
        self.forget_gone(client);
        self.remote_set(client, node, epoch);
        if !came_back {
            self.notify(client, PresenceState::Online, None, 0, 0);
        }
        None
    }

    /// The node holding `client` in session `epoch` suspects it (silent for `silent_for`).
    pub fn remote_suspect(&mut self, client: &str, epoch: u64, silent_for: Duration) {
        if let Some(r) = self.remote.get_mut(client).filter(|r| r.epoch == epoch && !r.suspect) {
            r.suspect = true;
            self.notify(client, PresenceState::Suspect, None, super::ms(silent_for), 0);
        }
    }

    /// A suspected remote `client` was heard from again.
    pub fn remote_recovered(&mut self, client: &str, epoch: u64) {
        if let Some(r) = self.remote.get_mut(client).filter(|r| r.epoch == epoch && r.suspect) {
            r.suspect = false;
            self.notify(client, PresenceState::Online, None, 0, 0);
        }
    }

    /// A remote session of `client` ended. Ignored when the id is known in a newer session (here or elsewhere).
    pub fn remote_offline(&mut self, now: Instant, client: &str, off: RemoteOffline) {
        if self.remote.get(client).is_none_or(|r| r.epoch > off.epoch) {
            return;
        }
        self.remote_take(client);
        let last_seen = now.checked_sub(off.last_seen_ago).unwrap_or(now);
        let gone =
            Gone { epoch: off.epoch, reason: off.reason, by_client: off.by_client, last_seen, left: now, seq: 0 };
        let grace = self.cfg.presence_grace;
        if off.grace && !grace.is_zero() && off.reason != CloseReason::Bye {
            let deadline = now + grace;
            self.pending_order.insert((deadline, client.into()));
            self.pending.insert(client.into(), PendingOffline { conn: None, deadline, gone });
        } else {
            self.remote_gone(now, client, gone);
        }
    }

    /// Announce a remote id offline and remember it for late subscribers. No session event: the session was
    /// another node's.
    pub(super) fn remote_gone(&mut self, now: Instant, client: &str, gone: Gone) {
        let p = super::offline_presence(now, client, &gone);
        self.notify(client, PresenceState::Offline, Some(gone.reason), p.last_seen_ago_ms, p.flags);
        self.remember_gone(now, client, gone);
    }

    /// Node `node` has a `HELLO` with `nonce` for `client`: may the newcomer have the id? On [`Yield::Granted`]
    /// the local session is gone at once, without an offline (the id is known to be on `node` until its new
    /// epoch arrives), and the caller closes `evicted` with `takeover`.
    pub fn yield_to(
        &mut self,
        now: Instant,
        client: &str,
        nonce: u64,
        node: &str,
        holder_last_rx: impl FnOnce(ConnId) -> Option<Instant>,
    ) -> Yield {
        if !self.sessions.contains_key(client) {
            return Yield::NotHere;
        }
        if let Some((holder, retry_after)) = self.fighting_back(now, client, nonce, holder_last_rx) {
            return Yield::Conflict { holder, retry_after };
        }
        let Session { conn, epoch, nonce: held_by, mut displaced, suspect } =
            self.sessions.remove(client).expect("checked above");
        if held_by != nonce {
            displaced.insert(held_by, now);
        }
        // A placeholder: the id is on `node` until its new session's message says more.
        self.remote_set(client, node, epoch);
        if suspect {
            self.notify(client, PresenceState::Online, None, 0, 0);
        }
        Yield::Granted { evicted: conn, displaced: displaced.ages(now) }
    }

    /// Admit a `HELLO` in a cluster: `epoch` is the cluster's fencing token for the new session, and `displaced`
    /// the nonces the id carries from the node it held it before ([`Yield::Granted`]).
    #[allow(clippy::too_many_arguments)]
    pub fn admit_cluster(
        &mut self,
        now: Instant,
        client: &str,
        nonce: u64,
        conn: ConnId,
        epoch: u64,
        displaced: &[(u64, Duration)],
        holder_last_rx: impl FnOnce(ConnId) -> Option<Instant>,
    ) -> Admission {
        let inherited = Displaced::from_ages(now, displaced);
        self.admit_at(now, client, nonce, conn, Some(epoch), inherited, holder_last_rx)
    }

    /// How `client` last went offline here, if that is remembered: reason, whether the client ended it, and when
    /// its last frame arrived.
    pub fn gone_of(&self, client: &str) -> Option<(CloseReason, bool, Instant)> {
        self.gone.get(client).map(|g| (g.reason, g.by_client, g.last_seen))
    }

    /// The local session of `client` with epoch `from` takes epoch `to` (the cluster already holds it under that
    /// one). False when there is no such session.
    pub fn adopt_epoch(&mut self, client: &str, from: u64, to: u64) -> bool {
        match self.sessions.get_mut(client).filter(|s| s.epoch == from) {
            Some(s) => {
                s.epoch = to;
                self.next_epoch = self.next_epoch.max(to + 1);
                true
            }
            None => false,
        }
    }
}

impl Displaced {
    /// The exactly kept nonces with their ages, to hand over with the id.
    pub(super) fn ages(&self, now: Instant) -> Vec<(u64, Duration)> {
        self.exact().iter().map(|(n, at)| (*n, now.saturating_duration_since(*at))).collect()
    }

    pub(super) fn from_ages(now: Instant, ages: &[(u64, Duration)]) -> Displaced {
        let mut d = Displaced::default();
        let mut by_age: Vec<&(u64, Duration)> = ages.iter().collect();
        by_age.sort_by_key(|(_, age)| std::cmp::Reverse(*age));
        for (nonce, age) in by_age {
            d.insert(*nonce, now.checked_sub(*age).unwrap_or(now));
        }
        d
    }
}

#[cfg(test)]
mod tests;
