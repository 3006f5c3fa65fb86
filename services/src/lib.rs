//! The runtime every Yardmaster service shares: configuration, the bus connection and its
//! provisioning, the `agents` expression language, tracing, shutdown and a private
//! nats-server for single-machine use.
//!
//! **Architecture Invariant:** services holds no role logic; it knows how to talk to the bus,
//! not what schedulers, engines, UIs or agents decide.

pub mod bus;
pub mod config;
pub mod lease;
pub mod metrics;
pub mod nats_server;
pub mod permissions;
pub mod presence;
pub mod read_back;
pub mod selector;
pub mod shutdown;
pub mod telemetry;
pub mod time;
pub mod toolkits;
pub mod waits;
pub mod watch;

pub use bus::Bus;
pub use config::YardConfig;
pub use selector::AgentSelector;
