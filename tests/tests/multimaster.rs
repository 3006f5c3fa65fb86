//! Multi-master for real: separate scheduler, engine and UI processes and agents sharing one
//! NATS deployment; masters killed with SIGKILL, drained, upgraded; a NATS node killed.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};
use yard_tests::api::Api;
use yard_tests::deployment::Deployment;
use yard_tests::wait_until;

const CONFIG: &str = r#"
[engine]
claim_timeout = "3s"
agent_timeout = "5s"

[masters]
heartbeat = "1s"
dead_after = "4s"
reconcile_interval = "5s"

[[builder]]
name = "work"
[[builder.steps]]
name = "prepare"
run = 'echo "$YARD_BUILD_ID prepare" >> {dir}/effects'
[[builder.steps]]
name = "run"
run = 'echo "$YARD_BUILD_ID run" >> {dir}/effects; sleep 0.1'

[[builder]]
name = "slow"
[[builder.steps]]
name = "run"
run = 'echo "$YARD_BUILD_ID slow" >> {dir}/effects; sleep 2'

[[scheduler]]
name = "main"
kind = "on-change"
branches = ["main"]
builders = ["work"]

[[scheduler]]
name = "force"
kind = "force"
builders = ["work", "slow"]
"#;

/// Posts `count` changes on main through the given UIs (round robin), retrying answers that
/// say nothing was confirmed stored (503 while NATS elects a leader) with the same
/// `Idempotency-Key`, so a retry of a change that was stored after all is that change.
/// Returns the accepted change ids.
async fn post_changes(uis: &[Api], count: usize) -> BTreeSet<String> {
    futures::stream::iter(0..count)
        .map(|n| {
            let api = uis[n % uis.len()].clone();
            async move {
                wait_until("a change to be accepted", Duration::from_secs(60), || async {
                    let (status, body) = api
                        .post_with_key(
                            "/api/v1/changes",
                            json!({ "branch": "main", "revision": format!("rev-{n}"), "repository": "repo" }),
                            &format!("rev-{n}"),
                        )
                        .await;
                    if status == 202 {
                        body["id"].as_str().map(str::to_owned)
                    } else {
                        assert_eq!(status, 503, "only 'not stored' may be retried: {body}");
                        None
                    }
                })
                .await
            }
        })
        .buffer_unordered(16)
        .collect()
        .await
}

/// Forces `count` builds of `work`; returns their ids.
async fn force_builds(api: &Api, count: usize) -> Vec<String> {
    futures::stream::iter(0..count)
        .map(|_| {
            let api = api.clone();
            async move { api.force("work", json!({})).await }
        })
        .buffer_unordered(16)
        .collect()
        .await
}

async fn all_builds(api: &Api) -> Vec<Value> {
    let (_, body) = api.get("/api/v1/builds?builder=work&limit=1000").await;
    body["builds"].as_array().cloned().unwrap_or_default()
}

/// Waits until `count` builds exist and all are finished; returns them.
async fn wait_all_finished(api: &Api, count: usize, deadline: Duration) -> Vec<Value> {
    let started = std::time::Instant::now();
    loop {
        let builds = all_builds(api).await;
        let unfinished: Vec<&Value> = builds
            .iter()
            .filter(|build| build["state"] != "finished")
            .collect();
        if builds.len() >= count && unfinished.is_empty() {
            return builds;
        }
        if started.elapsed() > deadline {
            let sample: Vec<String> = unfinished.iter().take(5).map(|build| build.to_string()).collect();
            panic!(
                "timed out after {deadline:?} waiting for {count} finished builds: {} builds, {} unfinished, e.g.\n{}\n{}",
                builds.len(),
                unfinished.len(),
                sample.join("\n"),
                stall_report(api).await
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What the masters think of the agents and the waits, and each live master's own figures
/// (engines' running builds and waits, UI views' applied sequence): to tell a stuck engine
/// from a stuck agent or a stale view.
async fn stall_report(api: &Api) -> String {
    let (_, agents) = api.get("/api/v1/agents").await;
    let (_, waits) = api.get("/api/v1/waits").await;
    let waits: String = waits.to_string().chars().take(4000).collect();
    let mut report = format!("agents: {agents}\nwaits (first 4,000 characters): {waits}\n");
    let (_, masters) = api.get("/api/v1/masters").await;
    for master in masters["masters"].as_array().into_iter().flatten() {
        let (Some(id), Some(url)) = (master["id"].as_str(), master["metrics_url"].as_str()) else {
            continue;
        };
        let metrics = match reqwest::get(url).await {
            Ok(response) => response.text().await.unwrap_or_default(),
            Err(error) => error.to_string(),
        };
        let figures: Vec<&str> = metrics
            .lines()
            .filter(|line| {
                !line.starts_with('#')
                    && (line.starts_with("yard_engine_")
                        || line.starts_with("yard_ui_view_events_sequence")
                        || line.starts_with("yard_request_queue_length"))
            })
            .collect();
        report.push_str(&format!("{id}: {}\n", figures.join(", ")));
    }
    report
}

async fn finished_count(api: &Api) -> usize {
    all_builds(api)
        .await
        .iter()
        .filter(|build| build["state"] == "finished")
        .count()
}

/// Step executions per (build id, step) from the side-effect file.
fn executions(deployment: &Deployment) -> BTreeMap<(String, String), usize> {
    let text = std::fs::read_to_string(deployment.path("effects")).unwrap_or_default();
    let mut counts = BTreeMap::new();
    for line in text.lines() {
        if let Some((build, step)) = line.split_once(' ') {
            *counts.entry((build.to_owned(), step.to_owned())).or_insert(0) += 1;
        }
    }
    counts
}

/// Forces a `slow` build and waits until its step's process runs; returns the build id and
/// the step's key in [`executions`].
async fn force_slow_until_its_step_runs(deployment: &Deployment, ui: &Api) -> (String, (String, String)) {
    let id = ui.force("slow", json!({})).await;
    let step = (id.clone(), "slow".to_owned());
    wait_until("the step's process to run", Duration::from_secs(60), || async {
        executions(deployment).contains_key(&step).then_some(())
    })
    .await;
    (id, step)
}

/// Every build succeeded, and every step of every build ran exactly once.
fn assert_exactly_once(deployment: &Deployment, builds: &[Value]) {
    let counts = executions(deployment);
    for build in builds {
        assert_eq!(build["result"], "success", "{build}\n{}", deployment.logs());
        assert_eq!(
            build["retries"],
            json!([]),
            "no agent died, so nothing is retried: {build}"
        );
        let id = build["id"].as_str().unwrap();
        for step in ["prepare", "run"] {
            assert_eq!(
                counts.get(&(id.to_owned(), step.to_owned())),
                Some(&1),
                "build {id} step {step} must run exactly once"
            );
        }
    }
    assert_eq!(
        counts.len(),
        builds.len() * 2,
        "no step ran for a build the API does not show"
    );
}

/// The master currently holding the lease of scheduler `main`.
async fn lease_holder(deployment: &Deployment) -> Option<String> {
    let client = async_nats::connect(deployment.nats_url().split(',').next().unwrap())
        .await
        .ok()?;
    let jetstream = async_nats::jetstream::new(client);
    let leases = jetstream
        .get_key_value(bus_schema::subjects::LEASES_BUCKET)
        .await
        .ok()?;
    let value = leases
        .get(bus_schema::subjects::scheduler_consumer("main"))
        .await
        .ok()??;
    let lease: bus_schema::LeaseRecord = bus_schema::decode(&value).ok()?;
    Some(lease.holder)
}

async fn master_state(api: &Api, id: &str) -> Option<String> {
    let (_, body) = api.get("/api/v1/masters").await;
    body["masters"]
        .as_array()?
        .iter()
        .find(|master| master["id"] == id)
        .map(|master| master["state"].as_str().unwrap_or_default().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_an_engine_and_a_scheduler_loses_nothing_and_runs_nothing_twice() {
    yard_tests::init_logging();
    let mut deployment = Deployment::new(CONFIG);
    for id in ["sched-1", "sched-2"] {
        deployment.master("scheduler", id);
    }
    for id in ["engine-1", "engine-2", "engine-3"] {
        deployment.master("engine", id);
    }
    let uis = vec![deployment.ui("ui-1"), deployment.ui("ui-2")];
    for agent in ["a1", "a2", "a3", "a4"] {
        deployment.agent(agent, "os=linux");
    }
    for api in &uis {
        api.wait_healthy().await;
    }
    uis[0].wait_agents(4).await;
    // Every master registers, and the UI master's view of the registry fills in.
    let masters = wait_until("seven masters registered", Duration::from_secs(30), || async {
        let (_, masters) = uis[1].get("/api/v1/masters").await;
        (masters["masters"].as_array()?.len() == 7).then_some(masters)
    })
    .await;
    assert_eq!(masters["conflicts"], json!([]));

    let posting = tokio::spawn({
        let uis = uis.clone();
        async move { post_changes(&uis, 500).await }
    });
    wait_until("some builds to finish", Duration::from_secs(120), || async {
        (finished_count(&uis[0]).await >= 60).then_some(())
    })
    .await;
    let holder = wait_until("a scheduler lease holder", Duration::from_secs(20), || {
        lease_holder(&deployment)
    })
    .await;
    deployment.kill("engine-1");
    deployment.kill(&holder);
    let changes = posting.await.unwrap();
    assert_eq!(changes.len(), 500);

    let builds = wait_all_finished(&uis[0], 500, Duration::from_secs(300)).await;
    assert_eq!(builds.len(), 500, "one build per change, none twice");
    let built_changes: BTreeSet<String> = builds
        .iter()
        .map(|build| build["changes"][0]["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(built_changes, changes, "every accepted change has its build");
    assert_exactly_once(&deployment, &builds);
    let adopted: Vec<&Value> = builds
        .iter()
        .filter(|build| build["claimed_by"].as_array().unwrap().len() > 1)
        .collect();
    assert!(!adopted.is_empty(), "the killed engine's builds were adopted");
    for build in &adopted {
        assert_eq!(build["claimed_by"][0], "engine-1", "{build}");
        assert_ne!(build["engine"], "engine-1");
    }
    // The other UI master serves the same builds from its own view.
    let other_view = wait_all_finished(&uis[1], 500, Duration::from_secs(30)).await;
    assert_eq!(other_view.len(), 500);
    let new_holder = lease_holder(&deployment).await.unwrap();
    assert_ne!(new_holder, holder);
    assert_eq!(master_state(&uis[0], "engine-1").await.as_deref(), Some("dead"));
}

/// An engine and the agent running its build's step die together. The restarted agent has
/// forgotten the step, so the engine adopting the build must not simply ask it to run the step
/// again, nor hand it to another agent: the step's second run is a new attempt, recorded as a
/// retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_step_that_died_with_its_engine_and_agent_runs_again_only_as_a_retry() {
    yard_tests::init_logging();
    let mut deployment = Deployment::new(CONFIG);
    let ui = deployment
        .start_masters_and_agents(&["engine-1"], &[("a1", "os=linux")])
        .await;
    let (id, step) = force_slow_until_its_step_runs(&deployment, &ui).await;
    // A faster idle agent, which the directory would pick for the adopted build.
    deployment.agent_with_args("a2", "os=linux", &["--benchmark", "500"]);
    ui.wait_agents(1).await;
    deployment.kill("engine-1");
    deployment.kill("a1");
    deployment.agent("a1", "os=linux");
    ui.wait_agents(2).await;
    deployment.master("engine", "engine-2");

    let build = ui.wait_finished(&id, Duration::from_secs(120)).await;
    assert_eq!(build["result"], "success", "{build}\n{}", deployment.logs());
    assert_eq!(build["claimed_by"], json!(["engine-1", "engine-2"]), "{build}");
    let retries = build["retries"].as_array().unwrap();
    assert_eq!(retries.len(), 1, "the second run is a recorded retry: {build}");
    let reason = retries[0]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("agent a1 restarted"), "{build}");
    assert_eq!(executions(&deployment).get(&step), Some(&2), "{build}");
}

/// A bus client of the private nats-server `nats`, as a master connects (creating what is
/// missing).
async fn bus_on(nats: &yard_tests::NatsServer, client_name: &str) -> services::Bus {
    let mut config = services::config::YardConfig::default();
    config.nats.url = nats.url().to_owned();
    services::Bus::connect(&config.nats, &config.engine, client_name)
        .await
        .expect("bus connects")
}

/// A stream follower (engines' step results, UI views) keeps a consumer that is quiet only
/// because its filter matches nothing new: a new filtered consumer would make the server scan
/// every message stored since the last match. It replaces a consumer the server no longer has
/// (an ordered consumer can stall without a word when a NATS node fails over), resuming right
/// after the last message applied: nothing skipped, nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_quiet_stream_follower_keeps_a_sound_consumer_and_replaces_a_lost_one() {
    yard_tests::init_logging();
    let dir = tempfile::tempdir().unwrap();
    let nats = yard_tests::start_nats(dir.path());
    let bus = bus_on(&nats, "follower-test").await;
    let mut consumer_checks = bus
        .client
        .subscribe(format!(
            "$JS.API.CONSUMER.INFO.{}.>",
            bus_schema::subjects::EVENTS_STREAM
        ))
        .await
        .expect("subscribes to consumer info requests");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let stop = tokio_util::sync::CancellationToken::new();
    let ready = services::watch::follow_stream(
        bus.clone(),
        bus_schema::subjects::EVENTS_STREAM,
        Some(bus_schema::subjects::STEP_FINISHED_ALL),
        services::watch::StreamStart::New,
        Duration::from_millis(300),
        stop.clone(),
        move |sequence, subject, _payload| {
            let _ = tx.send((sequence, subject.to_owned()));
        },
    );
    ready.await.expect("the follower starts");
    let consumers = || async {
        let stream = bus.stream(bus_schema::subjects::EVENTS_STREAM).await.ok()?;
        let names: Vec<String> = stream
            .consumer_names()
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()
            .ok()?;
        Some(names.into_iter().collect::<BTreeSet<String>>())
    };
    let store = |build: &'static str, kind: bus_schema::BuildEventKind| {
        let bus = bus.clone();
        async move {
            let event = bus_schema::BuildEvent::new(build, services::time::now(), kind);
            bus.store_built_event(&event).await.expect("stored").sequence
        }
    };
    let step_finished = || bus_schema::BuildEventKind::StepFinished {
        index: 0,
        attempt: 0,
        result: bus_schema::StepResult::Success,
        exit_code: Some(0),
        message: None,
    };
    let next = |rx: &mut tokio::sync::mpsc::UnboundedReceiver<(u64, String)>| {
        let received = rx.try_recv().ok();
        async move { received }
    };
    let first = store("01HFIRSTFIRSTFIRSTFIRSTFIR", step_finished()).await;
    let (sequence, subject) = wait_until("the first event", Duration::from_secs(30), || next(&mut rx)).await;
    assert_eq!(sequence, first, "{subject}");
    // Events the filter does not match: the follower hears nothing more, and its consumer has
    // nothing to deliver.
    for _ in 0..3 {
        store(
            "01HOTHEROTHEROTHEROTHEROTH",
            bus_schema::BuildEventKind::StepStarted {
                index: 0,
                attempt: 0,
                agent: "agent-1".into(),
                agent_session: None,
            },
        )
        .await;
    }
    let before = wait_until("the follower's consumer", Duration::from_secs(30), consumers).await;
    assert_eq!(before.len(), 1, "one consumer: {before:?}");
    for check in 1..=3 {
        tokio::time::timeout(Duration::from_secs(30), consumer_checks.next())
            .await
            .unwrap_or_else(|_| panic!("the quiet follower asks about its consumer (check {check})"))
            .expect("subscription open");
    }
    assert_eq!(
        consumers().await,
        Some(before.clone()),
        "a quiet follower whose consumer is caught up keeps it"
    );
    // The consumer lost on the server: the follower replaces it and misses nothing.
    let stream = bus
        .stream(bus_schema::subjects::EVENTS_STREAM)
        .await
        .expect("stream");
    for name in &before {
        stream.delete_consumer(name).await.expect("consumer deleted");
    }
    let second = store("01HSECONDSECONDSECONDSECON", step_finished()).await;
    let (sequence, subject) = wait_until("the second event", Duration::from_secs(60), || next(&mut rx)).await;
    assert_eq!(sequence, second, "the next event, not the first again: {subject}");
    let third = store("01HTHIRDTHIRDTHIRDTHIRDTHI", step_finished()).await;
    let (sequence, _) = wait_until("the third event", Duration::from_secs(60), || next(&mut rx)).await;
    assert_eq!(sequence, third);
    let after = consumers().await.expect("consumers listed");
    assert!(
        !after.is_empty() && after.is_disjoint(&before),
        "the lost consumer was replaced: {before:?} then {after:?}"
    );
    stop.cancel();
}

/// What a [`services::watch::follow_bucket`] follower told, as "put KEY" and "removed KEY".
struct ToldChanges {
    changes: tokio::sync::mpsc::UnboundedReceiver<String>,
    told: Vec<String>,
    stop: tokio_util::sync::CancellationToken,
}

impl ToldChanges {
    /// Follows `store`, restarting after `silence`, once the follower has replayed it.
    async fn follow(store: async_nats::jetstream::kv::Store, silence: Duration) -> ToldChanges {
        let (tx, changes) = tokio::sync::mpsc::unbounded_channel();
        let stop = tokio_util::sync::CancellationToken::new();
        let ready = services::watch::follow_bucket(store, stop.clone(), silence, move |change| {
            let _ = tx.send(match change {
                services::watch::BucketChange::Put { key, .. } => format!("put {key}"),
                services::watch::BucketChange::Removed { key } => format!("removed {key}"),
            });
        });
        ready.await.expect("the follower replays the bucket");
        ToldChanges {
            changes,
            told: Vec::new(),
            stop,
        }
    }

    /// Everything told so far, oldest first.
    fn told(&mut self) -> &[String] {
        while let Ok(change) = self.changes.try_recv() {
            self.told.push(change);
        }
        &self.told
    }

    /// Waits until `change` has been told; returns everything told.
    async fn wait_for(&mut self, change: &str) -> Vec<String> {
        wait_until(change, Duration::from_secs(60), || {
            let told = self.told().to_vec();
            async move { told.iter().any(|told| told == change).then_some(told) }
        })
        .await
    }
}

impl Drop for ToldChanges {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A bucket follower's restart replays the bucket and then reports as removed what the replay
/// no longer holds: an entry that went while the watch heard nothing (here purged from the
/// bucket's stream, which tells no watcher) leaves the follower's picture, and the entries
/// still there are not reported removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_bucket_follower_drops_what_went_while_it_heard_nothing() {
    yard_tests::init_logging();
    let dir = tempfile::tempdir().unwrap();
    let nats = yard_tests::start_nats(dir.path());
    let bus = bus_on(&nats, "bucket-follower-test").await;
    let pools = bus.pools.clone();
    for key in ["server.kept", "server.gone"] {
        pools.put(key, "v1".into()).await.expect("put");
    }
    let mut follower = ToldChanges::follow(pools.clone(), Duration::from_secs(2)).await;
    assert_eq!(
        follower.told().iter().cloned().collect::<BTreeSet<_>>(),
        BTreeSet::from(["put server.gone".to_owned(), "put server.kept".to_owned()])
    );
    let bucket = bus_schema::subjects::POOLS_BUCKET;
    let stream = bus
        .stream(&format!("KV_{bucket}"))
        .await
        .expect("the pools bucket's stream");
    stream
        .purge()
        .filter(bus_schema::subjects::kv_key(bucket, "server.gone"))
        .await
        .expect("purged without a marker");
    let told = follower.wait_for("removed server.gone").await;
    assert!(!told.contains(&"removed server.kept".to_owned()), "{told:?}");
    pools.put("server.new", "v1".into()).await.expect("put");
    follower.wait_for("put server.new").await;
}

/// An entry that expires from a bucket with a `max_age` is told to its followers as removed
/// at once, by the marker the bucket stores. A bucket made by an older Yardmaster, without
/// markers, is given them when a master starts (here with a short `max_age`, to see one
/// expire soon).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expired_bucket_entry_is_told_to_followers() {
    yard_tests::init_logging();
    let dir = tempfile::tempdir().unwrap();
    let nats = yard_tests::start_nats(dir.path());
    let client = async_nats::connect(nats.url()).await.expect("connects");
    let jetstream = async_nats::jetstream::new(client);
    jetstream
        .create_key_value(async_nats::jetstream::kv::Config {
            bucket: bus_schema::subjects::WAITS_BUCKET.into(),
            history: 1,
            max_age: Duration::from_secs(2),
            ..Default::default()
        })
        .await
        .expect("a bucket as an older Yardmaster made it");
    let bus = bus_on(&nats, "expiry-test").await;
    let waits = bus.waits.clone();
    // A silence restart would drop the entry too: far off, so only the marker can tell.
    let mut follower = ToldChanges::follow(waits.clone(), Duration::from_secs(600)).await;
    waits.put("engine-gone", "v1".into()).await.expect("put");
    let told = follower.wait_for("removed engine-gone").await;
    assert_eq!(told, ["put engine-gone", "removed engine-gone"]);
}

/// A killed engine's waits leave the waits view once it is dead (its record expires from the
/// bucket without a word to watchers), and the engine that adopts its builds lists their
/// waits again: each waiting build is listed once, under a live engine.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_engines_waits_leave_the_waits_view() {
    yard_tests::init_logging();
    let mut deployment = Deployment::new(&CONFIG.replace("sleep 2", "sleep 8"));
    let ui = deployment
        .start_masters_and_agents(&["engine-1"], &[("a1", "os=linux")])
        .await;
    let builds: Vec<String> = futures::future::join_all((0..3).map(|_| ui.force("slow", json!({})))).await;
    let waits_by_engine = || async {
        let (_, body) = ui.get("/api/v1/waits").await;
        let mut by_engine: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for wait in body["waits"].as_array().into_iter().flatten() {
            by_engine
                .entry(wait["engine"].as_str().unwrap_or_default().to_owned())
                .or_default()
                .insert(wait["build_id"].as_str().unwrap_or_default().to_owned());
        }
        by_engine
    };
    // One build runs on the one agent; the other two wait at engine-1.
    wait_until(
        "two builds waiting at engine-1",
        Duration::from_secs(30),
        || async {
            let waits = waits_by_engine().await;
            (waits.get("engine-1").map(BTreeSet::len) == Some(2)).then_some(())
        },
    )
    .await;
    deployment.kill("engine-1");
    deployment.master("engine", "engine-2");
    let waits = wait_until(
        "the waits listed under engine-2 alone",
        Duration::from_secs(60),
        || async {
            let waits = waits_by_engine().await;
            (!waits.contains_key("engine-1") && waits.contains_key("engine-2")).then_some(waits)
        },
    )
    .await;
    assert!(
        waits["engine-2"].iter().all(|build| builds.contains(build)),
        "{waits:?}"
    );
    for id in &builds {
        let build = ui.wait_finished(id, Duration::from_secs(120)).await;
        assert_eq!(build["result"], "success", "{build}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn draining_and_a_rolling_upgrade_lose_nothing() {
    yard_tests::init_logging();
    let mut deployment = Deployment::new(CONFIG);
    let agents = [("a1", "os=linux"), ("a2", "os=linux"), ("a3", "os=linux")];
    let api = deployment
        .start_masters_and_agents(&["old-1", "old-2"], &agents)
        .await;

    let first_wave = tokio::spawn({
        let api = api.clone();
        async move { force_builds(&api, 120).await }
    });
    wait_until("some builds to finish", Duration::from_secs(60), || async {
        (finished_count(&api).await >= 20).then_some(())
    })
    .await;
    // Rolling upgrade: new engines first, then drain the old ones through the API.
    deployment.master("engine", "new-1");
    deployment.master("engine", "new-2");
    wait_until("the new engines to register", Duration::from_secs(30), || async {
        (master_state(&api, "new-1").await.as_deref() == Some("active")
            && master_state(&api, "new-2").await.as_deref() == Some("active"))
        .then_some(())
    })
    .await;
    for old in ["old-1", "old-2"] {
        let (status, body) = api
            .post(&format!("/api/v1/masters/{old}/drain"), Value::Null)
            .await;
        assert_eq!(status, 202, "{body}");
        let state = master_state(&api, old).await;
        assert!(
            matches!(state.as_deref(), Some("draining") | None),
            "{old} shows {state:?} after a drain"
        );
    }
    let second_wave = force_builds(&api, 60).await;
    for old in ["old-1", "old-2"] {
        let status = deployment.process(old).wait();
        assert!(status.success(), "{old} exits cleanly after draining: {status}");
    }
    let (status, _) = api
        .post("/api/v1/masters/no-such-master/drain", Value::Null)
        .await;
    assert_eq!(status, 404);
    let mut forced = first_wave.await.unwrap();
    forced.extend(second_wave);
    let builds = wait_all_finished(&api, 180, Duration::from_secs(240)).await;
    assert_eq!(builds.len(), 180);
    let ids: BTreeSet<&str> = builds.iter().map(|build| build["id"].as_str().unwrap()).collect();
    assert_eq!(ids, forced.iter().map(String::as_str).collect());
    assert_exactly_once(&deployment, &builds);
    // Builds requested after the drain ran on the new engines only.
    for id in &forced[120..] {
        let build = builds.iter().find(|build| build["id"] == id.as_str()).unwrap();
        let engine = build["engine"].as_str().unwrap();
        assert!(
            engine.starts_with("new-"),
            "build {id} ran on {engine} after the old engines drained"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_schedulers_lease_is_taken_over() {
    yard_tests::init_logging();
    let mut deployment = Deployment::new(CONFIG);
    deployment.master("scheduler", "sched-1");
    deployment.master("scheduler", "sched-2");
    deployment.master("engine", "engine-1");
    let api = deployment.ui("ui-1");
    deployment.agent("a1", "os=linux");
    api.wait_healthy().await;
    api.wait_agents(1).await;
    let holder = wait_until("a scheduler lease holder", Duration::from_secs(20), || {
        lease_holder(&deployment)
    })
    .await;
    deployment.kill(&holder);
    let changes = post_changes(std::slice::from_ref(&api), 1).await;
    let change = changes.into_iter().next().unwrap();
    // The survivor takes the lease once it expires, and then builds the change.
    let lease_time = Duration::from_secs(bus_schema::subjects::LEASE_SECONDS);
    let new_holder = wait_until("another master to take the lease", lease_time * 2, || async {
        lease_holder(&deployment).await.filter(|h| *h != holder)
    })
    .await;
    assert_ne!(new_holder, holder);
    let build = wait_until("the change's build", Duration::from_secs(30), || async {
        let (_, body) = api.get(&format!("/api/v1/builds?change={change}")).await;
        body["builds"].as_array()?.first().cloned()
    })
    .await;
    let build = api
        .wait_finished(build["id"].as_str().unwrap(), Duration::from_secs(30))
        .await;
    assert_eq!(build["result"], "success");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_run_on_a_nats_cluster_with_a_node_killed_too() {
    yard_tests::init_logging();
    let mut deployment = Deployment::on_cluster(CONFIG);
    deployment.provision().await;
    for id in ["sched-1", "sched-2"] {
        deployment.master("scheduler", id);
    }
    for id in ["engine-1", "engine-2", "engine-3"] {
        deployment.master("engine", id);
    }
    let uis = vec![deployment.ui("ui-1"), deployment.ui("ui-2")];
    for agent in ["a1", "a2", "a3", "a4"] {
        deployment.agent(agent, "os=linux");
    }
    for api in &uis {
        api.wait_healthy().await;
    }
    uis[0].wait_agents(4).await;
    let posting = tokio::spawn({
        let uis = uis.clone();
        async move { post_changes(&uis, 500).await }
    });
    wait_until("some builds to finish", Duration::from_secs(120), || async {
        (finished_count(&uis[0]).await >= 60).then_some(())
    })
    .await;
    let holder = wait_until("a scheduler lease holder", Duration::from_secs(20), || {
        lease_holder(&deployment)
    })
    .await;
    deployment.kill("engine-1");
    deployment.kill(&holder);
    deployment.nats[1].kill();
    let changes = posting.await.unwrap();
    assert_eq!(changes.len(), 500);
    let builds = wait_all_finished(&uis[0], 500, Duration::from_secs(400)).await;
    assert_eq!(builds.len(), 500, "one build per change, none twice");
    let built_changes: BTreeSet<String> = builds
        .iter()
        .map(|build| build["changes"][0]["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(built_changes, changes, "every accepted change has its build");
    assert_exactly_once(&deployment, &builds);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn masters_that_disagree_on_a_definition_are_reported() {
    yard_tests::init_logging();
    let mut deployment = Deployment::new(CONFIG);
    deployment.master("engine", "engine-1");
    let changed = CONFIG.replace("sleep 0.1", "sleep 0.2");
    deployment.master_with_config("engine", "engine-2", &changed);
    let api = deployment.ui("ui-1");
    api.wait_healthy().await;
    let conflicts = wait_until("the conflict to be reported", Duration::from_secs(30), || async {
        let (_, body) = api.get("/api/v1/masters").await;
        let conflicts = body["conflicts"].as_array()?.clone();
        (!conflicts.is_empty()).then_some(conflicts)
    })
    .await;
    assert_eq!(conflicts.len(), 1, "{conflicts:?}");
    assert_eq!(conflicts[0]["kind"], "builder");
    assert_eq!(conflicts[0]["name"], "work");
    // Two groups of masters, one per definition: engine-2 alone with the changed one.
    let groups: Vec<BTreeSet<String>> = conflicts[0]["masters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|group| {
            group
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m.as_str().unwrap().to_owned())
                .collect()
        })
        .collect();
    assert_eq!(groups.len(), 2, "{groups:?}");
    assert!(
        groups.contains(&BTreeSet::from(["engine-2".to_owned()])),
        "{groups:?}"
    );
    assert!(
        groups
            .iter()
            .any(|group| group.contains("engine-1") && group.contains("ui-1")),
        "{groups:?}"
    );
    // The masters say so in their logs too.
    wait_until("a warning in a master's log", Duration::from_secs(30), || async {
        let logged = ["engine-1", "engine-2"]
            .iter()
            .any(|id| deployment.log_text(id).contains("defines this differently"));
        logged.then_some(())
    })
    .await;
}

/// Scrapes a master's `/metrics` (its URL from the masters registry) until `line` shows.
async fn wait_for_metric(api: &Api, master: &str, line: &str) -> String {
    let started = std::time::Instant::now();
    loop {
        let (_, body) = api.get("/api/v1/masters").await;
        let url = body["masters"].as_array().and_then(|masters| {
            let record = masters.iter().find(|record| record["id"] == master)?;
            Some(record["metrics_url"].as_str()?.to_owned())
        });
        let text = match &url {
            Some(url) => match reqwest::get(url).await {
                Ok(response) => response.text().await.unwrap_or_default(),
                Err(error) => error.to_string(),
            },
            None => format!("no metrics_url for {master} in {body}"),
        };
        if text.lines().any(|candidate| candidate == line) {
            return text;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{line:?} missing from the metrics of {master}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_master_serves_its_metrics() {
    yard_tests::init_logging();
    let mut deployment = Deployment::new(CONFIG);
    let api = deployment
        .start_masters_and_agents(&["engine-1"], &[("a1", "os=linux")])
        .await;
    let changes = post_changes(std::slice::from_ref(&api), 3).await;
    assert_eq!(changes.len(), 3);
    let builds = wait_all_finished(&api, 3, Duration::from_secs(60)).await;
    assert!(builds.iter().all(|build| build["result"] == "success"));

    // The engine and the scheduler each run alone in their process, and serve their own.
    let engine = wait_for_metric(
        &api,
        "engine-1",
        r#"yard_engine_builds_finished_total{result="success"} 3"#,
    )
    .await;
    for line in [
        "yard_engine_claims_total 3",
        "yard_engine_build_wait_seconds_count 3",
        "yard_engine_builds_running 0",
    ] {
        assert!(
            engine.lines().any(|candidate| candidate == line),
            "{line} missing from\n{engine}"
        );
    }
    assert!(
        engine.contains(r#"yard_bus_rtt_seconds{role="engine"} "#),
        "{engine}"
    );
    assert!(
        !engine.contains("yard_scheduler_"),
        "the engine's process runs no scheduler"
    );
    wait_for_metric(&api, "engine-1", r#"yard_engine_agents{status="idle"} 1"#).await;

    let scheduler = wait_for_metric(
        &api,
        "sched-1",
        r#"yard_scheduler_changes_total{scheduler="main"} 3"#,
    )
    .await;
    assert!(
        scheduler.contains(r#"yard_scheduler_requests_total{scheduler="main"} 3"#),
        "{scheduler}"
    );
    assert!(scheduler.contains("yard_scheduler_leases_held 1"), "{scheduler}");
    assert!(
        !scheduler.contains("yard_engine_"),
        "the scheduler's process runs no engine"
    );

    // The UI master's own, with its view's figures.
    let (status, ui) = api.get_text("/metrics").await;
    assert_eq!(status, 200);
    assert!(
        ui.contains(r#"yard_builds_finished_total{result="success"} 3"#),
        "{ui}"
    );
}

/// A deployment's first scheduler master starts after a UI master accepted changes: those
/// changes are built too (the UI master creates the schedulers' consumers before it accepts
/// any change).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn changes_accepted_before_any_scheduler_ran_are_built() {
    yard_tests::init_logging();
    let mut deployment = Deployment::new(CONFIG);
    deployment.master("engine", "engine-1");
    let api = deployment.ui("ui-1");
    deployment.agent("a1", "os=linux");
    api.wait_healthy().await;
    let changes = post_changes(std::slice::from_ref(&api), 2).await;
    assert_eq!(changes.len(), 2);
    deployment.master("scheduler", "sched-1");
    let builds = wait_all_finished(&api, 2, Duration::from_secs(60)).await;
    let built: BTreeSet<String> = builds
        .iter()
        .map(|build| build["changes"][0]["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(built, changes);
}

/// A scheduler, an engine, an agent and two UI masters, the UI masters healthy.
async fn one_of_each_and_two_uis(deployment: &mut Deployment) -> [Api; 2] {
    deployment.master("scheduler", "sched-1");
    deployment.master("engine", "engine-1");
    let uis = [deployment.ui("ui-1"), deployment.ui("ui-2")];
    deployment.agent("a1", "os=linux");
    for api in &uis {
        api.wait_healthy().await;
    }
    uis
}

/// A change posted again with the same `Idempotency-Key`, to the same or another UI master,
/// is the change stored first: one change, one build. Another key, or none, is another change.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_change_posted_again_with_its_idempotency_key_is_one_change() {
    yard_tests::init_logging();
    let mut deployment = Deployment::new(CONFIG);
    let uis = one_of_each_and_two_uis(&mut deployment).await;
    let change = json!({ "branch": "main", "revision": "once", "repository": "repo" });
    let mut answers = Vec::new();
    for api in [&uis[0], &uis[1], &uis[0]] {
        let (status, body) = api
            .post_with_key("/api/v1/changes", change.clone(), "deploy-42")
            .await;
        assert_eq!(status, 202, "{body}");
        answers.push(body["id"].as_str().unwrap().to_owned());
    }
    assert!(
        answers.iter().all(|id| *id == answers[0]),
        "every answer names the change stored first: {answers:?}"
    );
    let (status, other_key) = uis[1]
        .post_with_key("/api/v1/changes", change.clone(), "deploy-43")
        .await;
    assert_eq!(status, 202, "{other_key}");
    let (status, no_key) = uis[1].post("/api/v1/changes", change.clone()).await;
    assert_eq!(status, 202, "{no_key}");
    let changes: BTreeSet<String> = [
        answers[0].clone(),
        other_key["id"].as_str().unwrap().to_owned(),
        no_key["id"].as_str().unwrap().to_owned(),
    ]
    .into();
    assert_eq!(changes.len(), 3, "{changes:?}");
    let builds = wait_all_finished(&uis[0], 3, Duration::from_secs(60)).await;
    let built: Vec<String> = builds
        .iter()
        .map(|build| build["changes"][0]["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(built.len(), 3, "one build per change: {built:?}");
    assert_eq!(built.into_iter().collect::<BTreeSet<_>>(), changes);

    // A key that cannot be one is refused, naming the header, and stores nothing.
    let (status, body) = uis[0]
        .post_with_key("/api/v1/changes", change.clone(), "two words")
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("Idempotency-Key"),
        "{body}"
    );
}

/// A build forced again with the same `Idempotency-Key`, through the same or another UI
/// master, is the build stored first: one build. Another key, no key, or the same key for
/// another builder is another build. A key whose first ask stored the build's `requested`
/// event but not its request (a scheduler killed in between) gets the request stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_build_forced_again_with_its_idempotency_key_is_one_build() {
    yard_tests::init_logging();
    let mut deployment = Deployment::new(CONFIG);
    let uis = one_of_each_and_two_uis(&mut deployment).await;
    let force = |api: &Api, builder: &str, key: Option<&str>| {
        let (api, path) = (api.clone(), format!("/api/v1/builders/{builder}/force"));
        let key = key.map(str::to_owned);
        async move {
            let body = json!({ "reason": "deploy" });
            let (status, body) = match key {
                Some(key) => api.post_with_key(&path, body, &key).await,
                None => api.post(&path, body).await,
            };
            assert_eq!(status, 202, "{body}");
            (body["id"].as_str().unwrap().to_owned(), body["number"].clone())
        }
    };
    let mut answers = Vec::new();
    for api in [&uis[0], &uis[1], &uis[0]] {
        answers.push(force(api, "work", Some("deploy-7")).await);
    }
    assert!(
        answers.iter().all(|answer| *answer == answers[0]),
        "every answer names the build stored first, and its number: {answers:?}"
    );
    let others = [
        force(&uis[1], "work", Some("deploy-8")).await.0,
        force(&uis[1], "work", None).await.0,
        force(&uis[0], "slow", Some("deploy-7")).await.0,
    ];

    // The first ask stored only the `requested` event: the next one completes it.
    let jetstream =
        async_nats::jetstream::new(async_nats::connect(deployment.nats_url()).await.expect("NATS"));
    let half_stored = bus_schema::BuildRequest {
        build_id: "01HZZZZZZZZZZZZZZZZZZZZZZ1".into(),
        builder: "work".into(),
        reason: "half stored".into(),
        properties: Default::default(),
        changes: Vec::new(),
        priority: 0,
        requested_at: services::time::now(),
    };
    let event = bus_schema::BuildEvent::new(
        half_stored.build_id.clone(),
        half_stored.requested_at,
        bus_schema::BuildEventKind::Requested(half_stored.clone()),
    );
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", "delivery-force.work:crashed-1");
    jetstream
        .publish_with_headers(
            bus_schema::subjects::event(&half_stored.build_id, "requested"),
            headers,
            bus_schema::encode(&event).into(),
        )
        .await
        .expect("published")
        .await
        .expect("stored");
    let completed = force(&uis[1], "work", Some("crashed-1")).await.0;
    assert_eq!(completed, half_stored.build_id, "the build stored first");

    let mut expected: BTreeSet<String> = others.iter().cloned().collect();
    expected.insert(answers[0].0.clone());
    expected.insert(completed);
    assert_eq!(expected.len(), 5, "{expected:?}");
    for id in &expected {
        let build = uis[0].wait_finished(id, Duration::from_secs(60)).await;
        assert_eq!(build["result"], "success", "{build}");
    }
    let (_, listed) = uis[1].get("/api/v1/builds?limit=1000").await;
    let listed: BTreeSet<String> = listed["builds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|build| build["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        listed, expected,
        "one build per key and builder, and one without a key"
    );

    // A key that cannot be one is refused, naming the header.
    let (status, body) = uis[0]
        .post_with_key("/api/v1/builders/work/force", json!({}), "two words")
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("Idempotency-Key"),
        "{body}"
    );
}

/// An agent that dies while it runs a step is declared lost, and the build is retried. Its
/// last heartbeat can still look fresh to the engine's directory for a moment after that (a
/// dead connection fails the engine's pings at once), but the retry must not be handed to the
/// agent it was just lost on: with that agent the only one that can run the build, the retry
/// waits until the agent is heard from again (here, restarted), and the build costs one
/// retry and succeeds, rather than ending lost with its one retry spent on a dead agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retry_waits_for_the_agent_it_was_lost_on_to_be_heard_from_again() {
    yard_tests::init_logging();
    let mut deployment = Deployment::new(CONFIG);
    let ui = deployment
        .start_masters_and_agents(&["engine-1"], &[("a1", "os=linux")])
        .await;
    let (id, step) = force_slow_until_its_step_runs(&deployment, &ui).await;
    deployment.kill("a1");
    let lost = ui
        .wait_build(&id, Duration::from_secs(60), |build| {
            build["retries"]
                .as_array()
                .is_some_and(|retries| !retries.is_empty())
        })
        .await;
    let reason = lost["retries"][0]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("agent a1 was lost"), "{lost}");
    deployment.agent("a1", "os=linux");

    let build = ui.wait_finished(&id, Duration::from_secs(60)).await;
    assert_eq!(build["result"], "success", "{build}\n{}", deployment.logs());
    let retries = build["retries"].as_array().unwrap();
    assert_eq!(
        retries.len(),
        1,
        "one retry, run once the agent was back: {build}"
    );
    assert_eq!(executions(&deployment).get(&step), Some(&2), "{build}");
}
