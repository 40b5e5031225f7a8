-- preempt: yield a running task at a step boundary and claim the urgent one, in one call
-- (the lifecycle's PREEMPT rows). ARGV[A] id, token, steps JSON ('' = keep), min_priority,
-- max_preemptions, then a claim spec for one task (see read_spec in _lifecycle.lua).
-- Returns {status ('' = refused: nothing changed), the claim reply when it yielded}.
-- @include _lifecycle.lua

local id, token, steps = ARGV[A], ARGV[A + 1], ARGV[A + 2]
local min_priority, max_preemptions = tonumber(ARGV[A + 3]), tonumber(ARGV[A + 4])
local spec = read_spec(A + 5, 1)
begin()
local key = KEYS[4] .. id
if not held(key, token) or redis.call('HGET', key, 'cancel_requested') == '1' then
  return {''}
end
if (num(key, 'preemptions') or 0) >= max_preemptions then return {''} end
local urgent_id, urgent_key = urgent_task(spec, min_priority)
if not urgent_id then return {''} end
yield_task(key, id, steps, urgent_id)
leave(urgent_id, ST.PENDING)
if spec.ticket_id ~= '' then redis.call('HSET', urgent_key, 'copy', spec.copy) end
local out = {'-1', '', '0'}
local event = spec.lease and EV.STARTED or EV.PULLED
claimed_reply(out, urgent_key, urgent_id, spec.tokens[1],
  take(urgent_key, urgent_id, spec.tokens[1], spec.lease, spec.consumer, event))
keyed_taken(urgent_key, urgent_id)
wake() -- the yielded task is ready again: a waiting consumer may take it
return {ST.PENDING, out}
