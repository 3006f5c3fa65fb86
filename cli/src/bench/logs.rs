//! The `logs` scenario: K real agents (in this process, running real shell steps) each run one
//! build whose step prints N lines; a UI master in this process serves each step's log as it
//! grows (`/api/v1/builds/{id}/steps/{index}/log/stream`) to one client per build. Timed from
//! the builds' requests to the last line reaching its client: log lines/s from agents to UI.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::StreamExt;

use super::grid::{request_of, Grid};
use super::round;
use super::ui::UiMaster;

/// Options of `yard bench logs`.
pub struct LogsOptions {
    /// Agents, each running one build.
    pub agents: usize,
    /// Lines each build's step prints.
    pub lines: usize,
}

/// Log lines/s from agents to clients of the UI master.
pub async fn logs(options: LogsOptions) -> anyhow::Result<serde_json::Value> {
    let config = format!(
        r#"
[http]
listen = "127.0.0.1:0"

[[builder]]
name = "logs"
[[builder.steps]]
name = "print"
run = "seq 1 {}"
"#,
        options.lines
    );
    let mut grid = Grid::new(&config).await?;
    grid.add_agents(options.agents, 1, false).await?;
    grid.start_engine_here().await?;
    grid.wait_engine_pulling(Duration::from_secs(60)).await?;
    let ui = UiMaster::start(&grid.nats.config).await?;

    let started = Instant::now();
    let mut tails = Vec::with_capacity(options.agents);
    for number in 0..options.agents {
        let request = request_of("logs", number);
        grid.bus.store_build_request(&request, None).await?;
        let url = format!("{}/api/v1/builds/{}/steps/0/log/stream", ui.url, request.build_id);
        tails.push(tokio::spawn(tail(ui.client.clone(), url)));
    }
    let mut lines = 0;
    let mut last_line = started;
    for tail in tails {
        let (received, at) = tokio::time::timeout(Duration::from_secs(300), tail)
            .await
            .context("a step's log did not reach its client")???;
        if received < options.lines {
            bail!(
                "a client received {received} of the {} lines its step printed",
                options.lines
            );
        }
        lines += received;
        last_line = last_line.max(at);
    }
    let elapsed = last_line.duration_since(started).as_secs_f64();
    ui.stop().await;
    grid.stop().await;
    Ok(serde_json::json!({
        "scenario": "logs",
        "agents": options.agents,
        "lines_per_build": options.lines,
        "lines": lines,
        "seconds": round(elapsed),
        "lines_per_s": round(lines as f64 / elapsed),
    }))
}

/// Follows one step's log until its `end` event; returns the lines received and when the last
/// of them arrived.
async fn tail(client: reqwest::Client, url: String) -> anyhow::Result<(usize, Instant)> {
    // The log exists once the UI master has seen the build claimed.
    let waiting = Instant::now();
    let response = loop {
        let response = client.get(&url).send().await.context("following a step's log")?;
        if response.status().is_success() {
            break response;
        }
        if waiting.elapsed() > Duration::from_secs(120) {
            bail!("GET {url} still answers {}", response.status());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let mut body = response.bytes_stream();
    let mut buffer = String::new();
    let (mut lines, mut last_line) = (0, Instant::now());
    while let Some(bytes) = body.next().await {
        buffer.push_str(&String::from_utf8_lossy(&bytes.context("reading a step's log")?));
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            let mut kind = "";
            for line in event.lines() {
                if let Some(name) = line.strip_prefix("event:") {
                    kind = name.trim_start();
                } else if let Some(data) = line.strip_prefix("data:").map(str::trim_start) {
                    match kind {
                        "log" => {
                            let chunk: serde_json::Value =
                                serde_json::from_str(data).context("an undecodable log event")?;
                            lines += chunk["text"].as_str().map_or(0, |text| text.lines().count());
                            last_line = Instant::now();
                        }
                        "end" => return Ok((lines, last_line)),
                        "error" => bail!("the log stream failed: {data}"),
                        _ => {}
                    }
                }
            }
        }
    }
    bail!("the log stream of {url} closed before its end")
}
