//! Running one step: a shell process in its own process group, its output streamed as log
//! chunks, its end reported as a step-finished event once every log chunk is stored. The
//! step's secret values are masked in every log line and in its result message before either
//! leaves the agent.

use std::future::IntoFuture;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use bus_schema::{
    subjects, BuildEvent, BuildEventKind, LogChunk, LogLine, LogStream, StepAssignment, StepEndAnswer,
    StepResult, Timestamp,
};
use bytes::Bytes;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use services::time::now;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::mask::Masker;
use crate::Agent;

/// Longest log line kept; the rest of a longer line is cut off, with a marker.
const MAX_LINE_BYTES: usize = 64 * 1024;
/// A chunk is published when it holds this many bytes, or when no more lines are waiting.
const MAX_CHUNK_BYTES: usize = 256 * 1024;
/// What a line costs in a chunk besides its text (its stream and framing), counted so that a
/// chunk of many short lines stays within [`MAX_CHUNK_BYTES`] too.
const LINE_OVERHEAD_BYTES: usize = 8;
/// Log chunks of one step published and not yet confirmed stored, at most.
const MAX_CHUNKS_IN_FLIGHT: usize = 256;
/// How long the engine has to confirm it stored a step's end handed to it; after that the
/// agent stores it itself (the engine holds it back for at most 50 ms, then stores it).
const HAND_OVER_TIMEOUT: Duration = Duration::from_secs(5);

struct Outcome {
    result: StepResult,
    exit_code: Option<i32>,
    message: Option<String>,
}

/// A step that ended on the agent and whose end is yet to be reported.
pub(crate) struct StepEnd {
    build_id: String,
    attempt: u32,
    index: u32,
    outcome: Outcome,
    /// When the step ended here, before the agent let go of its build: the recorded end, so
    /// that no later start on this machine can be recorded ahead of it.
    ended_at: Timestamp,
    /// The engine that takes the step's end to store it ([`StepAssignment::report_to`]).
    report_to: Option<String>,
}

impl StepEnd {
    /// Reports the step-finished event: handed to the engine that asked for the step, which
    /// stores it with the build's next event, or, when that engine does not confirm it stored
    /// it, stored here, retrying until JetStream has it or the agent's bus is gone. The engine
    /// waits for this event, so it must not be dropped on a passing error. Stored twice (an
    /// answer lost on the way), it folds the same.
    pub(crate) async fn report(self, agent: &Agent) {
        let finished = BuildEventKind::StepFinished {
            index: self.index,
            attempt: self.attempt,
            result: self.outcome.result,
            exit_code: self.outcome.exit_code,
            message: self.outcome.message,
        };
        let event = BuildEvent::new(self.build_id.clone(), self.ended_at, finished);
        if let Some(engine) = &self.report_to {
            match hand_over(agent, engine, &event).await {
                Ok(()) => return,
                Err(reason) => {
                    tracing::debug!(build = %self.build_id, index = self.index, %reason, "step end not taken by the engine; storing it here");
                }
            }
        }
        if !store_until_stored(agent, &self.build_id, self.index, self.ended_at, event.kind).await {
            tracing::error!(build = %self.build_id, index = self.index, "step result could not be stored; the engine will see the step as lost");
        }
    }
}

/// Runs the step to its end, with every line of its log stored; [`StepEnd::report`] then
/// reports it.
pub(crate) async fn run(agent: &Agent, assignment: StepAssignment, cancel: CancellationToken) -> StepEnd {
    let build_id = assignment.build_id.clone();
    let index = assignment.index;
    let attempt = assignment.attempt;
    let report_to = assignment.report_to.clone();
    // The engine stored the step's start, naming this run of the agent, before asking.
    if let Some(step_started) = &agent.settings.step_started {
        let _ = step_started.send((build_id.clone(), std::time::Instant::now()));
    }
    if agent.settings.simulate {
        // A simulated step succeeds at once and prints nothing: no process, no log.
        let outcome = Outcome {
            result: StepResult::Success,
            exit_code: Some(0),
            message: None,
        };
        return StepEnd {
            build_id,
            attempt,
            index,
            outcome,
            ended_at: now(),
            report_to,
        };
    }
    let masker = Arc::new(Masker::new(&assignment.masked));
    let (lines_tx, lines_rx) = mpsc::channel::<LogLine>(4096);
    let logger = tokio::spawn(publish_logs(
        agent.bus.clone(),
        build_id.clone(),
        attempt,
        index,
        lines_rx,
        Arc::clone(&masker),
    ));
    let mut outcome = execute(agent, &assignment, &cancel, lines_tx, &masker).await;
    outcome.message = outcome.message.map(|message| masker.mask(&message).into_owned());
    // Every log chunk is stored before the step is reported finished, so whoever sees the
    // step finished can read its whole log.
    let _ = logger.await;
    StepEnd {
        build_id,
        attempt,
        index,
        outcome,
        ended_at: now(),
        report_to,
    }
}

async fn execute(
    agent: &Agent,
    assignment: &StepAssignment,
    cancel: &CancellationToken,
    lines: mpsc::Sender<LogLine>,
    masker: &Arc<Masker>,
) -> Outcome {
    let header = |text: String| LogLine {
        stream: LogStream::Header,
        text,
    };
    let workspace = agent.workspace(&assignment.build_id);
    if let Err(error) = tokio::fs::create_dir_all(&workspace).await {
        return Outcome {
            result: StepResult::Exception,
            exit_code: None,
            message: Some(format!(
                "cannot create workspace {}: {error}",
                workspace.display()
            )),
        };
    }
    let _ = lines
        .send(header(format!(
            "$ {} (agent {}, workspace {})",
            assignment.command,
            agent.settings.name,
            workspace.display()
        )))
        .await;
    // Toolkits first: fetched if missing, their bin/ ahead on the PATH.
    let mut path: Vec<PathBuf> = Vec::new();
    for spec in &assignment.toolkits {
        match agent.toolkits.ensure(&agent.bus, spec).await {
            Ok(dir) => {
                let _ = lines
                    .send(header(format!("toolkit {spec} from {}", dir.display())))
                    .await;
                path.push(dir.join("bin"));
            }
            Err(message) => {
                return Outcome {
                    result: StepResult::Exception,
                    exit_code: None,
                    message: Some(message),
                }
            }
        }
    }
    let inherited = assignment
        .env
        .get("PATH")
        .cloned()
        .or_else(|| std::env::var("PATH").ok())
        .unwrap_or_default();
    path.extend(std::env::split_paths(&inherited));
    let path = std::env::join_paths(path).unwrap_or_else(|_| inherited.clone().into());
    let mut command = tokio::process::Command::new("/bin/sh");
    command
        .arg("-c")
        .arg(&assignment.command)
        .current_dir(&workspace)
        .envs(&assignment.env)
        .env("PATH", path)
        .env("YARD_WORKSPACE", &workspace)
        .env("YARD_AGENT", &agent.settings.name)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(error) => {
            return Outcome {
                result: StepResult::Exception,
                exit_code: None,
                message: Some(format!("cannot start /bin/sh: {error}")),
            }
        }
    };
    let process_group = child.id().map(|pid| Pid::from_raw(pid as i32));
    let stdout = child.stdout.take().map(|out| {
        tokio::spawn(forward_lines(
            out,
            LogStream::Stdout,
            lines.clone(),
            Arc::clone(masker),
        ))
    });
    let stderr = child.stderr.take().map(|err| {
        tokio::spawn(forward_lines(
            err,
            LogStream::Stderr,
            lines.clone(),
            Arc::clone(masker),
        ))
    });
    let timeout = assignment.timeout_ms.map(Duration::from_millis);
    let timer = async {
        match timeout {
            Some(limit) => tokio::time::sleep(limit).await,
            None => std::future::pending().await,
        }
    };
    let outcome = tokio::select! {
        status = child.wait() => match status {
            Ok(status) => match status.code() {
                Some(0) => Outcome { result: StepResult::Success, exit_code: Some(0), message: None },
                Some(code) => Outcome {
                    result: StepResult::Failure,
                    exit_code: Some(code),
                    message: Some(format!("exited with code {code}")),
                },
                None => Outcome {
                    result: StepResult::Failure,
                    exit_code: None,
                    message: Some("killed by a signal".into()),
                },
            },
            Err(error) => Outcome {
                result: StepResult::Exception,
                exit_code: None,
                message: Some(format!("cannot wait for the step process: {error}")),
            },
        },
        _ = timer => Outcome {
            result: StepResult::Timeout,
            exit_code: None,
            message: Some(format!(
                "timed out after {}; process group killed",
                humanize(timeout.unwrap_or_default())
            )),
        },
        _ = cancel.cancelled() => Outcome {
            result: StepResult::Cancelled,
            exit_code: None,
            message: Some("cancelled; process group killed".into()),
        },
    };
    // Whatever ended the step, nothing it started may outlive it: kill the whole group. This
    // also closes pipes held by background children, so the readers below reach EOF.
    if let Some(group) = process_group {
        let _ = killpg(group, Signal::SIGKILL);
    }
    let _ = child.wait().await;
    for reader in [stdout, stderr].into_iter().flatten() {
        // A process that left the group (setsid) can keep a pipe open; stop reading after a
        // grace period rather than hang the step.
        let _ = tokio::time::timeout(Duration::from_secs(5), reader).await;
    }
    if let Some(message) = &outcome.message {
        let _ = lines.send(header(message.clone())).await;
    }
    outcome
}

fn humanize(duration: Duration) -> String {
    let millis = duration.as_millis();
    if millis.is_multiple_of(1000) {
        format!("{}s", millis / 1000)
    } else {
        format!("{millis}ms")
    }
}

/// Reads lines from a pipe and forwards them, lossily decoded, to the log publisher.
async fn forward_lines(
    pipe: impl AsyncRead + Unpin,
    stream: LogStream,
    lines: mpsc::Sender<LogLine>,
    masker: Arc<Masker>,
) {
    let mut reader = BufReader::new(pipe);
    let mut buffer = Vec::new();
    loop {
        buffer.clear();
        match reader.read_until(b'\n', &mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                if buffer.last() == Some(&b'\n') {
                    buffer.pop();
                }
                if buffer.last() == Some(&b'\r') {
                    buffer.pop();
                }
                let mut text = String::from_utf8_lossy(&buffer).into_owned();
                if text.len() > MAX_LINE_BYTES {
                    // Masked before the cut, which could otherwise split a secret in two.
                    if let std::borrow::Cow::Owned(masked) = masker.mask(&text) {
                        text = masked;
                    }
                }
                if text.len() > MAX_LINE_BYTES {
                    let mut cut = MAX_LINE_BYTES;
                    while !text.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    text.truncate(cut);
                    text.push_str(" [line cut at 64 KiB]");
                }
                if lines.send(LogLine { stream, text }).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Publishes log lines in chunks: whatever has accumulated while the previous chunk was being
/// sent goes out together, so a chatty step makes few large messages and a quiet one adds no
/// delay. Publishes are pipelined; chunks that fail to be stored are published again
/// (deduplicated by their id) until JetStream has them, before this returns. Every line, the
/// agent's own headers included, has the step's secrets masked here, before it is published.
async fn publish_logs(
    bus: services::Bus,
    build_id: String,
    attempt: u32,
    index: u32,
    mut lines: mpsc::Receiver<LogLine>,
    masker: Arc<Masker>,
) {
    let subject = subjects::step_log(&build_id, index);
    let mut in_flight = std::collections::VecDeque::new();
    let mut unstored = Vec::new();
    let mut seq = 0u32;
    let mask = |mut line: LogLine| {
        if let std::borrow::Cow::Owned(masked) = masker.mask(&line.text) {
            line.text = masked;
        }
        line
    };
    while let Some(first) = lines.recv().await {
        let first = mask(first);
        let mut size = first.text.len() + LINE_OVERHEAD_BYTES;
        let mut chunk = vec![first];
        while size < MAX_CHUNK_BYTES {
            match lines.try_recv() {
                Ok(line) => {
                    let line = mask(line);
                    size += line.text.len() + LINE_OVERHEAD_BYTES;
                    chunk.push(line);
                }
                Err(_) => break,
            }
        }
        let payload = Bytes::from(bus_schema::encode(&LogChunk {
            build_id: build_id.clone(),
            index,
            seq,
            attempt,
            lines: chunk,
        }));
        let id = subjects::log_chunk_id(&build_id, attempt, index, seq);
        seq += 1;
        let ack = publish_chunk(&bus, &subject, &id, payload.clone()).await;
        in_flight.push_back((id, payload, ack));
        // A JetStream context lets only so many publishes wait for their acks; a long log
        // must not hold them all.
        if in_flight.len() > MAX_CHUNKS_IN_FLIGHT {
            if let Some((id, payload, ack)) = in_flight.pop_front() {
                if !chunk_stored(ack).await {
                    unstored.push((id, payload));
                }
            }
        }
    }
    for (id, payload, ack) in in_flight {
        if !chunk_stored(ack).await {
            unstored.push((id, payload));
        }
    }
    let mut delay = Duration::from_millis(100);
    for try_number in 1..=20 {
        if unstored.is_empty() {
            return;
        }
        tracing::warn!(build = %build_id, index, chunks = unstored.len(), try_number, "log chunks not stored; publishing again");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
        let mut still_unstored = Vec::new();
        for (id, payload) in unstored {
            if !chunk_stored(publish_chunk(&bus, &subject, &id, payload.clone()).await).await {
                still_unstored.push((id, payload));
            }
        }
        unstored = still_unstored;
    }
    if !unstored.is_empty() {
        tracing::error!(build = %build_id, index, chunks = unstored.len(), "log chunks lost: the bus did not store them");
    }
}

async fn publish_chunk(
    bus: &services::Bus,
    subject: &str,
    id: &str,
    payload: Bytes,
) -> Option<async_nats::jetstream::context::PublishAckFuture> {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", id);
    match bus
        .jetstream
        .publish_with_headers(subject.to_owned(), headers, payload)
        .await
    {
        Ok(ack) => Some(ack),
        Err(error) => {
            tracing::debug!(%error, "log chunk not published");
            None
        }
    }
}

/// True once JetStream confirmed it stored a published chunk.
async fn chunk_stored(ack: Option<async_nats::jetstream::context::PublishAckFuture>) -> bool {
    match ack {
        Some(ack) => ack.into_future().await.is_ok(),
        None => false,
    }
}

/// Hands a step's end to the engine at `subject` and waits for it to say it stored it.
async fn hand_over(agent: &Agent, subject: &str, event: &BuildEvent) -> Result<(), String> {
    let payload = Bytes::from(bus_schema::encode(event));
    let answer = tokio::time::timeout(
        HAND_OVER_TIMEOUT,
        agent.bus.client.request(subject.to_owned(), payload),
    )
    .await
    .map_err(|_| format!("no answer within {} s", HAND_OVER_TIMEOUT.as_secs()))?
    .map_err(|error| error.to_string())?;
    match bus_schema::decode::<StepEndAnswer>(&answer.payload) {
        Ok(StepEndAnswer::Stored) => Ok(()),
        Ok(StepEndAnswer::Declined { reason }) => Err(format!("declined: {reason}")),
        Err(error) => Err(format!("undecodable answer: {error}")),
    }
}

/// Stores a step event, retrying with backoff (about a minute and a half in all) through a
/// NATS node failing over; false if JetStream never took it.
async fn store_until_stored(
    agent: &Agent,
    build_id: &str,
    index: u32,
    at: Timestamp,
    kind: BuildEventKind,
) -> bool {
    let mut delay = Duration::from_millis(50);
    for try_number in 1..=20 {
        match agent.bus.store_event_at(build_id, at, kind.clone()).await {
            Ok(_) => return true,
            Err(error) => {
                let event = kind.subject_kind();
                tracing::warn!(%error, build = %build_id, index, event, try_number, "step event not stored; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
    false
}
