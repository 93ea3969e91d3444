-- An embedded import writes its groups' subset rows once, in key order, when
-- it ends (see src/store/sqlite_import.rs). Until then groups from this id
-- on have none; opening the store completes them first (NULL: complete).
ALTER TABLE deployment ADD COLUMN subsets_from INTEGER;
