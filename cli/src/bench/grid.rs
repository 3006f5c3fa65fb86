//! The dispatch scenarios: engine masters and simulated agents (reporting every step a success
//! without running a process) on a private nats-server. Changes are stored on the bus as a UI
//! master stores them, or build requests as a scheduler stores them, and the builds' events
//! are watched on the bus.
//!
//! - `throughput`: N builds requested at once on K agents, timed to their `finished` events.
//! - `latency`: change accepted (stored) to step started on its agent, through a scheduler
//!   and an engine, one build at a time on idle agents, or at a steady rate (`--rate`) to see
//!   it under load.
//! - `agents`: K agents registered and heartbeating against an engine master process: its CPU
//!   while idle, its memory per agent, and the dispatch latency among them.
//! - `backlog`: N requests stored while every master is down (killed), then the masters
//!   started again: time to the first dispatch and to an empty queue.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bus_schema::{BuildRequest, Change};
use futures::StreamExt;
use services::config::{SchedulerConfig, YardConfig};
use services::Bus;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{quantiles, round, Nats, BENCH_CONFIG};

/// Options of `yard bench throughput` and `yard bench latency`.
pub struct GridOptions {
    pub builds: usize,
    pub agents: usize,
    /// Builds requested per second (latency under load); `None`: one at a time.
    pub rate: Option<f64>,
}

/// Options of `yard bench agents`.
pub struct AgentsOptions {
    pub agents: usize,
    /// Builds timed one at a time once every agent is registered.
    pub builds: usize,
    /// Length of the idle window the engine's CPU is measured over.
    pub idle_seconds: u64,
}

/// Options of `yard bench backlog`.
pub struct BacklogOptions {
    pub builds: usize,
    pub agents: usize,
}

/// Simulated agents share a NATS connection in groups this large in the `agents` scenario
/// (one connection each elsewhere).
const AGENTS_PER_CONNECTION: usize = 100;

/// A nats-server, simulated agents in this process, and whatever masters a scenario starts.
pub(super) struct Grid {
    pub(super) nats: Nats,
    pub(super) bus: Bus,
    masters_shutdown: CancellationToken,
    agents_shutdown: CancellationToken,
    master_tasks: Vec<tokio::task::JoinHandle<()>>,
    agent_tasks: Vec<tokio::task::JoinHandle<()>>,
    processes: Vec<Child>,
    /// Every simulated agent tells this the build id of each step it starts, and when.
    step_started_tx: mpsc::UnboundedSender<(String, Instant)>,
    /// Build ids of steps as the simulated agents start them, with the instant each started
    /// on its agent (no write or delivery between).
    step_started: tokio::sync::Mutex<mpsc::UnboundedReceiver<(String, Instant)>>,
}

impl Grid {
    /// A nats-server with `config`; no masters and no agents yet.
    pub(super) async fn new(config: &str) -> anyhow::Result<Grid> {
        let nats = Nats::start(config)?;
        let bus = nats.connect("yard-bench").await?;
        let (step_started_tx, step_started) = mpsc::unbounded_channel();
        Ok(Grid {
            nats,
            bus,
            masters_shutdown: CancellationToken::new(),
            agents_shutdown: CancellationToken::new(),
            master_tasks: Vec::new(),
            agent_tasks: Vec::new(),
            processes: Vec::new(),
            step_started_tx,
            step_started: tokio::sync::Mutex::new(step_started),
        })
    }

    /// A master of `role` in this process (master id `bench-<role>`, on its own NATS
    /// connection), run by `run` until the grid stops.
    async fn start_master_here<Run, Running, Failure>(&mut self, role: &str, run: Run) -> anyhow::Result<()>
    where
        Run: FnOnce(Arc<YardConfig>, Bus, CancellationToken) -> Running,
        Running: std::future::Future<Output = Result<(), Failure>> + Send + 'static,
        Failure: std::fmt::Display,
    {
        let mut config = (*self.nats.config).clone();
        config.masters.id = Some(format!("bench-{role}"));
        let config = Arc::new(config);
        let bus = Bus::connect(&config.nats, &config.engine, &format!("yard-bench-{role}")).await?;
        let running = run(config, bus, self.masters_shutdown.clone());
        let role = role.to_owned();
        self.master_tasks.push(tokio::spawn(async move {
            if let Err(error) = running.await {
                eprintln!("{role} failed: {error}");
            }
        }));
        Ok(())
    }

    /// An engine master in this process.
    pub(super) async fn start_engine_here(&mut self) -> anyhow::Result<()> {
        self.start_master_here("engine", engine_master::run).await
    }

    /// A scheduler master in this process, following changes for the `bench` scheduler; returns
    /// once it holds the scheduler's lease.
    pub(super) async fn start_scheduler_here(&mut self) -> anyhow::Result<()> {
        // Its consumer exists before any change is stored, as a UI master makes sure.
        self.bus.scheduler_consumer(BENCH_SCHEDULER).await?;
        self.start_master_here("scheduler", scheduler_master::run).await?;
        let lease = bus_schema::subjects::scheduler_consumer(BENCH_SCHEDULER);
        let started = Instant::now();
        while !matches!(self.bus.leases.get(&lease).await, Ok(Some(_))) {
            if started.elapsed() > Duration::from_secs(60) {
                bail!("the bench scheduler did not take its lease within a minute");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Starts `yard ARGS --config <the bench configuration>` as a separate process.
    fn spawn_yard(&mut self, args: &[&str]) -> anyhow::Result<u32> {
        let config_path = self.nats.data.path().join("bench.toml");
        std::fs::write(&config_path, &self.nats.config_text).context("writing the bench configuration")?;
        let log_path = self
            .nats
            .data
            .path()
            .join(format!("yard-{}.log", self.processes.len()));
        let log = std::fs::File::create(&log_path).context("creating a process log")?;
        let binary: PathBuf = std::env::current_exe().context("locating the yard binary")?;
        let child = Command::new(binary)
            .args(args)
            .arg("--config")
            .arg(&config_path)
            .env("YARD_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting a yard process")?;
        let pid = child.id();
        self.processes.push(child);
        Ok(pid)
    }

    /// Kills every `yard` process the grid started (SIGKILL: no graceful shutdown).
    fn kill_processes(&mut self) {
        for mut child in self.processes.drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts `count` agents, `per_connection` to a NATS connection, and waits until all are
    /// registered. Simulated agents report every step a success at once; the others run it.
    pub(super) async fn add_agents(
        &mut self,
        count: usize,
        per_connection: usize,
        simulate: bool,
    ) -> anyhow::Result<()> {
        let mut bus = None;
        for number in 0..count {
            if number % per_connection.max(1) == 0 {
                bus = Some(self.nats.connect("yard-bench-agent").await?);
            }
            let Some(agent_bus) = bus.clone() else { continue };
            let mut settings =
                agent::Settings::from_config(&self.nats.config.agent, &self.nats.config.instance.id);
            settings.name = format!("sim-{number}");
            settings.workdir = self.nats.data.path().join("agents");
            settings.benchmark = Some(100);
            settings.simulate = simulate;
            settings.step_started = Some(self.step_started_tx.clone());
            let stop = self.agents_shutdown.clone();
            self.agent_tasks.push(tokio::spawn(async move {
                if let Err(error) = agent::run(settings, agent_bus, stop).await {
                    eprintln!("simulated agent failed: {error}");
                }
            }));
        }
        let started = Instant::now();
        loop {
            let registered = match self.bus.agents.keys().await {
                Ok(keys) => keys.count().await,
                Err(_) => 0,
            };
            if registered >= count {
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(120) {
                bail!("only {registered} of {count} simulated agents registered");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until an engine pulls build requests (it does once it has read the agents).
    pub(super) async fn wait_engine_pulling(&self, limit: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            let pulling = async {
                let mut consumer: async_nats::jetstream::consumer::PullConsumer = self
                    .bus
                    .stream(bus_schema::subjects::REQUESTS_STREAM)
                    .await
                    .ok()?
                    .get_consumer(bus_schema::subjects::ENGINES_CONSUMER)
                    .await
                    .ok()?;
                Some(consumer.info().await.ok()?.num_waiting > 0)
            };
            if pulling.await == Some(true) {
                return Ok(());
            }
            if started.elapsed() > limit {
                bail!("no engine pulled build requests within {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Every build event of `kind` from now on.
    async fn events(&self, kind: &str) -> anyhow::Result<async_nats::Subscriber> {
        self.bus
            .client
            .subscribe(bus_schema::subjects::event("*", kind))
            .await
            .with_context(|| format!("watching {kind} events"))
    }

    /// Stores `count` build requests, `window` at a time.
    async fn store_requests(&self, count: usize, window: usize) -> anyhow::Result<()> {
        let bus = self.bus.clone();
        let stored = futures::stream::iter((0..count).map(|number| {
            let bus = bus.clone();
            async move { bus.store_build_request(&request(number), None).await }
        }))
        .buffer_unordered(window);
        let failures = stored
            .filter(|result| futures::future::ready(result.is_err()))
            .count()
            .await;
        if failures > 0 {
            bail!("{failures} build requests were not stored");
        }
        Ok(())
    }

    pub(super) async fn stop(mut self) {
        self.kill_processes();
        // Masters first, so that engines still reach the agents while they let go of them.
        self.masters_shutdown.cancel();
        for task in self.master_tasks.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(30), task).await;
        }
        self.agents_shutdown.cancel();
        for task in self.agent_tasks.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(30), task).await;
        }
        self.bus.close().await;
        self.nats.stop();
    }
}

/// A request for a build of the `bench` builder.
fn request(number: usize) -> BuildRequest {
    request_of("bench", number)
}

/// The scheduler of the bench configuration: changes on `main` build `bench`.
const BENCH_SCHEDULER: &str = "bench";

/// The bench configuration's scheduler, which turns changes on `main` into `bench` builds.
fn bench_scheduler(config: &YardConfig) -> anyhow::Result<SchedulerConfig> {
    config
        .schedulers
        .iter()
        .find(|scheduler| scheduler.name == BENCH_SCHEDULER)
        .cloned()
        .with_context(|| format!("the bench configuration has no scheduler {BENCH_SCHEDULER:?}"))
}

/// What a timed build starts from.
enum Origin {
    /// A change, which the bench scheduler turns into a build request.
    Change(Change),
    /// A build request, stored as a scheduler stores it.
    Request(BuildRequest),
}

impl Origin {
    /// The `number`th build's origin, and the id its build will have: a change for
    /// `scheduler` (see [`bench_scheduler`]), or without one a request.
    fn new(scheduler: Option<&SchedulerConfig>, number: usize) -> (String, Origin) {
        let Some(scheduler) = scheduler else {
            let request = request(number);
            return (request.build_id.clone(), Origin::Request(request));
        };
        let change = Change {
            id: ulid::Ulid::new().to_string(),
            repository: "bench".into(),
            branch: "main".into(),
            revision: format!("rev-{number}"),
            author: String::new(),
            comments: String::new(),
            files: Vec::new(),
            project: String::new(),
            source: "bench".into(),
            received_at: services::time::now(),
        };
        // The scheduler derives the build id from the change, so it is known in advance.
        let build_id = scheduler_master::build_request(scheduler, "bench", &change).build_id;
        (build_id, Origin::Change(change))
    }

    /// Stores it, and waits until JetStream has it.
    async fn store(self, bus: &Bus) -> Result<(), services::bus::Error> {
        match self {
            Origin::Change(change) => bus.store_change(&change, None).await.map(drop),
            Origin::Request(request) => bus.store_build_request(&request, None).await.map(drop),
        }
    }
}

pub(super) fn request_of(builder: &str, number: usize) -> BuildRequest {
    BuildRequest {
        build_id: ulid::Ulid::new().to_string(),
        builder: builder.into(),
        reason: format!("bench build {number}"),
        properties: Default::default(),
        changes: Vec::new(),
        priority: 0,
        requested_at: services::time::now(),
    }
}

/// The build id of an event subject `yard.event.<build>.<kind>`.
fn build_of(subject: &str) -> Option<&str> {
    subject.split('.').nth(2)
}

/// Waits for `count` distinct builds' events from `events` (an event published again after a
/// lost ack counts once).
async fn wait_builds(
    events: &mut async_nats::Subscriber,
    count: usize,
    limit: Duration,
) -> anyhow::Result<()> {
    let mut seen = HashSet::new();
    while seen.len() < count {
        match tokio::time::timeout(limit, events.next()).await {
            Ok(Some(message)) => {
                seen.insert(message.subject.to_string());
            }
            _ => bail!("only {} of {count} builds got there", seen.len()),
        }
    }
    Ok(())
}

/// N builds of one step on K simulated agents, all requested at once: sustained builds/s.
pub async fn throughput(options: GridOptions) -> anyhow::Result<serde_json::Value> {
    let mut grid = Grid::new(BENCH_CONFIG).await?;
    grid.add_agents(options.agents, 1, true).await?;
    grid.start_engine_here().await?;
    grid.wait_engine_pulling(Duration::from_secs(60)).await?;
    let mut finished = grid.events("finished").await?;
    let started = Instant::now();
    let (stored, done) = tokio::join!(
        grid.store_requests(options.builds, 256),
        wait_builds(&mut finished, options.builds, Duration::from_secs(120))
    );
    let elapsed = started.elapsed().as_secs_f64();
    grid.stop().await;
    stored?;
    done?;
    Ok(serde_json::json!({
        "scenario": "throughput",
        "builds": options.builds,
        "agents": options.agents,
        "seconds": round(elapsed),
        "builds_per_s": round(options.builds as f64 / elapsed),
    }))
}

/// Change accepted to step started: one build at a time on idle agents, or at a steady rate.
/// A change is accepted when JetStream acknowledges it (when a UI master answers 202); the
/// `submit_` figures start the clock before it is sent instead, and so add its store.
pub async fn latency(options: GridOptions) -> anyhow::Result<serde_json::Value> {
    let mut grid = Grid::new(BENCH_CONFIG).await?;
    grid.add_agents(options.agents, 1, true).await?;
    grid.start_engine_here().await?;
    grid.wait_engine_pulling(Duration::from_secs(60)).await?;
    grid.start_scheduler_here().await?;
    let latencies = match options.rate {
        None => dispatch_one_at_a_time(&grid, true, options.builds).await,
        Some(rate) => dispatch_at_rate(&grid, options.builds, rate).await,
    };
    grid.stop().await;
    let mut result = serde_json::json!({
        "scenario": "latency",
        "builds": options.builds,
        "agents": options.agents,
        "rate_per_s": options.rate.unwrap_or(0.0),
    });
    let latencies = latencies?;
    if let Some(fields) = result.as_object_mut() {
        fields.extend(quantiles("", latencies.accepted));
        fields.extend(quantiles("submit_", latencies.submitted));
        if let Some(busy) = latencies.cpu_busy_percent {
            fields.insert("cpu_busy_percent".into(), busy.into());
        }
    }
    Ok(result)
}

/// Milliseconds to each build's step start, from its change or request acknowledged by
/// JetStream, and from before it was sent; under a steady rate, how busy the machine's CPUs
/// were from the first change to the last step start.
struct Dispatch {
    accepted: Vec<f64>,
    submitted: Vec<f64>,
    cpu_busy_percent: Option<f64>,
}

fn millis_between(from: Instant, to: Instant) -> f64 {
    // A step may start before its store's acknowledgement has come back: no wait, then.
    to.saturating_duration_since(from).as_secs_f64() * 1000.0
}

/// Each build's change (or, without `from_changes`, its request) to its step starting, one
/// build at a time (each finishes before the next is stored).
async fn dispatch_one_at_a_time(grid: &Grid, from_changes: bool, builds: usize) -> anyhow::Result<Dispatch> {
    let scheduler = if from_changes {
        Some(bench_scheduler(&grid.nats.config)?)
    } else {
        None
    };
    let mut started_steps = grid.step_started.lock().await;
    let mut finished = grid.events("finished").await?;
    let mut latencies = Dispatch {
        accepted: Vec::with_capacity(builds),
        submitted: Vec::with_capacity(builds),
        cpu_busy_percent: None,
    };
    for number in 0..builds {
        let (build_id, origin) = Origin::new(scheduler.as_ref(), number);
        let submitted = Instant::now();
        origin.store(&grid.bus).await?;
        let accepted = Instant::now();
        let started = loop {
            let (started, at) = tokio::time::timeout(Duration::from_secs(30), started_steps.recv())
                .await
                .ok()
                .flatten()
                .with_context(|| format!("build {number} did not start"))?;
            if started == build_id {
                break at;
            }
        };
        latencies.accepted.push(millis_between(accepted, started));
        latencies.submitted.push(millis_between(submitted, started));
        // Idle agents again before the next one.
        loop {
            let message = tokio::time::timeout(Duration::from_secs(30), finished.next())
                .await
                .ok()
                .flatten()
                .with_context(|| format!("build {number} did not finish"))?;
            if build_of(&message.subject) == Some(build_id.as_str()) {
                break;
            }
        }
    }
    Ok(latencies)
}

/// Each build's change to its step starting, with changes stored at `rate` per second
/// whatever the system does.
async fn dispatch_at_rate(grid: &Grid, builds: usize, rate: f64) -> anyhow::Result<Dispatch> {
    if !(rate > 0.0 && rate.is_finite()) {
        bail!("--rate must be a positive number of builds per second");
    }
    let mut started_steps = grid.step_started.lock().await;
    let scheduler = bench_scheduler(&grid.nats.config)?;
    let cpu_before = super::CpuTimes::now();
    let submitter = {
        let bus = grid.bus.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut stores = tokio::task::JoinSet::new();
            let mut stored = HashMap::with_capacity(builds);
            let mut failures = 0;
            let mut record = |store: Result<Result<_, _>, _>| match store {
                Ok(Ok((build_id, submitted, accepted))) => {
                    stored.insert(build_id, (submitted, accepted));
                }
                _ => failures += 1,
            };
            for number in 0..builds {
                ticker.tick().await;
                // Stores already answered are collected as the load goes on: each finished
                // task kept to the end would hold its memory, and the load generator would
                // take ever more fresh pages from the machine it measures.
                while let Some(store) = stores.try_join_next() {
                    record(store);
                }
                let (build_id, origin) = Origin::new(Some(&scheduler), number);
                let bus = bus.clone();
                stores.spawn(async move {
                    let submitted = Instant::now();
                    origin
                        .store(&bus)
                        .await
                        .map(|()| (build_id, submitted, Instant::now()))
                });
            }
            while let Some(store) = stores.join_next().await {
                record(store);
            }
            (stored, failures)
        })
    };
    let mut started = HashMap::with_capacity(builds);
    while started.len() < builds {
        let (build_id, at) = tokio::time::timeout(Duration::from_secs(30), started_steps.recv())
            .await
            .ok()
            .flatten()
            .with_context(|| format!("only {} of {builds} builds started", started.len()))?;
        started.entry(build_id).or_insert(at);
    }
    let cpu_busy_percent = cpu_before
        .zip(super::CpuTimes::now())
        .and_then(|(before, after)| before.busy_percent_until(after));
    let (stored, failures) = submitter.await?;
    if failures > 0 {
        bail!("{failures} changes were not stored");
    }
    let mut latencies = Dispatch {
        accepted: Vec::with_capacity(builds),
        submitted: Vec::with_capacity(builds),
        cpu_busy_percent,
    };
    for (build_id, (submitted, accepted)) in stored {
        let at = *started
            .get(&build_id)
            .with_context(|| format!("build {build_id} was stored but did not start"))?;
        latencies.accepted.push(millis_between(accepted, at));
        latencies.submitted.push(millis_between(submitted, at));
    }
    Ok(latencies)
}

/// CPU time (user and system) and resident memory of a process, from `/proc`.
fn process_usage(pid: u32) -> anyhow::Result<(Duration, u64)> {
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).context("reading the engine's CPU time")?;
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: u64 = fields
        .get(11..13)
        .context("unexpected /proc stat format")?
        .iter()
        .map(|field| field.parse::<u64>().unwrap_or(0))
        .sum();
    // Linux reports CPU time in clock ticks of 1/100 s on every platform it runs on here.
    let cpu = Duration::from_millis(ticks * 10);
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).context("reading the engine's memory")?;
    let rss_kb = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc status")?;
    Ok((cpu, rss_kb))
}

/// K simulated agents registered and heartbeating against an engine master process.
pub async fn agents(options: AgentsOptions) -> anyhow::Result<serde_json::Value> {
    let mut grid = Grid::new(BENCH_CONFIG).await?;
    let engine = grid.spawn_yard(&["engine"])?;
    grid.wait_engine_pulling(Duration::from_secs(60)).await?;
    let (_, rss_before_kb) = process_usage(engine)?;
    let registering = Instant::now();
    grid.add_agents(options.agents, AGENTS_PER_CONNECTION, true)
        .await?;
    let registered_s = registering.elapsed().as_secs_f64();
    // Idle: every agent heartbeats, no build runs.
    let (cpu_start, _) = process_usage(engine)?;
    let window = Instant::now();
    tokio::time::sleep(Duration::from_secs(options.idle_seconds)).await;
    let (cpu_end, rss_after_kb) = process_usage(engine)?;
    let idle_cpu = (cpu_end - cpu_start).as_secs_f64() / window.elapsed().as_secs_f64();
    let latencies = dispatch_one_at_a_time(&grid, false, options.builds).await;
    grid.stop().await;
    let mut result = serde_json::json!({
        "scenario": "agents",
        "agents": options.agents,
        "registered_s": round(registered_s),
        "idle_window_s": options.idle_seconds,
        "engine_idle_cpu_percent": round(idle_cpu * 100.0),
        "engine_rss_before_mb": round(rss_before_kb as f64 / 1024.0),
        "engine_rss_after_mb": round(rss_after_kb as f64 / 1024.0),
        "engine_kb_per_agent": round(rss_after_kb.saturating_sub(rss_before_kb) as f64 / options.agents.max(1) as f64),
        "builds": options.builds,
    });
    if let Some(fields) = result.as_object_mut() {
        let latencies = latencies?;
        fields.extend(quantiles("dispatch_", latencies.accepted));
        fields.extend(quantiles("dispatch_submit_", latencies.submitted));
    }
    Ok(result)
}

/// N requests stored while every master is down, then the masters started again.
pub async fn backlog(options: BacklogOptions) -> anyhow::Result<serde_json::Value> {
    let mut grid = Grid::new(BENCH_CONFIG).await?;
    grid.add_agents(options.agents, 1, true).await?;
    let url = grid.nats.server.url().to_owned();
    let data_dir = grid
        .nats
        .data
        .path()
        .join("masters")
        .to_string_lossy()
        .into_owned();
    let masters = [
        "up",
        "--agents",
        "0",
        "--http",
        "127.0.0.1:0",
        "--nats",
        &url,
        "--data-dir",
        &data_dir,
    ];
    grid.spawn_yard(&masters)?;
    grid.wait_engine_pulling(Duration::from_secs(60)).await?;
    // Every master dies at once, then the backlog piles up.
    grid.kill_processes();
    let storing = Instant::now();
    grid.store_requests(options.builds, 512).await?;
    let store_s = storing.elapsed().as_secs_f64();
    let mut finished = grid.events("finished").await?;
    let restart = Instant::now();
    grid.spawn_yard(&masters)?;
    tokio::time::timeout(Duration::from_secs(300), grid.step_started.lock().await.recv())
        .await
        .ok()
        .flatten()
        .context("no build started after the restart")?;
    let first_dispatch_s = restart.elapsed().as_secs_f64();
    wait_builds(&mut finished, options.builds, Duration::from_secs(120)).await?;
    let finished_s = restart.elapsed().as_secs_f64();
    // Each request leaves the queue once its build's end is stored.
    let mut requests = grid.bus.stream(bus_schema::subjects::REQUESTS_STREAM).await?;
    loop {
        let left = requests
            .info()
            .await
            .context("reading the request queue")?
            .state
            .messages;
        if left == 0 {
            break;
        }
        if restart.elapsed() > Duration::from_secs(60) + Duration::from_secs_f64(finished_s) {
            bail!("{left} build requests left in the queue after every build finished");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drained_s = restart.elapsed().as_secs_f64();
    grid.stop().await;
    Ok(serde_json::json!({
        "scenario": "backlog",
        "builds": options.builds,
        "agents": options.agents,
        "store_s": round(store_s),
        "first_dispatch_s": round(first_dispatch_s),
        "all_finished_s": round(finished_s),
        "empty_queue_s": round(drained_s),
        "drain_builds_per_s": round(options.builds as f64 / drained_s),
    }))
}
