-- Embedded mode keeps no t-subset table. One process holds the data
-- directory's lock and decides every signup under one mutex against the
-- in-process index, which it rebuilds from `groups` at each start: that
-- index is the arbiter, and the table was a copy of it on disk, C(k, t)
-- rows a group (most of an import's time, and of the file). The freed
-- pages are reused; `VACUUM` gives them back to the file system.
DROP TABLE group_subsets;
DROP TABLE group_subset_overlaps;
ALTER TABLE deployment DROP COLUMN subsets_from;
