-- Lifecycle events (see clusterq.taskevents), shared by every script that changes a
-- task's state (after _prelude.lua where it has one; push.lua has only this). While a
-- queue's events flag (its ``evcfg``, a string holding the stream's cap) is set, such a
-- script collects one event per task (emit) and appends them to the queue's ``events``
-- stream at its end (write_events), in the same call as the transition. The flag is read
-- once per call (one GET: the whole cost while events are off). A flag that is not a
-- small positive integer, or a stream key that holds another type, means no events: the
-- transition is never refused for them.

-- {stream key, cap, worker, events collected}, or nil while events are off.
local function events_on(flag, stream, token)
  local v = redis.pcall('GET', flag)
  if type(v) ~= 'string' or #v > 9 or not string.match(v, '^[1-9]%d*$') then return nil end
  local got = redis.call('TYPE', stream)['ok']
  if got ~= 'none' and got ~= 'stream' then return nil end
  -- a fencing token is '<worker id>:<run>:<n>' (clusterq.worker): the worker's id
  local worker = ''
  if token then worker = string.match(token, '^(.*):[^:]*:[^:]*$') or token end
  return {stream, tonumber(v), worker, {}}
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
-- the only field that may hold JSON objects with numbers ("pr", a workflow step's parent
-- results); a "r" inside a JSON string has a backslash before it, not a comma. Plain
-- finds: this runs once per event.
local function retries_of(rec)
  if not rec then return 0 end
  local s = string.find(rec, ',"r":', 1, true)
  if not s then return 0 end
  local nl = string.find(rec, '\n', 1, true)
  if nl and nl < s then return 0 end
  local pr = string.find(rec, ',"pr":', 1, true)
  if pr and pr < s then return 0 end
  return tonumber(string.match(rec, '^(%d+)[,}]', s + 5)) or 0
end

-- Collect one event (``ev`` from events_on; nil: events off) about task ``id`` of record
-- ``rec``: its name, the state the task is in after it, an error text ('' or nil: none)
-- and, for a ``progress`` event, the fraction.
local function emit(ev, event, id, rec, state, err, retries, fraction)
  if not ev then return end
  local e = {event, id, type_of_record(rec), retries or retries_of(rec), state}
  if fraction then
    e[6], e[7] = err or '', fraction
  elseif err and err ~= '' then
    e[6] = err
  end
  local all = ev[4]
  all[#all + 1] = e
end

-- The events counted through an entry of an XRANGE reply (its field ``n``), or nil.
local function events_through(reply)
  local entry = type(reply) == 'table' and reply[1]
  if type(entry) ~= 'table' or type(entry[2]) ~= 'table' then return nil end
  local fields = entry[2]
  for i = 1, #fields - 1, 2 do
    if fields[i] == 'n' then return tonumber(fields[i + 1]) end
  end
  return nil
end

-- Append the events collected by emit: one stream entry per call (up to 64 events an
-- entry): fields ``worker``, ``n`` (the events written to the stream so far, this
-- entry's included) and ``events``, a JSON array of [event, id, type, retries, state,
-- error, fraction] arrays (the last two only when set). One XADD per call costs a
-- fraction of one per event. The cap counts events: while the stream holds more than
-- the cap (the last entry's ``n`` less the first's), the XADD trims it (MAXLEN ~) to its
-- entries in proportion; a stream whose first or last entry has no ``n`` (written before)
-- is trimmed to cap entries. pcall: this comes after the transition's writes, where
-- nothing may fail (e.g. a foreign stream whose last id is the largest possible); such
-- events are lost, the transition stays.
local function write_events(ev)
  if not ev or #ev[4] == 0 then return end
  local stream, cap, all = ev[1], ev[2], ev[4]
  local count = events_through(redis.pcall('XREVRANGE', stream, '+', '-', 'COUNT', 1))
  for first = 1, #all, 64 do
    local chunk = all
    if #all > 64 then chunk = {unpack(all, first, math.min(#all, first + 63))} end
    local entries = redis.call('XLEN', stream) + 1
    local since = events_through(redis.pcall('XRANGE', stream, '-', '+', 'COUNT', 1))
    local n = (count or 0) + #chunk
    local keep = nil
    if not count or not since or since > n then  -- no counts to go by: entries
      if entries > cap then keep = cap end
    elseif n - since > cap then
      keep = math.max(1, math.floor(entries * cap / (n - since)))
    end
    if keep then
      redis.pcall('XADD', stream, 'MAXLEN', '~', keep, '*', 'worker', ev[3], 'n', n,
        'events', cjson.encode(chunk))
    else
      redis.pcall('XADD', stream, '*', 'worker', ev[3], 'n', n, 'events', cjson.encode(chunk))
    end
    count = n
  end
  ev[4] = {}
end
