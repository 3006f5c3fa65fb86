//! The UI master's materialized view: every build, change and agent, folded from the bus.
//!
//! Reads never touch an engine: they are answered from this view, which follows the events
//! and changes streams and the agents bucket.
//!
//! UI masters write snapshots of the view (builds and changes, with the stream sequences they
//! hold) to an object store now and then; a UI master that starts loads the latest and replays
//! only the events stored after it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bus_schema::{subjects, AgentRecord, BuildEvent, BuildEventKind, BuildRecord, Change, MasterRecord};
use services::watch::{
    decoded, follow_stream, mirror_bucket, raw, Mirror, StreamStart, FOLLOWER_CHECK_AFTER_SILENCE,
    QUIET_BUCKET_RESTART_AFTER,
};
use services::Bus;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

#[derive(Default)]
struct Builds {
    by_id: HashMap<String, BuildRecord>,
    /// Build ids are ULIDs, so their order is the order of request time.
    ids: BTreeSet<String>,
    numbers: HashMap<String, u64>,
    /// Events-stream sequence of the last event applied.
    sequence: u64,
}

/// The role naming the UI master in dead letters and metrics.
pub(crate) const ROLE: &str = "ui";

/// An agent's record; for an agent of another protocol version, whose record this release
/// cannot read, what is known: its name, its protocol, and that it is alive now.
fn agent_record(name: &str, value: &[u8]) -> Result<AgentRecord, bus_schema::DecodeError> {
    match bus_schema::decode::<AgentRecord>(value) {
        Ok(record) => Ok(record),
        Err(bus_schema::DecodeError::IncompatibleVersion { found, .. }) => {
            let at = services::time::now();
            Ok(AgentRecord {
                name: name.to_owned(),
                labels: BTreeMap::new(),
                version: "unknown".into(),
                protocol: found,
                session: String::new(),
                benchmark: 0,
                busy_with: None,
                busy_elsewhere: false,
                started_at: at,
                heartbeat_at: at,
            })
        }
        Err(error) => Err(error),
    }
}

#[derive(Default)]
struct Changes {
    list: Vec<Change>,
    /// Changes-stream sequence of the last change applied.
    sequence: u64,
}

/// Format version of [`Snapshot`]; a snapshot of another version is ignored (full replay).
const SNAPSHOT_VERSION: u32 = 1;

/// What a snapshot holds: the folded builds and the changes, and where in each stream they
/// stop.
#[derive(serde::Serialize, serde::Deserialize)]
struct Snapshot<B, C> {
    version: u32,
    events_sequence: u64,
    changes_sequence: u64,
    numbers: HashMap<String, u64>,
    builds: Vec<B>,
    changes: Vec<C>,
}

/// Filters of a build listing.
#[derive(Debug, Default, Clone)]
pub struct BuildFilter {
    pub builder: Option<String>,
    pub state: Option<String>,
    pub change: Option<String>,
    /// Only builds requested before this one (a build id): the next page of a listing.
    pub before: Option<String>,
    pub limit: usize,
}

pub struct View {
    builds: RwLock<Builds>,
    changes: RwLock<Changes>,
    agents: Mirror<AgentRecord>,
    masters: Mirror<MasterRecord>,
    waits: Mirror<bus_schema::EngineWaits>,
    /// The pools bucket as it is: definitions, acquisitions and queues, by key.
    pools: Mirror<bytes::Bytes>,
    /// Events-stream sequence applied so far, so a writer can wait to read its own write.
    applied: watch::Sender<u64>,
    /// Every build change, as it is applied, for live updates.
    updates: tokio::sync::broadcast::Sender<BuildRecord>,
    /// How the view started and what it wrote, for metrics.
    pub snapshot_stats: SnapshotStats,
}

/// Figures of the view's snapshots and replay.
#[derive(Default)]
pub struct SnapshotStats {
    /// Builds loaded from a snapshot at start (0: full replay).
    pub restored_builds: AtomicU64,
    /// Events applied from the stream since start.
    pub replayed_events: AtomicU64,
    /// Events-stream sequence held by the last snapshot this master wrote.
    pub written_sequence: AtomicU64,
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
            snapshot_stats: SnapshotStats::default(),
        })
    }

    /// Starts following the bus (after loading the latest snapshot, if any) and writing
    /// snapshots; runs until `stop` fires.
    pub fn follow(self: &Arc<Self>, bus: &Bus, config: &services::YardConfig, stop: CancellationToken) {
        let view = Arc::clone(self);
        let replicas = config.nats.replicas;
        let snapshot_interval = config.http.snapshot_interval;
        let (bus_for_streams, stop_for_streams) = (bus.clone(), stop.clone());
        tokio::spawn(async move {
            let store = match bus_for_streams
                .object_store(subjects::SNAPSHOTS_BUCKET, replicas)
                .await
            {
                Ok(store) => Some(store),
                Err(error) => {
                    tracing::warn!(%error, "no snapshots: replaying every event");
                    None
                }
            };
            let (events_start, changes_start) = match &store {
                Some(store) => view.restore(store).await,
                None => (StreamStart::Beginning, StreamStart::Beginning),
            };
            view.follow_streams(
                &bus_for_streams,
                events_start,
                changes_start,
                stop_for_streams.clone(),
            );
            // What the restored snapshot holds need not be written again.
            let restored = match (events_start, changes_start) {
                (StreamStart::After(events), StreamStart::After(changes)) => (events, changes),
                _ => (0, 0),
            };
            if let (Some(store), false) = (store, snapshot_interval.is_zero()) {
                view.write_snapshots(store, snapshot_interval, restored, stop_for_streams)
                    .await;
            }
        });
        let masters_silence = config.masters.dead_after;
        mirror_bucket(
            &self.masters,
            (bus, ROLE),
            bus.masters.clone(),
            stop.clone(),
            masters_silence,
            decoded,
        );
        let waits = bus.waits.clone();
        let engine_waits = services::waits::decode_engine_waits;
        mirror_bucket(
            &self.waits,
            (bus, ROLE),
            waits,
            stop.clone(),
            QUIET_BUCKET_RESTART_AFTER,
            engine_waits,
        );
        mirror_bucket(
            &self.pools,
            (bus, ROLE),
            bus.pools.clone(),
            stop.clone(),
            QUIET_BUCKET_RESTART_AFTER,
            raw,
        );
        let agents_silence = config.engine.agent_timeout;
        let agents = Arc::clone(&self.agents);
        let parker = bus.clone();
        let _ready =
            services::watch::follow_bucket(bus.agents.clone(), stop, agents_silence, move |change| {
                let mut agents = agents.write().unwrap_or_else(|poisoned| poisoned.into_inner());
                match change {
                    services::watch::BucketChange::Put { key, value } => match agent_record(&key, &value) {
                        Ok(record) => {
                            agents.insert(key, record);
                        }
                        Err(error) => {
                            let subject = subjects::kv_key(subjects::AGENTS_BUCKET, &key);
                            tokio::spawn(parker.park_dead_letter(ROLE, &subject, &value, &error));
                        }
                    },
                    services::watch::BucketChange::Removed { key } => {
                        agents.remove(&key);
                    }
                }
            });
    }

    fn follow_streams(
        self: &Arc<Self>,
        bus: &Bus,
        events_start: StreamStart,
        changes_start: StreamStart,
        stop: CancellationToken,
    ) {
        let view = Arc::clone(self);
        let parker = bus.clone();
        let _consuming = follow_stream(
            bus.clone(),
            subjects::EVENTS_STREAM,
            None,
            events_start,
            FOLLOWER_CHECK_AFTER_SILENCE,
            stop.clone(),
            move |sequence, subject, payload| {
                view.snapshot_stats
                    .replayed_events
                    .fetch_add(1, Ordering::Relaxed);
                match bus_schema::decode::<BuildEvent>(payload) {
                    Ok(event) => view.apply_event_at(sequence, &event),
                    Err(error) => {
                        tokio::spawn(parker.park_dead_letter(ROLE, subject, payload, &error));
                    }
                }
                view.applied.send_replace(sequence);
            },
        );
        let view = Arc::clone(self);
        let parker = bus.clone();
        let _consuming = follow_stream(
            bus.clone(),
            subjects::CHANGES_STREAM,
            None,
            changes_start,
            FOLLOWER_CHECK_AFTER_SILENCE,
            stop,
            move |sequence, subject, payload| match bus_schema::decode::<Change>(payload) {
                Ok(change) => {
                    let mut changes = view.write_changes();
                    changes.list.push(change);
                    changes.sequence = sequence;
                }
                Err(error) => {
                    tokio::spawn(parker.park_dead_letter(ROLE, subject, payload, &error));
                }
            },
        );
    }

    /// Loads the latest snapshot into the view; returns where each stream's replay starts.
    async fn restore(
        &self,
        store: &async_nats::jetstream::object_store::ObjectStore,
    ) -> (StreamStart, StreamStart) {
        use tokio::io::AsyncReadExt;
        let full = (StreamStart::Beginning, StreamStart::Beginning);
        let started = std::time::Instant::now();
        let mut object = match store.get(subjects::UI_VIEW_SNAPSHOT).await {
            Ok(object) => object,
            Err(error) => {
                tracing::info!(%error, "no view snapshot: replaying every event");
                return full;
            }
        };
        let mut bytes = Vec::new();
        if let Err(error) = object.read_to_end(&mut bytes).await {
            tracing::warn!(%error, "view snapshot unreadable: replaying every event");
            return full;
        }
        let snapshot: Snapshot<BuildRecord, Change> = match bus_schema::decode_object(&bytes) {
            Ok(snapshot) => snapshot,
            Err(error) => {
                tracing::warn!(%error, "view snapshot undecodable: replaying every event");
                return full;
            }
        };
        if snapshot.version != SNAPSHOT_VERSION {
            tracing::info!(
                version = snapshot.version,
                "view snapshot of another version: replaying every event"
            );
            return full;
        }
        let count = snapshot.builds.len();
        self.snapshot_stats
            .restored_builds
            .store(count as u64, Ordering::Relaxed);
        {
            let mut builds = self
                .builds
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            builds.ids = snapshot.builds.iter().map(|record| record.id.clone()).collect();
            builds.by_id = snapshot
                .builds
                .into_iter()
                .map(|record| (record.id.clone(), record))
                .collect();
            builds.numbers = snapshot.numbers;
            builds.sequence = snapshot.events_sequence;
        }
        {
            let mut changes = self.write_changes();
            changes.list = snapshot.changes;
            changes.sequence = snapshot.changes_sequence;
        }
        self.applied.send_replace(snapshot.events_sequence);
        tracing::info!(
            builds = count,
            events_sequence = snapshot.events_sequence,
            bytes = bytes.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "view restored from a snapshot; replaying the events after it"
        );
        (
            StreamStart::After(snapshot.events_sequence),
            StreamStart::After(snapshot.changes_sequence),
        )
    }

    /// Writes a snapshot every `interval` in which the view changed, until `stop` fires.
    async fn write_snapshots(
        self: &Arc<Self>,
        store: async_nats::jetstream::object_store::ObjectStore,
        interval: Duration,
        mut written: (u64, u64),
        stop: CancellationToken,
    ) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = stop.cancelled() => return,
            }
            // Encoding a large view takes a while: off the async workers that answer requests.
            let view = Arc::clone(self);
            let encoded = tokio::task::spawn_blocking(move || view.encode_snapshot(written)).await;
            let Ok(Some((bytes, sequences))) = encoded else {
                continue;
            };
            let started = std::time::Instant::now();
            match store.put(subjects::UI_VIEW_SNAPSHOT, &mut bytes.as_slice()).await {
                Ok(_) => {
                    written = sequences;
                    self.snapshot_stats
                        .written_sequence
                        .store(sequences.0, Ordering::Relaxed);
                    tracing::debug!(
                        bytes = bytes.len(),
                        events_sequence = sequences.0,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "view snapshot written"
                    );
                }
                Err(error) => tracing::warn!(%error, "view snapshot not written"),
            }
        }
    }

    /// The view as a snapshot, with its (events, changes) sequences; `None` if those are still
    /// `written`.
    fn encode_snapshot(&self, written: (u64, u64)) -> Option<(Vec<u8>, (u64, u64))> {
        let builds = self.read_builds();
        let changes = self
            .changes
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let sequences = (builds.sequence, changes.sequence);
        if sequences == written {
            return None;
        }
        let snapshot = Snapshot {
            version: SNAPSHOT_VERSION,
            events_sequence: builds.sequence,
            changes_sequence: changes.sequence,
            numbers: builds.numbers.clone(),
            builds: builds.by_id.values().collect(),
            changes: changes.list.iter().collect(),
        };
        Some((bus_schema::encode(&snapshot), sequences))
    }

    fn write_changes(&self) -> std::sync::RwLockWriteGuard<'_, Changes> {
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
        self.apply_event_at(0, event);
    }

    /// Applies the event stored at `sequence` of the events stream (0: not from the stream).
    fn apply_event_at(&self, sequence: u64, event: &BuildEvent) {
        let mut builds = self
            .builds
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let Builds {
            by_id,
            ids,
            numbers,
            sequence: applied,
        } = &mut *builds;
        *applied = (*applied).max(sequence);
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

    /// Events-stream sequence applied so far.
    pub fn applied_sequence(&self) -> u64 {
        *self.applied.borrow()
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
        let older = match &filter.before {
            Some(before) => (Bound::Unbounded, Bound::Excluded(before.as_str())),
            None => (Bound::Unbounded, Bound::Unbounded),
        };
        builds
            .ids
            .range::<str, _>(older)
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
        changes.list.iter().rev().take(limit).cloned().collect()
    }

    /// Waiting steps whose build has not finished (a wait whose removal was missed is
    /// dropped by the build's end), and how many builds waiting for a master agent the
    /// engines left out of their lists. An engine whose master record has not been refreshed
    /// within `dead_after` is dead: its record expires from the bucket without a word to its
    /// watchers, and the engine that adopts its builds lists their waits again, so its own
    /// list is left out.
    pub fn waits(&self, dead_after: std::time::Duration) -> (Vec<bus_schema::WaitRecord>, u64) {
        let at = services::time::now();
        let dead_engines: HashSet<String> = self
            .masters()
            .into_iter()
            .filter(|master| at.millis_since(master.heartbeat_at) > dead_after.as_millis() as u64)
            .map(|master| master.id)
            .collect();
        let live: Vec<bus_schema::EngineWaits> = self
            .waits
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .values()
            .filter(|listed| !dead_engines.contains(&listed.engine))
            .cloned()
            .collect();
        let builds = self.read_builds();
        let more = live.iter().map(|listed| listed.more).sum();
        let listed = live
            .iter()
            .flat_map(|listed| listed.waits.iter())
            .filter(|wait| {
                builds
                    .by_id
                    .get(&wait.build_id)
                    .is_none_or(|build| build.result.is_none())
            })
            .cloned()
            .collect();
        (listed, more)
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
