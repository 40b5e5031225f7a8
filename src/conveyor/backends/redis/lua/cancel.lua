-- cancel: a scheduled or pending task becomes canceled at once; a processing one is
-- flagged so its worker stops between steps.
-- ARGV[A] id.
-- Returns 1 when canceled or flagged, 0 when finished or unknown.
-- @include _lifecycle.lua

begin()
local id, key = ARGV[A], KEYS[4] .. ARGV[A]
if not readable(key) then return 0 end
local status = redis.call('HGET', key, 'status')
if status == ST.PROCESSING then
  redis.call('HSET', key, 'cancel_requested', 1, 'updated_at', fmt(NOW))
  record(key, EV.CANCEL_REQUESTED, num(key, 'attempts'))
  return 1
end
if not WAITING[status] then return 0 end
finish(key, id, status, ST.CANCELED)
record(key, EV.CANCELED, num(key, 'attempts'))
return 1
