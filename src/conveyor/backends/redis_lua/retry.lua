-- retry: re-drive a finished task that did not succeed: pending again, attempts reset.
-- KEYS: the common layout (see _common.lua).
-- ARGV[1] queue name, ARGV[2] result_ttl, ARGV[3] id.
-- Returns 1 when requeued, 0 when the task is live, succeeded or unknown.
-- @include _common.lua

local id, key = ARGV[3], KEYS[4] .. ARGV[3]
if not readable(key) then return 0 end
local status = redis.call('HGET', key, 'status')
if status ~= 'failed' and status ~= 'timeout' and status ~= 'canceled' then return 0 end
local priority = tonumber(redis.call('HGET', key, 'priority'))
if not priority then return 0 end
redis.call('ZREM', DONE_KEY[status], id)
redis.call('PERSIST', key)
local score = next_score(priority)
redis.call('HDEL', key, 'dead_reason', 'finished_at', 'cancel_requested', 'token')
redis.call('HSET', key, 'status', 'pending', 'attempts', 0, 'expiries', 0, 'score', score,
  'ready_at', fmt(NOW), 'updated_at', fmt(NOW))
redis.call('ZADD', KEYS[1], score, id)
append_event(key, 'retried', 0)
wake()
return 1
