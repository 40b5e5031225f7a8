-- fail: dead-letter a task (status failed, with a reason), kept until purged or retried.
-- KEYS: the common layout (see _common.lua).
-- ARGV[1] queue name, ARGV[2] result_ttl, ARGV[3] id, ARGV[4] token ('' = whatever its
-- state: for malformed entries and operators), ARGV[5] reason, ARGV[6] error JSON or '',
-- ARGV[7] the final status: 'failed' (dead-letter) or 'canceled'.
-- Returns 1, or 0 when a token was given and is not the holder's, or the task is unknown.
-- @include _common.lua

local id, token, key = ARGV[3], ARGV[4], KEYS[4] .. ARGV[3]
if not readable(key) then return 0 end
if token ~= '' and not held(key, token) then return 0 end
dead_letter(key, id, ARGV[5], ARGV[6], ARGV[7], tonumber(ARGV[2]), ARGV[7])
return 1
