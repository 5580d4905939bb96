-- Ward schema, version 11: four fewer index entries per task run. A run's
-- row is written three times (inserted ready, updated dispatched, updated
-- settled) and none of the updates can be HOT (`state` is in partial-index
-- predicates), so every index of task_runs takes an entry per version.
-- Before: 12 entries per run; after: 8.
--
-- A run's idempotency key is `<instance>:<step>`: the key already names the
-- instance, so one unique index on (instance_id, idempotency_key, attempt)
-- is the same constraint as the old UNIQUE (idempotency_key, attempt), and
-- serves every look-up by instance that task_runs_instance served.
CREATE UNIQUE INDEX task_runs_instance_key ON task_runs (instance_id, idempotency_key, attempt);
ALTER TABLE task_runs DROP CONSTRAINT task_runs_idempotency_key_attempt_key;
DROP INDEX task_runs_instance;

-- The dispatched runs had two partial indexes: (tier, tenant_id) for the
-- leader's in-flight count and (lease_expires_at) for the lease reaper. One
-- index on the lease, carrying the tier and tenant, serves both: the count
-- reads every dispatched run anyway (a few thousand: the dispatch windows
-- bound them), and the reaper reads the expired ones from the front.
CREATE INDEX task_runs_dispatched ON task_runs (lease_expires_at) INCLUDE (tier, tenant_id)
    WHERE state = 'dispatched';
DROP INDEX task_runs_inflight;
DROP INDEX task_runs_lease;
