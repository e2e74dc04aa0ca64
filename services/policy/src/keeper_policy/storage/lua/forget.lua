-- Remove a VM's registration, unless it is placed on a host (placed meanwhile: it keeps
-- its TPM). The placement stays, so its epoch keeps rising if the VM is enabled again.
-- KEYS: vm record, placement   ARGV: none
-- Returns '' when removed (or never registered), else the host the VM is placed on.
local host = redis.call('HGET', KEYS[2], 'host') or ''
if host ~= '' then
  return host
end
redis.call('DEL', KEYS[1])
return ''
