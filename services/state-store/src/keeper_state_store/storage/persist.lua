-- Fenced, atomic write of one state version (invariants 1, 2, 8).
-- KEYS: placement, head, blobs, meta, history
-- ARGV: host, epoch, generation, content_hash, sealed_blob, packed meta (keeper_state_store.storage.version_meta), history_depth
-- Returns {outcome, detail}: stored/<version>, duplicate/<version>, stale/<version>,
-- wrong_host/<placement host>, stale_epoch/<placement epoch>.
local host, epoch, generation = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local placement = redis.call('HMGET', KEYS[1], 'host', 'epoch')
if placement[1] ~= host then
  return {'wrong_host', placement[1] or ''}
end
if tonumber(placement[2] or '-1') ~= epoch then
  return {'stale_epoch', placement[2] or ''}
end
local head = redis.call('HMGET', KEYS[2], 'epoch', 'generation', 'hash', 'version')
if head[4] then
  if head[3] == ARGV[4] then
    return {'duplicate', head[4]}
  end
  local head_epoch, head_generation = tonumber(head[1]), tonumber(head[2])
  if epoch < head_epoch or (epoch == head_epoch and generation <= head_generation) then
    return {'stale', head[4]}
  end
end
local version = tonumber(head[4] or '0') + 1
redis.call('HSET', KEYS[3], version, ARGV[5])
redis.call('HSET', KEYS[4], version, ARGV[6])
redis.call('HSET', KEYS[2], 'epoch', ARGV[2], 'generation', ARGV[3], 'hash', ARGV[4],
  'version', version)
redis.call('RPUSH', KEYS[5], version)
while redis.call('LLEN', KEYS[5]) > tonumber(ARGV[7]) do
  local oldest = redis.call('LPOP', KEYS[5])
  redis.call('HDEL', KEYS[3], oldest)
  redis.call('HDEL', KEYS[4], oldest)
end
return {'stored', tostring(version)}
