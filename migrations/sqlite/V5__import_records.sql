-- See migrations/postgres/V5.
CREATE TABLE import_records (
    username     TEXT PRIMARY KEY,
    fingerprint  BLOB NOT NULL
) WITHOUT ROWID;
