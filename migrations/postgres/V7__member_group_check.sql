-- The users' and the member counters' foreign key to groups, checked once a
-- statement instead of once a row, as V6 did for the subset tables.
--
-- The row-level check runs a query and takes a KEY SHARE lock on the group
-- (writing its row) for every user and every counter row: an import batch
-- of 50,000 users spent 2.0 of its 4.4 s in the users' check alone, more
-- in the counters'. The lock guards against the group being deleted before
-- the insert commits; groups are never deleted (the trigger below refuses
-- to delete one that anything names), so a check of the rows the statement
-- wrote, against the groups it sees, is the same guarantee.
ALTER TABLE users DROP CONSTRAINT users_group_id_fkey;
-- Counter rows are written only by the users' own triggers, for the groups
-- of the users the statement inserted (checked below) or deleted.
ALTER TABLE group_member_counts DROP CONSTRAINT group_member_counts_group_id_fkey;

CREATE FUNCTION rows_name_groups() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (
        SELECT 1 FROM (SELECT DISTINCT group_id FROM new_rows) AS n
        WHERE NOT EXISTS (SELECT 1 FROM groups g WHERE g.id = n.group_id)
    ) THEN
        RAISE EXCEPTION '% rows name a group that does not exist', TG_TABLE_NAME
            USING ERRCODE = 'foreign_key_violation', TABLE = TG_TABLE_NAME;
    END IF;
    RETURN NULL;
END $$;

-- The insert's transition table is the one the member counter's trigger
-- already keeps (one per table and statement): no second copy of the rows.
CREATE TRIGGER users_name_groups AFTER INSERT ON users
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION rows_name_groups();

-- A user never moves to another group (the threshold is fixed for a
-- deployment): refuse it rather than check it.
CREATE FUNCTION users_do_not_move() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'a user does not move to another group'
        USING ERRCODE = 'foreign_key_violation', TABLE = 'users';
END $$;

CREATE TRIGGER users_not_moved BEFORE UPDATE OF group_id ON users
    FOR EACH STATEMENT EXECUTE FUNCTION users_do_not_move();

CREATE TRIGGER group_member_counts_not_moved BEFORE UPDATE OF group_id ON group_member_counts
    FOR EACH STATEMENT EXECUTE FUNCTION users_do_not_move();

-- Deleting a group that users or counters name is refused, as deleting one
-- that subset rows name already is.
CREATE FUNCTION groups_without_members() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM users u JOIN old_rows o ON o.id = u.group_id)
       OR EXISTS (SELECT 1 FROM group_member_counts c JOIN old_rows o ON o.id = c.group_id) THEN
        RAISE EXCEPTION 'a deleted group still has members'
            USING ERRCODE = 'foreign_key_violation', TABLE = 'groups';
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER groups_keep_members AFTER DELETE ON groups
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION groups_without_members();
