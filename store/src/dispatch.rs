//! Leader-only writes: claiming a leadership epoch and moving ready tasks to
//! dispatched. Each checks the epoch in the same transaction (fencing).

use std::future::Future;

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;
use ward_shared::engine::RunState;
use ward_shared::schedule::Cron;
use ward_shared::trace::{TraceParent, span_bytes};
use ward_shared::wire::{HttpCall, StartInstance, TaskMessage};

use crate::Cached;
use crate::progress::{self, Settlement};
use crate::{Error, READY_CHANNEL, SCOPE_SQL, Scope, Store, Tenant, Tx, scoped};

/// A ready task claimed for dispatch, with the tier queue it goes to.
#[derive(Debug, Clone)]
pub struct ReadyTask {
    pub tier: String,
    pub message: TaskMessage,
}

impl Store {
    /// Starts a leadership term won in etcd at election `revision` of the
    /// etcd cluster `etcd_cluster_id`, and returns its epoch (the fencing
    /// token: the previous epoch plus one). Fails with `Fenced` when a term
    /// with a newer (or the same) revision of the same etcd cluster was
    /// already claimed. Waits for any in-flight dispatch of the previous
    /// leader to finish first: that transaction holds the epoch row in share
    /// mode.
    pub async fn claim_epoch(
        &self,
        revision: i64,
        etcd_cluster_id: i64,
        holder: &str,
    ) -> Result<i64, Error> {
        let transaction = scoped(self.pool.get().await?, Scope::System).await?;
        let claimed = transaction
            .query_opt_c(
                "INSERT INTO leader_epoch (id, epoch, holder, elected_at, etcd_cluster_id, etcd_revision) \
                 VALUES (1, 1, $3, now(), $2, $1) \
                 ON CONFLICT (id) DO UPDATE SET epoch = leader_epoch.epoch + 1, holder = EXCLUDED.holder, \
                 elected_at = now(), etcd_cluster_id = EXCLUDED.etcd_cluster_id, etcd_revision = EXCLUDED.etcd_revision \
                 WHERE leader_epoch.etcd_cluster_id IS DISTINCT FROM EXCLUDED.etcd_cluster_id \
                 OR leader_epoch.etcd_revision < EXCLUDED.etcd_revision \
                 RETURNING epoch",
                &[&revision, &etcd_cluster_id, &holder],
            )
            .await?;
        if let Some(row) = claimed {
            let epoch: i64 = row.get(0);
            // Read the clock after the epoch row is locked: every write fenced
            // by an older epoch committed before this instant.
            transaction
                .execute_c(
                    "INSERT INTO leader_terms (epoch, holder, etcd_cluster_id, etcd_revision, claimed_at) \
                     VALUES ($1, $2, $3, $4, clock_timestamp()) ON CONFLICT (epoch) DO NOTHING",
                    &[&epoch, &holder, &etcd_cluster_id, &revision],
                )
                .await?;
            transaction.commit().await?;
            return Ok(epoch);
        }
        drop(transaction);
        let epoch_current = self.current_epoch().await?.unwrap_or_default();
        Err(Error::Fenced {
            epoch: revision,
            epoch_current,
        })
    }

    /// The current leadership term (holder, epoch, when), if one was ever claimed.
    pub async fn leader(&self) -> Result<Option<ward_shared::wire::LeaderRecord>, Error> {
        let client = self.pool.get().await?;
        let row = client
            .query_opt_c(
                "SELECT holder, epoch, elected_at FROM leader_epoch WHERE id = 1",
                &[],
            )
            .await?;
        Ok(row.map(|row| ward_shared::wire::LeaderRecord {
            node_id: row.get(0),
            epoch: row.get(1),
            elected_at: row.get(2),
        }))
    }

    /// The epoch of the current leadership term, if one was ever claimed.
    pub async fn current_epoch(&self) -> Result<Option<i64>, Error> {
        let client = self.pool.get().await?;
        let row = client
            .query_opt_c("SELECT epoch FROM leader_epoch WHERE id = 1", &[])
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
        lease: Lease,
        batch_len_max: i64,
        publish: F,
    ) -> Result<usize, Error>
    where
        F: FnOnce(Vec<ReadyTask>) -> Fut,
        Fut: Future<Output = Result<(), E>>,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        // BEGIN goes out with the claim (`claim_and_publish`).
        let transaction = Tx::open(self.pool.get().await?);
        let dispatched = claim_and_publish(
            transaction,
            epoch,
            lease,
            "SELECT id, tenant_id, instance_id, step_id, handler, attempt, tier, idempotency_key, input, kind, config, \
             coalesce(available_at, created_at), \
             (SELECT i.trace_parent FROM instances i WHERE i.id = task_runs.instance_id) FROM task_runs \
             WHERE state = 'ready' AND NOT external ORDER BY created_at LIMIT $1 FOR UPDATE SKIP LOCKED",
            &[&batch_len_max],
            publish,
        )
        .await?;
        Ok(dispatched.values().sum())
    }

    /// Fair dispatch: claims up to `count` ready runs of each picked
    /// tenant's tier, those of its oldest instances first (UUIDv7 ids; so
    /// work in progress finishes before new work starts), skipping rows
    /// another transaction holds and tenants that are not active (the
    /// dispatcher's view of its tenants may be a rebuild old);
    /// publishes them, and marks them dispatched, under the epoch check.
    /// Returns how many were dispatched per tenant; fewer than asked means
    /// the tenant's ready work (of that tier) ran out.
    pub async fn dispatch_picks<F, Fut, E>(
        &self,
        epoch: i64,
        lease: Lease,
        picks: &[Pick],
        publish: F,
    ) -> Result<HashMap<Uuid, usize>, Error>
    where
        F: FnOnce(Vec<ReadyTask>) -> Fut,
        Fut: Future<Output = Result<(), E>>,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        if picks.is_empty() {
            return Ok(HashMap::new());
        }
        let tenants: Vec<Uuid> = picks.iter().map(|pick| pick.tenant_id).collect();
        let tiers: Vec<&str> = picks.iter().map(|pick| pick.tier.as_str()).collect();
        let counts: Vec<i64> = picks.iter().map(|pick| pick.count).collect();
        // BEGIN goes out with the claim (`claim_and_publish`).
        let transaction = Tx::open(self.pool.get().await?);
        let dispatched = claim_and_publish(
            transaction,
            epoch,
            lease,
            "SELECT r.id, r.tenant_id, r.instance_id, r.step_id, r.handler, r.attempt, r.tier, r.idempotency_key, \
                 r.input, r.kind, r.config, coalesce(r.available_at, r.created_at), \
                 (SELECT i.trace_parent FROM instances i WHERE i.id = r.instance_id) \
                 FROM unnest($1::uuid[], $2::text[], $3::bigint[]) AS pick (tenant_id, tier, take) \
                 CROSS JOIN LATERAL (SELECT * FROM task_runs t WHERE t.tier = pick.tier AND t.tenant_id = pick.tenant_id \
                   AND t.state = 'ready' AND NOT t.external \
                   AND EXISTS (SELECT 1 FROM tenants s WHERE s.id = pick.tenant_id AND s.status = 'active') \
                   ORDER BY t.instance_id, t.created_at LIMIT pick.take FOR UPDATE SKIP LOCKED) r",
            &[
                &tenants,
                &tiers,
                &counts,
            ],
            publish,
        )
        .await?;
        Ok(dispatched)
    }

    /// Analyzes `instances` and `task_runs` once each first holds
    /// `rows_min` rows, if autovacuum has not yet (migration V12): until
    /// then every session's plans were made without statistics. Returns how
    /// many of the two still wait for their first ANALYZE (0: done).
    pub async fn first_analyze(&self, rows_min: i64) -> Result<i32, Error> {
        let client = self.pool.get().await?;
        let row = client
            .query_one("SELECT ward_first_analyze($1)", &[&rows_min])
            .await?;
        Ok(row.get(0))
    }

    /// Number of ready tasks per tier (the backlog kept in Postgres).
    pub async fn ready_backlog(&self) -> Result<Vec<(String, i64)>, Error> {
        let client = self.pool.get().await?;
        let client = scoped(client, Scope::System).await?;
        let rows = client
            .query_c(
                "SELECT tier, count(*) FROM task_runs WHERE state = 'ready' AND NOT external GROUP BY tier",
                &[],
            )
            .await?;
        Ok(rows
            .into_iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect())
    }

    /// Fires up to `batch_len_max` due timers, each in its own fenced
    /// transaction: a retry backoff makes its run ready, a delay completes,
    /// a signal wait times out. Returns how many fired and the instances
    /// they ended.
    pub async fn fire_due_timers(&self, epoch: i64, batch_len_max: i64) -> Result<Fired, Error> {
        let due = {
            let client = self.pool.get().await?;
            let client = scoped(client, Scope::System).await?;
            client
                .query_c(
                    "SELECT id, tenant_id, instance_id FROM task_runs WHERE state = 'waiting' \
                     AND available_at <= now() ORDER BY available_at LIMIT $1",
                    &[&batch_len_max],
                )
                .await?
        };
        let mut fired = Fired::default();
        for row in due {
            let (task_run_id, tenant_id, instance_id): (Uuid, Uuid, Uuid) =
                (row.get(0), row.get(1), row.get(2));
            let client = self.pool.get().await?;
            let transaction = scoped(client, Scope::System).await?;
            check_epoch(&transaction, epoch).await?;
            let mut completion = None;
            // Instance first, then the run: the order every writer uses.
            if progress::lock_instance(&transaction, tenant_id, instance_id)
                .await?
                .is_none()
            {
                continue;
            }
            let Some(run) = transaction
                .query_opt_c(
                    "SELECT kind, input, signal, available_at - created_at FROM task_runs \
                     WHERE id = $1 AND state = 'waiting' AND available_at <= now() FOR UPDATE",
                    &[&task_run_id],
                )
                .await?
            else {
                continue;
            };
            let kind: String = run.get(0);
            match kind.as_str() {
                "task" | "http" => {
                    transaction
                        .execute_c(
                            "UPDATE task_runs SET state = 'ready' WHERE id = $1",
                            &[&task_run_id],
                        )
                        .await?;
                    transaction
                        .execute_c(
                            "SELECT pg_notify($1, $2)",
                            &[&READY_CHANNEL, &tenant_id.to_string()],
                        )
                        .await?;
                }
                "delay" => {
                    let input: Value = run.get(1);
                    completion = Some(
                        progress::settle(
                            &transaction,
                            tenant_id,
                            instance_id,
                            task_run_id,
                            &[RunState::Waiting],
                            None,
                            Settlement::Succeeded(input),
                            None,
                        )
                        .await?,
                    );
                }
                "wait_signal" => {
                    let signal: Option<String> = run.get(2);
                    let error =
                        format!("no signal `{}` arrived in time", signal.unwrap_or_default());
                    completion = Some(
                        progress::settle(
                            &transaction,
                            tenant_id,
                            instance_id,
                            task_run_id,
                            &[RunState::Waiting],
                            None,
                            Settlement::TimedOut(error),
                            None,
                        )
                        .await?,
                    );
                }
                other => return Err(Error::Corrupt(format!("a {other} run has a timer"))),
            }
            transaction.commit().await?;
            fired.count += 1;
            fired.note(completion);
        }
        Ok(fired)
    }

    /// Fails dispatched runs whose lease expired (a worker that died without
    /// its message coming back, or that hangs), each in its own fenced
    /// transaction, as retryable: the step's retry policy runs another
    /// attempt. A late answer from the old attempt is then a duplicate.
    /// Returns how many expired.
    pub async fn expire_leases(&self, epoch: i64, batch_len_max: i64) -> Result<Fired, Error> {
        let expired = {
            let client = self.pool.get().await?;
            let client = scoped(client, Scope::System).await?;
            client
                .query_c(
                    "SELECT id, tenant_id, instance_id FROM task_runs WHERE state = 'dispatched' \
                     AND lease_expires_at < now() ORDER BY lease_expires_at LIMIT $1",
                    &[&batch_len_max],
                )
                .await?
        };
        let mut fired = Fired::default();
        for row in expired {
            let (task_run_id, tenant_id, instance_id): (Uuid, Uuid, Uuid) =
                (row.get(0), row.get(1), row.get(2));
            let client = self.pool.get().await?;
            let transaction = scoped(client, Scope::System).await?;
            check_epoch(&transaction, epoch).await?;
            let still_expired = transaction
                .query_opt_c(
                    "SELECT 1 FROM task_runs WHERE id = $1 AND state = 'dispatched' AND lease_expires_at < now()",
                    &[&task_run_id],
                )
                .await?
                .is_some();
            if !still_expired {
                continue;
            }
            let settlement = Settlement::Failed {
                error: "lease expired: the worker was lost or stopped responding".to_owned(),
                retryable: true,
            };
            let completion = progress::settle(
                &transaction,
                tenant_id,
                instance_id,
                task_run_id,
                &[RunState::Dispatched],
                None,
                settlement,
                None,
            )
            .await?;
            if matches!(completion, crate::Completion::Applied { .. }) {
                transaction.commit().await?;
                fired.count += 1;
                fired.note(Some(completion));
            }
        }
        Ok(fired)
    }

    /// Extends the lease of a dispatched run (a handler's heartbeat).
    /// Returns false when the run is no longer dispatched (it ended, or its
    /// lease already expired and another attempt took over).
    pub async fn heartbeat(
        &self,
        tenant_id: Uuid,
        task_run_id: Uuid,
        lease_ms: i64,
    ) -> Result<bool, Error> {
        let client = self.pool.get().await?;
        let client = scoped(client, Scope::Tenant(tenant_id)).await?;
        let extended = client
            .execute_c(
                "UPDATE task_runs SET lease_expires_at = now() + $1::bigint * interval '1 millisecond' \
                 WHERE tenant_id = $2 AND id = $3 AND state = 'dispatched'",
                &[&lease_ms, &tenant_id, &task_run_id],
            )
            .await?;
        client.commit().await?;
        Ok(extended == 1)
    }

    /// Returns external tasks whose lock expired to the ready state, under
    /// the epoch check. Returns how many.
    pub async fn reap_expired_locks(&self, epoch: i64, batch_len_max: i64) -> Result<u64, Error> {
        let client = self.pool.get().await?;
        let transaction = scoped(client, Scope::System).await?;
        check_epoch(&transaction, epoch).await?;
        let reaped = transaction
            .execute_c(
                "UPDATE task_runs SET state = 'ready', lock_owner = NULL, locked_until = NULL, dispatched_at = NULL \
                 WHERE id IN (SELECT id FROM task_runs WHERE state = 'locked' AND locked_until < now() \
                 ORDER BY locked_until LIMIT $1 FOR UPDATE SKIP LOCKED)",
                &[&batch_len_max],
            )
            .await?;
        if reaped > 0 {
            transaction
                .execute_c("SELECT pg_notify($1, '')", &[&READY_CHANNEL])
                .await?;
        }
        transaction.commit().await?;
        Ok(reaped)
    }

    /// Starts one instance for each due schedule tick, each in its own
    /// fenced transaction, keyed `schedule:<name>:<tick>` so a tick starts at
    /// most one instance even across failover. Missed ticks collapse into
    /// one. Returns how many instances started.
    pub async fn fire_due_schedules(&self, epoch: i64, batch_len_max: i64) -> Result<usize, Error> {
        let due: Vec<Uuid> = {
            let client = self.pool.get().await?;
            let client = scoped(client, Scope::System).await?;
            client
                .query_c(
                    "SELECT id FROM schedules WHERE enabled AND next_fire_at <= now() ORDER BY next_fire_at LIMIT $1",
                    &[&batch_len_max],
                )
                .await?
                .iter()
                .map(|row| row.get(0))
                .collect()
        };
        let mut started = 0;
        for schedule_id in due {
            let client = self.pool.get().await?;
            let transaction = scoped(client, Scope::System).await?;
            check_epoch(&transaction, epoch).await?;
            let Some(row) = transaction
                .query_opt_c(
                    "SELECT s.tenant_id, t.slug, t.tier, s.name, s.definition, s.version, s.cron, s.input, s.next_fire_at \
                     FROM schedules s JOIN tenants t ON t.id = s.tenant_id \
                     WHERE s.id = $1 AND s.enabled AND s.next_fire_at <= now() FOR UPDATE OF s SKIP LOCKED",
                    &[&schedule_id],
                )
                .await?
            else {
                continue;
            };
            let tenant = Tenant {
                id: row.get(0),
                slug: row.get(1),
                tier: row.get(2),
                status: "active".to_owned(),
                quotas: crate::Quotas::default(),
            };
            let name: String = row.get(3);
            let tick: DateTime<Utc> = row.get(8);
            let request = StartInstance {
                definition: row.get(4),
                version: row.get(5),
                input: row.get(7),
                business_key: None,
                trace_parent: None,
            };
            let key = format!("schedule:{name}:{}", tick.to_rfc3339());
            let last_error = match crate::workflow::start_instance_tx(
                &transaction,
                &tenant,
                &request,
                Some(&key),
            )
            .await
            {
                Ok(instance) => {
                    started += usize::from(instance.created);
                    None
                }
                Err(Error::DefinitionNotFound { name, .. }) => {
                    Some(format!("definition `{name}` not found"))
                }
                Err(other) => return Err(other),
            };
            let cron_text: String = row.get(6);
            let next = Cron::parse(&cron_text)
                .ok()
                .and_then(|cron| cron.next_after(tick.max(Utc::now())))
                .unwrap_or_else(|| Utc::now() + chrono::Duration::days(365));
            transaction
                .execute_c(
                    "UPDATE schedules SET next_fire_at = $1, last_fire_at = $2, last_error = $3 WHERE id = $4",
                    &[&next, &tick, &last_error, &schedule_id],
                )
                .await?;
            transaction.commit().await?;
        }
        Ok(started)
    }
}

/// How long a dispatched run's lease lasts: its step's `timeout_ms` (or
/// `default_ms`) plus `grace_ms`. Heartbeats extend it. `publish_ms` bounds
/// how long the dispatch transaction waits for publisher confirms: it may
/// sit idle that long (plus a margin) instead of the pool's `TX_IDLE_MS_MAX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub default_ms: i64,
    pub grace_ms: i64,
    pub publish_ms: i64,
}

/// What a leader loop fired: how many, and the end states of the instances
/// it ended (for `ward_instances_finished_total`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fired {
    pub count: usize,
    pub ended: Vec<String>,
}

impl Fired {
    fn note(&mut self, completion: Option<crate::Completion>) {
        if let Some(crate::Completion::Applied {
            instance_status,
            ended: true,
        }) = completion
        {
            self.ended.push(instance_status);
        }
    }
}

/// Added to `Lease::publish_ms` for the dispatch transaction's idle bound.
const PUBLISH_IDLE_MARGIN_MS: i64 = 500;

/// A fair-dispatch decision: up to `count` of a tenant's oldest ready runs of `tier`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pick {
    pub tenant_id: Uuid,
    pub tier: String,
    pub count: i64,
}

/// The dispatch transaction, in two round trips. The first: BEGIN, its
/// scope (every tenant) and idle bound, the fence (the epoch row locked in
/// share mode) and the claim, pipelined on the connection (the server runs
/// them in this order). `claim_sql` locks the ready runs it claims and
/// returns them; once `publish` (which gets them) returns Ok, the second
/// marks them dispatched with one UPDATE and commits. Nothing of it lasts
/// otherwise (the dropped `Tx` rolls back), so only when the epoch matched
/// and every confirm came. Returns how many runs were claimed per tenant.
///
/// The runs are marked after the confirms, not in the claim: a claim that
/// wrote the new row versions at once, before waiting for the broker,
/// tripled scenario 3's p99 in alternating A/B runs (CHANGELOG).
async fn claim_and_publish<F, Fut, E>(
    transaction: Tx,
    epoch: i64,
    lease: Lease,
    claim_sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    publish: F,
) -> Result<HashMap<Uuid, usize>, Error>
where
    F: FnOnce(Vec<ReadyTask>) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (begin, scope, idle, fence, claim) = futures::future::try_join5(
        transaction.begin_statement(),
        transaction.prepare_cached(SCOPE_SQL),
        transaction.prepare_cached(IDLE_BOUND_SQL),
        transaction.prepare_cached(FENCE_SQL),
        transaction.prepare_cached(claim_sql),
    )
    .await?;
    let (tenant, tenants, system) = Scope::System.settings();
    let scope_params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
        [&tenant, &tenants, &system];
    // The transaction waits idle for the confirms: allow that, and no more.
    let idle_bound_ms = (lease
        .publish_ms
        .clamp(0, i64::from(i32::MAX) - PUBLISH_IDLE_MARGIN_MS)
        + PUBLISH_IDLE_MARGIN_MS)
        .to_string();
    let idle_params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&idle_bound_ms];
    // `join`, not `try_join`: every request goes out on the first poll, in
    // this order.
    let (begun, scoped, bounded, fence, claimed) = futures::join!(
        transaction.execute(&begin, &[]),
        transaction.execute(&scope, &scope_params),
        transaction.execute(&idle, &idle_params),
        transaction.query_opt(&fence, &[]),
        transaction.query(&claim, params),
    );
    begun?;
    scoped?;
    bounded?;
    compare_epoch(epoch, fence?)?;
    let rows = claimed?;
    if rows.is_empty() {
        // Nothing claimed: the dropped `Tx` rolls back without waiting.
        return Ok(HashMap::new());
    }
    let mut per_tenant: HashMap<Uuid, usize> = HashMap::new();
    let tasks: Vec<ReadyTask> = rows
        .into_iter()
        .map(|row| {
            let kind: String = row.get(9);
            let config: Option<Value> = row.get(10);
            let config = config.unwrap_or(Value::Null);
            let http = (kind == "http").then(|| HttpCall {
                url: config["url"].as_str().unwrap_or_default().to_owned(),
                method: config["method"].as_str().unwrap_or("POST").to_owned(),
                headers: serde_json::from_value(config["headers"].clone()).unwrap_or_default(),
            });
            let tenant_id: Uuid = row.get(1);
            *per_tenant.entry(tenant_id).or_default() += 1;
            let tier: String = row.get(6);
            ReadyTask {
                tier: tier.clone(),
                message: TaskMessage {
                    tier: Some(tier),
                    ready_at: Some(row.get(11)),
                    trace_parent: row
                        .get::<_, Option<String>>(12)
                        .as_deref()
                        .and_then(TraceParent::parse)
                        .map(|trace| {
                            let run: Uuid = row.get(0);
                            trace.child(span_bytes(run.as_bytes())).header()
                        }),
                    task_run_id: row.get(0),
                    tenant_id,
                    instance_id: row.get(2),
                    step_id: row.get(3),
                    handler: row.get(4),
                    attempt: row.get(5),
                    idempotency_key: row.get(7),
                    input: row.get(8),
                    epoch,
                    kind,
                    timeout_ms: config["timeout_ms"].as_u64(),
                    http,
                },
            }
        })
        .collect();
    let ids: Vec<Uuid> = tasks.iter().map(|task| task.message.task_run_id).collect();
    publish(tasks)
        .await
        .map_err(|error| Error::Publish(error.into()))?;
    // Marked and committed in one round trip.
    transaction
        .execute_and_commit(
            "UPDATE task_runs SET state = $1, dispatched_at = now(), dispatch_epoch = $2, \
             lease_expires_at = now() + (coalesce((config->>'timeout_ms')::bigint, $4) + $5) * interval '1 millisecond' \
             WHERE id = ANY($3) AND state = 'ready'",
            &[&RunState::Dispatched.as_str(), &epoch, &ids, &lease.default_ms, &lease.grace_ms],
        )
        .await?;
    Ok(per_tenant)
}

/// Raises the transaction's idle bound (ms) for the publisher confirms.
const IDLE_BOUND_SQL: &str = "SELECT set_config('idle_in_transaction_session_timeout', $1, true)";

/// Reads the current epoch, locking its row in share mode (see `check_epoch`).
const FENCE_SQL: &str = "SELECT epoch FROM leader_epoch WHERE id = 1 FOR SHARE";

/// Fails with `Fenced` unless the epoch row read says `epoch`.
fn compare_epoch(epoch: i64, row: Option<tokio_postgres::Row>) -> Result<(), Error> {
    let epoch_current: i64 = row.map(|row| row.get(0)).unwrap_or_default();
    if epoch_current != epoch {
        return Err(Error::Fenced {
            epoch,
            epoch_current,
        });
    }
    Ok(())
}

/// Locks the epoch row in share mode and compares: a newer leader's
/// `claim_epoch` must wait for this transaction, and this transaction fails if
/// a newer leader already claimed.
async fn check_epoch(transaction: &Tx, epoch: i64) -> Result<(), Error> {
    compare_epoch(epoch, transaction.query_opt_c(FENCE_SQL, &[]).await?)
}
