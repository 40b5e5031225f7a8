-- nack: give a held task back, ready again after a delay.
-- KEYS: the common layout (see _common.lua).
-- ARGV[1] queue name, ARGV[2] result_ttl, ARGV[3] id, ARGV[4] token, ARGV[5] delay (s),
-- ARGV[6] error JSON ('' = none), ARGV[7] '1' counts the delivery as an attempt, '0' gives
-- it back (a shutdown hand-back: the task keeps its place in line).
-- Returns 1, or 0 when the lease is not held (expired and given to someone else).
-- @include _common.lua

local id, token, key = ARGV[3], ARGV[4], KEYS[4] .. ARGV[3]
if not (readable(key) and held(key, token)) then return 0 end
local outcome = give_back(key, id, tonumber(ARGV[5]) or 0, ARGV[7] == '1', ARGV[6],
  tonumber(ARGV[2]))
if outcome == 'pending' then wake() end
return 1
