-- requeue: nack of a RabbitMQ-delivered task (the Redis backend's nack plus the ticket rule).
-- KEYS: the common layout plus KEYS[12] conveyor:{q}:publishing (see stage.lua).
-- ARGV[1] queue name, ARGV[2] result_ttl, ARGV[3] id, ARGV[4] token, ARGV[5] delay (s),
-- ARGV[6] error JSON ('' = none), ARGV[7] '1' counts the delivery as an attempt, '0' gives
-- it back (a shutdown hand-back).
-- Returns -1 when the token is not the holder's (nothing changed), 1 when the held message
-- goes back to the queue as it is (no delay), 0 when it is to be acked: delayed (the ticket
-- is bumped, so the held copy is stale even if its ack is lost; a new one is published when
-- due) or canceled (a cancel was asked while it ran).
-- @include _common.lua

local id, token, key = ARGV[3], ARGV[4], KEYS[4] .. ARGV[3]
if not (readable(key) and held(key, token)) then return -1 end
local delay, counted = tonumber(ARGV[5]) or 0, ARGV[7] == '1'
redis.call('ZREM', KEYS[3], id)
redis.call('ZREM', KEYS[11], id)
redis.call('PERSIST', key)
redis.call('HDEL', key, 'token')
if ARGV[6] ~= '' then redis.call('HSET', key, 'error', ARGV[6]) end
if cancel_if_asked(key, id, tonumber(ARGV[2])) then return 0 end
local attempts = counted and redis.call('HGET', key, 'attempts')
  or redis.call('HINCRBY', key, 'attempts', -1)
if delay > 0 then
  redis.call('HINCRBY', key, 'ticket', 1)
  redis.call('ZADD', KEYS[2], NOW + delay, id)
  redis.call('HSET', key, 'status', 'scheduled', 'scheduled_for', fmt(NOW + delay),
    'updated_at', fmt(NOW))
  append_event(key, counted and 'retry_scheduled' or 'interrupted', attempts)
  return 0
end
local score = not counted and tonumber(redis.call('HGET', key, 'score'))
  or next_score(tonumber(redis.call('HGET', key, 'priority')) or 0)
redis.call('ZADD', KEYS[1], score, id)
redis.call('HSET', key, 'status', 'pending', 'score', score, 'ready_at', fmt(NOW),
  'updated_at', fmt(NOW))
append_event(key, counted and 'requeued' or 'interrupted', attempts)
return 1
