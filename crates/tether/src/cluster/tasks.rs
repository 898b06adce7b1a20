//! The cluster's five background tasks, spawned by [`Cluster::start`] and run until the server stops.
//!
//! # Layout
//! - [`lease`]: renews this node's lease every third of it, measures Redis's round trip, rejoins as a new
//!   incarnation when the node was declared lost or out of touch past its lease, re-registers every local
//!   session when asked to (`resync`: after a rejoin, a reconnect, or an operation that could not be carried out),
//!   retries the releases Redis did not confirm, and publishes a checkpoint to this node's inbox.
//! - [`reaper`]: looks for members whose lease ran out; the node that takes a member's lock declares its sessions
//!   offline (`node_lost`), batch by batch.
//! - [`listener`]: holds the pub/sub connection and hands each message to [`Host::on_message`] through a bounded
//!   queue; after each (re)connect, and when it shed messages, it asks for a full repair.
//! - [`repairer`]: reconciles the view of other nodes' ids with Redis when asked (see [`Cluster::checkpoint`]).
//! - [`outbox`]: carries out queued publishes and releases in queue order, each batch in one pipeline.
//!
//! # Rules
//! Every call to Redis is bounded by `redis_timeout` (the command connection's response timeout) or by an
//! explicit timeout around calls made of several requests. The tasks reach the server only through [`Host`],
//! whose methods never wait.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::store::{self, Leased, Registered, Store};
use super::wire::{self, Msg};
use super::{
    new_inc, problem, stall_gap, unix_ms, Cluster, Host, Op, Problem, PUBSUB_BYTES, PUBSUB_QUEUE, REAP_BATCH,
    REAP_EVERY,
};
use tether_proto::registry::RemoteOffline;
use tether_proto::CloseReason;

impl Cluster {
    /// Spawn the lease, reaper, listener, repairer and outbox tasks. They run until the returned handles are
    /// aborted.
    pub(crate) fn start(self: &Arc<Self>, host: Arc<dyn Host>) -> Vec<tokio::task::JoinHandle<()>> {
        let rx = self.out_rx.lock().expect("outbox lock").take().expect("started once");
        vec![
            tokio::spawn(lease(self.clone(), host.clone())),
            tokio::spawn(reaper(self.clone(), host.clone())),
            tokio::spawn(listener(self.clone(), host.clone())),
            tokio::spawn(repairer(self.clone(), host.clone())),
            tokio::spawn(outbox(self.clone(), host, rx)),
        ]
    }
}

/// What the lease task keeps between ticks.
#[derive(Default)]
struct LeaseState {
    joined: bool,
    /// Every local session is registered under the current incarnation (other nodes may trust its absences).
    synced: bool,
    /// Synced once the outbox has carried out this many operations (the releases a re-registration queued).
    synced_after: Option<u64>,
    /// The last renewal Redis confirmed, on our clock: out of touch for longer than the lease means we may have
    /// been declared lost (and our sessions offline) meanwhile.
    last_ok: Option<tokio::time::Instant>,
    /// Incarnations this node left behind by rejoining: their leftovers are released, then they leave.
    previous: Vec<String>,
    /// A live member with this node id that refused our join, and its lease's end then.
    refused_by: Option<(String, u64)>,
    /// Ever joined: a refusal then is a twin that appeared later, not a start to refuse.
    ever_joined: bool,
}

/// Renew the lease every third of it; (re)connect, rejoin and re-register as needed.
async fn lease(c: Arc<Cluster>, host: Arc<dyn Host>) {
    let mut tick = tokio::time::interval(c.cfg.lease / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut st = LeaseState::default();
    loop {
        tick.tick().await;
        if let Err(e) = lease_once(&c, &*host, &mut st).await {
            if let Problem::Config(why) = problem(&e) {
                if !st.ever_joined {
                    tracing::error!("cluster: {why}");
                    c.set_fatal(why);
                }
            }
            c.failed(&*host, &e);
        }
    }
}

async fn lease_once(c: &Cluster, host: &dyn Host, st: &mut LeaseState) -> redis::RedisResult<()> {
    let store = match c.store() {
        Some(s) => s,
        None => {
            let s = c.connect().await?;
            *c.store.lock().expect("store lock") = Some(s.clone());
            s
        }
    };
    let gap = stall_gap(c.cfg.lease);
    // While a re-registration is due, other nodes must not trust this node's absences; once the releases it
    // queued are out (the others heard each offline with its reason first), they may again.
    if c.resync.load(Ordering::Relaxed) {
        st.synced = false;
        st.synced_after = None;
    }
    if st.synced_after.is_some_and(|n| c.outbox_done.load(Ordering::Acquire) >= n) {
        st.synced = true;
        st.synced_after = None;
    }
    let renew = |join: bool, synced: bool| {
        let (addr, admin) = c.addrs.lock().expect("addrs lock").clone();
        let floor = c.max_epoch.load(Ordering::Relaxed);
        let (store, node, inc) = (store.clone(), c.cfg.node_id.clone(), c.incarnation());
        let (lease, started) = (c.cfg.lease, c.started_ms);
        async move { store.lease(&node, &inc, lease, join, started, (&addr, &admin), floor, gap, synced).await }
    };
    let t0 = tokio::time::Instant::now();
    let leased = renew(!st.joined, st.synced).await?;
    c.stats.redis_rtt.observe(t0.elapsed());
    // Out of touch for longer than the lease (on our clock), yet Redis renewed the lease: Redis stalled with us,
    // and its lease clock did not count the stall, so nobody reaped us. Still, what we sent meanwhile may be
    // lost (a failover to a replica that missed it): register everything again.
    if st.joined && st.last_ok.is_none_or(|t| t.elapsed() > c.cfg.lease) {
        c.resync.store(true, Ordering::Relaxed);
    }
    let leased = match leased {
        Leased::Renewed { members } => Leased::Renewed { members },
        Leased::Refused { member, lease_end } => return refused(c, host, st, &store, member, lease_end).await,
        Leased::Unknown { .. } => {
            // Declared lost (reaped, or Redis restarted empty): join again as a new incarnation, so that a reaper
            // still working on the old one cannot touch what is registered now. What the old one still holds is
            // released, then it leaves.
            st.previous.push(c.incarnation());
            *c.inc.lock().expect("inc lock") = new_inc();
            c.stats.rejoins.fetch_add(1, Ordering::Relaxed);
            st.joined = false;
            st.synced = false;
            st.synced_after = None;
            c.member.store(false, Ordering::Relaxed);
            match renew(true, false).await? {
                Leased::Refused { member, lease_end } => return refused(c, host, st, &store, member, lease_end).await,
                l => l,
            }
        }
    };
    if let Leased::Renewed { members } | Leased::Unknown { members } = leased {
        c.nodes.store(members, Ordering::Relaxed);
    }
    st.refused_by = None;
    c.member.store(true, Ordering::Relaxed);
    if !st.joined {
        st.joined = true;
        st.ever_joined = true;
        c.resync.store(true, Ordering::Relaxed);
    }
    if c.resync.swap(false, Ordering::AcqRel) {
        if !register_all(c, host, &store, &mut st.previous).await {
            c.resync.store(true, Ordering::Relaxed);
            return Ok(());
        }
        st.synced_after = Some(c.outbox_queued.load(Ordering::Acquire));
    }
    st.last_ok = Some(tokio::time::Instant::now());
    c.set_ready(&c.joined);
    // The view is checked against Redis at every tick: a checkpoint in this node's inbox, in order with every
    // ownership change (see `Cluster::checkpoint`).
    store.checkpoint(&c.cfg.node_id, gap).await?;
    // The pub/sub connection must deliver too: a beat to our own inbox each tick, heard back by the listener.
    c.send_to(&c.cfg.node_id, &Msg::Beat);
    let silent = unix_ms().saturating_sub(c.heard_ms.load(Ordering::Relaxed));
    if c.listening.load(Ordering::Relaxed) && silent > c.cfg.lease.as_millis() as u64 {
        tracing::warn!("cluster: pub/sub delivered nothing for {silent} ms; reconnecting it");
        c.heard_ms.store(unix_ms(), Ordering::Relaxed);
        c.restart_listener.notify_one();
    }
    if c.degraded.swap(false, Ordering::AcqRel) {
        host.degraded(false, "Redis answers again");
    }
    Ok(())
}

/// Our join was refused: `member` has this node id and a live lease. If it renews, it is another live process with
/// our node id: at start, this node does not start; later (this node was out of touch and the other started
/// meanwhile), it serves its own clients degraded and says so at every tick. If its lease runs out instead (this
/// node's own previous life, crashed), the next tick joins.
async fn refused(
    c: &Cluster,
    host: &dyn Host,
    st: &mut LeaseState,
    store: &Store,
    member: String,
    lease_end: u64,
) -> redis::RedisResult<()> {
    // Not a member: this process must not answer for the node id (asks, relayed DATA) nor claim under it.
    c.member.store(false, Ordering::Relaxed);
    let renewed = st.refused_by.as_ref().is_some_and(|(m, end)| *m == member && lease_end > *end);
    if st.refused_by.as_ref().is_none_or(|(m, _)| *m != member) {
        st.refused_by = Some((member.clone(), lease_end));
    }
    if !renewed {
        tracing::info!("cluster: node id {} is held by {member}; waiting to see whether it is alive", c.cfg.node_id);
        return Ok(());
    }
    st.refused_by = Some((member.clone(), lease_end));
    let addr = store.addr_of(&member).await.unwrap_or_default();
    let (mine, _) = c.addrs.lock().expect("addrs lock").clone();
    store.note_conflict(&c.cfg.node_id, &mine, &member).await?;
    let why = format!(
        "node id {:?} is already held by a live node (member {member}, listening on {addr}); give this process \
         another --node-id",
        c.cfg.node_id
    );
    if !st.ever_joined {
        tracing::error!("cluster: {why}");
        c.set_fatal(why);
    } else {
        tracing::error!("cluster: cannot rejoin: {why}; serving local clients only");
        if !c.degraded.swap(true, Ordering::AcqRel) {
            host.degraded(true, &why);
        }
    }
    Ok(())
}

/// Register every local session under the current incarnation; close those a newer session elsewhere holds (or
/// held and ended: a tombstone). Then release what Redis still holds for this node and is not live here any more:
/// releases lost while Redis was away, sessions that ended while this ran, and what previous incarnations left.
/// Then retry, by force, the releases Redis never confirmed (Redis may have restarted empty and lost the id: the
/// others must still hear it went offline, and why). False when Redis failed on the way (the next tick tries
/// again).
async fn register_all(c: &Cluster, host: &dyn Host, store: &Store, previous: &mut Vec<String>) -> bool {
    let inc = c.incarnation();
    let me = c.cfg.node_id.clone();
    let sessions = host.local_sessions();
    let mut tasks = tokio::task::JoinSet::new();
    let mut sessions = sessions.into_iter();
    let mut ok = true;
    loop {
        while tasks.len() < 64 {
            let Some((client, epoch)) = sessions.next() else { break };
            let (store, node, inc) = (store.clone(), me.clone(), inc.clone());
            tasks.spawn(async move {
                let r = store.register(&client, &node, &inc, epoch).await;
                (client, epoch, r)
            });
        }
        let Some(done) = tasks.join_next().await else { break };
        let Ok((client, epoch, r)) = done else { continue };
        match r {
            Ok(Registered::Kept) => {}
            Ok(Registered::Adopted(theirs)) => {
                c.saw_epoch(theirs);
                host.adopt_epoch(&client, epoch, theirs);
            }
            Ok(Registered::Superseded { node, epoch: theirs }) => host.superseded(&client, epoch, &node, theirs),
            Err(e) => {
                c.stats.redis_errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("registering {client}: {e}");
                ok = false;
            }
        }
    }
    if !ok {
        return false;
    }
    // What Redis holds for this node (this incarnation and the ones it left) that is not live here: release it
    // (compare-and-delete on its epoch, so a session claimed meanwhile is never touched).
    let incs: Vec<String> = std::iter::once(inc.clone()).chain(previous.iter().cloned()).collect();
    for i in &incs {
        let own = match tokio::time::timeout(c.cfg.redis_timeout * 10, store.own_ids(&me, i)).await {
            Ok(Ok(own)) => own,
            _ => return false,
        };
        for (client, node, epoch) in own {
            let (Some(node), Some(epoch)) = (node, epoch) else { continue };
            if node != me {
                continue;
            }
            if let Some((reason, by_client, last_seen)) = host.ended(&client, epoch) {
                c.queue(Op::Release { client, epoch, reason, by_client, last_seen, force: false });
            }
        }
    }
    // The previous incarnations leave (after their releases, in the outbox's order: the leave runs once they
    // are sent).
    for old in previous.drain(..) {
        c.queue_leave(old);
    }
    let retry: Vec<_> = c.unconfirmed.lock().expect("unconfirmed lock").drain().collect();
    for (client, u) in retry {
        if host.ended(&client, u.epoch).is_some() {
            let super::Unconfirmed { epoch, reason, by_client, last_seen } = u;
            c.queue(Op::Release { client, epoch, reason, by_client, last_seen, force: true });
        }
    }
    true
}

/// Look for lost members; reap the ones this node gets the lock for.
/// Reaper ticks between two reconciliations of the reliable sessions this node carries (10 s).
const RECONCILE_TICKS: u64 = 40;
/// A session attached this recently is left alone by the reconciliation (its connection may not be registered yet).
const RECONCILE_AGE: Duration = Duration::from_secs(10);

async fn reaper(c: Arc<Cluster>, host: Arc<dyn Host>) {
    let mut tick = tokio::time::interval(REAP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks = 0u64;
    loop {
        tick.tick().await;
        ticks += 1;
        let Some(store) = c.store() else { continue };
        // Reliable sessions offline past their expiry end (every node may run it: each script is one step).
        if let Some(b) = c.rel_bounds() {
            match store.rel_expire(&b).await {
                Ok(n) => _ = c.stats.rel_expired.fetch_add(n, Ordering::Relaxed),
                Err(e) => tracing::debug!("reliable sessions' expiry: {e}"),
            }
            // Now and then, the sessions Redis says this node carries are checked against its own: one whose
            // detach Redis did not take goes offline (and expires) all the same.
            if ticks % RECONCILE_TICKS == 0 {
                let live: Vec<String> = host.local_sessions().into_iter().map(|(id, _)| id).collect();
                let mine = store::member(&c.cfg.node_id, &c.incarnation());
                match store.rel_reconcile(&mine, &live, RECONCILE_AGE, &b).await {
                    Ok(n) if n > 0 => {
                        tracing::info!("cluster: {n} reliable sessions no connection carried went offline")
                    }
                    Ok(_) => {}
                    Err(e) => tracing::debug!("reliable sessions' reconciliation: {e}"),
                }
                // And the sessions of node incarnations gone from the table whose sessions did not all go
                // offline (the node reaping them died, or Redis failed, in between).
                for member in store.rel_orphans().await.unwrap_or_default() {
                    match store.rel_lost(&member, &b).await {
                        Ok(n) if n > 0 => tracing::info!("cluster: {n} reliable sessions of gone {member} offline"),
                        Ok(_) => {}
                        Err(e) => tracing::debug!("reliable sessions of gone {member}: {e}"),
                    }
                }
            }
        }
        let gap = stall_gap(c.cfg.lease);
        let Ok(expired) = store.expired(gap).await else { continue };
        let mine = store::member(&c.cfg.node_id, &c.incarnation());
        *c.lost.lock().expect("lost lock") =
            expired.iter().filter(|m| **m != mine).map(|m| store::node_of(m).to_owned()).collect();
        for member in expired.into_iter().filter(|m| *m != mine) {
            let hold = c.cfg.lease.max(Duration::from_secs(1));
            if !matches!(store.lock_reap(&member, &c.cfg.node_id, hold).await, Ok(true)) {
                continue;
            }
            let node = store::node_of(&member).to_owned();
            let (mut total, mut gone) = (0, false);
            // Bounded: each batch empties up to REAP_BATCH of a finite set, or stops.
            for _ in 0..10_000 {
                match store.reap(&member, REAP_BATCH, gap).await {
                    Ok((n, 0)) => total += n,
                    Ok((n, done)) => {
                        total += n;
                        gone = done == 1;
                        break;
                    }
                    _ => break,
                }
            }
            // The reliable sessions it carried are offline from now, and expire unless resumed elsewhere.
            if let (true, Some(b)) = (gone, c.rel_bounds()) {
                match store.rel_lost(&member, &b).await {
                    Ok(n) if n > 0 => tracing::info!("cluster: {n} reliable sessions of lost node {node} offline"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!("cluster: the reliable sessions of lost node {node}: {e}"),
                }
            }
            c.stats.reaped.fetch_add(total, Ordering::Relaxed);
            host.reaped(&node, total);
        }
    }
}

/// Hold the pub/sub connection and hand every message over. A forwarding task drains the redis crate's own
/// (unbounded) queue into a bounded one as fast as messages arrive; what does not fit is shed and counted, and the
/// view repaired. After each (re)connect the view is repaired in full.
async fn listener(c: Arc<Cluster>, host: Arc<dyn Host>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let connected = async {
            let mut ps = c.client.get_async_pubsub().await?;
            ps.subscribe(store::PRESENCE).await?;
            ps.subscribe(store::inbox(&c.cfg.node_id)).await?;
            redis::RedisResult::Ok(ps)
        };
        let ps = match tokio::time::timeout(c.cfg.redis_timeout * 2, connected).await {
            Ok(Ok(ps)) => ps,
            _ => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        // Subscribed first, then the repair reads Redis: whatever changes meanwhile arrives as a message, and the
        // repair leaves alone what a message changed.
        c.repair_all();
        c.heard_ms.store(unix_ms(), Ordering::Relaxed);
        let (tx, mut rx) = mpsc::channel::<redis::Msg>(PUBSUB_QUEUE);
        let queued = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut stream = ps.into_on_message();
        let (fc, fq) = (c.clone(), queued.clone());
        let forward = tokio::spawn(async move {
            while let Some(m) = stream.next().await {
                let len = m.get_payload_bytes().len();
                let room = fq.load(Ordering::Relaxed) + len <= PUBSUB_BYTES;
                if room && tx.try_send(m).is_ok() {
                    fq.fetch_add(len, Ordering::Relaxed);
                } else {
                    if fc.stats.shed.fetch_add(1, Ordering::Relaxed) % 10_000 == 0 {
                        tracing::warn!(
                            "cluster: pub/sub messages arrive faster than handled; shedding (repaired after)"
                        );
                    }
                    fc.repair_all();
                }
            }
        });
        loop {
            let m = tokio::select! {
                m = rx.recv() => m,
                () = c.restart_listener.notified() => None,
            };
            let Some(m) = m else { break };
            queued.fetch_sub(m.get_payload_bytes().len(), Ordering::Relaxed);
            c.stats.received.fetch_add(1, Ordering::Relaxed);
            let Some(stamped) = Msg::decode(m.get_payload_bytes()) else { continue };
            let lag = unix_ms().saturating_sub(stamped.sent_ms);
            c.stats.pubsub_lag.observe(Duration::from_millis(lag));
            match stamped.msg {
                Msg::Answer { req, answer } => c.answered(req, answer),
                Msg::Beat => c.heard_ms.store(unix_ms(), Ordering::Relaxed),
                Msg::Checkpoint { nodes } => c.checkpoint(&*host, nodes),
                // Not (yet, or any more) the member with this node id: what the inbox asks of that node is the
                // member's to answer.
                Msg::Ask { .. } | Msg::Data { .. } | Msg::Send { .. } | Msg::Kick { .. }
                    if !c.member.load(Ordering::Relaxed) => {}
                _ => host.on_message(stamped),
            }
        }
        forward.abort();
        // The connection dropped: Redis restarted or is unreachable.
        c.resync.store(true, Ordering::Relaxed);
    }
}

/// Reconcile the view of other nodes' ids with Redis when asked: every node, or the ones a checkpoint named.
async fn repairer(c: Arc<Cluster>, host: Arc<dyn Host>) {
    loop {
        let wake = c.repair_wake.notified();
        let pending = {
            let st = c.repair.lock().expect("repair lock");
            st.full || !st.nodes.is_empty()
        };
        if !pending {
            wake.await;
            continue;
        }
        let Some(store) = c.store() else {
            // Not connected yet: try again shortly (the lease task connects).
            tokio::time::sleep(c.cfg.lease / 6).await;
            continue;
        };
        let (full, nodes) = {
            let mut st = c.repair.lock().expect("repair lock");
            (std::mem::take(&mut st.full), std::mem::take(&mut st.nodes))
        };
        let t0 = tokio::time::Instant::now();
        match tokio::time::timeout(c.cfg.redis_timeout * 20, repair(&c, &*host, &store, full, nodes.clone())).await {
            Ok(Ok(changed)) if full && !c.listening.load(Ordering::Acquire) => {
                // The first read at start: the view was empty, nothing was missed.
                tracing::debug!("cluster: view of the other nodes read from Redis: {changed} ids ({:?})", t0.elapsed());
                c.set_ready(&c.listening);
            }
            Ok(Ok(changed)) => {
                c.stats.repairs.fetch_add(1, Ordering::Relaxed);
                c.stats.repaired.fetch_add(changed as u64, Ordering::Relaxed);
                // A node whose digest differs twice though its sessions match the view (twice, not to chase a
                // change in flight): Redis's digest is what is wrong (written without one by an older version):
                // recompute it there.
                let mut reseal = Vec::new();
                {
                    let mut st = c.repair.lock().expect("repair lock");
                    for node in &nodes {
                        let n = st.unchanged.entry(node.clone()).or_default();
                        *n = if changed == 0 { *n + 1 } else { 0 };
                        if *n >= 2 {
                            st.unchanged.remove(node);
                            reseal.push(node.clone());
                        }
                    }
                }
                for node in reseal {
                    match store.reseal(&node).await {
                        Ok(_) => tracing::info!("cluster: the digest of node {node} in Redis was recomputed"),
                        Err(e) => tracing::debug!("cluster: recomputing the digest of {node}: {e}"),
                    }
                }
                let what = if full { "every node".to_owned() } else { format!("{nodes:?}") };
                match changed {
                    0 => tracing::debug!("cluster: view of {what} checked against Redis in {:?}", t0.elapsed()),
                    n => tracing::info!("cluster: view of {what} repaired from Redis: {n} ids ({:?})", t0.elapsed()),
                }
                if full {
                    c.set_ready(&c.listening);
                }
            }
            _ => {
                // Redis failed on the way: the same work again at the next try.
                host.repair_apply(Vec::new(), Vec::new());
                {
                    let mut st = c.repair.lock().expect("repair lock");
                    st.full |= full;
                    st.nodes.extend(nodes);
                }
                tokio::time::sleep(c.cfg.lease / 6).await;
            }
        }
    }
}

/// One repair: read what Redis says each node holds, diff it with the view, apply the difference. A node with a
/// live, synced member is taken at its word (adding and removing); one still registering (not synced) only adds;
/// one with no live member for two leases (dead while Redis was away, say) has its ids declared `node_lost`.
async fn repair(
    c: &Cluster,
    host: &dyn Host,
    store: &Store,
    full: bool,
    nodes: std::collections::HashSet<String>,
) -> redis::RedisResult<usize> {
    let me = c.cfg.node_id.as_str();
    host.repair_begin();
    let members: Vec<store::NodeStatus> = store.nodes().await?.into_iter().filter(|m| m.lease_left_ms >= 0).collect();
    let mut targets: std::collections::BTreeSet<String> = nodes.into_iter().collect();
    if full {
        targets.extend(members.iter().map(|m| m.node.clone()));
        targets.extend(host.view_digests().into_iter().map(|(n, _)| n));
    }
    targets.remove(me);
    let mut views = host.view_of(&targets);
    let absent_for = c.cfg.lease * 2;
    let (mut online, mut offline) = (Vec::new(), Vec::new());
    let mut gone_ids = Vec::new();
    for node in &targets {
        let live: Vec<&store::NodeStatus> = members.iter().filter(|m| m.node == *node).collect();
        let view = views.remove(node).unwrap_or_default();
        if live.is_empty() {
            let since = {
                let mut st = c.repair.lock().expect("repair lock");
                *st.absent_since.entry(node.clone()).or_insert_with(tokio::time::Instant::now)
            };
            if since.elapsed() >= absent_for {
                // Its clients were last known alive when the node last was (or, never seen live here, at least
                // since it has been missed).
                let last_seen_ago = c.last_alive_ago(node).unwrap_or_else(|| since.elapsed());
                for (id, epoch) in view {
                    let off = RemoteOffline {
                        epoch,
                        reason: CloseReason::NodeLost,
                        by_client: false,
                        last_seen_ago,
                        grace: true,
                    };
                    offline.push((id, off));
                }
            }
            continue;
        }
        // Alive when its freshest member last renewed its lease.
        let renewed_ago = live.iter().map(|m| m.lease_ms.saturating_sub(m.lease_left_ms.max(0) as u64)).min();
        let now = tokio::time::Instant::now();
        let renewed = now.checked_sub(Duration::from_millis(renewed_ago.unwrap_or(0))).unwrap_or(now);
        c.repair.lock().expect("repair lock").alive.insert(node.clone(), renewed);
        let synced = live.iter().all(|m| m.synced);
        let mut truth: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
        for m in &live {
            let inc = m.member.rsplit_once('#').map_or("", |(_, inc)| inc);
            for (id, holder, epoch) in store.own_ids(node, inc).await? {
                if let (Some(h), Some(e)) = (holder, epoch) {
                    if h == *node {
                        truth.insert(id, e);
                    }
                }
            }
        }
        let held: std::collections::HashMap<&str, u64> = view.iter().map(|(id, e)| (id.as_str(), *e)).collect();
        for (id, e) in &truth {
            if held.get(id.as_str()).is_none_or(|v| v < e) {
                online.push((id.clone(), node.clone(), *e));
            }
        }
        if synced {
            for (id, e) in &view {
                if !truth.contains_key(id) {
                    gone_ids.push((id.clone(), *e));
                }
            }
        }
    }
    // How the missing ones ended, as their tombstones say (an offline this node missed carried the same).
    let ids: Vec<String> = gone_ids.iter().map(|(id, _)| id.clone()).collect();
    let stones = store.tombstones(&ids).await?;
    for ((id, epoch), stone) in gone_ids.into_iter().zip(stones) {
        // Without its tombstone, how it ended is not known: no reason (and the same session may come back, if Redis
        // lost its registration rather than its end).
        let (reason, by_client) = match stone {
            Some((e, code, by)) if e == epoch => (wire::reason_of(code), by),
            _ => (CloseReason::Unknown(0), false),
        };
        let off = RemoteOffline { epoch, reason, by_client, last_seen_ago: Duration::ZERO, grace: false };
        offline.push((id, off));
    }
    Ok(host.repair_apply(online, offline))
}

/// Carry out queued operations in order, each batch in one pipeline (Redis runs a pipeline's commands in
/// order): publishes, and releases by script hash.
async fn outbox(c: Arc<Cluster>, host: Arc<dyn Host>, mut rx: mpsc::Receiver<Op>) {
    let mut batch: Vec<Op> = Vec::with_capacity(256);
    loop {
        c.outbox_busy.store(false, Ordering::Release);
        if rx.recv_many(&mut batch, 256).await == 0 {
            return;
        }
        c.outbox_busy.store(true, Ordering::Release);
        let n = batch.len() as u64;
        let Some(store) = c.store() else {
            // Degraded: what ended meanwhile is released by the re-registration once Redis is back; a relayed
            // DATA is told to its sender.
            c.resync.store(true, Ordering::Relaxed);
            c.stats.unpublished.fetch_add(batch.len() as u64, Ordering::Relaxed);
            for op in batch.drain(..) {
                match op {
                    Op::Publish { relay: Some((from, to)), .. } => host.undeliverable(&from, &to),
                    Op::Publish { .. } | Op::Leave { .. } => {}
                    release @ Op::Release { .. } => c.unconfirmed(release),
                }
            }
            c.outbox_done.fetch_add(n, Ordering::Release);
            continue;
        };
        flush(&c, &*host, &store, &mut batch).await;
        c.outbox_done.fetch_add(n, Ordering::Release);
    }
}

/// Send `ops` in one pipeline, in order. A relayed `DATA` that no node received (its inbox has no listener: the
/// node is gone) or that Redis did not take is told to its sender as `UNDELIVERABLE`. A release that failed is
/// made good by the next re-registration.
async fn flush(c: &Cluster, host: &dyn Host, store: &Store, ops: &mut Vec<Op>) {
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for op in ops.iter() {
        match op {
            Op::Publish { channel, msg, .. } => {
                pipe.publish(channel, msg);
            }
            Op::Release { client, epoch, reason, by_client, last_seen, force } => {
                let me = &c.cfg.node_id;
                pipe.add_command(store.release_cmd(client, me, *epoch, *reason, *by_client, *last_seen, *force));
            }
            Op::Leave { inc } => {
                pipe.add_command(store.leave_cmd(&c.cfg.node_id, inc));
            }
        }
    }
    let mut con = store.con.clone();
    // One request: the connection's response timeout bounds it.
    let results: Vec<Option<redis::Value>> = match pipe.query_async::<Vec<redis::Value>>(&mut con).await {
        Ok(values) if values.len() == ops.len() => values.into_iter().map(Some).collect(),
        _ => {
            c.stats.redis_errors.fetch_add(1, Ordering::Relaxed);
            ops.iter().map(|_| None).collect()
        }
    };
    let lost_scripts =
        results.iter().any(|r| matches!(r, Some(redis::Value::ServerError(e)) if e.code() == "NOSCRIPT"));
    if lost_scripts {
        // Redis forgot the scripts (SCRIPT FLUSH, a failover to a replica without them): a new connection loads
        // them again; what failed is retried by the re-registration.
        *c.store.lock().expect("store lock") = None;
    }
    for (op, result) in ops.drain(..).zip(results) {
        let ok = matches!(result, Some(redis::Value::Int(_)));
        if ok {
            if matches!(op, Op::Publish { .. }) {
                c.stats.published.fetch_add(1, Ordering::Relaxed);
            }
        } else {
            c.stats.unpublished.fetch_add(1, Ordering::Relaxed);
            c.resync.store(true, Ordering::Relaxed);
        }
        match op {
            Op::Publish { relay: Some((from, to)), .. } if !ok || matches!(result, Some(redis::Value::Int(0))) => {
                host.undeliverable(&from, &to)
            }
            release @ Op::Release { .. } if !ok => c.unconfirmed(release),
            _ => {}
        }
    }
}
