-- migrate: bring a queue written by an earlier layout up to this one, a slice at a time.
-- Layout 1 had no expire_at: a never-started waiting task with a queue_timeout gets one,
-- counted from when it became ready (its due time if scheduled), and joins the expiring
-- index; a task that started once keeps none (it is never timed out again).
-- ARGV[A] 'pending' or 'delayed', ARGV[A + 1] start offset, ARGV[A + 2] slice size,
-- ARGV[A + 3] the layout version to record when this is the last slice ('' = not last).
-- Returns how many ids the slice held.
-- @include _lifecycle.lua

local index = ARGV[A] == 'delayed' and KEYS[2] or KEYS[1]
local start = tonumber(ARGV[A + 1])
local ids = redis.call('ZRANGE', index, start, start + tonumber(ARGV[A + 2]) - 1)
for _, id in ipairs(ids) do
  local key = KEYS[4] .. id
  if readable(key) then
    local f = redis.call('HMGET', key, 'queue_timeout', 'started_at', 'ready_at', 'scheduled_for',
      'expire_at')
    local queue_timeout = finite(f[1])
    local ready = finite(f[4]) or finite(f[3])
    if queue_timeout and not f[2] and not f[5] and ready then
      redis.call('HSET', key, 'expire_at', fmt(ready + queue_timeout))
      redis.call('ZADD', KEYS[13], ready + queue_timeout, id)
    end
  end
end
if ARGV[A + 3] ~= '' then redis.call('SET', KEYS[14], ARGV[A + 3]) end
return #ids
