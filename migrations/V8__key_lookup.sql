-- Ward schema, version 8: the API-key lookup as one statement. Every request
-- resolves its key to a tenant before any tenant scope exists; the function
-- sees across tenants (its own `ward.system` setting, for its duration only),
-- so the lookup needs no transaction of its own: one round trip.
CREATE FUNCTION ward_tenant_for_key(hash bytea)
RETURNS TABLE (id uuid, slug text, tier text, status text, inflight_max integer,
               dispatch_rate_per_s integer, running_instances_max integer, payload_bytes_max integer)
LANGUAGE sql STABLE
SET ward.system = 'on'
AS $$
    SELECT t.id, t.slug, t.tier, t.status, t.inflight_max, t.dispatch_rate_per_s,
           t.running_instances_max, t.payload_bytes_max
    FROM api_keys k JOIN tenants t ON t.id = k.tenant_id
    WHERE k.key_hash = hash AND k.revoked_at IS NULL AND t.status <> 'deleted'
$$;
