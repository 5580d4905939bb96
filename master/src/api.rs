//! The HTTP API every master serves: tenants (admin), definitions, instances,
//! health and metrics. Every error is a JSON `ErrorBody` naming the problem.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use uuid::Uuid;
use ward_shared::wire::{DefinitionPublished, ErrorBody, ErrorDetail};
use ward_shared::{Definition, Problem};
use ward_store::{Store, Tenant};

use crate::config::Config;
use crate::metrics::Metrics;

mod cluster;
mod external;
pub mod instances;
mod schedules;
mod tenancy;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub config: Arc<Config>,
    pub metrics: Metrics,
    /// The epoch while this master leads, `None` otherwise.
    pub leader: watch::Receiver<Option<i64>>,
    /// Woken when a transaction makes a task ready (external-task long polls).
    pub ready: Arc<tokio::sync::Notify>,
    /// The member registry and cluster signals in etcd (one client).
    pub registry: Arc<ward_membership::Registry>,
    /// Group commit of single starts.
    pub starts: crate::starts::StartCommitter,
    /// Recent counts of running instances per tenant (the start quota).
    pub running: Arc<instances::RunningCounts>,
    /// API keys resolved within the last `key_cache_ttl_ms`.
    pub keys: KeyCache,
}

/// The router with every route, limit and fallback.
pub fn router(state: AppState) -> Router {
    let payload_bytes_max = state.config.payload_bytes_max;
    Router::new()
        .route(
            "/v1/admin/tenants",
            post(tenancy::create).get(tenancy::list),
        )
        .route(
            "/v1/admin/tenants/{slug}",
            get(tenancy::show).patch(tenancy::update),
        )
        .route(
            "/v1/admin/tenants/{slug}/keys",
            post(tenancy::create_key).get(tenancy::keys),
        )
        .route(
            "/v1/admin/tenants/{slug}/keys/{key_id}",
            axum::routing::delete(tenancy::revoke_key),
        )
        .route("/v1/admin/tiers", get(tenancy::tiers))
        .route("/v1/admin/cluster", get(cluster::status))
        .route("/v1/admin/dead-letters", get(cluster::admin_dead_letters))
        .route("/v1/dead-letters", get(cluster::dead_letters))
        .route("/v1/admin/apply", post(tenancy::apply))
        .route("/v1/usage", get(tenancy::usage))
        .route("/v1/definitions", post(publish_definition))
        .route("/v1/instances", post(instances::start).get(instances::list))
        .route("/v1/instances/batch", post(instances::start_batch))
        .route("/v1/instances/{id}", get(instances::show))
        .route("/v1/instances/{id}/history", get(instances::history))
        .route("/v1/instances/{id}/cancel", post(instances::cancel))
        .route("/v1/instances/{id}/signals/{name}", post(instances::signal))
        .route(
            "/v1/external-tasks/fetch-and-lock",
            post(external::fetch_and_lock),
        )
        .route("/v1/external-tasks/{id}/complete", post(external::complete))
        .route("/v1/external-tasks/{id}/fail", post(external::fail))
        .route(
            "/v1/external-tasks/{id}/extend-lock",
            post(external::extend_lock),
        )
        .route("/v1/schedules", post(schedules::put).get(schedules::list))
        .route(
            "/v1/schedules/{name}",
            axum::routing::delete(schedules::delete),
        )
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        // Matched routes only: their templates are a closed set of labels.
        .route_layer(axum::middleware::from_fn_with_state(
            state.metrics.clone(),
            observe_request,
        ))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(payload_bytes_max))
        .with_state(state)
}

/// Times each request of a matched route into `ward_http_request_seconds`,
/// labelled by the route's template (never its ids), the method (from a
/// closed set) and the status class.
async fn observe_request(
    State(metrics): State<Metrics>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let started = std::time::Instant::now();
    // A clone shares the router's string: no allocation per request.
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .cloned();
    let method = match *request.method() {
        axum::http::Method::GET => "GET",
        axum::http::Method::POST => "POST",
        axum::http::Method::PATCH => "PATCH",
        axum::http::Method::PUT => "PUT",
        axum::http::Method::DELETE => "DELETE",
        axum::http::Method::HEAD => "HEAD",
        _ => "other",
    };
    let response = next.run(request).await;
    let class = match response.status().as_u16() / 100 {
        1 => "1xx",
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        _ => "5xx",
    };
    metrics
        .http_request_seconds
        .with_label_values(&[
            route
                .as_ref()
                .map_or("unmatched", axum::extract::MatchedPath::as_str),
            method,
            class,
        ])
        .observe(started.elapsed().as_secs_f64());
    response
}

/// An API error: a status and a JSON body naming what is wrong.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    detail: ErrorDetail,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            detail: ErrorDetail {
                code: code.to_owned(),
                message: message.into(),
                field: None,
                problems: Vec::new(),
            },
        }
    }

    pub(crate) fn field(mut self, field: impl Into<String>) -> ApiError {
        self.detail.field = Some(field.into());
        self
    }

    fn problems(mut self, problems: Vec<Problem>) -> ApiError {
        self.detail.field = problems.first().map(|problem| problem.field.clone());
        self.detail.problems = problems;
        self
    }

    pub(crate) fn store(error: ward_store::Error) -> ApiError {
        match error {
            ward_store::Error::DefinitionNotFound { name, version } => {
                let message = match version {
                    Some(version) => format!("definition `{name}` version {version} not found"),
                    None => format!("definition `{name}` not found"),
                };
                ApiError::new(StatusCode::NOT_FOUND, "definition_not_found", message)
                    .field("definition")
            }
            ward_store::Error::Invalid { field, message } => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", message)
                    .field(field)
            }
            ward_store::Error::TenantExists(slug) => ApiError::new(
                StatusCode::CONFLICT,
                "tenant_exists",
                format!("tenant `{slug}` already exists"),
            )
            .field("slug"),
            other => {
                tracing::warn!(error = %other, "store unavailable");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "the store is unavailable; retry later",
                )
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(ErrorBody { error: self.detail })).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

/// Most keys kept resolved; the least used go first past it.
const KEY_CACHE_ENTRIES_MAX: u64 = 50_000;

/// API keys this master resolved recently (the tenant, its status and
/// quotas, or that the key is unknown), by their hash, for
/// `key_cache_ttl_ms`. Without it every request read the store once before
/// its own work: a status query paid two round trips, and a start its own
/// statement outside the group commit. An admin change (tenant status,
/// tier or quotas, a revoked key, an apply), through any master, forgets
/// every key when it commits (`listen_tenancy`); the TTL bounds a change
/// missed while this master could not listen.
#[derive(Clone)]
pub struct KeyCache {
    /// `None` when `key_cache_ttl_ms` is 0.
    tenants: Option<moka::sync::Cache<Vec<u8>, Option<Tenant>>>,
    /// Counts the clears: a look-up keeps its answer only if no clear came
    /// while it read the store (its answer may predate the change). Held
    /// while an answer is kept and while the keys are cleared, so neither
    /// comes between the other's check and its change.
    generation: Arc<std::sync::Mutex<u64>>,
}

impl KeyCache {
    /// A cache keeping each key `ttl_ms` (0: none kept).
    pub fn new(ttl_ms: u64) -> KeyCache {
        KeyCache {
            tenants: (ttl_ms > 0).then(|| {
                moka::sync::Cache::builder()
                    .max_capacity(KEY_CACHE_ENTRIES_MAX)
                    .time_to_live(std::time::Duration::from_millis(ttl_ms))
                    .build()
            }),
            generation: Arc::default(),
        }
    }

    /// The tenant owning `api_key` (`None`: no such unrevoked key), from the
    /// cache or else the store.
    async fn tenant(
        &self,
        store: &Store,
        api_key: &str,
    ) -> Result<Option<Tenant>, ward_store::Error> {
        let hash = ward_store::key_hash(api_key);
        if let Some(tenant) = self.tenants.as_ref().and_then(|tenants| tenants.get(&hash)) {
            return Ok(tenant);
        }
        let generation = *self.generation();
        let tenant = store.tenant_for_key_hash(&hash).await?;
        if let Some(tenants) = &self.tenants {
            let current = self.generation();
            if *current == generation {
                tenants.insert(hash, tenant.clone());
            }
        }
        Ok(tenant)
    }

    fn generation(&self) -> std::sync::MutexGuard<'_, u64> {
        self.generation
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Forgets every key: on each `TENANCY_CHANNEL` notification, and by
    /// the admin handlers right after their change, so that the master
    /// that made it applies it before it answers (the notification comes a
    /// moment later).
    pub fn forget_all(&self) {
        let mut generation = self.generation();
        *generation += 1;
        if let Some(tenants) = &self.tenants {
            tenants.invalidate_all();
        }
    }
}

/// The tenant whose API key authorised the request.
pub struct Authenticated(pub Tenant);

impl FromRequestParts<AppState> for Authenticated {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let key = bearer(parts).map_err(|error| reject(state, error))?;
        match state.keys.tenant(&state.store, key).await {
            Ok(Some(tenant)) => Ok(Authenticated(tenant)),
            Ok(None) => Err(reject(
                state,
                ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "the API key is not valid",
                )
                .field("authorization"),
            )),
            Err(error) => Err(reject(state, ApiError::store(error))),
        }
    }
}

/// A request carrying the admin token.
pub struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        if state.config.admin_token.is_empty() {
            return Err(reject(
                state,
                ApiError::new(
                    StatusCode::FORBIDDEN,
                    "admin_disabled",
                    "the admin API is disabled: no admin_token is configured",
                ),
            ));
        }
        let token = bearer(parts).map_err(|error| reject(state, error))?;
        if !constant_time_eq(token.as_bytes(), state.config.admin_token.as_bytes()) {
            return Err(reject(
                state,
                ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "the admin token is not valid",
                )
                .field("authorization"),
            ));
        }
        Ok(Admin)
    }
}

fn bearer(parts: &Parts) -> Result<&str, ApiError> {
    let missing = || {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing `Authorization: Bearer <key>` header",
        )
        .field("authorization")
    };
    let value = parts
        .headers
        .get(header::AUTHORIZATION)
        .ok_or_else(missing)?;
    let value = value.to_str().map_err(|_| missing())?;
    value
        .strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|key| !key.is_empty())
        .ok_or_else(missing)
}

fn constant_time_eq(left: &[u8], right: &[u8]) -> bool {
    left.len() == right.len()
        && left
            .iter()
            .zip(right)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

pub(crate) fn reject(state: &AppState, error: ApiError) -> Response {
    count(state, &error);
    error.into_response()
}

fn count(state: &AppState, error: &ApiError) {
    state
        .metrics
        .api_errors_total
        .with_label_values(&[error.detail.code.as_str()])
        .inc();
}

/// Reads a JSON body, naming the field at fault when it does not fit `T`.
pub(crate) fn parse_json<T: DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let body = body.map_err(|rejection| {
        let status = rejection.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                status,
                "payload_too_large",
                "the request body exceeds the size limit",
            )
        } else {
            ApiError::new(status, "unreadable_body", rejection.body_text())
        }
    })?;
    let deserializer = &mut serde_json::Deserializer::from_slice(&body);
    serde_path_to_error::deserialize(deserializer).map_err(|error| {
        let field = error.path().to_string();
        let inner = error.into_inner();
        let code = if inner.is_data() {
            "invalid_field"
        } else {
            "invalid_json"
        };
        let api_error = ApiError::new(StatusCode::BAD_REQUEST, code, inner.to_string());
        if field == "." {
            api_error
        } else {
            api_error.field(field)
        }
    })
}

/// A JSON answer, or the error as a JSON error body (counted).
pub(crate) fn respond(state: &AppState, result: Result<serde_json::Value, ApiError>) -> Response {
    match result {
        Ok(body) => Json(body).into_response(),
        Err(error) => reject(state, error),
    }
}

/// 422 `invalid_field` naming `field`.
pub(crate) fn invalid(field: &str, message: String) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", message).field(field)
}

/// Parses a path id as a UUID, naming the field when it is not one.
pub(crate) fn parse_id(id: &str, field: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_field",
            format!("`{id}` is not a UUID"),
        )
        .field(field)
    })
}

/// Checks a name (signal, schedule, worker id): 1 to 128 letters, digits, `_`, `-` or `.`.
pub(crate) fn check_name(value: &str, field: &str) -> Result<(), ApiError> {
    let valid = !value.is_empty()
        && value.len() <= 128
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'));
    if valid {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            format!("`{value}` must be 1 to 128 letters, digits, `_`, `-`, `.` or `:`"),
        )
        .field(field))
    }
}

pub(crate) fn check_slug(value: &str, field: &str) -> Result<(), ApiError> {
    let valid = !value.is_empty()
        && value.len() <= 64
        && value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if valid {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            format!("`{value}` must be 1 to 64 lowercase letters, digits or `-`"),
        )
        .field(field))
    }
}

async fn publish_definition(
    State(state): State<AppState>,
    Authenticated(tenant): Authenticated,
    headers: axum::http::HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<DefinitionPublished>), Response> {
    let result = async {
        let body = body.map_err(|rejection| {
            ApiError::new(
                rejection.status(),
                "payload_too_large",
                rejection.body_text(),
            )
        })?;
        let is_yaml = headers
            .get(header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .is_some_and(|value| value.contains("yaml"));
        let parsed = if is_yaml {
            Definition::from_yaml(&body)
        } else {
            Definition::from_json(&body)
        };
        let definition = parsed.map_err(|problems| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_definition",
                format!("the definition has {} problem(s)", problems.len()),
            )
            .problems(problems)
        })?;
        let published = state
            .store
            .publish_definition(&tenant, &definition)
            .await
            .map_err(ApiError::store)?;
        if published.created {
            state.metrics.definitions_published_total.inc();
        }
        Ok((
            if published.created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            },
            Json(DefinitionPublished {
                id: published.id,
                name: definition.name,
                version: published.version,
                created: published.created,
            }),
        ))
    }
    .await;
    result.map_err(|error| reject(&state, error))
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

async fn readyz(State(state): State<AppState>) -> Response {
    let leader = *state.leader.borrow();
    match state.store.ping().await {
        Ok(()) => Json(
            serde_json::json!({ "status": "ready", "leader": leader.is_some(), "epoch": leader }),
        )
        .into_response(),
        Err(error) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "status": "unavailable", "database": error.to_string() })),
        )
            .into_response(),
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    let (size, idle) = state.store.pool_status();
    state
        .metrics
        .db_pool_connections
        .with_label_values(&["total"])
        .set(i64::try_from(size).unwrap_or(i64::MAX));
    state
        .metrics
        .db_pool_connections
        .with_label_values(&["idle"])
        .set(i64::try_from(idle).unwrap_or(i64::MAX));
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

async fn not_found(State(state): State<AppState>) -> Response {
    reject(
        &state,
        ApiError::new(StatusCode::NOT_FOUND, "route_not_found", "no such route"),
    )
}

async fn method_not_allowed(State(state): State<AppState>) -> Response {
    reject(
        &state,
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "method not allowed on this route",
        ),
    )
}
