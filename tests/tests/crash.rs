//! Crash safety: after SIGKILL of every process (the nats-server, every master, every agent)
//! and a restart, the API shows the same builds, steps and logs as before.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};
use yard_tests::api::Api;
use yard_tests::deployment::Deployment;
use yard_tests::wait_until;

const CONFIG: &str = r#"
[[builder]]
name = "work"
[[builder.steps]]
name = "greet"
run = 'echo "hello from $YARD_BUILD_ID"; seq 1 200'
[[builder.steps]]
name = "maybe-fail"
run = 'echo "checking $N"; test "$N" != 3'

[[scheduler]]
name = "force"
kind = "force"
builders = ["work"]
"#;

const DEADLINE: Duration = Duration::from_secs(60);

/// What the API shows of every build: the listing, each build, and each step's log.
async fn everything(api: &Api) -> BTreeMap<String, Value> {
    let (status, listing) = api.get("/api/v1/builds?limit=1000").await;
    assert_eq!(status, 200, "{listing}");
    let mut seen = BTreeMap::new();
    for build in listing["builds"].as_array().unwrap() {
        let id = build["id"].as_str().unwrap().to_owned();
        let detail = api.build(&id).await;
        let mut logs = Vec::new();
        for index in 0..detail["steps"].as_array().map_or(0, Vec::len) {
            logs.push(api.step_log(&id, index).await);
        }
        seen.insert(id, json!({ "listed": build, "build": detail, "logs": logs }));
    }
    seen
}

fn start_processes(deployment: &mut Deployment, generation: u32) -> Api {
    deployment.master("scheduler", &format!("sched-{generation}"));
    deployment.master("engine", &format!("engine-{generation}"));
    for agent in ["a1", "a2"] {
        deployment.agent(agent, "os=linux");
    }
    deployment.ui(&format!("ui-{generation}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_kill_9_of_every_process_the_api_shows_the_same_builds_steps_and_logs() {
    yard_tests::init_logging();
    let mut deployment = Deployment::new(CONFIG);
    let api = start_processes(&mut deployment, 1);
    api.wait_healthy().await;
    api.wait_agents(2).await;
    let mut builds = Vec::new();
    for n in 1..=6 {
        builds.push(api.force("work", json!({ "N": n.to_string() })).await);
    }
    for build in &builds {
        api.wait_finished(build, DEADLINE).await;
    }
    let before = everything(&api).await;
    assert_eq!(before.len(), 6);
    // The listing pages: two at a time, each page older than the last, all six in the end.
    let mut paged: Vec<String> = Vec::new();
    loop {
        let after = paged.last().map(|id| format!("&before={id}")).unwrap_or_default();
        let (_, page) = api.get(&format!("/api/v1/builds?limit=2{after}")).await;
        let ids: Vec<String> = page["builds"]
            .as_array()
            .unwrap()
            .iter()
            .map(|build| build["id"].as_str().unwrap().to_owned())
            .collect();
        if ids.is_empty() {
            break;
        }
        assert!(ids.len() <= 2, "{page}");
        paged.extend(ids);
    }
    let mut newest_first: Vec<String> = before.keys().cloned().collect();
    newest_first.reverse();
    assert_eq!(paged, newest_first);
    let results: Vec<&Value> = before.values().map(|seen| &seen["build"]["result"]).collect();
    assert!(results.contains(&&json!("failure")) && results.contains(&&json!("success")));
    assert!(
        before
            .values()
            .all(|seen| seen["logs"][0].as_str().unwrap().contains("200")),
        "every first step logged its lines"
    );

    // Everything dies at once: no process gets to flush or say goodbye.
    for name in ["sched-1", "engine-1", "ui-1", "a1", "a2"] {
        deployment.kill(name);
    }
    for node in &mut deployment.nats {
        node.kill();
    }
    for node in &mut deployment.nats {
        node.restart().expect("nats-server restarts on its data");
    }
    deployment.provision().await;
    let api = start_processes(&mut deployment, 2);
    api.wait_healthy().await;
    wait_until(
        "the restarted UI master to show every build",
        DEADLINE,
        || async {
            let (_, listing) = api.get("/api/v1/builds?limit=1000").await;
            (listing["builds"].as_array()?.len() >= before.len()).then_some(())
        },
    )
    .await;
    let after = everything(&api).await;
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>(),
        "the same builds"
    );
    for (id, seen) in &before {
        assert_eq!(&after[id], seen, "build {id} reads the same after the crash");
    }
    // And the restarted system still works.
    api.wait_agents(2).await;
    let build = api.force("work", json!({ "N": "7" })).await;
    assert_eq!(api.wait_finished(&build, DEADLINE).await["result"], "success");
}
