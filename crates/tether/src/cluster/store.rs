//! The cluster's state in Redis: keys, the Lua scripts that change them atomically, and typed calls.
//!
//! # Keys (prefix `tether:`; the database number in the URL separates clusters)
//! - `epoch`: the counter every session's epoch comes from (`INCR`): the cluster-wide fencing token.
//! - `id:{client}`: hash `node`, `inc`, `epoch`: who holds the id. One per online id.
//! - `node:{member}:ids`: set of the ids a node incarnation holds (`member` is `{node}#{inc}`).
//! - `nodes`: sorted set of members, scored by the end of their lease (Redis's clock, ms).
//! - `node:{member}`: hash with what `tether cluster status` shows (node id, start time, addresses).
//! - `reap:{member}`: the lock of the node that reaps a lost member.
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

/// The tombstone a release leaves: the epoch of the session that ended, for [`GONE_TTL`].
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

/// The member name of a node incarnation in `nodes`.
pub fn member(node: &str, inc: &str) -> String {
    format!("{node}#{inc}")
}

/// The node id of a member name.
pub fn node_of(member: &str) -> &str {
    member.rsplit_once('#').map_or(member, |(node, _)| node)
}

/// Shared Lua: Redis's clock in ms, and the `LEN:BYTES` field of the inter-node messages (`wire`).
const LUA_HEAD: &str = r#"
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
-- Forget the ids of `ids` that node incarnation `node`#`inc` still holds, and publish them in one `lost` message.
local function declare_lost(node, inc, ids, now)
  local msg = tok('lo') .. tok(ms_str(now)) .. tok(node)
  local n = 0
  for _, id in ipairs(ids) do
    local key = 'tether:id:' .. id
    local cur = redis.call('HMGET', key, 'node', 'inc', 'epoch')
    if cur[1] == node and cur[2] == inc then
      redis.call('DEL', key)
      msg = msg .. tok(id) .. tok(cur[3])
      n = n + 1
    end
  end
  if n > 0 then redis.call('PUBLISH', 'tether:presence', msg) end
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
redis.call('PUBLISH', 'tether:presence', tok('on') .. tok(ms_str(now_ms())) .. tok(ARGV[1]) .. tok(ARGV[2])
  .. tok(ms_str(epoch)))
return {epoch, old[1] or '', tonumber(old[3] or '0')}
"#;

/// A session ended: if the id is still held by this session (this node, this epoch: epochs are unique, the
/// incarnation may have changed since), forget it, publish `offline`, and leave a tombstone with the epoch for
/// `GONE_TTL` (so that a node out of touch meanwhile cannot register an older session of the id again). KEYS: id,
/// tombstone. ARGV: client, node, epoch, reason code, by client (0/1), last seen ms ago, tombstone ttl ms.
/// Returns 1 when it was still held.
const RELEASE: &str = r#"
local cur = redis.call('HMGET', KEYS[1], 'node', 'inc', 'epoch')
if cur[1] == ARGV[2] and tonumber(cur[3] or '-1') == tonumber(ARGV[3]) then
  redis.call('DEL', KEYS[1])
  redis.call('SREM', 'tether:node:' .. cur[1] .. '#' .. cur[2] .. ':ids', ARGV[1])
  redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[7])
  redis.call('PUBLISH', 'tether:presence', tok('of') .. tok(ms_str(now_ms())) .. tok(ARGV[1]) .. tok(ARGV[3])
    .. tok(ARGV[4]) .. tok(ARGV[5]) .. tok(ARGV[6]))
  return 1
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
local gone = tonumber(redis.call('GET', KEYS[4]) or '0')
if not cur[3] and gone > e then
  return {0, '', gone}
end
if cur[1] and (cur[1] ~= ARGV[2] or cur[2] ~= ARGV[3]) then
  redis.call('SREM', 'tether:node:' .. cur[1] .. '#' .. cur[2] .. ':ids', ARGV[1])
end
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
/// a new incarnation. KEYS: nodes, info hash, epoch. ARGV: member, lease ms, join (0/1), node id, started ms,
/// listen address, admin address, epoch floor. Returns {now ms, 1 if the member is registered, members in the
/// table}.
const LEASE: &str = r#"
local now = now_ms()
local known = redis.call('ZSCORE', KEYS[1], ARGV[1])
if ARGV[3] ~= '1' and (not known or tonumber(known) < now) then
  return {ms_str(now), 0, redis.call('ZCARD', KEYS[1])}
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('HSET', KEYS[2], 'node', ARGV[4], 'started_ms', ARGV[5], 'addr', ARGV[6], 'admin', ARGV[7],
  'lease_ms', ARGV[2])
if tonumber(redis.call('GET', KEYS[3]) or '0') < tonumber(ARGV[8]) then
  redis.call('SET', KEYS[3], ARGV[8])
end
return {ms_str(now), 1, redis.call('ZCARD', KEYS[1])}
"#;

/// A node leaves (graceful shutdown): out of the node table, its sets gone. Its sessions were released one by one
/// as they said goodbye; any still registered (a goodbye that did not finish) are declared lost at once rather
/// than after the lease. KEYS: nodes, info hash, ids set. ARGV: member, node, inc. Returns how many were left.
const LEAVE: &str = r#"
local n = declare_lost(ARGV[2], ARGV[3], redis.call('SMEMBERS', KEYS[3]), now_ms())
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2], KEYS[3])
return n
"#;

/// Members whose lease has run out. KEYS: nodes.
const EXPIRED: &str = r#"
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now_ms())
"#;

/// Reap up to a batch of a lost member's sessions: each id it still holds is forgotten and listed in one
/// `lost` message. KEYS: nodes, the member's ids set, its info hash. ARGV: member, node, inc, batch size.
/// Returns {reaped, done}: done is 1 when the member is gone (reaped whole, or reaped by another node), -1 when
/// it renewed its lease meanwhile (it came back: stop).
const REAP: &str = r#"
local now = now_ms()
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score then return {0, 1} end
if tonumber(score) >= now then return {0, -1} end
local n = declare_lost(ARGV[2], ARGV[3], redis.call('SPOP', KEYS[2], tonumber(ARGV[4])), now)
if redis.call('SCARD', KEYS[2]) == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('DEL', KEYS[3])
  return {n, 1}
end
return {n, 0}
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
}

/// The typed calls, over one multiplexed connection (requests from many tasks share it, pipelined).
#[derive(Clone)]
pub struct Store {
    pub con: MultiplexedConnection,
    scripts: std::sync::Arc<Scripts>,
}

impl Store {
    pub fn new(con: MultiplexedConnection) -> Store {
        Store { con, scripts: Default::default() }
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
        for script in [&s.claim, &s.release, &s.register, &s.lease, &s.expired, &s.reap, &s.leave] {
            script.load_async(&mut con).await?;
        }
        Ok(())
    }

    /// The release script as one command for a pipeline: a session of `node` ended; if it still holds `client`,
    /// forget it and publish `offline`. Needs [`Store::load_scripts`].
    pub fn release_cmd(
        &self,
        client: &str,
        node: &str,
        epoch: u64,
        reason: u8,
        by_client: bool,
        last_seen: Duration,
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
            .arg(GONE_TTL.as_millis() as u64);
        cmd
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

    /// Renew (or, with `join`, create) the lease. Returns Redis's clock, whether the member is registered, and how
    /// many members the table holds.
    #[allow(clippy::too_many_arguments)]
    pub async fn lease(
        &self,
        node: &str,
        inc: &str,
        lease: Duration,
        join: bool,
        started_ms: u64,
        addr: &str,
        admin: &str,
        epoch_floor: u64,
    ) -> RedisResult<(u64, bool, u64)> {
        let mut con = self.con.clone();
        let m = member(node, inc);
        let (now, known, members): (String, u8, u64) = self
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
            .arg(addr)
            .arg(admin)
            .arg(epoch_floor)
            .invoke_async(&mut con)
            .await?;
        Ok((now.parse().unwrap_or(0), known == 1, members))
    }

    /// Members whose lease ran out.
    pub async fn expired(&self) -> RedisResult<Vec<String>> {
        let mut con = self.con.clone();
        self.scripts.expired.key(NODES).invoke_async(&mut con).await
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
    pub async fn reap(&self, member: &str, batch: usize) -> RedisResult<(u64, i8)> {
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
        let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut con).await?;
        let now = secs * 1000 + micros / 1000;
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
                member: m,
            });
        }
        Ok(out)
    }

    /// Every held id with its node and epoch (a node that lost its view reloads it). `SCAN`, batch by batch.
    pub async fn holders(&self) -> RedisResult<Vec<(String, String, u64)>> {
        let mut con = self.con.clone();
        let mut cursor: u64 = 0;
        let mut out = Vec::new();
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{PREFIX}id:*"))
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut con)
                .await?;
            if !keys.is_empty() {
                let mut pipe = redis::pipe();
                for k in &keys {
                    pipe.cmd("HMGET").arg(k).arg("node").arg("epoch");
                }
                let rows: Vec<(Option<String>, Option<u64>)> = pipe.query_async(&mut con).await?;
                for (k, (node, epoch)) in keys.iter().zip(rows) {
                    if let (Some(node), Some(epoch)) = (node, epoch) {
                        out.push((k[PREFIX.len() + 3..].to_owned(), node, epoch));
                    }
                }
            }
            cursor = next;
            if cursor == 0 {
                return Ok(out);
            }
        }
    }
}
