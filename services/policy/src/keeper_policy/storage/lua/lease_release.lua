-- Give a lease up at once (a replica stopping), so another resumes without waiting.
-- KEYS: lease   ARGV: owner.   Returns 1 when released.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
return redis.call('DEL', KEYS[1])
