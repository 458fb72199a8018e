#!lua flags=no-writes,allow-cross-slot-keys
-- survey: how several queues on this node stand, in one call: a worker's look at its idle
-- queues, about once a second per node, in place of a command per queue. The queues'
-- slots differ, so their keys are not declared (there is no one slot to route by): the
-- caller sends it to the node that serves them, and a queue whose slot is not served here
-- (moved meanwhile), or whose keys are not what clusterq wrote, answers "unknown" instead.
-- Reads only. No prelude: the flags line must come first.
--
-- ARGV[1] archive max size   ARGV[2] archive max age ms (as the worker's sweep has them)
-- ARGV[3..], eleven per queue: pending (list), paused (string), scheduled, retry, active,
-- completed, done, archived (zsets), cancel requests (hash), fair, turns (zsets)
--
-- Returns the server's time (ms), then four values per queue: how many tasks are pending
-- (the pending list and ``fair``; -1: unknown), paused (1/0), the earliest scheduled/retry
-- due time or fair group's turn in ms (-1: none),
-- and 1 when the queue needs a sweep (sweep.lua) now, else 0: an active task's lease
-- expired (its worker died holding it), a completed task's retention or a deleted id's
-- dedup window ended, the archive is over its size or age, a cancel request is waiting.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local function overdue(key)
  local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  return #first > 0 and tonumber(first[2]) <= now
end

local max_size, max_age = tonumber(ARGV[1]), tonumber(ARGV[2])

local function look(pending, paused, scheduled, retry, active, completed, done, archived,
                    cancel, fair, turns)
  if redis.call('EXISTS', pending, paused, scheduled, retry, active, completed, done, archived,
                cancel, fair, turns) == 0 then
    return {0, 0, -1, 0}  -- nothing at all: the common case, in one call
  end
  local n = redis.call('LLEN', pending) + redis.call('ZCARD', fair)
  local due = -1
  for _, key in ipairs({scheduled, retry, turns}) do
    local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    if #first > 0 then
      local score = tonumber(first[2])
      if due < 0 or score < due then due = score end
    end
  end
  local oldest = redis.call('ZRANGE', archived, 0, 0, 'WITHSCORES')
  local sweep = overdue(active) or overdue(completed) or overdue(done)
    or (#oldest > 0 and tonumber(oldest[2]) <= now - max_age)
    or redis.call('ZCARD', archived) > max_size or redis.call('HLEN', cancel) > 0
  return {n, redis.call('EXISTS', paused), due, sweep and 1 or 0}
end

local out = {now}
for i = 3, #ARGV, 11 do
  local ok, got = pcall(look, unpack(ARGV, i, i + 10))
  if not ok then got = {-1, 0, -1, 0} end
  for _, v in ipairs(got) do out[#out + 1] = v end
end
return out
