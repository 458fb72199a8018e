-- workflow: the state of one workflow (chain / group / chord), all in one hash in the
-- workflow's own slot (hash tag {wf:<id>}). Steps are enqueued by the caller after a
-- step is claimed here (status q), and marked enqueued (e) after; a claim left at q by
-- a caller that died is returned again by the next call that touches its parent, so
-- the caller enqueues it again under the same task id (answered "already enqueued").
--
-- KEYS[1] the state (hash)   KEYS[2] the staging hash of a large workflow being written
--
-- Fields: status (running|succeeded|failed), left (steps not yet finished), exits (JSON
-- list of the steps whose results are the workflow's), keep (ms the state is kept once
-- the workflow ended), and per step <id>:
--   st:<id> w waiting | q claimed | e enqueued | d done | f failed
--   (a step still waiting when the workflow failed is shown as skipped; nothing runs it)
--   n:<id> deps not yet done     dep:<id> JSON list of deps     out:<id> JSON list of dependents
--   spec:<id> JSON spec          res:<id> JSON result           err:<id> error text
--   onerr:<id> the step to run if this one fails (a chord's on_error)
--
-- create   ARGV 'create', field, value, ...    -> ready steps (the entries, written claimed;
--          when it exists already, a retried start, those still claimed)
-- stage    ARGV 'stage', field, value, ...     a part of a large workflow, written to the
--          staging hash (expires after 10 minutes unless committed)        -> 1
-- commit   ARGV 'commit'                       the staging hash becomes the state (at
--          once, so nothing half-written is ever seen) -> the entries' ids (JSON text),
--          all to enqueue; when it exists already, the ready steps, as create
-- done     ARGV 'done', step, result JSON, max parent bytes   -> ready steps
-- fail     ARGV 'fail', step, error           -> ready steps (an on_error step)
-- enqueued ARGV 'enqueued', step, ...         -> 1
-- done / fail / enqueued on a workflow that no longer exists (expired) answer 0.
-- Ready steps come back as {id, spec JSON, parent results JSON, ...}.
do local bad = wrong_type({'hash', 'hash'}) if bad then return bad end end
local key = KEYS[1]
local op = ARGV[1]
local STAGING_MS = 600000

local function get(field) return redis.call('HGET', key, field) end

-- HSET of ARGV[first..] in parts (unpack() has a limit on how many values it takes)
local function hset_args(target, first)
  local part = {}
  for i = first, #ARGV do
    part[#part + 1] = ARGV[i]
    if #part == 1000 then
      redis.call('HSET', target, unpack(part))
      part = {}
    end
  end
  if #part > 0 then redis.call('HSET', target, unpack(part)) end
end

local function ended(status)
  redis.call('HSET', key, 'status', status)
  local keep = tonumber(get('keep'))
  if keep and keep > 0 then redis.call('PEXPIRE', key, keep) end
end

local function finish_one()
  local left = redis.call('HINCRBY', key, 'left', -1)
  if left <= 0 and get('status') == 'running' then ended('succeeded') end
end

-- the results `id` waited for, as a JSON list; nil if they are more than `most` bytes
local function parents(id, most)
  local out, size = {}, 2
  for _, dep in ipairs(cjson.decode(get('dep:' .. id) or '[]')) do
    local res = get('res:' .. dep) or 'null'
    size = size + #res + 1
    if most and size > most then return nil, size end
    out[#out + 1] = res
  end
  return '[' .. table.concat(out, ',') .. ']', size
end

local function errors_of(id)
  local out = {}
  for _, dep in ipairs(cjson.decode(get('dep:' .. id) or '[]')) do
    local e = get('err:' .. dep)
    out[#out + 1] = e and cjson.encode(e) or 'null'
  end
  return '[' .. table.concat(out, ',') .. ']'
end

local function ready_entry(out, id, parent_json)
  out[#out + 1] = id
  out[#out + 1] = get('spec:' .. id)
  out[#out + 1] = parent_json
end

-- step `id` failed for good: the workflow fails; its error handler (a chord's on_error)
-- is claimed and returned
local function fail_step(id, error, out)
  redis.call('HSET', key, 'st:' .. id, 'f', 'err:' .. id, error)
  if get('status') == 'running' then ended('failed') end
  local handler = get('onerr:' .. id)
  if handler and get('st:' .. handler) == 'w' then
    redis.call('HSET', key, 'st:' .. handler, 'q')
  end
  if handler and get('st:' .. handler) == 'q' then ready_entry(out, handler, errors_of(handler)) end
end

-- claim the waiting dependents of `id` whose deps are all done; return claimed ones
-- left at q too (a caller that died before enqueueing them)
local function release(id, out, most)
  for _, nxt in ipairs(cjson.decode(get('out:' .. id) or '[]')) do
    local st = get('st:' .. nxt)
    if st == 'w' and tonumber(get('n:' .. nxt)) <= 0 then
      redis.call('HSET', key, 'st:' .. nxt, 'q')
      st = 'q'
    end
    if st == 'q' then
      local results, size = parents(nxt, most)
      if results then
        ready_entry(out, nxt, results)
      else
        fail_step(nxt, 'the results it waits for are more than ' .. most .. ' bytes ('
          .. size .. ' bytes and counting)', out)
        return
      end
    end
  end
end

-- the entries still claimed (a new workflow's are written claimed; a retried start
-- gets those not yet marked enqueued)
local function entries()
  local out = {}
  for _, id in ipairs(cjson.decode(get('entries') or '[]')) do
    if get('st:' .. id) == 'q' then ready_entry(out, id, '[]') end
  end
  return out
end

if op == 'create' then
  if redis.call('EXISTS', key) == 0 then hset_args(key, 2) end
  return entries()
elseif op == 'stage' then
  hset_args(KEYS[2], 2)
  redis.call('PEXPIRE', KEYS[2], STAGING_MS)
  return 1
elseif op == 'commit' then
  if redis.call('EXISTS', key) == 1 then
    redis.call('DEL', KEYS[2])
    return entries()
  end
  if redis.call('EXISTS', KEYS[2]) == 0 then
    return redis.error_reply('ERR workflow: its staged state expired before it was complete')
  end
  redis.call('RENAME', KEYS[2], key)
  redis.call('PERSIST', key)
  -- the caller has the entries' specs: their ids say that all of them are to enqueue
  return get('entries')
end

if redis.call('EXISTS', key) == 0 then return 0 end

if op == 'done' then
  local id = ARGV[2]
  local st = get('st:' .. id)
  if not st then return redis.error_reply('ERR workflow: no step ' .. id) end
  local out = {}
  if st ~= 'd' and st ~= 'f' then
    local dependents = cjson.decode(get('out:' .. id) or '[]')
    local counters = {'left'}
    for _, nxt in ipairs(dependents) do counters[#counters + 1] = 'n:' .. nxt end
    for _, field in ipairs(counters) do
      if not countable(key, field) then
        return redis.error_reply('ERR workflow: field ' .. field .. ' of ' .. key
          .. ' is not an integer; nothing was written')
      end
    end
    redis.call('HSET', key, 'st:' .. id, 'd', 'res:' .. id, ARGV[3])
    for _, nxt in ipairs(dependents) do
      redis.call('HINCRBY', key, 'n:' .. nxt, -1)
    end
    finish_one()
  end
  if get('status') == 'failed' then return out end
  release(id, out, tonumber(ARGV[4]))
  return out
elseif op == 'fail' then
  local id = ARGV[2]
  local st = get('st:' .. id)
  if not st then return redis.error_reply('ERR workflow: no step ' .. id) end
  local out = {}
  if st == 'd' then
    -- its result was recorded, but the steps it released were never enqueued (their
    -- enqueue kept failing until its task was archived): they fail, and the workflow
    for _, nxt in ipairs(cjson.decode(get('out:' .. id) or '[]')) do
      if get('st:' .. nxt) == 'q' then
        fail_step(nxt, 'never enqueued: ' .. ARGV[3], out)
      end
    end
    return out
  end
  if st == 'f' then
    local handler = get('onerr:' .. id)
    if handler and get('st:' .. handler) == 'q' then ready_entry(out, handler, errors_of(handler)) end
    return out
  end
  fail_step(id, ARGV[3], out)
  return out
elseif op == 'enqueued' then
  for i = 2, #ARGV do
    if get('st:' .. ARGV[i]) == 'q' then redis.call('HSET', key, 'st:' .. ARGV[i], 'e') end
  end
  return 1
end
return redis.error_reply('ERR workflow: unknown op ' .. tostring(op))
