-- Users that `cohort import` wrote, by username, with a keyed fingerprint
-- of the line that made them (username, password or hash, attributes). A
-- re-run of the same file finds its own lines here and skips them ("already
-- imported"), while a username taken any other way is a reject. No foreign
-- key: a record outlives its user's deletion, so a re-run does not bring a
-- deleted account back.
CREATE TABLE import_records (
    username     text  PRIMARY KEY,
    fingerprint  bytea NOT NULL,
    imported_at  timestamptz NOT NULL DEFAULT now()
);
