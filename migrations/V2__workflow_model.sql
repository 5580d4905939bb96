-- Ward schema, version 2: the workflow model. DAG steps of several kinds,
-- timers held as waiting task runs, signals, sub-workflows, idempotent
-- starts, external workers, cron schedules, paginated instance lists.

ALTER TABLE instances
    ADD COLUMN definition_name     text,
    ADD COLUMN idempotency_key     text,
    ADD COLUMN parent_instance_id  uuid REFERENCES instances (id),
    ADD COLUMN parent_task_run_id  uuid,
    ADD COLUMN depth               integer NOT NULL DEFAULT 0;
UPDATE instances SET definition_name = d.name FROM definitions d WHERE d.id = instances.definition_id;
ALTER TABLE instances ALTER COLUMN definition_name SET NOT NULL;
CREATE UNIQUE INDEX instances_idempotency_key ON instances (tenant_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE UNIQUE INDEX instances_business_key ON instances (tenant_id, definition_name, business_key)
    WHERE business_key IS NOT NULL;
DROP INDEX instances_tenant_created;
CREATE INDEX instances_list ON instances (tenant_id, id DESC);
CREATE INDEX instances_list_definition ON instances (tenant_id, definition_name, id DESC);
CREATE INDEX instances_list_status ON instances (tenant_id, status, id DESC);
CREATE INDEX instances_parent ON instances (parent_instance_id) WHERE parent_instance_id IS NOT NULL;

-- kind: task, http, delay, wait_signal, sub_workflow. A waiting run with
-- available_at is a durable timer (retry backoff, delay, signal timeout).
ALTER TABLE task_runs
    ADD COLUMN kind               text NOT NULL DEFAULT 'task',
    ADD COLUMN external           boolean NOT NULL DEFAULT false,
    ADD COLUMN retryable          boolean NOT NULL DEFAULT false,
    ADD COLUMN config             jsonb,
    ADD COLUMN available_at       timestamptz,
    ADD COLUMN signal             text,
    ADD COLUMN child_instance_id  uuid,
    ADD COLUMN lock_owner         text,
    ADD COLUMN locked_until       timestamptz;
DROP INDEX task_runs_ready;
CREATE INDEX task_runs_ready ON task_runs (created_at) WHERE state = 'ready' AND NOT external;
CREATE INDEX task_runs_external ON task_runs (tenant_id, handler, created_at) WHERE state = 'ready' AND external;
CREATE INDEX task_runs_due ON task_runs (available_at) WHERE state = 'waiting' AND available_at IS NOT NULL;
CREATE INDEX task_runs_locked ON task_runs (locked_until) WHERE state = 'locked';

CREATE TABLE signals (
    id           uuid PRIMARY KEY,
    tenant_id    uuid NOT NULL REFERENCES tenants (id),
    instance_id  uuid NOT NULL REFERENCES instances (id),
    name         text NOT NULL,
    payload      jsonb NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now(),
    consumed_by  uuid
);
CREATE INDEX signals_instance ON signals (instance_id, name, received_at);

CREATE TABLE schedules (
    id            uuid PRIMARY KEY,
    tenant_id     uuid NOT NULL REFERENCES tenants (id),
    name          text NOT NULL,
    definition    text NOT NULL,
    version       integer,
    cron          text NOT NULL,
    input         jsonb NOT NULL,
    enabled       boolean NOT NULL DEFAULT true,
    next_fire_at  timestamptz NOT NULL,
    last_fire_at  timestamptz,
    last_error    text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, name)
);
CREATE INDEX schedules_due ON schedules (next_fire_at) WHERE enabled;
