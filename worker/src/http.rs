//! The worker's small HTTP surface: `/healthz`, `/readyz`, `/metrics`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::State as Extract;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::metrics::Metrics;

#[derive(Clone)]
pub struct State {
    pub store: ward_store::Store,
    pub metrics: Metrics,
    pub broker_connected: Arc<AtomicBool>,
}

pub fn router(state: State) -> Router {
    Router::new()
        .route(
            "/healthz",
            get(|| async { Json(json!({ "status": "ok" })) }),
        )
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                Json(json!({ "error": { "code": "route_not_found", "message": "no such route" } })),
            )
        })
        .with_state(state)
}

async fn readyz(Extract(state): Extract<State>) -> Response {
    let broker = state.broker_connected.load(Ordering::Relaxed);
    let database = state.store.ping().await;
    let ready = broker && database.is_ok();
    let body = Json(json!({
        "status": if ready { "ready" } else { "unavailable" },
        "broker": broker,
        "database": database.err().map(|error| error.to_string()),
    }));
    if ready {
        body.into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    }
}

async fn metrics(Extract(state): Extract<State>) -> Response {
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
