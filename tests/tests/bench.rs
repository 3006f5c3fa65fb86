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
}

#[test]
fn the_latency_scenario_reports_ordered_percentiles() {
    let result = bench(&["latency", "--builds", "30", "--agents", "2"]);
    assert_eq!(result["scenario"], "latency");
    assert_eq!(result["builds"], 30);
    let (p50, p99, max) = (
        result["p50_ms"].as_f64().expect("p50"),
        result["p99_ms"].as_f64().expect("p99"),
        result["max_ms"].as_f64().expect("max"),
    );
    assert!(p50 > 0.0 && p50 <= p99 && p99 <= max, "{result}");
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
