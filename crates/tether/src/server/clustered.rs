//! The server's side of cluster mode: admission across nodes, and what other nodes' messages do here.
//!
//! # Layout
//! - [`admit`]: a `HELLO` in cluster mode is decided off the connection's event loop. The node holding the id is asked
//!   first (it applies the `id_conflict` rule, knowing its holder's liveness), then the id is claimed in Redis
//!   for a new epoch, and the decision goes back to the connection as a command ([`Admit`]), which welcomes or
//!   refuses under the hub's lock like a single node does. A connection that closes while its claim is in
//!   flight releases the claim itself, so Redis never keeps an id nobody holds.
//! - Reaching a client held elsewhere: [`Shared::relay_remote`] (`DATA` from a local client) and
//!   [`Shared::remote_node_of`] (the operator's send and kick).
//! - `impl Host for Shared`: what the cluster's tasks ask of this server. Other nodes' presence goes into the
//!   registry (and out as `PRESENCE` frames by the hub's pump), their relayed `DATA` and kicks reach local
//!   connections, their asks are answered, and a re-registration's findings (superseded, adopted, ended) are
//!   carried out.
//!
//! # Rules
//! Talks to Redis and to other nodes only through [`Cluster`]'s methods, which build every message; the one
//! thing decided here is the content of an answer to another node's ask (an `AskAnswer`, from the registry's
//! `Yield`). Like
//! everything under the hub's lock, holds it only for registry calls and pushes, never across an `.await`.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant as StdInstant};

use tether_proto::frame::V2;
use tether_proto::registry::{NodeDigest, RemoteOffline, Yield};
use tether_proto::reliable;
use tether_proto::{CloseReason, Frame, Hello, Undeliverable};

/// How long a client asking for a reliable session waits before it tries again, when Redis cannot open it.
const UNAVAILABLE_RETRY: Duration = Duration::from_secs(1);

use super::control::{bye, Admit, CloseCmd, Control, Decision, Stored};
use super::hub::Hub;
use super::state::Shared;
use crate::cluster::wire::{self, AskAnswer, Msg, Stamped};
use crate::cluster::{Cluster, Host};
use crate::driver;
use crate::event::EventKind;

/// Decide on `hello` for the connection behind `control`, then hand the decision to it. Runs as a task of its
/// own; the connection keeps counting as a handshake meanwhile.
pub(super) async fn admit(
    shared: Arc<Shared>,
    cluster: Arc<Cluster>,
    control: Arc<Control>,
    conn: tether_proto::ConnId,
    hello: Hello,
) {
    let me = cluster.node_id().to_owned();
    // The holder as Redis has it (this node's view may be a message behind), else as this node knows it.
    let in_redis = cluster.holder(&hello.client_id).await;
    let (remote, conflict) = {
        let mut hub = shared.hub();
        let Hub { registry, conns, .. } = &mut *hub;
        let remote = match in_redis {
            Ok(h) => h.map(|(n, _)| n),
            Err(()) => registry.remote_holder(&hello.client_id).map(|(n, _)| n.to_owned()),
        };
        let remote = remote.filter(|n| *n != me);
        let conflict = registry.would_conflict(driver::now(), &hello.client_id, hello.nonce, |c| {
            conns.get(&c).map(|h| shared.last_rx_of(h))
        });
        (remote, conflict)
    };
    let decision = if let Some(retry_after) = conflict {
        Decision::Conflict { retry_after, node: None }
    } else {
        let mut displaced = Vec::new();
        let mut refused = None;
        if let Some(node) = remote {
            match cluster.ask(&node, &hello.client_id, hello.nonce).await {
                Some(AskAnswer::Conflict { retry_after_ms }) => {
                    refused = Some(Decision::Conflict {
                        retry_after: Duration::from_millis(retry_after_ms.into()),
                        node: Some(node),
                    })
                }
                Some(AskAnswer::Granted { displaced: d }) => {
                    displaced = d.into_iter().map(|(n, age)| (n, Duration::from_millis(age.into()))).collect()
                }
                // Not there any more, or no answer in time (hung, cut off, gone): claim anyway. The epoch fences
                // it; a holder that comes back closes its own when it learns.
                Some(AskAnswer::NotHere) | None => {}
            }
        }
        match refused {
            Some(r) => r,
            None => {
                let offer = reliable::Offer::find(&hello.extensions).filter(|_| hello.version >= V2);
                match (cluster.claim(&hello.client_id).await, offer) {
                    (Some(c), Some(offer)) => {
                        let attach = cluster.rel_attach(conn);
                        match cluster.rel_open(&hello.client_id, &attach, &offer, c.epoch).await {
                            Some(Some(opened)) => {
                                let grant = opened.grant;
                                let sent = match grant.continues() {
                                    true => offer.resume.map_or(0, |r| r.received),
                                    false => 0,
                                };
                                let rel = Some(Box::new(Stored { grant, attach, sent }));
                                Decision::Welcome { epoch: c.epoch, displaced, rel }
                            }
                            // A newer claim of the id (another connection) opened its session first: it wins.
                            Some(None) => Decision::Superseded { epoch: c.epoch },
                            None => {
                                // Claimed, but its session could not be opened: the id goes back.
                                cluster.admitted(c.epoch);
                                let reason = CloseReason::Busy;
                                cluster.release(&hello.client_id, c.epoch, reason, false, Duration::ZERO);
                                Decision::Unavailable { retry_after: UNAVAILABLE_RETRY }
                            }
                        }
                    }
                    (Some(c), None) => {
                        // Another device, or one that lost its session, took the id: the session ends.
                        cluster.rel_replace(&hello.client_id, c.epoch).await;
                        Decision::Welcome { epoch: c.epoch, displaced, rel: None }
                    }
                    (None, Some(_)) => Decision::Unavailable { retry_after: UNAVAILABLE_RETRY },
                    // Redis did not answer: admitted here all the same, registered when Redis is back.
                    (None, None) => Decision::Welcome { epoch: cluster.local_epoch(), displaced, rel: None },
                }
            }
        }
    };
    let admit = Box::new(Admit { hello, decision });
    if let Err(admit) = control.admit(admit) {
        // The connection closed while the claim was in flight.
        admit.give_back(&cluster, CloseReason::Eof, true);
    }
}

impl Shared {
    /// `DATA` from `from` to `to`, who is not connected here: relay it to the node that holds `to`. False when no
    /// node holds it (or the message could not be queued), for an `UNDELIVERABLE`.
    pub(super) fn relay_remote(&self, from: &str, to: &str, payload: bytes::Bytes) -> bool {
        let Some(cluster) = &self.cluster else { return false };
        if cluster.is_degraded() {
            return false;
        }
        let node = {
            let hub = self.hub();
            hub.registry.remote_holder(to).map(|(n, _)| n.to_owned())
        };
        let Some(node) = node else { return false };
        cluster.relay(&node, from, to, payload)
    }

    /// The node holding `client`, when it is another one.
    pub(super) fn remote_node_of(&self, client: &str) -> Option<(Arc<Cluster>, String)> {
        let cluster = self.cluster.clone()?;
        let hub = self.hub();
        let node = hub.registry.remote_holder(client).map(|(n, _)| n.to_owned())?;
        Some((cluster, node))
    }

    fn close_taken(&self, conn: tether_proto::ConnId) {
        let hub = self.hub();
        if let Some(h) = hub.conns.get(&conn) {
            h.request(CloseCmd::Bye(bye(CloseReason::Takeover, Duration::ZERO)));
        }
    }

    fn deliver_local(&self, client: &str, frame: Frame) -> bool {
        let hub = self.hub();
        hub.holder(client).is_some_and(|h| h.push(frame, self.cfg.outbound_queue).is_ok())
    }
}

impl Host for Shared {
    fn on_message(&self, m: Stamped) {
        let Some(cluster) = self.cluster.clone() else { return };
        let me = cluster.node_id();
        let now: StdInstant = driver::now();
        match m.msg {
            Msg::Online { client, node, epoch } => {
                cluster.saw_epoch(epoch);
                if node == me {
                    return; // our own claim
                }
                let mut hub = self.hub();
                hub.touch(&client);
                let evicted = hub.registry.remote_online(&client, &node, epoch);
                hub.pump(None);
                if let Some(conn) = evicted.and_then(|c| hub.conns.get(&c)) {
                    conn.request(CloseCmd::Bye(bye(CloseReason::Takeover, Duration::ZERO)));
                }
            }
            Msg::Suspect { client, epoch, silent_ms } => {
                let mut hub = self.hub();
                hub.registry.remote_suspect(&client, epoch, Duration::from_millis(silent_ms.into()));
                hub.pump(None);
            }
            Msg::Recovered { client, epoch } => {
                let mut hub = self.hub();
                hub.registry.remote_recovered(&client, epoch);
                hub.pump(None);
            }
            Msg::Offline { client, epoch, reason, by_client, last_seen_ms } => {
                let off = RemoteOffline {
                    epoch,
                    reason: wire::reason_of(reason),
                    by_client,
                    last_seen_ago: Duration::from_millis(last_seen_ms.into()),
                    grace: false,
                };
                let mut hub = self.hub();
                hub.touch(&client);
                hub.registry.remote_offline(now, &client, off);
                hub.pump(None);
                drop(hub);
                self.registry_wake.notify_one();
            }
            Msg::Lost { node, sessions } => {
                // Its clients were last known alive when the lost node last renewed its lease, as this node heard;
                // never heard of, at least one lease ago (the lease ran out before it was reaped).
                let last_seen_ago = self
                    .cluster
                    .as_ref()
                    .map_or(Duration::ZERO, |c| c.last_alive_ago(&node).unwrap_or_else(|| c.lease()));
                let mut hub = self.hub();
                for (client, epoch) in &sessions {
                    let off = RemoteOffline {
                        epoch: *epoch,
                        reason: CloseReason::NodeLost,
                        by_client: false,
                        last_seen_ago,
                        grace: true,
                    };
                    hub.touch(client);
                    hub.registry.remote_offline(now, client, off);
                }
                hub.pump(None);
                drop(hub);
                self.registry_wake.notify_one();
                tracing::debug!("{} sessions of lost node {node} declared offline", sessions.len());
            }
            Msg::Ask { req, client, nonce, from } => {
                let answer = {
                    let mut hub = self.hub();
                    // The id moves to `from` (a placeholder until its claim's `online`): a repair running now must not
                    // take the placeholder for a lie.
                    hub.touch(&client);
                    let Hub { registry, conns, .. } = &mut *hub;
                    let y =
                        registry.yield_to(now, &client, nonce, &from, |c| conns.get(&c).map(|h| self.last_rx_of(h)));
                    hub.pump(None);
                    match y {
                        Yield::NotHere => AskAnswer::NotHere,
                        Yield::Conflict { retry_after, .. } => {
                            AskAnswer::Conflict { retry_after_ms: retry_after.as_millis().min(u32::MAX as u128) as u32 }
                        }
                        Yield::Granted { evicted, displaced } => {
                            if let Some(h) = hub.conns.get(&evicted) {
                                h.request(CloseCmd::Bye(bye(CloseReason::Takeover, Duration::ZERO)));
                            }
                            self.metrics.takeovers.fetch_add(1, Ordering::Relaxed);
                            let displaced = displaced
                                .into_iter()
                                .map(|(n, age)| (n, age.as_millis().min(u32::MAX as u128) as u32))
                                .collect();
                            AskAnswer::Granted { displaced }
                        }
                    }
                };
                cluster.answer(&from, req, answer);
            }
            // Handled by the listener.
            Msg::Answer { .. } | Msg::Beat | Msg::Checkpoint { .. } => {}
            // The client's reliable session has new items: its connection here fetches them.
            Msg::Wake { client } => {
                if let Some(h) = self.hub().holder(&client) {
                    h.wake_pull();
                }
            }
            Msg::Data { from, to, origin, payload } => {
                if self.deliver_local(&to, Frame::Data { peer: from.clone(), payload }) {
                    self.metrics.relayed.fetch_add(1, Ordering::Relaxed);
                } else {
                    cluster.undeliverable(&origin, from, to);
                }
            }
            Msg::Undeliverable { from, to } => Host::undeliverable(self, &from, &to),
            Msg::Kick { client, retry_after_ms } => {
                let hub = self.hub();
                if let Some(h) = hub.holder(&client) {
                    let retry = Duration::from_millis(retry_after_ms.into());
                    h.request(CloseCmd::Bye(bye(CloseReason::Kicked, retry)));
                }
            }
            Msg::Send { client, payload } => {
                self.deliver_local(&client, Frame::Data { peer: String::new(), payload });
            }
        }
    }

    fn local_sessions(&self) -> Vec<(String, u64)> {
        let hub = self.hub();
        let live = hub.registry.local_sessions().map(|(id, _, epoch)| (id, epoch));
        // Sessions in their presence grace are still registered: their release comes when the grace ends.
        live.chain(hub.registry.graced_sessions()).map(|(id, epoch)| (id.to_owned(), epoch)).collect()
    }

    fn superseded(&self, client: &str, epoch: u64, node: &str, holder_epoch: u64) {
        let me = self.cluster.as_ref().map(|c| c.node_id().to_owned()).unwrap_or_default();
        if node == me {
            return; // our own claim: register_all adopts its epoch instead
        }
        let evicted = {
            let mut hub = self.hub();
            if hub.registry.local_epoch(client) != Some(epoch) {
                return;
            }
            if node.is_empty() {
                // A newer session of the id held it elsewhere and has ended (a tombstone): ours is stale. Its
                // close announces it offline here; its release finds nothing to delete in Redis.
                let conn = hub.registry.lookup(client);
                drop(hub);
                if let Some(conn) = conn {
                    self.close_taken(conn);
                }
                return;
            }
            let e = hub.registry.remote_online(client, node, holder_epoch);
            hub.pump(None);
            e
        };
        if let Some(conn) = evicted {
            self.close_taken(conn);
        }
    }

    fn view_digests(&self) -> Vec<(String, NodeDigest)> {
        let hub = self.hub();
        hub.registry.remote_digests().map(|(n, d)| (n.to_owned(), d)).collect()
    }

    fn view_of(&self, nodes: &BTreeSet<String>) -> HashMap<String, Vec<(String, u64)>> {
        self.hub().registry.remote_ids_of(|n| nodes.contains(n))
    }

    fn repair_begin(&self) {
        self.hub().touched = Some(Default::default());
    }

    fn repair_apply(&self, online: Vec<(String, String, u64)>, offline: Vec<(String, RemoteOffline)>) -> usize {
        let Some(cluster) = &self.cluster else { return 0 };
        let me = cluster.node_id().to_owned();
        let now = driver::now();
        let mut evict = Vec::new();
        let mut changed = 0;
        // In chunks: connections wait for the hub's lock at most one chunk's work.
        for chunk in online.chunks(1000) {
            let mut hub = self.hub();
            for (client, node, epoch) in chunk {
                cluster.saw_epoch(*epoch);
                let skip = hub.touched.as_ref().is_some_and(|t| t.contains(client));
                if *node == me || skip {
                    continue;
                }
                let now_held = |hub: &Hub| hub.registry.remote_holder(client) == Some((node.as_str(), *epoch));
                if !now_held(&hub) {
                    evict.extend(hub.registry.remote_online(client, node, *epoch));
                    changed += usize::from(now_held(&hub));
                }
            }
            hub.pump(None);
        }
        for chunk in offline.chunks(1000) {
            let mut hub = self.hub();
            for (client, off) in chunk {
                let skip = hub.touched.as_ref().is_some_and(|t| t.contains(client));
                if !skip && hub.registry.remote_holder(client).is_some_and(|(_, e)| e <= off.epoch) {
                    hub.registry.remote_offline(now, client, *off);
                    changed += usize::from(hub.registry.remote_holder(client).is_none());
                }
            }
            hub.pump(None);
        }
        self.hub().touched = None;
        self.registry_wake.notify_one();
        for conn in evict {
            self.close_taken(conn);
        }
        changed
    }

    fn ended(&self, client: &str, epoch: u64) -> Option<(u8, bool, Duration)> {
        let hub = self.hub();
        // Live, in its presence grace (released when the grace ends), or claimed and not admitted yet.
        let in_flight = || self.cluster.as_ref().is_some_and(|c| c.in_flight(epoch));
        if hub.registry.local_epoch(client) == Some(epoch) || hub.registry.in_grace(client, epoch) || in_flight() {
            return None;
        }
        let now = driver::now();
        Some(match hub.registry.gone_of(client) {
            Some((reason, by_client, last_seen)) => {
                (reason.code(), by_client, now.saturating_duration_since(last_seen))
            }
            // Not remembered any more: it closed without a reason this node can still tell.
            None => (CloseReason::Eof.code(), false, Duration::ZERO),
        })
    }

    fn adopt_epoch(&self, client: &str, from: u64, to: u64) {
        self.hub().registry.adopt_epoch(client, from, to);
    }

    fn degraded(&self, degraded: bool, why: &str) {
        if degraded {
            tracing::warn!("cluster degraded: {why}; serving local clients only");
        } else {
            tracing::info!("cluster: {why}; local sessions registered again");
        }
        self.emit(EventKind::Cluster { degraded, detail: why.into() });
    }

    fn undeliverable(&self, from: &str, to: &str) {
        self.metrics.undeliverable.fetch_add(1, Ordering::Relaxed);
        self.deliver_local(from, Frame::Undeliverable { to: to.into(), why: Undeliverable::NotOnline });
    }

    fn reaped(&self, node: &str, count: u64) {
        tracing::debug!("node {node} lost: {count} of its sessions declared offline (node_lost)");
        self.emit(EventKind::NodeLost { node: node.into(), sessions: count });
    }
}
