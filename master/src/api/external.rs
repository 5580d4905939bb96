//! External-task endpoints: services in any language fetch and lock tasks of
//! `external: true` steps, then complete, fail or extend their lock.

use std::time::{Duration, Instant};

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use ward_shared::wire::{CompleteExternal, ExtendLock, FailExternal, FetchAndLock};
use ward_store::{ExternalOutcome, FETCH_TASKS_MAX, LOCK_MS_MAX, Settlement};

use super::{
    ApiError, AppState, Authenticated, check_name, invalid, parse_id, parse_json, reject, respond,
};

/// Longest long-poll of one fetch-and-lock.
pub const FETCH_WAIT_MS_MAX: u64 = 30_000;
/// Most handler names one fetch may ask for.
const FETCH_HANDLERS_MAX: usize = 50;
/// Re-check interval of a long poll when no notification arrives.
const FETCH_RECHECK_MS: u64 = 250;

pub async fn fetch_and_lock(
    State(state): State<AppState>,
    Authenticated(tenant): Authenticated,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = async {
        let request: FetchAndLock = parse_json(body)?;
        check_name(&request.worker_id, "worker_id")?;
        if request.handlers.is_empty() || request.handlers.len() > FETCH_HANDLERS_MAX {
            return Err(invalid(
                "handlers",
                format!("give 1 to {FETCH_HANDLERS_MAX} handler names"),
            ));
        }
        for (index, handler) in request.handlers.iter().enumerate() {
            check_name(handler, &format!("handlers[{index}]"))?;
        }
        if request.max_tasks == 0 || request.max_tasks > FETCH_TASKS_MAX {
            return Err(invalid(
                "max_tasks",
                format!("must be from 1 to {FETCH_TASKS_MAX}"),
            ));
        }
        if request.lock_ms == 0 || request.lock_ms > LOCK_MS_MAX {
            return Err(invalid(
                "lock_ms",
                format!("must be from 1 to {LOCK_MS_MAX}"),
            ));
        }
        if request.wait_ms > FETCH_WAIT_MS_MAX {
            return Err(invalid(
                "wait_ms",
                format!("must be at most {FETCH_WAIT_MS_MAX}"),
            ));
        }
        let deadline = Instant::now() + Duration::from_millis(request.wait_ms);
        loop {
            // Register for a wake-up before looking, so none is missed in between.
            let notified = state.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let tasks = state
                .store
                .fetch_and_lock(
                    &tenant,
                    &request.worker_id,
                    &request.handlers,
                    request.max_tasks,
                    request.lock_ms,
                )
                .await
                .map_err(ApiError::store)?;
            let now = Instant::now();
            if !tasks.is_empty() || now >= deadline {
                return Ok(tasks);
            }
            let pause = (deadline - now).min(Duration::from_millis(FETCH_RECHECK_MS));
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep(pause) => {}
            }
        }
    }
    .await;
    match result {
        Ok(tasks) => Json(json!({ "tasks": tasks })).into_response(),
        Err(error) => reject(&state, error),
    }
}

pub async fn complete(
    State(state): State<AppState>,
    Authenticated(tenant): Authenticated,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = async {
        let task_run_id = parse_id(&id, "id")?;
        let request: CompleteExternal = parse_json(body)?;
        let outcome = state
            .store
            .settle_external(
                &tenant,
                task_run_id,
                &request.worker_id,
                Settlement::Succeeded(request.output),
            )
            .await
            .map_err(ApiError::store)?;
        answer(&state, outcome, task_run_id, &request.worker_id)
    }
    .await;
    respond(&state, result)
}

pub async fn fail(
    State(state): State<AppState>,
    Authenticated(tenant): Authenticated,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = async {
        let task_run_id = parse_id(&id, "id")?;
        let request: FailExternal = parse_json(body)?;
        let settlement = Settlement::Failed {
            error: request.error,
            retryable: request.retryable,
        };
        let outcome = state
            .store
            .settle_external(&tenant, task_run_id, &request.worker_id, settlement)
            .await
            .map_err(ApiError::store)?;
        answer(&state, outcome, task_run_id, &request.worker_id)
    }
    .await;
    respond(&state, result)
}

pub async fn extend_lock(
    State(state): State<AppState>,
    Authenticated(tenant): Authenticated,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = async {
        let task_run_id = parse_id(&id, "id")?;
        let request: ExtendLock = parse_json(body)?;
        if request.lock_ms == 0 || request.lock_ms > LOCK_MS_MAX {
            return Err(invalid(
                "lock_ms",
                format!("must be from 1 to {LOCK_MS_MAX}"),
            ));
        }
        let outcome = state
            .store
            .extend_lock(&tenant, task_run_id, &request.worker_id, request.lock_ms)
            .await
            .map_err(ApiError::store)?;
        answer(&state, outcome, task_run_id, &request.worker_id)
    }
    .await;
    respond(&state, result)
}

fn answer(
    state: &AppState,
    outcome: ExternalOutcome,
    task_run_id: uuid::Uuid,
    worker_id: &str,
) -> Result<serde_json::Value, ApiError> {
    match outcome {
        ExternalOutcome::Applied { instance_status } => {
            if let Some(status) = instance_status
                .filter(|status| crate::metrics::INSTANCE_END_STATES.contains(&status.as_str()))
            {
                state
                    .metrics
                    .instances_finished_total
                    .with_label_values(&[status.as_str()])
                    .inc();
            }
            Ok(json!({ "task_run_id": task_run_id, "applied": true }))
        }
        ExternalOutcome::NotLocked { state } => Err(ApiError::new(
            StatusCode::CONFLICT,
            "task_not_locked",
            format!(
                "task {task_run_id} is not locked by worker `{worker_id}` (its state is {state})"
            ),
        )
        .field("worker_id")),
        ExternalOutcome::NotFound => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "task_not_found",
            format!("no external task {task_run_id}"),
        )
        .field("id")),
    }
}
