"""The Redis backend's scripts for workers and supervisors (SCALE.md §3: timers without a
node): registration and heartbeats, the workers' ``work`` (outcome + next claim), a
supervisor's ``tick`` (due timeouts, dead workers, expired live procs, recycling) and the GC
under its lease. Sent after :data:`pipeproc._rlua.PRELUDE`, like the clients' scripts.

Client side (no import of the package).
"""

from __future__ import annotations

from typing import Dict

SUPERVISION: Dict[str, str] = {}

# Workers are registered by slot (wid = "<supervisor id>/<slot>": a slot stays listed, not
# alive, while its worker is restarted); a claim's holder is "<wid>/<pid>", the process.
# a worker's registration: ARGV 3 = wid, 4.. = field, value, ...
SUPERVISION["hello"] = r"""
redis.call('ZADD', P .. ':w', NOW, ARGV[3])
local args = {}
for i = 4, #ARGV do args[#args + 1] = ARGV[i] end
redis.call('HSET', P .. ':wi:' .. ARGV[3], 'executions', 0, 'failures', 0, 'alive', 1,
           unpack(args))
bell('worker', ARGV[3])
tbell('worker', ARGV[3])
return NOW
"""

# a heartbeat: ARGV 3 = wid -> 1, or 0 when the worker was declared dead meanwhile
SUPERVISION["beat"] = r"""
if not redis.call('ZSCORE', P .. ':w', ARGV[3]) then return 0 end
redis.call('ZADD', P .. ':w', NOW, ARGV[3])
return 1
"""


# the claims of a worker that is gone (its process died, or its heartbeats stopped): reclaimed
# (counted) with a WorkerDied error, or released without counting (ARGV 5 = '0': recycled);
# ARGV 6 = '1': the slot stays listed, not alive (its supervisor restarts it).
# ARGV 3 = wid, 4 = message
REAP = r"""
local function reap(wid, msg, count, keep)
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
  if keep then
    redis.call('DEL', P .. ':wc:' .. wid)
    redis.call('HSET', P .. ':wi:' .. wid, 'alive', 0)
  else
    redis.call('DEL', P .. ':wc:' .. wid, P .. ':wi:' .. wid)
    redis.call('ZREM', P .. ':w', wid)
  end
end
"""

SUPERVISION["reap1"] = REAP + r"""
reap(ARGV[3], ARGV[4], ARGV[5] ~= '0', ARGV[6] == '1')
bell('worker', ARGV[3])
return 1
"""

# a supervisor's tick: due claim timeouts, workers whose heartbeats stopped (any host),
# live procs whose lease ran out. ARGV 3 = dead after (ms), 4 = the supervisor's id
#   -> {the supervisors' doorbell (P:tbell) id, next wake (ms, '' for none), now, this
#       supervisor's workers to recycle}
SUPERVISION["tick"] = REAP + r"""
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
  if r and r.live == '1' then drop(name, r) end
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
for _, item in ipairs(redis.call('SMEMBERS', P .. ':recycle')) do
  local holder = string.match(item, '^([^\t]*)')
  if string.sub(holder, 1, #prefix) == prefix then
    recycle[#recycle + 1] = item
    redis.call('SREM', P .. ':recycle', item)
  elseif not redis.call('ZSCORE', P .. ':w', string.match(holder, '^(.*)/%d+$') or holder) then
    redis.call('SREM', P .. ':recycle', item)
  end
end
local last = redis.call('XREVRANGE', P .. ':tbell', '+', '-', 'COUNT', 1)[1]
return {last and last[1] or '0-0', wake and I(wake) or '', I(NOW), recycle}
"""

# a worker: the outcome of its last claim, then its next claim.
# ARGV 3 = wid, 4 = kind ('' | 'ack' | 'commit' | 'reclaim' | 'release'), 5 = proc,
#      6..12 = claimed key, 13 = error (msgpack), 14 = round robin start, 15 = the version of
#      the system procs (P:sysver) the list was made from, 16 = K, 17..16+K = the system
#      procs this worker may run, then topic, body, ... (commit)
#   -> {'job', name, index, processor, to, many, cnum, entries, note}
#    | {'wait', doorbell id, next wake ms or '', now, note}
#    | {'again', note}: the system procs changed since the list was made
#    | {'gone'}: the worker was declared dead (late heartbeats; its claims reclaimed)
SUPERVISION["work"] = r"""
local holder, kind, name = ARGV[3], ARGV[4], ARGV[5]
local wid = string.match(holder, '^(.*)/%d+$') or holder
local K = tonumber(ARGV[16])
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
    local metas, ms = commit_check(17 + K)
    ack(name, r, c)
    putp(name, r)
    bell('ack', name)
    if kind == 'commit' and #ARGV >= 17 + K then commit_write(17 + K, metas, ms) end
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
    -- what the worker says of it (as the node does): status, failures in a row, max, delay
    local left = tonumber(redis.call('ZSCORE', P .. ':bo', name) or NOW) - NOW
    if left < 0 then left = 0 end
    note = r.status .. ' ' .. r.reclaims .. ' ' .. r.max_reclaims .. ' ' .. I(math.floor(left))
  end
end
if (redis.call('GET', P .. ':sysver') or '0') ~= ARGV[15] then
  -- the system procs changed since the worker listed the ones it may run: list again
  return {'again', note}
end
if K > 0 then
  local start = tonumber(ARGV[14]) % K
  for i = 0, K - 1 do
    local idx = ((start + i) % K)
    local pn = ARGV[17 + idx]
    local bo = redis.call('ZSCORE', P .. ':bo', pn)
    if not bo or tonumber(bo) <= NOW then
      local sname = redis.call('HGET', P .. ':sysp', pn)
      local d = sname and redis.call('HGET', P .. ':sys', sname)
      local r = d and getp(pn)
      if r then
        d = cmsgpack.unpack(d)
        local es = claim(pn, r, d.count, holder)
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
SUPERVISION["gc"] = r"""
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
SUPERVISION["drop_live"] = r"""
for i = 3, #ARGV do
  local name = ARGV[i]
  local r = getp(name)
  if r and r.live == '1' then
    drop(name, r)
    bell('sys', name)
  end
  redis.call('ZREM', P .. ':live', name)
end
return 1
"""
