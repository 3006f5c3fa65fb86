//! Message types carried on the bus.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{BuildResult, StepResult, Timestamp};

/// A change to source code: a push, a merge request, or a change posted by hand.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub id: String,
    #[serde(default)]
    pub repository: String,
    #[serde(default)]
    pub branch: String,
    #[serde(default)]
    pub revision: String,
    #[serde(default)]
    pub author: String,
    #[serde(default)]
    pub comments: String,
    #[serde(default)]
    pub files: Vec<String>,
    #[serde(default)]
    pub project: String,
    /// Where the change came from: `api`, `github`, `gitlab`, ...
    #[serde(default)]
    pub source: String,
    pub received_at: Timestamp,
}

/// A request to run one build of one builder. Its `build_id` names the build from the moment
/// it is requested.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildRequest {
    pub build_id: String,
    pub builder: String,
    /// Why the build was requested, e.g. `scheduler main: change 01J...` or `forced by alice`.
    pub reason: String,
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    #[serde(default)]
    pub changes: Vec<Change>,
    /// Higher runs first among waiting builds.
    #[serde(default)]
    pub priority: i32,
    pub requested_at: Timestamp,
}

/// One entry of a build's step plan, announced when an engine claims the build. The plan
/// lists every step of the tree depth-first; a step's index is its position in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedStep {
    pub name: String,
    /// Names from the top of the tree down, joined with `/`, e.g. `tests/unit`.
    #[serde(default)]
    pub path: String,
    /// `command`, `sequence` or `parallel`.
    #[serde(default)]
    pub kind: String,
}

/// Something that happened to a build. The build's state is a fold over these.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildEvent {
    pub build_id: String,
    pub at: Timestamp,
    pub kind: BuildEventKind,
    /// Events of the build that happened before this one and were held back to be stored
    /// with it, oldest first: one message, one write (an engine holds back its claim and
    /// the build's master agent until the build's next event).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub earlier: Vec<EarlierEvent>,
}

impl BuildEvent {
    pub fn new(build_id: impl Into<String>, at: Timestamp, kind: BuildEventKind) -> BuildEvent {
        BuildEvent {
            build_id: build_id.into(),
            at,
            kind,
            earlier: Vec::new(),
        }
    }
}

/// An event stored ahead of another of the same build, in [`BuildEvent::earlier`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EarlierEvent {
    pub at: Timestamp,
    pub kind: BuildEventKind,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum BuildEventKind {
    Requested(BuildRequest),
    Claimed {
        engine: String,
        steps: Vec<PlannedStep>,
        /// The agent the build holds for its master step, when the engine had one at hand as
        /// it claimed the build (else a `MasterAgent` event follows).
        #[serde(default)]
        agent: Option<String>,
        /// Why the build waits for a master agent, when that is the first thing it has to
        /// tell (in place of a `Waiting` event).
        #[serde(default)]
        waiting: Option<String>,
    },
    Waiting {
        reason: String,
    },
    /// The build holds this agent for its master step until it ends.
    MasterAgent {
        agent: String,
    },
    /// A step waits for an agent, and why.
    StepWaiting {
        index: u32,
        #[serde(default)]
        attempt: u32,
        reason: String,
    },
    StepStarted {
        index: u32,
        /// Which attempt of the build (0 for the first; see `Retrying`).
        #[serde(default)]
        attempt: u32,
        agent: String,
        /// The run of the agent process that started the step (see [`AgentRecord::session`]);
        /// `None` for steps the engine carries out itself. An agent stores this event before
        /// it starts the step's process, so a step without it never ran.
        #[serde(default)]
        agent_session: Option<String>,
    },
    StepFinished {
        index: u32,
        #[serde(default)]
        attempt: u32,
        result: StepResult,
        exit_code: Option<i32>,
        message: Option<String>,
    },
    StepSkipped {
        index: u32,
        #[serde(default)]
        attempt: u32,
    },
    /// A build property was set while the build ran (a pool server acquired `as` it).
    PropertySet {
        name: String,
        value: String,
    },
    /// The build starts over on another agent because its agent was lost; the steps of the
    /// earlier attempt stay recorded in `attempts` of the build.
    Retrying {
        attempt: u32,
        reason: String,
    },
    Finished {
        result: BuildResult,
        message: Option<String>,
    },
}

impl BuildEventKind {
    /// Last token of the event's subject, so consumers can filter by kind.
    pub fn subject_kind(&self) -> &'static str {
        match self {
            BuildEventKind::Requested(_) => "requested",
            BuildEventKind::Claimed { .. } => "claimed",
            BuildEventKind::Waiting { .. } => "waiting",
            BuildEventKind::MasterAgent { .. } => "master_agent",
            BuildEventKind::StepWaiting { .. } => "step_waiting",
            BuildEventKind::StepStarted { .. } => "step_started",
            BuildEventKind::StepFinished { .. } => "step_finished",
            BuildEventKind::StepSkipped { .. } => "step_skipped",
            BuildEventKind::Retrying { .. } => "retrying",
            BuildEventKind::PropertySet { .. } => "property_set",
            BuildEventKind::Finished { .. } => "finished",
        }
    }

    /// The message id (`Nats-Msg-Id`) of an event a build has only once, so that JetStream
    /// stores it once however often it is published again (a retried store, an engine adopting
    /// the build): its `requested` and its `finished`. `None` for events that may recur.
    pub fn once_per_build_id(&self, build_id: &str) -> Option<String> {
        match self {
            BuildEventKind::Requested(_) => Some(build_id.to_owned()),
            BuildEventKind::Finished { .. } => Some(format!("{build_id}.finished")),
            _ => None,
        }
    }
}

/// What an agent tells the grid about itself, stored in the agents bucket under its name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub version: String,
    pub protocol: u32,
    /// Identifies one run of the agent process; a new session means steps of the old one died.
    pub session: String,
    /// Speed score: higher is faster.
    #[serde(default)]
    pub benchmark: u64,
    /// The build whose steps the agent runs now, if any.
    pub busy_with: Option<String>,
    /// The agent's machine runs a build of another deployment it serves (whose details are
    /// not this deployment's business).
    #[serde(default)]
    pub busy_elsewhere: bool,
    pub started_at: Timestamp,
    pub heartbeat_at: Timestamp,
}

/// Work for an agent: one command step of one build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepAssignment {
    /// Toolkits (`NAME@VERSION`) the agent fetches and puts on the step's PATH first.
    #[serde(default)]
    pub toolkits: Vec<String>,
    pub build_id: String,
    pub builder: String,
    pub index: u32,
    /// Attempt of the build this step belongs to; a step of a new attempt never collides with
    /// one of an earlier attempt.
    pub attempt: u32,
    pub name: String,
    /// Shell text run as `/bin/sh -c <command>`.
    pub command: String,
    /// Environment of the process, on top of the agent's own. It holds the builder's secrets,
    /// which is why an assignment is only ever sent as a core request, never stored.
    pub env: BTreeMap<String, String>,
    pub timeout_ms: Option<u64>,
    /// Secret values the agent replaces by `***` in every line of the step's log and in its
    /// result message: each value of at least [`MIN_MASKED_BYTES`] bytes, and each such line
    /// of a value spanning several lines.
    #[serde(default)]
    pub masked: Vec<String>,
    /// Set by an engine that adopted the build from a lost engine: the step may already have
    /// started under this run of the agent, and must not run again under another (whose
    /// process would not know it). An agent that is another run answers
    /// [`AgentReply::SessionEnded`] instead of starting the step.
    #[serde(default)]
    pub require_session: Option<String>,
    /// Nothing more of the build runs on the agent after this step: the agent lets go of the
    /// build as the step ends (before reporting it), with no `Release` to wait for.
    #[serde(default)]
    pub release_after: bool,
    /// Where the agent hands the step's end (the `step_finished` event it would store) to
    /// the engine driving the build, as a core request. That engine stores it together with
    /// the build's next event, one write for both, and answers [`StepEndAnswer::Stored`]
    /// once JetStream has it. Without this subject, or without that answer, the agent stores
    /// the event itself.
    #[serde(default)]
    pub report_to: Option<String>,
}

/// An engine's answer to an agent handing it a step's end ([`StepAssignment::report_to`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StepEndAnswer {
    /// The step's end is stored.
    Stored,
    /// The engine does not wait for this step (any more), or could not use the message: the
    /// agent stores the step's end itself.
    Declined { reason: String },
}

/// Shortest secret value masked in logs: masking a one- or two-byte value would garble every
/// line that happens to contain those characters.
pub const MIN_MASKED_BYTES: usize = 3;

/// A command on an agent's own work subject; the agent answers each with an [`AgentReply`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentCommand {
    /// Start a step. The agent takes it only if it is idle or already busy with the same build;
    /// taking it holds the agent for the build, as `Hold` does.
    RunStep(Box<StepAssignment>),
    /// Reserve the agent for a build without running anything yet (a master step holding its
    /// agent while its children run elsewhere). Same rule as `RunStep`.
    Hold { build_id: String },
    /// Kill the step's process group; the step then finishes as cancelled.
    CancelStep {
        build_id: String,
        attempt: u32,
        index: u32,
    },
    /// Are you there? Answered `Accepted` with the agent's session; lets an engine tell a
    /// dead agent from one whose heartbeats cannot be stored for a moment.
    Ping,
    /// The build is over: the agent is free for another build.
    Release { build_id: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentReply {
    /// The command was carried out; `session` identifies the agent's run.
    Accepted { session: String },
    /// The agent runs steps of another build.
    Busy { build_id: String },
    /// The agent already ran this step of the build it serves; its result is on the bus.
    AlreadyFinished { session: String },
    /// The command was for an earlier run of the agent (`require_session`), which ended: the
    /// steps it ran died with it. `session` is the agent's current run.
    SessionEnded { session: String },
    /// The command cannot be carried out, and why.
    Refused { reason: String },
}

/// Which output stream a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogStream {
    Stdout,
    Stderr,
    /// Lines written by Yardmaster itself (warnings, timeouts).
    Header,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    pub stream: LogStream,
    pub text: String,
}

/// A batch of log lines of one step, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogChunk {
    pub build_id: String,
    pub index: u32,
    /// Position of the chunk in the step's log, from 0. A chunk published again after a failed
    /// store can land after later ones; readers order chunks by it.
    #[serde(default)]
    pub seq: u32,
    #[serde(default)]
    pub attempt: u32,
    pub lines: Vec<LogLine>,
}

/// A request to cancel a build, stored in the cancels bucket under the build id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelRequest {
    pub build_id: String,
    pub requested_by: String,
}

/// Whether a master takes new work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MasterState {
    Active,
    /// Finishing what it has, taking nothing new, then exiting.
    Draining,
}

/// A master process, stored in the masters bucket under its id and refreshed by heartbeats.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MasterRecord {
    pub id: String,
    /// `scheduler`, `engine` and/or `ui`.
    pub roles: Vec<String>,
    pub version: String,
    pub protocol: u32,
    pub host: String,
    pub state: MasterState,
    /// Digest of each scheduler and builder definition this master runs, keyed
    /// `scheduler:<name>` or `builder:<name>`, so that masters disagreeing on a definition
    /// can be found.
    #[serde(default)]
    pub definitions: BTreeMap<String, String>,
    pub started_at: Timestamp,
    pub heartbeat_at: Timestamp,
    /// Where this master's Prometheus metrics are served.
    #[serde(default)]
    pub metrics_url: Option<String>,
}

/// A command on a master's own control subject.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MasterCommand {
    /// Stop taking work, finish what is running, then exit.
    Drain,
}

/// A scheduler master's answer to a forced build (a [`BuildRequest`] on
/// [`crate::subjects::force`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ForceReply {
    /// The request and its `requested` event are stored; `sequence` is the event's sequence
    /// in the events stream, `build_id` the id of the build stored (the one stored first,
    /// when the request named a delivery that came before; `None` from schedulers that
    /// predate it, which store the request as asked).
    Stored {
        sequence: u64,
        #[serde(default)]
        build_id: Option<String>,
    },
    /// The request is not acceptable (a builder no `force` scheduler lists, a bad property
    /// name), and why.
    Refused { reason: String },
    /// The request is acceptable but the bus did not store it; asking again may succeed.
    NotStored { reason: String },
}

/// A scheduler lease: which master runs a scheduler now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub holder: String,
    pub since: Timestamp,
}

/// A step (or a master step) waiting for an agent or a pool server, listed in its engine's
/// [`EngineWaits`] while it waits, so that every engine sees the whole wait-for graph.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaitRecord {
    pub build_id: String,
    pub builder: String,
    /// Path of the waiting step; empty for the master step.
    pub step: String,
    /// The `agents` expression the step waits for an agent matching.
    pub agents: String,
    pub engine: String,
    pub requested_at: Timestamp,
    pub priority: i32,
    /// `fail-newest` or `wait`: what the builder does when the build is caught in a deadlock.
    pub deadlock_policy: String,
    pub since: Timestamp,
    /// Set when the step waits for a server of this pool role rather than for an agent.
    #[serde(default)]
    pub pool: Option<String>,
}

/// One engine's waiting steps, stored in the waits bucket under
/// [`crate::subjects::engine_waits_key`]: one record per engine, rewritten when its waits
/// change, so a waiting build costs no write of its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineWaits {
    pub engine: String,
    /// Every waiting step of a build past its master step (such a build holds an agent, so
    /// it can be part of a deadlock), then the builds waiting for a master agent, oldest
    /// first, up to a limit.
    pub waits: Vec<WaitRecord>,
    /// Builds waiting for a master agent left out of `waits` by the limit.
    #[serde(default)]
    pub more: u64,
}

/// A resource pool: the servers of one role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolRecord {
    pub role: String,
    pub servers: Vec<String>,
}

/// Who holds a pool server, and for how long it has been refreshed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolHolder {
    pub build_id: String,
    /// Path of the step that acquired it.
    pub step: String,
    pub engine: String,
    pub since: Timestamp,
    /// Renewed while the build runs; a holder not renewed for a while has vanished.
    pub refreshed_at: Timestamp,
}

/// Every acquisition of one server: at most one global holder, or at most one holder per
/// role. Stored under `server.<name>` and changed only by compare-and-swap.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerHolds {
    pub global: Option<PoolHolder>,
    #[serde(default)]
    pub roles: BTreeMap<String, PoolHolder>,
}

/// A build step waiting for a server of a role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolWaiter {
    pub build_id: String,
    pub step: String,
    /// `global` or `role`.
    pub scope: String,
    pub since: Timestamp,
    pub refreshed_at: Timestamp,
}

/// The queue of waiters of one role, first come first served; stored under `queue.<role>`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolQueue {
    pub waiters: Vec<PoolWaiter>,
}
