-- The subset tables' foreign key to groups, checked once a statement
-- instead of once a row.
--
-- A founding inserts 10 to 560 subset rows, an import batch hundreds of
-- thousands: the row-level check ran a query and took a KEY SHARE lock on
-- the group for every row (about 40% of an import batch's subset insert).
-- The same guarantee, once a statement: no subset row names a missing
-- group, and no group that subset rows name is deleted.

ALTER TABLE group_subsets DROP CONSTRAINT group_subsets_group_id_fkey;
ALTER TABLE group_subset_overlaps DROP CONSTRAINT group_subset_overlaps_group_id_fkey;

CREATE FUNCTION subset_rows_name_groups() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (
        SELECT 1 FROM (SELECT DISTINCT group_id FROM new_rows) AS n
        WHERE NOT EXISTS (SELECT 1 FROM groups g WHERE g.id = n.group_id)
    ) THEN
        RAISE EXCEPTION 'subset rows name a group that does not exist'
            USING ERRCODE = 'foreign_key_violation', TABLE = TG_TABLE_NAME;
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER group_subsets_name_groups AFTER INSERT ON group_subsets
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION subset_rows_name_groups();

CREATE TRIGGER group_subset_overlaps_name_groups AFTER INSERT ON group_subset_overlaps
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION subset_rows_name_groups();

-- Subset rows are never updated to name another group; refuse it rather
-- than check it.
CREATE FUNCTION subset_rows_are_not_moved() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'subset rows are not updated'
        USING ERRCODE = 'foreign_key_violation', TABLE = TG_TABLE_NAME;
END $$;

CREATE TRIGGER group_subsets_not_moved BEFORE UPDATE OF group_id ON group_subsets
    FOR EACH STATEMENT EXECUTE FUNCTION subset_rows_are_not_moved();

CREATE TRIGGER group_subset_overlaps_not_moved BEFORE UPDATE OF group_id ON group_subset_overlaps
    FOR EACH STATEMENT EXECUTE FUNCTION subset_rows_are_not_moved();

CREATE FUNCTION groups_without_subset_rows() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM group_subsets s JOIN old_rows o ON o.id = s.group_id)
       OR EXISTS (SELECT 1 FROM group_subset_overlaps s JOIN old_rows o ON o.id = s.group_id) THEN
        RAISE EXCEPTION 'a deleted group still has subset rows'
            USING ERRCODE = 'foreign_key_violation', TABLE = 'groups';
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER groups_keep_subset_owners AFTER DELETE ON groups
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION groups_without_subset_rows();
