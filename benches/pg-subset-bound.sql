-- The distributed import's floor, measured alone: the subset rows of a
-- 10^6-user import of the benchmark population (20,285,160 rows) inserted
-- in 20 batches as the import writes them (each batch's keys sorted), into
-- a table with the arbiter's primary key, in both layouts one after the
-- other: before migration V9 (`threshold smallint, subset bytea`) and
-- after it (`subset uuid`). The keys are 16-byte SHA-256 prefixes, spread
-- as the real ones are. Each batch's keys are made into a staging table
-- first, so the `INSERT 0 1014258` lines time the insert alone. Nothing
-- else runs: no users, no probes, no triggers. On a scratch database:
--
--   createdb -U postgres -h 127.0.0.1 bound && \
--     psql -U postgres -h 127.0.0.1 -d bound -f benches/pg-subset-bound.sql
--
-- and sum the times after each `INSERT 0 1014258`.
\timing on
DROP TABLE IF EXISTS bound_v8, bound_v9;
CREATE TABLE bound_v8 (
    threshold  smallint NOT NULL,
    subset     bytea    NOT NULL,
    group_id   bigint   NOT NULL,
    PRIMARY KEY (threshold, subset)
);
SELECT 'DROP TABLE IF EXISTS stage',
       format('CREATE TEMP TABLE stage AS SELECT 3::smallint AS t, '
              'substr(sha256(int8send(i)), 1, 16) AS s, i AS g '
              'FROM generate_series(%s, %s) i ORDER BY 2',
              b * 1014258 + 1, (b + 1) * 1014258),
       'INSERT INTO bound_v8 SELECT * FROM stage'
FROM generate_series(0, 19) b
\gexec
SELECT 'v8' AS layout, count(*) AS rows,
       pg_size_pretty(pg_relation_size('bound_v8')) AS heap,
       pg_size_pretty(pg_indexes_size('bound_v8')) AS key
FROM bound_v8;
DROP TABLE bound_v8;

CREATE TABLE bound_v9 (
    subset    uuid    NOT NULL PRIMARY KEY,
    group_id  bigint  NOT NULL
);
SELECT 'DROP TABLE IF EXISTS stage',
       format('CREATE TEMP TABLE stage AS SELECT '
              'encode(substr(sha256(int8send(i)), 1, 16), ''hex'')::uuid AS s, i AS g '
              'FROM generate_series(%s, %s) i ORDER BY 1',
              b * 1014258 + 1, (b + 1) * 1014258),
       'INSERT INTO bound_v9 SELECT * FROM stage'
FROM generate_series(0, 19) b
\gexec
SELECT 'v9' AS layout, count(*) AS rows,
       pg_size_pretty(pg_relation_size('bound_v9')) AS heap,
       pg_size_pretty(pg_indexes_size('bound_v9')) AS key
FROM bound_v9;
DROP TABLE bound_v9, stage;
