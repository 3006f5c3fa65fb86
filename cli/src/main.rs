//! The `yard` command: runs one Yardmaster role, or every role together with `yard up`.

mod bench;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use services::nats_server::NatsServer;
use services::telemetry::{self, LogFormat};
use services::{Bus, YardConfig};
use tokio_util::sync::CancellationToken;

/// mimalloc: the masters allocate and free many small buffers per build (messages, events,
/// records), which it serves faster than the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The configuration `yard up` runs when no `--config` is given.
const DEMO_CONFIG: &str = include_str!("../demo.toml");

#[derive(Parser)]
#[command(name = "yard", version, about = "Yardmaster: a distributed CI system")]
struct Cli {
    /// Log output format.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormatArg,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormatArg {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run every role and local agents in one process, with a private nats-server unless
    /// --nats is given.
    Up(UpArgs),
    /// Run a scheduler master.
    Scheduler(RoleArgs),
    /// Run an engine master.
    Engine(RoleArgs),
    /// Run a UI master.
    Ui(UiArgs),
    /// Run an agent.
    Agent(AgentArgs),
    /// Measure a scenario on this machine (see BENCHMARKS.md).
    Bench(BenchArgs),
    /// Manage toolkits: versioned bundles of files agents fetch for the steps that need them.
    #[command(subcommand)]
    Toolkit(ToolkitCommand),
    /// Write a nats-server configuration with one user per role and per agent, each allowed
    /// only the subjects its role uses, and print every user's credentials.
    NatsConfig(NatsConfigArgs),
}

#[derive(Args)]
struct NatsConfigArgs {
    /// Agent names, comma-separated: one user each (`agent-<name>`).
    #[arg(long, value_delimiter = ',')]
    agents: Vec<String>,
    /// Keep passwords in this file (`user = "password"` lines): those in it are used, missing
    /// ones are generated and added. Without it every password is new.
    #[arg(long)]
    password_file: Option<PathBuf>,
    /// Write the server configuration here and print only the credentials.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Address the server listens on.
    #[arg(long, default_value = "0.0.0.0:4222")]
    listen: String,
    /// Where JetStream keeps its files (default: the server's).
    #[arg(long)]
    store_dir: Option<PathBuf>,
    /// The server's TLS certificate (PEM).
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// The key of --tls-cert (PEM).
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// CA certificate(s) (PEM) of client certificates; clients are told to trust it too.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// Require client certificates signed by --tls-ca.
    #[arg(long)]
    tls_verify: bool,
}

#[derive(Subcommand)]
enum ToolkitCommand {
    /// Publish the directory DIR as toolkit NAME@VERSION (its `bin/` goes on steps' PATH).
    Push {
        #[command(flatten)]
        role: RoleArgs,
        /// The directory to publish.
        dir: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        version: String,
    },
}

#[derive(Args)]
struct BenchArgs {
    /// Print one JSON object instead of a readable summary.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// N one-step builds on K simulated agents, requested at once: sustained builds/s.
    Throughput {
        #[arg(long, default_value_t = 2_000)]
        builds: usize,
        #[arg(long, default_value_t = 20)]
        agents: usize,
    },
    /// Change accepted to step started (through a scheduler and an engine): p50, p99, max;
    /// one build at a time on idle agents, or with changes arriving at --rate per second.
    Latency {
        #[arg(long, default_value_t = 500)]
        builds: usize,
        #[arg(long, default_value_t = 4)]
        agents: usize,
        /// Changes stored per second, whether or not earlier builds have started.
        #[arg(long)]
        rate: Option<f64>,
    },
    /// K simulated agents registered and heartbeating against an engine master process: its
    /// CPU while idle, its memory per agent, and dispatch latency among them.
    Agents {
        #[arg(long, default_value_t = 10_000)]
        agents: usize,
        /// Builds timed one at a time once every agent is registered.
        #[arg(long, default_value_t = 200)]
        builds: usize,
        /// Seconds the engine's idle CPU is measured over.
        #[arg(long, default_value_t = 10)]
        idle_seconds: u64,
    },
    /// N requests stored while every master is down, then the masters started again: time to
    /// the first dispatch and to an empty queue.
    Backlog {
        #[arg(long, default_value_t = 100_000)]
        builds: usize,
        #[arg(long, default_value_t = 50)]
        agents: usize,
    },
    /// K real agents each running a step that prints N lines, tailed through a UI master:
    /// log lines/s from agents to its clients.
    Logs {
        #[arg(long, default_value_t = 4)]
        agents: usize,
        /// Lines each step prints.
        #[arg(long, default_value_t = 250_000)]
        lines: usize,
    },
    /// A UI master with N stored builds: full replay, snapshot, restart from it, and the
    /// latency of `GET /api/v1/builds?limit=50`.
    Ui {
        /// Builds stored before the UI masters start.
        #[arg(long, default_value_t = 100_000)]
        builds: usize,
        /// Listing requests timed after the restart.
        #[arg(long, default_value_t = 20_000)]
        requests: usize,
        /// Concurrent HTTP clients.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// Clients of the live-update stream timed receiving build changes.
        #[arg(long, default_value_t = 1_000)]
        sse_clients: usize,
        /// Build changes timed to each of them.
        #[arg(long, default_value_t = 20)]
        sse_updates: usize,
    },
}

#[derive(Args)]
struct RoleArgs {
    /// NATS server URL(s), comma-separated; overrides `[nats] url`.
    #[arg(long)]
    nats: Option<String>,
    /// Configuration file (TOML).
    #[arg(long)]
    config: Option<PathBuf>,
}

#[derive(Args)]
struct UiArgs {
    #[command(flatten)]
    role: RoleArgs,
    /// Address to serve HTTP on; overrides `[http] listen`.
    #[arg(long)]
    http: Option<String>,
}

#[derive(Args)]
struct AgentArgs {
    #[command(flatten)]
    role: RoleArgs,
    /// Agent name; overrides `[agent] name` (default: the host name).
    #[arg(long)]
    name: Option<String>,
    /// Labels as `key=value,key=value`; added to `[agent] labels`.
    #[arg(long)]
    labels: Option<String>,
    /// Root of the agent's workspaces; overrides `[agent] workdir`.
    #[arg(long)]
    workdir: Option<PathBuf>,
    /// Fixed speed score instead of measuring one; overrides `[agent] benchmark`.
    #[arg(long)]
    benchmark: Option<u64>,
    /// Announce another protocol version (to see how masters refuse a mismatched agent).
    #[arg(long, hide = true)]
    protocol: Option<u32>,
}

#[derive(Args)]
struct UpArgs {
    /// Number of local agents.
    #[arg(long, default_value_t = 2)]
    agents: usize,
    /// Address to serve HTTP on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http: String,
    /// Configuration file (TOML); default: the bundled demo configuration.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Where the private nats-server and the local agents keep their files.
    #[arg(long, default_value = ".yard")]
    data_dir: PathBuf,
    /// Use this NATS deployment instead of starting a private nats-server.
    #[arg(long)]
    nats: Option<String>,
    /// Fixed speed score for the local agents instead of measuring one.
    #[arg(long)]
    benchmark: Option<u64>,
    /// Master roles to run here, comma-separated (`--agents 0 --roles engine` runs a bare
    /// engine master).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "scheduler,engine,ui"
    )]
    roles: Vec<Role>,
}

/// A master role.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Role {
    Scheduler,
    Engine,
    Ui,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Scheduler => "scheduler",
            Role::Engine => "engine",
            Role::Ui => "ui",
        }
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    telemetry::init(match cli.log_format {
        LogFormatArg::Text => LogFormat::Text,
        LogFormatArg::Json => LogFormat::Json,
    });
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("yard: cannot start the runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("yard: {error:#}");
            std::process::ExitCode::from(2)
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Up(args) => up(args).await,
        Command::Scheduler(args) => {
            let config = load_config(&args, |_| Ok(()))?;
            run_master(
                config,
                &[Role::Scheduler],
                Vec::new(),
                services::shutdown::on_signals(),
            )
            .await
        }
        Command::Engine(args) => {
            let config = load_config(&args, |_| Ok(()))?;
            run_master(
                config,
                &[Role::Engine],
                Vec::new(),
                services::shutdown::on_signals(),
            )
            .await
        }
        Command::Ui(args) => {
            let config = load_config(&args.role, |config| {
                if let Some(http) = &args.http {
                    config.http.listen = http.clone();
                }
                Ok(())
            })?;
            run_master(config, &[Role::Ui], Vec::new(), services::shutdown::on_signals()).await
        }
        Command::Toolkit(ToolkitCommand::Push {
            role,
            dir,
            name,
            version,
        }) => {
            if !dir.is_dir() {
                bail!("{} is not a directory", dir.display());
            }
            let config = load_config(&role, |_| Ok(()))?;
            let bus = connect(&config, "yard-toolkit").await?;
            let sha256 = services::toolkits::push(&bus, config.nats.replicas, &name, &version, &dir).await?;
            bus.close().await;
            println!("pushed toolkit {name}@{version} (sha256 {sha256})");
            Ok(())
        }
        Command::NatsConfig(args) => {
            let options = services::permissions::Options {
                listen: args.listen,
                store_dir: args.store_dir,
                tls: services::permissions::Tls {
                    cert: args.tls_cert,
                    key: args.tls_key,
                    ca: args.tls_ca,
                    verify: args.tls_verify,
                },
            };
            let generated =
                services::permissions::generate(&args.agents, args.password_file.as_deref(), &options)?;
            print!("{}", generated.output(args.out.as_deref())?);
            Ok(())
        }
        Command::Bench(args) => {
            // The agents' fixed CPU workload, timed before the run: how fast one core of the
            // machine was at the time, to compare runs of different hours.
            let machine_score = tokio::task::spawn_blocking(agent::measure_benchmark).await?;
            let cpu_before = bench::CpuTimes::now();
            let result = match args.scenario {
                Scenario::Throughput { builds, agents } => {
                    bench::throughput(bench::GridOptions {
                        builds,
                        agents,
                        rate: None,
                    })
                    .await?
                }
                Scenario::Latency { builds, agents, rate } => {
                    bench::latency(bench::GridOptions { builds, agents, rate }).await?
                }
                Scenario::Agents {
                    agents,
                    builds,
                    idle_seconds,
                } => {
                    bench::agents(bench::AgentsOptions {
                        agents,
                        builds,
                        idle_seconds,
                    })
                    .await?
                }
                Scenario::Backlog { builds, agents } => {
                    bench::backlog(bench::BacklogOptions { builds, agents }).await?
                }
                Scenario::Logs { agents, lines } => bench::logs(bench::LogsOptions { agents, lines }).await?,
                Scenario::Ui {
                    builds,
                    requests,
                    concurrency,
                    sse_clients,
                    sse_updates,
                } => {
                    bench::ui(bench::UiOptions {
                        builds,
                        requests,
                        concurrency,
                        sse_clients,
                        sse_updates,
                    })
                    .await?
                }
            };
            let mut result = bench::with_cpu_steal(result, cpu_before);
            if let Some(fields) = result.as_object_mut() {
                fields.insert("machine_score".into(), machine_score.into());
            }
            if args.json {
                println!("{result}");
            } else {
                println!("{}", bench::summary(&result));
            }
            Ok(())
        }
        Command::Agent(args) => {
            let config = load_config(&args.role, |config| {
                let agent = &mut config.agent;
                if let Some(name) = &args.name {
                    agent.name = Some(name.clone());
                }
                if let Some(labels) = &args.labels {
                    agent.labels.extend(parse_labels(labels)?);
                }
                if let Some(workdir) = &args.workdir {
                    agent.workdir = Some(workdir.clone());
                }
                if let Some(benchmark) = args.benchmark {
                    agent.benchmark = Some(benchmark);
                }
                Ok(())
            })?;
            // One agent per deployment served ([[connection]], else [nats] and [instance]),
            // all on one machine that runs one build at a time.
            let deployments: Vec<(services::config::NatsConfig, String)> = if config.connections.is_empty() {
                vec![(config.nats.clone(), config.instance.id.clone())]
            } else {
                config
                    .connections
                    .iter()
                    .map(|connection| (connection.nats(&config.nats), connection.instance.clone()))
                    .collect()
            };
            let machine = Arc::new(agent::Machine::default());
            let shutdown = services::shutdown::on_signals();
            let mut agents = Vec::new();
            for (nats, instance) in deployments {
                let bus =
                    Bus::connect_as_agent(&nats, &config.engine, &format!("yard-agent-{instance}")).await?;
                let mut settings = agent::Settings::from_config(&config.agent, &instance);
                if let Some(protocol) = args.protocol {
                    settings.protocol = protocol;
                }
                let (machine, shutdown) = (Arc::clone(&machine), shutdown.clone());
                agents.push(tokio::spawn(async move {
                    let result = agent::run_on(machine, settings, bus.clone(), shutdown).await;
                    bus.close().await;
                    result
                }));
            }
            // One deployment's agent failing stops the others too.
            let mut failure = None;
            let mut pending = agents;
            while !pending.is_empty() {
                let (result, _, rest) = futures::future::select_all(pending).await;
                pending = rest;
                let error = match result {
                    Ok(Ok(())) => continue,
                    Ok(Err(error)) => anyhow::Error::from(error),
                    Err(panic) => anyhow::anyhow!("an agent stopped unexpectedly: {panic}"),
                };
                failure.get_or_insert(error);
                shutdown.cancel();
            }
            failure.map_or(Ok(()), Err)
        }
    }
}

/// Loads configuration in layers (file, environment, then these flags) and validates it.
fn load_config(
    args: &RoleArgs,
    flags: impl FnOnce(&mut YardConfig) -> anyhow::Result<()>,
) -> anyhow::Result<Arc<YardConfig>> {
    let mut config = YardConfig::load(args.config.as_deref())?;
    if let Some(nats) = &args.nats {
        config.nats.url = nats.clone();
    }
    flags(&mut config)?;
    config.validate()?;
    // One id for this process, shared by its presence record and its roles.
    config.masters.id = Some(services::presence::master_id(&config));
    Ok(Arc::new(config))
}

fn parse_labels(text: &str) -> anyhow::Result<BTreeMap<String, String>> {
    text.split(',')
        .map(str::trim)
        .filter(|pair| !pair.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((key, value)) if !key.trim().is_empty() => {
                Ok((key.trim().to_owned(), value.trim().to_owned()))
            }
            // A bare word is a label that is present, with an empty value.
            None if !pair.contains('=') => Ok((pair.to_owned(), String::new())),
            _ => bail!("--labels: {pair:?} is not key=value"),
        })
        .collect()
}

async fn connect(config: &YardConfig, client_name: &str) -> anyhow::Result<Bus> {
    Ok(Bus::connect(&config.nats, &config.engine, client_name).await?)
}

async fn up(args: UpArgs) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(path) => YardConfig::load(Some(path))?,
        None => YardConfig::from_toml(Some(DEMO_CONFIG), "bundled demo configuration", std::env::vars())?,
    };
    config.http.listen = args.http.clone();
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create the data directory {}", args.data_dir.display()))?;
    let data_dir = std::fs::canonicalize(&args.data_dir)?;
    let nats_server = match &args.nats {
        Some(url) => {
            config.nats.url = url.clone();
            None
        }
        None => {
            let binary = NatsServer::locate_binary()?;
            let server = NatsServer::start(&binary, &data_dir.join("nats"), None)?;
            tracing::info!(url = server.url(), binary = %binary.display(), "started a private nats-server");
            config.nats.url = server.url().to_owned();
            Some(server)
        }
    };
    config.validate()?;
    config.masters.id = Some(services::presence::master_id(&config));
    let config = Arc::new(config);
    let mut agents = Vec::new();
    for number in 1..=args.agents {
        let mut settings = agent::Settings::from_config(&config.agent, &config.instance.id);
        settings.name = format!("agent-{number}");
        settings.workdir = data_dir.join("agents").join(&settings.name);
        settings.benchmark = args.benchmark.or(settings.benchmark);
        agents.push(settings);
    }
    let result = run_master(
        Arc::clone(&config),
        &args.roles,
        agents,
        services::shutdown::on_signals(),
    )
    .await;
    if let Some(server) = nats_server {
        server.stop();
    }
    result
}

/// Runs the given master roles and local agents until `shutdown` (a signal or a drain
/// request). Agents stop last, so the engine can finish the builds it drains.
async fn run_master(
    config: Arc<YardConfig>,
    roles: &[Role],
    agents: Vec<agent::Settings>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let presence_stop = CancellationToken::new();
    // Every master serves /metrics: the UI role on its own address, any other on its own
    // metrics listener.
    let mut metrics_server = None;
    let metrics_url = if roles.is_empty() {
        None
    } else if roles.contains(&Role::Ui) {
        Some(format!("http://{}/metrics", config.http.listen))
    } else {
        let address = &config.http.metrics_listen;
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("cannot listen for /metrics on {address} ([http] metrics_listen)"))?;
        let url = format!("http://{}/metrics", listener.local_addr()?);
        tracing::info!(%url, "serving metrics");
        metrics_server = Some(tokio::spawn(ui_master::serve_metrics(
            listener,
            presence_stop.clone(),
        )));
        Some(url)
    };
    let presence = if roles.is_empty() {
        None
    } else {
        let bus = connect(&config, "yard-master").await?;
        let names = roles.iter().map(|role| role.name().to_owned()).collect();
        Some(services::presence::spawn(
            bus,
            &config,
            names,
            metrics_url,
            shutdown.clone(),
            presence_stop.clone(),
        ))
    };
    let agents_shutdown = CancellationToken::new();
    let mut agent_tasks = Vec::new();
    for settings in agents {
        let bus = connect(&config, &format!("yard-{}", settings.name)).await?;
        agent_tasks.push(tokio::spawn(agent::run(settings, bus, agents_shutdown.clone())));
    }
    let mut role_tasks = Vec::new();
    for role in roles {
        let bus = connect(&config, &format!("yard-{}", role.name())).await?;
        let (config, shutdown) = (Arc::clone(&config), shutdown.clone());
        role_tasks.push(match role {
            Role::Scheduler => tokio::spawn(async move {
                scheduler_master::run(config, bus, shutdown)
                    .await
                    .map_err(anyhow::Error::from)
            }),
            Role::Engine => tokio::spawn(async move {
                engine_master::run(config, bus, shutdown)
                    .await
                    .map_err(anyhow::Error::from)
            }),
            Role::Ui => tokio::spawn(async move {
                ui_master::run(config, bus, shutdown)
                    .await
                    .map_err(anyhow::Error::from)
            }),
        });
    }
    if roles.contains(&Role::Ui) {
        println!(
            "Yardmaster is up: http://{}  (ctrl-c to stop)",
            config.http.listen
        );
    }
    // A role that fails (say, the HTTP address is taken) stops everything.
    let mut failure: Option<anyhow::Error> = None;
    let mut pending = role_tasks;
    while !pending.is_empty() {
        let (result, _, rest) = futures::future::select_all(pending).await;
        pending = rest;
        let error = match result {
            Ok(Ok(())) => continue,
            Ok(Err(error)) => error,
            Err(panic) => anyhow::anyhow!("a role stopped unexpectedly: {panic}"),
        };
        failure.get_or_insert(error);
        shutdown.cancel();
    }
    agents_shutdown.cancel();
    for task in agent_tasks {
        if let Ok(Err(error)) = task.await {
            failure.get_or_insert(error.into());
        }
    }
    presence_stop.cancel();
    if let Some(presence) = presence {
        let _ = presence.await;
    }
    if let Some(server) = metrics_server {
        let _ = server.await;
    }
    match failure {
        Some(error) => Err(error),
        None => Ok(()),
    }
}
