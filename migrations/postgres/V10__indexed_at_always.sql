-- Every confirmation sets `indexed_at`, whoever writes it. A replica older
-- than V8 confirms a group with `indexed = true` alone; during a rolling
-- update from it, a join a newer replica decided in Redis before that
-- confirmation would not see the group in its commit-time check (V8),
-- which looks for groups confirmed since the decision by `indexed_at`.
CREATE FUNCTION groups_confirmed_at() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.indexed_at := now();
    RETURN NEW;
END $$;

-- The condition is evaluated without calling the function: this version's
-- confirmations set `indexed_at` themselves and pay nothing.
CREATE TRIGGER groups_confirmed_at BEFORE UPDATE OF indexed ON groups
    FOR EACH ROW
    WHEN (NEW.indexed AND NOT OLD.indexed AND NEW.indexed_at IS NULL)
    EXECUTE FUNCTION groups_confirmed_at();
