#!lua
-- cohort: best-group-or-create, atomically (a script runs alone on Redis).
--
-- KEYS[1]      meta hash of this threshold's index: epoch, state, buckets
-- KEYS[2]      groups hash of the epoch: group id -> attributes joined by \31
-- KEYS[2+i]    the bucket (a small hash) holding the i-th t-subset's digest
-- ARGV[1]      the epoch the caller computed its key names for
-- ARGV[2]      threshold t
-- ARGV[3]      a fresh group id to found with when nothing matches, or ""
-- ARGV[4]      the user's canonical attributes joined by \31
-- ARGV[4+i]    digest of the user's i-th t-subset (field in KEYS[2+i])
--
-- Returns {"NOT_READY"} (index missing or being built), {"STALE", epoch},
-- {"JOIN", id, attributes}, {"NONE"} or {"FOUNDED", id}.
--
-- Redis does not roll a script back on error, so every read and check comes
-- first and the writes come last: a failure leaves no partial index. The
-- `#!lua` line makes Redis refuse the script up front under OOM instead of
-- failing it part-way.

local meta = redis.call('HMGET', KEYS[1], 'epoch', 'state')
if not meta[1] or meta[2] ~= 'ready' then
  return {'NOT_READY'}
end
if meta[1] ~= ARGV[1] then
  return {'STALE', meta[1]}
end

local t = tonumber(ARGV[2])
local n = #KEYS - 2
if #ARGV ~= n + 4 then
  return redis.error_reply('ERR cohort: KEYS and digests are not aligned')
end

local user = {}
for a in string.gmatch(ARGV[4], '[^\31]+') do
  user[a] = true
end

-- Each slot holds a comma-separated set of group ids: one, under the rule,
-- but more if stored groups ever overlap, and the lookup stays exact then.
local slots = {}
local seen = {}
local best_id, best_n, best_m, best_attrs = nil, nil, -1, nil
for i = 1, n do
  local v = redis.call('HGET', KEYS[2 + i], ARGV[4 + i])
  slots[i] = v
  if v then
    for id in string.gmatch(v, '[^,]+') do
      if not seen[id] then
        seen[id] = true
        local attrs = redis.call('HGET', KEYS[2], id)
        if not attrs then
          return redis.error_reply('ERR cohort: group ' .. id .. ' is indexed without attributes')
        end
        -- Exact overlap: a digest collision can only add a candidate here.
        local m = 0
        for a in string.gmatch(attrs, '[^\31]+') do
          if user[a] then m = m + 1 end
        end
        local nid = tonumber(id)
        if m >= t and (m > best_m or (m == best_m and nid < best_n)) then
          best_id, best_n, best_m, best_attrs = id, nid, m, attrs
        end
      end
    end
  end
end

if best_id then
  return {'JOIN', best_id, best_attrs}
end
if ARGV[3] == '' then
  return {'NONE'}
end

local id = ARGV[3]
if redis.call('HEXISTS', KEYS[2], id) == 1 then
  return redis.error_reply('ERR cohort: group id ' .. id .. ' is already indexed')
end

-- Writes only from here on.
for i = 1, n do
  if slots[i] then
    redis.call('HSET', KEYS[2 + i], ARGV[4 + i], slots[i] .. ',' .. id)
  else
    redis.call('HSET', KEYS[2 + i], ARGV[4 + i], id)
  end
end
redis.call('HSET', KEYS[2], id, ARGV[4])
return {'FOUNDED', id}
