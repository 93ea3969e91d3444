-- The arbiter's subset rows keyed by the subset alone, as a uuid.
--
-- group_subsets is keyed (threshold smallint, subset bytea): 32-byte index
-- entries compared column by column, a varlena each time, and 56-byte
-- rows. The threshold is always the deployment's (changing it rebuilds the
-- table), so the key is the 16-byte digest alone, held as a uuid: 24-byte
-- index entries compared with one memcmp, 48-byte rows. Inserting the 20
-- million rows of a 10^6-user import in 20 sorted batches took 88 s
-- instead of 108-129 s (docs/benchmarks.md). A uuid sorts as its bytes do,
-- so rows sorted by digest are still inserted in key order.
--
-- New tables rather than the old ones rewritten, so that a replica of the
-- previous version keeps working during a rolling update: its inserts into
-- the old tables are forwarded here by the triggers below, so the primary
-- key here arbitrates between old and new replicas alike. Its lookups in
-- the old tables (only while the Redis index is dirty) find nothing; a
-- founding it decides from them that overlaps a group is refused by the
-- key here (a 503 to retry), never committed.
CREATE TABLE subset_owners (
    subset    uuid    NOT NULL,
    group_id  bigint  NOT NULL,
    CONSTRAINT subset_owners_pkey PRIMARY KEY (subset)
);

-- Extra owners of a subset, possible only for groups founded before a
-- threshold was lowered (see V2).
CREATE TABLE subset_overlaps (
    subset    uuid    NOT NULL,
    group_id  bigint  NOT NULL,
    CONSTRAINT subset_overlaps_pkey PRIMARY KEY (subset, group_id)
);

INSERT INTO subset_owners (subset, group_id)
    SELECT encode(subset, 'hex')::uuid, group_id FROM group_subsets
    WHERE threshold = (SELECT threshold FROM deployment)
    ORDER BY subset;
INSERT INTO subset_overlaps (subset, group_id)
    SELECT encode(subset, 'hex')::uuid, group_id FROM group_subset_overlaps
    WHERE threshold = (SELECT threshold FROM deployment)
    ORDER BY subset, group_id;
TRUNCATE group_subsets, group_subset_overlaps;

-- The foreign key to groups, checked once a statement, as V6 does for the
-- old tables (its functions read only `new_rows.group_id`).
CREATE TRIGGER subset_owners_name_groups AFTER INSERT ON subset_owners
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION subset_rows_name_groups();
CREATE TRIGGER subset_overlaps_name_groups AFTER INSERT ON subset_overlaps
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION subset_rows_name_groups();
CREATE TRIGGER subset_owners_not_moved BEFORE UPDATE OF group_id ON subset_owners
    FOR EACH STATEMENT EXECUTE FUNCTION subset_rows_are_not_moved();
CREATE TRIGGER subset_overlaps_not_moved BEFORE UPDATE OF group_id ON subset_overlaps
    FOR EACH STATEMENT EXECUTE FUNCTION subset_rows_are_not_moved();

CREATE OR REPLACE FUNCTION groups_without_subset_rows() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM subset_owners s JOIN old_rows o ON o.id = s.group_id)
       OR EXISTS (SELECT 1 FROM subset_overlaps s JOIN old_rows o ON o.id = s.group_id) THEN
        RAISE EXCEPTION 'a deleted group still has subset rows'
            USING ERRCODE = 'foreign_key_violation', TABLE = 'groups';
    END IF;
    RETURN NULL;
END $$;

-- A replica of the previous version writes the old tables: each row goes
-- here instead (and not there). Its `LOCK TABLE group_subsets` (an import
-- of the previous version) does not keep new replicas' foundings out:
-- import with the new version.
CREATE FUNCTION subset_rows_forwarded() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_TABLE_NAME = 'group_subsets' THEN
        INSERT INTO subset_owners (subset, group_id)
            VALUES (encode(NEW.subset, 'hex')::uuid, NEW.group_id);
    ELSE
        INSERT INTO subset_overlaps (subset, group_id)
            VALUES (encode(NEW.subset, 'hex')::uuid, NEW.group_id)
            ON CONFLICT DO NOTHING;
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER group_subsets_forwarded BEFORE INSERT ON group_subsets
    FOR EACH ROW EXECUTE FUNCTION subset_rows_forwarded();
CREATE TRIGGER group_subset_overlaps_forwarded BEFORE INSERT ON group_subset_overlaps
    FOR EACH ROW EXECUTE FUNCTION subset_rows_forwarded();
