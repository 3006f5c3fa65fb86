//! The `ui` scenario: N finished builds stored on the bus; a UI master folds them all (full
//! replay) and snapshots its view; a second UI master starts from the snapshot; then
//! `GET /api/v1/builds?limit=50` is timed under concurrent load, and build changes are timed
//! to many clients of the live-update stream (`/api/v1/stream`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bus_schema::{BuildEventKind, BuildRequest, BuildResult, PlannedStep, StepResult};
use futures::StreamExt;
use services::{Bus, YardConfig};
use tokio_util::sync::CancellationToken;

use super::{percentile, quantiles, round, Nats, BENCH_CONFIG};

/// Options of `yard bench ui`.
pub struct UiOptions {
    pub builds: usize,
    pub requests: usize,
    pub concurrency: usize,
    /// Clients of the live-update stream.
    pub sse_clients: usize,
    /// Build changes timed to every one of them.
    pub sse_updates: usize,
}

/// Runs the `ui` scenario; returns its figures as one JSON object.
pub async fn ui(options: UiOptions) -> anyhow::Result<serde_json::Value> {
    let nats = Nats::start(BENCH_CONFIG)?;
    let config = Arc::clone(&nats.config);
    let bus = nats.connect("yard-bench").await?;

    let started = Instant::now();
    let last_sequence = seed_builds(&bus, options.builds).await?;
    let seed_seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "stored {} builds ({last_sequence} events) in {seed_seconds:.1} s",
        options.builds
    );

    // The first UI master folds every event, then writes a snapshot.
    let first = UiMaster::start(&config).await?;
    let full_replay = first
        .wait_applied(last_sequence, Duration::from_secs(1800))
        .await?;
    eprintln!("full replay: {full_replay:.2} s");
    let snapshot_started = Instant::now();
    first
        .wait_snapshot(last_sequence, Duration::from_secs(1800))
        .await?;
    let snapshot_written = snapshot_started.elapsed().as_secs_f64();
    first.stop().await;

    // The second starts from that snapshot.
    let restart = Instant::now();
    let second = UiMaster::start(&config).await?;
    let serving = restart.elapsed().as_secs_f64();
    second
        .wait_applied(last_sequence, Duration::from_secs(1800))
        .await?;
    let restored = restart.elapsed().as_secs_f64();
    eprintln!("restart: serving after {serving:.2} s, every build shown after {restored:.2} s");

    let (latencies, wall) = second.load(options.requests, options.concurrency).await?;
    let live = second
        .live_updates(&bus, options.sse_clients, options.sse_updates)
        .await?;
    second.stop().await;
    bus.close().await;
    nats.stop();
    let mut result = serde_json::json!({
        "scenario": "ui",
        "builds": options.builds,
        "events": last_sequence,
        "seed_s": round(seed_seconds),
        "full_replay_s": round(full_replay),
        "snapshot_write_s": round(snapshot_written),
        "restart_serving_s": round(serving),
        "restart_caught_up_s": round(restored),
        "requests": options.requests,
        "concurrency": options.concurrency,
        "requests_per_s": round(options.requests as f64 / wall),
        "p50_ms": round(percentile(&latencies, 0.50)),
        "p99_ms": round(percentile(&latencies, 0.99)),
        "max_ms": round(percentile(&latencies, 1.0)),
        "sse_clients": options.sse_clients,
        "sse_updates": options.sse_updates,
    });
    if let Some(fields) = result.as_object_mut() {
        fields.extend(quantiles("sse_", live));
    }
    Ok(result)
}

/// Stores `count` finished one-step builds as the engines would record them, with JetStream
/// publishes pipelined; returns the events-stream sequence of the last event.
async fn seed_builds(bus: &Bus, count: usize) -> anyhow::Result<u64> {
    const WINDOW: usize = 4096;
    let mut pending = std::collections::VecDeque::with_capacity(WINDOW);
    let mut last = 0;
    for number in 0..count {
        let build_id = ulid::Ulid::new().to_string();
        let at = services::time::now();
        let events = [
            BuildEventKind::Requested(BuildRequest {
                build_id: build_id.clone(),
                builder: "bench".into(),
                reason: format!("bench build {number}"),
                properties: Default::default(),
                changes: Vec::new(),
                priority: 0,
                requested_at: at,
            }),
            BuildEventKind::Claimed {
                engine: "bench".into(),
                steps: vec![PlannedStep {
                    name: "true".into(),
                    path: "true".into(),
                    kind: "command".into(),
                }],
                agent: Some("bench-agent".into()),
                waiting: None,
            },
            BuildEventKind::StepStarted {
                index: 0,
                attempt: 0,
                agent: "bench-agent".into(),
                agent_session: None,
            },
            BuildEventKind::StepFinished {
                index: 0,
                attempt: 0,
                result: StepResult::Success,
                exit_code: Some(0),
                message: None,
            },
            BuildEventKind::Finished {
                result: BuildResult::Success,
                message: None,
            },
        ];
        for kind in events {
            pending.push_back(bus.publish_event(&build_id, kind).await?);
            if pending.len() >= WINDOW {
                if let Some(ack) = pending.pop_front() {
                    last = ack.await.context("storing a seeded event")?.sequence;
                }
            }
        }
    }
    while let Some(ack) = pending.pop_front() {
        last = ack.await.context("storing a seeded event")?.sequence;
    }
    Ok(last)
}

/// A UI master running in this process on a free port.
pub(super) struct UiMaster {
    pub(super) url: String,
    pub(super) client: reqwest::Client,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl UiMaster {
    pub(super) async fn start(config: &Arc<YardConfig>) -> anyhow::Result<UiMaster> {
        let bus = Bus::connect(&config.nats, &config.engine, "yard-bench-ui").await?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let shutdown = CancellationToken::new();
        let (config, stop) = (Arc::clone(config), shutdown.clone());
        let task = tokio::spawn(async move {
            if let Err(error) = ui_master::serve(config, bus, listener, stop).await {
                eprintln!("UI master failed: {error}");
            }
        });
        let master = UiMaster {
            url,
            client: reqwest::Client::new(),
            shutdown,
            task,
        };
        master.metric_when(Duration::from_secs(30), |_| true).await?;
        Ok(master)
    }

    /// Polls `/metrics` until `ready` holds for its text; returns the seconds waited.
    async fn metric_when(&self, limit: Duration, ready: impl Fn(&str) -> bool) -> anyhow::Result<f64> {
        let started = Instant::now();
        loop {
            if let Ok(response) = self.client.get(format!("{}/metrics", self.url)).send().await {
                if let Ok(text) = response.text().await {
                    if ready(&text) {
                        return Ok(started.elapsed().as_secs_f64());
                    }
                }
            }
            if started.elapsed() > limit {
                bail!("the UI master at {} was not ready within {limit:?}", self.url);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_applied(&self, sequence: u64, limit: Duration) -> anyhow::Result<f64> {
        self.metric_when(limit, |text| {
            services::metrics::sample(text, "yard_ui_view_events_sequence")
                .is_some_and(|applied| applied >= sequence)
        })
        .await
    }

    async fn wait_snapshot(&self, sequence: u64, limit: Duration) -> anyhow::Result<f64> {
        self.metric_when(limit, |text| {
            services::metrics::sample(text, "yard_ui_view_snapshot_sequence")
                .is_some_and(|written| written >= sequence)
        })
        .await
    }

    /// Sends `requests` listings from `concurrency` clients; returns the sorted latencies in
    /// milliseconds and the wall time in seconds.
    async fn load(&self, requests: usize, concurrency: usize) -> anyhow::Result<(Vec<f64>, f64)> {
        let url = format!("{}/api/v1/builds?limit=50", self.url);
        let started = Instant::now();
        let per_client = requests.div_ceil(concurrency.max(1));
        let clients = (0..concurrency.max(1)).map(|_| {
            let (client, url) = (self.client.clone(), url.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(per_client);
                for _ in 0..per_client {
                    let sent = Instant::now();
                    let response = client.get(&url).send().await?;
                    let status = response.status();
                    let body = response.bytes().await?;
                    if !status.is_success() || body.len() < 2 {
                        anyhow::bail!("GET {url} answered {status}");
                    }
                    latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
                }
                Ok(latencies)
            })
        });
        let mut latencies = Vec::with_capacity(requests);
        for client in futures::future::join_all(clients).await {
            latencies.extend(client??);
        }
        let wall = started.elapsed().as_secs_f64();
        latencies.sort_by(f64::total_cmp);
        Ok((latencies, wall))
    }

    /// Connects `clients` to the live-update stream, then stores `updates` new builds one at a
    /// time; returns, for every client and build, the milliseconds from storing the build's
    /// request to the client receiving it.
    async fn live_updates(&self, bus: &Bus, clients: usize, updates: usize) -> anyhow::Result<Vec<f64>> {
        let url = format!("{}/api/v1/stream", self.url);
        let sent: Arc<std::sync::Mutex<std::collections::HashMap<String, Instant>>> = Default::default();
        let mut readers = Vec::with_capacity(clients);
        for _ in 0..clients {
            let response = self
                .client
                .get(&url)
                .send()
                .await
                .context("connecting to the live-update stream")?;
            if !response.status().is_success() {
                bail!("GET {url} answered {}", response.status());
            }
            // The stream answered: the client is subscribed to the view's changes.
            let sent = Arc::clone(&sent);
            readers.push(tokio::spawn(async move {
                let mut body = response.bytes_stream();
                let mut latencies = Vec::with_capacity(updates);
                let mut buffer = String::new();
                while latencies.len() < updates {
                    let Some(Ok(bytes)) = body.next().await else {
                        break;
                    };
                    let received = Instant::now();
                    buffer.push_str(&String::from_utf8_lossy(&bytes));
                    while let Some(end) = buffer.find("\n\n") {
                        let event: String = buffer.drain(..end + 2).collect();
                        let sent = sent.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                        if let Some(at) = sent
                            .iter()
                            .find_map(|(id, at)| event.contains(id.as_str()).then_some(at))
                        {
                            latencies.push(received.duration_since(*at).as_secs_f64() * 1000.0);
                        }
                    }
                }
                latencies
            }));
        }
        for number in 0..updates {
            let request = BuildRequest {
                build_id: ulid::Ulid::new().to_string(),
                builder: "bench".into(),
                reason: format!("live update {number}"),
                properties: Default::default(),
                changes: Vec::new(),
                priority: 0,
                requested_at: services::time::now(),
            };
            sent.lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .insert(request.build_id.clone(), Instant::now());
            bus.publish_event(&request.build_id, BuildEventKind::Requested(request.clone()))
                .await?
                .await
                .context("storing a live-update build")?;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut latencies = Vec::with_capacity(clients * updates);
        for reader in readers {
            let received = tokio::time::timeout(Duration::from_secs(60), reader)
                .await
                .context("a live-update client did not receive every build")??;
            if received.len() < updates {
                bail!(
                    "a live-update client received {} of {updates} builds",
                    received.len()
                );
            }
            latencies.extend(received);
        }
        Ok(latencies)
    }

    pub(super) async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}
