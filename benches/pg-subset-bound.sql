-- The distributed import's floor, measured alone: the subset rows of a
-- 10^6-user import of the benchmark population (20,285,145 rows) inserted
-- into a table with the subset table's primary key, in 20 batches as the
-- import writes them (each batch's keys sorted). The keys are 16-byte
-- SHA-256 prefixes, spread as the real ones are. Nothing else runs: no
-- users, no probes, no triggers. On a scratch database:
--
--   createdb -U postgres -h 127.0.0.1 bound && \
--     psql -U postgres -h 127.0.0.1 -d bound -f benches/pg-subset-bound.sql
\timing on
DROP TABLE IF EXISTS bound_subsets;
CREATE TABLE bound_subsets (
    threshold  smallint NOT NULL,
    subset     bytea    NOT NULL,
    group_id   bigint   NOT NULL,
    PRIMARY KEY (threshold, subset)
);
-- One batch's keys made and sorted, without the insert: what the batches
-- below spend outside the table.
SELECT count(*) FROM (
    SELECT substr(sha256(int8send(i)), 1, 16) AS s
    FROM generate_series(1, 1014258) i ORDER BY 1
) k;
SELECT format(
    'INSERT INTO bound_subsets SELECT 3, substr(sha256(int8send(i)), 1, 16), i '
    'FROM generate_series(%s, %s) i ORDER BY 2',
    b * 1014258 + 1, (b + 1) * 1014258)
FROM generate_series(0, 19) b
\gexec
SELECT count(*) AS rows, pg_size_pretty(pg_total_relation_size('bound_subsets')) AS size
FROM bound_subsets;
DROP TABLE bound_subsets;
