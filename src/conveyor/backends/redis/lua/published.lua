-- published (broker mode): the broker confirmed these tickets; their deadlines are cleared.
-- ARGV[A...] pairs: id, ticket number.
-- Returns the number of deadlines cleared (a ticket already replaced is left alone).
-- @include _lifecycle.lua

local cleared = 0
for i = A, #ARGV, 2 do
  local key = KEYS[4] .. ARGV[i]
  if readable(key) and tostring(num(key, 'ticket') or 0) == ARGV[i + 1] then
    cleared = cleared + redis.call('ZREM', KEYS[12], ARGV[i])
  end
end
return cleared
