-- enqueue: store a batch of new tasks in one call.
-- KEYS: the common layout (see _common.lua).
-- ARGV[1] queue name, ARGV[2] result_ttl (unused here, kept for a uniform call shape),
-- then 9 values per task: id, priority, data, type, delay, max_retries, retry_backoff,
-- queue_timeout, process_timeout ('' = not set).
-- Returns one integer per task: 1 stored, 0 refused because that id is live.
-- @include _common.lua

local stored, any_ready = {}, false
for i = 3, #ARGV, 9 do
  local outcome = store_task(ARGV[1], i)
  stored[#stored + 1] = outcome == 'live' and 0 or 1
  any_ready = any_ready or outcome == 'pending'
end
if any_ready then wake() end
return stored
