-- clusterq doctor: which of the commands clusterq's scripts call may this user run?
-- KEYS[1]: a string key of the doctor's own (written here, expires in 30 s);
-- KEYS[2]: a key never written; ARGV[1]: a channel in their slot (SPUBLISH, to no one).
-- Every call below either reads, meets WRONGTYPE on KEYS[1], or finds KEYS[2] missing
-- (RENAME, XGROUP), so nothing but KEYS[1] is ever written. Returns the refused commands
-- by their ACL names (lower case, 'xinfo|consumers' for a subcommand); {"?"} when SET
-- itself is refused (nothing else was tried).
local a, b = KEYS[1], KEYS[2]
local refused = {}
local function refuse(acl_name, reply)
  if type(reply) == 'table' and reply.err then
    local err = string.upper(reply.err)
    -- Redis 7.0 says "The user executing the script can't run this command"; others
    -- NOPERM or "no permissions".
    if string.find(err, 'NOPERM', 1, true) or string.find(err, 'PERMISSION', 1, true)
        or string.find(err, "CAN'T RUN THIS COMMAND", 1, true) then
      refused[#refused + 1] = string.lower(acl_name)
      return false
    end
  end
  return true
end
local function try(name, ...)
  return refuse(name, redis.pcall(name, ...))
end
local function try_sub(name, sub, ...)
  return refuse(name .. '|' .. sub, redis.pcall(name, sub, ...))
end
if not try('SET', a, 'x', 'PX', 30000) then
  return {'?'}
end
try('GET', a); try('EXISTS', a); try('TYPE', a); try('TIME')
try('HSET', a, 'f', 'v'); try('HGET', a, 'f'); try('HMGET', a, 'f'); try('HDEL', a, 'f')
try('HEXISTS', a, 'f'); try('HINCRBY', a, 'f', 1); try('HKEYS', a)
try('LPUSH', a, 'v'); try('RPUSH', a, 'v'); try('RPOP', a)
try('LPOS', a, 'v'); try('LREM', a, 1, 'v'); try('LTRIM', a, 0, -1)
try('HSETNX', a, 'f', 'v'); try('INCR', a); try('PEXPIRE', b, 30000)
try('ZADD', a, 1, 'm'); try('ZCARD', a); try('ZRANGE', a, 0, -1)
try('ZRANGEBYSCORE', a, 0, 1); try('ZREM', a, 'm'); try('ZREMRANGEBYSCORE', a, 0, 1)
try('ZRANGEBYLEX', a, '-', '+')
try('ZSCORE', a, 'm'); try('HLEN', b); try('LLEN', b); try('SPUBLISH', ARGV[1], '')
try('LINDEX', b, 0); try('LSET', a, 0, 'v'); try('RENAME', b, b); try('PERSIST', b)
try('XADD', a, '*', 'f', 'v'); try('XACK', a, 'g', '0-1'); try('XRANGE', b, '-', '+')
try('XLEN', b); try('XREVRANGE', b, '+', '-')
try_sub('XINFO', 'CONSUMERS', b, 'g'); try_sub('XGROUP', 'DELCONSUMER', b, 'g', 'c')
try('DEL', b)
return refused
