//! Moves instances forward inside a transaction: records a run's result,
//! asks the engine (`ward_shared::engine::plan`) what follows, and writes it:
//! new runs, timers, child instances, the instance's end, and the parent's
//! step when a child ends. Every caller holds the instance row lock.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use crate::Tx;
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use serde_json::{Value, json};
use uuid::Uuid;
use ward_shared::engine::{self, End, Run, RunState, Start, idempotency_key};
use ward_shared::wire::status;
use ward_shared::{Definition, StepKind};

use crate::Cached;
use crate::{Error, READY_CHANNEL};

/// Deepest nesting of sub-workflows.
pub const DEPTH_MAX: i32 = 8;

/// What settling a run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Completion {
    /// The result was recorded; the instance now has this status, and
    /// `ended` says whether this result ended it (count it once).
    Applied {
        instance_status: String,
        ended: bool,
    },
    /// The run was no longer in the expected state: a redelivery or a late
    /// answer; nothing changed.
    Duplicate,
    /// No such run or instance for this tenant; nothing changed.
    Unknown,
}

/// A run's result.
#[derive(Debug, Clone, PartialEq)]
pub enum Settlement {
    Succeeded(Value),
    Failed { error: String, retryable: bool },
    TimedOut(String),
}

impl Settlement {
    /// The run's new state, output, error and retryable flag.
    pub(crate) fn columns(&self) -> (RunState, Option<&Value>, Option<&str>, bool) {
        match self {
            Settlement::Succeeded(output) => (RunState::Completed, Some(output), None, false),
            Settlement::Failed { error, retryable } => {
                (RunState::Failed, None, Some(error.as_str()), *retryable)
            }
            Settlement::TimedOut(error) => (RunState::TimedOut, None, Some(error.as_str()), false),
        }
    }
}

/// An instance row, locked.
#[derive(Debug, Clone)]
pub(crate) struct Locked {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub tier: String,
    pub status: String,
    pub definition: Arc<Definition>,
    pub input: Value,
    pub parent: Option<(Uuid, Uuid)>,
    pub depth: i32,
}

/// Most parsed definitions a process keeps.
const DEFINITIONS_CACHED_MAX: usize = 4_096;

/// Parsed definitions by id. A stored definition version never changes, so
/// an entry never goes stale; ids are only ever looked up after reading
/// them from a row the transaction's tenant scope can see.
static DEFINITIONS: LazyLock<Mutex<HashMap<Uuid, Arc<Definition>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// The definition version `id` if this process parsed it already.
pub(crate) fn cached_definition(id: Uuid) -> Option<Arc<Definition>> {
    DEFINITIONS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(&id)
        .cloned()
}

/// The definition version `id`, parsed once per process.
pub(crate) async fn definition_by_id(transaction: &Tx, id: Uuid) -> Result<Arc<Definition>, Error> {
    let cached = DEFINITIONS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(&id)
        .cloned();
    if let Some(definition) = cached {
        return Ok(definition);
    }
    let spec: Value = transaction
        .query_one_c("SELECT spec FROM definitions WHERE id = $1", &[&id])
        .await?
        .get(0);
    let definition: Arc<Definition> =
        Arc::new(serde_json::from_value(spec).map_err(|error| Error::Corrupt(error.to_string()))?);
    let mut cache = DEFINITIONS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if cache.len() >= DEFINITIONS_CACHED_MAX {
        cache.clear();
    }
    cache.insert(id, definition.clone());
    Ok(definition)
}

/// Locks an instance of a tenant (FOR UPDATE) with its definition.
pub(crate) async fn lock_instance(
    transaction: &Tx,
    tenant_id: Uuid,
    instance_id: Uuid,
) -> Result<Option<Locked>, Error> {
    let Some(row) = transaction
        .query_opt_c(
            "SELECT i.status, i.definition_id, i.input, i.parent_instance_id, i.parent_task_run_id, i.depth, t.tier \
             FROM instances i JOIN tenants t ON t.id = i.tenant_id \
             WHERE i.tenant_id = $1 AND i.id = $2 FOR UPDATE OF i",
            &[&tenant_id, &instance_id],
        )
        .await?
    else {
        return Ok(None);
    };
    locked_from_row(transaction, tenant_id, instance_id, &row).await
}

pub(crate) async fn locked_from_row(
    transaction: &Tx,
    tenant_id: Uuid,
    instance_id: Uuid,
    row: &tokio_postgres::Row,
) -> Result<Option<Locked>, Error> {
    let definition = definition_by_id(transaction, row.get(1)).await?;
    let parent_instance: Option<Uuid> = row.get(3);
    let parent_run: Option<Uuid> = row.get(4);
    Ok(Some(Locked {
        id: instance_id,
        tenant_id,
        tier: row.get(6),
        status: row.get(0),
        definition,
        input: row.get(2),
        parent: parent_instance.zip(parent_run),
        depth: row.get(5),
    }))
}

/// Records `settlement` on a run that is in one of `expected` states (and,
/// for external tasks, locked by `lock_owner`), then advances the instance.
#[allow(clippy::too_many_arguments)]
pub(crate) fn settle<'a>(
    transaction: &'a Tx,
    tenant_id: Uuid,
    instance_id: Uuid,
    task_run_id: Uuid,
    expected: &'a [RunState],
    lock_owner: Option<&'a str>,
    settlement: Settlement,
    started_at: Option<DateTime<Utc>>,
) -> BoxFuture<'a, Result<Completion, Error>> {
    Box::pin(async move {
        let (state, output, error, retryable) = settlement.columns();
        let expected: Vec<&str> = expected.iter().map(|state| state.as_str()).collect();
        // One round trip: lock the instance, then (only if it exists) record
        // the result on the run; lock order instance, then run.
        let Some(row) = transaction
            .query_opt_c(
                "WITH i AS (SELECT i.status, i.definition_id, i.input, i.parent_instance_id, i.parent_task_run_id, \
                 i.depth, t.tier FROM instances i JOIN tenants t ON t.id = i.tenant_id \
                 WHERE i.tenant_id = $6 AND i.id = $8 FOR UPDATE OF i), \
                 u AS (UPDATE task_runs SET state = $1, output = $2, error = $3, retryable = $4, \
                 started_at = coalesce($5, started_at), finished_at = now() \
                 WHERE tenant_id = $6 AND id = $7 AND instance_id = $8 AND state = ANY($9) \
                 AND ($10::text IS NULL OR lock_owner = $10) AND EXISTS (SELECT 1 FROM i) RETURNING 1) \
                 SELECT i.status, i.definition_id, i.input, i.parent_instance_id, i.parent_task_run_id, i.depth, \
                 i.tier, (SELECT count(*) FROM u) FROM i",
                &[
                    &state.as_str(),
                    &output,
                    &error,
                    &retryable,
                    &started_at,
                    &tenant_id,
                    &task_run_id,
                    &instance_id,
                    &expected,
                    &lock_owner,
                ],
            )
            .await?
        else {
            return Ok(Completion::Unknown);
        };
        let updated: i64 = row.get(7);
        let Some(instance) = locked_from_row(transaction, tenant_id, instance_id, &row).await?
        else {
            return Ok(Completion::Unknown);
        };
        if updated == 0 {
            let exists = transaction
                .query_opt_c(
                    "SELECT 1 FROM task_runs WHERE tenant_id = $1 AND id = $2",
                    &[&tenant_id, &task_run_id],
                )
                .await?
                .is_some();
            return Ok(if exists {
                Completion::Duplicate
            } else {
                Completion::Unknown
            });
        }
        if instance.status != status::RUNNING {
            return Ok(Completion::Applied {
                instance_status: instance.status,
                ended: false,
            });
        }
        let instance_status = advance(transaction, &instance, true).await?;
        let ended = instance_status != status::RUNNING;
        Ok(Completion::Applied {
            instance_status,
            ended,
        })
    })
}

/// Plans and applies until nothing more happens at once; returns the
/// instance's status. When the instance ends and `notify_parent` is set, the
/// parent's sub-workflow step is settled too.
pub(crate) fn advance<'a>(
    transaction: &'a Tx,
    instance: &'a Locked,
    notify_parent: bool,
) -> BoxFuture<'a, Result<String, Error>> {
    advance_from(transaction, instance, notify_parent, None)
}

/// `advance` for an instance created in this transaction: it has no runs
/// yet, so the first round plans without reading them.
pub(crate) fn advance_new<'a>(
    transaction: &'a Tx,
    instance: &'a Locked,
    notify_parent: bool,
) -> BoxFuture<'a, Result<String, Error>> {
    advance_from(transaction, instance, notify_parent, Some(Vec::new()))
}

/// `advance` of an instance this transaction already locked, read again
/// first (this transaction may have changed it since); returns its status.
pub(crate) async fn advance_again(transaction: &Tx, instance: &Locked) -> Result<String, Error> {
    let Some(instance) = lock_instance(transaction, instance.tenant_id, instance.id).await? else {
        return Err(Error::Corrupt(format!("instance {} vanished", instance.id)));
    };
    if instance.status != status::RUNNING {
        return Ok(instance.status);
    }
    advance(transaction, &instance, true).await
}

fn advance_from<'a>(
    transaction: &'a Tx,
    instance: &'a Locked,
    notify_parent: bool,
    mut known_runs: Option<Vec<Run>>,
) -> BoxFuture<'a, Result<String, Error>> {
    Box::pin(async move {
        let rounds_max = instance.definition.steps.len() * 2 + 2;
        for _ in 0..rounds_max {
            let runs = match known_runs.take() {
                Some(runs) => runs,
                None => load_runs(transaction, instance).await?,
            };
            let plan = engine::plan(
                &instance.definition,
                &instance.input,
                &runs,
                rand::random::<f64>(),
            );
            if let Some(end) = plan.end {
                return finish(transaction, instance, end, notify_parent).await;
            }
            // Runs of tasks, HTTP calls and delays settle nothing at once:
            // write them with one INSERT (and the wake-up when one is ready).
            if plain(instance, &plan.starts) {
                let mut rows = RunRows::default();
                for start in &plan.starts {
                    rows.push_start(instance, start)?;
                }
                rows.write(transaction).await?;
                return Ok(status::RUNNING.to_owned());
            }
            let mut settled_now = false;
            for start in &plan.starts {
                settled_now |= insert_start(transaction, instance, start).await?;
            }
            if !settled_now {
                return Ok(status::RUNNING.to_owned());
            }
        }
        Ok(status::RUNNING.to_owned())
    })
}

async fn load_runs(transaction: &Tx, instance: &Locked) -> Result<Vec<Run>, Error> {
    let rows = transaction
        .query_c(
            "SELECT step_id, attempt, state, input, output, error, retryable FROM task_runs \
             WHERE tenant_id = $1 AND instance_id = $2",
            &[&instance.tenant_id, &instance.id],
        )
        .await?;
    rows.iter().map(|row| run_from_row(row, 0)).collect()
}

/// The columns step_id, attempt, state, input, output, error, retryable of
/// a task run, starting at column `first`.
pub(crate) fn run_from_row(row: &tokio_postgres::Row, first: usize) -> Result<Run, Error> {
    let state: String = row.get(first + 2);
    Ok(Run {
        step_id: row.get(first),
        attempt: row.get(first + 1),
        state: RunState::parse(&state)
            .ok_or_else(|| Error::Corrupt(format!("task run state `{state}`")))?,
        input: row.get(first + 3),
        output: row.get(first + 4),
        error: row.get(first + 5),
        retryable: row.get(first + 6),
    })
}

/// True when every start is a task, HTTP call or delay (or skipped): one
/// INSERT each that settles nothing at once (see [`RunRows`]).
pub(crate) fn plain(instance: &Locked, starts: &[Start]) -> bool {
    starts.iter().all(|start| {
        start.skipped
            || instance
                .definition
                .step(&start.step_id)
                .is_some_and(|step| {
                    matches!(step.kind, StepKind::Task | StepKind::Http | StepKind::Delay)
                })
    })
}

/// New task runs of any instances, written with ONE `INSERT ... SELECT FROM
/// unnest(...)`, plus one wake-up per tenant that has a run ready now.
#[derive(Default)]
pub(crate) struct RunRows {
    id: Vec<Uuid>,
    tenant_id: Vec<Uuid>,
    instance_id: Vec<Uuid>,
    step_id: Vec<String>,
    kind: Vec<&'static str>,
    handler: Vec<String>,
    attempt: Vec<i32>,
    tier: Vec<String>,
    state: Vec<&'static str>,
    idempotency_key: Vec<String>,
    input: Vec<Value>,
    external: Vec<bool>,
    config: Vec<Option<Value>>,
    wait_ms: Vec<Option<i64>>,
    ready_tenants: Vec<String>,
}

impl RunRows {
    /// Adds the run of a plain start (see [`plain`]).
    pub(crate) fn push_start(&mut self, instance: &Locked, start: &Start) -> Result<(), Error> {
        let step = instance.definition.step(&start.step_id).ok_or_else(|| {
            Error::Corrupt(format!("plan names unknown step `{}`", start.step_id))
        })?;
        let run = NewRun::of(step, start);
        if start.skipped {
            self.push(instance, &run, RunState::Skipped, None, None);
            return Ok(());
        }
        match step.kind {
            StepKind::Task | StepKind::Http => {
                let config = json!({
                    "timeout_ms": step.timeout_ms,
                    "url": step.url,
                    "method": step.method.as_deref().unwrap_or("POST"),
                    "headers": step.headers,
                });
                if start.wait_ms > 0 {
                    self.push(
                        instance,
                        &run,
                        RunState::Waiting,
                        Some(start.wait_ms),
                        Some(config),
                    );
                } else {
                    self.push(instance, &run, RunState::Ready, None, Some(config));
                }
            }
            StepKind::Delay => self.push(
                instance,
                &run,
                RunState::Waiting,
                Some(step.duration_ms.unwrap_or(0)),
                None,
            ),
            other => {
                return Err(Error::Corrupt(format!(
                    "step `{}` of kind {} is not a plain start",
                    step.id,
                    other.as_str()
                )));
            }
        }
        Ok(())
    }

    fn push(
        &mut self,
        instance: &Locked,
        run: &NewRun<'_>,
        state: RunState,
        wait_ms: Option<u64>,
        config: Option<Value>,
    ) {
        self.id.push(run.id);
        self.tenant_id.push(instance.tenant_id);
        self.instance_id.push(instance.id);
        self.step_id.push(run.step_id.to_owned());
        self.kind.push(run.kind.as_str());
        self.handler.push(run.handler.to_owned());
        self.attempt.push(run.attempt);
        self.tier.push(instance.tier.clone());
        self.state.push(state.as_str());
        self.idempotency_key
            .push(idempotency_key(instance.id, run.step_id));
        self.input.push(run.input.clone());
        self.external.push(run.external);
        self.config.push(config);
        self.wait_ms
            .push(wait_ms.map(|ms| i64::try_from(ms).unwrap_or(i64::MAX)));
        // External tasks too: the API's long polls listen for them.
        if state == RunState::Ready {
            self.ready_tenants.push(instance.tenant_id.to_string());
        }
    }

    /// Writes the runs (a run whose idempotency key and attempt exist is
    /// skipped) and wakes the dispatcher for their tenants, pipelined.
    pub(crate) async fn write(self, transaction: &Tx) -> Result<(), Error> {
        self.write_waking(transaction, None).await
    }

    /// As `write`; with `after_commit`, the tenants to wake are added to it
    /// instead, for the caller to wake once it committed
    /// (`Store::wake_after_commit`; see `wake` for why).
    pub(crate) async fn write_waking(
        mut self,
        transaction: &Tx,
        after_commit: Option<&mut Vec<String>>,
    ) -> Result<(), Error> {
        if self.id.is_empty() {
            return Ok(());
        }
        match after_commit {
            Some(after_commit) => self.hand_over_wakes(after_commit),
            None => {
                self.ready_tenants.sort_unstable();
                self.ready_tenants.dedup();
            }
        }
        let params = self.params();
        let insert = transaction.execute_c(RUNS_INSERT_SQL, &params);
        // Pipelined: the INSERT and the wake-up (none when the caller wakes
        // after its commit: `ready_tenants` was handed over above).
        futures::future::try_join(
            async { insert.await.map_err(Error::from) },
            notify_in_transaction(transaction, &self.ready_tenants),
        )
        .await?;
        Ok(())
    }

    /// No run to write.
    pub(crate) fn is_empty(&self) -> bool {
        self.id.is_empty()
    }

    /// Moves the tenants these runs make ready to `after_commit`, for the
    /// caller to wake once it committed.
    pub(crate) fn hand_over_wakes(&mut self, after_commit: &mut Vec<String>) {
        self.ready_tenants.sort_unstable();
        self.ready_tenants.dedup();
        after_commit.append(&mut self.ready_tenants);
    }

    /// The parameters of `RUNS_INSERT_SQL` for these runs.
    pub(crate) fn params(&self) -> [&(dyn tokio_postgres::types::ToSql + Sync); 14] {
        [
            &self.id,
            &self.tenant_id,
            &self.instance_id,
            &self.step_id,
            &self.kind,
            &self.handler,
            &self.attempt,
            &self.tier,
            &self.state,
            &self.idempotency_key,
            &self.input,
            &self.external,
            &self.config,
            &self.wait_ms,
        ]
    }
}

/// Writes the runs of `RunRows`, one row per element of its arrays.
pub(crate) const RUNS_INSERT_SQL: &str = "INSERT INTO task_runs (id, tenant_id, instance_id, step_id, kind, handler, attempt, tier, state, \
     idempotency_key, input, external, config, available_at, finished_at) \
     SELECT id, tenant_id, instance_id, step_id, kind, handler, attempt, tier, state, idempotency_key, \
     input, external, config, \
     CASE WHEN wait_ms IS NULL THEN NULL ELSE now() + wait_ms * interval '1 millisecond' END, \
     CASE WHEN state = 'skipped' THEN now() END \
     FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::text[], $7::int[], \
     $8::text[], $9::text[], $10::text[], $11::jsonb[], $12::bool[], $13::jsonb[], $14::bigint[]) \
     AS v (id, tenant_id, instance_id, step_id, kind, handler, attempt, tier, state, idempotency_key, \
     input, external, config, wait_ms) \
     ON CONFLICT (instance_id, idempotency_key, attempt) DO NOTHING";

/// Notifies `tenants` on `READY_CHANNEL` from inside `transaction` (sent
/// when it commits).
pub(crate) async fn notify_in_transaction(
    transaction: &Tx,
    tenants: &[String],
) -> Result<(), Error> {
    if !tenants.is_empty() {
        transaction
            .execute_c(
                "SELECT pg_notify($1, tenant) FROM unnest($2::text[]) AS tenant",
                &[&READY_CHANNEL, &tenants],
            )
            .await?;
    }
    Ok(())
}

/// Inserts the run for `start` (waking the dispatcher when it is ready).
/// Returns whether it settled at once.
async fn insert_start(transaction: &Tx, instance: &Locked, start: &Start) -> Result<bool, Error> {
    let step = instance
        .definition
        .step(&start.step_id)
        .ok_or_else(|| Error::Corrupt(format!("plan names unknown step `{}`", start.step_id)))?;
    if start.skipped || matches!(step.kind, StepKind::Task | StepKind::Http | StepKind::Delay) {
        let mut rows = RunRows::default();
        rows.push_start(instance, start)?;
        rows.write(transaction).await?;
        return Ok(false);
    }
    let run = NewRun::of(step, start);
    match step.kind {
        StepKind::WaitSignal => {
            let signal = step.signal.as_deref().unwrap_or_default();
            let buffered = transaction
                .query_opt_c(
                    "SELECT id, payload FROM signals WHERE tenant_id = $1 AND instance_id = $2 AND name = $3 \
                     AND consumed_by IS NULL ORDER BY received_at, id LIMIT 1 FOR UPDATE",
                    &[&instance.tenant_id, &instance.id, &signal],
                )
                .await?;
            insert_run(transaction, instance, &run, step.timeout_ms).await?;
            transaction
                .execute_c(
                    "UPDATE task_runs SET signal = $1 WHERE id = $2",
                    &[&signal, &run.id],
                )
                .await?;
            if let Some(buffered) = buffered {
                let signal_id: Uuid = buffered.get(0);
                let payload: Value = buffered.get(1);
                transaction
                    .execute_c(
                        "UPDATE signals SET consumed_by = $1 WHERE id = $2",
                        &[&run.id, &signal_id],
                    )
                    .await?;
                finish_run(
                    transaction,
                    run.id,
                    RunState::Completed,
                    Some(&payload),
                    None,
                )
                .await?;
                return Ok(true);
            }
            Ok(false)
        }
        StepKind::SubWorkflow => {
            insert_run(transaction, instance, &run, None).await?;
            let fail = |error: String| async move {
                finish_run(transaction, run.id, RunState::Failed, None, Some(&error))
                    .await
                    .map(|()| true)
            };
            if instance.depth + 1 > DEPTH_MAX {
                return fail(format!("sub-workflows nest deeper than {DEPTH_MAX}")).await;
            }
            let name = step.definition.as_deref().unwrap_or_default();
            let Some(child) = crate::workflow::create_child(
                transaction,
                instance,
                name,
                step.version,
                &start.input,
                run.id,
            )
            .await?
            else {
                return fail(format!("definition `{name}` not found")).await;
            };
            transaction
                .execute_c(
                    "UPDATE task_runs SET child_instance_id = $1 WHERE id = $2",
                    &[&child.id, &run.id],
                )
                .await?;
            let child_status = advance_new(transaction, &child, false).await?;
            match child_status.as_str() {
                status::RUNNING => Ok(false),
                status::COMPLETED => {
                    let output: Option<Value> = transaction
                        .query_one_c("SELECT output FROM instances WHERE id = $1", &[&child.id])
                        .await?
                        .get(0);
                    finish_run(
                        transaction,
                        run.id,
                        RunState::Completed,
                        Some(&output.unwrap_or(Value::Null)),
                        None,
                    )
                    .await?;
                    Ok(true)
                }
                _ => {
                    let error: Option<String> = transaction
                        .query_one_c("SELECT error FROM instances WHERE id = $1", &[&child.id])
                        .await?
                        .get(0);
                    fail(format!(
                        "child instance {} failed: {}",
                        child.id,
                        error.unwrap_or_default()
                    ))
                    .await
                }
            }
        }
        StepKind::Task | StepKind::Http | StepKind::Delay => Ok(false),
    }
}

struct NewRun<'a> {
    id: Uuid,
    step_id: &'a str,
    kind: StepKind,
    handler: &'a str,
    attempt: i32,
    input: &'a Value,
    external: bool,
}

impl<'a> NewRun<'a> {
    /// The run of `start`, a step of the definition, with a new id.
    fn of(step: &'a ward_shared::Step, start: &'a Start) -> NewRun<'a> {
        NewRun {
            id: Uuid::now_v7(),
            step_id: &step.id,
            kind: step.kind,
            handler: step.handler_name(),
            attempt: start.attempt,
            input: &start.input,
            external: step.external,
        }
    }
}

/// Inserts the waiting run of a signal or sub-workflow step.
async fn insert_run(
    transaction: &Tx,
    instance: &Locked,
    run: &NewRun<'_>,
    wait_ms: Option<u64>,
) -> Result<(), Error> {
    let mut rows = RunRows::default();
    rows.push(instance, run, RunState::Waiting, wait_ms, None);
    rows.write(transaction).await
}

async fn finish_run(
    transaction: &Tx,
    task_run_id: Uuid,
    state: RunState,
    output: Option<&Value>,
    error: Option<&str>,
) -> Result<(), Error> {
    transaction
        .execute_c(
            "UPDATE task_runs SET state = $1, output = $2, error = $3, retryable = false, finished_at = now() WHERE id = $4",
            &[&state.as_str(), &output, &error, &task_run_id],
        )
        .await?;
    Ok(())
}

/// Ends the instance: records status and output or error, cancels its
/// pending runs and running children, and settles the parent's step.
pub(crate) fn finish<'a>(
    transaction: &'a Tx,
    instance: &'a Locked,
    end: End,
    notify_parent: bool,
) -> BoxFuture<'a, Result<String, Error>> {
    Box::pin(async move {
        let (new_status, output, error) = match &end {
            End::Completed { output } => (status::COMPLETED, Some(output), None),
            End::Failed { error } => (status::FAILED, None, Some(error.as_str())),
        };
        end_instance(transaction, instance, new_status, output, error).await?;
        if notify_parent {
            if let Some((parent_id, parent_run_id)) = instance.parent {
                let settlement = match end {
                    End::Completed { output } => Settlement::Succeeded(output),
                    End::Failed { error } => Settlement::Failed {
                        error: format!("child instance {} failed: {error}", instance.id),
                        retryable: false,
                    },
                };
                settle_parent(transaction, instance, parent_id, parent_run_id, settlement).await?;
            }
        }
        Ok(new_status.to_owned())
    })
}

/// Cancels a running instance: pending runs and running children are
/// cancelled; a parent's sub-workflow step fails.
pub(crate) fn cancel<'a>(
    transaction: &'a Tx,
    instance: &'a Locked,
) -> BoxFuture<'a, Result<(), Error>> {
    Box::pin(async move {
        end_instance(
            transaction,
            instance,
            status::CANCELLED,
            None,
            Some("cancelled"),
        )
        .await?;
        if let Some((parent_id, parent_run_id)) = instance.parent {
            let settlement = Settlement::Failed {
                error: format!("child instance {} was cancelled", instance.id),
                retryable: false,
            };
            settle_parent(transaction, instance, parent_id, parent_run_id, settlement).await?;
        }
        Ok(())
    })
}

/// Settles the waiting sub-workflow step of a child's parent.
async fn settle_parent(
    transaction: &Tx,
    child: &Locked,
    parent_id: Uuid,
    parent_run_id: Uuid,
    settlement: Settlement,
) -> Result<Completion, Error> {
    settle(
        transaction,
        child.tenant_id,
        parent_id,
        parent_run_id,
        &[RunState::Waiting],
        None,
        settlement,
        None,
    )
    .await
}

async fn end_instance(
    transaction: &Tx,
    instance: &Locked,
    new_status: &str,
    output: Option<&Value>,
    error: Option<&str>,
) -> Result<(), Error> {
    // One round trip: end the instance, cancel its pending runs, and list
    // its running children (data-modifying CTEs always run to completion).
    // Children are looked up by the parent index alone (and only when the
    // definition can start any), their status filtered here.
    let children = transaction
        .query_c(
            "WITH ended AS (UPDATE instances SET status = $1, output = $2, error = $3, updated_at = now(), \
             completed_at = now() WHERE tenant_id = $4 AND id = $5 RETURNING 1), \
             cancelled AS (UPDATE task_runs SET state = 'cancelled', finished_at = now() \
             WHERE tenant_id = $4 AND instance_id = $5 AND state IN ('ready', 'waiting', 'locked') RETURNING 1) \
             SELECT id, status FROM instances WHERE $6 AND parent_instance_id = $5",
            &[
                &new_status,
                &output,
                &error,
                &instance.tenant_id,
                &instance.id,
                &may_have_children(instance),
            ],
        )
        .await?;
    for child in children {
        if child.get::<_, &str>(1) == status::RUNNING {
            cancel_orphan(transaction, instance.tenant_id, child.get(0)).await?;
        }
    }
    Ok(())
}

/// True when the instance's definition has sub-workflow steps: only then
/// can it have children.
pub(crate) fn may_have_children(instance: &Locked) -> bool {
    instance
        .definition
        .steps
        .iter()
        .any(|step| step.kind == StepKind::SubWorkflow)
}

/// Cancels a running child whose parent is ending (it must not settle the
/// parent again).
pub(crate) async fn cancel_orphan(
    transaction: &Tx,
    tenant_id: Uuid,
    child_id: Uuid,
) -> Result<(), Error> {
    if let Some(mut child) = lock_instance(transaction, tenant_id, child_id).await? {
        child.parent = None;
        end_instance_boxed(transaction, &child).await?;
    }
    Ok(())
}

fn end_instance_boxed<'a>(
    transaction: &'a Tx,
    child: &'a Locked,
) -> BoxFuture<'a, Result<(), Error>> {
    Box::pin(async move {
        end_instance(
            transaction,
            child,
            status::CANCELLED,
            None,
            Some("parent instance ended"),
        )
        .await
    })
}
