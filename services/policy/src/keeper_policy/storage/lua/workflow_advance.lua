-- Record a workflow's progress, only while the caller holds its lease (a replica that lost
-- the lease to another must not overwrite what the new owner does).
-- KEYS: workflow, lease   ARGV: owner, workflow id, field, value, field, value...
-- Returns 1 when recorded, 0 when the lease or the workflow is not the caller's.
if redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return 0
end
if redis.call('HGET', KEYS[1], 'id') ~= ARGV[2] then
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
return 1
