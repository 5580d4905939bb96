-- Ward schema, version 15: the API key look-up keeps its plan. As a
-- LANGUAGE sql function with a SET clause, `ward_tenant_for_key` cannot be
-- inlined, and Postgres plans a SQL function's body again on every call:
-- 0.46 ms of Postgres time per look-up, of which the join itself took
-- 0.03 (`pg_stat_statements`). PL/pgSQL keeps the statement's plan for the
-- session, as `ward_running_instances` (V10) already does. Same signature,
-- same result, same `ward.system` scope for its own duration.
CREATE OR REPLACE FUNCTION ward_tenant_for_key(hash bytea)
RETURNS TABLE (id uuid, slug text, tier text, status text, inflight_max integer,
               dispatch_rate_per_s integer, running_instances_max integer, payload_bytes_max integer)
LANGUAGE plpgsql STABLE
SET ward.system = 'on'
AS $$
BEGIN
    RETURN QUERY
    SELECT t.id, t.slug, t.tier, t.status, t.inflight_max, t.dispatch_rate_per_s,
           t.running_instances_max, t.payload_bytes_max
    FROM api_keys k JOIN tenants t ON t.id = k.tenant_id
    WHERE k.key_hash = hash AND k.revoked_at IS NULL AND t.status <> 'deleted';
END
$$;
