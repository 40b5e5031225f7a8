-- checkpoint: store the results of the pipeline steps a held task has finished, so a retry
-- resumes after them.
-- KEYS: the common layout (see _common.lua).
-- ARGV[1] queue name, ARGV[2] result_ttl, ARGV[3] id, ARGV[4] token, ARGV[5] steps JSON.
-- Returns 1, or 0 when the task is not held with that token.
-- @include _common.lua

local key = KEYS[4] .. ARGV[3]
if not (readable(key) and held(key, ARGV[4])) then return 0 end
redis.call('HSET', key, 'steps', ARGV[5], 'updated_at', fmt(NOW))
return 1
