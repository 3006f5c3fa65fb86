//! The engine's followers of the bus: the agents bucket, the cancels bucket and the stream of
//! step results.

use std::sync::Arc;

use bus_schema::{subjects, AgentRecord, BuildEvent, BuildEventKind};
use services::watch::{follow_bucket, follow_stream, BucketChange, StreamStart, QUIET_BUCKET_RESTART_AFTER};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::{Engine, StepOutcome};

pub(crate) fn spawn_agents_watch(engine: Arc<Engine>, stop: CancellationToken) -> oneshot::Receiver<()> {
    let store = engine.bus.agents.clone();
    let bucket = store.name.clone();
    let silence = engine.config.engine.agent_timeout;
    // Agents of another protocol version are refused: said once each, then left alone.
    let mut refused = std::collections::HashSet::new();
    follow_bucket(store, stop, silence, move |change| match change {
        BucketChange::Put { key, value } => match bus_schema::decode::<AgentRecord>(&value) {
            Ok(record) => match bus_schema::agent_refusal(record.protocol) {
                None => engine.directory.update(record),
                Some(reason) => {
                    if refused.insert(key.clone()) {
                        tracing::warn!(agent = %key, "{reason}");
                    }
                }
            },
            Err(bus_schema::DecodeError::IncompatibleVersion { found, .. }) => {
                if refused.insert(key.clone()) {
                    let reason = bus_schema::agent_refusal(found).unwrap_or_default();
                    tracing::warn!(agent = %key, "{reason}");
                }
            }
            Err(error) => {
                let subject = subjects::kv_key(&bucket, &key);
                tokio::spawn(engine.bus.park_dead_letter(crate::ROLE, &subject, &value, &error));
            }
        },
        BucketChange::Removed { key } => {
            refused.remove(&key);
            engine.directory.remove(&key);
        }
    })
}

pub(crate) fn spawn_cancels_watch(engine: Arc<Engine>, stop: CancellationToken) -> oneshot::Receiver<()> {
    let store = engine.bus.cancels.clone();
    follow_bucket(store, stop, QUIET_BUCKET_RESTART_AFTER, move |change| {
        if let BucketChange::Put { key, .. } = change {
            if let Some(token) = engine.running.get(&key) {
                token.cancel();
            }
            engine.cancel_requests.insert(key);
        }
    })
}

/// Follows every step-finished event and hands each to the driver waiting for it.
pub(crate) fn spawn_step_results(engine: Arc<Engine>, stop: CancellationToken) -> oneshot::Receiver<()> {
    let bus = engine.bus.clone();
    follow_stream(
        bus,
        subjects::EVENTS_STREAM,
        Some(subjects::STEP_FINISHED_ALL),
        StreamStart::New,
        stop,
        move |_, subject, payload| match bus_schema::decode::<BuildEvent>(payload) {
            Ok(event) => deliver(&engine, event),
            Err(error) => {
                tokio::spawn(engine.bus.park_dead_letter(crate::ROLE, subject, payload, &error));
            }
        },
    )
}

pub(crate) fn deliver(engine: &Engine, event: BuildEvent) {
    if let BuildEventKind::StepFinished {
        index,
        attempt,
        result,
        message,
        ..
    } = event.kind
    {
        if let Some((_, waiting)) = engine.step_results.remove(&(event.build_id, attempt, index)) {
            let _ = waiting.send(StepOutcome { result, message });
        }
    }
}
