//! Operator routes: cluster status (leader, registered masters and workers,
//! per-tier capacity) and the dead-letter table.

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::json;
use ward_shared::wire::{ClusterStatus, DeadLetterPage, DesiredWorkers, TierStatus};
use ward_store::DEAD_LETTER_PAGE_MAX;

use super::{Admin, ApiError, AppState, Authenticated, respond};

/// `GET /v1/admin/cluster`: who leads, who is registered, and each tier's
/// workers, ready backlog and in-flight runs.
pub async fn status(State(state): State<AppState>, _admin: Admin) -> Response {
    let result = async {
        let members = state.registry.list().await.map_err(|error| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "etcd_unavailable",
                format!("cannot read the member registry: {error:#}"),
            )
        })?;
        let leader = state.store.leader().await.map_err(ApiError::store)?;
        let backlog = state.store.ready_backlog().await.map_err(ApiError::store)?;
        let inflight = state.store.inflight().await.map_err(ApiError::store)?;
        let tiers = state.store.tiers().await.map_err(ApiError::store)?;
        let desired: Option<DesiredWorkers> = state
            .registry
            .get_signal(crate::autoscale::DESIRED_WORKERS_SIGNAL)
            .await
            .ok()
            .flatten()
            .and_then(|value| serde_json::from_value(value).ok())
            .filter(|desired: &DesiredWorkers| {
                (chrono::Utc::now() - desired.computed_at).num_seconds()
                    <= crate::autoscale::DESIRED_WORKERS_STALE_S
            })
            // Fenced by the epoch it carries: a deposed leader that still
            // publishes (it has not yet seen its term end) is not obeyed.
            .filter(|desired: &DesiredWorkers| {
                leader
                    .as_ref()
                    .is_some_and(|leader| leader.epoch == desired.epoch)
            });
        let (masters, workers): (Vec<_>, Vec<_>) = members
            .into_iter()
            .partition(|member| member.role == "master");
        let tiers = tiers
            .iter()
            .map(|tier| TierStatus {
                tier: tier.name.clone(),
                workers: workers
                    .iter()
                    .filter(|worker| worker.tiers.contains(&tier.name))
                    .count() as i64,
                ready: backlog
                    .iter()
                    .filter(|(name, _)| name == &tier.name)
                    .map(|(_, count)| *count)
                    .sum(),
                in_flight: inflight
                    .iter()
                    .filter(|((name, _), _)| name == &tier.name)
                    .map(|(_, count)| *count)
                    .sum(),
                workers_desired: desired
                    .as_ref()
                    .and_then(|desired| desired.tiers.get(&tier.name).copied()),
            })
            .collect();
        Ok(json!(ClusterStatus {
            leader,
            masters,
            workers,
            tiers,
        }))
    }
    .await;
    respond(&state, result)
}

/// `?limit=` of the dead-letter listings and, for the admin one, `tenant=`
/// (a slug).
#[derive(Debug, Default)]
struct DeadLetterQuery {
    tenant: Option<String>,
    limit: i64,
}

fn parse_query(
    query: &HashMap<String, String>,
    tenant_allowed: bool,
) -> Result<DeadLetterQuery, ApiError> {
    let mut parsed = DeadLetterQuery {
        tenant: None,
        limit: 100,
    };
    for (key, value) in query {
        match key.as_str() {
            "tenant" if tenant_allowed => parsed.tenant = Some(value.clone()),
            "limit" => {
                parsed.limit = value
                    .parse()
                    .ok()
                    .filter(|limit| (1..=DEAD_LETTER_PAGE_MAX).contains(limit))
                    .ok_or_else(|| {
                        super::invalid(
                            "limit",
                            format!("limit must be a number from 1 to {DEAD_LETTER_PAGE_MAX}"),
                        )
                    })?;
            }
            other => {
                let known = if tenant_allowed {
                    "tenant, limit"
                } else {
                    "limit"
                };
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_field",
                    format!("unknown query parameter `{other}`; use {known}"),
                )
                .field(other));
            }
        }
    }
    Ok(parsed)
}

/// `GET /v1/admin/dead-letters[?tenant=slug][&limit=N]`: newest first.
pub async fn admin_dead_letters(
    State(state): State<AppState>,
    _admin: Admin,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let result = async {
        let query = parse_query(&query, true)?;
        let limit = query.limit;
        let tenant_id = match &query.tenant {
            Some(slug) => Some(
                state
                    .store
                    .tenant_record(slug)
                    .await
                    .map_err(ApiError::store)?
                    .ok_or_else(|| super::tenancy::not_found(slug))?
                    .id,
            ),
            None => None,
        };
        let dead_letters = state
            .store
            .dead_letters(tenant_id, limit)
            .await
            .map_err(ApiError::store)?;
        Ok(json!(DeadLetterPage { dead_letters }))
    }
    .await;
    respond(&state, result)
}

/// `GET /v1/dead-letters[?limit=N]`: the calling tenant's dead letters.
pub async fn dead_letters(
    State(state): State<AppState>,
    Authenticated(tenant): Authenticated,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let result = async {
        let limit = parse_query(&query, false)?.limit;
        let dead_letters = state
            .store
            .dead_letters(Some(tenant.id), limit)
            .await
            .map_err(ApiError::store)?;
        Ok(json!(DeadLetterPage { dead_letters }))
    }
    .await;
    respond(&state, result)
}
