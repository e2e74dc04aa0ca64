-- The VM runs nowhere: clear its host, only if it is still the one the caller stopped it
-- on (a step repeated after a crash must not clear a newer placement).
-- KEYS: placement   ARGV: expected host
-- Returns 1 when cleared (or already clear), 0 when the VM is placed elsewhere.
local current = redis.call('HGET', KEYS[1], 'host') or ''
if current == '' then
  return 1
end
if current ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'host', '')
redis.call('HDEL', KEYS[1], 'epoch_pending')
return 1
