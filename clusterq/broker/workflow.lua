-- workflow: the state of one workflow (chain / group / chord), all in one hash in the
-- workflow's own slot (hash tag {wf:<id>}). Steps are enqueued by the caller after a
-- step is claimed here (status q), and marked enqueued (e) after; a claim left at q by
-- a caller that died is returned again by the next call that touches its parent, so
-- the caller enqueues it again under the same task id (answered "already enqueued").
--
-- Fields: status (running|succeeded|failed), left (steps not yet finished), exits (JSON
-- list of the steps whose results are the workflow's), and per step <id>:
--   st:<id> w waiting | q claimed | e enqueued | d done | f failed | s skipped
--   n:<id> deps not yet done     dep:<id> JSON list of deps     out:<id> JSON list of dependents
--   spec:<id> JSON spec          res:<id> JSON result           err:<id> error text
--   onerr:<id> the step to run if this one fails (a chord's on_error)
--
-- create   ARGV 'create', field, value, ...   -> ready steps (or {} if it exists already)
-- done     ARGV 'done', step, result JSON     -> ready steps
-- fail     ARGV 'fail', step, error           -> ready steps (an on_error step)
-- enqueued ARGV 'enqueued', step              -> 1
-- Ready steps come back as {id, spec JSON, parent results JSON, ...}.
local key = KEYS[1]
local op = ARGV[1]

local function get(field) return redis.call('HGET', key, field) end

local function finish_one()
  local left = redis.call('HINCRBY', key, 'left', -1)
  if left <= 0 and get('status') == 'running' then redis.call('HSET', key, 'status', 'succeeded') end
end

local function parents(id)
  local out = {}
  for _, dep in ipairs(cjson.decode(get('dep:' .. id) or '[]')) do
    out[#out + 1] = get('res:' .. dep) or 'null'
  end
  return '[' .. table.concat(out, ',') .. ']'
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

-- claim the waiting dependents of `id` whose deps are all done; return claimed ones
-- left at q too (a caller that died before enqueueing them)
local function release(id, out)
  for _, nxt in ipairs(cjson.decode(get('out:' .. id) or '[]')) do
    local st = get('st:' .. nxt)
    if st == 'w' and tonumber(get('n:' .. nxt)) <= 0 then
      redis.call('HSET', key, 'st:' .. nxt, 'q')
      st = 'q'
    end
    if st == 'q' then ready_entry(out, nxt, parents(nxt)) end
  end
end

if op == 'create' then
  if redis.call('HEXISTS', key, 'status') == 1 then
    local out = {}
    for _, id in ipairs(cjson.decode(get('entries') or '[]')) do
      if get('st:' .. id) == 'q' then ready_entry(out, id, '[]') end
    end
    return out
  end
  local fields = {}
  for i = 2, #ARGV do fields[#fields + 1] = ARGV[i] end
  redis.call('HSET', key, unpack(fields))
  local out = {}
  for _, id in ipairs(cjson.decode(get('entries'))) do
    redis.call('HSET', key, 'st:' .. id, 'q')
    ready_entry(out, id, '[]')
  end
  return out
elseif op == 'done' then
  local id = ARGV[2]
  local st = get('st:' .. id)
  if not st then return redis.error_reply('ERR workflow: no step ' .. id) end
  local out = {}
  if st ~= 'd' and st ~= 'f' then
    redis.call('HSET', key, 'st:' .. id, 'd', 'res:' .. id, ARGV[3])
    for _, nxt in ipairs(cjson.decode(get('out:' .. id) or '[]')) do
      redis.call('HINCRBY', key, 'n:' .. nxt, -1)
    end
    finish_one()
  end
  if get('status') == 'failed' then return out end
  release(id, out)
  return out
elseif op == 'fail' then
  local id = ARGV[2]
  local st = get('st:' .. id)
  if not st then return redis.error_reply('ERR workflow: no step ' .. id) end
  local out = {}
  if st == 'd' or st == 'f' then
    local handler = get('onerr:' .. id)
    if handler and get('st:' .. handler) == 'q' then ready_entry(out, handler, errors_of(handler)) end
    return out
  end
  redis.call('HSET', key, 'st:' .. id, 'f', 'err:' .. id, ARGV[3], 'status', 'failed')
  local handler = get('onerr:' .. id)
  -- every step still waiting is skipped, but the failed step's error handler
  for _, field in ipairs(redis.call('HKEYS', key)) do
    local other = string.match(field, '^st:(.+)$')
    if other and other ~= handler and get(field) == 'w' then
      redis.call('HSET', key, field, 's')
    end
  end
  if handler and get('st:' .. handler) == 'w' then
    redis.call('HSET', key, 'st:' .. handler, 'q')
  end
  if handler and get('st:' .. handler) == 'q' then ready_entry(out, handler, errors_of(handler)) end
  return out
elseif op == 'enqueued' then
  if get('st:' .. ARGV[2]) == 'q' then redis.call('HSET', key, 'st:' .. ARGV[2], 'e') end
  return 1
end
return redis.error_reply('ERR workflow: unknown op ' .. tostring(op))
