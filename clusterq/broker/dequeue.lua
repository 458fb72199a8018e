-- dequeue: pending -> active, with a lease and a fencing token. Forwards due scheduled
-- and retry tasks to pending first, so busy workers need no separate forwarder. Takes
-- no more than the queue's limits allow (KEYS[9], see clusterq.limits): its concurrency
-- cap (tasks active at once), its rate (a token bucket kept as one number, GCRA), and a
-- hold a handler asked for (RateLimited with scope "queue"). When the queue declares
-- rates per task type (the flag field ``types``), each popped task's type must have a
-- token too (GCRA, fields ti:/tb:/tt:<type>); a task whose type has none does not
-- start: it goes to ``scheduled`` at a time reserved for it (the type's next token
-- time, or its reservation horizon th:<type> if later; the horizon then moves one
-- interval on), record unchanged, and competes for a token again when it is due. The
-- queue's own tokens are taken only by the tasks that start (and orphans).
--
-- Fair groups: while ``fair`` (KEYS[10], where enqueue.lua puts a grouped task) or
-- ``turns`` (KEYS[11]) exist, or once a popped task has a group (meta "g": forwarded
-- from ``scheduled``/``retry``, handed back), the queue is served fairly. Each call moves
-- up to STAGE ids from ``pending`` into ``fair`` (ungrouped ones in group ''), then the
-- groups whose turn has come (``turns`` score <= the turn clock) start one task each (an
-- even share of what the call may take, where no group or type has limits), in turn
-- order, round after round: a group that started one goes to the back (the clock moves
-- on 1/1024 ms per task), a group held back by its own limits (``gi``/``gb`` rate, ``gc``
-- cap, a hold) gets its turn at the time it may go again (a cap: CAP_RECHECK ms on), so
-- a big or limited group never holds up the others. Per-group state is in ``groups``
-- (KEYS[12]): ``r:<g>`` GCRA tat, ``h:<g>`` hold, ``a:<g>`` the ids it started (those
-- still in ``active`` count against its cap, so nothing needs giving back); a group with
-- no task left leaves ``turns`` once none of its state is in force.
--
-- Caps per task type (flag ``tcaps``, ``tc:<type>`` in limits) serve the queue by its
-- groups too, its ungrouped tasks in one group per type (``{<type>``: no group name has
-- a brace), so a type at its cap holds up only its own tasks (and, in a tenant's group,
-- that group's). The ids of a type's tasks started are ``ta:<type>`` in limits (those
-- still in ``active`` count against the cap): a group whose first task's type is at its
-- cap gets its turn CAP_RECHECK ms on.
--
-- KEYS[1] pending   KEYS[2] active   KEYS[3] scheduled   KEYS[4] retry
-- KEYS[5] tasks   KEYS[6] leases   KEYS[7] paused   KEYS[8] wake channel   KEYS[9] limits
-- KEYS[10] fair   KEYS[11] turns   KEYS[12] groups   KEYS[13] events flag
-- KEYS[14] events stream (a ``started`` event per task taken; see events_on)
-- ARGV[1] how many tasks at most   ARGV[2] lease ms   ARGV[3] fencing token
-- ARGV[4] how many due tasks to forward at most
--
-- Returns {status, next_due, orphans, id1, record1, id2, record2, ...}. status: 1 taken
-- (or nothing to take), 0 the queue is paused; tasks wait but a limit lets none start
-- now: 2 the rate (next_due: ms from now until the next one may, so that a worker whose
-- clock differs still waits as long), 3 the concurrency cap (wait for a task to end),
-- 4 a hold (next_due: ms until its end), 5 every group with tasks is held back by its
-- own limits (next_due: ms until the first may go). With status 1, next_due (ms) is that of
-- the earliest scheduled/retry task when no task was taken (now when tasks of other
-- types still wait after a call that put back as many as it may read), else -1. orphans: ids
-- popped without a record (dropped, and counted).
do local bad = wrong_type({'list', 'zset', 'zset', 'zset', 'hash', 'hash', '-', '-', 'hash', 'zset', 'zset', 'hash', '-', '-'}) if bad then return bad end end
local now = now_ms()
if redis.call('EXISTS', KEYS[7]) == 1 then return {0, -1, 0} end

local forwarded = 0
for _, key in ipairs({KEYS[3], KEYS[4]}) do
  local due = redis.call('ZRANGEBYSCORE', key, '-inf', now, 'LIMIT', 0, ARGV[4])
  if #due > 0 then
    redis.call('ZREM', key, unpack(due))
    redis.call('LPUSH', KEYS[1], unpack(due))
    forwarded = forwarded + #due
  end
end

-- The limits: how many may start now (want), or why none may and until when.
local want = tonumber(ARGV[1])
local lim = redis.call('HMGET', KEYS[9], 'interval', 'burst', 'concurrency', 'tat', 'hold', 'types',
  'gi', 'gb', 'gc', 'tcaps')
local tcaps = lim[10] == '1'  -- caps per task type: served by groups (one per type)
local fair = tcaps or redis.call('EXISTS', KEYS[10], KEYS[11]) > 0
local interval, tat = tonumber(lim[1]), nil
if lim[1] or lim[3] or lim[5] then
  local status, until_ms = nil, -1
  local hold = tonumber(lim[5])
  if hold and hold > now then status, until_ms = 4, hold end
  local cap = tonumber(lim[3])
  if not status and cap then
    local free = cap - redis.call('ZCARD', KEYS[2])
    if free <= 0 then status = 3 else want = math.min(want, free) end
  end
  if not status and interval then
    local burst = tonumber(lim[2]) or 1
    tat = math.max(tonumber(lim[4]) or 0, now)
    local tokens = math.floor((now - tat) / interval + burst + 1e-9)
    if tokens <= 0 then
      status, until_ms = 2, math.ceil(tat - (burst - 1) * interval)
    else
      want = math.min(want, tokens)
    end
  end
  if status and (fair or redis.call('LLEN', KEYS[1]) > 0) then
    return {status, until_ms >= 0 and math.max(1, until_ms - now) or -1, 0}
  end
  if status then want = 0 end
end

-- Per-type rates (only when declared): whether a task of record ``rec`` may start now;
-- if not, it is put back in ``scheduled`` at a reserved time.
local typed, types, deferred = lim[6] == '1', {}, 0
local function task_type(rec)
  -- The meta JSON comes first and the encoder writes "t" as its first key: a type with
  -- no quote, backslash or newline is the text between the quotes. Otherwise decode.
  local t = string.match(rec, '^{"t":"([^"\\\n]*)"')
  if t then return t end
  local ok, meta = pcall(cjson.decode, string.match(rec, '^[^\n]*'))
  if ok and type(meta) == 'table' and type(meta['t']) == 'string' then return meta['t'] end
  return nil
end
local function admit(id, rec)
  local name = task_type(rec)
  if not name then return true end
  local st = types[name]
  if st == nil then
    local f = redis.call('HMGET', KEYS[9], 'ti:' .. name, 'tb:' .. name, 'tt:' .. name, 'th:' .. name)
    st = false
    if tonumber(f[1]) then
      st = {i = tonumber(f[1]), b = tonumber(f[2]) or 1, t = tonumber(f[3]) or 0,
            h = tonumber(f[4]) or 0, name = name}
    end
    types[name] = st
  end
  if not st then return true end
  local t = math.max(st.t, now)
  if (now - t) / st.i + st.b + 1e-9 >= 1 then
    st.t, st.dirty = t + st.i, true
    return true
  end
  local at = math.max(st.h, t - (st.b - 1) * st.i)
  st.h, st.dirty = at + st.i, true
  redis.call('ZADD', KEYS[3], math.ceil(at), id)
  deferred = deferred + 1
  return false
end

local out = {1, -1, 0}
local taken, read = 0, 0  -- taken: started or orphans (they use the queue's tokens)
local expiry = now + tonumber(ARGV[2])
local zargs, hargs = {}, {}
local started = {}  -- ids started by this call (in ``active`` once it ends)
local function start(id, rec)
  started[id] = true
  zargs[#zargs + 1] = expiry
  zargs[#zargs + 1] = id
  hargs[#hargs + 1] = id
  hargs[#hargs + 1] = ARGV[3]
  out[#out + 1] = id
  out[#out + 1] = rec
  taken = taken + 1
end

-- A popped id with its record (false: none): started, unless its type has no token
-- (then put back in ``scheduled``, see admit) or it has no record (an orphan: dropped,
-- counted; it takes the queue's token). Whether it started.
local function take(id, rec)
  if not rec then
    out[3] = out[3] + 1
    taken = taken + 1
    return false
  end
  if typed and not admit(id, rec) then return false end
  start(id, rec)
  return true
end

-- Fair groups: move popped ids (with their records) into ``fair``.
local STAGE, CAP_RECHECK = 1000, 100
local function stage(ids, records)
  local members, seen = {}, {}
  for i, id in ipairs(ids) do
    local rec = records[i]
    if rec then
      local g = group_of(rec)
      if not g then  -- with type caps, one group per type ('{' is in no group's name)
        g = tcaps and ('{' .. (task_type(rec) or '')) or ''
      end
      members[#members + 1] = 0
      members[#members + 1] = fair_member(rec, id, g)
      seen[g] = true
    else
      out[3] = out[3] + 1  -- an orphan: dropped (it takes no token: nothing starts)
    end
  end
  if #members > 0 then redis.call('ZADD', KEYS[10], unpack(members)) end
  local turns = {}
  for g, _ in pairs(seen) do
    turns[#turns + 1] = now
    turns[#turns + 1] = g
  end
  if #turns > 0 then redis.call('ZADD', KEYS[11], 'NX', unpack(turns)) end
end

while not fair and want - taken > 0 do
  local ask = want - taken
  local ids = redis.call('RPOP', KEYS[1], ask)
  if not ids then break end
  read = read + #ids
  local records = redis.call('HMGET', KEYS[5], unpack(ids))
  for i = 1, #ids do
    if records[i] and group_of(records[i]) then fair = true break end
  end
  if fair then  -- the first grouped task: this queue is served fairly from now on
    stage(ids, records)
    break
  end
  for i, id in ipairs(ids) do take(id, records[i]) end
  -- Without type rates one pop takes all it may; with them, pop again for the tasks put
  -- back (tasks of other types may wait behind them), reading a bounded number per call.
  if not typed or #ids < ask or read >= 500 then break end
end
local fair_wait = nil  -- ms until a group may start a task, when none could now
if fair then
  local ids = redis.call('RPOP', KEYS[1], STAGE)
  if ids then stage(ids, redis.call('HMGET', KEYS[5], unpack(ids))) end
  local gi, gb, gc = tonumber(lim[7]), tonumber(lim[8]) or 1, tonumber(lim[9])
  local clk = math.max(now, tonumber(redis.call('HGET', KEYS[12], 'clk')) or 0)
  local state = {}
  local function state_of(g)
    local st = state[g]
    if st then return st end
    local f = redis.call('HMGET', KEYS[12], 'r:' .. g, 'h:' .. g, 'a:' .. g)
    st = {r = tonumber(f[1]), h = tonumber(f[2]), a = {}}
    for id in string.gmatch(f[3] or '', '[^ ]+') do st.a[#st.a + 1] = id end
    state[g] = st
    return st
  end
  -- The ids group ``st`` runs now (in ``active``, or started by this call): its list
  -- pruned to those.
  local function running(st)
    local live, seen = {}, {}
    for _, id in ipairs(st.a) do
      if not seen[id] and (started[id] or redis.call('ZSCORE', KEYS[2], id)) then
        live[#live + 1] = id
      end
      seen[id] = true
    end
    if #live < #st.a then st.a, st.dirty = live, true end
    return #live
  end
  -- nil when group ``st`` may start a task now, else the time (ms) it may next (the
  -- latest of what holds it back: a hold, its rate, its cap).
  local function blocked(st)
    local until_ms = nil
    if st.h and st.h > now then until_ms = st.h end
    if gi then
      local t = math.max(st.r or 0, now)
      if (now - t) / gi + gb + 1e-9 < 1 then
        until_ms = math.max(until_ms or 0, math.ceil(t - (gb - 1) * gi))
      end
    end
    if not until_ms and gc and #st.a >= gc and running(st) >= gc then
      until_ms = now + CAP_RECHECK
    end
    return until_ms
  end
  -- A task type's cap and the ids of its tasks started (fields of the limits hash), or
  -- false for a type without a cap.
  local tstate = {}
  local function type_state(name)
    if not name then return false end
    local ts = tstate[name]
    if ts ~= nil then return ts end
    local f = redis.call('HMGET', KEYS[9], 'tc:' .. name, 'ta:' .. name)
    ts = false
    if tonumber(f[1]) then
      ts = {cap = tonumber(f[1]), a = {}, name = name}
      for id in string.gmatch(f[2] or '', '[^ ]+') do ts.a[#ts.a + 1] = id end
    end
    tstate[name] = ts
    return ts
  end
  local function took(st, id)
    if gi then st.r = math.max(st.r or 0, now) + gi end
    if gc then st.a[#st.a + 1] = id end
    if gi or gc then st.dirty = true end
  end
  -- A group with no task waiting: out of ``turns``, unless its state is still in force
  -- (then it comes back when that ends, to be looked at again).
  local function retire(g)
    local st = state_of(g)
    local keep = 0
    st.dirty = st.h or st.r or #st.a > 0
    if st.h and st.h > now then keep = st.h else st.h = nil end
    if st.r and st.r > now then keep = math.max(keep, st.r) else st.r = nil end
    if #st.a > 0 and running(st) > 0 then keep = math.max(keep, now + CAP_RECHECK) end
    if keep > 0 then
      redis.call('ZADD', KEYS[11], keep, g)
    else
      redis.call('ZREM', KEYS[11], g)
    end
  end
  -- Tasks in ``fair`` but no group in ``turns`` (the key deleted by hand): their groups
  -- go back in (100 per call), so no task is stranded.
  if redis.call('ZCARD', KEYS[11]) == 0 then
    local from = '-'
    for _ = 1, 100 do
      local first = redis.call('ZRANGEBYLEX', KEYS[10], from, '+', 'LIMIT', 0, 1)
      if #first == 0 then break end
      local g = string.match(first[1], '^([^%z]*)%z')
      redis.call('ZADD', KEYS[11], 'NX', now, g)
      from = '(' .. g .. '\1'
    end
  end
  -- The groups that started a task, and the turn clock at their last: they go to the
  -- back of the line in that order when the call ends (within the call, each round
  -- visits the groups in the same order).
  local served = {}
  local passes = 0
  while want - taken > 0 and read < 500 and passes < 64 do
    passes = passes + 1
    local turn = redis.call('ZRANGEBYSCORE', KEYS[11], '-inf', clk, 'LIMIT', 0, 64)
    if #turn == 0 then break end
    local moved = 0
    -- Without limits per group or per type, a group whose turn it is starts its share
    -- of what this round may take (one round: every group one share), in one go.
    local share = 1
    if not (gi or gc or tcaps) then
      share = math.min(math.ceil((want - taken) / #turn), 500 - read)
    end
    for _, g in ipairs(turn) do
      if want - taken <= 0 or read >= 500 then break end
      local head = redis.call('ZRANGEBYLEX', KEYS[10], '[' .. g .. '\0', '(' .. g .. '\1', 'LIMIT',
        0, math.min(share, want - taken, 500 - read))
      if #head == 0 then
        retire(g)
        served[g] = nil
      else
        local st = state_of(g)
        local wait = blocked(st)
        local ids, recs, ts = {}, {}, nil
        if not wait then
          for i, member in ipairs(head) do ids[i] = string.match(member, '^[^%z]*%z%d+%z(.*)$') end
          recs = redis.call('HMGET', KEYS[5], unpack(ids))
          ts = recs[1] and tcaps and type_state(task_type(recs[1]))  -- (tcaps: one at a time)
          if ts and #ts.a >= ts.cap and running(ts) >= ts.cap then wait = now + CAP_RECHECK end
        end
        if wait then
          redis.call('ZADD', KEYS[11], wait, g)
          served[g] = nil
        else
          redis.call('ZREM', KEYS[10], unpack(head))
          read = read + #head
          for i, id in ipairs(ids) do
            if take(id, recs[i]) then
              took(st, id)
              if ts then
                ts.a[#ts.a + 1] = id
                ts.dirty = true
              end
            end
          end
          clk = clk + #head / 1024
          served[g] = clk  -- its next turn: behind every group served before it
          moved = moved + 1
        end
      end
    end
    if moved == 0 then break end  -- a round that started nothing: the rest must wait
  end
  local back = {}
  for g, at in pairs(served) do
    back[#back + 1] = at
    back[#back + 1] = g
  end
  if #back > 0 then redis.call('ZADD', KEYS[11], unpack(back)) end
  local fields, gone = {'clk', string.format('%.4f', clk)}, {}
  for g, st in pairs(state) do
    if st.dirty then
      for _, f in ipairs({{'r:', st.r and string.format('%.3f', st.r)}, {'h:', st.h},
          {'a:', #st.a > 0 and table.concat(st.a, ' ') or nil}}) do
        if f[2] then
          fields[#fields + 1] = f[1] .. g
          fields[#fields + 1] = f[2]
        else
          gone[#gone + 1] = f[1] .. g
        end
      end
    end
  end
  redis.call('HSET', KEYS[12], unpack(fields))
  for name, ts in pairs(tstate) do
    if ts and ts.dirty and #ts.a > 0 then
      redis.call('HSET', KEYS[9], 'ta:' .. name, table.concat(ts.a, ' '))
    elseif ts and ts.dirty then
      redis.call('HDEL', KEYS[9], 'ta:' .. name)
    end
  end
  if #gone > 0 then redis.call('HDEL', KEYS[12], unpack(gone)) end
  if redis.call('EXISTS', KEYS[10], KEYS[11]) == 0 then redis.call('DEL', KEYS[12]) end
  if #out == 3 and redis.call('EXISTS', KEYS[10]) == 1 then
    -- Tasks wait, none could start: until the first group's turn comes.
    local first = redis.call('ZRANGE', KEYS[11], 0, 0, 'WITHSCORES')
    if #first > 0 and tonumber(first[2]) > now then
      fair_wait = math.max(1, math.ceil(tonumber(first[2]) - now))
    end
  end
end

if #zargs > 0 then
  redis.call('ZADD', KEYS[2], unpack(zargs))
  redis.call('HSET', KEYS[6], unpack(hargs))
  local ev = events_on(KEYS[13], KEYS[14], ARGV[3])
  if ev then
    for i = 4, #out, 2 do emit(ev, 'started', out[i], out[i + 1], 'active') end
    write_events(ev)
  end
end
if tat and taken > 0 then  -- the queue's tokens these tasks took
  redis.call('HSET', KEYS[9], 'tat', string.format('%.3f', tat + taken * interval))
end
if typed then  -- the types' state: tokens taken, horizons moved
  local state = {}
  for _, st in pairs(types) do
    if st and st.dirty then
      state[#state + 1] = 'tt:' .. st.name
      state[#state + 1] = string.format('%.3f', st.t)
      state[#state + 1] = 'th:' .. st.name
      state[#state + 1] = string.format('%.3f', st.h)
    end
  end
  if #state > 0 then redis.call('HSET', KEYS[9], unpack(state)) end
end

-- Forwarded more than this call takes: wake the other waiting workers for the rest.
if forwarded > 0 and redis.call('LLEN', KEYS[1]) > 0 then wake(KEYS[8]) end

if #out == 3 then
  local next_due = -1
  if deferred > 0 and redis.call('LLEN', KEYS[1]) > 0 then next_due = now end
  for _, key in ipairs({KEYS[3], KEYS[4]}) do
    local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    if #first > 0 then
      local score = tonumber(first[2])
      if next_due < 0 or score < next_due then next_due = score end
    end
  end
  out[2] = next_due
end
if fair_wait then return {5, fair_wait, out[3]} end
return out
