-- push: new tasks that need no decision (fresh ids, due now, no unique lock) -> pending.
-- Small on purpose (_events.lua only, no prelude): it is the path of most enqueues.
--
-- KEYS[1] tasks   KEYS[2] pending   KEYS[3] wake channel   KEYS[4] events flag
-- KEYS[5] events stream (an ``enqueued`` event per task while the flag holds the cap;
-- see _events.lua)
-- ARGV, two per task: id, record
--
-- Wakes the queue's waiting workers when the pending list was empty before (a list that
-- had ids has workers taking them, or awake). Returns the pending list's length.
--
-- Key types are looked at on the way out of a refusal only (no TYPE per call). A script
-- is not rolled back when a command fails, so: the LPUSH goes first (refused on a key of
-- another type: nothing was written); an HSET refused after it is undone by an LTRIM of
-- just the ids pushed (at the head: nothing runs in between). Either way nothing stays
-- written and the reply names the key, as the other scripts' wrong_type does.
local count = #ARGV / 2
local n, written
if count == 1 then
  n = redis.pcall('LPUSH', KEYS[2], ARGV[1])
else
  local ids = {}
  for i = 1, #ARGV, 2 do ids[#ids + 1] = ARGV[i] end
  n = redis.pcall('LPUSH', KEYS[2], unpack(ids))
end
if type(n) == 'number' then
  written = redis.pcall('HSET', KEYS[1], unpack(ARGV))
  if type(written) == 'number' then
    if n == count then redis.pcall('SPUBLISH', KEYS[3], '') end
    local ev = events_on(KEYS[4], KEYS[5])
    if ev then
      for i = 1, #ARGV, 2 do emit(ev, 'enqueued', ARGV[i], ARGV[i + 1], 'pending', nil, 0) end
      write_events(ev)
    end
    return n
  end
  redis.call('LTRIM', KEYS[2], count, -1)
end
for i, want in ipairs({'hash', 'list'}) do
  local got = redis.call('TYPE', KEYS[i])['ok']
  if got ~= 'none' and got ~= want then
    return redis.error_reply('WRONGTYPE clusterq key ' .. KEYS[i] .. ' holds a ' .. got
      .. ', not a ' .. want .. '; nothing was written')
  end
end
if type(n) == 'number' then return written end
return n
