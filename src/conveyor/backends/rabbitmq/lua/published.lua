-- published: the broker confirmed these tickets; their publish deadlines are cleared.
-- KEYS: the common layout plus KEYS[12] conveyor:{q}:publishing (see stage.lua).
-- ARGV[1] queue name, ARGV[2] result_ttl (unused), then pairs: id, ticket number.
-- Returns the number of deadlines cleared (a ticket already replaced is left alone).
-- @include _common.lua

local cleared = 0
for i = 3, #ARGV, 2 do
  local key = KEYS[4] .. ARGV[i]
  if readable(key) and redis.call('HGET', key, 'ticket') == ARGV[i + 1] then
    cleared = cleared + redis.call('ZREM', KEYS[12], ARGV[i])
  end
end
return cleared
