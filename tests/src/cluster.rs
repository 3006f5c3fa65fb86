//! Every role in the test process, against a private nats-server: the quickest real cluster.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use services::{Bus, YardConfig};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::api::Api;
use crate::NatsServer;

/// A cluster of in-process roles. Stops its roles when dropped (the nats-server is killed with
/// it).
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub nats: NatsServer,
    pub config: Arc<YardConfig>,
    pub api: Api,
    shutdown: CancellationToken,
    agents_shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    agent_tasks: Vec<JoinHandle<()>>,
}

/// An agent to start: name, labels and fixed benchmark score.
pub struct AgentSpec {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub benchmark: u64,
}

impl AgentSpec {
    pub fn new(name: &str) -> Self {
        AgentSpec {
            name: name.into(),
            labels: BTreeMap::new(),
            benchmark: 100,
        }
    }
}

impl Cluster {
    /// Starts scheduler, engine, UI and `agents` with the configuration `toml`.
    pub async fn start(toml: &str, agents: Vec<AgentSpec>) -> Cluster {
        Self::start_with_engines(toml, agents, 1).await
    }

    /// Like [`Cluster::start`], with an API client that sends `token`.
    pub async fn start_with_token(toml: &str, agents: Vec<AgentSpec>, token: &str) -> Cluster {
        Self::start_full(toml, agents, 1, Some(token)).await
    }

    /// Like [`Cluster::start`], with `engines` engine masters.
    pub async fn start_with_engines(toml: &str, agents: Vec<AgentSpec>, engines: usize) -> Cluster {
        Self::start_full(toml, agents, engines, None).await
    }

    async fn start_full(toml: &str, agents: Vec<AgentSpec>, engines: usize, token: Option<&str>) -> Cluster {
        crate::init_logging();
        let dir = tempfile::tempdir().expect("temp dir");
        let nats = crate::start_nats(dir.path());
        let mut config =
            YardConfig::from_toml(Some(toml), "test config", Vec::new()).expect("test config loads");
        config.nats.url = nats.url().to_owned();
        config.validate().expect("test config is valid");
        config.masters.id = Some(services::presence::master_id(&config));
        let config = Arc::new(config);
        let shutdown = CancellationToken::new();
        let agents_shutdown = CancellationToken::new();
        let mut tasks = Vec::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut api = Api::new(format!("http://{}", listener.local_addr().expect("address")));
        if let Some(token) = token {
            api = api.with_token(token);
        }

        let bus = connect(&config).await;
        let (c, s) = (Arc::clone(&config), shutdown.clone());
        tasks.push(tokio::spawn(async move {
            scheduler_master::run(c, bus, s).await.expect("scheduler runs");
        }));
        for number in 1..=engines {
            let bus = connect(&config).await;
            let mut engine_config = (*config).clone();
            engine_config.masters.id = Some(format!("engine-{number}"));
            let (c, s) = (Arc::new(engine_config), shutdown.clone());
            tasks.push(tokio::spawn(async move {
                engine_master::run(c, bus, s).await.expect("engine runs");
            }));
        }
        let bus = connect(&config).await;
        let (c, s) = (Arc::clone(&config), shutdown.clone());
        tasks.push(tokio::spawn(async move {
            ui_master::serve(c, bus, listener, s).await.expect("ui runs");
        }));
        let agent_count = agents.len();
        let mut cluster = Cluster {
            dir,
            nats,
            config,
            api,
            shutdown,
            agents_shutdown,
            tasks,
            agent_tasks: Vec::new(),
        };
        for spec in agents {
            cluster.spawn_agent(spec).await;
        }
        cluster.api.wait_healthy().await;
        cluster.api.wait_agents(agent_count).await;
        cluster
    }

    /// Starts one more agent and waits until the API lists it.
    pub async fn add_agent(&mut self, spec: AgentSpec) {
        let name = spec.name.clone();
        self.spawn_agent(spec).await;
        let api = self.api.clone();
        crate::wait_until(
            &format!("agent {name} to register"),
            Duration::from_secs(30),
            || async {
                let (_, body) = api.get("/api/v1/agents").await;
                body["agents"]
                    .as_array()?
                    .iter()
                    .any(|agent| agent["name"] == name.as_str())
                    .then_some(())
            },
        )
        .await;
    }

    async fn spawn_agent(&mut self, spec: AgentSpec) {
        let bus = connect(&self.config).await;
        let settings = agent::Settings {
            workdir: self.dir.path().join("agents").join(&spec.name),
            name: spec.name,
            labels: spec.labels,
            instance: self.config.instance.id.clone(),
            benchmark: Some(spec.benchmark),
            heartbeat: self.config.agent.heartbeat,
            protocol: bus_schema::PROTOCOL_VERSION,
            toolkit_cache_bytes: self.config.agent.toolkit_cache_bytes,
            simulate: false,
            step_started: None,
        };
        let shutdown = self.agents_shutdown.clone();
        self.agent_tasks.push(tokio::spawn(async move {
            agent::run(settings, bus, shutdown).await.expect("agent runs");
        }));
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().to_owned()
    }

    /// Stops every role, masters first (an engine finishes the builds it runs, so agents stay
    /// until it has), and waits for them.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
        self.agents_shutdown.cancel();
        for task in self.agent_tasks.drain(..) {
            let _ = task.await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.agents_shutdown.cancel();
    }
}

async fn connect(config: &YardConfig) -> Bus {
    Bus::connect(&config.nats, &config.engine, "test")
        .await
        .expect("bus connects")
}
