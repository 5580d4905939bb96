-- Ward schema, version 10: the running-instances quota check as one
-- statement. Every start counts the tenant's running instances (up to its
-- quota) before it is accepted; that count needed a transaction of its own
-- only to set the tenant scope (four round trips). The function sees across
-- tenants for its own duration (`ward.system`, as `ward_tenant_for_key`
-- does) and counts only the tenant it is given: the caller passes the
-- authenticated tenant's id. PL/pgSQL keeps the inner statement's plan for
-- the session.
CREATE FUNCTION ward_running_instances(tenant uuid, count_max bigint)
RETURNS bigint
LANGUAGE plpgsql STABLE
SET ward.system = 'on'
AS $$
BEGIN
    RETURN (SELECT count(*) FROM (
        SELECT 1 FROM instances i WHERE i.tenant_id = tenant AND i.status = 'running' LIMIT count_max
    ) s);
END
$$;
