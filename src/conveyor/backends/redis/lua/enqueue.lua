-- enqueue: store a batch of new tasks in one call.
-- ARGV[A...] 12 values per task: id, priority, data, type, delay, max_retries, retry_backoff,
-- queue_timeout, process_timeout, concurrency_key, max_concurrency, unique ('' = not set).
-- Returns one integer per task: 0 refused (that id is live), -1 stored as scheduled, n > 0
-- stored as pending (n is its ticket in broker mode: to publish now).
-- @include _lifecycle.lua

begin() -- tasks that came due stand ahead of the ones pushed now
local out, any_ready = {}, false
for i = A, #ARGV, 12 do
  local outcome, ticket = store_task(i)
  if outcome == 'live' then
    out[#out + 1] = 0
  elseif outcome == 'scheduled' then
    out[#out + 1] = -1
  else
    out[#out + 1] = ticket or 1
    any_ready = true
  end
end
if any_ready then wake() end
return out
