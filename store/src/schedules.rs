//! Cron schedules of a tenant: create or replace, list, delete.

use chrono::Utc;
use uuid::Uuid;
use ward_shared::schedule::Cron;
use ward_shared::wire::{ScheduleSpec, ScheduleView};

use crate::Cached;
use crate::{Error, Scope, Store, Tenant, scoped};

/// Most schedules one tenant may hold.
pub const SCHEDULES_PER_TENANT_MAX: i64 = 1_000;

impl Store {
    /// Creates or replaces the schedule named `spec.name`; the next tick is
    /// computed from now. Returns the stored schedule and whether it is new.
    pub async fn put_schedule(
        &self,
        tenant: &Tenant,
        spec: &ScheduleSpec,
        cron: &Cron,
    ) -> Result<(ScheduleView, bool), Error> {
        let next_fire_at = cron.next_after(Utc::now()).ok_or_else(|| Error::Invalid {
            field: "cron".into(),
            message: "the expression never fires".into(),
        })?;
        let client = self.pool.get().await?;
        let transaction = scoped(client, Scope::Tenant(tenant.id)).await?;
        let count: i64 = transaction
            .query_one_c(
                "SELECT count(*) FROM schedules WHERE tenant_id = $1 AND name <> $2",
                &[&tenant.id, &spec.name],
            )
            .await?
            .get(0);
        if count >= SCHEDULES_PER_TENANT_MAX {
            return Err(Error::Invalid {
                field: "name".into(),
                message: format!("a tenant may hold at most {SCHEDULES_PER_TENANT_MAX} schedules"),
            });
        }
        let row = transaction
            .query_one_c(
                "INSERT INTO schedules (id, tenant_id, name, definition, version, cron, input, enabled, next_fire_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
                 ON CONFLICT (tenant_id, name) DO UPDATE SET definition = EXCLUDED.definition, \
                 version = EXCLUDED.version, cron = EXCLUDED.cron, input = EXCLUDED.input, \
                 enabled = EXCLUDED.enabled, next_fire_at = EXCLUDED.next_fire_at, last_error = NULL, updated_at = now() \
                 RETURNING (xmax = 0)",
                &[
                    &Uuid::now_v7(),
                    &tenant.id,
                    &spec.name,
                    &spec.definition,
                    &spec.version,
                    &spec.cron,
                    &spec.input,
                    &spec.enabled,
                    &next_fire_at,
                ],
            )
            .await?;
        let created: bool = row.get(0);
        transaction.commit().await?;
        let view = self
            .schedules(tenant)
            .await?
            .into_iter()
            .find(|view| view.name == spec.name);
        let view =
            view.ok_or_else(|| Error::Corrupt("schedule vanished after it was written".into()))?;
        Ok((view, created))
    }

    /// A tenant's schedules by name.
    pub async fn schedules(&self, tenant: &Tenant) -> Result<Vec<ScheduleView>, Error> {
        let client = self.pool.get().await?;
        let client = scoped(client, Scope::Tenant(tenant.id)).await?;
        let rows = client
            .query_c(
                "SELECT name, definition, version, cron, input, enabled, next_fire_at, last_fire_at, last_error \
                 FROM schedules WHERE tenant_id = $1 ORDER BY name LIMIT $2",
                &[&tenant.id, &SCHEDULES_PER_TENANT_MAX],
            )
            .await?;
        Ok(rows
            .into_iter()
            .map(|row| ScheduleView {
                name: row.get(0),
                definition: row.get(1),
                version: row.get(2),
                cron: row.get(3),
                input: row.get(4),
                enabled: row.get(5),
                next_fire_at: row.get(6),
                last_fire_at: row.get(7),
                last_error: row.get(8),
            })
            .collect())
    }

    /// Deletes a schedule; false when there was none by that name.
    pub async fn delete_schedule(&self, tenant: &Tenant, name: &str) -> Result<bool, Error> {
        let client = self.pool.get().await?;
        let client = scoped(client, Scope::Tenant(tenant.id)).await?;
        let deleted = client
            .execute_c(
                "DELETE FROM schedules WHERE tenant_id = $1 AND name = $2",
                &[&tenant.id, &name],
            )
            .await?;
        client.commit().await?;
        Ok(deleted == 1)
    }
}
