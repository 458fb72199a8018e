-- manage: an operator's action on tasks of one queue: delete, archive, run now, or
-- cancel (an active task: the worker that holds it is told at its next lease renewal).
-- Several tasks per call; each is checked here, at the moment it is acted on, so a call
-- made from a listing that is already stale changes only what still matches.
--
-- KEYS[1] tasks   KEYS[2] pending   KEYS[3] scheduled   KEYS[4] retry   KEYS[5] active
-- KEYS[6] archived   KEYS[7] completed   KEYS[8] results   KEYS[9] leases
-- KEYS[10] cancel requests   KEYS[11] wake channel   KEYS[12] fair (pending tasks of a
-- queue served by fair groups)   KEYS[13] events flag   KEYS[14] events stream (see
-- events_on: an ``archived``, ``deleted``, ``run`` or ``cancelled`` event per task acted
-- on)   KEYS[15..] unique locks
-- ARGV[1] action: delete | archive | run | cancel
-- ARGV[2] only tasks in this state ('' any state)
-- ARGV[3] only tasks of this type ('' any type)
-- ARGV[4] 1: delete active tasks too (their worker's ack is then refused: its lease is
--         gone), 0: leave active tasks alone
-- ARGV[5..], three per task: id, unique lock index into KEYS (0: none), where the caller
-- saw it in the pending list (an index from the tail, -1 the oldest; 0: not known)
--
-- A pending task is found at the index its caller gives (LINDEX: a walk from the nearer
-- end), else by a search from the tail; it is taken out of the list by a tombstone
-- (LSET), and the tombstones go in one LREM at the end: a bulk walk from the oldest end
-- costs O(batch + its offset) per call, not O(list) per task. A pending task may be in
-- ``fair`` instead (its member is made from its record).
--
-- Returns one status per task: 'ok'; 'missing' (no such task); 'state:<s>' (in another
-- state than asked, or one the action does not apply to); 'type' (another type);
-- 'active' (a worker holds it).
do local bad = wrong_type({'hash', 'list', 'zset', 'zset', 'zset', 'zset', 'zset', 'hash', 'hash', 'hash', '-', 'zset', '-', '-'}) if bad then return bad end end
local action, want_state, want_type = ARGV[1], ARGV[2], ARGV[3]
local force = ARGV[4] == '1'
local now = now_ms()
local zsets = {scheduled = KEYS[3], retry = KEYS[4], active = KEYS[5], archived = KEYS[6],
  completed = KEYS[7]}

local TOMBSTONE = '\0clusterq:taken\0'
local tombstones = 0

-- the task's state, and for a pending one its index in the list
local function state_of(id, hint, record)
  for _, name in ipairs({'active', 'scheduled', 'retry', 'archived', 'completed'}) do
    if redis.call('ZSCORE', zsets[name], id) then return name end
  end
  if record then
    local member = fair_member(record, id, group_of(record))
    if redis.call('ZSCORE', KEYS[12], member) then return 'pending', member end
  end
  if hint ~= 0 and redis.call('LINDEX', KEYS[2], hint) == id then return 'pending', hint end
  -- moved since the caller saw it: only toward the tail (workers take from there), or
  -- behind the few tasks a stopping worker hands back (RPUSH): a bounded search
  local at
  if hint ~= 0 then
    at = redis.call('LPOS', KEYS[2], id, 'RANK', -1, 'MAXLEN', 2000 - hint)
  else
    at = redis.call('LPOS', KEYS[2], id, 'RANK', -1)
  end
  -- (as an index from the tail: LSET walks from the end its index counts from)
  if at then return 'pending', at - redis.call('LLEN', KEYS[2]) end
  return nil
end

local function type_of(record)
  local nl = string.find(record, '\n', 1, true)
  local ok, meta = pcall(cjson.decode, string.sub(record, 1, (nl or 0) - 1))
  if ok and type(meta) == 'table' then return meta['t'] end
  return nil
end

local function take_out(id, state, at)
  if state == 'pending' and type(at) == 'string' then
    redis.call('ZREM', KEYS[12], at)
  elseif state == 'pending' then
    redis.call('LSET', KEYS[2], at, TOMBSTONE)
    tombstones = tombstones + 1
  else
    redis.call('ZREM', zsets[state], id)
  end
end

local applies = {
  delete = {pending = true, scheduled = true, retry = true, archived = true, completed = true,
    none = true},
  archive = {pending = true, scheduled = true, retry = true, none = true},
  run = {scheduled = true, retry = true, archived = true, none = true},
  cancel = {active = true},
}
if not applies[action] then
  return redis.error_reply('ERR manage: unknown action ' .. action .. '; nothing was written')
end

local out, woken = {}, false
local ev = events_on(KEYS[13], KEYS[14])
local done_events = {delete = 'deleted', archive = 'archived', run = 'run', cancel = 'cancelled'}
local after = {delete = '', archive = 'archived', run = 'pending', cancel = 'active'}
for i = 5, #ARGV, 3 do
  local id, lock, hint = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local record = redis.call('HGET', KEYS[1], id)
  local state, at = state_of(id, hint, record)
  local status = 'ok'
  if not record and not state then
    status = 'missing'
  elseif not state then
    state = 'none'  -- a record in no state (written by something else)
  end
  if status ~= 'ok' then
    -- nothing to do
  elseif want_state ~= '' and state ~= want_state then
    status = 'state:' .. state
  elseif want_type ~= '' and (not record or type_of(record) ~= want_type) then
    status = 'type'
  elseif state == 'active' and not (action == 'delete' and force) and action ~= 'cancel' then
    status = 'active'
  elseif not applies[action][state] and not (state == 'active' and force) then
    status = 'state:' .. state
  elseif action == 'cancel' then
    redis.call('HSET', KEYS[10], id, now)
  else
    if state ~= 'none' then take_out(id, state, at) end
    if action == 'delete' then
      redis.call('HDEL', KEYS[1], id)
      redis.call('HDEL', KEYS[8], id)
      redis.call('HDEL', KEYS[9], id)
      redis.call('HDEL', KEYS[10], id)
      if lock > 0 and redis.call('GET', KEYS[lock]) == id then redis.call('DEL', KEYS[lock]) end
    elseif action == 'archive' then
      redis.call('ZADD', KEYS[6], now, id)
    else
      redis.call('LPUSH', KEYS[2], id)
      woken = true
    end
  end
  if ev and status == 'ok' then
    emit(ev, done_events[action], id, record or nil, after[action], '')
  end
  out[#out + 1] = status
end
-- the tombstones are the tasks taken out nearest the tail (a bulk walk's): from there
if tombstones > 0 then redis.call('LREM', KEYS[2], -tombstones, TOMBSTONE) end
if woken then wake(KEYS[11]) end
write_events(ev)
return out
