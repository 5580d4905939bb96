//! Settling task runs from outside the engine: a worker's result for a
//! dispatched message, and the external-task API (fetch-and-lock, complete,
//! fail, extend-lock).

use chrono::{DateTime, Utc};
use uuid::Uuid;
use ward_shared::engine::RunState;
use ward_shared::wire::LockedTask;

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};

use serde_json::Value;
use ward_shared::engine::Run;
use ward_shared::wire::status;

use crate::Cached;
use crate::grouped;
use crate::progress::{self, Completion, Locked, Settlement};
use crate::{Error, Scope, Store, Tenant, Tx, scoped};

/// Most tasks one fetch-and-lock may lock.
pub const FETCH_TASKS_MAX: u32 = 100;
/// Longest lock an external worker may hold at once (1 hour).
pub const LOCK_MS_MAX: u64 = 3_600_000;

/// What an external worker's call did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExternalOutcome {
    /// Done; `instance_status` is the instance's status after it (set by
    /// complete and fail, None for extend-lock).
    Applied {
        instance_status: Option<String>,
    },
    /// The task is not locked by this worker (its lock expired, or another
    /// worker holds it, or it already ended); nothing changed.
    NotLocked {
        state: String,
    },
    NotFound,
}

/// A worker's result for one dispatched run (see `Store::complete_tasks`).
#[derive(Debug, Clone, PartialEq)]
pub struct TaskResult {
    pub tenant_id: Uuid,
    pub instance_id: Uuid,
    pub task_run_id: Uuid,
    pub settlement: Settlement,
    pub started_at: DateTime<Utc>,
}

/// Settles the dispatched (or not yet marked) run of a worker's result.
async fn settle_result(transaction: &Tx, result: &TaskResult) -> Result<Completion, Error> {
    progress::settle(
        transaction,
        result.tenant_id,
        result.instance_id,
        result.task_run_id,
        &[RunState::Ready, RunState::Dispatched],
        None,
        result.settlement.clone(),
        Some(result.started_at),
    )
    .await
}

/// Workers' results recorded with one UPDATE (see `Store::complete_tasks`).
#[derive(Default)]
struct Recorded {
    /// Index of each result in the caller's slice.
    index: Vec<usize>,
    tenant_id: Vec<Uuid>,
    instance_id: Vec<Uuid>,
    task_run_id: Vec<Uuid>,
    state: Vec<&'static str>,
    output: Vec<Option<Value>>,
    error: Vec<Option<String>>,
    retryable: Vec<bool>,
    started_at: Vec<DateTime<Utc>>,
}

impl Recorded {
    fn push(&mut self, index: usize, result: &TaskResult) {
        let (state, output, error, retryable) = result.settlement.columns();
        self.index.push(index);
        self.tenant_id.push(result.tenant_id);
        self.instance_id.push(result.instance_id);
        self.task_run_id.push(result.task_run_id);
        self.state.push(state.as_str());
        self.output.push(output.cloned());
        self.error.push(error.map(str::to_owned));
        self.retryable.push(retryable);
        self.started_at.push(result.started_at);
    }

    /// Records the results on runs still ready or dispatched; returns the
    /// runs it changed.
    async fn write(&self, transaction: &Tx) -> Result<HashSet<Uuid>, Error> {
        if self.index.is_empty() {
            return Ok(HashSet::new());
        }
        Ok(transaction
            .query_c(
                "UPDATE task_runs r SET state = v.state, output = v.output, error = v.error, \
                 retryable = v.retryable, started_at = v.started_at, finished_at = now() \
                 FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::jsonb[], $6::text[], \
                 $7::bool[], $8::timestamptz[]) AS v (tenant_id, instance_id, id, state, output, error, \
                 retryable, started_at) \
                 WHERE r.id = ANY($3) AND r.id = v.id AND r.tenant_id = v.tenant_id \
                 AND r.instance_id = v.instance_id \
                 AND r.state IN ('ready', 'dispatched') RETURNING r.id",
                &[
                    &self.tenant_id,
                    &self.instance_id,
                    &self.task_run_id,
                    &self.state,
                    &self.output,
                    &self.error,
                    &self.retryable,
                    &self.started_at,
                ],
            )
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect())
    }
}

impl Store {
    /// Records a worker's result for a dispatched run and applies what
    /// follows, in ONE transaction (waiting for the instance's row lock).
    /// Safe to call again with the same result, including after a COMMIT
    /// whose outcome is unknown: it answers `Duplicate`.
    pub async fn complete_task(&self, result: &TaskResult) -> Result<Completion, Error> {
        let client = self.pool.get().await?;
        let transaction = scoped(client, Scope::Tenant(result.tenant_id)).await?;
        let completion = settle_result(&transaction, result).await?;
        if matches!(completion, Completion::Applied { .. }) {
            transaction.commit().await?;
        }
        Ok(completion)
    }

    /// Group commit: records several workers' results and applies what
    /// follows, in ONE transaction scoped to the tenants of those results.
    /// The instances are locked first, in id order, skipping any another
    /// transaction holds: a result whose instance is busy is not attempted
    /// (`None`), so group commits never queue behind each other; the caller
    /// offers it again, or commits it alone with `complete_task`. On an
    /// error nothing is written.
    ///
    /// Set-based: the results are recorded with one UPDATE, the runs of the
    /// instances that took them read with one SELECT, and each such
    /// instance is planned once with all of its new results; the new runs
    /// and ends are written with one statement each (`grouped`).
    pub async fn complete_tasks(
        &self,
        results: &[TaskResult],
    ) -> Result<Vec<Option<Completion>>, Error> {
        self.complete_many(results, true).await
    }

    /// `complete_tasks` for results that sat out group commits because
    /// their instances were busy: waits for the instance locks (taken in id
    /// order) instead of skipping them, so the stragglers share one
    /// transaction. `None` only for an instance this transaction cannot see.
    pub async fn complete_tasks_waiting(
        &self,
        results: &[TaskResult],
    ) -> Result<Vec<Option<Completion>>, Error> {
        self.complete_many(results, false).await
    }

    async fn complete_many(
        &self,
        results: &[TaskResult],
        skip_locked: bool,
    ) -> Result<Vec<Option<Completion>>, Error> {
        let mut tenants: Vec<Uuid> = results.iter().map(|result| result.tenant_id).collect();
        tenants.sort_unstable();
        tenants.dedup();
        let mut instances: Vec<Uuid> = results.iter().map(|result| result.instance_id).collect();
        instances.sort_unstable();
        instances.dedup();
        let mut wake = Vec::new();
        // Lock and read the instances, in id order, skipping busy ones. By
        // id alone: a `tenant_id = ANY` term here let a plan made before the
        // table had statistics read each tenant's every instance through a
        // list index (its cost grew with the tenant's history). The scope
        // keeps other tenants' rows out, and a result whose instance
        // is of another tenant is answered `Unknown` below. BEGIN, the
        // scope and this go out in one round trip.
        let (transaction, rows) = Tx::begin_query(
            self.pool.get().await?,
            Scope::Tenants(&tenants),
            if skip_locked {
                    "SELECT i.status, i.definition_id, i.input, i.parent_instance_id, i.parent_task_run_id, i.depth, \
                     t.tier, i.tenant_id, i.id FROM instances i JOIN tenants t ON t.id = i.tenant_id \
                     WHERE i.id = ANY($1) ORDER BY i.id FOR UPDATE OF i SKIP LOCKED"
                } else {
                    "SELECT i.status, i.definition_id, i.input, i.parent_instance_id, i.parent_task_run_id, i.depth, \
                     t.tier, i.tenant_id, i.id FROM instances i JOIN tenants t ON t.id = i.tenant_id \
                     WHERE i.id = ANY($1) ORDER BY i.id FOR UPDATE OF i"
            },
            &[&instances],
        )
        .await?;
        let mut locked: HashMap<Uuid, Locked> = HashMap::with_capacity(rows.len());
        for row in &rows {
            if let Some(instance) =
                progress::locked_from_row(&transaction, row.get(7), row.get(8), row).await?
            {
                locked.insert(instance.id, instance);
            }
        }
        // Which results to record: those of a locked instance of their own
        // tenant, once per run (a second copy is answered from the first).
        let mut completions: Vec<Option<Completion>> = vec![None; results.len()];
        let mut first_copy: HashMap<Uuid, usize> = HashMap::new();
        let mut copies: Vec<(usize, usize)> = Vec::new();
        let mut record = Recorded::default();
        for (index, result) in results.iter().enumerate() {
            match locked.get(&result.instance_id) {
                None => {}
                Some(instance) if instance.tenant_id != result.tenant_id => {
                    completions[index] = Some(Completion::Unknown);
                }
                Some(_) => match first_copy.entry(result.task_run_id) {
                    Entry::Occupied(first) => copies.push((index, *first.get())),
                    Entry::Vacant(slot) => {
                        slot.insert(index);
                        record.push(index, result);
                    }
                },
            }
        }
        let updated = record.write(&transaction).await?;
        let missing: Vec<Uuid> = record
            .task_run_id
            .iter()
            .filter(|id| !updated.contains(id))
            .copied()
            .collect();
        let existing: HashSet<(Uuid, Uuid)> = if missing.is_empty() {
            HashSet::new()
        } else {
            transaction
                .query_c(
                    "SELECT tenant_id, id FROM task_runs WHERE tenant_id = ANY($1) AND id = ANY($2)",
                    &[&tenants, &missing],
                )
                .await?
                .iter()
                .map(|row| (row.get(0), row.get(1)))
                .collect()
        };
        // Advance each instance that took a result and still runs, once.
        let mut advanced: Vec<Uuid> = Vec::new();
        for &index in &record.index {
            let result = &results[index];
            if !updated.contains(&result.task_run_id) {
                completions[index] = Some(
                    if existing.contains(&(result.tenant_id, result.task_run_id)) {
                        Completion::Duplicate
                    } else {
                        Completion::Unknown
                    },
                );
            } else if locked[&result.instance_id].status == status::RUNNING {
                advanced.push(result.instance_id);
            }
        }
        advanced.sort_unstable();
        advanced.dedup();
        let mut statuses: HashMap<Uuid, String> = locked
            .values()
            .map(|instance| (instance.id, instance.status.clone()))
            .collect();
        if !advanced.is_empty() {
            let rows = transaction
                .query_c(
                    "SELECT instance_id, step_id, attempt, state, input, output, error, retryable FROM task_runs \
                     WHERE tenant_id = ANY($1) AND instance_id = ANY($2)",
                    &[&tenants, &advanced],
                )
                .await?;
            let mut runs = grouped::runs_by_instance(&rows)?;
            let planned: Vec<(&Locked, Vec<Run>)> = advanced
                .iter()
                .map(|id| (&locked[id], runs.remove(id).unwrap_or_default()))
                .collect();
            let after = grouped::advance_many(&transaction, &planned, &mut wake).await?;
            statuses.extend(advanced.iter().copied().zip(after));
        }
        // An instance this commit ended is credited to its last result here
        // (as if the results were applied one after another).
        let mut ended: HashSet<Uuid> = advanced
            .iter()
            .filter(|id| statuses[*id] != status::RUNNING)
            .copied()
            .collect();
        let mut applied = false;
        for &index in record.index.iter().rev() {
            let result = &results[index];
            if updated.contains(&result.task_run_id) {
                applied = true;
                completions[index] = Some(Completion::Applied {
                    instance_status: statuses[&result.instance_id].clone(),
                    ended: ended.remove(&result.instance_id),
                });
            }
        }
        for (index, first) in copies {
            completions[index] = match &completions[first] {
                Some(Completion::Applied { .. }) => Some(Completion::Duplicate),
                other => other.clone(),
            };
        }
        // Only redeliveries and late answers: nothing was written.
        if applied {
            transaction.commit().await?;
            self.wake_after_commit(wake);
        }
        Ok(completions)
    }

    /// Locks up to `max_tasks` ready external tasks of `handlers` for
    /// `worker_id` until `lock_ms` from now.
    pub async fn fetch_and_lock(
        &self,
        tenant: &Tenant,
        worker_id: &str,
        handlers: &[String],
        max_tasks: u32,
        lock_ms: u64,
    ) -> Result<Vec<LockedTask>, Error> {
        let client = self.pool.get().await?;
        let client = scoped(client, Scope::Tenant(tenant.id)).await?;
        let limit = i64::from(max_tasks.clamp(1, FETCH_TASKS_MAX));
        let lock_ms = i64::try_from(lock_ms.clamp(1, LOCK_MS_MAX)).unwrap_or(i64::MAX);
        let rows = client
            .query_c(
                "UPDATE task_runs SET state = 'locked', lock_owner = $1, \
                 locked_until = now() + $2::bigint * interval '1 millisecond', dispatched_at = now() \
                 WHERE id IN (SELECT id FROM task_runs WHERE tenant_id = $3 AND state = 'ready' AND external \
                 AND handler = ANY($4) ORDER BY created_at LIMIT $5 FOR UPDATE SKIP LOCKED) \
                 RETURNING id, instance_id, step_id, handler, attempt, idempotency_key, input, locked_until",
                &[&worker_id, &lock_ms, &tenant.id, &handlers, &limit],
            )
            .await?;
        client.commit().await?;
        Ok(rows
            .into_iter()
            .map(|row| LockedTask {
                task_run_id: row.get(0),
                instance_id: row.get(1),
                step_id: row.get(2),
                handler: row.get(3),
                attempt: row.get(4),
                idempotency_key: row.get(5),
                input: row.get(6),
                locked_until: row.get(7),
            })
            .collect())
    }

    /// Completes or fails an external task locked by `worker_id`.
    pub async fn settle_external(
        &self,
        tenant: &Tenant,
        task_run_id: Uuid,
        worker_id: &str,
        settlement: Settlement,
    ) -> Result<ExternalOutcome, Error> {
        let client = self.pool.get().await?;
        let transaction = scoped(client, Scope::Tenant(tenant.id)).await?;
        let Some(row) = transaction
            .query_opt_c(
                "SELECT instance_id, dispatched_at FROM task_runs WHERE tenant_id = $1 AND id = $2 AND external",
                &[&tenant.id, &task_run_id],
            )
            .await?
        else {
            return Ok(ExternalOutcome::NotFound);
        };
        let instance_id: Uuid = row.get(0);
        let locked_at: Option<DateTime<Utc>> = row.get(1);
        let completion = progress::settle(
            &transaction,
            tenant.id,
            instance_id,
            task_run_id,
            &[RunState::Locked],
            Some(worker_id),
            settlement,
            locked_at,
        )
        .await?;
        match completion {
            Completion::Applied {
                instance_status, ..
            } => {
                transaction.commit().await?;
                Ok(ExternalOutcome::Applied {
                    instance_status: Some(instance_status),
                })
            }
            Completion::Duplicate => {
                let state: String = transaction
                    .query_one_c("SELECT state FROM task_runs WHERE id = $1", &[&task_run_id])
                    .await?
                    .get(0);
                Ok(ExternalOutcome::NotLocked { state })
            }
            Completion::Unknown => Ok(ExternalOutcome::NotFound),
        }
    }

    /// Extends the lock `worker_id` holds on an external task.
    pub async fn extend_lock(
        &self,
        tenant: &Tenant,
        task_run_id: Uuid,
        worker_id: &str,
        lock_ms: u64,
    ) -> Result<ExternalOutcome, Error> {
        let client = self.pool.get().await?;
        let client = scoped(client, Scope::Tenant(tenant.id)).await?;
        let lock_ms = i64::try_from(lock_ms.clamp(1, LOCK_MS_MAX)).unwrap_or(i64::MAX);
        let extended = client
            .execute_c(
                "UPDATE task_runs SET locked_until = now() + $1::bigint * interval '1 millisecond' \
                 WHERE tenant_id = $2 AND id = $3 AND external AND state = 'locked' AND lock_owner = $4",
                &[&lock_ms, &tenant.id, &task_run_id, &worker_id],
            )
            .await?;
        if extended == 1 {
            client.commit().await?;
            return Ok(ExternalOutcome::Applied {
                instance_status: None,
            });
        }
        let row = client
            .query_opt_c(
                "SELECT state FROM task_runs WHERE tenant_id = $1 AND id = $2 AND external",
                &[&tenant.id, &task_run_id],
            )
            .await?;
        Ok(match row {
            Some(row) => ExternalOutcome::NotLocked { state: row.get(0) },
            None => ExternalOutcome::NotFound,
        })
    }
}
