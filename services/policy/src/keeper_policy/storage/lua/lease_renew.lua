-- Extend a lease the caller holds. KEYS: lease   ARGV: owner, ms
-- Returns 1 when extended, 0 when it is no longer the caller's.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
