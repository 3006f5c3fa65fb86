//! Driving one build: from its claimed request to its finished event, walking its step tree.
//!
//! The master step holds an agent matching the builder's `agents` for the whole build. A step
//! with its own `agents` holds an agent matching it until the step and its children end; a
//! step without one runs on its parent's agent. Holds are reserved at the agent itself
//! (`Hold`), which refuses a second build, and counted here so that steps of one build can
//! share an agent.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::IntoFuture;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use bus_schema::{
    subjects, AgentCommand, AgentReply, BuildEvent, BuildEventKind, BuildRecord, BuildRequest, BuildResult,
    EarlierEvent, LogChunk, LogLine, LogStream, PlannedStep, StepAssignment, StepEndAnswer, StepResult,
    StepState, WaitRecord,
};
use futures::future::BoxFuture;
use futures::FutureExt;
use services::config::{BuilderConfig, FlatStep, StepKind};
use services::time::now;
use services::AgentSelector;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::directory::Acquired;
use crate::{Engine, HandedOver, StepEnded, StepOutcome};

/// How long an agent has to answer a command.
const AGENT_REPLY_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a step waits for an agent before the wait is told (a `waiting` event) and
/// recorded among the engine's waits: most waits end within moments when agents turn over
/// quickly, and cost nothing.
const WAIT_TOLD_AFTER: Duration = Duration::from_millis(250);
/// How long a step end an agent handed over waits for the build's next event to be stored
/// with; the next event almost always comes at once (the next step's start, the build's end),
/// and one that does not must not keep the step's end from the build's followers.
const HANDED_OVER_HELD_FOR: Duration = Duration::from_millis(50);

/// Claims one build request and drives the build to its end.
pub(crate) async fn drive(engine: Arc<Engine>, message: jetstream::Message) {
    let redelivered = message.info().map(|info| info.delivered > 1).unwrap_or(false);
    let (message, acker) = message.split();
    let request: BuildRequest = match bus_schema::decode(&message.payload) {
        Ok(request) => request,
        Err(error) => {
            // Out of the work queue only once its copy is parked; else it comes back later.
            let parked = engine
                .bus
                .park_dead_letter(crate::ROLE, &message.subject, &message.payload, &error)
                .await;
            let reject = match parked {
                Ok(()) => AckKind::Term,
                Err(_) => AckKind::Nak(Some(engine.config.engine.claim_timeout)),
            };
            let _ = acker.ack_with(reject).await;
            return;
        }
    };
    let build_id = request.build_id.clone();
    let cancel = CancellationToken::new();
    loop {
        // The entry locks a shard of the map: decide, and let go of it before any await.
        let claimed_here = match engine.running.entry(build_id.clone()) {
            dashmap::Entry::Occupied(_) => false,
            dashmap::Entry::Vacant(slot) => {
                slot.insert(cancel.clone());
                true
            }
        };
        if claimed_here {
            break;
        }
        // Redelivered to the engine that still drives it (its acks were lost while the bus
        // failed over): the build goes on as it was, and this delivery waits, then adopts
        // what that driver left (an end stored, or not).
        keep_claimed_while_running(&engine, &build_id, &acker).await;
    }
    if engine.cancel_requests.contains(&build_id) {
        cancel.cancel();
    }
    // The request stays claimed while the build runs: progress acks restart its ack timer.
    let acker = Arc::new(acker);
    let keepalive = {
        let acker = Arc::clone(&acker);
        let interval = engine.config.engine.claim_timeout / 3;
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.tick().await;
            loop {
                ticker.tick().await;
                if let Err(error) = acker.ack_with(AckKind::Progress).await {
                    tracing::debug!(%error, "progress ack not sent");
                }
            }
        })
    };
    let uses_pools = engine.config.builder(&request.builder).is_some_and(|builder| {
        builder
            .flat_steps()
            .iter()
            .any(|step| step.step.kind() == StepKind::Acquire)
    });
    // A build holding pool servers keeps its holds fresh while it runs.
    let pool_refresh = uses_pools.then(|| {
        let engine = Arc::clone(&engine);
        let build_id = build_id.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(crate::pools::REFRESH_EVERY);
            loop {
                ticker.tick().await;
                if let Err(error) = crate::pools::release_or_refresh_all(&engine, &build_id, true).await {
                    tracing::warn!(build = %build_id, %error, "pool holds not refreshed");
                }
            }
        })
    });
    let mut properties = BTreeMap::new();
    if let Some(builder) = engine.config.builder(&request.builder) {
        properties.extend(builder.properties.clone());
    }
    properties.extend(request.properties.clone());
    let driver = BuildDriver {
        engine: Arc::clone(&engine),
        request,
        cancel,
        attempt: AtomicU32::new(0),
        holds: Mutex::new(HashMap::new()),
        properties: Mutex::new(properties),
        pending_acks: Mutex::new(Vec::new()),
        lost_events: AtomicBool::new(false),
        unannounced_claim: Mutex::new(None),
        held: Arc::new(Mutex::new(Held::default())),
        storing: Arc::new(tokio::sync::Mutex::new(())),
    };
    // An adopted build continues from what its events say; if they cannot be read now (the
    // bus failing over), it must not start over as if new: leave it claimed but unfinished,
    // for this or another engine to adopt once the bus answers.
    let prior = match driver.prior_if_adopted(redelivered).await {
        Ok(prior) => prior,
        Err(()) => {
            tracing::warn!(build = %build_id, "cannot read an adopted build's events; leaving it for later");
            None
        }
    };
    // A build whose engine lives on lost its claim only because its acks did not get through
    // (a NATS node failing over): that engine still drives it, so leave it be and look again
    // after a claim timeout. Only a build whose engine is gone is adopted.
    let claimer = prior
        .as_ref()
        .filter(|record| record.result.is_none())
        .and_then(|record| record.claimed_by.last().cloned());
    let driven_elsewhere = match &claimer {
        Some(claimer) => engine.still_driven_by(claimer, &build_id).await,
        None => false,
    };
    if (redelivered && prior.is_none()) || driven_elsewhere {
        if driven_elsewhere {
            tracing::debug!(build = %build_id, "redelivered, but its engine is alive; leaving it to that engine");
        }
        keepalive.abort();
        if let Some(task) = pool_refresh {
            task.abort();
        }
        engine.running.remove(&build_id);
        let _ = acker
            .ack_with(AckKind::Nak(Some(engine.config.engine.claim_timeout)))
            .await;
        return;
    }
    let metrics = services::metrics::EngineMetrics::get();
    metrics.claims.inc();
    metrics.builds_running.inc();
    let ending = driver.run(prior).await;
    driver.release_all().await;
    if let Some(task) = pool_refresh {
        task.abort();
    }
    // Every pool server the build acquired goes back, whatever its result.
    if uses_pools {
        match crate::pools::release_or_refresh_all(&engine, &build_id, false).await {
            Ok(servers) if !servers.is_empty() => {
                tracing::debug!(build = %build_id, ?servers, "pool servers released at the end of the build");
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(build = %build_id, %error, "pool servers not released; they expire"),
        }
    }
    metrics.builds_running.dec();
    if let Some((result, _)) = &ending {
        metrics
            .builds_finished
            .get_or_create(&services::metrics::ResultLabel {
                result: result.as_str().to_owned(),
            })
            .inc();
    }
    if let Some((result, message)) = ending {
        // The build stays claimed by this (live) engine until its end is stored, so no other
        // engine adopts it meanwhile: keep asking the bus. Killed here, the engine leaves it
        // to be adopted.
        while !driver.finish(result, message.clone()).await {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    driver.flush_events().await;
    keepalive.abort();
    engine.running.remove(&build_id);
    engine.deadlock_victims.remove(&build_id);
    // Only now, with the build's end stored, does the request leave the work queue. An ack
    // lost on the way brings the request back after the claim timeout, to an engine that
    // finds the build's end stored and only acknowledges it.
    if let Err(error) = acker.ack().await {
        tracing::debug!(build = %build_id, %error, "request ack not sent; the request comes back");
    }
}

/// Keeps a second delivery of a build request this engine already drives claimed until that
/// driver lets go of the build.
async fn keep_claimed_while_running(engine: &Engine, build_id: &str, acker: &jetstream::message::Acker) {
    tracing::debug!(build = %build_id, "request redelivered to the engine driving it");
    let mut ticker = tokio::time::interval(engine.config.engine.claim_timeout / 3);
    let mut check = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                if let Err(error) = acker.ack_with(AckKind::Progress).await {
                    tracing::debug!(%error, "progress ack not sent");
                }
            }
            _ = check.tick() => {
                if !engine.running.contains_key(build_id) {
                    return;
                }
            }
        }
    }
}

/// An agent the build holds: how many of its steps hold it, and the agent's session.
struct Hold {
    count: u32,
    session: String,
    /// Not asked yet: the build's first step on the agent takes it (a `RunStep` holds the
    /// agent as a `Hold` does, one round trip fewer). Until then another engine's build may
    /// get there first, and the build picks another agent.
    untaken: bool,
    /// A `RunStep` of the build may have reached the agent's run named by `session` already
    /// (an earlier engine's, adopted): if that run has ended, the step may have died with it.
    may_have_started: bool,
    /// The agent let go of the build itself, with the last step it ran for it.
    released_by_agent: bool,
}

impl Hold {
    fn taken(session: String) -> Hold {
        Hold {
            count: 1,
            session,
            untaken: false,
            may_have_started: false,
            released_by_agent: false,
        }
    }
}

/// How a step (or the master step) ended.
#[derive(Debug, Clone)]
enum NodeEnd {
    Done(StepOutcome),
    Cancelled,
    /// An agent holding the build's work was lost; the build may start over.
    AgentLost(String),
    /// The agent picked for the build's first step was taken by another build first; nothing
    /// ran, and another agent is picked.
    AgentTaken(String),
}

/// How one attempt of a build ended.
enum AttemptEnd {
    Done((BuildResult, Option<String>)),
    AgentLost(String),
}

struct BuildDriver {
    engine: Arc<Engine>,
    request: BuildRequest,
    cancel: CancellationToken,
    /// The attempt running now: 0, then one more for each retry after a lost agent.
    attempt: AtomicU32,
    holds: Mutex<HashMap<String, Hold>>,
    /// Build properties: builder defaults, the request's, and those set while it runs.
    properties: Mutex<BTreeMap<String, String>>,
    /// Events published but not yet confirmed stored, kept to publish again on failure.
    pending_acks: Mutex<Vec<(BuildEvent, jetstream::context::PublishAckFuture)>>,
    /// An event published (not waited for) could not be stored at all: the next
    /// [`Self::flush_events`] says so.
    lost_events: AtomicBool,
    /// The plan of a claim not yet announced: the `claimed` event names the master agent
    /// when that event would have, or why the build waits for one (one event fewer).
    unannounced_claim: Mutex<Option<Vec<PlannedStep>>>,
    /// Events held back to be stored with the build's next event, in one message
    /// ([`BuildEvent::earlier`]): the claim, and the master agent, are always followed at
    /// once by the build's next event (a step's start, a wait, a skip); so, almost always, is
    /// a step's end its agent handed over.
    held: Arc<Mutex<Held>>,
    /// Taken while held events are taken and sent: a step end stored on its own after
    /// [`HANDED_OVER_HELD_FOR`] is stored before any later event of the build is sent, so
    /// that no one sees the build finished while one of its steps still runs.
    storing: Arc<tokio::sync::Mutex<()>>,
}

/// What a build holds back for its next event.
#[derive(Default)]
struct Held {
    events: Vec<EarlierEvent>,
    /// The agents that handed over step ends among `events`, waiting to hear them stored.
    answer_to: Vec<async_nats::Subject>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl BuildDriver {
    fn id(&self) -> &str {
        &self.request.build_id
    }

    fn attempt(&self) -> u32 {
        self.attempt.load(Ordering::SeqCst)
    }

    fn holds(&self) -> std::sync::MutexGuard<'_, HashMap<String, Hold>> {
        lock(&self.holds)
    }

    /// The message to store for `kind` now, and the agents to answer once it is stored: none
    /// when it is held back for the build's next event; else `kind` carrying the held events.
    fn outgoing(&self, kind: BuildEventKind) -> Option<(BuildEvent, Vec<async_nats::Subject>)> {
        let at = now();
        let claim = lock(&self.unannounced_claim).take();
        let mut held = lock(&self.held);
        let kind = match claim {
            None => kind,
            Some(steps) => {
                let engine = self.engine.id.clone();
                let (agent, waiting) = match &kind {
                    BuildEventKind::MasterAgent { agent } => (Some(agent.clone()), None),
                    BuildEventKind::Waiting { reason } => (None, Some(reason.clone())),
                    _ => (None, None),
                };
                let folded = agent.is_some() || waiting.is_some();
                let claimed = BuildEventKind::Claimed {
                    engine,
                    steps,
                    agent,
                    waiting,
                };
                if folded {
                    claimed
                } else {
                    held.events.push(EarlierEvent { at, kind: claimed });
                    kind
                }
            }
        };
        let holds_back = match &kind {
            BuildEventKind::MasterAgent { .. } => true,
            BuildEventKind::Claimed { agent, .. } => agent.is_some(),
            _ => false,
        };
        if holds_back {
            held.events.push(EarlierEvent { at, kind });
            return None;
        }
        let mut event = BuildEvent::new(self.id(), at, kind);
        event.earlier = std::mem::take(&mut held.events);
        Some((event, std::mem::take(&mut held.answer_to)))
    }

    /// Publishes an event without waiting for it to be stored; [`Self::flush_events`] makes
    /// sure it was. One that carries a step end an agent handed over is stored at once: the
    /// agent waits to hear so.
    async fn publish(&self, kind: BuildEventKind) {
        let _storing = self.storing.lock().await;
        let Some((event, answer_to)) = self.outgoing(kind) else {
            return;
        };
        if answer_to.is_empty() {
            self.publish_now(event).await;
        } else if !store_answering(&self.engine, event, answer_to).await {
            self.lost_events.store(true, Ordering::SeqCst);
        }
    }

    /// Holds a step end its agent handed over, to be stored with the build's next event; if
    /// none comes within [`HANDED_OVER_HELD_FOR`], it is stored on its own.
    fn hold_step_end(&self, handed: HandedOver) {
        {
            let mut held = lock(&self.held);
            held.events.push(EarlierEvent {
                at: handed.event.at,
                kind: handed.event.kind,
            });
            held.answer_to.push(handed.answer_to);
        }
        let engine = Arc::clone(&self.engine);
        let held = Arc::clone(&self.held);
        let storing = Arc::clone(&self.storing);
        let build_id = self.id().to_owned();
        tokio::spawn(async move {
            tokio::time::sleep(HANDED_OVER_HELD_FOR).await;
            let _storing = storing.lock().await;
            let (mut events, answer_to) = {
                let mut held = lock(&held);
                if held.answer_to.is_empty() {
                    // Stored with a later event already.
                    return;
                }
                (
                    std::mem::take(&mut held.events),
                    std::mem::take(&mut held.answer_to),
                )
            };
            let Some(last) = events.pop() else { return };
            let mut event = BuildEvent::new(build_id, last.at, last.kind);
            event.earlier = events;
            store_answering(&engine, event, answer_to).await;
        });
    }

    async fn publish_now(&self, event: BuildEvent) {
        match self.engine.bus.publish_built_event(&event).await {
            Ok(ack) => lock(&self.pending_acks).push((event, ack)),
            Err(error) => {
                tracing::warn!(build = %self.id(), %error, "event not published; storing it again");
                if !store_retrying(&self.engine, event).await {
                    self.lost_events.store(true, Ordering::SeqCst);
                }
            }
        }
    }

    /// Waits until every published event is stored, publishing again those that were not. The
    /// fold is order-tolerant, so an event stored late still lands right. False if one could
    /// not be stored at all.
    async fn flush_events(&self) -> bool {
        let pending = std::mem::take(&mut *lock(&self.pending_acks));
        let mut all_stored = !self.lost_events.swap(false, Ordering::SeqCst);
        for (event, ack) in pending {
            if let Err(error) = ack.into_future().await {
                tracing::warn!(build = %self.id(), %error, "event not stored; storing it again");
                all_stored &= store_retrying(&self.engine, event).await;
            }
        }
        all_stored
    }

    /// Stores an event (with what was held back for it), retrying with backoff while the bus
    /// refuses it; false if it gave up.
    async fn store_with_retries(&self, kind: BuildEventKind) -> bool {
        let _storing = self.storing.lock().await;
        match self.outgoing(kind) {
            None => true,
            Some((event, answer_to)) => store_answering(&self.engine, event, answer_to).await,
        }
    }

    /// The build's state from its events when it was redelivered (adopted); `Err` if they
    /// cannot be read now.
    async fn prior_if_adopted(&self, redelivered: bool) -> Result<Option<BuildRecord>, ()> {
        if !redelivered {
            return Ok(None);
        }
        for _ in 0..30 {
            if let Some(prior) = self.prior_state().await {
                return Ok(Some(prior));
            }
            if self.cancel.is_cancelled() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        Err(())
    }

    /// Runs the build; returns how it ended, or `None` if it had already ended (a redelivered
    /// request whose build another engine finished).
    async fn run(&self, mut prior: Option<BuildRecord>) -> Option<(BuildResult, Option<String>)> {
        let engine = Arc::clone(&self.engine);
        if let Some(record) = &prior {
            // Properties set by steps before an adoption (acquired servers) still hold.
            lock(&self.properties).extend(record.properties.clone());
        }
        if let Some(record) = prior.as_ref().filter(|record| record.result.is_some()) {
            // Its engine stored the end but died before letting go of the agents.
            self.adopt_holds(record);
            return None;
        }
        let Some(builder) = engine.config.builder(&self.request.builder) else {
            return Some((
                BuildResult::Exception,
                Some(format!(
                    "builder {:?} is not configured on engine {}",
                    self.request.builder, engine.id
                )),
            ));
        };
        let selector = match builder.selector() {
            Ok(selector) => selector,
            Err(error) => {
                return Some((
                    BuildResult::Exception,
                    Some(format!("bad agents expression: {error}")),
                ))
            }
        };
        let flat = builder.flat_steps();
        // Announced with the build's first event: the master agent, when one is free.
        *lock(&self.unannounced_claim) = Some(plan(&flat));
        self.attempt
            .store(prior.as_ref().map_or(0, BuildRecord::attempt), Ordering::SeqCst);
        loop {
            if let Some(record) = &prior {
                self.adopt_holds(record);
            }
            match self.run_attempt(builder, &selector, &flat, prior.as_ref()).await {
                AttemptEnd::Done(ending) => return Some(ending),
                AttemptEnd::AgentLost(reason) if self.attempt() < builder.retries => {
                    let attempt = self.attempt.fetch_add(1, Ordering::SeqCst) + 1;
                    tracing::warn!(build = %self.id(), attempt, %reason, "agent lost; retrying the build");
                    self.flush_events().await;
                    // Stored before the new attempt's steps start, so the fold files the old
                    // steps under this retry and not the new ones.
                    if !self
                        .store_with_retries(BuildEventKind::Retrying { attempt, reason })
                        .await
                    {
                        return Some((
                            BuildResult::Exception,
                            Some("the bus did not store the retry".into()),
                        ));
                    }
                    // If the agents are only cut off, they must not keep the build's work.
                    self.release_all().await;
                    prior = None;
                }
                AttemptEnd::AgentLost(reason) => {
                    return Some((
                        BuildResult::Lost,
                        Some(format!("{reason}; no retries left ({} allowed)", builder.retries)),
                    ));
                }
            }
        }
    }

    /// Counts as held the agents an earlier engine reserved for this build (adoption), each
    /// under the run of the agent that may have started its unfinished steps: the one named
    /// by such a step's start, else the one the directory knows now. A step started under one
    /// run is never sent to another (see [`StepAssignment::require_session`]).
    ///
    /// The master agent counts as not taken yet while no command step of the attempt finished
    /// on it: if it now serves another build, nothing of this one ran there, and the build
    /// goes on on another agent.
    fn adopt_holds(&self, record: &BuildRecord) {
        let mut sessions: HashMap<&str, String> = HashMap::new();
        let mut finished_on: HashSet<&str> = HashSet::new();
        for step in &record.steps {
            // Only command steps name the agent's run.
            if let (Some(agent), Some(session)) = (&step.agent, &step.agent_session) {
                if step.state < StepState::Finished {
                    sessions.entry(agent).or_insert_with(|| session.clone());
                } else {
                    finished_on.insert(agent);
                }
            }
        }
        let mut holds = self.holds();
        for agent in record
            .agent
            .iter()
            .chain(record.steps.iter().filter_map(|s| s.agent.as_ref()))
        {
            let started = sessions.get(agent.as_str());
            let session = match started {
                Some(session) => session.clone(),
                None => self.engine.directory.session(agent).unwrap_or_default(),
            };
            let is_master = record.agent.as_ref() == Some(agent);
            holds.entry(agent.clone()).or_insert(Hold {
                count: 0,
                untaken: is_master && !finished_on.contains(agent.as_str()),
                may_have_started: started.is_some(),
                ..Hold::taken(session)
            });
        }
    }

    /// Runs the whole step tree once under the master step, skipping steps `prior` shows
    /// finished.
    async fn run_attempt(
        &self,
        builder: &BuilderConfig,
        selector: &AgentSelector,
        flat: &[FlatStep<'_>],
        prior: Option<&BuildRecord>,
    ) -> AttemptEnd {
        if self.cancel.is_cancelled() {
            self.skip(all_steps(flat)).await;
            return AttemptEnd::Done((BuildResult::Cancelled, Some("cancelled before it started".into())));
        }
        let top = top_steps(flat);
        // A new attempt whose first step runs on the master agent lets that step take it.
        let taken_by_first_step = prior.is_none()
            && top.first().is_some_and(|first| {
                let step = &flat[*first as usize].step;
                step.kind() == StepKind::Command && step.agents.is_none()
            });
        let mut wait_observed = false;
        // An adopted build goes on on the agent its earlier engine held for the master step:
        // a step started there and not finished must be settled there (or the agent found
        // lost), never started again on an agent the directory would pick now.
        let mut adopted_master = self.adopted_agent(prior.and_then(|record| record.agent.as_deref()));
        let (master, end) = loop {
            let held = match adopted_master.take() {
                Some(agent) => Some(agent),
                None => {
                    self.hold_agent(builder, selector, None, taken_by_first_step)
                        .await
                }
            };
            let Some(master) = held else {
                self.skip(all_steps(flat)).await;
                return AttemptEnd::Done(self.cancelled_ending());
            };
            if !wait_observed {
                wait_observed = true;
                let waited = now().millis_since(self.request.requested_at);
                services::metrics::EngineMetrics::get()
                    .build_wait_seconds
                    .observe(waited as f64 / 1000.0);
            }
            self.publish(BuildEventKind::MasterAgent {
                agent: master.clone(),
            })
            .await;
            match self.run_sequence(builder, flat, &top, &master, prior, true).await {
                NodeEnd::AgentTaken(reason) => {
                    tracing::debug!(build = %self.id(), %reason, "picking another agent");
                    self.holds().remove(&master);
                }
                end => break (master, end),
            }
        };
        self.release_hold(&master).await;
        match end {
            NodeEnd::Done(outcome) if outcome.result == StepResult::Success => {
                AttemptEnd::Done((BuildResult::Success, None))
            }
            NodeEnd::Done(outcome) => AttemptEnd::Done((build_result(outcome.result), outcome.message)),
            NodeEnd::Cancelled => AttemptEnd::Done(self.cancelled_ending()),
            NodeEnd::AgentLost(reason) | NodeEnd::AgentTaken(reason) => AttemptEnd::AgentLost(reason),
        }
    }

    /// How a cancelled build ends: `deadlock` when it was cancelled to break one.
    fn cancelled_ending(&self) -> (BuildResult, Option<String>) {
        match self.engine.deadlock_victims.get(self.id()) {
            Some(cycle) => (BuildResult::Deadlock, Some(cycle.value().clone())),
            None => (BuildResult::Cancelled, Some("cancelled".into())),
        }
    }

    /// Runs steps one after another; after the first that does not succeed, skips the rest.
    /// `last_on_agent`: nothing of the build runs on `agent` after the sequence.
    async fn run_sequence(
        &self,
        builder: &BuilderConfig,
        flat: &[FlatStep<'_>],
        steps: &[u32],
        agent: &str,
        prior: Option<&BuildRecord>,
        last_on_agent: bool,
    ) -> NodeEnd {
        let mut end = NodeEnd::Done(StepOutcome {
            result: StepResult::Success,
            message: None,
        });
        for (position, index) in steps.iter().enumerate() {
            let last = last_on_agent && position + 1 == steps.len();
            let step_end = self.run_node(builder, flat, *index, agent, prior, last).await;
            match &step_end {
                NodeEnd::Done(outcome) if outcome.result == StepResult::Success => continue,
                // Nothing ran: no step is skipped either.
                NodeEnd::AgentTaken(_) => return step_end,
                NodeEnd::Done(outcome) => {
                    let name = &flat[*index as usize].path;
                    let detail = outcome
                        .message
                        .clone()
                        .unwrap_or_else(|| format!("{:?}", outcome.result));
                    end = NodeEnd::Done(StepOutcome {
                        result: outcome.result,
                        message: Some(format!("step {name:?}: {detail}")),
                    });
                }
                _ => end = step_end.clone(),
            }
            self.skip(subtree(flat, &steps[position + 1..])).await;
            break;
        }
        end
    }

    /// Runs one step (and its children), on its own agent if it names one, else on `parent`'s.
    /// `last_on_parent`: nothing of the build runs on the parent's agent after this step.
    fn run_node<'a>(
        &'a self,
        builder: &'a BuilderConfig,
        flat: &'a [FlatStep<'a>],
        index: u32,
        parent_agent: &'a str,
        prior: Option<&'a BuildRecord>,
        last_on_parent: bool,
    ) -> BoxFuture<'a, NodeEnd> {
        async move {
            let node = &flat[index as usize];
            if let Some(done) = prior.and_then(|record| finished_step(record, index)) {
                return NodeEnd::Done(done);
            }
            if self.cancel.is_cancelled() {
                self.skip(subtree(flat, &[index])).await;
                return NodeEnd::Cancelled;
            }
            let own_selector = match node.step.agents.as_deref().map(|agents| {
                AgentSelector::parse(&services::config::substitute(agents, &self.properties_now()))
            }) {
                Some(Ok(selector)) => Some(selector),
                Some(Err(error)) => {
                    return NodeEnd::Done(exception(format!("bad agents expression: {error}")));
                }
                None => None,
            };
            // Adopted: a step on its own agent goes on on the agent its start names.
            let adopted = own_selector.as_ref().and_then(|_| {
                let started_on = prior
                    .and_then(|record| record.steps.get(index as usize))
                    .and_then(|step| step.agent.as_deref());
                self.adopted_agent(started_on)
            });
            let own_agent = match &own_selector {
                Some(_) if adopted.is_some() => adopted,
                Some(selector) => match self.hold_agent(builder, selector, Some(node), false).await {
                    Some(agent) => Some(agent),
                    None => {
                        self.skip(subtree(flat, &[index])).await;
                        return NodeEnd::Cancelled;
                    }
                },
                None => None,
            };
            let agent = own_agent.as_deref().unwrap_or(parent_agent);
            // A step on its own agent is the last on it (unless that is a parent's agent too,
            // which the hold count tells).
            let last_on_agent = own_agent.is_some() || last_on_parent;
            let end = match node.step.kind() {
                StepKind::Command => self.run_command(builder, node, agent, last_on_agent).await,
                StepKind::Acquire | StepKind::Release => self.run_pool_step(node).await,
                StepKind::Sequence | StepKind::Parallel => {
                    self.publish(BuildEventKind::StepStarted {
                        index,
                        attempt: self.attempt(),
                        agent: agent.to_owned(),
                        agent_session: None,
                    })
                    .await;
                    let end = if node.step.kind() == StepKind::Sequence {
                        self.run_sequence(builder, flat, &node.children, agent, prior, last_on_agent)
                            .await
                    } else {
                        let mut children = Vec::with_capacity(node.children.len());
                        for child in &node.children {
                            children.push(self.run_node(builder, flat, *child, agent, prior, false));
                        }
                        combine(futures::future::join_all(children).await)
                    };
                    if let NodeEnd::Done(outcome) = &end {
                        self.publish(BuildEventKind::StepFinished {
                            index,
                            attempt: self.attempt(),
                            result: outcome.result,
                            exit_code: None,
                            message: outcome.message.clone(),
                        })
                        .await;
                    }
                    end
                }
            };
            if let Some(agent) = own_agent {
                self.release_hold(&agent).await;
            }
            end
        }
        .boxed()
    }

    fn properties_now(&self) -> BTreeMap<String, String> {
        lock(&self.properties).clone()
    }

    /// Acquires or releases a pool server; the engine does this itself, on no agent.
    async fn run_pool_step(&self, node: &FlatStep<'_>) -> NodeEnd {
        let index = node.index;
        let attempt = self.attempt();
        if let Some(acquire) = &node.step.acquire {
            self.publish(BuildEventKind::StepWaiting {
                index,
                attempt,
                reason: format!(
                    "waiting for a server of pool {} ({} scope)",
                    acquire.role,
                    acquire.scope.as_str()
                ),
            })
            .await;
            // The wait is on record while it lasts, so that pool waits take part in deadlock
            // detection.
            let key = subjects::wait_key(self.id(), attempt, Some(index));
            let record = WaitRecord {
                build_id: self.id().to_owned(),
                builder: self.request.builder.clone(),
                step: node.path.clone(),
                agents: String::new(),
                engine: self.engine.id.clone(),
                requested_at: self.request.requested_at,
                priority: self.request.priority,
                deadlock_policy: self
                    .engine
                    .config
                    .builder(&self.request.builder)
                    .map_or("fail-newest", |builder| builder.deadlock.as_str())
                    .to_owned(),
                since: now(),
                pool: Some(acquire.role.clone()),
            };
            self.engine.wait_book.insert(key.clone(), record);
            let acquired = crate::pools::acquire(
                &self.engine,
                self.id(),
                &node.path,
                &acquire.role,
                acquire.scope,
                &self.cancel,
            )
            .await;
            self.engine.wait_book.remove(&key);
            let server = match acquired {
                Ok(Some(server)) => server,
                Ok(None) => {
                    if let Some(cycle) = self
                        .engine
                        .deadlock_victims
                        .get(self.id())
                        .map(|c| c.value().clone())
                    {
                        self.log_note(index, format!("ended to break a {cycle}")).await;
                    }
                    return NodeEnd::Cancelled;
                }
                Err(error) => return NodeEnd::Done(exception(format!("pool {}: {error}", acquire.role))),
            };
            lock(&self.properties).insert(acquire.property.clone(), server.clone());
            self.publish(BuildEventKind::StepStarted {
                index,
                attempt,
                agent: String::new(),
                agent_session: None,
            })
            .await;
            self.publish(BuildEventKind::PropertySet {
                name: acquire.property.clone(),
                value: server.clone(),
            })
            .await;
            let message = format!(
                "acquired server {server} of pool {} ({} scope) as {}",
                acquire.role,
                acquire.scope.as_str(),
                acquire.property
            );
            self.log_note(index, message.clone()).await;
            return self.pool_step_done(index, message).await;
        }
        let Some(release) = &node.step.release else {
            return NodeEnd::Done(exception("not a pool step".into()));
        };
        self.publish(BuildEventKind::StepStarted {
            index,
            attempt,
            agent: String::new(),
            agent_session: None,
        })
        .await;
        let server = services::config::substitute(&release.server, &self.properties_now());
        let message = match crate::pools::release(&self.engine, self.id(), &release.role, &server).await {
            Ok(true) => format!("released server {server} of pool {}", release.role),
            Ok(false) => format!(
                "warning: server {server:?} of pool {} is not held by this build; nothing was released",
                release.role
            ),
            Err(error) => return NodeEnd::Done(exception(format!("pool {}: {error}", release.role))),
        };
        self.log_note(index, message.clone()).await;
        self.pool_step_done(index, message).await
    }

    async fn pool_step_done(&self, index: u32, message: String) -> NodeEnd {
        self.engine_ends_step(
            index,
            StepOutcome {
                result: StepResult::Success,
                message: Some(message),
            },
        )
        .await
    }

    /// Records the end of a step the engine decides itself (a pool step, or a command step no
    /// agent will report) and returns it.
    async fn engine_ends_step(&self, index: u32, outcome: StepOutcome) -> NodeEnd {
        self.publish(BuildEventKind::StepFinished {
            index,
            attempt: self.attempt(),
            result: outcome.result,
            exit_code: None,
            message: outcome.message.clone(),
        })
        .await;
        NodeEnd::Done(outcome)
    }

    /// Publishes `skipped` for the given steps.
    async fn skip(&self, steps: Vec<u32>) {
        for index in steps {
            self.publish(BuildEventKind::StepSkipped {
                index,
                attempt: self.attempt(),
            })
            .await;
        }
    }

    /// The build as its events so far describe it.
    async fn prior_state(&self) -> Option<BuildRecord> {
        let messages = self
            .engine
            .bus
            .read_all(subjects::EVENTS_STREAM, &subjects::events_of_build(self.id()))
            .await
            .map_err(|error| tracing::warn!(build = %self.id(), %error, "cannot read the build's events"))
            .ok()?;
        let mut record = BuildRecord::requested(&self.request);
        for message in messages {
            match bus_schema::decode::<BuildEvent>(&message.payload) {
                Ok(event) => record.apply(&event),
                Err(error) => {
                    let bus = &self.engine.bus;
                    tokio::spawn(bus.park_dead_letter(
                        crate::ROLE,
                        &message.subject,
                        &message.payload,
                        &error,
                    ));
                }
            }
        }
        Some(record)
    }

    /// Holds again `agent`, which an earlier engine held for the build (see
    /// [`Self::adopt_holds`]); `None` if there is no such agent.
    fn adopted_agent(&self, agent: Option<&str>) -> Option<String> {
        let agent = agent.filter(|agent| !agent.is_empty())?;
        self.holds().get_mut(agent)?.count += 1;
        self.engine.directory.assign_adopted(agent, self.id());
        Some(agent.to_owned())
    }

    /// Holds an agent matching `selector` for the build, waiting (and saying why, on the bus
    /// and in the waits bucket) while none is free. `step` is `None` for the master step.
    /// `by_first_step`: the agent is not asked now; the build's first step on it takes it.
    /// `None` if the build was cancelled while it waited.
    async fn hold_agent(
        &self,
        builder: &BuilderConfig,
        selector: &AgentSelector,
        step: Option<&FlatStep<'_>>,
        by_first_step: bool,
    ) -> Option<String> {
        loop {
            let acquired = self.engine.directory.acquire(
                self.id(),
                selector,
                self.request.priority,
                self.request.requested_at,
            );
            let name = match acquired {
                Acquired::Agent(name) => name,
                Acquired::Wait { ready, reason } => {
                    self.wait_for_agent(builder, selector, step, ready, reason)
                        .await?
                }
            };
            tracing::debug!(build = %self.id(), agent = %name, by_first_step, "agent acquired");
            if let Some(hold) = self.holds().get_mut(&name) {
                hold.count += 1;
                return Some(name);
            }
            if by_first_step {
                // The run of the agent the directory knows: the step's start names it, and the
                // agent refuses the step if it has restarted since.
                let session = self.engine.directory.session(&name).unwrap_or_default();
                let hold = Hold {
                    untaken: true,
                    ..Hold::taken(session)
                };
                self.holds().insert(name.clone(), hold);
                return Some(name);
            }
            match self
                .command(
                    &name,
                    AgentCommand::Hold {
                        build_id: self.id().to_owned(),
                    },
                )
                .await
            {
                Ok(AgentReply::Accepted { session }) => {
                    self.engine.directory.answered(&name, &session);
                    self.holds().insert(name.clone(), Hold::taken(session));
                    return Some(name);
                }
                Ok(AgentReply::Busy { build_id: other }) => {
                    // Another engine's build got the agent first: pick another.
                    self.engine.directory.mark_busy(&name, self.id(), &other);
                }
                Ok(reply) => {
                    tracing::warn!(build = %self.id(), agent = %name, ?reply, "agent refused a hold");
                    self.engine.directory.mark_unreachable(&name);
                }
                Err(error) => {
                    tracing::warn!(build = %self.id(), agent = %name, %error, "agent did not answer a hold");
                    self.engine.directory.mark_unreachable(&name);
                }
            }
            if self.cancel.is_cancelled() {
                return None;
            }
        }
    }

    /// Waits for the directory to hand over an agent, recording the wait on the bus.
    async fn wait_for_agent(
        &self,
        builder: &BuilderConfig,
        selector: &AgentSelector,
        step: Option<&FlatStep<'_>>,
        mut ready: oneshot::Receiver<String>,
        reason: String,
    ) -> Option<String> {
        let attempt = self.attempt();
        tracing::debug!(build = %self.id(), %reason, "waiting for an agent");
        let told = match step {
            None => BuildEventKind::Waiting { reason },
            Some(node) => BuildEventKind::StepWaiting {
                index: node.index,
                attempt,
                reason,
            },
        };
        let key = subjects::wait_key(self.id(), attempt, step.map(|node| node.index));
        let record = WaitRecord {
            build_id: self.id().to_owned(),
            builder: builder.name.clone(),
            step: step.map(|node| node.path.clone()).unwrap_or_default(),
            agents: selector.source().to_owned(),
            engine: self.engine.id.clone(),
            requested_at: self.request.requested_at,
            priority: self.request.priority,
            deadlock_policy: builder.deadlock.as_str().to_owned(),
            since: now(),
            pool: None,
        };
        // Nothing stays in flight while the build waits: a JetStream context allows a bounded
        // number of unacknowledged publishes, and thousands of waiting builds holding theirs
        // would block every publish of the engine.
        self.flush_events().await;
        let mut told = Some((told, record));
        let tell = tokio::time::sleep(WAIT_TOLD_AFTER);
        tokio::pin!(tell);
        let agent = loop {
            tokio::select! {
                agent = &mut ready => break agent.ok(),
                _ = self.cancel.cancelled() => {
                    self.engine.directory.forget_waiter(self.id());
                    let deadlock = self.engine.deadlock_victims.get(self.id()).map(|cycle| cycle.value().clone());
                    if let (Some(cycle), Some(node)) = (deadlock, step) {
                        self.log_note(node.index, format!("ended to break a {cycle}")).await;
                    }
                    break None;
                }
                _ = &mut tell, if told.is_some() => {
                    if let Some((event, record)) = told.take() {
                        self.engine.wait_book.insert(key.clone(), record);
                        self.publish(event).await;
                        self.flush_events().await;
                    }
                }
            }
        };
        if told.is_none() {
            self.engine.wait_book.remove(&key);
        }
        agent
    }

    /// Gives back one hold of `agent`; the agent is released when no step holds it.
    async fn release_hold(&self, agent: &str) {
        let last = {
            let mut holds = self.holds();
            match holds.get_mut(agent) {
                Some(hold) if hold.count > 1 => {
                    hold.count -= 1;
                    None
                }
                Some(_) => holds.remove(agent),
                None => None,
            }
        };
        if let Some(hold) = last {
            self.release(agent, &hold).await;
        }
    }

    /// Releases every agent the build still holds.
    async fn release_all(&self) {
        let holds: Vec<(String, Hold)> = self.holds().drain().collect();
        for (agent, hold) in holds {
            self.release(&agent, &hold).await;
        }
    }

    async fn release(&self, agent: &str, hold: &Hold) {
        if !hold.released_by_agent {
            let command = AgentCommand::Release {
                build_id: self.id().to_owned(),
            };
            if let Err(error) = self.command_until_lost(agent, command).await {
                tracing::warn!(build = %self.id(), %agent, %error, "release not delivered");
            }
        }
        self.engine.directory.release(agent, self.id());
    }

    /// Runs one command step on `agent`, which the build holds; `last_on_agent`: nothing of
    /// the build runs on the agent after it.
    async fn run_command(
        &self,
        builder: &BuilderConfig,
        node: &FlatStep<'_>,
        agent: &str,
        last_on_agent: bool,
    ) -> NodeEnd {
        let index = node.index;
        let attempt = self.attempt();
        let mut toolkits = builder.toolkits.clone();
        toolkits.extend(node.step.toolkits.iter().cloned());
        toolkits.dedup();
        // Read now, not when the build was claimed: a rotated secret counts from the next step.
        let secrets = match crate::secrets::resolve(&builder.secrets).await {
            Ok(secrets) => secrets,
            Err(problem) => {
                let message = format!("{problem} (engine {}); the step did not run", self.engine.id);
                self.log_note(index, message.clone()).await;
                return self.end_step_with_exception(index, message).await;
            }
        };
        for (name, value) in &secrets {
            if !value.is_empty() && value.len() < bus_schema::MIN_MASKED_BYTES {
                tracing::warn!(
                    build = %self.id(), builder = %builder.name, secret = %name,
                    "secret is shorter than {} bytes: the step gets it, but its log does not mask it",
                    bus_schema::MIN_MASKED_BYTES
                );
            }
        }
        let (require_session, release_after, untaken, may_have_started) = {
            let holds = self.holds();
            let hold = holds.get(agent);
            (
                // The build holds the agent under one run of it; another run has not seen the
                // build's earlier steps and may be asked to run a step the first one started.
                hold.map(|hold| hold.session.clone())
                    .filter(|session| !session.is_empty()),
                last_on_agent && hold.is_some_and(|hold| hold.count == 1),
                hold.is_some_and(|hold| hold.untaken),
                hold.is_some_and(|hold| hold.may_have_started),
            )
        };
        let assignment = StepAssignment {
            toolkits,
            build_id: self.id().to_owned(),
            builder: builder.name.clone(),
            index,
            attempt,
            name: node.path.clone(),
            command: node.step.run.clone().unwrap_or_default(),
            env: self.step_env(node, &secrets),
            timeout_ms: node.step.timeout.map(|timeout| timeout.as_millis() as u64),
            masked: secrets
                .values()
                .filter(|value| !value.is_empty())
                .cloned()
                .collect(),
            require_session,
            release_after,
            report_to: Some(subjects::engine_step_ends(&self.engine.id)),
        };
        // Stored before the agent is asked: a step whose start is not on the bus never ran, and
        // the start names the run of the agent asked to run it, so an engine adopting the build
        // knows whether the agent it asks again is the one that may have run it.
        self.publish(BuildEventKind::StepStarted {
            index,
            attempt,
            agent: agent.to_owned(),
            agent_session: assignment.require_session.clone(),
        })
        .await;
        if !self.flush_events().await {
            return self
                .end_step_with_exception(
                    index,
                    format!(
                        "engine {} could not record the step's start, so it did not run",
                        self.engine.id
                    ),
                )
                .await;
        }
        let (result_tx, result_rx) = oneshot::channel();
        let key = (self.id().to_owned(), attempt, index);
        self.engine.step_results.insert(key.clone(), result_tx);
        // Asked until it answers or is lost, even when the step takes the agent: a reply lost
        // on the way may hide a step that started, which must not start elsewhere as well.
        let (answer, asks) = self
            .command_counting_asks(agent, AgentCommand::RunStep(Box::new(assignment)))
            .await;
        match answer {
            // Past its session check, an agent that ran or runs the step says so: busy with
            // another build, it never had this one.
            Ok(AgentReply::Busy { build_id: other }) if untaken => {
                self.engine.step_results.remove(&key);
                self.engine.directory.mark_busy(agent, self.id(), &other);
                NodeEnd::AgentTaken(format!("agent {agent} serves build {other}"))
            }
            Ok(AgentReply::SessionEnded { session }) if untaken && !may_have_started && asks == 1 => {
                // Restarted since the directory last heard of it, before this one ask could
                // reach it: nothing of the build ran there, so it is passed over like a
                // taken agent.
                self.engine.step_results.remove(&key);
                self.engine.directory.answered(agent, &session);
                NodeEnd::AgentTaken(format!("agent {agent} restarted before the step reached it"))
            }
            Ok(AgentReply::Accepted { session }) => {
                tracing::debug!(build = %self.id(), %agent, index, attempt, release_after, "step accepted");
                self.engine.directory.answered(agent, &session);
                if let Some(hold) = self.holds().get_mut(agent) {
                    hold.session.clone_from(&session);
                    hold.untaken = false;
                    hold.released_by_agent = release_after;
                }
                self.await_step(agent, &session, index, result_rx).await
            }
            Ok(AgentReply::AlreadyFinished { session }) => {
                // The agent ran the step (asked by the engine before this one) and stores its
                // end until JetStream has it: after a NATS node failed, that end may still be
                // on its way. It is waited for like any step's, until the agent is lost.
                self.engine.directory.answered(agent, &session);
                match self.recorded_outcome(index).await {
                    Some(outcome) => {
                        self.engine.step_results.remove(&key);
                        NodeEnd::Done(outcome)
                    }
                    None => self.await_step(agent, &session, index, result_rx).await,
                }
            }
            Ok(AgentReply::Busy { build_id: other }) => {
                self.engine.step_results.remove(&key);
                self.engine.directory.mark_busy(agent, self.id(), &other);
                NodeEnd::AgentLost(format!("agent {agent} now serves build {other}"))
            }
            Ok(AgentReply::SessionEnded { session }) => {
                self.engine.step_results.remove(&key);
                self.engine.directory.answered(agent, &session);
                NodeEnd::AgentLost(format!(
                    "agent {agent} restarted while the build held it (step {index} may have started and died with it)"
                ))
            }
            Ok(AgentReply::Refused { reason }) => {
                self.engine.step_results.remove(&key);
                // The reason is the agent's text: it must not carry a secret into the events.
                let reason = crate::secrets::redact(&reason, &secrets);
                self.end_step_with_exception(index, format!("agent {agent} refused the step: {reason}"))
                    .await
            }
            Err(error) => {
                self.engine.step_results.remove(&key);
                self.engine.directory.mark_unreachable(agent);
                NodeEnd::AgentLost(format!("agent {agent} is unreachable: {error}"))
            }
        }
    }

    /// Records the end of a command step that no agent will report: an exception saying why.
    async fn end_step_with_exception(&self, index: u32, message: String) -> NodeEnd {
        self.engine_ends_step(index, exception(message)).await
    }

    /// Waits for the step's result; cancels it when the build is cancelled; declares the agent
    /// lost when it stops heartbeating and does not answer a ping.
    async fn await_step(
        &self,
        agent: &str,
        session: &str,
        index: u32,
        mut result_rx: oneshot::Receiver<StepEnded>,
    ) -> NodeEnd {
        let attempt = self.attempt();
        let mut liveness = tokio::time::interval(Duration::from_millis(500));
        liveness.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut cancel_sent = false;
        let mut checks: u64 = 0;
        let mut last_heard = tokio::time::Instant::now();
        let key = (self.id().to_owned(), attempt, index);
        loop {
            tokio::select! {
                ended = &mut result_rx => {
                    tracing::debug!(build = %self.id(), %agent, index, "step result received");
                    return NodeEnd::Done(match ended {
                        Ok(StepEnded { outcome, handed_over }) => {
                            if let Some(handed) = handed_over {
                                self.hold_step_end(handed);
                            }
                            outcome
                        }
                        Err(_) => self.recorded_outcome(index).await.unwrap_or_else(|| exception("step result lost".into())),
                    });
                }
                _ = self.cancel.cancelled(), if !cancel_sent => {
                    cancel_sent = true;
                    let command = AgentCommand::CancelStep { build_id: self.id().to_owned(), attempt, index };
                    if let Err(error) = self.command_until_lost(agent, command).await {
                        tracing::warn!(build = %self.id(), %agent, %error, "cancel not delivered");
                    }
                }
                _ = liveness.tick() => {
                    checks += 1;
                    // Heard from while its stored heartbeat is fresh. Heartbeats can fail to be
                    // stored for a moment (a NATS node failing over) while the agent is fine, so
                    // once the newest is half the timeout old, ask the agent itself. Lost: not
                    // heard from either way for the whole agent_timeout.
                    let half = self.engine.config.engine.agent_timeout / 2;
                    if self.engine.directory.heartbeat_within(agent, session, half)
                        || self.answers_ping(agent, session).await
                    {
                        last_heard = tokio::time::Instant::now();
                    }
                    let alive = last_heard.elapsed() < half;
                    // A result the follower missed (a reconnect) is found on the bus; look
                    // now and then, and always before declaring the agent lost.
                    if !alive || checks.is_multiple_of(20) {
                        if let Some(outcome) = self.recorded_outcome(index).await {
                            self.engine.step_results.remove(&key);
                            return NodeEnd::Done(outcome);
                        }
                    }
                    if !alive {
                        self.engine.step_results.remove(&key);
                        // Its last heartbeat may still look fresh to the directory (pings to a
                        // dead connection fail at once): no new work for it, the build's retry
                        // included, until it is heard from again.
                        self.engine.directory.mark_unreachable(agent);
                        return NodeEnd::AgentLost(format!(
                            "agent {agent} was lost while running step {index} (no heartbeat or answer to pings for {}s)",
                            self.engine.config.engine.agent_timeout.as_secs()
                        ));
                    }
                }
            }
        }
    }

    /// True if the agent answers a ping from the same session.
    async fn answers_ping(&self, agent: &str, session: &str) -> bool {
        let answered = matches!(
            self.command(agent, AgentCommand::Ping).await,
            Ok(AgentReply::Accepted { session: answered }) if answered == session
        );
        if answered {
            self.engine.directory.answered(agent, session);
        }
        answered
    }

    /// The step's result in the current attempt, if it is already on the bus.
    async fn recorded_outcome(&self, index: u32) -> Option<StepOutcome> {
        let record = self.prior_state().await?;
        if record.attempt() != self.attempt() {
            return None;
        }
        finished_step(&record, index)
    }

    async fn command(&self, agent: &str, command: AgentCommand) -> Result<AgentReply, String> {
        let payload = bytes::Bytes::from(bus_schema::encode(&command));
        let reply = tokio::time::timeout(
            AGENT_REPLY_TIMEOUT,
            self.engine
                .bus
                .client
                .request(subjects::agent_commands(agent), payload),
        )
        .await
        .map_err(|_| format!("no answer within {} s", AGENT_REPLY_TIMEOUT.as_secs()))?
        .map_err(|error| error.to_string())?;
        bus_schema::decode(&reply.payload).map_err(|error| {
            let error = format!("agent {agent} answered with an undecodable message: {error}");
            let bus = &self.engine.bus;
            tokio::spawn(bus.park_dead_letter(crate::ROLE, &reply.subject, &reply.payload, &error));
            error
        })
    }

    /// Sends an idempotent command to an agent the build already depends on, asking again
    /// while the agent may still be alive: a NATS node failing over or the agent reconnecting
    /// loses requests for a few seconds, and that must not count as a lost agent. Gives up
    /// once the agent has neither answered nor heartbeated for `agent_timeout`, counted from
    /// its last sign of life, not from the first ask: an engine adopting a build after its
    /// agent went silent must not add its own wait to the detection. It asks for at least as
    /// long as one answer may take (a reconnect of its own delays heartbeats too), and gives
    /// up after one ask on an agent that was silent that long already.
    async fn command_until_lost(&self, agent: &str, command: AgentCommand) -> Result<AgentReply, String> {
        self.command_counting_asks(agent, command).await.0
    }

    /// [`Self::command_until_lost`], also telling how many times the agent was asked.
    async fn command_counting_asks(
        &self,
        agent: &str,
        command: AgentCommand,
    ) -> (Result<AgentReply, String>, u32) {
        let agent_timeout = self.engine.config.engine.agent_timeout;
        let started = tokio::time::Instant::now();
        // An agent already silent for agent_timeout (declared lost) gets one try.
        let silent_already = !self.engine.directory.heard_within(agent, agent_timeout);
        let mut pause = Duration::from_millis(50);
        let mut asks = 0;
        loop {
            asks += 1;
            let error = match self.command(agent, command.clone()).await {
                Ok(reply) => return (Ok(reply), asks),
                Err(error) => error,
            };
            let elapsed = started.elapsed();
            let heard_recently = self.engine.directory.heard_within(agent, agent_timeout);
            let asked_enough = elapsed >= AGENT_REPLY_TIMEOUT.min(agent_timeout / 2);
            if ((silent_already || asked_enough) && !heard_recently) || elapsed >= 3 * agent_timeout {
                return (Err(error), asks);
            }
            tracing::debug!(build = %self.id(), %agent, %error, "agent did not answer; asking again");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    /// Stores the build's end; false if the bus would not take it.
    async fn finish(&self, result: BuildResult, message: Option<String>) -> bool {
        self.flush_events().await;
        self.store_with_retries(BuildEventKind::Finished { result, message })
            .await
    }

    /// Writes a line of Yardmaster's own into a step's log (a step ended to break a deadlock
    /// has no agent output to carry it).
    async fn log_note(&self, index: u32, text: String) {
        let chunk = LogChunk {
            build_id: self.id().to_owned(),
            index,
            seq: 0,
            attempt: self.attempt(),
            lines: vec![LogLine {
                stream: LogStream::Header,
                text,
            }],
        };
        let subject = subjects::step_log(self.id(), index);
        if let Ok(ack) = self
            .engine
            .bus
            .jetstream
            .publish(subject, bus_schema::encode(&chunk).into())
            .await
        {
            let _ = ack.into_future().await;
        }
    }

    /// The step's environment: the step's own `env`, then build properties (builder defaults
    /// overridden by the request's), then the builder's secrets, then Yardmaster's `YARD_*`
    /// variables, which cannot be overridden. Values are passed as the environment, never
    /// spliced into shell text.
    fn step_env(&self, node: &FlatStep<'_>, secrets: &BTreeMap<String, String>) -> BTreeMap<String, String> {
        let mut env = node.step.env.clone();
        for (name, value) in &self.properties_now() {
            if services::config::is_env_name(name) && !name.starts_with("YARD_") {
                env.insert(name.clone(), value.clone());
            }
        }
        env.extend(secrets.iter().map(|(name, value)| (name.clone(), value.clone())));
        let request = &self.request;
        env.insert("YARD_BUILD_ID".into(), request.build_id.clone());
        env.insert("YARD_BUILDER".into(), request.builder.clone());
        env.insert("YARD_STEP".into(), node.path.clone());
        env.insert("YARD_BUILD_REASON".into(), request.reason.clone());
        if let Some(change) = request.changes.last() {
            env.insert("YARD_CHANGE_ID".into(), change.id.clone());
            env.insert("YARD_REPOSITORY".into(), change.repository.clone());
            env.insert("YARD_BRANCH".into(), change.branch.clone());
            env.insert("YARD_REVISION".into(), change.revision.clone());
            env.insert("YARD_AUTHOR".into(), change.author.clone());
            env.insert("YARD_PROJECT".into(), change.project.clone());
            env.insert("YARD_COMMENTS".into(), change.comments.clone());
        }
        env
    }
}

/// The plan announced when the build is claimed: every step, depth-first.
fn plan(flat: &[FlatStep<'_>]) -> Vec<PlannedStep> {
    flat.iter()
        .map(|step| PlannedStep {
            name: step.step.name.clone(),
            path: step.path.clone(),
            kind: step.step.kind().as_str().to_owned(),
        })
        .collect()
}

fn all_steps(flat: &[FlatStep<'_>]) -> Vec<u32> {
    flat.iter().map(|step| step.index).collect()
}

fn top_steps(flat: &[FlatStep<'_>]) -> Vec<u32> {
    flat.iter()
        .filter(|step| step.parent.is_none())
        .map(|step| step.index)
        .collect()
}

/// The steps `roots` and everything below them, depth-first.
fn subtree(flat: &[FlatStep<'_>], roots: &[u32]) -> Vec<u32> {
    let mut out = Vec::new();
    for root in roots {
        out.push(*root);
        out.extend(subtree(flat, &flat[*root as usize].children));
    }
    out
}

/// The end of a parallel group: a lost agent, then a cancel, then the worst result.
fn combine(ends: Vec<NodeEnd>) -> NodeEnd {
    if let Some(lost) = ends
        .iter()
        .find(|end| matches!(end, NodeEnd::AgentLost(_) | NodeEnd::AgentTaken(_)))
    {
        return lost.clone();
    }
    if ends.iter().any(|end| matches!(end, NodeEnd::Cancelled)) {
        return NodeEnd::Cancelled;
    }
    let severity = |result: StepResult| match result {
        StepResult::Success => 0,
        StepResult::Failure | StepResult::Timeout => 1,
        StepResult::Exception => 2,
        StepResult::Cancelled => 3,
    };
    ends.into_iter()
        .filter_map(|end| match end {
            NodeEnd::Done(outcome) => Some(outcome),
            _ => None,
        })
        .max_by_key(|outcome| severity(outcome.result))
        .map_or(
            NodeEnd::Done(StepOutcome {
                result: StepResult::Success,
                message: None,
            }),
            NodeEnd::Done,
        )
}

/// Stores one message, retrying with backoff while the bus refuses it; false if it gave up.
///
/// A message that carries earlier events and turns out a duplicate (the build's end, stored
/// once per build: a retry after a lost ack, or another engine's end of the same build) may
/// have been stored without them; the step ends among them, which agents were told are
/// stored, are stored again on their own (a step end stored twice folds the same).
async fn store_retrying(engine: &Engine, event: BuildEvent) -> bool {
    let build_id = event.build_id.clone();
    let mut message = event;
    let mut delay = Duration::from_millis(50);
    let mut try_number = 0;
    while try_number < 20 {
        try_number += 1;
        match engine.bus.store_built_event(&message).await {
            Ok(ack) if ack.duplicate => {
                let mut step_ends: Vec<EarlierEvent> = std::mem::take(&mut message.earlier)
                    .into_iter()
                    .filter(|earlier| matches!(earlier.kind, BuildEventKind::StepFinished { .. }))
                    .collect();
                let Some(last) = step_ends.pop() else { return true };
                message = BuildEvent::new(build_id.clone(), last.at, last.kind);
                message.earlier = step_ends;
                try_number = 0;
            }
            Ok(_) => return true,
            Err(error) => {
                tracing::warn!(build = %build_id, %error, try_number, "event not stored; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
    tracing::error!(build = %build_id, kind = ?message.kind, "event not stored: the bus did not take it");
    false
}

/// Stores one message and then tells the agents whose handed-over step ends it carries that
/// they are stored, or, if the bus did not take it, to store them themselves.
async fn store_answering(engine: &Engine, event: BuildEvent, answer_to: Vec<async_nats::Subject>) -> bool {
    let stored = store_retrying(engine, event).await;
    for subject in answer_to {
        let answer = if stored {
            StepEndAnswer::Stored
        } else {
            StepEndAnswer::Declined {
                reason: format!("engine {} could not store it", engine.id),
            }
        };
        crate::listeners::answer_step_end(&engine.bus, subject, answer).await;
    }
    stored
}

fn build_result(result: StepResult) -> BuildResult {
    match result {
        StepResult::Success => BuildResult::Success,
        StepResult::Failure | StepResult::Timeout => BuildResult::Failure,
        StepResult::Exception => BuildResult::Exception,
        StepResult::Cancelled => BuildResult::Cancelled,
    }
}

fn exception(message: String) -> StepOutcome {
    StepOutcome {
        result: StepResult::Exception,
        message: Some(message),
    }
}

fn finished_step(record: &BuildRecord, index: u32) -> Option<StepOutcome> {
    let step = record.steps.get(index as usize)?;
    if step.state != StepState::Finished {
        return None;
    }
    Some(StepOutcome {
        result: step.result?,
        message: step.message.clone(),
    })
}
