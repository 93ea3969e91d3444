-- See migrations/postgres/V3.
ALTER TABLE users ADD COLUMN token_version INTEGER NOT NULL DEFAULT 0;
