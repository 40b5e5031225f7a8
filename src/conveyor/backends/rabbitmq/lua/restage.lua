-- restage: re-drive a failed, timed-out or canceled task with a new ticket to publish.
-- KEYS: the common layout plus KEYS[12] conveyor:{q}:publishing (see stage.lua).
-- ARGV[1] queue name, ARGV[2] result_ttl, ARGV[3] id, ARGV[4] publish grace (s).
-- Returns {ticket, priority}, or {} when the task is live, succeeded or unknown.
-- @include _common.lua

local id, key = ARGV[3], KEYS[4] .. ARGV[3]
if not readable(key) then return {} end
local status = redis.call('HGET', key, 'status')
if status ~= 'failed' and status ~= 'timeout' and status ~= 'canceled' then return {} end
local priority = tonumber(redis.call('HGET', key, 'priority'))
if not priority then return {} end
redis.call('ZREM', DONE_KEY[status], id)
redis.call('PERSIST', key)
local score = next_score(priority)
redis.call('HDEL', key, 'dead_reason', 'finished_at', 'cancel_requested', 'token')
redis.call('HSET', key, 'status', 'pending', 'attempts', 0, 'expiries', 0, 'score', score,
  'ready_at', fmt(NOW), 'updated_at', fmt(NOW))
redis.call('ZADD', KEYS[1], score, id)
redis.call('ZADD', KEYS[12], NOW + tonumber(ARGV[4]), id)
append_event(key, 'retried', 0)
return {redis.call('HINCRBY', key, 'ticket', 1), priority}
