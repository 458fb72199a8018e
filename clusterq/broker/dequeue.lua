-- dequeue: pending -> active, with a lease and a fencing token. Forwards due scheduled
-- and retry tasks to pending first, so busy workers need no separate forwarder.
--
-- KEYS[1] pending   KEYS[2] active   KEYS[3] scheduled   KEYS[4] retry
-- KEYS[5] tasks   KEYS[6] leases   KEYS[7] paused   KEYS[8] wake channel
-- ARGV[1] how many tasks at most   ARGV[2] lease ms   ARGV[3] fencing token
-- ARGV[4] how many due tasks to forward at most
--
-- Returns {status, next_due, orphans, id1, record1, id2, record2, ...}: status 1, or 0
-- when the queue is paused; next_due (ms) of the earliest scheduled/retry task when no
-- task was taken, else -1; orphans: ids popped without a record (dropped, and counted).
do local bad = wrong_type({'list', 'zset', 'zset', 'zset', 'hash', 'hash', '-', '-'}) if bad then return bad end end
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

local out = {1, -1, 0}
local ids = redis.call('RPOP', KEYS[1], ARGV[1])
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
