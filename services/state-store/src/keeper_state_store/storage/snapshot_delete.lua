-- Drop a snapshot, and unpin each of its versions that no other snapshot of the VM pins.
-- KEYS: snapshots, then per kind: pinned-blobs, pinned-meta (2 per kind)
-- ARGV: snapshot_id, then the kind names in KEYS order
-- Returns {outcome, record_json}: deleted, or absent ('' record) when there was none.
local existing = redis.call('HGET', KEYS[1], ARGV[1])
if not existing then
  return {'absent', ''}
end
redis.call('HDEL', KEYS[1], ARGV[1])
local versions = cjson.decode(existing).versions
local others = {}
for _, raw in ipairs(redis.call('HVALS', KEYS[1])) do
  others[#others + 1] = cjson.decode(raw).versions
end
for i = 2, #ARGV do
  local kind = ARGV[i]
  local version = versions[kind]
  if version then
    local used = false
    for _, other in ipairs(others) do
      if other[kind] == version then
        used = true
      end
    end
    if not used then
      local base = 2 + (i - 2) * 2
      redis.call('HDEL', KEYS[base], tostring(version))
      redis.call('HDEL', KEYS[base + 1], tostring(version))
    end
  end
end
return {'deleted', existing}
