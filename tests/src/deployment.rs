//! A deployment of separate `yard` processes against a private nats-server or a three-node
//! NATS cluster, for multi-master tests.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::api::Api;
use crate::process::YardProcess;
use crate::NatsServer;

pub struct Deployment {
    pub dir: tempfile::TempDir,
    pub nats: Vec<NatsServer>,
    pub config_path: PathBuf,
    processes: BTreeMap<String, YardProcess>,
    uis: BTreeMap<String, Api>,
    /// Extra environment of the processes started later, by process name.
    env: BTreeMap<String, Vec<(String, String)>>,
}

impl Deployment {
    /// A deployment on one private nats-server with the configuration `toml`.
    pub fn new(toml: &str) -> Deployment {
        let dir = tempfile::tempdir().expect("temp dir");
        let nats = vec![crate::start_nats(dir.path())];
        Self::with_nats(dir, nats, toml)
    }

    /// A deployment on a three-node NATS cluster; streams and buckets get three replicas.
    pub fn on_cluster(toml: &str) -> Deployment {
        let dir = tempfile::tempdir().expect("temp dir");
        let binary = NatsServer::locate_binary().expect("nats-server (scripts/test installs it)");
        let nats = NatsServer::start_cluster(&binary, &dir.path().join("nats")).expect("cluster starts");
        Self::with_nats(dir, nats, &format!("[nats]\nreplicas = 3\n\n{toml}"))
    }

    /// A deployment on `nats`, a server the test started itself (with a configuration of its
    /// own), keeping its files in `dir`.
    pub fn on_server(dir: tempfile::TempDir, nats: NatsServer, toml: &str) -> Deployment {
        Self::with_nats(dir, vec![nats], toml)
    }

    /// Sets extra environment variables (its NATS user, say) for the process `name` started
    /// from now on.
    pub fn set_env(&mut self, name: &str, env: &[(&str, &str)]) {
        let env = env
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()));
        self.env.insert(name.to_owned(), env.collect());
    }

    fn env_of(&self, name: &str) -> Vec<(&str, &str)> {
        self.env
            .get(name)
            .into_iter()
            .flatten()
            .map(|(key, value)| (key.as_str(), value.as_str()))
            .collect()
    }

    /// Waits until the bus answers and holds every stream and bucket (on a fresh cluster,
    /// until JetStream has elected its leaders), so that the processes started next find a
    /// working bus.
    pub async fn provision(&self) {
        let mut config = services::YardConfig::from_toml(
            Some(&std::fs::read_to_string(&self.config_path).expect("config")),
            "test config",
            Vec::new(),
        )
        .expect("config loads");
        config.nats.url = self.nats_url();
        let bus = services::Bus::connect(&config.nats, &config.engine, "test-provisioning")
            .await
            .expect("the bus is ready");
        bus.close().await;
    }

    fn with_nats(dir: tempfile::TempDir, nats: Vec<NatsServer>, toml: &str) -> Deployment {
        let config_path = dir.path().join("yard.toml");
        let toml = toml.replace("{dir}", &dir.path().display().to_string());
        std::fs::write(&config_path, toml).expect("config written");
        Deployment {
            dir,
            nats,
            config_path,
            processes: BTreeMap::new(),
            uis: BTreeMap::new(),
            env: BTreeMap::new(),
        }
    }

    /// Every NATS URL, comma-separated.
    pub fn nats_url(&self) -> String {
        self.nats
            .iter()
            .map(|server| server.url().to_owned())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Waits until every node of the cluster says it is healthy: JetStream up and every
    /// stream and consumer current (a restarted node has caught up). Killing a node before
    /// then takes down a second copy of what the cluster is still restoring.
    pub async fn wait_nats_current(&self, deadline: Duration) {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .expect("http client");
        let health: Vec<String> = self
            .nats
            .iter()
            .filter_map(|node| node.monitoring_url())
            .map(|url| format!("{url}/healthz"))
            .collect();
        assert_eq!(health.len(), self.nats.len(), "every node has a monitoring port");
        crate::wait_until("every NATS node current", deadline, || async {
            for url in &health {
                let healthy = http
                    .get(url)
                    .send()
                    .await
                    .is_ok_and(|response| response.status().is_success());
                if !healthy {
                    return None;
                }
            }
            Some(())
        })
        .await;
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Starts a master process running `role` with master id `id`.
    pub fn master(&mut self, role: &str, id: &str) {
        self.master_with(role, id, &[]);
    }

    /// Starts a master process running `role` with its own configuration `toml`.
    pub fn master_with_config(&mut self, role: &str, id: &str, toml: &str) {
        let path = self.dir.path().join(format!("{id}.toml"));
        std::fs::write(
            &path,
            toml.replace("{dir}", &self.dir.path().display().to_string()),
        )
        .expect("config");
        let nats = self.nats_url();
        let config = path.display().to_string();
        let args = [role, "--nats", nats.as_str(), "--config", config.as_str()];
        let mut env = self.env_of(id);
        env.push(("YARD_MASTERS__ID", id));
        let process = YardProcess::start_with_env(id, self.dir.path(), &args, &env);
        self.processes.insert(id.to_owned(), process);
    }

    fn master_with(&mut self, role: &str, id: &str, extra: &[&str]) {
        let nats = self.nats_url();
        let config = self.config_path.display().to_string();
        let mut args = vec![role, "--nats", &nats, "--config", &config];
        args.extend_from_slice(extra);
        let mut env = self.env_of(id);
        env.push(("YARD_MASTERS__ID", id));
        let process = YardProcess::start_with_env(id, self.dir.path(), &args, &env);
        self.processes.insert(id.to_owned(), process);
    }

    /// Starts a UI master and returns its API client.
    pub fn ui(&mut self, id: &str) -> Api {
        let http = format!("127.0.0.1:{}", crate::free_port());
        self.master_with("ui", id, &["--http", &http]);
        let api = Api::new(format!("http://{http}"));
        self.uis.insert(id.to_owned(), api.clone());
        api
    }

    /// Starts a scheduler master (`sched-1`), an engine master per id in `engines`, a UI
    /// master (`ui-1`) and `agents` (name and labels each), and waits until the UI master is
    /// healthy and sees every agent idle. Returns the UI master's API client.
    pub async fn start_masters_and_agents(&mut self, engines: &[&str], agents: &[(&str, &str)]) -> Api {
        self.master("scheduler", "sched-1");
        for id in engines {
            self.master("engine", id);
        }
        let api = self.ui("ui-1");
        for (name, labels) in agents {
            self.agent(name, labels);
        }
        api.wait_healthy().await;
        api.wait_agents(agents.len()).await;
        api
    }

    /// Starts an agent process.
    pub fn agent(&mut self, name: &str, labels: &str) {
        self.agent_with_args(name, labels, &[]);
    }

    /// Starts an agent process with extra arguments.
    pub fn agent_with_args(&mut self, name: &str, labels: &str, extra: &[&str]) {
        let nats = self.nats_url();
        let config = self.config_path.display().to_string();
        let workdir = self.dir.path().join("agents").join(name).display().to_string();
        let mut args = vec![
            "agent",
            "--nats",
            &nats,
            "--config",
            &config,
            "--name",
            name,
            "--labels",
            labels,
            "--workdir",
            &workdir,
        ];
        // A fixed speed score, unless the test gives its own.
        if !extra.contains(&"--benchmark") {
            args.extend(["--benchmark", "100"]);
        }
        args.extend_from_slice(extra);
        let process = YardProcess::start_with_env(name, self.dir.path(), &args, &self.env_of(name));
        self.processes.insert(name.to_owned(), process);
    }

    /// Kills a process at once, as a crash would.
    pub fn kill(&mut self, name: &str) {
        if let Some(process) = self.processes.get_mut(name) {
            process.kill();
        }
    }

    /// The process named `name`.
    pub fn process(&mut self, name: &str) -> &mut YardProcess {
        self.processes.get_mut(name).expect("known process")
    }

    /// What the process `name` logged so far.
    pub fn log_text(&self, name: &str) -> String {
        self.processes
            .get(name)
            .map(YardProcess::log_text)
            .unwrap_or_default()
    }

    /// The logs of every process, for failure messages.
    pub fn logs(&self) -> String {
        self.processes
            .iter()
            .map(|(name, process)| {
                let text = process.log_text();
                let tail: Vec<&str> = text.lines().rev().take(200).collect();
                format!(
                    "--- {name}\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        // A failing test shows what the processes said; the temporary directory goes with it.
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
            // YARD_TEST_LOG_DIR keeps every process's whole log for a closer look.
            if let Some(dir) = std::env::var_os("YARD_TEST_LOG_DIR") {
                let dir = std::path::PathBuf::from(dir);
                let _ = std::fs::create_dir_all(&dir);
                for (name, process) in &self.processes {
                    let _ = std::fs::write(dir.join(format!("{name}.log")), process.log_text());
                }
            }
        }
    }
}
