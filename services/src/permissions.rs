//! NATS users and permissions per role, and the nats-server configuration granting them
//! (`yard nats-config`).
//!
//! Every role connects as its own user and may publish and subscribe only the subjects its
//! code uses: scheduler, engine and UI masters share one user per role; each agent has its
//! own user (`agent-<name>`) that receives only its own work subject and writes only its own
//! record; an `admin` user may do anything (toolkit pushes, `yard up`, operators' tools).
//! Replies come to `_INBOX.<user>.>`, which only that user may read. No role but `admin` may
//! delete, purge or reconfigure streams, consumers or buckets; masters may create the ones
//! Yardmaster keeps (whichever starts first provisions the bus), agents may not.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use bus_schema::subjects::{self, AGENTS_BUCKET, CANCELS_BUCKET, MASTERS_BUCKET, POOLS_BUCKET};
use bus_schema::subjects::{CHANGES_STREAM, EVENTS_STREAM, LOGS_STREAM, REQUESTS_STREAM};
use bus_schema::subjects::{LEASES_BUCKET, SNAPSHOTS_BUCKET, TOOLKITS_BUCKET, WAITS_BUCKET};

/// The bcrypt cost of the password hashes in the server configuration (as `nats server
/// passwd` uses).
const BCRYPT_COST: u32 = 11;
/// Length of a generated password.
const PASSWORD_LENGTH: usize = 32;

/// Why a NATS configuration could not be generated.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("agent name {0:?} cannot be used: use letters, digits, `-` and `_` only")]
    BadAgentName(String),
    #[error("agent {0:?} is listed twice")]
    DuplicateAgent(String),
    #[error("--listen {0:?} is not HOST:PORT")]
    BadListen(String),
    #[error("TLS needs both a certificate and its key (--tls-cert and --tls-key)")]
    IncompleteTls,
    #[error("cannot read the password file {path}: {source}")]
    ReadPasswords {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the password file {path} is not `user = \"password\"` lines: {problem}")]
    PasswordFormat { path: String, problem: String },
    #[error("cannot write the password file {path}: {source}")]
    WritePasswords {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the server configuration {path}: {source}")]
    WriteConfig {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the password of {0} is empty")]
    EmptyPassword(String),
    #[error("cannot hash a password: {0}")]
    Hash(#[from] bcrypt::BcryptError),
    #[error("no randomness for a password: {0}")]
    Random(String),
}

/// Who connects: one user per role, one per agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// May do anything: `yard toolkit push`, `yard up` (every role in one process), the
    /// `nats` command-line tool.
    Admin,
    Scheduler,
    Engine,
    Ui,
    /// The agent of this name.
    Agent(String),
}

impl Role {
    /// The NATS user name of this role.
    pub fn user(&self) -> String {
        match self {
            Role::Admin => "admin".into(),
            Role::Scheduler => "scheduler".into(),
            Role::Engine => "engine".into(),
            Role::Ui => "ui".into(),
            Role::Agent(name) => format!("agent-{name}"),
        }
    }

    /// What this role's user is for, one line.
    pub fn describe(&self) -> String {
        match self {
            Role::Admin => "operators: yard toolkit push, yard up, the nats tool; may do anything".into(),
            Role::Scheduler => {
                "scheduler masters: read changes, store build requests (also forced ones)".into()
            }
            Role::Engine => "engine masters: claim build requests, command agents, store build events".into(),
            Role::Ui => "UI masters: store changes, cancels and pools, ask schedulers to force builds".into(),
            Role::Agent(name) => format!("agent {name}: its own work subject, record, step events and logs"),
        }
    }
}

/// What one user may do. `None` from [`permissions`] means everything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    /// Subjects (with wildcards) the user may publish to.
    pub publish: Vec<String>,
    /// Subjects (with wildcards) the user may subscribe to.
    pub subscribe: Vec<String>,
    /// Whether the user may answer requests it received (publish once to their reply
    /// subject): agents answer commands, masters drain requests, engines each other's
    /// questions, schedulers forced builds.
    pub allow_responses: bool,
}

impl Permissions {
    /// Whether the user may publish to `subject`.
    pub fn may_publish(&self, subject: &str) -> bool {
        self.publish
            .iter()
            .any(|pattern| subject_matches(pattern, subject))
    }

    /// Whether the user may subscribe to `subject`.
    pub fn may_subscribe(&self, subject: &str) -> bool {
        self.subscribe
            .iter()
            .any(|pattern| subject_matches(pattern, subject))
    }
}

/// True if `subject` matches the NATS subject `pattern` (`*` one token, `>` the rest).
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut subject_tokens = subject.split('.');
    for token in pattern.split('.') {
        match (token, subject_tokens.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (literal, Some(actual)) if literal == actual => {}
            _ => return false,
        }
    }
    subject_tokens.next().is_none()
}

/// Builds one user's permission lists.
#[derive(Default)]
struct Grants {
    publish: Vec<String>,
    subscribe: Vec<String>,
}

impl Grants {
    fn publish(&mut self, subject: impl Into<String>) -> &mut Self {
        let subject = subject.into();
        if !self.publish.contains(&subject) {
            self.publish.push(subject);
        }
        self
    }

    fn subscribe(&mut self, subject: impl Into<String>) -> &mut Self {
        let subject = subject.into();
        if !self.subscribe.contains(&subject) {
            self.subscribe.push(subject);
        }
        self
    }

    /// A JetStream API call.
    fn api(&mut self, call: impl std::fmt::Display) -> &mut Self {
        self.publish(format!("$JS.API.{call}"))
    }

    /// Creating `stream` when it is missing (provisioning).
    fn create_stream(&mut self, stream: &str) -> &mut Self {
        self.api(format_args!("STREAM.CREATE.{stream}"))
    }

    /// Reading `stream` through consumers of its own: ordered consumers (which delete the
    /// consumer they replace), bounded reads, KV watches and object reads.
    fn read_stream(&mut self, stream: &str) -> &mut Self {
        self.api(format_args!("CONSUMER.CREATE.{stream}"))
            .api(format_args!("CONSUMER.CREATE.{stream}.>"))
            .api(format_args!("CONSUMER.MSG.NEXT.{stream}.*"))
            .api(format_args!("CONSUMER.DELETE.{stream}.*"))
            // Push consumers' flow control.
            .publish(format!("$JS.FC.{stream}.>"))
    }

    /// Reading back what `stream` holds under one filter without a consumer: the leader's
    /// newest message, then batch direct gets (see `read_back`).
    fn read_messages(&mut self, stream: &str) -> &mut Self {
        self.api(format_args!("STREAM.MSG.GET.{stream}"))
            .api(format_args!("DIRECT.GET.{stream}"))
    }

    /// Watching a KV bucket.
    fn watch_bucket(&mut self, bucket: &str) -> &mut Self {
        self.read_stream(&subjects::kv_stream(bucket))
    }

    /// Reading single keys of a KV bucket (direct gets).
    fn read_keys(&mut self, bucket: &str) -> &mut Self {
        let stream = subjects::kv_stream(bucket);
        self.api(format_args!("DIRECT.GET.{stream}"))
            .api(format_args!("DIRECT.GET.{stream}.>"))
    }

    /// Writing keys `key` (a pattern) of a KV bucket: put, create, update and delete.
    fn write_keys(&mut self, bucket: &str, key: &str) -> &mut Self {
        self.publish(subjects::kv_key(bucket, key))
    }

    /// Reading objects of an object store.
    fn read_objects(&mut self, bucket: &str) -> &mut Self {
        let stream = subjects::object_stream(bucket);
        self.api(format_args!("DIRECT.GET.{stream}"))
            .api(format_args!("DIRECT.GET.{stream}.>"))
            .read_stream(&stream)
    }

    fn done(self, allow_responses: bool) -> Permissions {
        Permissions {
            publish: self.publish,
            subscribe: self.subscribe,
            allow_responses,
        }
    }
}

/// What every yard process does on connecting: look up every stream and bucket, and the
/// engines' consumer, and read its own replies; and park the messages it rejects.
fn connection(user: &str) -> Grants {
    let mut grants = Grants::default();
    grants
        .api("STREAM.INFO.*")
        .api(format_args!(
            "CONSUMER.INFO.{REQUESTS_STREAM}.{}",
            subjects::ENGINES_CONSUMER
        ))
        .subscribe(format!("{}.>", subjects::inbox_prefix(user)))
        .publish(subjects::DEAD_LETTERS_ALL);
    grants
}

/// What every master does: provision the bus when it starts first, keep its record in the
/// masters registry, follow that registry, and listen for drain requests.
fn master(user: &str) -> Grants {
    let mut grants = connection(user);
    // Creating a bucket asks for the account's limits first.
    grants.api("INFO");
    for stream in subjects::STREAMS {
        grants.create_stream(stream);
    }

    for bucket in subjects::KV_BUCKETS {
        grants.create_stream(&subjects::kv_stream(bucket));
    }
    grants
        .api(format_args!(
            "CONSUMER.CREATE.{REQUESTS_STREAM}.{}",
            subjects::ENGINES_CONSUMER
        ))
        .write_keys(MASTERS_BUCKET, "*")
        .watch_bucket(MASTERS_BUCKET)
        .subscribe(subjects::MASTER_CONTROL_ALL);
    grants
}

/// The permissions of `role`; `None` for [`Role::Admin`], who may do anything.
pub fn permissions(role: &Role) -> Option<Permissions> {
    let user = role.user();
    let grants = match role {
        Role::Admin => return None,
        Role::Scheduler => {
            let mut grants = master(&user);
            grants
                // Forced builds, asked by UI masters.
                .subscribe(subjects::FORCE_ALL)
                // Build requests and their `requested` events.
                .publish(subjects::REQUESTS_ALL)
                .publish(subjects::events_of_kind("requested"))
                // The build stored first under a delivery key that came again.
                .api(format_args!("STREAM.MSG.GET.{EVENTS_STREAM}"))
                // Scheduler leases.
                .write_keys(LEASES_BUCKET, ">")
                .read_keys(LEASES_BUCKET)
                // Each scheduler's durable consumer of changes.
                .api(format_args!("CONSUMER.CREATE.{CHANGES_STREAM}.>"))
                .api(format_args!("CONSUMER.INFO.{CHANGES_STREAM}.*"))
                .api(format_args!("CONSUMER.MSG.NEXT.{CHANGES_STREAM}.*"))
                .publish(format!("$JS.ACK.{CHANGES_STREAM}.>"));
            grants
        }
        Role::Engine => {
            let mut grants = master(&user);
            let engines = subjects::ENGINES_CONSUMER;
            grants
                // Claims: the shared work-queue consumer, acks and progress acks.
                .api(format_args!("CONSUMER.MSG.NEXT.{REQUESTS_STREAM}.{engines}"))
                .publish(format!("$JS.ACK.{REQUESTS_STREAM}.{engines}.>"))
                // Build events and the engine's own log lines.
                .publish(subjects::EVENTS_ALL)
                .publish(subjects::LOGS_ALL)
                .read_stream(EVENTS_STREAM)
                .read_messages(EVENTS_STREAM)
                // Agents' work subjects, and other engines' questions about driven builds.
                .publish(subjects::AGENT_COMMANDS_ALL)
                .publish(subjects::ENGINE_DRIVES_ALL)
                .subscribe(subjects::ENGINE_DRIVES_ALL)
                // Step ends handed over by agents.
                .subscribe(subjects::ENGINE_STEP_ENDS_ALL)
                // The directory, cancels, waits and pools.
                .watch_bucket(AGENTS_BUCKET)
                .watch_bucket(CANCELS_BUCKET)
                .read_keys(CANCELS_BUCKET)
                .watch_bucket(WAITS_BUCKET)
                .write_keys(WAITS_BUCKET, ">")
                .watch_bucket(POOLS_BUCKET)
                .read_keys(POOLS_BUCKET)
                .write_keys(POOLS_BUCKET, ">");
            grants
        }
        Role::Ui => {
            let mut grants = master(&user);
            grants
                // Changes (API and hooks), forced builds (through the schedulers), cancels,
                // pool definitions and drain requests.
                .publish(subjects::CHANGES_ALL)
                // The change stored first under a delivery key that came again.
                .api(format_args!("STREAM.MSG.GET.{CHANGES_STREAM}"))
                // The schedulers' durable consumers, created before changes are accepted.
                .api(format_args!("CONSUMER.CREATE.{CHANGES_STREAM}.>"))
                .api(format_args!("CONSUMER.INFO.{CHANGES_STREAM}.*"))
                .publish(subjects::FORCE_ALL)
                .write_keys(CANCELS_BUCKET, ">")
                .write_keys(POOLS_BUCKET, &subjects::pool_key("*"))
                .publish(subjects::MASTER_CONTROL_ALL)
                // The view: events, changes, logs, and the buckets it mirrors.
                .read_stream(EVENTS_STREAM)
                .read_stream(CHANGES_STREAM)
                .read_stream(LOGS_STREAM)
                .read_messages(LOGS_STREAM)
                .watch_bucket(AGENTS_BUCKET)
                .watch_bucket(WAITS_BUCKET)
                .watch_bucket(POOLS_BUCKET)
                // View snapshots, written and read back; toolkits, listed.
                .create_stream(&subjects::object_stream(SNAPSHOTS_BUCKET))
                .read_objects(SNAPSHOTS_BUCKET)
                .publish(format!("$O.{SNAPSHOTS_BUCKET}.>"))
                .api(format_args!(
                    "STREAM.PURGE.{}",
                    subjects::object_stream(SNAPSHOTS_BUCKET)
                ))
                .create_stream(&subjects::object_stream(TOOLKITS_BUCKET))
                .read_objects(TOOLKITS_BUCKET);
            grants
        }
        Role::Agent(name) => {
            let mut grants = connection(&user);
            grants
                .subscribe(subjects::agent_commands(name))
                .write_keys(AGENTS_BUCKET, name)
                .publish(subjects::events_of_kind("step_finished"))
                .publish(subjects::ENGINE_STEP_ENDS_ALL)
                .publish(subjects::LOGS_ALL)
                // Which masters refuse it (their protocol), and toolkits.
                .watch_bucket(MASTERS_BUCKET)
                .read_objects(TOOLKITS_BUCKET);
            grants
        }
    };
    Some(grants.done(true))
}

/// One NATS user and its password.
#[derive(Debug, Clone)]
pub struct User {
    pub role: Role,
    pub name: String,
    pub password: String,
}

/// TLS settings of the server.
#[derive(Debug, Clone, Default)]
pub struct Tls {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// CA certificate(s) the server verifies client certificates against.
    pub ca: Option<PathBuf>,
    /// Require client certificates (`verify: true`).
    pub verify: bool,
}

/// What `yard nats-config` generates from.
#[derive(Debug, Clone)]
pub struct Options {
    /// `HOST:PORT` the server listens on.
    pub listen: String,
    /// Where JetStream keeps its files; the server's default when `None`.
    pub store_dir: Option<PathBuf>,
    pub tls: Tls,
}

/// The users of a deployment with `agents`: admin, scheduler, engine, UI, then one per
/// agent. Passwords come from `passwords` (by user name); missing ones are generated and
/// added to it.
pub fn users(agents: &[String], passwords: &mut BTreeMap<String, String>) -> Result<Vec<User>, Error> {
    let mut roles = vec![Role::Admin, Role::Scheduler, Role::Engine, Role::Ui];
    for name in agents {
        if !subjects::is_valid_token(name) {
            return Err(Error::BadAgentName(name.clone()));
        }
        let role = Role::Agent(name.clone());
        if roles.contains(&role) {
            return Err(Error::DuplicateAgent(name.clone()));
        }
        roles.push(role);
    }
    roles
        .into_iter()
        .map(|role| {
            let name = role.user();
            let password = match passwords.get(&name) {
                Some(password) if password.is_empty() => return Err(Error::EmptyPassword(name)),
                Some(password) => password.clone(),
                None => {
                    let password = generate_password()?;
                    passwords.insert(name.clone(), password.clone());
                    password
                }
            };
            Ok(User { role, name, password })
        })
        .collect()
}

/// A random password of letters and digits that starts with a letter (so that no layer of
/// configuration reads it as a number).
pub fn generate_password() -> Result<String, Error> {
    const LETTERS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut password = String::with_capacity(PASSWORD_LENGTH);
    while password.len() < PASSWORD_LENGTH {
        let mut bytes = [0u8; 64];
        getrandom::fill(&mut bytes).map_err(|error| Error::Random(error.to_string()))?;
        for byte in bytes {
            let alphabet = if password.is_empty() { LETTERS } else { ALPHABET };
            // Rejection sampling keeps every character equally likely.
            let limit = 256 - 256 % alphabet.len();
            if usize::from(byte) < limit && password.len() < PASSWORD_LENGTH {
                password.push(char::from(alphabet[usize::from(byte) % alphabet.len()]));
            }
        }
    }
    Ok(password)
}

/// Reads a password file (`user = "password"` lines); a missing file holds no passwords.
pub fn read_passwords(path: &Path) -> Result<BTreeMap<String, String>, Error> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(source) => {
            return Err(Error::ReadPasswords {
                path: path.display().to_string(),
                source,
            })
        }
    };
    toml::from_str(&text).map_err(|error| Error::PasswordFormat {
        path: path.display().to_string(),
        problem: error.message().to_owned(),
    })
}

/// Writes a password file readable by its owner only.
pub fn write_passwords(path: &Path, passwords: &BTreeMap<String, String>) -> Result<(), Error> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let error = |source| Error::WritePasswords {
        path: path.display().to_string(),
        source,
    };
    let mut text = String::from("# NATS passwords of Yardmaster's users (yard nats-config). Keep secret.\n");
    for (user, password) in passwords {
        let _ = writeln!(text, "{} = {}", quoted(user), quoted(password));
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(error)?;
    file.write_all(text.as_bytes()).map_err(error)
}

/// A double-quoted string, as both TOML and the nats-server configuration read it.
fn quoted(text: &str) -> String {
    serde_json::Value::String(text.to_owned()).to_string()
}

/// The nats-server configuration: listen address, JetStream, TLS when given, and one user
/// per entry of `users` (passwords as bcrypt hashes) with its role's permissions.
pub fn server_config(options: &Options, users: &[User]) -> Result<String, Error> {
    let valid_listen = options
        .listen
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<i32>().is_ok());
    if !valid_listen {
        return Err(Error::BadListen(options.listen.clone()));
    }
    let tls = &options.tls;
    if tls.cert.is_some() != tls.key.is_some() || (tls.cert.is_none() && (tls.ca.is_some() || tls.verify)) {
        return Err(Error::IncompleteTls);
    }
    let mut text = String::new();
    let _ = writeln!(
        text,
        "# nats-server configuration for Yardmaster, written by `yard nats-config`.\n\
         # One user per role and per agent, each allowed only the subjects its role uses.\n"
    );
    let _ = writeln!(text, "listen: {}\n", quoted(&options.listen));
    match &options.store_dir {
        Some(dir) => {
            let _ = writeln!(
                text,
                "jetstream {{\n  store_dir: {}\n}}\n",
                quoted(&dir.display().to_string())
            );
        }
        None => text.push_str("jetstream: enabled\n\n"),
    }
    if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
        text.push_str("tls {\n");
        let _ = writeln!(text, "  cert_file: {}", quoted(&cert.display().to_string()));
        let _ = writeln!(text, "  key_file: {}", quoted(&key.display().to_string()));
        if let Some(ca) = &tls.ca {
            let _ = writeln!(text, "  ca_file: {}", quoted(&ca.display().to_string()));
        }
        if tls.verify {
            text.push_str("  verify: true\n");
        }
        text.push_str("}\n\n");
    }
    text.push_str("authorization {\n  users: [\n");
    for user in users {
        let hash = bcrypt::hash(&user.password, BCRYPT_COST)?;
        let _ = writeln!(text, "    # {}", user.role.describe());
        let _ = writeln!(text, "    {{\n      user: {}", quoted(&user.name));
        let _ = writeln!(text, "      password: {}", quoted(&hash));
        match permissions(&user.role) {
            None => {
                text.push_str("      permissions: { publish: \">\", subscribe: \">\" }\n");
            }
            Some(permissions) => {
                text.push_str("      permissions: {\n");
                write_list(&mut text, "publish", &permissions.publish);
                write_list(&mut text, "subscribe", &permissions.subscribe);
                if permissions.allow_responses {
                    text.push_str("        allow_responses: true\n");
                }
                text.push_str("      }\n");
            }
        }
        text.push_str("    }\n");
    }
    text.push_str("  ]\n}\n");
    Ok(text)
}

fn write_list(text: &mut String, name: &str, subjects: &[String]) {
    let _ = writeln!(text, "        {name}: {{ allow: [");
    for subject in subjects {
        let _ = writeln!(text, "          {}", quoted(subject));
    }
    text.push_str("        ] }\n");
}

/// The credentials each yard process connects with, as environment variables (each may also
/// go to `[nats] user` and `password` in its configuration file); `tls_ca` is the CA file
/// clients trust the server's certificate by, when it is not a public one.
pub fn credentials(users: &[User], tls_ca: Option<&Path>) -> String {
    let mut text = String::from(
        "# Credentials of each yard process, as environment variables (or `[nats] user` and\n\
         # `password` in its configuration file). Keep them secret.\n",
    );
    for user in users {
        let _ = writeln!(text, "\n# {}", user.role.describe());
        let _ = writeln!(text, "YARD_NATS__USER={}", user.name);
        let _ = writeln!(text, "YARD_NATS__PASSWORD={}", user.password);
        if let Some(ca) = tls_ca {
            let _ = writeln!(text, "YARD_NATS__TLS_CA={}", ca.display());
        }
    }
    text
}

/// A generated server configuration and the credentials of its users.
#[derive(Debug, Clone)]
pub struct Generated {
    pub server_config: String,
    pub credentials: String,
}

/// Generates the configuration of a deployment with `agents`. With `password_file`, the
/// passwords it holds are kept and generated ones are added to it, so that generating again
/// keeps every password.
pub fn generate(
    agents: &[String],
    password_file: Option<&Path>,
    options: &Options,
) -> Result<Generated, Error> {
    let mut passwords = match password_file {
        Some(path) => read_passwords(path)?,
        None => BTreeMap::new(),
    };
    let known = passwords.len();
    let users = users(agents, &mut passwords)?;
    let server_config = server_config(options, &users)?;
    if let Some(path) = password_file {
        if passwords.len() != known || !path.exists() {
            write_passwords(path, &passwords)?;
        }
    }
    Ok(Generated {
        server_config,
        credentials: credentials(&users, options.tls.ca.as_deref()),
    })
}

impl Generated {
    /// Writes the server configuration to `out` and returns the credentials to show; without
    /// `out`, returns the configuration followed by the credentials as comments.
    pub fn output(&self, out: Option<&Path>) -> Result<String, Error> {
        let Some(path) = out else {
            let commented: String = self
                .credentials
                .lines()
                .map(|line| match line {
                    "" => "\n".to_owned(),
                    line if line.starts_with('#') => format!("{line}\n"),
                    line => format!("# {line}\n"),
                })
                .collect();
            return Ok(format!("{}\n{commented}", self.server_config));
        };
        std::fs::write(path, &self.server_config).map_err(|source| Error::WriteConfig {
            path: path.display().to_string(),
            source,
        })?;
        Ok(self.credentials.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(role: Role) -> Permissions {
        permissions(&role).expect("a restricted role")
    }

    #[test]
    fn subjects_match_like_nats() {
        assert!(subject_matches("yard.>", "yard.request.app"));
        assert!(!subject_matches("yard.>", "yard"));
        assert!(subject_matches("yard.*.cmd", "yard.a1.cmd"));
        assert!(!subject_matches("yard.*.cmd", "yard.a1.b.cmd"));
        assert!(subject_matches("$KV.yard-agents.a1", "$KV.yard-agents.a1"));
        assert!(!subject_matches("$KV.yard-agents.a1", "$KV.yard-agents.a10"));
        assert!(!subject_matches("$KV.yard-agents.a1", "$KV.yard-agents.a1.x"));
    }

    #[test]
    fn an_agent_hears_and_writes_only_its_own() {
        let agent = of(Role::Agent("a1".into()));
        assert!(agent.may_subscribe("yard.agent.a1.cmd"));
        assert!(!agent.may_subscribe("yard.agent.a2.cmd"));
        assert!(!agent.may_subscribe("yard.agent.>"));
        assert!(agent.may_subscribe("_INBOX.agent-a1.xyz.1"));
        assert!(!agent.may_subscribe("_INBOX.engine.xyz.1"));
        assert!(agent.may_publish("$KV.yard-agents.a1"));
        assert!(!agent.may_publish("$KV.yard-agents.a2"));
        assert!(agent.may_publish("yard.event.01J.step_finished"));
        assert!(!agent.may_publish("yard.event.01J.finished"));
        // The engine records a step's start before it asks the agent.
        assert!(!agent.may_publish("yard.event.01J.step_started"));
        // ...and may take the step's end from the agent, to store it with the next event.
        assert!(agent.may_publish("yard.engine.e1.step_ends"));
        assert!(!agent.may_subscribe("yard.engine.e1.step_ends"));
        assert!(agent.may_publish("yard.log.01J.3"));
        for forbidden in [
            "yard.request.app",
            "yard.agent.a2.cmd",
            "yard.change.x",
            "$KV.yard-masters.m",
            "$JS.API.STREAM.DELETE.YARD_EVENTS",
            "$JS.API.STREAM.CREATE.YARD_EVENTS",
            "$JS.API.STREAM.PURGE.YARD_LOGS",
            "$JS.API.CONSUMER.DELETE.YARD_REQUESTS.engines",
            "$JS.API.CONSUMER.MSG.NEXT.YARD_REQUESTS.engines",
            "$JS.API.CONSUMER.CREATE.YARD_EVENTS",
        ] {
            assert!(!agent.may_publish(forbidden), "{forbidden}");
        }
    }

    #[test]
    fn a_ui_master_sends_no_scheduling_commands() {
        let ui = of(Role::Ui);
        for forbidden in [
            "yard.request.app",
            "yard.agent.a1.cmd",
            "yard.event.01J.requested",
        ] {
            assert!(!ui.may_publish(forbidden), "{forbidden}");
        }
        assert!(ui.may_publish("yard.change.01J"));
        assert!(ui.may_publish("yard.force.app"));
        assert!(ui.may_publish("$KV.yard-pools.pool.red"));
        assert!(!ui.may_publish("$KV.yard-pools.server.s1"));
    }

    #[test]
    fn engines_and_schedulers_schedule() {
        let engine = of(Role::Engine);
        assert!(engine.may_publish("yard.agent.a1.cmd"));
        assert!(engine.may_publish("yard.event.01J.finished"));
        assert!(engine.may_publish("$JS.ACK.YARD_REQUESTS.engines.1.2.3.4.5"));
        assert!(!engine.may_publish("yard.request.app"));
        let scheduler = of(Role::Scheduler);
        assert!(scheduler.may_publish("yard.request.app"));
        assert!(scheduler.may_subscribe("yard.force.app"));
        assert!(!scheduler.may_publish("yard.agent.a1.cmd"));
        for role in [Role::Scheduler, Role::Engine, Role::Ui] {
            let permissions = of(role);
            for forbidden in [
                "$JS.API.STREAM.DELETE.YARD_EVENTS",
                "$JS.API.STREAM.UPDATE.YARD_EVENTS",
                "$JS.API.STREAM.PURGE.YARD_REQUESTS",
                "$JS.API.CONSUMER.DELETE.YARD_REQUESTS.engines",
            ] {
                assert!(!permissions.may_publish(forbidden), "{forbidden}");
            }
        }
    }

    #[test]
    fn users_keep_given_passwords_and_get_new_ones() {
        let mut passwords = BTreeMap::from([("engine".to_owned(), "kept".to_owned())]);
        let users = users(&["a1".into(), "a2".into()], &mut passwords).unwrap();
        let names: Vec<&str> = users.iter().map(|user| user.name.as_str()).collect();
        assert_eq!(
            names,
            ["admin", "scheduler", "engine", "ui", "agent-a1", "agent-a2"]
        );
        assert_eq!(users[2].password, "kept");
        assert_eq!(passwords.len(), 6);
        assert!(users[0].password.len() == PASSWORD_LENGTH);
        assert!(users[0].password.starts_with(|c: char| c.is_ascii_alphabetic()));
        assert_ne!(users[0].password, users[1].password);
        assert!(matches!(
            super::users(&["a.b".into()], &mut BTreeMap::new()),
            Err(Error::BadAgentName(_))
        ));
        assert!(matches!(
            super::users(&["a".into(), "a".into()], &mut BTreeMap::new()),
            Err(Error::DuplicateAgent(_))
        ));
    }

    #[test]
    fn the_server_configuration_holds_hashes_and_tls() {
        let mut passwords = BTreeMap::new();
        let users = users(&["a1".into()], &mut passwords).unwrap();
        let options = Options {
            listen: "127.0.0.1:4222".into(),
            store_dir: Some("/var/lib/nats".into()),
            tls: Tls {
                cert: Some("/etc/nats/server.pem".into()),
                key: Some("/etc/nats/server-key.pem".into()),
                ca: Some("/etc/nats/ca.pem".into()),
                verify: false,
            },
        };
        let text = server_config(&options, &users).unwrap();
        assert!(text.contains("listen: \"127.0.0.1:4222\""));
        assert!(text.contains("store_dir: \"/var/lib/nats\""));
        assert!(text.contains("cert_file: \"/etc/nats/server.pem\""));
        assert!(text.contains("ca_file: \"/etc/nats/ca.pem\""));
        assert!(text.contains("user: \"agent-a1\""));
        assert!(text.contains("\"yard.agent.a1.cmd\""));
        for user in &users {
            assert!(!text.contains(&user.password), "no password in clear");
        }
        let incomplete = Options {
            tls: Tls {
                cert: Some("/c.pem".into()),
                ..Tls::default()
            },
            ..options.clone()
        };
        assert!(matches!(
            server_config(&incomplete, &users),
            Err(Error::IncompleteTls)
        ));
        let bad_listen = Options {
            listen: "4222".into(),
            ..options
        };
        assert!(matches!(
            server_config(&bad_listen, &users),
            Err(Error::BadListen(_))
        ));
    }

    #[test]
    fn password_files_round_trip() {
        let dir = tempfile_dir();
        let path = dir.join("passwords.toml");
        assert!(read_passwords(&path).unwrap().is_empty());
        let passwords = BTreeMap::from([
            ("agent-a1".to_owned(), "p\"1".to_owned()),
            ("ui".to_owned(), "p2".to_owned()),
        ]);
        write_passwords(&path, &passwords).unwrap();
        assert_eq!(read_passwords(&path).unwrap(), passwords);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(&path, "not toml at all").unwrap();
        assert!(matches!(read_passwords(&path), Err(Error::PasswordFormat { .. })));
        let _ = std::fs::remove_dir_all(dir);
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("yard-permissions-{}", ulid::Ulid::new()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
