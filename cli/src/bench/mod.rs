//! `yard bench`: measured scenarios on this machine, each against a private nats-server
//! (see BENCHMARKS.md for what each measures and the figures).
//!
//! - `ui` ([`ui`]): a UI master with N stored builds, and live updates to many SSE clients.
//! - `throughput`, `latency`, `agents`, `backlog` ([`grid`]): engines and simulated agents.
//! - `logs` ([`logs`]): real agents running steps that print, their logs tailed through a
//!   UI master.

mod grid;
mod logs;
mod ui;

use std::sync::Arc;

use anyhow::Context;
use services::nats_server::NatsServer;
use services::{Bus, YardConfig};

pub use grid::{agents, backlog, latency, throughput, AgentsOptions, BacklogOptions, GridOptions};
pub use logs::{logs, LogsOptions};
pub use ui::{ui, UiOptions};

/// One builder, `bench`, whose single step runs `true`.
const BENCH_CONFIG: &str = r#"
[http]
listen = "127.0.0.1:0"
snapshot_interval = "1s"

[[builder]]
name = "bench"
[[builder.steps]]
name = "true"
run = "true"

[[scheduler]]
name = "bench"
kind = "on-change"
branches = ["main"]
builders = ["bench"]
"#;

/// A private nats-server in a temporary directory, and a configuration pointing at it.
struct Nats {
    data: tempfile::TempDir,
    server: NatsServer,
    config: Arc<YardConfig>,
    /// The configuration as TOML, for `yard` processes the scenario starts.
    config_text: String,
}

impl Nats {
    /// Starts the server; `config` is the TOML the masters and agents run with.
    fn start(config: &str) -> anyhow::Result<Nats> {
        let data = tempfile::tempdir().context("cannot create a temporary directory")?;
        let binary = NatsServer::locate_binary()?;
        let server = NatsServer::start(&binary, &data.path().join("nats"), None)?;
        let config_text = format!("{config}\n[nats]\nurl = \"{}\"\n", server.url());
        let config = YardConfig::from_toml(Some(&config_text), "bench configuration", Vec::new())?;
        config.validate()?;
        Ok(Nats {
            data,
            server,
            config: Arc::new(config),
            config_text,
        })
    }

    async fn connect(&self, name: &str) -> anyhow::Result<Bus> {
        Ok(Bus::connect(&self.config.nats, &self.config.engine, name).await?)
    }

    fn stop(self) {
        self.server.stop();
    }
}

/// The machine's CPU time counters from `/proc/stat`: on a virtual machine, `steal` is the
/// time its CPUs waited while the host ran something else, which slows every figure of a run
/// without anything in it being slower; `idle` (with iowait) is the time no one needed them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CpuTimes {
    steal: u64,
    idle: u64,
    total: u64,
}

impl CpuTimes {
    /// The counters now; `None` where `/proc/stat` cannot be read (not Linux).
    pub fn now() -> Option<CpuTimes> {
        CpuTimes::parse(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    /// The counters of the `cpu` line (all CPUs): user, nice, system, idle, iowait, irq,
    /// softirq, steal, in clock ticks (guest time is counted in user already).
    fn parse(stat: &str) -> Option<CpuTimes> {
        let line = stat.lines().find(|line| line.starts_with("cpu "))?;
        let ticks: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .take(8)
            .map(str::parse)
            .collect::<Result<_, _>>()
            .ok()?;
        (ticks.len() == 8).then(|| CpuTimes {
            steal: ticks[7],
            idle: ticks[3] + ticks[4],
            total: ticks.iter().sum(),
        })
    }

    /// Percent of the CPU time between `self` and `later` that was stolen.
    fn steal_percent_until(self, later: CpuTimes) -> Option<f64> {
        let total = later.total.checked_sub(self.total).filter(|total| *total > 0)?;
        let steal = later.steal.checked_sub(self.steal)?;
        Some(round(steal as f64 * 100.0 / total as f64))
    }

    /// Percent of the CPU time between `self` and `later` that was not idle: how loaded the
    /// machine was (stolen time counts as busy, since this machine could not use it).
    pub fn busy_percent_until(self, later: CpuTimes) -> Option<f64> {
        let total = later.total.checked_sub(self.total).filter(|total| *total > 0)?;
        let idle = later.idle.checked_sub(self.idle)?;
        Some(round(total.saturating_sub(idle) as f64 * 100.0 / total as f64))
    }
}

/// Adds `cpu_steal_percent` to a bench result: the share of the run's CPU time the host took
/// from this machine, when it can be read.
pub fn with_cpu_steal(mut result: serde_json::Value, before: Option<CpuTimes>) -> serde_json::Value {
    let steal = before
        .zip(CpuTimes::now())
        .and_then(|(before, after)| before.steal_percent_until(after));
    if let (Some(fields), Some(steal)) = (result.as_object_mut(), steal) {
        fields.insert("cpu_steal_percent".into(), steal.into());
    }
    result
}

fn round(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

/// The `share` quantile of `sorted` (milliseconds).
fn percentile(sorted: &[f64], share: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 * share).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index]
}

/// p50, p99 and max of `latencies` (milliseconds), as JSON fields named `{prefix}p50_ms`...
fn quantiles(prefix: &str, mut latencies: Vec<f64>) -> serde_json::Map<String, serde_json::Value> {
    latencies.sort_by(f64::total_cmp);
    let mut fields = serde_json::Map::new();
    for (name, share) in [("p50", 0.50), ("p99", 0.99), ("max", 1.0)] {
        fields.insert(
            format!("{prefix}{name}_ms"),
            round(percentile(&latencies, share)).into(),
        );
    }
    fields
}

/// The human summary of a bench result: the scenario, then one figure per line.
pub fn summary(result: &serde_json::Value) -> String {
    let mut text = format!("{}:", result["scenario"].as_str().unwrap_or("bench"));
    if let Some(fields) = result.as_object() {
        let width = fields.keys().map(String::len).max().unwrap_or(0);
        for (name, value) in fields.iter().filter(|(name, _)| *name != "scenario") {
            let value = match value {
                serde_json::Value::Number(number) => match number.as_f64() {
                    Some(float) if float.fract() != 0.0 => format!("{float:.3}"),
                    _ => number.to_string(),
                },
                other => other.to_string(),
            };
            text.push_str(&format!("\n  {name:<width$}  {value}"));
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::CpuTimes;

    #[test]
    fn steal_and_busy_are_shares_of_all_cpu_time_between_two_readings() {
        let before =
            CpuTimes::parse("cpu  100 0 50 800 10 0 5 35 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n").expect("parses");
        assert_eq!(
            before,
            CpuTimes {
                steal: 35,
                idle: 810,
                total: 1000
            }
        );
        let after = CpuTimes::parse("cpu  300 0 100 1300 10 0 5 85 7 0\n").expect("parses");
        // 800 ticks passed, 50 of them stolen.
        assert_eq!(before.steal_percent_until(after), Some(6.25));
        assert_eq!(after.steal_percent_until(after), None, "no time passed");
        // 800 ticks passed, 500 of them idle.
        assert_eq!(before.busy_percent_until(after), Some(37.5));
        assert_eq!(after.busy_percent_until(after), None, "no time passed");
        assert_eq!(CpuTimes::parse("cpu  1 2 3\n"), None, "too few counters");
        assert_eq!(CpuTimes::parse("intr 1 2 3\n"), None, "no cpu line");
    }
}
