"""The Redis backend's server-side scripts (Lua), one per node transaction.

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

Client side (no node module); imported by :mod:`pipeproc._rbackend` only.
"""

from __future__ import annotations

from typing import Dict

PRELUDE = r"""
local P = string.sub(KEYS[1], 1, -2)  -- KEYS[1] is "{ns}:" (an ACL pattern ~{ns}:* covers it)
local function I(x) return string.format('%d', x) end
local function fail(code, msg) error({err = 'PP ' .. code .. ' ' .. msg}) end

local function clock()
  local t = redis.call('TIME')
  local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local last = tonumber(redis.call('GET', P .. ':clock') or '0')
  if ms < last then ms = last end
  return ms
end
local NOW = clock()

local function bell(kind, what)
  redis.call('XADD', P .. ':bell', 'MAXLEN', '~', 1000, '*', 'e', kind, 'w', what)
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

local function getp(name)
  local h = redis.call('HGETALL', P .. ':p:' .. name)
  if #h == 0 then return nil end
  local r = {}
  for i = 1, #h, 2 do r[h[i]] = h[i + 1] end
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
  for k, v in pairs(r) do args[#args + 1] = k; args[#args + 1] = v end
  redis.call('HSET', P .. ':p:' .. name, unpack(args))
  local d = deadline(r)
  if d then redis.call('ZADD', P .. ':dl', d, name) else redis.call('ZREM', P .. ':dl', name) end
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
local function expire_due()
  local due = redis.call('ZRANGEBYSCORE', P .. ':dl', '-inf', NOW, 'LIMIT', 0, 100)
  for _, name in ipairs(due) do
    local r = getp(name)
    if r and deadline(r) and deadline(r) <= NOW then
      local e = nil
      if redis.call('HEXISTS', P .. ':sysp', name) == 1 then
        -- a system proc's time limit: say so; the worker running it is recycled
        e = errinfo('TimeLimitExceeded', 'the processor ran longer than reclaim_timeout='
                    .. r.reclaim_timeout .. ' s (a system proc\'s time limit); its worker was recycled', r)
        if r.holder and r.holder ~= '' then redis.call('SADD', P .. ':recycle', r.holder) end
      end
      putp(name, reclaimed(r, e))
      bell('reclaim', name)
    else
      redis.call('ZREM', P .. ':dl', name)
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
  local first = redis.call('ZRANGE', P .. ':dl', 0, 0, 'WITHSCORES')[2]
  putp(name, r)
  local d = deadline(r)
  if d and (first == nil or d < tonumber(first)) then
    bell('deadline', name)  -- waiters computed their wake before this deadline existed
  end
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
  if ms > tonumber(redis.call('GET', P .. ':clock') or '0') then
    redis.call('SET', P .. ':clock', I(ms))
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
"""

# ------------------------------------------------------------------ one script per op

SCRIPTS: Dict[str, str] = {}

# commit: ARGV 3.. = topic, body, ...   -> {ms, {seq...}}
SCRIPTS["commit"] = r"""
local prev = replayed(); if prev then return prev end
local metas, ms = commit_check(3)
local seqs = commit_write(3, metas, ms)
return remember({ms, seqs})
"""

# proc: ARGV 3.. = topic, name, offset, count, max_reclaims, reclaim_timeout, on_max
SCRIPTS["proc"] = r"""
local prev = replayed(); if prev then return replay_claim(prev) end
local topic, name, offset, count = ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6])
local r, new = ensure(name, topic, offset, ARGV[7], ARGV[8], ARGV[9])
if new then create(name, r) end
if r.status ~= 'active' then fail('proc_is_disabled', "proc '" .. name .. "' is disabled") end
expire_due()
r = getp(name)
local es = claim(name, r, count)
if es == nil then return remember(false) end
return remember_claim(name, r, {r.cnum, es})
"""

# ack: ARGV 3 = name, 4..10 = claimed
SCRIPTS["ack"] = r"""
local prev = replayed(); if prev then return prev end
expire_due()
local name = ARGV[3]
local r = getproc(name)
local out, changed = ack(name, r, claimed_at(4))
if changed then putp(name, r); bell('ack', name) end
return remember(out)
"""

# ack_commit: ARGV 3 = name, 4..10 = claimed, 11.. = topic, body, ...
SCRIPTS["ackc"] = r"""
local prev = replayed(); if prev then return prev end
expire_due()
local name = ARGV[3]
local r = getproc(name)
if not pending(r) then fail('invalid_ack', "proc '" .. name .. "' has no pending claim to ack") end
local c = claimed_at(4)
check_claimed(r, c)
local metas, ms = commit_check(11)
local out = ack(name, r, c)
putp(name, r)
bell('ack', name)
local seqs = {}
if #ARGV >= 11 then seqs = commit_write(11, metas, ms) end
return remember({out, ms, seqs})
"""

# reclaim: ARGV 3 = name, 4..10 = claimed
SCRIPTS["reclaim"] = r"""
local prev = replayed(); if prev then return prev end
expire_due()
local name = ARGV[3]
local r = getproc(name)
if r.status ~= 'active' then fail('proc_is_disabled', "proc '" .. name .. "' is disabled") end
if not pending(r) then fail('nothing_to_reclaim', "proc '" .. name .. "' has no pending claim") end
check_claimed(r, claimed_at(4))
putp(name, reclaimed(r, nil))
bell('reclaim', name)
return remember(rstr(r.acked))
"""

# inspect / disable / resume / destroy: ARGV 3 = name
SCRIPTS["inspect"] = r"""
expire_due()
local name = ARGV[3]
return state(name, getproc(name))
"""

SCRIPTS["disable"] = r"""
expire_due()
local name = ARGV[3]
local r = getproc(name)
if r.status == 'disabled' then fail('proc_already_disabled', "proc '" .. name .. "' is already disabled") end
r.status = 'disabled'
r.disabled_by = 'user'
putp(name, r)
bell('status', name)
return state(name, r)
"""

SCRIPTS["resume"] = r"""
expire_due()
local name = ARGV[3]
local r = getproc(name)
if r.status == 'active' then fail('proc_already_active', "proc '" .. name .. "' is already active") end
r.status = 'active'
r.reclaims = '0'
r.tbase = I(NOW)
r.disabled_by = ''
putp(name, r)
redis.call('ZREM', P .. ':bo', name)
bell('status', name)
return state(name, r)
"""

SCRIPTS["destroy"] = r"""
expire_due()
local name = ARGV[3]
local r = getproc(name)
local function drop(n, rec)
  redis.call('DEL', P .. ':p:' .. n)
  redis.call('SREM', P .. ':procs', n)
  redis.call('SREM', P .. ':tp:' .. rec.topic, n)
  redis.call('ZREM', P .. ':dl', n)
  redis.call('ZREM', P .. ':bo', n)
  redis.call('ZREM', P .. ':live', n)
end
local sname = redis.call('HGET', P .. ':sysp', name)
if sname then
  local d = redis.call('HGET', P .. ':sys', sname)
  if d then
    for _, other in ipairs(cmsgpack.unpack(d).procs) do
      local o = getp(other)
      if o and other ~= name then drop(other, o) end
      redis.call('HDEL', P .. ':sysp', other)
    end
    redis.call('HDEL', P .. ':sys', sname)
  end
  redis.call('HDEL', P .. ':sysp', name)
end
drop(name, r)
bell('sys', name)
return state(name, r)
"""

# system_proc: ARGV 3 = name, 4 = definition (msgpack: procs, topics, processor, to, count,
# multi, backoff), 5 = offset, 6..8 = options  -> {state...}
SCRIPTS["sysproc"] = r"""
local name, raw, offset, mr, rt, onmax = ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local d = cmsgpack.unpack(raw)
local existing = redis.call('HGET', P .. ':sys', name)
local recs = {}
if existing then
  local e = cmsgpack.unpack(existing)
  local same = #e.procs == #d.procs
  for i = 1, #d.procs do
    if not same or e.procs[i] ~= d.procs[i] or e.topics[i] ~= d.topics[i] then same = false end
  end
  if not same then
    fail('proc_name_not_unique', "system proc '" .. name .. "' already exists on other topic(s); "
         .. 'a system proc is updated only with the same from_; destroy it first (destroy_proc) '
         .. 'or choose another name')
  end
  d.created_at = e.created_at
else
  d.created_at = NOW
end
for i = 1, #d.procs do
  local r, new = ensure(d.procs[i], d.topics[i], offset, mr, rt, onmax)
  recs[i] = {r, new}
end
local states = {}
for i = 1, #d.procs do
  local pn, r, new = d.procs[i], recs[i][1], recs[i][2]
  if new then create(pn, r) end
  redis.call('HSET', P .. ':sysp', pn, name)
  states[i] = state(pn, r)
end
redis.call('HSET', P .. ':sys', name, cmsgpack.pack(d))
bell('sys', name)
return states
"""

# available_proc: ARGV 3 = start index (round robin), 4.. = 7 values per spec
SCRIPTS["avail"] = r"""
local prev = replayed(); if prev then return replay_claim(prev) end
expire_due()
local specs = {}
for i = 4, #ARGV, 7 do
  specs[#specs + 1] = {ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3]), ARGV[i + 4], ARGV[i + 5], ARGV[i + 6]}
end
local made = {}
local order = {}
for _, s in ipairs(specs) do
  local r, new = ensure(s[2], s[1], s[3], s[5], s[6], s[7])
  if new then made[#made + 1] = {s, r}; order[#order + 1] = s end
end
for _, x in ipairs(made) do create(x[1][2], x[2]) end
local n = #specs
local start = tonumber(ARGV[3]) % math.max(n, 1)
for i = 0, n - 1 do
  local s = specs[((start + i) % n) + 1]
  local fresh = false
  for _, o in ipairs(order) do if o == s then fresh = true end end
  if not fresh then order[#order + 1] = s end
end
for idx, s in ipairs(order) do
  local due = redis.call('ZSCORE', P .. ':bo', s[2])
  if not due or tonumber(due) <= NOW then
    local r = getp(s[2])
    local es = claim(s[2], r, s[4])
    if es then
      local pos = 0
      for j, x in ipairs(specs) do if x == s then pos = j end end
      return remember_claim(s[2], r, {s[2], pos, r.cnum, es})
    end
  end
end
return remember(false)
"""

# wait_for_procs: ARGV 3 = 1 when names are given, 4.. = names
#   -> {'idle'} | {'dead', name, state} | {'busy', last doorbell id, next deadline or ''}
SCRIPTS["idle"] = r"""
expire_due()
local names = {}
if ARGV[3] == '1' then
  for i = 4, #ARGV do names[#names + 1] = ARGV[i] end
else
  names = redis.call('SMEMBERS', P .. ':procs')
  table.sort(names)
end
local recs = {}
for i, n in ipairs(names) do recs[i] = getp(n) end
for i, n in ipairs(names) do
  if dead(recs[i]) then return {'dead', n, state(n, recs[i])} end
end
local last = redis.call('XREVRANGE', P .. ':bell', '+', '-', 'COUNT', 1)[1]
local bid = last and last[1] or '0-0'
for i, n in ipairs(names) do
  if busy(recs[i]) then
    local nd = redis.call('ZRANGE', P .. ':dl', 0, 0, 'WITHSCORES')
    return {'busy', bid, nd[2] or '', I(NOW)}
  end
end
return {'idle'}
"""

# create_live: ARGV 3 = topic, 4 = name, 5 = offset, 6 = lease (ms)
SCRIPTS["create_live"] = r"""
local topic, name, offset = ARGV[3], ARGV[4], ARGV[5]
local r = getp(name)
if r ~= nil and r.live ~= '1' then
  fail('proc_name_not_unique', "proc '" .. name .. "' exists and is not a live proc")
end
if r == nil then
  r = new_record(topic, offset, '-1', '-1', 'continue', '1')
  create(name, r)
elseif r.topic ~= topic then
  fail('proc_name_not_unique', "proc '" .. name .. "' already exists on topic '" .. r.topic .. "'")
end
redis.call('ZADD', P .. ':live', NOW + tonumber(ARGV[6]), name)
return state(name, r)
"""

# live: ARGV 3 = topic, 4 = name, 5 = count, 6 = held cnum or '', 7 = lease (ms)
#   -> {'end'} | {'claim', cnum, entries} | {'wait', doorbell id}
SCRIPTS["live"] = r"""
local topic, name, count, held = ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[6]
local last = redis.call('XREVRANGE', P .. ':bell', '+', '-', 'COUNT', 1)[1]
local bid = last and last[1] or '0-0'
local r = getp(name)
if r == nil or r.topic ~= topic then return {'end'} end
redis.call('ZADD', P .. ':live', NOW + tonumber(ARGV[7]), name)
if r.status ~= 'active' then return {'wait', bid} end
if held ~= '' and pending(r) and r.cnum == held then
  fail('invalid_ack', "live proc '" .. name .. "' still holds its last delivery (" .. rstr(r.claimed)
       .. '): call ack() (or reclaim() to have it delivered again) before asking for more')
end
local es = claim(name, r, count)
if es == nil then return {'wait', bid} end
return {'claim', r.cnum, es}
"""

# renew the leases of live procs: ARGV 3 = lease (ms), 4.. = names
SCRIPTS["lease"] = r"""
for i = 4, #ARGV do
  if redis.call('ZSCORE', P .. ':live', ARGV[i]) then
    redis.call('ZADD', P .. ':live', NOW + tonumber(ARGV[3]), ARGV[i])
  end
end
return 1
"""

# length: ARGV 3 = topic
SCRIPTS["length"] = r"""#!lua flags=no-writes
local m = meta(ARGV[3])
if m == nil then fail('invalid_topic', "topic '" .. ARGV[3] .. "' does not exist") end
return m.next
"""

# range: ARGV 3 = topic, 4 = lower kind, 5 = lower value, 6 = upper kind, 7 = upper value,
#        8 = exclusive (0/1), 9 = reverse (0/1), 10 = count
#   kinds: '' none, 'id' (ms-seq), 'ms', 'seq'; a continuation passes kind 'raw' (an XRANGE bound)
SCRIPTS["range"] = r"""#!lua flags=no-writes
local topic = ARGV[3]
local m = meta(topic)
if m == nil then fail('invalid_topic', "topic '" .. topic .. "' does not exist") end
local excl = ARGV[8] == '1'
local function exact(v)
  local n = tonumber(v)
  local id = nil
  if n < m.next then id = seq_id_ge(topic, n) end
  if id == nil or select(2, idparts(id)) ~= n then
    fail('invalid_tone_id_search', 'no log with sequence ' .. v .. " in topic '" .. topic .. "'")
  end
  return id
end
local function bound(kind, v, lower)
  if kind == '' then if lower then return '-' else return '+' end end
  if kind == 'raw' then return v end
  if kind == 'ms' then if lower then return v .. '-0' else return v .. '-18446744073709551615' end end
  local id = v
  if kind == 'seq' then id = exact(v) end
  if excl then return '(' .. id end
  return id
end
local lo = bound(ARGV[4], ARGV[5], true)
local hi = bound(ARGV[6], ARGV[7], false)
local cmd, a, b = 'XRANGE', lo, hi
if ARGV[9] == '1' then cmd, a, b = 'XREVRANGE', hi, lo end
local ok, es = pcall(redis.call, cmd, P .. ':s:' .. topic, a, b, 'COUNT', tonumber(ARGV[10]))
if not ok then return {{}, lo, hi} end
return {es, lo, hi}
"""

# topics -> names
SCRIPTS["topics"] = r"""#!lua flags=no-writes
return redis.call('SMEMBERS', P .. ':topics')
"""

# stats -> {topics: {name, length, stored, created}..., procs: {state, lag, pending}...,
#           workers: {wid, heartbeat, info...}...}
SCRIPTS["stats"] = r"""#!lua flags=no-writes
local topics = {}
for _, t in ipairs(redis.call('SMEMBERS', P .. ':topics')) do
  local m = meta(t)
  local created = redis.call('HGET', P .. ':t:' .. t, 'created')
  topics[#topics + 1] = {t, m.next, redis.call('XLEN', P .. ':s:' .. t), created}
end
local procs = {}
for _, n in ipairs(redis.call('SMEMBERS', P .. ':procs')) do
  local r = getp(n)
  if r then
    local m = meta(r.topic)
    local lag = 0
    if m then lag = m.next - position(r, m); if lag < 0 then lag = 0 end end
    local pend = ''
    if pending(r) then pend = rstr(r.claimed) end
    local bo = tonumber(redis.call('ZSCORE', P .. ':bo', n) or '0')
    local left = 0
    if bo > NOW then left = bo - NOW end
    procs[#procs + 1] = {state(n, r), lag, pend, redis.call('HGET', P .. ':sysp', n) or '', left}
  end
end
local workers = {}
local ws = redis.call('ZRANGE', P .. ':w', 0, -1, 'WITHSCORES')
for i = 1, #ws, 2 do
  workers[#workers + 1] = {ws[i], ws[i + 1], redis.call('HGETALL', P .. ':wi:' .. ws[i])}
end
return {topics, procs, workers, I(NOW), redis.call('HGETALL', P .. ':sys')}
"""

# ------------------------------------------------------------------ workers and supervisors

# a worker's (or supervisor's) registration: ARGV 3 = wid, 4.. = field, value, ...
SCRIPTS["hello"] = r"""
redis.call('ZADD', P .. ':w', NOW, ARGV[3])
local args = {}
for i = 4, #ARGV do args[#args + 1] = ARGV[i] end
redis.call('HSET', P .. ':wi:' .. ARGV[3], 'executions', 0, 'failures', 0, unpack(args))
bell('worker', ARGV[3])
return NOW
"""

# a heartbeat: ARGV 3 = wid -> 1, or 0 when the worker was declared dead meanwhile
SCRIPTS["beat"] = r"""
if not redis.call('ZSCORE', P .. ':w', ARGV[3]) then return 0 end
redis.call('ZADD', P .. ':w', NOW, ARGV[3])
return 1
"""


# the claims of a worker that is gone (its process died, or its heartbeats stopped): reclaimed
# (counted) with a WorkerDied error, or released without counting (ARGV 5 = '0': recycled).
# ARGV 3 = wid, 4 = message
REAP = r"""
local function reap(wid, msg, count)
  local held = redis.call('HGETALL', P .. ':wc:' .. wid)
  for i = 1, #held, 2 do
    local name, cnum = held[i], held[i + 1]
    local r = getp(name)
    if r and pending(r) and r.cnum == cnum then
      local e = nil
      if count then e = errinfo('WorkerDied', msg, r) end
      putp(name, reclaimed(r, e, count))
      bell('reclaim', name)
    end
  end
  redis.call('DEL', P .. ':wc:' .. wid, P .. ':wi:' .. wid)
  redis.call('ZREM', P .. ':w', wid)
end
"""

SCRIPTS["reap1"] = REAP + r"""
reap(ARGV[3], ARGV[4], ARGV[5] ~= '0')
bell('worker', ARGV[3])
return 1
"""

# a supervisor's tick: due claim timeouts, workers whose heartbeats stopped (any host),
# live procs whose lease ran out. ARGV 3 = dead after (ms), 4 = the supervisor's id
#   -> {doorbell id, next wake (ms, '' for none), now, this supervisor's workers to recycle}
SCRIPTS["tick"] = REAP + r"""
local dead_ms = tonumber(ARGV[3])
for _ = 1, 20 do
  local before = redis.call('ZCOUNT', P .. ':dl', '-inf', NOW)
  if before == 0 then break end
  expire_due()
end
for _, wid in ipairs(redis.call('ZRANGEBYSCORE', P .. ':w', '-inf', NOW - dead_ms, 'LIMIT', 0, 100)) do
  reap(wid, 'worker ' .. wid .. ' stopped sending heartbeats (dead, or cut off from Redis)', true)
  bell('worker', wid)
end
for _, name in ipairs(redis.call('ZRANGEBYSCORE', P .. ':live', '-inf', NOW, 'LIMIT', 0, 100)) do
  local r = getp(name)
  if r and r.live == '1' then
    redis.call('DEL', P .. ':p:' .. name)
    redis.call('SREM', P .. ':procs', name)
    redis.call('SREM', P .. ':tp:' .. r.topic, name)
    redis.call('ZREM', P .. ':dl', name)
  end
  redis.call('ZREM', P .. ':live', name)
  bell('sys', name)
end
local wake = nil
local function at(key, plus)
  local x = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if x[2] then
    local t = tonumber(x[2]) + plus
    if wake == nil or t < wake then wake = t end
  end
end
at(P .. ':dl', 0)
at(P .. ':w', dead_ms + 1)
at(P .. ':live', 1)
local recycle = {}
local prefix = ARGV[4] .. '/'
for _, wid in ipairs(redis.call('SMEMBERS', P .. ':recycle')) do
  if string.sub(wid, 1, #prefix) == prefix then
    recycle[#recycle + 1] = wid
    redis.call('SREM', P .. ':recycle', wid)
  elseif not redis.call('ZSCORE', P .. ':w', wid) then
    redis.call('SREM', P .. ':recycle', wid)
  end
end
local last = redis.call('XREVRANGE', P .. ':bell', '+', '-', 'COUNT', 1)[1]
return {last and last[1] or '0-0', wake and I(wake) or '', I(NOW), recycle}
"""

# a worker: the outcome of its last claim, then its next claim.
# ARGV 3 = wid, 4 = kind ('' | 'ack' | 'commit' | 'reclaim' | 'release'), 5 = proc,
#      6..12 = claimed key, 13 = error (msgpack), 14 = round robin start, 15 = K,
#      16..15+K = the system procs this worker may run, then topic, body, ... (commit)
#   -> {'job', name, index, processor, to, many, cnum, entries, note}
#    | {'wait', doorbell id, next wake ms or '', now, note}
#    | {'gone'}: the worker was declared dead (late heartbeats; its claims reclaimed)
SCRIPTS["work"] = r"""
local wid, kind, name = ARGV[3], ARGV[4], ARGV[5]
local K = tonumber(ARGV[15])
local note = ''
local prev = replayed(); if prev then return prev end
if not redis.call('ZSCORE', P .. ':w', wid) then return {'gone'} end
expire_due()
redis.call('ZADD', P .. ':w', NOW, wid)
if kind ~= '' then
  redis.call('HDEL', P .. ':wc:' .. wid, name)
  local r = getp(name)
  local c = claimed_at(6)
  local okc = r ~= nil and pending(r) and pcall(check_claimed, r, c)
  if not okc then
    note = 'dropped'
  elseif kind == 'ack' or kind == 'commit' then
    local metas, ms = commit_check(16 + K)
    ack(name, r, c)
    putp(name, r)
    bell('ack', name)
    if kind == 'commit' and #ARGV >= 16 + K then commit_write(16 + K, metas, ms) end
    redis.call('ZREM', P .. ':bo', name)
  elseif kind == 'release' then
    putp(name, reclaimed(r, nil, false))
    bell('reclaim', name)
  else
    local e = cmsgpack.unpack(ARGV[13])
    local err = errinfo(e.type or 'ProcessorFailed', e.message or 'the processor failed', r, e.traceback)
    reclaimed(r, err)
    putp(name, r)
    bell('reclaim', name)
    local sname = redis.call('HGET', P .. ':sysp', name)
    local first, cap = 0.1, 30.0
    if sname then
      local d = redis.call('HGET', P .. ':sys', sname)
      if d then
        local bo = cmsgpack.unpack(d).backoff
        if bo then first, cap = bo[1], bo[2] end
      end
    end
    if first > 0 and r.status == 'active' then
      local n = tonumber(r.reclaims)
      local delay = first * math.pow(2, math.min(n - 1, 64))
      if delay > cap then delay = cap end
      redis.call('ZADD', P .. ':bo', NOW + math.floor(delay * 1000), name)
    end
    redis.call('HINCRBY', P .. ':wi:' .. wid, 'failures', 1)
    note = r.status
  end
end
if K > 0 then
  local start = tonumber(ARGV[14]) % K
  for i = 0, K - 1 do
    local idx = ((start + i) % K)
    local pn = ARGV[16 + idx]
    local bo = redis.call('ZSCORE', P .. ':bo', pn)
    if not bo or tonumber(bo) <= NOW then
      local sname = redis.call('HGET', P .. ':sysp', pn)
      local d = sname and redis.call('HGET', P .. ':sys', sname)
      local r = d and getp(pn)
      if r then
        d = cmsgpack.unpack(d)
        local es = claim(pn, r, d.count, wid)
        if es then
          redis.call('HSET', P .. ':wc:' .. wid, pn, r.cnum)
          redis.call('HINCRBY', P .. ':wi:' .. wid, 'executions', 1)
          local many = 0
          if d.count > 1 then many = 1 end
          return remember({'job', pn, idx + 1, d.processor, d.to, many, r.cnum, es, note})
        end
      end
    end
  end
end
local wake = nil
local x = redis.call('ZRANGE', P .. ':dl', 0, 0, 'WITHSCORES')
if x[2] then wake = tonumber(x[2]) end
x = redis.call('ZRANGEBYSCORE', P .. ':bo', '(' .. I(NOW), '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
if x[2] and (wake == nil or tonumber(x[2]) < wake) then wake = tonumber(x[2]) end
local last = redis.call('XREVRANGE', P .. ':bell', '+', '-', 'COUNT', 1)[1]
return {'wait', last and last[1] or '0-0', wake and I(wake) or '', I(NOW), note}
"""

# the GC, one supervisor at a time: ARGV 3 = owner, 4 = lease (ms), 5 = min_prune_time (ms)
#   -> logs deleted, or -1 when another supervisor holds the lease
SCRIPTS["gc"] = r"""
local held = redis.call('GET', P .. ':gclease')
if held and held ~= ARGV[3] then return -1 end
redis.call('SET', P .. ':gclease', ARGV[3], 'PX', tonumber(ARGV[4]))
local cutoff = NOW - tonumber(ARGV[5])
local function less(a, b)
  local am, as = idparts(a)
  local bm, bs = idparts(b)
  return am < bm or (am == bm and as < bs)
end
local function after(id) local m, s = idparts(id); return I(m) .. '-' .. I(s + 1) end
local total = 0
for _, t in ipairs(redis.call('SMEMBERS', P .. ':topics')) do
  local keep = I(cutoff) .. '-0'
  for _, pn in ipairs(redis.call('SMEMBERS', P .. ':tp:' .. t)) do
    local r = getp(pn)
    if r then
      local c = rng(r.claimed)
      if pending(r) then local id = I(c[1]) .. '-' .. I(c[2]); if less(id, keep) then keep = id end end
      local pv = rng(r.prev)
      if pv then local id = I(pv[1]) .. '-' .. I(pv[2]); if less(id, keep) then keep = id end end
      local st = claim_start(r)
      local pos = nil
      if st == '-' then pos = '0-0'
      elseif st and string.sub(st, 1, 1) == '(' then pos = after(string.sub(st, 2))
      elseif st then pos = st end
      if pos and less(pos, keep) then keep = pos end
    end
  end
  if keep ~= '0-0' then
    total = total + redis.call('XTRIM', P .. ':s:' .. t, 'MINID', keep)
  end
end
return total
"""

# a closing client's live procs: ARGV 3.. = names (only hidden procs are touched)
SCRIPTS["drop_live"] = r"""
for i = 3, #ARGV do
  local name = ARGV[i]
  local r = getp(name)
  if r and r.live == '1' then
    redis.call('DEL', P .. ':p:' .. name)
    redis.call('SREM', P .. ':procs', name)
    redis.call('SREM', P .. ':tp:' .. r.topic, name)
    redis.call('ZREM', P .. ':dl', name)
    bell('sys', name)
  end
  redis.call('ZREM', P .. ':live', name)
end
return 1
"""
