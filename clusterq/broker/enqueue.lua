-- enqueue: create a task record and make it pending (or scheduled, if it is due later).
--
-- KEYS[1] task record (hash)   KEYS[2] pending (list)   KEYS[3] scheduled (zset)
-- KEYS[4] unique lock (string), only for unique tasks
-- ARGV[1] task id   ARGV[2] delay ms   ARGV[3] due at ms (0: now + delay)
-- ARGV[4] unique lock ttl ms   ARGV[5..] record field/value pairs
--
-- Returns {1, state} when created; {0, state} when a task with this id already exists
-- (a retried enqueue: nothing changes); {-1, holder id} when the unique lock is held.
local id = ARGV[1]
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {0, redis.call('HGET', KEYS[1], 'state') or ''}
end
if KEYS[4] then
  if not redis.call('SET', KEYS[4], id, 'NX', 'PX', ARGV[4]) then
    return {-1, redis.call('GET', KEYS[4]) or ''}
  end
end
local now = now_ms()
local due = tonumber(ARGV[3])
if due == 0 then due = now + tonumber(ARGV[2]) end
local state = 'pending'
if due > now then state = 'scheduled' end
redis.call('HSET', KEYS[1], 'state', state, 'enq', now, unpack(ARGV, 5))
if state == 'pending' then
  redis.call('LPUSH', KEYS[2], id)
else
  redis.call('ZADD', KEYS[3], due, id)
end
return {1, state}
