-- cancel: a scheduled or pending task becomes canceled at once; a processing one is
-- flagged so its worker stops between steps.
-- KEYS: the common layout (see _common.lua).
-- ARGV[1] queue name, ARGV[2] result_ttl, ARGV[3] id.
-- Returns 1 when canceled or flagged, 0 when finished or unknown.
-- @include _common.lua

local id, key = ARGV[3], KEYS[4] .. ARGV[3]
if not readable(key) then return 0 end
local status = redis.call('HGET', key, 'status')
if status == 'processing' then
  redis.call('HSET', key, 'cancel_requested', 1, 'updated_at', fmt(NOW))
  append_event(key, 'cancel_requested', redis.call('HGET', key, 'attempts'))
  return 1
end
if status ~= 'pending' and status ~= 'scheduled' then return 0 end
redis.call('ZREM', KEYS[1], id)
redis.call('ZREM', KEYS[2], id)
finish(key, id, 'canceled', tonumber(ARGV[2]))
append_event(key, 'canceled', redis.call('HGET', key, 'attempts'))
return 1
