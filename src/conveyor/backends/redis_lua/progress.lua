-- progress: record how far a held task has got.
-- KEYS: the common layout (see _common.lua).
-- ARGV[1] queue name, ARGV[2] result_ttl, ARGV[3] id, ARGV[4] token, ARGV[5] fraction
-- 0..1, ARGV[6] message ('' = none).
-- Returns 1, or 0 when the task is not held with that token.
-- @include _common.lua

local token, key = ARGV[4], KEYS[4] .. ARGV[3]
if not (readable(key) and held(key, token)) then return 0 end
redis.call('HSET', key, 'progress', ARGV[5], 'updated_at', fmt(NOW))
if ARGV[6] ~= '' then
  redis.call('HSET', key, 'progress_message', ARGV[6])
else
  redis.call('HDEL', key, 'progress_message')
end
return 1
