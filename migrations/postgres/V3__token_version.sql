-- Bumped by a password change: tokens carry the version they were issued
-- under, and one of an older version is refused. Deleting the user revokes
-- its tokens with the row.
ALTER TABLE users ADD COLUMN token_version bigint NOT NULL DEFAULT 0;
