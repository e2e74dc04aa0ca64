-- Pin the newest version of each kind under a snapshot id: copy its sealed blob and meta
-- into the pinned hashes (which the history trim never touches) and record the snapshot.
-- KEYS: snapshots, then per kind: head, blobs, meta, pinned-blobs, pinned-meta (5 per kind)
-- ARGV: snapshot_id, created_at, then the kind names in KEYS order
-- Returns {outcome, record_json}: stored; duplicate (same id, same versions); conflict
-- (same id, other versions); empty (nothing stored); missing (a head's blob is gone).
local id = ARGV[1]
local versions, count = {}, 0
for i = 3, #ARGV do
  local head = redis.call('HGET', KEYS[2 + (i - 3) * 5], 'version')
  if head then
    versions[ARGV[i]] = tonumber(head)
    count = count + 1
  end
end
if count == 0 then
  return {'empty', ''}
end
local existing = redis.call('HGET', KEYS[1], id)
if existing then
  local pinned = cjson.decode(existing).versions
  for kind, version in pairs(versions) do
    if pinned[kind] ~= version then
      return {'conflict', existing}
    end
  end
  for kind, version in pairs(pinned) do
    if versions[kind] ~= version then
      return {'conflict', existing}
    end
  end
  return {'duplicate', existing}
end
-- Read everything first, so a missing blob leaves nothing half pinned.
local copies = {}
for i = 3, #ARGV do
  local version = versions[ARGV[i]]
  if version then
    local base = 2 + (i - 3) * 5
    local field = tostring(version)
    local blob = redis.call('HGET', KEYS[base + 1], field)
    local meta = redis.call('HGET', KEYS[base + 2], field)
    if not blob or not meta then
      return {'missing', ARGV[i] .. ' ' .. field}
    end
    copies[#copies + 1] = {base, field, blob, meta}
  end
end
for _, copy in ipairs(copies) do
  redis.call('HSET', KEYS[copy[1] + 3], copy[2], copy[3])
  redis.call('HSET', KEYS[copy[1] + 4], copy[2], copy[4])
end
local record = cjson.encode({created_at = ARGV[2], versions = versions})
redis.call('HSET', KEYS[1], id, record)
return {'stored', record}
