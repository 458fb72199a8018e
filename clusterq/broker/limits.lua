-- limits: replace a queue's declared limits (rate, burst, concurrency, per-type rates;
-- see clusterq.limits). A rate limiter (the queue's, or a task type's) starts again
-- full (its state is dropped) when its rate or burst changes or it is removed; a hold
-- a handler asked for is kept unless the limits are cleared. Wakes the queue's waiting
-- workers, so a raised limit applies at once.
--
-- A changed (or removed) per-group rate drops every group's rate state (``r:<group>`` in
-- the groups hash) and gives each waiting group its turn now.
--
-- KEYS[1] limits   KEYS[2] wake channel   KEYS[3] groups   KEYS[4] turns
-- ARGV[1] 1: clear everything (no fields follow)   ARGV[2..] field, value, ...
--
-- Returns 1.
do local bad = wrong_type({'hash', '-', 'hash', 'zset'}) if bad then return bad end end
local old = redis.call('HMGET', KEYS[1], 'interval', 'burst', 'spec', 'gi', 'gb')
-- The per-type fields of the declaration before (its spec names the types).
local typed, capped = {}, {}
if old[3] then
  local ok, spec = pcall(cjson.decode, old[3])
  if ok and type(spec) == 'table' and type(spec['type_rates']) == 'table' then
    for name, _ in pairs(spec['type_rates']) do
      if type(name) == 'string' then typed[#typed + 1] = name end
    end
  end
  if ok and type(spec) == 'table' and type(spec['type_concurrency']) == 'table' then
    for name, _ in pairs(spec['type_concurrency']) do
      if type(name) == 'string' then capped[#capped + 1] = 'tc:' .. name end
    end
  end
end
redis.call('HDEL', KEYS[1], 'spec', 'interval', 'burst', 'concurrency', 'types', 'gi', 'gb', 'gc',
  'tcaps')
for i = 1, #capped, 1000 do
  redis.call('HDEL', KEYS[1], unpack(capped, i, math.min(i + 999, #capped)))
end
local new = {}
for i = 2, #ARGV, 2 do new[ARGV[i]] = ARGV[i + 1] end
if new['gi'] ~= old[4] or new['gb'] ~= old[5] then
  local stale = {}
  for _, field in ipairs(redis.call('HKEYS', KEYS[3])) do
    if string.sub(field, 1, 2) == 'r:' then stale[#stale + 1] = field end
  end
  for i = 1, #stale, 1000 do
    redis.call('HDEL', KEYS[3], unpack(stale, i, math.min(i + 999, #stale)))
  end
  local now = now_ms()
  local later = redis.call('ZRANGEBYSCORE', KEYS[4], '(' .. now, '+inf')
  for _, g in ipairs(later) do redis.call('ZADD', KEYS[4], now, g) end
end
if ARGV[1] == '1' then
  redis.call('DEL', KEYS[1])
else
  if new['interval'] ~= old[1] or new['burst'] ~= old[2] then
    redis.call('HDEL', KEYS[1], 'tat')
  end
  -- Drop the old per-type rates, and the state of each type whose rate changed or went.
  for _, name in ipairs(typed) do
    local i, b = 'ti:' .. name, 'tb:' .. name
    local was = redis.call('HMGET', KEYS[1], i, b)
    redis.call('HDEL', KEYS[1], i, b)
    if new[i] ~= was[1] or new[b] ~= was[2] then
      redis.call('HDEL', KEYS[1], 'tt:' .. name, 'th:' .. name)
    end
  end
  if #ARGV > 1 then redis.call('HSET', KEYS[1], unpack(ARGV, 2)) end
end
wake(KEYS[2])
return 1
