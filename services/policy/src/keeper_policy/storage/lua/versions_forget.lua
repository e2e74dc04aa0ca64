-- The store deleted the VM's state: forget the persisted versions policy remembered, so
-- the recovery point is "nothing stored" and versions counted from 1 again are taken.
-- KEYS: vm record   ARGV: the kind names
for _, kind in ipairs(ARGV) do
  redis.call('HDEL', KEYS[1], kind .. '_version', kind .. '_persisted_at')
end
-- A TPM reset went with the state; version numbers start again from 1.
redis.call('HDEL', KEYS[1], 'last_persisted_at', 'tpm_reset_version', 'tpm_reset',
  'tpm_reset_cleared_up_to')
return 1
