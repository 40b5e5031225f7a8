-- renew: for each held (id, token): still held? cancel asked? Optionally extend the lease.
-- ARGV[A] seconds to extend each held lease by from now ('' = only read), then pairs of
-- (id, token).
-- Returns one integer per pair: 0 not held (the lease was lost), 1 held, 2 held and a
-- cancel was asked (the worker stops it between steps).
-- @include _lifecycle.lua

local seconds = tonumber(ARGV[A])
local out = {}
for i = A + 1, #ARGV, 2 do
  local id, key = ARGV[i], KEYS[4] .. ARGV[i]
  if held(key, ARGV[i + 1]) then
    if seconds and redis.call('ZSCORE', KEYS[3], id) then
      redis.call('ZADD', KEYS[3], NOW + seconds, id)
    end
    out[#out + 1] = redis.call('HGET', key, 'cancel_requested') == '1' and 2 or 1
  else
    out[#out + 1] = 0
  end
end
return out
