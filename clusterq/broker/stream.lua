-- stream: one stream partition's consumer-side steps that must be atomic.
-- ARGV[1] is the operation; every key is in the partition's slot.
--   acquire  KEYS owner, epoch; ARGV consumer, lease ms -> the new fencing token, or false
--   renew    KEYS owner; ARGV token, lease ms -> 1 while the token owns the partition
--   release  KEYS owner; ARGV token -> 1 if it owned it
--   ack      KEYS events, owner; ARGV group, token ('' for unordered), ids... -> acked, or
--            -1 when the token no longer owns the partition (nothing acked)
--   dead     KEYS events, dead; ARGV group, id, reason, dead maxlen -> 1 when moved
--   forget   KEYS events; ARGV group, idle ms, names... -> the names removed from the group:
--            those (of workers no longer alive) holding nothing pending and idle that long
--            (checked and removed in one step: a pending entry is never dropped)
local op = ARGV[1]
if op == 'acquire' then
  if redis.call('EXISTS', KEYS[1]) == 1 then return false end
  local n = redis.call('INCR', KEYS[2])
  local token = ARGV[2] .. ':' .. n
  redis.call('SET', KEYS[1], token, 'PX', tonumber(ARGV[3]))
  return token
elseif op == 'renew' then
  if redis.call('GET', KEYS[1]) ~= ARGV[2] then return 0 end
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
  return 1
elseif op == 'release' then
  if redis.call('GET', KEYS[1]) ~= ARGV[2] then return 0 end
  redis.call('DEL', KEYS[1])
  return 1
elseif op == 'ack' then
  if ARGV[3] ~= '' and redis.call('GET', KEYS[2]) ~= ARGV[3] then return -1 end
  local ids = {}
  for i = 4, #ARGV do ids[#ids + 1] = ARGV[i] end
  if #ids == 0 then return 0 end
  return redis.call('XACK', KEYS[1], ARGV[2], unpack(ids))
elseif op == 'dead' then
  local entries = redis.call('XRANGE', KEYS[1], ARGV[3], ARGV[3])
  if #entries == 1 then
    local fields = entries[1][2]
    fields[#fields + 1] = 'id'
    fields[#fields + 1] = ARGV[3]
    fields[#fields + 1] = 'group'
    fields[#fields + 1] = ARGV[2]
    fields[#fields + 1] = 'reason'
    fields[#fields + 1] = ARGV[4]
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', tonumber(ARGV[5]), '*', unpack(fields))
  end
  redis.call('XACK', KEYS[1], ARGV[2], ARGV[3])
  return #entries
end
if op == 'forget' then
  if redis.call('EXISTS', KEYS[1]) == 0 then return {} end
  local gone = {}
  for i = 4, #ARGV do gone[ARGV[i]] = true end
  local removed = {}
  for _, entry in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[2])) do
    local info = {}
    for j = 1, #entry, 2 do info[entry[j]] = entry[j + 1] end
    if gone[info['name']] and tonumber(info['pending']) == 0
        and tonumber(info['idle']) >= tonumber(ARGV[3]) then
      redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[2], info['name'])
      removed[#removed + 1] = info['name']
    end
  end
  return removed
end
return redis.error_reply('ERR unknown stream operation ' .. tostring(op))
