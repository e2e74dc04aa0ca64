-- A heartbeat: the host is alive now. Exactly one replica sees a lost host come back.
-- KEYS: host status   ARGV: host, now
-- Returns {'alive'} or {'returned', declared lost at}.
local previous = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], 'alive:' .. ARGV[2])
if previous and string.sub(previous, 1, 5) == 'lost:' then
  local lost_at = string.match(previous, '^lost:([^:]+)')
  return {'returned', lost_at}
end
return {'alive'}
