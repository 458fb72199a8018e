-- cron: the periodic scheduler's leader lease and its claims on ticks, in one slot.
--
-- acquire  KEYS leader, epoch            ARGV 'acquire', scheduler id, lease ms
--          -> the new token, the caller's current one (renewed), or false
-- renew    KEYS leader                   ARGV 'renew', token, lease ms     -> 1 / 0
-- release  KEYS leader                   ARGV 'release', token             -> 1 / 0
-- start    KEYS leader, state            ARGV 'start', token, entry, tick ms
--          an entry seen for the first time fires from its next tick: last := tick,
--          unless it has a last tick already                               -> last / -1
-- claim    KEYS leader, state            ARGV 'claim', token, entry, tick ms
--          -1 not the leader; 0 already fired; 1 claimed (last and inflight := tick)
-- redrive  KEYS leader, state            ARGV 'redrive', token, entry, tick ms
--          may the leader enqueue again the claimed tick (one that failed, or that a
--          previous leader left in flight)? -1 not the leader; 0 no longer in flight; 1 yes
-- done     KEYS state, history           ARGV 'done', entry, tick ms, record, keep
--          the claimed tick's task is enqueued: inflight cleared, history kept to `keep`
-- publish  KEYS leader, state, entries, history of each ghost
--          ARGV 'publish', token, now ms, cutoff ms, n, n x (entry, description), ghosts...
--          the leader's entries described and seen now (seen:<entry> := now); each ghost
--          (an entry the leader does not declare) seen before cutoff is forgotten (its
--          description, state and history removed), one never seen is seen from now
--          -> how many were forgotten / -1 not the leader
local op = ARGV[1]
if op == 'acquire' then
  local holder = redis.call('GET', KEYS[1])
  if holder then
    if string.sub(holder, 1, #ARGV[2] + 1) == ARGV[2] .. ':' then
      redis.call('PEXPIRE', KEYS[1], ARGV[3])
      return holder
    end
    return false
  end
  local token = ARGV[2] .. ':' .. redis.call('INCR', KEYS[2])
  redis.call('SET', KEYS[1], token, 'PX', ARGV[3])
  return token
elseif op == 'renew' then
  if redis.call('GET', KEYS[1]) ~= ARGV[2] then return 0 end
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return 1
elseif op == 'release' then
  if redis.call('GET', KEYS[1]) ~= ARGV[2] then return 0 end
  redis.call('DEL', KEYS[1])
  return 1
elseif op == 'start' then
  if redis.call('GET', KEYS[1]) ~= ARGV[2] then return -1 end
  redis.call('HSETNX', KEYS[2], 'last:' .. ARGV[3], ARGV[4])
  return tonumber(redis.call('HGET', KEYS[2], 'last:' .. ARGV[3]))
elseif op == 'claim' then
  if redis.call('GET', KEYS[1]) ~= ARGV[2] then return -1 end
  local last = tonumber(redis.call('HGET', KEYS[2], 'last:' .. ARGV[3]))
  local tick = tonumber(ARGV[4])
  if last and last >= tick then return 0 end
  redis.call('HSET', KEYS[2], 'last:' .. ARGV[3], ARGV[4], 'inflight:' .. ARGV[3], ARGV[4])
  return 1
elseif op == 'redrive' then
  if redis.call('GET', KEYS[1]) ~= ARGV[2] then return -1 end
  if redis.call('HGET', KEYS[2], 'inflight:' .. ARGV[3]) == ARGV[4] then return 1 end
  return 0
elseif op == 'publish' then
  if redis.call('GET', KEYS[1]) ~= ARGV[2] then return -1 end
  local now, cutoff, declared = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
  for i = 0, declared - 1 do
    local name = ARGV[6 + 2 * i]
    redis.call('HSET', KEYS[3], name, ARGV[7 + 2 * i])
    redis.call('HSET', KEYS[2], 'seen:' .. name, now)
  end
  local forgotten = 0
  local first = 6 + 2 * declared
  for i = first, #ARGV do
    local name = ARGV[i]
    local seen = tonumber(redis.call('HGET', KEYS[2], 'seen:' .. name))
    if not seen then
      redis.call('HSET', KEYS[2], 'seen:' .. name, now)
    elseif seen < cutoff then
      redis.call('HDEL', KEYS[3], name)
      redis.call('HDEL', KEYS[2], 'last:' .. name, 'inflight:' .. name, 'seen:' .. name)
      redis.call('DEL', KEYS[4 + i - first])
      forgotten = forgotten + 1
    end
  end
  return forgotten
elseif op == 'done' then
  if redis.call('HGET', KEYS[1], 'inflight:' .. ARGV[2]) == ARGV[3] then
    redis.call('HDEL', KEYS[1], 'inflight:' .. ARGV[2])
  end
  redis.call('LPUSH', KEYS[2], ARGV[4])
  redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[5]) - 1)
  return 1
end
return redis.error_reply('ERR cron: unknown op ' .. tostring(op))
