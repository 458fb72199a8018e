-- extend: renew the leases of active tasks the caller still holds (worker heartbeat).
--
-- KEYS[1] active   KEYS[2] leases   KEYS[3] cancel requests
-- ARGV[1] lease ms   ARGV[2..], two per task: id, token
--
-- Returns {lost, cancelled}: the ids whose lease the caller no longer holds, and those
-- of its tasks an operator asked to cancel.
do local bad = wrong_type({'zset', 'hash', 'hash'}) if bad then return bad end end
local asked = redis.call('EXISTS', KEYS[3]) == 1
local expiry = now_ms() + tonumber(ARGV[1])
local lost, cancelled = {}, {}
for i = 2, #ARGV, 2 do
  local id = ARGV[i]
  if redis.call('HGET', KEYS[2], id) == ARGV[i + 1] then
    redis.call('ZADD', KEYS[1], 'XX', expiry, id)
    if asked and redis.call('HEXISTS', KEYS[3], id) == 1 then cancelled[#cancelled + 1] = id end
  else
    lost[#lost + 1] = id
  end
end
return {lost, cancelled}
