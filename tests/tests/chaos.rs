//! Chaos: under steady load on a three-node NATS cluster, masters, agents and NATS nodes are
//! killed with SIGKILL and restarted at random (a NATS node only while every node is
//! current, so one is down at a time), and an agent is cut off from NATS for 30 s.
//! At the end: every accepted change has exactly one build, every build finished exactly
//! once, no step ran twice unless its agent died (then the build records a retry), no pool
//! server is held, no agent ran two builds at once, and the cut-off agent was declared lost
//! within 15 s and its build retried.
//!
//! `YARD_CHAOS_SECONDS` sets how long the kills go on (a short run by default, as in CI; set
//! it to hours locally); `YARD_CHAOS_SEED` replays the choices of an earlier run.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};
use yard_tests::api::Api;
use yard_tests::deployment::Deployment;
use yard_tests::process::YardProcess;
use yard_tests::proxy::Proxy;
use yard_tests::wait_until;

const CONFIG: &str = r#"
[engine]
claim_timeout = "3s"

[masters]
heartbeat = "1s"
dead_after = "4s"
reconcile_interval = "5s"

[[pool]]
role = "db"
servers = ["db1", "db2", "db3"]

[[builder]]
name = "work"
agents = 'role == "worker"'
retries = 10
[[builder.steps]]
name = "take"
acquire = { role = "db", as = "DB" }
[[builder.steps]]
name = "run"
run = 'echo "$YARD_BUILD_ID run" >> {dir}/effects; sleep 0.05'
[[builder.steps]]
name = "give-back"
release = { role = "db", server = "${DB}" }

[[builder]]
name = "pinned"
agents = 'role == "islander"'
retries = 3
[[builder.steps]]
name = "long"
run = 'echo "$YARD_BUILD_ID long" >> {dir}/effects; sleep 4'

[[scheduler]]
name = "main"
kind = "on-change"
branches = ["main"]
builders = ["work"]

[[scheduler]]
name = "force"
kind = "force"
builders = ["pinned"]
"#;

/// A small deterministic random source (xorshift), so that a seed replays a run.
struct Dice(u64);

impl Dice {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound.max(1)
    }

    fn millis(&mut self, from: u64, to: u64) -> Duration {
        Duration::from_millis(from + self.below(to - from))
    }
}

/// Changes the load got accepted (their ids), and the revisions of changes whose answer never
/// came (a UI master killed mid-request, an ack that timed out): those may have been stored.
/// Every post of a revision carries the revision as its `Idempotency-Key`, so a retry of one
/// in doubt is the same change, and no revision has two builds.
struct Load {
    accepted: BTreeSet<String>,
    in_doubt: BTreeSet<String>,
}

/// Posts changes to whichever UI master answers, one every `every`, until `stop`, retrying a
/// change on the next UI master until one accepts it (202: stored).
async fn post_changes(uis: Arc<Mutex<Vec<String>>>, every: Duration, stop: Arc<AtomicBool>) -> Load {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let mut accepted = BTreeSet::new();
    let mut in_doubt = BTreeSet::new();
    let mut number = 0;
    while !stop.load(Ordering::SeqCst) {
        number += 1;
        let targets = uis.lock().unwrap().clone();
        let revision = format!("rev-{number}");
        for base in targets
            .iter()
            .cycle()
            .skip(number % targets.len())
            .take(targets.len())
        {
            let response = http
                .post(format!("{base}/api/v1/changes"))
                .header("idempotency-key", &revision)
                .json(&json!({ "branch": "main", "revision": revision, "repository": "repo" }))
                .send()
                .await;
            let Ok(response) = response else {
                in_doubt.insert(revision.clone());
                continue;
            };
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            if status == 202 {
                accepted.insert(body["id"].as_str().expect("change id").to_owned());
                break;
            }
            assert_eq!(status, 503, "only 'not confirmed stored' may be retried: {body}");
            in_doubt.insert(revision.clone());
        }
        tokio::time::sleep(every).await;
    }
    Load { accepted, in_doubt }
}

/// Every build of `builder`, page by page, newest first.
async fn builds_of(api: &Api, builder: &str) -> Vec<Value> {
    let mut builds: Vec<Value> = Vec::new();
    loop {
        let before = builds
            .last()
            .map(|build| format!("&before={}", build["id"].as_str().unwrap_or_default()))
            .unwrap_or_default();
        let (_, body) = api
            .get(&format!("/api/v1/builds?builder={builder}&limit=1000{before}"))
            .await;
        let page = body["builds"].as_array().cloned().unwrap_or_default();
        if page.is_empty() {
            return builds;
        }
        builds.extend(page);
    }
}

/// Step executions per build from the side-effect file.
fn executions(deployment: &Deployment) -> BTreeMap<String, usize> {
    let text = std::fs::read_to_string(deployment.path("effects")).unwrap_or_default();
    let mut counts = BTreeMap::new();
    for line in text.lines() {
        if let Some((build, _)) = line.split_once(' ') {
            *counts.entry(build.to_owned()).or_insert(0) += 1;
        }
    }
    counts
}

/// `finished` events per build in the events stream.
async fn finished_events(nats_url: &str) -> BTreeMap<String, usize> {
    let client = async_nats::connect(nats_url).await.expect("nats");
    let jetstream = async_nats::jetstream::new(client);
    // The cluster may still be electing leaders after the last kill: ask until it answers.
    let consumer = wait_until(
        "a consumer of finished events",
        Duration::from_secs(60),
        || async {
            let stream = jetstream
                .get_stream(bus_schema::subjects::EVENTS_STREAM)
                .await
                .ok()?;
            stream
                .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
                    filter_subject: "yard.event.*.finished".into(),
                    ..Default::default()
                })
                .await
                .ok()
        },
    )
    .await;
    let mut messages = consumer.messages().await.expect("messages");
    let mut counts = BTreeMap::new();
    // Read to the end of the stream; a pause (a leader election, the consumer recreating
    // itself) is waited out until the deadline.
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        let message = match tokio::time::timeout(Duration::from_secs(2), messages.next()).await {
            Ok(Some(Ok(message))) => message,
            Ok(None) => break,
            Err(_) => continue,
            Ok(Some(Err(_))) => {
                // Errors may come back to back while the consumer recreates itself.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let build = message.subject.split('.').nth(2).unwrap_or_default().to_owned();
        *counts.entry(build).or_insert(0) += 1;
        if message.info().map(|info| info.pending == 0).unwrap_or(false) {
            break;
        }
    }
    counts
}

fn millis(value: &Value) -> Option<u64> {
    let parsed: bus_schema::Timestamp = serde_json::from_value(value.clone()).ok()?;
    Some(parsed.as_millis())
}

/// No two builds' command steps overlap on one agent (final attempts, from the API).
fn assert_one_build_per_agent(builds: &[Value]) {
    let mut by_agent: BTreeMap<String, Vec<(u64, u64, String)>> = BTreeMap::new();
    for build in builds {
        for step in build["steps"].as_array().into_iter().flatten() {
            if step["kind"] != "command" {
                continue;
            }
            let (Some(agent), Some(start), Some(end)) = (
                step["agent"].as_str(),
                millis(&step["started_at"]),
                millis(&step["finished_at"]),
            ) else {
                continue;
            };
            let id = build["id"].as_str().unwrap_or_default().to_owned();
            by_agent
                .entry(agent.to_owned())
                .or_default()
                .push((start, end, id));
        }
    }
    for (agent, mut runs) in by_agent {
        runs.sort();
        for pair in runs.windows(2) {
            let ((_, end, first), (start, _, second)) = (&pair[0], &pair[1]);
            assert!(
                start >= end || first == second,
                "agent {agent} ran builds {first} and {second} at once"
            );
        }
    }
}

/// The processes chaos picks its victims from.
#[derive(Clone, Copy, Debug)]
enum Victim {
    Master(&'static str, &'static str),
    Ui,
    Agent(&'static str),
    NatsNode(usize),
}

const VICTIMS: [Victim; 10] = [
    Victim::Master("engine", "engine-1"),
    Victim::Master("engine", "engine-2"),
    Victim::Master("scheduler", "sched-1"),
    Victim::Master("scheduler", "sched-2"),
    Victim::Ui,
    Victim::Agent("w1"),
    Victim::Agent("w2"),
    Victim::Agent("w3"),
    Victim::NatsNode(0),
    Victim::NatsNode(1),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kills_and_a_network_cut_under_load_lose_nothing_and_run_nothing_twice() {
    yard_tests::init_logging();
    let chaos_for = Duration::from_secs(
        std::env::var("YARD_CHAOS_SECONDS")
            .ok()
            .and_then(|value| value.parse().ok())
            .unwrap_or(45),
    );
    let seed = std::env::var("YARD_CHAOS_SEED")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| std::process::id() as u64 * 2_654_435_761 + 1);
    eprintln!("chaos for {chaos_for:?} with YARD_CHAOS_SEED={seed}");
    let mut dice = Dice(seed);

    let mut deployment = Deployment::on_cluster(CONFIG);
    deployment.provision().await;
    for (role, id) in [
        ("scheduler", "sched-1"),
        ("scheduler", "sched-2"),
        ("engine", "engine-1"),
        ("engine", "engine-2"),
    ] {
        deployment.master(role, id);
    }
    let stable = deployment.ui("ui-stable");
    let victim_ui = deployment.ui("ui-victim");
    for agent in ["w1", "w2", "w3"] {
        deployment.agent(agent, "role=worker");
    }
    // The islander reaches NATS only through proxies the test can cut (the cluster's nodes
    // do not advertise other addresses to clients).
    let mut proxies = Vec::new();
    for node in &deployment.nats {
        let address = node
            .url()
            .trim_start_matches("nats://")
            .parse()
            .expect("node address");
        proxies.push(Proxy::start(address).await);
    }
    let island_urls: Vec<String> = proxies.iter().map(Proxy::url).collect();
    let island_urls = island_urls.join(",");
    let config = deployment.config_path.display().to_string();
    let workdir = deployment.path("agents/islander").display().to_string();
    let mut islander = YardProcess::start(
        "islander",
        deployment.dir.path(),
        &[
            "agent",
            "--nats",
            &island_urls,
            "--config",
            &config,
            "--name",
            "islander",
            "--labels",
            "role=islander",
            "--workdir",
            &workdir,
            "--benchmark",
            "100",
        ],
    );
    stable.wait_healthy().await;
    victim_ui.wait_healthy().await;
    stable.wait_agents(4).await;

    let uis = Arc::new(Mutex::new(vec![stable.url(""), victim_ui.url("")]));
    let stop_load = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(post_changes(
        Arc::clone(&uis),
        Duration::from_millis(300),
        Arc::clone(&stop_load),
    ));

    // The cut: the islander runs a pinned build's long step when NATS disappears for it.
    let cut_window = Arc::new(AtomicBool::new(false));
    let effects = deployment.path("effects");
    let island = tokio::spawn({
        let (api, cut_window) = (stable.clone(), Arc::clone(&cut_window));
        async move {
            let build = api.force("pinned", json!({})).await;
            // Its process runs: the agent has the step (the step shows running from the
            // moment the engine stores its start, before it asks the agent).
            let started = format!("{build} long");
            wait_until(
                "the pinned step's process to run",
                Duration::from_secs(60),
                || async {
                    let text = std::fs::read_to_string(&effects).unwrap_or_default();
                    text.lines().any(|line| line == started).then_some(())
                },
            )
            .await;
            cut_window.store(true, Ordering::SeqCst);
            let cut_at = Instant::now();
            for proxy in &proxies {
                proxy.cut();
            }
            // Declared lost within 15 s: offline for the API, and the build retried.
            wait_until(
                "the cut-off agent declared offline",
                Duration::from_secs(15),
                || async {
                    let (_, agents) = api.get("/api/v1/agents").await;
                    agents["agents"]
                        .as_array()?
                        .iter()
                        .any(|agent| agent["name"] == "islander" && agent["status"] == "offline")
                        .then_some(())
                },
            )
            .await;
            let retried = api
                .wait_build(
                    &build,
                    Duration::from_secs(15).saturating_sub(cut_at.elapsed()),
                    |build| {
                        build["retries"]
                            .as_array()
                            .is_some_and(|retries| !retries.is_empty())
                    },
                )
                .await;
            let detected = cut_at.elapsed();
            cut_window.store(false, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_secs(30).saturating_sub(cut_at.elapsed())).await;
            for proxy in &proxies {
                proxy.restore();
            }
            (build, retried, detected, proxies)
        }
    });

    let started = Instant::now();
    let mut kills: BTreeMap<String, usize> = BTreeMap::new();
    while started.elapsed() < chaos_for {
        tokio::time::sleep(dice.millis(1_500, 3_500)).await;
        let victim = VICTIMS[dice.below(VICTIMS.len() as u64) as usize];
        if matches!(victim, Victim::NatsNode(_)) && cut_window.load(Ordering::SeqCst) {
            continue;
        }
        let down_for = dice.millis(300, 2_000);
        *kills.entry(format!("{victim:?}")).or_default() += 1;
        match victim {
            Victim::Master(role, id) => {
                deployment.kill(id);
                tokio::time::sleep(down_for).await;
                deployment.master(role, id);
            }
            Victim::Ui => {
                deployment.kill("ui-victim");
                tokio::time::sleep(down_for).await;
                let api = deployment.ui("ui-victim");
                uis.lock().unwrap()[1] = api.url("");
            }
            Victim::Agent(name) => {
                deployment.kill(name);
                tokio::time::sleep(down_for).await;
                deployment.agent(name, "role=worker");
            }
            Victim::NatsNode(node) => {
                // One node down at a time: the others must hold current copies first.
                deployment.wait_nats_current(Duration::from_secs(120)).await;
                deployment.nats[node].kill();
                tokio::time::sleep(down_for + Duration::from_secs(2)).await;
                deployment.nats[node].restart().expect("NATS node restarts");
            }
        }
    }
    eprintln!("kills: {kills:?}");
    stop_load.store(true, Ordering::SeqCst);
    let Load {
        accepted: changes,
        in_doubt,
    } = load.await.unwrap();
    let (pinned, retried, detected, _proxies) = island.await.unwrap();
    eprintln!(
        "{} changes accepted; the cut-off agent was declared lost after {detected:?}",
        changes.len()
    );
    assert!(!changes.is_empty(), "the load got changes accepted");

    // Everything settles: every accepted change built once, every build finished. A long run
    // leaves a backlog to work off, so what fails is a stall: no build finished for minutes.
    let mut progress = (Instant::now(), usize::MAX);
    let builds = loop {
        let builds = builds_of(&stable, "work").await;
        let unfinished: Vec<&Value> = builds
            .iter()
            .filter(|build| build["state"] != "finished")
            .collect();
        let built: BTreeSet<&str> = builds
            .iter()
            .filter_map(|build| build["changes"][0]["id"].as_str())
            .collect();
        let unbuilt = changes
            .iter()
            .filter(|change| !built.contains(change.as_str()))
            .count();
        if unbuilt == 0 && unfinished.is_empty() {
            break builds;
        }
        let left = unbuilt + unfinished.len();
        if left < progress.1 {
            progress = (Instant::now(), left);
        }
        if progress.0.elapsed() > Duration::from_secs(120) {
            let mut sample = Vec::new();
            for build in unfinished.iter().take(3) {
                sample.push(
                    stable
                        .build(build["id"].as_str().unwrap_or_default())
                        .await
                        .to_string(),
                );
            }
            panic!(
                "no build finished for 2 minutes: {} of {} builds unfinished ({} changes accepted), e.g.\n{}",
                unfinished.len(),
                builds.len(),
                changes.len(),
                sample.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let built: Vec<String> = builds
        .iter()
        .map(|build| build["changes"][0]["id"].as_str().unwrap_or_default().to_owned())
        .collect();
    let built_once: BTreeSet<String> = built.iter().cloned().collect();
    assert_eq!(built.len(), built_once.len(), "no change built twice");
    let unbuilt: Vec<&String> = changes.difference(&built_once).collect();
    assert!(
        unbuilt.is_empty(),
        "accepted changes without a build: {unbuilt:?}"
    );
    let revisions: Vec<&str> = builds
        .iter()
        .filter_map(|build| build["changes"][0]["revision"].as_str())
        .collect();
    let distinct_revisions: BTreeSet<&str> = revisions.iter().copied().collect();
    assert_eq!(
        revisions.len(),
        distinct_revisions.len(),
        "no revision built twice: a post retried with its Idempotency-Key is the same change"
    );
    // A build of a change the load never got accepted is one whose answer was lost.
    for build in &builds {
        let change = &build["changes"][0];
        let id = change["id"].as_str().unwrap_or_default();
        let revision = change["revision"].as_str().unwrap_or_default();
        assert!(
            changes.contains(id) || in_doubt.contains(revision),
            "build of change {id} ({revision}), which was neither accepted nor in doubt: {build}"
        );
    }

    let pinned = stable.wait_finished(&pinned, Duration::from_secs(120)).await;
    assert_eq!(
        pinned["result"], "success",
        "retried once the agent came back: {pinned}"
    );
    assert!(!retried["retries"].as_array().unwrap().is_empty());

    let executions = executions(&deployment);
    let all: Vec<&Value> = builds.iter().chain(std::iter::once(&pinned)).collect();
    for build in &all {
        let id = build["id"].as_str().unwrap();
        assert_eq!(build["result"], "success", "{build}\n{}", deployment.logs());
        let retries = build["retries"].as_array().map_or(0, Vec::len);
        let ran = executions.get(id).copied().unwrap_or(0);
        assert!(
            ran >= 1 && ran <= 1 + retries,
            "build {id} ran its step {ran} times with {retries} retries recorded: {build}"
        );
    }
    // The server may place the reading consumer on a node still catching up after the last
    // kill, which then ends its read early: wait until every node is current, and read the
    // whole stream again while a finished build's event is missing.
    let deadline = Instant::now() + Duration::from_secs(120);
    let finished = loop {
        deployment.wait_nats_current(Duration::from_secs(120)).await;
        let finished = finished_events(deployment.nats[2].url()).await;
        let complete = all
            .iter()
            .all(|build| finished.contains_key(build["id"].as_str().unwrap_or_default()));
        if complete || Instant::now() > deadline {
            break finished;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    for build in &all {
        let id = build["id"].as_str().unwrap();
        assert_eq!(finished.get(id), Some(&1), "build {id} finished exactly once");
    }
    // Full build records, with step times, for the occupancy check.
    let mut detailed = Vec::new();
    for build in &all {
        detailed.push(stable.build(build["id"].as_str().unwrap()).await);
    }
    assert_one_build_per_agent(&detailed);
    wait_until("every pool server free", Duration::from_secs(30), || async {
        let (_, pool) = stable.get("/api/v1/pools/db").await;
        pool["servers"]
            .as_array()?
            .iter()
            .all(|server| server["holders"].as_array().is_some_and(Vec::is_empty))
            .then_some(())
    })
    .await;
    islander.kill();
}
