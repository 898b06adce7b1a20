//! The server-wide book: the sans-IO session [`Registry`] and a way to reach each connection.
//!
//! # Layout
//! - [`Hub`]: the registry (sessions, presence, remote ids in cluster mode) and the connection table.
//! - [`Hub::pump`]: carries out what the registry decided: `PRESENCE` frames to subscribers, session events back
//!   to the caller, and (cluster mode) the release of a session that ended here.
//!
//! # Rules
//! The hub lives behind one mutex in the server's shared state. It is held only for short, non-blocking work: a
//! registry call and the pump after it, pushes into connections' bounded queues (which never wait), or a copy
//! of what an operator asked for. Never across an `.await`, never while emitting an event or logging. Under it,
//! a connection's control lock may be taken (to push or request a close), never the other way round.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant as StdInstant;

use tether_proto::registry::{Output, Registry, SessionEvent};
use tether_proto::{ConnId, Connection, Frame};

use super::control::Control;
use crate::cluster::Cluster;

/// The server-wide book: sessions and presence, and how to reach each connection.
pub(super) struct Hub {
    pub(super) registry: Registry,
    /// How to reach each connection: its control slot.
    pub(super) conns: HashMap<ConnId, Arc<Control>>,
    /// `ServerConfig::outbound_queue`, for pushes made while holding the hub.
    outbound_queue: usize,
    /// `PRESENCE` frames handed out so far (counted here, under the lock that sends them).
    pub(super) presence_frames: u64,
    /// Cluster mode: sessions that end here are released in Redis ([`Hub::pump`]).
    cluster: Option<Arc<Cluster>>,
    /// Cluster mode, while a repair of the view runs: the ids other nodes' messages changed since it began.
    pub(super) touched: Option<std::collections::HashSet<String>>,
}

impl Hub {
    pub(super) fn new(registry: Registry, outbound_queue: usize, cluster: Option<Arc<Cluster>>) -> Hub {
        Hub { registry, conns: HashMap::new(), outbound_queue, presence_frames: 0, cluster, touched: None }
    }

    /// A message changed `client` in the view: a repair running now must leave it alone.
    pub(super) fn touch(&mut self, client: &str) {
        if let Some(t) = &mut self.touched {
            t.insert(client.to_owned());
        }
    }

    /// The connection that holds `client`'s session here.
    pub(super) fn holder(&self, client: &str) -> Option<&Arc<Control>> {
        self.registry.lookup(client).and_then(|c| self.conns.get(&c))
    }

    /// Carry out the registry's outputs: deliver `PRESENCE` frames, and return its session events. Frames for
    /// `own` (the calling connection) go straight into its state machine, so a large snapshot does not depend on
    /// its own queue.
    pub(super) fn pump(&mut self, mut own: Option<(ConnId, &mut Connection, StdInstant)>) -> Vec<SessionEvent> {
        let mut events = Vec::new();
        while let Some(out) = self.registry.poll_output() {
            let (to, presence) = match out {
                Output::Notify { to, presence } => (to, presence),
                Output::Event(e) => {
                    // Cluster mode: a session of this node ended (after the grace): release it in Redis.
                    if let (Some(cluster), SessionEvent::Offline { client, epoch, reason, by_client, silent_for, .. }) =
                        (&self.cluster, &e)
                    {
                        cluster.release(client, *epoch, *reason, *by_client, *silent_for);
                    }
                    events.push(e);
                    continue;
                }
            };
            match &mut own {
                Some((id, conn, now)) if *id == to => {
                    let _ = conn.send(*now, Frame::Presence(presence));
                }
                _ => {
                    if let Some(h) = self.conns.get(&to) {
                        let _ = h.push(Frame::Presence(presence), self.outbound_queue);
                    }
                }
            }
            self.presence_frames += 1;
        }
        events
    }
}
