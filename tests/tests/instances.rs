//! Agents across deployments and releases: an agent speaking another protocol version is
//! refused at registration, visibly (API and agent log), and never handed work; one agent
//! process serves two deployments, one build at a time, each in its own instance directory.

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

/// A builder whose one step records its working directory, then waits for a gate file.
const GATED: &str = r#"
[[builder]]
name = "gated"
agents = 'os == "linux"'
[[builder.steps]]
name = "s"
run = 'pwd > "$OUT"; while [ ! -f "$GATE" ]; do sleep 0.05; done'

[[scheduler]]
name = "force"
kind = "force"
builders = ["gated"]
"#;

/// One deployment with its own nats-server and instance id, and every master role.
fn deployment(instance: &str) -> (Deployment, yard_tests::api::Api) {
    let mut deployment = Deployment::new(&format!("[instance]\nid = \"{instance}\"\n{GATED}"));
    deployment.master("scheduler", &format!("{instance}-scheduler"));
    deployment.master("engine", &format!("{instance}-engine"));
    let api = deployment.ui(&format!("{instance}-ui"));
    (deployment, api)
}

async fn agent_entry(api: &yard_tests::api::Api) -> Option<serde_json::Value> {
    let (_, body) = api.get("/api/v1/agents").await;
    body["agents"]
        .as_array()?
        .iter()
        .find(|agent| agent["name"] == "shared")
        .cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_agent_serves_two_deployments_one_build_at_a_time() {
    yard_tests::init_logging();
    let (blue, blue_api) = deployment("blue");
    let (green, green_api) = deployment("green");
    let scratch = tempfile::tempdir().expect("temp dir");
    let root = scratch.path().join("agent");
    let config = scratch.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\nname = \"shared\"\nworkdir = \"{}\"\nbenchmark = 100\nlabels = {{ os = \"linux\" }}\n\n\
             [[connection]]\nurl = \"{}\"\ninstance = \"blue\"\n\n[[connection]]\nurl = \"{}\"\ninstance = \"green\"\n",
            root.display(),
            blue.nats_url(),
            green.nats_url()
        ),
    )
    .expect("agent config");
    let _agent = yard_tests::process::YardProcess::start(
        "shared",
        scratch.path(),
        &["agent", "--config", &config.display().to_string()],
    );
    for api in [&blue_api, &green_api] {
        api.wait_healthy().await;
        api.wait_agents(1).await;
    }

    // Blue's build takes the machine and holds it until its gate opens.
    let (blue_gate, blue_out) = (scratch.path().join("blue-gate"), scratch.path().join("blue-out"));
    let blue_build = blue_api
        .force(
            "gated",
            json!({ "GATE": blue_gate.display().to_string(), "OUT": blue_out.display().to_string() }),
        )
        .await;
    wait_until("blue's build to run", Duration::from_secs(30), || async {
        let (_, build) = blue_api.get(&format!("/api/v1/builds/{blue_build}")).await;
        (build["state"] == "running").then_some(())
    })
    .await;

    // Green sees the agent busy for another deployment, and nothing of blue's build.
    let seen_by_green = wait_until(
        "green to see the agent busy elsewhere",
        Duration::from_secs(30),
        || async {
            agent_entry(&green_api)
                .await
                .filter(|agent| agent["status"] == "busy" && agent["busy_elsewhere"] == true)
        },
    )
    .await;
    assert!(seen_by_green["busy_with"].is_null(), "{seen_by_green}");
    assert!(
        !seen_by_green.to_string().contains(&blue_build),
        "{seen_by_green}"
    );
    let blue_seen = agent_entry(&blue_api).await.expect("blue lists the agent");
    assert_eq!(blue_seen["busy_with"], blue_build.as_str());
    assert_eq!(blue_seen["busy_elsewhere"], false);

    // Green's build waits for the machine, and says why.
    let (green_gate, green_out) = (
        scratch.path().join("green-gate"),
        scratch.path().join("green-out"),
    );
    std::fs::write(&green_gate, "").expect("green gate");
    let green_build = green_api
        .force(
            "gated",
            json!({ "GATE": green_gate.display().to_string(), "OUT": green_out.display().to_string() }),
        )
        .await;
    let waiting = wait_until("green's build to wait", Duration::from_secs(30), || async {
        let (_, build) = green_api.get(&format!("/api/v1/builds/{green_build}")).await;
        (build["state"] == "waiting").then_some(build)
    })
    .await;
    assert!(
        waiting["message"]
            .as_str()
            .is_some_and(|message| message.contains("shared (for another deployment)")),
        "{waiting}"
    );

    // Blue finishes; then green runs on the freed machine.
    std::fs::write(&blue_gate, "").expect("blue gate");
    let blue_done = blue_api.wait_finished(&blue_build, Duration::from_secs(30)).await;
    assert_eq!(blue_done["result"], "success", "{blue_done}");
    let green_done = green_api
        .wait_finished(&green_build, Duration::from_secs(30))
        .await;
    assert_eq!(green_done["result"], "success", "{green_done}");
    let blue_started = blue_done["steps"][0]["started_at"].as_str().unwrap().to_owned();
    let green_started = green_done["steps"][0]["started_at"].as_str().unwrap().to_owned();
    let blue_finished = blue_done["steps"][0]["finished_at"].as_str().unwrap().to_owned();
    assert!(
        blue_started < green_started && blue_finished <= green_started,
        "one build at a time"
    );

    // Each deployment's files live under its own instance directory.
    let blue_dir = std::fs::read_to_string(&blue_out).expect("blue's step ran");
    let green_dir = std::fs::read_to_string(&green_out).expect("green's step ran");
    assert!(
        blue_dir
            .trim()
            .starts_with(&root.join("blue").display().to_string()),
        "{blue_dir}"
    );
    assert!(
        green_dir
            .trim()
            .starts_with(&root.join("green").display().to_string()),
        "{green_dir}"
    );
}
