-- head: the task at the head of the line: {id, priority, ready_at}, or {} when none is ready.
-- A read (no transition): one ZRANGE and one HMGET, for a busy worker's preemption check.
-- @include _lifecycle.lua

local id = redis.call('ZRANGE', KEYS[1], 0, 0)[1]
if not id then return {} end
local f = redis.call('HMGET', KEYS[4] .. id, 'priority', 'ready_at')
return {id, f[1] or '', f[2] or ''}
