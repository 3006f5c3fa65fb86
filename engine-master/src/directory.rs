//! The engine's directory of agents: who is registered, alive and free, and the queue of
//! builds waiting for an agent.
//!
//! The directory is fed by a watch on the agents bucket and by the engine's own assignments.
//! It is only this engine's belief: the agent itself has the last word on occupancy, and
//! answers `Busy` when another engine got there first.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bus_schema::{AgentRecord, Timestamp, PROTOCOL_VERSION};
use services::time::now;
use services::AgentSelector;
use tokio::sync::oneshot;

/// How long a wait reason computed for a selector is reused for further builds waiting on it.
const REASON_REUSE: Duration = Duration::from_secs(1);
/// Busy agents named in a wait reason; the rest are counted.
const REASON_BUSY_NAMED: usize = 5;

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
    /// Where the agent sits in the directory's indexes.
    indexed: Indexed,
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

    /// Where the agent belongs in the indexes, as the entry stands.
    fn index_position(&self) -> Indexed {
        let holder = self.holder().map(str::to_owned);
        let free = (holder.is_none() && !self.unreachable).then(|| FreeKey {
            slower: Reverse(self.record.benchmark),
            last_used: self.last_used,
            name: self.record.name.clone(),
        });
        Indexed { holder, free }
    }
}

/// An agent's place in the directory's indexes.
#[derive(Clone, PartialEq, Eq, Default)]
struct Indexed {
    holder: Option<String>,
    free: Option<FreeKey>,
}

/// The order free agents are offered in: the fastest first, then the one unused for longest.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
struct FreeKey {
    slower: Reverse<u64>,
    last_used: u64,
    name: String,
}

/// The order waiting builds are served in: higher priority first, then earlier requests, then
/// earlier arrivals.
type WaitOrder = (Reverse<i32>, Timestamp, u64);

/// A build step waiting for an agent.
struct Waiter {
    build_id: String,
    ready: oneshot::Sender<String>,
}

/// The builds waiting for an agent matching one selector.
struct WaitGroup {
    selector: AgentSelector,
    waiters: BTreeMap<WaitOrder, Waiter>,
    /// Why they wait, and when that was worked out.
    reason: Option<(String, Instant)>,
}

#[derive(Default)]
struct State {
    agents: HashMap<String, AgentEntry>,
    /// Agents serving no build and not passed over; whether they are alive is checked when one
    /// is picked (liveness changes with time alone).
    free: BTreeSet<FreeKey>,
    /// Agents by the build they serve.
    held: HashMap<String, BTreeSet<String>>,
    /// Waiting builds by the source of their selector.
    groups: HashMap<String, WaitGroup>,
    /// Where each waiting build sits in `groups`.
    waiting: HashMap<String, Vec<(String, WaitOrder)>>,
    counter: u64,
}

impl State {
    /// Brings the indexes in line with the agent's entry after a change to it.
    fn reindex(&mut self, name: &str) {
        let Some(entry) = self.agents.get_mut(name) else {
            return;
        };
        let position = entry.index_position();
        if position == entry.indexed {
            return;
        }
        let before = std::mem::replace(&mut entry.indexed, position.clone());
        self.unindex(name, before);
        if let Some(key) = position.free {
            self.free.insert(key);
        }
        if let Some(holder) = position.holder {
            self.held.entry(holder).or_default().insert(name.to_owned());
        }
    }

    fn unindex(&mut self, name: &str, position: Indexed) {
        if let Some(key) = position.free {
            self.free.remove(&key);
        }
        if let Some(holder) = position.holder {
            if let Some(agents) = self.held.get_mut(&holder) {
                agents.remove(name);
                if agents.is_empty() {
                    self.held.remove(&holder);
                }
            }
        }
    }

    /// Takes a waiting build out of its group.
    fn take_waiter(&mut self, source: &str, order: &WaitOrder) -> Option<Waiter> {
        let group = self.groups.get_mut(source)?;
        let waiter = group.waiters.remove(order)?;
        if group.waiters.is_empty() {
            self.groups.remove(source);
        }
        if let Some(places) = self.waiting.get_mut(&waiter.build_id) {
            places.retain(|(group, place)| !(group == source && place == order));
            if places.is_empty() {
                self.waiting.remove(&waiter.build_id);
            }
        }
        Some(waiter)
    }
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

    /// Records an agent's latest record (from the agents bucket) and serves a waiter it can
    /// take.
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
                    name.clone(),
                    AgentEntry {
                        record,
                        assigned_to: None,
                        last_used: 0,
                        unreachable: false,
                        indexed: Indexed::default(),
                    },
                );
            }
        }
        state.reindex(&name);
        self.offer(&mut state, &name);
    }

    /// Forgets an agent that deregistered.
    pub(crate) fn remove(&self, name: &str) {
        let mut state = self.lock();
        if let Some(entry) = state.agents.remove(name) {
            state.unindex(name, entry.indexed);
        }
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
        let mut state = self.lock();
        let Some(entry) = state.agents.get_mut(name) else {
            return;
        };
        if entry.record.session != session {
            return;
        }
        entry.record.heartbeat_at = now();
        let was_unreachable = std::mem::replace(&mut entry.unreachable, false);
        if was_unreachable {
            state.reindex(name);
            self.offer(&mut state, name);
        }
    }

    /// True if the agent's run `session` heartbeated within `window`, as its record says.
    pub(crate) fn heartbeat_within(&self, name: &str, session: &str, window: Duration) -> bool {
        let at = now();
        self.lock().agents.get(name).is_some_and(|entry| {
            entry.record.session == session
                && at.millis_since(entry.record.heartbeat_at) <= window.as_millis() as u64
        })
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
        let (ready, receiver) = oneshot::channel();
        state.counter += 1;
        let order = (Reverse(priority), requested_at, state.counter);
        let source = selector.source().to_owned();
        let reused = state
            .groups
            .get(&source)
            .and_then(|group| group.reason.as_ref())
            .filter(|(_, at)| at.elapsed() < REASON_REUSE)
            .map(|(reason, _)| reason.clone());
        let reason = match reused {
            Some(reason) => reason,
            None => {
                let reason = self.wait_reason(&state, selector);
                if let Some(group) = state.groups.get_mut(&source) {
                    group.reason = Some((reason.clone(), Instant::now()));
                }
                reason
            }
        };
        let group = state.groups.entry(source.clone()).or_insert_with(|| WaitGroup {
            selector: selector.clone(),
            waiters: BTreeMap::new(),
            reason: Some((reason.clone(), Instant::now())),
        });
        group.waiters.insert(
            order,
            Waiter {
                build_id: build_id.to_owned(),
                ready,
            },
        );
        state
            .waiting
            .entry(build_id.to_owned())
            .or_default()
            .push((source, order));
        Acquired::Wait {
            ready: receiver,
            reason,
        }
    }

    /// Counts `name` as the build's, without asking whether it is free: an earlier engine held
    /// it for the build, which this engine adopted.
    pub(crate) fn assign_adopted(&self, name: &str, build_id: &str) {
        let mut state = self.lock();
        self.assign(&mut state, name, build_id);
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
        state.reindex(name);
        self.offer(&mut state, name);
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
        state.reindex(name);
    }

    /// The run of the agent process the directory knows now, as its record says.
    pub(crate) fn session(&self, name: &str) -> Option<String> {
        self.lock()
            .agents
            .get(name)
            .map(|entry| entry.record.session.clone())
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
        state.reindex(name);
    }

    /// Serves waiters again: agents whose liveness changed with time alone (a heartbeat
    /// resuming) raise no event. Also drops builds that stopped waiting.
    pub(crate) fn reconcile(&self) {
        let mut state = self.lock();
        let closed: Vec<(String, WaitOrder)> = state
            .groups
            .iter()
            .flat_map(|(source, group)| {
                group
                    .waiters
                    .iter()
                    .filter(|(_, waiter)| waiter.ready.is_closed())
                    .map(|(order, _)| (source.clone(), *order))
            })
            .collect();
        for (source, order) in closed {
            state.take_waiter(&source, &order);
        }
        if state.groups.is_empty() {
            return;
        }
        let mut candidates: Vec<String> = state.free.iter().map(|key| key.name.clone()).collect();
        candidates.extend(
            state
                .waiting
                .keys()
                .filter_map(|build_id| state.held.get(build_id))
                .flatten()
                .cloned(),
        );
        for name in candidates {
            self.offer(&mut state, &name);
        }
    }

    /// Stops waiting for an agent (the build was cancelled while it waited).
    pub(crate) fn forget_waiter(&self, build_id: &str) {
        let mut state = self.lock();
        for (source, order) in state.waiting.get(build_id).cloned().unwrap_or_default() {
            state.take_waiter(&source, &order);
        }
    }

    /// The agent for a build: one already serving it first, then the fastest free one, then
    /// the one unused for longest.
    fn pick(&self, state: &State, build_id: &str, selector: &AgentSelector) -> Option<String> {
        let at = now();
        let usable = |entry: &&AgentEntry| {
            !entry.unreachable
                && self.is_alive(&entry.record, at)
                && selector.matches(&entry.record.name, &entry.record.labels)
        };
        let serving = state
            .held
            .get(build_id)
            .into_iter()
            .flatten()
            .filter_map(|name| state.agents.get(name))
            .filter(usable)
            .max_by_key(|entry| (entry.record.benchmark, Reverse(entry.last_used)));
        serving
            .or_else(|| {
                state
                    .free
                    .iter()
                    .filter_map(|key| state.agents.get(&key.name))
                    .find(usable)
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
        state.reindex(name);
    }

    /// Hands the agent to the first waiting build that can use it, if it is usable: a free
    /// agent to the first waiter (by priority, request time, arrival) whose selector it
    /// matches; an agent serving a build to that build's own waiting steps.
    fn offer(&self, state: &mut State, name: &str) {
        loop {
            let Some(entry) = state.agents.get(name) else {
                return;
            };
            if entry.unreachable || !self.is_alive(&entry.record, now()) {
                return;
            }
            let serving = match entry.holder() {
                None => None,
                Some(holder) if state.waiting.contains_key(holder) => Some(holder),
                Some(_) => return,
            };
            let (agent_name, labels) = (&entry.record.name, &entry.record.labels);
            let candidates: Vec<(String, WaitOrder)> = match serving {
                Some(build_id) => state.waiting[build_id].clone(),
                None => state
                    .groups
                    .iter()
                    .filter_map(|(source, group)| {
                        let (order, _) = group.waiters.first_key_value()?;
                        Some((source.clone(), *order))
                    })
                    .collect(),
            };
            let best = candidates
                .into_iter()
                .filter(|(source, _)| {
                    state
                        .groups
                        .get(source)
                        .is_some_and(|group| group.selector.matches(agent_name, labels))
                })
                .min_by_key(|(_, order)| *order);
            let Some((source, order)) = best else {
                return;
            };
            let Some(waiter) = state.take_waiter(&source, &order) else {
                return;
            };
            self.assign(state, name, &waiter.build_id);
            match waiter.ready.send(name.to_owned()) {
                Ok(()) => return,
                Err(_) => {
                    // The build stopped waiting in the meantime: offer the agent again.
                    if let Some(entry) = state.agents.get_mut(name) {
                        entry.assigned_to = None;
                    }
                    state.reindex(name);
                }
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
        let busy_count = busy.len();
        let mut named: Vec<String> = busy
            .into_iter()
            .take(REASON_BUSY_NAMED)
            .map(|(agent, build)| match build {
                bus_schema::BUSY_ELSEWHERE => format!("{agent} (for another deployment)"),
                build => format!("{agent} (build {build})"),
            })
            .collect();
        if busy_count > REASON_BUSY_NAMED {
            named.push(format!("and {} more", busy_count - REASON_BUSY_NAMED));
        }
        if named.is_empty() {
            format!("no idle agent matches {selector}; the matching agents are not responding")
        } else {
            format!("no idle agent matches {selector}; busy: {}", named.join(", "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(name: &str, benchmark: u64, labels: &[(&str, &str)]) -> AgentRecord {
        AgentRecord {
            name: name.into(),
            labels: labels
                .iter()
                .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
                .collect(),
            version: "test".into(),
            protocol: PROTOCOL_VERSION,
            session: format!("{name}-session"),
            benchmark,
            busy_with: None,
            busy_elsewhere: false,
            started_at: now(),
            heartbeat_at: now(),
        }
    }

    fn selector(source: &str) -> AgentSelector {
        AgentSelector::parse(source).expect("selector parses")
    }

    fn acquired(directory: &Directory, build: &str, source: &str, priority: i32) -> Acquired {
        directory.acquire(build, &selector(source), priority, Timestamp(1))
    }

    fn agent_of(acquired: Acquired) -> String {
        match acquired {
            Acquired::Agent(name) => name,
            Acquired::Wait { reason, .. } => panic!("expected an agent, the build waits: {reason}"),
        }
    }

    fn waiting(acquired: Acquired) -> oneshot::Receiver<String> {
        match acquired {
            Acquired::Agent(name) => panic!("expected a wait, got agent {name}"),
            Acquired::Wait { ready, .. } => ready,
        }
    }

    #[test]
    fn the_fastest_free_agent_is_picked_then_the_one_unused_longest() {
        let directory = Directory::new(Duration::from_secs(10));
        directory.update(agent("slow", 10, &[]));
        directory.update(agent("fast", 90, &[]));
        directory.update(agent("fast-too", 90, &[]));
        let first = agent_of(acquired(&directory, "b1", "", 0));
        let second = agent_of(acquired(&directory, "b2", "", 0));
        assert_eq!(
            [first.as_str(), second.as_str()]
                .iter()
                .filter(|name| name.starts_with("fast"))
                .count(),
            2
        );
        directory.release(&first, "b1");
        directory.release(&second, "b2");
        // Both fast agents are free again: the one used longer ago goes first.
        assert_eq!(agent_of(acquired(&directory, "b3", "", 0)), first);
        assert_eq!(agent_of(acquired(&directory, "b4", "", 0)), second);
        assert_eq!(agent_of(acquired(&directory, "b5", "", 0)), "slow");
    }

    #[test]
    fn a_released_agent_goes_to_the_highest_priority_matching_waiter() {
        let directory = Directory::new(Duration::from_secs(10));
        directory.update(agent("linux-1", 1, &[("os", "linux")]));
        directory.update(agent("mac-1", 1, &[("os", "mac")]));
        let linux = agent_of(acquired(&directory, "running-linux", "os == 'linux'", 0));
        let mac = agent_of(acquired(&directory, "running-mac", "os == 'mac'", 0));
        let mut low = waiting(acquired(&directory, "low", "os == 'linux'", 0));
        let mut mac_waiter = waiting(acquired(&directory, "wants-mac", "os == 'mac'", 9));
        let mut high = waiting(acquired(&directory, "high", "os == 'linux'", 5));
        directory.release(&linux, "running-linux");
        assert_eq!(high.try_recv().expect("high got an agent"), "linux-1");
        assert!(low.try_recv().is_err(), "the low-priority build still waits");
        assert!(
            mac_waiter.try_recv().is_err(),
            "a mac build cannot take a linux agent"
        );
        directory.release(&mac, "running-mac");
        assert_eq!(mac_waiter.try_recv().expect("mac build served"), "mac-1");
        directory.release("linux-1", "high");
        assert_eq!(low.try_recv().expect("low served last"), "linux-1");
    }

    #[test]
    fn builds_that_stopped_waiting_are_passed_over() {
        let directory = Directory::new(Duration::from_secs(10));
        directory.update(agent("only", 1, &[]));
        let busy = agent_of(acquired(&directory, "running", "", 0));
        let gone = waiting(acquired(&directory, "gone", "", 0));
        let mut cancelled = waiting(acquired(&directory, "cancelled", "", 0));
        let mut next = waiting(acquired(&directory, "next", "", 0));
        drop(gone);
        directory.forget_waiter("cancelled");
        directory.release(&busy, "running");
        assert_eq!(next.try_recv().expect("the live waiter is served"), "only");
        assert!(cancelled.try_recv().is_err());
    }

    #[test]
    fn an_agent_serving_a_build_is_its_first_choice_and_no_one_elses() {
        let directory = Directory::new(Duration::from_secs(10));
        directory.update(agent("a", 1, &[]));
        directory.update(agent("b", 99, &[]));
        let master = agent_of(acquired(&directory, "build", "", 0));
        assert_eq!(master, "b");
        assert_eq!(agent_of(acquired(&directory, "build", "", 0)), "b");
        assert_eq!(agent_of(acquired(&directory, "other", "", 0)), "a");
        let mut third = waiting(acquired(&directory, "third", "", 0));
        directory.release("a", "other");
        assert_eq!(third.try_recv().expect("served"), "a");
    }

    #[test]
    fn an_unreachable_agent_is_offered_again_once_it_answers() {
        let directory = Directory::new(Duration::from_secs(10));
        directory.update(agent("flaky", 1, &[]));
        directory.mark_unreachable("flaky");
        let mut ready = waiting(acquired(&directory, "build", "", 0));
        directory.answered("flaky", "flaky-session");
        assert_eq!(ready.try_recv().expect("served once it answered"), "flaky");
    }

    #[test]
    fn a_wait_reason_names_a_few_busy_agents_and_counts_the_rest() {
        let directory = Directory::new(Duration::from_secs(10));
        for number in 0..8 {
            directory.update(agent(&format!("agent-{number}"), 1, &[]));
            agent_of(acquired(&directory, &format!("build-{number}"), "", 0));
        }
        match acquired(&directory, "late", "", 0) {
            Acquired::Wait { reason, .. } => {
                assert!(reason.contains("agent-0 (build build-0)"), "{reason}");
                assert!(reason.ends_with("and 3 more"), "{reason}");
            }
            Acquired::Agent(name) => panic!("no agent is free, yet got {name}"),
        }
        directory.remove("agent-0");
        match acquired(&directory, "no-match", "os == 'plan9'", 0) {
            Acquired::Wait { reason, .. } => {
                assert!(reason.starts_with("no registered agent matches"), "{reason}")
            }
            Acquired::Agent(name) => panic!("got {name}"),
        }
    }
}
