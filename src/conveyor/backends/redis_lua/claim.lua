-- claim: promote due tasks, reap expired leases, then take the most urgent ready task.
-- KEYS: the common layout (see _common.lua).
-- ARGV[1] queue name, ARGV[2] result_ttl (s), ARGV[3] lease seconds ('' = pull: no lease,
-- never redelivered), ARGV[4] max_deliveries, ARGV[5] the new fencing token, ARGV[6] the
-- consumer's id (stored as the record's `worker`).
-- Returns {1, id, token, attempts, priority, data, type, max_retries, retry_backoff,
-- process_timeout, created_at, steps} or {0, seconds until something may become ready or -1}.
-- @include _common.lua

return claim(ARGV[1], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[2]), ARGV[6])
