-- The embedded mode's schema: the same model as Postgres's.
CREATE TABLE groups (
    id          INTEGER PRIMARY KEY,
    attributes  TEXT NOT NULL,            -- JSON array, canonical and sorted
    created_at  TEXT NOT NULL
);

CREATE TABLE users (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    username       TEXT NOT NULL UNIQUE CHECK (username = lower(username)),
    password_hash  TEXT NOT NULL,
    attributes     TEXT NOT NULL,
    group_id       INTEGER NOT NULL REFERENCES groups (id),
    created_at     TEXT NOT NULL
);

CREATE INDEX users_group_members ON users (group_id, id);

-- Group id allocator: AUTOINCREMENT never reuses an id, even after the
-- allocation rows are deleted.
CREATE TABLE group_ids (id INTEGER PRIMARY KEY AUTOINCREMENT);
