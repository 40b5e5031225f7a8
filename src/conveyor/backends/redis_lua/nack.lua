-- nack: give a held task back, ready again after a delay.
-- KEYS: the common layout (see _common.lua).
-- ARGV[1] queue name, ARGV[2] result_ttl, ARGV[3] id, ARGV[4] token, ARGV[5] delay (s),
-- ARGV[6] error JSON ('' = none), ARGV[7] '1' counts the delivery as an attempt, '0' gives
-- it back (a shutdown hand-back: the task keeps its place in line).
-- Returns 1, or 0 when the lease is not held (expired and given to someone else).
-- @include _common.lua

local id, token, key = ARGV[3], ARGV[4], KEYS[4] .. ARGV[3]
if not (readable(key) and held(key, token)) then return 0 end
local delay, counted = tonumber(ARGV[5]) or 0, ARGV[7] == '1'
redis.call('ZREM', KEYS[3], id)
redis.call('ZREM', KEYS[11], id)
redis.call('PERSIST', key)
redis.call('HDEL', key, 'token')
if ARGV[6] ~= '' then redis.call('HSET', key, 'error', ARGV[6]) end
if cancel_if_asked(key, id, tonumber(ARGV[2])) then return 1 end
local attempts = counted and redis.call('HGET', key, 'attempts')
  or redis.call('HINCRBY', key, 'attempts', -1)
if delay > 0 then
  redis.call('ZADD', KEYS[2], NOW + delay, id)
  redis.call('HSET', key, 'status', 'scheduled', 'scheduled_for', fmt(NOW + delay),
    'updated_at', fmt(NOW))
  append_event(key, counted and 'retry_scheduled' or 'interrupted', attempts)
  return 1
end
local score = not counted and tonumber(redis.call('HGET', key, 'score'))
  or next_score(tonumber(redis.call('HGET', key, 'priority')) or 0)
redis.call('ZADD', KEYS[1], score, id)
redis.call('HSET', key, 'status', 'pending', 'score', score, 'ready_at', fmt(NOW),
  'updated_at', fmt(NOW))
append_event(key, counted and 'requeued' or 'interrupted', attempts)
wake()
return 1
