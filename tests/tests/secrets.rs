//! Builder secrets, for real: values read on the engine master from its environment and from
//! a file reach the step, are masked as `***` in its log, and appear in no stored message, no
//! API answer and no process log.

use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};
use yard_tests::api::Api;
use yard_tests::deployment::Deployment;

const DEADLINE: Duration = Duration::from_secs(30);

/// Set only in the engine master's environment.
const TOKEN: &str = "tok-7f3a9c1e-from-the-engine-env";
const FILE_VALUE: &str = "file-4b2d8e60-from-the-engine-disk";
/// The file's value after rotation: two lines, each masked on its own.
const ROTATED_ONE: &str = "rotated-91c0-line-one";
const ROTATED_TWO: &str = "rotated-91c0-line-two";

const CONFIG: &str = r#"
[[builder]]
name = "with-secrets"
secrets = { API_TOKEN = { env = "YARD_TEST_API_TOKEN" }, FILE_SECRET = { file = "{dir}/file-secret" } }
[[builder.steps]]
name = "use"
run = '''echo "token=$API_TOKEN"; printf '%s\n' "$FILE_SECRET"; test "$API_TOKEN" = "tok-7f3a9c1e-from-the-engine-env"'''

[[builder]]
name = "rotated"
secrets = { FILE_SECRET = { file = "{dir}/file-secret" } }
[[builder.steps]]
name = "check"
run = '''printf '%s\n' "$FILE_SECRET"; test "$FILE_SECRET" = "$(printf 'rotated-91c0-line-one\nrotated-91c0-line-two')"'''

[[builder]]
name = "missing-secret"
secrets = { GONE = { env = "YARD_TEST_NEVER_SET" } }
[[builder.steps]]
name = "never-runs"
run = "echo never"

[[scheduler]]
name = "force"
kind = "force"
builders = ["with-secrets", "rotated", "missing-secret"]
"#;

const VALUES: [&str; 4] = [TOKEN, FILE_VALUE, ROTATED_ONE, ROTATED_TWO];

/// Panics if `text` (from `what`) holds any secret value.
fn assert_no_value(what: &str, text: &[u8]) {
    for value in VALUES {
        assert!(
            !text.windows(value.len()).any(|window| window == value.as_bytes()),
            "{what} contains the secret value {value:?}: {}",
            String::from_utf8_lossy(text)
        );
    }
}

/// Every message of every stream on the server (events, logs, requests, changes, and the
/// streams behind buckets and object stores), by stream name.
async fn every_stored_message(deployment: &Deployment) -> Vec<(String, Vec<u8>)> {
    let client = async_nats::connect(deployment.nats_url()).await.expect("nats");
    let jetstream = async_nats::jetstream::new(client);
    let mut names = Vec::new();
    let mut listing = jetstream.stream_names();
    while let Some(name) = listing.next().await {
        names.push(name.expect("stream name"));
    }
    let mut messages = Vec::new();
    for name in names {
        let stream = jetstream.get_stream(&name).await.expect("stream");
        let info = stream.get_info().await.expect("stream info");
        if info.state.messages == 0 {
            continue;
        }
        for sequence in info.state.first_sequence..=info.state.last_sequence {
            // Gaps are messages deleted (acknowledged requests, replaced bucket values).
            if let Ok(message) = stream.get_raw_message(sequence).await {
                let mut bytes = message.subject.as_bytes().to_vec();
                for (header, values) in message.headers.iter() {
                    bytes.extend_from_slice(header.to_string().as_bytes());
                    for value in values {
                        bytes.extend_from_slice(value.as_str().as_bytes());
                    }
                }
                bytes.extend_from_slice(&message.payload);
                messages.push((name.clone(), bytes));
            }
        }
    }
    messages
}

async fn finished_build(api: &Api, builder: &str) -> (String, Value) {
    let id = api.force(builder, json!({})).await;
    let build = api.wait_finished(&id, DEADLINE).await;
    (id, build)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn secrets_reach_steps_masked_and_are_stored_nowhere() {
    yard_tests::init_logging();
    let mut deployment = Deployment::new(CONFIG);
    std::fs::write(deployment.path("file-secret"), format!("{FILE_VALUE}\n")).unwrap();
    deployment.set_env("engine-1", &[("YARD_TEST_API_TOKEN", TOKEN)]);
    let api = deployment
        .start_masters_and_agents(&["engine-1"], &[("agent-1", "os=linux")])
        .await;

    // Both values arrive: the step's own `test` succeeds only with the token's value.
    let (first, build) = finished_build(&api, "with-secrets").await;
    assert_eq!(build["result"], "success", "{build}\n{}", deployment.logs());
    assert_eq!(build["steps"][0]["result"], "success", "{build}");
    let log = api.step_log(&first, 0).await;
    let lines: Vec<&str> = log.lines().collect();
    assert!(lines.contains(&"token=***"), "{log}");
    assert!(lines.contains(&"***"), "{log}");
    // The header echoing the command names the token's value too: masked as well.
    let header = lines
        .iter()
        .find(|line| line.starts_with("# $ "))
        .expect("command header");
    assert!(header.contains(r#"test "$API_TOKEN" = "***""#), "{log}");
    assert_no_value("the step log", log.as_bytes());

    // A rotated file counts from the next step on; each line of a multi-line value is masked.
    std::fs::write(
        deployment.path("file-secret"),
        format!("{ROTATED_ONE}\n{ROTATED_TWO}\n"),
    )
    .unwrap();
    let (second, build) = finished_build(&api, "rotated").await;
    assert_eq!(build["result"], "success", "{build}\n{}", deployment.logs());
    let log = api.step_log(&second, 0).await;
    assert_eq!(log.lines().filter(|line| *line == "***").count(), 2, "{log}");
    assert_no_value("the rotated step log", log.as_bytes());

    // A secret that cannot be read fails its step, naming the secret and its source.
    let (third, build) = finished_build(&api, "missing-secret").await;
    assert_eq!(build["result"], "exception", "{build}");
    let step = &build["steps"][0];
    assert_eq!(step["result"], "exception", "{build}");
    let message = step["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("secret GONE") && message.contains("environment variable YARD_TEST_NEVER_SET"),
        "{build}"
    );
    assert!(
        build["message"]
            .as_str()
            .unwrap_or_default()
            .contains("YARD_TEST_NEVER_SET"),
        "{build}"
    );
    let log = api.step_log(&third, 0).await;
    assert!(log.contains("secret GONE") && !log.contains("never\n"), "{log}");

    // The API shows secret names only, never values.
    let (status, builders) = api.get("/api/v1/builders").await;
    assert_eq!(status, 200);
    let with_secrets = builders["builders"]
        .as_array()
        .unwrap()
        .iter()
        .find(|builder| builder["name"] == "with-secrets")
        .expect("builder listed");
    assert_eq!(with_secrets["secrets"], json!(["API_TOKEN", "FILE_SECRET"]));
    let mut answers = vec![("builders".to_owned(), builders.to_string())];
    for id in [&first, &second, &third] {
        answers.push((format!("build {id}"), api.build(id).await.to_string()));
        let (_, steps_log) = api.get_text(&format!("/api/v1/builds/{id}/steps/0/log")).await;
        answers.push((format!("log of build {id}"), steps_log));
    }
    answers.push(("builds".to_owned(), api.get("/api/v1/builds").await.1.to_string()));
    for (what, text) in &answers {
        assert_no_value(what, text.as_bytes());
    }

    // Nothing stored on the bus holds a value: not the events, not the logs, nothing else.
    let stored = every_stored_message(&deployment).await;
    for stream in [
        bus_schema::subjects::EVENTS_STREAM,
        bus_schema::subjects::LOGS_STREAM,
    ] {
        assert!(
            stored.iter().any(|(name, _)| name == stream),
            "no message read from {stream}"
        );
    }
    let logs: Vec<u8> = stored
        .iter()
        .filter(|(name, _)| name == bus_schema::subjects::LOGS_STREAM)
        .flat_map(|(_, bytes)| bytes.iter().copied())
        .collect();
    assert!(
        logs.windows(b"token=***".len())
            .any(|window| window == b"token=***"),
        "the masked line is in the logs stream"
    );
    for (stream, bytes) in &stored {
        assert_no_value(&format!("a message of stream {stream}"), bytes);
    }

    // Nor does any process log.
    for process in ["sched-1", "engine-1", "ui-1", "agent-1"] {
        assert_no_value(
            &format!("the log of {process}"),
            deployment.log_text(process).as_bytes(),
        );
    }
}
