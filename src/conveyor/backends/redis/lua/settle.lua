-- settle: apply outcomes of held tasks in order, then optionally claim, in one call.
-- ARGV[A] the number N of outcomes, then 7 values per outcome: op (ack, nack, hand_back,
-- fail, checkpoint, progress), id, token ('' = fail whatever the state), payload (result,
-- error, steps JSON or progress message; '' = none), delay (s), reason (fail), extra (fail:
-- the final status, failed or canceled; progress: the fraction). Then, optionally, a claim
-- spec (see read_spec in _lifecycle.lua).
-- Returns {{status, ticket} per outcome ('' status: refused, the token is not the holder's),
-- the claim reply or nothing}.
-- @include _lifecycle.lua

local n = tonumber(ARGV[A])
begin()
local settled, woke = {}, false
for j = 0, n - 1 do
  local i = A + 1 + j * 7
  local op, id, token, payload = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local key = KEYS[4] .. id
  local status, ticket = '', ''
  if op == OP.FAIL and token == '' then
    if readable(key) then
      local final = ARGV[i + 6]
      dead_letter(key, id, redis.call('HGET', key, 'status'), ARGV[i + 5], payload, final,
        fail_event(final, ARGV[i + 5]))
      status = final
    end
  else
    local f = held_record(key, token)
    if not f then
      -- refused: not the holder's token (or not processing)
    elseif op == OP.ACK then
      local fields = payload ~= '' and {'result', payload, 'progress', '1'} or {'progress', '1'}
      -- an earlier step's progress note would mislead
      finish(key, id, ST.PROCESSING, ST.SUCCESS, 'progress_message', key_name(f[4]) or false,
        fields)
      record(key, EV.SUCCEEDED, finite(f[3]))
      status = ST.SUCCESS
    elseif op == OP.NACK or op == OP.HAND_BACK then
      local new_ticket
      status, new_ticket = give_back(key, id, tonumber(ARGV[i + 4]) or 0, op == OP.NACK, payload)
      ticket = new_ticket or ''
      woke = woke or status == ST.PENDING
    elseif op == OP.FAIL then
      local final = ARGV[i + 6]
      dead_letter(key, id, ST.PROCESSING, ARGV[i + 5], payload, final, fail_event(final,
        ARGV[i + 5]))
      status = final
    elseif op == OP.CHECKPOINT then
      redis.call('HSET', key, 'steps', payload, 'updated_at', fmt(NOW))
      record(key, EV.CHECKPOINT, num(key, 'attempts'))
      status = ST.PROCESSING
    elseif op == OP.PROGRESS then
      redis.call('HSET', key, 'progress', ARGV[i + 6], 'updated_at', fmt(NOW))
      if payload ~= '' then
        redis.call('HSET', key, 'progress_message', payload)
      else
        redis.call('HDEL', key, 'progress_message')
      end
      record(key, EV.PROGRESS, num(key, 'attempts'))
      status = ST.PROCESSING
    end
  end
  settled[#settled + 1] = status
  settled[#settled + 1] = ticket
end
if woke then wake() end
local rest = A + 1 + n * 7
if #ARGV >= rest + 8 then
  return {settled, claim(read_spec(rest, #ARGV - rest - 7))}
end
return {settled}
