-- requeue: active -> pending, at the head of the line, without using up a retry. A
-- worker that shuts down returns the tasks it will not finish.
--
-- KEYS[1] active   KEYS[2] leases   KEYS[3] pending   KEYS[4] wake channel
-- KEYS[5] events flag   KEYS[6] events stream (a ``requeued`` event per task returned;
-- see events_on)   KEYS[7] tasks (read for the events' type and retries)
-- ARGV, two per task: id, token
--
-- Returns how many tasks were returned (the others were no longer held by the caller).
do local bad = wrong_type({'zset', 'hash', 'list', '-', '-', '-', '-'}) if bad then return bad end end
local n = 0
local ev = events_on(KEYS[5], KEYS[6], ARGV[2])
for i = 1, #ARGV, 2 do
  local id = ARGV[i]
  if redis.call('HGET', KEYS[2], id) == ARGV[i + 1] then
    redis.call('ZREM', KEYS[1], id)
    redis.call('HDEL', KEYS[2], id)
    redis.call('RPUSH', KEYS[3], id)
    n = n + 1
    if ev then
      local rec = redis.pcall('HGET', KEYS[7], id)
      emit(ev, 'requeued', id, type(rec) == 'string' and rec or nil, 'pending', '')
    end
  end
end
if n > 0 and redis.call('LLEN', KEYS[3]) == n then wake(KEYS[4]) end
write_events(ev)
return n
