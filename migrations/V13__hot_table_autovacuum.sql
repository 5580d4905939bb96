-- Ward schema, version 13: autovacuum keeps up with the two hot tables.
-- Every task run is written three times (inserted ready, updated
-- dispatched, updated settled) and every instance at least twice, and no
-- such update can be HOT (`state` and `status` are in indexes), so each
-- leaves index entries behind that only VACUUM removes. The leader's
-- in-flight count, its lease check and the start's running count walk those
-- entries. Postgres's defaults vacuum a table once a fifth of it is dead:
-- with millions of rows, minutes of this load. These settings vacuum once a
-- hundredth is dead (at least 10,000 rows) and let the vacuum run at ten
-- times the default cost limit, so it ends before the next is due;
-- autovacuum still looks at most once per `autovacuum_naptime` (a server
-- setting, 1 minute by default).
ALTER TABLE task_runs SET (
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_threshold = 10000,
    autovacuum_vacuum_insert_scale_factor = 0.05,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_vacuum_cost_limit = 2000
);
ALTER TABLE instances SET (
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_threshold = 10000,
    autovacuum_vacuum_insert_scale_factor = 0.05,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_vacuum_cost_limit = 2000
);
