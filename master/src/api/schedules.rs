//! Schedule endpoints: create or replace, list, delete a tenant's cron
//! schedules.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use ward_shared::schedule::Cron;
use ward_shared::wire::ScheduleSpec;

use super::{ApiError, AppState, Authenticated, check_name, parse_json, reject};

pub async fn put(
    State(state): State<AppState>,
    Authenticated(tenant): Authenticated,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = async {
        let spec: ScheduleSpec = parse_json(body)?;
        check_name(&spec.name, "name")?;
        check_name(&spec.definition, "definition")?;
        let cron = Cron::parse(&spec.cron).map_err(|message| {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", message).field("cron")
        })?;
        if !state
            .store
            .definition_exists(&tenant, &spec.definition, spec.version)
            .await
            .map_err(ApiError::store)?
        {
            return Err(ApiError::store(ward_store::Error::DefinitionNotFound {
                name: spec.definition.clone(),
                version: spec.version,
            }));
        }
        state
            .store
            .put_schedule(&tenant, &spec, &cron)
            .await
            .map_err(ApiError::store)
    }
    .await;
    match result {
        Ok((view, created)) => {
            let code = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            (code, Json(view)).into_response()
        }
        Err(error) => reject(&state, error),
    }
}

pub async fn list(State(state): State<AppState>, Authenticated(tenant): Authenticated) -> Response {
    match state.store.schedules(&tenant).await {
        Ok(schedules) => Json(json!({ "schedules": schedules })).into_response(),
        Err(error) => reject(&state, ApiError::store(error)),
    }
}

pub async fn delete(
    State(state): State<AppState>,
    Authenticated(tenant): Authenticated,
    Path(name): Path<String>,
) -> Response {
    match state.store.delete_schedule(&tenant, &name).await {
        Ok(true) => Json(json!({ "name": name, "deleted": true })).into_response(),
        Ok(false) => reject(
            &state,
            ApiError::new(
                StatusCode::NOT_FOUND,
                "schedule_not_found",
                format!("no schedule `{name}`"),
            )
            .field("name"),
        ),
        Err(error) => reject(&state, ApiError::store(error)),
    }
}
