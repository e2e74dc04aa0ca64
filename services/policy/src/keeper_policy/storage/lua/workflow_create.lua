-- Start a VM's workflow unless one is already in progress (at most one per VM).
-- KEYS: workflow   ARGV: field, value, field, value...
-- Returns {} when created, else the existing workflow as HGETALL does.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return redis.call('HGETALL', KEYS[1])
end
redis.call('HSET', KEYS[1], unpack(ARGV))
return {}
