-- ack: finish a held task as success; optionally claim the next task in the same call.
-- KEYS: the common layout (see _common.lua).
-- ARGV[1] queue name, ARGV[2] result_ttl (s), ARGV[3] id, ARGV[4] token, ARGV[5] result
-- JSON ('' = none), ARGV[6] '1' to claim next, ARGV[7] lease seconds, ARGV[8]
-- max_deliveries, ARGV[9] the next claim's token, ARGV[10] the consumer's id.
-- Returns {acked (0/1), claim result or nothing}: see claim.lua for the claim result.
-- @include _common.lua

local id, token, key = ARGV[3], ARGV[4], KEYS[4] .. ARGV[3]
local acked = 0
if readable(key) and held(key, token) then
  redis.call('ZREM', KEYS[3], id)
  if ARGV[5] ~= '' then redis.call('HSET', key, 'result', ARGV[5]) end
  redis.call('HSET', key, 'progress', 1)
  redis.call('HDEL', key, 'progress_message') -- an earlier step's note would mislead
  finish(key, id, 'success', tonumber(ARGV[2]))
  append_event(key, 'succeeded', redis.call('HGET', key, 'attempts'))
  acked = 1
end
if ARGV[6] == '1' then
  return {acked, claim(ARGV[1], tonumber(ARGV[7]), tonumber(ARGV[8]), ARGV[9], tonumber(ARGV[2]),
    ARGV[10])}
end
return {acked}
