//! Test support for Yardmaster's integration tests: a private nats-server per test, `yard`
//! processes, in-process clusters and a small API client that waits for states with a
//! deadline instead of sleeping.

pub mod api;
pub mod browser;
pub mod cluster;
pub mod deployment;
pub mod process;
pub mod proxy;

use std::future::Future;
use std::time::{Duration, Instant};

pub use services::nats_server::NatsServer;

/// Starts a private nats-server with JetStream on a free loopback port, its store in `dir`.
/// Killed when dropped.
pub fn start_nats(dir: &std::path::Path) -> NatsServer {
    let binary = NatsServer::locate_binary().unwrap_or_else(|error| {
        panic!("{error}. The test suite runs against a real nats-server: use scripts/test, which installs it")
    });
    NatsServer::start(&binary, &dir.join("nats"), None).expect("nats-server starts")
}

/// A loopback port free now, below the kernel's ephemeral range
/// ([`services::nats_server::free_loopback_port`]).
pub fn free_port() -> u16 {
    services::nats_server::free_loopback_port().expect("a free loopback port")
}

/// Polls `check` until it yields a value or `deadline` passes; panics with `what` on timeout.
pub async fn wait_until<T, F, Fut>(what: &str, deadline: Duration, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    match poll_until(deadline, check).await {
        Some(value) => value,
        None => panic!("timed out after {deadline:?} waiting for {what}"),
    }
}

/// Polls `check` until it yields a value, or gives `None` once `deadline` passes: for a test
/// that says more than [`wait_until`] can when the wait times out.
pub async fn poll_until<T, F, Fut>(deadline: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if started.elapsed() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Installs a test log subscriber once (honours `YARD_LOG`).
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("YARD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}
