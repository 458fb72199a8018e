-- timeline: record topology and queue events in the failover timeline, each once,
-- whichever worker saw it first (the others' copies have the same signature).
--
-- KEYS[1] the timeline stream   KEYS[2] seen: signature -> when recorded (zset)
-- ARGV[1] how long (ms) a signature keeps a copy out   ARGV[2] the stream's cap
-- ARGV[3..], two per event: signature, its JSON
--
-- Returns how many events were recorded (the others were copies).
do local bad = wrong_type({'stream', 'zset'}) if bad then return bad end end
local now = now_ms()
local window = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
local n = 0
for i = 3, #ARGV, 2 do
  if not redis.call('ZSCORE', KEYS[2], ARGV[i]) then
    redis.call('ZADD', KEYS[2], now, ARGV[i])
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'event', ARGV[i + 1])
    n = n + 1
  end
end
return n
