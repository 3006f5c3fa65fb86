//! Tracing setup shared by every binary.

use tracing_subscriber::EnvFilter;

/// Output format of the process log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Installs the global subscriber; `YARD_LOG` (or `RUST_LOG`) sets the filter, `info` by default.
pub fn init(format: LogFormat) {
    let filter = std::env::var("YARD_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info,async_nats=warn".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(filter))
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    // A second initialisation (tests starting several services) keeps the first subscriber.
    let _ = result;
}
