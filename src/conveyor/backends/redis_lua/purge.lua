-- purge: delete the oldest finished tasks of one status (e.g. the dead-letter list).
-- KEYS: the common layout (see _common.lua).
-- ARGV[1] queue name, ARGV[2] result_ttl, ARGV[3] status (success, failed, canceled or
-- timeout), ARGV[4] the most records to delete in this call (bounded work per call).
-- Returns how many records were deleted; the caller repeats until it returns 0.
-- @include _common.lua

local index = DONE_KEY[ARGV[3]]
if not index then return redis.error_reply('purge: not a finished status: ' .. ARGV[3]) end
local ids = redis.call('ZRANGE', index, 0, tonumber(ARGV[4]) - 1)
local deleted = 0
for _, id in ipairs(ids) do
  local key = KEYS[4] .. id
  -- An index entry whose record moved on (pushed again) is stale: drop only the entry.
  if not readable(key) or redis.call('HGET', key, 'status') == ARGV[3] then
    redis.call('DEL', key)
    deleted = deleted + 1
  end
  redis.call('ZREM', index, id)
end
return deleted
