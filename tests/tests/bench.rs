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
