//! The UI master's page, its live stream of build changes and its metrics.

use std::time::Duration;

use futures::StreamExt;
use serde_json::json;
use yard_tests::cluster::{AgentSpec, Cluster};

const CONFIG: &str = r#"
[[builder]]
name = "b"
[[builder.steps]]
name = "s"
run = "echo done"

[[scheduler]]
name = "force"
kind = "force"
builders = ["b"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_page_the_live_stream_and_the_metrics() {
    let cluster = Cluster::start(CONFIG, vec![AgentSpec::new("a1")]).await;
    let api = &cluster.api;
    let (status, page) = api.get_text("/").await;
    assert_eq!(status, 200);
    assert!(page.contains("<title>Yardmaster</title>") && page.contains("/api/v1/stream"));

    // Subscribe first, then force: the stream carries the build to its end.
    let response = reqwest::get(api.url("/api/v1/stream")).await.unwrap();
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let mut body = response.bytes_stream();
    let id = api.force("b", json!({})).await;
    let mut seen = String::new();
    let finished = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(chunk) = body.next().await {
            seen.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
            let done = seen
                .lines()
                .filter_map(|line| line.strip_prefix("data: "))
                .any(|data| {
                    serde_json::from_str::<serde_json::Value>(data)
                        .is_ok_and(|build| build["id"] == id.as_str() && build["result"] == "success")
                });
            if done {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(finished, Ok(true), "the stream said: {seen}");
    assert!(seen.contains("event: build"));

    let (status, openapi) = api.get("/api/v1/openapi.json").await;
    assert_eq!(status, 200);
    assert_eq!(openapi["openapi"], "3.1.0");
    for path in [
        "/api/v1/builds/{id}",
        "/api/v1/builders/{name}/force",
        "/hooks/github",
        "/api/v1/pools/{role}",
    ] {
        assert!(
            openapi["paths"][path].is_object(),
            "{path} missing from the OpenAPI description"
        );
    }
    assert!(openapi["paths"]["/api/v1/pools/{role}"]["put"].is_object());

    let (status, metrics) = api.get_text("/metrics").await;
    assert_eq!(status, 200);
    for line in [
        r#"yard_builds_finished_total{result="success"} 1"#,
        r#"yard_agents{status="idle"} 1"#,
        "yard_build_wait_seconds_count 1",
        "yard_request_queue_length 0",
        r#"yard_bus_rtt_seconds{role="ui"} "#,
    ] {
        assert!(metrics.contains(line), "{line} missing from\n{metrics}");
    }
    cluster.stop().await;
}
