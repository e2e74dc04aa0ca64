-- First state of a VM that has none (clone, import): every kind lands at version 1, under
-- one fencing token, all at once or not at all. No placement check: nothing runs yet.
-- KEYS: per kind, in a fixed order: head, blobs, meta, history, identities, identity trust
--       (6 keys per kind)
-- ARGV: epoch, generation, then per kind in the same order: content_hash, sealed, packed
--       meta, identity fingerprint ('' when unread or not a TPM) (an empty content_hash
--       leaves that kind empty)
-- Returns {outcome}: stored; duplicate when every kind already holds exactly these hashes
-- (a redelivered request); exists when the VM has any other state.
local kinds = #KEYS / 6
local any_head, all_match = false, true
for i = 0, kinds - 1 do
  local head_hash = redis.call('HGET', KEYS[i * 6 + 1], 'hash')
  if head_hash then
    any_head = true
  end
  if (head_hash or '') ~= ARGV[3 + i * 4] then
    all_match = false
  end
end
if any_head then
  if all_match then
    return {'duplicate'}
  end
  return {'exists'}
end
for i = 0, kinds - 1 do
  local content_hash = ARGV[3 + i * 4]
  if content_hash ~= '' then
    redis.call('HSET', KEYS[i * 6 + 2], '1', ARGV[4 + i * 4])
    redis.call('HSET', KEYS[i * 6 + 3], '1', ARGV[5 + i * 4])
    redis.call('HSET', KEYS[i * 6 + 1], 'epoch', ARGV[1], 'generation', ARGV[2],
      'hash', content_hash, 'version', '1')
    redis.call('RPUSH', KEYS[i * 6 + 4], '1')
    -- The copied TPM is the VM's own: a host that starts it with another is flagged.
    redis.call('DEL', KEYS[i * 6 + 5], KEYS[i * 6 + 6])
    local identity = ARGV[6 + i * 4]
    if identity ~= '' then
      redis.call('HSET', KEYS[i * 6 + 5], '1', identity)
      redis.call('HSET', KEYS[i * 6 + 6], 'accepted', identity, 'good', '1')
    end
  end
end
return {'stored'}
