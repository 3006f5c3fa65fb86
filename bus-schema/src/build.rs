//! Build state as a fold over build events.
//!
//! Events of one build come from several publishers (the engine that drives it, the agents
//! that run its steps), so they can reach the stream in a different order than they
//! happened. The fold is therefore order-tolerant: states only move forward, and a late
//! event fills in details without undoing a later state.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{BuildEvent, BuildEventKind, BuildRequest, Change, Timestamp};

/// How many steps a build can have. The fold ignores what an event says of a step at an index
/// past it, so that one malformed event cannot make it allocate records for billions of steps.
pub const MAX_STEPS: u32 = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BuildState {
    Requested,
    Waiting,
    Running,
    Finished,
}

impl BuildState {
    pub fn as_str(self) -> &'static str {
        match self {
            BuildState::Requested => "requested",
            BuildState::Waiting => "waiting",
            BuildState::Running => "running",
            BuildState::Finished => "finished",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BuildResult {
    Success,
    Failure,
    Exception,
    Cancelled,
    /// Every attempt lost its agent.
    Lost,
    /// Ended to break a deadlock it was part of.
    Deadlock,
}

impl BuildResult {
    pub fn as_str(self) -> &'static str {
        match self {
            BuildResult::Success => "success",
            BuildResult::Failure => "failure",
            BuildResult::Exception => "exception",
            BuildResult::Cancelled => "cancelled",
            BuildResult::Lost => "lost",
            BuildResult::Deadlock => "deadlock",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StepState {
    Pending,
    /// Waiting for an agent; `message` says why.
    Waiting,
    Running,
    Skipped,
    Finished,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StepResult {
    Success,
    Failure,
    /// The step could not run as asked: its agent vanished, or the command could not start.
    Exception,
    Cancelled,
    /// The step ran past its timeout and its process group was killed.
    Timeout,
}

/// One step of a build as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub index: u32,
    pub name: String,
    /// Names from the top of the step tree down, joined with `/`.
    #[serde(default)]
    pub path: String,
    /// `command`, `sequence` or `parallel`.
    #[serde(default)]
    pub kind: String,
    pub state: StepState,
    pub result: Option<StepResult>,
    pub agent: Option<String>,
    /// The run of the agent process that started the step.
    #[serde(default)]
    pub agent_session: Option<String>,
    pub exit_code: Option<i32>,
    pub message: Option<String>,
    pub started_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
}

impl StepRecord {
    fn pending(index: u32) -> Self {
        StepRecord {
            index,
            name: String::new(),
            path: String::new(),
            kind: String::new(),
            state: StepState::Pending,
            result: None,
            agent: None,
            agent_session: None,
            exit_code: None,
            message: None,
            started_at: None,
            finished_at: None,
        }
    }
}

/// An attempt of a build that ended because its agent was lost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetryRecord {
    pub attempt: u32,
    pub reason: String,
    pub at: Timestamp,
    pub steps: Vec<StepRecord>,
}

/// A build as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildRecord {
    pub id: String,
    /// Position of the build among its builder's builds, from 1, in the order the events
    /// stream stored their requests. Set by whoever folds the whole stream.
    pub number: u64,
    pub builder: String,
    pub state: BuildState,
    pub result: Option<BuildResult>,
    pub reason: String,
    /// Why the build is waiting, while it waits; why it ended, once it ended abnormally.
    pub message: Option<String>,
    pub engine: Option<String>,
    /// The agent the master step holds.
    #[serde(default)]
    pub agent: Option<String>,
    /// Every engine that claimed the build, in order; more than one means it was adopted.
    #[serde(default)]
    pub claimed_by: Vec<String>,
    pub priority: i32,
    pub steps: Vec<StepRecord>,
    /// Earlier attempts that lost their agent, oldest first, with the steps as they were.
    #[serde(default)]
    pub retries: Vec<RetryRecord>,
    pub changes: Vec<Change>,
    pub properties: BTreeMap<String, String>,
    pub requested_at: Timestamp,
    pub started_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
}

impl BuildRecord {
    /// A build that exists because it was requested.
    pub fn requested(request: &BuildRequest) -> Self {
        BuildRecord {
            id: request.build_id.clone(),
            number: 0,
            builder: request.builder.clone(),
            state: BuildState::Requested,
            result: None,
            reason: request.reason.clone(),
            message: None,
            engine: None,
            agent: None,
            claimed_by: Vec::new(),
            priority: request.priority,
            steps: Vec::new(),
            retries: Vec::new(),
            changes: request.changes.clone(),
            properties: request.properties.clone(),
            requested_at: request.requested_at,
            started_at: None,
            finished_at: None,
        }
    }

    /// A build whose first event seen is not its request (the request was published by
    /// another connection and has not arrived yet).
    pub fn placeholder(build_id: &str, at: Timestamp) -> Self {
        BuildRecord::requested(&BuildRequest {
            build_id: build_id.to_owned(),
            builder: String::new(),
            reason: String::new(),
            properties: BTreeMap::new(),
            changes: Vec::new(),
            priority: 0,
            requested_at: at,
        })
    }

    /// The step `index` of `attempt`: the current steps, or those of an earlier attempt that
    /// a late event still speaks of. None past [`MAX_STEPS`].
    fn step_mut(&mut self, attempt: u32, index: u32) -> Option<&mut StepRecord> {
        if index >= MAX_STEPS {
            return None;
        }
        let current = self.retries.len() as u32;
        let steps = match self.retries.get_mut(attempt as usize) {
            Some(retry) if attempt < current => &mut retry.steps,
            _ => &mut self.steps,
        };
        let position = index as usize;
        while steps.len() <= position {
            let next = steps.len() as u32;
            steps.push(StepRecord::pending(next));
        }
        Some(&mut steps[position])
    }

    /// The attempt the build is on: 0, or the number of retries so far.
    pub fn attempt(&self) -> u32 {
        self.retries.len() as u32
    }

    fn advance(&mut self, state: BuildState) {
        if state > self.state {
            self.state = state;
        }
    }

    /// Holding its master agent, the build runs (its steps may still wait).
    fn hold_master(&mut self, agent: &str, at: Timestamp) {
        self.agent = Some(agent.to_owned());
        if self.state < BuildState::Running {
            self.message = None;
        }
        self.advance(BuildState::Running);
        self.started_at.get_or_insert(at);
    }

    /// Waiting for a master agent, for `reason` (unless the build already runs).
    fn wait_for_master(&mut self, reason: &str) {
        if self.state < BuildState::Running {
            self.advance(BuildState::Waiting);
            self.message = Some(reason.to_owned());
        }
    }

    /// Applies one event of this build, and first the events stored with it.
    pub fn apply(&mut self, event: &BuildEvent) {
        for earlier in &event.earlier {
            self.apply_kind(earlier.at, &earlier.kind);
        }
        self.apply_kind(event.at, &event.kind);
    }

    /// Applies one event, of kind `kind`, that happened at `at`.
    fn apply_kind(&mut self, at: Timestamp, kind: &BuildEventKind) {
        match kind {
            BuildEventKind::Requested(request) => {
                self.builder.clone_from(&request.builder);
                self.reason.clone_from(&request.reason);
                self.priority = request.priority;
                self.changes.clone_from(&request.changes);
                self.properties.clone_from(&request.properties);
                self.requested_at = request.requested_at;
            }
            BuildEventKind::Claimed {
                engine,
                steps,
                agent,
                waiting,
            } => {
                self.engine = Some(engine.clone());
                self.claimed_by.push(engine.clone());
                let attempt = self.attempt();
                for (index, planned) in steps.iter().enumerate() {
                    let Some(step) = self.step_mut(attempt, index as u32) else {
                        break;
                    };
                    step.name.clone_from(&planned.name);
                    step.path.clone_from(&planned.path);
                    step.kind.clone_from(&planned.kind);
                }
                if let Some(agent) = agent {
                    self.hold_master(agent, at);
                }
                if let Some(reason) = waiting {
                    self.wait_for_master(reason);
                }
            }
            BuildEventKind::Waiting { reason } => self.wait_for_master(reason),
            BuildEventKind::PropertySet { name, value } => {
                self.properties.insert(name.clone(), value.clone());
            }
            BuildEventKind::MasterAgent { agent } => self.hold_master(agent, at),
            BuildEventKind::StepWaiting {
                index,
                attempt,
                reason,
            } => {
                let Some(step) = self.step_mut(*attempt, *index) else {
                    return;
                };
                if step.state < StepState::Waiting {
                    step.state = StepState::Waiting;
                    step.message = Some(reason.clone());
                }
            }
            BuildEventKind::StepStarted {
                index,
                attempt,
                agent,
                agent_session,
            } => {
                if self.state < BuildState::Running {
                    self.message = None;
                }
                self.advance(BuildState::Running);
                self.started_at.get_or_insert(at);
                let Some(step) = self.step_mut(*attempt, *index) else {
                    return;
                };
                // Steps the engine carries out itself (pool acquisitions) run on no agent.
                let agent = (!agent.is_empty()).then(|| agent.clone());
                // An adopting engine asks the same run of the agent again, and stores the start
                // again: the step started the first time.
                let asked_again =
                    step.started_at.is_some() && step.agent == agent && step.agent_session == *agent_session;
                if !asked_again {
                    step.started_at = Some(at);
                }
                step.agent = agent;
                step.agent_session.clone_from(agent_session);
                if step.state < StepState::Running {
                    step.state = StepState::Running;
                    step.message = None;
                }
            }
            BuildEventKind::StepFinished {
                index,
                attempt,
                result,
                exit_code,
                message,
            } => {
                let Some(step) = self.step_mut(*attempt, *index) else {
                    return;
                };
                step.state = StepState::Finished;
                step.result = Some(*result);
                step.exit_code = *exit_code;
                step.message.clone_from(message);
                step.finished_at = Some(at);
            }
            BuildEventKind::StepSkipped { index, attempt } => {
                let Some(step) = self.step_mut(*attempt, *index) else {
                    return;
                };
                if step.state == StepState::Pending {
                    step.state = StepState::Skipped;
                }
            }
            BuildEventKind::Retrying { attempt, reason } => {
                if self.retries.iter().any(|retry| retry.attempt == *attempt) {
                    return;
                }
                let steps = self
                    .steps
                    .iter()
                    .map(|step| StepRecord {
                        name: step.name.clone(),
                        path: step.path.clone(),
                        kind: step.kind.clone(),
                        ..StepRecord::pending(step.index)
                    })
                    .collect();
                let earlier = std::mem::replace(&mut self.steps, steps);
                self.retries.push(RetryRecord {
                    attempt: *attempt,
                    reason: reason.clone(),
                    at,
                    steps: earlier,
                });
            }
            BuildEventKind::Finished { result, message } => {
                self.state = BuildState::Finished;
                self.result = Some(*result);
                self.message.clone_from(message);
                self.finished_at = Some(at);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PlannedStep;

    fn event(kind: BuildEventKind, at: u64) -> BuildEvent {
        BuildEvent::new("b1", Timestamp(at), kind)
    }

    fn request() -> BuildRequest {
        BuildRequest {
            build_id: "b1".into(),
            builder: "demo".into(),
            reason: "forced".into(),
            properties: BTreeMap::new(),
            changes: vec![],
            priority: 0,
            requested_at: Timestamp(1),
        }
    }

    #[test]
    fn events_stored_with_a_later_one_fold_first_at_their_own_time() {
        let mut record = BuildRecord::requested(&request());
        let mut started = event(
            BuildEventKind::StepStarted {
                index: 0,
                attempt: 0,
                agent: "a1".into(),
                agent_session: None,
            },
            5,
        );
        started.earlier = vec![crate::EarlierEvent {
            at: Timestamp(3),
            kind: BuildEventKind::Claimed {
                engine: "e1".into(),
                steps: vec![PlannedStep {
                    name: "compile".into(),
                    path: "compile".into(),
                    kind: "command".into(),
                }],
                agent: Some("a1".into()),
                waiting: None,
            },
        }];
        let stored = crate::encode(&started);
        record.apply(&crate::decode::<BuildEvent>(&stored).unwrap());
        assert_eq!(record.engine.as_deref(), Some("e1"));
        assert_eq!(
            (record.agent.as_deref(), record.started_at),
            (Some("a1"), Some(Timestamp(3)))
        );
        assert_eq!(record.steps[0].name, "compile");
        assert_eq!(record.steps[0].state, StepState::Running);
        assert_eq!(record.steps[0].started_at, Some(Timestamp(5)));
        // An event with nothing stored with it is encoded as before `earlier` existed.
        let alone = event(BuildEventKind::MasterAgent { agent: "a1".into() }, 4);
        #[derive(serde::Serialize)]
        struct Before<'a> {
            build_id: &'a str,
            at: Timestamp,
            kind: &'a BuildEventKind,
        }
        let before = Before {
            build_id: &alone.build_id,
            at: alone.at,
            kind: &alone.kind,
        };
        assert_eq!(crate::encode(&alone), crate::encode(&before));
    }

    #[test]
    fn a_claim_that_says_why_the_build_waits_shows_it_waiting_until_its_master_agent() {
        let mut record = BuildRecord::requested(&request());
        record.apply(&event(
            BuildEventKind::Claimed {
                engine: "e1".into(),
                steps: vec![],
                agent: None,
                waiting: Some("no idle agent matches os == \"linux\"".into()),
            },
            2,
        ));
        assert_eq!(record.state, BuildState::Waiting);
        assert_eq!(
            record.message.as_deref(),
            Some("no idle agent matches os == \"linux\"")
        );
        assert_eq!(record.engine.as_deref(), Some("e1"));
        record.apply(&event(BuildEventKind::MasterAgent { agent: "a1".into() }, 3));
        assert_eq!(
            (record.state, record.message.as_deref()),
            (BuildState::Running, None)
        );
        assert_eq!(record.agent.as_deref(), Some("a1"));
    }

    #[test]
    fn steps_past_the_limit_are_ignored_not_allocated() {
        let mut record = BuildRecord::requested(&request());
        for index in [u32::MAX, MAX_STEPS] {
            record.apply(&event(
                BuildEventKind::StepStarted {
                    index,
                    attempt: 0,
                    agent: "a1".into(),
                    agent_session: None,
                },
                3,
            ));
            record.apply(&event(
                BuildEventKind::StepFinished {
                    index,
                    attempt: 0,
                    result: StepResult::Success,
                    exit_code: Some(0),
                    message: None,
                },
                4,
            ));
            record.apply(&event(BuildEventKind::StepSkipped { index, attempt: 0 }, 5));
            record.apply(&event(
                BuildEventKind::StepWaiting {
                    index,
                    attempt: 0,
                    reason: "no agent".into(),
                },
                6,
            ));
        }
        assert!(record.steps.is_empty());
        assert_eq!(record.state, BuildState::Running);
        let planned = PlannedStep {
            name: "s".into(),
            path: "s".into(),
            kind: "command".into(),
        };
        record.apply(&event(
            BuildEventKind::Claimed {
                engine: "e1".into(),
                steps: vec![planned; MAX_STEPS as usize + 5],
                agent: None,
                waiting: None,
            },
            7,
        ));
        assert_eq!(record.steps.len(), MAX_STEPS as usize);
        record.apply(&event(
            BuildEventKind::StepStarted {
                index: MAX_STEPS - 1,
                attempt: 0,
                agent: "a1".into(),
                agent_session: None,
            },
            8,
        ));
        assert_eq!(record.steps[MAX_STEPS as usize - 1].state, StepState::Running);
    }

    #[test]
    fn a_step_asked_again_of_the_same_agent_run_keeps_its_first_start() {
        let mut record = BuildRecord::requested(&request());
        let started = |agent: &str, session: &str, at| {
            event(
                BuildEventKind::StepStarted {
                    index: 0,
                    attempt: 0,
                    agent: agent.into(),
                    agent_session: Some(session.into()),
                },
                at,
            )
        };
        record.apply(&started("a1", "s1", 10));
        // An adopting engine asks the same run of a1 again.
        record.apply(&started("a1", "s1", 20));
        assert_eq!(record.steps[0].started_at, Some(Timestamp(10)));
        // Another agent (the first never took the step) starts it anew.
        record.apply(&started("a2", "s2", 30));
        assert_eq!(record.steps[0].started_at, Some(Timestamp(30)));
        assert_eq!(record.steps[0].agent.as_deref(), Some("a2"));
    }

    #[test]
    fn late_events_do_not_move_state_backwards() {
        let mut record = BuildRecord::requested(&request());
        record.apply(&event(
            BuildEventKind::StepStarted {
                index: 0,
                attempt: 0,
                agent: "a1".into(),
                agent_session: None,
            },
            3,
        ));
        record.apply(&event(
            BuildEventKind::StepFinished {
                index: 0,
                attempt: 0,
                result: StepResult::Success,
                exit_code: Some(0),
                message: None,
            },
            4,
        ));
        // The engine's claim reaches the stream after the agent's step events.
        record.apply(&event(
            BuildEventKind::Claimed {
                engine: "e1".into(),
                steps: vec![
                    PlannedStep {
                        name: "compile".into(),
                        path: "compile".into(),
                        kind: "command".into(),
                    },
                    PlannedStep {
                        name: "test".into(),
                        path: "test".into(),
                        kind: "command".into(),
                    },
                ],
                agent: Some("a1".into()),
                waiting: Some("late".into()),
            },
            2,
        ));
        record.apply(&event(
            BuildEventKind::Waiting {
                reason: "late".into(),
            },
            2,
        ));
        assert_eq!(record.state, BuildState::Running);
        assert_eq!(record.message, None);
        assert_eq!(record.agent.as_deref(), Some("a1"));
        assert_eq!(record.steps[0].name, "compile");
        assert_eq!(record.steps[0].state, StepState::Finished);
        assert_eq!(record.steps[1].state, StepState::Pending);
        record.apply(&event(
            BuildEventKind::Finished {
                result: BuildResult::Success,
                message: None,
            },
            5,
        ));
        assert_eq!(record.state, BuildState::Finished);
        assert_eq!(record.result, Some(BuildResult::Success));
    }

    #[test]
    fn a_late_event_of_an_earlier_attempt_stays_with_that_attempt() {
        let mut record = BuildRecord::requested(&request());
        let started = |attempt| BuildEventKind::StepStarted {
            index: 0,
            attempt,
            agent: format!("agent-{attempt}"),
            agent_session: Some(format!("session-{attempt}")),
        };
        record.apply(&event(started(0), 2));
        record.apply(&event(
            BuildEventKind::Retrying {
                attempt: 1,
                reason: "agent-0 lost".into(),
            },
            3,
        ));
        record.apply(&event(started(1), 4));
        // The lost agent's result arrives after the retry began.
        record.apply(&event(
            BuildEventKind::StepFinished {
                index: 0,
                attempt: 0,
                result: StepResult::Failure,
                exit_code: Some(1),
                message: None,
            },
            5,
        ));
        assert_eq!(record.attempt(), 1);
        assert_eq!(record.steps[0].state, StepState::Running);
        assert_eq!(record.steps[0].agent.as_deref(), Some("agent-1"));
        assert_eq!(record.steps[0].agent_session.as_deref(), Some("session-1"));
        assert_eq!(record.retries[0].steps[0].result, Some(StepResult::Failure));
    }
}
