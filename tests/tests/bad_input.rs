//! Bad input never crashes a master or loses data: undecodable and oversized bus messages are
//! rejected, parked in the dead-letter stream and counted, and oversized, slow or too many
//! HTTP requests get clear JSON errors, while every process keeps serving.

use std::time::Duration;

use bus_schema::subjects;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use yard_tests::api::Api;
use yard_tests::deployment::Deployment;
use yard_tests::{wait_until, NatsServer};

const DEADLINE: Duration = Duration::from_secs(30);

const CONFIG: &str = r#"
[[builder]]
name = "app"
[[builder.steps]]
name = "hello"
run = "echo hello"

[[scheduler]]
name = "main"
kind = "on-change"
branches = ["main"]
builders = ["app"]

[[scheduler]]
name = "force"
kind = "force"
builders = ["app"]
"#;

/// A deployment on a nats-server that takes payloads of up to 4 MB, so that a message over
/// [`bus_schema::MAX_MESSAGE_BYTES`] reaches the roles.
fn deployment(toml: &str) -> Deployment {
    let dir = tempfile::tempdir().expect("temp dir");
    let nats_dir = dir.path().join("nats");
    std::fs::create_dir_all(&nats_dir).expect("nats dir");
    let conf = nats_dir.join("nats.conf");
    let store = nats_dir.join("jetstream");
    std::fs::write(
        &conf,
        format!(
            "listen: \"127.0.0.1:-1\"\nmax_payload: 4MB\njetstream {{ store_dir: \"{}\" }}\n",
            store.display()
        ),
    )
    .expect("nats config");
    let binary = NatsServer::locate_binary().expect("nats-server (scripts/test installs it)");
    let server = NatsServer::start_with_config(&binary, &nats_dir, &conf).expect("nats-server starts");
    Deployment::on_server(dir, server, toml)
}

/// Starts a scheduler, an engine, a UI master and one agent, each its own process.
async fn start_roles(deployment: &mut Deployment) -> Api {
    deployment.provision().await;
    let api = deployment
        .start_masters_and_agents(&["engine-1"], &[("a1", "os=linux")])
        .await;
    api
}

/// Every process of the deployment is still running, and a forced build still succeeds.
async fn assert_still_serving(deployment: &mut Deployment, api: &Api) {
    for name in ["sched-1", "engine-1", "ui-1", "a1"] {
        assert!(
            deployment.process(name).is_running(),
            "{name} exited:\n{}",
            deployment.log_text(name)
        );
    }
    let id = api.force("app", json!({})).await;
    let build = api.wait_finished(&id, DEADLINE).await;
    assert_eq!(build["result"], "success", "{build}");
    assert!(api.step_log(&id, 0).await.contains("hello"));
}

/// A dead letter as parked: the role that rejected it, the original subject, and its copy.
#[derive(Debug)]
struct DeadLetter {
    role: String,
    subject: String,
    error: String,
    size: usize,
    payload: bytes::Bytes,
}

async fn dead_letters(jetstream: &async_nats::jetstream::Context) -> Vec<DeadLetter> {
    let Ok(mut stream) = jetstream.get_stream(subjects::DEAD_LETTERS_STREAM).await else {
        return Vec::new();
    };
    let Ok(info) = stream.info().await else {
        return Vec::new();
    };
    let (first, last) = (info.state.first_sequence, info.state.last_sequence);
    let mut letters = Vec::new();
    for sequence in first.max(1)..=last {
        let Ok(message) = stream.get_raw_message(sequence).await else {
            continue;
        };
        let header = |name: &str| {
            message
                .headers
                .get(name)
                .map(|value| value.as_str().to_owned())
                .unwrap_or_default()
        };
        letters.push(DeadLetter {
            role: header(subjects::DEAD_LETTER_ROLE),
            subject: header(subjects::DEAD_LETTER_SUBJECT),
            error: header(subjects::DEAD_LETTER_ERROR),
            size: header(subjects::DEAD_LETTER_SIZE).parse().unwrap_or(0),
            payload: message.payload.clone(),
        });
    }
    letters
}

/// The value of `yard_dead_letters_total{role="<role>"}` in a metrics text, 0 when absent.
fn dead_letter_count(metrics: &str, role: &str) -> u64 {
    let prefix = format!("yard_dead_letters_total{{role=\"{role}\"}} ");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&prefix)?.trim().parse().ok())
        .unwrap_or(0)
}

/// The `/metrics` text of master `id`, from the URL it records in the masters registry.
async fn master_metrics(api: &Api, id: &str) -> String {
    let (_, body) = api.get("/api/v1/masters").await;
    let url = body["masters"].as_array().and_then(|masters| {
        let record = masters.iter().find(|record| record["id"] == id)?;
        Some(record["metrics_url"].as_str()?.to_owned())
    });
    match url {
        Some(url) => match reqwest::get(&url).await {
            Ok(response) => response.text().await.unwrap_or_default(),
            Err(error) => error.to_string(),
        },
        None => format!("no metrics_url for {id} in {body}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_bus_messages_are_parked_counted_and_survived() {
    yard_tests::init_logging();
    let mut deployment = deployment(CONFIG);
    let api = start_roles(&mut deployment).await;
    let client = async_nats::connect(deployment.nats_url()).await.expect("NATS");
    let jetstream = async_nats::jetstream::new(client.clone());
    let agents = jetstream
        .get_key_value(subjects::AGENTS_BUCKET)
        .await
        .expect("agents bucket");
    // The scheduler reads the changes stored once its consumer exists.
    let consumer = subjects::scheduler_consumer("main");
    wait_until("the scheduler's consumer", DEADLINE, || async {
        let stream = jetstream.get_stream(subjects::CHANGES_STREAM).await.ok()?;
        let _: async_nats::jetstream::consumer::PullConsumer = stream.get_consumer(&consumer).await.ok()?;
        Some(())
    })
    .await;

    // Garbage, and a message too large to read, on each kind of subject the roles consume.
    let garbage = bytes::Bytes::from_static(b"\xc1 this is not a Yardmaster message");
    let oversized = bytes::Bytes::from(vec![0x90; bus_schema::MAX_MESSAGE_BYTES + 1024]);
    let request = subjects::request("app");
    let event = subjects::event("01BADBADBADBADBADBADBADBAD", "finished");
    let heartbeat = subjects::kv_key(subjects::AGENTS_BUCKET, "a1");
    let change = subjects::change("bad-change-1");
    let step_ends = subjects::engine_step_ends("engine-1");
    for payload in [&garbage, &oversized] {
        // A step end handed to an engine is declined at once, with the reason: its sender
        // stores it itself.
        let answer = client
            .request(step_ends.clone(), payload.clone())
            .await
            .expect("the engine answers");
        match bus_schema::decode::<bus_schema::StepEndAnswer>(&answer.payload) {
            Ok(bus_schema::StepEndAnswer::Declined { reason }) => {
                assert!(reason.contains("undecodable step end"), "{reason}");
            }
            other => panic!("a bad step end was not declined: {other:?}"),
        }
        for subject in [&request, &event, &change] {
            let ack = jetstream
                .publish(subject.clone(), payload.clone())
                .await
                .expect("published");
            ack.await.expect("stored");
        }
        agents
            .put("a1", payload.clone())
            .await
            .expect("heartbeat key written");
    }

    // Each is parked once by every role that read it, with its subject, role and error.
    let expected = [
        (&request, "engine"),
        (&heartbeat, "engine"),
        (&step_ends, "engine"),
        (&heartbeat, "ui"),
        (&event, "ui"),
        (&change, "ui"),
        (&change, "scheduler"),
    ];
    let letters = wait_until("every bad message in YARD_DEAD_LETTERS", DEADLINE, || async {
        let letters = dead_letters(&jetstream).await;
        let complete = expected.iter().all(|(subject, role)| {
            let parked = |payload: &bytes::Bytes| {
                letters.iter().any(|letter| {
                    letter.subject == **subject && letter.role == *role && letter.payload == *payload
                })
            };
            parked(&garbage) && parked(&oversized)
        });
        complete.then_some(letters)
    })
    .await;
    for letter in &letters {
        assert!(!letter.error.is_empty(), "{letter:?}");
        assert_eq!(letter.size, letter.payload.len(), "{letter:?}");
        if letter.size == oversized.len() {
            assert!(
                letter
                    .error
                    .contains(&format!("limit of {} bytes", bus_schema::MAX_MESSAGE_BYTES)),
                "{letter:?}"
            );
        }
    }

    // The rejected build requests left the work queue; the roles count what they parked.
    wait_until(
        "the bad build requests out of the work queue",
        DEADLINE,
        || async {
            let mut requests = jetstream.get_stream(subjects::REQUESTS_STREAM).await.ok()?;
            (requests.info().await.ok()?.state.messages == 0).then_some(())
        },
    )
    .await;
    let ui = wait_until("the UI master's dead-letter count", DEADLINE, || async {
        let (_, metrics) = api.get_text("/metrics").await;
        (dead_letter_count(&metrics, "ui") >= 6).then_some(metrics)
    })
    .await;
    assert!(ui.contains("# TYPE yard_dead_letters counter"), "{ui}");
    for (id, role, count) in [("engine-1", "engine", 6), ("sched-1", "scheduler", 2)] {
        wait_until(&format!("{id}'s dead-letter count"), DEADLINE, || async {
            let metrics = master_metrics(&api, id).await;
            (dead_letter_count(&metrics, role) >= count).then_some(())
        })
        .await;
    }

    // Every process lives on and does its work: a forced build, a change's build.
    assert_still_serving(&mut deployment, &api).await;
    let (status, body) = api
        .post(
            "/api/v1/changes",
            json!({ "repository": "r", "branch": "main", "revision": "abc", "author": "me" }),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let change_id = body["id"].as_str().expect("change id").to_owned();
    let build = wait_until("the change's build", DEADLINE, || async {
        let (_, body) = api.get(&format!("/api/v1/builds?change={change_id}")).await;
        let build = body["builds"].as_array()?.first()?.clone();
        (build["state"] == "finished").then_some(build)
    })
    .await;
    assert_eq!(build["result"], "success", "{build}");
}

/// Sends a request whose body never comes, and returns the connection to read its answer.
async fn stalled_request(address: &str) -> tokio::net::TcpStream {
    let mut stream = tokio::net::TcpStream::connect(address).await.expect("connects");
    let head = format!(
        "POST /api/v1/changes HTTP/1.1\r\nHost: {address}\r\ncontent-type: application/json\r\n\
         content-length: 100\r\n\r\n"
    );
    stream
        .write_all(head.as_bytes())
        .await
        .expect("request head sent");
    stream
}

/// Reads an HTTP/1.1 answer with a JSON body: its status and its body.
async fn read_answer(mut stream: tokio::net::TcpStream) -> (u16, Value) {
    let mut bytes = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buffer = [0u8; 4096];
        loop {
            let text = String::from_utf8_lossy(&bytes).into_owned();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                if let Ok(body) = serde_json::from_str::<Value>(body) {
                    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok());
                    return (status.unwrap_or(0), body);
                }
            }
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return (0, Value::String(text)),
                Ok(count) => bytes.extend_from_slice(&buffer[..count]),
            }
        }
    });
    read.await.unwrap_or((0, Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversized_slow_and_excess_requests_get_json_errors() {
    yard_tests::init_logging();
    let config = format!("[http]\nmax_concurrent_requests = 3\nrequest_timeout = \"3s\"\n{CONFIG}");
    let mut deployment = deployment(&config);
    let api = start_roles(&mut deployment).await;
    // A fresh connection for each request: the master closes one whose body it refused.
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("http client");
    let limit = 1024 * 1024;

    // A body over [http] max_body_bytes, to the API and to a hook: 413, saying the limit.
    let huge = vec![b' '; 2 * 1024 * 1024];
    for (path, headers) in [
        (
            "/api/v1/builders/app/force",
            vec![("content-type", "application/json")],
        ),
        ("/hooks/github", vec![("x-github-event", "push")]),
        ("/hooks/gitlab", vec![("x-gitlab-event", "Push Hook")]),
    ] {
        let mut request = http.post(api.url(path)).body(huge.clone());
        for (name, value) in headers {
            request = request.header(name, value);
        }
        let response = request.send().await.expect("answered");
        assert_eq!(response.status().as_u16(), 413, "{path}");
        let body: Value = response.json().await.expect("a JSON error");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(&limit.to_string()) && error.contains("max_body_bytes"),
            "{path}: {body}"
        );
    }

    // Requests beyond [http] max_concurrent_requests get 503 at once, while others are
    // being worked on; those end at [http] request_timeout with 408.
    let address = api.url("").trim_start_matches("http://").to_owned();
    let mut stalled = Vec::new();
    for _ in 0..3 {
        stalled.push(stalled_request(&address).await);
    }
    let refused = wait_until(
        "a request refused for overload",
        Duration::from_secs(2),
        || async {
            let response = http.get(api.url("/api/v1/builds")).send().await.ok()?;
            (response.status().as_u16() == 503).then_some(response)
        },
    )
    .await;
    let body: Value = refused.json().await.expect("a JSON error");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("max_concurrent_requests"),
        "{body}"
    );
    for stream in stalled {
        let (status, body) = read_answer(stream).await;
        assert_eq!(status, 408, "{body}");
        assert!(
            body["error"]
                .as_str()
                .unwrap_or_default()
                .contains("request_timeout"),
            "{body}"
        );
    }

    // The live stream is not cut at the request timeout.
    let mut events = http
        .get(api.url("/api/v1/stream"))
        .send()
        .await
        .expect("stream opens");
    assert_eq!(events.status().as_u16(), 200);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let id = api.force("app", json!({})).await;
    let mut seen = String::new();
    let streamed = tokio::time::timeout(Duration::from_secs(20), async {
        while let Ok(Some(chunk)) = events.chunk().await {
            seen.push_str(&String::from_utf8_lossy(&chunk));
            if seen.contains(&id) && seen.contains("\"finished\"") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(streamed, Ok(true), "{seen}");

    // And the master keeps serving.
    assert_still_serving(&mut deployment, &api).await;
}
