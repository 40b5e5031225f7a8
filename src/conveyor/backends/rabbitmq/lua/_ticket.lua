-- Shared by claim_ticket.lua and ack_claim.lua (after _common.lua): the ticket claim.
-- ARGV-free: the caller passes the values. Returns the reply described in claim_ticket.lua.

local function claim_ticket(queue, ttl, id, number, copy, redelivered, lease, max_deliveries,
    token, consumer)
  local key = KEYS[4] .. id
  if not readable(key) then return {0, 'missing'} end
  local f = redis.call('HMGET', key, 'status', 'ticket', 'queue_timeout', 'ready_at', 'copy')
  if f[2] ~= number then return {0} end
  local status, event = f[1], lease and 'reserved' or 'pulled'
  if status == 'processing' then
    -- The holder's channel closed and the broker gave its copy back; any other copy, or a
    -- pulled (consumed) task, is a duplicate.
    if not redelivered or f[5] ~= copy or not redis.call('ZSCORE', KEYS[3], id) then
      return {0}
    end
    local expiries = redis.call('HINCRBY', key, 'expiries', 1)
    redis.call('ZREM', KEYS[3], id)
    redis.call('HDEL', key, 'token')
    if cancel_if_asked(key, id, ttl) then return {0} end
    if expiries >= max_deliveries then
      dead_letter(key, id, 'poison', cjson.encode({type = 'PoisonTask', message = 'delivered '
        .. redis.call('HGET', key, 'attempts')
        .. ' times without an ack (its consumer\'s connection closed each time)'}))
      return {0}
    end
    event = 'redelivered'
  elseif status == 'pending' or status == 'scheduled' then
    local queue_timeout, ready_at = tonumber(f[3]), tonumber(f[4])
    redis.call('ZREM', KEYS[1], id)
    redis.call('ZREM', KEYS[2], id)
    if queue_timeout and ready_at and NOW > ready_at + queue_timeout then
      redis.call('ZREM', KEYS[12], id)
      finish(key, id, 'timeout', ttl)
      append_event(key, 'timeout', redis.call('HGET', key, 'attempts'), 'not started in time')
      return {0}
    end
  else
    return {0}
  end
  redis.call('ZREM', KEYS[12], id)
  redis.call('HSET', key, 'copy', copy)
  local attempts = take(key, id, token, lease, consumer, ttl, event)
  local c = redis.call('HMGET', key, unpack(CLAIMED_FIELDS))
  return {1, token, attempts, c[1] or '', c[2] or '', c[3] or '', c[4] or '', c[5] or '',
    c[6] or '', c[7] or '', c[8] or ''}
end
