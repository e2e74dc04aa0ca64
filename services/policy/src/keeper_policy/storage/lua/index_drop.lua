-- Drop a VM from the workflow index only if its entry is still the one the caller saw
-- (a new workflow for the VM rewrites the score, and must keep its entry).
-- KEYS: index   ARGV: vm id, creation time the caller saw.   Returns 1 when dropped.
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) ~= tonumber(ARGV[2]) then
  return 0
end
return redis.call('ZREM', KEYS[1], ARGV[1])
