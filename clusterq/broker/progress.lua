-- progress: keep the latest progress report of an active task, if the caller still holds
-- its lease (a worker that lost the task cannot overwrite the new holder's report).
--
-- KEYS[1] leases   KEYS[2] the task's progress key
-- ARGV[1] task id   ARGV[2] lease token   ARGV[3] the report   ARGV[4] kept for (ms)
--
-- Returns 1 written, 0 not the lease holder.
do local bad = wrong_type({'hash', 'string'}) if bad then return bad end end
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[4])
return 1
