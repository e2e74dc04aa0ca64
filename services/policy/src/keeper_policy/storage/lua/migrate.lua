-- One half of a live migration: the source reported the domain stopped (migrated), or a
-- host other than the placement reported it started. When both halves are in, and the
-- source is still the placement, the placement moves to the destination with a new epoch
-- (which fences the source) and is marked epoch_pending until the destination confirms it.
-- KEYS: placement, migration   ARGV: role ('left'|'arrived'), host, window ms, now
-- Returns {'noted'}, {'moved', epoch, source, destination}, or {'ignored', why}.
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
local left = redis.call('HGET', KEYS[2], 'left')
local arrived = redis.call('HGET', KEYS[2], 'arrived')
if not left or not arrived then
  return {'noted'}
end
redis.call('DEL', KEYS[2])
if left == arrived then
  return {'ignored', 'source and destination are the same host'}
end
local current = redis.call('HGET', KEYS[1], 'host') or ''
if current ~= left then
  return {'ignored', 'the source is not the placement (' .. current .. ')'}
end
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
redis.call('HSET', KEYS[1], 'host', arrived, 'placed_at', ARGV[4], 'epoch_pending', '1')
return {'moved', tostring(epoch), left, arrived}
