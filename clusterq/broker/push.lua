-- push: new tasks that need no decision (fresh ids, due now, no unique lock) -> pending.
-- Small on purpose (no prelude): it is the path of most enqueues.
--
-- KEYS[1] tasks   KEYS[2] pending   KEYS[3] wake channel
-- ARGV, two per task: id, record
--
-- Wakes the queue's waiting workers when the pending list was empty before (a list that
-- had ids has workers taking them, or awake). Returns the pending list's length.
-- Key types first (as the other scripts' wrong_type): a list that is not one would
-- fail the LPUSH after the HSET, leaving records in no state.
for i, want in ipairs({'hash', 'list'}) do
  local got = redis.call('TYPE', KEYS[i])['ok']
  if got ~= 'none' and got ~= want then
    return redis.error_reply('WRONGTYPE clusterq key ' .. KEYS[i] .. ' holds a ' .. got
      .. ', not a ' .. want .. '; nothing was written')
  end
end
local ids = {}
for i = 1, #ARGV, 2 do ids[#ids + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(ARGV))
local n = redis.call('LPUSH', KEYS[2], unpack(ids))
if n == #ids then redis.pcall('SPUBLISH', KEYS[3], '') end
return n
