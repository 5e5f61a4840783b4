//! Who may talk to the coordinator: the job token on every gRPC call, and an optional bearer
//! token on the HTTP status endpoints (`/healthz` stays open for Kubernetes probes).
//!
//! A refused call is answered `UNAUTHENTICATED` (gRPC) or 401 (HTTP) and logged with the
//! caller's address and the reason; it never reaches the job's state.

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use contrail_common::auth::{unix_ms, GrpcGuard, JobToken, GRPC_HEADER};
use std::sync::Arc;

/// The environment variable `contrail coordinator` (and `contrail local`) read the status
/// bearer token from; `contrail status` sends the same variable's value.
pub const STATUS_TOKEN_ENV: &str = "CONTRAIL_STATUS_TOKEN";

/// The coordinator's access rules. `Access::default()` is open: for in-process tests only;
/// the `contrail` commands always set a job token.
#[derive(Clone, Default)]
pub struct Access {
    /// Every gRPC call must carry a proof made with this token.
    pub job_token: Option<JobToken>,
    /// `GET /`, `/status` and `/metrics` need `Authorization: Bearer <this>`.
    pub status_token: Option<String>,
}

impl Access {
    /// The job token, and the status token from [`STATUS_TOKEN_ENV`] if set.
    pub fn with_job_token(job_token: JobToken) -> Self {
        Self {
            job_token: Some(job_token),
            status_token: std::env::var(STATUS_TOKEN_ENV)
                .ok()
                .filter(|t| !t.is_empty()),
        }
    }

    /// The gRPC interceptor: checks each call's proof before the service sees it.
    pub fn grpc_interceptor(&self) -> GrpcInterceptor {
        GrpcInterceptor {
            guard: self.job_token.clone().map(|t| Arc::new(GrpcGuard::new(t))),
        }
    }
}

#[derive(Clone)]
pub struct GrpcInterceptor {
    guard: Option<Arc<GrpcGuard>>,
}

impl tonic::service::Interceptor for GrpcInterceptor {
    fn call(&mut self, req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let Some(guard) = &self.guard else {
            return Ok(req);
        };
        let header = req
            .metadata()
            .get(GRPC_HEADER)
            .map(|v| v.to_str().unwrap_or("<not text>"));
        match guard.check(header, unix_ms()) {
            Ok(()) => Ok(req),
            Err(reason) => {
                let from = req
                    .remote_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_else(|| "an unknown address".into());
                tracing::warn!(%from, "refused a gRPC call: {reason}");
                Err(tonic::Status::unauthenticated(
                    "this job's token is required (x-contrail-auth)",
                ))
            }
        }
    }
}

/// HTTP middleware: the bearer token on every path but `/healthz`.
pub async fn require_status_token(
    State(token): State<Option<Arc<str>>>,
    req: Request,
    next: Next,
) -> Response {
    let Some(token) = token else {
        return next.run(req).await;
    };
    if req.uri().path() == "/healthz" {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes())) {
        return next.run(req).await;
    }
    tracing::warn!(path = %req.uri().path(), "refused a status request without the bearer token");
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        format!("set {STATUS_TOKEN_ENV} (contrail status sends it) or an Authorization header\n"),
    )
        .into_response()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
