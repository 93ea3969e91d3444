#!lua
-- cohort: adds committed groups to the index. Idempotent.
--
-- KEYS[1]      meta hash: state, buckets
-- KEYS[2]      groups hash: group id -> attributes joined by \31
-- KEYS[3..]    the buckets of every subset below, in the same order
-- ARGV[1]      the bucket count the caller computed KEYS for
-- ARGV[2..]    per group: its id, its attributes joined by \31, n (its
--              number of t-subsets), then the n digests (fields of the
--              next n KEYS)
--
-- Returns {"ADDED", added, present}, {"NOT_READY"} (no meta: the index was
-- flushed; a sync recreates it) or {"BUCKETS", n}.
--
-- Redis does not roll a script back on error, so every check comes first.
-- Each group's attributes are written after its slots, so "present in the
-- groups hash" means "fully added"; a group found present is skipped.

local meta = redis.call('HMGET', KEYS[1], 'state', 'buckets')
if not meta[1] then
  return {'NOT_READY'}
end
if meta[2] ~= ARGV[1] then
  return {'BUCKETS', meta[2]}
end

-- Check the layout before the first write.
local a, k = 2, 3
while a <= #ARGV do
  local n = tonumber(ARGV[a + 2])
  if not n then
    return redis.error_reply('ERR cohort: malformed add arguments')
  end
  a = a + 3 + n
  k = k + n
end
if a ~= #ARGV + 1 or k ~= #KEYS + 1 then
  return redis.error_reply('ERR cohort: KEYS and digests are not aligned')
end

local added, present = 0, 0
a, k = 2, 3
while a <= #ARGV do
  local id, attrs, n = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
  if redis.call('HEXISTS', KEYS[2], id) == 1 then
    present = present + 1
  else
    for i = 0, n - 1 do
      local key, field = KEYS[k + i], ARGV[a + 3 + i]
      -- Nearly every slot is new: one HSETNX (one pass over the bucket's
      -- listpack) instead of HGET then HSET (two).
      if redis.call('HSETNX', key, field, id) == 0 then
        local v = redis.call('HGET', key, field)
        local found = false
        for x in string.gmatch(v, '[^,]+') do
          if x == id then found = true end
        end
        if not found then
          redis.call('HSET', key, field, v .. ',' .. id)
        end
      end
    end
    redis.call('HSET', KEYS[2], id, attrs)
    added = added + 1
  end
  a = a + 3 + n
  k = k + n
end
return {'ADDED', added, present}
