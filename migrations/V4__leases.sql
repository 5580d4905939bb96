-- Ward schema, version 4: task-run leases. A dispatched run holds a lease
-- (its timeout plus a grace, extended by the handler's heartbeats); the
-- leader fails runs whose lease expired (a lost or hung worker) so the
-- step's retry policy runs another attempt.

ALTER TABLE task_runs ADD COLUMN lease_expires_at timestamptz;
CREATE INDEX task_runs_lease ON task_runs (lease_expires_at) WHERE state = 'dispatched';
