-- Drop a VM's claim on a name; with a claim time, only the claim made then (a stale claim
-- is dropped, never one the same VM made again since).
-- KEYS: the name's claims   ARGV: VM id[, claim time]
if ARGV[2] and redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then
  return 0
end
return redis.call('HDEL', KEYS[1], ARGV[1])
