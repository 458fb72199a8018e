-- sweep: periodic upkeep of one queue. Deletes completed tasks past their retention,
-- forgets deleted task ids past their dedup window,
-- trims the archive (oldest first, by size and by age), and lists active tasks whose
-- lease expired so that the caller can fail them (fail.lua with only_if_expired).
--
-- KEYS[1] active   KEYS[2] leases   KEYS[3] tasks   KEYS[4] completed   KEYS[5] results
-- KEYS[6] archived   KEYS[7] done   KEYS[8] cancel requests (dropped once the task is
-- no longer active)
-- ARGV[1] at most this many per step   ARGV[2] archive max size   ARGV[3] archive max age ms
--
-- Returns {deleted, id1, token1, record1, ...} for expired leases.
do local bad = wrong_type({'zset', 'hash', 'hash', 'zset', 'hash', 'zset', 'zset', 'hash'}) if bad then return bad end end
local now, limit = now_ms(), tonumber(ARGV[1])
local deleted = 0

local function forget(ids)
  if #ids == 0 then return end
  redis.call('HDEL', KEYS[3], unpack(ids))
  redis.call('HDEL', KEYS[5], unpack(ids))
  deleted = deleted + #ids
end

local done = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now, 'LIMIT', 0, limit)
if #done > 0 then
  redis.call('ZREM', KEYS[4], unpack(done))
  forget(done)
end

local old = redis.call('ZRANGEBYSCORE', KEYS[6], '-inf', now - tonumber(ARGV[3]), 'LIMIT', 0, limit)
local extra = redis.call('ZCARD', KEYS[6]) - #old - tonumber(ARGV[2])
if extra > 0 then
  old = redis.call('ZRANGE', KEYS[6], 0, math.min(extra + #old, limit) - 1)
end
if #old > 0 then
  redis.call('ZREM', KEYS[6], unpack(old))
  forget(old)
end

redis.call('ZREMRANGEBYSCORE', KEYS[7], '-inf', now)

if redis.call('EXISTS', KEYS[8]) == 1 then
  local stale = {}
  for _, id in ipairs(redis.call('HKEYS', KEYS[8])) do
    if not redis.call('ZSCORE', KEYS[1], id) then stale[#stale + 1] = id end
  end
  if #stale > 0 then redis.call('HDEL', KEYS[8], unpack(stale)) end
end

local out = {deleted}
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, limit)
for _, id in ipairs(expired) do
  out[#out + 1] = id
  out[#out + 1] = redis.call('HGET', KEYS[2], id) or ''
  out[#out + 1] = redis.call('HGET', KEYS[3], id) or ''
end
return out
