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

-- Lifecycle events (see clusterq.taskevents). While a queue's events flag (KEYS: its
-- ``evcfg``, a string holding the stream's cap) is set, each script that changes a
-- task's state appends one entry per task to the queue's ``events`` stream, in the same
-- call as the transition. The flag is read once per call (one GET: the whole cost while
-- events are off). A flag that is not a small positive integer, or a stream key that
-- holds another type, means no events: the transition is never refused for them.
-- Returns {stream key, cap, worker} or nil.
local function events_on(flag, stream, token)
  local v = redis.pcall('GET', flag)
  if type(v) ~= 'string' or #v > 9 or not string.match(v, '^[1-9]%d*$') then return nil end
  local cap = tonumber(v)
  local got = redis.call('TYPE', stream)['ok']
  if got ~= 'none' and got ~= 'stream' then return nil end
  -- a fencing token is '<worker id>:<run>:<n>' (clusterq.worker): the worker's id
  local worker = ''
  if token then worker = string.match(token, '^(.*):[^:]*:[^:]*$') or token end
  return {stream, cap, worker}
end

-- The task type of a record (its meta's "t", written first), '' when not found.
local function type_of_record(rec)
  if not rec then return '' end
  local t = string.match(rec, '^{"t":"([^"\\\n]*)"')
  if t then return t end
  local ok, meta = pcall(cjson.decode, string.match(rec, '^[^\n]*'))
  if ok and type(meta) == 'table' and type(meta['t']) == 'string' then return meta['t'] end
  return ''
end

-- Retries so far of a record or a meta (its meta's "r"; absent: 0). "r" comes before
-- the only field that may hold JSON objects ("pr", a workflow step's parent results).
local function retries_of(rec)
  if not rec then return 0 end
  local meta = string.match(rec, '^[^\n]*')
  local s, _, r = string.find(meta, '[{,]"r":(%d+)[,}]')
  if not s then return 0 end
  local pr = string.find(meta, ',"pr":', 1, true)
  if pr and pr < s then return 0 end
  return tonumber(r) or 0
end

-- Append one event (``ev`` from events_on) about task ``id`` of record ``rec``: its
-- name, the state the task is in after it, and an error text ('' none). pcall: it comes
-- after the transition's writes, where nothing may fail (e.g. a foreign stream whose
-- last id is the largest possible); such an event is lost, the transition stays.
local function emit(ev, event, id, rec, state, err, retries)
  local t, r = type_of_record(rec), retries or retries_of(rec)
  if err and err ~= '' then
    redis.pcall('XADD', ev[1], 'MAXLEN', '~', ev[2], '*', 'event', event, 'id', id, 'type', t,
      'retries', r, 'worker', ev[3], 'state', state, 'error', err)
  else
    redis.pcall('XADD', ev[1], 'MAXLEN', '~', ev[2], '*', 'event', event, 'id', id, 'type', t,
      'retries', r, 'worker', ev[3], 'state', state)
  end
end
