-- The lifecycle of conveyor/lifecycle.py, in Lua: every script includes this file (after the
-- generated header of constants ST, EV, DR, LIVE, FINISHED, REDRIVABLE, WAITING, UNRECORDED,
-- PRIORITY_BAND), and every transition goes through the functions below.
--
-- KEYS (the same layout for every script; all share the queue's hash tag, so one script
-- touches one Redis Cluster slot):
--   KEYS[1]  conveyor:{q}:pending        ZSET id -> -(priority * 2^40) + seq   (ready tasks)
--   KEYS[2]  conveyor:{q}:delayed        ZSET id -> due time (epoch s)        (scheduled)
--   KEYS[3]  conveyor:{q}:leases         ZSET id -> lease deadline (epoch s)  (processing)
--   KEYS[4]  conveyor:{q}:task:          prefix of the per-task HASH keys (prefix .. id)
--   KEYS[5]  conveyor:{q}:seq            STRING counter: places in line, FIFO within a band
--   KEYS[6]  conveyor:{q}:wake           LIST of wake-up markers a blocked reserve BLPOPs
--   KEYS[7]  conveyor:{q}:done:success   ZSET id -> finished time
--   KEYS[8]  conveyor:{q}:done:failed    ZSET id -> finished time (the dead-letter list)
--   KEYS[9]  conveyor:{q}:done:canceled  ZSET id -> finished time
--   KEYS[10] conveyor:{q}:done:timeout   ZSET id -> finished time
--   KEYS[11] conveyor:{q}:pulled         ZSET id -> pull time (at-most-once, no lease)
--   KEYS[12] conveyor:{q}:publishing     ZSET id -> deadline of a publish in flight (broker)
--   KEYS[13] conveyor:{q}:expiring       ZSET id -> expire_at of a never-started task
--   KEYS[14] conveyor:{q}:layout         STRING the keyspace layout version
--   KEYS[15] conveyor:{q}:preemptions    STRING how many times tasks yielded (K_PREEMPTIONS)
--   KEYS[16] conveyor:{q}:parked         ZSET id -> its score in pending, for every task set
--            aside because its concurrency key was full; K_PARKED .. ':' .. key is the
--            ZSET of one key's parked tasks (per-key limits; see keyed_* below)
--   KEYS[17] conveyor:{q}:keyrun:        prefix of the per-key SETs of running task ids
--   KEYS[18] conveyor:{q}:events         STREAM one entry per event (emit), trimmed ~EVENT_CAP
--   KEYS[19] conveyor:{q}:counters       HASH event name -> count, only ever incremented
-- The per-task hashes (KEYS[4] .. id) are not declared: Redis Cluster lets a script touch
-- an undeclared key when it hashes to the slot of the declared ones, which the shared hash
-- tag guarantees (a key of another slot would fail the script; the conformance suite runs
-- on a cluster). redis-py routes EVALSHA by the declared KEYS.
-- ARGV[1] queue name, ARGV[2] result_ttl (s), ARGV[3] the mode: 'broker' when a transport
-- (RabbitMQ) owns delivery, 'aging:<seconds>' with aging on (never both), else '';
-- ARGV[4] publish grace (s); each script's own values start at ARGV[5].
--
-- Scripts validate what they read before they write: a number field is read with
-- tonumber() (never HINCRBY on a value someone damaged), and a record that fails is
-- dead-lettered with the reason, so an error can never stop a script halfway through.

-- Per-call state, set by start_call() from the call's KEYS, ARGV and the server clock. The
-- scripts are also loaded as one function library (FUNCTION LOAD), whose functions stay
-- defined between calls: so nothing that depends on one call may be computed at load.
local QUEUE, TTL, BROKER, GRACE, AGING, NOW
local K_PREEMPTIONS, K_EVENTS, K_COUNTERS, K_PARKED, K_KEYRUN, DONE_KEY, STATUS_INDEX
local aged_tick, begun, now_text
local A = 5 -- the first of a script's own ARGV
local WAKE_CAP = 1000 -- wake-up markers a queue keeps
local SCAN_LIMIT = 100 -- bounded work per call: promote, reap or time out at most this many
-- The same as redis.call arguments, made once (see text(); no globals such as tostring at
-- load, but concatenation converts).
local WAKE_CAP_LAST, SCAN_LIMIT_TEXT = '' .. (WAKE_CAP - 1), '' .. SCAN_LIMIT
local NO_FIELDS = {}
local PROMOTE_ALL = '1000' -- due tasks promoted at the start of every transition (see begin)
local EVENT_CAP = '10000' -- entries kept per queue's stream (approximately: MAXLEN ~)

local function now_seconds()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

-- Every call reads the server clock once: deadlines never depend on a worker's clock.
local function start_call(keys, argv)
  KEYS, ARGV = keys, argv
  QUEUE, TTL = ARGV[1], tonumber(ARGV[2]) or 0
  BROKER, GRACE = ARGV[3] == 'broker', tonumber(ARGV[4]) or 30
  -- Aging (conveyor/aging.py): seconds of waiting worth one priority level, or nil (off).
  AGING = tonumber(string.match(ARGV[3] or '', '^aging:(.+)$') or '')
  K_PREEMPTIONS, K_EVENTS, K_COUNTERS = KEYS[15], KEYS[18], KEYS[19]
  K_PARKED, K_KEYRUN = KEYS[16], KEYS[17]
  DONE_KEY = {success = KEYS[7], failed = KEYS[8], canceled = KEYS[9], timeout = KEYS[10]}
  STATUS_INDEX = {pending = KEYS[1], scheduled = KEYS[2], processing = KEYS[3]}
  aged_tick, begun, now_text = 0, false, nil
  NOW = now_seconds()
end

-- A time as stored (microseconds). NOW's text is kept for the call: a transition writes it
-- several times (updated_at, the event, the history line), and formatting is not free.
local function fmt(x)
  if x == NOW then
    now_text = now_text or string.format('%.6f', x)
    return now_text
  end
  return string.format('%.6f', x)
end

local function readable(key)
  return redis.call('TYPE', key).ok == 'hash'
end

-- A stored number a transition can trust, or nil: Lua's tonumber() takes 'nan', 'inf' and
-- '1e400', and a NaN score would fail ZADD halfway through a script (Lua does not roll
-- back), so only finite numbers within +-2^53 (exact in a double) count.
local EXACT = 9007199254740992
local function finite(value)
  local n = tonumber(value)
  if n == nil or n ~= n or n >= EXACT or n <= -EXACT then return nil end
  return n
end

-- A whole number within +-2^53, or nil.
local function whole(value)
  local n = finite(value)
  if n == nil or math.floor(n) ~= n then return nil end
  return n
end

-- A number as redis.call would pass it, made cheaply: Redis turns a number argument into
-- text with '%.17g', which takes printf's floating-point path (measured with callgrind: with
-- cjson's formatting of history times, a seventh of a transition's instructions). A whole
-- number within +-2^53 is written with '%d', the same text; anything else is left to Redis.
local function text(n)
  if n == math.floor(n) and n < EXACT and n > -EXACT then return string.format('%d', n) end
  return n
end

-- A numeric field, or nil when it is missing or damaged.
local function num(key, field)
  return finite(redis.call('HGET', key, field))
end

-- Every transition (and progress, checkpoint) is an event in the queue's stream, in the same
-- script as the change. `n` numbers a queue's events without gaps, so a reader can tell when
-- trimming took events it had not read; the counters only ever go up (/metrics). Returns
-- the task's history, read in the same call (one call less per transition).
local function emit(key, event, attempt, note)
  local f
  if UNRECORDED[event] then -- progress, checkpoints: no history line, so no need to read it
    f = redis.call('HMGET', key, 'status', 'progress', 'worker', 'progress_message')
  else
    f = redis.call('HMGET', key, 'status', 'progress', 'worker', 'progress_message', 'history')
  end
  if event == EV.PROGRESS then note = f[4] end
  local n = redis.call('HINCRBY', K_COUNTERS, 'events', '1')
  redis.call('HINCRBY', K_COUNTERS, event, '1')
  redis.call('XADD', K_EVENTS, 'MAXLEN', '~', EVENT_CAP, '*', 'n', text(n),
    'task', string.sub(key, #KEYS[4] + 1), 'event', event, 'status', f[1] or '',
    'attempt', text(tonumber(attempt) or 0), 'progress', f[2] or '0', 'at', fmt(NOW),
    'worker', f[3] or '', 'note', note or '')
  return f[5]
end

-- The one place a transition is recorded: the task's history, and the event stream.
local function record(key, event, attempt, note)
  local history = emit(key, event, attempt, note)
  if UNRECORDED[event] then return end
  -- Written out rather than by cjson.encode of a table, which formats `at` with printf's
  -- floating-point path again (event names are plain words; the note is encoded).
  local encoded = '{"at":' .. fmt(NOW) .. ',"event":"' .. event .. '","attempt":'
    .. text(whole(attempt) or 0)
  if note and note ~= '' then encoded = encoded .. ',"note":' .. cjson.encode(note) end
  encoded = encoded .. '}'
  if history and history ~= '' then encoded = history .. '\n' .. encoded end
  redis.call('HSET', key, 'history', encoded)
end

local function wake()
  redis.call('RPUSH', KEYS[6], '1')
  redis.call('LTRIM', KEYS[6], '0', WAKE_CAP_LAST)
end

-- Per-key concurrency limits. A task pushed with a concurrency_key counts against its key
-- while it is processing (its id in the key's running SET). A claim that meets a task whose
-- key is full parks it: out of pending, onto the key's parked ZSET with the score it had, and
-- goes on. Every exit from processing goes through leave(), which frees the slot and
-- re-admits the head of the key's parked tasks at its original score (its place in line).
local function key_name(value)
  if type(value) == 'string' and value ~= '' then return value end
  return nil
end

local function keyed(key)
  -- pcall: a damaged record (not a hash) has no key, and must not fail the script
  return key_name(redis.pcall('HGET', key, 'concurrency_key'))
end

-- The head of a key's parked tasks goes back in line, at the place it had.
local function keyed_readmit(name)
  local head = redis.call('ZRANGE', K_PARKED .. ':' .. name, 0, 0, 'WITHSCORES')
  if not head[1] then return end
  redis.call('ZREM', K_PARKED .. ':' .. name, head[1])
  redis.call('ZREM', K_PARKED, head[1])
  redis.call('ZADD', KEYS[1], head[2], head[1])
  redis.call('RPUSH', KEYS[6], '1')
end

-- How many of a key's tasks are processing, and the smallest limit among them. A member
-- that is not processing any more (a path that skipped leave(), a pulled task forgotten
-- after result_ttl) is dropped here and its slot passed on: a slot never leaks.
local function keyed_running(name)
  local count, smallest = 0, nil
  for _, id in ipairs(redis.call('SMEMBERS', K_KEYRUN .. name)) do
    local key = KEYS[4] .. id
    local f = readable(key) and redis.call('HMGET', key, 'status', 'max_concurrency')
    if f and f[1] == ST.PROCESSING then
      count = count + 1
      local limit = tonumber(f[2])
      if limit and (not smallest or limit < smallest) then smallest = limit end
    else
      redis.call('SREM', K_KEYRUN .. name, id)
      keyed_readmit(name)
    end
  end
  return count, smallest
end

-- Remove an id from the indexes of the state it leaves (every index when unknown). `name`:
-- its concurrency key when the caller read it already (false: it has none).
local function leave(id, status, name)
  if status == ST.PENDING or status == ST.SCHEDULED or not LIVE[status] then
    local was_ready = redis.call('ZREM', KEYS[1], id) == 1
    redis.call('ZREM', KEYS[2], id)
    redis.call('ZREM', KEYS[12], id)
    redis.call('ZREM', KEYS[13], id)
    if name == nil then name = keyed(KEYS[4] .. id) or false end
    if name then
      if redis.call('ZREM', K_PARKED, id) == 1 then
        redis.call('ZREM', K_PARKED .. ':' .. name, id)
      elseif was_ready then
        keyed_readmit(name) -- an admitted task left without running: pass its turn on
      end
    end
  end
  if status == ST.PROCESSING or not LIVE[status] then
    redis.call('ZREM', KEYS[3], id)
    redis.call('ZREM', KEYS[11], id) -- also when leased: damaged indexes can hold it in both
    if name == nil then name = keyed(KEYS[4] .. id) or false end
    if name and redis.call('SREM', K_KEYRUN .. name, id) == 1 then keyed_readmit(name) end
  end
end

-- Broker mode: the task's place changed, so any message still carrying the old ticket is
-- stale. Returns the new ticket.
local function bump_ticket(key)
  local ticket = (num(key, 'ticket') or 0) + 1
  redis.call('HSET', key, 'ticket', text(ticket))
  return ticket
end

-- Finish a task (success, failed, canceled, timeout): index it and let it expire if kept.
-- `stale`, when given, is one more field to delete with the lease's; `name` is leave()'s;
-- `fields`, more field-value pairs to write with the status.
local function finish(key, id, from, status, stale, name, fields)
  leave(id, from, name)
  if DONE_KEY[from] then redis.call('ZREM', DONE_KEY[from], id) end
  redis.call('HSET', key, 'status', status, 'finished_at', fmt(NOW), 'updated_at', fmt(NOW),
    unpack(fields or NO_FIELDS))
  redis.call('HDEL', key, 'token', 'expire_at', stale or 'token')
  redis.call('ZADD', DONE_KEY[status], fmt(NOW), id)
  if status == ST.FAILED then
    redis.call('PERSIST', key) -- the dead-letter list is kept until purged or retried
  elseif TTL > 0 then
    redis.call('EXPIRE', key, text(math.ceil(TTL)))
    redis.call('ZREMRANGEBYSCORE', DONE_KEY[status], '-inf', NOW - TTL)
  end
end

-- End a task that did not succeed: failed (dead-lettered, with a reason) or canceled.
local function dead_letter(key, id, from, reason, error_json, status, event)
  status = status or ST.FAILED
  if status == ST.FAILED then redis.call('HSET', key, 'dead_reason', reason) end
  if error_json and error_json ~= '' then redis.call('HSET', key, 'error', error_json) end
  finish(key, id, from, status)
  record(key, event or EV.DEAD_LETTERED, num(key, 'attempts'), reason)
end

-- The history event of a FAIL outcome (lifecycle.fail_event).
local function fail_event(status, reason)
  if status == ST.CANCELED then return EV.CANCELED end
  return BACKEND_REASONS[reason] and EV.DEAD_LETTERED or EV.FAILED
end

local function malformed(key, id, from, what)
  dead_letter(key, id, from, DR.MALFORMED, cjson.encode({type = 'MalformedTask',
    message = 'stored record is damaged: ' .. what}))
end

-- An id in an index with no readable task hash: record why it is dead, keep going.
local function dead_unreadable(id, reason, message)
  local key = KEYS[4] .. id
  leave(id, nil)
  if redis.call('TYPE', key).ok ~= 'none' then
    redis.call('ZADD', KEYS[8], NOW, id) -- cannot write the record: list it as dead anyway
    return
  end
  redis.call('HSET', key, 'id', id, 'queue', QUEUE, 'priority', '0', 'created_at', fmt(NOW))
  local error_json = cjson.encode({type = 'MalformedTask', message = message})
  redis.call('HSET', key, 'dead_reason', reason, 'error', error_json)
  finish(key, id, nil, ST.FAILED)
  record(key, EV.DEAD_LETTERED, 0, reason)
end

-- What is wrong with a record's numbers, or nil when a transition can trust them.
-- Priority must be whole and small enough that its place in line (priority * 2^40) stays
-- finite; attempts, expiries and the broker ticket whole numbers.
local function damage_of(f)
  local priority = whole(f[1])
  if not priority or math.abs(priority) > 2147483647 then return 'priority is not an integer' end
  if f[2] and not whole(f[2]) then return 'attempts is not a number' end
  if f[3] and not whole(f[3]) then return 'expiries is not a number' end
  if not f[4] then return 'no status' end
  if not (LIVE[f[4]] or FINISHED[f[4]]) then return 'status is not a known status' end
  if f[5] and not whole(f[5]) then return 'ticket is not a number' end
  return nil
end

local function damage(key)
  return damage_of(redis.call('HMGET', key, 'priority', 'attempts', 'expiries', 'status', 'ticket'))
end

-- With aging on, the place in line is a static score: microseconds since AGED_EPOCH of the
-- ready time, minus the priority's worth of waiting. A tick per task entered by this call
-- keeps a batch (one NOW) in FIFO order. Scores stay exact (< 2^53) for centuries.
local AGED_EPOCH = 1700000000
local function aged_score(priority, ready_time)
  aged_tick = aged_tick + 1
  return math.floor((ready_time - AGED_EPOCH) * 1000000) + aged_tick
    - math.floor(priority * AGING * 1000000)
end

-- An entry of `index` whose record's status is not `expected`. When the record is indexed
-- where its status says, the entry is stale and only it is dropped (a finished task is
-- never run again); otherwise the status is damaged and the task is dead-lettered, so it
-- is never left in no index. Returns true when the entry was handled this way. `status`:
-- the record's, when the caller read it already (false: it has none).
local function misplaced(key, id, index, expected, status)
  if status == nil then status = redis.call('HGET', key, 'status') end
  if status == expected then return false end
  local home = DONE_KEY[status] or STATUS_INDEX[status]
  if home and (redis.call('ZSCORE', home, id)
      or (status == ST.PROCESSING and redis.call('ZSCORE', KEYS[11], id))) then
    redis.call('ZREM', index, id)
  else
    malformed(key, id, nil, 'its status does not match the index that holds it')
  end
  return true
end

-- A new place at the back of the task's priority band (ready now, or at `ready_time`), or
-- its kept place. Returns the new ticket in broker mode when the place is new.
local function enter_line(key, id, keep_place, ready_time)
  local score = keep_place and num(key, 'score')
  local ticket = nil
  if score then
    redis.call('HSET', key, 'status', ST.PENDING, 'updated_at', fmt(NOW))
  else
    local priority = num(key, 'priority') or 0
    score = -priority * PRIORITY_BAND + redis.call('INCR', KEYS[5])
    if AGING then score = aged_score(priority, ready_time or NOW) end
    redis.call('HSET', key, 'score', text(score), 'ready_at', fmt(NOW), 'status', ST.PENDING,
      'updated_at', fmt(NOW))
    if BROKER then
      ticket = bump_ticket(key)
      redis.call('ZADD', KEYS[12], NOW + GRACE, id)
    end
  end
  redis.call('ZADD', KEYS[1], text(score), id)
  return ticket
end

-- Wait until `due_at`, then enter the line in due order (`seq` breaks ties of equal times).
local function schedule(key, id, due_at)
  redis.call('ZADD', KEYS[2], due_at, id)
  redis.call('HSET', key, 'status', ST.SCHEDULED, 'scheduled_for', fmt(due_at),
    'seq', redis.call('INCR', KEYS[5]), 'updated_at', fmt(NOW))
  if BROKER then bump_ticket(key) end -- a copy still held or queued is stale now
end

local function expired_at(value)
  local expire_at = finite(value)
  return expire_at ~= nil and NOW > expire_at
end

local function expired(key)
  return expired_at(redis.call('HGET', key, 'expire_at'))
end

local function time_out(key, id, from)
  finish(key, id, from, ST.TIMEOUT)
  record(key, EV.TIMEOUT, num(key, 'attempts'), 'not started in time')
end

-- Due scheduled tasks enter the line in due order. Called before any new place is given
-- (a push, a counted nack, a re-drive, a claim), so a task that came due before another
-- task of its band got its place stands ahead of it: the due time decides, not the moment
-- a script happened to look. `promoted(key, id, ticket)`, when given, hears of each.
local function promote_due(limit, promoted)
  local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', fmt(NOW), 'WITHSCORES', 'LIMIT', '0',
    limit)
  local batch = {}
  for i = 1, #due, 2 do
    local id, key = due[i], KEYS[4] .. due[i]
    if not readable(key) then
      dead_unreadable(id, DR.MISSING, 'scheduled id has no task record')
    elseif misplaced(key, id, KEYS[2], ST.SCHEDULED) then
      -- dropped (stale) or dead-lettered: never promoted
    elseif damage(key) then
      malformed(key, id, ST.SCHEDULED, damage(key))
    else
      batch[#batch + 1] = {id, key, tonumber(due[i + 1]), num(key, 'seq') or 0}
    end
  end
  table.sort(batch, function(a, b)
    if a[3] ~= b[3] then return a[3] < b[3] end
    return a[4] < b[4]
  end)
  for _, entry in ipairs(batch) do
    local id, key = entry[1], entry[2]
    redis.call('ZREM', KEYS[2], id)
    local ticket = enter_line(key, id, false, entry[3])
    redis.call('HSET', key, 'ready_at', fmt(entry[3]))
    record(key, EV.DUE, num(key, 'attempts'))
    if promoted then promoted(key, id, ticket) end
  end
end

-- The lease-expiry rules: canceled if a cancel was asked, poison at max_deliveries, else
-- back in line at its place. Returns the status it ends in.
local function expire_lease(key, id, max_deliveries)
  local expiries = (num(key, 'expiries') or 0) + 1
  redis.call('HSET', key, 'expiries', text(expiries))
  redis.call('HDEL', key, 'token')
  if redis.call('HGET', key, 'cancel_requested') == '1' then
    dead_letter(key, id, ST.PROCESSING, nil, nil, ST.CANCELED, EV.CANCELED)
    return ST.CANCELED
  end
  if expiries >= max_deliveries then
    dead_letter(key, id, ST.PROCESSING, DR.POISON, cjson.encode({type = 'PoisonTask', message =
      'delivered ' .. (num(key, 'attempts') or 0) .. ' times without an ack (the lease ran out '
      .. 'each time)'}))
    return ST.FAILED
  end
  leave(id, ST.PROCESSING)
  enter_line(key, id, true)
  record(key, EV.LEASE_EXPIRED, num(key, 'attempts'))
  return ST.PENDING
end

local function reap_expired(max_deliveries)
  local expired_leases = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', fmt(NOW), 'LIMIT', '0',
    SCAN_LIMIT_TEXT)
  for _, id in ipairs(expired_leases) do
    local key = KEYS[4] .. id
    if not readable(key) then
      dead_unreadable(id, DR.MISSING, 'leased id has no task record')
    elseif not misplaced(key, id, KEYS[3], ST.PROCESSING) then
      expire_lease(key, id, max_deliveries)
    end
  end
end

-- Waiting tasks past their queue_timeout end as timeout (the sweep; claims check too).
local function sweep_expired(limit)
  local due = redis.call('ZRANGEBYSCORE', KEYS[13], '-inf', fmt(NOW), 'LIMIT', '0', limit)
  for _, id in ipairs(due) do
    local key = KEYS[4] .. id
    local status = readable(key) and redis.call('HGET', key, 'status')
    if status and WAITING[status] and expired(key) then
      time_out(key, id, status)
    else
      redis.call('ZREM', KEYS[13], id)
    end
  end
end

-- Every transition starts here: due tasks enter the line and expired waiting tasks time
-- out first, so whatever the transition does (a push, a nack, a claim, a cancel) sees the
-- state a reader already shows, on every backend alike. In broker mode only `due` promotes:
-- each task must be published as it becomes pending. Once per call: its clock does not
-- move, so a second look (a settle's claim) would find nothing new.
local function begin()
  if begun then return end
  begun = true
  if not BROKER then promote_due(PROMOTE_ALL) end
  sweep_expired(SCAN_LIMIT_TEXT)
end

-- Seconds until a scheduled task is due, a lease runs out or a waiting task expires; -1
-- when none of them exists.
local function wait_hint()
  local hint = -1
  local indexes = BROKER and {KEYS[2], KEYS[13]} or {KEYS[2], KEYS[3], KEYS[13]}
  for _, index in ipairs(indexes) do
    local first = redis.call('ZRANGE', index, 0, 0, 'WITHSCORES')
    if first[2] then
      local left = math.max(tonumber(first[2]) - NOW, 0)
      if hint < 0 or left < hint then hint = left end
    end
  end
  return hint
end

-- What a claim reads of the head of the line, in one call instead of seven: what damage_of
-- checks (1-5), the timeout (6), the concurrency key (7), and the reply's fields but the
-- priority (8-14), which taking the task does not change.
local HEAD_FIELDS = {'priority', 'attempts', 'expiries', 'status', 'ticket', 'expire_at',
  'concurrency_key', 'data', 'type', 'max_retries', 'retry_backoff', 'process_timeout',
  'created_at', 'steps'}

-- Hand a task to a consumer: processing, attempts + 1, a fencing token, and a lease (or, for
-- a pull, the pulled index: consumed, never redelivered, forgotten after result_ttl unless
-- settled). Its queue_timeout no longer applies. Returns the new attempt count. `known`:
-- the record as a claim read it (HEAD_FIELDS), or nil: then its first six are read here.
local function take(key, id, token, lease, consumer, event, known)
  known = known or redis.call('HMGET', key, unpack(HEAD_FIELDS, 1, 6))
  local attempts = (finite(known[2]) or 0) + 1
  redis.call('HSET', key, 'status', ST.PROCESSING, 'token', token, 'attempts', text(attempts),
    'started_at', fmt(NOW), 'updated_at', fmt(NOW), 'worker', consumer)
  if known[6] then -- it had a queue_timeout
    redis.call('HDEL', key, 'expire_at')
    redis.call('ZREM', KEYS[13], id)
  end
  if lease then
    redis.call('ZADD', KEYS[3], NOW + lease, id)
  else
    redis.call('ZADD', KEYS[11], fmt(NOW), id)
    if TTL > 0 then
      redis.call('EXPIRE', key, text(math.ceil(TTL)))
      redis.call('ZREMRANGEBYSCORE', KEYS[11], '-inf', NOW - TTL)
    end
  end
  record(key, event or (lease and EV.STARTED or EV.PULLED), attempts)
  return attempts
end

-- The 11 reply values of one claimed task: id, token, attempts, priority, then the seven
-- fields from data to steps, which are `f`'s from index `from` (a claim's HEAD_FIELDS
-- read, or read here).
local function claimed_reply(out, key, id, token, attempts, f, from)
  if not f then
    f, from = redis.call('HMGET', key, unpack(HEAD_FIELDS, 1, 14)), 8
  end
  out[#out + 1] = id
  out[#out + 1] = token
  out[#out + 1] = attempts
  out[#out + 1] = f[1] or ''
  for i = from, from + 6 do out[#out + 1] = f[i] or '' end
end


-- A claim spec is 8 + count values at ARGV[i]: lease ('' = pull), max_deliveries, consumer,
-- min_priority ('' = any), ticket id ('' = the most urgent task), ticket number, ticket copy,
-- '1' if redelivered, then `count` values: one fresh fencing token per task to claim.
local function read_spec(i, count)
  local tokens = {}
  for j = 1, count do tokens[j] = ARGV[i + 7 + j] end
  return {lease = tonumber(ARGV[i]), max_deliveries = tonumber(ARGV[i + 1]),
    consumer = ARGV[i + 2], min_priority = tonumber(ARGV[i + 3]), ticket_id = ARGV[i + 4],
    ticket = ARGV[i + 5], copy = ARGV[i + 6], redelivered = ARGV[i + 7] == '1', tokens = tokens}
end

-- Claim the task a delivered message names (broker mode). Returns the reply described in
-- claim(), claiming one task or none with unclaimed 'drop' or 'missing'.
local function claim_ticket(spec)
  local id = spec.ticket_id
  local key = KEYS[4] .. id
  if not readable(key) then
    -- Not a hash (or gone) while the line or the leases still hold it: retire the entry,
    -- else it would stay there with no message left to name it.
    if redis.call('TYPE', key).ok ~= 'none' then
      dead_unreadable(id, DR.MALFORMED, 'the task record is not a hash')
    elseif redis.call('ZSCORE', KEYS[1], id) or redis.call('ZSCORE', KEYS[3], id) then
      dead_unreadable(id, DR.MISSING, 'a delivered id has no task record')
    end
    return {'-1', 'missing', '0'}
  end
  -- Damage first: a damaged ticket matches no message, so the task would wait forever.
  local problem = damage(key)
  local status = redis.call('HGET', key, 'status')
  if problem then
    if not FINISHED[status] then malformed(key, id, status, problem) end
    return {'-1', 'drop', '0'}
  end
  if string.format('%d', num(key, 'ticket') or 0) ~= spec.ticket then
    return {'-1', 'drop', '0'}
  end
  local event = spec.lease and EV.STARTED or EV.PULLED
  if status == ST.PROCESSING then
    -- Only the copy it was claimed with, redelivered, means its holder's connection died.
    if not spec.redelivered or redis.call('HGET', key, 'copy') ~= spec.copy
        or not redis.call('ZSCORE', KEYS[3], id) then
      return {'-1', 'drop', '0'}
    end
    if expire_lease(key, id, spec.max_deliveries) ~= ST.PENDING then return {'-1', 'drop', '0'} end
    event = EV.REDELIVERED
  elseif status == ST.PENDING then
    if expired(key) then
      time_out(key, id, status)
      return {'-1', 'drop', '0'}
    end
  else
    return {'-1', 'drop', '0'}
  end
  leave(id, ST.PENDING)
  redis.call('HSET', key, 'copy', spec.copy)
  local out = {'-1', '', '0'}
  claimed_reply(out, key, id, spec.tokens[1], take(key, id, spec.tokens[1], spec.lease,
    spec.consumer, event))
  return out
end

-- Is the task's concurrency key full (no slot for it now)? Changes nothing but stale members.
local function keyed_full(key)
  local name = keyed(key)
  if not name then return false end
  local running, smallest = keyed_running(name)
  local limit = tonumber(redis.call('HGET', key, 'max_concurrency'))
  if smallest and (not limit or smallest < limit) then limit = smallest end
  return limit ~= nil and running >= limit
end

-- A keyed task was taken (a claim, a preemption's claim): it holds a slot of its key.
-- `name`: its key when the caller read it already (false: it has none).
local function keyed_taken(key, id, name)
  if name == nil then name = keyed(key) end
  if name then redis.call('SADD', K_KEYRUN .. name, id) end
end

-- May the pending task at the head run now? If its key is full, park it (false). If it may
-- and its key keeps room after it, re-admit the key's next parked task too (a raised or
-- mixed limit never strands one). Also returns the task's key (false: none).
local function keyed_admit(key, id, name)
  if not name then return true, false end
  local running, smallest = keyed_running(name)
  local limit = tonumber(redis.call('HGET', key, 'max_concurrency'))
  if smallest and (not limit or smallest < limit) then limit = smallest end
  if not limit then return true, name end
  if running >= limit then
    local score = redis.call('ZSCORE', KEYS[1], id)
    redis.call('ZREM', KEYS[1], id)
    redis.call('ZADD', K_PARKED, score, id)
    redis.call('ZADD', K_PARKED .. ':' .. name, score, id)
    redis.call('HSET', key, 'updated_at', fmt(NOW))
    record(key, EV.PARKED, num(key, 'attempts'))
    return false
  end
  if running + 1 < limit then keyed_readmit(name) end
  return true, name
end

-- The claim: {wait_hint, unclaimed, skipped ('1': entries were retired and the claim
-- stopped early), then 11 values per claimed task: id, token, attempts, priority, data,
-- type, max_retries, retry_backoff, process_timeout, created_at, steps}.
local function claim(spec)
  if spec.ticket_id ~= '' then return claim_ticket(spec) end
  begin()
  if not BROKER then reap_expired(spec.max_deliveries) end
  local out, taken, retired = {'', '', '0'}, 0, 0
  while taken < #spec.tokens and retired < SCAN_LIMIT do
    local head = redis.call('ZRANGE', KEYS[1], '0', '0')
    if not head[1] then break end
    local id, key = head[1], KEYS[4] .. head[1]
    local f = readable(key) and redis.call('HMGET', key, unpack(HEAD_FIELDS))
    if not f then
      dead_unreadable(id, DR.MISSING, 'pending id has no task record')
      retired = retired + 1
    elseif misplaced(key, id, KEYS[1], ST.PENDING, f[4]) then
      retired = retired + 1
    elseif damage_of(f) then
      malformed(key, id, ST.PENDING, damage_of(f))
      retired = retired + 1
    elseif expired_at(f[6]) then
      time_out(key, id, ST.PENDING)
      retired = retired + 1
    elseif spec.min_priority and tonumber(f[1]) < spec.min_priority then
      break
    else
      local admitted, name = keyed_admit(key, id, key_name(f[7]))
      if not admitted then
        retired = retired + 1 -- parked: its key is full; the claim goes on
      else
        redis.call('ZREM', KEYS[1], id)
        taken = taken + 1
        local token = spec.tokens[taken]
        claimed_reply(out, key, id, token,
          take(key, id, token, spec.lease, spec.consumer, nil, f), f, 8)
        keyed_taken(key, id, name)
      end
    end
  end
  if redis.call('ZCARD', KEYS[1]) == 0 then
    redis.call('DEL', KEYS[6]) -- nothing ready: stale wake-up markers would only spin waiters
  end
  if retired >= SCAN_LIMIT then out[3] = '1' end
  if taken == 0 then out[1] = fmt(wait_hint()) end
  return out
end

-- Give a held task back: canceled if a cancel was asked while it ran; else scheduled after
-- `delay`, or pending now. A counted try goes to the back of its band; a hand-back keeps its
-- place and returns the attempt. Returns the new status and, in broker mode, a new ticket.
local function give_back(key, id, delay, counted, error_json)
  leave(id, ST.PROCESSING)
  redis.call('PERSIST', key)
  redis.call('HDEL', key, 'token')
  if error_json and error_json ~= '' then redis.call('HSET', key, 'error', error_json) end
  if redis.call('HGET', key, 'cancel_requested') == '1' then
    dead_letter(key, id, ST.PROCESSING, nil, nil, ST.CANCELED, EV.CANCELED)
    return ST.CANCELED
  end
  local attempts = num(key, 'attempts') or 0
  if not counted then
    attempts = math.max(attempts - 1, 0)
    redis.call('HSET', key, 'attempts', text(attempts))
  end
  local event = counted and EV.RETRYING or EV.INTERRUPTED
  if delay > 0 then
    schedule(key, id, NOW + delay)
    record(key, event, attempts)
    return ST.SCHEDULED
  end
  local ticket = enter_line(key, id, not counted)
  record(key, event, attempts)
  return ST.PENDING, ticket
end

local OPTIONAL_FIELDS = {'type', 'max_retries', 'retry_backoff', 'queue_timeout',
  'process_timeout', 'concurrency_key', 'max_concurrency'}
local OPTIONAL_AT = {3, 5, 6, 7, 8, 9, 10} -- each one's place after ARGV[i]

-- Store one new task from the 12 values at ARGV[i] (id, priority, data, type, delay,
-- max_retries, retry_backoff, queue_timeout, process_timeout, concurrency_key,
-- max_concurrency, unique ('1': refused while any record of the id exists); '' = not set). A live id is
-- left alone; a finished one is replaced by a fresh record.
-- Returns 'live' (refused), 'scheduled' or 'pending', and the ticket (broker mode).
local function store_task(i)
  local id, delay = ARGV[i], tonumber(ARGV[i + 4]) or 0
  local key = KEYS[4] .. id
  local kind = redis.call('TYPE', key).ok
  local old = kind == 'hash' and redis.call('HGET', key, 'status')
  if old and LIVE[old] then return 'live' end
  if ARGV[i + 11] == '1' and kind ~= 'none' then return 'live' end -- once
  local ticket = kind == 'hash' and num(key, 'ticket') or 0
  if old and DONE_KEY[old] then redis.call('ZREM', DONE_KEY[old], id) end
  if kind ~= 'none' then redis.call('DEL', key) end
  local fields = {'id', id, 'queue', QUEUE, 'priority', ARGV[i + 1], 'data', ARGV[i + 2],
    'attempts', '0', 'expiries', '0', 'created_at', fmt(NOW), 'updated_at', fmt(NOW),
    'progress', '0', 'ticket', text(ticket)}
  for j, field in ipairs(OPTIONAL_FIELDS) do -- in one HSET with the rest: one call per task
    local value = ARGV[i + OPTIONAL_AT[j]]
    if value ~= '' then
      fields[#fields + 1] = field
      fields[#fields + 1] = value
    end
  end
  redis.call('HSET', key, unpack(fields))
  local queue_timeout = tonumber(ARGV[i + 7])
  if queue_timeout then
    local expire_at = NOW + math.max(delay, 0) + queue_timeout
    redis.call('HSET', key, 'expire_at', fmt(expire_at))
    redis.call('ZADD', KEYS[13], expire_at, id)
  end
  if delay > 0 then
    schedule(key, id, NOW + delay)
    record(key, EV.SCHEDULED, 0)
    return 'scheduled'
  end
  local new_ticket = enter_line(key, id, false)
  record(key, EV.PUSHED, 0)
  return 'pending', new_ticket
end

-- The fencing check: the task is processing and the token is the current one. Returns the
-- record's status, token, attempts and concurrency key (HELD_FIELDS) when it is held.
local HELD_FIELDS = {'status', 'token', 'attempts', 'concurrency_key'}
local function held_record(key, token)
  if not readable(key) then return nil end
  local f = redis.call('HMGET', key, unpack(HELD_FIELDS))
  if f[1] == ST.PROCESSING and f[2] == token then return f end
  return nil
end

local function held(key, token)
  return held_record(key, token) ~= nil
end

-- The task a preemption would claim: the head of the line (or, broker mode, the ticket's
-- task), if it is pending, readable, not timed out and of at least `min_priority` (declared).
-- Returns its id and key, or nil.
local function urgent_task(spec, min_priority)
  local id = spec.ticket_id
  if id == '' then
    id = redis.call('ZRANGE', KEYS[1], 0, 0)[1]
    if not id then return nil end
  end
  local key = KEYS[4] .. id
  if not readable(key) or damage(key) or expired(key) then return nil end
  if redis.call('HGET', key, 'status') ~= ST.PENDING then return nil end
  if spec.ticket_id ~= '' and tostring(num(key, 'ticket') or 0) ~= spec.ticket then return nil end
  if num(key, 'priority') < min_priority then return nil end
  if keyed_full(key) then return nil end -- its concurrency key is full: yield for nothing
  return id, key
end

-- Yield a running task at a step boundary: back at its kept place with its checkpoint, the
-- attempt returned, preemptions + 1, history 'preempted by <urgent id>'.
local function yield_task(key, id, steps, urgent_id)
  leave(id, ST.PROCESSING)
  redis.call('PERSIST', key)
  redis.call('HDEL', key, 'token')
  if steps ~= '' then redis.call('HSET', key, 'steps', steps) end
  local attempts = math.max((num(key, 'attempts') or 0) - 1, 0)
  redis.call('HSET', key, 'attempts', attempts, 'preemptions', (num(key, 'preemptions') or 0) + 1)
  enter_line(key, id, true)
  record(key, EV.PREEMPTED, attempts, 'preempted by ' .. urgent_id)
  redis.call('INCR', K_PREEMPTIONS)
  -- (per-key limits: leave() above freed the yielded task's key slot in this script)
end
