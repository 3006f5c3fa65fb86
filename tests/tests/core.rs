//! The core path, for real: changes and forced builds run on agents over a real nats-server,
//! with every role as its own process, all in one `yard up` process, and in-process.

use std::path::Path;
use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};
use yard_tests::api::Api;
use yard_tests::cluster::{AgentSpec, Cluster};
use yard_tests::process::YardProcess;
use yard_tests::{start_nats, wait_until};

const DEADLINE: Duration = Duration::from_secs(30);

const CONFIG: &str = r#"
[[builder]]
name = "two-steps"
[[builder.steps]]
name = "compile"
run = 'echo "compiling $YARD_REVISION on $YARD_BRANCH"'
[[builder.steps]]
name = "test"
run = 'echo "tests passed"; echo "a warning" >&2'

[[builder]]
name = "fails"
[[builder.steps]]
name = "first"
run = "echo first"
[[builder.steps]]
name = "broken"
run = "echo boom; exit 3"
[[builder.steps]]
name = "never"
run = "echo never"

[[builder]]
name = "sleeper"
[[builder.steps]]
name = "sleep"
run = 'sleep 300 & echo $! > "$PID_DIR/background.pid"; echo $$ > "$PID_DIR/shell.pid"; sleep 300'
timeout = "1s"

[[builder]]
name = "cancellable"
[[builder.steps]]
name = "sleep"
run = 'sleep 300 & echo $! > "$PID_DIR/background.pid"; echo $$ > "$PID_DIR/shell.pid"; sleep 300'

[[builder]]
name = "echo-property"
[[builder.steps]]
name = "write"
run = 'printf "%s" "$MESSAGE" > "$OUT_FILE"'

[[builder]]
name = "windows-only"
agents = 'os == "windows"'
[[builder.steps]]
name = "build"
run = "echo never runs"

[[scheduler]]
name = "main-only"
kind = "on-change"
branches = ["main"]
builders = ["two-steps"]

[[scheduler]]
name = "force"
kind = "force"
builders = ["two-steps", "fails", "sleeper", "cancellable", "echo-property", "windows-only"]
"#;

fn linux_agent(name: &str) -> AgentSpec {
    let mut spec = AgentSpec::new(name);
    spec.labels.insert("os".into(), "linux".into());
    spec
}

/// Posts a change on `branch` and returns its id.
async fn post_change(api: &Api, branch: &str, revision: &str) -> String {
    let (status, body) = api
        .post(
            "/api/v1/changes",
            json!({
                "repository": "https://example.com/repo.git",
                "branch": branch,
                "revision": revision,
                "author": "Ada <ada@example.com>",
                "comments": "a change",
                "files": ["src/lib.rs"],
                "project": "yard",
            }),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    body["id"].as_str().expect("change id").to_owned()
}

/// Waits for the build a change caused and returns its id.
async fn build_of_change(api: &Api, change: &str) -> String {
    wait_until(&format!("a build of change {change}"), DEADLINE, || async {
        let (_, body) = api.get(&format!("/api/v1/builds?change={change}")).await;
        body["builds"].as_array()?.first()?["id"]
            .as_str()
            .map(str::to_owned)
    })
    .await
}

/// Checks a finished two-step build and its logs.
async fn assert_two_step_success(api: &Api, build_id: &str, revision: &str) {
    let build = api.wait_finished(build_id, DEADLINE).await;
    assert_eq!(build["result"], "success", "{build}");
    assert_eq!(build["builder"], "two-steps");
    assert!(build["number"].as_u64().unwrap() >= 1);
    let steps = build["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 2);
    for (step, name) in steps.iter().zip(["compile", "test"]) {
        assert_eq!(step["name"], name);
        assert_eq!(step["state"], "finished");
        assert_eq!(step["result"], "success");
        assert_eq!(step["exit_code"], 0);
        assert!(step["agent"].is_string());
        assert!(step["started_at"].is_string() && step["finished_at"].is_string());
    }
    let compile_log = api.step_log(build_id, 0).await;
    assert!(
        compile_log.contains(&format!("compiling {revision} on main")),
        "{compile_log}"
    );
    let test_log = api.step_log(build_id, 1).await;
    assert!(
        test_log.contains("tests passed") && test_log.contains("a warning"),
        "{test_log}"
    );
}

fn process_is_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // A killed child of a reaped parent may linger as a zombie until init reaps it.
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_role_as_its_own_process() {
    yard_tests::init_logging();
    let dir = tempfile::tempdir().unwrap();
    let nats = start_nats(dir.path());
    let config_path = dir.path().join("yard.toml");
    std::fs::write(&config_path, CONFIG).unwrap();
    let config = config_path.to_str().unwrap();
    let port = yard_tests::free_port();
    let http = format!("127.0.0.1:{port}");
    let workdir = dir.path().join("agent");
    let logs = dir.path();
    let mut roles = [
        YardProcess::start(
            "scheduler",
            logs,
            &["scheduler", "--nats", nats.url(), "--config", config],
        ),
        YardProcess::start(
            "engine",
            logs,
            &["engine", "--nats", nats.url(), "--config", config],
        ),
        YardProcess::start(
            "ui",
            logs,
            &["ui", "--nats", nats.url(), "--config", config, "--http", &http],
        ),
        YardProcess::start(
            "agent",
            logs,
            &[
                "agent",
                "--nats",
                nats.url(),
                "--config",
                config,
                "--name",
                "linux-1",
                "--labels",
                "os=linux,arch=x86_64",
                "--workdir",
                workdir.to_str().unwrap(),
                "--benchmark",
                "42",
            ],
        ),
    ];
    let api = Api::new(format!("http://{http}"));
    api.wait_healthy().await;
    api.wait_agents(1).await;
    let (_, agents) = api.get("/api/v1/agents").await;
    let agent = &agents["agents"][0];
    assert_eq!(agent["name"], "linux-1");
    assert_eq!(agent["labels"]["os"], "linux");
    assert_eq!(agent["benchmark"], 42);

    let change = post_change(&api, "main", "f00dfeed").await;
    let build_id = build_of_change(&api, &change).await;
    assert_two_step_success(&api, &build_id, "f00dfeed").await;
    let build = api.build(&build_id).await;
    assert_eq!(build["changes"][0]["id"], change.as_str());
    assert_eq!(build["steps"][0]["agent"], "linux-1");

    // SIGTERM shuts every role down cleanly.
    for role in roles.iter_mut().rev() {
        let status = role.terminate();
        assert!(
            status.success(),
            "{} exited with {status}: {}",
            role.log.display(),
            role.log_text()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn yard_up_runs_everything_in_one_process() {
    yard_tests::init_logging();
    let dir = tempfile::tempdir().unwrap();
    let http = format!("127.0.0.1:{}", yard_tests::free_port());
    let data_dir = dir.path().join("data");
    // No --nats and no --config: a private nats-server and the bundled demo configuration.
    let mut up = YardProcess::start(
        "up",
        dir.path(),
        &[
            "up",
            "--agents",
            "2",
            "--http",
            &http,
            "--data-dir",
            data_dir.to_str().unwrap(),
            "--benchmark",
            "10",
        ],
    );
    let api = Api::new(format!("http://{http}"));
    api.wait_healthy().await;
    api.wait_agents(2).await;
    let (status, builders) = api.get("/api/v1/builders").await;
    assert_eq!(status, 200);
    assert_eq!(builders["builders"][0]["name"], "demo");
    assert_eq!(builders["builders"][0]["forceable"], true);

    let (status, forced) = api.post("/api/v1/builders/demo/force", Value::Null).await;
    assert_eq!(status, 202, "{forced}");
    let build_id = forced["id"].as_str().unwrap().to_owned();
    // The build exists from the moment it is requested.
    let (status, _) = api.get(&format!("/api/v1/builds/{build_id}")).await;
    assert_eq!(status, 200);
    let build = api.wait_finished(&build_id, DEADLINE).await;
    assert_eq!(build["result"], "success", "{build}");
    assert_eq!(build["steps"].as_array().unwrap().len(), 2);
    assert!(api.step_log(&build_id, 1).await.contains("all tests passed"));

    let status = up.terminate();
    assert!(
        status.success(),
        "yard up exited with {status}: {}",
        up.log_text()
    );
    // The private nats-server went with it.
    let ports_dir = data_dir.join("nats/ports");
    let leftover = std::fs::read_dir(&ports_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            name.strip_prefix("nats-server_")?
                .strip_suffix(".ports")?
                .parse::<u32>()
                .ok()
        })
        .find(|pid| !process_is_gone(*pid));
    assert_eq!(leftover, None, "nats-server child still running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn changes_on_a_matching_branch_build_and_others_do_not() {
    let cluster = Cluster::start(CONFIG, vec![linux_agent("a1")]).await;
    let api = &cluster.api;
    let ignored = post_change(api, "feature/x", "0badc0de").await;
    let change = post_change(api, "main", "c0ffee").await;
    let build_id = build_of_change(api, &change).await;
    assert_two_step_success(api, &build_id, "c0ffee").await;

    // Once the scheduler has worked through both changes, only the main one has a build.
    let bus = services::Bus::connect(&cluster.config.nats, &cluster.config.engine, "test")
        .await
        .unwrap();
    let stream = bus.stream(bus_schema::subjects::CHANGES_STREAM).await.unwrap();
    wait_until("the scheduler to acknowledge both changes", DEADLINE, || async {
        let consumer: async_nats::jetstream::consumer::PullConsumer = stream
            .get_consumer(&bus_schema::subjects::scheduler_consumer("main-only"))
            .await
            .ok()?;
        let info = consumer.get_info().await.ok()?;
        (info.num_pending == 0 && info.num_ack_pending == 0 && info.delivered.stream_sequence >= 2)
            .then_some(())
    })
    .await;
    let (_, builds) = api.get("/api/v1/builds").await;
    assert_eq!(builds["builds"].as_array().unwrap().len(), 1, "{builds}");
    let (_, ignored_builds) = api.get(&format!("/api/v1/builds?change={ignored}")).await;
    assert_eq!(ignored_builds["builds"], json!([]));
    let (_, changes) = api.get("/api/v1/changes").await;
    let ids: Vec<&str> = changes["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![change.as_str(), ignored.as_str()], "newest first");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_step_fails_the_build_and_skips_the_rest() {
    let cluster = Cluster::start(CONFIG, vec![linux_agent("a1")]).await;
    let api = &cluster.api;
    let build_id = api.force("fails", json!({})).await;
    let build = api.wait_finished(&build_id, DEADLINE).await;
    assert_eq!(build["result"], "failure", "{build}");
    let steps = build["steps"].as_array().unwrap();
    assert_eq!(steps[0]["result"], "success");
    assert_eq!(steps[1]["result"], "failure");
    assert_eq!(steps[1]["exit_code"], 3);
    assert_eq!(steps[2]["state"], "skipped");
    assert_eq!(steps[2]["result"], Value::Null);
    assert!(build["message"].as_str().unwrap().contains("broken"), "{build}");
    assert!(api.step_log(&build_id, 1).await.contains("boom"));
    // The agent is free again.
    api.wait_agents(1).await;
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_timeout_kills_the_whole_process_group() {
    let cluster = Cluster::start(CONFIG, vec![linux_agent("a1")]).await;
    let api = &cluster.api;
    let pid_dir = cluster.path().join("pids");
    std::fs::create_dir_all(&pid_dir).unwrap();
    let build_id = api
        .force("sleeper", json!({ "PID_DIR": pid_dir.to_str().unwrap() }))
        .await;
    let build = api.wait_finished(&build_id, DEADLINE).await;
    assert_eq!(build["result"], "failure", "{build}");
    assert_eq!(build["steps"][0]["result"], "timeout");
    assert!(build["steps"][0]["message"]
        .as_str()
        .unwrap()
        .contains("timed out after 1s"));
    for file in ["shell.pid", "background.pid"] {
        let pid = read_pid(&pid_dir.join(file)).expect("the step wrote its pids");
        wait_until(&format!("{file} process to be killed"), DEADLINE, || async move {
            process_is_gone(pid).then_some(())
        })
        .await;
    }
    assert!(api.step_log(&build_id, 0).await.contains("timed out"));
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_kills_the_whole_process_group() {
    let cluster = Cluster::start(CONFIG, vec![linux_agent("a1")]).await;
    let api = &cluster.api;
    let pid_dir = cluster.path().join("pids");
    std::fs::create_dir_all(&pid_dir).unwrap();
    let build_id = api
        .force("cancellable", json!({ "PID_DIR": pid_dir.to_str().unwrap() }))
        .await;
    let background = wait_until("the step to start its background child", DEADLINE, || async {
        read_pid(&pid_dir.join("background.pid"))
    })
    .await;
    let shell = wait_until("the step shell pid", DEADLINE, || async {
        read_pid(&pid_dir.join("shell.pid"))
    })
    .await;
    let (status, body) = api
        .post(&format!("/api/v1/builds/{build_id}/cancel"), Value::Null)
        .await;
    assert_eq!(status, 202, "{body}");
    let build = api.wait_finished(&build_id, DEADLINE).await;
    assert_eq!(build["result"], "cancelled", "{build}");
    assert_eq!(build["steps"][0]["result"], "cancelled");
    for pid in [shell, background] {
        wait_until("the cancelled step's processes to die", DEADLINE, || async move {
            process_is_gone(pid).then_some(())
        })
        .await;
    }
    // Cancelling a finished build is a conflict, not an error.
    let (status, _) = api
        .post(&format!("/api/v1/builds/{build_id}/cancel"), Value::Null)
        .await;
    assert_eq!(status, 409);
    api.wait_agents(1).await;
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn properties_are_environment_variables_never_shell_text() {
    let cluster = Cluster::start(CONFIG, vec![linux_agent("a1")]).await;
    let api = &cluster.api;
    let out_file = cluster.path().join("out.txt");
    let canary = cluster.path().join("pwned");
    let message = format!(
        "$(touch {canary}) `touch {canary}`; touch {canary} && echo \"quoted\" 'single' $HOME | cat",
        canary = canary.display()
    );
    let build_id = api
        .force(
            "echo-property",
            json!({ "MESSAGE": message, "OUT_FILE": out_file.to_str().unwrap() }),
        )
        .await;
    let build = api.wait_finished(&build_id, DEADLINE).await;
    assert_eq!(build["result"], "success", "{build}");
    assert_eq!(build["properties"]["MESSAGE"], message.as_str());
    assert_eq!(std::fs::read_to_string(&out_file).unwrap(), message);
    assert!(!canary.exists(), "a property was executed as shell text");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_build_without_an_eligible_agent_waits_with_a_reason() {
    let cluster = Cluster::start(CONFIG, vec![linux_agent("a1")]).await;
    let api = &cluster.api;
    let build_id = api.force("windows-only", json!({})).await;
    let build = api
        .wait_build(&build_id, DEADLINE, |build| build["state"] == "waiting")
        .await;
    let reason = build["message"].as_str().unwrap();
    assert!(
        reason.contains(r#"no registered agent matches os == "windows""#),
        "{reason}"
    );
    // Cancelling a waiting build ends it without running anything.
    let (status, _) = api
        .post(&format!("/api/v1/builds/{build_id}/cancel"), Value::Null)
        .await;
    assert_eq!(status, 202);
    let build = api.wait_finished(&build_id, DEADLINE).await;
    assert_eq!(build["result"], "cancelled");
    assert_eq!(build["steps"][0]["state"], "skipped");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_requests_get_clear_errors() {
    let cluster = Cluster::start(CONFIG, vec![linux_agent("a1")]).await;
    let api = &cluster.api;
    let (status, body) = api.post_raw("/api/v1/changes", "{not json").await;
    assert_eq!(status, 400);
    assert!(
        body["error"].as_str().unwrap().contains("malformed JSON"),
        "{body}"
    );
    let (status, body) = api.post("/api/v1/changes", json!({ "revision": "abc" })).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = api
        .post("/api/v1/changes", json!({ "branch": "main", "colour": "red" }))
        .await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("colour"), "{body}");
    let (status, _) = api.post("/api/v1/builders/nope/force", Value::Null).await;
    assert_eq!(status, 404);
    let (status, body) = api
        .post(
            "/api/v1/builders/two-steps/force",
            json!({ "properties": { "1bad": "x" } }),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = api.get("/api/v1/builds/01NOSUCHBUILD").await;
    assert_eq!(status, 404);
    let (status, _) = api.get("/api/v1/builds?state=sleeping").await;
    assert_eq!(status, 400);
    let forced = api.force("two-steps", json!({})).await;
    let (status, _) = api.get(&format!("/api/v1/builds/{forced}/steps/9/log")).await;
    assert_eq!(status, 404);

    // Garbage on an agent's work subject is refused with a reason; the agent keeps working.
    let client = async_nats::connect(cluster.nats.url()).await.unwrap();
    let reply = client
        .request(bus_schema::subjects::agent_commands("a1"), "garbage".into())
        .await
        .unwrap();
    let reply: bus_schema::AgentReply = bus_schema::decode(&reply.payload).unwrap();
    assert!(
        matches!(reply, bus_schema::AgentReply::Refused { .. }),
        "{reply:?}"
    );
    let build = api.wait_finished(&forced, DEADLINE).await;
    assert_eq!(build["result"], "success");
    cluster.stop().await;
}

#[test]
fn bad_configuration_exits_with_the_file_key_and_problem() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.toml");
    std::fs::write(
        &path,
        "[[builder]]\nname = \"b\"\nagents = 'os = \"linux\"'\n[[builder.steps]]\nname = \"s\"\nrun = \"true\"\n",
    )
    .unwrap();
    let mut engine = YardProcess::start(
        "engine",
        dir.path(),
        &[
            "engine",
            "--config",
            path.to_str().unwrap(),
            "--nats",
            "nats://127.0.0.1:1",
        ],
    );
    let status = engine.wait();
    assert!(!status.success());
    let log = engine.log_text();
    assert!(
        log.contains("broken.toml") && log.contains("builder[0].agents") && log.contains("column 4"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reading_back_a_builds_events_creates_no_consumer() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = start_nats(dir.path());
    let nats = services::config::NatsConfig {
        url: server.url().to_owned(),
        ..Default::default()
    };
    let bus = services::Bus::connect(&nats, &Default::default(), "test")
        .await
        .expect("connects and provisions");
    // Every consumer-creating call on the bus, seen as the server sees it.
    let mut consumer_calls = bus
        .client
        .subscribe("$JS.API.CONSUMER.CREATE.>")
        .await
        .expect("subscribes");

    // More events than one direct-get batch holds, interleaved with another build's.
    let (wanted, other) = ("b-wanted", "b-other");
    let mut acks = Vec::new();
    for index in 0..2_500u32 {
        for (build, kind) in [(wanted, "step_log"), (other, "step_log")] {
            let payload = format!("{build} {index}");
            acks.push(
                bus.jetstream
                    .publish(bus_schema::subjects::event(build, kind), payload.into())
                    .await
                    .expect("published"),
            );
        }
        if acks.len() >= 200 {
            for ack in acks.drain(..) {
                ack.await.expect("stored");
            }
        }
    }
    for ack in acks {
        ack.await.expect("stored");
    }

    let mut readers = Vec::new();
    for _ in 0..50 {
        let bus = bus.clone();
        readers.push(tokio::spawn(async move {
            bus.read_all(
                bus_schema::subjects::EVENTS_STREAM,
                &bus_schema::subjects::events_of_build(wanted),
            )
            .await
            .expect("read back")
        }));
    }
    for reader in readers {
        let messages = reader.await.expect("reader ran");
        let payloads: Vec<String> = messages
            .iter()
            .map(|message| String::from_utf8_lossy(&message.payload).into_owned())
            .collect();
        let expected: Vec<String> = (0..2_500).map(|index| format!("{wanted} {index}")).collect();
        assert_eq!(payloads, expected);
    }
    let missing = bus
        .read_all(
            bus_schema::subjects::EVENTS_STREAM,
            &bus_schema::subjects::events_of_build("b-none"),
        )
        .await
        .expect("an empty read is no error");
    assert!(missing.is_empty());

    // A stream no replica answers direct gets on (as when replicas are behind, or a stream
    // created before reads used them): the stream leader answers instead, message by message.
    bus.jetstream
        .create_stream(async_nats::jetstream::stream::Config {
            name: "PLAIN".into(),
            subjects: vec!["plain.>".into()],
            ..Default::default()
        })
        .await
        .expect("stream created");
    for index in 0..30 {
        for build in ["b1", "b2"] {
            bus.jetstream
                .publish(
                    format!("plain.{build}.{index}"),
                    format!("{build} {index}").into(),
                )
                .await
                .expect("published")
                .await
                .expect("stored");
        }
    }
    let plain = bus
        .read_all("PLAIN", "plain.b1.>")
        .await
        .expect("read from the leader");
    let payloads: Vec<String> = plain
        .iter()
        .map(|message| String::from_utf8_lossy(&message.payload).into_owned())
        .collect();
    assert_eq!(
        payloads,
        (0..30).map(|index| format!("b1 {index}")).collect::<Vec<_>>()
    );

    bus.client.flush().await.expect("flushed");
    let created = tokio::time::timeout(Duration::from_millis(200), consumer_calls.next()).await;
    assert!(
        created.is_err(),
        "a read created a consumer: {:?}",
        created.ok().flatten().map(|m| m.subject)
    );
}

/// Every step end of a build, as stored: (step index, result, exit code), in stream order,
/// whether a message of its own or carried by a later event of the build.
async fn stored_step_ends(
    bus: &services::Bus,
    build_id: &str,
) -> Vec<(u32, bus_schema::StepResult, Option<i32>)> {
    let messages = bus
        .read_all(
            bus_schema::subjects::EVENTS_STREAM,
            &bus_schema::subjects::events_of_build(build_id),
        )
        .await
        .expect("read back");
    let mut ends = Vec::new();
    for message in messages {
        let event: bus_schema::BuildEvent = bus_schema::decode(&message.payload).expect("an event");
        let kinds = event.earlier.into_iter().map(|earlier| earlier.kind);
        for kind in kinds.chain([event.kind]) {
            if let bus_schema::BuildEventKind::StepFinished {
                index,
                result,
                exit_code,
                ..
            } = kind
            {
                ends.push((index, result, exit_code));
            }
        }
    }
    ends
}

/// The agent hands each step's end to the engine that asked for the step, which stores it
/// (with the build's next event) and says so: every step end is handed over, and stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agents_hand_step_ends_to_their_engine_which_stores_each_once() {
    let cluster = Cluster::start(CONFIG, vec![linux_agent("a1")]).await;
    let bus = services::Bus::connect(&cluster.config.nats, &cluster.config.engine, "test")
        .await
        .expect("connects");
    // Listens beside the engine (its only one, `engine-1`) to what agents hand it.
    let mut handed = bus
        .client
        .subscribe(bus_schema::subjects::engine_step_ends("engine-1"))
        .await
        .expect("subscribes");
    let build = cluster.api.force("two-steps", json!({})).await;
    let finished = cluster.api.wait_finished(&build, DEADLINE).await;
    assert_eq!(finished["result"], "success", "{finished}");
    let mut handed_steps = Vec::new();
    while handed_steps.len() < 2 {
        let message = tokio::time::timeout(DEADLINE, handed.next())
            .await
            .expect("step ends handed over in time")
            .expect("subscription open");
        let event: bus_schema::BuildEvent = bus_schema::decode(&message.payload).expect("a step end");
        assert_eq!(event.build_id, build);
        match event.kind {
            bus_schema::BuildEventKind::StepFinished { index, .. } => handed_steps.push(index),
            other => panic!("not a step end: {other:?}"),
        }
    }
    handed_steps.sort_unstable();
    assert_eq!(handed_steps, [0, 1]);
    let success = bus_schema::StepResult::Success;
    let mut ends = stored_step_ends(&bus, &build).await;
    ends.sort_unstable_by_key(|end| end.0);
    assert_eq!(ends, [(0, success, Some(0)), (1, success, Some(0))]);
    cluster.stop().await;
}

/// A step end the named engine does not take (it drives no such build, or nothing answers
/// there) is stored by the agent itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_step_end_no_engine_takes_is_stored_by_its_agent() {
    let cluster = Cluster::start(CONFIG, vec![linux_agent("a1")]).await;
    let bus = services::Bus::connect(&cluster.config.nats, &cluster.config.engine, "test")
        .await
        .expect("connects");
    let cases = [
        (
            "01HDECLINEDDECLINEDDECLINED",
            bus_schema::subjects::engine_step_ends("engine-1"),
        ),
        (
            "01HNORESPONDERNORESPONDERNO",
            bus_schema::subjects::engine_step_ends("engine-gone"),
        ),
    ];
    for (build_id, report_to) in cases {
        let assignment = bus_schema::StepAssignment {
            toolkits: Vec::new(),
            build_id: build_id.to_owned(),
            builder: "two-steps".into(),
            index: 0,
            attempt: 0,
            name: "exit".into(),
            command: "exit 4".into(),
            env: Default::default(),
            timeout_ms: None,
            masked: Vec::new(),
            require_session: None,
            release_after: true,
            report_to: Some(report_to),
        };
        let command = bus_schema::AgentCommand::RunStep(Box::new(assignment));
        let reply = bus
            .client
            .request(
                bus_schema::subjects::agent_commands("a1"),
                bus_schema::encode(&command).into(),
            )
            .await
            .expect("the agent answers");
        let reply: bus_schema::AgentReply = bus_schema::decode(&reply.payload).expect("a reply");
        assert!(
            matches!(reply, bus_schema::AgentReply::Accepted { .. }),
            "{reply:?}"
        );
        let ends = wait_until(&format!("the step end of {build_id}"), DEADLINE, || async {
            let ends = stored_step_ends(&bus, build_id).await;
            (!ends.is_empty()).then_some(ends)
        })
        .await;
        assert_eq!(ends, [(0, bus_schema::StepResult::Failure, Some(4))]);
    }
    cluster.stop().await;
}
