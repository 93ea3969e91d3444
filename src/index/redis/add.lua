#!lua
-- cohort: adds one committed group to the index. Idempotent.
--
-- KEYS[1]      meta hash: state, buckets
-- KEYS[2]      groups hash: group id -> attributes joined by \31
-- KEYS[2+i]    the bucket holding the group's i-th t-subset's digest
-- ARGV[1]      the bucket count the caller computed KEYS for
-- ARGV[2]      group id
-- ARGV[3]      the group's attributes joined by \31
-- ARGV[3+i]    digest of the group's i-th t-subset (a field of KEYS[2+i])
--
-- Returns {"ADDED"}, {"EXISTS"}, {"NOT_READY"} (no meta: the index was
-- flushed; a rebuild recreates it) or {"BUCKETS", n}.
--
-- Redis does not roll a script back on error, so every read and check comes
-- first and the writes come last; the group's attributes are written last of
-- all, so "present in the groups hash" means "fully added".

local meta = redis.call('HMGET', KEYS[1], 'state', 'buckets')
if not meta[1] then
  return {'NOT_READY'}
end
if meta[2] ~= ARGV[1] then
  return {'BUCKETS', meta[2]}
end
local n = #KEYS - 2
if #ARGV ~= n + 3 then
  return redis.error_reply('ERR cohort: KEYS and digests are not aligned')
end
local id = ARGV[2]
if redis.call('HEXISTS', KEYS[2], id) == 1 then
  return {'EXISTS'}
end

local slots = {}
for i = 1, n do
  slots[i] = redis.call('HGET', KEYS[2 + i], ARGV[3 + i])
end

-- Writes only from here on.
for i = 1, n do
  local v = slots[i]
  if not v then
    redis.call('HSET', KEYS[2 + i], ARGV[3 + i], id)
  else
    local present = false
    for x in string.gmatch(v, '[^,]+') do
      if x == id then present = true end
    end
    if not present then
      redis.call('HSET', KEYS[2 + i], ARGV[3 + i], v .. ',' .. id)
    end
  end
end
redis.call('HSET', KEYS[2], id, ARGV[3])
return {'ADDED'}
