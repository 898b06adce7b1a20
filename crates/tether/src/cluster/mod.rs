//! Cluster mode on Redis: one holder per client id across nodes, presence and relay across nodes, and a lost
//! node's clients declared offline within its lease.
//!
//! # Layout
//! - [`ClusterConfig`]: the Redis URL, this node's id, its lease.
//! - [`store`]: the keys and Lua scripts in Redis; every ownership change is one script that also publishes it.
//! - `wire`: the messages nodes publish to each other (crate-private).
//! - [`Cluster`]: the live state the server shares with the cluster's tasks, and the only way the server reaches
//!   Redis and other nodes: `claim` when a `HELLO` is admitted, and methods that queue each message or release
//!   for the outbox (`relay`, `deliver`, `kick`, `publish_suspect`, `release`, ...). No message is built outside
//!   this module.
//! - `tasks`: the background tasks `Cluster::start` spawns:
//!   - the **lease** task renews this node's lease every third of it, measures Redis's round trip, and, when
//!     Redis comes back or the node was out of touch past its lease (hung, cut off: a zombie), rejoins as a new
//!     incarnation and re-registers every local session (`Host::local_sessions`); the ones taken over
//!     elsewhere meanwhile are closed with `takeover` (`Host::superseded`);
//!   - the **reaper** looks for members whose lease ran out every [`REAP_EVERY`]; one node (a lock in Redis)
//!     declares their sessions offline (`node_lost`), batch by batch;
//!   - the **listener** holds the pub/sub connection (the presence channel and this node's inbox) and hands
//!     each message to `Host::on_message`, through a bounded queue (what does not fit is shed, counted, and
//!     repaired);
//!   - the **repairer** reconciles this node's view of the other nodes' ids with Redis, adding and removing: in
//!     full at join and after every pub/sub reconnect or shed message, and for the nodes whose digest differs at
//!     two checkpoints in a row (the lease task publishes one to this node's inbox each tick, in order with every
//!     ownership change), or that have had no live member for two leases;
//!   - the **outbox** publishes and releases in the order the server queued them, so `DATA` from one sender to
//!     one receiver arrives in order.
//! - `Host`: what the cluster's tasks ask of the server (implemented by the server's shared state).
//!
//! # Rules
//! Below the server: this module knows nothing of connections, the hub or the server's state, only the `Host`
//! trait. Its counters are read through [`Cluster::snapshot`] into a [`ClusterSnapshot`] (defined with the other
//! metrics).
//!
//! Nothing is written to Redis per heartbeat: liveness stays on each node, and the
//! node's lease covers its sessions. While Redis cannot be reached the node is *degraded*: it keeps serving its
//! own clients (admitting them with local epochs), and registers them when Redis answers again.

pub mod reliable;
pub mod store;
mod tasks;
pub(crate) mod wire;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot};

pub use crate::metrics::ClusterSnapshot;
use crate::metrics::{Histogram, LATENCY_BUCKETS};
use store::{Claimed, Store};
use tether_proto::registry::{NodeDigest, RemoteOffline};
use wire::{AskAnswer, Msg, Stamped};

/// How often every node looks for lost members.
pub const REAP_EVERY: Duration = Duration::from_millis(250);
/// Ids forgotten per reaping script (Redis runs each alone: small batches keep it responsive).
const REAP_BATCH: usize = 500;
/// Operations waiting for the outbox; beyond it the node falls back to re-registering (see [`Cluster::queue`]).
const OUTBOX: usize = 65_536;
/// Pub/sub messages received and not handled yet, and their bytes; beyond either they are shed, counted, and the
/// view repaired.
const PUBSUB_QUEUE: usize = 65_536;
const PUBSUB_BYTES: usize = 64 << 20;
/// Releases remembered for a retry when Redis did not confirm them; beyond it, other nodes' repairs correct the
/// rest (without the reason).
const UNCONFIRMED: usize = 65_536;

/// The lease clock's stall threshold for a node with `lease`: a stretch longer than this in which Redis ran no
/// lease script does not count against leases. Above the 250 ms between reaper scans, below the two thirds of a
/// lease a renewal leaves.
pub(crate) fn stall_gap(lease: Duration) -> Duration {
    (lease / 3).clamp(Duration::from_millis(300), Duration::from_secs(1))
}

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

    /// Whether the URL is a Redis URL, with the reason when it is not (the URL itself is not repeated: it may hold
    /// a password).
    pub fn check_url(&self) -> Result<(), String> {
        redis::Client::open(self.url.as_str())
            .map(drop)
            .map_err(|e| format!("not a Redis URL ({e}); expected redis://[:PASSWORD@]HOST:PORT/DB"))
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
    /// Each other node the view holds ids of, with their count and digest.
    fn view_digests(&self) -> Vec<(String, NodeDigest)>;
    /// The ids the view holds on each of `nodes`, with their epochs (one pass over the view).
    fn view_of(&self, nodes: &std::collections::BTreeSet<String>) -> HashMap<String, Vec<(String, u64)>>;
    /// A repair begins: remember every id a message changes from now on, so that the repair (read before those
    /// messages were applied) does not undo them.
    fn repair_begin(&self);
    /// Apply a repair, skipping ids changed since [`Host::repair_begin`]: `online` (client, node, epoch) first,
    /// then `offline`. Returns how many ids it changed.
    fn repair_apply(&self, online: Vec<(String, String, u64)>, offline: Vec<(String, RemoteOffline)>) -> usize;
}

/// A release Redis did not confirm: retried, by force, once Redis answers again.
#[derive(Debug, Clone)]
struct Unconfirmed {
    epoch: u64,
    reason: u8,
    by_client: bool,
    last_seen: Duration,
}

/// What the repairer has to do.
#[derive(Debug, Default)]
struct RepairState {
    /// Reconcile every node (join, pub/sub reconnect, shed messages).
    full: bool,
    /// Reconcile these nodes.
    nodes: std::collections::HashSet<String>,
    /// Nodes whose digest differed at the last checkpoint.
    differed: std::collections::HashSet<String>,
    /// Nodes the view holds ids of with no live member in Redis, since when.
    absent_since: HashMap<String, tokio::time::Instant>,
    /// When each other node last renewed its lease, as the last checkpoint or repair listing it said: a node
    /// declared lost was last known alive then, and so were its clients (their `node_lost` last-seen time).
    alive: HashMap<String, tokio::time::Instant>,
    /// When the last checkpoint arrived.
    last_checkpoint: Option<tokio::time::Instant>,
    /// Per node, repairs in a row that changed nothing.
    unchanged: HashMap<String, u32>,
}

/// One operation for the outbox, carried out in queue order.
#[derive(Debug)]
enum Op {
    /// `relay`: a relayed `DATA` (sender, target): when no node receives it, the sender is told `UNDELIVERABLE`.
    Publish { channel: String, msg: Vec<u8>, relay: Option<(String, String)> },
    /// A local session ended (after the presence grace): forget it in Redis and publish `offline`. `force`: a
    /// retry of one Redis did not confirm, announced even if Redis lost the id meanwhile.
    Release { client: String, epoch: u64, reason: u8, by_client: bool, last_seen: Duration, force: bool },
    /// A previous incarnation of this node leaves the table, after the releases queued before it.
    Leave { inc: String },
}

/// Counters and histograms for the admin API and `/metrics`.
#[derive(Debug)]
pub(crate) struct ClusterStats {
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
    /// Pub/sub messages shed because the node fell behind (the view is then repaired).
    pub shed: AtomicU64,
    /// Repairs of the view run, and the ids they changed (each a message this node missed).
    pub repairs: AtomicU64,
    pub repaired: AtomicU64,
    /// Reliable sessions in Redis, as this node saw them: resumes that kept continuity and those that could
    /// not, items sent again after a resume, sessions this node's expiry scans ended, messages refused (a full
    /// hold).
    pub rel_resumed: AtomicU64,
    pub rel_refused: AtomicU64,
    pub rel_replayed: AtomicU64,
    pub rel_expired: AtomicU64,
    pub rel_overflows: AtomicU64,
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
            shed: AtomicU64::new(0),
            repairs: AtomicU64::new(0),
            repaired: AtomicU64::new(0),
            rel_resumed: AtomicU64::new(0),
            rel_refused: AtomicU64::new(0),
            rel_replayed: AtomicU64::new(0),
            rel_expired: AtomicU64::new(0),
            rel_overflows: AtomicU64::new(0),
        }
    }
}

/// The cluster's live state, shared by the server and the cluster's tasks.
pub struct Cluster {
    cfg: ClusterConfig,
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
    stats: ClusterStats,
    /// Where the lease task says this node listens (for `tether cluster status`).
    addrs: Mutex<(String, String)>,
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
    /// Releases Redis did not confirm, retried by the next re-registration.
    unconfirmed: Mutex<HashMap<String, Unconfirmed>>,
    /// Claims Redis made whose connection has not taken the decision yet (bounded by the handshakes in flight).
    /// Keyed by epoch alone: epochs from Redis are unique.
    in_flight: Mutex<std::collections::HashSet<u64>>,
    repair: Mutex<RepairState>,
    repair_wake: tokio::sync::Notify,
    /// Why this node cannot be part of the cluster at all (a configuration Redis refuses, or its node id held by
    /// another live process at start): the server does not start.
    fatal: Mutex<Option<String>>,
    /// This process holds the node id's live membership (joined, renewing). A process refused the node id, or
    /// rejoining, neither answers the inbox nor claims.
    member: AtomicBool,
    /// Operations queued for the outbox, and carried out (sent or failed) by it, so far.
    outbox_queued: AtomicU64,
    outbox_done: AtomicU64,
    /// The reliable sessions' bounds (the server's hold settings), set once before the node starts.
    rel_bounds: std::sync::OnceLock<reliable::Bounds>,
    /// Moves when this node may have missed pub/sub messages (reconnected, or shed some): each reliable
    /// session's link then fetches without waiting for a wake-up.
    rel_rescan: std::sync::Arc<AtomicU64>,
}

pub(crate) fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn new_inc() -> String {
    format!("{:08x}", rand::random::<u32>())
}

impl Cluster {
    /// The state for `cfg`; no connection yet (`Cluster::start` makes them). Fails only on a URL that is not
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
            unconfirmed: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(std::collections::HashSet::new()),
            repair: Mutex::new(RepairState::default()),
            repair_wake: tokio::sync::Notify::new(),
            fatal: Mutex::new(None),
            member: AtomicBool::new(false),
            outbox_queued: AtomicU64::new(0),
            outbox_done: AtomicU64::new(0),
            rel_bounds: std::sync::OnceLock::new(),
            rel_rescan: Default::default(),
        })
    }

    /// How long ago `node` last renewed its lease, as far as this node knows (from the last checkpoint or repair
    /// that listed it): when its clients were last known alive, for their `node_lost` presence. `None` for a node
    /// never seen live.
    pub(crate) fn last_alive_ago(&self, node: &str) -> Option<Duration> {
        self.repair.lock().expect("repair lock").alive.get(node).map(|t| t.elapsed())
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

    /// The cluster's counters now, with `remote_sessions` (ids this node knows online elsewhere, which the
    /// server's registry counts).
    pub fn snapshot(&self, remote_sessions: usize) -> ClusterSnapshot {
        let s = &self.stats;
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ClusterSnapshot {
            node_id: self.cfg.node_id.clone(),
            incarnation: self.incarnation(),
            degraded: self.is_degraded(),
            nodes: self.nodes.load(Ordering::Relaxed),
            remote_sessions,
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
            shed: n(&s.shed),
            repairs: n(&s.repairs),
            repaired: n(&s.repaired),
        }
    }

    /// Wait until the node has joined and its view of the cluster is complete, at most `patience`. `Ok(false)` when
    /// it did not (Redis unreachable: the node serves degraded meanwhile); `Err` when it cannot join at all (Redis
    /// refuses the configuration, or another live process holds this node id).
    pub async fn wait_ready(&self, patience: Duration) -> Result<bool, String> {
        let ready = || self.joined.load(Ordering::Acquire) && self.listening.load(Ordering::Acquire);
        let waiting = self.until(|fatal| match fatal {
            Some(why) => Some(Err(why)),
            None => ready().then_some(Ok(())),
        });
        match tokio::time::timeout(patience, waiting).await {
            Ok(Ok(())) => Ok(true),
            Ok(Err(why)) => Err(why),
            Err(_) => Ok(false),
        }
    }

    /// Resolves when the node finds it cannot be part of the cluster at all (see [`Cluster::wait_ready`]), with
    /// why: also after start, when Redis could not be reached at first.
    pub async fn wait_fatal(&self) -> String {
        self.until(|fatal| fatal).await
    }

    /// Wait until `done`, given why the node cannot join (if it cannot), says so; checked at every change of the
    /// readiness flags.
    async fn until<T>(&self, done: impl Fn(Option<String>) -> Option<T>) -> T {
        loop {
            let notified = self.ready.notified();
            if let Some(t) = done(self.fatal.lock().expect("fatal lock").clone()) {
                return t;
            }
            notified.await;
        }
    }

    /// This node cannot join (see [`Cluster::wait_ready`]).
    fn set_fatal(&self, why: String) {
        *self.fatal.lock().expect("fatal lock") = Some(why);
        self.ready.notify_waiters();
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
            host.degraded(true, &describe(e));
        }
        self.resync.store(true, Ordering::Relaxed);
        *self.store.lock().expect("store lock") = None;
    }

    /// Whether the claim that got `epoch` succeeded and its connection has not taken the decision yet.
    pub(crate) fn in_flight(&self, epoch: u64) -> bool {
        self.in_flight.lock().expect("in flight lock").contains(&epoch)
    }

    /// The connection took the decision about the claim of `epoch` (admitted it, refused it, or closed).
    pub(crate) fn admitted(&self, epoch: u64) {
        self.in_flight.lock().expect("in flight lock").remove(&epoch);
    }

    /// Claim `client` for a new session here: its cluster epoch and the previous holder. `None` when Redis did not
    /// answer in time (degraded: the caller admits locally and the lease task registers it later).
    pub(crate) async fn claim(&self, client: &str) -> Option<Claimed> {
        if !self.member.load(Ordering::Relaxed) {
            return None;
        }
        let store = self.store()?;
        let inc = self.incarnation();
        let floor = self.max_epoch.load(Ordering::Relaxed);
        match store.claim(client, &self.cfg.node_id, &inc, floor).await {
            Ok(c) => {
                self.stats.claims.fetch_add(1, Ordering::Relaxed);
                self.saw_epoch(c.epoch);
                self.in_flight.lock().expect("in flight lock").insert(c.epoch);
                if self.incarnation() != inc {
                    // The node rejoined while this claim ran: it went to the old incarnation. Register again.
                    self.resync.store(true, Ordering::Relaxed);
                }
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
    fn queue(&self, op: Op) -> bool {
        match self.out.try_send(op) {
            Ok(()) => {
                self.outbox_queued.fetch_add(1, Ordering::Release);
                true
            }
            Err(e) => {
                self.stats.unpublished.fetch_add(1, Ordering::Relaxed);
                self.resync.store(true, Ordering::Relaxed);
                self.unconfirmed(e.into_inner());
                false
            }
        }
    }

    /// `op` was not carried out: a release is remembered for a retry (by force: Redis may have lost the id).
    fn unconfirmed(&self, op: Op) {
        if let Op::Release { client, epoch, reason, by_client, last_seen, .. } = op {
            let mut u = self.unconfirmed.lock().expect("unconfirmed lock");
            if u.len() < UNCONFIRMED || u.contains_key(&client) {
                u.insert(client, Unconfirmed { epoch, reason, by_client, last_seen });
            }
        }
    }

    /// The checkpoint published by the lease task arrived, after every ownership change before it: compare each
    /// live node's digest with this node's view. A node that differs at two checkpoints in a row (one may catch a
    /// change this node made itself and has not heard back yet), or that has had ids in the view and no live
    /// member for two leases, is repaired.
    fn checkpoint(&self, host: &dyn Host, nodes: Vec<wire::CheckpointNode>) {
        let me = self.cfg.node_id.as_str();
        let view: HashMap<String, NodeDigest> = host.view_digests().into_iter().collect();
        // A node may have two live members for a moment (its previous incarnation): synced only if both are, and
        // alive when the fresher renewed its lease.
        let mut live: HashMap<String, (bool, u32, u64)> = HashMap::new();
        for n in nodes.into_iter().filter(|n| n.node != me) {
            let e = live.entry(n.node).or_insert((true, n.digest, n.renewed_ago_ms));
            e.0 &= n.synced;
            e.2 = e.2.min(n.renewed_ago_ms);
        }
        let now = tokio::time::Instant::now();
        let mut st = self.repair.lock().expect("repair lock");
        // Absences are counted over checkpoints in a row: after a gap (Redis away), they count from now.
        if st.last_checkpoint.is_none_or(|t| now.duration_since(t) > self.cfg.lease) {
            st.absent_since.clear();
            st.differed.clear();
        }
        st.last_checkpoint = Some(now);
        let mut differed = std::collections::HashSet::new();
        let mut wake = false;
        for (node, (synced, digest, renewed_ago_ms)) in &live {
            st.absent_since.remove(node);
            let renewed = now.checked_sub(Duration::from_millis(*renewed_ago_ms)).unwrap_or(now);
            st.alive.insert(node.clone(), renewed);
            let mine = view.get(node).map_or(0, |d| d.xor);
            if !synced || mine == *digest {
                continue;
            }
            if st.differed.contains(node) {
                wake |= st.nodes.insert(node.clone());
            } else {
                differed.insert(node.clone());
            }
        }
        st.differed = differed;
        let absent_for = self.cfg.lease * 2;
        for node in view.keys().filter(|n| !live.contains_key(*n) && *n != me) {
            let since = *st.absent_since.entry(node.clone()).or_insert(now);
            if now.duration_since(since) >= absent_for {
                wake |= st.nodes.insert(node.clone());
            }
        }
        st.absent_since.retain(|n, _| view.contains_key(n));
        st.alive.retain(|n, _| view.contains_key(n) || live.contains_key(n));
        st.unchanged.retain(|n, _| live.contains_key(n));
        drop(st);
        if wake {
            self.repair_wake.notify_one();
        }
    }

    /// Wait until the outbox has sent everything queued so far, at most `patience`. Returns how many operations
    /// were still queued then (0: it caught up).
    async fn outbox_idle(&self, patience: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + patience;
        let queued = || self.out.max_capacity() - self.out.capacity();
        let pending = || queued() > 0 || self.outbox_busy.load(Ordering::Acquire);
        while pending() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if pending() {
            queued().max(1)
        } else {
            0
        }
    }

    /// A previous incarnation of this node leaves, in the outbox's order.
    fn queue_leave(&self, inc: String) {
        self.queue(Op::Leave { inc });
    }

    /// Reconcile the whole view with Redis (join, pub/sub reconnect, shed messages).
    fn repair_all(&self) {
        self.repair.lock().expect("repair lock").full = true;
        self.repair_wake.notify_one();
        // A wake-up for a reliable session may have been missed too: every link looks again.
        self.rel_rescan.fetch_add(1, Ordering::Relaxed);
    }

    /// Publish `msg` to `node`'s inbox.
    fn send_to(&self, node: &str, msg: &Msg) -> bool {
        self.queue(Op::Publish { channel: store::inbox(node), msg: msg.encode(unix_ms()), relay: None })
    }

    /// Relay `DATA` from local `from` to `to` on `node`; if no node receives it, `from` is told.
    pub(crate) fn relay(&self, node: &str, from: &str, to: &str, payload: bytes::Bytes) -> bool {
        let msg = Msg::Data { from: from.into(), to: to.into(), origin: self.cfg.node_id.clone(), payload };
        let relay = Some((from.to_owned(), to.to_owned()));
        self.queue(Op::Publish { channel: store::inbox(node), msg: msg.encode(unix_ms()), relay })
    }

    /// Publish `msg` on the presence channel.
    fn publish_presence(&self, msg: &Msg) -> bool {
        self.queue(Op::Publish { channel: store::PRESENCE.into(), msg: msg.encode(unix_ms()), relay: None })
    }

    /// The local session of `client` with `epoch` has been silent for `silent_for`: tell the other nodes.
    pub(crate) fn publish_suspect(&self, client: &str, epoch: u64, silent_for: Duration) -> bool {
        let silent_ms = silent_for.as_millis().min(u32::MAX as u128) as u32;
        self.publish_presence(&Msg::Suspect { client: client.into(), epoch, silent_ms })
    }

    /// The local session of `client` with `epoch` is heard again: tell the other nodes.
    pub(crate) fn publish_recovered(&self, client: &str, epoch: u64) -> bool {
        self.publish_presence(&Msg::Recovered { client: client.into(), epoch })
    }

    /// Forget a session of this node in Redis (if it still holds the id) and tell the other nodes it is offline,
    /// in the outbox's order.
    pub(crate) fn release(
        &self,
        client: &str,
        epoch: u64,
        reason: tether_proto::CloseReason,
        by_client: bool,
        silent: Duration,
    ) {
        let (reason, last_seen) = (reason.code(), silent);
        self.queue(Op::Release { client: client.into(), epoch, reason, by_client, last_seen, force: false });
    }

    /// `DATA` from the server application for `client`, held on `node`. False when it could not be queued.
    pub(crate) fn deliver(&self, node: &str, client: &str, payload: bytes::Bytes) -> bool {
        self.send_to(node, &Msg::Send { client: client.into(), payload })
    }

    /// Kick `client`, held on `node`, asking it to wait `retry_after`. False when it could not be queued.
    pub(crate) fn kick(&self, node: &str, client: &str, retry_after: Duration) -> bool {
        let retry_after_ms = retry_after.as_millis().min(u32::MAX as u128) as u32;
        self.send_to(node, &Msg::Kick { client: client.into(), retry_after_ms })
    }

    /// Answer `node`'s ask `req`.
    pub(crate) fn answer(&self, node: &str, req: u64, answer: AskAnswer) {
        self.send_to(node, &Msg::Answer { req, answer });
    }

    /// Tell `origin` that the `DATA` its client `from` sent to `to` found no one here.
    pub(crate) fn undeliverable(&self, origin: &str, from: String, to: String) {
        self.send_to(origin, &Msg::Undeliverable { from, to });
    }

    /// Where this node listens (the protocol and the admin listener), for the node table.
    pub(crate) fn set_addrs(&self, listen: String, admin: String) {
        *self.addrs.lock().expect("addrs lock") = (listen, admin);
    }

    /// A node that has not renewed its lease for this long is lost.
    pub fn lease(&self) -> Duration {
        self.cfg.lease
    }

    /// Leave the cluster on a graceful shutdown: let the outbox send what is queued (the goodbyes' releases), at
    /// most `patience`, then take this node out of the table. Whatever is still registered is declared lost at
    /// once instead of after the lease.
    pub async fn leave(&self, patience: Duration) {
        let started = tokio::time::Instant::now();
        let unsent = self.outbox_idle(patience).await;
        if unsent > 0 {
            tracing::warn!(
                "cluster: gave up on {unsent} releases and messages still queued for Redis after {patience:?}"
            );
        }
        let lease = self.cfg.lease;
        let Some(store) = self.store() else {
            tracing::warn!(
                "cluster: Redis is unreachable: not left; this node's sessions end when its lease ({lease:?}) runs out"
            );
            return;
        };
        // Every connection has closed: the reliable sessions still attached here (a detach that had not run yet)
        // go offline now, and expire unless resumed elsewhere; nothing would reap them once the node is gone.
        if let Some(b) = self.rel_bounds() {
            let member = store::member(&self.cfg.node_id, &self.incarnation());
            if let Err(e) = store.rel_lost(&member, &b).await {
                tracing::warn!("cluster: the reliable sessions still attached here: {}", describe(&e));
            }
        }
        match store.leave(&self.cfg.node_id, &self.incarnation()).await {
            Ok(n) => tracing::info!(
                "cluster: left in {:.2?} ({n} sessions still registered were declared lost)",
                started.elapsed()
            ),
            Err(e) => tracing::warn!(
                "cluster: could not leave cleanly after {:.2?} ({}); the lease ({lease:?}) will run out",
                started.elapsed(),
                describe(&e)
            ),
        }
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

/// What went wrong with Redis, in words an operator acts on.
pub(crate) fn describe(e: &redis::RedisError) -> String {
    match problem(e) {
        Problem::Config(why) => why,
        Problem::OutOfMemory => format!("Redis is out of memory (maxmemory reached; it refuses writes): {e}"),
        Problem::Unreachable => format!("Redis is unreachable: {e}"),
    }
}

enum Problem {
    /// Redis answers but refuses this node's configuration: a retry will not help.
    Config(String),
    OutOfMemory,
    Unreachable,
}

fn problem(e: &redis::RedisError) -> Problem {
    let text = e.to_string();
    let code = e.code().unwrap_or("");
    if matches!(e.kind(), redis::ErrorKind::AuthenticationFailed) || matches!(code, "NOAUTH" | "WRONGPASS") {
        return Problem::Config(format!("Redis refused the credentials (check the password in the URL): {text}"));
    }
    if code == "NOPERM" {
        return Problem::Config(format!("Redis refused a command for this user (ACL): {text}"));
    }
    if text.contains("DB index is out of range") || text.contains("invalid DB index") {
        return Problem::Config(format!("Redis has no such database (the number after the port in the URL): {text}"));
    }
    if code == "OOM" || text.contains("OOM command not allowed") {
        return Problem::OutOfMemory;
    }
    Problem::Unreachable
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
    /// Processes refused in the last minute because another live node holds their node id: node id, what.
    pub conflicts: Vec<(String, String)>,
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
    let store = Store::new(con.clone());
    let nodes = store.nodes().await?;
    let conflicts = store.conflicts().await?;
    let info: String = redis::cmd("INFO").arg("memory").query_async(&mut con).await?;
    let redis_used_memory =
        info.lines().find_map(|l| l.strip_prefix("used_memory:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0);
    let epoch: Option<u64> = redis::cmd("GET").arg("tether:epoch").query_async(&mut con).await?;
    Ok(StatusReport { nodes, epoch: epoch.unwrap_or(0), redis_used_memory, redis_rtts, conflicts })
}
