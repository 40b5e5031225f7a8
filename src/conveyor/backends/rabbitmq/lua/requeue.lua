-- requeue: nack of a RabbitMQ-delivered task (the Redis backend's nack plus the ticket rule).
-- KEYS: the common layout plus KEYS[12] conveyor:{q}:publishing (see stage.lua).
-- ARGV[1] queue name, ARGV[2] result_ttl, ARGV[3] id, ARGV[4] token, ARGV[5] delay (s),
-- ARGV[6] error JSON ('' = none), ARGV[7] '1' counts the delivery as an attempt, '0' gives
-- it back (a shutdown hand-back).
-- Returns -1 when the token is not the holder's (nothing changed), 1 when the held message
-- goes back to the queue as it is (no delay), 0 when it is to be acked: delayed (the ticket
-- is bumped, so the held copy is stale even if its ack is lost; a new one is published when
-- due) or canceled (a cancel was asked while it ran).
-- @include _common.lua

local id, token, key = ARGV[3], ARGV[4], KEYS[4] .. ARGV[3]
if not (readable(key) and held(key, token)) then return -1 end
local outcome = give_back(key, id, tonumber(ARGV[5]) or 0, ARGV[7] == '1', ARGV[6],
  tonumber(ARGV[2]))
if outcome == 'scheduled' then
  redis.call('HINCRBY', key, 'ticket', 1) -- the held copy is stale even if its ack is lost
end
return outcome == 'pending' and 1 or 0
