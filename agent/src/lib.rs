//! The build agent: registers itself, heartbeats, takes commands only on its own work subject,
//! runs each step as `/bin/sh -c <run>` in its own process group, streams output lines as log
//! chunks and reports how the step ended.
//!
//! **Architecture Invariant:** the agent is the authority on its own occupancy. It runs steps
//! of at most one build at a time and refuses (`Busy`) a step of any other build, so the
//! one-build-per-agent rule holds however many engines send it work.

mod benchmark;
mod mask;
mod registry;
mod step;
mod toolkits;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bus_schema::{subjects, AgentCommand, AgentReply};
use futures::StreamExt;
use services::config::AgentConfig;
use services::Bus;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use benchmark::measure_benchmark;

/// Why the agent could not run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("agent name {0:?} cannot be used: use letters, digits, `-` and `_` only")]
    BadName(String),
    #[error("cannot prepare the agent directory {path}: {source}")]
    Workdir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Bus(#[from] services::bus::Error),
}

/// Everything one agent needs, resolved from configuration and flags.
#[derive(Debug, Clone)]
pub struct Settings {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Root of the agent's files; each deployment gets `<workdir>/<instance id>/`.
    pub workdir: PathBuf,
    pub instance: String,
    /// Fixed speed score; measured at start when `None`.
    pub benchmark: Option<u64>,
    pub heartbeat: Duration,
    /// Protocol version the agent announces: this release's, unless set otherwise to see
    /// how masters of another release refuse it.
    pub protocol: u32,
    /// Largest size of this deployment's toolkit cache.
    pub toolkit_cache_bytes: u64,
    /// Report every step a success at once instead of running it (simulated agents of
    /// `yard bench`, which measure Yardmaster rather than the commands).
    pub simulate: bool,
    /// Told the build id of every step, and the instant, as it starts here: `yard bench`
    /// times dispatch to it on its in-process agents.
    pub step_started: Option<tokio::sync::mpsc::UnboundedSender<(String, std::time::Instant)>>,
}

impl Settings {
    /// Resolves agent settings from the `[agent]` section, defaulting the name to the host name.
    pub fn from_config(agent: &AgentConfig, instance: &str) -> Settings {
        Settings {
            name: agent.name.clone().unwrap_or_else(host_name),
            labels: agent.labels.clone(),
            workdir: agent
                .workdir
                .clone()
                .unwrap_or_else(|| PathBuf::from("yard-agent")),
            instance: instance.to_owned(),
            benchmark: agent.benchmark,
            heartbeat: agent.heartbeat,
            protocol: bus_schema::PROTOCOL_VERSION,
            toolkit_cache_bytes: agent.toolkit_cache_bytes,
            simulate: false,
            step_started: None,
        }
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| {
            name.trim()
                .replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "_")
        })
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "agent".into())
}

/// What the agent is doing, guarded by one lock: the build it serves and its running steps.
#[derive(Default)]
struct Occupancy {
    build_id: Option<String>,
    /// Running steps by (build id, attempt, step index).
    running: HashMap<(String, u32, u32), CancellationToken>,
    /// The steps this run of the agent finished last, so that a repeated command (an engine
    /// adopting the build) does not run a step twice, even after the agent let go of its build.
    finished: FinishedSteps,
}

/// Step keys (build id, attempt, index), the last [`FINISHED_REMEMBERED`] of them.
#[derive(Default)]
struct FinishedSteps {
    keys: HashSet<(String, u32, u32)>,
    oldest_first: VecDeque<(String, u32, u32)>,
}

impl FinishedSteps {
    fn contains(&self, key: &(String, u32, u32)) -> bool {
        self.keys.contains(key)
    }

    fn remember(&mut self, key: (String, u32, u32)) {
        if self.keys.contains(&key) {
            return;
        }
        if self.oldest_first.len() == FINISHED_REMEMBERED {
            if let Some(oldest) = self.oldest_first.pop_front() {
                self.keys.remove(&oldest);
            }
        }
        self.keys.insert(key.clone());
        self.oldest_first.push_back(key);
    }
}

/// How many finished steps an agent remembers: an adopting engine asks again only about the
/// steps whose end it cannot read, the last few.
const FINISHED_REMEMBERED: usize = 1024;

impl Occupancy {
    /// Lets go of `build_id` if the agent serves it, cancelling its running steps; true if it
    /// did.
    fn release(&mut self, build_id: &str, machine: &Machine, instance: &str) -> bool {
        if self.build_id.as_deref() != Some(build_id) {
            return false;
        }
        for ((running_build, _, _), cancel) in &self.running {
            if running_build == build_id {
                cancel.cancel();
            }
        }
        self.build_id = None;
        machine.release(instance);
        true
    }
}

/// The machine an agent process runs on, shared by every deployment it serves: it runs the
/// steps of at most one build at a time across all of them.
#[derive(Default)]
pub struct Machine {
    /// The instance whose build the machine runs, if any.
    serving: tokio::sync::watch::Sender<Option<String>>,
}

impl Machine {
    /// Takes the machine for `instance`; false if another instance has it.
    fn take(&self, instance: &str) -> bool {
        let mut taken = false;
        self.serving.send_if_modified(|serving| match serving {
            None => {
                *serving = Some(instance.to_owned());
                taken = true;
                true
            }
            Some(current) => {
                taken = current == instance;
                false
            }
        });
        taken
    }

    /// Gives the machine back, if `instance` has it.
    fn release(&self, instance: &str) {
        self.serving.send_if_modified(|serving| {
            let mine = serving.as_deref() == Some(instance);
            if mine {
                *serving = None;
            }
            mine
        });
    }

    /// True if another instance than `instance` has the machine.
    fn serves_another(&self, instance: &str) -> bool {
        self.serving
            .borrow()
            .as_deref()
            .is_some_and(|current| current != instance)
    }
}

/// State shared by the command loop, the step tasks and the registry task.
struct Agent {
    settings: Settings,
    machine: Arc<Machine>,
    toolkits: toolkits::ToolkitCache,
    session: String,
    benchmark: u64,
    bus: Bus,
    occupancy: Mutex<Occupancy>,
    /// Wakes the registry task to publish a changed occupancy at once.
    occupancy_changed: tokio::sync::Notify,
}

impl Agent {
    fn busy_with(&self) -> Option<String> {
        self.lock().build_id.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Occupancy> {
        // A panic while holding the lock cannot leave Occupancy half-updated in a way that
        // matters more than stopping the agent would, so recover the guard.
        self.occupancy
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn instance_dir(&self) -> PathBuf {
        self.settings.workdir.join(&self.settings.instance)
    }

    fn workspace(&self, build_id: &str) -> PathBuf {
        self.instance_dir().join("builds").join(build_id)
    }

    fn handle(self: &Arc<Self>, command: AgentCommand, steps: &TaskTracker) -> AgentReply {
        let accepted = AgentReply::Accepted {
            session: self.session.clone(),
        };
        match command {
            AgentCommand::RunStep(assignment) => {
                if !subjects::is_valid_token(&assignment.build_id) {
                    return AgentReply::Refused {
                        reason: format!("build id {:?} is not a valid token", assignment.build_id),
                    };
                }
                if assignment
                    .require_session
                    .as_ref()
                    .is_some_and(|required| *required != self.session)
                {
                    // The step may have started under an earlier run of this agent: it died
                    // with that run, and starting it again would run it twice.
                    return AgentReply::SessionEnded {
                        session: self.session.clone(),
                    };
                }
                let cancel = {
                    let mut occupancy = self.lock();
                    let key = (assignment.build_id.clone(), assignment.attempt, assignment.index);
                    if occupancy.finished.contains(&key) {
                        return AgentReply::AlreadyFinished {
                            session: self.session.clone(),
                        };
                    }
                    match &occupancy.build_id {
                        Some(current) if *current != assignment.build_id => {
                            return AgentReply::Busy {
                                build_id: current.clone(),
                            }
                        }
                        _ => {}
                    }
                    if occupancy.running.contains_key(&key) {
                        // A repeated command (the engine retried after a lost reply).
                        return accepted;
                    }
                    if occupancy.build_id.is_none() && !self.machine.take(&self.settings.instance) {
                        return busy_elsewhere();
                    }
                    occupancy.build_id = Some(assignment.build_id.clone());
                    let cancel = CancellationToken::new();
                    occupancy.running.insert(key, cancel.clone());
                    cancel
                };
                self.occupancy_changed.notify_one();
                let agent = Arc::clone(self);
                steps.spawn(async move {
                    let key = (assignment.build_id.clone(), assignment.attempt, assignment.index);
                    let release_after = assignment.release_after;
                    tracing::debug!(build = %key.0, attempt = key.1, index = key.2, release_after, "step started");
                    let ended = step::run(&agent, *assignment, cancel).await;
                    tracing::debug!(build = %key.0, attempt = key.1, index = key.2, "step ended");
                    // Let go of the build first when nothing more of it runs here, so that
                    // whoever learns of the step's end finds the agent free.
                    let released = {
                        let mut occupancy = agent.lock();
                        occupancy.running.remove(&key);
                        occupancy.finished.remember(key.clone());
                        let idle = !occupancy.running.keys().any(|(build, _, _)| *build == key.0);
                        release_after
                            && idle
                            && occupancy.release(&key.0, &agent.machine, &agent.settings.instance)
                    };
                    if released {
                        agent.build_released(&key.0);
                    }
                    ended.report(&agent).await;
                    tracing::debug!(build = %key.0, attempt = key.1, index = key.2, released, "step reported");
                });
                accepted
            }
            AgentCommand::Ping => accepted,
            AgentCommand::Hold { build_id } => {
                if !subjects::is_valid_token(&build_id) {
                    return AgentReply::Refused {
                        reason: format!("build id {build_id:?} is not a valid token"),
                    };
                }
                let changed = {
                    let mut occupancy = self.lock();
                    match &occupancy.build_id {
                        Some(current) if *current != build_id => {
                            return AgentReply::Busy {
                                build_id: current.clone(),
                            }
                        }
                        Some(_) => false,
                        None if !self.machine.take(&self.settings.instance) => return busy_elsewhere(),
                        None => {
                            occupancy.build_id = Some(build_id);
                            true
                        }
                    }
                };
                if changed {
                    self.occupancy_changed.notify_one();
                }
                accepted
            }
            AgentCommand::CancelStep {
                build_id,
                attempt,
                index,
            } => {
                let occupancy = self.lock();
                if occupancy.build_id.as_deref() == Some(build_id.as_str()) {
                    if let Some(cancel) = occupancy.running.get(&(build_id, attempt, index)) {
                        cancel.cancel();
                    }
                }
                accepted
            }
            AgentCommand::Release { build_id } => {
                let released = self
                    .lock()
                    .release(&build_id, &self.machine, &self.settings.instance);
                if released {
                    self.build_released(&build_id);
                }
                accepted
            }
        }
    }

    /// After letting go of a build: says so in the agent's record, and removes its workspace.
    fn build_released(&self, build_id: &str) {
        self.occupancy_changed.notify_one();
        let workspace = self.workspace(build_id);
        tokio::spawn(async move {
            if let Err(error) = tokio::fs::remove_dir_all(&workspace).await {
                if error.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %workspace.display(), %error, "cannot remove workspace");
                }
            }
        });
    }
}

/// The answer while the machine runs a build of another deployment: busy, without saying
/// with what.
fn busy_elsewhere() -> AgentReply {
    AgentReply::Busy {
        build_id: bus_schema::BUSY_ELSEWHERE.to_owned(),
    }
}

/// Runs the agent until `shutdown` fires, then lets running steps finish and deregisters.
pub async fn run(settings: Settings, bus: Bus, shutdown: CancellationToken) -> Result<(), Error> {
    run_on(Arc::new(Machine::default()), settings, bus, shutdown).await
}

/// Runs the agent for one deployment on a `machine` it may share with other deployments (one
/// `run_on` per `[[connection]]`), until `shutdown` fires.
pub async fn run_on(
    machine: Arc<Machine>,
    settings: Settings,
    bus: Bus,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    if !subjects::is_valid_token(&settings.name) {
        return Err(Error::BadName(settings.name));
    }
    let instance_dir = settings.workdir.join(&settings.instance);
    tokio::fs::create_dir_all(&instance_dir)
        .await
        .map_err(|source| Error::Workdir {
            path: instance_dir.display().to_string(),
            source,
        })?;
    let benchmark = match settings.benchmark {
        Some(score) => score,
        None => tokio::task::spawn_blocking(measure_benchmark).await.unwrap_or(1),
    };
    let agent = Arc::new(Agent {
        session: ulid::Ulid::new().to_string(),
        benchmark,
        bus: bus.clone(),
        occupancy: Mutex::new(Occupancy::default()),
        occupancy_changed: tokio::sync::Notify::new(),
        toolkits: toolkits::ToolkitCache::new(instance_dir.join("toolkits"), settings.toolkit_cache_bytes),
        settings,
        machine,
    });
    let mut commands = bus
        .client
        .subscribe(subjects::agent_commands(&agent.settings.name))
        .await
        .map_err(|e| services::bus::Error::nats("subscribing to the agent's work subject", e))?;
    registry::publish(&agent).await?;
    registry::watch_for_refusal(&agent, shutdown.clone());
    tracing::info!(agent = %agent.settings.name, benchmark, "agent registered");

    let registry_stop = CancellationToken::new();
    let registry_task = tokio::spawn(registry::heartbeat(Arc::clone(&agent), registry_stop.clone()));
    let steps = TaskTracker::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            message = commands.next() => {
                let Some(message) = message else { break };
                let reply = match bus_schema::decode::<AgentCommand>(&message.payload) {
                    Ok(command) => agent.handle(command, &steps),
                    Err(error) => {
                        // A command can carry a build's secrets: park its digest, not its bytes.
                        let digest = services::toolkits::digest(&message.payload);
                        let note = format!("{error} (payload of {} bytes withheld)", message.payload.len());
                        tokio::spawn(bus.park_dead_letter("agent", &message.subject, digest.as_bytes(), &note));
                        AgentReply::Refused { reason: format!("cannot decode the command: {error}") }
                    }
                };
                if let Some(reply_to) = message.reply {
                    let payload = bus_schema::encode(&reply);
                    if let Err(error) = bus.client.publish(reply_to, payload.into()).await {
                        tracing::warn!(%error, "cannot answer a command");
                    }
                }
            }
        }
    }
    let _ = commands.unsubscribe().await;
    steps.close();
    steps.wait().await;
    registry_stop.cancel();
    let _ = registry_task.await;
    registry::deregister(&agent).await;
    tracing::info!(agent = %agent.settings.name, "agent stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{FinishedSteps, FINISHED_REMEMBERED};

    #[test]
    fn finished_steps_forget_the_oldest_beyond_the_limit() {
        let mut finished = FinishedSteps::default();
        let key = |number: usize| (format!("build-{number}"), 0, 1);
        for number in 0..=FINISHED_REMEMBERED {
            finished.remember(key(number));
        }
        // Remembering a key again changes nothing.
        finished.remember(key(FINISHED_REMEMBERED));
        assert!(!finished.contains(&key(0)));
        assert!(finished.contains(&key(1)));
        assert!(finished.contains(&key(FINISHED_REMEMBERED)));
        assert!(
            !finished.contains(&("build-1".into(), 1, 1)),
            "another attempt is another step"
        );
        assert_eq!(finished.keys.len(), FINISHED_REMEMBERED);
        assert_eq!(finished.oldest_first.len(), FINISHED_REMEMBERED);
    }
}
