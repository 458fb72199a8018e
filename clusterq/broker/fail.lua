-- fail: active -> retry (after a delay) or archived. Also used by the recoverer for
-- tasks whose lease expired (only_if_expired), so a lease extended meanwhile wins.
--
-- KEYS[1] active   KEYS[2] leases   KEYS[3] tasks   KEYS[4] retry   KEYS[5] archived
-- KEYS[6] stats   KEYS[7] wake channel   KEYS[8] limits   KEYS[9] groups   KEYS[10] turns
-- ARGV[1] id   ARGV[2] token   ARGV[3] new meta (the record's part before its newline)
-- ARGV[4] retry delay ms, or -1 to archive   ARGV[5] only_if_expired (1/0)
-- ARGV[6] count as a failure in stats (1/0)
-- ARGV[7] hold ms: nothing of the queue starts for that long (RateLimited with scope
-- "queue"; 0: no hold)   ARGV[8] the hold's scope: 'queue', or 'group' (only the task's
-- fair group is held: ``h:<group>`` in groups, and its turn put off; a task in no group
-- is held alone)   KEYS[11] events flag   KEYS[12] events stream (see events_on: a
-- ``retried`` or ``failed`` event with the error, ``recovered`` when only_if_expired)
--
-- Returns 1 retry, 2 archived, 0 not the lease holder or lease still valid (no-op), -1
-- the task is gone (deleted by an operator, its queue removed).
-- Every check that can fail comes before the first write (a stats counter that is not
-- an integer is not counted).
do local bad = wrong_type({'zset', 'hash', 'hash', 'zset', 'zset', 'hash', '-', 'hash', 'hash', 'zset', '-', '-'}) if bad then return bad end end
local now, id = now_ms(), ARGV[1]
if redis.call('HGET', KEYS[2], id) ~= ARGV[2] then
  if redis.call('HEXISTS', KEYS[3], id) == 0 then return -1 end  -- deleted meanwhile
  return 0
end
local counting = ARGV[6] == '1' and countable(KEYS[6], 'failed')
  and countable(KEYS[6], history_field('f', now))
if ARGV[5] == '1' then
  local expiry = redis.call('ZSCORE', KEYS[1], id)
  if expiry and tonumber(expiry) > now then return 0 end
end
redis.call('ZREM', KEYS[1], id)
redis.call('HDEL', KEYS[2], id)
local rec = redis.call('HGET', KEYS[3], id)
if rec then
  local cut = string.find(rec, '\n', 1, true) or (#rec + 1)
  redis.call('HSET', KEYS[3], id, ARGV[3] .. string.sub(rec, cut))
end
if counting then
  redis.call('HINCRBY', KEYS[6], 'failed', 1)
  count_history(KEYS[6], 'f', 1, now)
end
local hold = tonumber(ARGV[7]) or 0
if hold > 0 and ARGV[8] == 'group' then
  local g = rec and group_of(rec)
  if g then
    local until_ms = now + hold
    if until_ms > (tonumber(redis.call('HGET', KEYS[9], 'h:' .. g)) or 0) then
      redis.call('HSET', KEYS[9], 'h:' .. g, until_ms)
      redis.call('ZADD', KEYS[10], 'GT', until_ms, g)
    end
  end
elseif hold > 0 then
  local until_ms = now + hold
  if until_ms > (tonumber(redis.call('HGET', KEYS[8], 'hold')) or 0) then
    redis.call('HSET', KEYS[8], 'hold', until_ms)
  end
end
local delay = tonumber(ARGV[4])
local ev = events_on(KEYS[11], KEYS[12], ARGV[2])
if ev then
  local ok, meta = pcall(cjson.decode, ARGV[3])
  local err = ok and type(meta) == 'table' and type(meta['err']) == 'string' and meta['err'] or ''
  local event = ARGV[5] == '1' and 'recovered' or (delay >= 0 and 'retried' or 'failed')
  emit(ev, event, id, rec and (ARGV[3] .. '\n') or nil, delay >= 0 and 'retry' or 'archived',
    err, retries_of(ARGV[3]))
  write_events(ev)
end
if delay >= 0 then
  redis.call('ZADD', KEYS[4], now + delay, id)
  if is_first(KEYS[4], id) then wake(KEYS[7]) end
  return 1
end
redis.call('ZADD', KEYS[5], now, id)
return 2
