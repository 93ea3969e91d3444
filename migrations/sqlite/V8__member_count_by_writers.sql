-- New members are counted by the two writers of users instead of a trigger
-- that rewrote the group's row once a user: the signup adds one in its
-- transaction, the import a batch's members of a group at once (the
-- trigger was a third of a 10^6-user import's time). Deletions, one user
-- at a time, keep their trigger (migration V4).
DROP TRIGGER users_count_insert;
