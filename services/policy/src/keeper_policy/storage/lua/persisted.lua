-- Remember the newest persisted version of one kind and when it was persisted (the
-- recovery point). state.persisted events reach replicas in any order: never go back.
-- A TPM version's libtpms profile and StateFormatLevel, when the store could read them,
-- become the VM's: placement refuses hosts whose libtpms cannot load that level.
-- KEYS: vm record   ARGV: kind, version, persisted at (unix s), profile, level ('' unknown)
-- Returns 1 when recorded, 0 when an equal or newer version was already known.
local known = tonumber(redis.call('HGET', KEYS[1], ARGV[1] .. '_version') or '0')
if tonumber(ARGV[2]) <= known then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1] .. '_version', ARGV[2], ARGV[1] .. '_persisted_at', ARGV[3])
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[1], 'tpm_profile', ARGV[4], 'state_format_level', ARGV[5])
end
local last = tonumber(redis.call('HGET', KEYS[1], 'last_persisted_at') or '0')
if tonumber(ARGV[3]) > last then
  redis.call('HSET', KEYS[1], 'last_persisted_at', ARGV[3])
end
return 1
