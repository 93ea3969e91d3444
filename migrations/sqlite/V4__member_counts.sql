-- A group's member count, kept as data (see the Postgres migration). SQLite
-- has one writer at a time, so one column has no hot-row cost here.
ALTER TABLE groups ADD COLUMN member_count INTEGER NOT NULL DEFAULT 0;

UPDATE groups SET member_count = (SELECT count(*) FROM users WHERE users.group_id = groups.id);

CREATE TRIGGER users_count_insert AFTER INSERT ON users
BEGIN
    UPDATE groups SET member_count = member_count + 1 WHERE id = NEW.group_id;
END;

CREATE TRIGGER users_count_delete AFTER DELETE ON users
BEGIN
    UPDATE groups SET member_count = member_count - 1 WHERE id = OLD.group_id;
END;
