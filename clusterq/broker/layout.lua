-- layout: write a partitioned queue's declaration if nobody changed it meanwhile.
-- KEYS[1] the layouts hash. ARGV: logical queue name, the version the caller read (0 when
-- it found none), the new declaration (JSON, its version one more).
-- Returns {1} when written, else {0, the declaration stored now (or '')}.
local err = wrong_type({'hash'})
if err then return err end
local stored = redis.call('HGET', KEYS[1], ARGV[1])
local version = 0
if stored then
  local ok, decoded = pcall(cjson.decode, stored)
  if ok and type(decoded) == 'table' and tonumber(decoded['version']) then
    version = tonumber(decoded['version'])
  end
end
if version ~= tonumber(ARGV[2]) then
  return {0, stored or ''}
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return {1}
