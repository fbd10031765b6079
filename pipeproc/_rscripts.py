"""The Redis backend's scripts for the clients' ops: one per node transaction.

``SCRIPTS[name]`` is the body of the script that answers op ``name`` (sent after the
shared library :data:`pipeproc._rlua.PRELUDE`; a body starting with ``#!lua flags=no-writes``
is a read). ``ARGV[1]``, ``ARGV[2]`` are the request id; the op's own arguments follow.
The workers' and supervisors' scripts are in :mod:`pipeproc._rsupscripts` and are merged in.

Client side: imports ``_rsupscripts``.
"""

from __future__ import annotations

from typing import Dict

from ._rsupscripts import SUPERVISION

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
expire_due(name)  -- a due timeout first: it may disable the proc (as the node's timer would)
r = getp(name)
if r.status ~= 'active' then fail('proc_is_disabled', "proc '" .. name .. "' is disabled") end
local es = claim(name, r, count)
if es == nil then return remember(false) end
return remember_claim(name, r, {r.cnum, es})
"""

# ack: ARGV 3 = name, 4..10 = claimed
SCRIPTS["ack"] = r"""
local prev = replayed(); if prev then return prev end
expire_due(ARGV[3])
local name = ARGV[3]
local r = getproc(name)
local out, changed = ack(name, r, claimed_at(4))
if changed then putp(name, r); bell('ack', name) end
return remember(out)
"""

# ack_commit: ARGV 3 = name, 4..10 = claimed, 11.. = topic, body, ...
SCRIPTS["ackc"] = r"""
local prev = replayed(); if prev then return prev end
expire_due(ARGV[3])
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
expire_due(ARGV[3])
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
expire_due(ARGV[3])
local name = ARGV[3]
return state(name, getproc(name))
"""

SCRIPTS["disable"] = r"""
expire_due(ARGV[3])
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
expire_due(ARGV[3])
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
expire_due(ARGV[3])
local name = ARGV[3]
local r = getproc(name)
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
    redis.call('INCR', P .. ':sysver')
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
redis.call('INCR', P .. ':sysver')
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
local topic_of = {}  -- a name listed twice must name one topic (checked before any write)
for _, s in ipairs(specs) do
  if topic_of[s[2]] and topic_of[s[2]] ~= s[1] then
    fail('proc_name_not_unique', "proc '" .. s[2] .. "' already exists on topic '" .. topic_of[s[2]] .. "'")
  end
  topic_of[s[2]] = s[1]
  local r, new = ensure(s[2], s[1], s[3], s[5], s[6], s[7])
  if new and not made[s[2]] then
    made[s[2]] = true
    made[#made + 1] = {s, r}
    order[#order + 1] = s
  end
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
      return remember({s[2], pos, r.cnum, es})  -- the whole reply: a replay has its shape
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
tbell('live', name)
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
if r.status == 'active' and held ~= '' and pending(r) and r.cnum == held then
  fail('invalid_ack', "live proc '" .. name .. "' still holds its last delivery (" .. rstr(r.claimed)
       .. '): call ack() (or reclaim() to have it delivered again) before asking for more')
end
redis.call('ZADD', P .. ':live', NOW + tonumber(ARGV[7]), name)
if r.status ~= 'active' then return {'wait', bid} end
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

SCRIPTS.update(SUPERVISION)
