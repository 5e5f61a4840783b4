//! HTTP status: `GET /` (the live page for a person), `GET /status` (JSON [`StatusReport`]),
//! `GET /metrics` (Prometheus text) and `GET /healthz` ("ok"). A status bearer token, when
//! set, guards all but `/healthz` ([`crate::access`]).
//!
//! [`StatusReport`]: contrail_common::status::StatusReport

use crate::page::status_page;
use crate::Coordinator;
use axum::{extract::State, routing::get, Json, Router};
use contrail_common::status::StatusReport;
use std::sync::Arc;

/// The status routes; with `bearer`, every route but `/healthz` needs that bearer token.
pub fn router(coord: Arc<Coordinator>, bearer: Option<String>) -> Router {
    Router::new()
        .route("/", get(status_page))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(coord)
        .layer(axum::middleware::from_fn_with_state(
            bearer.map(Arc::<str>::from),
            crate::access::require_status_token,
        ))
}

async fn status(State(coord): State<Arc<Coordinator>>) -> Json<StatusReport> {
    Json(coord.status())
}

async fn metrics(State(coord): State<Arc<Coordinator>>) -> impl axum::response::IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            crate::metrics::CONTENT_TYPE,
        )],
        crate::metrics::render_metrics(&coord.status()),
    )
}
