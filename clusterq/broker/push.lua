-- push: new tasks that need no decision (fresh ids, due now, no unique lock) -> pending.
-- Small on purpose (no prelude): it is the path of most enqueues.
--
-- KEYS[1] tasks   KEYS[2] pending   KEYS[3] wake channel
-- ARGV, two per task: id, record
--
-- Wakes the queue's waiting workers when the pending list was empty before (a list that
-- had ids has workers taking them, or awake). Returns the pending list's length.
local ids = {}
for i = 1, #ARGV, 2 do ids[#ids + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(ARGV))
local n = redis.call('LPUSH', KEYS[2], unpack(ids))
if n == #ids then redis.pcall('SPUBLISH', KEYS[3], '') end
return n
