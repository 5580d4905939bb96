-- Ward schema, version 1: tenants, keys, definitions, instances, task runs, leader epoch.
-- Every tenant-owned table carries tenant_id; every lookup filters by it.

CREATE TABLE tenants (
    id          uuid PRIMARY KEY,
    slug        text NOT NULL UNIQUE,
    tier        text NOT NULL,
    status      text NOT NULL DEFAULT 'active',
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE api_keys (
    id          uuid PRIMARY KEY,
    tenant_id   uuid NOT NULL REFERENCES tenants (id),
    prefix      text NOT NULL,
    key_hash    bytea NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
CREATE INDEX api_keys_tenant ON api_keys (tenant_id);

CREATE TABLE definitions (
    id          uuid PRIMARY KEY,
    tenant_id   uuid NOT NULL REFERENCES tenants (id),
    name        text NOT NULL,
    version     integer NOT NULL,
    spec        jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, name, version)
);

CREATE TABLE instances (
    id             uuid PRIMARY KEY,
    tenant_id      uuid NOT NULL REFERENCES tenants (id),
    definition_id  uuid NOT NULL REFERENCES definitions (id),
    status         text NOT NULL,
    input          jsonb NOT NULL,
    output         jsonb,
    error          text,
    business_key   text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    completed_at   timestamptz
);
CREATE INDEX instances_tenant_created ON instances (tenant_id, created_at DESC);

-- One row per attempt of a step. The idempotency key is stable across
-- redeliveries and retries of a step; (idempotency_key, attempt) is unique so a
-- redelivered completion can never insert a second next step.
CREATE TABLE task_runs (
    id               uuid PRIMARY KEY,
    tenant_id        uuid NOT NULL REFERENCES tenants (id),
    instance_id      uuid NOT NULL REFERENCES instances (id),
    step_id          text NOT NULL,
    handler          text NOT NULL,
    attempt          integer NOT NULL,
    tier             text NOT NULL,
    state            text NOT NULL,
    idempotency_key  text NOT NULL,
    input            jsonb NOT NULL,
    output           jsonb,
    error            text,
    dispatch_epoch   bigint,
    created_at       timestamptz NOT NULL DEFAULT now(),
    dispatched_at    timestamptz,
    started_at       timestamptz,
    finished_at      timestamptz,
    UNIQUE (idempotency_key, attempt)
);
CREATE INDEX task_runs_ready ON task_runs (created_at) WHERE state = 'ready';
CREATE INDEX task_runs_instance ON task_runs (instance_id);

-- The fencing token of the current leadership term (the etcd election key's
-- create revision). Leader-only writes lock this row FOR SHARE and compare.
CREATE TABLE leader_epoch (
    id          integer PRIMARY KEY CHECK (id = 1),
    epoch       bigint NOT NULL,
    holder      text NOT NULL,
    elected_at  timestamptz NOT NULL DEFAULT now()
);
