//! The docker-compose deployment for real: the project's image built without pulling anything,
//! a three-node NATS cluster, two of each master and three agents, and a build through it.
//! Where no Docker engine runs, the test says so and does nothing else.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use yard_tests::api::Api;
use yard_tests::wait_until;

/// How long the deployment may take to come up: six masters and three agents, each retrying
/// its NATS connection until the cluster has a JetStream leader.
const STARTUP: Duration = Duration::from_secs(90);

fn repository_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

fn succeeds(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|output| output.status.success())
}

/// `docker-compose` (v1), or the `docker compose` plugin where that is what is installed.
fn compose_program() -> (&'static str, &'static [&'static str]) {
    if succeeds("docker-compose", &["version"]) {
        ("docker-compose", &[])
    } else if succeeds("docker", &["compose", "version"]) {
        ("docker", &["compose"])
    } else {
        panic!("a Docker engine runs but neither `docker-compose` nor `docker compose` is installed")
    }
}

/// Two distinct free loopback ports.
fn free_ports() -> (u16, u16) {
    let first = yard_tests::free_port();
    let second = std::iter::repeat_with(yard_tests::free_port)
        .find(|port| *port != first)
        .expect("a second port");
    (first, second)
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A compose project with its own name and host ports, taken down (with its volumes) when
/// dropped, also when the test panics.
struct ComposeProject {
    program: (&'static str, &'static [&'static str]),
    name: String,
    ports: (u16, u16),
}

impl ComposeProject {
    fn command(&self) -> Command {
        let (program, prefix) = self.program;
        let mut command = Command::new(program);
        command
            .current_dir(repository_root())
            .args(prefix)
            .args(["-p", &self.name])
            .env("YARD_UI1_PORT", self.ports.0.to_string())
            .env("YARD_UI2_PORT", self.ports.1.to_string());
        command
    }

    fn logs(&self) -> String {
        self.command()
            .args(["logs", "--no-color", "--tail", "30"])
            .output()
            .map(|output| String::from_utf8_lossy(&output.stdout).into_owned())
            .unwrap_or_default()
    }
}

impl Drop for ComposeProject {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "last log lines of compose project {}:\n{}",
                self.name,
                self.logs()
            );
        }
        match self.command().args(["down", "-v", "--timeout", "5"]).output() {
            Ok(output) if output.status.success() => {}
            Ok(output) => eprintln!("compose down of {} failed: {}", self.name, stderr(&output)),
            Err(error) => eprintln!("compose down of {} did not run: {error}", self.name),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_deployment_runs_a_build() {
    if !succeeds("docker", &["info"]) {
        println!("compose test skipped: no Docker engine is running (`docker info` failed)");
        return;
    }
    let started = Instant::now();
    let program = compose_program();
    let binary = yard_tests::process::yard_binary();
    let images = Command::new(repository_root().join("scripts/docker-images"))
        .env("YARD_BINARY", &binary)
        .output()
        .expect("scripts/docker-images runs");
    assert!(
        images.status.success(),
        "building the image failed: {}",
        stderr(&images)
    );
    eprintln!("image yardmaster:dev built after {:?}", started.elapsed());

    let unique = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .subsec_nanos();
    let project = ComposeProject {
        program,
        name: format!("yardtest{}x{unique:x}", std::process::id()),
        ports: free_ports(),
    };
    let up = project
        .command()
        .args(["up", "-d"])
        .output()
        .expect("compose runs");
    assert!(up.status.success(), "compose up failed: {}", stderr(&up));
    eprintln!(
        "compose project {} up after {:?}; UI masters on 127.0.0.1:{} and :{}",
        project.name,
        started.elapsed(),
        project.ports.0,
        project.ports.1
    );

    let first = Api::new(format!("http://127.0.0.1:{}", project.ports.0));
    let second = Api::new(format!("http://127.0.0.1:{}", project.ports.1));
    // Api::get panics on a refused connection, and a UI master answers only once it reached
    // the cluster: ask /healthz with a client that tolerates that.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("http client");
    for api in [&first, &second] {
        let url = api.url("/healthz");
        wait_until(&format!("{url} to answer"), STARTUP, || async {
            let response = http.get(&url).send().await.ok()?;
            response.status().is_success().then_some(())
        })
        .await;
    }
    wait_until("three idle agents", STARTUP, || async {
        let (_, body) = first.get("/api/v1/agents").await;
        let idle = body["agents"]
            .as_array()?
            .iter()
            .filter(|agent| agent["status"] == "idle")
            .count();
        (idle == 3).then_some(())
    })
    .await;
    let masters = wait_until("six active masters", STARTUP, || async {
        let (_, body) = second.get("/api/v1/masters").await;
        let masters = body["masters"].as_array()?.clone();
        let active = masters
            .iter()
            .filter(|master| master["state"] == "active")
            .count();
        (active == 6).then_some(masters)
    })
    .await;
    assert_eq!(masters.len(), 6, "{masters:?}");
    eprintln!("deployment ready after {:?}", started.elapsed());

    let build = first.force("demo", json!({})).await;
    // The other UI master serves the same build from its own view of the cluster.
    let done = second.wait_finished(&build, Duration::from_secs(60)).await;
    assert_eq!(done["result"], "success", "{done}");
    let steps: Vec<&Value> = done["steps"].as_array().expect("steps").iter().collect();
    assert_eq!(steps.len(), 2, "{done}");
    assert!(second.step_log(&build, 1).await.contains("tests passed"));
    eprintln!(
        "build {build} finished with success after {:?}",
        started.elapsed()
    );
}
