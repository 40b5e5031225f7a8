-- ack_claim: finish a held task as success and claim the next delivered ticket, in one call
-- (a worker's ack_and_reserve: one round trip to the store per task).
-- KEYS: the common layout plus KEYS[12] conveyor:{q}:publishing (see stage.lua).
-- ARGV[1] queue name, ARGV[2] result_ttl (s), ARGV[3] id, ARGV[4] token, ARGV[5] result JSON
-- ('' = none), then the next claim as in claim_ticket.lua: ARGV[6] id, ARGV[7] ticket number,
-- ARGV[8] copy id, ARGV[9] '1' if redelivered, ARGV[10] lease seconds, ARGV[11]
-- max_deliveries, ARGV[12] the new fencing token, ARGV[13] the consumer's id.
-- Returns {acked (0/1), the claim_ticket reply}.
-- @include _common.lua
-- @include _ticket.lua

local id, token, key = ARGV[3], ARGV[4], KEYS[4] .. ARGV[3]
local acked = 0
if readable(key) and held(key, token) then
  redis.call('ZREM', KEYS[3], id)
  if ARGV[5] ~= '' then redis.call('HSET', key, 'result', ARGV[5]) end
  redis.call('HSET', key, 'progress', 1)
  redis.call('HDEL', key, 'progress_message')
  finish(key, id, 'success', tonumber(ARGV[2]))
  append_event(key, 'succeeded', redis.call('HGET', key, 'attempts'))
  acked = 1
end
return {acked, claim_ticket(ARGV[1], tonumber(ARGV[2]), ARGV[6], ARGV[7], ARGV[8],
  ARGV[9] == '1', tonumber(ARGV[10]), tonumber(ARGV[11]), ARGV[12], ARGV[13])}
