-- dequeue: pending -> active, with a lease and a fencing token. Forwards due scheduled
-- and retry tasks to pending first, so busy workers need no separate forwarder. Takes
-- no more than the queue's limits allow (KEYS[9], see clusterq.limits): its concurrency
-- cap (tasks active at once), its rate (a token bucket kept as one number, GCRA), and a
-- hold a handler asked for (RateLimited with scope "queue").
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
-- the earliest scheduled/retry task when no task was taken, else -1. orphans: ids
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
local lim = redis.call('HMGET', KEYS[9], 'interval', 'burst', 'concurrency', 'tat', 'hold')
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

local out = {1, -1, 0}
local ids = false
if want > 0 then ids = redis.call('RPOP', KEYS[1], want) end
if ids then
  local expiry = now + tonumber(ARGV[2])
  local records = redis.call('HMGET', KEYS[5], unpack(ids))
  local zargs, hargs = {}, {}
  for i, id in ipairs(ids) do
    local rec = records[i]
    if rec then
      zargs[#zargs + 1] = expiry
      zargs[#zargs + 1] = id
      hargs[#hargs + 1] = id
      hargs[#hargs + 1] = ARGV[3]
      out[#out + 1] = id
      out[#out + 1] = rec
    else
      out[3] = out[3] + 1
    end
  end
  if #zargs > 0 then
    redis.call('ZADD', KEYS[2], unpack(zargs))
    redis.call('HSET', KEYS[6], unpack(hargs))
  end
  if tat then  -- the tokens these tasks took (orphans too: they were popped)
    redis.call('HSET', KEYS[9], 'tat', string.format('%.3f', tat + #ids * interval))
  end
end

-- Forwarded more than this call takes: wake the other waiting workers for the rest.
if forwarded > 0 and redis.call('LLEN', KEYS[1]) > 0 then wake(KEYS[8]) end

if #out == 3 then
  local next_due = -1
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
