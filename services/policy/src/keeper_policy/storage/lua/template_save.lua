-- Record a template and its name in one step, unless another template has the name (two
-- replicas creating two templates of one name at once: one wins, nothing is half written).
-- KEYS: template names, templates   ARGV: name, template id, template JSON
-- Returns '' when recorded (or already recorded under this id), else the holder's id.
local holder = redis.call('HGET', KEYS[1], ARGV[1])
if holder and holder ~= ARGV[2] then
  return holder
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
return ''
