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
}

/// `POST /v1/instances` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceStarted {
    pub id: Uuid,
    pub status: String,
    pub definition: String,
    pub version: i32,
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
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
    pub steps: Vec<StepView>,
}

/// One task run within an instance view.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepView {
    pub task_run_id: Uuid,
    pub step_id: String,
    pub handler: String,
    pub attempt: i32,
    pub state: String,
    pub idempotency_key: String,
    pub input: Value,
    pub output: Option<Value>,
    pub error: Option<String>,
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
}

/// `POST /v1/admin/tenants` answer; the API key is shown only here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantCreated {
    pub id: Uuid,
    pub slug: String,
    pub tier: String,
    pub api_key: String,
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
}

/// Task run states.
pub mod task_state {
    pub const READY: &str = "ready";
    pub const DISPATCHED: &str = "dispatched";
    pub const COMPLETED: &str = "completed";
    pub const FAILED: &str = "failed";
}
