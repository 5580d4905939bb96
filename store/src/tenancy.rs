//! Tenant administration and the leader's view of tenants for fair
//! dispatch: tiers, tenant records and quotas, API keys, declarative apply,
//! usage, and the per-tier active-tenant and in-flight queries.

use std::collections::HashMap;

use uuid::Uuid;
pub use ward_shared::wire::{
    ApplyReport, KeyRecord, Quotas, TenantRecord, TenantSpec, TierSpec, Usage,
};

use crate::Cached;
use crate::{Error, Scope, Store, Tenant, Tx, scoped};

/// Most tenants one apply call may carry.
pub const APPLY_TENANTS_MAX: usize = 1_000;
/// Most tenants one admin list page returns.
pub const TENANT_PAGE_MAX: i64 = 500;

/// A tenant with ready work, as the dispatcher needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActiveTenant {
    pub tenant_id: Uuid,
    pub inflight_max: i32,
    pub dispatch_rate_per_s: i32,
}

impl Store {
    /// Every tier by name.
    pub async fn tiers(&self) -> Result<Vec<TierSpec>, Error> {
        let client = self.pool.get().await?;
        let client = scoped(client, Scope::System).await?;
        let rows = client
            .query_c(
                "SELECT name, weight, min_share_percent FROM tiers ORDER BY name",
                &[],
            )
            .await?;
        Ok(rows
            .into_iter()
            .map(|row| TierSpec {
                name: row.get(0),
                weight: row.get(1),
                min_share_percent: row.get(2),
            })
            .collect())
    }

    /// One tenant by slug (any status).
    pub async fn tenant_record(&self, slug: &str) -> Result<Option<TenantRecord>, Error> {
        let client = self.pool.get().await?;
        let client = scoped(client, Scope::System).await?;
        let row = client
            .query_opt(&format!("{TENANT_SELECT} WHERE slug = $1"), &[&slug])
            .await?;
        Ok(row.map(|row| tenant_record(&row)))
    }

    /// A page of tenants ordered by slug, after `after`.
    pub async fn tenant_records(
        &self,
        tier: Option<&str>,
        status: Option<&str>,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<TenantRecord>, Error> {
        let client = self.pool.get().await?;
        let client = scoped(client, Scope::System).await?;
        let rows = client
            .query(
                &format!(
                    "{TENANT_SELECT} WHERE ($1::text IS NULL OR tier = $1) AND ($2::text IS NULL OR status = $2) \
                     AND ($3::text IS NULL OR slug > $3) ORDER BY slug LIMIT $4"
                ),
                &[&tier, &status, &after, &limit.clamp(1, TENANT_PAGE_MAX)],
            )
            .await?;
        Ok(rows.iter().map(tenant_record).collect())
    }

    /// Changes a tenant's tier, status or quotas; `None` when there is no
    /// such tenant. An unknown tier is `Invalid`.
    pub async fn update_tenant(
        &self,
        slug: &str,
        tier: Option<&str>,
        status: Option<&str>,
        quotas: Option<Quotas>,
    ) -> Result<Option<TenantRecord>, Error> {
        let client = self.pool.get().await?;
        let transaction = scoped(client, Scope::System).await?;
        if let Some(tier) = tier {
            check_tier(&transaction, tier).await?;
        }
        let quotas = quotas.map(|q| {
            [
                q.inflight_max,
                q.dispatch_rate_per_s,
                q.running_instances_max,
                q.payload_bytes_max,
            ]
        });
        let quota = |index: usize| quotas.map(|q| q[index]);
        let row = transaction
            .query_opt(
                &format!(
                    "UPDATE tenants SET tier = coalesce($2, tier), status = coalesce($3, status), \
                     inflight_max = coalesce($4, inflight_max), dispatch_rate_per_s = coalesce($5, dispatch_rate_per_s), \
                     running_instances_max = coalesce($6, running_instances_max), \
                     payload_bytes_max = coalesce($7, payload_bytes_max), updated_at = now() \
                     WHERE slug = $1 RETURNING {TENANT_COLUMNS}"
                ),
                &[&slug, &tier, &status, &quota(0), &quota(1), &quota(2), &quota(3)],
            )
            .await?;
        if row.is_some() {
            notify_tenancy(&transaction).await?;
        }
        transaction.commit().await?;
        Ok(row.map(|row| tenant_record(&row)))
    }

    /// Issues another API key for a tenant; the key is returned once.
    pub async fn create_key(&self, slug: &str) -> Result<Option<(KeyRecord, String)>, Error> {
        let client = self.pool.get().await?;
        let transaction = scoped(client, Scope::System).await?;
        let Some(row) = transaction
            .query_opt_c(
                "SELECT id FROM tenants WHERE slug = $1 AND status <> 'deleted'",
                &[&slug],
            )
            .await?
        else {
            return Ok(None);
        };
        let tenant_id: Uuid = row.get(0);
        let issued = crate::tenants::issue_key(&transaction, tenant_id).await?;
        transaction.commit().await?;
        Ok(Some(issued))
    }

    /// A tenant's keys (prefixes only).
    pub async fn keys(&self, slug: &str) -> Result<Option<Vec<KeyRecord>>, Error> {
        let client = self.pool.get().await?;
        let client = scoped(client, Scope::System).await?;
        if client
            .query_opt_c("SELECT 1 FROM tenants WHERE slug = $1", &[&slug])
            .await?
            .is_none()
        {
            return Ok(None);
        }
        let rows = client
            .query_c(
                "SELECT k.id, k.prefix, k.created_at, k.revoked_at FROM api_keys k JOIN tenants t ON t.id = k.tenant_id \
                 WHERE t.slug = $1 ORDER BY k.created_at LIMIT 1000",
                &[&slug],
            )
            .await?;
        Ok(Some(
            rows.into_iter()
                .map(|row| KeyRecord {
                    id: row.get(0),
                    prefix: row.get(1),
                    created_at: row.get(2),
                    revoked_at: row.get(3),
                })
                .collect(),
        ))
    }

    /// Revokes a key; false when the tenant has no such unrevoked key.
    pub async fn revoke_key(&self, slug: &str, key_id: Uuid) -> Result<bool, Error> {
        let client = self.pool.get().await?;
        let transaction = scoped(client, Scope::System).await?;
        let revoked = transaction
            .execute_c(
                "UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL \
                 AND tenant_id = (SELECT id FROM tenants WHERE slug = $2)",
                &[&key_id, &slug],
            )
            .await?;
        if revoked == 1 {
            notify_tenancy(&transaction).await?;
        }
        transaction.commit().await?;
        Ok(revoked == 1)
    }

    /// Applies tiers and tenants declaratively: creates what is missing,
    /// updates what differs, leaves the rest; in one transaction. With
    /// `dry_run`, reports and rolls back.
    pub async fn apply(
        &self,
        tiers: &[TierSpec],
        tenants: &[TenantSpec],
        dry_run: bool,
    ) -> Result<ApplyReport, Error> {
        if tenants.len() > APPLY_TENANTS_MAX {
            return Err(Error::Invalid {
                field: "tenants".into(),
                message: format!("at most {APPLY_TENANTS_MAX} tenants per call; split the file"),
            });
        }
        let client = self.pool.get().await?;
        let transaction = scoped(client, Scope::System).await?;
        let mut report = ApplyReport::default();
        for tier in tiers {
            let row = transaction
                .query_opt_c(
                    "INSERT INTO tiers (name, weight, min_share_percent) VALUES ($1, $2, $3) \
                     ON CONFLICT (name) DO UPDATE SET weight = EXCLUDED.weight, \
                     min_share_percent = EXCLUDED.min_share_percent, updated_at = now() \
                     WHERE (tiers.weight, tiers.min_share_percent) IS DISTINCT FROM (EXCLUDED.weight, EXCLUDED.min_share_percent) \
                     RETURNING (xmax = 0)",
                    &[&tier.name, &tier.weight, &tier.min_share_percent],
                )
                .await?;
            match row {
                Some(row) if row.get::<_, bool>(0) => report.tiers_created.push(tier.name.clone()),
                Some(_) => report.tiers_updated.push(tier.name.clone()),
                None => {}
            }
        }
        let slugs: Vec<&str> = tenants.iter().map(|tenant| tenant.slug.as_str()).collect();
        let existing: HashMap<String, TenantRecord> = transaction
            .query(&format!("{TENANT_SELECT} WHERE slug = ANY($1)"), &[&slugs])
            .await?
            .iter()
            .map(|row| {
                let record = tenant_record(row);
                (record.slug.clone(), record)
            })
            .collect();
        for spec in tenants {
            check_tier(&transaction, &spec.tier).await?;
            let q = spec.quotas;
            match existing.get(&spec.slug) {
                None => {
                    let tenant_id = Uuid::now_v7();
                    transaction
                        .execute_c(
                            "INSERT INTO tenants (id, slug, tier, status, inflight_max, dispatch_rate_per_s, \
                             running_instances_max, payload_bytes_max) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                            &[
                                &tenant_id,
                                &spec.slug,
                                &spec.tier,
                                &spec.status,
                                &q.inflight_max,
                                &q.dispatch_rate_per_s,
                                &q.running_instances_max,
                                &q.payload_bytes_max,
                            ],
                        )
                        .await?;
                    let (_, api_key) = crate::tenants::issue_key(&transaction, tenant_id).await?;
                    report.tenants_created.push(spec.slug.clone());
                    report.keys.push((spec.slug.clone(), api_key));
                }
                Some(record)
                    if record.tier == spec.tier
                        && record.status == spec.status
                        && record.quotas == q =>
                {
                    report.tenants_unchanged += 1;
                }
                Some(_) => {
                    transaction
                        .execute_c(
                            "UPDATE tenants SET tier = $2, status = $3, inflight_max = $4, dispatch_rate_per_s = $5, \
                             running_instances_max = $6, payload_bytes_max = $7, updated_at = now() WHERE slug = $1",
                            &[
                                &spec.slug,
                                &spec.tier,
                                &spec.status,
                                &q.inflight_max,
                                &q.dispatch_rate_per_s,
                                &q.running_instances_max,
                                &q.payload_bytes_max,
                            ],
                        )
                        .await?;
                    report.tenants_updated.push(spec.slug.clone());
                }
            }
        }
        if dry_run {
            report.keys.clear();
            transaction.rollback().await?;
        } else {
            notify_tenancy(&transaction).await?;
            transaction.commit().await?;
        }
        Ok(report)
    }

    /// The tenant's running instances, counted up to `limit` (so the cost is
    /// bounded by the quota, not by history).
    pub async fn running_instances_at_most(
        &self,
        tenant: &Tenant,
        limit: i64,
    ) -> Result<i64, Error> {
        // One statement, no transaction (migration V10).
        let client = self.pool.get().await?;
        let row = client
            .query_one_c(
                "SELECT ward_running_instances($1, $2)",
                &[&tenant.id, &limit],
            )
            .await?;
        Ok(row.get(0))
    }

    /// A tenant's use of its quotas.
    pub async fn usage(&self, tenant: &Tenant) -> Result<Usage, Error> {
        let client = self.pool.get().await?;
        let client = scoped(client, Scope::Tenant(tenant.id)).await?;
        let row = client
            .query_one_c(
                "SELECT (SELECT count(*) FROM instances WHERE tenant_id = $1 AND status = 'running'), \
                 (SELECT count(*) FROM task_runs WHERE tenant_id = $1 AND state IN ('dispatched', 'locked')), \
                 (SELECT count(*) FROM task_runs WHERE tenant_id = $1 AND state = 'ready')",
                &[&tenant.id],
            )
            .await?;
        Ok(Usage {
            running_instances: row.get(0),
            inflight_tasks: row.get(1),
            ready_tasks: row.get(2),
        })
    }

    /// Active tenants of `tier` that have ready (queue) work, with quotas:
    /// a skip scan over the ready index, so the cost grows with the number
    /// of such tenants, not with the backlog.
    pub async fn active_tenants(&self, tier: &str, limit: i64) -> Result<Vec<ActiveTenant>, Error> {
        let client = self.pool.get().await?;
        let client = scoped(client, Scope::System).await?;
        let rows = client
            .query_c(
                "WITH RECURSIVE ready AS ( \
                   (SELECT tenant_id FROM task_runs WHERE tier = $1 AND state = 'ready' AND NOT external \
                    ORDER BY tier, tenant_id LIMIT 1) \
                   UNION ALL \
                   SELECT (SELECT r.tenant_id FROM task_runs r WHERE r.tier = $1 AND r.state = 'ready' AND NOT r.external \
                           AND r.tenant_id > ready.tenant_id ORDER BY r.tier, r.tenant_id LIMIT 1) \
                   FROM ready WHERE ready.tenant_id IS NOT NULL) \
                 SELECT t.id, t.inflight_max, t.dispatch_rate_per_s FROM ready JOIN tenants t ON t.id = ready.tenant_id \
                 WHERE t.status = 'active' LIMIT $2",
                &[&tier, &limit],
            )
            .await?;
        Ok(rows
            .into_iter()
            .map(|row| ActiveTenant {
                tenant_id: row.get(0),
                inflight_max: row.get(1),
                dispatch_rate_per_s: row.get(2),
            })
            .collect())
    }

    /// A tenant's tier and quotas if it is active (for the dispatcher, when
    /// it learns the tenant has ready work).
    pub async fn active_tenant(
        &self,
        tenant_id: Uuid,
    ) -> Result<Option<(String, ActiveTenant)>, Error> {
        let client = self.pool.get().await?;
        let client = scoped(client, Scope::System).await?;
        let row = client
            .query_opt_c(
                "SELECT tier, inflight_max, dispatch_rate_per_s FROM tenants WHERE id = $1 AND status = 'active'",
                &[&tenant_id],
            )
            .await?;
        Ok(row.map(|row| {
            (
                row.get(0),
                ActiveTenant {
                    tenant_id,
                    inflight_max: row.get(1),
                    dispatch_rate_per_s: row.get(2),
                },
            )
        }))
    }

    /// Dispatched, unsettled task runs per (tier, tenant).
    pub async fn inflight(&self) -> Result<HashMap<(String, Uuid), i64>, Error> {
        let client = self.pool.get().await?;
        let client = scoped(client, Scope::System).await?;
        let rows = client
            .query_c("SELECT tier, tenant_id, count(*) FROM task_runs WHERE state = 'dispatched' GROUP BY tier, tenant_id", &[])
            .await?;
        Ok(rows
            .into_iter()
            .map(|row| ((row.get(0), row.get(1)), row.get(2)))
            .collect())
    }
}

async fn check_tier(transaction: &Tx, tier: &str) -> Result<(), Error> {
    if transaction
        .query_opt_c("SELECT 1 FROM tiers WHERE name = $1", &[&tier])
        .await?
        .is_none()
    {
        return Err(Error::Invalid {
            field: "tier".into(),
            message: format!("unknown tier `{tier}`"),
        });
    }
    Ok(())
}

const TENANT_COLUMNS: &str = "id, slug, tier, status, inflight_max, dispatch_rate_per_s, running_instances_max, \
                              payload_bytes_max, created_at, updated_at";
const TENANT_SELECT: &str = "SELECT id, slug, tier, status, inflight_max, dispatch_rate_per_s, running_instances_max, \
                             payload_bytes_max, created_at, updated_at FROM tenants";

fn tenant_record(row: &tokio_postgres::Row) -> TenantRecord {
    TenantRecord {
        id: row.get(0),
        slug: row.get(1),
        tier: row.get(2),
        status: row.get(3),
        quotas: Quotas {
            inflight_max: row.get(4),
            dispatch_rate_per_s: row.get(5),
            running_instances_max: row.get(6),
            payload_bytes_max: row.get(7),
        },
        created_at: row.get(8),
        updated_at: row.get(9),
    }
}

/// Tells every master, once `transaction` commits, that tenants or keys
/// changed (`TENANCY_CHANNEL`).
async fn notify_tenancy(transaction: &Tx) -> Result<(), Error> {
    transaction
        .execute_c("SELECT pg_notify($1, '')", &[&crate::TENANCY_CHANNEL])
        .await?;
    Ok(())
}
