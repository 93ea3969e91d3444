-- Groups: attributes are those of the founder, canonical and sorted, fixed
-- for ever. Ids come from their own sequence, taken before the index founds
-- the group, so they never depend on the index (which can be lost).
CREATE SEQUENCE group_ids AS bigint;

CREATE TABLE groups (
    id          bigint PRIMARY KEY,
    attributes  text[] NOT NULL CHECK (cardinality(attributes) >= 1),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE users (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- Stored canonical (lower case), so a plain unique index is
    -- case-insensitive uniqueness.
    username       text NOT NULL CHECK (username = lower(username)),
    password_hash  text NOT NULL,
    attributes     text[] NOT NULL CHECK (cardinality(attributes) >= 1),
    group_id       bigint NOT NULL REFERENCES groups (id),
    created_at     timestamptz NOT NULL DEFAULT now()
);

CREATE UNIQUE INDEX users_username_key ON users (username);
-- Members of a group in join order, for keyset pagination.
CREATE INDEX users_group_members ON users (group_id, id);

-- The epoch of the shared index each threshold is served by. A signup locks
-- its row FOR SHARE and commits only if the index decided against this
-- epoch; a rebuild advances it (waiting for those locks), which fences off
-- every decision made against an older or lost index.
CREATE SEQUENCE index_epochs_seq AS bigint;

CREATE TABLE index_epochs (
    threshold   integer PRIMARY KEY,
    epoch       bigint NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
