-- claim_ticket: claim the task a delivered broker message (ticket) names.
-- KEYS: the common layout plus KEYS[12] conveyor:{q}:publishing (see stage.lua).
-- ARGV[1] queue name, ARGV[2] result_ttl, ARGV[3] id, ARGV[4] ticket number, ARGV[5] the
-- message's copy id, ARGV[6] '1' if the broker flagged the message redelivered, ARGV[7]
-- lease seconds ('' = pull: consumed), ARGV[8] max_deliveries, ARGV[9] the new fencing
-- token, ARGV[10] the consumer's id.
-- Returns {1, token, attempts, priority, data, type, max_retries, retry_backoff,
-- process_timeout, created_at, steps}, {0, 'missing'} when there is no record, or {0} when
-- the message is to be dropped: not the current ticket, finished (a cancel tombstone), a second copy of a running task,
-- or a redelivery that ended it (poison, or a cancel asked while it ran).
-- @include _common.lua
-- @include _ticket.lua

return claim_ticket(ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4], ARGV[5], ARGV[6] == '1',
  tonumber(ARGV[7]), tonumber(ARGV[8]), ARGV[9], ARGV[10])
