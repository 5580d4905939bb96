//! The handler trait users implement in Rust, the registry a worker looks
//! handlers up in, and the built-in handlers.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::{Value, json};
use uuid::Uuid;

/// What a handler is given for one task run.
#[derive(Debug, Clone)]
pub struct Task {
    pub tenant_id: Uuid,
    pub instance_id: Uuid,
    pub task_run_id: Uuid,
    pub step_id: String,
    /// 1 for the first attempt of the step.
    pub attempt: i32,
    /// Stable across redeliveries and retries of this step: pass it on to
    /// the systems you call (for example as an `Idempotency-Key` header).
    pub idempotency_key: String,
    pub input: Value,
    /// Extends this run's lease. The worker already beats every
    /// `heartbeat_interval_ms` while the handler runs; call it yourself
    /// around long blocking work.
    pub heartbeat: Heartbeat,
}

/// A handle that extends the lease of the running task.
#[derive(Clone)]
pub struct Heartbeat {
    pub(crate) store: ward_store::Store,
    pub(crate) tenant_id: Uuid,
    pub(crate) task_run_id: Uuid,
    pub(crate) lease_ms: i64,
}

impl std::fmt::Debug for Heartbeat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Heartbeat")
            .field("task_run_id", &self.task_run_id)
            .finish()
    }
}

impl Heartbeat {
    /// Extends the lease. False means the run no longer belongs to this
    /// worker (its lease expired and another attempt took over): stop early.
    pub async fn beat(&self) -> Result<bool, ward_store::Error> {
        self.store
            .heartbeat(self.tenant_id, self.task_run_id, self.lease_ms)
            .await
    }
}

/// A handler's failure; recorded on the task run with its message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    pub message: String,
    /// Whether another attempt may succeed (the step's retry policy applies).
    pub retryable: bool,
}

impl Failure {
    /// A failure that another attempt may not repeat: retried under the
    /// step's policy.
    pub fn new(message: impl Into<String>) -> Failure {
        Failure {
            message: message.into(),
            retryable: true,
        }
    }

    /// A failure no retry can fix (bad input, a refusal): the step fails now.
    pub fn terminal(message: impl Into<String>) -> Failure {
        Failure {
            message: message.into(),
            retryable: false,
        }
    }
}

/// A step implementation. Execution is at least once: a handler may run more
/// than once for one step, so effects outside Ward should be keyed by
/// `task.idempotency_key`.
pub trait Handler: Send + Sync + 'static {
    fn run(&self, task: Task) -> BoxFuture<'static, Result<Value, Failure>>;
}

impl<F, Fut> Handler for F
where
    F: Fn(Task) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Value, Failure>> + Send + 'static,
{
    fn run(&self, task: Task) -> BoxFuture<'static, Result<Value, Failure>> {
        Box::pin(self(task))
    }
}

/// Handlers by name.
#[derive(Clone, Default)]
pub struct Registry {
    handlers: HashMap<String, Arc<dyn Handler>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<&String> = self.handlers.keys().collect();
        names.sort();
        f.debug_struct("Registry")
            .field("handlers", &names)
            .finish()
    }
}

/// Longest sleep the built-in `sleep` handler accepts.
pub const SLEEP_MS_MAX: u64 = 60_000;

impl Registry {
    pub fn new() -> Registry {
        Registry::default()
    }

    /// The built-in handlers: `noop`, `echo`, `fail`, `notify`, `sleep`, `vitals.score`.
    pub fn builtin() -> Registry {
        Registry::new()
            .with("noop", |task: Task| async move { Ok(task.input) })
            .with("echo", |task: Task| async move {
                Ok(json!({ "echo": task.input, "step": task.step_id, "attempt": task.attempt }))
            })
            .with("fail", |task: Task| async move {
                let message = task
                    .input
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("requested failure");
                let retryable = task.input.get("retryable").and_then(Value::as_bool).unwrap_or(false);
                Err(Failure { message: message.to_owned(), retryable })
            })
            .with("notify", |task: Task| async move {
                let recipient = task
                    .input
                    .get("recipient")
                    .and_then(Value::as_str)
                    .unwrap_or("care team")
                    .to_owned();
                Ok(json!({ "notified": recipient, "about": task.input, "idempotency_key": task.idempotency_key }))
            })
            .with("sleep", |task: Task| async move {
                sleep_as_asked(&task.input).await;
                Ok(task.input)
            })
            .with("vitals.score", |task: Task| async move {
                vitals_score(&task.input)
            })
    }

    /// Adds the fault-injection handlers, for fault experiments only:
    /// `crash` kills the worker process at once (a poison task), and `ledger`
    /// appends `idempotency_key<TAB>attempt<TAB>pid` to `ledger_path` before
    /// it sleeps `sleep_ms` (so every execution is counted, even one whose
    /// worker is killed before it commits).
    pub fn with_fault_handlers(self, ledger_path: Option<std::path::PathBuf>) -> Registry {
        let ledger_path = ledger_path.map(Arc::new);
        self.with("crash", |task: Task| async move {
            tracing::error!(task_run_id = %task.task_run_id, "crash handler: killing the worker");
            // Dies at once without acking, like a segfault (exit rather
            // than abort, so no core file is left behind).
            std::process::exit(70)
        })
        .with("ledger", move |task: Task| {
            let ledger_path = ledger_path.clone();
            async move {
                if let Some(path) = ledger_path {
                    let line = format!(
                        "{}\t{}\t{}\n",
                        task.idempotency_key,
                        task.attempt,
                        std::process::id()
                    );
                    append_line(&path, &line).map_err(|error| {
                        Failure::new(format!("ledger {}: {error}", path.display()))
                    })?;
                }
                sleep_as_asked(&task.input).await;
                Ok(json!({ "ledger": task.idempotency_key, "attempt": task.attempt }))
            }
        })
    }

    /// Adds (or replaces) a handler.
    pub fn with(mut self, name: &str, handler: impl Handler) -> Registry {
        self.handlers.insert(name.to_owned(), Arc::new(handler));
        self
    }

    pub fn get(&self, name: &str) -> Option<Arc<dyn Handler>> {
        self.handlers.get(name).cloned()
    }
}

/// Sleeps the input's `sleep_ms` (at most `SLEEP_MS_MAX`).
async fn sleep_as_asked(input: &Value) {
    let sleep_ms = input
        .get("sleep_ms")
        .and_then(Value::as_u64)
        .unwrap_or(0)
        .min(SLEEP_MS_MAX);
    tokio::time::sleep(Duration::from_millis(sleep_ms)).await;
}

/// Appends one line with a single write (atomic for short lines under
/// O_APPEND, so several workers can share the file).
fn append_line(path: &std::path::Path, line: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    file.write_all(line.as_bytes())?;
    file.sync_data()
}

/// A simplified early-warning score from heart rate, respiratory rate and
/// oxygen saturation: the demo workflow's clinical step.
fn vitals_score(input: &Value) -> Result<Value, Failure> {
    let read = |name: &str| {
        input
            .get(name)
            .and_then(Value::as_f64)
            .ok_or_else(|| Failure::terminal(format!("input field `{name}` must be a number")))
    };
    let heart_rate = read("heart_rate")?;
    let respiratory_rate = read("respiratory_rate")?;
    let spo2 = read("spo2")?;
    let mut score = 0;
    score += match heart_rate {
        rate if rate <= 40.0 || rate >= 131.0 => 3,
        rate if rate >= 111.0 => 2,
        rate if rate <= 50.0 || rate >= 91.0 => 1,
        _ => 0,
    };
    score += match respiratory_rate {
        rate if rate <= 8.0 || rate >= 25.0 => 3,
        rate if rate >= 21.0 => 2,
        rate if rate <= 11.0 => 1,
        _ => 0,
    };
    score += match spo2 {
        saturation if saturation <= 91.0 => 3,
        saturation if saturation <= 93.0 => 2,
        saturation if saturation <= 95.0 => 1,
        _ => 0,
    };
    let risk = match score {
        0..=4 => "low",
        5..=6 => "medium",
        _ => "high",
    };
    let mut output = input.clone();
    if let Some(object) = output.as_object_mut() {
        object.insert("score".into(), json!(score));
        object.insert("risk".into(), json!(risk));
    }
    Ok(output)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: Value, expected_score: i64, expected_risk: &str) {
        let output = vitals_score(&input).unwrap();
        assert_eq!(output["score"], json!(expected_score));
        assert_eq!(output["risk"], json!(expected_risk));
    }

    #[test]
    fn vitals_scores() {
        check(
            json!({"heart_rate": 72, "respiratory_rate": 14, "spo2": 98}),
            0,
            "low",
        );
        check(
            json!({"heart_rate": 115, "respiratory_rate": 22, "spo2": 94}),
            5,
            "medium",
        );
        check(
            json!({"heart_rate": 135, "respiratory_rate": 26, "spo2": 90}),
            9,
            "high",
        );
    }

    #[test]
    fn vitals_missing_field_names_it() {
        let failure = vitals_score(&json!({"heart_rate": 72})).unwrap_err();
        assert_eq!(
            failure.message,
            "input field `respiratory_rate` must be a number"
        );
    }
}
