//! Definitions and instances: publishing versions, starting an instance with
//! its first ready task in one transaction, and reading an instance back.

use serde_json::Value;
use uuid::Uuid;
use ward_shared::Definition;
use ward_shared::transition::idempotency_key;
use ward_shared::wire::{InstanceView, StartInstance, StepView, status, task_state};

use crate::{Error, READY_CHANNEL, Store, Tenant};

/// A published definition version.
#[derive(Debug, Clone)]
pub struct Published {
    pub id: Uuid,
    pub version: i32,
    pub created: bool,
}

/// A started instance.
#[derive(Debug, Clone)]
pub struct Started {
    pub id: Uuid,
    pub definition: String,
    pub version: i32,
}

impl Store {
    /// Stores `definition` as version N+1 of its name, unless the latest
    /// version is identical, in which case that version is returned.
    pub async fn publish_definition(
        &self,
        tenant: &Tenant,
        definition: &Definition,
    ) -> Result<Published, Error> {
        let spec =
            serde_json::to_value(definition).map_err(|error| Error::Corrupt(error.to_string()))?;
        let mut client = self.pool.get().await?;
        let transaction = client.transaction().await?;
        transaction
            .execute(
                "SELECT pg_advisory_xact_lock(hashtext($1::text || '/' || $2))",
                &[&tenant.id.to_string(), &definition.name],
            )
            .await?;
        let latest = transaction
            .query_opt(
                "SELECT id, version, spec FROM definitions WHERE tenant_id = $1 AND name = $2 \
                 ORDER BY version DESC LIMIT 1",
                &[&tenant.id, &definition.name],
            )
            .await?;
        if let Some(row) = &latest {
            let latest_spec: Value = row.get(2);
            if latest_spec == spec {
                return Ok(Published {
                    id: row.get(0),
                    version: row.get(1),
                    created: false,
                });
            }
        }
        let version = latest.map(|row| row.get::<_, i32>(1)).unwrap_or(0) + 1;
        let id = Uuid::now_v7();
        transaction
            .execute(
                "INSERT INTO definitions (id, tenant_id, name, version, spec) VALUES ($1, $2, $3, $4, $5)",
                &[&id, &tenant.id, &definition.name, &version, &spec],
            )
            .await?;
        transaction.commit().await?;
        Ok(Published {
            id,
            version,
            created: true,
        })
    }

    /// Starts an instance: writes it and its first ready task in ONE
    /// transaction and wakes the dispatcher. Every ingress calls this.
    pub async fn start_instance(
        &self,
        tenant: &Tenant,
        request: &StartInstance,
    ) -> Result<Started, Error> {
        let mut client = self.pool.get().await?;
        let transaction = client.transaction().await?;
        let row = transaction
            .query_opt(
                "SELECT id, version, spec FROM definitions \
                 WHERE tenant_id = $1 AND name = $2 AND ($3::int IS NULL OR version = $3) \
                 ORDER BY version DESC LIMIT 1",
                &[&tenant.id, &request.definition, &request.version],
            )
            .await?
            .ok_or_else(|| Error::DefinitionNotFound {
                name: request.definition.clone(),
                version: request.version,
            })?;
        let definition_id: Uuid = row.get(0);
        let version: i32 = row.get(1);
        let definition: Definition = serde_json::from_value(row.get(2))
            .map_err(|error| Error::Corrupt(error.to_string()))?;
        let instance_id = Uuid::now_v7();
        transaction
            .execute(
                "INSERT INTO instances (id, tenant_id, definition_id, status, input, business_key) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[
                    &instance_id,
                    &tenant.id,
                    &definition_id,
                    &status::RUNNING,
                    &request.input,
                    &request.business_key,
                ],
            )
            .await?;
        let step = definition.first_step();
        transaction
            .execute(
                "INSERT INTO task_runs (id, tenant_id, instance_id, step_id, handler, attempt, tier, \
                 state, idempotency_key, input) VALUES ($1, $2, $3, $4, $5, 1, $6, $7, $8, $9)",
                &[
                    &Uuid::now_v7(),
                    &tenant.id,
                    &instance_id,
                    &step.id,
                    &step.handler_name(),
                    &tenant.tier,
                    &task_state::READY,
                    &idempotency_key(instance_id, &step.id),
                    &request.input,
                ],
            )
            .await?;
        transaction
            .execute("SELECT pg_notify($1, '')", &[&READY_CHANNEL])
            .await?;
        transaction.commit().await?;
        Ok(Started {
            id: instance_id,
            definition: definition.name,
            version,
        })
    }

    /// An instance of `tenant` with its task runs, or `None` if the tenant
    /// has no such instance.
    pub async fn instance(
        &self,
        tenant: &Tenant,
        instance_id: Uuid,
    ) -> Result<Option<InstanceView>, Error> {
        let mut client = self.pool.get().await?;
        let transaction = client
            .build_transaction()
            .read_only(true)
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .start()
            .await?;
        let Some(row) = transaction
            .query_opt(
                "SELECT i.id, d.name, d.version, i.status, i.input, i.output, i.error, \
                 i.business_key, i.created_at, i.updated_at, i.completed_at \
                 FROM instances i JOIN definitions d ON d.id = i.definition_id \
                 WHERE i.tenant_id = $1 AND i.id = $2",
                &[&tenant.id, &instance_id],
            )
            .await?
        else {
            return Ok(None);
        };
        let steps = transaction
            .query(
                "SELECT id, step_id, handler, attempt, state, idempotency_key, input, output, error, \
                 created_at, dispatched_at, started_at, finished_at \
                 FROM task_runs WHERE tenant_id = $1 AND instance_id = $2 ORDER BY created_at, id",
                &[&tenant.id, &instance_id],
            )
            .await?
            .into_iter()
            .map(|step| StepView {
                task_run_id: step.get(0),
                step_id: step.get(1),
                handler: step.get(2),
                attempt: step.get(3),
                state: step.get(4),
                idempotency_key: step.get(5),
                input: step.get(6),
                output: step.get(7),
                error: step.get(8),
                created_at: step.get(9),
                dispatched_at: step.get(10),
                started_at: step.get(11),
                finished_at: step.get(12),
            })
            .collect();
        transaction.commit().await?;
        Ok(Some(InstanceView {
            id: row.get(0),
            definition: row.get(1),
            version: row.get(2),
            status: row.get(3),
            input: row.get(4),
            output: row.get(5),
            error: row.get(6),
            business_key: row.get(7),
            created_at: row.get(8),
            updated_at: row.get(9),
            completed_at: row.get(10),
            steps,
        }))
    }
}
