//! Tenancy endpoints: the admin API (tenants, keys, tiers, declarative
//! apply) behind the admin token, and `GET /v1/usage` for a tenant.

use std::collections::HashMap;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use ward_shared::wire::{CreateTenant, Quotas, TenantCreated, TenantSpec, TierSpec};
use ward_store::{APPLY_TENANTS_MAX, TENANT_PAGE_MAX};

use super::{
    Admin, ApiError, AppState, Authenticated, check_name, check_slug, invalid, parse_id,
    parse_json, reject, respond,
};

/// Default page size of the tenant list.
const TENANT_PAGE_DEFAULT: i64 = 100;

pub async fn create(
    State(state): State<AppState>,
    _admin: Admin,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = async {
        let request: CreateTenant = parse_json(body)?;
        check_slug(&request.slug, "slug")?;
        let quotas = request.quotas.unwrap_or_default();
        check_quotas(&quotas, "quotas")?;
        let created = state
            .store
            .create_tenant(&request.slug, &request.tier, quotas)
            .await
            .map_err(ApiError::store)?;
        Ok(TenantCreated {
            id: created.tenant.id,
            slug: created.tenant.slug,
            tier: created.tenant.tier,
            api_key: created.api_key,
        })
    }
    .await;
    match result {
        Ok(created) => (StatusCode::CREATED, Json(created)).into_response(),
        Err(error) => reject(&state, error),
    }
}

pub async fn list(
    State(state): State<AppState>,
    _admin: Admin,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let result = async {
        let mut limit = TENANT_PAGE_DEFAULT;
        for key in query.keys() {
            if !["tier", "status", "after", "limit"].contains(&key.as_str()) {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_field",
                    format!("unknown query parameter `{key}`; use tier, status, after, limit"),
                )
                .field(key.clone()));
            }
        }
        if let Some(text) = query.get("limit") {
            limit = text
                .parse()
                .ok()
                .filter(|limit| (1..=TENANT_PAGE_MAX).contains(limit))
                .ok_or_else(|| {
                    invalid(
                        "limit",
                        format!("must be a number from 1 to {TENANT_PAGE_MAX}"),
                    )
                })?;
        }
        let tenants = state
            .store
            .tenant_records(
                query.get("tier").map(String::as_str),
                query.get("status").map(String::as_str),
                query.get("after").map(String::as_str),
                limit,
            )
            .await
            .map_err(ApiError::store)?;
        let next = (tenants.len() as i64 == limit)
            .then(|| tenants.last().map(|tenant| tenant.slug.clone()))
            .flatten();
        Ok(json!({ "tenants": tenants, "next_after": next }))
    }
    .await;
    respond(&state, result)
}

pub async fn show(
    State(state): State<AppState>,
    _admin: Admin,
    Path(slug): Path<String>,
) -> Response {
    let result = async {
        let record = state
            .store
            .tenant_record(&slug)
            .await
            .map_err(ApiError::store)?;
        record
            .map(|record| json!(record))
            .ok_or_else(|| not_found(&slug))
    }
    .await;
    respond(&state, result)
}

/// `PATCH /v1/admin/tenants/{slug}` body: any of tier, status, quotas.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantPatch {
    tier: Option<String>,
    status: Option<String>,
    quotas: Option<Quotas>,
}

pub async fn update(
    State(state): State<AppState>,
    _admin: Admin,
    Path(slug): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = async {
        let patch: TenantPatch = parse_json(body)?;
        if let Some(status) = &patch.status {
            check_status(status, "status")?;
        }
        if let Some(quotas) = &patch.quotas {
            check_quotas(quotas, "quotas")?;
        }
        let record = state
            .store
            .update_tenant(
                &slug,
                patch.tier.as_deref(),
                patch.status.as_deref(),
                patch.quotas,
            )
            .await
            .map_err(ApiError::store)?;
        state.keys.forget_all();
        record
            .map(|record| json!(record))
            .ok_or_else(|| not_found(&slug))
    }
    .await;
    respond(&state, result)
}

pub async fn create_key(
    State(state): State<AppState>,
    _admin: Admin,
    Path(slug): Path<String>,
) -> Response {
    let result = async {
        let (key, api_key) = state.store.create_key(&slug).await.map_err(ApiError::store)?.ok_or_else(|| not_found(&slug))?;
        Ok(json!({ "id": key.id, "prefix": key.prefix, "created_at": key.created_at, "api_key": api_key }))
    }
    .await;
    match result {
        Ok(body) => (StatusCode::CREATED, Json(body)).into_response(),
        Err(error) => reject(&state, error),
    }
}

pub async fn keys(
    State(state): State<AppState>,
    _admin: Admin,
    Path(slug): Path<String>,
) -> Response {
    let result = async {
        let keys = state
            .store
            .keys(&slug)
            .await
            .map_err(ApiError::store)?
            .ok_or_else(|| not_found(&slug))?;
        Ok(json!({ "keys": keys }))
    }
    .await;
    respond(&state, result)
}

pub async fn revoke_key(
    State(state): State<AppState>,
    _admin: Admin,
    Path((slug, key_id)): Path<(String, String)>,
) -> Response {
    let result = async {
        let key_id = parse_id(&key_id, "key_id")?;
        if state
            .store
            .revoke_key(&slug, key_id)
            .await
            .map_err(ApiError::store)?
        {
            state.keys.forget_all();
            Ok(json!({ "id": key_id, "revoked": true }))
        } else {
            Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "key_not_found",
                format!("tenant `{slug}` has no active key {key_id}"),
            )
            .field("key_id"))
        }
    }
    .await;
    respond(&state, result)
}

pub async fn tiers(State(state): State<AppState>, _admin: Admin) -> Response {
    let result = state
        .store
        .tiers()
        .await
        .map(|tiers| json!({ "tiers": tiers }))
        .map_err(ApiError::store);
    respond(&state, result)
}

/// `POST /v1/admin/apply` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyRequest {
    #[serde(default)]
    tiers: Vec<TierSpec>,
    #[serde(default)]
    tenants: Vec<TenantSpec>,
    #[serde(default)]
    dry_run: bool,
}

pub async fn apply(
    State(state): State<AppState>,
    _admin: Admin,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = async {
        let request: ApplyRequest = parse_json(body)?;
        if request.tenants.len() > APPLY_TENANTS_MAX {
            return Err(invalid(
                "tenants",
                format!("at most {APPLY_TENANTS_MAX} tenants per call"),
            ));
        }
        for (index, tier) in request.tiers.iter().enumerate() {
            check_name(&tier.name, &format!("tiers[{index}].name"))?;
            if !(1..=1000).contains(&tier.weight) {
                return Err(invalid(
                    &format!("tiers[{index}].weight"),
                    "must be from 1 to 1000".into(),
                ));
            }
            if !(0..=100).contains(&tier.min_share_percent) {
                return Err(invalid(
                    &format!("tiers[{index}].min_share_percent"),
                    "must be from 0 to 100".into(),
                ));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for (index, tenant) in request.tenants.iter().enumerate() {
            check_slug(&tenant.slug, &format!("tenants[{index}].slug"))?;
            check_status(&tenant.status, &format!("tenants[{index}].status"))?;
            check_quotas(&tenant.quotas, &format!("tenants[{index}].quotas"))?;
            if !seen.insert(tenant.slug.as_str()) {
                return Err(invalid(
                    &format!("tenants[{index}].slug"),
                    format!("`{}` is listed twice", tenant.slug),
                ));
            }
        }
        let report = state
            .store
            .apply(&request.tiers, &request.tenants, request.dry_run)
            .await
            .map_err(|error| match error {
                ward_store::Error::Invalid { field, message } => invalid(&field, message),
                other => ApiError::store(other),
            })?;
        if !request.dry_run {
            state.keys.forget_all();
        }
        Ok(json!(report))
    }
    .await;
    respond(&state, result)
}

pub async fn usage(
    State(state): State<AppState>,
    Authenticated(tenant): Authenticated,
) -> Response {
    let result = async {
        let usage = state.store.usage(&tenant).await.map_err(ApiError::store)?;
        let throttled = if tenant.is_suspended() {
            Some("suspended")
        } else if usage.inflight_tasks >= i64::from(tenant.quotas.inflight_max)
            && usage.ready_tasks > 0
        {
            Some("inflight")
        } else if usage.running_instances >= i64::from(tenant.quotas.running_instances_max) {
            Some("running_instances")
        } else {
            None
        };
        Ok(json!({
            "tenant": tenant.slug,
            "tier": tenant.tier,
            "status": tenant.status,
            "quotas": tenant.quotas,
            "usage": usage,
            "throttled": throttled,
        }))
    }
    .await;
    respond(&state, result)
}

fn check_status(status: &str, field: &str) -> Result<(), ApiError> {
    if ["active", "suspended", "deleted"].contains(&status) {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("unknown status `{status}`; use active, suspended or deleted"),
        ))
    }
}

fn check_quotas(quotas: &Quotas, field: &str) -> Result<(), ApiError> {
    let checks = [
        ("inflight_max", quotas.inflight_max, 1, 100_000),
        (
            "dispatch_rate_per_s",
            quotas.dispatch_rate_per_s,
            1,
            1_000_000,
        ),
        (
            "running_instances_max",
            quotas.running_instances_max,
            1,
            100_000_000,
        ),
        (
            "payload_bytes_max",
            quotas.payload_bytes_max,
            1_024,
            16 * 1024 * 1024,
        ),
    ];
    for (name, value, min, max) in checks {
        if !(min..=max).contains(&value) {
            return Err(invalid(
                &format!("{field}.{name}"),
                format!("must be from {min} to {max}"),
            ));
        }
    }
    Ok(())
}

pub(crate) fn not_found(slug: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "tenant_not_found",
        format!("no tenant `{slug}`"),
    )
    .field("slug")
}
