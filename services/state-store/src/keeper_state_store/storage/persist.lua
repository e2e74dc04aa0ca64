-- Fenced, atomic write of one state version (invariants 1, 2, 8), and for a TPM the
-- identity check of invariant 10 (never a silent blank TPM), decided in the same step so
-- two replicas cannot both judge against the same old record.
-- KEYS: placement, head, blobs, meta, history, identities, identity trust
-- ARGV: host, epoch, generation, content_hash, sealed_blob, packed meta
--       (keeper_state_store.storage.version_meta), history_depth, identity: the version's
--       TPM identity fingerprint, '' when it could not be read, '-' when not judged (NVRAM)
-- Returns {outcome, detail}: wrong_host/<placement host>, stale_epoch/<placement epoch>,
-- duplicate/<version>, stale/<version>; or, stored:
-- {'stored', version, verdict, restore version or '', reset version or ''}, verdict one of
-- '' (not judged), 'unknown' (no identity of the VM is known yet), 'same', 'reset' (this
-- version is another TPM: flagged, restores keep the VM's own), 'pending' (a reset is
-- still unaccepted), 'own_back' (the VM's own TPM is stored again: the reset is over;
-- the reset version returned is the one that ended).
-- See keeper_state_store.storage.tpm_trust for the trust record's fields.
local host, epoch, generation = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local placement = redis.call('HMGET', KEYS[1], 'host', 'epoch')
if placement[1] ~= host then
  return {'wrong_host', placement[1] or ''}
end
if tonumber(placement[2] or '-1') ~= epoch then
  return {'stale_epoch', placement[2] or ''}
end
local head = redis.call('HMGET', KEYS[2], 'epoch', 'generation', 'hash', 'version')
if head[4] then
  if head[3] == ARGV[4] then
    return {'duplicate', head[4]}
  end
  local head_epoch, head_generation = tonumber(head[1]), tonumber(head[2])
  if epoch < head_epoch or (epoch == head_epoch and generation <= head_generation) then
    return {'stale', head[4]}
  end
end
local version = tostring(tonumber(head[4] or '0') + 1)
redis.call('HSET', KEYS[3], version, ARGV[5])
redis.call('HSET', KEYS[4], version, ARGV[6])
redis.call('HSET', KEYS[2], 'epoch', ARGV[2], 'generation', ARGV[3], 'hash', ARGV[4],
  'version', version)
redis.call('RPUSH', KEYS[5], version)

local verdict = ''
local cleared_reset = nil
local identity = ARGV[8]
if identity ~= '-' then
  if identity ~= '' then
    redis.call('HSET', KEYS[6], version, identity)
  end
  local trust = redis.call('HMGET', KEYS[7], 'accepted', 'good', 'restore')
  local accepted, good, restore = trust[1], trust[2], trust[3]
  if not accepted then
    -- No identity accepted yet: the previous version's when it was read (a clone's or an
    -- import's first version, or one stored before identities were recorded), else this
    -- version's: the VM's first TPM is its own.
    local previous = head[4] and redis.call('HGET', KEYS[6], head[4])
    if previous then
      accepted, good = previous, head[4]
    elseif identity ~= '' then
      accepted, good = identity, version
    end
    if accepted then
      redis.call('HSET', KEYS[7], 'accepted', accepted, 'good', good)
    end
  end
  if not accepted then
    verdict = 'unknown'
  elseif identity == accepted then
    redis.call('HSET', KEYS[7], 'good', version)
    if restore then
      cleared_reset = redis.call('HGET', KEYS[7], 'reset')
      redis.call('HDEL', KEYS[7], 'restore', 'reset', 'reset_identity')
      verdict = 'own_back'
    else
      verdict = 'same'
    end
  elseif restore then
    verdict = 'pending'
  elseif good or head[4] then
    -- Another TPM, or one whose identity cannot be read where the VM's own could: never
    -- taken for the same. Kept, flagged, and the VM's own stays the one to restore.
    redis.call('HSET', KEYS[7], 'restore', good or head[4], 'reset', version,
      'reset_identity', identity)
    verdict = 'reset'
  else
    verdict = 'unknown'
  end
end

-- Trim the history to its depth, except the version a pending reset restores: the new
-- TPM may write many versions before anyone looks, and none of them may push the VM's own
-- TPM out.
local trust = redis.call('HMGET', KEYS[7], 'restore', 'reset')
local protected = trust[1]
local limit = tonumber(ARGV[7])
if protected and redis.call('LPOS', KEYS[5], protected) then
  limit = limit + 1
end
while redis.call('LLEN', KEYS[5]) > limit do
  local oldest = redis.call('LPOP', KEYS[5])
  if oldest == protected then
    local next_oldest = redis.call('LPOP', KEYS[5])
    redis.call('LPUSH', KEYS[5], protected)
    oldest = next_oldest
  end
  redis.call('HDEL', KEYS[3], oldest)
  redis.call('HDEL', KEYS[4], oldest)
  redis.call('HDEL', KEYS[6], oldest)
end
return {'stored', version, verdict, trust[1] or '', trust[2] or cleared_reset or ''}
