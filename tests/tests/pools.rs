//! Resource pools for real: servers acquired and released by role across two engines,
//! global and role scope, first come first served, and release whatever ends the build.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};
use yard_tests::api::Api;
use yard_tests::cluster::{AgentSpec, Cluster};
use yard_tests::deployment::Deployment;
use yard_tests::wait_until;

const DEADLINE: Duration = Duration::from_secs(60);

const CONFIG: &str = r#"
[engine]
claim_timeout = "3s"
agent_timeout = "5s"

[[pool]]
role = "testers"
servers = ["s1", "s2", "s3"]

[[pool]]
role = "red"
servers = ["shared"]

[[pool]]
role = "blue"
servers = ["shared"]

[[builder]]
name = "uses-a-tester"
[[builder.steps]]
name = "take"
acquire = { role = "testers", as = "SERVER" }
[[builder.steps]]
name = "work"
run = 'echo "$SERVER start $(date +%s%3N) $YARD_BUILD_ID" >> "$DIR/effects"; sleep 0.3; echo "$SERVER end $(date +%s%3N) $YARD_BUILD_ID" >> "$DIR/effects"'
[[builder.steps]]
name = "give-back"
release = { role = "testers", server = "${SERVER}" }

[[builder]]
name = "red-role"
[[builder.steps]]
name = "take"
acquire = { role = "red", as = "SERVER", scope = "role" }
[[builder.steps]]
name = "wait"
run = 'while [ ! -f "$DIR/$YARD_BUILD_ID" ]; do sleep 0.02; done'

[[builder]]
name = "blue-role"
[[builder.steps]]
name = "take"
acquire = { role = "blue", as = "SERVER", scope = "role" }
[[builder.steps]]
name = "wait"
run = 'while [ ! -f "$DIR/$YARD_BUILD_ID" ]; do sleep 0.02; done'

[[builder]]
name = "red-global"
[[builder.steps]]
name = "take"
acquire = { role = "red", as = "SERVER", scope = "global" }

[[builder]]
name = "fails-holding"
[[builder.steps]]
name = "take"
acquire = { role = "testers", as = "SERVER" }
[[builder.steps]]
name = "fail"
run = "exit 1"

[[builder]]
name = "releases-nothing"
[[builder.steps]]
name = "give-back"
release = { role = "testers", server = "not-mine" }

[[scheduler]]
name = "force"
kind = "force"
builders = ["uses-a-tester", "red-role", "blue-role", "red-global", "fails-holding", "releases-nothing"]
"#;

fn millis(value: &Value) -> u64 {
    let parsed: bus_schema::Timestamp = serde_json::from_value(value.clone()).unwrap();
    parsed.as_millis()
}

/// The builds holding each server of `role`, from the pools API.
async fn holders(api: &Api, role: &str) -> BTreeMap<String, Vec<String>> {
    let (status, pool) = api.get(&format!("/api/v1/pools/{role}")).await;
    assert_eq!(status, 200, "{pool}");
    pool["servers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|server| {
            let builds = server["holders"]
                .as_array()
                .unwrap()
                .iter()
                .map(|holder| holder["build"].as_str().unwrap().to_owned())
                .collect();
            (server["server"].as_str().unwrap().to_owned(), builds)
        })
        .collect()
}

async fn wait_all_free(api: &Api, role: &str) {
    wait_until(
        &format!("every server of {role} to be free"),
        DEADLINE,
        || async { holders(api, role).await.values().all(Vec::is_empty).then_some(()) },
    )
    .await;
}

/// Forces a `red-role` build gated on a file in the returned directory and waits until it
/// holds `red`'s one server and runs its gated step; returns the directory, the build id and
/// the running build.
async fn red_role_running(deployment: &Deployment, api: &Api) -> (std::path::PathBuf, String, Value) {
    let dir = deployment.path("gates");
    std::fs::create_dir_all(&dir).unwrap();
    let build = api
        .force("red-role", json!({ "DIR": dir.to_str().unwrap() }))
        .await;
    let running = api
        .wait_build(&build, DEADLINE, |b| b["steps"][1]["state"] == "running")
        .await;
    assert_eq!(holders(api, "red").await["shared"], vec![build.clone()]);
    (dir, build, running)
}

async fn start() -> Cluster {
    start_with_agents(4).await
}

async fn start_with_agents(count: usize) -> Cluster {
    let agents = (1..=count).map(|n| AgentSpec::new(&format!("a{n}"))).collect();
    Cluster::start_with_engines(CONFIG, agents, 2).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_builds_share_three_servers_first_come_first_served() {
    // An agent for every build, so that builds queue for the pool, not for agents.
    let cluster = start_with_agents(10).await;
    let api = &cluster.api;
    let dir = cluster.path();
    let mut ids = Vec::new();
    for _ in 0..10 {
        ids.push(
            api.force("uses-a-tester", json!({ "DIR": dir.to_str().unwrap() }))
                .await,
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut builds = Vec::new();
    for id in &ids {
        let build = api.wait_finished(id, DEADLINE).await;
        assert_eq!(build["result"], "success", "{build}");
        builds.push(build);
    }
    // From the steps' own records: never two holders of one server at once, never more than
    // three holders in all.
    let text = std::fs::read_to_string(dir.join("effects")).unwrap();
    let mut events: Vec<(u64, i32, String)> = Vec::new();
    let mut per_server: BTreeMap<String, Vec<(u64, String, String)>> = BTreeMap::new();
    for line in text.lines() {
        let parts: Vec<&str> = line.split(' ').collect();
        let (server, what, at, build) = (parts[0], parts[1], parts[2].parse::<u64>().unwrap(), parts[3]);
        events.push((at, if what == "start" { 1 } else { -1 }, build.to_owned()));
        per_server
            .entry(server.to_owned())
            .or_default()
            .push((at, what.to_owned(), build.to_owned()));
    }
    assert_eq!(events.len(), 20);
    events.sort_by_key(|(at, delta, _)| (*at, *delta));
    let mut holding = 0;
    for (_, delta, _) in &events {
        holding += delta;
        assert!(holding <= 3, "more than three holders at once");
    }
    for (server, mut uses) in per_server {
        uses.sort();
        for pair in uses.chunks(2) {
            assert_eq!(
                (pair[0].1.as_str(), pair[1].1.as_str()),
                ("start", "end"),
                "server {server} handed out twice: {uses:?}"
            );
            assert_eq!(pair[0].2, pair[1].2);
        }
    }
    // First come, first served: builds acquired their server in the order they asked.
    let acquired: Vec<u64> = builds
        .iter()
        .map(|build| millis(&build["steps"][0]["finished_at"]))
        .collect();
    let mut sorted = acquired.clone();
    sorted.sort();
    assert_eq!(acquired, sorted, "servers were not handed out in request order");
    assert!(builds.iter().all(|b| b["properties"]["SERVER"]
        .as_str()
        .is_some_and(|s| s.starts_with('s'))));
    wait_all_free(api, "testers").await;
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn role_scope_shares_a_server_across_roles_and_global_scope_does_not() {
    let cluster = start().await;
    let api = &cluster.api;
    let dir = cluster.path();
    let properties = json!({ "DIR": dir.to_str().unwrap() });
    let red = api.force("red-role", properties.clone()).await;
    let blue = api.force("blue-role", properties.clone()).await;
    // The same server, acquired for two roles at once.
    for id in [&red, &blue] {
        api.wait_build(id, DEADLINE, |b| b["steps"][1]["state"] == "running")
            .await;
        assert_eq!(api.build(id).await["properties"]["SERVER"], "shared");
    }
    let (_, pool) = api.get("/api/v1/pools/red").await;
    let red_holders = pool["servers"][0]["holders"].as_array().unwrap().clone();
    assert_eq!(red_holders.len(), 2, "{pool}");
    // A global acquisition needs the server held by nobody: it waits for both.
    let global = api.force("red-global", properties.clone()).await;
    let waiting = api
        .wait_build(&global, DEADLINE, |b| b["steps"][0]["state"] == "waiting")
        .await;
    assert!(
        waiting["steps"][0]["message"]
            .as_str()
            .unwrap()
            .contains("pool red"),
        "{waiting}"
    );
    // The step says it waits as it joins the queue; the queue shows it a moment later.
    wait_until("the global build in the red queue", DEADLINE, || async {
        let (_, pool) = api.get("/api/v1/pools/red").await;
        (pool["queue"][0]["build"] == global.as_str()).then_some(())
    })
    .await;
    std::fs::write(dir.join(&red), "").unwrap();
    api.wait_finished(&red, DEADLINE).await;
    assert_eq!(
        api.build(&global).await["state"],
        "running",
        "still held for blue"
    );
    std::fs::write(dir.join(&blue), "").unwrap();
    api.wait_finished(&blue, DEADLINE).await;
    let done = api.wait_finished(&global, DEADLINE).await;
    assert_eq!(done["result"], "success");
    wait_all_free(api, "red").await;
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn releasing_a_server_not_held_warns_and_failure_or_cancel_release_everything() {
    let cluster = start().await;
    let api = &cluster.api;
    let dir = cluster.path();
    let nothing = api.force("releases-nothing", json!({})).await;
    let build = api.wait_finished(&nothing, DEADLINE).await;
    assert_eq!(build["result"], "success");
    let log = api.step_log(&nothing, 0).await;
    assert!(log.contains("warning") && log.contains("not-mine"), "{log}");

    let failing = api.force("fails-holding", json!({})).await;
    assert_eq!(api.wait_finished(&failing, DEADLINE).await["result"], "failure");
    wait_all_free(api, "testers").await;

    let held = api
        .force("red-role", json!({ "DIR": dir.to_str().unwrap() }))
        .await;
    api.wait_build(&held, DEADLINE, |b| b["steps"][1]["state"] == "running")
        .await;
    assert_eq!(holders(api, "red").await["shared"], vec![held.clone()]);
    let (status, _) = api
        .post(&format!("/api/v1/builds/{held}/cancel"), Value::Null)
        .await;
    assert_eq!(status, 202);
    assert_eq!(api.wait_finished(&held, DEADLINE).await["result"], "cancelled");
    wait_all_free(api, "red").await;

    // Pools change at run time through the API.
    let (status, body) = api
        .put_json("/api/v1/pools/testers", json!({ "servers": ["s9"] }))
        .await;
    assert_eq!(status, 200, "{body}");
    let one = api
        .force("uses-a-tester", json!({ "DIR": dir.to_str().unwrap() }))
        .await;
    let build = api.wait_finished(&one, DEADLINE).await;
    assert_eq!(build["properties"]["SERVER"], "s9");
    let (status, _) = api
        .put_json("/api/v1/pools/bad%20role", json!({ "servers": [] }))
        .await;
    assert_eq!(status, 400);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_engines_server_goes_back_when_its_build_ends() {
    yard_tests::init_logging();
    let mut deployment = Deployment::new(CONFIG);
    // The scheduler master stores forced builds.
    let api = deployment
        .start_masters_and_agents(&["engine-1", "engine-2"], &[("a1", "os=linux")])
        .await;
    let (dir, build, running) = red_role_running(&deployment, &api).await;
    let engine = running["engine"].as_str().unwrap().to_owned();
    deployment.kill(&engine);
    // The other engine adopts the build; when it ends, the server goes back.
    api.wait_build(&build, DEADLINE, |b| {
        b["claimed_by"].as_array().is_some_and(|c| c.len() == 2)
    })
    .await;
    std::fs::write(dir.join(&build), "").unwrap();
    let done = api.wait_finished(&build, DEADLINE).await;
    assert_eq!(done["result"], "success", "{done}");
    assert_ne!(done["engine"], engine.as_str());
    wait_all_free(&api, "red").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pool_wait_takes_part_in_deadlock_detection() {
    let meet = r#"touch "$MEET_DIR/$YARD_BUILD_ID"; while [ "$(ls "$MEET_DIR" | wc -l)" -lt 2 ]; do sleep 0.02; done"#;
    let config = format!(
        r#"
[[pool]]
role = "single"
servers = ["only"]

[[builder]]
name = "p"
agents = 'name == "agent1"'
[[builder.steps]]
name = "take"
acquire = {{ role = "single", as = "SERVER" }}
[[builder.steps]]
name = "meet"
run = '{meet}'
[[builder.steps]]
name = "step1"
agents = 'name == "agent2"'
run = "echo on agent2"

[[builder]]
name = "q"
agents = 'name == "agent2"'
[[builder.steps]]
name = "meet"
run = '{meet}'
[[builder.steps]]
name = "take"
acquire = {{ role = "single", as = "SERVER" }}

[[scheduler]]
name = "force"
kind = "force"
builders = ["p", "q"]
"#
    );
    let agents = vec![AgentSpec::new("agent1"), AgentSpec::new("agent2")];
    let cluster = Cluster::start(&config, agents).await;
    let api = &cluster.api;
    let dir = cluster.path().join("meet");
    std::fs::create_dir_all(&dir).unwrap();
    let properties = json!({ "MEET_DIR": dir.to_str().unwrap() });
    let p = api.force("p", properties.clone()).await;
    api.wait_build(&p, DEADLINE, |b| b["steps"][0]["state"] == "finished")
        .await;
    let q = api.force("q", properties).await;
    // p holds the server and waits for agent2; q holds agent2 and waits for the server.
    let q_done = api.wait_finished(&q, DEADLINE).await;
    let p_done = api.wait_finished(&p, DEADLINE).await;
    assert_eq!(q_done["result"], "deadlock", "{q_done}");
    assert_eq!(p_done["result"], "success", "{p_done}");
    let message = q_done["message"].as_str().unwrap();
    assert!(
        message.contains("pool single") && message.contains(p.as_str()),
        "{message}"
    );
    wait_all_free(api, "single").await;
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retried_build_keeps_the_server_its_first_attempt_took() {
    yard_tests::init_logging();
    let mut deployment = Deployment::new(CONFIG);
    let agents = [("a1", "os=linux"), ("a2", "os=linux")];
    let api = deployment.start_masters_and_agents(&["engine-1"], &agents).await;
    // `red` has one server: a second acquisition by the same step would wait for itself.
    let (dir, build, running) = red_role_running(&deployment, &api).await;
    let agent = running["steps"][1]["agent"].as_str().unwrap().to_owned();
    deployment.kill(&agent);
    // The agent is lost; the next attempt takes the step's server again, not a second one.
    let retried = api
        .wait_build(&build, DEADLINE, |b| {
            b["retries"].as_array().is_some_and(|r| r.len() == 1) && b["steps"][1]["state"] == "running"
        })
        .await;
    assert_ne!(retried["steps"][1]["agent"], agent.as_str(), "{retried}");
    assert_eq!(holders(&api, "red").await["shared"], vec![build.clone()]);
    std::fs::write(dir.join(&build), "").unwrap();
    let done = api.wait_finished(&build, DEADLINE).await;
    assert_eq!(done["result"], "success", "{done}");
    wait_all_free(&api, "red").await;
}
