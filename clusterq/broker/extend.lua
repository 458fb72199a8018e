-- extend: renew the leases of active tasks the caller still holds (worker heartbeat).
--
-- KEYS[1] active   KEYS[2] leases
-- ARGV[1] lease ms   ARGV[2..], two per task: id, token
--
-- Returns the ids whose lease the caller no longer holds.
do local bad = wrong_type({'zset', 'hash'}) if bad then return bad end end
local expiry = now_ms() + tonumber(ARGV[1])
local lost = {}
for i = 2, #ARGV, 2 do
  local id = ARGV[i]
  if redis.call('HGET', KEYS[2], id) == ARGV[i + 1] then
    redis.call('ZADD', KEYS[1], 'XX', expiry, id)
  else
    lost[#lost + 1] = id
  end
end
return lost
