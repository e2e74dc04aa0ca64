-- Delete everything stored of a VM's state, unless the VM is placed on a host.
-- KEYS: placement, snapshots, data key, TPM secret, scrub lock, then per kind (ARGV order) the keys
--       listed by keeper_shared.redis_access.keys.kind_state_keys, blobs and pinned blobs first
-- ARGV: the number of keys per kind, then the kind names
-- Returns {'placed', host} (nothing deleted), or
--         {'deleted', snapshot names JSON, versions of kind 1, versions of kind 2, ...}
-- The placement itself stays: its epoch must keep rising if the VM is enabled again, so a
-- host still holding an old epoch can never write into the new state.
local host = redis.call('HGET', KEYS[1], 'host') or ''
if host ~= '' then
  return {'placed', host}
end
local snapshots = redis.call('HKEYS', KEYS[2])
local reply = {'deleted', cjson.encode(snapshots)}
local per_kind = tonumber(ARGV[1])
for i = 2, #ARGV do
  local base = 6 + (i - 2) * per_kind
  -- A version lives in the history blobs, the pinned copies, or both: count each once.
  local versions = {}
  local count = 0
  for _, key in ipairs({KEYS[base], KEYS[base + 1]}) do
    for _, version in ipairs(redis.call('HKEYS', key)) do
      if not versions[version] then
        versions[version] = true
        count = count + 1
      end
    end
  end
  reply[#reply + 1] = count
end
redis.call('DEL', unpack(KEYS, 2))
return reply
