-- ack: active -> completed (kept for its retention) or deleted. Several tasks per call.
-- A task is acked only if the caller still holds its lease (fencing token); a retried or
-- stale ack changes nothing.
--
-- KEYS[1] active   KEYS[2] leases   KEYS[3] tasks   KEYS[4] completed   KEYS[5] results
-- KEYS[6] stats   KEYS[7] done   KEYS[8..] unique locks
-- ARGV[1] how long (ms) a deleted task's id is remembered, so that a retried enqueue of
-- it is still recognised (0: not at all)
-- ARGV[2..], five per task: id, token, retention ms (0: delete now), encoded result
-- ('' none), unique lock index into KEYS (0: none)
--
-- Returns one value per task: 1 acked, 0 not the lease holder (no-op).
local now = now_ms()
local remember = tonumber(ARGV[1])
local out, done = {}, 0
for i = 2, #ARGV, 5 do
  local id = ARGV[i]
  if redis.call('HGET', KEYS[2], id) == ARGV[i + 1] then
    redis.call('ZREM', KEYS[1], id)
    redis.call('HDEL', KEYS[2], id)
    local uq = tonumber(ARGV[i + 4])
    if uq > 0 and redis.call('GET', KEYS[uq]) == id then redis.call('DEL', KEYS[uq]) end
    local retention = tonumber(ARGV[i + 2])
    if retention > 0 then
      redis.call('ZADD', KEYS[4], now + retention, id)
      if ARGV[i + 3] ~= '' then redis.call('HSET', KEYS[5], id, ARGV[i + 3]) end
    else
      redis.call('HDEL', KEYS[3], id)
      if remember > 0 then redis.call('ZADD', KEYS[7], now + remember, id) end
    end
    done = done + 1
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
if done > 0 then redis.call('HINCRBY', KEYS[6], 'processed', done) end
return out
