-- Ward schema, version 12: the first ANALYZE of the hot tables, on demand.
-- Pooled sessions plan each statement once (generic plans) and keep the plan
-- until the table's statistics change. On a new schema the first plans are
-- made with no statistics at all, and some of them read a tenant's every
-- instance through a list index for a look-up by id; autovacuum's first
-- ANALYZE (a minute or more later) is what replaced them. The leader calls
-- this until it answers 0: a hot table that was never analyzed and now has
-- `rows_min` rows is analyzed at once, which makes every session plan again.
-- It runs as the tables' owner (the application role may not ANALYZE) and
-- only ever analyzes these two tables.
CREATE FUNCTION ward_first_analyze(rows_min bigint)
RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path FROM CURRENT
AS $$
DECLARE
    waiting integer := 0;
    hot record;
BEGIN
    FOR hot IN
        SELECT s.relid::regclass AS rel, s.n_live_tup + s.n_dead_tup AS row_count
        FROM pg_stat_user_tables s
        WHERE s.relid IN ('instances'::regclass, 'task_runs'::regclass)
          AND s.last_analyze IS NULL AND s.last_autoanalyze IS NULL
    LOOP
        IF hot.row_count >= rows_min THEN
            EXECUTE format('ANALYZE %s', hot.rel);
        ELSE
            waiting := waiting + 1;
        END IF;
    END LOOP;
    RETURN waiting;
END
$$;
REVOKE ALL ON FUNCTION ward_first_analyze(bigint) FROM PUBLIC;
