//! Definitions and instances: publishing versions, starting instances (the
//! one function every ingress calls), children, reading, listing, history,
//! cancelling and signalling.

use crate::Tx;
use serde_json::{Value, json};
use uuid::Uuid;
use ward_shared::Definition;
use ward_shared::engine::RunState;
use ward_shared::trace::{TraceParent, span_bytes};
use ward_shared::wire::{
    HistoryEvent, InstanceList, InstanceSummary, InstanceView, StartInstance, StepView, status,
};

use std::collections::{HashMap, HashSet};

use ward_shared::engine::Run;

use crate::Cached;
use crate::grouped;
use crate::progress::{self, Locked, Settlement};
use crate::{Error, Scope, Store, Tenant, read_scoped, scoped};

/// Most instances one list page returns.
pub const LIST_LIMIT_MAX: i64 = 200;
/// Most instances one batch start holds.
pub const START_BATCH_LEN_MAX: usize = 1_000;
/// Most history events returned for one instance.
pub const HISTORY_EVENTS_MAX: usize = 10_000;

/// A published definition version.
#[derive(Debug, Clone)]
pub struct Published {
    pub id: Uuid,
    pub version: i32,
    pub created: bool,
}

/// One start of a group commit (`Store::start_instances_of`).
#[derive(Debug, Clone)]
pub struct StartItem {
    pub tenant: Tenant,
    pub request: StartInstance,
    pub idempotency_key: Option<String>,
}

/// A started (or found) instance.
#[derive(Debug, Clone)]
pub struct Started {
    pub id: Uuid,
    pub definition: String,
    pub version: i32,
    pub status: String,
    /// False when an idempotency key or business key matched an existing instance.
    pub created: bool,
}

/// Filters of an instance list.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub definition: Option<String>,
    pub status: Option<String>,
    pub business_key: Option<String>,
    /// Return instances older than this one (the previous page's last).
    pub before: Option<Uuid>,
    pub limit: i64,
}

/// What sending a signal did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignalOutcome {
    /// A waiting step took it.
    Delivered,
    /// Kept until a step waits for it.
    Buffered,
    /// The instance has ended with this status.
    Finished(String),
    NotFound,
}

/// What cancelling did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelOutcome {
    Cancelled,
    Finished(String),
    NotFound,
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
        let client = self.pool.get().await?;
        let transaction = scoped(client, Scope::Tenant(tenant.id)).await?;
        transaction
            .execute_c(
                "SELECT pg_advisory_xact_lock(hashtext($1::text || '/' || $2))",
                &[&tenant.id.to_string(), &definition.name],
            )
            .await?;
        let latest = transaction
            .query_opt_c(
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
            .execute_c(
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

    /// True when the tenant has the definition (at that version, if given).
    pub async fn definition_exists(
        &self,
        tenant: &Tenant,
        name: &str,
        version: Option<i32>,
    ) -> Result<bool, Error> {
        let client = self.pool.get().await?;
        let client = scoped(client, Scope::Tenant(tenant.id)).await?;
        let row = client
            .query_opt_c(
                "SELECT 1 FROM definitions WHERE tenant_id = $1 AND name = $2 AND ($3::int IS NULL OR version = $3) LIMIT 1",
                &[&tenant.id, &name, &version],
            )
            .await?;
        Ok(row.is_some())
    }

    /// Starts an instance: writes it and its first runs in ONE transaction
    /// and wakes the dispatcher. An `idempotency_key` (or the request's
    /// business key) that matches an existing instance returns that one.
    /// Every ingress (API, schedules, and later HL7 and FHIR) calls this.
    /// A group of one (`start_many`): without a key, and with its
    /// definition resolved by this process before, one round trip.
    pub async fn start_instance(
        &self,
        tenant: &Tenant,
        request: &StartInstance,
        idempotency_key: Option<&str>,
    ) -> Result<Started, Error> {
        self.start_many(&[(tenant, request, idempotency_key)], true)
            .await?
            .pop()
            .unwrap_or_else(|| Err(Error::Corrupt("a start was not answered".into())))
    }

    /// Starts several instances of one tenant in ONE transaction (the batch
    /// submission API): all of them, or none when one fails (an unknown
    /// definition answers `DefinitionNotFound` naming it). Each item has its
    /// own idempotency key; a key or business key that matches an existing
    /// instance returns that one. At most `START_BATCH_LEN_MAX` items.
    pub async fn start_instances(
        &self,
        tenant: &Tenant,
        requests: &[(StartInstance, Option<String>)],
    ) -> Result<Vec<Started>, Error> {
        if requests.len() > START_BATCH_LEN_MAX {
            return Err(Error::Invalid {
                field: "instances".into(),
                message: format!("at most {START_BATCH_LEN_MAX} instances per batch"),
            });
        }
        let items: Vec<(&Tenant, &StartInstance, Option<&str>)> = requests
            .iter()
            .map(|(request, key)| (tenant, request, key.as_deref()))
            .collect();
        self.start_many(&items, true).await?.into_iter().collect()
    }

    /// Group commit of single starts (the API's `POST /v1/instances` under
    /// load): starts of any tenants in ONE transaction scoped to those
    /// tenants, one answer per item. An item naming an unknown definition
    /// gets its own `DefinitionNotFound` and the others still start; any
    /// other error writes nothing (the caller starts the items one by one).
    pub async fn start_instances_of(
        &self,
        items: &[StartItem],
    ) -> Result<Vec<Result<Started, Error>>, Error> {
        let items: Vec<(&Tenant, &StartInstance, Option<&str>)> = items
            .iter()
            .map(|item| (&item.tenant, &item.request, item.idempotency_key.as_deref()))
            .collect();
        self.start_many(&items, false).await
    }

    /// Starts `items` in one transaction scoped to their tenants, resolving
    /// each (tenant, definition, version) once. An unknown definition fails
    /// the whole transaction when `all_or_none`, else only its item.
    async fn start_many(
        &self,
        items: &[(&Tenant, &StartInstance, Option<&str>)],
        all_or_none: bool,
    ) -> Result<Vec<Result<Started, Error>>, Error> {
        match self.start_many_once(items, all_or_none, true).await {
            Err(error) if is_stale_definition(&error) => {
                // A newer version was stored since this process resolved
                // one of them: nothing was written; read them again.
                forget_resolved(items);
                self.start_many_once(items, all_or_none, false).await
            }
            answers => answers,
        }
    }

    /// `start_many`'s one transaction; `from_cache` lets it take the
    /// definitions this process resolved before without reading them.
    async fn start_many_once(
        &self,
        items: &[(&Tenant, &StartInstance, Option<&str>)],
        all_or_none: bool,
        from_cache: bool,
    ) -> Result<Vec<Result<Started, Error>>, Error> {
        let mut tenants: Vec<Uuid> = items.iter().map(|(tenant, _, _)| tenant.id).collect();
        tenants.sort_unstable();
        tenants.dedup();
        // BEGIN and the scope go out with the definitions' look-ups
        // (`start_items`).
        let transaction = Tx::open(self.pool.get().await?);
        let mut wake = Vec::new();
        let mut ended = false;
        let answers = start_items(
            &transaction,
            Some(Scope::Tenants(&tenants)),
            items,
            all_or_none,
            &mut wake,
            Some(&mut ended),
            from_cache,
        )
        .await;
        if ended {
            // Its COMMIT went out with the writes (and was answered).
            transaction.ended();
            let answers = answers?;
            self.wake_after_commit(wake);
            return Ok(answers);
        }
        let answers = answers?;
        transaction.commit().await?;
        self.wake_after_commit(wake);
        Ok(answers)
    }

    /// An instance of `tenant` with its task runs, or `None`.
    pub async fn instance(
        &self,
        tenant: &Tenant,
        instance_id: Uuid,
    ) -> Result<Option<InstanceView>, Error> {
        let client = self.pool.get().await?;
        let (instance, runs) = futures::future::try_join(
            client.prepare_cached(
                "SELECT i.id, i.definition_name, d.version, i.status, i.input, i.output, i.error, \
                 i.business_key, i.parent_instance_id, i.created_at, i.updated_at, i.completed_at, i.trace_parent \
                 FROM instances i JOIN definitions d ON d.id = i.definition_id \
                 WHERE i.tenant_id = $1 AND i.id = $2",
            ),
            client.prepare_cached(
                "SELECT id, step_id, kind, handler, attempt, state, idempotency_key, input, output, error, \
                 retryable, available_at, child_instance_id, created_at, dispatched_at, started_at, finished_at \
                 FROM task_runs WHERE tenant_id = $1 AND instance_id = $2 ORDER BY created_at, id",
            ),
        )
        .await?;
        // Both reads in one round trip with their transaction; one snapshot
        // each (READ COMMITTED; the runs may be a little newer, never older).
        let (row, steps) = read_scoped(
            &client,
            tenant.id,
            futures::future::try_join(
                client.query_opt(&instance, &[&tenant.id, &instance_id]),
                client.query(&runs, &[&tenant.id, &instance_id]),
            ),
        )
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let steps = steps
            .into_iter()
            .map(|step| StepView {
                task_run_id: step.get(0),
                step_id: step.get(1),
                kind: step.get(2),
                handler: step.get(3),
                attempt: step.get(4),
                state: step.get(5),
                idempotency_key: step.get(6),
                input: step.get(7),
                output: step.get(8),
                error: step.get(9),
                retryable: step.get(10),
                available_at: step.get(11),
                child_instance_id: step.get(12),
                created_at: step.get(13),
                dispatched_at: step.get(14),
                started_at: step.get(15),
                finished_at: step.get(16),
            })
            .collect();
        Ok(Some(InstanceView {
            id: row.get(0),
            definition: row.get(1),
            version: row.get(2),
            status: row.get(3),
            input: row.get(4),
            output: row.get(5),
            error: row.get(6),
            business_key: row.get(7),
            parent_instance_id: row.get(8),
            created_at: row.get(9),
            updated_at: row.get(10),
            completed_at: row.get(11),
            trace_id: row
                .get::<_, Option<String>>(12)
                .as_deref()
                .and_then(TraceParent::parse)
                .map(|trace| trace.trace_id),
            steps,
        }))
    }

    /// A page of a tenant's instances, newest first.
    pub async fn list_instances(
        &self,
        tenant: &Tenant,
        filter: &ListFilter,
    ) -> Result<InstanceList, Error> {
        let client = self.pool.get().await?;
        let limit = filter.limit.clamp(1, LIST_LIMIT_MAX);
        // One statement per set of filters given (at most 16), so that each
        // one's generic plan fits it: the filters decide the index.
        let limit_plus_one = limit + 1;
        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&tenant.id];
        let mut sql = String::from(
            "SELECT i.id, i.definition_name, d.version, i.status, i.business_key, i.created_at, i.updated_at, \
             i.completed_at FROM instances i JOIN definitions d ON d.id = i.definition_id \
             WHERE i.tenant_id = $1",
        );
        let filters: [(&str, Option<&(dyn tokio_postgres::types::ToSql + Sync)>); 4] = [
            (
                "i.definition_name =",
                filter.definition.as_ref().map(|value| value as _),
            ),
            ("i.status =", filter.status.as_ref().map(|value| value as _)),
            (
                "i.business_key =",
                filter.business_key.as_ref().map(|value| value as _),
            ),
            ("i.id <", filter.before.as_ref().map(|value| value as _)),
        ];
        for (condition, value) in filters {
            if let Some(value) = value {
                params.push(value);
                sql.push_str(&format!(" AND {condition} ${}", params.len()));
            }
        }
        params.push(&limit_plus_one);
        sql.push_str(&format!(" ORDER BY i.id DESC LIMIT ${}", params.len()));
        let page = client.prepare_cached(&sql).await?;
        // The read goes out with its transaction: one round trip.
        let rows = read_scoped(&client, tenant.id, client.query(&page, &params)).await?;
        let mut instances: Vec<InstanceSummary> = rows
            .into_iter()
            .map(|row| InstanceSummary {
                id: row.get(0),
                definition: row.get(1),
                version: row.get(2),
                status: row.get(3),
                business_key: row.get(4),
                created_at: row.get(5),
                updated_at: row.get(6),
                completed_at: row.get(7),
            })
            .collect();
        let next_cursor = if instances.len() as i64 > limit {
            instances.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
            instances.last().map(|last| last.id.to_string())
        } else {
            None
        };
        Ok(InstanceList {
            instances,
            next_cursor,
        })
    }

    /// The ordered history of an instance, built from its rows.
    pub async fn history(
        &self,
        tenant: &Tenant,
        instance_id: Uuid,
    ) -> Result<Option<Vec<HistoryEvent>>, Error> {
        let client = self.pool.get().await?;
        let client = scoped(client, Scope::Tenant(tenant.id)).await?;
        let Some(instance) = client
            .query_opt_c(
                "SELECT status, created_at, completed_at, error FROM instances WHERE tenant_id = $1 AND id = $2",
                &[&tenant.id, &instance_id],
            )
            .await?
        else {
            return Ok(None);
        };
        let event = |at, name: &str| HistoryEvent {
            at,
            event: name.to_owned(),
            step_id: None,
            task_run_id: None,
            attempt: None,
            detail: None,
        };
        let mut events = vec![event(instance.get(1), "instance_created")];
        // Signals before runs: a signal and the step it completes share an instant.
        for signal in client
            .query_c(
                "SELECT received_at, name, consumed_by FROM signals WHERE tenant_id = $1 AND instance_id = $2 \
                 ORDER BY received_at LIMIT $3",
                &[&tenant.id, &instance_id, &(HISTORY_EVENTS_MAX as i64)],
            )
            .await?
        {
            let mut received = event(signal.get(0), "signal_received");
            received.detail = Some(json!({ "name": signal.get::<_, String>(1), "taken_by": signal.get::<_, Option<Uuid>>(2) }));
            events.push(received);
        }
        let runs = client
            .query_c(
                "SELECT id, step_id, kind, attempt, state, error, external, created_at, available_at, dispatched_at, \
                 started_at, finished_at, signal, child_instance_id FROM task_runs \
                 WHERE tenant_id = $1 AND instance_id = $2 ORDER BY created_at, id LIMIT $3",
                &[&tenant.id, &instance_id, &(HISTORY_EVENTS_MAX as i64)],
            )
            .await?;
        for run in runs {
            let step_event = |at, name: &str, detail: Option<Value>| HistoryEvent {
                at,
                event: name.to_owned(),
                step_id: Some(run.get(1)),
                task_run_id: Some(run.get(0)),
                attempt: Some(run.get(3)),
                detail,
            };
            let kind: String = run.get(2);
            let attempt: i32 = run.get(3);
            let state: String = run.get(4);
            let error: Option<String> = run.get(5);
            let external: bool = run.get(6);
            let available_at: Option<chrono::DateTime<chrono::Utc>> = run.get(8);
            let finished_at: Option<chrono::DateTime<chrono::Utc>> = run.get(11);
            let created = if state == RunState::Skipped.as_str() {
                "step_skipped"
            } else if attempt > 1 {
                "retry_scheduled"
            } else if available_at.is_some()
                || matches!(kind.as_str(), "wait_signal" | "sub_workflow")
            {
                "step_waiting"
            } else {
                "step_ready"
            };
            let detail = match kind.as_str() {
                "wait_signal" => Some(
                    json!({ "signal": run.get::<_, Option<String>>(12), "timeout_at": available_at }),
                ),
                "sub_workflow" => {
                    Some(json!({ "child_instance_id": run.get::<_, Option<Uuid>>(13) }))
                }
                "delay" => Some(json!({ "fires_at": available_at })),
                _ if attempt > 1 => Some(json!({ "runs_at": available_at })),
                _ => None,
            };
            events.push(step_event(run.get(7), created, detail));
            if let Some(fired_at) = available_at {
                let fired = match finished_at {
                    Some(finished) => fired_at <= finished,
                    None => state != RunState::Waiting.as_str(),
                };
                if fired && kind != "wait_signal" || state == RunState::TimedOut.as_str() {
                    events.push(step_event(fired_at, "timer_fired", None));
                }
            }
            if let Some(dispatched_at) = run.get(9) {
                events.push(step_event(
                    dispatched_at,
                    if external {
                        "step_locked"
                    } else {
                        "step_dispatched"
                    },
                    None,
                ));
            }
            if let Some(started_at) = run.get(10) {
                events.push(step_event(started_at, "step_started", None));
            }
            if let Some(finished_at) = finished_at {
                if state != RunState::Skipped.as_str() {
                    let name = format!("step_{state}");
                    let detail = error.map(|error| json!({ "error": error }));
                    events.push(step_event(finished_at, &name, detail));
                }
            }
        }
        let final_status: String = instance.get(0);
        if let Some(completed_at) = instance.get(2) {
            let mut end = event(completed_at, &format!("instance_{final_status}"));
            end.detail = instance
                .get::<_, Option<String>>(3)
                .map(|error| json!({ "error": error }));
            events.push(end);
        }
        // Stable: events at the same instant keep the order they were built in.
        events.sort_by_key(|event| event.at);
        events.truncate(HISTORY_EVENTS_MAX);
        Ok(Some(events))
    }

    /// Cancels a running instance and its children.
    pub async fn cancel_instance(
        &self,
        tenant: &Tenant,
        instance_id: Uuid,
    ) -> Result<CancelOutcome, Error> {
        let client = self.pool.get().await?;
        let transaction = scoped(client, Scope::Tenant(tenant.id)).await?;
        let Some(instance) = progress::lock_instance(&transaction, tenant.id, instance_id).await?
        else {
            return Ok(CancelOutcome::NotFound);
        };
        if instance.status != status::RUNNING {
            return Ok(CancelOutcome::Finished(instance.status));
        }
        progress::cancel(&transaction, &instance).await?;
        transaction.commit().await?;
        Ok(CancelOutcome::Cancelled)
    }

    /// Sends a named signal (with a JSON payload) to an instance: a step
    /// waiting for it takes it now; otherwise it is kept for the first step
    /// that waits for it.
    pub async fn signal(
        &self,
        tenant: &Tenant,
        instance_id: Uuid,
        name: &str,
        payload: &Value,
    ) -> Result<SignalOutcome, Error> {
        let client = self.pool.get().await?;
        let transaction = scoped(client, Scope::Tenant(tenant.id)).await?;
        let Some(instance) = progress::lock_instance(&transaction, tenant.id, instance_id).await?
        else {
            return Ok(SignalOutcome::NotFound);
        };
        if instance.status != status::RUNNING {
            return Ok(SignalOutcome::Finished(instance.status));
        }
        let signal_id = Uuid::now_v7();
        transaction
            .execute_c(
                "INSERT INTO signals (id, tenant_id, instance_id, name, payload) VALUES ($1, $2, $3, $4, $5)",
                &[&signal_id, &tenant.id, &instance_id, &name, payload],
            )
            .await?;
        let waiting = transaction
            .query_opt_c(
                "SELECT id FROM task_runs WHERE tenant_id = $1 AND instance_id = $2 AND kind = 'wait_signal' \
                 AND signal = $3 AND state = 'waiting' ORDER BY created_at LIMIT 1",
                &[&tenant.id, &instance_id, &name],
            )
            .await?;
        let outcome = match waiting {
            Some(row) => {
                let task_run_id: Uuid = row.get(0);
                transaction
                    .execute_c(
                        "UPDATE signals SET consumed_by = $1 WHERE id = $2",
                        &[&task_run_id, &signal_id],
                    )
                    .await?;
                // The instance lock is ours; settle takes it again (a no-op for the same transaction).
                progress::settle(
                    &transaction,
                    tenant.id,
                    instance_id,
                    task_run_id,
                    &[RunState::Waiting],
                    None,
                    Settlement::Succeeded(payload.clone()),
                    None,
                )
                .await?;
                SignalOutcome::Delivered
            }
            None => SignalOutcome::Buffered,
        };
        transaction.commit().await?;
        Ok(outcome)
    }
}

/// A definition version resolved for starting instances.
#[derive(Clone)]
struct Resolved {
    id: Uuid,
    version: i32,
    definition: std::sync::Arc<Definition>,
}

/// Starts an instance inside `transaction` (see [`Store::start_instance`]).
pub(crate) async fn start_instance_tx(
    transaction: &Tx,
    tenant: &Tenant,
    request: &StartInstance,
    idempotency_key: Option<&str>,
) -> Result<Started, Error> {
    let mut wake = Vec::new();
    let started = start_one(transaction, tenant, request, idempotency_key, &mut wake).await?;
    // The caller commits: this start wakes from inside its transaction.
    progress::notify_in_transaction(transaction, &wake).await?;
    Ok(started)
}

/// Starts an instance inside `transaction`; the tenant to wake once it
/// committed is added to `wake_after_commit`.
async fn start_one(
    transaction: &Tx,
    tenant: &Tenant,
    request: &StartInstance,
    idempotency_key: Option<&str>,
    wake_after_commit: &mut Vec<String>,
) -> Result<Started, Error> {
    start_items(
        transaction,
        None,
        &[(tenant, request, idempotency_key)],
        true,
        wake_after_commit,
        None,
        false,
    )
    .await?
    .pop()
    .unwrap_or_else(|| Err(Error::Corrupt("a start was not answered".into())))
}

/// Starts `items` inside `transaction`, one answer per item, in order:
/// resolves each (tenant, definition, version) once, writes the new
/// instances with one INSERT, and advances them together
/// (`grouped::advance_many`). An unknown definition fails everything when
/// `all_or_none`, else only its item. An idempotency key or business key
/// that matches an existing instance (or an earlier item) answers that one.
///
/// `scope`, when given, means the caller opened `transaction` without
/// BEGIN (`Tx::open`): BEGIN and the scope go out first, pipelined with
/// the look-ups of the definitions. Items without keys cannot match an
/// existing instance, so when no item has one the instances' INSERT and
/// their runs' go out together too: a start group then costs one round
/// trip, another, and COMMIT.
///
/// With `commit_into`, when no item has a key and each new instance only
/// starts plain steps (`grouped::Writes::take_only_runs`), the COMMIT goes out with
/// those two INSERTs, whose statements are then all known before any is
/// sent: a start group costs two round trips. `commit_into` is then set
/// once the COMMIT was answered (committed, or rolled back by the server
/// when an INSERT before it failed, whose error is returned).
async fn start_items(
    transaction: &Tx,
    scope: Option<Scope<'_>>,
    items: &[(&Tenant, &StartInstance, Option<&str>)],
    all_or_none: bool,
    wake_after_commit: &mut Vec<String>,
    commit_into: Option<&mut bool>,
    from_cache: bool,
) -> Result<Vec<Result<Started, Error>>, Error> {
    let keyless_items = items.iter().all(|(_, request, idempotency_key)| {
        idempotency_key.is_none() && request.business_key.is_none()
    });
    let (definitions, deferred) = resolve_definitions(
        transaction,
        scope,
        items,
        from_cache && commit_into.is_some() && keyless_items,
    )
    .await?;
    // Scope and BEGIN not sent yet (every definition resolved from the
    // process's cache): they go out with the first writes.
    let opening = match (deferred, scope) {
        (true, Some(scope)) => Some(scope),
        _ => None,
    };
    let mut answers: Vec<Option<Result<Started, Error>>> = Vec::with_capacity(items.len());
    let mut new = NewInstances::default();
    for (index, (tenant, request, idempotency_key)) in items.iter().enumerate() {
        let key = (tenant.id, request.definition.as_str(), request.version);
        let resolved = match definitions.get(&key) {
            Some(Some(resolved)) => resolved.clone(),
            _ => {
                let error = Error::DefinitionNotFound {
                    name: request.definition.clone(),
                    version: request.version,
                };
                if all_or_none {
                    return Err(error);
                }
                answers.push(Some(Err(error)));
                continue;
            }
        };
        answers.push(None);
        new.push(index, tenant, request, *idempotency_key, resolved);
    }
    let keyless = new.idempotency_key.iter().all(Option::is_none)
        && new.business_key.iter().all(Option::is_none);
    // Every new instance is advanced together; with keys, only those
    // whose INSERT did not meet an existing key.
    let mut fresh: Vec<(usize, Locked)> = Vec::with_capacity(new.id.len());
    let mut found: Vec<usize> = Vec::new();
    let inserted = if keyless {
        None
    } else {
        Some(new.write(transaction).await?)
    };
    for (slot, &index) in new.index.iter().enumerate() {
        if inserted
            .as_ref()
            .is_none_or(|inserted| inserted.contains(&new.id[slot]))
        {
            let (tenant, request, _) = items[index];
            fresh.push((
                slot,
                Locked {
                    id: new.id[slot],
                    tenant_id: tenant.id,
                    tier: tenant.tier.clone(),
                    status: status::RUNNING.to_owned(),
                    definition: new.resolved[slot].definition.clone(),
                    input: request.input.clone(),
                    parent: None,
                    depth: 0,
                },
            ));
        } else {
            found.push(slot);
        }
    }
    let planned: Vec<(&Locked, Vec<Run>)> = fresh
        .iter()
        .map(|(_, instance)| (instance, Vec::new()))
        .collect();
    // Planned once, whichever way they are written below.
    let mut writes = grouped::plan_many(&planned)?;
    let plain = match commit_into {
        Some(ended) if keyless => writes.take_only_runs().map(|rows| (ended, rows)),
        _ => None,
    };
    // Definitions taken from the cache as "the newest" are checked in the
    // transaction before its writes (a newer one aborts it, and a COMMIT
    // behind it rolls back).
    let (mut guard_tenants, mut guard_names, mut guard_versions) =
        (Vec::new(), Vec::new(), Vec::new());
    if opening.is_some() {
        for (key, resolved) in &definitions {
            if let (None, Some(resolved)) = (key.2, resolved) {
                guard_tenants.push(key.0);
                guard_names.push(key.1);
                guard_versions.push(resolved.version);
            }
        }
    }
    let guard_params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
        [&guard_tenants, &guard_names, &guard_versions];
    // Prepared before anything is sent (once per connection), so that
    // nothing below waits between its requests.
    let statements = match opening {
        Some(scope) => {
            let ((begin, scope_statement), guard) = futures::future::try_join(
                transaction.opening_statements(),
                transaction.prepare_cached(NEWEST_GUARD_SQL),
            )
            .await?;
            Some((scope, begin, scope_statement, guard))
        }
        None => None,
    };
    // BEGIN and the scope (when not sent yet), then the guard (when a
    // definition came from the cache), all on this future's first poll:
    // joined first, what follows is pipelined behind them.
    let opened = async {
        let Some((scope, begin, scope_statement, guard)) = &statements else {
            return Ok(());
        };
        let (begun, guarded) = futures::join!(
            transaction.send_opening(begin, scope_statement, *scope),
            async {
                if guard_tenants.is_empty() {
                    Ok(0)
                } else {
                    transaction.execute(guard, &guard_params).await
                }
            },
        );
        begun?;
        guarded?;
        Ok::<(), Error>(())
    };
    let statuses = if let Some((ended, mut rows)) = plain {
        // ONE statement writes the instances and their runs, then COMMIT,
        // both prepared first and sent on the first poll, in that order.
        // The statement is all or nothing: if it fails on the server, the
        // server answers the COMMIT by rolling back; if it cannot even be
        // sent, the COMMIT ends a transaction that wrote nothing.
        let (write, commit) = futures::future::try_join(
            transaction.prepare_cached(&FRESH_START_SQL),
            transaction.prepare_cached("COMMIT"),
        )
        .await?;
        rows.hand_over_wakes(wake_after_commit);
        let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            new.params().into_iter().chain(rows.params()).collect();
        let (opened, written, committed) = futures::join!(
            opened,
            transaction.execute(&write, &params),
            transaction.execute(&commit, &[]),
        );
        *ended = committed.is_ok();
        opened?;
        written?;
        committed?;
        vec![status::RUNNING.to_owned(); fresh.len()]
    } else if keyless {
        opened.await?;
        // Both statements prepared first, so that the instances' INSERT
        // goes out before the runs' on the first poll (the server runs
        // them in that order).
        transaction.prepare_cached(NewInstances::INSERT_SQL).await?;
        transaction
            .prepare_cached(progress::RUNS_INSERT_SQL)
            .await?;
        let (inserted, statuses) = futures::join!(
            new.write(transaction),
            writes.write(transaction, &planned, wake_after_commit)
        );
        if inserted?.len() != new.id.len() {
            return Err(Error::Corrupt(
                "a new instance without keys was not inserted".into(),
            ));
        }
        statuses?
    } else {
        opened.await?;
        writes
            .write(transaction, &planned, wake_after_commit)
            .await?
    };
    for ((slot, instance), instance_status) in fresh.iter().zip(statuses) {
        answers[new.index[*slot]] = Some(Ok(Started {
            id: instance.id,
            definition: instance.definition.name.clone(),
            version: new.resolved[*slot].version,
            status: instance_status,
            created: true,
        }));
    }
    // Keys that matched: answer the existing instance (read after the
    // advance, so a key repeated within the batch sees its status).
    for slot in found {
        let index = new.index[slot];
        let (tenant, request, idempotency_key) = items[index];
        let name = &new.resolved[slot].definition.name;
        let existing = transaction
            .query_one_c(
                "SELECT i.id, d.version, i.status FROM instances i JOIN definitions d ON d.id = i.definition_id \
                 WHERE i.tenant_id = $1 AND ((i.idempotency_key = $2) \
                 OR (i.definition_name = $3 AND i.business_key = $4)) LIMIT 1",
                &[&tenant.id, &idempotency_key, name, &request.business_key],
            )
            .await?;
        answers[index] = Some(Ok(Started {
            id: existing.get(0),
            definition: name.clone(),
            version: existing.get(1),
            status: existing.get(2),
            created: false,
        }));
    }
    Ok(answers
        .into_iter()
        .map(|answer| {
            answer.unwrap_or_else(|| Err(Error::Corrupt("a start was not answered".into())))
        })
        .collect())
}

/// New instances without keys and the runs they start, in ONE statement:
/// the instances' INSERT (without `ON CONFLICT`: a conflict fails it all)
/// as a CTE, then the runs' (`RUNS_INSERT_SQL` with its parameters numbered
/// after the instances').
static FRESH_START_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let instances = NewInstances::INSERT_SQL
        .strip_suffix(" ON CONFLICT DO NOTHING RETURNING id")
        .unwrap_or(NewInstances::INSERT_SQL);
    format!(
        "WITH new_instances AS ({instances}) {}",
        renumber_parameters(progress::RUNS_INSERT_SQL, NewInstances::PARAMS_LEN)
    )
});

/// `sql` with each parameter `$n` written `$(n + by)`.
fn renumber_parameters(sql: &str, by: usize) -> String {
    let mut out = String::with_capacity(sql.len() + 16);
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        out.push(c);
        if c != '$' {
            continue;
        }
        let mut digits = String::new();
        while let Some(d) = chars.next_if(char::is_ascii_digit) {
            digits.push(d);
        }
        match digits.parse::<usize>() {
            Ok(n) => out.push_str(&(n + by).to_string()),
            Err(_) => out.push_str(&digits),
        }
    }
    out
}

/// New instances written with ONE `INSERT ... SELECT FROM unnest(...)`.
#[derive(Default)]
struct NewInstances {
    /// Index of each in the caller's items.
    index: Vec<usize>,
    resolved: Vec<Resolved>,
    id: Vec<Uuid>,
    tenant_id: Vec<Uuid>,
    definition_id: Vec<Uuid>,
    definition_name: Vec<String>,
    input: Vec<Value>,
    business_key: Vec<Option<String>>,
    idempotency_key: Vec<Option<String>>,
    trace_parent: Vec<String>,
}

impl NewInstances {
    /// Inserts the instances (see `write`).
    const INSERT_SQL: &str = "INSERT INTO instances (id, tenant_id, definition_id, definition_name, status, input, business_key, \
         idempotency_key, trace_parent) \
         SELECT id, tenant_id, definition_id, definition_name, 'running', input, business_key, \
         idempotency_key, trace_parent \
         FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::jsonb[], $6::text[], $7::text[], \
         $8::text[]) AS v (id, tenant_id, definition_id, definition_name, input, business_key, \
         idempotency_key, trace_parent) \
         ON CONFLICT DO NOTHING RETURNING id";

    fn push(
        &mut self,
        index: usize,
        tenant: &Tenant,
        request: &StartInstance,
        idempotency_key: Option<&str>,
        resolved: Resolved,
    ) {
        let trace_parent = request
            .trace_parent
            .as_deref()
            .and_then(TraceParent::parse)
            .unwrap_or_else(|| {
                TraceParent::root(
                    *Uuid::new_v4().as_bytes(),
                    span_bytes(Uuid::new_v4().as_bytes()),
                )
            })
            .header();
        self.index.push(index);
        self.id.push(Uuid::now_v7());
        self.tenant_id.push(tenant.id);
        self.definition_id.push(resolved.id);
        self.definition_name.push(resolved.definition.name.clone());
        self.resolved.push(resolved);
        self.input.push(request.input.clone());
        self.business_key.push(request.business_key.clone());
        self.idempotency_key
            .push(idempotency_key.map(str::to_owned));
        self.trace_parent.push(trace_parent);
    }

    /// How many parameters `INSERT_SQL` has.
    const PARAMS_LEN: usize = 8;

    /// The parameters of `INSERT_SQL` for these instances.
    fn params(&self) -> [&(dyn tokio_postgres::types::ToSql + Sync); Self::PARAMS_LEN] {
        [
            &self.id,
            &self.tenant_id,
            &self.definition_id,
            &self.definition_name,
            &self.input,
            &self.business_key,
            &self.idempotency_key,
            &self.trace_parent,
        ]
    }

    /// Inserts the instances, in order, skipping any whose idempotency key
    /// or business key exists (or was inserted just before it); returns
    /// the ids inserted.
    async fn write(&self, transaction: &Tx) -> Result<HashSet<Uuid>, Error> {
        if self.id.is_empty() {
            return Ok(HashSet::new());
        }
        Ok(transaction
            .query_c(Self::INSERT_SQL, &self.params())
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect())
    }
}

/// Fails the transaction (SQLSTATE `STALE_DEFINITION`) when one of the
/// definitions has a version newer than the one given (migration V16).
const NEWEST_GUARD_SQL: &str = "SELECT ward_definitions_newest($1::uuid[], $2::text[], $3::int[])";

/// What `NEWEST_GUARD_SQL` raises.
const STALE_DEFINITION: &str = "WD001";

fn is_stale_definition(error: &Error) -> bool {
    matches!(error, Error::Db(error)
        if error.code().is_some_and(|code| code.code() == STALE_DEFINITION))
}

/// Forgets what the items' definitions resolved to.
fn forget_resolved(items: &[(&Tenant, &StartInstance, Option<&str>)]) {
    let mut cached = RESOLVED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for (tenant, request, _) in items {
        cached.remove(&(tenant.id, request.definition.clone(), request.version));
    }
}

/// Most (tenant, definition, version asked) resolutions a process keeps.
const RESOLVED_CACHED_MAX: usize = 16_384;

/// A (tenant, definition name, version asked) and the (id, version) it
/// resolved to.
type Resolutions = HashMap<(Uuid, String, Option<i32>), (Uuid, i32)>;

/// What each (tenant, definition name, version asked) last resolved to.
static RESOLVED: std::sync::LazyLock<std::sync::Mutex<Resolutions>> =
    std::sync::LazyLock::new(Default::default);

/// Resolves each (tenant, definition, version) of `items`. With `defer`
/// (and `scope`), when the process resolved every one before, nothing is
/// sent and it returns `true`: BEGIN and the scope are then still to send.
async fn resolve_definitions<'a>(
    transaction: &Tx,
    scope: Option<Scope<'_>>,
    items: &[(&Tenant, &'a StartInstance, Option<&str>)],
    defer: bool,
) -> Result<
    (
        HashMap<(Uuid, &'a str, Option<i32>), Option<Resolved>>,
        bool,
    ),
    Error,
> {
    let mut keys: Vec<(Uuid, &'a str, Option<i32>)> = items
        .iter()
        .map(|(tenant, request, _)| (tenant.id, request.definition.as_str(), request.version))
        .collect();
    keys.sort_unstable();
    keys.dedup();
    if defer && scope.is_some() {
        let cached = RESOLVED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let hits: Option<HashMap<_, _>> = keys
            .iter()
            .map(|key| {
                let (id, version) = *cached.get(&(key.0, key.1.to_owned(), key.2))?;
                let definition = progress::cached_definition(id)?;
                Some((
                    *key,
                    Some(Resolved {
                        id,
                        version,
                        definition,
                    }),
                ))
            })
            .collect();
        if let Some(hits) = hits {
            return Ok((hits, true));
        }
    }
    // Prepared first, so that every request below goes out on the first
    // poll, in order: BEGIN and the scope, then the look-ups.
    let lookup = transaction.prepare_cached(RESOLVE_SQL).await?;
    let opening = match scope {
        Some(scope) => Some((scope, transaction.opening_statements().await?)),
        None => None,
    };
    let scoped = async {
        match &opening {
            Some((scope, (begin, scope_statement))) => {
                transaction
                    .send_opening(begin, scope_statement, *scope)
                    .await
            }
            None => Ok(()),
        }
    };
    let params: Vec<[&(dyn tokio_postgres::types::ToSql + Sync); 3]> = keys
        .iter()
        .map(|(tenant_id, name, version)| {
            [
                tenant_id as &(dyn tokio_postgres::types::ToSql + Sync),
                name,
                version,
            ]
        })
        .collect();
    let lookups = futures::future::join_all(
        params
            .iter()
            .map(|params| transaction.query_opt(&lookup, params)),
    );
    let (scoped, rows) = futures::join!(scoped, lookups);
    scoped?;
    let mut resolved = HashMap::with_capacity(keys.len());
    for (key, row) in keys.into_iter().zip(rows) {
        let found = match row? {
            Some(row) => {
                let id: Uuid = row.get(0);
                Some(Resolved {
                    id,
                    version: row.get(1),
                    definition: progress::definition_by_id(transaction, id).await?,
                })
            }
            None => None,
        };
        if let Some(found) = &found {
            let mut cached = RESOLVED
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if cached.len() >= RESOLVED_CACHED_MAX {
                cached.clear();
            }
            cached.insert((key.0, key.1.to_owned(), key.2), (found.id, found.version));
        }
        resolved.insert(key, found);
    }
    Ok((resolved, false))
}

/// The newest version of a tenant's definition, or the version asked for.
const RESOLVE_SQL: &str = "SELECT id, version FROM definitions \
     WHERE tenant_id = $1 AND name = $2 AND ($3::int IS NULL OR version = $3) \
     ORDER BY version DESC LIMIT 1";

/// Creates a child instance for a sub-workflow step; `None` when the
/// definition does not exist. The caller advances it.
pub(crate) async fn create_child(
    transaction: &Tx,
    parent: &Locked,
    name: &str,
    version: Option<i32>,
    input: &Value,
    parent_task_run_id: Uuid,
) -> Result<Option<Locked>, Error> {
    let Some(row) = transaction
        .query_opt_c(
            "SELECT id FROM definitions WHERE tenant_id = $1 AND name = $2 AND ($3::int IS NULL OR version = $3) \
             ORDER BY version DESC LIMIT 1",
            &[&parent.tenant_id, &name, &version],
        )
        .await?
    else {
        return Ok(None);
    };
    let definition_id: Uuid = row.get(0);
    let definition = progress::definition_by_id(transaction, definition_id).await?;
    let child_id = Uuid::now_v7();
    let idempotency_key = format!("child:{parent_task_run_id}");
    transaction
        .execute_c(
            "INSERT INTO instances (id, tenant_id, definition_id, definition_name, status, input, idempotency_key, \
             parent_instance_id, parent_task_run_id, depth, trace_parent) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, \
             (SELECT trace_parent FROM instances WHERE id = $8))",
            &[
                &child_id,
                &parent.tenant_id,
                &definition_id,
                &definition.name,
                &status::RUNNING,
                input,
                &idempotency_key,
                &parent.id,
                &parent_task_run_id,
                &(parent.depth + 1),
            ],
        )
        .await?;
    Ok(Some(Locked {
        id: child_id,
        tenant_id: parent.tenant_id,
        tier: parent.tier.clone(),
        status: status::RUNNING.to_owned(),
        definition,
        input: input.clone(),
        parent: Some((parent.id, parent_task_run_id)),
        depth: parent.depth + 1,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_start_is_one_statement_whose_instances_insert_cannot_skip_a_row() {
        assert_eq!(
            renumber_parameters("a $1, $14::int[] $ $x", 8),
            "a $9, $22::int[] $ $x"
        );
        let sql = &*FRESH_START_SQL;
        assert!(
            sql.starts_with("WITH new_instances AS (INSERT INTO instances"),
            "{sql}"
        );
        assert!(
            !sql.contains("ON CONFLICT DO NOTHING RETURNING id"),
            "{sql}"
        );
        assert!(
            sql.contains("unnest($1::uuid[]") && sql.contains("unnest($9::uuid[]"),
            "{sql}"
        );
        assert!(
            sql.contains("$22::bigint[]") && !sql.contains("$23"),
            "{sql}"
        );
    }
}
