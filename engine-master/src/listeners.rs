//! The engine's followers of the bus: the agents bucket, the cancels bucket, the stream of
//! stored step results, and the step ends agents hand to this engine.

use std::sync::Arc;

use bus_schema::{subjects, AgentRecord, BuildEvent, BuildEventKind, StepEndAnswer};
use futures::StreamExt;
use services::watch::{
    follow_bucket, follow_stream, BucketChange, StreamStart, FOLLOWER_CHECK_AFTER_SILENCE,
    QUIET_BUCKET_RESTART_AFTER,
};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::{Engine, HandedOver, StepEnded, StepOutcome};

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
        FOLLOWER_CHECK_AFTER_SILENCE,
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
            let _ = waiting.send(StepEnded {
                outcome: StepOutcome { result, message },
                handed_over: None,
            });
        }
    }
}

/// Takes the step ends agents hand to this engine ([`bus_schema::StepAssignment::report_to`])
/// to the drivers waiting for them, which answer once they stored them. One that no driver
/// waits for, or that cannot be read, is declined at once: its agent stores it itself.
pub(crate) async fn take_handed_over_step_ends(
    engine: Arc<Engine>,
    stop: CancellationToken,
) -> Result<(), crate::Error> {
    let subject = subjects::engine_step_ends(&engine.id);
    let mut handed = engine
        .bus
        .client
        .subscribe(subject.clone())
        .await
        .map_err(|e| services::bus::Error::nats("listening for step ends handed over by agents", e))?;
    tokio::spawn(async move {
        loop {
            let message = tokio::select! {
                message = handed.next() => message,
                _ = stop.cancelled() => return,
            };
            let Some(message) = message else { return };
            let Some(answer_to) = message.reply.clone() else {
                continue;
            };
            let taken = match bus_schema::decode::<BuildEvent>(&message.payload) {
                Ok(event) => hand_to_driver(&engine, event, answer_to),
                Err(error) => {
                    tokio::spawn(engine.bus.park_dead_letter(
                        crate::ROLE,
                        &subject,
                        &message.payload,
                        &error,
                    ));
                    Err((answer_to, format!("undecodable step end: {error}")))
                }
            };
            if let Err((answer_to, reason)) = taken {
                answer_step_end(&engine.bus, answer_to, StepEndAnswer::Declined { reason }).await;
            }
        }
    });
    Ok(())
}

/// Gives a handed-over step end to the driver waiting for it; else where to decline it, and why.
fn hand_to_driver(
    engine: &Engine,
    event: BuildEvent,
    answer_to: async_nats::Subject,
) -> Result<(), (async_nats::Subject, String)> {
    let BuildEventKind::StepFinished {
        index,
        attempt,
        result,
        ref message,
        ..
    } = event.kind
    else {
        return Err((
            answer_to,
            format!("not a step end: {}", event.kind.subject_kind()),
        ));
    };
    let key = (event.build_id.clone(), attempt, index);
    let Some((_, waiting)) = engine.step_results.remove(&key) else {
        return Err((answer_to, format!("engine {} waits for no such step", engine.id)));
    };
    let outcome = StepOutcome {
        result,
        message: message.clone(),
    };
    let handed_over = HandedOver {
        event,
        answer_to: answer_to.clone(),
    };
    waiting
        .send(StepEnded {
            outcome,
            handed_over: Some(handed_over),
        })
        .map_err(|_| {
            (
                answer_to,
                format!("engine {} no longer waits for the step", engine.id),
            )
        })
}

/// Tells an agent what became of the step end it handed over.
pub(crate) async fn answer_step_end(
    bus: &services::Bus,
    answer_to: async_nats::Subject,
    answer: StepEndAnswer,
) {
    let payload = bytes::Bytes::from(bus_schema::encode(&answer));
    if let Err(error) = bus.client.publish(answer_to, payload).await {
        tracing::debug!(%error, "answer to a handed-over step end not sent");
    }
}
