-- Shared by every clusterq script (prepended when the script is loaded).
-- Scripts never build key names: every key they touch arrives in KEYS, and all KEYS of
-- one call belong to one queue (one hash tag, one slot). Times are the server's clock.
pcall(redis.replicate_commands)  -- Redis < 7 needs this before TIME is followed by writes

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Scripts are not rolled back when a command fails halfway. A key of the wrong type
-- (written by something else) would leave a half-done transition, so each script checks
-- its keys' types before it writes anything. types[i] is what KEYS[i] must be (or be
-- missing); keys past the list (unique locks) must be strings. Returns an error reply
-- to return at once, or nil.
local function wrong_type(types)
  for i = 1, #KEYS do
    local want = types[i] or 'string'
    if want ~= '-' then
      local got = redis.call('TYPE', KEYS[i])['ok']
      if got ~= 'none' and got ~= want then
        return redis.error_reply('WRONGTYPE clusterq key ' .. KEYS[i] .. ' holds a ' .. got
          .. ', not a ' .. want .. '; nothing was written')
      end
    end
  end
  return nil
end

-- Whether HINCRBY can count field `field` of hash `key`: absent, or an integer (a value
-- written by something else would make HINCRBY fail halfway through a script). A
-- counter that cannot count is skipped, not overwritten: the transition still happens,
-- and the views name the field.
local function countable(key, field)
  local v = redis.call('HGET', key, field)
  return not v or (#v < 19 and string.match(v, '^%-?%d+$') ~= nil)
end

-- The stats fields a count of kind ('p' processed, 'f' failed) adds to at `now`.
local function history_field(kind, now)
  return kind .. ':' .. math.floor(now / 60000)
end

-- Per-minute history in a queue's stats hash: field '<kind>:<minute>' (kind p processed,
-- f failed; minute = ms since the epoch / 60000). The first count of a minute also
-- drops the fields older than HISTORY_MINUTES (so a hash holds at most two per minute
-- of that window, and the trim runs once a minute).
local HISTORY_MINUTES = 360
local function count_history(key, kind, n, now)
  local minute = math.floor(now / 60000)
  if redis.call('HINCRBY', key, history_field(kind, now), n) ~= n then return end
  local oldest, old = minute - HISTORY_MINUTES, {}
  for _, field in ipairs(redis.call('HKEYS', key)) do
    local m = tonumber(string.match(field, '^[pf]:(%d+)$'))
    if m and m <= oldest then old[#old + 1] = field end
  end
  if #old > 0 then redis.call('HDEL', key, unpack(old)) end
end

-- Wakes the workers waiting for this queue: a message on its shard channel (a KEYS entry
-- in the queue's slot; see clusterq.worker.wakeups). Sent when the pending list turns
-- non-empty, or a scheduled/retry task becomes the earliest due. pcall: on a server
-- without sharded pub/sub (Redis < 7), or for a user not allowed to publish, only the
-- wake-up is lost; waiting workers also look at every queue once a second.
local function wake(channel)
  redis.pcall('SPUBLISH', channel, '')
end

-- Whether member ``id`` of zset ``key`` is now its first (earliest due).
local function is_first(key, id)
  local first = redis.call('ZRANGE', key, 0, 0)
  return first[1] == id
end

-- The fair group of a task record (its meta's "g", which the encoder writes right after
-- "t"), or nil for a task in no group.
local function group_of(rec)
  local g = string.match(rec, '^{"t":"[^"\\\n]*","g":"([^"\\\n]*)"')
  if g then return g end
  local meta = string.match(rec, '^[^\n]*')
  if not string.find(meta, '"g":', 1, true) then return nil end
  local ok, m = pcall(cjson.decode, meta)
  if ok and type(m) == 'table' and type(m['g']) == 'string' then return m['g'] end
  return nil
end

-- A task's member of a queue's ``fair`` set: its group ('' for none), its enqueue time
-- (the meta's last field) and its id, so one group's tasks are a range in enqueue order.
local function fair_member(rec, id, group)
  local e = tonumber(string.match(rec, '"e":(%d+)}\n')) or 0
  return (group or '') .. '\0' .. string.format('%015d', e) .. '\0' .. id
end
