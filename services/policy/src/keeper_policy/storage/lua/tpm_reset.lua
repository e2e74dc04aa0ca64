-- A TPM reset the store announced (state.tpm.reset), or its end (state.tpm.reset.cleared),
-- on the VM record. Events reach replicas in any order, so both are ordered by TPM
-- version: an end covers every reset up to its version, and a reset already covered by
-- an end (a late or redelivered event, or one the scrubber found in a settled version)
-- changes nothing.
-- KEYS: vm record
-- ARGV: 'flag', first version of the new TPM, text for status | 'clear', version
-- Returns 1 when the record changed, 0 otherwise (an unregistered VM, or covered).
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
local version = tonumber(ARGV[2])
local cleared = tonumber(redis.call('HGET', KEYS[1], 'tpm_reset_cleared_up_to') or '0')
if ARGV[1] == 'flag' then
  if version <= cleared then
    return 0
  end
  local flagged = tonumber(redis.call('HGET', KEYS[1], 'tpm_reset_version') or '0')
  if flagged > 0 and flagged <= version then
    return 0
  end
  redis.call('HSET', KEYS[1], 'tpm_reset_version', ARGV[2], 'tpm_reset', ARGV[3])
  return 1
end
if version > cleared then
  redis.call('HSET', KEYS[1], 'tpm_reset_cleared_up_to', ARGV[2])
end
local flagged = tonumber(redis.call('HGET', KEYS[1], 'tpm_reset_version') or '0')
if flagged > 0 and flagged <= version then
  redis.call('HDEL', KEYS[1], 'tpm_reset_version', 'tpm_reset')
  return 1
end
return 0
