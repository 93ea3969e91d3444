#!lua flags=no-writes
-- cohort: the best committed group for a signup, in one atomic read.
--
-- KEYS[1]      meta hash of this threshold's index: state, buckets
-- KEYS[2]      groups hash: group id -> attributes joined by \31
-- KEYS[2+i]    the bucket (a small hash) holding the i-th t-subset's digest
-- ARGV[1]      threshold t
-- ARGV[2]      the bucket count the caller computed KEYS for
-- ARGV[3]      the user's canonical attributes joined by \31
-- ARGV[3+i]    digest of the user's i-th t-subset (a field of KEYS[2+i])
--
-- Returns {"NOT_READY"} (index missing or being built), {"BUCKETS", n}
-- (the caller's bucket count is stale), {"JOIN", id, attributes} or {"NONE"}.
--
-- It writes nothing (`no-writes`: it runs under OOM and on replicas). Groups
-- are added by add.lua, and only after their transaction committed.

local meta = redis.call('HMGET', KEYS[1], 'state', 'buckets')
if meta[1] ~= 'ready' then
  return {'NOT_READY'}
end
if meta[2] ~= ARGV[2] then
  return {'BUCKETS', meta[2]}
end

local t = tonumber(ARGV[1])
local n = #KEYS - 2
if #ARGV ~= n + 3 then
  return redis.error_reply('ERR cohort: KEYS and digests are not aligned')
end

local user = {}
for a in string.gmatch(ARGV[3], '[^\31]+') do
  user[a] = true
end

-- Each slot holds a comma-separated set of group ids: one under the rule,
-- more if stored groups overlap (after a threshold was lowered); the lookup
-- stays exact either way.
local seen = {}
local best_id, best_n, best_m, best_attrs = nil, nil, -1, nil
for i = 1, n do
  local v = redis.call('HGET', KEYS[2 + i], ARGV[3 + i])
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
return {'NONE'}
