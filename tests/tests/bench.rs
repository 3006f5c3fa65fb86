//! `yard bench`: each scenario runs end to end and reports its figures (the figures
//! themselves are measured in BENCHMARKS.md, never asserted here).

use std::process::Command;

use yard_tests::process::yard_binary;

#[test]
fn the_ui_scenario_reports_every_figure() {
    let output = Command::new(yard_binary())
        .args([
            "bench",
            "ui",
            "--builds",
            "300",
            "--requests",
            "400",
            "--concurrency",
            "4",
            "--sse-clients",
            "20",
            "--sse-updates",
            "3",
            "--json",
        ])
        .env("YARD_LOG", "warn")
        .output()
        .expect("yard bench runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "yard bench ui failed:\n{stderr}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let result: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|error| panic!("one JSON object expected ({error}):\n{stdout}"));
    assert_eq!(result["scenario"], "ui");
    assert_eq!(result["builds"], 300);
    assert_eq!(result["events"], 1500, "five events per seeded build");
    assert_eq!(result["requests"], 400);
    assert_eq!(result["sse_clients"], 20);
    for figure in [
        "seed_s",
        "full_replay_s",
        "snapshot_write_s",
        "restart_serving_s",
        "restart_caught_up_s",
        "requests_per_s",
        "p50_ms",
        "p99_ms",
        "max_ms",
        "sse_p50_ms",
        "sse_p99_ms",
        "sse_max_ms",
    ] {
        assert!(
            result[figure].as_f64().is_some_and(|value| value >= 0.0),
            "{figure} missing from {result}"
        );
    }
    let (p50, p99, max) = (
        result["p50_ms"].as_f64().unwrap(),
        result["p99_ms"].as_f64().unwrap(),
        result["max_ms"].as_f64().unwrap(),
    );
    assert!(
        p50 > 0.0 && p50 <= p99 && p99 <= max,
        "ordered percentiles: {result}"
    );
}

/// Runs `yard bench ARGS --json` and returns its one JSON object.
fn bench(args: &[&str]) -> serde_json::Value {
    let output = Command::new(yard_binary())
        .arg("bench")
        .args(args)
        .arg("--json")
        .env("YARD_LOG", "warn")
        .output()
        .expect("yard bench runs");
    assert!(
        output.status.success(),
        "yard bench {args:?} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|error| panic!("one JSON object expected ({error}):\n{stdout}"))
}

#[test]
fn the_throughput_scenario_runs_every_build_on_simulated_agents() {
    let result = bench(&["throughput", "--builds", "200", "--agents", "5"]);
    assert_eq!(result["scenario"], "throughput");
    assert_eq!(result["builds"], 200);
    assert_eq!(result["agents"], 5);
    let (seconds, rate) = (
        result["seconds"].as_f64().expect("seconds"),
        result["builds_per_s"].as_f64().expect("builds_per_s"),
    );
    assert!(seconds > 0.0 && rate > 0.0, "{result}");
    assert!(
        (rate * seconds - 200.0).abs() < 2.0,
        "the rate is builds over seconds: {result}"
    );
    // Every scenario says how much CPU time the host took from this machine during the run.
    let steal = result["cpu_steal_percent"].as_f64().expect("cpu_steal_percent");
    assert!((0.0..=100.0).contains(&steal), "{result}");
    // ...and how fast one of its cores was just before (the agents' speed score).
    assert!(
        result["machine_score"].as_u64().is_some_and(|score| score > 0),
        "{result}"
    );
}

/// Asserts `{prefix}p50_ms <= {prefix}p99_ms <= {prefix}max_ms`, all above zero.
fn assert_ordered_percentiles(result: &serde_json::Value, prefix: &str) {
    let figure = |name: &str| {
        result[format!("{prefix}{name}_ms")]
            .as_f64()
            .unwrap_or_else(|| panic!("{prefix}{name}_ms missing from {result}"))
    };
    let (p50, p99, max) = (figure("p50"), figure("p99"), figure("max"));
    assert!(p50 > 0.0 && p50 <= p99 && p99 <= max, "{result}");
}

#[test]
fn the_latency_scenario_reports_ordered_percentiles() {
    let result = bench(&["latency", "--builds", "30", "--agents", "2"]);
    assert_eq!(result["scenario"], "latency");
    assert_eq!(result["builds"], 30);
    assert_ordered_percentiles(&result, "");
}

#[test]
fn the_latency_scenario_under_a_steady_rate_times_every_build() {
    let result = bench(&["latency", "--builds", "100", "--agents", "4", "--rate", "100"]);
    assert_eq!(result["builds"], 100);
    assert_eq!(result["rate_per_s"], 100.0);
    assert_ordered_percentiles(&result, "");
    let busy = result["cpu_busy_percent"].as_f64().expect("cpu_busy_percent");
    assert!(
        busy > 0.0 && busy <= 100.0,
        "a share of the machine's CPU time: {result}"
    );
}

#[test]
fn the_agents_scenario_measures_an_engine_process_among_many_agents() {
    let result = bench(&[
        "agents",
        "--agents",
        "250",
        "--builds",
        "20",
        "--idle-seconds",
        "1",
    ]);
    assert_eq!(result["scenario"], "agents");
    assert_eq!(result["agents"], 250);
    for figure in ["engine_idle_cpu_percent", "engine_kb_per_agent", "registered_s"] {
        assert!(
            result[figure].as_f64().is_some_and(|value| value >= 0.0),
            "{figure} missing from {result}"
        );
    }
    for figure in ["engine_rss_before_mb", "engine_rss_after_mb"] {
        assert!(
            result[figure].as_f64().is_some_and(|value| value > 0.0),
            "{figure} missing from {result}"
        );
    }
    assert_ordered_percentiles(&result, "dispatch_");
}

/// Requests stored while the masters are killed are all run once the masters start again,
/// and the queue ends empty (the scenario fails otherwise).
#[test]
fn the_backlog_scenario_drains_every_request_after_the_masters_restart() {
    let result = bench(&["backlog", "--builds", "1500", "--agents", "10"]);
    assert_eq!(result["scenario"], "backlog");
    assert_eq!(result["builds"], 1500);
    let (first, finished, empty) = (
        result["first_dispatch_s"].as_f64().expect("first_dispatch_s"),
        result["all_finished_s"].as_f64().expect("all_finished_s"),
        result["empty_queue_s"].as_f64().expect("empty_queue_s"),
    );
    assert!(first > 0.0 && first <= finished && finished <= empty, "{result}");
}

#[test]
fn the_logs_scenario_delivers_every_line_to_the_ui_clients() {
    let result = bench(&["logs", "--agents", "2", "--lines", "5000"]);
    assert_eq!(result["scenario"], "logs");
    assert!(
        result["lines"].as_u64().is_some_and(|lines| lines >= 10_000),
        "every printed line counted: {result}"
    );
    assert!(
        result["lines_per_s"].as_f64().is_some_and(|rate| rate > 0.0),
        "{result}"
    );
}

/// Thousands of builds waiting for agents at once: more than a JetStream context lets be
/// unacknowledged. An engine that held its waiting builds' publishes in flight stopped
/// dispatching after a few hundred builds; every build must finish.
#[test]
fn a_backlog_beyond_the_publish_window_is_dispatched_to_the_end() {
    let result = bench(&["throughput", "--builds", "3000", "--agents", "50"]);
    assert_eq!(result["builds"], 3000, "{result}");
    assert!(
        result["builds_per_s"].as_f64().is_some_and(|rate| rate > 0.0),
        "{result}"
    );
}
