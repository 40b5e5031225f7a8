-- due (broker mode): claim the publication of due scheduled tasks and of tickets whose
-- publisher died.
-- ARGV[A] the most tasks to hand out per kind.
-- A due scheduled task becomes pending with a new ticket; a pending task past its publish
-- deadline is handed out again with the same ticket (a copy that did land keeps its place,
-- and whichever copy comes second is dropped as a duplicate).
-- Returns {seconds until the next scheduled task is due or -1, then id, ticket, priority
-- for each task to publish}.
-- @include _lifecycle.lua

local limit = tonumber(ARGV[A])
local out = {''}
local function hand_out(key, id, ticket)
  out[#out + 1] = id
  out[#out + 1] = ticket
  out[#out + 1] = redis.call('HGET', key, 'priority')
end

promote_due(limit, hand_out)
sweep_expired(limit)
local late = redis.call('ZRANGEBYSCORE', KEYS[12], '-inf', NOW, 'LIMIT', 0, limit)
for _, id in ipairs(late) do
  local key = KEYS[4] .. id
  if readable(key) and redis.call('HGET', key, 'status') == ST.PENDING then
    redis.call('ZADD', KEYS[12], NOW + GRACE, id)
    record(key, EV.REPUBLISHED, num(key, 'attempts'))
    hand_out(key, id, num(key, 'ticket') or 0)
  else
    redis.call('ZREM', KEYS[12], id) -- claimed, canceled or gone: nothing to publish
  end
end
local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
out[1] = first[2] and fmt(math.max(tonumber(first[2]) - NOW, 0)) or '-1'
return out
