//! The UI master's limits on HTTP requests (`[http] max_body_bytes`, `request_timeout` and
//! `max_concurrent_requests`), and their refusals as JSON errors like every other.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;

use crate::error::ApiError;

/// The limits of one UI master.
pub(crate) struct Limits {
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
    pub max_concurrent_requests: usize,
    /// One permit per request being worked on.
    pub permits: Semaphore,
}

impl Limits {
    pub fn new(config: &services::config::HttpConfig) -> Arc<Limits> {
        Arc::new(Limits {
            max_body_bytes: config.max_body_bytes,
            request_timeout: config.request_timeout,
            max_concurrent_requests: config.max_concurrent_requests,
            permits: Semaphore::new(config.max_concurrent_requests),
        })
    }
}

/// Answers 503 at once, instead of queueing, when `max_concurrent_requests` requests are
/// being worked on. A live stream holds its permit only until its response starts.
pub(crate) async fn limit_concurrency(
    State(limits): State<Arc<Limits>>,
    request: Request,
    next: Next,
) -> Response {
    let Ok(_permit) = limits.permits.try_acquire() else {
        return ApiError::Overloaded(format!(
            "the UI master is already working on {} requests ([http] max_concurrent_requests); try again shortly",
            limits.max_concurrent_requests
        ))
        .into_response();
    };
    next.run(request).await
}

/// Bodies refused for their declared size are still read (and dropped) up to this size, so
/// that the client, still sending, reads the 413 instead of a broken connection.
const DRAIN_LIMIT: u64 = 16 * 1024 * 1024;

/// Answers 413 to a request whose declared length is over `max_body_bytes`, after reading
/// and dropping its body (up to [`DRAIN_LIMIT`], within `request_timeout`).
pub(crate) async fn refuse_oversized(
    State(limits): State<Arc<Limits>>,
    request: Request,
    next: Next,
) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    match declared {
        Some(length) if length > limits.max_body_bytes as u64 => {
            if length <= DRAIN_LIMIT {
                let mut body = request.into_body().into_data_stream();
                let drained = async { while let Some(Ok(_)) = futures::StreamExt::next(&mut body).await {} };
                let _ = tokio::time::timeout(limits.request_timeout, drained).await;
            }
            StatusCode::PAYLOAD_TOO_LARGE.into_response()
        }
        _ => next.run(request).await,
    }
}

/// Turns the bare refusals of the body limit and the timeout layers (and of a body
/// extractor hitting the limit) into JSON errors naming the limit.
pub(crate) async fn explain_refusals(State(limits): State<Arc<Limits>>, response: Response) -> Response {
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/json"));
    if is_json {
        return response;
    }
    match response.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::TooLarge(format!(
            "the request body is larger than the limit of {} bytes ([http] max_body_bytes)",
            limits.max_body_bytes
        ))
        .into_response(),
        StatusCode::REQUEST_TIMEOUT => ApiError::Timeout(format!(
            "the request was not answered within {} ([http] request_timeout)",
            humantime::format_duration(limits.request_timeout)
        ))
        .into_response(),
        _ => response,
    }
}
