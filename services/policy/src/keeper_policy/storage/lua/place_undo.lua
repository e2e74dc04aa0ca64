-- Undo a placement whose start never reached its host: the VM runs nowhere (if it is still
-- placed on that host), and a loss recorded for it on that host meanwhile (the host was
-- declared lost while the restore or start waited for it) is taken back, the mark it had
-- before the placement put back: nothing ran there under the new epoch, so nothing was
-- lost there. The epoch is not lowered (see placement/workflow.py).
-- KEYS: placement, vm record
-- ARGV: the placement's host, lost_from before it ('' = none), recovery_point before it
-- Returns 1 when the placement is clear (or was already), 0 when the VM is placed on
-- another host now (its placement is then left alone, the loss mark is still taken back).
local target = ARGV[1]
local lost_from = redis.call('HGET', KEYS[2], 'lost_from') or ''
if lost_from == target and ARGV[2] ~= target then
  if ARGV[2] == '' then
    redis.call('HDEL', KEYS[2], 'lost_from', 'recovery_point')
  else
    redis.call('HSET', KEYS[2], 'lost_from', ARGV[2], 'recovery_point', ARGV[3])
  end
end
local current = redis.call('HGET', KEYS[1], 'host') or ''
if current == '' then
  return 1
end
if current ~= target then
  return 0
end
redis.call('HSET', KEYS[1], 'host', '')
redis.call('HDEL', KEYS[1], 'epoch_pending')
return 1
