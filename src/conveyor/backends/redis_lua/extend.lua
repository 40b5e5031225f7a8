-- extend: renew a held lease to now + seconds.
-- KEYS: the common layout (see _common.lua).
-- ARGV[1] queue name, ARGV[2] result_ttl, ARGV[3] id, ARGV[4] token, ARGV[5] seconds.
-- Returns 1, or 0 when the lease is no longer held.
-- @include _common.lua

local id, token, key = ARGV[3], ARGV[4], KEYS[4] .. ARGV[3]
if not (readable(key) and held(key, token)) then return 0 end
if redis.call('ZSCORE', KEYS[3], id) == false then return 0 end -- pulled: nothing to renew
redis.call('ZADD', KEYS[3], NOW + tonumber(ARGV[5]), id)
return 1
