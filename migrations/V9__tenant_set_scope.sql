-- Ward schema, version 9: a transaction may be scoped to a set of tenants,
-- and row-level security costs one evaluation per statement instead of one
-- per row.
--
-- A worker commits the results of several deliveries in one transaction
-- (group commit); `ward.tenant_ids` holds the comma-separated tenants of
-- those deliveries, so row-level security still limits the transaction to
-- the tenants whose messages it holds.
--
-- The policies compare each row with the scope through sub-selects of
-- STABLE functions: Postgres evaluates those once per statement (an
-- InitPlan) where the V3 form parsed the settings again for every row.
CREATE FUNCTION ward_scope_system() RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT coalesce(current_setting('ward.system', true), '') = 'on'
$$;

CREATE FUNCTION ward_scope_tenants() RETURNS uuid[] LANGUAGE sql STABLE AS $$
    SELECT array_remove(
        coalesce(string_to_array(nullif(current_setting('ward.tenant_ids', true), ''), ',')::uuid[], '{}')
            || nullif(current_setting('ward.tenant_id', true), '')::uuid,
        NULL)
$$;

DO $$
DECLARE
    target record;
BEGIN
    FOR target IN SELECT * FROM (VALUES
        ('tenants', 'id'), ('api_keys', 'tenant_id'), ('definitions', 'tenant_id'),
        ('instances', 'tenant_id'), ('task_runs', 'tenant_id'), ('signals', 'tenant_id'),
        ('schedules', 'tenant_id'), ('dead_letters', 'tenant_id')) AS t (tab, col)
    LOOP
        EXECUTE format('DROP POLICY IF EXISTS tenant_isolation ON %I', target.tab);
        EXECUTE format(
            'CREATE POLICY tenant_isolation ON %I '
            'USING ((SELECT ward_scope_system()) OR %I = ANY ((SELECT ward_scope_tenants())::uuid[])) '
            'WITH CHECK ((SELECT ward_scope_system()) OR %I = ANY ((SELECT ward_scope_tenants())::uuid[]))',
            target.tab, target.col, target.col);
    END LOOP;
END
$$;

-- The V3 per-row check is no longer used by any policy.
DROP FUNCTION ward_visible(uuid);

-- Every task-run insert checked its tenant with a KEY SHARE lock on the
-- tenant's row: all the inserts of a busy tenant share that row lock, which
-- Postgres keeps as a multixact, a hot spot under load. A run's tenant is
-- its instance's (written from the locked instance row, and the instance
-- keeps its own foreign key to the tenant), so that check adds nothing.
ALTER TABLE task_runs DROP CONSTRAINT IF EXISTS task_runs_tenant_id_fkey;

-- Dispatch takes a tenant's ready runs in the order of their instances
-- (instance ids are UUIDv7: start order), so an instance's later steps (a
-- join, the next step of a chain, a retry) go before the first steps of
-- instances started after it: work in progress finishes first instead of
-- queueing behind every newer instance.
DROP INDEX IF EXISTS task_runs_ready;
CREATE INDEX task_runs_ready ON task_runs (tier, tenant_id, instance_id, created_at)
    WHERE state = 'ready' AND NOT external;
