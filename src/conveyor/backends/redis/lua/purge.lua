-- purge: delete the oldest finished tasks of one status (e.g. the dead-letter list).
-- ARGV[A] status (success, failed, canceled or timeout), ARGV[A + 1] the most records to
-- delete in this call (bounded work per call).
-- Returns how many records were deleted; the caller repeats until it returns 0.
-- @include _lifecycle.lua

local index = DONE_KEY[ARGV[A]]
if not index then return redis.error_reply('purge: not a finished status: ' .. ARGV[A]) end
local ids = redis.call('ZRANGE', index, 0, tonumber(ARGV[A + 1]) - 1)
local deleted = 0
for _, id in ipairs(ids) do
  local key = KEYS[4] .. id
  -- An index entry whose record moved on (pushed again) is stale: drop only the entry.
  if not readable(key) or redis.call('HGET', key, 'status') == ARGV[A] then
    redis.call('DEL', key)
    deleted = deleted + 1
  end
  redis.call('ZREM', index, id)
end
return deleted
