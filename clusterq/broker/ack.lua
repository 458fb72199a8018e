-- ack: active -> completed (kept for its retention) or deleted. Several tasks per call.
-- A task is acked only if the caller still holds its lease (fencing token); a retried or
-- stale ack changes nothing.
--
-- KEYS[1] active   KEYS[2] leases   KEYS[3] tasks   KEYS[4] completed   KEYS[5] results
-- KEYS[6] stats   KEYS[7] done   KEYS[8] events flag   KEYS[9] events stream (a
-- ``succeeded`` event per task acked; see events_on)   KEYS[10..] unique locks
-- ARGV[1] how long (ms) a deleted task's id is remembered, so that a retried enqueue of
-- it is still recognised (0: not at all)
-- ARGV[2..], five per task: id, token, retention ms (0: delete now), encoded result
-- ('' none), unique lock index into KEYS (0: none)
--
-- Returns one value per task: 1 acked, 0 not the lease holder (no-op: another worker
-- holds it, or recovery took it back), -1 the task is gone (deleted by an operator, its
-- queue removed).
-- The writes go out as one command per key for the whole batch (cheaper here and on
-- the replicas, which receive them as they are). Nothing here fails after the first
-- write: key types are checked first, and a stats counter holding something else than
-- an integer is not counted (see countable).
do local bad = wrong_type({'zset', 'hash', 'hash', 'zset', 'hash', 'hash', 'zset', '-', '-'}) if bad then return bad end end
local now = now_ms()
local counting = countable(KEYS[6], 'processed') and countable(KEYS[6], history_field('p', now))
local remember = tonumber(ARGV[1])
local ids = {}
for i = 2, #ARGV, 5 do ids[#ids + 1] = ARGV[i] end
local holders = redis.call('HMGET', KEYS[2], unpack(ids))
local ev = events_on(KEYS[8], KEYS[9], ARGV[3])
local records = {}  -- (with events on) the records of the tasks acked, read before

local out, acked, seen = {}, {}, {}
local kept, results, deleted, gone = {}, {}, {}, {}
for n, id in ipairs(ids) do
  local i = 2 + (n - 1) * 5
  if holders[n] == ARGV[i + 1] and not seen[id] then
    seen[id] = true
    acked[#acked + 1] = id
    if ev then records[id] = redis.call('HGET', KEYS[3], id) or false end
    local uq = tonumber(ARGV[i + 4])
    if uq > 0 and redis.call('GET', KEYS[uq]) == id then redis.call('DEL', KEYS[uq]) end
    local retention = tonumber(ARGV[i + 2])
    if retention > 0 then
      kept[#kept + 1] = now + retention
      kept[#kept + 1] = id
      if ARGV[i + 3] ~= '' then
        results[#results + 1] = id
        results[#results + 1] = ARGV[i + 3]
      end
    else
      deleted[#deleted + 1] = id
      if remember > 0 then
        gone[#gone + 1] = now + remember
        gone[#gone + 1] = id
      end
    end
    out[n] = 1
  elseif redis.call('HEXISTS', KEYS[3], id) == 0 then
    out[n] = -1
  else
    out[n] = 0
  end
end
if #acked > 0 then
  redis.call('ZREM', KEYS[1], unpack(acked))
  redis.call('HDEL', KEYS[2], unpack(acked))
  if counting then
    redis.call('HINCRBY', KEYS[6], 'processed', #acked)
    count_history(KEYS[6], 'p', #acked, now)
  end
end
if #kept > 0 then redis.call('ZADD', KEYS[4], unpack(kept)) end
if #results > 0 then redis.call('HSET', KEYS[5], unpack(results)) end
if #deleted > 0 then redis.call('HDEL', KEYS[3], unpack(deleted)) end
if #gone > 0 then redis.call('ZADD', KEYS[7], unpack(gone)) end
if ev then
  local kept_ids = {}
  for j = 2, #kept, 2 do kept_ids[kept[j]] = true end
  for _, id in ipairs(acked) do
    emit(ev, 'succeeded', id, records[id] or nil, kept_ids[id] and 'completed' or 'deleted')
  end
  write_events(ev)
end
return out
