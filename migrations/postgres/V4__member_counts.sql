-- A group's member count, kept as data: counting its members on every
-- page read every member of a 50,000-member group.
--
-- Sharded by user id (16 rows per group at most): one counter row per group
-- would be a hot row, every joiner of a big group queueing on its lock until
-- the one before it commits. Joiners with consecutive ids hit different
-- shards; a read sums at most 16 rows through the primary key.
--
-- Kept by statement-level triggers on users, so every path that adds or
-- removes users (signup, import, account deletion) keeps it exact, in the
-- same transaction, with one upsert per statement rather than per row.
CREATE TABLE group_member_counts (
    group_id  bigint   NOT NULL REFERENCES groups (id),
    shard     smallint NOT NULL,
    n         bigint   NOT NULL,
    PRIMARY KEY (group_id, shard)
);

INSERT INTO group_member_counts (group_id, shard, n)
SELECT group_id, (id % 16)::smallint, count(*) FROM users GROUP BY 1, 2;

CREATE FUNCTION group_member_counts_add() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO group_member_counts AS c (group_id, shard, n)
    SELECT group_id, (id % 16)::smallint, count(*) FROM new_users GROUP BY 1, 2
    ON CONFLICT (group_id, shard) DO UPDATE SET n = c.n + excluded.n;
    RETURN NULL;
END $$;

CREATE FUNCTION group_member_counts_remove() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE group_member_counts AS c SET n = c.n - d.k
    FROM (SELECT group_id, (id % 16)::smallint AS shard, count(*) AS k
          FROM old_users GROUP BY 1, 2) AS d
    WHERE c.group_id = d.group_id AND c.shard = d.shard;
    RETURN NULL;
END $$;

CREATE TRIGGER users_count_insert AFTER INSERT ON users
    REFERENCING NEW TABLE AS new_users
    FOR EACH STATEMENT EXECUTE FUNCTION group_member_counts_add();

CREATE TRIGGER users_count_delete AFTER DELETE ON users
    REFERENCING OLD TABLE AS old_users
    FOR EACH STATEMENT EXECUTE FUNCTION group_member_counts_remove();
