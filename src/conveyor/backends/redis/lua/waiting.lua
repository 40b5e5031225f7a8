-- waiting: ready tasks per priority band, most urgent first, without a scan: the head of
-- each band (its longest-waiting task) and ZCOUNT of the band, one jump per priority in use.
-- Returns {priority, count, ready_at, ...}, or {'aged'} when the line is ordered by aged
-- scores (aging on: no bands; the caller samples instead). A read: no transition.
-- @include _lifecycle.lua

local out = {}
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if not first[1] then return out end
if tonumber(first[2]) >= PRIORITY_BAND then return {'aged'} end
local cursor = '-inf'
for _ = 1, 256 do
  local head = redis.call('ZRANGEBYSCORE', KEYS[1], cursor, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
  if not head[1] then break end
  local score = tonumber(head[2])
  if score >= PRIORITY_BAND then break end -- aged entries after the banded ones
  -- score = -priority * BAND + seq with 1 <= seq < BAND
  local priority = math.ceil(-score / PRIORITY_BAND)
  if priority == 0 then priority = 0 end -- no '-0'
  local hi = string.format('%.0f', -(priority - 1) * PRIORITY_BAND)
  local lo = string.format('%.0f', -priority * PRIORITY_BAND)
  local count = redis.call('ZCOUNT', KEYS[1], '(' .. lo, '(' .. hi)
  out[#out + 1] = priority
  out[#out + 1] = count
  local key = KEYS[4] .. head[1] -- damage (not a hash) must not fail a read
  out[#out + 1] = readable(key) and redis.call('HGET', key, 'ready_at') or ''
  cursor = '(' .. hi
end
return out
