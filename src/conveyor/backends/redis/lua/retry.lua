-- retry: re-drive a finished task that did not succeed: pending again at the back of its
-- band, attempts reset; its queue_timeout (if any) counts again from now.
-- ARGV[A] id.
-- Returns {ticket, priority} when re-driven, {} when the task is live, succeeded or unknown.
-- @include _lifecycle.lua

begin()
local id, key = ARGV[A], KEYS[4] .. ARGV[A]
if not readable(key) then return {} end
local status = redis.call('HGET', key, 'status')
if not REDRIVABLE[status] or damage(key) then return {} end
redis.call('ZREM', DONE_KEY[status], id)
redis.call('PERSIST', key)
redis.call('HDEL', key, 'dead_reason', 'finished_at', 'cancel_requested', 'token',
  'progress_message')
redis.call('HSET', key, 'attempts', 0, 'expiries', 0, 'progress', 0)
local queue_timeout = num(key, 'queue_timeout')
if queue_timeout then
  redis.call('HSET', key, 'expire_at', fmt(NOW + queue_timeout))
  redis.call('ZADD', KEYS[13], NOW + queue_timeout, id)
end
local ticket = enter_line(key, id, false)
record(key, EV.REDRIVEN, 0)
wake()
return {ticket or 0, redis.call('HGET', key, 'priority')}
