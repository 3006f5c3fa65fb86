//! Prometheus metrics of the masters running in this process: each role's counters, gauges
//! and histograms live in one process-wide registry, rendered by `GET /metrics` (the UI
//! master's, or the metrics listener of a process without one).

use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::Bus;

fn registry() -> &'static Mutex<Registry> {
    static REGISTRY: OnceLock<Mutex<Registry>> = OnceLock::new();
    REGISTRY.get_or_init(|| Mutex::new(Registry::default()))
}

fn register(name: &str, help: &str, metric: impl prometheus_client::registry::Metric) {
    registry()
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .register(name, help, metric);
}

/// Every metric registered in this process, in the Prometheus text format (without the
/// OpenMetrics `# EOF` line, so that it can follow other metrics).
pub fn render() -> String {
    let mut out = String::new();
    let registry = registry().lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Err(error) = prometheus_client::encoding::text::encode_registry(&mut out, &registry) {
        tracing::warn!(%error, "metrics not rendered");
    }
    out
}

/// The value of the unlabelled sample `name` in a `/metrics` text, if it is there.
pub fn sample(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoleLabel {
    pub role: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SchedulerLabel {
    pub scheduler: String,
}

/// Upper bounds of the wait histograms, in seconds.
const WAIT_BUCKETS: [f64; 10] = [0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0];

/// What the engine masters of this process count.
pub struct EngineMetrics {
    pub claims: Counter,
    pub builds_finished: Family<ResultLabel, Counter>,
    pub builds_running: Gauge,
    pub build_wait_seconds: Histogram,
    pub agents: Family<StatusLabel, Gauge>,
    pub waiting_steps: Gauge,
}

impl EngineMetrics {
    pub fn get() -> &'static EngineMetrics {
        static METRICS: OnceLock<EngineMetrics> = OnceLock::new();
        METRICS.get_or_init(|| {
            let metrics = EngineMetrics {
                claims: Counter::default(),
                builds_finished: Family::default(),
                builds_running: Gauge::default(),
                build_wait_seconds: Histogram::new(WAIT_BUCKETS),
                agents: Family::default(),
                waiting_steps: Gauge::default(),
            };
            register(
                "yard_engine_claims",
                "Build requests claimed (adoptions included)",
                metrics.claims.clone(),
            );
            register(
                "yard_engine_builds_finished",
                "Builds this process's engines finished, by result",
                metrics.builds_finished.clone(),
            );
            register(
                "yard_engine_builds_running",
                "Builds this process's engines drive now",
                metrics.builds_running.clone(),
            );
            register(
                "yard_engine_build_wait_seconds",
                "Time from a build's request to its master step getting an agent",
                metrics.build_wait_seconds.clone(),
            );
            register(
                "yard_engine_agents",
                "Agents as the engine sees them, by status",
                metrics.agents.clone(),
            );
            register(
                "yard_engine_waiting_steps",
                "Steps of this process's builds waiting for an agent or a pool server",
                metrics.waiting_steps.clone(),
            );
            metrics
        })
    }
}

/// Build requests not yet finished (queued or running), as last seen by an engine or UI
/// master of this process.
pub fn request_queue_length() -> &'static Gauge {
    static GAUGE: OnceLock<Gauge> = OnceLock::new();
    GAUGE.get_or_init(|| {
        let gauge = Gauge::default();
        register(
            "yard_request_queue_length",
            "Build requests not yet finished (queued or running)",
            gauge.clone(),
        );
        gauge
    })
}

/// What the scheduler masters of this process count.
pub struct SchedulerMetrics {
    pub changes: Family<SchedulerLabel, Counter>,
    pub requests: Family<SchedulerLabel, Counter>,
    pub leases_held: Gauge,
}

impl SchedulerMetrics {
    pub fn get() -> &'static SchedulerMetrics {
        static METRICS: OnceLock<SchedulerMetrics> = OnceLock::new();
        METRICS.get_or_init(|| {
            let metrics = SchedulerMetrics {
                changes: Family::default(),
                requests: Family::default(),
                leases_held: Gauge::default(),
            };
            register(
                "yard_scheduler_changes",
                "Changes a scheduler processed",
                metrics.changes.clone(),
            );
            register(
                "yard_scheduler_requests",
                "Build requests a scheduler stored",
                metrics.requests.clone(),
            );
            register(
                "yard_scheduler_leases_held",
                "Scheduler leases held by this process",
                metrics.leases_held.clone(),
            );
            metrics
        })
    }
}

/// Bus messages each role of this process rejected (undecodable or oversized) and parked in
/// the dead-letter stream; a message rejected again is not counted twice.
pub fn dead_letters() -> &'static Family<RoleLabel, Counter> {
    static DEAD_LETTERS: OnceLock<Family<RoleLabel, Counter>> = OnceLock::new();
    DEAD_LETTERS.get_or_init(|| {
        let family = Family::default();
        register(
            "yard_dead_letters",
            "Bus messages rejected as undecodable or oversized and parked in YARD_DEAD_LETTERS, by role",
            Family::clone(&family),
        );
        family
    })
}

fn bus_rtt() -> &'static Family<RoleLabel, Gauge<f64, std::sync::atomic::AtomicU64>> {
    static RTT: OnceLock<Family<RoleLabel, Gauge<f64, std::sync::atomic::AtomicU64>>> = OnceLock::new();
    RTT.get_or_init(|| {
        let family = Family::default();
        register(
            "yard_bus_rtt_seconds",
            "Round trip to the NATS server, by role",
            Family::clone(&family),
        );
        family
    })
}

/// Measures the round trip to the NATS server of `role`'s connection every few seconds until
/// `stop` fires.
pub fn spawn_rtt_probe(bus: Bus, role: &str, stop: CancellationToken) {
    let gauge = bus_rtt()
        .get_or_create(&RoleLabel {
            role: role.to_owned(),
        })
        .clone();
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let started = Instant::now();
            if bus.client.flush().await.is_ok() {
                gauge.set(started.elapsed().as_secs_f64());
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::sample;

    #[test]
    fn a_sample_is_read_by_its_exact_name_without_labels() {
        let text = "yard_a 3\nyard_ab 4\nyard_c{role=\"ui\"} 5\nyard_d not-a-number\n";
        assert_eq!(sample(text, "yard_a"), Some(3));
        assert_eq!(sample(text, "yard_ab"), Some(4));
        assert_eq!(sample(text, "yard_c"), None);
        assert_eq!(sample(text, "yard_d"), None);
        assert_eq!(sample(text, "yard_e"), None);
    }
}
