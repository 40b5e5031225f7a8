-- Shared by every Conveyor script; each script pulls it in with an `-- @include` line
-- (expanded once when the scripts are loaded, never built from runtime values).
--
-- KEYS (the same layout for every script; all share the queue's hash tag, so one
-- script touches one Redis Cluster slot):
--   KEYS[1]  conveyor:{q}:pending        ZSET id -> -(priority * 2^40) + seq   (ready tasks)
--   KEYS[2]  conveyor:{q}:delayed        ZSET id -> due time (epoch s)        (scheduled)
--   KEYS[3]  conveyor:{q}:leases         ZSET id -> lease deadline (epoch s)  (processing)
--   KEYS[4]  conveyor:{q}:task:          prefix of the per-task HASH keys (prefix .. id)
--   KEYS[5]  conveyor:{q}:seq            STRING counter for FIFO within a priority
--   KEYS[6]  conveyor:{q}:wake           LIST of wake-up markers a blocked reserve BLPOPs
--   KEYS[7]  conveyor:{q}:done:success   ZSET id -> finished time
--   KEYS[8]  conveyor:{q}:done:failed    ZSET id -> finished time (the dead-letter list)
--   KEYS[9]  conveyor:{q}:done:canceled  ZSET id -> finished time
--   KEYS[10] conveyor:{q}:done:timeout   ZSET id -> finished time
--   KEYS[11] conveyor:{q}:pulled         ZSET id -> pull time (at-most-once, no lease; kept
--                                        result_ttl so seed-style consumers never leak)
-- The per-task key is built from the KEYS[4] prefix, so it is in the same slot by design.

local PRIORITY_BAND = 1099511627776 -- 2^40: room for 10^12 pushes per priority band
local WAKE_CAP = 1000
local SCAN_LIMIT = 100 -- bounded work per call: promote/reap at most this many
local DONE_KEY = {success = KEYS[7], failed = KEYS[8], canceled = KEYS[9], timeout = KEYS[10]}

local function now_seconds()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

-- Every script reads the server clock once: lease deadlines never depend on a worker's clock.
local NOW = now_seconds()

local function fmt(x)
  return string.format('%.6f', x)
end

local function append_event(key, name, attempt, note)
  local line = {at = tonumber(fmt(NOW)), event = name, attempt = tonumber(attempt) or 0}
  if note and note ~= '' then line.note = note end
  local history = redis.call('HGET', key, 'history')
  local encoded = cjson.encode(line)
  if history and history ~= '' then encoded = history .. '\n' .. encoded end
  redis.call('HSET', key, 'history', encoded)
end

local function next_score(priority)
  return -priority * PRIORITY_BAND + redis.call('INCR', KEYS[5])
end

local function wake()
  redis.call('RPUSH', KEYS[6], '1')
  redis.call('LTRIM', KEYS[6], 0, WAKE_CAP - 1)
end

-- Finish a task (success/failed/canceled/timeout): index it and let it expire if kept.
local function finish(key, id, status, ttl)
  redis.call('HSET', key, 'status', status, 'finished_at', fmt(NOW), 'updated_at', fmt(NOW))
  redis.call('HDEL', key, 'token')
  redis.call('ZREM', KEYS[11], id)
  redis.call('ZADD', DONE_KEY[status], NOW, id)
  if status == 'failed' then
    redis.call('PERSIST', key) -- the dead-letter list is kept until purged or retried
  elseif ttl and ttl > 0 then
    redis.call('EXPIRE', key, math.ceil(ttl))
    redis.call('ZREMRANGEBYSCORE', DONE_KEY[status], '-inf', NOW - ttl)
  end
end

-- Finish a task that did not succeed: failed (dead-letter) or canceled while running.
-- The history event is `dead` when the backend itself gives up on a task (poison,
-- malformed) unless the caller names another (`failed` for an explicit fail()).
local function dead_letter(key, id, reason, error_json, status, ttl, event)
  status = status or 'failed'
  redis.call('ZREM', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
  redis.call('ZREM', KEYS[3], id)
  if status == 'failed' then redis.call('HSET', key, 'dead_reason', reason) end
  if error_json and error_json ~= '' then redis.call('HSET', key, 'error', error_json) end
  finish(key, id, status, ttl or 0)
  append_event(key, event or (status == 'failed' and 'dead' or status),
    redis.call('HGET', key, 'attempts'), reason)
end

-- A task whose cancel was asked while it ran must not go back in line when it is handed
-- back or its lease runs out: it ends as canceled there.
local function cancel_if_asked(key, id, ttl)
  if redis.call('HGET', key, 'cancel_requested') == '1' then
    dead_letter(key, id, 'canceled', nil, 'canceled', ttl)
    return true
  end
  return false
end

-- An id in a queue index with no readable task hash: record why it is dead, keep going.
local function dead_unreadable(id, queue, reason, message)
  local key = KEYS[4] .. id
  redis.call('ZREM', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
  redis.call('ZREM', KEYS[3], id)
  if redis.call('TYPE', key).ok ~= 'none' and redis.call('TYPE', key).ok ~= 'hash' then
    redis.call('ZADD', KEYS[8], NOW, id) -- cannot write the record: list it as dead anyway
    return
  end
  redis.call('HSET', key, 'id', id, 'queue', queue, 'priority', '0', 'created_at', fmt(NOW))
  local error_json = cjson.encode({type = 'MalformedTask', message = message})
  redis.call('HSET', key, 'dead_reason', reason, 'error', error_json)
  finish(key, id, 'failed', 0)
  append_event(key, 'dead', 0, reason)
end

local function readable(key)
  return redis.call('TYPE', key).ok == 'hash'
end

-- Move due scheduled tasks into pending, in due order, at the back of their band.
-- `promoted(key, id)`, when given, is called for each (the RabbitMQ store publishes them).
local function promote_due(queue, limit, promoted)
  local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', NOW, 'WITHSCORES', 'LIMIT', 0,
    limit or SCAN_LIMIT)
  for i = 1, #due, 2 do
    local id, key = due[i], KEYS[4] .. due[i]
    local priority = readable(key) and tonumber(redis.call('HGET', key, 'priority'))
    if not readable(key) then
      dead_unreadable(id, queue, 'missing', 'scheduled id has no task record')
    elseif not priority then
      dead_letter(key, id, 'malformed', cjson.encode({type = 'MalformedTask',
        message = 'priority is not a number'}))
    else
      local score = next_score(priority)
      redis.call('ZREM', KEYS[2], id)
      redis.call('ZADD', KEYS[1], score, id)
      redis.call('HSET', key, 'status', 'pending', 'score', score, 'ready_at', due[i + 1],
        'updated_at', fmt(NOW))
      append_event(key, 'due', redis.call('HGET', key, 'attempts'))
      if promoted then promoted(key, id) end
    end
  end
end

-- Leases past their deadline: the holder died or hung. Back in line, or poison.
local function reap_expired(queue, max_deliveries, ttl)
  local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', NOW, 'LIMIT', 0, SCAN_LIMIT)
  for _, id in ipairs(expired) do
    local key = KEYS[4] .. id
    if not readable(key) then
      dead_unreadable(id, queue, 'missing', 'leased id has no task record')
    else
      local expiries = redis.call('HINCRBY', key, 'expiries', 1)
      local attempts = redis.call('HGET', key, 'attempts')
      redis.call('ZREM', KEYS[3], id)
      redis.call('HDEL', key, 'token')
      if cancel_if_asked(key, id, ttl) then
        -- canceled while it ran: it does not come back
      elseif expiries >= max_deliveries then
        dead_letter(key, id, 'poison', cjson.encode({type = 'PoisonTask', message =
          'delivered ' .. expiries .. ' times without an ack (the lease expired each time)'}))
      else
        local score = tonumber(redis.call('HGET', key, 'score'))
          or next_score(tonumber(redis.call('HGET', key, 'priority')) or 0)
        redis.call('ZADD', KEYS[1], score, id)
        redis.call('HSET', key, 'status', 'pending', 'updated_at', fmt(NOW))
        append_event(key, 'lease_expired', attempts)
      end
    end
  end
end

-- Seconds until a scheduled task is due or a lease runs out; -1 when neither exists.
local function wait_hint()
  local hint = -1
  for _, index in ipairs({KEYS[2], KEYS[3]}) do
    local first = redis.call('ZRANGE', index, 0, 0, 'WITHSCORES')
    if first[2] then
      local left = math.max(tonumber(first[2]) - NOW, 0)
      if hint < 0 or left < hint then hint = left end
    end
  end
  return hint
end

-- Hand a task to a consumer: processing, attempts + 1, a fencing token, and a lease (or,
-- for a pull, the pulled index: consumed, never redelivered, forgotten after result_ttl
-- unless settled). Returns the new attempt count.
local function take(key, id, token, lease, consumer, ttl, event)
  local attempts = redis.call('HINCRBY', key, 'attempts', 1)
  redis.call('HSET', key, 'status', 'processing', 'token', token, 'started_at', fmt(NOW),
    'updated_at', fmt(NOW), 'worker', consumer)
  if lease then
    redis.call('ZADD', KEYS[3], NOW + lease, id)
  else
    redis.call('ZADD', KEYS[11], NOW, id)
    if ttl > 0 then
      redis.call('EXPIRE', key, math.ceil(ttl))
      redis.call('ZREMRANGEBYSCORE', KEYS[11], '-inf', NOW - ttl)
    end
  end
  append_event(key, event or (lease and 'reserved' or 'pulled'), attempts)
  return attempts
end

local CLAIMED_FIELDS = {'priority', 'data', 'type', 'max_retries', 'retry_backoff',
  'process_timeout', 'created_at', 'steps', 'queue_timeout', 'ready_at'}

-- The claim itself: returns {1, id, token, attempts, priority, data, type, max_retries,
-- retry_backoff, process_timeout, created_at, steps} or {0, wait_hint}.
local function claim(queue, lease, max_deliveries, token, ttl, consumer)
  promote_due(queue)
  reap_expired(queue, max_deliveries, ttl)
  for _ = 1, SCAN_LIMIT do
    local popped = redis.call('ZPOPMIN', KEYS[1])
    if not popped[1] then break end
    local id, key = popped[1], KEYS[4] .. popped[1]
    if not readable(key) then
      dead_unreadable(id, queue, 'missing', 'pending id has no task record')
    else
      local f = redis.call('HMGET', key, unpack(CLAIMED_FIELDS))
      local queue_timeout, ready_at = tonumber(f[9]), tonumber(f[10])
      if queue_timeout and ready_at and NOW > ready_at + queue_timeout then
        finish(key, id, 'timeout', ttl)
        append_event(key, 'timeout', redis.call('HGET', key, 'attempts'), 'not started in time')
      else
        local attempts = take(key, id, token, lease, consumer, ttl)
        if redis.call('ZCARD', KEYS[1]) == 0 then redis.call('DEL', KEYS[6]) end
        return {1, id, token, attempts, f[1] or '', f[2] or '', f[3] or '', f[4] or '',
          f[5] or '', f[6] or '', f[7] or '', f[8] or ''}
      end
    end
  end
  redis.call('DEL', KEYS[6]) -- nothing ready: stale wake-up markers would only spin waiters
  return {0, fmt(wait_hint())}
end

-- Give a held task back (nack): canceled if a cancel was asked while it ran, else scheduled
-- after `delay` or pending now. A counted delivery goes to the back of its band; a hand-back
-- (`counted` false: shutdown) keeps its place and returns the attempt.
-- Returns 'canceled', 'scheduled' or 'pending'.
local function give_back(key, id, delay, counted, error_json, ttl)
  redis.call('ZREM', KEYS[3], id)
  redis.call('ZREM', KEYS[11], id)
  redis.call('PERSIST', key)
  redis.call('HDEL', key, 'token')
  if error_json ~= '' then redis.call('HSET', key, 'error', error_json) end
  if cancel_if_asked(key, id, ttl) then return 'canceled' end
  local attempts = counted and redis.call('HGET', key, 'attempts')
    or redis.call('HINCRBY', key, 'attempts', -1)
  if delay > 0 then
    redis.call('ZADD', KEYS[2], NOW + delay, id)
    redis.call('HSET', key, 'status', 'scheduled', 'scheduled_for', fmt(NOW + delay),
      'updated_at', fmt(NOW))
    append_event(key, counted and 'retry_scheduled' or 'interrupted', attempts)
    return 'scheduled'
  end
  local score = not counted and tonumber(redis.call('HGET', key, 'score'))
    or next_score(tonumber(redis.call('HGET', key, 'priority')) or 0)
  redis.call('ZADD', KEYS[1], score, id)
  redis.call('HSET', key, 'status', 'pending', 'score', score, 'ready_at', fmt(NOW),
    'updated_at', fmt(NOW))
  append_event(key, counted and 'requeued' or 'interrupted', attempts)
  return 'pending'
end

local LIVE = {scheduled = true, pending = true, processing = true}

-- Store one new task from the 9 values at ARGV[i] (id, priority, data, type, delay,
-- max_retries, retry_backoff, queue_timeout, process_timeout; '' = not set). A live id is
-- left alone; a finished one is replaced by a fresh record.
-- Returns 'live' (refused), 'scheduled' or 'pending'.
local function store_task(queue, i)
  local id, priority, delay = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 4]) or 0
  local key = KEYS[4] .. id
  local old = readable(key) and redis.call('HGET', key, 'status')
  if old and LIVE[old] then return 'live' end
  if old then
    for _, done in ipairs({KEYS[7], KEYS[8], KEYS[9], KEYS[10]}) do redis.call('ZREM', done, id) end
  end
  redis.call('DEL', key)
  redis.call('HSET', key, 'id', id, 'queue', queue, 'priority', ARGV[i + 1], 'data', ARGV[i + 2],
    'attempts', 0, 'expiries', 0, 'created_at', fmt(NOW), 'updated_at', fmt(NOW), 'progress', 0)
  local optional = {type = ARGV[i + 3], max_retries = ARGV[i + 5], retry_backoff = ARGV[i + 6],
    queue_timeout = ARGV[i + 7], process_timeout = ARGV[i + 8]}
  for field, value in pairs(optional) do
    if value ~= '' then redis.call('HSET', key, field, value) end
  end
  if delay > 0 then
    redis.call('HSET', key, 'status', 'scheduled', 'scheduled_for', fmt(NOW + delay))
    redis.call('ZADD', KEYS[2], NOW + delay, id)
    append_event(key, 'scheduled', 0)
    return 'scheduled'
  end
  local score = next_score(priority)
  redis.call('HSET', key, 'status', 'pending', 'score', score, 'ready_at', fmt(NOW))
  redis.call('ZADD', KEYS[1], score, id)
  append_event(key, 'pushed', 0)
  return 'pending'
end

-- The caller's fencing check: the task is processing and the token is the current one.
local function held(key, token)
  local f = redis.call('HMGET', key, 'status', 'token')
  return f[1] == 'processing' and f[2] == token
end
