-- Shared by every clusterq script (prepended when the script is loaded).
-- Scripts never build key names: every key they touch arrives in KEYS, and all KEYS of
-- one call belong to one queue (one hash tag, one slot). Times are the server's clock.
pcall(redis.replicate_commands)  -- Redis < 7 needs this before TIME is followed by writes

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
