//! The cluster's state in Redis: keys, the Lua scripts that change them atomically, and typed calls.
//!
//! # Keys (prefix `tether:`; the database number in the URL separates clusters)
//! - `epoch`: the counter every session's epoch comes from (`INCR`): the cluster-wide fencing token.
//! - `id:{client}`: hash `node`, `inc`, `epoch`: who holds the id. One per online id.
//! - `node:{member}:ids`: set of the ids a node incarnation holds (`member` is `{node}#{inc}`).
//! - `nodes`: sorted set of members, scored by the end of their lease (Redis's clock, ms).
//! - `node:{member}`: hash with what `tether cluster status` shows (node id, start time, addresses).
//! - `reap:{member}`: the lock of the node that reaps a lost member.
//! - `gone:{client}`: the tombstone a release leaves: `epoch:reason:by_client` of the session that ended, for
//!   [`GONE_TTL`].
//! - `digest`: hash, node id -> the XOR of [`digest_of`] over every id that node holds: what each node's view of
//!   the others is checked against ([`CHECKPOINT`]).
//! - `clock`: hash `last`, `skew`: the lease clock (Redis's clock less the time Redis answered no script, so that a
//!   stalled Redis does not run leases out).
//! - `conflict:{node}`: a process refused because another live process holds its node id (for a minute).
//! - Channels: `presence` (every node listens) and `to:{node}` (one node's inbox).
//!
//! Every change of ownership happens in one script, and the scripts that change ownership publish the
//! `presence` message themselves, so the order of presence messages is the order of ownership changes. Redis
//! runs each script alone. The scripts touch keys they compute (the previous holder's set, the lost node's ids),
//! which a single Redis (or a Sentinel-managed primary) allows and Redis Cluster would not.

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncCommands, RedisResult, Script};

pub const PREFIX: &str = "tether:";

pub fn id_key(client: &str) -> String {
    format!("{PREFIX}id:{client}")
}

pub fn ids_key(member: &str) -> String {
    format!("{PREFIX}node:{member}:ids")
}

pub fn info_key(member: &str) -> String {
    format!("{PREFIX}node:{member}")
}

/// The tombstone a release leaves: `epoch:reason:by_client` of the session that ended, for [`GONE_TTL`].
pub fn gone_key(client: &str) -> String {
    format!("{PREFIX}gone:{client}")
}

/// How long a released id's tombstone stays: a node out of touch for less than this cannot register an older
/// session of the id again.
pub const GONE_TTL: Duration = Duration::from_secs(3600);

pub fn inbox(node: &str) -> String {
    format!("{PREFIX}to:{node}")
}

pub const PRESENCE: &str = "tether:presence";
const EPOCH: &str = "tether:epoch";
const NODES: &str = "tether:nodes";
const DIGEST: &str = "tether:digest";
const CLOCK: &str = "tether:clock";

/// Where a process refused for a node id another live process holds says so (for `tether cluster status`).
pub fn conflict_key(node: &str) -> String {
    format!("{PREFIX}conflict:{node}")
}

/// One id's share of its node's digest, as the Lua scripts compute it with `redis.sha1hex`.
pub use tether_proto::registry::digest_of;

/// The member name of a node incarnation in `nodes`.
pub fn member(node: &str, inc: &str) -> String {
    format!("{node}#{inc}")
}

/// The node id of a member name.
pub fn node_of(member: &str) -> &str {
    member.rsplit_once('#').map_or(member, |(node, _)| node)
}

/// Shared Lua: Redis's clock in ms, and the `LEN:BYTES` field of the inter-node messages (`wire`).
pub(super) const LUA_HEAD: &str = r#"
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function tok(s)
  s = tostring(s)
  return #s .. ':' .. s
end
local function ms_str(n)
  return string.format('%d', n)
end
-- The lease clock: Redis's clock less every stretch longer than `gap` ms in which no lease script ran (Redis
-- stalled: paused, busy, swapping). Nodes run one every 250 ms, so such a stretch is Redis standing still, and
-- leases must not run out through it.
local function lease_now(gap)
  local now = now_ms()
  local c = redis.call('HMGET', 'tether:clock', 'last', 'skew')
  local last = tonumber(c[1] or '0')
  local skew = tonumber(c[2] or '0')
  if last > 0 and now - last > tonumber(gap) then
    skew = skew + (now - last)
  end
  redis.call('HSET', 'tether:clock', 'last', ms_str(now), 'skew', ms_str(skew))
  return now - skew
end
-- Whether member `m` (`node#inc`) is an incarnation of `node`.
local function of_node(m, node)
  return string.sub(m, 1, #node + 1) == node .. '#' and not string.find(m, '#', #node + 2, true)
end
-- One id's share of its node's digest: the first 32 bits of SHA-1(id:epoch).
local function share(id, epoch)
  return tonumber(string.sub(redis.sha1hex(id .. ':' .. epoch), 1, 8), 16)
end
-- Store `node`'s digest (a node whose ids are all gone has none).
local function digest_set(node, d)
  if d == 0 then
    redis.call('HDEL', 'tether:digest', node)
  else
    redis.call('HSET', 'tether:digest', node, string.format('%d', d))
  end
end
-- Flip `id`'s share in `node`'s digest (added when it takes the id, removed when it loses it).
local function digest_flip(node, id, epoch)
  local d = tonumber(redis.call('HGET', 'tether:digest', node) or '0')
  digest_set(node, bit.bxor(d, share(id, epoch)))
end
-- The epoch of a tombstone (`epoch:reason:by`), or 0.
local function gone_epoch(key)
  return tonumber(string.match(redis.call('GET', key) or '0', '^%d+') or '0')
end
-- Forget the ids of `ids` that node incarnation `node`#`inc` still holds, and publish them in one `lost` message.
local function declare_lost(node, inc, ids, now)
  local msg = {tok('lo'), tok(ms_str(now)), tok(node)}
  local n = 0
  for _, id in ipairs(ids) do
    local key = 'tether:id:' .. id
    local cur = redis.call('HMGET', key, 'node', 'inc', 'epoch')
    if cur[1] == node and cur[2] == inc then
      redis.call('DEL', key)
      digest_flip(node, id, cur[3])
      msg[#msg + 1] = tok(id) .. tok(cur[3])
      n = n + 1
    end
  end
  if n > 0 then redis.call('PUBLISH', 'tether:presence', table.concat(msg)) end
  return n
end
"#;

/// Claim an id for a new session: a fresh epoch (above `floor`, the largest this node has seen, in case Redis
/// restarted empty), the holder replaced, the previous holder's set updated, and `online` published. KEYS: id,
/// epoch, own ids set. ARGV: client, node, inc, floor. Returns {epoch, previous node or '', previous epoch or 0}.
const CLAIM: &str = r#"
local old = redis.call('HMGET', KEYS[1], 'node', 'inc', 'epoch')
local epoch = redis.call('INCR', KEYS[2])
if epoch <= tonumber(ARGV[4]) then
  epoch = tonumber(ARGV[4]) + 1
  redis.call('SET', KEYS[2], ms_str(epoch))
end
redis.call('HSET', KEYS[1], 'node', ARGV[2], 'inc', ARGV[3], 'epoch', ms_str(epoch))
redis.call('SADD', KEYS[3], ARGV[1])
if old[1] and (old[1] ~= ARGV[2] or old[2] ~= ARGV[3]) then
  redis.call('SREM', 'tether:node:' .. old[1] .. '#' .. old[2] .. ':ids', ARGV[1])
end
if old[3] then digest_flip(old[1], ARGV[1], old[3]) end
digest_flip(ARGV[2], ARGV[1], ms_str(epoch))
redis.call('PUBLISH', 'tether:presence', tok('on') .. tok(ms_str(now_ms())) .. tok(ARGV[1]) .. tok(ARGV[2])
  .. tok(ms_str(epoch)))
return {epoch, old[1] or '', tonumber(old[3] or '0')}
"#;

/// A session ended: if the id is still held by this session (this node, this epoch: epochs are unique, the
/// incarnation may have changed since), forget it, publish `offline`, and leave a tombstone (`epoch:reason:by`) for
/// `GONE_TTL` (so that a node out of touch meanwhile cannot register an older session of the id again, and so that a
/// node repairing its view knows how it ended). With `force` (a release retried after Redis was away: Redis may
/// have restarted empty and lost the id), an id nobody holds whose tombstone is older is announced offline all the
/// same. KEYS: id, tombstone. ARGV: client, node, epoch, reason code, by client (0/1), last seen ms ago, tombstone
/// ttl ms, force (0/1). Returns 1 when it was still held, 2 when it was announced by force, 0 otherwise.
const RELEASE: &str = r#"
local cur = redis.call('HMGET', KEYS[1], 'node', 'inc', 'epoch')
local function announce()
  redis.call('SET', KEYS[2], ARGV[3] .. ':' .. ARGV[4] .. ':' .. ARGV[5], 'PX', ARGV[7])
  redis.call('PUBLISH', 'tether:presence', tok('of') .. tok(ms_str(now_ms())) .. tok(ARGV[1]) .. tok(ARGV[3])
    .. tok(ARGV[4]) .. tok(ARGV[5]) .. tok(ARGV[6]))
end
if cur[1] == ARGV[2] and tonumber(cur[3] or '-1') == tonumber(ARGV[3]) then
  redis.call('DEL', KEYS[1])
  redis.call('SREM', 'tether:node:' .. cur[1] .. '#' .. cur[2] .. ':ids', ARGV[1])
  digest_flip(cur[1], ARGV[1], cur[3])
  announce()
  return 1
end
if ARGV[8] == '1' and not cur[3] and gone_epoch(KEYS[2]) < tonumber(ARGV[3]) then
  announce()
  return 2
end
return 0
"#;

/// Register a session this node holds (after Redis came back, or after this node was out of touch past its
/// lease). KEYS: id, own ids set, epoch, tombstone. ARGV: client, node, inc, epoch. Returns:
/// - {1, '', epoch}: registered with this epoch;
/// - {2, '', e}: the id already names this node with epoch e (a claim whose answer was lost): registered, and the
///   session takes e;
/// - {0, holder node, holder epoch}: a newer session holds the id, or held it and ended (a tombstone).
const REGISTER: &str = r#"
local cur = redis.call('HMGET', KEYS[1], 'node', 'inc', 'epoch')
local e = tonumber(ARGV[4])
local ce = tonumber(cur[3] or '0')
if cur[3] and cur[1] == ARGV[2] and ce >= e then
  if cur[2] ~= ARGV[3] then
    redis.call('SREM', 'tether:node:' .. cur[1] .. '#' .. cur[2] .. ':ids', ARGV[1])
    redis.call('HSET', KEYS[1], 'inc', ARGV[3])
  end
  redis.call('SADD', KEYS[2], ARGV[1])
  return {2, '', ce}
end
if cur[3] and ce >= e then
  return {0, cur[1], ce}
end
local gone = gone_epoch(KEYS[4])
if not cur[3] and gone >= e then
  return {0, '', gone}
end
if cur[1] and (cur[1] ~= ARGV[2] or cur[2] ~= ARGV[3]) then
  redis.call('SREM', 'tether:node:' .. cur[1] .. '#' .. cur[2] .. ':ids', ARGV[1])
end
if cur[3] then digest_flip(cur[1], ARGV[1], cur[3]) end
digest_flip(ARGV[2], ARGV[1], ARGV[4])
redis.call('HSET', KEYS[1], 'node', ARGV[2], 'inc', ARGV[3], 'epoch', ARGV[4])
redis.call('SADD', KEYS[2], ARGV[1])
if tonumber(redis.call('GET', KEYS[3]) or '0') < e then
  redis.call('SET', KEYS[3], ARGV[4])
end
if not cur[3] or cur[1] ~= ARGV[2] or ce ~= e then
  redis.call('PUBLISH', 'tether:presence', tok('on') .. tok(ms_str(now_ms())) .. tok(ARGV[1]) .. tok(ARGV[2])
    .. tok(ARGV[4]))
end
return {1, '', e}
"#;

/// Renew a node's lease, or join (`ARGV[3]` = 1). A renewal of a member that is no longer there (reaped), or whose
/// lease has already run out (a reaper may be working on it), does nothing and says so: the node must rejoin as
/// a new incarnation. A join is refused while another member with the same node id holds a live lease (a second
/// process started with a node id in use, or this node's previous life whose lease has not run out yet). Leases
/// run on the lease clock. KEYS: nodes, info hash, epoch. ARGV: member, lease ms, join (0/1), node id, started ms,
/// listen address, admin address, epoch floor, stall gap ms, synced (0/1: every local session is registered under
/// this incarnation). Returns {lease clock ms, 1 if the member is registered (0 if not, -1 if the join was refused),
/// members in the table, the live member with this node id that refused the join or '', its lease's end}.
const LEASE: &str = r#"
local now = lease_now(ARGV[9])
local known = redis.call('ZSCORE', KEYS[1], ARGV[1])
if ARGV[3] ~= '1' and (not known or tonumber(known) < now) then
  return {ms_str(now), 0, redis.call('ZCARD', KEYS[1]), '', 0}
end
if ARGV[3] == '1' then
  local live = redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf', 'WITHSCORES')
  for i = 1, #live, 2 do
    local m = live[i]
    if m ~= ARGV[1] and of_node(m, ARGV[4]) then
      return {ms_str(now), -1, redis.call('ZCARD', KEYS[1]), m, tonumber(live[i + 1])}
    end
  end
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('HSET', KEYS[2], 'node', ARGV[4], 'started_ms', ARGV[5], 'addr', ARGV[6], 'admin', ARGV[7],
  'lease_ms', ARGV[2], 'synced', ARGV[10])
if tonumber(redis.call('GET', KEYS[3]) or '0') < tonumber(ARGV[8]) then
  redis.call('SET', KEYS[3], ARGV[8])
end
return {ms_str(now), 1, redis.call('ZCARD', KEYS[1]), '', 0}
"#;

/// A node leaves (graceful shutdown, or the previous incarnation of a node that rejoined): out of the node table,
/// its sets gone. Its sessions were released one by one as they said goodbye; any still registered (a goodbye
/// that did not finish) are declared lost at once rather than after the lease. KEYS: nodes, info hash, ids set.
/// ARGV: member, node, inc. Returns how many were left.
const LEAVE: &str = r#"
local n = declare_lost(ARGV[2], ARGV[3], redis.call('SMEMBERS', KEYS[3]), now_ms())
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2], KEYS[3])
return n
"#;

/// Members whose lease has run out, on the lease clock. KEYS: nodes. ARGV: stall gap ms.
const EXPIRED: &str = r#"
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. lease_now(ARGV[1]))
"#;

/// Reap up to a batch of a lost member's sessions: each id it still holds is forgotten and listed in one
/// `lost` message. KEYS: nodes, the member's ids set, its info hash. ARGV: member, node, inc, batch size, stall
/// gap ms. Returns {reaped, done}: done is 1 when the member is gone (reaped whole, or reaped by another node), -1
/// when it renewed its lease meanwhile (it came back: stop).
const REAP: &str = r#"
local now = lease_now(ARGV[5])
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score then return {0, 1} end
if tonumber(score) >= now then return {0, -1} end
local n = declare_lost(ARGV[2], ARGV[3], redis.call('SPOP', KEYS[2], tonumber(ARGV[4])), now_ms())
if redis.call('SCARD', KEYS[2]) == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('DEL', KEYS[3])
  return {n, 1}
end
return {n, 0}
"#;

/// A checkpoint in the stream of ownership changes: publish to one node's inbox, in the same order as every
/// `online`, `offline` and `lost` (each published by the script that made the change), every live member's node
/// id, whether it is synced, its node's digest, and how long ago it renewed its lease. A node that has applied
/// every message before the checkpoint holds exactly these digests; one that does not has missed something.
/// KEYS: nodes, digest. ARGV: the inbox, stall gap ms. Returns the number of live members.
const CHECKPOINT: &str = r#"
local now = lease_now(ARGV[2])
local live = redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf', 'WITHSCORES')
local msg = {tok('ck'), tok(ms_str(now_ms()))}
for i = 1, #live, 2 do
  local m = live[i]
  local info = redis.call('HMGET', 'tether:node:' .. m, 'node', 'synced', 'lease_ms')
  local node = info[1] or string.match(m, '^(.*)#[^#]*$') or m
  -- The lease ends at its score; it was renewed a lease before that.
  local renewed = math.max(0, (tonumber(info[3]) or 0) - (tonumber(live[i + 1]) - now))
  msg[#msg + 1] = tok(node) .. tok(info[2] or '0') .. tok(redis.call('HGET', KEYS[2], node) or '0')
    .. tok(ms_str(renewed))
end
redis.call('PUBLISH', ARGV[1], table.concat(msg))
return #live / 2
"#;

/// Recompute a node's digest from what Redis holds (its incarnations' id sets, each id counted once if the node
/// holds it): for a digest that no script kept (written by a version without digests, or edited by hand). KEYS:
/// nodes, digest. ARGV: node. Returns the digest.
const RESEAL: &str = r#"
local d = 0
local seen = {}
for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if of_node(m, ARGV[1]) then
    for _, id in ipairs(redis.call('SMEMBERS', 'tether:node:' .. m .. ':ids')) do
      local cur = redis.call('HMGET', 'tether:id:' .. id, 'node', 'epoch')
      if cur[1] == ARGV[1] and not seen[id] then
        seen[id] = true
        d = bit.bxor(d, share(id, cur[2]))
      end
    end
  end
end
digest_set(ARGV[1], d)
return d
"#;

/// The scripts, loaded once per process (their SHA1 is what travels after the first call).
pub struct Scripts {
    claim: Script,
    release: Script,
    register: Script,
    lease: Script,
    expired: Script,
    reap: Script,
    leave: Script,
    checkpoint: Script,
    reseal: Script,
}

impl Default for Scripts {
    fn default() -> Scripts {
        let s = |body: &str| Script::new(&format!("{LUA_HEAD}{body}"));
        Scripts {
            claim: s(CLAIM),
            release: s(RELEASE),
            register: s(REGISTER),
            lease: s(LEASE),
            expired: s(EXPIRED),
            reap: s(REAP),
            leave: s(LEAVE),
            checkpoint: s(CHECKPOINT),
            reseal: s(RESEAL),
        }
    }
}

/// Who held an id before a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    pub epoch: u64,
    /// The previous holder's node, if any.
    pub previous: Option<(String, u64)>,
}

/// What [`Store::register`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registered {
    Kept,
    /// The id already named this node with this (larger) epoch: a claim whose answer was lost. The session takes it.
    Adopted(u64),
    /// A newer session on `node` holds the id.
    Superseded {
        node: String,
        epoch: u64,
    },
}

/// What a lease renewal found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leased {
    /// Renewed (or joined); `members` in the table.
    Renewed { members: u64 },
    /// The member is not registered, or its lease ran out: rejoin as a new incarnation.
    Unknown { members: u64 },
    /// The join was refused: `member`, with the same node id, holds a live lease until `lease_end` (lease clock).
    Refused { member: String, lease_end: u64 },
}

/// One node's view of the cluster, for `tether cluster status` and the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStatus {
    pub node: String,
    pub member: String,
    /// Until the lease runs out (negative: expired, not reaped yet).
    pub lease_left_ms: i64,
    pub lease_ms: u64,
    pub sessions: u64,
    pub started_ms: u64,
    pub addr: String,
    pub admin: String,
    /// Every session the member holds is registered under it: other nodes take its absences at their word.
    pub synced: bool,
}

/// The typed calls, over one multiplexed connection (requests from many tasks share it, pipelined).
#[derive(Clone)]
pub struct Store {
    pub con: MultiplexedConnection,
    scripts: std::sync::Arc<Scripts>,
    /// The reliable sessions' scripts (`super::reliable`).
    pub(super) rel: std::sync::Arc<super::reliable::Scripts>,
}

impl Store {
    pub fn new(con: MultiplexedConnection) -> Store {
        Store { con, scripts: Default::default(), rel: Default::default() }
    }

    pub async fn claim(&self, client: &str, node: &str, inc: &str, floor: u64) -> RedisResult<Claimed> {
        let mut con = self.con.clone();
        let (epoch, prev, prev_epoch): (u64, String, u64) = self
            .scripts
            .claim
            .key(id_key(client))
            .key(EPOCH)
            .key(ids_key(&member(node, inc)))
            .arg(client)
            .arg(node)
            .arg(inc)
            .arg(floor)
            .invoke_async(&mut con)
            .await?;
        Ok(Claimed { epoch, previous: (!prev.is_empty()).then_some((prev, prev_epoch)) })
    }

    /// Load every script into Redis's cache, so that pipelines can call them by hash (`EVALSHA`). Done on every
    /// new connection: a restarted Redis has an empty cache.
    pub async fn load_scripts(&self) -> RedisResult<()> {
        let mut con = self.con.clone();
        let s = &self.scripts;
        for script in
            [&s.claim, &s.release, &s.register, &s.lease, &s.expired, &s.reap, &s.leave, &s.checkpoint, &s.reseal]
        {
            script.load_async(&mut con).await?;
        }
        for script in self.rel.all() {
            script.load_async(&mut con).await?;
        }
        Ok(())
    }

    /// The release script as one command for a pipeline: a session of `node` ended; if it still holds `client`,
    /// forget it and publish `offline` (with `force`, also when nobody holds it and its tombstone is older). Needs
    /// [`Store::load_scripts`].
    #[allow(clippy::too_many_arguments)]
    pub fn release_cmd(
        &self,
        client: &str,
        node: &str,
        epoch: u64,
        reason: u8,
        by_client: bool,
        last_seen: Duration,
        force: bool,
    ) -> redis::Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.scripts.release.get_hash())
            .arg(2)
            .arg(id_key(client))
            .arg(gone_key(client))
            .arg(client)
            .arg(node)
            .arg(epoch)
            .arg(reason)
            .arg(u8::from(by_client))
            .arg(last_seen.as_millis().min(u32::MAX as u128) as u64)
            .arg(GONE_TTL.as_millis() as u64)
            .arg(u8::from(force));
        cmd
    }

    /// The leave script as one command for a pipeline (a previous incarnation of this node).
    pub fn leave_cmd(&self, node: &str, inc: &str) -> redis::Cmd {
        let m = member(node, inc);
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.scripts.leave.get_hash()).arg(3).arg(NODES).arg(info_key(&m)).arg(ids_key(&m));
        cmd.arg(&m).arg(node).arg(inc);
        cmd
    }

    /// Where `member` says it listens.
    pub async fn addr_of(&self, member: &str) -> RedisResult<String> {
        let mut con = self.con.clone();
        let addr: Option<String> = con.hget(info_key(member), "addr").await?;
        Ok(addr.unwrap_or_default())
    }

    /// Note, for a minute, that a process listening on `addr` was refused node id `node`, held by `holder`.
    pub async fn note_conflict(&self, node: &str, addr: &str, holder: &str) -> RedisResult<()> {
        let mut con = self.con.clone();
        let what = format!("{addr} refused: {holder} holds the node id");
        redis::cmd("SET").arg(conflict_key(node)).arg(what).arg("PX").arg(60_000).query_async(&mut con).await
    }

    /// The refusals noted in the last minute: node id, what happened.
    pub async fn conflicts(&self) -> RedisResult<Vec<(String, String)>> {
        let mut con = self.con.clone();
        let prefix = conflict_key("");
        let mut keys = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{prefix}*"))
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut con)
                .await?;
            keys.extend(batch);
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        let mut out = Vec::new();
        for k in keys {
            let v: Option<String> = con.get(&k).await?;
            if let Some(v) = v {
                out.push((k[prefix.len()..].to_owned(), v));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Leave the cluster (graceful shutdown); how many sessions were still registered.
    pub async fn leave(&self, node: &str, inc: &str) -> RedisResult<u64> {
        let mut con = self.con.clone();
        let m = member(node, inc);
        let mut leave = self.scripts.leave.prepare_invoke();
        leave.key(NODES).key(info_key(&m)).key(ids_key(&m)).arg(&m).arg(node).arg(inc);
        leave.invoke_async(&mut con).await
    }

    /// The ids a node incarnation's set holds, with their holder's node and epoch now.
    pub async fn own_ids(&self, node: &str, inc: &str) -> RedisResult<Vec<(String, Option<String>, Option<u64>)>> {
        let mut con = self.con.clone();
        let ids: Vec<String> = con.smembers(ids_key(&member(node, inc))).await?;
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(1000) {
            let mut pipe = redis::pipe();
            for id in chunk {
                pipe.cmd("HMGET").arg(id_key(id)).arg("node").arg("epoch");
            }
            let rows: Vec<(Option<String>, Option<u64>)> = pipe.query_async(&mut con).await?;
            out.extend(chunk.iter().cloned().zip(rows).map(|(id, (n, e))| (id, n, e)));
        }
        Ok(out)
    }

    pub async fn register(&self, client: &str, node: &str, inc: &str, epoch: u64) -> RedisResult<Registered> {
        let mut con = self.con.clone();
        let (kept, holder, holder_epoch): (u8, String, u64) = self
            .scripts
            .register
            .key(id_key(client))
            .key(ids_key(&member(node, inc)))
            .key(EPOCH)
            .key(gone_key(client))
            .arg(client)
            .arg(node)
            .arg(inc)
            .arg(epoch)
            .invoke_async(&mut con)
            .await?;
        Ok(match kept {
            1 => Registered::Kept,
            2 => Registered::Adopted(holder_epoch),
            _ => Registered::Superseded { node: holder, epoch: holder_epoch },
        })
    }

    /// Who holds `client` now: its node and epoch.
    pub async fn holder(&self, client: &str) -> RedisResult<Option<(String, u64)>> {
        let mut con = self.con.clone();
        let (node, epoch): (Option<String>, Option<u64>) =
            redis::cmd("HMGET").arg(id_key(client)).arg("node").arg("epoch").query_async(&mut con).await?;
        Ok(node.zip(epoch))
    }

    /// Renew (or, with `join`, create) the lease; `synced` says every local session is registered under this
    /// incarnation. `gap` is the stall threshold of the lease clock.
    #[allow(clippy::too_many_arguments)]
    pub async fn lease(
        &self,
        node: &str,
        inc: &str,
        lease: Duration,
        join: bool,
        started_ms: u64,
        addrs: (&str, &str),
        epoch_floor: u64,
        gap: Duration,
        synced: bool,
    ) -> RedisResult<Leased> {
        let mut con = self.con.clone();
        let m = member(node, inc);
        let (_now, known, members, other, other_end): (String, i8, u64, String, u64) = self
            .scripts
            .lease
            .key(NODES)
            .key(info_key(&m))
            .key(EPOCH)
            .arg(&m)
            .arg(lease.as_millis() as u64)
            .arg(u8::from(join))
            .arg(node)
            .arg(started_ms)
            .arg(addrs.0)
            .arg(addrs.1)
            .arg(epoch_floor)
            .arg(gap.as_millis() as u64)
            .arg(u8::from(synced))
            .invoke_async(&mut con)
            .await?;
        Ok(match known {
            1 => Leased::Renewed { members },
            0 => Leased::Unknown { members },
            _ => Leased::Refused { member: other, lease_end: other_end },
        })
    }

    /// Members whose lease ran out.
    pub async fn expired(&self, gap: Duration) -> RedisResult<Vec<String>> {
        let mut con = self.con.clone();
        self.scripts.expired.key(NODES).arg(gap.as_millis() as u64).invoke_async(&mut con).await
    }

    /// Publish a checkpoint to `node`'s inbox (see [`CHECKPOINT`]).
    pub async fn checkpoint(&self, node: &str, gap: Duration) -> RedisResult<u64> {
        let mut con = self.con.clone();
        let mut ck = self.scripts.checkpoint.prepare_invoke();
        ck.key(NODES).key(DIGEST).arg(inbox(node)).arg(gap.as_millis() as u64);
        ck.invoke_async(&mut con).await
    }

    /// Recompute `node`'s digest from its sessions (see [`RESEAL`]).
    pub async fn reseal(&self, node: &str) -> RedisResult<i64> {
        let mut con = self.con.clone();
        self.scripts.reseal.key(NODES).key(DIGEST).arg(node).invoke_async(&mut con).await
    }

    /// The tombstones of `ids`: (epoch, reason code, by client) of the session that ended last, if remembered.
    pub async fn tombstones(&self, ids: &[String]) -> RedisResult<Vec<Option<(u64, u8, bool)>>> {
        let mut con = self.con.clone();
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(1000) {
            let mut pipe = redis::pipe();
            for id in chunk {
                pipe.get(gone_key(id));
            }
            let rows: Vec<Option<String>> = pipe.query_async(&mut con).await?;
            out.extend(rows.into_iter().map(|v| {
                let v = v?;
                let mut f = v.split(':');
                let epoch = f.next()?.parse().ok()?;
                let reason = f.next().and_then(|r| r.parse().ok()).unwrap_or(0);
                Some((epoch, reason, f.next() == Some("1")))
            }));
        }
        Ok(out)
    }

    /// Take the lock for reaping `member` (held for `hold`); true when this node got it.
    pub async fn lock_reap(&self, member: &str, node: &str, hold: Duration) -> RedisResult<bool> {
        let mut con = self.con.clone();
        let set: Option<String> = redis::cmd("SET")
            .arg(format!("{PREFIX}reap:{member}"))
            .arg(node)
            .arg("NX")
            .arg("PX")
            .arg(hold.as_millis() as u64)
            .query_async(&mut con)
            .await?;
        Ok(set.is_some())
    }

    /// One batch of reaping: (ids declared lost, done: 1 gone, 0 more to do, -1 it came back).
    pub async fn reap(&self, member: &str, batch: usize, gap: Duration) -> RedisResult<(u64, i8)> {
        let mut con = self.con.clone();
        let (node, inc) = member.rsplit_once('#').unwrap_or((member, ""));
        self.scripts
            .reap
            .key(NODES)
            .key(ids_key(member))
            .key(info_key(member))
            .arg(member)
            .arg(node)
            .arg(inc)
            .arg(batch)
            .arg(gap.as_millis() as u64)
            .invoke_async(&mut con)
            .await
    }

    /// Publish to a channel.
    pub async fn publish(&self, channel: &str, msg: Vec<u8>) -> RedisResult<()> {
        let mut con = self.con.clone();
        con.publish::<_, _, ()>(channel, msg).await
    }

    /// Every node in the table, with its lease and session count.
    pub async fn nodes(&self) -> RedisResult<Vec<NodeStatus>> {
        let mut con = self.con.clone();
        // The lease clock as the scripts keep it (read only: a stall in progress is not skipped yet).
        let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut con).await?;
        let skew: Option<u64> = con.hget(CLOCK, "skew").await?;
        let now = (secs * 1000 + micros / 1000).saturating_sub(skew.unwrap_or(0));
        let members: Vec<(String, f64)> = con.zrange_withscores(NODES, 0, -1).await?;
        let mut out = Vec::with_capacity(members.len());
        for (m, deadline) in members {
            let info: std::collections::HashMap<String, String> = con.hgetall(info_key(&m)).await?;
            let sessions: u64 = con.scard(ids_key(&m)).await?;
            let get = |k: &str| info.get(k).cloned().unwrap_or_default();
            out.push(NodeStatus {
                node: info.get("node").cloned().unwrap_or_else(|| node_of(&m).into()),
                lease_left_ms: deadline as i64 - now as i64,
                lease_ms: get("lease_ms").parse().unwrap_or(0),
                sessions,
                started_ms: get("started_ms").parse().unwrap_or(0),
                addr: get("addr"),
                admin: get("admin"),
                synced: get("synced") == "1",
                member: m,
            });
        }
        Ok(out)
    }
}
