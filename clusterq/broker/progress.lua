-- progress: keep the latest progress report of an active task, if the caller still holds
-- its lease (a worker that lost the task cannot overwrite the new holder's report); a
-- ``progress`` event too while the queue's events are on (see events_on).
--
-- KEYS[1] leases   KEYS[2] the task's progress key   KEYS[3] events flag
-- KEYS[4] events stream   KEYS[5] tasks (read for the event's type and retries)
-- ARGV[1] task id   ARGV[2] lease token   ARGV[3] the report   ARGV[4] kept for (ms)
-- ARGV[5] the fraction, as text (for the event)
--
-- Returns 1 written, 0 not the lease holder.
do local bad = wrong_type({'hash', 'string', '-', '-', 'hash'}) if bad then return bad end end
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[4])
local ev = events_on(KEYS[3], KEYS[4], ARGV[2])
if ev then
  local rec = redis.call('HGET', KEYS[5], ARGV[1])
  rec = type(rec) == 'string' and rec or nil
  emit(ev, 'progress', ARGV[1], rec, 'active', '', nil, tonumber(ARGV[5]) or ARGV[5])
  write_events(ev)
end
return 1
