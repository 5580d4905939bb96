//! Leader-only writes: claiming a leadership epoch and moving ready tasks to
//! dispatched. Each checks the epoch in the same transaction (fencing).

use std::future::Future;

use uuid::Uuid;
use ward_shared::wire::{TaskMessage, task_state};

use crate::{Error, Store};

/// A ready task claimed for dispatch, with the tier queue it goes to.
#[derive(Debug, Clone)]
pub struct ReadyTask {
    pub tier: String,
    pub message: TaskMessage,
}

impl Store {
    /// Records `epoch` as the current leadership term. Fails with `Fenced`
    /// when a newer (or the same) epoch is already recorded. Waits for any
    /// in-flight dispatch of the previous leader to finish first, because that
    /// transaction holds the epoch row in share mode.
    pub async fn claim_epoch(&self, epoch: i64, holder: &str) -> Result<(), Error> {
        let client = self.pool.get().await?;
        let claimed = client
            .execute(
                "INSERT INTO leader_epoch (id, epoch, holder, elected_at) VALUES (1, $1, $2, now()) \
                 ON CONFLICT (id) DO UPDATE SET epoch = EXCLUDED.epoch, holder = EXCLUDED.holder, \
                 elected_at = now() WHERE leader_epoch.epoch < EXCLUDED.epoch",
                &[&epoch, &holder],
            )
            .await?;
        if claimed == 1 {
            return Ok(());
        }
        let epoch_current = self.current_epoch().await?.unwrap_or_default();
        Err(Error::Fenced {
            epoch,
            epoch_current,
        })
    }

    /// The epoch of the current leadership term, if one was ever claimed.
    pub async fn current_epoch(&self) -> Result<Option<i64>, Error> {
        let client = self.pool.get().await?;
        let row = client
            .query_opt("SELECT epoch FROM leader_epoch WHERE id = 1", &[])
            .await?;
        Ok(row.map(|row| row.get(0)))
    }

    /// Claims up to `batch_len_max` ready tasks (oldest first, skipping rows
    /// another transaction holds), hands them to `publish`, and marks them
    /// dispatched in the same transaction once `publish` returns Ok, all under
    /// the epoch check. Returns how many tasks were dispatched.
    ///
    /// If `publish` fails, or the commit does, the tasks stay ready and are
    /// published again later: delivery is at least once, and workers dedupe
    /// by idempotency key.
    pub async fn dispatch_ready<F, Fut, E>(
        &self,
        epoch: i64,
        batch_len_max: i64,
        publish: F,
    ) -> Result<usize, Error>
    where
        F: FnOnce(Vec<ReadyTask>) -> Fut,
        Fut: Future<Output = Result<(), E>>,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let mut client = self.pool.get().await?;
        let transaction = client.transaction().await?;
        check_epoch(&transaction, epoch).await?;
        let rows = transaction
            .query(
                "SELECT id, tenant_id, instance_id, step_id, handler, attempt, tier, idempotency_key, input \
                 FROM task_runs WHERE state = 'ready' ORDER BY created_at LIMIT $1 FOR UPDATE SKIP LOCKED",
                &[&batch_len_max],
            )
            .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let ids: Vec<Uuid> = rows.iter().map(|row| row.get(0)).collect();
        let tasks: Vec<ReadyTask> = rows
            .into_iter()
            .map(|row| ReadyTask {
                tier: row.get(6),
                message: TaskMessage {
                    task_run_id: row.get(0),
                    tenant_id: row.get(1),
                    instance_id: row.get(2),
                    step_id: row.get(3),
                    handler: row.get(4),
                    attempt: row.get(5),
                    idempotency_key: row.get(7),
                    input: row.get(8),
                    epoch,
                },
            })
            .collect();
        publish(tasks)
            .await
            .map_err(|error| Error::Publish(error.into()))?;
        transaction
            .execute(
                "UPDATE task_runs SET state = $1, dispatched_at = now(), dispatch_epoch = $2 \
                 WHERE id = ANY($3) AND state = 'ready'",
                &[&task_state::DISPATCHED, &epoch, &ids],
            )
            .await?;
        transaction.commit().await?;
        Ok(ids.len())
    }

    /// Number of ready tasks per tier (the backlog kept in Postgres).
    pub async fn ready_backlog(&self) -> Result<Vec<(String, i64)>, Error> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT tier, count(*) FROM task_runs WHERE state = 'ready' GROUP BY tier",
                &[],
            )
            .await?;
        Ok(rows
            .into_iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect())
    }
}

/// Locks the epoch row in share mode and compares: a newer leader's
/// `claim_epoch` must wait for this transaction, and this transaction fails if
/// a newer leader already claimed.
async fn check_epoch(
    transaction: &deadpool_postgres::Transaction<'_>,
    epoch: i64,
) -> Result<(), Error> {
    let row = transaction
        .query_opt("SELECT epoch FROM leader_epoch WHERE id = 1 FOR SHARE", &[])
        .await?;
    let epoch_current: i64 = row.map(|row| row.get(0)).unwrap_or_default();
    if epoch_current != epoch {
        return Err(Error::Fenced {
            epoch,
            epoch_current,
        });
    }
    Ok(())
}
