-- Claim a domain name for a VM. Exclusive: only while no other VM holds the name (two
-- replicas registering one name at once: one wins); otherwise the claim is added beside
-- the others (a second VM of that name was allowed). A VM's repeated claim keeps its time.
-- KEYS: the name's claims   ARGV: VM id, '1' exclusive or '0', now
-- Returns the other holders and their claim times (flat) when refused, else {}.
if ARGV[2] == '1' then
  local claims = redis.call('HGETALL', KEYS[1])
  local others = {}
  for i = 1, #claims, 2 do
    if claims[i] ~= ARGV[1] then
      table.insert(others, claims[i])
      table.insert(others, claims[i + 1])
    end
  end
  if #others > 0 then
    return others
  end
end
redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[3])
return {}
