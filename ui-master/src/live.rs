//! Live updates and operations: the web UI page, the Server-Sent Events stream of build
//! changes that feeds it, and the Prometheus metrics.

use std::convert::Infallible;
use std::fmt::Write;
use std::sync::Arc;
use std::time::Instant;

use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream::consumer;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use bus_schema::{subjects, LogChunk, LogStream, StepState};
use futures::{Stream, StreamExt};
use services::time::now;
use tokio::sync::mpsc;

use crate::error::ApiError;
use crate::AppState;

pub(crate) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/", get(index))
}

/// The Server-Sent Events streams, which last as long as their client stays (so no request
/// timeout applies to them).
pub(crate) fn streams() -> Router<Arc<AppState>> {
    Router::new()
        .route("/api/v1/stream", get(stream))
        .route("/api/v1/builds/{id}/steps/{index}/log/stream", get(log_stream))
}

/// The web UI, embedded in the binary.
const INDEX_HTML: &str = include_str!("../assets/index.html");

async fn index() -> impl IntoResponse {
    axum::response::Html(INDEX_HTML)
}

/// Every build change as a `build` event carrying the build as JSON, fed by the bus through
/// the view. A client that falls behind gets a `lagged` event and should reload.
async fn stream(State(state): State<Arc<AppState>>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let updates = state.view.subscribe();
    let events = futures::stream::unfold(updates, |mut updates| async move {
        let event = match updates.recv().await {
            Ok(build) => Event::default()
                .event("build")
                .data(serde_json::to_string(&build).unwrap_or_default()),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                Event::default().event("lagged").data(missed.to_string())
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
        };
        Some((Ok(event), updates))
    });
    let events = futures::StreamExt::take_until(events, state.shutdown.clone().cancelled_owned());
    Sse::new(events).keep_alive(KeepAlive::default())
}

/// A step's log as it grows, for tailing: a `log` event per chunk of the build's current
/// attempt (JSON `{"seq": n, "text": "..."}`, lines joined by newlines), then an `end` event
/// once the step has finished and every stored chunk was sent. Fed by the logs stream.
async fn log_stream(
    State(state): State<Arc<AppState>>,
    Path((id, index)): Path<(String, u32)>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let build = crate::api::build_with_step(&state, &id, index)?;
    let consumer = state
        .bus
        .stream(subjects::LOGS_STREAM)
        .await?
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: subjects::step_log(&id, index),
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(|error| ApiError::Unavailable(format!("following the log of {id} step {index}: {error}")))?;
    let messages = consumer
        .messages()
        .await
        .map_err(|error| ApiError::Unavailable(format!("following the log of {id} step {index}: {error}")))?;
    let (events_tx, events_rx) = mpsc::channel(64);
    let attempt = build.retries.len() as u32;
    tokio::spawn(tail_log(
        Arc::clone(&state),
        id,
        index,
        attempt,
        messages,
        events_tx,
    ));
    let events = futures::stream::unfold(events_rx, |mut events_rx| async move {
        events_rx.recv().await.map(|event| (Ok(event), events_rx))
    });
    let events = futures::StreamExt::take_until(events, state.shutdown.clone().cancelled_owned());
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}

/// Sends a step's log chunks to `events` until the step is over and its log is sent, or the
/// client goes away.
async fn tail_log(
    state: Arc<AppState>,
    id: String,
    index: u32,
    attempt: u32,
    mut messages: consumer::pull::Ordered,
    events: mpsc::Sender<Event>,
) {
    // Chunks are stored before the step's end, so once the step is over its log's last chunk
    // is known: the log is complete when the follower has delivered it. Only when that
    // cannot be looked up does a quiet spell of SETTLE stand in for it.
    const SETTLE: Duration = Duration::from_millis(300);
    let subject = subjects::step_log(&id, index);
    let mut delivered_through = 0;
    let mut last_chunk: Option<u64> = None;
    let mut last_activity = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            message = messages.next() => {
                let message = match message {
                    Some(Ok(message)) => message,
                    Some(Err(error)) => {
                        let _ = events.send(Event::default().event("error").data(error.to_string())).await;
                        return;
                    }
                    None => return,
                };
                last_activity = Instant::now();
                if let Ok(info) = message.info() {
                    delivered_through = info.stream_sequence;
                }
                let chunk = match bus_schema::decode::<LogChunk>(&message.payload) {
                    Ok(chunk) => chunk,
                    Err(error) => {
                        let parked = state.bus.park_dead_letter(
                            crate::view::ROLE,
                            &message.subject,
                            &message.payload,
                            &error,
                        );
                        tokio::spawn(parked);
                        continue;
                    }
                };
                if chunk.attempt != attempt {
                    continue;
                }
                let text = chunk
                    .lines
                    .iter()
                    .map(|line| match line.stream {
                        LogStream::Header => format!("# {}", line.text),
                        _ => line.text.clone(),
                    })
                    .collect::<Vec<_>>()
                    .join("\n");
                let data = serde_json::json!({ "seq": chunk.seq, "text": text }).to_string();
                if events.send(Event::default().event("log").data(data)).await.is_err() {
                    return;
                }
            }
            _ = ticker.tick() => {
                let done = state.view.build(&id).is_none_or(|build| {
                    build.result.is_some()
                        || build.steps.get(index as usize).is_none_or(|step| {
                            matches!(step.state, StepState::Finished | StepState::Skipped)
                        })
                });
                if !done {
                    continue;
                }
                if last_chunk.is_none() {
                    last_chunk = last_sequence_of(&state, &subject).await;
                }
                let complete = match last_chunk {
                    Some(last) => delivered_through >= last,
                    None => last_activity.elapsed() >= SETTLE,
                };
                if complete {
                    // An event with empty data is never dispatched by browsers: say something.
                    let _ = events.send(Event::default().event("end").data("complete")).await;
                    return;
                }
            }
            _ = events.closed() => return,
        }
    }
}

/// The stream sequence of the newest message stored under `subject` in the logs stream (0
/// when there is none), read from the stream's leader; `None` when it cannot be read.
async fn last_sequence_of(state: &AppState, subject: &str) -> Option<u64> {
    use async_nats::jetstream::stream::LastRawMessageErrorKind;
    let stream = state.bus.stream(subjects::LOGS_STREAM).await.ok()?;
    match stream.get_last_raw_message_by_subject(subject).await {
        Ok(message) => Some(message.sequence),
        Err(error) if error.kind() == LastRawMessageErrorKind::NoMessageFound => Some(0),
        Err(error) => {
            tracing::debug!(%subject, %error, "cannot look up a log's last chunk");
            None
        }
    }
}

/// Upper bounds of the build wait histogram, in seconds.
const WAIT_BUCKETS: [f64; 10] = [0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0];

async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let mut out = String::new();
    let (states, results, waits) = state.view.build_statistics();
    let _ = writeln!(
        out,
        "# HELP yard_builds Builds by state.\n# TYPE yard_builds gauge"
    );
    for (build_state, count) in &states {
        let _ = writeln!(out, "yard_builds{{state=\"{build_state}\"}} {count}");
    }
    let _ = writeln!(out, "# HELP yard_builds_finished_total Finished builds by result.\n# TYPE yard_builds_finished_total counter");
    for (result, count) in &results {
        let _ = writeln!(out, "yard_builds_finished_total{{result=\"{result}\"}} {count}");
    }
    let _ = writeln!(out, "# HELP yard_build_wait_seconds Time from request to start.\n# TYPE yard_build_wait_seconds histogram");
    for bound in WAIT_BUCKETS {
        let below = waits
            .iter()
            .filter(|wait| (**wait as f64) / 1000.0 <= bound)
            .count();
        let _ = writeln!(out, "yard_build_wait_seconds_bucket{{le=\"{bound}\"}} {below}");
    }
    let total: u64 = waits.iter().sum();
    let _ = writeln!(
        out,
        "yard_build_wait_seconds_bucket{{le=\"+Inf\"}} {}",
        waits.len()
    );
    let _ = writeln!(out, "yard_build_wait_seconds_sum {}", total as f64 / 1000.0);
    let _ = writeln!(out, "yard_build_wait_seconds_count {}", waits.len());

    let silence_limit = state.config.engine.agent_timeout.as_millis() as u64;
    let at = now();
    let (mut busy, mut idle, mut offline, mut refused) = (0, 0, 0, 0);
    for agent in state.view.agents() {
        match (
            at.millis_since(agent.heartbeat_at) <= silence_limit,
            agent.busy_with.is_some() || agent.busy_elsewhere,
        ) {
            (false, _) => offline += 1,
            _ if bus_schema::agent_refusal(agent.protocol).is_some() => refused += 1,
            (true, true) => busy += 1,
            (true, false) => idle += 1,
        }
    }
    let _ = writeln!(
        out,
        "# HELP yard_agents Agents by status.\n# TYPE yard_agents gauge"
    );
    let _ = writeln!(out, "yard_agents{{status=\"busy\"}} {busy}\nyard_agents{{status=\"idle\"}} {idle}\nyard_agents{{status=\"offline\"}} {offline}\nyard_agents{{status=\"refused\"}} {refused}");

    if let Ok(mut requests) = state.bus.stream(subjects::REQUESTS_STREAM).await {
        if let Ok(info) = requests.info().await {
            services::metrics::request_queue_length().set(info.state.messages as i64);
        }
    }
    let stats = &state.view.snapshot_stats;
    let _ = writeln!(
        out,
        "# HELP yard_ui_view_events_sequence Events-stream sequence the view has applied.\n# TYPE yard_ui_view_events_sequence gauge\nyard_ui_view_events_sequence {}",
        state.view.applied_sequence()
    );
    let _ = writeln!(
        out,
        "# HELP yard_ui_view_snapshot_sequence Events-stream sequence of the last view snapshot this master wrote.\n# TYPE yard_ui_view_snapshot_sequence gauge\nyard_ui_view_snapshot_sequence {}",
        stats.written_sequence.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP yard_ui_view_restored_builds Builds loaded from a snapshot at start (0: full replay).\n# TYPE yard_ui_view_restored_builds gauge\nyard_ui_view_restored_builds {}",
        stats.restored_builds.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP yard_ui_view_replayed_events Events applied from the stream since start.\n# TYPE yard_ui_view_replayed_events counter\nyard_ui_view_replayed_events_total {}",
        stats.replayed_events.load(Ordering::Relaxed)
    );
    // The queue length, the bus round trips and the counters of whatever other roles run in
    // this process.
    out.push_str(&services::metrics::render());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}
