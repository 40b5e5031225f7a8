-- sweep: a worker's maintenance pass: promote due tasks, reap expired leases (not in broker
-- mode: there the transport owns leases), time out expired waiting tasks, trim old index
-- entries whose records expired; in broker mode, retire ids at the head of the line that have
-- no record.
-- ARGV[A] max_deliveries.
-- Returns the wait hint (seconds until something may become ready, or -1).
-- @include _lifecycle.lua

if not BROKER then
  promote_due(SCAN_LIMIT)
  reap_expired(tonumber(ARGV[A]))
  if redis.call('ZCARD', KEYS[1]) > 0 then wake() end
end
if BROKER then
  -- Messages name the tasks, so no claim walks the line or the leases: an id in them with
  -- no record would stay forever. Check their heads (healthy tasks leave from anywhere, so
  -- garbage gets there).
  for _, index in ipairs({KEYS[1], KEYS[3]}) do
    for _, id in ipairs(redis.call('ZRANGE', index, 0, SCAN_LIMIT - 1)) do
      if not readable(KEYS[4] .. id) then
        dead_unreadable(id, DR.MISSING, 'an indexed id has no task record')
      end
    end
  end
end
sweep_expired(SCAN_LIMIT)
if TTL > 0 then
  for status, index in pairs(DONE_KEY) do
    if status ~= ST.FAILED then redis.call('ZREMRANGEBYSCORE', index, '-inf', NOW - TTL) end
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[11], '-inf', NOW - TTL)
end
return fmt(wait_hint())
