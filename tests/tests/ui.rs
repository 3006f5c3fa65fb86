//! The UI master's page, its live stream of build changes, its metrics, and its restart from
//! a view snapshot.

use std::time::Duration;

use futures::StreamExt;
use serde_json::json;
use yard_tests::cluster::{AgentSpec, Cluster};
use yard_tests::deployment::Deployment;
use yard_tests::wait_until;

const CONFIG: &str = r#"
[[builder]]
name = "b"
[[builder.steps]]
name = "s"
run = "echo done"

[[builder]]
name = "tail"
[[builder.steps]]
name = "gated"
run = 'echo first; while [ ! -f "$GATE" ]; do sleep 0.05; done; seq 1 2000'

[[scheduler]]
name = "force"
kind = "force"
builders = ["b", "tail"]
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

    // The agent records itself idle again a moment after the build's end.
    let expected = [
        r#"yard_builds_finished_total{result="success"} 1"#,
        r#"yard_agents{status="idle"} 1"#,
        "yard_build_wait_seconds_count 1",
        "yard_request_queue_length 0",
        r#"yard_bus_rtt_seconds{role="ui"} "#,
    ];
    let metrics = wait_until("every expected metric", Duration::from_secs(10), || async {
        let (status, metrics) = api.get_text("/metrics").await;
        (status == 200 && expected.iter().all(|line| metrics.contains(line))).then_some(metrics)
    })
    .await;
    assert!(metrics.contains("# TYPE yard_agents gauge"), "{metrics}");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_ui_master_restarts_from_a_snapshot_and_replays_only_the_rest() {
    let config = format!("[http]\nsnapshot_interval = \"200ms\"\n{CONFIG}");
    let mut deployment = Deployment::new(&config);
    deployment.master("scheduler", "sched-1");
    deployment.master("engine", "engine-1");
    deployment.agent("a1", "");
    let first = deployment.ui("ui-1");
    let second = deployment.ui("ui-2");
    first.wait_healthy().await;
    second.wait_healthy().await;
    first.wait_agents(1).await;
    for _ in 0..20 {
        let id = first.force("b", json!({})).await;
        first.wait_finished(&id, Duration::from_secs(30)).await;
    }
    // Both UI masters write snapshots; wait until ui-1's holds everything it has seen.
    wait_until(
        "ui-1 to snapshot every event",
        Duration::from_secs(30),
        || async {
            let (_, text) = first.get_text("/metrics").await;
            let applied = services::metrics::sample(&text, "yard_ui_view_events_sequence")?;
            let written = services::metrics::sample(&text, "yard_ui_view_snapshot_sequence")?;
            (applied > 0 && written == applied).then_some(())
        },
    )
    .await;
    deployment.kill("ui-1");
    for _ in 0..3 {
        let id = second.force("b", json!({})).await;
        second.wait_finished(&id, Duration::from_secs(30)).await;
    }

    let third = deployment.ui("ui-3");
    third.wait_healthy().await;
    let listed = |api: yard_tests::api::Api| async move {
        let (_, body) = api.get("/api/v1/builds?limit=100").await;
        body["builds"].as_array().cloned().unwrap_or_default()
    };
    let expected = listed(second.clone()).await;
    assert_eq!(expected.len(), 23);
    let caught_up = yard_tests::poll_until(Duration::from_secs(30), || async {
        (listed(third.clone()).await == expected).then_some(())
    })
    .await;
    if caught_up.is_none() {
        // Which builds differ, as ui-3 shows them, as ui-2 showed them, and as ui-2 shows
        // them now (to tell a restored view that is behind from one that went wrong).
        let shown = listed(third.clone()).await;
        let now = listed(second.clone()).await;
        let differing: Vec<_> = expected
            .iter()
            .zip(&shown)
            .zip(&now)
            .filter(|((before, shown), _)| before != shown)
            .collect();
        panic!(
            "ui-3 does not show what ui-2 showed after 30 s ({} builds against {}): {differing:#?}",
            shown.len(),
            expected.len()
        );
    }
    let (_, text) = third.get_text("/metrics").await;
    let restored =
        services::metrics::sample(&text, "yard_ui_view_restored_builds").expect("restored builds metric");
    let replayed = services::metrics::sample(&text, "yard_ui_view_replayed_events_total")
        .expect("replayed events metric");
    let total =
        services::metrics::sample(&text, "yard_ui_view_events_sequence").expect("events sequence metric");
    assert!(restored >= 20, "ui-3 started from a snapshot:\n{text}");
    assert!(
        replayed < total,
        "ui-3 replayed only the events after the snapshot:\n{text}"
    );
    // A step's log and a build's details come from the restored view too.
    let last = &expected[0];
    let (status, build) = third
        .get(&format!("/api/v1/builds/{}", last["id"].as_str().unwrap()))
        .await;
    assert_eq!(status, 200);
    assert_eq!(build["result"], "success");
}

/// A step's log tailed while it runs (`/log/stream`) ends only once its last line was sent:
/// the step's end can reach the UI master's view before its last chunks reach the tail, and
/// the tail must not take the one for the other. Three builds, each ending in a burst of
/// 2,000 lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tailed_log_ends_only_after_its_last_line() {
    let cluster = Cluster::start(CONFIG, vec![AgentSpec::new("a1")]).await;
    let api = &cluster.api;
    for run in 0..3 {
        let gate = cluster.path().join(format!("gate-{run}"));
        let id = api
            .force("tail", json!({ "GATE": gate.display().to_string() }))
            .await;
        api.wait_build(&id, Duration::from_secs(30), |build| {
            build["steps"][0]["state"] == "running"
        })
        .await;
        let response = reqwest::get(api.url(&format!("/api/v1/builds/{id}/steps/0/log/stream")))
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let mut body = response.bytes_stream();
        let mut sse = String::new();
        let mut gate_open = false;
        let ended = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(chunk) = body.next().await {
                sse.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
                // The line itself (the last of its chunk), not the command's header line.
                if !gate_open && sse.contains("first\"") {
                    std::fs::write(&gate, "").expect("gate file");
                    gate_open = true;
                }
                if sse.contains("event: end") {
                    return true;
                }
            }
            false
        })
        .await;
        assert_eq!(ended, Ok(true), "the tail said: {sse}");
        let text: String = sse
            .lines()
            .filter_map(|line| line.strip_prefix("data: "))
            .filter_map(|data| serde_json::from_str::<serde_json::Value>(data).ok())
            .filter_map(|chunk| chunk["text"].as_str().map(|text| format!("{text}\n")))
            .collect();
        assert!(
            text.ends_with("\n1999\n2000\n"),
            "run {run}: the tail ended before the log's last line: ...{}",
            &text[text.len().saturating_sub(200)..]
        );
    }
}
