//! API errors and the one place they become HTTP responses.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unauthorized(String),
    /// The bus did not store a write; nothing was accepted.
    #[error("the bus is unavailable: {0}")]
    Unavailable(String),
    /// The request body is larger than `[http] max_body_bytes`.
    #[error("{0}")]
    TooLarge(String),
    /// The request was not answered within `[http] request_timeout`.
    #[error("{0}")]
    Timeout(String),
    /// The master already works on `[http] max_concurrent_requests` requests.
    #[error("{0}")]
    Overloaded(String),
}

impl From<services::bus::Error> for ApiError {
    fn from(error: services::bus::Error) -> Self {
        tracing::warn!(%error, "bus error while answering a request");
        ApiError::Unavailable(error.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::Overloaded(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        (status, Json(serde_json::json!({ "error": self.to_string() }))).into_response()
    }
}
