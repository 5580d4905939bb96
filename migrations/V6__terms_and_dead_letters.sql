-- Ward schema, version 6: a record of every leadership term (so a fault
-- experiment can prove no write was accepted from a stale epoch) and the
-- dead-letter table for task messages that could not be processed (poison
-- tasks past the broker's delivery limit, malformed messages).

-- One row per claimed epoch. `claimed_at` is read after the epoch row is
-- locked, so every write fenced by an older epoch committed before it.
CREATE TABLE leader_terms (
    epoch            bigint PRIMARY KEY,
    holder           text NOT NULL,
    etcd_cluster_id  bigint,
    etcd_revision    bigint,
    claimed_at       timestamptz NOT NULL
);
INSERT INTO leader_terms (epoch, holder, etcd_cluster_id, etcd_revision, claimed_at)
    SELECT epoch, holder, etcd_cluster_id, etcd_revision, elected_at FROM leader_epoch;

-- A dead-lettered message. `tenant_id` and the run are null only when the
-- message could not be read at all. One row per (run) message: recording the
-- same dead letter twice is a no-op.
CREATE TABLE dead_letters (
    id            uuid PRIMARY KEY,
    tenant_id     uuid REFERENCES tenants (id),
    instance_id   uuid,
    task_run_id   uuid UNIQUE,
    step_id       text,
    attempt       integer,
    tier          text,
    reason        text NOT NULL,
    deliveries    bigint,
    detail        text NOT NULL,
    body          text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX dead_letters_tenant ON dead_letters (tenant_id, created_at DESC);

ALTER TABLE dead_letters ENABLE ROW LEVEL SECURITY;
ALTER TABLE dead_letters FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON dead_letters USING (ward_visible(tenant_id)) WITH CHECK (ward_visible(tenant_id));
