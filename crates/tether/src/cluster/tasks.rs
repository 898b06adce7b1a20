//! The cluster's four background tasks, spawned by [`Cluster::start`] and run until the server stops.
//!
//! # Layout
//! - [`lease`]: renews this node's lease every third of it, measures Redis's round trip, rejoins as a new
//!   incarnation when the node was declared lost or out of touch past its lease, and re-registers every local
//!   session when asked to (`resync`): after a rejoin, a reconnect, or an operation that could not be carried out.
//! - [`reaper`]: looks for members whose lease ran out; the node that takes a member's lock declares its sessions
//!   offline (`node_lost`), batch by batch.
//! - [`listener`]: holds the pub/sub connection and hands each message to [`Host::on_message`]; after each
//!   (re)connect it reloads who holds what.
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

use super::store::{self, Registered, Store};
use super::wire::Msg;
use super::{new_inc, unix_ms, Cluster, Host, Op, REAP_BATCH, REAP_EVERY};

impl Cluster {
    /// Spawn the lease, reaper, listener and outbox tasks. They run until the returned handles are aborted.
    pub(crate) fn start(self: &Arc<Self>, host: Arc<dyn Host>) -> Vec<tokio::task::JoinHandle<()>> {
        let rx = self.out_rx.lock().expect("outbox lock").take().expect("started once");
        vec![
            tokio::spawn(lease(self.clone(), host.clone())),
            tokio::spawn(reaper(self.clone(), host.clone())),
            tokio::spawn(listener(self.clone(), host.clone())),
            tokio::spawn(outbox(self.clone(), host, rx)),
        ]
    }
}

/// Renew the lease every third of it; (re)connect, rejoin and re-register as needed.
async fn lease(c: Arc<Cluster>, host: Arc<dyn Host>) {
    let mut tick = tokio::time::interval(c.cfg.lease / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut joined = false;
    // The last renewal Redis confirmed, on our clock: out of touch for longer than the lease means we may have
    // been declared lost (and our sessions offline) meanwhile.
    let mut last_ok: Option<tokio::time::Instant> = None;
    loop {
        tick.tick().await;
        if let Err(e) = lease_once(&c, &*host, &mut joined, &mut last_ok).await {
            c.failed(&*host, &e);
        }
    }
}

async fn lease_once(
    c: &Cluster,
    host: &dyn Host,
    joined: &mut bool,
    last_ok: &mut Option<tokio::time::Instant>,
) -> redis::RedisResult<()> {
    let store = match c.store() {
        Some(s) => s,
        None => {
            let s = c.connect().await?;
            *c.store.lock().expect("store lock") = Some(s.clone());
            s
        }
    };
    let renew = |join: bool| {
        let (addr, admin) = c.addrs.lock().expect("addrs lock").clone();
        let floor = c.max_epoch.load(Ordering::Relaxed);
        let (store, node, inc) = (store.clone(), c.cfg.node_id.clone(), c.incarnation());
        let (lease, started) = (c.cfg.lease, c.started_ms);
        async move { store.lease(&node, &inc, lease, join, started, &addr, &admin, floor).await }
    };
    let t0 = tokio::time::Instant::now();
    let (_, known, members) = renew(!*joined).await?;
    c.nodes.store(members, Ordering::Relaxed);
    c.stats.redis_rtt.observe(t0.elapsed());
    let stale = last_ok.is_none_or(|t| t.elapsed() > c.cfg.lease);
    if *joined && (!known || stale) {
        // Declared lost (reaped, or Redis restarted empty), or out of touch long enough to have been: join again as
        // a new incarnation, so that a reaper still working on the old one cannot touch what is registered now.
        *c.inc.lock().expect("inc lock") = new_inc();
        c.stats.rejoins.fetch_add(1, Ordering::Relaxed);
        *joined = false;
        renew(true).await?;
    }
    if !*joined {
        *joined = true;
        c.resync.store(true, Ordering::Relaxed);
    }
    if c.resync.swap(false, Ordering::AcqRel) && !register_all(c, host, &store).await {
        c.resync.store(true, Ordering::Relaxed);
        return Ok(());
    }
    *last_ok = Some(tokio::time::Instant::now());
    c.set_ready(&c.joined);
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

/// Register every local session under the current incarnation; close those a newer session elsewhere holds (or
/// held and ended: a tombstone). Then release what Redis still holds for this node and is not live here any more:
/// releases lost while Redis was away, and sessions that ended while this ran. False when Redis failed on the way
/// (the next tick tries again).
async fn register_all(c: &Cluster, host: &dyn Host, store: &Store) -> bool {
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
    // What Redis holds for this node that is not live here: release it (compare-and-delete on its epoch, so a
    // session claimed meanwhile is never touched).
    let own = match tokio::time::timeout(c.cfg.redis_timeout * 10, store.own_ids(&me, &inc)).await {
        Ok(Ok(own)) => own,
        _ => return false,
    };
    for (client, node, epoch) in own {
        let (Some(node), Some(epoch)) = (node, epoch) else { continue };
        if node != me {
            continue;
        }
        if let Some((reason, by_client, last_seen)) = host.ended(&client, epoch) {
            c.queue(Op::Release { client, epoch, reason, by_client, last_seen });
        }
    }
    true
}

/// Look for lost members; reap the ones this node gets the lock for.
async fn reaper(c: Arc<Cluster>, host: Arc<dyn Host>) {
    let mut tick = tokio::time::interval(REAP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(store) = c.store() else { continue };
        let Ok(expired) = store.expired().await else { continue };
        let mine = store::member(&c.cfg.node_id, &c.incarnation());
        *c.lost.lock().expect("lost lock") =
            expired.iter().filter(|m| **m != mine).map(|m| store::node_of(m).to_owned()).collect();
        for member in expired.into_iter().filter(|m| *m != mine) {
            let hold = c.cfg.lease.max(Duration::from_secs(1));
            if !matches!(store.lock_reap(&member, &c.cfg.node_id, hold).await, Ok(true)) {
                continue;
            }
            let node = store::node_of(&member).to_owned();
            let mut total = 0;
            // Bounded: each batch empties up to REAP_BATCH of a finite set, or stops.
            for _ in 0..10_000 {
                match store.reap(&member, REAP_BATCH).await {
                    Ok((n, 0)) => total += n,
                    Ok((n, _)) => {
                        total += n;
                        break;
                    }
                    _ => break,
                }
            }
            c.stats.reaped.fetch_add(total, Ordering::Relaxed);
            host.reaped(&node, total);
        }
    }
}

/// Hold the pub/sub connection; hand every message over; reload who holds what after each (re)connect.
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
        // Subscribed first, then the snapshot: whatever changes meanwhile arrives as a message, and the epochs
        // order the two.
        if let Some(store) = c.store() {
            if let Ok(Ok(h)) = tokio::time::timeout(c.cfg.redis_timeout * 10, store.holders()).await {
                host.reload(h);
            }
        }
        c.set_ready(&c.listening);
        c.heard_ms.store(unix_ms(), Ordering::Relaxed);
        let mut stream = ps.into_on_message();
        loop {
            let m = tokio::select! {
                m = stream.next() => m,
                () = c.restart_listener.notified() => None,
            };
            let Some(m) = m else { break };
            c.stats.received.fetch_add(1, Ordering::Relaxed);
            let Some(stamped) = Msg::decode(m.get_payload_bytes()) else { continue };
            let lag = unix_ms().saturating_sub(stamped.sent_ms);
            c.stats.pubsub_lag.observe(Duration::from_millis(lag));
            match stamped.msg {
                Msg::Answer { req, answer } => c.answered(req, answer),
                Msg::Beat => c.heard_ms.store(unix_ms(), Ordering::Relaxed),
                _ => host.on_message(stamped),
            }
        }
        // The connection dropped: Redis restarted or is unreachable.
        c.resync.store(true, Ordering::Relaxed);
    }
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
        let Some(store) = c.store() else {
            // Degraded: what ended meanwhile is released by the re-registration once Redis is back; a relayed
            // DATA is told to its sender.
            c.resync.store(true, Ordering::Relaxed);
            c.stats.unpublished.fetch_add(batch.len() as u64, Ordering::Relaxed);
            for op in batch.drain(..) {
                if let Op::Publish { relay: Some((from, to)), .. } = op {
                    host.undeliverable(&from, &to);
                }
            }
            continue;
        };
        flush(&c, &*host, &store, &mut batch).await;
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
            Op::Release { client, epoch, reason, by_client, last_seen } => {
                pipe.add_command(store.release_cmd(client, &c.cfg.node_id, *epoch, *reason, *by_client, *last_seen));
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
        if let Op::Publish { relay: Some((from, to)), .. } = op {
            if !ok || matches!(result, Some(redis::Value::Int(0))) {
                host.undeliverable(&from, &to);
            }
        }
    }
}
