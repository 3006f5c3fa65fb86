//! The agent grid for real: one build per agent, per-step agent selection, the fastest agent,
//! waiting steps in order, and deadlocks found and broken (the QuickBuild scenarios).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use yard_tests::api::Api;
use yard_tests::cluster::{AgentSpec, Cluster};
use yard_tests::wait_until;

const DEADLINE: Duration = Duration::from_secs(30);

/// A step that waits until the file `$GATE_DIR/<build id>-<name>` exists.
fn gated(name: &str) -> String {
    format!(r#"while [ ! -f "$GATE_DIR/$YARD_BUILD_ID-{name}" ]; do sleep 0.02; done; echo {name} done"#)
}

fn open_gate(dir: &Path, build: &str, name: &str) {
    std::fs::write(dir.join(format!("{build}-{name}")), "").unwrap();
}

fn agent(name: &str, labels: &[(&str, &str)], benchmark: u64) -> AgentSpec {
    let mut spec = AgentSpec::new(name);
    spec.benchmark = benchmark;
    for (key, value) in labels {
        spec.labels.insert((*key).into(), (*value).into());
    }
    spec
}

/// The seed's grid: a server node and two build agents, agent1 faster than agent2.
fn seed_grid() -> Vec<AgentSpec> {
    vec![
        agent("server", &[("role", "server")], 50),
        agent("agent1", &[("role", "agent")], 200),
        agent("agent2", &[("role", "agent")], 100),
    ]
}

fn step<'a>(build: &'a Value, path: &str) -> &'a Value {
    build["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|step| step["path"] == path)
        .unwrap_or_else(|| panic!("no step {path} in {build}"))
}

async fn step_state(api: &Api, build: &str, path: &str, state: &str) -> Value {
    api.wait_build(build, DEADLINE, |b| {
        b["steps"]
            .as_array()
            .is_some_and(|steps| steps.iter().any(|s| s["path"] == path && s["state"] == state))
    })
    .await
}

fn millis(value: &Value) -> u64 {
    let text = value.as_str().unwrap_or_else(|| panic!("not a time: {value}"));
    let parsed: bus_schema::Timestamp = serde_json::from_value(json!(text)).unwrap();
    parsed.as_millis()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn seed_scenario_master_step_on_the_fastest_agent_and_step1_on_the_server() {
    let config = format!(
        r#"
[[builder]]
name = "a"
agents = 'role == "agent"'
[[builder.steps]]
name = "step1"
agents = 'role == "server"'
run = '{}'

[[scheduler]]
name = "force"
kind = "force"
builders = ["a"]
"#,
        gated("step1")
    );
    let cluster = Cluster::start(&config, seed_grid()).await;
    let gates = cluster.path();
    let build = cluster
        .api
        .force("a", json!({ "GATE_DIR": gates.to_str().unwrap() }))
        .await;
    let running = step_state(&cluster.api, &build, "step1", "running").await;
    // The master step holds agent1, the fastest eligible agent; step1 runs on the server.
    assert_eq!(running["agent"], "agent1", "{running}");
    assert_eq!(step(&running, "step1")["agent"], "server");
    // Agents record their occupancy themselves (merged over 50 ms), so the registry may
    // trail the build's events for a moment: wait until both held agents show the build.
    let busy = wait_until("agent1 and server busy with the build", DEADLINE, || async {
        let (_, agents) = cluster.api.get("/api/v1/agents").await;
        let busy: BTreeMap<String, Value> = agents["agents"]
            .as_array()?
            .iter()
            .map(|agent| {
                (
                    agent["name"].as_str().unwrap_or_default().to_owned(),
                    agent["busy_with"].clone(),
                )
            })
            .collect();
        let holds = |name: &str| busy.get(name).and_then(Value::as_str) == Some(build.as_str());
        (holds("agent1") && holds("server")).then_some(busy)
    })
    .await;
    assert_eq!(busy["agent2"], Value::Null, "{busy:?}");
    open_gate(&gates, &build, "step1");
    let done = cluster.api.wait_finished(&build, DEADLINE).await;
    assert_eq!(done["result"], "success", "{done}");
    // Everything the build held is free again.
    cluster.api.wait_agents(3).await;
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn seed_scenario_builds_a_and_b_share_the_grid_as_written() {
    let config = format!(
        r#"
[[builder]]
name = "ab"
agents = 'role == "agent"'
[[builder.steps]]
name = "work"
parallel = [
  {{ name = "step1", agents = 'role == "server"', run = '{}' }},
  {{ name = "step2", run = 'echo step2 on $YARD_AGENT' }},
]

[[scheduler]]
name = "force"
kind = "force"
builders = ["ab"]
"#,
        gated("step1")
    );
    let cluster = Cluster::start(&config, seed_grid()).await;
    let api = &cluster.api;
    let gates = cluster.path();
    let properties = json!({ "GATE_DIR": gates.to_str().unwrap() });
    let a = api.force("ab", properties.clone()).await;
    step_state(api, &a, "work/step1", "running").await;
    let b = api.force("ab", properties).await;
    // B's master step takes agent2 (agent1 is A's); its step2 runs at once on agent2, while
    // its step1 waits for the server, which A's step1 occupies.
    let b_waiting = step_state(api, &b, "work/step1", "waiting").await;
    let reason = step(&b_waiting, "work/step1")["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(reason.contains(&format!("server (build {a})")), "{reason}");
    let b_now = api
        .wait_build(&b, DEADLINE, |build| {
            build["steps"].as_array().is_some_and(|steps| {
                steps
                    .iter()
                    .any(|s| s["path"] == "work/step2" && s["state"] == "finished")
            })
        })
        .await;
    assert_eq!(b_now["agent"], "agent2");
    assert_eq!(step(&b_now, "work/step2")["agent"], "agent2");
    assert_eq!(
        step(&b_now, "work/step1")["state"],
        "waiting",
        "B's step1 still waits for the server"
    );
    let a_now = api.build(&a).await;
    assert_eq!(a_now["agent"], "agent1");
    assert_eq!(step(&a_now, "work/step1")["agent"], "server");
    assert_eq!(step(&a_now, "work/step2")["agent"], "agent1");
    assert_eq!(step(&a_now, "work/step1")["state"], "running");

    open_gate(&gates, &a, "step1");
    let a_done = api.wait_finished(&a, DEADLINE).await;
    step_state(api, &b, "work/step1", "running").await;
    open_gate(&gates, &b, "step1");
    let b_done = api.wait_finished(&b, DEADLINE).await;
    assert_eq!(a_done["result"], "success", "{a_done}");
    assert_eq!(b_done["result"], "success", "{b_done}");
    assert_eq!(step(&b_done, "work/step1")["agent"], "server");
    // B's step1 started only once A's step1 had finished on the server.
    assert!(
        millis(&step(&b_done, "work/step1")["started_at"])
            >= millis(&step(&a_done, "work/step1")["finished_at"])
    );
    assert!(
        millis(&step(&b_done, "work/step2")["finished_at"])
            <= millis(&step(&a_done, "work/step1")["finished_at"])
    );
    cluster.stop().await;
}

/// Two builders whose master and inner steps want each other's agents, with a rendezvous so
/// that both masters hold their agent before either inner step asks for the other's.
fn deadlock_config(
    x_master: &str,
    x_inner: &str,
    y_master: &str,
    y_inner: &str,
    builds: usize,
    policy: &str,
) -> String {
    let rendezvous = format!(
        r#"touch "$MEET_DIR/$YARD_BUILD_ID"; while [ "$(ls "$MEET_DIR" | wc -l)" -lt {builds} ]; do sleep 0.02; done"#
    );
    let mut config = String::new();
    for (name, master, inner) in [("x", x_master, x_inner), ("y", y_master, y_inner)] {
        config.push_str(&format!(
            r#"
[[builder]]
name = "{name}"
agents = '{master}'
deadlock = "{policy}"
[[builder.steps]]
name = "meet"
run = '{rendezvous}'
[[builder.steps]]
name = "step1"
agents = '{inner}'
run = "echo step1 on $YARD_AGENT"
"#
        ));
    }
    config.push_str("\n[[scheduler]]\nname = \"force\"\nkind = \"force\"\nbuilders = [\"x\", \"y\"]\n");
    config
}

async fn force_in_order(api: &Api, builders: &[&str], properties: &Value) -> Vec<String> {
    let mut ids = Vec::new();
    for builder in builders {
        ids.push(api.force(builder, properties.clone()).await);
        // Distinct request times, so "newest" is well defined.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    ids
}

/// Builds x and y, deadlocked on agent1 and agent2 under `policy`; returns the cluster and
/// the two build ids, oldest first.
async fn single_agent_deadlock(policy: &str) -> (Cluster, Vec<String>) {
    let config = deadlock_config(
        r#"name == "agent1""#,
        r#"name == "agent2""#,
        r#"name == "agent2""#,
        r#"name == "agent1""#,
        2,
        policy,
    );
    let agents = vec![agent("agent1", &[], 100), agent("agent2", &[], 100)];
    let cluster = Cluster::start(&config, agents).await;
    let meet = cluster.path().join("meet");
    std::fs::create_dir_all(&meet).unwrap();
    let properties = json!({ "MEET_DIR": meet.to_str().unwrap() });
    let ids = force_in_order(&cluster.api, &["x", "y"], &properties).await;
    (cluster, ids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deadlock_between_single_agents_is_broken_by_failing_the_newest_build() {
    let (cluster, ids) = single_agent_deadlock("fail-newest").await;
    let (a, b) = (&ids[0], &ids[1]);
    let b_done = cluster.api.wait_finished(b, DEADLINE).await;
    let a_done = cluster.api.wait_finished(a, DEADLINE).await;
    assert_eq!(b_done["result"], "deadlock", "the newest build ends: {b_done}");
    assert_eq!(a_done["result"], "success", "the other goes on: {a_done}");
    let message = b_done["message"].as_str().unwrap();
    for name in [a.as_str(), b.as_str(), "agent1", "agent2"] {
        assert!(
            message.contains(name),
            "the message names the whole cycle ({name}): {message}"
        );
    }
    assert_eq!(step(&a_done, "step1")["agent"], "agent2");
    let log = cluster.api.step_log(b, 1).await;
    assert!(log.contains("deadlock") && log.contains(a.as_str()), "{log}");
    cluster.api.wait_agents(2).await;
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deadlock_between_agent_groups_is_broken_too() {
    let config = deadlock_config(
        r#"group == "1""#,
        r#"group == "2""#,
        r#"group == "2""#,
        r#"group == "1""#,
        4,
        "fail-newest",
    );
    let agents = vec![
        agent("g1a", &[("group", "1")], 100),
        agent("g1b", &[("group", "1")], 100),
        agent("g2a", &[("group", "2")], 100),
        agent("g2b", &[("group", "2")], 100),
    ];
    let cluster = Cluster::start(&config, agents).await;
    let meet = cluster.path().join("meet");
    std::fs::create_dir_all(&meet).unwrap();
    let ids = force_in_order(
        &cluster.api,
        &["x", "x", "y", "y"],
        &json!({ "MEET_DIR": meet.to_str().unwrap() }),
    )
    .await;
    let mut results = Vec::new();
    for id in &ids {
        results.push(cluster.api.wait_finished(id, DEADLINE).await["result"].clone());
    }
    assert_eq!(
        results,
        vec![
            json!("success"),
            json!("success"),
            json!("success"),
            json!("deadlock")
        ]
    );
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_the_wait_policy_a_deadlock_is_only_reported() {
    let (cluster, ids) = single_agent_deadlock("wait").await;
    let graph = wait_until("the deadlock to show in /api/v1/waits", DEADLINE, || async {
        let (_, body) = cluster.api.get("/api/v1/waits").await;
        (body["deadlocks"].as_array()?.len() == 1).then_some(body)
    })
    .await;
    let mut group: Vec<String> = graph["deadlocks"][0]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_str().unwrap().to_owned())
        .collect();
    group.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(group, expected);
    assert_eq!(graph["waits"].as_array().unwrap().len(), 2, "{graph}");
    // Both wait past their master step, so both are listed, and nothing is left out.
    assert_eq!(graph["more"], 0, "{graph}");
    // Nothing is ended: both still wait, until someone cancels one; then the other goes on.
    for id in &ids {
        let build = cluster.api.build(id).await;
        assert_eq!(build["state"], "running", "{build}");
    }
    let (status, _) = cluster
        .api
        .post(&format!("/api/v1/builds/{}/cancel", ids[1]), Value::Null)
        .await;
    assert_eq!(status, 202);
    assert_eq!(
        cluster.api.wait_finished(&ids[1], DEADLINE).await["result"],
        "cancelled"
    );
    assert_eq!(
        cluster.api.wait_finished(&ids[0], DEADLINE).await["result"],
        "success"
    );
    cluster.api.wait_agents(2).await;
    cluster.stop().await;
}

#[test]
fn nested_selections_that_can_deadlock_are_warned_about() {
    let config = deadlock_config(
        r#"name == "agent1""#,
        r#"name == "agent2""#,
        r#"name == "agent2""#,
        r#"name == "agent1""#,
        2,
        "fail-newest",
    );
    let config = services::YardConfig::from_toml(Some(&config), "test", Vec::new()).unwrap();
    config.validate().unwrap();
    let warnings = config.deadlock_warnings();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    for part in [r#""x""#, r#""y""#, r#"name == "agent1""#, r#"name == "agent2""#] {
        assert!(warnings[0].contains(part), "{part} missing from {}", warnings[0]);
    }
    let groups = deadlock_config(
        r#"group == "1""#,
        r#"group == "2""#,
        r#"group == "2""#,
        r#"group == "1""#,
        4,
        "wait",
    );
    let config = services::YardConfig::from_toml(Some(&groups), "test", Vec::new()).unwrap();
    assert_eq!(config.deadlock_warnings().len(), 1);
    // Selections that cannot wait for each other in a cycle raise nothing.
    let safe = deadlock_config(
        r#"name == "agent1""#,
        r#"name == "agent2""#,
        r#"name == "agent3""#,
        r#"name == "agent2""#,
        2,
        "wait",
    );
    let config = services::YardConfig::from_toml(Some(&safe), "test", Vec::new()).unwrap();
    assert!(
        config.deadlock_warnings().is_empty(),
        "{:?}",
        config.deadlock_warnings()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_fastest_idle_agent_wins_and_waiting_builds_go_in_priority_then_request_order() {
    let config = format!(
        r#"
[[builder]]
name = "quick"
[[builder.steps]]
name = "run"
run = "echo on $YARD_AGENT"

[[builder]]
name = "solo"
agents = 'name == "slow"'
[[builder.steps]]
name = "run"
run = '{}'

[[scheduler]]
name = "force"
kind = "force"
builders = ["quick", "solo"]
"#,
        gated("run")
    );
    let agents = vec![
        agent("slow", &[], 100),
        agent("fast", &[], 300),
        agent("middle", &[], 200),
    ];
    let cluster = Cluster::start(&config, agents).await;
    let api = &cluster.api;
    let gates = cluster.path();
    let quick = api.force("quick", json!({})).await;
    assert_eq!(api.wait_finished(&quick, DEADLINE).await["agent"], "fast");

    let properties = json!({ "GATE_DIR": gates.to_str().unwrap() });
    let first = api.force("solo", properties.clone()).await;
    step_state(api, &first, "run", "running").await;
    let low_early = api.force_with_priority("solo", properties.clone(), 0).await;
    let high = api.force_with_priority("solo", properties.clone(), 5).await;
    let low_late = api.force_with_priority("solo", properties.clone(), 0).await;
    for id in [&low_early, &high, &low_late] {
        api.wait_build(id, DEADLINE, |build| build["state"] == "waiting")
            .await;
    }
    // Open each gate as its build starts; record the order in which they start.
    let mut order = Vec::new();
    open_gate(&gates, &first, "run");
    for _ in 0..3 {
        let next = wait_until("the next waiting build to start", DEADLINE, || async {
            for id in [&low_early, &high, &low_late] {
                if !order.contains(id) && api.build(id).await["steps"][0]["state"] == "running" {
                    return Some(id.clone());
                }
            }
            None
        })
        .await;
        open_gate(&gates, &next, "run");
        order.push(next);
    }
    assert_eq!(order, vec![high, low_early, low_late]);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_build_per_agent_under_two_engines_and_no_idle_agent_while_work_waits() {
    let config = r#"
[[builder]]
name = "par"
[[builder.steps]]
name = "both"
parallel = [
  { name = "left", run = "sleep 0.05" },
  { name = "right", run = "sleep 0.05" },
]
[[builder.steps]]
name = "after"
run = "true"

[[scheduler]]
name = "force"
kind = "force"
builders = ["par"]
"#;
    let agents: Vec<AgentSpec> = (1..=6).map(|n| agent(&format!("a{n}"), &[], 100)).collect();
    let cluster = Cluster::start_with_engines(config, agents, 2).await;
    let api = &cluster.api;
    let ids: Vec<String> = futures::future::join_all((0..200).map(|_| api.force("par", json!({})))).await;
    let mut builds = Vec::new();
    for id in &ids {
        builds.push(api.wait_finished(id, Duration::from_secs(120)).await);
    }
    let engines: std::collections::BTreeSet<&str> =
        builds.iter().map(|b| b["engine"].as_str().unwrap()).collect();
    assert_eq!(engines.len(), 2, "both engines ran builds");
    // Each build's time on its agent, from its first step's start to its last step's end.
    let mut holds: BTreeMap<String, Vec<(u64, u64, String)>> = BTreeMap::new();
    for build in &builds {
        assert_eq!(build["result"], "success", "{build}");
        let steps = build["steps"].as_array().unwrap();
        for step in steps {
            assert_eq!(
                step["agent"], build["agent"],
                "every step ran on the build's agent: {build}"
            );
        }
        let start = steps.iter().map(|s| millis(&s["started_at"])).min().unwrap();
        let end = steps.iter().map(|s| millis(&s["finished_at"])).max().unwrap();
        holds
            .entry(build["agent"].as_str().unwrap().to_owned())
            .or_default()
            .push((start, end, build["id"].as_str().unwrap().to_owned()));
    }
    for (agent, intervals) in &mut holds {
        intervals.sort();
        for pair in intervals.windows(2) {
            assert!(
                pair[0].1 <= pair[1].0,
                "agent {agent} ran steps of builds {} and {} at once",
                pair[0].2,
                pair[1].2
            );
        }
    }
    // No agent stayed idle while a build waited: every gap between two builds on an agent is
    // short (the time to hand the agent over), unless no build was waiting then.
    const HANDOVER_MS: u64 = 500;
    for (agent, intervals) in &holds {
        for pair in intervals.windows(2) {
            let (gap_start, gap_end) = (pair[0].1, pair[1].0);
            if gap_end - gap_start <= HANDOVER_MS {
                continue;
            }
            let waiting = builds.iter().find(|build| {
                let requested = millis(&build["requested_at"]);
                let started = millis(&build["started_at"]);
                requested + HANDOVER_MS < gap_start && started > gap_end
            });
            assert!(
                waiting.is_none(),
                "agent {agent} idle from {gap_start} to {gap_end} while {} waited",
                waiting.unwrap()["id"]
            );
        }
    }
    cluster.stop().await;
}
