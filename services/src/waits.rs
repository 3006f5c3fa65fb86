//! The wait-for graph of the grid and the deadlocks in it.
//!
//! A waiting step waits for *any* agent matching its expression to come free, so a build is
//! stuck for good only when every agent each of its waits could use is held by a build that
//! is itself stuck. The analysis finds the builds that can still finish (those with no
//! waits, those whose every wait has a free or unclaimed agent, or a holder that can finish)
//! as a least fixed point; the rest are deadlocked.

use std::collections::{BTreeMap, BTreeSet};

use bus_schema::{AgentRecord, DecodeError, EngineWaits, WaitRecord};
use serde::Serialize;

use crate::AgentSelector;

/// One waiting step and what it waits for.
#[derive(Debug, Clone, Serialize)]
pub struct WaitEdge {
    pub build_id: String,
    pub builder: String,
    /// Path of the waiting step; empty for the master step.
    pub step: String,
    pub agents: String,
    pub engine: String,
    /// Agents matching the expression and the builds holding them.
    pub held_by: BTreeMap<String, String>,
    /// A matching agent is free: the wait is about to end.
    pub free_agent: bool,
    /// No live agent matches at all: the step waits for one to register.
    pub no_agent: bool,
}

/// The wait-for graph and its deadlocks.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WaitGraph {
    pub waits: Vec<WaitEdge>,
    /// Groups of builds that wait for each other; each group sorted by build id.
    pub deadlocks: Vec<Vec<String>>,
}

impl WaitGraph {
    /// Builds the graph from the stored waits and the live agents (`alive` says which are).
    pub fn analyze(
        waits: &[WaitRecord],
        agents: &[AgentRecord],
        alive: impl Fn(&AgentRecord) -> bool,
    ) -> WaitGraph {
        Self::analyze_with_pools(waits, agents, alive, &BTreeMap::new())
    }

    /// Like [`WaitGraph::analyze`], with pool waits too: `pools` maps each role to its servers
    /// and the builds holding each.
    pub fn analyze_with_pools(
        waits: &[WaitRecord],
        agents: &[AgentRecord],
        alive: impl Fn(&AgentRecord) -> bool,
        pools: &BTreeMap<String, BTreeMap<String, Vec<String>>>,
    ) -> WaitGraph {
        let live: Vec<&AgentRecord> = agents.iter().filter(|agent| alive(agent)).collect();
        let edges: Vec<WaitEdge> = waits
            .iter()
            .map(|wait| {
                if let Some(role) = &wait.pool {
                    // A pool wait: the role's servers and who holds them.
                    let servers = pools.get(role).cloned().unwrap_or_default();
                    let held_by = servers
                        .iter()
                        .filter_map(|(server, holders)| {
                            let holder = holders.iter().find(|holder| **holder != wait.build_id)?;
                            Some((server.clone(), holder.clone()))
                        })
                        .collect();
                    return WaitEdge {
                        build_id: wait.build_id.clone(),
                        builder: wait.builder.clone(),
                        step: wait.step.clone(),
                        agents: format!("a server of pool {role}"),
                        engine: wait.engine.clone(),
                        held_by,
                        free_agent: servers.values().any(Vec::is_empty),
                        no_agent: servers.is_empty(),
                    };
                }
                let selector = AgentSelector::parse(&wait.agents).unwrap_or_else(|_| AgentSelector::any());
                let matching: Vec<&&AgentRecord> = live
                    .iter()
                    .filter(|agent| selector.matches(&agent.name, &agent.labels))
                    .collect();
                let held_by: BTreeMap<String, String> = matching
                    .iter()
                    .filter_map(|agent| {
                        let holder = agent.busy_with.as_ref()?;
                        (*holder != wait.build_id).then(|| (agent.name.clone(), holder.clone()))
                    })
                    .collect();
                let free_agent = matching.iter().any(|agent| agent.busy_with.is_none());
                WaitEdge {
                    build_id: wait.build_id.clone(),
                    builder: wait.builder.clone(),
                    step: wait.step.clone(),
                    agents: wait.agents.clone(),
                    engine: wait.engine.clone(),
                    held_by,
                    free_agent,
                    no_agent: matching.is_empty(),
                }
            })
            .collect();
        let deadlocked = deadlocked_builds(&edges);
        let deadlocks = groups(&edges, &deadlocked);
        WaitGraph {
            waits: edges,
            deadlocks,
        }
    }

    /// Describes how the builds of `group` wait for each other, for logs and messages.
    pub fn describe(&self, group: &[String]) -> String {
        let members: BTreeSet<&str> = group.iter().map(String::as_str).collect();
        let mut parts = Vec::new();
        for edge in self
            .waits
            .iter()
            .filter(|edge| members.contains(edge.build_id.as_str()))
        {
            let holders: Vec<String> = edge
                .held_by
                .iter()
                .map(|(agent, build)| format!("{agent} held by build {build}"))
                .collect();
            let step = if edge.step.is_empty() {
                "master step".to_owned()
            } else {
                format!("step {}", edge.step)
            };
            parts.push(format!(
                "build {} ({}) {step} waits for {} ({})",
                edge.build_id,
                edge.builder,
                edge.agents,
                holders.join(", ")
            ));
        }
        parts.join("; ")
    }
}

/// The holders of every pool server from the raw entries of the pools bucket: role → server →
/// builds holding it (globally or for that role), leaving out holders not refreshed within
/// `stale_after_ms` of `at`.
pub fn pool_holders(
    entries: &BTreeMap<String, bytes::Bytes>,
    at: bus_schema::Timestamp,
    stale_after_ms: u64,
) -> BTreeMap<String, BTreeMap<String, Vec<String>>> {
    let mut result = BTreeMap::new();
    for (key, value) in entries {
        let Some(role) = key.strip_prefix("pool.") else {
            continue;
        };
        let Ok(pool) = bus_schema::decode::<bus_schema::PoolRecord>(value) else {
            continue;
        };
        let mut servers = BTreeMap::new();
        for server in pool.servers {
            let holds: bus_schema::ServerHolds = entries
                .get(&bus_schema::subjects::pool_server_key(&server))
                .and_then(|value| bus_schema::decode(value).ok())
                .unwrap_or_default();
            let fresh =
                |holder: &bus_schema::PoolHolder| at.millis_since(holder.refreshed_at) <= stale_after_ms;
            let holders: Vec<String> = holds
                .global
                .iter()
                .chain(holds.roles.get(role))
                .filter(|holder| fresh(holder))
                .map(|holder| holder.build_id.clone())
                .collect();
            servers.insert(server, holders);
        }
        result.insert(role.to_owned(), servers);
    }
    result
}

/// Builds that cannot finish: the complement of the least fixed point of "can finish" (a
/// build can finish when each of its waits ends: a free agent, none at all, or a holder that
/// is not waiting or can finish). Worked out in time linear in the edges and holders.
fn deadlocked_builds(edges: &[WaitEdge]) -> BTreeSet<String> {
    let waiting: BTreeSet<&str> = edges.iter().map(|edge| edge.build_id.as_str()).collect();
    // Waits of each build not yet known to end, and the waits each waiting holder could end.
    let mut open_waits: BTreeMap<&str, usize> = BTreeMap::new();
    let mut ended_by: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    let mut ready: Vec<&str> = Vec::new();
    for (number, edge) in edges.iter().enumerate() {
        let open = open_waits.entry(edge.build_id.as_str()).or_default();
        let ends = edge.free_agent
            || edge.no_agent
            || edge
                .held_by
                .values()
                .any(|holder| !waiting.contains(holder.as_str()));
        if !ends {
            *open += 1;
            for holder in edge.held_by.values() {
                ended_by.entry(holder.as_str()).or_default().push(number);
            }
        }
    }
    ready.extend(
        open_waits
            .iter()
            .filter(|(_, open)| **open == 0)
            .map(|(build, _)| *build),
    );
    let mut ended = vec![false; edges.len()];
    let mut can_finish: BTreeSet<&str> = BTreeSet::new();
    while let Some(build) = ready.pop() {
        if !can_finish.insert(build) {
            continue;
        }
        for &number in ended_by.get(build).into_iter().flatten() {
            if std::mem::replace(&mut ended[number], true) {
                continue;
            }
            let waiter = edges[number].build_id.as_str();
            if let Some(open) = open_waits.get_mut(waiter) {
                *open -= 1;
                if *open == 0 {
                    ready.push(waiter);
                }
            }
        }
    }
    waiting
        .into_iter()
        .filter(|build| !can_finish.contains(build))
        .map(str::to_owned)
        .collect()
}

/// What engine `engine` stores of its waits: every wait of a step past the master step (its
/// build holds an agent, so it can be part of a deadlock), then the builds waiting for a
/// master agent (which hold nothing, so no cycle runs through them) by priority and age, up
/// to `limit` waits in all, and the number of those left out.
pub fn engine_waits<'a>(
    engine: &str,
    waits: impl Iterator<Item = &'a WaitRecord>,
    limit: usize,
) -> EngineWaits {
    let (mut listed, mut masters): (Vec<&WaitRecord>, Vec<&WaitRecord>) =
        waits.partition(|wait| !wait.step.is_empty());
    let room = limit.saturating_sub(listed.len());
    // Compared by reference: this runs on every write of an engine's waits, over every wait.
    fn key(wait: &WaitRecord) -> (std::cmp::Reverse<i32>, bus_schema::Timestamp, &str) {
        (std::cmp::Reverse(wait.priority), wait.since, &wait.build_id)
    }
    let order = |a: &&WaitRecord, b: &&WaitRecord| key(a).cmp(&key(b));
    let more = masters.len().saturating_sub(room);
    if more > 0 {
        masters.select_nth_unstable_by(room, order);
        masters.truncate(room);
    }
    masters.sort_unstable_by(order);
    listed.sort_unstable_by(order);
    listed.extend(masters);
    EngineWaits {
        engine: engine.to_owned(),
        waits: listed.into_iter().cloned().collect(),
        more: more as u64,
    }
}

/// Decodes an entry of the waits bucket: an engine's [`EngineWaits`], or a single
/// [`WaitRecord`] as an engine of the previous release stores each wait.
pub fn decode_engine_waits(value: &bytes::Bytes) -> Result<EngineWaits, DecodeError> {
    bus_schema::decode::<EngineWaits>(value).or_else(|error| match bus_schema::decode::<WaitRecord>(value) {
        Ok(single) => Ok(EngineWaits {
            engine: single.engine.clone(),
            waits: vec![single],
            more: 0,
        }),
        Err(_) => Err(error),
    })
}

/// Splits the deadlocked builds into groups that wait for each other.
fn groups(edges: &[WaitEdge], deadlocked: &BTreeSet<String>) -> Vec<Vec<String>> {
    let mut neighbours: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for edge in edges.iter().filter(|edge| deadlocked.contains(&edge.build_id)) {
        for holder in edge
            .held_by
            .values()
            .filter(|holder| deadlocked.contains(*holder))
        {
            neighbours.entry(&edge.build_id).or_default().insert(holder);
            neighbours.entry(holder).or_default().insert(&edge.build_id);
        }
    }
    let mut seen: BTreeSet<&str> = BTreeSet::new();
    let mut result = Vec::new();
    for build in deadlocked {
        if seen.contains(build.as_str()) {
            continue;
        }
        let mut group = BTreeSet::new();
        let mut stack = vec![build.as_str()];
        while let Some(next) = stack.pop() {
            if seen.insert(next) {
                group.insert(next.to_owned());
                stack.extend(neighbours.get(next).into_iter().flatten().copied());
            }
        }
        result.push(group.into_iter().collect());
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use bus_schema::Timestamp;

    fn agent(name: &str, group: &str, busy_with: Option<&str>) -> AgentRecord {
        AgentRecord {
            busy_elsewhere: false,
            name: name.into(),
            labels: [("group".to_owned(), group.to_owned())].into(),
            version: "test".into(),
            protocol: bus_schema::PROTOCOL_VERSION,
            session: "s".into(),
            benchmark: 1,
            busy_with: busy_with.map(str::to_owned),
            started_at: Timestamp(0),
            heartbeat_at: Timestamp(0),
        }
    }

    #[test]
    fn an_engine_lists_every_step_wait_then_the_master_waits_by_priority_and_age_up_to_its_limit() {
        let at = |since: u64, priority: i32, step: &str, build: &str| WaitRecord {
            since: Timestamp(since),
            priority,
            step: step.into(),
            ..wait(build, "group=a")
        };
        let waits = [
            at(5, 0, "", "m-late"),
            at(9, 0, "step1", "s-late"),
            at(1, 0, "", "m-early"),
            at(7, 3, "", "m-urgent"),
            at(2, 0, "step2", "s-early"),
            at(3, 0, "", "m-middle"),
        ];
        let listed = engine_waits("e1", waits.iter(), 4);
        let builds: Vec<&str> = listed.waits.iter().map(|wait| wait.build_id.as_str()).collect();
        assert_eq!(builds, ["s-early", "s-late", "m-urgent", "m-early"]);
        assert_eq!((listed.engine.as_str(), listed.more), ("e1", 2));
        // Step waits are listed even past the limit: they are the deadlock candidates.
        let listed = engine_waits("e1", waits.iter(), 1);
        assert_eq!(listed.waits.len(), 2);
        assert_eq!(listed.more, 4);
        let everything = engine_waits("e1", waits.iter(), 100);
        assert_eq!((everything.waits.len(), everything.more), (6, 0));
    }

    #[test]
    fn a_waits_entry_of_the_previous_release_reads_as_its_engines_one_wait() {
        let single = wait("b1", "group=a");
        let value = bytes::Bytes::from(bus_schema::encode(&single));
        let read = decode_engine_waits(&value).unwrap();
        assert_eq!(
            (read.engine.as_str(), read.waits.as_slice()),
            ("e", std::slice::from_ref(&single))
        );
        let current = engine_waits("e2", [&single].into_iter(), 10);
        let value = bytes::Bytes::from(bus_schema::encode(&current));
        assert_eq!(decode_engine_waits(&value).unwrap(), current);
        assert!(decode_engine_waits(&bytes::Bytes::from_static(b"garbage")).is_err());
    }

    fn wait(build: &str, agents: &str) -> WaitRecord {
        WaitRecord {
            build_id: build.into(),
            builder: "b".into(),
            step: "step1".into(),
            agents: agents.into(),
            engine: "e".into(),
            requested_at: Timestamp(0),
            priority: 0,
            deadlock_policy: "fail-newest".into(),
            since: Timestamp(0),
            pool: None,
        }
    }

    #[test]
    fn two_builds_holding_what_the_other_wants_are_deadlocked() {
        let agents = [agent("agent1", "1", Some("A")), agent("agent2", "2", Some("B"))];
        let waits = [wait("A", r#"name == "agent2""#), wait("B", r#"name == "agent1""#)];
        let graph = WaitGraph::analyze(&waits, &agents, |_| true);
        assert_eq!(graph.deadlocks, vec![vec!["A".to_owned(), "B".to_owned()]]);
        let text = graph.describe(&graph.deadlocks[0]);
        assert!(
            text.contains("agent2 held by build B") && text.contains("agent1 held by build A"),
            "{text}"
        );
    }

    #[test]
    fn a_wait_on_a_build_that_can_finish_is_no_deadlock() {
        // C holds agent3 and waits for nothing: it will finish and free it.
        let agents = [agent("agent1", "1", Some("A")), agent("agent3", "2", Some("C"))];
        let waits = [wait("A", r#"group == "2""#)];
        assert!(WaitGraph::analyze(&waits, &agents, |_| true).deadlocks.is_empty());
    }

    #[test]
    fn groups_deadlock_only_when_every_agent_of_each_group_is_caught() {
        let waits = [
            wait("A1", r#"group == "2""#),
            wait("A2", r#"group == "2""#),
            wait("B1", r#"group == "1""#),
            wait("B2", r#"group == "1""#),
        ];
        let all_held = [
            agent("g1a", "1", Some("A1")),
            agent("g1b", "1", Some("A2")),
            agent("g2a", "2", Some("B1")),
            agent("g2b", "2", Some("B2")),
        ];
        let graph = WaitGraph::analyze(&waits, &all_held, |_| true);
        assert_eq!(graph.deadlocks.len(), 1);
        assert_eq!(graph.deadlocks[0].len(), 4);
        // One group-2 agent free: A1 or A2 takes it, finishes, and frees group 1.
        let one_free = [
            agent("g1a", "1", Some("A1")),
            agent("g1b", "1", Some("A2")),
            agent("g2a", "2", Some("B1")),
            agent("g2b", "2", None),
        ];
        assert!(WaitGraph::analyze(&waits[..3], &one_free, |_| true)
            .deadlocks
            .is_empty());
    }

    #[test]
    fn waiting_for_an_agent_that_does_not_exist_is_no_deadlock() {
        let agents = [agent("agent1", "1", Some("A"))];
        let waits = [wait("A", r#"os == "windows""#)];
        let graph = WaitGraph::analyze(&waits, &agents, |_| true);
        assert!(graph.deadlocks.is_empty());
        assert!(graph.waits[0].no_agent);
    }
}
