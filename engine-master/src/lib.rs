//! The engine master: claims build requests from the shared work queue, chooses agents,
//! drives each build's steps on them and records every state change as a build event.
//!
//! **Architecture Invariant:** an engine keeps no state that another engine cannot rebuild
//! from the bus. A claimed request stays unacknowledged while its build runs (kept alive by
//! progress acks); if the engine dies, JetStream redelivers it and another engine adopts the
//! build by folding its events.

mod build;
mod directory;
mod listeners;
pub mod pools;
mod secrets;
mod wait_book;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer;
use bus_schema::{subjects, StepResult};
use dashmap::{DashMap, DashSet};
use futures::StreamExt;
use services::{Bus, YardConfig};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::directory::Directory;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Bus(#[from] services::bus::Error),
}

/// How a step ended, as its agent reported it.
#[derive(Debug, Clone)]
pub(crate) struct StepOutcome {
    pub result: StepResult,
    pub message: Option<String>,
}

/// A step's end as the driver waiting for it hears of it.
#[derive(Debug)]
pub(crate) struct StepEnded {
    pub outcome: StepOutcome,
    /// Set when the agent handed the end to this engine instead of storing it: the driver
    /// stores it with the build's next event and then answers the agent.
    pub handed_over: Option<HandedOver>,
}

/// A step-finished event an agent handed over, and where to answer it.
#[derive(Debug)]
pub(crate) struct HandedOver {
    pub event: bus_schema::BuildEvent,
    pub answer_to: async_nats::Subject,
}

/// State shared by the engine's loops and build drivers.
pub(crate) struct Engine {
    pub id: String,
    pub config: Arc<YardConfig>,
    pub bus: Bus,
    pub directory: Directory,
    /// Drivers waiting for a step's result, by (build id, attempt, step index).
    pub step_results: DashMap<(String, u32, u32), oneshot::Sender<StepEnded>>,
    /// Builds someone asked to cancel (from the cancels bucket).
    pub cancel_requests: DashSet<String>,
    /// Builds driven by this engine, with the token that cancels each.
    pub running: DashMap<String, CancellationToken>,
    /// Builds of this engine ended to break a deadlock, with the cycle they were in.
    pub deadlock_victims: DashMap<String, String>,
    /// Every engine's waiting steps (from the waits bucket), by key.
    pub waits: services::watch::Mirror<bus_schema::EngineWaits>,
    /// This engine's own waiting steps, which it writes to the waits bucket.
    pub wait_book: wait_book::WaitBook,
    /// The pools bucket as it is, by key, for pool waits in the wait-for graph.
    pub pool_entries: services::watch::Mirror<bytes::Bytes>,
    /// The masters registry, by id: whether the engine that claimed a build is still alive.
    pub masters: services::watch::Mirror<bus_schema::MasterRecord>,
}

/// The role naming the engine in dead letters and metrics.
pub(crate) const ROLE: &str = "engine";

/// How long an engine waits for another to say whether it still drives a build.
const DRIVES_TIMEOUT: Duration = Duration::from_secs(2);

impl Engine {
    /// True if engine `claimer` (not this one) still drives `build_id`. It is asked; a live
    /// engine answers, a dead one has no subscription (no responders). Only when the question
    /// goes unanswered is the masters registry believed.
    pub(crate) async fn still_driven_by(&self, claimer: &str, build_id: &str) -> bool {
        if claimer == self.id {
            return false;
        }
        let asked = tokio::time::timeout(
            DRIVES_TIMEOUT,
            self.bus
                .client
                .request(subjects::engine_drives(claimer), build_id.to_owned().into()),
        )
        .await;
        match asked {
            Ok(Ok(reply)) => reply.payload.as_ref() == b"yes",
            Ok(Err(error)) if error.kind() == async_nats::RequestErrorKind::NoResponders => false,
            _ => self.other_engine_alive(claimer),
        }
    }

    /// True if another engine `id` heartbeats in the masters registry (within `dead_after`).
    pub(crate) fn other_engine_alive(&self, id: &str) -> bool {
        if id == self.id {
            return false;
        }
        let dead_after = self.config.masters.dead_after.as_millis() as u64;
        let at = services::time::now();
        self.masters
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(id)
            .is_some_and(|record| at.millis_since(record.heartbeat_at) <= dead_after)
    }
}

/// Runs an engine until `shutdown` fires, then stops claiming and lets running builds finish
/// (up to `[engine] drain_timeout`) before returning.
pub async fn run(config: Arc<YardConfig>, bus: Bus, shutdown: CancellationToken) -> Result<(), Error> {
    let engine = Arc::new(Engine {
        id: config
            .masters
            .id
            .clone()
            .unwrap_or_else(|| services::presence::master_id(&config)),
        directory: Directory::new(config.engine.agent_timeout),
        config,
        bus,
        step_results: DashMap::new(),
        cancel_requests: DashSet::new(),
        running: DashMap::new(),
        deadlock_victims: DashMap::new(),
        waits: Default::default(),
        wait_book: Default::default(),
        pool_entries: Default::default(),
        masters: Default::default(),
    });
    for warning in engine.config.deadlock_warnings() {
        tracing::warn!("{warning}");
    }
    let listeners_stop = CancellationToken::new();
    // Claiming starts only once the engine knows the registered agents and pending cancels,
    // and follows step results, so no build starts on a partial picture.
    let (agents_ready, cancels_ready, results_ready) = (
        listeners::spawn_agents_watch(Arc::clone(&engine), listeners_stop.clone()),
        listeners::spawn_cancels_watch(Arc::clone(&engine), listeners_stop.clone()),
        listeners::spawn_step_results(Arc::clone(&engine), listeners_stop.clone()),
    );
    for ready in [agents_ready, cancels_ready, results_ready] {
        tokio::select! {
            _ = ready => {}
            _ = shutdown.cancelled() => { listeners_stop.cancel(); return Ok(()); }
        }
    }
    tracing::info!(engine = %engine.id, "engine claiming build requests");
    pools::seed(&engine).await;
    tokio::spawn(reconcile_loop(Arc::clone(&engine), listeners_stop.clone()));
    services::watch::mirror_bucket(
        &engine.waits,
        (&engine.bus, ROLE),
        engine.bus.waits.clone(),
        listeners_stop.clone(),
        services::watch::QUIET_BUCKET_RESTART_AFTER,
        services::waits::decode_engine_waits,
    );
    let waits_writer = tokio::spawn(wait_book::write_loop(Arc::clone(&engine), listeners_stop.clone()));
    let raw = services::watch::raw;
    services::watch::mirror_bucket(
        &engine.pool_entries,
        (&engine.bus, ROLE),
        engine.bus.pools.clone(),
        listeners_stop.clone(),
        services::watch::QUIET_BUCKET_RESTART_AFTER,
        raw,
    );
    services::watch::mirror_bucket(
        &engine.masters,
        (&engine.bus, ROLE),
        engine.bus.masters.clone(),
        listeners_stop.clone(),
        engine.config.masters.dead_after,
        services::watch::decoded::<bus_schema::MasterRecord>,
    );
    tokio::spawn(deadlock_loop(Arc::clone(&engine), listeners_stop.clone()));
    services::metrics::spawn_rtt_probe(engine.bus.clone(), "engine", listeners_stop.clone());
    answer_drives_questions(Arc::clone(&engine), listeners_stop.clone()).await?;
    listeners::take_handed_over_step_ends(Arc::clone(&engine), listeners_stop.clone()).await?;

    let builds = TaskTracker::new();
    claim_loop(&engine, &builds, &shutdown).await;
    builds.close();
    if !builds.is_empty() {
        tracing::info!(engine = %engine.id, running = builds.len(), "draining running builds");
    }
    if tokio::time::timeout(engine.config.engine.drain_timeout, builds.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            engine = %engine.id,
            running = builds.len(),
            "drain timeout: leaving running builds to another engine"
        );
    }
    listeners_stop.cancel();
    let _ = waits_writer.await;
    Ok(())
}

/// How long the reconcile pass may take to list the cancels bucket.
const CANCELS_LISTING_TIMEOUT: Duration = Duration::from_secs(10);

/// Repairs, on an interval, what push events may have missed: cancel requests of running
/// builds, and waiting builds that an agent coming back to life could serve. (Missed step
/// results are looked up by each build's driver.)
async fn reconcile_loop(engine: Arc<Engine>, stop: CancellationToken) {
    let mut ticker = tokio::time::interval(engine.config.masters.reconcile_interval);
    ticker.tick().await;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.cancelled() => return,
        }
        // The cancels watch may have missed a request: list the bucket's keys (one read,
        // however many builds run or wait) and cancel the running builds among them.
        // Bounded: a listing caught in a NATS failover must not stall the pass for good.
        let listing = tokio::time::timeout(CANCELS_LISTING_TIMEOUT, async {
            let keys = engine.bus.cancels.keys().await?;
            Ok::<Vec<String>, async_nats::jetstream::kv::HistoryError>(
                keys.filter_map(|key| std::future::ready(key.ok()))
                    .collect()
                    .await,
            )
        })
        .await;
        match listing {
            Ok(Ok(requested)) => {
                for build_id in requested {
                    if let Some(cancel) = engine.running.get(&build_id).map(|token| token.value().clone()) {
                        engine.cancel_requests.insert(build_id);
                        cancel.cancel();
                    }
                }
            }
            Ok(Err(error)) => tracing::debug!(%error, "cancels not listed; next pass tries again"),
            Err(_) => tracing::debug!("cancels not listed in time; next pass tries again"),
        }
        engine.directory.reconcile();
        if let Ok(mut requests) = engine.bus.stream(subjects::REQUESTS_STREAM).await {
            if let Ok(info) = requests.info().await {
                services::metrics::request_queue_length().set(info.state.messages as i64);
            }
        }
    }
}

/// Answers other engines asking whether this one still drives a build (see
/// [`Engine::still_driven_by`]), until `stop` fires.
async fn answer_drives_questions(engine: Arc<Engine>, stop: CancellationToken) -> Result<(), Error> {
    let mut questions = engine
        .bus
        .client
        .subscribe(subjects::engine_drives(&engine.id))
        .await
        .map_err(|e| services::bus::Error::nats("listening for questions about driven builds", e))?;
    tokio::spawn(async move {
        loop {
            let question = tokio::select! {
                question = questions.next() => question,
                _ = stop.cancelled() => return,
            };
            let Some(question) = question else { return };
            let Some(reply_to) = question.reply else { continue };
            let driving = std::str::from_utf8(&question.payload)
                .is_ok_and(|build_id| engine.running.contains_key(build_id));
            let answer: &'static [u8] = if driving { b"yes" } else { b"no" };
            if let Err(error) = engine.bus.client.publish(reply_to, answer.into()).await {
                tracing::debug!(%error, "answer about a driven build not sent");
            }
        }
    });
    Ok(())
}

/// How often the wait-for graph is searched for deadlocks.
const DEADLOCK_CHECK: Duration = Duration::from_millis(500);

/// Agents by status and this engine's waiting steps, for `/metrics`.
fn record_grid_metrics(engine: &Engine) {
    let metrics = services::metrics::EngineMetrics::get();
    let (mut busy, mut idle, mut offline) = (0, 0, 0);
    for record in engine.directory.records() {
        match (
            engine.directory.record_alive(&record),
            record.busy_with.is_some() || record.busy_elsewhere,
        ) {
            (false, _) => offline += 1,
            (true, true) => busy += 1,
            (true, false) => idle += 1,
        }
    }
    for (status, count) in [("busy", busy), ("idle", idle), ("offline", offline)] {
        metrics
            .agents
            .get_or_create(&services::metrics::StatusLabel {
                status: status.to_owned(),
            })
            .set(count);
    }
    metrics.waiting_steps.set(engine.wait_book.len() as i64);
}

/// Searches the grid's wait-for graph for deadlocks. Every engine sees the same graph and
/// picks the same victim (the newest build of the cycle whose builder says `fail-newest`);
/// the engine driving the victim ends it, freeing its agents.
async fn deadlock_loop(engine: Arc<Engine>, stop: CancellationToken) {
    let mut ticker = tokio::time::interval(DEADLOCK_CHECK);
    let mut reported = std::collections::HashSet::new();
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.cancelled() => return,
        }
        let waits: Vec<bus_schema::WaitRecord> = engine
            .waits
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .values()
            .flat_map(|listed| listed.waits.iter().cloned())
            .collect();
        record_grid_metrics(&engine);
        if waits.is_empty() {
            continue;
        }
        let agents = engine.directory.records();
        let pools = {
            let entries = engine
                .pool_entries
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let stale_after = pools::STALE_AFTER.as_millis() as u64;
            services::waits::pool_holders(&entries, services::time::now(), stale_after)
        };
        let graph = services::waits::WaitGraph::analyze_with_pools(
            &waits,
            &agents,
            |agent| engine.directory.record_alive(agent),
            &pools,
        );
        for group in &graph.deadlocks {
            // The waits bucket can hold a wait that has ended (its removal failed while NATS
            // failed over): confirm each wait of the group against the builds' own events
            // before acting, and forget the ones that ended.
            if !confirm_waits(&engine, &waits, group).await {
                continue;
            }
            let cycle = format!("deadlock: {}", graph.describe(group));
            let victim = waits
                .iter()
                .filter(|wait| group.contains(&wait.build_id) && wait.deadlock_policy == "fail-newest")
                .max_by(|a, b| (a.requested_at, &a.build_id).cmp(&(b.requested_at, &b.build_id)));
            match victim {
                Some(victim) => {
                    if let Some(token) = engine.running.get(&victim.build_id) {
                        if !engine.deadlock_victims.contains_key(&victim.build_id) {
                            tracing::warn!(build = %victim.build_id, "{cycle}; ending the newest build of the cycle");
                            engine
                                .deadlock_victims
                                .insert(victim.build_id.clone(), cycle.clone());
                            token.cancel();
                        }
                    }
                }
                None => {
                    if reported.insert(group.clone()) {
                        tracing::warn!(
                            "{cycle}; every builder in it says `deadlock = \"wait\"`, so it stays"
                        );
                    }
                }
            }
        }
    }
}

/// True if every wait of `group` is still a wait according to its build's events; removes
/// from the engine's view the ones that are not.
async fn confirm_waits(engine: &Engine, waits: &[bus_schema::WaitRecord], group: &[String]) -> bool {
    let mut all_real = true;
    for wait in waits.iter().filter(|wait| group.contains(&wait.build_id)) {
        let Ok(messages) = engine
            .bus
            .read_all(
                subjects::EVENTS_STREAM,
                &subjects::events_of_build(&wait.build_id),
            )
            .await
        else {
            return false;
        };
        let mut record = bus_schema::BuildRecord::placeholder(&wait.build_id, wait.requested_at);
        for message in messages {
            match bus_schema::decode::<bus_schema::BuildEvent>(&message.payload) {
                Ok(event) => record.apply(&event),
                Err(error) => {
                    let bus = &engine.bus;
                    tokio::spawn(bus.park_dead_letter(ROLE, &message.subject, &message.payload, &error));
                }
            }
        }
        let still_waiting = record.result.is_none()
            && if wait.step.is_empty() {
                record.agent.is_none()
            } else {
                record
                    .steps
                    .iter()
                    .any(|step| step.path == wait.step && step.state == bus_schema::StepState::Waiting)
            };
        if !still_waiting {
            all_real = false;
            engine
                .waits
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .values_mut()
                .for_each(|listed| {
                    listed
                        .waits
                        .retain(|known| !(known.build_id == wait.build_id && known.step == wait.step))
                });
        }
    }
    all_real
}

/// Pulls build requests and starts a driver for each, until shutdown.
async fn claim_loop(engine: &Arc<Engine>, builds: &TaskTracker, shutdown: &CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    while !shutdown.is_cancelled() {
        let messages = async {
            let stream = engine.bus.stream(subjects::REQUESTS_STREAM).await?;
            let consumer: consumer::PullConsumer = stream
                .get_consumer(subjects::ENGINES_CONSUMER)
                .await
                .map_err(|e| services::bus::Error::nats("opening the engines consumer", e))?;
            consumer
                .stream()
                .max_messages_per_batch(64)
                .expires(Duration::from_secs(5))
                .messages()
                .await
                .map_err(|e| services::bus::Error::nats("pulling build requests", e))
        };
        let mut messages = match messages.await {
            Ok(messages) => messages,
            Err(error) => {
                tracing::warn!(%error, "cannot pull build requests; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.cancelled() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        loop {
            let next = tokio::select! {
                next = messages.next() => next,
                _ = shutdown.cancelled() => return,
            };
            match next {
                Some(Ok(message)) => {
                    builds.spawn(build::drive(Arc::clone(engine), message));
                }
                Some(Err(error)) => {
                    // Pull streams end on server-side limits and reconnects; make a new one.
                    tracing::debug!(%error, "build request stream interrupted");
                    break;
                }
                None => break,
            }
        }
    }
}
