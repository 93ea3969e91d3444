-- The same arbiter as Postgres's (see migrations/postgres/V2): a primary key
-- on each group's t-subsets refuses any group that would overlap another.
CREATE TABLE group_subsets (
    threshold  INTEGER NOT NULL,
    subset     BLOB    NOT NULL,
    group_id   INTEGER NOT NULL REFERENCES groups (id),
    PRIMARY KEY (threshold, subset)
) WITHOUT ROWID;

CREATE TABLE group_subset_overlaps (
    threshold  INTEGER NOT NULL,
    subset     BLOB    NOT NULL,
    group_id   INTEGER NOT NULL REFERENCES groups (id),
    PRIMARY KEY (threshold, subset, group_id)
) WITHOUT ROWID;

CREATE TABLE deployment (
    singleton  INTEGER PRIMARY KEY CHECK (singleton = 1),
    threshold  INTEGER NOT NULL CHECK (threshold >= 1)
);

CREATE TABLE idempotency_keys (
    key          TEXT PRIMARY KEY,
    fingerprint  BLOB NOT NULL,
    user_id      INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    founded      INTEGER NOT NULL,
    created_at   TEXT NOT NULL
);
