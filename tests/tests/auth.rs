//! API tokens: with tokens configured, writes need one; reads can be closed too; the UI master
//! refuses to serve writes to the world without tokens.

use serde_json::{json, Value};
use yard_tests::cluster::{AgentSpec, Cluster};

const CONFIG: &str = r#"
[http]
open_reads = true
[[http.token]]
user = "alice"
token = "alice-token"

[[builder]]
name = "b"
[[builder.steps]]
name = "s"
run = "true"

[[scheduler]]
name = "force"
kind = "force"
builders = ["b"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_need_a_token_once_tokens_are_configured() {
    let cluster = Cluster::start(CONFIG, vec![AgentSpec::new("a1")]).await;
    let anonymous = &cluster.api;
    let alice = anonymous.with_token("alice-token");
    let (status, body) = anonymous.post("/api/v1/builders/b/force", Value::Null).await;
    assert_eq!(status, 401, "{body}");
    assert!(body["error"].as_str().unwrap().contains("Bearer"));
    let (status, _) = anonymous
        .with_token("wrong")
        .post("/api/v1/builders/b/force", Value::Null)
        .await;
    assert_eq!(status, 401);
    for path in ["/api/v1/changes", "/api/v1/masters/x/drain"] {
        let (status, _) = anonymous.post(path, json!({ "branch": "main" })).await;
        assert_eq!(status, 401, "{path}");
    }
    let (status, _) = anonymous
        .put_json("/api/v1/pools/p", json!({ "servers": [] }))
        .await;
    assert_eq!(status, 401);
    // Reads stay open; a token holder writes.
    let (status, _) = anonymous.get("/api/v1/builds").await;
    assert_eq!(status, 200);
    let build = alice.force("b", json!({})).await;
    assert_eq!(
        alice
            .wait_finished(&build, std::time::Duration::from_secs(30))
            .await["result"],
        "success"
    );
    let (status, _) = anonymous
        .post(&format!("/api/v1/builds/{build}/cancel"), Value::Null)
        .await;
    assert_eq!(status, 401);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn closed_reads_need_a_token_too() {
    let config = CONFIG.replace("open_reads = true", "open_reads = false");
    let cluster = Cluster::start_with_token(&config, vec![AgentSpec::new("a1")], "alice-token").await;
    let (status, _) = cluster.api.get("/api/v1/builds").await;
    assert_eq!(status, 200, "the cluster's client carries the token");
    let anonymous = yard_tests::api::Api::new(cluster.api.url(""));
    let (status, _) = anonymous.get("/api/v1/builds").await;
    assert_eq!(status, 401);
    let (status, _) = anonymous.get("/healthz").await;
    assert_eq!(status, 200, "health checks stay open");
    cluster.stop().await;
}

#[test]
fn listening_beyond_loopback_without_tokens_is_refused() {
    let mut http = services::config::HttpConfig::default();
    let world: std::net::SocketAddr = "0.0.0.0:8080".parse().unwrap();
    let loopback: std::net::SocketAddr = "127.0.0.1:8080".parse().unwrap();
    let refusal = ui_master::auth::check_listen_address(&http, &world).unwrap_err();
    assert!(
        refusal.contains("no API tokens") && refusal.contains("allow_open_writes"),
        "{refusal}"
    );
    assert!(ui_master::auth::check_listen_address(&http, &loopback).is_ok());
    http.allow_open_writes = true;
    assert!(ui_master::auth::check_listen_address(&http, &world).is_ok());
    http.allow_open_writes = false;
    http.tokens.push(services::config::ApiToken {
        user: "ci".into(),
        token: "t".into(),
    });
    assert!(ui_master::auth::check_listen_address(&http, &world).is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_ui_masters_serve_the_same_builds_and_refuse_anonymous_writes() {
    let mut deployment = yard_tests::deployment::Deployment::new(CONFIG);
    deployment.master("scheduler", "sched-1");
    deployment.master("engine", "engine-1");
    deployment.agent("a1", "");
    let uis = [deployment.ui("ui-1"), deployment.ui("ui-2")];
    for api in &uis {
        api.wait_healthy().await;
    }
    uis[0].wait_agents(1).await;
    // Writes through either UI master need the token.
    for api in &uis {
        let (status, body) = api.post("/api/v1/builders/b/force", Value::Null).await;
        assert_eq!(status, 401, "{body}");
    }
    let mut forced = Vec::new();
    for api in &uis {
        let alice = api.with_token("alice-token");
        let build = alice.force("b", json!({})).await;
        alice
            .wait_finished(&build, std::time::Duration::from_secs(30))
            .await;
        forced.push(build);
    }
    // Each UI master answers from its own view of the bus: both show both builds, alike.
    let listing = |api: yard_tests::api::Api| async move {
        let (_, body) = api.get("/api/v1/builds?builder=b").await;
        body["builds"].as_array().cloned().unwrap_or_default()
    };
    let first = yard_tests::wait_until(
        "ui-1 to show both builds",
        std::time::Duration::from_secs(30),
        || async {
            let builds = listing(uis[0].clone()).await;
            (builds.len() == 2 && builds.iter().all(|build| build["result"] == "success")).then_some(builds)
        },
    )
    .await;
    yard_tests::wait_until(
        "ui-2 to show what ui-1 shows",
        std::time::Duration::from_secs(30),
        || async { (listing(uis[1].clone()).await == first).then_some(()) },
    )
    .await;
    let ids: Vec<&str> = first.iter().map(|build| build["id"].as_str().unwrap()).collect();
    for build in &forced {
        assert!(ids.contains(&build.as_str()), "{build} listed");
    }
}
