//! Reliable sessions in cluster mode: each session's state and its stream to the client live in Redis, and only
//! Lua scripts change them, so any node can resume a session and a node's crash loses nothing Redis confirmed.
//!
//! # Layout
//! - Keys (prefix `tether:`):
//!   - `rs:{id}`: hash, one per session: `tok` (token, hex), `rx` (the last sequence number of the client's
//!     stream the cluster took), `as` (the last assigned in the stream to the client), `ack` (the last the client
//!     acknowledged), `rcp` (receipts asked), `at`/`nd`/`mb` (the connection carrying it, its node and node
//!     incarnation; empty while offline), `n`/`by` (items and bytes held), `lost` (refused since the last resume).
//!   - `rq:{id}`: stream of the items not yet acknowledged, entry id `{seq}-0`: `k` `d` (a message: `p` sender,
//!     `b` payload, and for a reliable sender `o`/`ot`/`oq`, its id, token and sequence number) or `r` (a report:
//!     `p` peer, `w` outcome, `q` sequence numbers); `z` the bytes it counts for.
//!   - `rexp`: sorted set of offline sessions by expiry (Redis's clock, ms); `rtotal`: bytes held in all;
//!     `rnode:{member}`: the sessions a node incarnation carries; `rend:{token}`: an ended session's `why:lost`,
//!     for a late resume; `rstore`: the store's id, the first 8 bytes of every token (a Redis that restarted
//!     empty has a new one, so old tokens resume as `server_restarted`).
//! - The scripts, one per step, each also publishing a wake-up (`rw`) to the node whose connection has new items:
//!   `OPEN` (resume or start), `REPLACE`, `TAKE` (a client's message: its stream's progress and the receiver's
//!   hold in one step), `REPORT`, `ACK` (release, and receipts to the senders), `FETCH`, `DETACH`, `EXPIRE` and
//!   `LOST` (a lost node's sessions go offline).
//! - [`Store`]'s calls for them, and [`Link`]: one connection's ordered queue of steps, carried out by a task of
//!   its own in pipelined batches, with the outcomes coming back in order ([`Done`]).
//!
//! # Rules
//! The rules are the single node's (`tether_proto::reliable::Sessions`): the same statuses, reasons, bounds and
//! receipts. Codes shared with the scripts are formatted into them from the core's enums. Nothing is confirmed to
//! a client before Redis has it: a connection confirms a message only when its `TAKE` came back.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use redis::{RedisResult, Script, Value};
use tether_proto::reliable::{Grant, LostWhy, Offer, Status, Token};
use tether_proto::{Frame, Report, Undeliverable};
use tokio::sync::mpsc;

use super::store::{Store, LUA_HEAD};

/// Sessions `EXPIRE` ends per call (each may hold thousands of items, all reported).
pub const EXPIRE_BATCH: usize = 16;
/// Items one fetch brings at most, and the bytes after which it stops (at least one item).
const FETCH_COUNT: usize = 256;
pub const FETCH_BYTES: usize = 64 * 1024;
/// How long an ended session's token is remembered, to tell a late resume why it is gone, and how many at most.
const REMEMBER_ENDED: Duration = Duration::from_secs(3600);
const REMEMBER_ENDED_COUNT: usize = 65_536;
/// Sessions one `LOST` call takes offline at most (Redis runs each script alone).
const LOST_BATCH: usize = 500;
/// Steps carried out in one pipeline at most.
const BATCH: usize = 256;
/// Messages one `TAKE` call takes at most, and the payload bytes after which it stops.
const TAKE_COUNT: usize = 64;
const TAKE_BYTES: usize = 256 * 1024;
/// How often a connection's link checks whether its node may have missed a wake-up (reconnected to Redis, shed
/// pub/sub messages), and looks for new items then; it looks every `RESCAN_EVERY` checks in any case.
const RESCAN: Duration = Duration::from_secs(1);
const RESCAN_EVERY: u32 = 30;

/// The bounds the scripts apply, the single node's `HoldConfig`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    pub expiry: Duration,
    pub messages: usize,
    pub bytes: usize,
    pub total_bytes: usize,
    /// The largest frame the connections accept: a message needing a larger `SDATA` is refused, reports split.
    pub max_frame: u32,
}

impl Bounds {
    /// Sequence numbers per `REPORT` item, so that it fits a frame whatever the peer's id (up to 255 bytes).
    fn per_report(&self) -> usize {
        ((self.max_frame as usize).saturating_sub(1 + 8 + 1 + 255 + 1 + 2) / 8).clamp(1, u16::MAX as usize)
    }
}

/// Lua shared by the scripts below (after the store's own head: `now_ms`, `tok`, `ms_str`).
fn head() -> String {
    format!(
        r#"
local REMEMBER_ENDED = {}
local WHY_EXPIRED, WHY_OVERFLOW, WHY_RESTARTED, WHY_UNKNOWN, WHY_REPLACED = {}, {}, {}, {}, {}
local U_TOO_LARGE, U_EXPIRED, U_HOLD_FULL, U_REPLACED = {}, {}, {}, {}
local function rs(id) return 'tether:rs:' .. id end
local function rq(id) return 'tether:rq:' .. id end
local function sid(seq) return string.format('%d-0', seq) end
-- Tell node `nd` that `id`'s stream has new items (nobody while offline).
local function wake(nd, id)
  if nd and nd ~= '' then
    redis.call('PUBLISH', 'tether:to:' .. nd, tok('rw') .. tok(ms_str(now_ms())) .. tok(id))
  end
end
-- Add `n` to a counter; nothing for 0 (Lua's -0 would reach Redis as "-0", which it refuses as an integer, and a
-- script's error does not undo what it wrote before).
local function add(key, field, n)
  if n == 0 then return end
  if field then
    redis.call('HINCRBY', key, field, string.format('%d', n))
  else
    redis.call('INCRBY', key, string.format('%d', n))
  end
end
-- `n` items and `size` bytes more (or fewer) held by `id`, and bytes in all.
local function held(id, n, size)
  add(rs(id), 'n', n)
  add(rs(id), 'by', size)
  add('tether:rtotal', nil, size)
end
-- An entry's fields as a table.
local function fields(e)
  local f, kv = {{}}, e[2]
  for i = 1, #kv, 2 do f[kv[i]] = kv[i + 1] end
  return f
end
-- Tell `to` (if its session exists and, given a token, still holds it) what became of its messages `seqs` to
-- `peer`: outcome 0 delivered, else why. Split so that each report fits a frame (`per` numbers).
local function report(to, t, peer, outcome, seqs, per)
  if #seqs == 0 then return end
  local s = redis.call('HMGET', rs(to), 'tok', 'nd')
  if not s[1] or (t ~= '' and s[1] ~= t) then return end
  for i = 1, #seqs, per do
    local chunk = {{}}
    for k = i, math.min(i + per - 1, #seqs) do chunk[#chunk + 1] = seqs[k] end
    local size = #chunk * 8 + #peer + 96
    local seq = redis.call('HINCRBY', rs(to), 'as', 1)
    redis.call('XADD', rq(to), sid(seq), 'k', 'r', 'p', peer, 'w', outcome, 'q', table.concat(chunk, ','), 'z', size)
    held(to, 1, size)
  end
  wake(s[2], to)
end
-- Group messages by the session that sent them: key -> {{sender, token, seqs}}, in first-seen order.
local function group(groups, order, f)
  if not f.o then return end
  local key = f.o .. '\0' .. f.ot
  local g = groups[key]
  if not g then
    g = {{f.o, f.ot, {{}}}}
    groups[key] = g
    order[#order + 1] = key
  end
  g[3][#g[3] + 1] = f.oq
end
-- `id`'s client took its stream up to `upto`: those items leave the hold, and senders that asked learn it.
local function release(id, upto, per)
  local items = redis.call('XRANGE', rq(id), '-', sid(upto))
  if #items == 0 then return 0 end
  local groups, order, size = {{}}, {{}}, 0
  for _, e in ipairs(items) do
    local f = fields(e)
    size = size + tonumber(f.z)
    if f.k == 'd' then group(groups, order, f) end
  end
  redis.call('XTRIM', rq(id), 'MINID', sid(upto + 1))
  held(id, -#items, -size)
  for _, key in ipairs(order) do
    local g = groups[key]
    if redis.call('HGET', rs(g[1]), 'rcp') == '1' then report(g[1], g[2], id, 0, g[3], per) end
  end
  return #items
end
-- End `id`'s session: what it held is undeliverable (`outcome` for its senders), its token remembered for `ttl`
-- ms with `why` and how many were lost.
local function finish(id, why, outcome, per, ttl)
  local s = redis.call('HMGET', rs(id), 'tok', 'lost', 'mb', 'by')
  if not s[1] then return end
  local items = redis.call('XRANGE', rq(id), '-', '+')
  local groups, order, lost = {{}}, {{}}, 0
  for _, e in ipairs(items) do
    local f = fields(e)
    if f.k == 'd' then
      lost = lost + 1
      group(groups, order, f)
    end
  end
  add('tether:rtotal', nil, -tonumber(s[4] or '0'))
  redis.call('DEL', rs(id), rq(id))
  redis.call('ZREM', 'tether:rexp', id)
  if s[3] and s[3] ~= '' then redis.call('SREM', 'tether:rnode:' .. s[3], id) end
  redis.call('SET', 'tether:rend:' .. s[1], why .. ':' .. ms_str(lost + tonumber(s[2] or '0')), 'PX', ttl)
  -- Ended tokens are remembered up to a count, as on a single node (the oldest forgotten first).
  redis.call('ZADD', 'tether:rends', now_ms(), s[1])
  if redis.call('ZCARD', 'tether:rends') > REMEMBER_ENDED then
    local oldest = redis.call('ZPOPMIN', 'tether:rends')
    redis.call('DEL', 'tether:rend:' .. oldest[1])
  end
  for _, key in ipairs(order) do
    local g = groups[key]
    report(g[1], g[2], id, outcome, g[3], per)
  end
end
-- `id` is carried by connection `at` of node `nd` (incarnation `mb`).
local function attach(id, at, nd, mb)
  local old = redis.call('HGET', rs(id), 'mb')
  if old and old ~= '' and old ~= mb then redis.call('SREM', 'tether:rnode:' .. old, id) end
  redis.call('HSET', rs(id), 'at', at, 'nd', nd, 'mb', mb, 't', ms_str(now_ms()))
  redis.call('SADD', 'tether:rnode:' .. mb, id)
  redis.call('SADD', 'tether:rmembers', mb)
  redis.call('ZREM', 'tether:rexp', id)
end
-- `id` is offline (it was carried by incarnation `mb`), and expires `expiry` ms from now.
local function offline(id, mb, expiry)
  redis.call('HSET', rs(id), 'at', '', 'nd', '', 'mb', '')
  if mb and mb ~= '' then redis.call('SREM', 'tether:rnode:' .. mb, id) end
  redis.call('ZADD', 'tether:rexp', now_ms() + expiry, id)
end
"#,
        REMEMBER_ENDED_COUNT,
        LostWhy::Expired.code(),
        LostWhy::HoldOverflow.code(),
        LostWhy::Restarted.code(),
        LostWhy::Unknown.code(),
        LostWhy::Replaced.code(),
        Undeliverable::TooLarge.code(),
        Undeliverable::Expired.code(),
        Undeliverable::HoldFull.code(),
        Undeliverable::Replaced.code(),
    )
}

/// A connection for `id` was admitted: resume the session its token names, or start one (ending any other of the
/// id: `replaced`). ARGV: id, at, nd, mb, receipts (0/1), offered token (hex, or empty), received, random (16 hex),
/// per report, ttl ms, a store id to use if there is none (16 hex), the claim's epoch. Returns {status, why,
/// token, rx, lost (-1: unknown), items to replay}, or {-1} when a newer claim of the id opened its session
/// already (the claims and the opens of two connections may cross).
const OPEN: &str = r#"
local id, at, nd, mb, rcp, offered = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local received, per, ttl = tonumber(ARGV[7]), tonumber(ARGV[9]), ARGV[10]
local s = redis.call('HMGET', rs(id), 'tok', 'rx', 'as', 'ack', 'lost', 'ep')
-- A newer claim of the id opened its session first: this connection lost the race, and touches nothing.
if tonumber(ARGV[12]) < tonumber(s[6] or '0') then return {-1} end
if offered ~= '' and s[1] == offered then
  local as, ack = tonumber(s[3]), tonumber(s[4])
  if received <= as and received >= ack then
    release(id, received, per)
    local lost = tonumber(s[5] or '0')
    redis.call('HSET', rs(id), 'ack', ms_str(received), 'rcp', rcp, 'lost', '0', 'ep', ARGV[12])
    attach(id, at, nd, mb)
    local status, why = 1, 0
    if lost > 0 then status, why = 2, WHY_OVERFLOW end
    return {status, why, s[1], tonumber(s[2]), lost, as - received}
  end
end
local store = redis.call('GET', 'tether:rstore')
if not store then
  store = ARGV[11]
  redis.call('SET', 'tether:rstore', store)
end
local status, why, lost = 0, 0, 0
if offered ~= '' then
  status = 3
  local e = redis.call('GET', 'tether:rend:' .. offered)
  if e then
    local w, l = string.match(e, '^(%d+):(%d+)$')
    why, lost = tonumber(w), tonumber(l)
  elseif string.sub(offered, 1, 16) ~= store then
    why, lost = WHY_RESTARTED, -1
  else
    why, lost = WHY_UNKNOWN, -1
  end
end
finish(id, WHY_REPLACED, U_REPLACED, per, ttl)
local token = store .. ARGV[8]
redis.call('HSET', rs(id), 'tok', token, 'rx', '0', 'as', '0', 'ack', '0', 'rcp', rcp, 'n', '0', 'by', '0', 'lost', '0',
  'ep', ARGV[12])
attach(id, at, nd, mb)
return {status, why, token, 0, lost, 0}
"#;

/// A connection took the id without asking for a reliable session: the id's session, if any, ends (`replaced`),
/// unless a newer claim opened it. ARGV: id, per report, ttl ms, the claim's epoch. Returns 1 if one ended.
const REPLACE: &str = r#"
local ep = redis.call('HGET', rs(ARGV[1]), 'ep')
if not ep or tonumber(ARGV[4]) < tonumber(ep) then return 0 end
finish(ARGV[1], WHY_REPLACED, U_REPLACED, tonumber(ARGV[2]), ARGV[3])
return 1
"#;

/// The client `from` sent messages on connection `at`, in order: take each (see the codes), in one script so that
/// a burst costs one call. ARGV: from, at, messages, bytes, total bytes, max frame, per report, then for each
/// message: seq, to, payload, mode (`r` to a client, `a` to the server application, `t` too large to relay).
/// Returns one code per message: 0 the connection no longer carries the session (not taken); 1 taken before; -1
/// a gap (not taken); 2 for the application (taken), 8 the same with a receipt asked; 3 `to` has no session
/// (taken: deliver it another way); 4 too large, 5 `to`'s hold is full (taken, and reported to the sender); 6
/// held; 7 the sender's own stream holds more than its bound (reports it does not acknowledge): not taken.
/// The receivers' counters are kept in the script and written once, with one wake-up each, at the end (and
/// before any report, which writes them itself).
const TAKE: &str = r#"
local from, at = ARGV[1], ARGV[2]
local maxn, maxb, most, max_frame, per =
  tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local count = (#ARGV - 7) / 4
local out = {}
local s = redis.call('HMGET', rs(from), 'at', 'rx', 'tok', 'rcp', 'n', 'by')
if s[1] ~= at then
  for i = 1, count do out[i] = 0 end
  return out
end
local rx, t = tonumber(s[2]), s[3]
-- The sender's own hold, as of the last write of it (a report to it, or a message to itself, changes it).
local own_n, own_by = tonumber(s[5]), tonumber(s[6])
local total = tonumber(redis.call('GET', 'tether:rtotal') or '0')
local written = total
local cache, order = {}, {}
-- Write the receivers' counters and the total, and wake each receiver once.
local function flush()
  for _, id in ipairs(order) do
    local c = cache[id]
    redis.call('HSET', rs(id), 'as', ms_str(c.as), 'n', ms_str(c.n), 'by', ms_str(c.by))
    if c.woke then wake(c.nd, id) end
  end
  add('tether:rtotal', nil, total - written)
  cache, order = {}, {}
end
-- Report to the sender (after writing what is cached: a report writes counters itself).
local function tell(to, outcome, seq)
  flush()
  report(from, t, to, outcome, {seq}, per)
  total = tonumber(redis.call('GET', 'tether:rtotal') or '0')
  written = total
  local o = redis.call('HMGET', rs(from), 'n', 'by')
  own_n, own_by = tonumber(o[1]), tonumber(o[2])
end
for i = 1, count do
  local b = 7 + (i - 1) * 4
  local seq, to, payload, mode = tonumber(ARGV[b + 1]), ARGV[b + 2], ARGV[b + 3], ARGV[b + 4]
  local n, by = own_n, own_by
  if cache[from] then n, by = cache[from].n, cache[from].by end
  if seq <= rx then
    out[i] = 1
  elseif seq ~= rx + 1 then
    out[i] = -1
  elseif n > maxn or by > maxb then
    out[i] = 7
  else
    rx = seq
    if mode == 'a' then
      if s[4] == '1' then out[i] = 8 else out[i] = 2 end
    elseif mode == 't' then
      tell(to, U_TOO_LARGE, ARGV[b + 1])
      out[i] = 4
    else
      local c = cache[to]
      if not c then
        local r = redis.call('HMGET', rs(to), 'tok', 'n', 'by', 'nd', 'as')
        if r[1] then
          c = {n = tonumber(r[2]), by = tonumber(r[3]), nd = r[4], as = tonumber(r[5]), woke = false}
          cache[to] = c
          order[#order + 1] = to
        end
      end
      local size = #payload + #from + 96
      if not c then
        out[i] = 3
      elseif 1 + 8 + 1 + #from + #payload > max_frame then
        tell(to, U_TOO_LARGE, ARGV[b + 1])
        out[i] = 4
      elseif c.n >= maxn or c.by + size > maxb or total + size > most then
        redis.call('HINCRBY', rs(to), 'lost', 1)
        tell(to, U_HOLD_FULL, ARGV[b + 1])
        out[i] = 5
      else
        c.as, c.n, c.by, c.woke = c.as + 1, c.n + 1, c.by + size, true
        total = total + size
        redis.call('XADD', rq(to), sid(c.as), 'k', 'd', 'p', from, 'b', payload, 'o', from, 'ot', t,
          'oq', ARGV[b + 1], 'z', size)
        out[i] = 6
      end
    end
  end
end
flush()
redis.call('HSET', rs(from), 'rx', ms_str(rx))
return out
"#;

/// Tell `to` what became of its messages. ARGV: to, token (hex), peer, outcome, sequence numbers (comma
/// separated), per report.
const REPORT: &str = r#"
local seqs = {}
for n in string.gmatch(ARGV[5], '[^,]+') do seqs[#seqs + 1] = n end
report(ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), seqs, tonumber(ARGV[6]))
return 0
"#;

/// `id`'s client acknowledged its stream up to `seq` on connection `at`. ARGV: id, at, seq, per report. Returns 1
/// released, 0 nothing to do (or not this connection's), -1 never sent.
const ACK: &str = r#"
local s = redis.call('HMGET', rs(ARGV[1]), 'at', 'as', 'ack')
if s[1] ~= ARGV[2] then return 0 end
local seq = tonumber(ARGV[3])
if seq > tonumber(s[2]) then return -1 end
if seq <= tonumber(s[3]) then return 0 end
release(ARGV[1], seq, tonumber(ARGV[4]))
redis.call('HSET', rs(ARGV[1]), 'ack', ARGV[3])
return 1
"#;

/// The items after `after` for connection `at`, up to a count and about a byte budget (at least one). ARGV: id,
/// at, after, count, bytes. Returns {0} when the connection no longer carries the session, else {1, entries}.
const FETCH: &str = r#"
if redis.call('HGET', rs(ARGV[1]), 'at') ~= ARGV[2] then return {0} end
local items = redis.call('XRANGE', rq(ARGV[1]), sid(tonumber(ARGV[3]) + 1), '+', 'COUNT', ARGV[4])
local out, used, budget = {}, 0, tonumber(ARGV[5])
for _, e in ipairs(items) do
  if #out > 0 and used >= budget then break end
  out[#out + 1] = e
  used = used + tonumber(fields(e).z)
end
return {1, out}
"#;

/// Connection `at` of `id` ended: the session, if it still carried it, is offline and expires. ARGV: id, at,
/// expiry ms. Returns 1 if it was.
const DETACH: &str = r#"
local s = redis.call('HMGET', rs(ARGV[1]), 'at', 'mb')
if s[1] ~= ARGV[2] then return 0 end
offline(ARGV[1], s[2], tonumber(ARGV[3]))
return 1
"#;

/// End the offline sessions whose expiry has passed, a batch at a time. ARGV: batch, per report, ttl ms. Returns
/// how many ended.
const EXPIRE: &str = r#"
local due = redis.call('ZRANGEBYSCORE', 'tether:rexp', '-inf', now_ms(), 'LIMIT', 0, tonumber(ARGV[1]))
for _, id in ipairs(due) do
  redis.call('ZREM', 'tether:rexp', id)
  finish(id, WHY_EXPIRED, U_EXPIRED, tonumber(ARGV[2]), ARGV[3])
end
return #due
"#;

/// Node incarnation `member` is gone (lost or left): the sessions it carried are offline from now, a batch at a
/// time. ARGV: member, expiry ms, batch. Returns {how many went offline, how many are left}.
const LOST: &str = r#"
local ids = redis.call('SPOP', 'tether:rnode:' .. ARGV[1], tonumber(ARGV[3]))
local n = 0
for _, id in ipairs(ids) do
  local mb = redis.call('HGET', rs(id), 'mb')
  if mb == ARGV[1] then
    offline(id, mb, tonumber(ARGV[2]))
    n = n + 1
  end
end
local left = redis.call('SCARD', 'tether:rnode:' .. ARGV[1])
if left == 0 then redis.call('SREM', 'tether:rmembers', ARGV[1]) end
return {n, left}
"#;

/// What `id`'s session holds, for operators. ARGV: id. Returns {} when there is no session, else {items, bytes,
/// online (0/1), ms until it expires (-1 while online), rx, as, lost}.
const HOLD: &str = r#"
local s = redis.call('HMGET', rs(ARGV[1]), 'tok', 'n', 'by', 'at', 'rx', 'as', 'lost')
if not s[1] then return {} end
local left = -1
local exp = redis.call('ZSCORE', 'tether:rexp', ARGV[1])
if exp then left = math.max(0, tonumber(exp) - now_ms()) end
local online = 0
if s[4] and s[4] ~= '' then online = 1 end
return {tonumber(s[2]), tonumber(s[3]), online, left, tonumber(s[5]), tonumber(s[6]), tonumber(s[7] or '0')}
"#;

/// The node incarnations that carry reliable sessions but are no longer in the node table (gone, and their LOST
/// did not run to the end: the reaping node died, or Redis failed meanwhile).
const ORPHANS: &str = r#"
local out = {}
for _, m in ipairs(redis.call('SMEMBERS', 'tether:rmembers')) do
  if not redis.call('ZSCORE', 'tether:nodes', m) then out[#out + 1] = m end
end
return out
"#;

/// Node incarnation `member` carries no connection for the sessions of its set that are not among the live ids
/// given: those attached more than a while ago go offline (a detach that Redis did not take). ARGV: member,
/// expiry ms, the while in ms, then the live ids. Returns how many went offline.
const RECONCILE: &str = r#"
local live = {}
for i = 4, #ARGV do live[ARGV[i]] = true end
local n = 0
for _, id in ipairs(redis.call('SMEMBERS', 'tether:rnode:' .. ARGV[1])) do
  if not live[id] then
    local s = redis.call('HMGET', rs(id), 'mb', 't')
    if s[1] == ARGV[1] then
      if now_ms() - tonumber(s[2] or '0') > tonumber(ARGV[3]) then
        offline(id, s[1], tonumber(ARGV[2]))
        n = n + 1
      end
    else
      redis.call('SREM', 'tether:rnode:' .. ARGV[1], id)
    end
  end
end
return n
"#;

/// The scripts, built once.
pub struct Scripts {
    open: Script,
    replace: Script,
    take: Script,
    report: Script,
    ack: Script,
    fetch: Script,
    detach: Script,
    expire: Script,
    lost: Script,
    orphans: Script,
    reconcile: Script,
    hold: Script,
}

impl Default for Scripts {
    fn default() -> Scripts {
        let head = head();
        let s = |body: &str| Script::new(&format!("{LUA_HEAD}{head}{body}"));
        Scripts {
            open: s(OPEN),
            replace: s(REPLACE),
            take: s(TAKE),
            report: s(REPORT),
            ack: s(ACK),
            fetch: s(FETCH),
            detach: s(DETACH),
            expire: s(EXPIRE),
            lost: s(LOST),
            orphans: s(ORPHANS),
            reconcile: s(RECONCILE),
            hold: s(HOLD),
        }
    }
}

impl Scripts {
    /// Every script, for loading into Redis's cache (pipelines call them by hash).
    pub fn all(&self) -> [&Script; 12] {
        [
            &self.open,
            &self.replace,
            &self.take,
            &self.report,
            &self.ack,
            &self.fetch,
            &self.detach,
            &self.expire,
            &self.lost,
            &self.orphans,
            &self.reconcile,
            &self.hold,
        ]
    }
}

/// A connection as the sessions in Redis know it: unique in the cluster's life (node incarnation and connection
/// number), with the node whose inbox hears of new items.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attach {
    pub node: String,
    pub member: String,
    pub conn: u64,
}

impl Attach {
    fn key(&self) -> String {
        format!("{}/{}", self.member, self.conn)
    }
}

/// What [`Store::rel_open`] decided: the session opened, or `None` when a newer claim of the id opened its own
/// first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    pub grant: Grant,
    /// Items the connection will send again (a resume).
    pub replay: u64,
}

/// What became of a client's message (`TAKE`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Taken {
    /// The connection no longer carries the session: not taken (the client sends it again where it resumed).
    Moved,
    /// Taken before (confirm it again).
    Again,
    /// Not the next in the stream: Redis lost what came before (it restarted empty, or failed over): not taken.
    Gap,
    /// For the server application; whether the sender wants a receipt.
    App { receipts: bool },
    /// The receiver has no reliable session: deliver it as plain `DATA`, or report why not.
    NoSession,
    /// Too large to hold for the receiver: reported to the sender.
    TooLarge,
    /// The receiver's hold is full: reported to the sender.
    Full,
    /// Held for the receiver.
    Held,
    /// The sender's own stream holds more than its bound (reports it does not acknowledge): not taken; it does
    /// not read what it is told.
    Slow,
}

fn hex(t: &[u8]) -> String {
    t.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Token> {
    let mut t = [0u8; 16];
    if s.len() != 32 {
        return None;
    }
    for (i, b) in t.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(t)
}

fn int(v: &Value) -> i64 {
    match v {
        Value::Int(n) => *n,
        Value::BulkString(b) => std::str::from_utf8(b).ok().and_then(|s| s.parse().ok()).unwrap_or(0),
        _ => 0,
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        _ => String::new(),
    }
}

fn bad(what: &str) -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::UnexpectedReturnType, "unexpected reply", what.to_owned()))
}

impl Store {
    /// Resume or start `id`'s session for connection `at` (see `OPEN`).
    pub async fn rel_open(
        &self,
        id: &str,
        at: &Attach,
        offer: &Offer,
        epoch: u64,
        b: &Bounds,
    ) -> RedisResult<Option<Opened>> {
        let mut con = self.con.clone();
        let random: [u8; 8] = rand::random();
        let store: [u8; 8] = rand::random();
        let (offered, received) = offer.resume.map_or((String::new(), 0), |r| (hex(&r.token), r.received));
        let v: Vec<Value> = self
            .rel
            .open
            .arg(id)
            .arg(at.key())
            .arg(&at.node)
            .arg(&at.member)
            .arg(u8::from(offer.receipts))
            .arg(offered)
            .arg(received)
            .arg(hex(&random))
            .arg(b.per_report())
            .arg(REMEMBER_ENDED.as_millis() as u64)
            .arg(hex(&store))
            .arg(epoch)
            .invoke_async(&mut con)
            .await?;
        if let [superseded] = &v[..] {
            return if int(superseded) == -1 { Ok(None) } else { Err(bad("OPEN")) };
        }
        let [status, why, token, rx, lost, replay] = &v[..] else { return Err(bad("OPEN")) };
        let status = match int(status) {
            0 => Status::New,
            1 => Status::Resumed,
            2 => Status::ResumedWithLoss,
            _ => Status::Fresh,
        };
        let why = match int(why) {
            0 => None,
            w => Some(LostWhy::from_code(w as u8)),
        };
        let lost = u32::try_from(int(lost)).unwrap_or(u32::MAX);
        let token = unhex(&text(token)).ok_or_else(|| bad("OPEN token"))?;
        let grant = Grant { token, status, why, received: int(rx).max(0) as u64, lost };
        Ok(Some(Opened { grant, replay: int(replay).max(0) as u64 }))
    }

    /// End `id`'s session, if any (`replaced`): a connection took the id without asking for one.
    pub async fn rel_replace(&self, id: &str, epoch: u64, b: &Bounds) -> RedisResult<bool> {
        let mut con = self.con.clone();
        let had: i64 = self
            .rel
            .replace
            .arg(id)
            .arg(b.per_report())
            .arg(REMEMBER_ENDED.as_millis() as u64)
            .arg(epoch)
            .invoke_async(&mut con)
            .await?;
        Ok(had == 1)
    }

    /// End the offline sessions past their expiry, up to [`EXPIRE_BATCH`]; how many ended.
    pub async fn rel_expire(&self, b: &Bounds) -> RedisResult<u64> {
        let mut con = self.con.clone();
        let mut inv = self.rel.expire.prepare_invoke();
        inv.arg(EXPIRE_BATCH).arg(b.per_report()).arg(REMEMBER_ENDED.as_millis() as u64);
        inv.invoke_async(&mut con).await
    }

    /// Node incarnation `member` is gone: its sessions are offline from now, a batch per call; how many.
    pub async fn rel_lost(&self, member: &str, b: &Bounds) -> RedisResult<u64> {
        let mut total = 0;
        // Bounded: each call empties up to a batch of a set nothing adds to any more.
        for _ in 0..10_000 {
            let mut con = self.con.clone();
            let mut inv = self.rel.lost.prepare_invoke();
            inv.arg(member).arg(b.expiry.as_millis() as u64).arg(LOST_BATCH);
            let (n, left): (u64, u64) = inv.invoke_async(&mut con).await?;
            total += n;
            if left == 0 {
                break;
            }
        }
        Ok(total)
    }

    /// What `id`'s session holds, as Redis has it; `None` when it has none.
    pub async fn rel_hold(&self, id: &str) -> RedisResult<Option<crate::HoldInfo>> {
        let mut con = self.con.clone();
        let v: Vec<i64> = self.rel.hold.arg(id).invoke_async(&mut con).await?;
        let [messages, bytes, online, left, received, assigned, lost] = v[..] else { return Ok(None) };
        let count = |n: i64| u64::try_from(n).unwrap_or(0);
        Ok(Some(crate::HoldInfo {
            messages: count(messages) as usize,
            bytes: count(bytes) as usize,
            online: online == 1,
            expires_in: (left >= 0).then(|| Duration::from_millis(count(left))),
            received: count(received),
            assigned: count(assigned),
            lost: u32::try_from(lost).unwrap_or(u32::MAX),
        }))
    }

    /// Gone node incarnations that still carry reliable sessions (their `LOST` did not finish).
    pub async fn rel_orphans(&self) -> RedisResult<Vec<String>> {
        let mut con = self.con.clone();
        self.rel.orphans.prepare_invoke().invoke_async(&mut con).await
    }

    /// The sessions of node incarnation `member` that none of the `live` ids (this node's sessions) carries, and
    /// that were attached more than `age` ago, go offline; how many.
    pub async fn rel_reconcile(&self, member: &str, live: &[String], age: Duration, b: &Bounds) -> RedisResult<u64> {
        let mut con = self.con.clone();
        let mut inv = self.rel.reconcile.prepare_invoke();
        inv.arg(member).arg(b.expiry.as_millis() as u64).arg(age.as_millis() as u64).arg(live);
        inv.invoke_async(&mut con).await
    }

    fn evalsha(&self, script: &Script) -> redis::Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(script.get_hash()).arg(0);
        cmd
    }
}

/// One step of a connection's session, in the order the connection asked for them.
#[derive(Debug)]
enum Step {
    /// A client's message; `too_large` to relay (its payload was not kept).
    Take {
        seq: u64,
        to: String,
        payload: Bytes,
        too_large: bool,
    },
    Report {
        peer: String,
        outcome: Option<Undeliverable>,
        seq: u64,
    },
    Ack {
        seq: u64,
    },
    /// The connection can send more: fetch what waits (and keep looking until something does).
    Fetch,
}

/// A client's message on its way to Redis: its sequence number, receiver and payload.
type Message = (u64, String, Bytes);

/// What came of a step, handed back to the connection in order.
#[derive(Debug)]
pub enum Done {
    /// The client's message `seq` (its payload and receiver, for the outcomes that need them).
    Taken { seq: u64, to: String, payload: Bytes, taken: Taken },
    /// Items to send, in order.
    Items(Vec<Frame>),
    /// The connection no longer carries the session (a resume elsewhere, this node declared lost, or Redis
    /// restarted empty): it should leave, so that its client resumes.
    Moved,
    /// Redis did not answer (or refused): nothing after this was carried out.
    Failed(String),
}

/// One connection's way to its session in Redis: steps go out in order, in pipelined batches, from a task of its
/// own; their outcomes come back through [`Link::done`]. Dropping the link detaches the session (after every step
/// queued before).
///
/// The queues are unbounded channels because the connection's task must never wait on Redis, but what they hold
/// is bounded by the connection: its client's messages in flight (at most 65,536 and 16 MiB, beyond which it is
/// closed), one report per message, acknowledgements only as they grow and never past what was sent, and at most
/// one fetch waiting. A stalled Redis fails the batch after the Redis timeout, and the connection closes.
pub struct Link {
    steps: mpsc::UnboundedSender<Step>,
    /// A fetch is queued and the task has not taken it yet: a wake-up storm queues one, not one each.
    fetch_queued: Arc<AtomicBool>,
    /// The outcomes, in the order the steps were asked (at most one per step).
    pub done: mpsc::UnboundedReceiver<Done>,
}

impl Link {
    /// Start the task for session `id` on connection `at`, whose stream to the client was sent up to `sent`.
    #[allow(clippy::too_many_arguments)]
    fn start(
        store: Store,
        id: String,
        token: Token,
        at: Attach,
        sent: u64,
        b: Bounds,
        timeout: Duration,
        rescan: Arc<AtomicU64>,
    ) -> Link {
        let (steps, rx) = mpsc::unbounded_channel();
        let (tx, done) = mpsc::unbounded_channel();
        let seen = rescan.load(Ordering::Relaxed);
        let token = hex(&token);
        let (at, want, dirty, idle) = (at.key(), false, true, 0);
        let fetch_queued = Arc::new(AtomicBool::new(false));
        let queued = fetch_queued.clone();
        let worker = Worker { store, id, token, at, sent, b, timeout, want, dirty, rescan, seen, idle, queued };
        tokio::spawn(worker.run(rx, tx));
        Link { steps, fetch_queued, done }
    }

    pub fn take(&self, seq: u64, to: String, payload: Bytes) {
        let _ = self.steps.send(Step::Take { seq, to, payload, too_large: false });
    }

    /// A client's message too large to relay: taken, and reported to its sender.
    pub fn take_too_large(&self, seq: u64, to: String) {
        let _ = self.steps.send(Step::Take { seq, to, payload: Bytes::new(), too_large: true });
    }

    /// Tell this session's client what became of its message `seq` to `peer`.
    pub fn report(&self, peer: String, outcome: Option<Undeliverable>, seq: u64) {
        let _ = self.steps.send(Step::Report { peer, outcome, seq });
    }

    pub fn ack(&self, seq: u64) {
        let _ = self.steps.send(Step::Ack { seq });
    }

    /// The connection can send more, and new items may wait (a wake-up): look, once.
    pub fn fetch(&self) {
        if !self.fetch_queued.swap(true, Ordering::AcqRel) {
            let _ = self.steps.send(Step::Fetch);
        }
    }
}

struct Worker {
    store: Store,
    id: String,
    token: String,
    at: String,
    /// The last item handed to the connection.
    sent: u64,
    b: Bounds,
    timeout: Duration,
    /// The connection asked for items and has not had them yet.
    want: bool,
    /// Items may wait that the last fetch did not see.
    dirty: bool,
    /// The node's count of moments it may have missed a wake-up, as last seen, and ticks since the last look.
    rescan: Arc<AtomicU64>,
    seen: u64,
    idle: u32,
    /// The link's flag: a fetch is queued (cleared as it is taken).
    queued: Arc<AtomicBool>,
}

impl Worker {
    async fn run(mut self, mut steps: mpsc::UnboundedReceiver<Step>, done: mpsc::UnboundedSender<Done>) {
        let mut batch = VecDeque::new();
        let mut rescan = tokio::time::interval(RESCAN);
        rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failed = false;
        loop {
            tokio::select! {
                step = steps.recv() => match step {
                    Some(s) => batch.push_back(s),
                    None => break,
                },
                _ = rescan.tick() => {
                    // A wake-up may have been missed (the node reconnected to Redis, or shed messages): look now;
                    // and every RESCAN_EVERY ticks in any case.
                    let seen = self.rescan.load(Ordering::Relaxed);
                    self.idle += 1;
                    if seen != self.seen || self.idle >= RESCAN_EVERY {
                        (self.seen, self.idle, self.dirty) = (seen, 0, true);
                    }
                }
            }
            while batch.len() < BATCH {
                match steps.try_recv() {
                    Ok(s) => batch.push_back(s),
                    Err(_) => break,
                }
            }
            if failed {
                // Nothing more is carried out: the connection is closing, and its client resumes.
                batch.clear();
                continue;
            }
            if let Err(e) = self.carry_out(&mut batch, &done).await {
                let _ = done.send(Done::Failed(e));
                batch.clear();
                failed = true;
            }
        }
        // The connection ended: its session goes offline, after everything it asked for.
        let mut con = self.store.con.clone();
        let mut detach = self.store.rel.detach.prepare_invoke();
        detach.arg(&self.id).arg(&self.at).arg(self.b.expiry.as_millis() as u64);
        match tokio::time::timeout(self.timeout, detach.invoke_async::<i64>(&mut con)).await {
            Ok(Ok(_)) => {}
            // The node's reconciliation finds it (a session attached here that no connection carries).
            Ok(Err(e)) => tracing::debug!("reliable session {}: detach failed: {e}", self.id),
            Err(_) => tracing::debug!("reliable session {}: detach timed out", self.id),
        }
    }

    /// Carry out `batch` in one pipeline (then a fetch, if one is due), sending each outcome back in order. A run
    /// of consecutive messages is one `TAKE` call.
    async fn carry_out(
        &mut self,
        batch: &mut VecDeque<Step>,
        done: &mpsc::UnboundedSender<Done>,
    ) -> Result<(), String> {
        let s = &self.store;
        let mut pipe = redis::pipe();
        // Per command: the messages of a TAKE (none for another step), and the step otherwise.
        let mut asked: Vec<(Vec<Message>, Option<Step>)> = Vec::new();
        // The TAKE being built: the command, its messages, their payload bytes.
        let mut take: Option<(redis::Cmd, Vec<Message>, usize)> = None;
        for step in batch.drain(..) {
            if let Step::Take { seq, to, payload, too_large } = step {
                let (cmd, msgs, bytes) = take.get_or_insert_with(|| {
                    let mut cmd = s.evalsha(&s.rel.take);
                    cmd.arg(&self.id).arg(&self.at).arg(self.b.messages).arg(self.b.bytes).arg(self.b.total_bytes);
                    cmd.arg(self.b.max_frame).arg(self.b.per_report());
                    (cmd, Vec::new(), 0)
                });
                let mode = match (too_large, to.is_empty()) {
                    (true, _) => "t",
                    (false, true) => "a",
                    (false, false) => "r",
                };
                cmd.arg(seq).arg(&to).arg(payload.as_ref()).arg(mode);
                *bytes += payload.len();
                msgs.push((seq, to, payload));
                if msgs.len() >= TAKE_COUNT || *bytes >= TAKE_BYTES {
                    let (cmd, msgs, _) = take.take().expect("just filled");
                    pipe.add_command(cmd);
                    asked.push((msgs, None));
                }
                continue;
            }
            if let Some((cmd, msgs, _)) = take.take() {
                pipe.add_command(cmd);
                asked.push((msgs, None));
            }
            match step {
                Step::Report { peer, outcome, seq } => {
                    let mut cmd = s.evalsha(&s.rel.report);
                    cmd.arg(&self.id).arg(&self.token).arg(&peer).arg(outcome.map_or(0, Undeliverable::code));
                    cmd.arg(seq).arg(self.b.per_report());
                    pipe.add_command(cmd);
                    asked.push((Vec::new(), Some(Step::Report { peer, outcome, seq })));
                }
                Step::Ack { seq } => {
                    let mut cmd = s.evalsha(&s.rel.ack);
                    cmd.arg(&self.id).arg(&self.at).arg(seq).arg(self.b.per_report());
                    pipe.add_command(cmd);
                    asked.push((Vec::new(), Some(Step::Ack { seq })));
                }
                Step::Fetch => {
                    self.queued.store(false, Ordering::Release);
                    self.want = true;
                    self.dirty = true;
                }
                Step::Take { .. } => unreachable!("handled above"),
            }
        }
        if let Some((cmd, msgs, _)) = take.take() {
            pipe.add_command(cmd);
            asked.push((msgs, None));
        }
        if !asked.is_empty() {
            let mut con = s.con.clone();
            let replies: Vec<Value> = match tokio::time::timeout(self.timeout, pipe.query_async(&mut con)).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => return Err(e.to_string()),
                Err(_) => return Err("timed out".into()),
            };
            if replies.len() != asked.len() {
                return Err("a pipeline's replies do not match its commands".into());
            }
            for ((msgs, step), reply) in asked.into_iter().zip(replies) {
                match step {
                    None => {
                        let Value::Array(codes) = reply else { return Err("unexpected TAKE reply".into()) };
                        if codes.len() != msgs.len() {
                            return Err("a TAKE's codes do not match its messages".into());
                        }
                        for ((seq, to, payload), code) in msgs.into_iter().zip(codes) {
                            let taken = taken_of(int(&code)).ok_or("unexpected TAKE code")?;
                            let _ = done.send(Done::Taken { seq, to, payload, taken });
                        }
                    }
                    // The connection checks acknowledgements against what it sent: Redis disagreeing means its
                    // stream is not the one this connection sent (Redis restarted or failed over).
                    Some(Step::Ack { seq }) if int(&reply) < 0 => {
                        return Err(format!("acknowledgement of {seq} beyond the session's stream in Redis"));
                    }
                    Some(_) => {}
                }
            }
        }
        if self.want && self.dirty {
            self.fetch(done).await?;
        }
        Ok(())
    }

    async fn fetch(&mut self, done: &mpsc::UnboundedSender<Done>) -> Result<(), String> {
        let s = &self.store;
        let mut con = s.con.clone();
        let mut inv = s.rel.fetch.prepare_invoke();
        inv.arg(&self.id).arg(&self.at).arg(self.sent).arg(FETCH_COUNT).arg(FETCH_BYTES);
        let reply: Vec<Value> = match tokio::time::timeout(self.timeout, inv.invoke_async(&mut con)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("timed out".into()),
        };
        let entries = match <[Value; 2]>::try_from(reply) {
            Ok([ok, Value::Array(entries)]) if int(&ok) == 1 => entries,
            _ => {
                self.want = false;
                let _ = done.send(Done::Moved);
                return Ok(());
            }
        };
        if entries.is_empty() {
            self.dirty = false;
            return Ok(());
        }
        let mut frames = Vec::with_capacity(entries.len());
        for e in entries {
            let (seq, f) = frame_of(e).ok_or("unexpected stream entry")?;
            self.sent = seq;
            frames.push(f);
        }
        self.want = false;
        let _ = done.send(Done::Items(frames));
        Ok(())
    }
}

fn taken_of(code: i64) -> Option<Taken> {
    Some(match code {
        0 => Taken::Moved,
        1 => Taken::Again,
        -1 => Taken::Gap,
        2 => Taken::App { receipts: false },
        8 => Taken::App { receipts: true },
        3 => Taken::NoSession,
        4 => Taken::TooLarge,
        5 => Taken::Full,
        6 => Taken::Held,
        7 => Taken::Slow,
        _ => return None,
    })
}

/// A stream entry (`[id, [field, value, ...]]`) as its sequence number and frame.
fn frame_of(e: Value) -> Option<(u64, Frame)> {
    let Value::Array(parts) = e else { return None };
    let [id, Value::Array(kv)]: [Value; 2] = parts.try_into().ok()? else { return None };
    let seq: u64 = text(&id).split('-').next()?.parse().ok()?;
    // Field names compared as bytes, and the payload moved out of the reply: nothing copied or allocated per field
    // for each item sent.
    let mut fields: [Option<Value>; 5] = Default::default();
    let mut kv = kv.into_iter();
    while let (Some(name), Some(value)) = (kv.next(), kv.next()) {
        let Value::BulkString(name) = name else { continue };
        let slot = match name.as_slice() {
            b"k" => 0,
            b"p" => 1,
            b"b" => 2,
            b"w" => 3,
            b"q" => 4,
            _ => continue,
        };
        fields[slot] = Some(value);
    }
    let [kind, peer, body, outcome, seqs] = fields;
    let peer = text(&peer?);
    match &kind? {
        Value::BulkString(k) if k == b"d" => {
            let payload = match body? {
                Value::BulkString(b) => Bytes::from(b),
                _ => Bytes::new(),
            };
            Some((seq, Frame::Sdata { seq, peer, payload }))
        }
        Value::BulkString(k) if k == b"r" => {
            let outcome = match int(&outcome?) {
                0 => None,
                w => Some(Undeliverable::from_code(w as u8)),
            };
            let seqs = text(&seqs?).split(',').filter_map(|n| n.parse().ok()).collect();
            Some((seq, Frame::Report(Report { seq, peer, outcome, seqs })))
        }
        _ => None,
    }
}

impl super::Cluster {
    /// How this node's connection `conn` is named in the sessions' store.
    pub(crate) fn rel_attach(&self, conn: u64) -> Attach {
        let node = self.node_id().to_owned();
        let member = super::store::member(&node, &self.incarnation());
        Attach { node, member, conn }
    }

    /// The reliable sessions' bounds: the server's hold settings and frame size, set once before the node starts.
    pub(crate) fn set_rel_bounds(&self, b: Bounds) {
        let _ = self.rel_bounds.set(b);
    }

    pub(crate) fn rel_bounds(&self) -> Option<Bounds> {
        self.rel_bounds.get().copied()
    }

    /// Resume or start `id`'s session for connection `at`, claimed with `epoch`; `None` when Redis did not answer
    /// in time (or refused), `Some(None)` when a newer claim of the id opened its session first.
    pub(crate) async fn rel_open(&self, id: &str, at: &Attach, offer: &Offer, epoch: u64) -> Option<Option<Opened>> {
        let (store, b) = (self.store()?, self.rel_bounds()?);
        match tokio::time::timeout(self.cfg.redis_timeout, store.rel_open(id, at, offer, epoch, &b)).await {
            Ok(Ok(None)) => Some(None),
            Ok(Ok(Some(opened))) => {
                let st = &self.stats;
                match opened.grant.status {
                    Status::Resumed | Status::ResumedWithLoss => {
                        st.rel_resumed.fetch_add(1, Ordering::Relaxed);
                        st.rel_replayed.fetch_add(opened.replay, Ordering::Relaxed);
                    }
                    Status::Fresh => {
                        st.rel_refused.fetch_add(1, Ordering::Relaxed);
                    }
                    Status::New => {}
                }
                Some(Some(opened))
            }
            Ok(Err(e)) => {
                tracing::warn!("reliable session of {id}: Redis did not open it: {e}");
                None
            }
            Err(_) => None,
        }
    }

    /// What `id`'s session holds, as Redis has it; `None` when it has none or Redis did not answer in time.
    pub(crate) async fn rel_hold(&self, id: &str) -> Option<crate::HoldInfo> {
        let store = self.store()?;
        tokio::time::timeout(self.cfg.redis_timeout, store.rel_hold(id)).await.ok()?.ok()?
    }

    /// Reliable counters this node adds to the server's: (resumed, refused, replayed, expired, overflows).
    pub(crate) fn rel_counts(&self) -> [u64; 5] {
        let st = &self.stats;
        [&st.rel_resumed, &st.rel_refused, &st.rel_replayed, &st.rel_expired, &st.rel_overflows]
            .map(|a| a.load(Ordering::Relaxed))
    }

    /// A message was refused: its receiver's hold was full.
    pub(crate) fn rel_overflow(&self) {
        self.stats.rel_overflows.fetch_add(1, Ordering::Relaxed);
    }

    /// `id` was taken by a connection that did not ask for a reliable session: its session, if any, ends
    /// (`replaced`). Best effort: while Redis does not answer, the session stays, and expires if nobody resumes it.
    pub(crate) async fn rel_replace(&self, id: &str, epoch: u64) {
        let (Some(store), Some(b)) = (self.store(), self.rel_bounds()) else { return };
        if let Ok(Err(e)) = tokio::time::timeout(self.cfg.redis_timeout, store.rel_replace(id, epoch, &b)).await {
            tracing::warn!("reliable session of {id}: Redis did not end it: {e}");
        }
    }

    /// The way for connection `at` to `id`'s session (granted `token`), whose stream was sent up to `sent`;
    /// `None` while Redis is unreachable.
    pub(crate) fn rel_link(&self, id: &str, token: Token, at: Attach, sent: u64) -> Option<Link> {
        let (store, b) = (self.store()?, self.rel_bounds()?);
        let rescan = self.rel_rescan.clone();
        Some(Link::start(store, id.to_owned(), token, at, sent, b, self.cfg.redis_timeout, rescan))
    }
}
