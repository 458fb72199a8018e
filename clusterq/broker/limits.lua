-- limits: replace a queue's declared limits (rate, burst, concurrency, per-type rates;
-- see clusterq.limits). A rate limiter (the queue's, or a task type's) starts again
-- full (its state is dropped) when its rate or burst changes or it is removed; a hold
-- a handler asked for is kept unless the limits are cleared. Wakes the queue's waiting
-- workers, so a raised limit applies at once.
--
-- KEYS[1] limits   KEYS[2] wake channel
-- ARGV[1] 1: clear everything (no fields follow)   ARGV[2..] field, value, ...
--
-- Returns 1.
do local bad = wrong_type({'hash', '-'}) if bad then return bad end end
local old = redis.call('HMGET', KEYS[1], 'interval', 'burst', 'types')
redis.call('HDEL', KEYS[1], 'spec', 'interval', 'burst', 'concurrency', 'types')
if ARGV[1] == '1' then
  redis.call('DEL', KEYS[1])
else
  local new = {}
  for i = 2, #ARGV, 2 do new[ARGV[i]] = ARGV[i + 1] end
  if new['interval'] ~= old[1] or new['burst'] ~= old[2] then
    redis.call('HDEL', KEYS[1], 'tat')
  end
  if old[3] then  -- per-type rates: drop the old ones, and the state of those changed
    local fields = redis.call('HGETALL', KEYS[1])
    local gone = {}
    for i = 1, #fields, 2 do
      local f, v = fields[i], fields[i + 1]
      local kind, name = string.sub(f, 1, 3), string.sub(f, 4)
      if kind == 'ti:' or kind == 'tb:' then
        gone[#gone + 1] = f
        if new[f] ~= v then
          gone[#gone + 1] = 'tt:' .. name
          gone[#gone + 1] = 'th:' .. name
        end
      end
    end
    for i = 1, #gone, 1000 do
      redis.call('HDEL', KEYS[1], unpack(gone, i, math.min(i + 999, #gone)))
    end
  end
  if #ARGV > 1 then redis.call('HSET', KEYS[1], unpack(ARGV, 2)) end
end
wake(KEYS[2])
return 1
