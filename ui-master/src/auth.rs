//! Who may read and write through the HTTP API.
//!
//! With API tokens configured, every write needs `Authorization: Bearer <token>` (and every
//! read too when reads are closed). With none, writes stay open only while the server listens
//! on a loopback address; [`check_listen_address`] refuses anything else unless open writes
//! are explicitly allowed. Hooks are authenticated by their own signatures.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use services::config::HttpConfig;

use crate::error::ApiError;
use crate::AppState;

/// Refuses to serve writes to the world without tokens, unless told to.
pub fn check_listen_address(http: &HttpConfig, address: &std::net::SocketAddr) -> Result<(), String> {
    if http.tokens.is_empty() && !address.ip().is_loopback() && !http.allow_open_writes {
        return Err(format!(
            "refusing to listen on {address} with no API tokens: anyone who can reach it could force, cancel and drain. \\
             Configure [[http.token]] entries, listen on a loopback address, or set [http] allow_open_writes = true"
        ));
    }
    Ok(())
}

/// The user a bearer token belongs to, comparing in constant time.
fn user_of<'a>(http: &'a HttpConfig, presented: &str) -> Option<&'a str> {
    http.tokens
        .iter()
        .find(|token| {
            token.token.len() == presented.len()
                && token
                    .token
                    .bytes()
                    .zip(presented.bytes())
                    .fold(0u8, |difference, (a, b)| difference | (a ^ b))
                    == 0
        })
        .map(|token| token.user.as_str())
}

/// Middleware: lets a request through if it may be made.
pub async fn authorize(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let http = &state.config.http;
    let path = request.uri().path();
    let is_write = !matches!(*request.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    let needs_token = !path.starts_with("/hooks/")
        && path != "/healthz"
        && !http.tokens.is_empty()
        && (is_write || !http.open_reads);
    if needs_token {
        let presented = request
            .headers()
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "));
        match presented.and_then(|token| user_of(http, token.trim())) {
            Some(user) => tracing::debug!(%user, %path, "authorized"),
            None => {
                return ApiError::Unauthorized(
                    "this needs an API token: Authorization: Bearer <token>".into(),
                )
                .into_response()
            }
        }
    }
    next.run(request).await
}
