-- Move a VM's placement to a new host under a new epoch, only if it is where the caller
-- saw it (compare-and-set: two concurrent placements cannot both win).
-- KEYS: placement   ARGV: expected host ('' = placed nowhere), new host, now
-- Returns {'placed', epoch} or {'conflict', current host}.
local current = redis.call('HGET', KEYS[1], 'host') or ''
if current ~= ARGV[1] then
  return {'conflict', current}
end
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
redis.call('HSET', KEYS[1], 'host', ARGV[2], 'placed_at', ARGV[3])
redis.call('HDEL', KEYS[1], 'epoch_pending')
return {'placed', tostring(epoch)}
