-- due: claim the publication of due scheduled tasks and of tickets whose publisher died.
-- KEYS: the common layout plus KEYS[12] conveyor:{q}:publishing (see stage.lua).
-- ARGV[1] queue name, ARGV[2] result_ttl, ARGV[3] limit per kind, ARGV[4] publish grace (s).
-- A due scheduled task becomes pending with a new ticket; a pending task past its publish
-- deadline is handed out again with the same ticket (a copy that did land keeps its place
-- in line, and whichever copy comes second is dropped as a duplicate).
-- Returns {seconds until the next scheduled task is due or -1, id, ticket, priority, ...}.
-- @include _common.lua

local queue, limit, grace = ARGV[1], tonumber(ARGV[3]), tonumber(ARGV[4])
local out = {''}
local function hand_out(key, id, ticket)
  redis.call('ZADD', KEYS[12], NOW + grace, id)
  out[#out + 1] = id
  out[#out + 1] = ticket
  out[#out + 1] = redis.call('HGET', key, 'priority')
end

promote_due(queue, limit, function(key, id)
  hand_out(key, id, redis.call('HINCRBY', key, 'ticket', 1))
end)

local late = redis.call('ZRANGEBYSCORE', KEYS[12], '-inf', NOW, 'LIMIT', 0, limit)
for _, id in ipairs(late) do
  local key = KEYS[4] .. id
  if readable(key) and redis.call('HGET', key, 'status') == 'pending' then
    append_event(key, 'republished', redis.call('HGET', key, 'attempts'))
    hand_out(key, id, tonumber(redis.call('HGET', key, 'ticket')) or 0)
  else
    redis.call('ZREM', KEYS[12], id) -- claimed, canceled or gone: nothing to publish
  end
end

local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
out[1] = first[2] and fmt(math.max(tonumber(first[2]) - NOW, 0)) or '-1'
return out
