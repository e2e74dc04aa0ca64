-- alive -> lost when the last heartbeat is older than the limit. Every replica runs the
-- check; the script is atomic, so exactly one of them wins and handles the loss.
-- KEYS: host status   ARGV: host, now, lost after (s)
-- Returns {1, last seen} for the winner, {0} otherwise.
local status = redis.call('HGET', KEYS[1], ARGV[1])
if not status or string.sub(status, 1, 6) ~= 'alive:' then
  return {0}
end
local last_seen = string.sub(status, 7)
if tonumber(ARGV[2]) - tonumber(last_seen) <= tonumber(ARGV[3]) then
  return {0}
end
redis.call('HSET', KEYS[1], ARGV[1], 'lost:' .. ARGV[2] .. ':' .. last_seen)
return {1, last_seen}
