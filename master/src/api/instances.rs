//! Instance endpoints: start (idempotent), show, list, history, cancel, signal.

use std::collections::HashMap;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use ward_shared::wire::{
    BatchStarted, History, InstanceStarted, SignalSent, StartBatch, StartInstance, status,
};
use ward_store::{CancelOutcome, LIST_LIMIT_MAX, ListFilter, START_BATCH_LEN_MAX, SignalOutcome};

use super::{ApiError, AppState, Authenticated, check_name, parse_id, parse_json, reject};

/// Longest `Idempotency-Key` header accepted.
const IDEMPOTENCY_KEY_LEN_MAX: usize = 200;
/// Default page size of `GET /v1/instances`.
const LIST_LIMIT_DEFAULT: i64 = 50;

/// 403 for a suspended tenant: it starts nothing until it is resumed.
fn refuse_if_suspended(tenant: &ward_store::Tenant) -> Result<(), ApiError> {
    if tenant.is_suspended() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "tenant_suspended",
            format!(
                "tenant `{}` is suspended: no new instances until it is resumed",
                tenant.slug
            ),
        ));
    }
    Ok(())
}

/// W3C Trace Context: a valid `traceparent` header continues the caller's
/// trace; an invalid or missing one starts a new trace (the store's).
fn trace_parent(headers: &HeaderMap) -> Option<String> {
    headers
        .get("traceparent")
        .and_then(|value| value.to_str().ok())
        .filter(|value| ward_shared::trace::TraceParent::parse(value).is_some())
        .map(str::to_owned)
}

/// How long a tenant's count of running instances may stand in for a new
/// one, while far below its quota (see `RunningCounts`).
const RUNNING_COUNT_TTL_MS: u64 = 1_000;
/// Most tenants whose counts are kept (all are forgotten past it).
const RUNNING_COUNTS_MAX: usize = 100_000;

/// Each tenant's last count of running instances, plus what this master
/// started since. Counting on every start cost up to tens of ms under load
/// (the count also walks the index entries of instances ended since the
/// last VACUUM); while the count is recent and the starts keep the tenant
/// under half its quota, a start is admitted without counting. Near the
/// quota every start counts, so the quota holds as before; other masters'
/// starts within the TTL are what such an admission may not see.
#[derive(Default)]
pub struct RunningCounts {
    counts: std::sync::Mutex<HashMap<uuid::Uuid, (std::time::Instant, i64)>>,
}

impl RunningCounts {
    /// Admits `asked` starts from the recent count, if it is recent and
    /// they stay under half of `running_max`.
    fn admit(&self, tenant_id: uuid::Uuid, asked: i64, running_max: i64) -> bool {
        let mut counts = self
            .counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match counts.get_mut(&tenant_id) {
            Some((at, running))
                if at.elapsed() < std::time::Duration::from_millis(RUNNING_COUNT_TTL_MS)
                    && running.saturating_add(asked) <= running_max / 2 =>
            {
                *running = running.saturating_add(asked);
                true
            }
            _ => false,
        }
    }

    /// Records a fresh count, with the starts it just admitted added.
    fn counted(&self, tenant_id: uuid::Uuid, running: i64) {
        let mut counts = self
            .counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if counts.len() >= RUNNING_COUNTS_MAX {
            counts.clear();
        }
        counts.insert(tenant_id, (std::time::Instant::now(), running));
    }
}

/// 429 when starting `asked` more instances would pass the tenant's
/// `running_instances_max` (counted up to the quota, one statement, unless
/// a recent count shows the tenant far below it).
async fn check_running_quota(
    state: &AppState,
    tenant: &ward_store::Tenant,
    asked: usize,
) -> Result<(), ApiError> {
    let running_max = i64::from(tenant.quotas.running_instances_max);
    let asked = i64::try_from(asked).unwrap_or(i64::MAX);
    if state.running.admit(tenant.id, asked, running_max) {
        return Ok(());
    }
    let running = state
        .store
        .running_instances_at_most(tenant, running_max)
        .await
        .map_err(ApiError::store)?;
    if running.saturating_add(asked) <= running_max {
        state
            .running
            .counted(tenant.id, running.saturating_add(asked));
        return Ok(());
    }
    state
        .metrics
        .tenant_throttled_total
        .with_label_values(&["running_instances"])
        .inc();
    let message = if asked == 1 {
        format!("{running} instances are running: the quota is {running_max}")
    } else {
        format!(
            "{running} instances are running and {asked} more were asked: the quota is {running_max}"
        )
    };
    Err(
        ApiError::new(StatusCode::TOO_MANY_REQUESTS, "quota_exceeded", message)
            .field("running_instances_max"),
    )
}

pub async fn start(
    State(state): State<AppState>,
    Authenticated(tenant): Authenticated,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = async {
        refuse_if_suspended(&tenant)?;
        if let Ok(bytes) = &body {
            if bytes.len() > usize::try_from(tenant.quotas.payload_bytes_max).unwrap_or(usize::MAX) {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    format!("the body exceeds this tenant's limit of {} bytes", tenant.quotas.payload_bytes_max),
                ));
            }
        }
        check_running_quota(&state, &tenant, 1).await?;
        let idempotency_key = match headers.get("idempotency-key") {
            None => None,
            Some(value) => {
                let key = value.to_str().ok().filter(|key| !key.is_empty() && key.len() <= IDEMPOTENCY_KEY_LEN_MAX);
                Some(key.ok_or_else(|| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_field",
                        format!("the Idempotency-Key header must be 1 to {IDEMPOTENCY_KEY_LEN_MAX} visible ASCII characters"),
                    )
                    .field("idempotency-key")
                })?)
            }
        };
        let mut request: StartInstance = parse_json(body)?;
        request.trace_parent = trace_parent(&headers);
        if request.definition.is_empty() {
            return Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", "a definition name is needed")
                .field("definition"));
        }
        if let Some(business_key) = &request.business_key {
            if business_key.is_empty() || business_key.len() > IDEMPOTENCY_KEY_LEN_MAX {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_field",
                    format!("a business key has 1 to {IDEMPOTENCY_KEY_LEN_MAX} characters"),
                )
                .field("business_key"));
            }
        }
        let timer = state
            .metrics
            .store_transaction_seconds
            .with_label_values(&["start_instance"])
            .start_timer();
        let tenant_id = tenant.id;
        let started = state
            .starts
            .submit(ward_store::StartItem {
                tenant,
                request,
                idempotency_key: idempotency_key.map(str::to_owned),
            })
            .await
            .map_err(ApiError::store)?;
        timer.observe_duration();
        if started.created {
            state.metrics.instances_started_total.inc();
        }
        tracing::debug!(%tenant_id, instance_id = %started.id, created = started.created, "instance start");
        let code = if started.created { StatusCode::CREATED } else { StatusCode::OK };
        Ok((
            code,
            Json(InstanceStarted {
                id: started.id,
                status: started.status,
                definition: started.definition,
                version: started.version,
                created: started.created,
            }),
        ))
    }
    .await;
    match result {
        Ok(answer) => answer.into_response(),
        Err(error) => reject(&state, error),
    }
}

/// `POST /v1/instances/batch`: up to `START_BATCH_LEN_MAX` starts in one
/// transaction, all or none. A bad item answers 4xx naming it
/// (`instances[3].definition`) and nothing is started.
pub async fn start_batch(
    State(state): State<AppState>,
    Authenticated(tenant): Authenticated,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = async {
        refuse_if_suspended(&tenant)?;
        let batch: StartBatch = parse_json(body)?;
        if batch.instances.is_empty() || batch.instances.len() > START_BATCH_LEN_MAX {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_field",
                format!("a batch holds 1 to {START_BATCH_LEN_MAX} instances"),
            )
            .field("instances"));
        }
        let trace_parent = trace_parent(&headers);
        let payload_bytes_max =
            usize::try_from(tenant.quotas.payload_bytes_max).unwrap_or(usize::MAX);
        let mut requests = Vec::with_capacity(batch.instances.len());
        for (index, item) in batch.instances.into_iter().enumerate() {
            let at = |field: &str| format!("instances[{index}].{field}");
            if item.definition.is_empty() {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_field",
                    "a definition name is needed",
                )
                .field(at("definition")));
            }
            for (field, key) in [
                ("business_key", &item.business_key),
                ("idempotency_key", &item.idempotency_key),
            ] {
                if key
                    .as_ref()
                    .is_some_and(|key| key.is_empty() || key.len() > IDEMPOTENCY_KEY_LEN_MAX)
                {
                    return Err(ApiError::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "invalid_field",
                        format!("{field} has 1 to {IDEMPOTENCY_KEY_LEN_MAX} characters"),
                    )
                    .field(at(field)));
                }
            }
            if serde_json::to_vec(&item.input).map_or(0, |bytes| bytes.len()) > payload_bytes_max {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    format!("the input exceeds this tenant's limit of {payload_bytes_max} bytes"),
                )
                .field(at("input")));
            }
            requests.push((
                StartInstance {
                    definition: item.definition,
                    version: item.version,
                    input: item.input,
                    business_key: item.business_key,
                    trace_parent: trace_parent.clone(),
                },
                item.idempotency_key,
            ));
        }
        check_running_quota(&state, &tenant, requests.len()).await?;
        let timer = state
            .metrics
            .store_transaction_seconds
            .with_label_values(&["start_instances"])
            .start_timer();
        let started = state
            .store
            .start_instances(&tenant, &requests)
            .await
            .map_err(|error| {
                // Name the first item that asked for the missing definition.
                if let ward_store::Error::DefinitionNotFound { name, version } = &error {
                    if let Some(index) = requests.iter().position(|(request, _)| {
                        &request.definition == name && &request.version == version
                    }) {
                        return ApiError::store(error)
                            .field(format!("instances[{index}].definition"));
                    }
                }
                ApiError::store(error)
            })?;
        timer.observe_duration();
        let created = started.iter().filter(|started| started.created).count();
        state.metrics.instances_started_total.inc_by(created as u64);
        tracing::debug!(tenant_id = %tenant.id, len = started.len(), created, "batch start");
        Ok(Json(BatchStarted {
            instances: started
                .into_iter()
                .map(|started| InstanceStarted {
                    id: started.id,
                    status: started.status,
                    definition: started.definition,
                    version: started.version,
                    created: started.created,
                })
                .collect(),
        }))
    }
    .await;
    match result {
        Ok(answer) => answer.into_response(),
        Err(error) => reject(&state, error),
    }
}

pub async fn show(
    State(state): State<AppState>,
    Authenticated(tenant): Authenticated,
    Path(id): Path<String>,
) -> Response {
    let result = async {
        let instance_id = parse_id(&id, "id")?;
        state
            .store
            .instance(&tenant, instance_id)
            .await
            .map_err(ApiError::store)?
            .ok_or_else(|| not_found(instance_id))
    }
    .await;
    match result {
        Ok(instance) => Json(instance).into_response(),
        Err(error) => reject(&state, error),
    }
}

pub async fn list(
    State(state): State<AppState>,
    Authenticated(tenant): Authenticated,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let result = async {
        let mut filter = ListFilter { limit: LIST_LIMIT_DEFAULT, ..ListFilter::default() };
        for (key, value) in &query {
            match key.as_str() {
                "definition" => filter.definition = Some(value.clone()),
                "business_key" => filter.business_key = Some(value.clone()),
                "status" => {
                    if ![status::RUNNING, status::COMPLETED, status::FAILED, status::CANCELLED].contains(&value.as_str()) {
                        return Err(ApiError::new(
                            StatusCode::UNPROCESSABLE_ENTITY,
                            "invalid_field",
                            format!("unknown status `{value}`; use running, completed, failed or cancelled"),
                        )
                        .field("status"));
                    }
                    filter.status = Some(value.clone());
                }
                "limit" => {
                    filter.limit = value.parse().ok().filter(|limit| (1..=LIST_LIMIT_MAX).contains(limit)).ok_or_else(|| {
                        ApiError::new(
                            StatusCode::UNPROCESSABLE_ENTITY,
                            "invalid_field",
                            format!("limit must be a number from 1 to {LIST_LIMIT_MAX}"),
                        )
                        .field("limit")
                    })?;
                }
                "cursor" => filter.before = Some(parse_id(value, "cursor")?),
                other => {
                    return Err(ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_field",
                        format!("unknown query parameter `{other}`; use definition, status, business_key, limit, cursor"),
                    )
                    .field(other.to_owned()));
                }
            }
        }
        state.store.list_instances(&tenant, &filter).await.map_err(ApiError::store)
    }
    .await;
    match result {
        Ok(list) => Json(list).into_response(),
        Err(error) => reject(&state, error),
    }
}

pub async fn history(
    State(state): State<AppState>,
    Authenticated(tenant): Authenticated,
    Path(id): Path<String>,
) -> Response {
    let result = async {
        let instance_id = parse_id(&id, "id")?;
        let events = state
            .store
            .history(&tenant, instance_id)
            .await
            .map_err(ApiError::store)?
            .ok_or_else(|| not_found(instance_id))?;
        Ok(History {
            instance_id,
            events,
        })
    }
    .await;
    match result {
        Ok(history) => Json(history).into_response(),
        Err(error) => reject(&state, error),
    }
}

pub async fn cancel(
    State(state): State<AppState>,
    Authenticated(tenant): Authenticated,
    Path(id): Path<String>,
) -> Response {
    let result = async {
        let instance_id = parse_id(&id, "id")?;
        match state
            .store
            .cancel_instance(&tenant, instance_id)
            .await
            .map_err(ApiError::store)?
        {
            CancelOutcome::Cancelled => {
                state.metrics.instances_cancelled_total.inc();
                state
                    .metrics
                    .instances_finished_total
                    .with_label_values(&["cancelled"])
                    .inc();
                Ok(json!({ "id": instance_id, "status": status::CANCELLED }))
            }
            CancelOutcome::Finished(current) => Err(finished(instance_id, &current)),
            CancelOutcome::NotFound => Err(not_found(instance_id)),
        }
    }
    .await;
    match result {
        Ok(body) => Json(body).into_response(),
        Err(error) => reject(&state, error),
    }
}

pub async fn signal(
    State(state): State<AppState>,
    Authenticated(tenant): Authenticated,
    Path((id, name)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = async {
        let instance_id = parse_id(&id, "id")?;
        check_name(&name, "name")?;
        let payload: Value = match &body {
            Ok(bytes) if bytes.is_empty() => Value::Null,
            _ => parse_json(body)?,
        };
        match state
            .store
            .signal(&tenant, instance_id, &name, &payload)
            .await
            .map_err(ApiError::store)?
        {
            SignalOutcome::Delivered => Ok(SignalSent { delivered: true }),
            SignalOutcome::Buffered => Ok(SignalSent { delivered: false }),
            SignalOutcome::Finished(current) => Err(finished(instance_id, &current)),
            SignalOutcome::NotFound => Err(not_found(instance_id)),
        }
    }
    .await;
    match result {
        Ok(sent) => {
            state.metrics.signals_total.inc();
            (StatusCode::ACCEPTED, Json(sent)).into_response()
        }
        Err(error) => reject(&state, error),
    }
}

fn not_found(instance_id: uuid::Uuid) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "instance_not_found",
        format!("no instance {instance_id}"),
    )
    .field("id")
}

fn finished(instance_id: uuid::Uuid, current: &str) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "instance_finished",
        format!("instance {instance_id} has already ended ({current})"),
    )
    .field("id")
}

#[cfg(test)]
mod tests {
    use super::RunningCounts;

    #[test]
    fn a_recent_count_admits_starts_only_far_below_the_quota() {
        let counts = RunningCounts::default();
        let tenant = uuid::Uuid::now_v7();
        // Never counted: the caller must count.
        assert!(!counts.admit(tenant, 1, 100));
        counts.counted(tenant, 40);
        // Up to half the quota without counting, each admission added.
        assert!(counts.admit(tenant, 5, 100));
        assert!(counts.admit(tenant, 5, 100));
        assert!(!counts.admit(tenant, 1, 100), "51 would pass half of 100");
        // Another tenant has no count of its own.
        assert!(!counts.admit(uuid::Uuid::now_v7(), 1, 100));
        // Near the quota every start counts.
        counts.counted(tenant, 2);
        assert!(!counts.admit(tenant, 1, 4), "3 would pass half of 4");
    }

    #[test]
    fn an_old_count_admits_nothing() {
        let counts = RunningCounts::default();
        let tenant = uuid::Uuid::now_v7();
        counts.counts.lock().unwrap().insert(
            tenant,
            (
                std::time::Instant::now()
                    - std::time::Duration::from_millis(super::RUNNING_COUNT_TTL_MS + 1),
                0,
            ),
        );
        assert!(!counts.admit(tenant, 1, 100));
    }
}
