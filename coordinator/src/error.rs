//! Errors the state machine returns to an RPC, with the gRPC code each maps to.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RpcError {
    /// The request is out of place: stale generation (fencing), a dead worker, a job that is
    /// not running.
    FailedPrecondition(String),
    NotFound(String),
    InvalidArgument(String),
    /// The world is already complete.
    ResourceExhausted(String),
    /// The coordinator cannot answer safely right now (its journal cannot be written); the
    /// worker retries.
    Unavailable(String),
    Internal(String),
}

impl RpcError {
    pub fn message(&self) -> &str {
        match self {
            RpcError::FailedPrecondition(m)
            | RpcError::NotFound(m)
            | RpcError::InvalidArgument(m)
            | RpcError::ResourceExhausted(m)
            | RpcError::Unavailable(m)
            | RpcError::Internal(m) => m,
        }
    }
}

impl fmt::Display for RpcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for RpcError {}

impl From<RpcError> for tonic::Status {
    fn from(e: RpcError) -> Self {
        match e {
            RpcError::FailedPrecondition(m) => tonic::Status::failed_precondition(m),
            RpcError::NotFound(m) => tonic::Status::not_found(m),
            RpcError::InvalidArgument(m) => tonic::Status::invalid_argument(m),
            RpcError::ResourceExhausted(m) => tonic::Status::resource_exhausted(m),
            RpcError::Unavailable(m) => tonic::Status::unavailable(m),
            RpcError::Internal(m) => tonic::Status::internal(m),
        }
    }
}
