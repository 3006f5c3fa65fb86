//! Layered configuration: defaults, then a TOML file, then `YARD_*` environment variables,
//! then command-line flags, then one [`YardConfig::validate`] that names the file, the key and
//! the problem.
//!
//! Environment overrides use `__` between keys, e.g. `YARD_NATS__URL` sets `[nats] url` and
//! `YARD_HTTP__LISTEN` sets `[http] listen`. Variables without `__` (such as
//! `YARD_NATS_SERVER`) are not configuration keys and are left alone.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::selector::{AgentSelector, SelectorError};

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{origin}: {source}")]
    Load {
        origin: String,
        #[source]
        source: config::ConfigError,
    },
    #[error("{origin}: {key}: {problem}")]
    Invalid {
        origin: String,
        key: String,
        problem: String,
    },
}

/// The whole configuration of a Yardmaster deployment. Every role reads the same file and
/// uses the parts it needs.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct YardConfig {
    #[serde(default)]
    pub instance: InstanceConfig,
    #[serde(default)]
    pub nats: NatsConfig,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub engine: EngineConfig,
    #[serde(default)]
    pub agent: AgentConfig,
    #[serde(default)]
    pub masters: MastersConfig,
    #[serde(default)]
    pub hooks: HooksConfig,
    #[serde(default, rename = "builder")]
    pub builders: Vec<BuilderConfig>,
    #[serde(default, rename = "scheduler")]
    pub schedulers: Vec<SchedulerConfig>,
    /// Resource pools as they start; the API can change them at run time.
    #[serde(default, rename = "pool")]
    pub pools: Vec<PoolConfig>,
    /// Deployments an agent serves at once; empty: the one of `[nats]` and `[instance]`.
    #[serde(default, rename = "connection")]
    pub connections: Vec<ConnectionConfig>,
    /// Where the configuration came from, for error messages.
    #[serde(skip)]
    pub origin: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceConfig {
    /// Names this deployment; an agent serving several deployments keeps their files apart by it.
    #[serde(default = "default_instance_id")]
    pub id: String,
}

impl Default for InstanceConfig {
    fn default() -> Self {
        InstanceConfig {
            id: default_instance_id(),
        }
    }
}

fn default_instance_id() -> String {
    "default".into()
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// One URL, or several separated by commas (the servers of a cluster).
    #[serde(default = "default_nats_url")]
    pub url: String,
    /// Replicas of every stream and bucket this deployment creates (3 on a cluster).
    #[serde(default = "default_replicas")]
    pub replicas: usize,
    /// Upper bound of one JetStream request.
    #[serde(default = "default_request_timeout", with = "duration")]
    pub request_timeout: Duration,
    /// A NATS credentials file (user JWT and seed), when the servers require one.
    #[serde(default)]
    pub credentials: Option<PathBuf>,
    /// The NATS user, with `password`, when the servers authenticate users by password (as
    /// the configuration `yard nats-config` writes does). Replies then come to
    /// `_INBOX.<user>.>`, which that configuration lets only this user read.
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub password: Option<Secret>,
    /// CA certificate(s) (PEM) to trust for the servers' TLS certificates; setting it
    /// requires TLS.
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate and key (PEM), for servers that verify their clients.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: default_nats_url(),
            replicas: default_replicas(),
            request_timeout: default_request_timeout(),
            credentials: None,
            user: None,
            password: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
        }
    }
}

impl NatsConfig {
    /// Checks that user and password come together, never with a credentials file, and a
    /// client certificate with its key; the error names the key and the problem.
    pub fn check_authentication(&self) -> Result<(), (&'static str, &'static str)> {
        match (&self.user, &self.password) {
            (Some(user), Some(_)) if user.trim().is_empty() => return Err(("user", "must not be empty")),
            (Some(_), None) => return Err(("password", "is needed with `user`")),
            (None, Some(_)) => return Err(("user", "is needed with `password`")),
            _ => {}
        }
        if self.user.is_some() && self.credentials.is_some() {
            return Err((
                "credentials",
                "cannot be used together with `user` and `password`",
            ));
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(("tls_cert", "`tls_cert` and `tls_key` go together"));
        }
        Ok(())
    }
}

/// A secret string (a password): shown as `***` by `Debug`.
#[derive(Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// One deployment an agent serves (`[[connection]]`): an agent process listing several serves
/// them all at once, one build at a time across them, keeping each one's files under
/// `<workdir>/<instance>/`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionConfig {
    /// The deployment's NATS server URL(s), comma-separated.
    pub url: String,
    /// A NATS credentials file for this deployment.
    #[serde(default)]
    pub credentials: Option<PathBuf>,
    /// User and password on this deployment's servers (see `[nats] user`).
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub password: Option<Secret>,
    /// TLS settings for this deployment's servers (see `[nats] tls_ca`).
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// The deployment's `[instance] id`.
    pub instance: String,
}

impl ConnectionConfig {
    /// The NATS settings of this connection, the rest taken from `base`.
    pub fn nats(&self, base: &NatsConfig) -> NatsConfig {
        NatsConfig {
            url: self.url.clone(),
            credentials: self.credentials.clone(),
            user: self.user.clone(),
            password: self.password.clone(),
            tls_ca: self.tls_ca.clone(),
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            ..base.clone()
        }
    }
}

fn default_nats_url() -> String {
    "nats://127.0.0.1:4222".into()
}
fn default_replicas() -> usize {
    1
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(5)
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    #[serde(default = "default_listen")]
    pub listen: String,
    /// API tokens. Once any is configured, every write (force, cancel, drain, pools, changes)
    /// needs `Authorization: Bearer <token>`.
    #[serde(default, rename = "token")]
    pub tokens: Vec<ApiToken>,
    /// Whether reads (the API's GETs and the UI) are open to anyone.
    #[serde(default = "default_true")]
    pub open_reads: bool,
    /// Allows listening beyond loopback without any token, so that anyone who can reach the
    /// address can write. Off: such a configuration refuses to start.
    #[serde(default)]
    pub allow_open_writes: bool,
    /// Where a process without the UI role serves `GET /metrics` (port 0: any free port; the
    /// masters registry says which).
    #[serde(default = "default_metrics_listen")]
    pub metrics_listen: String,
    /// How often a UI master snapshots its view to the object store (when it changed), so a
    /// restart replays only what came after; 0 turns snapshots off.
    #[serde(default = "default_snapshot_interval", with = "duration")]
    pub snapshot_interval: Duration,
    /// Largest request body the UI master accepts (API and hooks); a larger one gets 413.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// How long the UI master works on one request before answering 408 (the live streams
    /// are exempt: they last as long as their client stays).
    #[serde(default = "default_http_request_timeout", with = "duration")]
    pub request_timeout: Duration,
    /// Requests the UI master works on at once; more get 503 at once instead of waiting.
    #[serde(default = "default_max_concurrent_requests")]
    pub max_concurrent_requests: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: default_listen(),
            tokens: Vec::new(),
            open_reads: true,
            allow_open_writes: false,
            metrics_listen: default_metrics_listen(),
            snapshot_interval: default_snapshot_interval(),
            max_body_bytes: default_max_body_bytes(),
            request_timeout: default_http_request_timeout(),
            max_concurrent_requests: default_max_concurrent_requests(),
        }
    }
}

fn default_max_body_bytes() -> usize {
    1024 * 1024
}

fn default_http_request_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_max_concurrent_requests() -> usize {
    1024
}

fn default_snapshot_interval() -> Duration {
    Duration::from_secs(60)
}

fn default_metrics_listen() -> String {
    "127.0.0.1:0".into()
}

fn default_true() -> bool {
    true
}

/// A named API token.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiToken {
    pub user: String,
    pub token: String,
}

fn default_listen() -> String {
    "127.0.0.1:8080".into()
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    /// How long a claimed build request stays claimed without a sign of life from its engine.
    #[serde(default = "default_claim_timeout", with = "duration")]
    pub claim_timeout: Duration,
    /// How long an agent may be silent before its steps are declared lost.
    #[serde(default = "default_agent_timeout", with = "duration")]
    pub agent_timeout: Duration,
    /// How long a shutting-down engine lets running builds finish before it leaves them to
    /// another engine.
    #[serde(default = "default_drain_timeout", with = "duration")]
    pub drain_timeout: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            claim_timeout: default_claim_timeout(),
            agent_timeout: default_agent_timeout(),
            drain_timeout: default_drain_timeout(),
        }
    }
}

fn default_claim_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_agent_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_drain_timeout() -> Duration {
    Duration::from_secs(60)
}

/// Secrets of the VCS change hooks; a hook whose section is missing is refused.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HooksConfig {
    #[serde(default)]
    pub github: Option<HookSecret>,
    #[serde(default)]
    pub gitlab: Option<HookToken>,
    #[serde(default)]
    pub gitea: Option<HookSecret>,
}

/// The shared secret a provider signs hook bodies with (HMAC-SHA256).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HookSecret {
    pub secret: String,
}

/// The token a provider sends with each hook.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HookToken {
    pub token: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MastersConfig {
    /// This master's id; default: `<host>-<random>`, new at every start.
    #[serde(default)]
    pub id: Option<String>,
    /// How often a master refreshes its record.
    #[serde(default = "default_master_heartbeat", with = "duration")]
    pub heartbeat: Duration,
    /// A master silent this long is declared dead.
    #[serde(default = "default_dead_after", with = "duration")]
    pub dead_after: Duration,
    /// How often a master repairs anything its push events missed.
    #[serde(default = "default_reconcile_interval", with = "duration")]
    pub reconcile_interval: Duration,
}

impl Default for MastersConfig {
    fn default() -> Self {
        MastersConfig {
            id: None,
            heartbeat: default_master_heartbeat(),
            dead_after: default_dead_after(),
            reconcile_interval: default_reconcile_interval(),
        }
    }
}

fn default_master_heartbeat() -> Duration {
    Duration::from_secs(2)
}
fn default_dead_after() -> Duration {
    Duration::from_secs(10)
}
fn default_reconcile_interval() -> Duration {
    Duration::from_secs(30)
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Defaults to the host name.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Root of the agent's files; defaults to `./yard-agent`.
    #[serde(default)]
    pub workdir: Option<PathBuf>,
    /// Fixed speed score, instead of measuring one at start.
    #[serde(default)]
    pub benchmark: Option<u64>,
    #[serde(default = "default_heartbeat", with = "duration")]
    pub heartbeat: Duration,
    /// Largest size of the toolkits kept per deployment; the least recently used go first.
    #[serde(default = "default_toolkit_cache_bytes")]
    pub toolkit_cache_bytes: u64,
}

fn default_toolkit_cache_bytes() -> u64 {
    1 << 30
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            name: None,
            labels: BTreeMap::new(),
            workdir: None,
            benchmark: None,
            toolkit_cache_bytes: default_toolkit_cache_bytes(),
            heartbeat: default_heartbeat(),
        }
    }
}

fn default_heartbeat() -> Duration {
    Duration::from_secs(3)
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BuilderConfig {
    pub name: String,
    /// Which agents may run the builder, in the `agents` expression language.
    #[serde(default)]
    pub agents: String,
    #[serde(default)]
    pub steps: Vec<StepConfig>,
    /// Properties every build of this builder starts with.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// How many times a build starts over when its agent is lost before it ends `lost`.
    #[serde(default = "default_retries")]
    pub retries: u32,
    #[serde(default)]
    pub deadlock: DeadlockPolicy,
    /// Toolkits (`NAME@VERSION`) every step of the builder needs.
    #[serde(default)]
    pub toolkits: Vec<String>,
    /// Secrets every command step gets as environment variables, by variable name. Their
    /// values are read on the engine master when a step is assigned, travel only in the step's
    /// assignment (never in a stored message) and are masked as `***` in the step's log.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secrets: BTreeMap<String, SecretSource>,
}

/// Where a builder secret's value comes from: exactly one of `env` (a variable of the engine
/// master's environment) or `file` (a file on the engine master, its trailing newlines
/// trimmed). Only the source is configuration; the value is never part of it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SecretSource {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
}

impl<'de> Deserialize<'de> for SecretSource {
    /// A table of `env` and `file`; anything else (a value written in place of its source,
    /// say) is refused without echoing it.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Fields {
            #[serde(default)]
            env: Option<String>,
            #[serde(default)]
            file: Option<PathBuf>,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Written {
            Source(Fields),
            Other(serde::de::IgnoredAny),
        }
        match Written::deserialize(deserializer)? {
            Written::Source(Fields { env, file }) => Ok(SecretSource { env, file }),
            Written::Other(_) => Err(serde::de::Error::custom(
                "a secret is `{ env = \"VAR\" }` or `{ file = \"/path\" }` (its source, never its value)",
            )),
        }
    }
}

impl std::fmt::Display for SecretSource {
    /// Names the source (never the value): `environment variable X` or `file /path`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.env, &self.file) {
            (Some(variable), _) => write!(f, "environment variable {variable}"),
            (None, Some(path)) => write!(f, "file {}", path.display()),
            (None, None) => f.write_str("no source"),
        }
    }
}

fn default_retries() -> u32 {
    1
}

impl BuilderConfig {
    /// The parsed `agents` expression (checked by `validate`).
    pub fn selector(&self) -> Result<AgentSelector, SelectorError> {
        AgentSelector::parse(&self.agents)
    }

    /// Every step of the tree, depth-first; a step's index is its position here.
    pub fn flat_steps(&self) -> Vec<FlatStep<'_>> {
        fn walk<'a>(
            steps: &'a [StepConfig],
            prefix: &str,
            parent: Option<u32>,
            out: &mut Vec<FlatStep<'a>>,
        ) -> Vec<u32> {
            let mut indices = Vec::new();
            for step in steps {
                let index = out.len() as u32;
                let path = if prefix.is_empty() {
                    step.name.clone()
                } else {
                    format!("{prefix}/{}", step.name)
                };
                out.push(FlatStep {
                    index,
                    path: path.clone(),
                    step,
                    parent,
                    children: Vec::new(),
                });
                let children = walk(step.children(), &path, Some(index), out);
                out[index as usize].children = children;
                indices.push(index);
            }
            indices
        }
        let mut out = Vec::new();
        walk(&self.steps, "", None, &mut out);
        out
    }
}

/// A step: a command (`run`), a sequence (`steps`) or a parallel group (`parallel`), nested
/// to any depth. A step with its own `agents` takes an agent matching it and holds it until
/// the step and its children end; a step without one runs on its parent's agent.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StepConfig {
    pub name: String,
    /// Shell text, run as `/bin/sh -c <run>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
    /// Children run one after another; the first failure skips the rest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<Vec<StepConfig>>,
    /// Children run at the same time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel: Option<Vec<StepConfig>>,
    /// Takes a server from a resource pool and sets a build property to its name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acquire: Option<AcquireConfig>,
    /// Gives a pool server back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<ReleaseConfig>,
    /// Which agents may run this step and its children; `${PROPERTY}` is replaced by the
    /// build property's value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agents: Option<String>,
    #[serde(default, with = "optional_duration")]
    pub timeout: Option<Duration>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Toolkits (`NAME@VERSION`) this step needs besides its builder's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub toolkits: Vec<String>,
}

/// A resource pool: the servers of one role.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    pub role: String,
    pub servers: Vec<String>,
}

/// Whether an acquisition excludes every other role (`global`) or only its own (`role`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolScope {
    #[default]
    Global,
    Role,
}

impl PoolScope {
    pub fn as_str(self) -> &'static str {
        match self {
            PoolScope::Global => "global",
            PoolScope::Role => "role",
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AcquireConfig {
    pub role: String,
    /// The build property that receives the acquired server's name.
    #[serde(rename = "as")]
    pub property: String,
    #[serde(default)]
    pub scope: PoolScope,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseConfig {
    pub role: String,
    /// The server to give back, usually `${PROPERTY}`.
    pub server: String,
}

/// What a step does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepKind {
    Command,
    Sequence,
    Parallel,
    Acquire,
    Release,
}

impl StepKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StepKind::Command => "command",
            StepKind::Sequence => "sequence",
            StepKind::Parallel => "parallel",
            StepKind::Acquire => "acquire",
            StepKind::Release => "release",
        }
    }
}

impl StepConfig {
    pub fn kind(&self) -> StepKind {
        if self.steps.is_some() {
            StepKind::Sequence
        } else if self.parallel.is_some() {
            StepKind::Parallel
        } else if self.acquire.is_some() {
            StepKind::Acquire
        } else if self.release.is_some() {
            StepKind::Release
        } else {
            StepKind::Command
        }
    }

    pub fn children(&self) -> &[StepConfig] {
        self.steps.as_deref().or(self.parallel.as_deref()).unwrap_or(&[])
    }

    /// The parsed `agents` expression, if the step has its own.
    pub fn selector(&self) -> Option<Result<AgentSelector, SelectorError>> {
        self.agents.as_deref().map(AgentSelector::parse)
    }
}

/// One step of a builder's tree, in depth-first order.
#[derive(Debug, Clone)]
pub struct FlatStep<'a> {
    pub index: u32,
    pub path: String,
    pub step: &'a StepConfig,
    pub parent: Option<u32>,
    pub children: Vec<u32>,
}

/// What a builder does when one of its builds is caught in a deadlock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
pub enum DeadlockPolicy {
    /// End the newest build of the cycle with result `deadlock`, freeing its agents.
    #[default]
    #[serde(rename = "fail-newest")]
    FailNewest,
    /// Only report the deadlock.
    #[serde(rename = "wait")]
    Wait,
}

impl DeadlockPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            DeadlockPolicy::FailNewest => "fail-newest",
            DeadlockPolicy::Wait => "wait",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum SchedulerKind {
    /// Starts builds for changes that pass its branch and project filters.
    #[serde(rename = "on-change")]
    OnChange,
    /// Lets people start builds of its builders by hand.
    #[serde(rename = "force")]
    Force,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerConfig {
    pub name: String,
    pub kind: SchedulerKind,
    /// Branches whose changes start builds; empty means every branch.
    #[serde(default)]
    pub branches: Vec<String>,
    /// Projects whose changes start builds; empty means every project.
    #[serde(default)]
    pub projects: Vec<String>,
    pub builders: Vec<String>,
}

impl SchedulerConfig {
    /// True if a change on this branch of this project should start this scheduler's builds.
    pub fn accepts(&self, branch: &str, project: &str) -> bool {
        self.kind == SchedulerKind::OnChange
            && (self.branches.is_empty() || self.branches.iter().any(|b| b == branch))
            && (self.projects.is_empty() || self.projects.iter().any(|p| p == project))
    }
}

impl YardConfig {
    /// Loads `path` (or only defaults when `None`) with environment overrides on top.
    pub fn load(path: Option<&Path>) -> Result<Self, Error> {
        let text = match path {
            Some(path) => Some(std::fs::read_to_string(path).map_err(|error| Error::Invalid {
                origin: path.display().to_string(),
                key: "(file)".into(),
                problem: format!("cannot read: {error}"),
            })?),
            None => None,
        };
        let origin = path.map_or_else(|| "built-in defaults".to_owned(), |p| p.display().to_string());
        Self::from_toml(text.as_deref(), &origin, std::env::vars())
    }

    /// Loads configuration from TOML text, with overrides from `environment` (name, value)
    /// pairs; only `YARD_<KEY>__<KEY>` names count.
    pub fn from_toml(
        text: Option<&str>,
        origin: &str,
        environment: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, Error> {
        let overrides: config::Map<String, String> = environment
            .into_iter()
            .filter(|(name, _)| name.starts_with("YARD_") && name.contains("__"))
            .collect();
        let mut builder = config::Config::builder();
        if let Some(text) = text {
            builder = builder.add_source(config::File::from_str(text, config::FileFormat::Toml));
        }
        builder = builder.add_source(
            config::Environment::with_prefix("YARD")
                .prefix_separator("_")
                .separator("__")
                .try_parsing(true)
                .source(Some(overrides)),
        );
        let load_error = |source| Error::Load {
            origin: origin.to_owned(),
            source,
        };
        let mut config: YardConfig = builder
            .build()
            .map_err(load_error)?
            .try_deserialize()
            .map_err(load_error)?;
        config.origin = origin.to_owned();
        Ok(config)
    }

    fn invalid(&self, key: impl Into<String>, problem: impl Into<String>) -> Error {
        Error::Invalid {
            origin: self.origin.clone(),
            key: key.into(),
            problem: problem.into(),
        }
    }

    /// Checks everything that deserialization cannot: names, references, expressions.
    pub fn validate(&self) -> Result<(), Error> {
        if !bus_schema::subjects::is_valid_token(&self.instance.id) {
            return Err(self.invalid("instance.id", "use letters, digits, `-` and `_` only"));
        }
        if self.nats.url.trim().is_empty() {
            return Err(self.invalid("nats.url", "must not be empty"));
        }
        if !(1..=5).contains(&self.nats.replicas) {
            return Err(self.invalid("nats.replicas", "must be between 1 and 5"));
        }
        if let Err((key, problem)) = self.nats.check_authentication() {
            return Err(self.invalid(format!("nats.{key}"), problem));
        }
        if let Some(id) = &self.masters.id {
            if !bus_schema::subjects::is_valid_token(id) {
                return Err(self.invalid(
                    "masters.id",
                    format!("{id:?}: use letters, digits, `-` and `_` only"),
                ));
            }
        }
        if self.masters.dead_after <= self.masters.heartbeat {
            return Err(self.invalid("masters.dead_after", "must be longer than masters.heartbeat"));
        }
        if self.http.max_body_bytes == 0 {
            return Err(self.invalid("http.max_body_bytes", "must be more than 0"));
        }
        if self.http.request_timeout.is_zero() {
            return Err(self.invalid("http.request_timeout", "must be longer than 0"));
        }
        if self.http.max_concurrent_requests == 0 {
            return Err(self.invalid("http.max_concurrent_requests", "must be more than 0"));
        }
        let mut instances = HashSet::new();
        for (position, connection) in self.connections.iter().enumerate() {
            let key = format!("connection[{position}]");
            if !bus_schema::subjects::is_valid_token(&connection.instance) {
                return Err(self.invalid(
                    format!("{key}.instance"),
                    format!("{:?}: use letters, digits, `-` and `_` only", connection.instance),
                ));
            }
            if !instances.insert(connection.instance.as_str()) {
                return Err(self.invalid(
                    format!("{key}.instance"),
                    format!(
                        "{:?} is listed twice: each connection is one deployment",
                        connection.instance
                    ),
                ));
            }
            if connection.url.trim().is_empty() {
                return Err(self.invalid(format!("{key}.url"), "must not be empty"));
            }
            if let Err((field, problem)) = connection.nats(&self.nats).check_authentication() {
                return Err(self.invalid(format!("{key}.{field}"), problem));
            }
        }
        if let Some(name) = &self.agent.name {
            if !bus_schema::subjects::is_valid_token(name) {
                return Err(self.invalid(
                    "agent.name",
                    format!("{name:?}: use letters, digits, `-` and `_` only"),
                ));
            }
        }
        let mut builder_names = HashSet::new();
        for (position, builder) in self.builders.iter().enumerate() {
            let key = format!("builder[{position}]");
            if !bus_schema::subjects::is_valid_token(&builder.name) {
                return Err(self.invalid(
                    format!("{key}.name"),
                    format!("{:?}: use 1 to 128 letters, digits, `-` and `_`", builder.name),
                ));
            }
            if !builder_names.insert(builder.name.as_str()) {
                return Err(self.invalid(
                    format!("{key}.name"),
                    format!("builder {:?} is defined twice", builder.name),
                ));
            }
            if let Err(error) = builder.selector() {
                return Err(self.invalid(format!("{key}.agents"), format!("{:?}: {error}", builder.agents)));
            }
            if builder.steps.is_empty() {
                return Err(self.invalid(format!("{key}.steps"), "a builder needs at least one step"));
            }
            self.validate_toolkits(&builder.toolkits, &format!("{key}.toolkits"))?;
            self.validate_secrets(builder, &format!("{key}.secrets"))?;
            self.validate_steps(&builder.steps, &format!("{key}.steps"))?;
            let steps = builder.flat_steps().len();
            if steps > bus_schema::build::MAX_STEPS as usize {
                return Err(self.invalid(
                    format!("{key}.steps"),
                    format!(
                        "{steps} steps; a builder has at most {}",
                        bus_schema::build::MAX_STEPS
                    ),
                ));
            }
        }
        let mut roles = HashSet::new();
        for (position, pool) in self.pools.iter().enumerate() {
            let key = format!("pool[{position}]");
            if !bus_schema::subjects::is_valid_token(&pool.role) {
                return Err(self.invalid(format!("{key}.role"), "use letters, digits, `-` and `_` only"));
            }
            if !roles.insert(pool.role.as_str()) {
                return Err(self.invalid(
                    format!("{key}.role"),
                    format!("pool {:?} is defined twice", pool.role),
                ));
            }
            if let Some(bad) = pool
                .servers
                .iter()
                .find(|server| !bus_schema::subjects::is_valid_token(server))
            {
                return Err(self.invalid(
                    format!("{key}.servers"),
                    format!("{bad:?}: use letters, digits, `-` and `_` only"),
                ));
            }
        }
        let mut scheduler_names = HashSet::new();
        for (position, scheduler) in self.schedulers.iter().enumerate() {
            let key = format!("scheduler[{position}]");
            if scheduler.name.trim().is_empty() {
                return Err(self.invalid(format!("{key}.name"), "must not be empty"));
            }
            if !scheduler_names.insert(scheduler.name.as_str()) {
                return Err(self.invalid(
                    format!("{key}.name"),
                    format!("scheduler {:?} is defined twice", scheduler.name),
                ));
            }
            if scheduler.builders.is_empty() {
                return Err(self.invalid(format!("{key}.builders"), "name at least one builder"));
            }
            for builder in &scheduler.builders {
                if !builder_names.contains(builder.as_str()) {
                    return Err(self.invalid(
                        format!("{key}.builders"),
                        format!("no builder is named {builder:?}"),
                    ));
                }
            }
        }
        Ok(())
    }

    fn validate_toolkits(&self, toolkits: &[String], key: &str) -> Result<(), Error> {
        for spec in toolkits {
            if crate::toolkits::parse_spec(spec).is_none() {
                return Err(self.invalid(
                    key,
                    format!("{spec:?}: a toolkit is NAME@VERSION (letters, digits, `-`, `_`; the version also `.`)"),
                ));
            }
        }
        Ok(())
    }

    fn validate_secrets(&self, builder: &BuilderConfig, key: &str) -> Result<(), Error> {
        for (name, source) in &builder.secrets {
            let problem = |text: String| format!("builder {:?}, secret {name:?}: {text}", builder.name);
            if !is_env_name(name) {
                return Err(self.invalid(
                    key,
                    problem("is not a variable name (a letter or `_`, then letters, digits and `_`)".into()),
                ));
            }
            if name.starts_with("YARD_") {
                return Err(self.invalid(key, problem("`YARD_` variables are Yardmaster's own".into())));
            }
            let secret_key = format!("{key}.{name}");
            match (&source.env, &source.file) {
                (Some(variable), None) => {
                    if variable.is_empty() || variable.contains(['=', '\0']) {
                        return Err(self.invalid(
                            format!("{secret_key}.env"),
                            problem(format!("{variable:?} is not an environment variable name")),
                        ));
                    }
                }
                (None, Some(path)) => {
                    if !path.is_absolute() {
                        return Err(self.invalid(
                            format!("{secret_key}.file"),
                            problem(format!(
                                "{:?} must be an absolute path (it is read on the engine master)",
                                path.display().to_string()
                            )),
                        ));
                    }
                }
                _ => {
                    return Err(self.invalid(
                        secret_key,
                        problem(
                            "give exactly one source: `{ env = \"VAR\" }` or `{ file = \"/path\" }`".into(),
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    fn validate_steps(&self, steps: &[StepConfig], key: &str) -> Result<(), Error> {
        for (position, step) in steps.iter().enumerate() {
            let step_key = format!("{key}[{position}]");
            self.validate_toolkits(&step.toolkits, &format!("{step_key}.toolkits"))?;
            if step.name.trim().is_empty() || step.name.contains('/') {
                return Err(self.invalid(format!("{step_key}.name"), "must not be empty or contain `/`"));
            }
            let forms = [
                step.run.is_some(),
                step.steps.is_some(),
                step.parallel.is_some(),
                step.acquire.is_some(),
                step.release.is_some(),
            ];
            if forms.iter().filter(|given| **given).count() != 1 {
                return Err(self.invalid(
                    step_key,
                    "a step has exactly one of `run` (a command), `steps` (a sequence), `parallel`, `acquire` or `release`",
                ));
            }
            if let Some(acquire) = &step.acquire {
                if !bus_schema::subjects::is_valid_token(&acquire.role) {
                    return Err(self.invalid(
                        format!("{step_key}.acquire.role"),
                        "use letters, digits, `-` and `_` only",
                    ));
                }
                if !is_env_name(&acquire.property) {
                    return Err(self.invalid(
                        format!("{step_key}.acquire.as"),
                        "must be a property (variable) name",
                    ));
                }
            }
            if let Some(release) = &step.release {
                if !bus_schema::subjects::is_valid_token(&release.role) {
                    return Err(self.invalid(
                        format!("{step_key}.release.role"),
                        "use letters, digits, `-` and `_` only",
                    ));
                }
            }
            if let Some(run) = &step.run {
                if run.trim().is_empty() {
                    return Err(self.invalid(format!("{step_key}.run"), "must not be empty"));
                }
            }
            if step.timeout == Some(Duration::ZERO) {
                return Err(self.invalid(format!("{step_key}.timeout"), "must be longer than zero"));
            }
            if let Some(Err(error)) = step.selector() {
                return Err(self.invalid(
                    format!("{step_key}.agents"),
                    format!("{:?}: {error}", step.agents.as_deref().unwrap_or_default()),
                ));
            }
            for name in step.env.keys() {
                if !is_env_name(name) {
                    return Err(self.invalid(
                        format!("{step_key}.env"),
                        format!("{name:?} is not a variable name"),
                    ));
                }
            }
            if matches!(step.kind(), StepKind::Sequence | StepKind::Parallel) {
                if step.children().is_empty() {
                    return Err(
                        self.invalid(step_key, "a sequence or parallel group needs at least one step")
                    );
                }
                let child_key = format!("{step_key}.{}", step.kind().as_str().replace("sequence", "steps"));
                self.validate_steps(step.children(), &child_key)?;
            }
        }
        Ok(())
    }

    /// Builders whose nested agent selections can wait for each other in a cycle (a build
    /// holding agents of one selection while waiting for another, whose agents another build
    /// holds while waiting for the first): the recursive dependency that deadlocks builds.
    /// Each warning names the builders and expressions.
    pub fn deadlock_warnings(&self) -> Vec<String> {
        /// A hold-then-wait pair: while holding an agent matching `held`, a build of `builder`
        /// waits for one matching `wanted`.
        struct Dependency {
            builder: String,
            held: AgentSelector,
            wanted: AgentSelector,
        }
        fn collect(builder: &str, held: &AgentSelector, steps: &[StepConfig], out: &mut Vec<Dependency>) {
            for step in steps {
                let own = step.selector().and_then(Result::ok);
                if let Some(wanted) = &own {
                    out.push(Dependency {
                        builder: builder.to_owned(),
                        held: held.clone(),
                        wanted: wanted.clone(),
                    });
                }
                collect(builder, own.as_ref().unwrap_or(held), step.children(), out);
            }
        }
        let mut dependencies = Vec::new();
        for builder in &self.builders {
            if let Ok(root) = builder.selector() {
                collect(&builder.name, &root, &builder.steps, &mut dependencies);
            }
        }
        let mut warnings = Vec::new();
        for (i, first) in dependencies.iter().enumerate() {
            for second in &dependencies[i + 1..] {
                if first.wanted.may_overlap(&second.held) && second.wanted.may_overlap(&first.held) {
                    warnings.push(format!(
                        "builders {:?} and {:?} can deadlock: {} holds an agent matching `{}` while waiting for one matching `{}`, and {} holds one matching `{}` while waiting for one matching `{}`",
                        first.builder, second.builder,
                        first.builder, first.held, first.wanted,
                        second.builder, second.held, second.wanted,
                    ));
                }
            }
        }
        warnings
    }

    pub fn builder(&self, name: &str) -> Option<&BuilderConfig> {
        self.builders.iter().find(|builder| builder.name == name)
    }

    /// A digest of every scheduler and builder definition, keyed `scheduler:<name>` and
    /// `builder:<name>`, for finding masters that disagree on a definition.
    pub fn definition_digests(&self) -> BTreeMap<String, String> {
        let mut digests = BTreeMap::new();
        for scheduler in &self.schedulers {
            digests.insert(format!("scheduler:{}", scheduler.name), digest(scheduler));
        }
        for builder in &self.builders {
            digests.insert(format!("builder:{}", builder.name), digest(builder));
        }
        digests
    }

    /// True if some `force` scheduler lets people start this builder by hand.
    pub fn is_forceable(&self, builder: &str) -> bool {
        self.schedulers
            .iter()
            .any(|s| s.kind == SchedulerKind::Force && s.builders.iter().any(|b| b == builder))
    }
}

/// A short stable digest (FNV-1a over the JSON form) of a definition.
fn digest(definition: &impl Serialize) -> String {
    let text = serde_json::to_string(definition).unwrap_or_default();
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}

/// Replaces every `${NAME}` in `text` by the value of property `NAME` (by nothing when the
/// build has no such property).
pub fn substitute(text: &str, properties: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        match rest[start + 2..].find('}') {
            Some(end) => {
                let name = &rest[start + 2..start + 2 + end];
                out.push_str(properties.get(name).map(String::as_str).unwrap_or_default());
                rest = &rest[start + 3 + end..];
            }
            None => {
                out.push_str(&rest[start..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// True if `name` can be an environment variable name: a letter or `_`, then letters, digits, `_`.
pub fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|first| first.is_ascii_alphabetic() || first == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Durations written as `"90s"`, `"10m"`, `"1h 30m"` or a number of seconds.
pub mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Written {
        Seconds(u64),
        Text(String),
    }

    pub(crate) fn parse<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        match Written::deserialize(deserializer)? {
            Written::Seconds(seconds) => Ok(Duration::from_secs(seconds)),
            Written::Text(text) => match text.trim().parse::<u64>() {
                Ok(seconds) => Ok(Duration::from_secs(seconds)),
                Err(_) => humantime::parse_duration(text.trim()).map_err(|error| {
                    serde::de::Error::custom(format!("{text:?} is not a duration ({error})"))
                }),
            },
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        parse(deserializer)
    }

    pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&humantime::format_duration(*value))
    }
}

mod optional_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Duration>, D::Error> {
        #[derive(Deserialize)]
        struct Wrapped(#[serde(deserialize_with = "super::duration::parse")] Duration);
        Ok(Option::<Wrapped>::deserialize(deserializer)?.map(|Wrapped(duration)| duration))
    }

    pub fn serialize<S: Serializer>(value: &Option<Duration>, serializer: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(duration) => super::duration::serialize(duration, serializer),
            None => serializer.serialize_none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[nats]
url = "nats://127.0.0.1:4999"

[[builder]]
name = "demo"
agents = 'os == "linux"'
[[builder.steps]]
name = "compile"
run = "make"
timeout = "10m"
env = { CC = "clang" }

[[scheduler]]
name = "main"
kind = "on-change"
branches = ["main"]
builders = ["demo"]
"#;

    fn load(text: &str) -> Result<YardConfig, Error> {
        let config = YardConfig::from_toml(Some(text), "test.toml", Vec::new())?;
        config.validate()?;
        Ok(config)
    }

    #[test]
    fn loads_the_public_names() {
        let config = load(GOOD).unwrap();
        assert_eq!(config.nats.url, "nats://127.0.0.1:4999");
        let builder = config.builder("demo").unwrap();
        assert_eq!(builder.steps[0].timeout, Some(Duration::from_secs(600)));
        assert_eq!(builder.steps[0].env["CC"], "clang");
        assert!(config.schedulers[0].accepts("main", ""));
        assert!(!config.schedulers[0].accepts("feature", ""));
    }

    #[test]
    fn environment_overrides_the_file() {
        let environment = vec![
            ("YARD_NATS__URL".to_owned(), "nats://10.0.0.1:4222".to_owned()),
            ("YARD_NATS_SERVER".to_owned(), "/not/a/key".to_owned()),
            ("YARD_ENGINE__AGENT_TIMEOUT".to_owned(), "20s".to_owned()),
        ];
        let config = YardConfig::from_toml(Some(GOOD), "test.toml", environment).unwrap();
        assert_eq!(config.nats.url, "nats://10.0.0.1:4222");
        assert_eq!(config.engine.agent_timeout, Duration::from_secs(20));
    }

    #[test]
    fn errors_name_the_file_the_key_and_the_problem() {
        let bad_expression = GOOD.replace(r#"'os == "linux"'"#, r#"'os = "linux"'"#);
        let message = load(&bad_expression).unwrap_err().to_string();
        assert!(message.starts_with("test.toml: builder[0].agents: "), "{message}");
        assert!(message.contains("column 4"), "{message}");

        let unknown_builder = GOOD.replace(r#"builders = ["demo"]"#, r#"builders = ["nope"]"#);
        let message = load(&unknown_builder).unwrap_err().to_string();
        assert!(
            message.contains("scheduler[0].builders") && message.contains("\"nope\""),
            "{message}"
        );

        let bad_timeout = GOOD.replace(r#""10m""#, r#""ten minutes""#);
        let message = load(&bad_timeout).unwrap_err().to_string();
        assert!(
            message.contains("test.toml") && message.contains("ten minutes"),
            "{message}"
        );

        let typo = GOOD.replace("[nats]", "[nats]\nulr = \"x\"");
        let message = load(&typo).unwrap_err().to_string();
        assert!(message.contains("ulr"), "{message}");

        let message = load("this is not toml").unwrap_err().to_string();
        assert!(message.starts_with("test.toml: "), "{message}");

        let bad_kind = GOOD.replace(r#"kind = "on-change""#, r#"kind = "nightly""#);
        let message = load(&bad_kind).unwrap_err().to_string();
        assert!(message.contains("nightly"), "{message}");
    }

    #[test]
    fn properties_are_substituted() {
        let properties: BTreeMap<String, String> = [("SERVER".to_owned(), "s3".to_owned())].into();
        assert_eq!(
            substitute(r#"name == "${SERVER}""#, &properties),
            r#"name == "s3""#
        );
        assert_eq!(substitute("${MISSING}-x", &properties), "-x");
        assert_eq!(substitute("no ${ end", &properties), "no ${ end");
    }

    #[test]
    fn secrets_name_their_source() {
        let text = GOOD.replace(
            "agents = 'os == \"linux\"'",
            "agents = 'os == \"linux\"'\nsecrets = { API_TOKEN = { env = \"CI_TOKEN\" }, KEY = { file = \"/etc/yard/key\" } }",
        );
        let config = load(&text).unwrap();
        let secrets = &config.builder("demo").unwrap().secrets;
        assert_eq!(secrets["API_TOKEN"].env.as_deref(), Some("CI_TOKEN"));
        assert_eq!(secrets["API_TOKEN"].to_string(), "environment variable CI_TOKEN");
        assert_eq!(secrets["KEY"].file.as_deref(), Some(Path::new("/etc/yard/key")));
        assert_eq!(secrets["KEY"].to_string(), "file /etc/yard/key");
        // A builder without secrets keeps the digest it had before secrets existed.
        let plain = load(GOOD).unwrap();
        assert!(!serde_json::to_string(plain.builder("demo").unwrap())
            .unwrap()
            .contains("secrets"));
    }

    #[test]
    fn bad_secret_definitions_name_the_builder_and_the_secret() {
        let with_secrets = |secrets: &str| {
            let text = GOOD.replace(
                "agents = 'os == \"linux\"'",
                &format!("agents = 'os == \"linux\"'\nsecrets = {{ {secrets} }}"),
            );
            load(&text).unwrap_err().to_string()
        };
        let message = with_secrets(r#"TOKEN = { env = "A", file = "/b" }"#);
        assert!(
            message.starts_with("test.toml: builder[0].secrets.TOKEN: builder \"demo\", secret \"TOKEN\": ")
                && message.contains("exactly one source"),
            "{message}"
        );
        let message = with_secrets("TOKEN = {}");
        assert!(
            message.contains("builder[0].secrets.TOKEN") && message.contains("exactly one source"),
            "{message}"
        );
        let message = with_secrets(r#"1TOKEN = { env = "A" }"#);
        assert!(
            message.contains("builder[0].secrets: builder \"demo\", secret \"1TOKEN\"")
                && message.contains("not a variable name"),
            "{message}"
        );
        let message = with_secrets(r#"YARD_BUILD_ID = { env = "A" }"#);
        assert!(
            message.contains("\"YARD_BUILD_ID\"") && message.contains("Yardmaster's own"),
            "{message}"
        );
        let message = with_secrets(r#"TOKEN = { env = "" }"#);
        assert!(message.contains("builder[0].secrets.TOKEN.env"), "{message}");
        let message = with_secrets(r#"TOKEN = { file = "relative/key" }"#);
        assert!(
            message.contains("builder[0].secrets.TOKEN.file") && message.contains("absolute path"),
            "{message}"
        );
        let message = with_secrets(r#"TOKEN = { vault = "x" }"#);
        assert!(
            message.starts_with("test.toml: ") && message.contains("{ env = \"VAR\" }"),
            "{message}"
        );
        // A value written where its source belongs is refused without being echoed.
        let message = with_secrets(r#"TOKEN = "the value itself""#);
        assert!(
            message.contains("secrets.TOKEN") && !message.contains("the value itself"),
            "{message}"
        );
    }

    #[test]
    fn env_names_are_checked() {
        assert!(is_env_name("CC"));
        assert!(is_env_name("_x1"));
        assert!(!is_env_name("1x"));
        assert!(!is_env_name("A-B"));
        assert!(!is_env_name(""));
    }

    #[test]
    fn nats_users_need_their_password_and_hide_it() {
        let with = |nats: &str| load(&GOOD.replace("[nats]", &format!("[nats]\n{nats}")));
        let config = with("user = \"engine\"\npassword = \"s3cret\"").unwrap();
        assert_eq!(config.nats.password.as_ref().map(Secret::expose), Some("s3cret"));
        assert!(!format!("{:?}", config.nats).contains("s3cret"));
        let message = with("user = \"engine\"").unwrap_err().to_string();
        assert!(message.contains("nats.password"), "{message}");
        let message = with("password = \"p\"").unwrap_err().to_string();
        assert!(message.contains("nats.user"), "{message}");
        let message = with("user = \"u\"\npassword = \"p\"\ncredentials = \"/c\"")
            .unwrap_err()
            .to_string();
        assert!(message.contains("nats.credentials"), "{message}");
        let message = with("tls_cert = \"/c.pem\"").unwrap_err().to_string();
        assert!(message.contains("nats.tls_cert"), "{message}");
    }
}
