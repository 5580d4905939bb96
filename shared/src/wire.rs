//! Wire types: the task message on the queues and the HTTP API bodies.
//! Every type that crosses a process boundary is defined here, once.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::definition::Problem;

/// The message a leader publishes for one task run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskMessage {
    pub tenant_id: Uuid,
    pub instance_id: Uuid,
    pub task_run_id: Uuid,
    pub step_id: String,
    pub handler: String,
    pub attempt: i32,
    pub idempotency_key: String,
    pub input: Value,
    /// The leadership epoch that dispatched this message.
    pub epoch: i64,
    /// `task` or `http`.
    #[serde(default = "task_kind")]
    pub kind: String,
    /// Bound on this attempt, from the step's `timeout_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// The request of an `http` step (its body is `input`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpCall>,
    /// The tier queue it was published to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    /// When the run became ready (created, or its timer came due): the
    /// start of its schedule-to-start latency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_at: Option<DateTime<Utc>>,
    /// The W3C `traceparent` of this hop: travels in the AMQP message's
    /// `traceparent` header, not in the body.
    #[serde(skip)]
    pub trace_parent: Option<String>,
}

fn task_kind() -> String {
    "task".to_owned()
}

/// What an `http` step calls.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HttpCall {
    pub url: String,
    pub method: String,
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
}

/// `POST /v1/instances` body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartInstance {
    /// Definition name; the latest version unless `version` is given.
    pub definition: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<i32>,
    #[serde(default)]
    pub input: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub business_key: Option<String>,
    /// The W3C `traceparent` of the request (from its header, not the body);
    /// a new trace starts when None.
    #[serde(skip)]
    pub trace_parent: Option<String>,
}

/// `POST /v1/instances/batch` body: up to 1,000 starts of one tenant,
/// committed together (all or none).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartBatch {
    pub instances: Vec<StartBatchItem>,
}

/// One start of a batch: a `StartInstance` with its own idempotency key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartBatchItem {
    pub definition: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<i32>,
    #[serde(default)]
    pub input: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub business_key: Option<String>,
    /// Like the `Idempotency-Key` header of a single start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

/// `POST /v1/instances/batch` answer: one entry per item, in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchStarted {
    pub instances: Vec<InstanceStarted>,
}

/// `POST /v1/instances` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceStarted {
    pub id: Uuid,
    pub status: String,
    pub definition: String,
    pub version: i32,
    /// False when an idempotency key or business key matched an existing instance.
    pub created: bool,
}

/// `GET /v1/instances/{id}` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceView {
    pub id: Uuid,
    pub definition: String,
    pub version: i32,
    pub status: String,
    pub input: Value,
    pub output: Option<Value>,
    pub error: Option<String>,
    pub business_key: Option<String>,
    pub parent_instance_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
    /// The W3C trace id that follows this instance's work across processes.
    #[serde(default)]
    pub trace_id: Option<String>,
    pub steps: Vec<StepView>,
}

/// One instance in a list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceSummary {
    pub id: Uuid,
    pub definition: String,
    pub version: i32,
    pub status: String,
    pub business_key: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
}

/// `GET /v1/instances` answer: newest first; pass `next_cursor` as `cursor`
/// for the next page.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceList {
    pub instances: Vec<InstanceSummary>,
    pub next_cursor: Option<String>,
}

/// One entry of an instance's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEvent {
    pub at: DateTime<Utc>,
    /// instance_created, step_ready, step_waiting, step_skipped,
    /// retry_scheduled, timer_fired, step_dispatched, step_locked,
    /// step_started, step_completed, step_failed, step_timed_out,
    /// step_cancelled, signal_received, instance_completed,
    /// instance_failed, instance_cancelled.
    pub event: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_run_id: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<Value>,
}

/// `GET /v1/instances/{id}/history` answer, oldest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct History {
    pub instance_id: Uuid,
    pub events: Vec<HistoryEvent>,
}

/// `POST /v1/instances/{id}/signals/{name}` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignalSent {
    /// True when a waiting step took it now; false when it is kept for a
    /// step that waits for it later.
    pub delivered: bool,
}

/// `POST /v1/external-tasks/fetch-and-lock` body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FetchAndLock {
    pub worker_id: String,
    /// Handler names this worker runs.
    pub handlers: Vec<String>,
    #[serde(default = "one")]
    pub max_tasks: u32,
    pub lock_ms: u64,
    /// Long-poll: wait up to this long for a task when none is ready.
    #[serde(default)]
    pub wait_ms: u64,
}

fn one() -> u32 {
    1
}

/// A task locked for an external worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LockedTask {
    pub task_run_id: Uuid,
    pub instance_id: Uuid,
    pub step_id: String,
    pub handler: String,
    pub attempt: i32,
    pub idempotency_key: String,
    pub input: Value,
    pub locked_until: DateTime<Utc>,
}

/// `POST /v1/external-tasks/{id}/complete` body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompleteExternal {
    pub worker_id: String,
    #[serde(default)]
    pub output: Value,
}

/// `POST /v1/external-tasks/{id}/fail` body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailExternal {
    pub worker_id: String,
    pub error: String,
    /// Retry under the step's policy (default true).
    #[serde(default = "yes")]
    pub retryable: bool,
}

fn yes() -> bool {
    true
}

/// `POST /v1/external-tasks/{id}/extend-lock` body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtendLock {
    pub worker_id: String,
    pub lock_ms: u64,
}

/// `POST /v1/schedules` body: creates or replaces a schedule by name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSpec {
    pub name: String,
    pub definition: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<i32>,
    /// 5 fields, or 6 with seconds first; UTC.
    pub cron: String,
    #[serde(default)]
    pub input: Value,
    #[serde(default = "yes")]
    pub enabled: bool,
}

/// A schedule as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScheduleView {
    pub name: String,
    pub definition: String,
    pub version: Option<i32>,
    pub cron: String,
    pub input: Value,
    pub enabled: bool,
    pub next_fire_at: DateTime<Utc>,
    pub last_fire_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
}

/// One task run within an instance view.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepView {
    pub task_run_id: Uuid,
    pub step_id: String,
    pub kind: String,
    pub handler: String,
    pub attempt: i32,
    pub state: String,
    pub idempotency_key: String,
    pub input: Value,
    pub output: Option<Value>,
    pub error: Option<String>,
    /// For a failed run: may another attempt succeed?
    pub retryable: bool,
    /// When a waiting run's timer fires (or fired).
    pub available_at: Option<DateTime<Utc>>,
    pub child_instance_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub dispatched_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// `POST /v1/definitions` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DefinitionPublished {
    pub id: Uuid,
    pub name: String,
    pub version: i32,
    /// False when an identical latest version already existed.
    pub created: bool,
}

/// `POST /v1/admin/tenants` body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTenant {
    pub slug: String,
    pub tier: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quotas: Option<Quotas>,
}

/// `POST /v1/admin/tenants` answer; the API key is shown only here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantCreated {
    pub id: Uuid,
    pub slug: String,
    pub tier: String,
    pub api_key: String,
}

// ---- Tenancy (admin API and `wardctl apply`) ----

/// A tier: one queue, a weight in dispatch, a guaranteed minimum share.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierSpec {
    pub name: String,
    #[serde(default = "weight_default")]
    pub weight: i32,
    #[serde(default = "min_share_default")]
    pub min_share_percent: i32,
}

fn weight_default() -> i32 {
    1
}

fn min_share_default() -> i32 {
    10
}

/// Tenant quotas; every field has a default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Quotas {
    /// Most task runs dispatched (or locked) and not yet settled.
    pub inflight_max: i32,
    /// Most task runs dispatched per second.
    pub dispatch_rate_per_s: i32,
    /// Most instances running at once.
    pub running_instances_max: i32,
    /// Largest request body.
    pub payload_bytes_max: i32,
}

impl Default for Quotas {
    fn default() -> Self {
        Quotas {
            inflight_max: 64,
            dispatch_rate_per_s: 500,
            running_instances_max: 10_000,
            payload_bytes_max: 256 * 1024,
        }
    }
}

/// A tenant as its administrator sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantRecord {
    pub id: Uuid,
    pub slug: String,
    pub tier: String,
    /// active, suspended or deleted.
    pub status: String,
    pub quotas: Quotas,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A tenant in a declarative apply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantSpec {
    pub slug: String,
    pub tier: String,
    #[serde(default = "active")]
    pub status: String,
    #[serde(default)]
    pub quotas: Quotas,
}

fn active() -> String {
    "active".to_owned()
}

/// What an apply did (or would do, in a dry run).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ApplyReport {
    pub tiers_created: Vec<String>,
    pub tiers_updated: Vec<String>,
    pub tenants_created: Vec<String>,
    pub tenants_updated: Vec<String>,
    pub tenants_unchanged: usize,
    /// API keys of created tenants, shown once (empty in a dry run).
    pub keys: Vec<(String, String)>,
}

/// An API key without its secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub id: Uuid,
    pub prefix: String,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// A tenant's current use of its quotas.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub running_instances: i64,
    pub inflight_tasks: i64,
    pub ready_tasks: i64,
}

/// Every error answer of the API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// What went wrong, with the field at fault when there is one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Stable machine-readable code, e.g. `invalid_json`, `definition_not_found`.
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<Problem>,
}

/// Instance statuses.
pub mod status {
    pub const RUNNING: &str = "running";
    pub const COMPLETED: &str = "completed";
    pub const FAILED: &str = "failed";
    pub const CANCELLED: &str = "cancelled";
}

/// A message that could not be processed, as recorded in the dead-letter table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetterRecord {
    pub id: Uuid,
    pub tenant_id: Option<Uuid>,
    pub instance_id: Option<Uuid>,
    pub task_run_id: Option<Uuid>,
    pub step_id: Option<String>,
    pub attempt: Option<i32>,
    pub tier: Option<String>,
    /// `delivery_limit` (the message crashed or stalled its workers too
    /// often), `rejected` (a worker could not read it) or the broker's reason.
    pub reason: String,
    /// Deliveries the broker counted before giving up, when it said.
    pub deliveries: Option<i64>,
    pub detail: String,
    pub created_at: DateTime<Utc>,
}

/// `GET /v1/dead-letters` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetterPage {
    pub dead_letters: Vec<DeadLetterRecord>,
}

/// A process registered in etcd under the cluster's prefix, with a lease: it
/// disappears within the lease TTL after the process is lost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberRecord {
    /// `master` or `worker`.
    pub role: String,
    pub node_id: String,
    /// Tiers a worker consumes (empty for a master).
    #[serde(default)]
    pub tiers: Vec<String>,
    /// Address of its HTTP endpoints (API or metrics).
    pub http_addr: String,
    pub host: String,
    pub pid: u32,
    pub version: String,
    pub started_at: DateTime<Utc>,
}

/// The current leader, from the store's epoch record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaderRecord {
    pub node_id: String,
    pub epoch: i64,
    pub elected_at: DateTime<Utc>,
}

/// One tier's capacity in `GET /v1/cluster`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TierStatus {
    pub tier: String,
    /// Workers registered that consume the tier.
    pub workers: i64,
    /// Ready task runs waiting in the store.
    pub ready: i64,
    /// Dispatched, not yet settled.
    pub in_flight: i64,
    /// Workers the leader computed the tier needs (`ward_workers_desired`);
    /// None before a leader published it, or when it is stale.
    #[serde(default)]
    pub workers_desired: Option<i64>,
}

/// The leader's desired worker counts, as published in etcd.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DesiredWorkers {
    pub epoch: i64,
    pub computed_at: DateTime<Utc>,
    pub tiers: std::collections::BTreeMap<String, i64>,
}

/// `GET /v1/cluster` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub leader: Option<LeaderRecord>,
    pub masters: Vec<MemberRecord>,
    pub workers: Vec<MemberRecord>,
    pub tiers: Vec<TierStatus>,
}
