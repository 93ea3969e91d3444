-- Postgres arbitrates the grouping rule; Redis only accelerates it.
--
-- Two groups share `t` or more attributes exactly when they share a
-- t-subset. So a primary key on (threshold, subset) refuses an overlapping
-- group by itself, at commit, for any number of replicas, whatever Redis
-- holds. The subset is the first 16 bytes of the SHA-256 of its canonical
-- attributes joined by U+001F (`domain::grouping::for_each_subset_digest`).
CREATE TABLE group_subsets (
    threshold  smallint NOT NULL,
    subset     bytea    NOT NULL,
    group_id   bigint   NOT NULL REFERENCES groups (id),
    PRIMARY KEY (threshold, subset)
);

-- After a threshold is lowered, groups founded under the old one may share
-- subsets under the new one. Such extra owners are kept here (no unique
-- key), so lookups still find them; the primary key above still keeps every
-- new group apart from all of them.
CREATE TABLE group_subset_overlaps (
    threshold  smallint NOT NULL,
    subset     bytea    NOT NULL,
    group_id   bigint   NOT NULL REFERENCES groups (id),
    PRIMARY KEY (threshold, subset, group_id)
);

-- One row: the deployment's threshold, and the marks that say whether the
-- Redis index may be trusted (see src/index/health.rs).
CREATE TABLE deployment (
    singleton      boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    threshold      integer NOT NULL CHECK (threshold >= 1),
    index_dirty    bigint  NOT NULL DEFAULT 1,
    index_clean    bigint  NOT NULL DEFAULT 0,
    index_server   text,
    updated_at     timestamptz NOT NULL DEFAULT now()
);

-- Groups not yet confirmed in the Redis index by a sync: a founder that died
-- between its commit and its add leaves one; the keeper adds it.
ALTER TABLE groups ADD COLUMN indexed boolean NOT NULL DEFAULT false;
CREATE INDEX groups_unindexed ON groups (id) WHERE NOT indexed;

-- Idempotency-Key of POST /v1/signup, committed with the user.
CREATE TABLE idempotency_keys (
    key          text PRIMARY KEY,
    fingerprint  bytea NOT NULL,
    user_id      bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    founded      boolean NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);

-- The epoch fence of the first design is replaced by the subset key.
DROP TABLE index_epochs;
DROP SEQUENCE index_epochs_seq;
