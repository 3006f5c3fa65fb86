//! The UI master: the JSON API, answered from a materialized view of the bus.
//!
//! **Architecture Invariant:** the UI never asks an engine anything. Reads come from its own
//! [`view::View`]; writes (changes, forced builds, cancels) go to JetStream and are answered
//! 2xx only after JetStream stored them.

mod api;
pub mod auth;
mod error;
pub mod hooks;
mod limits;
mod live;
pub mod openapi;
pub mod view;

use std::sync::Arc;

use axum::Router;
use services::{Bus, YardConfig};
use tokio_util::sync::CancellationToken;

pub use error::ApiError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP server failed: {0}")]
    Serve(#[source] std::io::Error),
    #[error("{0}")]
    Insecure(String),
}

/// What every request handler can reach.
pub struct AppState {
    pub config: Arc<YardConfig>,
    pub bus: Bus,
    pub view: Arc<view::View>,
    /// Fires when the server shuts down; ends the live streams, which would otherwise hold
    /// the graceful shutdown open forever.
    pub shutdown: CancellationToken,
}

/// The whole HTTP application, for serving or for calling without a socket in tests.
///
/// Every request is refused at once beyond `[http] max_concurrent_requests` (503), with a
/// body beyond `[http] max_body_bytes` (413), and answered within `[http] request_timeout`
/// (408), except the live streams, which last as long as their client stays.
pub fn app(state: Arc<AppState>) -> Router {
    let limits = limits::Limits::new(&state.config.http);
    api::routes()
        .merge(hooks::routes())
        .merge(live::routes())
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            limits.request_timeout,
        ))
        .merge(live::streams())
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            auth::authorize,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(limits.max_body_bytes))
        .layer(tower_http::limit::RequestBodyLimitLayer::new(
            limits.max_body_bytes,
        ))
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&limits),
            limits::refuse_oversized,
        ))
        .layer(axum::middleware::map_response_with_state(
            Arc::clone(&limits),
            limits::explain_refusals,
        ))
        .layer(axum::middleware::from_fn_with_state(
            limits,
            limits::limit_concurrency,
        ))
        .with_state(state)
}

/// Serves the API on `[http] listen` until `shutdown` fires.
pub async fn run(config: Arc<YardConfig>, bus: Bus, shutdown: CancellationToken) -> Result<(), Error> {
    let address = config.http.listen.clone();
    let listener = tokio::net::TcpListener::bind(&address)
        .await
        .map_err(|source| Error::Listen { address, source })?;
    serve(config, bus, listener, shutdown).await
}

/// Serves only `GET /metrics` (this process's roles) on `listener` until `shutdown` fires: for
/// a master process without the UI role.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let local = listener
        .local_addr()
        .map_or_else(|_| "?".into(), |a| a.to_string());
    let app = Router::new().route(
        "/metrics",
        axum::routing::get(|| async {
            (
                [(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                services::metrics::render(),
            )
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .map_err(|source| Error::Listen {
            address: local,
            source,
        })
}

/// Serves the API on an already bound listener until `shutdown` fires.
pub async fn serve(
    config: Arc<YardConfig>,
    bus: Bus,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    if let Ok(address) = listener.local_addr() {
        auth::check_listen_address(&config.http, &address).map_err(Error::Insecure)?;
    }
    let local = listener
        .local_addr()
        .map_or_else(|_| config.http.listen.clone(), |a| a.to_string());
    services::metrics::spawn_rtt_probe(bus.clone(), "ui", shutdown.clone());
    // A scheduler that never ran yet would start after the changes accepted before it:
    // make sure every configured one has its consumer before accepting any.
    for scheduler in config
        .schedulers
        .iter()
        .filter(|scheduler| scheduler.kind == services::config::SchedulerKind::OnChange)
    {
        if let Err(error) = bus.scheduler_consumer(&scheduler.name).await {
            tracing::warn!(scheduler = %scheduler.name, %error, "cannot create the scheduler's consumer of changes");
        }
    }
    let view = view::View::new();
    let follow_stop = CancellationToken::new();
    view.follow(&bus, &config, follow_stop.clone());
    let state = Arc::new(AppState {
        config,
        bus,
        view,
        shutdown: shutdown.clone(),
    });
    tracing::info!(address = %local, "UI master listening");
    let served = axum::serve(listener, app(state))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await;
    follow_stop.cancel();
    served.map_err(Error::Serve)
}
