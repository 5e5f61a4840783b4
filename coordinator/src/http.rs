//! HTTP status: `GET /status` (JSON [`StatusReport`]) and `GET /healthz` ("ok").
//!
//! [`StatusReport`]: contrail_common::status::StatusReport

use crate::Coordinator;
use axum::{extract::State, routing::get, Json, Router};
use contrail_common::status::StatusReport;
use std::sync::Arc;

pub fn router(coord: Arc<Coordinator>) -> Router {
    Router::new()
        .route("/status", get(status))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(coord)
}

async fn status(State(coord): State<Arc<Coordinator>>) -> Json<StatusReport> {
    Json(coord.status())
}
