-- enqueue: store a batch of new tasks in one call.
-- KEYS: the common layout (see _common.lua).
-- ARGV[1] queue name, ARGV[2] result_ttl (unused here, kept for a uniform call shape),
-- then 9 values per task: id, priority, data, type, delay, max_retries, retry_backoff,
-- queue_timeout, process_timeout ('' = not set).
-- Returns one integer per task: 1 stored, 0 refused because that id is live.
-- @include _common.lua

local queue = ARGV[1]
local stored, any_ready = {}, false
local LIVE = {scheduled = true, pending = true, processing = true}
for i = 3, #ARGV, 9 do
  local id, priority, data, type_name, delay = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2],
    ARGV[i + 3], tonumber(ARGV[i + 4]) or 0
  local key = KEYS[4] .. id
  local old = redis.call('TYPE', key).ok == 'hash' and redis.call('HGET', key, 'status')
  if old and LIVE[old] then
    stored[#stored + 1] = 0
  else
    if old then
      for _, done in ipairs({KEYS[7], KEYS[8], KEYS[9], KEYS[10]}) do redis.call('ZREM', done, id) end
    end
    redis.call('DEL', key)
    redis.call('HSET', key, 'id', id, 'queue', queue, 'priority', ARGV[i + 1], 'data', data,
      'attempts', 0, 'expiries', 0, 'created_at', fmt(NOW), 'updated_at', fmt(NOW),
      'progress', 0)
    local optional = {type = type_name, max_retries = ARGV[i + 5], retry_backoff = ARGV[i + 6],
      queue_timeout = ARGV[i + 7], process_timeout = ARGV[i + 8]}
    for field, value in pairs(optional) do
      if value ~= '' then redis.call('HSET', key, field, value) end
    end
    if delay > 0 then
      redis.call('HSET', key, 'status', 'scheduled', 'scheduled_for', fmt(NOW + delay))
      redis.call('ZADD', KEYS[2], NOW + delay, id)
      append_event(key, 'scheduled', 0)
    else
      local score = next_score(priority)
      redis.call('HSET', key, 'status', 'pending', 'score', score, 'ready_at', fmt(NOW))
      redis.call('ZADD', KEYS[1], score, id)
      append_event(key, 'pushed', 0)
      any_ready = true
    end
    stored[#stored + 1] = 1
  end
end
if any_ready then wake() end
return stored
