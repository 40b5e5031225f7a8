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
for i = 5 + 2 * confirmed, #ARGV, 9 do
  local id, key = ARGV[i], KEYS[4] .. ARGV[i]
  local ticket = (readable(key) and tonumber(redis.call('HGET', key, 'ticket')) or 0) + 1
  local outcome = store_task(queue, i)
  if outcome == 'live' then
    out[#out + 1] = 0
  else
    redis.call('HSET', key, 'ticket', ticket)
    if outcome == 'scheduled' then
      out[#out + 1] = -1
    else
      redis.call('ZADD', KEYS[12], NOW + grace, id)
      out[#out + 1] = ticket
    end
  end
end
return out
