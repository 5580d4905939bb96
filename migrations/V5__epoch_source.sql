-- Ward schema, version 5: the fencing epoch is a Postgres counter. A leader
-- may claim the next epoch only with a newer election revision of the same
-- etcd cluster, or from another etcd cluster (etcd rebuilt from scratch,
-- whose revisions start over): so losing etcd's data cannot leave Ward
-- without a leader, and a stale leader still cannot claim.

ALTER TABLE leader_epoch
    ADD COLUMN etcd_cluster_id bigint,
    ADD COLUMN etcd_revision bigint;
UPDATE leader_epoch SET etcd_revision = epoch;
