//! The dead-letter table: task messages the broker gave up on (past the
//! delivery limit, or rejected as unreadable), recorded with the reason, and
//! the run they carried failed for good so its instance does not wait forever.

use tokio_postgres::Row;
use uuid::Uuid;
use ward_shared::engine::RunState;
use ward_shared::wire::{DeadLetterRecord, TaskMessage};

use crate::Cached;
use crate::progress::{self, Completion, Settlement};
use crate::{Error, Scope, Store, scoped};

/// Most dead letters one listing returns.
pub const DEAD_LETTER_PAGE_MAX: i64 = 500;
/// Longest message body kept in the table, in bytes.
pub const DEAD_LETTER_BODY_BYTES_MAX: usize = 64 * 1024;

/// A message the broker dead-lettered.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The task it carried, when the body could be read.
    pub message: Option<TaskMessage>,
    pub reason: String,
    pub deliveries: Option<i64>,
    pub body: Vec<u8>,
}

/// What recording a dead letter did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadLetterOutcome {
    /// Recorded, and the run it carried was failed (the instance now has
    /// `instance_status`).
    RunFailed { instance_status: String },
    /// Recorded; the run had already ended (a late copy), or there was none.
    Recorded,
    /// Already recorded: a redelivery of the dead letter itself.
    Duplicate,
}

impl Store {
    /// Records a dead letter and fails the run it carried (not retryable:
    /// the broker already delivered it as often as allowed), in ONE
    /// transaction. Safe to call again with the same message.
    pub async fn record_dead_letter(
        &self,
        letter: &DeadLetter,
    ) -> Result<DeadLetterOutcome, Error> {
        let client = self.pool.get().await?;
        let transaction = scoped(client, Scope::System).await?;
        let message = letter.message.as_ref();
        let tier: Option<String> = match message {
            Some(message) => transaction
                .query_opt_c(
                    "SELECT tier FROM task_runs WHERE tenant_id = $1 AND id = $2",
                    &[&message.tenant_id, &message.task_run_id],
                )
                .await?
                .map(|row| row.get(0)),
            None => None,
        };
        let detail = match (message, letter.reason.as_str()) {
            (Some(message), "delivery_limit") => format!(
                "task `{}` (handler `{}`, attempt {}) was delivered {} times without a result: \
                 each delivery crashed or stalled its worker",
                message.step_id,
                message.handler,
                message.attempt,
                letter
                    .deliveries
                    .map_or_else(|| "too many".to_owned(), |count| count.to_string())
            ),
            (Some(message), reason) => format!(
                "task `{}` (handler `{}`, attempt {}) was dead-lettered by the broker: {reason}",
                message.step_id, message.handler, message.attempt
            ),
            (None, reason) => format!("unreadable task message dead-lettered: {reason}"),
        };
        // Postgres text holds no NUL: drop them from what is kept.
        let mut body = String::from_utf8_lossy(&letter.body).replace('\0', "");
        let detail = detail.replace('\0', "");
        if body.len() > DEAD_LETTER_BODY_BYTES_MAX {
            let mut cut = DEAD_LETTER_BODY_BYTES_MAX;
            while !body.is_char_boundary(cut) {
                cut -= 1;
            }
            body.truncate(cut);
        }
        // A dead letter of a known run is recorded once; an unreadable one each time.
        let tenant_known = match message {
            Some(message) => transaction
                .query_opt_c("SELECT 1 FROM tenants WHERE id = $1", &[&message.tenant_id])
                .await?
                .is_some(),
            None => false,
        };
        let message = message.filter(|_| tenant_known);
        let inserted = transaction
            .execute_c(
                "INSERT INTO dead_letters (id, tenant_id, instance_id, task_run_id, step_id, attempt, tier, \
                 reason, deliveries, detail, body) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
                 ON CONFLICT (task_run_id) DO NOTHING",
                &[
                    &Uuid::new_v4(),
                    &message.map(|message| message.tenant_id),
                    &message.map(|message| message.instance_id),
                    &message.map(|message| message.task_run_id),
                    &message.map(|message| message.step_id.as_str()),
                    &message.map(|message| message.attempt),
                    &tier,
                    &letter.reason,
                    &letter.deliveries,
                    &detail,
                    &body,
                ],
            )
            .await?;
        if inserted == 0 {
            return Ok(DeadLetterOutcome::Duplicate);
        }
        let mut outcome = DeadLetterOutcome::Recorded;
        if let Some(message) = message {
            let completion = progress::settle(
                &transaction,
                message.tenant_id,
                message.instance_id,
                message.task_run_id,
                &[RunState::Ready, RunState::Dispatched],
                None,
                Settlement::Failed {
                    error: format!("dead-lettered: {detail}"),
                    retryable: false,
                },
                None,
            )
            .await?;
            if let Completion::Applied {
                instance_status, ..
            } = completion
            {
                outcome = DeadLetterOutcome::RunFailed { instance_status };
            }
        }
        transaction.commit().await?;
        Ok(outcome)
    }

    /// The newest dead letters (of one tenant, or of all when `tenant_id` is
    /// None), at most `limit` (capped at `DEAD_LETTER_PAGE_MAX`).
    pub async fn dead_letters(
        &self,
        tenant_id: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<DeadLetterRecord>, Error> {
        let limit = limit.clamp(1, DEAD_LETTER_PAGE_MAX);
        let client = self.pool.get().await?;
        let scope = match tenant_id {
            Some(tenant_id) => Scope::Tenant(tenant_id),
            None => Scope::System,
        };
        let transaction = scoped(client, scope).await?;
        let rows = transaction
            .query_c(
                "SELECT id, tenant_id, instance_id, task_run_id, step_id, attempt, tier, reason, \
                 deliveries, detail, created_at FROM dead_letters \
                 WHERE ($1::uuid IS NULL OR tenant_id = $1) ORDER BY created_at DESC LIMIT $2",
                &[&tenant_id, &limit],
            )
            .await?;
        transaction.commit().await?;
        Ok(rows.iter().map(record).collect())
    }
}

fn record(row: &Row) -> DeadLetterRecord {
    DeadLetterRecord {
        id: row.get(0),
        tenant_id: row.get(1),
        instance_id: row.get(2),
        task_run_id: row.get(3),
        step_id: row.get(4),
        attempt: row.get(5),
        tier: row.get(6),
        reason: row.get(7),
        deliveries: row.get(8),
        detail: row.get(9),
        created_at: row.get(10),
    }
}
