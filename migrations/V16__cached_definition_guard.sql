-- Ward schema, version 16: a start may resolve its definition from the
-- master's memory instead of reading it first (one round trip fewer), and
-- then checks, in the same pipelined round trip as its writes and COMMIT,
-- that no newer version of each definition it resolved as "the newest" was
-- stored since. A newer one fails the transaction with SQLSTATE WD001
-- (nothing is written: the COMMIT that follows rolls back); the master then
-- reads the definitions again and starts the same items once more.
-- It runs with the caller's rights and scope: it sees only the tenants'
-- definitions the transaction may see.
CREATE FUNCTION ward_definitions_newest(tenant_ids uuid[], names text[], versions integer[])
RETURNS void
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    stale text;
BEGIN
    SELECT n.name INTO stale
    FROM unnest(tenant_ids, names, versions) AS n (tenant_id, name, version)
    WHERE EXISTS (
        SELECT 1 FROM definitions d
        WHERE d.tenant_id = n.tenant_id AND d.name = n.name AND d.version > n.version
    )
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'definition % has a newer version than the one resolved', stale
            USING ERRCODE = 'WD001';
    END IF;
END
$$;
