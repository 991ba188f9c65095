//! Errors as HTTP responses: a status, `Retry-After` where retrying helps,
//! and a JSON body `{"error": {"kind": ..., "message": ...}}`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::functions::package::PackageError;
use crate::functions::{DeployError, InvokeFailure};
use crate::models::ModelsError;
use slinfer_sandbox::limits::RETRY_AFTER_S;
use slinfer_sandbox::{InvokeError, LoadError};

/// An error the API answers with.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    retry_after: bool,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            kind,
            message: message.into(),
            retry_after: false,
        }
    }

    fn retry(mut self) -> ApiError {
        self.retry_after = true;
        self
    }

    /// The JSON body: `{"error": {"kind": ..., "message": ...}}`.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({"error": {"kind": self.kind, "message": self.message}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = self.body();
        let mut resp = (self.status, axum::Json(body)).into_response();
        if self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_S));
        }
        resp
    }
}

impl From<InvokeFailure> for ApiError {
    fn from(e: InvokeFailure) -> ApiError {
        let kind = e.kind();
        let message = e.to_string();
        match e {
            InvokeFailure::NotFound(_) => ApiError::new(StatusCode::NOT_FOUND, kind, message),
            InvokeFailure::Unauthorized => ApiError::new(StatusCode::UNAUTHORIZED, kind, message),
            InvokeFailure::Busy { .. } => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, kind, message).retry()
            }
            InvokeFailure::QueueTimeout { .. } => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, kind, message).retry()
            }
            InvokeFailure::Invoke(e) => {
                let status = match e {
                    InvokeError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
                    InvokeError::RequestTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
                    InvokeError::PoolExhausted | InvokeError::HostMemoryFull { .. } => {
                        return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, kind, message)
                            .retry();
                    }
                    InvokeError::GuestError(_) | InvokeError::NoResponse => StatusCode::BAD_GATEWAY,
                    _ => StatusCode::INTERNAL_SERVER_ERROR,
                };
                ApiError::new(status, kind, message)
            }
        }
    }
}

impl From<DeployError> for ApiError {
    fn from(e: DeployError) -> ApiError {
        let message = e.to_string();
        let (status, kind) = match &e {
            DeployError::Package(PackageError::TooLarge { .. }) => {
                (StatusCode::PAYLOAD_TOO_LARGE, "package_too_large")
            }
            DeployError::Package(PackageError::Io(_)) | DeployError::Io(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "storage")
            }
            DeployError::Package(PackageError::Manifest(_)) => {
                (StatusCode::BAD_REQUEST, "invalid_manifest")
            }
            DeployError::Package(_) => (StatusCode::BAD_REQUEST, "invalid_package"),
            DeployError::Load(LoadError::Cache(_)) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "storage")
            }
            DeployError::Load(_) => (StatusCode::BAD_REQUEST, "invalid_component"),
            DeployError::NameMismatch { .. } | DeployError::BadName(_) => {
                (StatusCode::BAD_REQUEST, "invalid_name")
            }
        };
        ApiError::new(status, kind, message)
    }
}

impl From<ModelsError> for ApiError {
    fn from(e: ModelsError) -> ApiError {
        let status = match &e {
            ModelsError::InferenceOff => StatusCode::SERVICE_UNAVAILABLE,
            ModelsError::BadName(_)
            | ModelsError::SourceMissing(_)
            | ModelsError::SourceInvalid(..) => StatusCode::BAD_REQUEST,
            ModelsError::Exists(_) | ModelsError::Busy(_) | ModelsError::TensorModel(_) => {
                StatusCode::CONFLICT
            }
            ModelsError::NotFound(_) => StatusCode::NOT_FOUND,
            ModelsError::Import(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ModelsError::Io(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.kind(), e.to_string())
    }
}

/// A write the cluster store could not take: retryable once NATS is back.
impl From<slinfer_cluster::ClusterError> for ApiError {
    fn from(e: slinfer_cluster::ClusterError) -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "cluster_unavailable",
            e.to_string(),
        )
        .retry()
    }
}
