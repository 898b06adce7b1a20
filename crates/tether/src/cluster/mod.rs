//! Cluster mode on Redis: one holder per client id across nodes, presence and relay across nodes, and a lost
//! node's clients declared offline within its lease.
//!
//! # Layout
//! - [`ClusterConfig`]: the Redis URL, this node's id, its lease.
//! - [`store`]: the keys and Lua scripts in Redis; every ownership change is one script that also publishes it.
//! - [`wire`]: the messages nodes publish to each other.
//! - [`Cluster`]: the live state the server shares with the tasks below; [`Cluster::start`] spawns them:
//!   - the **lease** task renews this node's lease every third of it, measures Redis's round trip, and, when
//!     Redis comes back or the node was out of touch past its lease (hung, cut off: a zombie), rejoins as a new
//!     incarnation and re-registers every local session ([`Host::local_sessions`]); the ones taken over
//!     elsewhere meanwhile are closed with `takeover` ([`Host::superseded`]);
//!   - the **reaper** looks for members whose lease ran out every [`REAP_EVERY`]; one node (a lock in Redis)
//!     declares their sessions offline (`node_lost`), batch by batch;
//!   - the **listener** holds the pub/sub connection (the presence channel and this node's inbox) and hands
//!     each message to [`Host::on_message`]; after a reconnect it reloads who holds what;
//!   - the **outbox** publishes and releases in the order the server queued them, so `DATA` from one sender to
//!     one receiver arrives in order.
//!
//! The server talks to Redis only through this module: [`Cluster::claim`] when a `HELLO` is admitted, the
//! outbox for everything else. Nothing is written to Redis per heartbeat: liveness stays on each node, and the
//! node's lease covers its sessions. While Redis cannot be reached the node is *degraded*: it keeps serving its
//! own clients (admitting them with local epochs), and registers them when Redis answers again.

pub mod store;
pub mod wire;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};

use crate::metrics::{Histogram, HistogramSnapshot, LATENCY_BUCKETS};
use store::{Claimed, Registered, Store};
use wire::{AskAnswer, Msg, Stamped};

/// How often every node looks for lost members.
pub const REAP_EVERY: Duration = Duration::from_millis(250);
/// Ids forgotten per reaping script (Redis runs each alone: small batches keep it responsive).
const REAP_BATCH: usize = 500;
/// Operations waiting for the outbox; beyond it the node falls back to re-registering (see [`Cluster::queue`]).
const OUTBOX: usize = 65_536;

/// How to join a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// `redis://HOST:PORT/DB` (or `rediss://` with TLS, or `redis+unix:///path`).
    pub url: String,
    /// This node's id: in `WELCOME.server_id`, in events, in the admin API. Unique in the cluster.
    pub node_id: String,
    /// A node that has not renewed its lease for this long is lost; it renews every third of it.
    pub lease: Duration,
    /// How long a `HELLO` for an id held on another node waits for that node's answer before claiming anyway
    /// (the holder may be hung or cut off).
    pub ask_wait: Duration,
    /// How long one Redis request may take before the node counts Redis as unreachable (and a `HELLO` is
    /// admitted locally, to be registered later).
    pub redis_timeout: Duration,
}

impl ClusterConfig {
    /// Defaults: a random node id, a 3 s lease, 250 ms for a holder's answer, 500 ms for Redis.
    pub fn new(url: impl Into<String>) -> ClusterConfig {
        ClusterConfig {
            url: url.into(),
            node_id: format!("node-{:06x}", rand::random::<u32>() & 0xff_ffff),
            lease: Duration::from_secs(3),
            ask_wait: Duration::from_millis(250),
            redis_timeout: Duration::from_millis(500),
        }
    }
}

/// What the server does for the cluster tasks.
pub(crate) trait Host: Send + Sync + 'static {
    /// A message from another node (presence, or for this node's inbox).
    fn on_message(&self, m: Stamped);
    /// Every local session: id and epoch.
    fn local_sessions(&self) -> Vec<(String, u64)>;
    /// A newer session on `node` holds `client`: close the local one of `epoch` with `takeover`.
    fn superseded(&self, client: &str, epoch: u64, node: &str, holder_epoch: u64);
    /// Who holds what, reloaded after the listener reconnected.
    fn reload(&self, holders: Vec<(String, String, u64)>);
    /// Redis became unreachable (`true`) or answers again (`false`).
    fn degraded(&self, degraded: bool, why: &str);
    /// This node reaped `count` sessions of the lost `node`.
    fn reaped(&self, node: &str, count: u64);
    /// A `DATA` from local `from` to `to` reached no node (the holder's node is gone, or Redis failed).
    fn undeliverable(&self, from: &str, to: &str);
    /// The local session of `client` with `epoch` has ended (or never was): how it ended, for its release
    /// (reason code, by the client, silent for), as well as the node remembers. `None` while it is live.
    fn ended(&self, client: &str, epoch: u64) -> Option<(u8, bool, Duration)>;
    /// Redis holds `client` for this node with the larger epoch `to` (a claim whose answer was lost): the local
    /// session of epoch `from` takes it.
    fn adopt_epoch(&self, client: &str, from: u64, to: u64);
}

/// One operation for the outbox, carried out in queue order.
#[derive(Debug)]
pub(crate) enum Op {
    /// `relay`: a relayed `DATA` (sender, target): when no node receives it, the sender is told `UNDELIVERABLE`.
    Publish { channel: String, msg: Vec<u8>, relay: Option<(String, String)> },
    /// A local session ended (after the presence grace): forget it in Redis and publish `offline`.
    Release { client: String, epoch: u64, reason: u8, by_client: bool, last_seen: Duration },
}

/// Counters and histograms for the admin API and `/metrics`.
#[derive(Debug)]
pub struct ClusterStats {
    pub redis_rtt: Histogram,
    pub pubsub_lag: Histogram,
    pub published: AtomicU64,
    pub received: AtomicU64,
    pub claims: AtomicU64,
    pub asks: AtomicU64,
    pub ask_timeouts: AtomicU64,
    pub reaped: AtomicU64,
    pub rejoins: AtomicU64,
    pub redis_errors: AtomicU64,
    /// Operations (publishes, releases) that could not be carried out: the outbox was full, or Redis failed.
    pub unpublished: AtomicU64,
}

impl Default for ClusterStats {
    fn default() -> Self {
        ClusterStats {
            redis_rtt: Histogram::new(LATENCY_BUCKETS),
            pubsub_lag: Histogram::new(LATENCY_BUCKETS),
            published: AtomicU64::new(0),
            received: AtomicU64::new(0),
            claims: AtomicU64::new(0),
            asks: AtomicU64::new(0),
            ask_timeouts: AtomicU64::new(0),
            reaped: AtomicU64::new(0),
            rejoins: AtomicU64::new(0),
            redis_errors: AtomicU64::new(0),
            unpublished: AtomicU64::new(0),
        }
    }
}

/// A snapshot of the cluster's state for operators.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterSnapshot {
    pub node_id: String,
    pub incarnation: String,
    pub degraded: bool,
    /// Members in the node table at the last lease renewal (this one included).
    pub nodes: u64,
    /// Ids this node knows online on other nodes.
    pub remote_sessions: usize,
    pub redis_rtt: HistogramSnapshot,
    pub pubsub_lag: HistogramSnapshot,
    pub published: u64,
    pub received: u64,
    pub claims: u64,
    pub asks: u64,
    pub ask_timeouts: u64,
    pub reaped: u64,
    pub rejoins: u64,
    pub redis_errors: u64,
    pub unpublished: u64,
}

/// The cluster's live state, shared by the server and the cluster's tasks.
pub struct Cluster {
    pub cfg: ClusterConfig,
    client: redis::Client,
    store: Mutex<Option<Store>>,
    /// This incarnation of the node (a new one after it was lost and came back).
    inc: Mutex<String>,
    degraded: AtomicBool,
    /// Members in the node table at the last renewal (lost ones not reaped yet included).
    nodes: AtomicU64,
    /// The largest epoch this node has seen: the floor of the epoch counter if Redis restarts empty.
    max_epoch: AtomicU64,
    asks: Mutex<HashMap<u64, oneshot::Sender<AskAnswer>>>,
    next_req: AtomicU64,
    /// Nodes whose lease ran out (as of the reaper's last scan): not asked, they cannot answer.
    lost: Mutex<std::collections::HashSet<String>>,
    out: mpsc::Sender<Op>,
    out_rx: Mutex<Option<mpsc::Receiver<Op>>>,
    /// Set when an operation could not be queued or carried out: the lease task re-registers everything.
    resync: AtomicBool,
    pub stats: ClusterStats,
    /// Where the lease task says this node listens (for `tether cluster status`).
    pub addrs: Mutex<(String, String)>,
    started_ms: u64,
    /// Joined (lease) and listening (pub/sub): the node sees the cluster. Waited for before serving.
    joined: AtomicBool,
    listening: AtomicBool,
    ready: tokio::sync::Notify,
    /// When this node last heard its own beat through pub/sub (Unix ms), and the listener's restart switch: a
    /// pub/sub connection that stopped delivering (half-open after a failover, say) is replaced.
    heard_ms: AtomicU64,
    restart_listener: tokio::sync::Notify,
    /// The outbox is sending a batch (for a graceful leave, which waits for it).
    outbox_busy: AtomicBool,
}

pub(crate) fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn new_inc() -> String {
    format!("{:08x}", rand::random::<u32>())
}

impl Cluster {
    /// The state for `cfg`; no connection yet ([`Cluster::start`] makes them). Fails only on a URL that is not
    /// one.
    pub fn new(cfg: ClusterConfig) -> redis::RedisResult<Cluster> {
        let client = redis::Client::open(cfg.url.as_str())?;
        let (out, out_rx) = mpsc::channel(OUTBOX);
        Ok(Cluster {
            cfg,
            client,
            store: Mutex::new(None),
            inc: Mutex::new(new_inc()),
            degraded: AtomicBool::new(false),
            nodes: AtomicU64::new(0),
            max_epoch: AtomicU64::new(0),
            asks: Mutex::new(HashMap::new()),
            next_req: AtomicU64::new(1),
            lost: Mutex::new(std::collections::HashSet::new()),
            out,
            out_rx: Mutex::new(Some(out_rx)),
            resync: AtomicBool::new(false),
            stats: ClusterStats::default(),
            addrs: Mutex::new((String::new(), String::new())),
            started_ms: unix_ms(),
            joined: AtomicBool::new(false),
            listening: AtomicBool::new(false),
            ready: tokio::sync::Notify::new(),
            heard_ms: AtomicU64::new(unix_ms()),
            restart_listener: tokio::sync::Notify::new(),
            outbox_busy: AtomicBool::new(false),
        })
    }

    pub fn node_id(&self) -> &str {
        &self.cfg.node_id
    }

    pub fn incarnation(&self) -> String {
        self.inc.lock().expect("inc lock").clone()
    }

    pub fn is_degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
    }

    pub fn snapshot(&self) -> ClusterSnapshot {
        let s = &self.stats;
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ClusterSnapshot {
            node_id: self.cfg.node_id.clone(),
            incarnation: self.incarnation(),
            degraded: self.is_degraded(),
            nodes: self.nodes.load(Ordering::Relaxed),
            remote_sessions: 0,
            redis_rtt: s.redis_rtt.snapshot(),
            pubsub_lag: s.pubsub_lag.snapshot(),
            published: n(&s.published),
            received: n(&s.received),
            claims: n(&s.claims),
            asks: n(&s.asks),
            ask_timeouts: n(&s.ask_timeouts),
            reaped: n(&s.reaped),
            rejoins: n(&s.rejoins),
            redis_errors: n(&s.redis_errors),
            unpublished: n(&s.unpublished),
        }
    }

    /// Wait until the node has joined and listens to the cluster, at most `patience`. False when it did not (Redis
    /// unreachable: the node serves degraded meanwhile).
    pub async fn wait_ready(&self, patience: Duration) -> bool {
        let ready = || self.joined.load(Ordering::Acquire) && self.listening.load(Ordering::Acquire);
        let waiting = async {
            loop {
                let notified = self.ready.notified();
                if ready() {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(patience, waiting).await.is_ok()
    }

    fn set_ready(&self, flag: &AtomicBool) {
        flag.store(true, Ordering::Release);
        self.ready.notify_waiters();
    }

    /// Note an epoch seen anywhere in the cluster.
    pub fn saw_epoch(&self, epoch: u64) {
        self.max_epoch.fetch_max(epoch, Ordering::Relaxed);
    }

    /// An epoch for a session admitted while Redis cannot be reached: above every epoch this node has seen.
    pub fn local_epoch(&self) -> u64 {
        self.max_epoch.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn store(&self) -> Option<Store> {
        self.store.lock().expect("store lock").clone()
    }

    fn failed(&self, host: &dyn Host, e: &redis::RedisError) {
        self.stats.redis_errors.fetch_add(1, Ordering::Relaxed);
        if !self.degraded.swap(true, Ordering::AcqRel) {
            host.degraded(true, &e.to_string());
        }
        self.resync.store(true, Ordering::Relaxed);
        *self.store.lock().expect("store lock") = None;
    }

    /// Claim `client` for a new session here: its cluster epoch and the previous holder. `None` when Redis did not
    /// answer in time (degraded: the caller admits locally and the lease task registers it later).
    pub(crate) async fn claim(&self, client: &str) -> Option<Claimed> {
        let store = self.store()?;
        let inc = self.incarnation();
        let floor = self.max_epoch.load(Ordering::Relaxed);
        match store.claim(client, &self.cfg.node_id, &inc, floor).await {
            Ok(c) => {
                self.stats.claims.fetch_add(1, Ordering::Relaxed);
                self.saw_epoch(c.epoch);
                Some(c)
            }
            _ => {
                self.resync.store(true, Ordering::Relaxed);
                None
            }
        }
    }

    /// The node table from Redis (live nodes and lost ones not reaped yet).
    pub async fn nodes(&self) -> Result<Vec<store::NodeStatus>, String> {
        let store = self.store().ok_or("Redis is unreachable")?;
        match tokio::time::timeout(self.cfg.redis_timeout * 4, store.nodes()).await {
            Ok(Ok(n)) => Ok(n),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("Redis did not answer in time".into()),
        }
    }

    /// Who holds `client` according to Redis (the truth; this node's view may lag by a message). `Err` when
    /// Redis did not answer in time.
    pub(crate) async fn holder(&self, client: &str) -> Result<Option<(String, u64)>, ()> {
        let store = self.store().ok_or(())?;
        store.holder(client).await.map_err(|_| ())
    }

    /// Ask `node` whether a `HELLO` with `nonce` may have `client`. `None` when it did not answer within
    /// `ask_wait` (hung, cut off, gone) or Redis is unreachable: the caller claims anyway.
    pub(crate) async fn ask(&self, node: &str, client: &str, nonce: u64) -> Option<AskAnswer> {
        if self.lost.lock().expect("lost lock").contains(node) {
            return None;
        }
        let req = self.next_req.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.asks.lock().expect("asks lock").insert(req, tx);
        self.stats.asks.fetch_add(1, Ordering::Relaxed);
        let msg = Msg::Ask { req, client: client.into(), nonce, from: self.cfg.node_id.clone() };
        let sent = self.send_to(node, &msg);
        let answer = match sent {
            true => tokio::time::timeout(self.cfg.ask_wait, rx).await.ok().and_then(Result::ok),
            false => None,
        };
        if answer.is_none() {
            self.asks.lock().expect("asks lock").remove(&req);
            self.stats.ask_timeouts.fetch_add(1, Ordering::Relaxed);
        }
        answer
    }

    /// An answer to one of our asks arrived.
    pub(crate) fn answered(&self, req: u64, answer: AskAnswer) {
        if let Some(tx) = self.asks.lock().expect("asks lock").remove(&req) {
            let _ = tx.send(answer);
        }
    }

    /// Queue an operation for the outbox. It never waits: when the queue is full the operation is not lost
    /// silently, the node re-registers everything once Redis keeps up again (which releases what ended). False
    /// when it could not be queued.
    pub(crate) fn queue(&self, op: Op) -> bool {
        match self.out.try_send(op) {
            Ok(()) => true,
            Err(_) => {
                self.stats.unpublished.fetch_add(1, Ordering::Relaxed);
                self.resync.store(true, Ordering::Relaxed);
                false
            }
        }
    }

    /// Publish `msg` to `node`'s inbox.
    pub(crate) fn send_to(&self, node: &str, msg: &Msg) -> bool {
        self.queue(Op::Publish { channel: store::inbox(node), msg: msg.encode(unix_ms()), relay: None })
    }

    /// Relay `DATA` from local `from` to `to` on `node`; if no node receives it, `from` is told.
    pub(crate) fn relay(&self, node: &str, from: &str, to: &str, msg: &Msg) -> bool {
        let relay = Some((from.to_owned(), to.to_owned()));
        self.queue(Op::Publish { channel: store::inbox(node), msg: msg.encode(unix_ms()), relay })
    }

    /// Publish `msg` on the presence channel.
    pub(crate) fn publish_presence(&self, msg: &Msg) -> bool {
        self.queue(Op::Publish { channel: store::PRESENCE.into(), msg: msg.encode(unix_ms()), relay: None })
    }

    /// Leave the cluster on a graceful shutdown: let the outbox send what is queued (the goodbyes' releases), at
    /// most `patience`, then take this node out of the table. Whatever is still registered is declared lost at
    /// once instead of after the lease.
    pub async fn leave(&self, patience: Duration) {
        let deadline = tokio::time::Instant::now() + patience;
        let pending = || self.out.capacity() < self.out.max_capacity() || self.outbox_busy.load(Ordering::Acquire);
        while pending() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let Some(store) = self.store() else { return };
        match store.leave(&self.cfg.node_id, &self.incarnation()).await {
            Ok(n) => tracing::info!("cluster: left ({n} sessions still registered were declared lost)"),
            _ => tracing::warn!("cluster: could not leave cleanly; the lease will run out"),
        }
    }

    /// Spawn the lease, reaper, listener and outbox tasks. They run until the returned handles are aborted.
    pub(crate) fn start(self: &Arc<Self>, host: Arc<dyn Host>) -> Vec<tokio::task::JoinHandle<()>> {
        let rx = self.out_rx.lock().expect("outbox lock").take().expect("started once");
        vec![
            tokio::spawn(lease_task(self.clone(), host.clone())),
            tokio::spawn(reaper_task(self.clone(), host.clone())),
            tokio::spawn(listener_task(self.clone(), host.clone())),
            tokio::spawn(outbox_task(self.clone(), host, rx)),
        ]
    }

    /// The command connection. Every request on it (a script, a pipeline) fails after `redis_timeout`: that one
    /// setting bounds every single call to Redis; only calls made of several requests bound their total apart.
    async fn connect(&self) -> redis::RedisResult<Store> {
        let cfg = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.cfg.redis_timeout.max(Duration::from_millis(100))))
            .set_response_timeout(Some(self.cfg.redis_timeout));
        let con = self.client.get_multiplexed_async_connection_with_config(&cfg).await?;
        let store = Store::new(con);
        store.load_scripts().await?;
        Ok(store)
    }
}

/// The cluster as Redis holds it, for `tether cluster status`.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusReport {
    pub nodes: Vec<store::NodeStatus>,
    /// The epoch counter: epochs handed out so far.
    pub epoch: u64,
    /// Redis's `used_memory`.
    pub redis_used_memory: u64,
    /// Five `PING` round trips, sorted.
    pub redis_rtts: Vec<Duration>,
}

/// Read the cluster's state from the Redis at `url`.
pub async fn status(url: &str) -> redis::RedisResult<StatusReport> {
    let client = redis::Client::open(url)?;
    let cfg = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(5)));
    let mut con = client.get_multiplexed_async_connection_with_config(&cfg).await?;
    let mut redis_rtts = Vec::new();
    for _ in 0..5 {
        let t0 = tokio::time::Instant::now();
        redis::cmd("PING").query_async::<String>(&mut con).await?;
        redis_rtts.push(t0.elapsed());
    }
    redis_rtts.sort();
    let nodes = Store::new(con.clone()).nodes().await?;
    let info: String = redis::cmd("INFO").arg("memory").query_async(&mut con).await?;
    let redis_used_memory =
        info.lines().find_map(|l| l.strip_prefix("used_memory:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0);
    let epoch: Option<u64> = redis::cmd("GET").arg("tether:epoch").query_async(&mut con).await?;
    Ok(StatusReport { nodes, epoch: epoch.unwrap_or(0), redis_used_memory, redis_rtts })
}

/// Renew the lease every third of it; (re)connect, rejoin and re-register as needed.
async fn lease_task(c: Arc<Cluster>, host: Arc<dyn Host>) {
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
async fn reaper_task(c: Arc<Cluster>, host: Arc<dyn Host>) {
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
async fn listener_task(c: Arc<Cluster>, host: Arc<dyn Host>) {
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
async fn outbox_task(c: Arc<Cluster>, host: Arc<dyn Host>, mut rx: mpsc::Receiver<Op>) {
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
