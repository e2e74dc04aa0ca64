-- A workflow is done: keep its outcome for a while (for redelivered requests), remove it
-- and release the lease, in one step.
-- KEYS: workflow, lease, result   ARGV: owner, workflow id, result JSON, result TTL (s)
-- Returns 1 when finished, 0 when the lease or the workflow is not the caller's.
if redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return 0
end
if redis.call('HGET', KEYS[1], 'id') ~= ARGV[2] then
  return 0
end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('SET', KEYS[3], ARGV[3], 'EX', ARGV[4])
return 1
