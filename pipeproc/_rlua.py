"""The Redis backend's Lua library: the key layout and the functions every script shares.

Each operation that the embedded node performs in one write transaction runs here as
**one script**. Redis runs a script alone but never rolls it back, so every script reads
and checks everything first and only then performs writes that cannot fail; scripts carry
the ``#!lua`` shebang, so Redis refuses a write script for lack of memory *before* it
starts (``storage_full``), never half-way.

Key layout of a namespace ``ns`` (every key carries the hash tag ``{ns}``, so a namespace
lives on one shard, also in Redis Cluster; ``P`` below is ``{ns}``):

==========================  ============================================================
``P:clock``                 the last ms given to a commit (ids never go back)
``P:topics``                set of topic names
``P:t:<topic>``             hash ``next`` (next seq), ``last`` (last id), ``created``
``P:s:<topic>``             stream: entry id = the log id ``<ms>-<seq>``, field ``b`` = body
``P:procs``                 set of proc names; ``P:tp:<topic>``: the procs of a topic
``P:p:<name>``              hash: the proc record (fields below)
``P:sys``                   hash system proc name -> its definition (msgpack)
``P:dl``                    sorted set proc -> claim deadline (ms): the reclaim timers
``P:bo``                    sorted set proc -> end of a system proc's failure back-off (ms)
``P:bell``                  the doorbell stream: one entry per change a waiter waits for
``P:cnum``                  the claim counter (every claim gets a new number)
``P:r:<client>``            the last write request of a client connection and its reply
``P:w``                     sorted set worker id -> last heartbeat (server ms)
``P:wi:<wid>``/``P:wc:<wid>``  a worker's info, and the claims it holds (proc -> cnum)
``P:live``                  sorted set live proc -> lease end (ms)
``P:gc``                    hash of the GC settings; ``P:gclease``: the GC lease
==========================  ============================================================

A proc record (hash ``P:p:<name>``; every value a string): ``topic offset created_at
start startid status reclaims max_reclaims reclaim_timeout on_max tbase cnum live
claimed acked prev cdig last_claimed_at last_acked_at last_error disabled_by``. Ranges
(``claimed acked prev``) are ``"lo_ms lo_seq hi_ms hi_seq"`` or ``""``; a claim is pending
while ``claimed ~= acked``. ``last_error`` is msgpack (or ``""``).

Errors are raised as ``PP <code> <message>``; the client turns them into the same
:class:`pipeproc.PipeProcError` classes the node raises.

The scripts themselves are :mod:`pipeproc._rscripts` (clients' ops) and
:mod:`pipeproc._rsupscripts` (workers and supervisors); each is sent as ``#!lua`` +
:data:`PRELUDE` + its body.

Client side (no node module, no import of the package).
"""

from __future__ import annotations

import hashlib
from typing import Dict, Set, Tuple

PRELUDE = r"""
-- per call, set by begin(): the call's keys and arguments, the namespace's key prefix
-- (KEYS[1] is "{ns}:", which an ACL pattern ~{ns}:* covers), the time, the records read
local KEYS, ARGV, P, NOW, SEEN
local function I(x) return string.format('%d', x) end
local function fail(code, msg) error({err = 'PP ' .. code .. ' ' .. msg}) end

local CLOCK  -- the namespace's clock as read by begin() (the last ms given to a commit)
local function clock()
  local t = redis.call('TIME')
  local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  CLOCK = tonumber(redis.call('GET', P .. ':clock') or '0')
  if ms < CLOCK then ms = CLOCK end
  return ms
end

local function bell(kind, what)
  redis.call('XADD', P .. ':bell', 'MAXLEN', '~', 1000, '*', 'e', kind, 'w', what)
end
-- the supervisors' own doorbell: only what can make a timer of theirs earlier (a new
-- earliest claim deadline, a new worker, a new live proc, a worker to recycle, a stop);
-- commits and acks never wake them
local function tbell(kind, what)
  redis.call('XADD', P .. ':tbell', 'MAXLEN', '~', 100, '*', 'e', kind, 'w', what)
end

local function idparts(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end

local function rng(s)
  if s == nil or s == '' then return nil end
  local a, b, c, d = string.match(s, '^(%d+) (%d+) (%d+) (%d+)$')
  return {tonumber(a), tonumber(b), tonumber(c), tonumber(d)}
end
local function rstr(s)
  local r = rng(s)
  if not r then return '' end
  return I(r[1]) .. '-' .. I(r[2]) .. '..' .. I(r[3]) .. '-' .. I(r[4])
end

-- what each proc record was when read (putp writes only the fields that changed)
local function getp(name)
  local h = redis.call('HGETALL', P .. ':p:' .. name)
  if #h == 0 then SEEN[name] = nil; return nil end
  local r, seen = {}, {}
  for i = 1, #h, 2 do r[h[i]] = h[i + 1]; seen[h[i]] = h[i + 1] end
  SEEN[name] = seen
  return r
end
local function pending(r) return r.claimed ~= '' and r.claimed ~= r.acked end

local function deadline(r)
  if not pending(r) or r.status ~= 'active' then return nil end
  local t = tonumber(r.reclaim_timeout)
  if t < 0 then return nil end
  return tonumber(r.tbase) + math.floor(t * 1000)
end

local function putp(name, r)
  local args = {}
  local seen = SEEN[name] or {}
  for k, v in pairs(r) do
    if seen[k] ~= v then args[#args + 1] = k; args[#args + 1] = v; seen[k] = v end
  end
  SEEN[name] = seen
  if #args > 0 then redis.call('HSET', P .. ':p:' .. name, unpack(args)) end
  local d = deadline(r)
  if d then
    local first = redis.call('ZRANGE', P .. ':dl', 0, 0, 'WITHSCORES')
    redis.call('ZADD', P .. ':dl', d, name)
    if first[2] == nil or (d < tonumber(first[2]) and first[1] ~= name) then
      -- waiters and supervisors computed their wake before this deadline existed
      bell('deadline', name)
      tbell('deadline', name)
    end
  else
    redis.call('ZREM', P .. ':dl', name)
  end
end

-- remove a proc: its record, its index entries, its timers (the caller rings the doorbell)
local function drop(name, r)
  redis.call('DEL', P .. ':p:' .. name)
  redis.call('SREM', P .. ':procs', name)
  redis.call('SREM', P .. ':tp:' .. r.topic, name)
  redis.call('ZREM', P .. ':dl', name)
  redis.call('ZREM', P .. ':bo', name)
  redis.call('ZREM', P .. ':live', name)
end

local function state(name, r)
  return {name, r.topic, r.offset, r.created_at, r.last_claimed_at, r.last_acked_at,
          rstr(r.claimed), rstr(r.acked), rstr(r.prev), r.status, r.reclaims,
          r.max_reclaims, r.reclaim_timeout, r.on_max, r.last_error}
end

local function getproc(name)
  local r = getp(name)
  if not r then fail('invalid_proc', "proc '" .. name .. "' does not exist") end
  return r
end

-- the record after one reclaim (manual, by timeout or by a dead worker)
local function reclaimed(r, err, count)
  r.claimed = r.acked
  if err then r.last_error = err end
  if count == false then return r end
  r.reclaims = I(tonumber(r.reclaims) + 1)
  if tonumber(r.max_reclaims) ~= -1 and tonumber(r.reclaims) >= tonumber(r.max_reclaims)
      and r.on_max == 'disable' then
    r.status = 'disabled'
    r.disabled_by = 'max_reclaims'
  end
  return r
end

local function errinfo(kind, message, r, tb)
  local e = {type = kind, message = message, at = NOW, range = rstr(r.claimed)}
  if tb and tb ~= '' then e.traceback = tb end
  return cmsgpack.pack(e)
end

-- apply every due claim timeout (the node's timers, kept in P:dl)
-- (``target``: a proc this call is about, checked first whatever the batch holds)
local function expire_due(target)
  local due = redis.call('ZRANGEBYSCORE', P .. ':dl', '-inf', NOW, 'LIMIT', 0, 100)
  if target then table.insert(due, 1, target) end
  for _, name in ipairs(due) do
    local r = getp(name)
    if r and deadline(r) and deadline(r) <= NOW then
      local e = nil
      local sys = redis.call('HEXISTS', P .. ':sysp', name) == 1
      local claimed = rstr(r.claimed)
      if sys then
        -- a system proc's time limit: say so; the worker running it is recycled
        e = errinfo('TimeLimitExceeded', 'the processor ran longer than reclaim_timeout='
                    .. r.reclaim_timeout .. ' s (a system proc\'s time limit); its worker was recycled', r)
      end
      putp(name, reclaimed(r, e))
      bell('reclaim', name)
      if sys and r.holder and r.holder ~= '' then
        -- for the holder's supervisor: recycle it, and say what happened (one line each)
        redis.call('SADD', P .. ':recycle', table.concat({r.holder, name, r.status, claimed,
                   r.reclaims, r.max_reclaims, r.reclaim_timeout}, '\t'))
        tbell('recycle', r.holder)
      end
    elseif not (r and deadline(r)) then
      redis.call('ZREM', P .. ':dl', name)  -- a stale timer (the proc is gone or not pending)
    end
  end
end

local function meta(topic)
  local h = redis.call('HMGET', P .. ':t:' .. topic, 'next', 'last')
  if not h[1] then return nil end
  return {next = tonumber(h[1]), last = h[2] or ''}
end

-- the id of the first stored log with seq >= n (a binary search over ms), or nil
local function seq_id_ge(topic, n)
  local s = P .. ':s:' .. topic
  local f = redis.call('XRANGE', s, '-', '+', 'COUNT', 1)[1]
  if not f then return nil end
  local fms, fseq = idparts(f[1])
  if fseq >= n then return f[1] end
  local l = redis.call('XREVRANGE', s, '+', '-', 'COUNT', 1)[1]
  local lms, lseq = idparts(l[1])
  if lseq < n then return nil end
  local lo, hi = fms, lms + 1
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    local e = redis.call('XRANGE', s, I(mid) .. '-0', '+', 'COUNT', 1)[1]
    local ok = true
    if e then local _, es = idparts(e[1]); ok = es >= n end
    if ok then hi = mid else lo = mid + 1 end
  end
  local prev = redis.call('XRANGE', s, I(lo - 1) .. '-' .. I(n), I(lo - 1) .. '-18446744073709551615', 'COUNT', 1)[1]
  if prev then return prev[1] end
  local e = redis.call('XRANGE', s, I(lo) .. '-0', '+', 'COUNT', 1)[1]
  return e and e[1] or nil
end

local function first_seq(topic, m)
  local f = redis.call('XRANGE', P .. ':s:' .. topic, '-', '+', 'COUNT', 1)[1]
  if not f then return m.next end
  local _, s = idparts(f[1])
  return s
end

-- where the proc's next claim starts: an XRANGE start ('-', an id, or '(' id), or nil
local function claim_start(r)
  if r.acked ~= '' then
    local a = rng(r.acked)
    return '(' .. I(a[3]) .. '-' .. I(a[4])
  end
  local off = r.offset
  if off == '>' then return '-' end
  if off == '$>' then
    if r.startid == '' then return '-' end
    return '(' .. r.startid
  end
  if string.match(off, '^%d+-%d+$') then return '(' .. off end
  if string.match(off, '^%d+$') then return off .. '-0' end
  return seq_id_ge(r.topic, tonumber(string.sub(off, 2)))
end

-- the next seq the proc would claim, ignoring a pending claim (for lag and idleness)
local function position(r, m)
  if m == nil then return 0 end
  local first = first_seq(r.topic, m)
  if r.acked ~= '' then
    local p = rng(r.acked)[4] + 1
    if p < first then p = first end
    return p
  end
  local off = r.offset
  if off == '>' then return first end
  if off == '$>' then local p = tonumber(r.start); if p < first then p = first end; return p end
  if string.sub(off, 1, 1) == ':' then
    local p = tonumber(string.sub(off, 2)); if p < first then p = first end; return p
  end
  local st = claim_start(r)
  local ok, e = pcall(redis.call, 'XRANGE', P .. ':s:' .. r.topic, st, '+', 'COUNT', 1)
  if not ok or not e[1] then return m.next end
  local _, s = idparts(e[1][1])
  return s
end

local function busy(r)
  if r == nil or r.status ~= 'active' then return false end
  local m = meta(r.topic)
  if m == nil then return false end
  return pending(r) or position(r, m) < m.next
end

local function dead(r)
  if r == nil or r.status ~= 'disabled' or r.disabled_by ~= 'max_reclaims' then return false end
  local m = meta(r.topic)
  if m == nil then return false end
  return pending(r) or position(r, m) < m.next
end

local function new_record(topic, offset, mr, rt, onmax, live)
  local m = meta(topic)
  return {
    topic = topic, offset = offset, created_at = I(NOW),
    start = I(m and m.next or 0), startid = m and m.last or '',
    status = 'active', reclaims = '0', max_reclaims = mr, reclaim_timeout = rt,
    on_max = onmax, tbase = '0', cnum = '0', live = live or '0',
    claimed = '', acked = '', prev = '', cdig = '', last_claimed_at = '0',
    last_acked_at = '0', last_error = '', disabled_by = '',
  }
end

-- the proc's record, created with these frozen options when missing (not yet written)
local function ensure(name, topic, offset, mr, rt, onmax)
  local r = getp(name)
  if r == nil then
    return new_record(topic, offset, mr, rt, onmax), true
  end
  if r.topic ~= topic then
    fail('proc_name_not_unique', "proc '" .. name .. "' already exists on topic '" .. r.topic .. "'")
  end
  return r, false
end

local function create(name, r)
  redis.call('SADD', P .. ':procs', name)
  redis.call('SADD', P .. ':tp:' .. r.topic, name)
  putp(name, r)
end

local function be8(x)
  local t = {}
  for i = 8, 1, -1 do t[i] = string.char(x % 256); x = math.floor(x / 256) end
  return table.concat(t)
end
-- the claim's digest (as _records.ids_digest: SHA-1 of the ids, 16 hex digits)
local function digest(es)
  local parts = {}
  for i, e in ipairs(es) do
    local ms, s = idparts(e[1])
    parts[i] = be8(ms) .. be8(s)
  end
  return string.sub(redis.sha1hex(table.concat(parts)), 1, 16)
end

-- claim up to count logs (the proc is active with nothing pending); returns entries or nil
local function claim(name, r, count, holder)
  if r.status ~= 'active' or pending(r) then return nil end
  local st = claim_start(r)
  if st == nil then return nil end
  local ok, es = pcall(redis.call, 'XRANGE', P .. ':s:' .. r.topic, st, '+', 'COUNT', count)
  if not ok or #es == 0 then return nil end
  local lms, lseq = idparts(es[1][1])
  local hms, hseq = idparts(es[#es][1])
  r.prev = r.claimed
  r.claimed = I(lms) .. ' ' .. I(lseq) .. ' ' .. I(hms) .. ' ' .. I(hseq)
  r.cnum = I(redis.call('INCR', P .. ':cnum'))
  r.cdig = digest(es)
  r.last_claimed_at = I(NOW)
  r.tbase = I(NOW)
  r.holder = holder or ''
  putp(name, r)
  return es
end

-- claimed = {lo_ms, lo_seq, hi_ms, hi_seq, n, digest[, cnum]} as strings ('' for none)
local function check_claimed(r, c)
  if c == nil then return end
  local ok = pending(r)
  if ok then
    local p = rng(r.claimed)
    ok = tonumber(c[1]) == p[1] and tonumber(c[2]) == p[2] and tonumber(c[3]) == p[3]
         and tonumber(c[4]) == p[4] and tonumber(c[5]) == p[4] - p[2] + 1
         and c[6] == r.cdig
    if ok and c[7] ~= nil and c[7] ~= '' then ok = c[7] == r.cnum end
  end
  if not ok then
    local what = 'nothing pending'
    if pending(r) then what = rstr(r.claimed) end
    fail('stale_claim', 'the given logs are not the proc\'s pending claim (' .. what .. ')')
  end
end

-- ARGV[i..i+6] as a claimed key, or nil when ARGV[i] is ''
local function claimed_at(i)
  if ARGV[i] == '' then return nil end
  return {ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5], ARGV[i + 6]}
end

local function ack(name, r, c)
  if not pending(r) then
    if r.acked == '' then fail('invalid_ack', "proc '" .. name .. "' has nothing pending and never acked") end
    check_claimed(r, c)
    return rstr(r.acked), false
  end
  check_claimed(r, c)
  r.acked = r.claimed
  r.reclaims = '0'
  r.last_acked_at = I(NOW)
  return rstr(r.acked), true
end

-- the commit of items (topic, body, topic, body, ...) from ARGV[i] on; check phase first
local function commit_check(i)
  local metas = {}
  local ms = NOW
  for j = i, #ARGV, 2 do
    local t = ARGV[j]
    if metas[t] == nil then
      local m = meta(t)
      if m == nil then m = {next = 0, last = '', new = true} end
      if m.last ~= '' then
        local lms = idparts(m.last)
        if lms > ms then ms = lms end
      end
      metas[t] = m
    end
  end
  return metas, ms
end
local function commit_write(i, metas, ms)
  local seqs = {}
  for j = i, #ARGV, 2 do
    local t = ARGV[j]
    local m = metas[t]
    local id = I(ms) .. '-' .. I(m.next)
    redis.call('XADD', P .. ':s:' .. t, id, 'b', ARGV[j + 1])
    seqs[#seqs + 1] = m.next
    m.next = m.next + 1
    m.last = id
  end
  for t, m in pairs(metas) do
    if m.new then
      redis.call('SADD', P .. ':topics', t)
      redis.call('HSET', P .. ':t:' .. t, 'created', I(ms))
    end
    redis.call('HSET', P .. ':t:' .. t, 'next', I(m.next), 'last', m.last)
    bell('commit', t)
  end
  if ms > CLOCK then
    redis.call('SET', P .. ':clock', I(ms))
    CLOCK = ms
  end
  return seqs
end

-- request ids: ARGV[1] = client connection id, ARGV[2] = its request number
local function replayed()
  if ARGV[1] == '' then return nil end
  local prev = redis.call('GET', P .. ':r:' .. ARGV[1])
  if not prev then return nil end
  local rec = cmsgpack.unpack(prev)
  if rec[1] ~= ARGV[2] then return nil end
  return rec[2]
end
local function remember(reply)
  if ARGV[1] ~= '' then
    redis.call('SET', P .. ':r:' .. ARGV[1], cmsgpack.pack({ARGV[2], reply}), 'EX', 300)
  end
  return reply
end
-- a claim is remembered by its identity; a replay delivers it again while it is pending
local function remember_claim(name, r, es)
  if ARGV[1] ~= '' then
    redis.call('SET', P .. ':r:' .. ARGV[1], cmsgpack.pack({ARGV[2], {'claim', name, r.cnum}}), 'EX', 300)
  end
  return es
end
local function replay_claim(prev)
  if prev[1] ~= 'claim' then return prev end
  local r = getp(prev[2])
  if not r or not pending(r) or r.cnum ~= prev[3] then
    fail('stale_claim', 'the claim of this request is no longer pending')
  end
  local c = rng(r.claimed)
  return {r.cnum, redis.call('XRANGE', P .. ':s:' .. r.topic, I(c[1]) .. '-' .. I(c[2]),
                             I(c[3]) .. '-' .. I(c[4]))}
end

local function begin(keys, args)
  KEYS, ARGV = keys, args
  P = string.sub(keys[1], 1, -2)
  SEEN = {}
  NOW = clock()
end
"""


def library(scripts: Dict[str, str]) -> Tuple[str, Dict[str, str], Set[str]]:
    """The Redis function library of ``scripts`` (Redis 7 ``FUNCTION LOAD``): its code,
    the function name of each script, and the names of the read-only ones.

    :data:`PRELUDE` runs once, when the library loads; each script's body becomes the
    callback of one function, which starts with ``begin`` (the per-call state). Library and
    function names carry a digest of the code, so that clients of two versions of pipeproc
    can share a server (each calls its own functions)."""
    bodies: Dict[str, str] = {}
    readonly: Set[str] = set()
    for name, body in sorted(scripts.items()):
        if body.startswith("#!lua"):
            head, _, body = body.partition("\n")
            if "no-writes" in head:
                readonly.add(name)
        bodies[name] = body
    digest = hashlib.sha1((PRELUDE + repr(sorted(bodies.items()))).encode()).hexdigest()[:12]
    names = {name: f"pp_{digest}_{name}" for name in bodies}
    parts = [f"#!lua name=pipeproc_{digest}\n", PRELUDE]
    for name, body in bodies.items():
        flags = "{'no-writes'}" if name in readonly else "{}"
        parts.append(f"redis.register_function{{function_name='{names[name]}', "
                     f"callback=function(keys, args)\nbegin(keys, args)\n{body}\nend, "
                     f"flags={flags}}}\n")
    return "".join(parts), names, readonly

