-- claim: promote due tasks, reap expired leases, time out expired waiting tasks, then take
-- the most urgent ready task(s), or the task a delivered ticket names (broker mode).
-- ARGV[A...] a claim spec (see read_spec in _lifecycle.lua).
-- Returns the reply of claim() in _lifecycle.lua.
-- @include _lifecycle.lua

return claim(read_spec(A, #ARGV - A - 7))
