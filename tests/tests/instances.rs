//! Agents and masters of different releases: an agent speaking another protocol version is
//! refused at registration, visibly (API and agent log), and never handed work.

use std::time::Duration;

use serde_json::json;
use yard_tests::deployment::Deployment;
use yard_tests::wait_until;

const CONFIG: &str = r#"
[[builder]]
name = "b"
agents = 'os == "old"'
[[builder.steps]]
name = "s"
run = "echo ran"

[[scheduler]]
name = "force"
kind = "force"
builders = ["b"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_of_another_protocol_version_is_refused() {
    yard_tests::init_logging();
    let mut deployment = Deployment::new(CONFIG);
    deployment.master("scheduler", "sched-1");
    deployment.master("engine", "engine-1");
    let api = deployment.ui("ui-1");
    api.wait_healthy().await;
    deployment.agent_with_args("mismatched", "os=old", &["--protocol", "999"]);

    let agent = wait_until(
        "the mismatched agent listed as refused",
        Duration::from_secs(30),
        || async {
            let (_, body) = api.get("/api/v1/agents").await;
            body["agents"]
                .as_array()?
                .iter()
                .find(|agent| agent["name"] == "mismatched" && agent["status"] == "refused")
                .cloned()
        },
    )
    .await;
    let reason = agent["refused"].as_str().expect("a reason");
    assert!(
        reason.contains("protocol 999") && reason.contains("protocol 1"),
        "the reason names both versions: {reason}"
    );
    wait_until(
        "the refusal in the agent's log",
        Duration::from_secs(30),
        || async {
            let log = deployment.log_text("mismatched");
            (log.contains("refused by master engine-1")
                && log.contains("it speaks protocol 1, this agent speaks protocol 999"))
            .then_some(())
        },
    )
    .await;

    // A build only it could run waits instead of failing on it later.
    let id = api.force("b", json!({})).await;
    let waiting = wait_until("the build to wait", Duration::from_secs(30), || async {
        let (_, build) = api.get(&format!("/api/v1/builds/{id}")).await;
        (build["state"] == "waiting").then_some(build)
    })
    .await;
    assert!(
        waiting["message"]
            .as_str()
            .is_some_and(|message| message.contains("os == \"old\"")),
        "{waiting}"
    );

    // A matching agent of this release takes it.
    deployment.agent("current", "os=old");
    let build = api.wait_finished(&id, Duration::from_secs(30)).await;
    assert_eq!(build["result"], "success", "{build}");
    assert_eq!(build["agent"], "current");
    let log = api.step_log(&id, 0).await;
    assert!(log.contains("ran"), "{log}");
}
