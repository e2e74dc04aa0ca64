-- Record that a VM's host was declared lost, only if the VM is still placed on that host: a
-- placement undone (or moved) between the loss handler listing the host's VMs and this
-- write must not be marked lost from a host it no longer was on.
-- KEYS: vm record, placement   ARGV: host, recovery point (JSON)
-- Returns 1 when marked, 0 when the VM is no longer placed on the host.
if (redis.call('HGET', KEYS[2], 'host') or '') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'lost_from', ARGV[1], 'recovery_point', ARGV[2])
return 1
