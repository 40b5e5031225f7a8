-- stage: store new tasks of a RabbitMQ queue; ready ones get a ticket to publish.
-- KEYS: the common layout (see redis_lua/_common.lua) plus KEYS[12] conveyor:{q}:publishing,
-- a ZSET id -> deadline by which the ticket's publisher must have had its confirm.
-- ARGV[1] queue name, ARGV[2] result_ttl (unused), ARGV[3] publish grace (s), ARGV[4] the
-- number P of confirmed tickets whose deadlines to clear first (see published.lua), then 2P
-- values (id, ticket), then 9 values per task: id, priority, data, type, delay,
-- max_retries, retry_backoff, queue_timeout, process_timeout ('' = not set).
-- Returns one integer per task: 0 refused (that id is live), -1 stored as scheduled (a
-- consumer publishes it when due), n > 0 stored as pending with ticket n to publish now.
-- @include _common.lua

local queue, grace, confirmed = ARGV[1], tonumber(ARGV[3]), tonumber(ARGV[4])
for i = 5, 4 + 2 * confirmed, 2 do
  local key = KEYS[4] .. ARGV[i]
  if readable(key) and redis.call('HGET', key, 'ticket') == ARGV[i + 1] then
    redis.call('ZREM', KEYS[12], ARGV[i])
  end
end
local out = {}
local LIVE = {scheduled = true, pending = true, processing = true}
for i = 5 + 2 * confirmed, #ARGV, 9 do
  local id, priority, data, type_name, delay = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2],
    ARGV[i + 3], tonumber(ARGV[i + 4]) or 0
  local key = KEYS[4] .. id
  local old = readable(key) and redis.call('HGET', key, 'status')
  if old and LIVE[old] then
    out[#out + 1] = 0
  else
    local ticket = (readable(key) and tonumber(redis.call('HGET', key, 'ticket')) or 0) + 1
    if old then
      for _, done in ipairs({KEYS[7], KEYS[8], KEYS[9], KEYS[10]}) do redis.call('ZREM', done, id) end
    end
    redis.call('DEL', key)
    redis.call('HSET', key, 'id', id, 'queue', queue, 'priority', ARGV[i + 1], 'data', data,
      'attempts', 0, 'expiries', 0, 'created_at', fmt(NOW), 'updated_at', fmt(NOW),
      'progress', 0, 'ticket', ticket)
    local optional = {type = type_name, max_retries = ARGV[i + 5], retry_backoff = ARGV[i + 6],
      queue_timeout = ARGV[i + 7], process_timeout = ARGV[i + 8]}
    for field, value in pairs(optional) do
      if value ~= '' then redis.call('HSET', key, field, value) end
    end
    if delay > 0 then
      redis.call('HSET', key, 'status', 'scheduled', 'scheduled_for', fmt(NOW + delay))
      redis.call('ZADD', KEYS[2], NOW + delay, id)
      append_event(key, 'scheduled', 0)
      out[#out + 1] = -1
    else
      local score = next_score(priority)
      redis.call('HSET', key, 'status', 'pending', 'score', score, 'ready_at', fmt(NOW))
      redis.call('ZADD', KEYS[1], score, id)
      redis.call('ZADD', KEYS[12], NOW + grace, id)
      append_event(key, 'pushed', 0)
      out[#out + 1] = ticket
    end
  end
end
return out
