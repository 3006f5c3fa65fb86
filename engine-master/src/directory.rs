//! The engine's directory of agents: who is registered, alive and free, and the queue of
//! builds waiting for an agent.
//!
//! The directory is fed by a watch on the agents bucket and by the engine's own assignments.
//! It is only this engine's belief: the agent itself has the last word on occupancy, and
//! answers `Busy` when another engine got there first.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use bus_schema::{AgentRecord, Timestamp, PROTOCOL_VERSION};
use services::time::now;
use services::AgentSelector;
use tokio::sync::oneshot;

/// An agent as this engine sees it.
struct AgentEntry {
    record: AgentRecord,
    /// The build this engine assigned the agent to, until it releases it.
    assigned_to: Option<String>,
    /// Order of last use, for least-recently-used tie breaks.
    last_used: u64,
    /// The agent did not answer this engine's last command: pass it over for new work until
    /// it heartbeats or answers again.
    unreachable: bool,
}

impl AgentEntry {
    /// The build the agent serves: this engine's assignment, else what the agent last said
    /// (`BUSY_ELSEWHERE` while its machine runs a build of another deployment).
    fn holder(&self) -> Option<&str> {
        self.assigned_to
            .as_deref()
            .or(self.record.busy_with.as_deref())
            .or(self.record.busy_elsewhere.then_some(bus_schema::BUSY_ELSEWHERE))
    }
}

/// A build step waiting for an agent.
struct Waiter {
    build_id: String,
    selector: AgentSelector,
    priority: i32,
    requested_at: Timestamp,
    arrival: u64,
    ready: oneshot::Sender<String>,
}

#[derive(Default)]
struct State {
    agents: HashMap<String, AgentEntry>,
    waiters: Vec<Waiter>,
    counter: u64,
}

/// What [`Directory::acquire`] found.
pub(crate) enum Acquired {
    /// This agent is now assigned to the build.
    Agent(String),
    /// No agent is free; the receiver gets one when it is, and `reason` says why it waits.
    Wait {
        ready: oneshot::Receiver<String>,
        reason: String,
    },
}

pub(crate) struct Directory {
    state: Mutex<State>,
    agent_timeout: Duration,
}

impl Directory {
    pub(crate) fn new(agent_timeout: Duration) -> Self {
        Directory {
            state: Mutex::new(State::default()),
            agent_timeout,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn is_alive(&self, record: &AgentRecord, at: Timestamp) -> bool {
        record.protocol == PROTOCOL_VERSION
            && at.millis_since(record.heartbeat_at) <= self.agent_timeout.as_millis() as u64
    }

    /// Records an agent's latest record (from the agents bucket) and serves waiters it can take.
    pub(crate) fn update(&self, record: AgentRecord) {
        let mut state = self.lock();
        let name = record.name.clone();
        match state.agents.get_mut(&name) {
            Some(entry) => {
                if entry.record.session != record.session {
                    // The agent restarted: whatever it was doing for a build is gone.
                    entry.assigned_to = None;
                }
                if record.heartbeat_at > entry.record.heartbeat_at {
                    entry.unreachable = false;
                }
                entry.record = record;
            }
            None => {
                state.agents.insert(
                    name,
                    AgentEntry {
                        record,
                        assigned_to: None,
                        last_used: 0,
                        unreachable: false,
                    },
                );
            }
        }
        self.serve_waiters(&mut state);
    }

    /// Forgets an agent that deregistered.
    pub(crate) fn remove(&self, name: &str) {
        self.lock().agents.remove(name);
    }

    /// Every agent record as this engine knows it.
    pub(crate) fn records(&self) -> Vec<AgentRecord> {
        self.lock()
            .agents
            .values()
            .map(|entry| entry.record.clone())
            .collect()
    }

    /// True if the record shows an agent that speaks our protocol and heartbeats in time.
    pub(crate) fn record_alive(&self, record: &AgentRecord) -> bool {
        self.is_alive(record, now())
    }

    /// The agent answered a command from `session`: that is as good as a heartbeat.
    pub(crate) fn answered(&self, name: &str, session: &str) {
        if let Some(entry) = self.lock().agents.get_mut(name) {
            if entry.record.session == session {
                entry.record.heartbeat_at = now();
                entry.unreachable = false;
            }
        }
    }

    /// True if the agent is registered, speaks our protocol and heartbeats in time.
    pub(crate) fn agent_alive(&self, name: &str, session: &str) -> bool {
        let at = now();
        self.lock()
            .agents
            .get(name)
            .is_some_and(|entry| entry.record.session == session && self.is_alive(&entry.record, at))
    }

    /// Takes a free agent matching `selector` for the build, or queues the build.
    pub(crate) fn acquire(
        &self,
        build_id: &str,
        selector: &AgentSelector,
        priority: i32,
        requested_at: Timestamp,
    ) -> Acquired {
        let mut state = self.lock();
        // Free agents are handed to waiters the moment they free up, so an agent found free
        // here is one that no earlier waiter can use.
        if let Some(name) = self.pick(&state, build_id, selector) {
            self.assign(&mut state, &name, build_id);
            return Acquired::Agent(name);
        }
        let reason = self.wait_reason(&state, selector);
        let (ready, receiver) = oneshot::channel();
        state.counter += 1;
        let arrival = state.counter;
        state.waiters.push(Waiter {
            build_id: build_id.to_owned(),
            selector: selector.clone(),
            priority,
            requested_at,
            arrival,
            ready,
        });
        state
            .waiters
            .sort_by_key(|w| (std::cmp::Reverse(w.priority), w.requested_at, w.arrival));
        Acquired::Wait {
            ready: receiver,
            reason,
        }
    }

    /// Gives the build's agent back; a waiting build may take it at once.
    pub(crate) fn release(&self, name: &str, build_id: &str) {
        let mut state = self.lock();
        if let Some(entry) = state.agents.get_mut(name) {
            if entry.assigned_to.as_deref() == Some(build_id) {
                entry.assigned_to = None;
            }
            if entry.record.busy_with.as_deref() == Some(build_id) {
                entry.record.busy_with = None;
            }
        }
        self.serve_waiters(&mut state);
    }

    /// The agent refused work because it serves `other_build`: believe it.
    pub(crate) fn mark_busy(&self, name: &str, build_id: &str, other_build: &str) {
        let mut state = self.lock();
        if let Some(entry) = state.agents.get_mut(name) {
            if entry.assigned_to.as_deref() == Some(build_id) {
                entry.assigned_to = None;
            }
            entry.record.busy_with = Some(other_build.to_owned());
        }
    }

    /// True if the agent heartbeated or answered within `window`, whatever its session.
    pub(crate) fn heard_within(&self, name: &str, window: Duration) -> bool {
        let at = now();
        self.lock()
            .agents
            .get(name)
            .is_some_and(|entry| at.millis_since(entry.record.heartbeat_at) <= window.as_millis() as u64)
    }

    /// The agent did not answer: give it no new work until it heartbeats again. Builds it
    /// already runs steps for keep asking it (a NATS node failing over looks like this too).
    pub(crate) fn mark_unreachable(&self, name: &str) {
        let mut state = self.lock();
        if let Some(entry) = state.agents.get_mut(name) {
            entry.assigned_to = None;
            entry.unreachable = true;
        }
    }

    /// Serves waiters again: agents whose liveness changed with time alone (a heartbeat
    /// resuming) raise no event.
    pub(crate) fn reconcile(&self) {
        let mut state = self.lock();
        self.serve_waiters(&mut state);
    }

    /// Stops waiting for an agent (the build was cancelled while it waited).
    pub(crate) fn forget_waiter(&self, build_id: &str) {
        self.lock().waiters.retain(|waiter| waiter.build_id != build_id);
    }

    fn pick(&self, state: &State, build_id: &str, selector: &AgentSelector) -> Option<String> {
        let at = now();
        state
            .agents
            .values()
            .filter(|entry| !entry.unreachable && self.is_alive(&entry.record, at))
            .filter(|entry| entry.holder().is_none_or(|holder| holder == build_id))
            .filter(|entry| selector.matches(&entry.record.name, &entry.record.labels))
            // An agent already serving this build first, then the fastest, then the one
            // unused for longest.
            .max_by_key(|entry| {
                (
                    entry.holder() == Some(build_id),
                    entry.record.benchmark,
                    std::cmp::Reverse(entry.last_used),
                )
            })
            .map(|entry| entry.record.name.clone())
    }

    fn assign(&self, state: &mut State, name: &str, build_id: &str) {
        state.counter += 1;
        let counter = state.counter;
        if let Some(entry) = state.agents.get_mut(name) {
            entry.assigned_to = Some(build_id.to_owned());
            entry.last_used = counter;
        }
    }

    fn serve_waiters(&self, state: &mut State) {
        let mut position = 0;
        while position < state.waiters.len() {
            let waiter = &state.waiters[position];
            if waiter.ready.is_closed() {
                state.waiters.remove(position);
                continue;
            }
            match self.pick(state, &waiter.build_id.clone(), &waiter.selector.clone()) {
                Some(name) => {
                    let waiter = state.waiters.remove(position);
                    self.assign(state, &name, &waiter.build_id);
                    if let Err(name) = waiter.ready.send(name) {
                        // The build stopped waiting in the meantime.
                        if let Some(entry) = state.agents.get_mut(&name) {
                            entry.assigned_to = None;
                        }
                    }
                }
                None => position += 1,
            }
        }
    }

    fn wait_reason(&self, state: &State, selector: &AgentSelector) -> String {
        let at = now();
        let mut busy: BTreeMap<&str, &str> = BTreeMap::new();
        let mut matching = 0;
        for entry in state.agents.values() {
            if !selector.matches(&entry.record.name, &entry.record.labels) {
                continue;
            }
            matching += 1;
            if entry.unreachable || !self.is_alive(&entry.record, at) {
                continue;
            }
            if let Some(holder) = entry.holder() {
                busy.insert(&entry.record.name, holder);
            }
        }
        if matching == 0 {
            return format!("no registered agent matches {selector}");
        }
        let busy: Vec<String> = busy
            .into_iter()
            .map(|(agent, build)| match build {
                bus_schema::BUSY_ELSEWHERE => format!("{agent} (for another deployment)"),
                build => format!("{agent} (build {build})"),
            })
            .collect();
        if busy.is_empty() {
            format!("no idle agent matches {selector}; the matching agents are not responding")
        } else {
            format!("no idle agent matches {selector}; busy: {}", busy.join(", "))
        }
    }
}
