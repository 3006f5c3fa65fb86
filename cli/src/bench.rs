//! `yard bench`: measured scenarios on this machine, each against a private nats-server.
//!
//! `ui`: N finished builds stored on the bus; a UI master folds them all (full replay) and
//! snapshots its view; a second UI master starts from the snapshot; then
//! `GET /api/v1/builds?limit=50` is timed under concurrent load.
//!
//! `throughput` and `latency`: an engine master and K simulated agents (each with its own
//! NATS connection, reporting every step a success without running it) in this process;
//! build requests are stored on the bus as a scheduler would, and the builds' events are
//! watched on the bus.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bus_schema::{BuildEventKind, BuildRequest, BuildResult, PlannedStep, StepResult};
use services::nats_server::NatsServer;
use services::{Bus, YardConfig};
use tokio_util::sync::CancellationToken;

/// Options of `yard bench ui`.
pub struct UiOptions {
    pub builds: usize,
    pub requests: usize,
    pub concurrency: usize,
}

/// Runs the `ui` scenario; returns its figures as one JSON object.
pub async fn ui(options: UiOptions) -> anyhow::Result<serde_json::Value> {
    let data = tempfile::tempdir().context("cannot create a temporary directory")?;
    let binary = NatsServer::locate_binary()?;
    let server = NatsServer::start(&binary, &data.path().join("nats"), None)?;
    let mut config = YardConfig::from_toml(Some(BENCH_CONFIG), "bench configuration", Vec::new())?;
    config.nats.url = server.url().to_owned();
    config.validate()?;
    let config = Arc::new(config);
    let bus = Bus::connect(&config.nats, &config.engine, "yard-bench").await?;

    let started = Instant::now();
    let last_sequence = seed_builds(&bus, options.builds).await?;
    let seed_seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "stored {} builds ({last_sequence} events) in {seed_seconds:.1} s",
        options.builds
    );

    // The first UI master folds every event, then writes a snapshot.
    let first = UiMaster::start(&config).await?;
    let full_replay = first
        .wait_applied(last_sequence, Duration::from_secs(1800))
        .await?;
    eprintln!("full replay: {full_replay:.2} s");
    let snapshot_started = Instant::now();
    first
        .wait_snapshot(last_sequence, Duration::from_secs(1800))
        .await?;
    let snapshot_written = snapshot_started.elapsed().as_secs_f64();
    first.stop().await;

    // The second starts from that snapshot.
    let restart = Instant::now();
    let second = UiMaster::start(&config).await?;
    let serving = restart.elapsed().as_secs_f64();
    second
        .wait_applied(last_sequence, Duration::from_secs(1800))
        .await?;
    let restored = restart.elapsed().as_secs_f64();
    eprintln!("restart: serving after {serving:.2} s, every build shown after {restored:.2} s");

    let (latencies, wall) = second.load(options.requests, options.concurrency).await?;
    second.stop().await;
    bus.close().await;
    server.stop();
    Ok(serde_json::json!({
        "scenario": "ui",
        "builds": options.builds,
        "events": last_sequence,
        "seed_s": round(seed_seconds),
        "full_replay_s": round(full_replay),
        "snapshot_write_s": round(snapshot_written),
        "restart_serving_s": round(serving),
        "restart_caught_up_s": round(restored),
        "requests": options.requests,
        "concurrency": options.concurrency,
        "requests_per_s": round(options.requests as f64 / wall),
        "p50_ms": round(percentile(&latencies, 0.50)),
        "p99_ms": round(percentile(&latencies, 0.99)),
        "max_ms": round(percentile(&latencies, 1.0)),
    }))
}

/// Options of `yard bench throughput` and `yard bench latency`.
pub struct GridOptions {
    pub builds: usize,
    pub agents: usize,
}

/// An engine master and simulated agents on a private nats-server.
struct Grid {
    _data: tempfile::TempDir,
    server: NatsServer,
    bus: Bus,
    shutdown: CancellationToken,
    agents_shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Grid {
    async fn start(agents: usize) -> anyhow::Result<Grid> {
        let data = tempfile::tempdir().context("cannot create a temporary directory")?;
        let binary = NatsServer::locate_binary()?;
        let server = NatsServer::start(&binary, &data.path().join("nats"), None)?;
        let mut config = YardConfig::from_toml(Some(BENCH_CONFIG), "bench configuration", Vec::new())?;
        config.nats.url = server.url().to_owned();
        config.masters.id = Some("bench-engine".into());
        config.validate()?;
        let config = Arc::new(config);
        let bus = Bus::connect(&config.nats, &config.engine, "yard-bench").await?;
        let (shutdown, agents_shutdown) = (CancellationToken::new(), CancellationToken::new());
        let mut tasks = Vec::new();
        let engine_bus = Bus::connect(&config.nats, &config.engine, "yard-bench-engine").await?;
        let (engine_config, stop) = (Arc::clone(&config), shutdown.clone());
        tasks.push(tokio::spawn(async move {
            if let Err(error) = engine_master::run(engine_config, engine_bus, stop).await {
                eprintln!("engine failed: {error}");
            }
        }));
        for number in 0..agents {
            let agent_bus = Bus::connect(&config.nats, &config.engine, "yard-bench-agent").await?;
            let mut settings = agent::Settings::from_config(&config.agent, &config.instance.id);
            settings.name = format!("sim-{number}");
            settings.workdir = data.path().join("agents");
            settings.benchmark = Some(100);
            settings.simulate = true;
            let stop = agents_shutdown.clone();
            tasks.push(tokio::spawn(async move {
                if let Err(error) = agent::run(settings, agent_bus, stop).await {
                    eprintln!("simulated agent failed: {error}");
                }
            }));
        }
        // Ready when every agent is registered.
        let started = Instant::now();
        loop {
            let registered = match bus.agents.keys().await {
                Ok(keys) => futures::StreamExt::count(keys).await,
                Err(_) => 0,
            };
            if registered >= agents {
                break;
            }
            if started.elapsed() > Duration::from_secs(60) {
                bail!("only {registered} of {agents} simulated agents registered");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Ready when the engine pulls build requests (it does once it has read the agents).
        loop {
            let pulling = async {
                let mut consumer: async_nats::jetstream::consumer::PullConsumer = bus
                    .stream(bus_schema::subjects::REQUESTS_STREAM)
                    .await
                    .ok()?
                    .get_consumer(bus_schema::subjects::ENGINES_CONSUMER)
                    .await
                    .ok()?;
                Some(consumer.info().await.ok()?.num_waiting > 0)
            };
            if pulling.await == Some(true) {
                break;
            }
            if started.elapsed() > Duration::from_secs(60) {
                bail!("the engine did not start pulling build requests");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Grid {
            _data: data,
            server,
            bus,
            shutdown,
            agents_shutdown,
            tasks,
        })
    }

    /// Every build event of `kind` from now on.
    async fn events(&self, kind: &str) -> anyhow::Result<async_nats::Subscriber> {
        self.bus
            .client
            .subscribe(bus_schema::subjects::event("*", kind))
            .await
            .with_context(|| format!("watching {kind} events"))
    }

    fn request(number: usize) -> BuildRequest {
        BuildRequest {
            build_id: ulid::Ulid::new().to_string(),
            builder: "bench".into(),
            reason: format!("bench build {number}"),
            properties: Default::default(),
            changes: Vec::new(),
            priority: 0,
            requested_at: services::time::now(),
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.agents_shutdown.cancel();
        for task in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(30), task).await;
        }
        self.bus.close().await;
        self.server.stop();
    }
}

/// N builds of one step on K simulated agents, all requested at once: sustained builds/s.
pub async fn throughput(options: GridOptions) -> anyhow::Result<serde_json::Value> {
    let grid = Grid::start(options.agents).await?;
    let mut finished = grid.events("finished").await?;
    let started = Instant::now();
    let submit = {
        let bus = grid.bus.clone();
        let count = options.builds;
        tokio::spawn(async move {
            let stored = futures::StreamExt::buffer_unordered(
                futures::stream::iter((0..count).map(|number| {
                    let bus = bus.clone();
                    async move { bus.store_build_request(&Grid::request(number)).await }
                })),
                256,
            );
            futures::StreamExt::collect::<Vec<_>>(stored).await
        })
    };
    // A `finished` event published again (its first ack lost) counts once.
    let mut done = std::collections::HashSet::new();
    while done.len() < options.builds {
        match tokio::time::timeout(Duration::from_secs(120), futures::StreamExt::next(&mut finished)).await {
            Ok(Some(message)) => {
                done.insert(message.subject.to_string());
            }
            _ => bail!("only {} of {} builds finished", done.len(), options.builds),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let failures = submit.await?.into_iter().filter(Result::is_err).count();
    grid.stop().await;
    if failures > 0 {
        bail!("{failures} build requests were not stored");
    }
    Ok(serde_json::json!({
        "scenario": "throughput",
        "builds": options.builds,
        "agents": options.agents,
        "seconds": round(elapsed),
        "builds_per_s": round(options.builds as f64 / elapsed),
    }))
}

/// Build request stored to step started on an idle agent, one build at a time.
pub async fn latency(options: GridOptions) -> anyhow::Result<serde_json::Value> {
    let grid = Grid::start(options.agents).await?;
    let mut started_steps = grid.events("step_started").await?;
    let mut finished = grid.events("finished").await?;
    let mut latencies = Vec::with_capacity(options.builds);
    for number in 0..options.builds {
        let request = Grid::request(number);
        let sent = Instant::now();
        grid.bus.store_build_request(&request).await?;
        let wanted = bus_schema::subjects::event(&request.build_id, "step_started");
        loop {
            let message = tokio::time::timeout(
                Duration::from_secs(30),
                futures::StreamExt::next(&mut started_steps),
            )
            .await
            .ok()
            .flatten()
            .with_context(|| format!("build {number} did not start"))?;
            if message.subject.as_str() == wanted {
                break;
            }
        }
        latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
        // Idle agents again before the next one.
        tokio::time::timeout(Duration::from_secs(30), futures::StreamExt::next(&mut finished))
            .await
            .ok()
            .flatten()
            .with_context(|| format!("build {number} did not finish"))?;
    }
    grid.stop().await;
    latencies.sort_by(f64::total_cmp);
    Ok(serde_json::json!({
        "scenario": "latency",
        "builds": options.builds,
        "agents": options.agents,
        "p50_ms": round(percentile(&latencies, 0.50)),
        "p99_ms": round(percentile(&latencies, 0.99)),
        "max_ms": round(percentile(&latencies, 1.0)),
    }))
}

const BENCH_CONFIG: &str = r#"
[http]
listen = "127.0.0.1:0"
snapshot_interval = "1s"

[[builder]]
name = "bench"
[[builder.steps]]
name = "true"
run = "true"
"#;

fn round(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

/// The `share` quantile of `sorted` (milliseconds).
fn percentile(sorted: &[f64], share: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 * share).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index]
}

/// Stores `count` finished one-step builds as the engines would record them, with JetStream
/// publishes pipelined; returns the events-stream sequence of the last event.
async fn seed_builds(bus: &Bus, count: usize) -> anyhow::Result<u64> {
    const WINDOW: usize = 4096;
    let mut pending = std::collections::VecDeque::with_capacity(WINDOW);
    let mut last = 0;
    for number in 0..count {
        let build_id = ulid::Ulid::new().to_string();
        let at = services::time::now();
        let events = [
            BuildEventKind::Requested(BuildRequest {
                build_id: build_id.clone(),
                builder: "bench".into(),
                reason: format!("bench build {number}"),
                properties: Default::default(),
                changes: Vec::new(),
                priority: 0,
                requested_at: at,
            }),
            BuildEventKind::Claimed {
                engine: "bench".into(),
                steps: vec![PlannedStep {
                    name: "true".into(),
                    path: "true".into(),
                    kind: "command".into(),
                }],
            },
            BuildEventKind::StepStarted {
                index: 0,
                attempt: 0,
                agent: "bench-agent".into(),
            },
            BuildEventKind::StepFinished {
                index: 0,
                attempt: 0,
                result: StepResult::Success,
                exit_code: Some(0),
                message: None,
            },
            BuildEventKind::Finished {
                result: BuildResult::Success,
                message: None,
            },
        ];
        for kind in events {
            pending.push_back(bus.publish_event(&build_id, kind).await?);
            if pending.len() >= WINDOW {
                if let Some(ack) = pending.pop_front() {
                    last = ack.await.context("storing a seeded event")?.sequence;
                }
            }
        }
    }
    while let Some(ack) = pending.pop_front() {
        last = ack.await.context("storing a seeded event")?.sequence;
    }
    Ok(last)
}

/// A UI master running in this process on a free port.
struct UiMaster {
    url: String,
    client: reqwest::Client,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl UiMaster {
    async fn start(config: &Arc<YardConfig>) -> anyhow::Result<UiMaster> {
        let bus = Bus::connect(&config.nats, &config.engine, "yard-bench-ui").await?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let shutdown = CancellationToken::new();
        let (config, stop) = (Arc::clone(config), shutdown.clone());
        let task = tokio::spawn(async move {
            if let Err(error) = ui_master::serve(config, bus, listener, stop).await {
                eprintln!("UI master failed: {error}");
            }
        });
        let master = UiMaster {
            url,
            client: reqwest::Client::new(),
            shutdown,
            task,
        };
        master.metric_when(Duration::from_secs(30), |_| true).await?;
        Ok(master)
    }

    /// Polls `/metrics` until `ready` holds for its text; returns the seconds waited.
    async fn metric_when(&self, limit: Duration, ready: impl Fn(&str) -> bool) -> anyhow::Result<f64> {
        let started = Instant::now();
        loop {
            if let Ok(response) = self.client.get(format!("{}/metrics", self.url)).send().await {
                if let Ok(text) = response.text().await {
                    if ready(&text) {
                        return Ok(started.elapsed().as_secs_f64());
                    }
                }
            }
            if started.elapsed() > limit {
                bail!("the UI master at {} was not ready within {limit:?}", self.url);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_applied(&self, sequence: u64, limit: Duration) -> anyhow::Result<f64> {
        self.metric_when(limit, |text| {
            metric(text, "yard_ui_view_events_sequence").is_some_and(|applied| applied >= sequence)
        })
        .await
    }

    async fn wait_snapshot(&self, sequence: u64, limit: Duration) -> anyhow::Result<f64> {
        self.metric_when(limit, |text| {
            metric(text, "yard_ui_view_snapshot_sequence").is_some_and(|written| written >= sequence)
        })
        .await
    }

    /// Sends `requests` listings from `concurrency` clients; returns the sorted latencies in
    /// milliseconds and the wall time in seconds.
    async fn load(&self, requests: usize, concurrency: usize) -> anyhow::Result<(Vec<f64>, f64)> {
        let url = format!("{}/api/v1/builds?limit=50", self.url);
        let started = Instant::now();
        let per_client = requests.div_ceil(concurrency.max(1));
        let clients = (0..concurrency.max(1)).map(|_| {
            let (client, url) = (self.client.clone(), url.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(per_client);
                for _ in 0..per_client {
                    let sent = Instant::now();
                    let response = client.get(&url).send().await?;
                    let status = response.status();
                    let body = response.bytes().await?;
                    if !status.is_success() || body.len() < 2 {
                        anyhow::bail!("GET {url} answered {status}");
                    }
                    latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
                }
                Ok(latencies)
            })
        });
        let mut latencies = Vec::with_capacity(requests);
        for client in futures::future::join_all(clients).await {
            latencies.extend(client??);
        }
        let wall = started.elapsed().as_secs_f64();
        latencies.sort_by(f64::total_cmp);
        Ok((latencies, wall))
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}

/// A figure from a `/metrics` text, by its exact metric name (no labels).
fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The human summary of a bench result.
pub fn summary(result: &serde_json::Value) -> String {
    let figure = |name: &str| result[name].as_f64().unwrap_or_default();
    match result["scenario"].as_str() {
        Some("throughput") => {
            return format!(
                "throughput: {} builds on {} simulated agents in {:.2} s: {:.0} builds/s",
                result["builds"],
                result["agents"],
                figure("seconds"),
                figure("builds_per_s")
            )
        }
        Some("latency") => {
            return format!(
                "latency (request stored to step started, idle agents): {} builds on {} agents: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
                result["builds"],
                result["agents"],
                figure("p50_ms"),
                figure("p99_ms"),
                figure("max_ms")
            )
        }
        _ => {}
    }
    format!(
        "ui: {} builds ({} events)\n  full replay        {:.2} s\n  snapshot written   {:.2} s\n  restart: serving   {:.2} s, every build shown {:.2} s\n  GET /api/v1/builds?limit=50: {:.0} requests/s ({} clients), p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        result["builds"],
        result["events"],
        figure("full_replay_s"),
        figure("snapshot_write_s"),
        figure("restart_serving_s"),
        figure("restart_caught_up_s"),
        figure("requests_per_s"),
        result["concurrency"],
        figure("p50_ms"),
        figure("p99_ms"),
        figure("max_ms"),
    )
}
