//! The UI master's materialized view: every build, change and agent, folded from the bus.
//!
//! Reads never touch an engine: they are answered from this view, which follows the events
//! and changes streams and the agents bucket.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bus_schema::{subjects, AgentRecord, BuildEvent, BuildEventKind, BuildRecord, Change, MasterRecord};
use services::watch::{decoded, follow_stream, mirror_bucket, raw, Mirror, StreamStart};
use services::Bus;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

#[derive(Default)]
struct Builds {
    by_id: HashMap<String, BuildRecord>,
    /// Build ids are ULIDs, so their order is the order of request time.
    ids: BTreeSet<String>,
    numbers: HashMap<String, u64>,
}

/// Filters of a build listing.
#[derive(Debug, Default, Clone)]
pub struct BuildFilter {
    pub builder: Option<String>,
    pub state: Option<String>,
    pub change: Option<String>,
    pub limit: usize,
}

pub struct View {
    builds: RwLock<Builds>,
    changes: RwLock<Vec<Change>>,
    agents: Mirror<AgentRecord>,
    masters: Mirror<MasterRecord>,
    waits: Mirror<bus_schema::WaitRecord>,
    /// The pools bucket as it is: definitions, acquisitions and queues, by key.
    pools: Mirror<bytes::Bytes>,
    /// Events-stream sequence applied so far, so a writer can wait to read its own write.
    applied: watch::Sender<u64>,
    /// Every build change, as it is applied, for live updates.
    updates: tokio::sync::broadcast::Sender<BuildRecord>,
}

impl View {
    pub fn new() -> Arc<View> {
        Arc::new(View {
            builds: RwLock::default(),
            changes: RwLock::default(),
            agents: Default::default(),
            masters: Default::default(),
            waits: Default::default(),
            pools: Default::default(),
            applied: watch::Sender::new(0),
            updates: tokio::sync::broadcast::channel(4096).0,
        })
    }

    /// Starts following the bus; runs until `stop` fires.
    pub fn follow(self: &Arc<Self>, bus: &Bus, config: &services::YardConfig, stop: CancellationToken) {
        let view = Arc::clone(self);
        let _consuming = follow_stream(
            bus.clone(),
            subjects::EVENTS_STREAM,
            None,
            StreamStart::Beginning,
            stop.clone(),
            move |sequence, payload| {
                match bus_schema::decode::<BuildEvent>(payload) {
                    Ok(event) => view.apply_event(&event),
                    Err(error) => tracing::warn!(%error, sequence, "undecodable build event"),
                }
                view.applied.send_replace(sequence);
            },
        );
        let view = Arc::clone(self);
        let _consuming = follow_stream(
            bus.clone(),
            subjects::CHANGES_STREAM,
            None,
            StreamStart::Beginning,
            stop.clone(),
            move |sequence, payload| match bus_schema::decode::<Change>(payload) {
                Ok(change) => view.write_changes().push(change),
                Err(error) => tracing::warn!(%error, sequence, "undecodable change"),
            },
        );
        let masters_silence = Some(config.masters.dead_after);
        mirror_bucket(
            &self.masters,
            bus.masters.clone(),
            stop.clone(),
            masters_silence,
            decoded,
        );
        mirror_bucket(&self.waits, bus.waits.clone(), stop.clone(), None, decoded);
        mirror_bucket(&self.pools, bus.pools.clone(), stop.clone(), None, raw);
        let agents_silence = Some(config.engine.agent_timeout);
        mirror_bucket(&self.agents, bus.agents.clone(), stop, agents_silence, decoded);
    }

    fn write_changes(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Change>> {
        self.changes
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn read_builds(&self) -> std::sync::RwLockReadGuard<'_, Builds> {
        self.builds
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn apply_event(&self, event: &BuildEvent) {
        let mut builds = self
            .builds
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let Builds { by_id, ids, numbers } = &mut *builds;
        let record = by_id.entry(event.build_id.clone()).or_insert_with(|| {
            ids.insert(event.build_id.clone());
            BuildRecord::placeholder(&event.build_id, event.at)
        });
        if let BuildEventKind::Requested(request) = &event.kind {
            if record.number != 0 {
                // A request seen twice (a retried publish outside the dedup window).
                return;
            }
            let number = numbers.entry(request.builder.clone()).or_insert(0);
            *number += 1;
            record.number = *number;
        }
        record.apply(event);
        if record.number != 0 && self.updates.receiver_count() > 0 {
            let _ = self.updates.send(record.clone());
        }
    }

    /// Live build changes, from now on.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<BuildRecord> {
        self.updates.subscribe()
    }

    /// Counts of builds by state and by result, and the waits (request to start, in
    /// milliseconds) of started builds, for metrics.
    pub fn build_statistics(&self) -> (BTreeMap<String, u64>, BTreeMap<String, u64>, Vec<u64>) {
        let builds = self.read_builds();
        let mut states = BTreeMap::new();
        let mut results = BTreeMap::new();
        let mut waits = Vec::new();
        for record in builds.by_id.values().filter(|record| record.number != 0) {
            *states.entry(record.state.as_str().to_owned()).or_insert(0) += 1;
            if let Some(result) = record.result {
                *results.entry(result.as_str().to_owned()).or_insert(0) += 1;
            }
            if let Some(started) = record.started_at {
                waits.push(started.millis_since(record.requested_at));
            }
        }
        (states, results, waits)
    }

    /// Waits until the view has applied the events stream up to `sequence` (at most `limit`).
    pub async fn wait_for_sequence(&self, sequence: u64, limit: Duration) {
        let mut applied = self.applied.subscribe();
        let _ = tokio::time::timeout(limit, applied.wait_for(|applied| *applied >= sequence)).await;
    }

    pub fn build(&self, id: &str) -> Option<BuildRecord> {
        self.read_builds().by_id.get(id).cloned()
    }

    /// Builds matching `filter`, newest first.
    pub fn builds(&self, filter: &BuildFilter) -> Vec<BuildRecord> {
        let builds = self.read_builds();
        builds
            .ids
            .iter()
            .rev()
            .filter_map(|id| builds.by_id.get(id))
            .filter(|record| record.number != 0)
            .filter(|record| filter.builder.as_ref().is_none_or(|b| *b == record.builder))
            .filter(|record| filter.state.as_ref().is_none_or(|s| s == record.state.as_str()))
            .filter(|record| {
                filter
                    .change
                    .as_ref()
                    .is_none_or(|c| record.changes.iter().any(|change| change.id == *c))
            })
            .take(filter.limit)
            .cloned()
            .collect()
    }

    /// Changes, newest first.
    pub fn changes(&self, limit: usize) -> Vec<Change> {
        let changes = self
            .changes
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        changes.iter().rev().take(limit).cloned().collect()
    }

    /// Waiting steps whose build has not finished (a wait whose removal was missed is
    /// dropped by the build's end).
    pub fn waits(&self) -> Vec<bus_schema::WaitRecord> {
        let waits = self.waits.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        let builds = self.read_builds();
        waits
            .values()
            .filter(|wait| {
                builds
                    .by_id
                    .get(&wait.build_id)
                    .is_none_or(|build| build.result.is_none())
            })
            .cloned()
            .collect()
    }

    /// The value stored under a key of the pools bucket.
    pub fn pool_entry<T: serde::de::DeserializeOwned>(&self, key: &str) -> Option<T> {
        let pools = self.pools.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        pools.get(key).and_then(|value| bus_schema::decode(value).ok())
    }

    /// Who holds every pool server: role → server → builds.
    pub fn pool_holders(&self) -> BTreeMap<String, BTreeMap<String, Vec<String>>> {
        let pools = self.pools.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        services::waits::pool_holders(&pools, services::time::now(), 30_000)
    }

    /// The roles of every defined pool.
    pub fn pool_roles(&self) -> Vec<String> {
        let pools = self.pools.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        pools
            .keys()
            .filter_map(|key| key.strip_prefix("pool.").map(str::to_owned))
            .collect()
    }

    pub fn masters(&self) -> Vec<MasterRecord> {
        let masters = self
            .masters
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut list: Vec<MasterRecord> = masters.values().cloned().collect();
        list.sort_by(|a, b| a.id.cmp(&b.id));
        list
    }

    pub fn agents(&self) -> Vec<AgentRecord> {
        let agents = self
            .agents
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut list: Vec<AgentRecord> = agents.values().cloned().collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }
}
