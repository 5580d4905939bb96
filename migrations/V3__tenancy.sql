-- Ward schema, version 3: multi-tenancy. Tiers with weights and minimum
-- shares, tenant quotas and status, indexes for fair dispatch, and
-- row-level security on every tenant-owned table (FORCE'd, so it binds the
-- table owner too). The application role (`ward_app`, created and granted
-- by the migration runner) sets `ward.tenant_id` per transaction; the
-- leader's cross-tenant loops set `ward.system`.

CREATE TABLE tiers (
    name               text PRIMARY KEY,
    weight             integer NOT NULL DEFAULT 1 CHECK (weight BETWEEN 1 AND 1000),
    min_share_percent  integer NOT NULL DEFAULT 10 CHECK (min_share_percent BETWEEN 0 AND 100),
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now()
);
INSERT INTO tiers (name, weight, min_share_percent) VALUES ('gold', 6, 10), ('silver', 3, 10), ('bronze', 1, 10)
    ON CONFLICT (name) DO NOTHING;
INSERT INTO tiers (name) SELECT DISTINCT tier FROM tenants ON CONFLICT (name) DO NOTHING;

ALTER TABLE tenants
    ADD COLUMN inflight_max           integer NOT NULL DEFAULT 64,
    ADD COLUMN dispatch_rate_per_s    integer NOT NULL DEFAULT 500,
    ADD COLUMN running_instances_max  integer NOT NULL DEFAULT 10000,
    ADD COLUMN payload_bytes_max      integer NOT NULL DEFAULT 262144,
    ADD COLUMN updated_at             timestamptz NOT NULL DEFAULT now(),
    ADD CONSTRAINT tenants_tier FOREIGN KEY (tier) REFERENCES tiers (name),
    ADD CONSTRAINT tenants_status CHECK (status IN ('active', 'suspended', 'deleted'));

DROP INDEX task_runs_ready;
CREATE INDEX task_runs_ready ON task_runs (tier, tenant_id, created_at) WHERE state = 'ready' AND NOT external;
CREATE INDEX task_runs_inflight ON task_runs (tier, tenant_id) WHERE state = 'dispatched';

CREATE FUNCTION ward_visible(row_tenant uuid) RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT row_tenant = nullif(current_setting('ward.tenant_id', true), '')::uuid
        OR coalesce(current_setting('ward.system', true), '') = 'on'
$$;

ALTER TABLE tenants ENABLE ROW LEVEL SECURITY;
ALTER TABLE tenants FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON tenants USING (ward_visible(id)) WITH CHECK (ward_visible(id));

ALTER TABLE api_keys ENABLE ROW LEVEL SECURITY;
ALTER TABLE api_keys FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON api_keys USING (ward_visible(tenant_id)) WITH CHECK (ward_visible(tenant_id));

ALTER TABLE definitions ENABLE ROW LEVEL SECURITY;
ALTER TABLE definitions FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON definitions USING (ward_visible(tenant_id)) WITH CHECK (ward_visible(tenant_id));

ALTER TABLE instances ENABLE ROW LEVEL SECURITY;
ALTER TABLE instances FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON instances USING (ward_visible(tenant_id)) WITH CHECK (ward_visible(tenant_id));

ALTER TABLE task_runs ENABLE ROW LEVEL SECURITY;
ALTER TABLE task_runs FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON task_runs USING (ward_visible(tenant_id)) WITH CHECK (ward_visible(tenant_id));

ALTER TABLE signals ENABLE ROW LEVEL SECURITY;
ALTER TABLE signals FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON signals USING (ward_visible(tenant_id)) WITH CHECK (ward_visible(tenant_id));

ALTER TABLE schedules ENABLE ROW LEVEL SECURITY;
ALTER TABLE schedules FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON schedules USING (ward_visible(tenant_id)) WITH CHECK (ward_visible(tenant_id));
