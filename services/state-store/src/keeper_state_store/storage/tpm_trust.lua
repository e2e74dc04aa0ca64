-- Make a stored TPM version's identity the VM's own: `keeper vm accept-tpm` (the newest
-- version), or a restore that sends a version of another TPM than the VM's own.
-- KEYS: TPM head, identities, identity trust
-- ARGV: version ('' for the newest), mode: 'accept' (always), 'if_other' (only when that
--       version's identity is known and not the accepted one: a restore of the VM's own
--       TPM changes nothing, and one whose identity is unknown cannot be judged)
-- Returns {'none'} when no TPM is stored, {'unchanged', version} (if_other), or
-- {'trusted', version, newest version, the reset version that was pending or ''}.
local newest = redis.call('HGET', KEYS[1], 'version')
if not newest then
  return {'none'}
end
local version = ARGV[1]
if version == '' then
  version = newest
end
local identity = redis.call('HGET', KEYS[2], version)
local trust = redis.call('HMGET', KEYS[3], 'accepted', 'reset')
if ARGV[2] == 'if_other' and (not identity or identity == trust[1]) then
  return {'unchanged', version}
end
if identity then
  redis.call('HSET', KEYS[3], 'accepted', identity, 'good', version)
else
  -- Unreadable: the next version whose identity is read becomes the VM's own.
  redis.call('HDEL', KEYS[3], 'accepted', 'good')
end
redis.call('HDEL', KEYS[3], 'restore', 'reset', 'reset_identity')
return {'trusted', version, newest, trust[2] or ''}
