-- limits: replace a queue's declared limits (rate, burst, concurrency; see
-- clusterq.limits). The rate limiter starts again full (its state is dropped) when the
-- rate or burst changes; a hold a handler asked for is kept unless the limits are
-- cleared. Wakes the queue's waiting workers, so a raised limit applies at once.
--
-- KEYS[1] limits   KEYS[2] wake channel
-- ARGV[1] 1: clear everything (no fields follow)   ARGV[2..] field, value, ...
--
-- Returns 1.
do local bad = wrong_type({'hash', '-'}) if bad then return bad end end
local old = redis.call('HMGET', KEYS[1], 'interval', 'burst')
redis.call('HDEL', KEYS[1], 'spec', 'interval', 'burst', 'concurrency')
if ARGV[1] == '1' then
  redis.call('DEL', KEYS[1])
else
  local new = {}
  for i = 2, #ARGV, 2 do new[ARGV[i]] = ARGV[i + 1] end
  if new['interval'] ~= old[1] or new['burst'] ~= old[2] then
    redis.call('HDEL', KEYS[1], 'tat')
  end
  if #ARGV > 1 then redis.call('HSET', KEYS[1], unpack(ARGV, 2)) end
end
wake(KEYS[2])
return 1
