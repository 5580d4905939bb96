//! Worker commits: a task run's result and the instance transition it causes,
//! in ONE transaction guarded by the task run's state, so a redelivered
//! message changes nothing.

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;
use ward_shared::Definition;
use ward_shared::transition::{self, Outcome, Transition, idempotency_key};
use ward_shared::wire::{TaskMessage, status, task_state};

use crate::{Error, READY_CHANNEL, Store};

/// What committing a task run's result did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Completion {
    /// The result was recorded; the instance now has this status.
    Applied { instance_status: String },
    /// The task run was already finished: a redelivery; nothing changed.
    Duplicate,
    /// No such task run or instance for this tenant; nothing changed.
    Unknown,
}

impl Store {
    /// Records `outcome` for the task run in `message` and applies the
    /// resulting transition (next step ready, instance completed or failed).
    ///
    /// Safe to call again with the same message, including after a COMMIT
    /// whose result is unknown: the second call answers `Duplicate`.
    pub async fn complete_task(
        &self,
        message: &TaskMessage,
        outcome: &Outcome,
        started_at: DateTime<Utc>,
    ) -> Result<Completion, Error> {
        let mut client = self.pool.get().await?;
        let transaction = client.transaction().await?;
        // Lock the instance first: concurrent completions of one instance serialize here.
        let Some(instance) = transaction
            .query_opt(
                "SELECT i.status, d.spec FROM instances i JOIN definitions d ON d.id = i.definition_id \
                 WHERE i.tenant_id = $1 AND i.id = $2 FOR UPDATE OF i",
                &[&message.tenant_id, &message.instance_id],
            )
            .await?
        else {
            return Ok(Completion::Unknown);
        };
        let instance_status: String = instance.get(0);
        let (state, output, error) = match outcome {
            Outcome::Succeeded { output } => (task_state::COMPLETED, Some(output), None),
            Outcome::Failed { error } => (task_state::FAILED, None, Some(error.as_str())),
        };
        let Some(task_run) = transaction
            .query_opt(
                "UPDATE task_runs SET state = $1, output = $2, error = $3, started_at = $4, finished_at = now() \
                 WHERE tenant_id = $5 AND id = $6 AND state IN ('ready', 'dispatched') RETURNING tier",
                &[
                    &state,
                    &output,
                    &error,
                    &started_at,
                    &message.tenant_id,
                    &message.task_run_id,
                ],
            )
            .await?
        else {
            let exists = transaction
                .query_opt(
                    "SELECT 1 FROM task_runs WHERE tenant_id = $1 AND id = $2",
                    &[&message.tenant_id, &message.task_run_id],
                )
                .await?
                .is_some();
            return Ok(if exists {
                Completion::Duplicate
            } else {
                Completion::Unknown
            });
        };
        let tier: String = task_run.get(0);
        if instance_status != status::RUNNING {
            transaction.commit().await?;
            return Ok(Completion::Applied { instance_status });
        }
        let definition: Definition = serde_json::from_value(instance.get(1))
            .map_err(|error| Error::Corrupt(error.to_string()))?;
        let new_status = match transition::after_step(&definition, &message.step_id, outcome) {
            Transition::Next { step, input } => {
                insert_ready(
                    &transaction,
                    message,
                    &tier,
                    step.id.as_str(),
                    step.handler_name(),
                    &input,
                )
                .await?;
                touch_instance(&transaction, message).await?;
                status::RUNNING
            }
            Transition::Complete { output } => {
                finish_instance(
                    &transaction,
                    message,
                    status::COMPLETED,
                    Some(&output),
                    None,
                )
                .await?;
                status::COMPLETED
            }
            Transition::Fail { error } => {
                finish_instance(&transaction, message, status::FAILED, None, Some(&error)).await?;
                status::FAILED
            }
        };
        transaction.commit().await?;
        Ok(Completion::Applied {
            instance_status: new_status.to_owned(),
        })
    }
}

async fn insert_ready(
    transaction: &deadpool_postgres::Transaction<'_>,
    message: &TaskMessage,
    tier: &str,
    step_id: &str,
    handler: &str,
    input: &Value,
) -> Result<(), Error> {
    transaction
        .execute(
            "INSERT INTO task_runs (id, tenant_id, instance_id, step_id, handler, attempt, tier, state, \
             idempotency_key, input) VALUES ($1, $2, $3, $4, $5, 1, $6, $7, $8, $9) \
             ON CONFLICT (idempotency_key, attempt) DO NOTHING",
            &[
                &Uuid::now_v7(),
                &message.tenant_id,
                &message.instance_id,
                &step_id,
                &handler,
                &tier,
                &task_state::READY,
                &idempotency_key(message.instance_id, step_id),
                input,
            ],
        )
        .await?;
    transaction
        .execute("SELECT pg_notify($1, '')", &[&READY_CHANNEL])
        .await?;
    Ok(())
}

async fn touch_instance(
    transaction: &deadpool_postgres::Transaction<'_>,
    message: &TaskMessage,
) -> Result<(), Error> {
    transaction
        .execute(
            "UPDATE instances SET updated_at = now() WHERE tenant_id = $1 AND id = $2",
            &[&message.tenant_id, &message.instance_id],
        )
        .await?;
    Ok(())
}

async fn finish_instance(
    transaction: &deadpool_postgres::Transaction<'_>,
    message: &TaskMessage,
    new_status: &str,
    output: Option<&Value>,
    error: Option<&str>,
) -> Result<(), Error> {
    transaction
        .execute(
            "UPDATE instances SET status = $1, output = $2, error = $3, updated_at = now(), \
             completed_at = now() WHERE tenant_id = $4 AND id = $5",
            &[
                &new_status,
                &output,
                &error,
                &message.tenant_id,
                &message.instance_id,
            ],
        )
        .await?;
    Ok(())
}
