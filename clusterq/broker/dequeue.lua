-- dequeue: pending -> active, with a lease and a fencing token. Forwards due scheduled
-- and retry tasks to pending first, so busy workers need no separate forwarder. Takes
-- no more than the queue's limits allow (KEYS[9], see clusterq.limits): its concurrency
-- cap (tasks active at once), its rate (a token bucket kept as one number, GCRA), and a
-- hold a handler asked for (RateLimited with scope "queue"). When the queue declares
-- rates per task type (the flag field ``types``), each popped task's type must have a
-- token too (GCRA, fields ti:/tb:/tt:<type>); a task whose type has none does not
-- start: it goes to ``scheduled`` at a time reserved for it (the type's next token
-- time, or its reservation horizon th:<type> if later; the horizon then moves one
-- interval on), record unchanged, and competes for a token again when it is due. The
-- queue's own tokens are taken only by the tasks that start (and orphans).
--
-- KEYS[1] pending   KEYS[2] active   KEYS[3] scheduled   KEYS[4] retry
-- KEYS[5] tasks   KEYS[6] leases   KEYS[7] paused   KEYS[8] wake channel   KEYS[9] limits
-- ARGV[1] how many tasks at most   ARGV[2] lease ms   ARGV[3] fencing token
-- ARGV[4] how many due tasks to forward at most
--
-- Returns {status, next_due, orphans, id1, record1, id2, record2, ...}. status: 1 taken
-- (or nothing to take), 0 the queue is paused; tasks wait but a limit lets none start
-- now: 2 the rate (next_due: ms from now until the next one may, so that a worker whose
-- clock differs still waits as long), 3 the concurrency cap (wait for a task to end),
-- 4 a hold (next_due: ms until its end). With status 1, next_due (ms) is that of
-- the earliest scheduled/retry task when no task was taken (now when tasks of other
-- types still wait after a call that put back as many as it may read), else -1. orphans: ids
-- popped without a record (dropped, and counted).
do local bad = wrong_type({'list', 'zset', 'zset', 'zset', 'hash', 'hash', '-', '-', 'hash'}) if bad then return bad end end
local now = now_ms()
if redis.call('EXISTS', KEYS[7]) == 1 then return {0, -1, 0} end

local forwarded = 0
for _, key in ipairs({KEYS[3], KEYS[4]}) do
  local due = redis.call('ZRANGEBYSCORE', key, '-inf', now, 'LIMIT', 0, ARGV[4])
  if #due > 0 then
    redis.call('ZREM', key, unpack(due))
    redis.call('LPUSH', KEYS[1], unpack(due))
    forwarded = forwarded + #due
  end
end

-- The limits: how many may start now (want), or why none may and until when.
local want = tonumber(ARGV[1])
local lim = redis.call('HMGET', KEYS[9], 'interval', 'burst', 'concurrency', 'tat', 'hold', 'types')
local interval, tat = tonumber(lim[1]), nil
if lim[1] or lim[3] or lim[5] then
  local status, until_ms = nil, -1
  local hold = tonumber(lim[5])
  if hold and hold > now then status, until_ms = 4, hold end
  local cap = tonumber(lim[3])
  if not status and cap then
    local free = cap - redis.call('ZCARD', KEYS[2])
    if free <= 0 then status = 3 else want = math.min(want, free) end
  end
  if not status and interval then
    local burst = tonumber(lim[2]) or 1
    tat = math.max(tonumber(lim[4]) or 0, now)
    local tokens = math.floor((now - tat) / interval + burst + 1e-9)
    if tokens <= 0 then
      status, until_ms = 2, math.ceil(tat - (burst - 1) * interval)
    else
      want = math.min(want, tokens)
    end
  end
  if status and redis.call('LLEN', KEYS[1]) > 0 then
    return {status, until_ms >= 0 and math.max(1, until_ms - now) or -1, 0}
  end
  if status then want = 0 end
end

-- Per-type rates (only when declared): whether a task of record ``rec`` may start now;
-- if not, it is put back in ``scheduled`` at a reserved time.
local typed, types, deferred = lim[6] == '1', {}, 0
local function task_type(rec)
  -- The meta JSON comes first and the encoder writes "t" as its first key: a type with
  -- no quote, backslash or newline is the text between the quotes. Otherwise decode.
  local t = string.match(rec, '^{"t":"([^"\\\n]*)"')
  if t then return t end
  local ok, meta = pcall(cjson.decode, string.match(rec, '^[^\n]*'))
  if ok and type(meta) == 'table' and type(meta['t']) == 'string' then return meta['t'] end
  return nil
end
local function admit(id, rec)
  local name = task_type(rec)
  if not name then return true end
  local st = types[name]
  if st == nil then
    local f = redis.call('HMGET', KEYS[9], 'ti:' .. name, 'tb:' .. name, 'tt:' .. name, 'th:' .. name)
    st = false
    if tonumber(f[1]) then
      st = {i = tonumber(f[1]), b = tonumber(f[2]) or 1, t = tonumber(f[3]) or 0,
            h = tonumber(f[4]) or 0, name = name}
    end
    types[name] = st
  end
  if not st then return true end
  local t = math.max(st.t, now)
  if (now - t) / st.i + st.b + 1e-9 >= 1 then
    st.t, st.dirty = t + st.i, true
    return true
  end
  local at = math.max(st.h, t - (st.b - 1) * st.i)
  st.h, st.dirty = at + st.i, true
  redis.call('ZADD', KEYS[3], math.ceil(at), id)
  deferred = deferred + 1
  return false
end

local out = {1, -1, 0}
local taken, read = 0, 0  -- taken: started or orphans (they use the queue's tokens)
local expiry = now + tonumber(ARGV[2])
local zargs, hargs = {}, {}
while want - taken > 0 do
  local ask = want - taken
  local ids = redis.call('RPOP', KEYS[1], ask)
  if not ids then break end
  read = read + #ids
  local records = redis.call('HMGET', KEYS[5], unpack(ids))
  for i, id in ipairs(ids) do
    local rec = records[i]
    if not rec then
      out[3] = out[3] + 1
      taken = taken + 1
    elseif not typed or admit(id, rec) then
      zargs[#zargs + 1] = expiry
      zargs[#zargs + 1] = id
      hargs[#hargs + 1] = id
      hargs[#hargs + 1] = ARGV[3]
      out[#out + 1] = id
      out[#out + 1] = rec
      taken = taken + 1
    end
  end
  -- Without type rates one pop takes all it may; with them, pop again for the tasks put
  -- back (tasks of other types may wait behind them), reading a bounded number per call.
  if not typed or #ids < ask or read >= 500 then break end
end
if #zargs > 0 then
  redis.call('ZADD', KEYS[2], unpack(zargs))
  redis.call('HSET', KEYS[6], unpack(hargs))
end
if tat and taken > 0 then  -- the queue's tokens these tasks took
  redis.call('HSET', KEYS[9], 'tat', string.format('%.3f', tat + taken * interval))
end
if typed then  -- the types' state: tokens taken, horizons moved
  local state = {}
  for _, st in pairs(types) do
    if st and st.dirty then
      state[#state + 1] = 'tt:' .. st.name
      state[#state + 1] = string.format('%.3f', st.t)
      state[#state + 1] = 'th:' .. st.name
      state[#state + 1] = string.format('%.3f', st.h)
    end
  end
  if #state > 0 then redis.call('HSET', KEYS[9], unpack(state)) end
end

-- Forwarded more than this call takes: wake the other waiting workers for the rest.
if forwarded > 0 and redis.call('LLEN', KEYS[1]) > 0 then wake(KEYS[8]) end

if #out == 3 then
  local next_due = -1
  if deferred > 0 and redis.call('LLEN', KEYS[1]) > 0 then next_due = now end
  for _, key in ipairs({KEYS[3], KEYS[4]}) do
    local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    if #first > 0 then
      local score = tonumber(first[2])
      if next_due < 0 or score < next_due then next_due = score end
    end
  end
  out[2] = next_due
end
return out
