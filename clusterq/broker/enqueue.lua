-- enqueue: new tasks -> pending, or scheduled when due later. Several tasks per call.
--
-- KEYS[1] tasks (hash)   KEYS[2] pending   KEYS[3] scheduled   KEYS[4] retry
-- KEYS[5] active   KEYS[6] archived   KEYS[7] completed   KEYS[8] stats
-- KEYS[9] done (ids completed and deleted lately)   KEYS[10] wake channel
-- KEYS[11] turns   KEYS[12] fair: a task in a fair group that is due now goes straight
-- into its group (``fair``, its group in ``turns``), which also puts the queue's fair
-- serving on (see dequeue.lua)   KEYS[13] events flag   KEYS[14] events stream (see
-- events_on: an ``enqueued`` event per task created)   KEYS[15..] unique locks
-- ARGV[1] durable (1/0): the caller will WAIT for replicas after this call, so even a
-- call that creates nothing must write (a counter): WAIT counts this connection's
-- writes, and a later write can only be confirmed once the earlier ones are.
-- ARGV[2..], six per task: id, delay ms, due at ms (0: now + delay), unique lock index
-- into KEYS (0: none), unique lock ttl ms, record
--
-- Returns two values per task: {1, 'pending'|'scheduled'} created; {0, state} a task
-- with this id exists already (a retried enqueue: nothing changes); {-1, holder id} the
-- unique lock is held by another task.
do local bad = wrong_type({'hash', 'list', 'zset', 'zset', 'zset', 'zset', 'zset', 'hash', 'zset', '-', 'zset', 'zset', '-', '-'}) if bad then return bad end end
local function state_of(id)
  if redis.call('ZSCORE', KEYS[5], id) then return 'active' end
  if redis.call('ZSCORE', KEYS[3], id) then return 'scheduled' end
  if redis.call('ZSCORE', KEYS[4], id) then return 'retry' end
  if redis.call('ZSCORE', KEYS[6], id) then return 'archived' end
  if redis.call('ZSCORE', KEYS[7], id) then return 'completed' end
  return 'pending'
end

-- Check every task's numbers before writing anything: a batch whose last task is bad
-- must not leave the first ones half written (a record without a state).
local most = 3153600000000  -- 100 years in ms
for i = 2, #ARGV, 6 do
  local delay, due = tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local uq, ttl = tonumber(ARGV[i + 3]), tonumber(ARGV[i + 4])
  if not (delay and due and uq and ttl) or delay < 0 or delay > most or due < 0
      or uq < 0 or uq > #KEYS or ttl < 1 or ttl > most then
    return redis.error_reply('ERR enqueue: bad delay, due time or unique ttl for task '
      .. ARGV[i] .. '; nothing was written')
  end
end

local now = now_ms()
local counting = ARGV[1] == '1' and countable(KEYS[8], 'enqueue_repeats')
local out, ready, existing, members, turns = {}, {}, 0, {}, {}
local earliest, earliest_due = nil, nil  -- the first due of the tasks scheduled here
local ev = events_on(KEYS[13], KEYS[14])
local created = {}  -- (with events on) ARGV index and state of each task created
for i = 2, #ARGV, 6 do
  local id, uq = ARGV[i], tonumber(ARGV[i + 3])
  local gone = redis.call('ZSCORE', KEYS[9], id)
  if redis.call('HEXISTS', KEYS[1], id) == 1 then
    existing = existing + 1
    out[#out + 1] = 0
    out[#out + 1] = state_of(id)
  elseif gone and tonumber(gone) > now then
    existing = existing + 1
    out[#out + 1] = 0
    out[#out + 1] = 'completed'  -- ran and was deleted moments ago: do not run it again
  elseif uq > 0 and not redis.call('SET', KEYS[uq], id, 'NX', 'PX', ARGV[i + 4]) then
    out[#out + 1] = -1
    out[#out + 1] = redis.call('GET', KEYS[uq]) or ''
  else
    local due = tonumber(ARGV[i + 2])
    if due == 0 then due = now + tonumber(ARGV[i + 1]) end
    redis.call('HSET', KEYS[1], id, ARGV[i + 5])
    out[#out + 1] = 1
    if ev then created[#created + 1] = i end
    if due > now then
      redis.call('ZADD', KEYS[3], due, id)
      if not earliest_due or due < earliest_due then earliest, earliest_due = id, due end
      out[#out + 1] = 'scheduled'
    else
      local group = group_of(ARGV[i + 5])
      if group then
        members[#members + 1] = 0
        members[#members + 1] = fair_member(ARGV[i + 5], id, group)
        turns[#turns + 1] = now
        turns[#turns + 1] = group
      else
        ready[#ready + 1] = id
      end
      out[#out + 1] = 'pending'
    end
  end
end
-- Wake waiting workers when the pending list was empty, or when a task here is due
-- before anything scheduled so far (they wait until the earliest due time they know).
local was_empty = #ready > 0 and redis.call('LPUSH', KEYS[2], unpack(ready)) == #ready
if #members > 0 then
  local added = redis.call('ZADD', KEYS[12], unpack(members))
  redis.call('ZADD', KEYS[11], 'NX', unpack(turns))
  if added == redis.call('ZCARD', KEYS[12]) then was_empty = true end
end
if was_empty or (earliest and is_first(KEYS[3], earliest)) then wake(KEYS[10]) end
for _, i in ipairs(created) do
  local due = tonumber(ARGV[i + 2])
  if due == 0 then due = now + tonumber(ARGV[i + 1]) end
  emit(ev, 'enqueued', ARGV[i], ARGV[i + 5], due > now and 'scheduled' or 'pending')
end
write_events(ev)
if counting and existing > 0 then
  redis.call('HINCRBY', KEYS[8], 'enqueue_repeats', existing)
end
return out
