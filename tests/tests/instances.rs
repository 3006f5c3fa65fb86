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
    let api = deployment.start_masters_and_agents(&["engine-1"], &[]).await;
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

/// Starts the agent process `shared`, serving the deployments `blue` and `green`, with its
/// files under `<dir>/agent`.
fn shared_agent(dir: &std::path::Path, deployments: &[&Deployment; 2]) -> yard_tests::process::YardProcess {
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\nname = \"shared\"\nworkdir = \"{}\"\nbenchmark = 100\nlabels = {{ os = \"linux\" }}\n\n\
             [[connection]]\nurl = \"{}\"\ninstance = \"blue\"\n\n[[connection]]\nurl = \"{}\"\ninstance = \"green\"\n",
            dir.join("agent").display(),
            deployments[0].nats_url(),
            deployments[1].nats_url()
        ),
    )
    .expect("agent config");
    yard_tests::process::YardProcess::start(
        "shared",
        dir,
        &["agent", "--config", &config.display().to_string()],
    )
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
    deployment_with(instance, GATED)
}

fn deployment_with(instance: &str, builders: &str) -> (Deployment, yard_tests::api::Api) {
    let mut deployment = Deployment::new(&format!("[instance]\nid = \"{instance}\"\n{builders}"));
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
    let _agent = shared_agent(scratch.path(), &[&blue, &green]);
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
    // Each deployment's record of the agent is written on its own: blue's may trail green's.
    let blue_seen = wait_until(
        "blue to see the agent busy with its build",
        Duration::from_secs(30),
        || async {
            agent_entry(&blue_api)
                .await
                .filter(|agent| agent["busy_with"] == blue_build.as_str())
        },
    )
    .await;
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
        "one build at a time: blue ran {blue_started}..{blue_finished}, green started {green_started}"
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

/// Builders of one deployment: `tooled` runs the `tool` of toolkit `tool@VERSION`; `needs-fix`
/// runs `fix` of toolkit `fix@1`.
fn toolkit_builders(version: &str) -> String {
    format!(
        r#"
[[builder]]
name = "tooled"
agents = 'os == "linux"'
toolkits = ["tool@{version}"]
[[builder.steps]]
name = "s"
run = 'tool > "$OUT"'

[[builder]]
name = "needs-fix"
agents = 'os == "linux"'
[[builder.steps]]
name = "s"
run = 'fix'
toolkits = ["fix@1"]

[[builder]]
name = "fan-out"
agents = 'os == "linux"'
toolkits = ["both@1"]
[[builder.steps]]
name = "both"
parallel = [{{ name = "a", run = "both" }}, {{ name = "b", run = "both" }}, {{ name = "c", run = "both" }}]

[[scheduler]]
name = "force"
kind = "force"
builders = ["tooled", "needs-fix", "fan-out"]
"#
    )
}

/// A toolkit directory whose `bin/NAME` prints `NAME VERSION`.
fn toolkit_dir(parent: &std::path::Path, name: &str, version: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = parent.join(format!("{name}-{version}"));
    std::fs::create_dir_all(dir.join("bin")).expect("toolkit dir");
    let script = dir.join("bin").join(name);
    std::fs::write(&script, format!("#!/bin/sh\necho \"{name} {version}\"\n")).expect("script");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("executable");
    dir
}

fn push_toolkit(deployment: &Deployment, dir: &std::path::Path, name: &str, version: &str) {
    let output = std::process::Command::new(yard_tests::process::yard_binary())
        .args([
            "toolkit",
            "push",
            &dir.display().to_string(),
            "--name",
            name,
            "--version",
            version,
        ])
        .args(["--nats", &deployment.nats_url()])
        .env("YARD_LOG", "warn")
        .output()
        .expect("yard toolkit push runs");
    assert!(
        output.status.success(),
        "yard toolkit push failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_deployment_gets_its_own_toolkit_version_and_corruption_is_caught() {
    yard_tests::init_logging();
    let (blue, blue_api) = deployment_with("blue", &toolkit_builders("1.0"));
    let (green, green_api) = deployment_with("green", &toolkit_builders("2.0"));
    let scratch = tempfile::tempdir().expect("temp dir");
    push_toolkit(&blue, &toolkit_dir(scratch.path(), "tool", "1.0"), "tool", "1.0");
    push_toolkit(&green, &toolkit_dir(scratch.path(), "tool", "2.0"), "tool", "2.0");
    let _agent = shared_agent(scratch.path(), &[&blue, &green]);
    for api in [&blue_api, &green_api] {
        api.wait_healthy().await;
        api.wait_agents(1).await;
    }
    let (_, listed) = blue_api.get("/api/v1/toolkits").await;
    let toolkits = listed["toolkits"].as_array().expect("toolkits listed");
    assert_eq!(toolkits.len(), 1, "{listed}");
    assert_eq!(toolkits[0]["name"], "tool");
    assert_eq!(toolkits[0]["version"], "1.0");
    assert_eq!(toolkits[0]["sha256"].as_str().map(str::len), Some(64), "{listed}");

    // Both deployments at once, each with its own version of the same toolkit.
    let (blue_out, green_out) = (scratch.path().join("blue-out"), scratch.path().join("green-out"));
    let blue_build = blue_api
        .force("tooled", json!({ "OUT": blue_out.display().to_string() }))
        .await;
    let green_build = green_api
        .force("tooled", json!({ "OUT": green_out.display().to_string() }))
        .await;
    for (api, build) in [(&blue_api, &blue_build), (&green_api, &green_build)] {
        let done = api.wait_finished(build, Duration::from_secs(60)).await;
        assert_eq!(done["result"], "success", "{done}");
    }
    assert_eq!(std::fs::read_to_string(&blue_out).unwrap().trim(), "tool 1.0");
    assert_eq!(std::fs::read_to_string(&green_out).unwrap().trim(), "tool 2.0");
    for instance in ["blue", "green"] {
        let version = if instance == "blue" { "1.0" } else { "2.0" };
        let unpacked = scratch
            .path()
            .join("agent")
            .join(instance)
            .join("toolkits")
            .join(format!("tool@{version}"))
            .join("bin/tool");
        assert!(unpacked.is_file(), "{} unpacked", unpacked.display());
    }

    // Parallel steps needing the same missing toolkit share one download.
    push_toolkit(&blue, &toolkit_dir(scratch.path(), "both", "1"), "both", "1");
    let fan_out = blue_api.force("fan-out", json!({})).await;
    let done = blue_api.wait_finished(&fan_out, Duration::from_secs(60)).await;
    assert_eq!(done["result"], "success", "{done}");
    let agent_log = std::fs::read_to_string(scratch.path().join("shared.log")).unwrap_or_default();
    let downloads = agent_log
        .lines()
        .filter(|line| line.contains("fetching a toolkit") && line.contains("both@1"))
        .count();
    assert_eq!(downloads, 1, "one download for three steps:\n{agent_log}");

    // A corrupted toolkit object fails the step with a clear error, and is not kept.
    let client = async_nats::connect(blue.nats_url()).await.expect("nats");
    let store = async_nats::jetstream::new(client)
        .get_object_store("yard-toolkits")
        .await
        .expect("toolkit store");
    let tampered = async_nats::jetstream::object_store::ObjectMetadata {
        name: "fix@1".into(),
        metadata: [("sha256".to_owned(), "0".repeat(64))].into(),
        ..Default::default()
    };
    store
        .put(tampered, &mut b"not the published bytes".as_slice())
        .await
        .expect("tampered object stored");
    let broken = blue_api.force("needs-fix", json!({})).await;
    let failed = blue_api.wait_finished(&broken, Duration::from_secs(60)).await;
    assert_eq!(failed["result"], "exception", "{failed}");
    let message = failed["steps"][0]["message"].as_str().unwrap_or_default();
    assert!(message.contains("toolkit fix@1 is corrupt"), "{failed}");

    // Published properly, it is fetched again on the next use.
    push_toolkit(&blue, &toolkit_dir(scratch.path(), "fix", "1"), "fix", "1");
    let fixed = blue_api.force("needs-fix", json!({})).await;
    let done = blue_api.wait_finished(&fixed, Duration::from_secs(60)).await;
    assert_eq!(done["result"], "success", "{done}");
    assert!(blue_api.step_log(&fixed, 0).await.contains("fix 1"));
}
