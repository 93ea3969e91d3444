-- When a group was confirmed in the Redis index. A join decided in Redis
-- is checked at its commit against the groups Redis may not have shown
-- it: those not confirmed yet (a founder's add is late, or the founder was
-- killed after its commit), and those confirmed since the decision. Rows
-- confirmed before this migration keep NULL: long before any decision.
ALTER TABLE groups ADD COLUMN indexed_at timestamptz;
CREATE INDEX groups_indexed_at ON groups (indexed_at) WHERE indexed_at IS NOT NULL;
