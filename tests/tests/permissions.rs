//! NATS permissions per role, for real: a nats-server started with the configuration `yard
//! nats-config` generates runs the whole system (each role as its own user) without one
//! permissions violation, and refuses what a role must not do.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;
use tokio::sync::mpsc;
use yard_tests::deployment::Deployment;
use yard_tests::process::yard_binary;
use yard_tests::{wait_until, NatsServer};

const DEADLINE: Duration = Duration::from_secs(60);

const CONFIG: &str = r#"
[http]
snapshot_interval = "1s"

# The engine's reconcile pass (which lists the cancels bucket) runs under its permissions too.
[masters]
reconcile_interval = "1s"

[[pool]]
role = "testers"
servers = ["s1"]

[[builder]]
name = "two-steps"
agents = 'os == "linux"'
[[builder.steps]]
name = "compile"
run = 'echo "compiling $YARD_REVISION"'
[[builder.steps]]
name = "test"
run = 'echo "tests passed"'

[[builder]]
name = "tooled"
toolkits = ["tool@1"]
[[builder.steps]]
name = "run-the-tool"
run = "tool"

[[builder]]
name = "pooled"
[[builder.steps]]
name = "take"
acquire = { role = "testers", as = "SERVER" }
[[builder.steps]]
name = "use"
run = 'echo "testing on $SERVER"'
[[builder.steps]]
name = "give-back"
release = { role = "testers", server = "${SERVER}" }

[[builder]]
name = "cancellable"
[[builder.steps]]
name = "sleep"
run = "sleep 300"

[[scheduler]]
name = "main"
kind = "on-change"
branches = ["main"]
builders = ["two-steps"]

[[scheduler]]
name = "force"
kind = "force"
builders = ["two-steps", "tooled", "pooled", "cancellable"]
"#;

/// What `yard nats-config --agents a1,a2` generated for a nats-server started with it: the
/// passwords (by user), the server's URL and its log.
struct Secured {
    _dir: tempfile::TempDir,
    passwords: BTreeMap<String, String>,
    url: String,
    log: PathBuf,
}

/// Runs `yard nats-config ARGS` and returns what it printed.
fn nats_config(args: &[&str]) -> String {
    let output = std::process::Command::new(yard_binary())
        .arg("nats-config")
        .args(args)
        .env("YARD_LOG", "warn")
        .output()
        .expect("yard nats-config runs");
    assert!(
        output.status.success(),
        "yard nats-config failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("text")
}

/// Generates a configuration (with `extra` arguments) and starts a nats-server with it.
fn secured(extra: &[&str]) -> (Secured, NatsServer) {
    let dir = tempfile::tempdir().expect("temp dir");
    let conf = dir.path().join("nats.conf");
    let passwords = dir.path().join("passwords.toml");
    let listen = format!("127.0.0.1:{}", yard_tests::free_port());
    let store = dir.path().join("store");
    let mut args = vec![
        "--agents",
        "a1,a2",
        "--password-file",
        passwords.to_str().unwrap(),
        "--out",
        conf.to_str().unwrap(),
        "--listen",
        &listen,
        "--store-dir",
        store.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let credentials = nats_config(&args);
    if let Some(position) = extra.iter().position(|arg| *arg == "--tls-ca") {
        let ca = extra[position + 1];
        assert!(
            credentials.contains(&format!("YARD_NATS__TLS_CA={ca}\n")),
            "{credentials}"
        );
        let conf = std::fs::read_to_string(&conf).expect("config");
        assert!(conf.contains(&format!("ca_file: \"{ca}\"")), "{conf}");
    }
    let passwords = services::permissions::read_passwords(&passwords).expect("password file");
    assert_eq!(
        passwords.len(),
        6,
        "admin, scheduler, engine, ui, agent-a1, agent-a2"
    );
    for (user, password) in &passwords {
        assert!(
            credentials.contains(&format!("YARD_NATS__USER={user}\n")),
            "{credentials}"
        );
        assert!(credentials.contains(&format!("YARD_NATS__PASSWORD={password}\n")));
    }
    // Generating again keeps the passwords of the password file.
    assert_eq!(nats_config(&args), credentials);
    let binary = NatsServer::locate_binary().expect("nats-server (scripts/test installs it)");
    let server =
        NatsServer::start_with_config(&binary, &dir.path().join("nats"), &conf).expect("nats-server starts");
    let secured = Secured {
        passwords,
        url: server.url().to_owned(),
        log: server.log_file(),
        _dir: dir,
    };
    (secured, server)
}

impl Secured {
    fn password(&self, user: &str) -> &str {
        self.passwords.get(user).map(String::as_str).expect("known user")
    }

    /// The environment of a yard process connecting as `user`.
    fn env(&self, user: &str) -> [(&'static str, String); 2] {
        [
            ("YARD_NATS__USER", user.to_owned()),
            ("YARD_NATS__PASSWORD", self.password(user).to_owned()),
        ]
    }

    /// Every permissions violation the server logged.
    fn violations(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|line| line.contains("Violation"))
            .map(str::to_owned)
            .collect()
    }

    /// A client connected as `user` whose server errors arrive on the returned channel.
    async fn client(&self, user: &str) -> (async_nats::Client, mpsc::UnboundedReceiver<String>) {
        let (errors, received) = mpsc::unbounded_channel();
        let client = async_nats::ConnectOptions::with_user_and_password(
            user.to_owned(),
            self.password(user).to_owned(),
        )
        .custom_inbox_prefix(bus_schema::subjects::inbox_prefix(user))
        .event_callback(move |event| {
            let errors = errors.clone();
            async move {
                if let async_nats::Event::ServerError(error) = event {
                    let _ = errors.send(error.to_string());
                }
            }
        })
        .connect(&self.url)
        .await
        .expect("connects");
        (client, received)
    }
}

fn set_env(deployment: &mut Deployment, process: &str, env: &[(&'static str, String)]) {
    let env: Vec<(&str, &str)> = env.iter().map(|(key, value)| (*key, value.as_str())).collect();
    deployment.set_env(process, &env);
}

/// Waits for the server to report a permissions violation for `operation` (`Publish` or
/// `Subscription`) on `subject`, as the client's event callback sees it.
async fn expect_violation(errors: &mut mpsc::UnboundedReceiver<String>, operation: &str, subject: &str) {
    let expected = format!("Permissions Violation for {operation} to \"{subject}\"");
    let seen = tokio::time::timeout(Duration::from_secs(10), async {
        let mut seen = Vec::new();
        while let Some(error) = errors.recv().await {
            if error.contains(&expected) {
                return Ok(());
            }
            seen.push(error);
        }
        Err(seen)
    })
    .await;
    match seen {
        Ok(Ok(())) => {}
        Ok(Err(seen)) => panic!("connection closed before {expected:?}; other errors: {seen:?}"),
        Err(_) => panic!("no {expected:?} within 10 s"),
    }
}

/// Waits until the UI master has written a view snapshot holding events after `sequence`;
/// returns the sequence it holds.
async fn snapshot_sequence_above(api: &yard_tests::api::Api, sequence: u64) -> u64 {
    wait_until("a view snapshot", DEADLINE, || async {
        let (_, text) = api.get_text("/metrics").await;
        let written: u64 = text
            .lines()
            .find_map(|line| line.strip_prefix("yard_ui_view_snapshot_sequence "))?
            .trim()
            .parse()
            .ok()?;
        (written > sequence).then_some(written)
    })
    .await
}

/// A toolkit directory whose `bin/tool` prints `tool 1`.
fn toolkit_dir(parent: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = parent.join("tool-1");
    std::fs::create_dir_all(dir.join("bin")).expect("toolkit dir");
    let script = dir.join("bin").join("tool");
    std::fs::write(&script, "#!/bin/sh\necho \"tool 1\"\n").expect("script");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("executable");
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_role_runs_as_its_own_user_without_a_permissions_violation() {
    yard_tests::init_logging();
    let (secured, server) = secured(&[]);
    let dir = tempfile::tempdir().expect("temp dir");
    let mut deployment = Deployment::on_server(dir, server, CONFIG);
    set_env(&mut deployment, "sched-1", &secured.env("scheduler"));
    set_env(&mut deployment, "engine-1", &secured.env("engine"));
    set_env(&mut deployment, "ui-1", &secured.env("ui"));
    set_env(&mut deployment, "a1", &secured.env("agent-a1"));
    // The masters provision the bus; agents may not create streams or buckets. An agent
    // started first waits for them without trying to (the check at the end finds no
    // refused STREAM.CREATE).
    deployment.agent("a1", "os=linux");
    wait_until("the agent waiting for the masters", DEADLINE, || async {
        deployment
            .log_text("a1")
            .contains("the first master creates it")
            .then_some(())
    })
    .await;
    let api = deployment.start_masters_and_agents(&["engine-1"], &[]).await;
    api.wait_agents(1).await;

    // A forced build (asked of the scheduler by the UI master) runs on the agent.
    let forced = api.force("two-steps", json!({})).await;
    let build = api.wait_finished(&forced, DEADLINE).await;
    assert_eq!(build["result"], "success", "{build}");
    assert_eq!(build["steps"][0]["agent"], "a1");
    assert!(api.step_log(&forced, 1).await.contains("tests passed"));
    // Forced again with one idempotency key, the scheduler reads back the build stored first.
    let keyed: Vec<String> = futures::future::join_all((0..2).map(|_| async {
        let (status, body) = api
            .post_with_key("/api/v1/builders/two-steps/force", json!({}), "release-1")
            .await;
        assert_eq!(status, 202, "{body}");
        body["id"].as_str().unwrap().to_owned()
    }))
    .await;
    assert_eq!(keyed[0], keyed[1]);
    // The UI master writes view snapshots (every second) to its object store.
    let first_snapshot = snapshot_sequence_above(&api, 0).await;

    // A change: stored by the UI master, turned into a build by the scheduler. Posted again
    // with its idempotency key, the UI master reads back the change stored first.
    let change = json!({ "repository": "r", "branch": "main", "revision": "c0ffee", "author": "me" });
    let (status, first) = api
        .post_with_key("/api/v1/changes", change.clone(), "c0ffee")
        .await;
    assert_eq!(status, 202, "{first}");
    let change_id = first["id"].as_str().expect("change id").to_owned();
    let (status, again) = api.post_with_key("/api/v1/changes", change, "c0ffee").await;
    assert_eq!(
        (status, again["id"].as_str()),
        (202, Some(change_id.as_str())),
        "{again}"
    );
    let from_change = wait_until("the change's build", DEADLINE, || async {
        let (_, body) = api.get(&format!("/api/v1/builds?change={change_id}")).await;
        body["builds"][0]["id"].as_str().map(str::to_owned)
    })
    .await;
    let build = api.wait_finished(&from_change, DEADLINE).await;
    assert_eq!(build["result"], "success", "{build}");

    // A toolkit pushed by the admin user and fetched by the agent.
    let push = std::process::Command::new(yard_binary())
        .args(["toolkit", "push"])
        .arg(toolkit_dir(deployment.dir.path()))
        .args(["--name", "tool", "--version", "1", "--nats", &secured.url])
        .envs(secured.env("admin"))
        .env("YARD_LOG", "warn")
        .output()
        .expect("yard toolkit push runs");
    assert!(push.status.success(), "{}", String::from_utf8_lossy(&push.stderr));
    let (status, toolkits) = api.get("/api/v1/toolkits").await;
    assert_eq!(status, 200, "{toolkits}");
    assert_eq!(toolkits["toolkits"][0]["name"], "tool");
    let tooled = api.force("tooled", json!({})).await;
    let build = api.wait_finished(&tooled, DEADLINE).await;
    assert_eq!(build["result"], "success", "{build}");
    assert!(api.step_log(&tooled, 0).await.contains("tool 1"));

    // Pools: the UI master defines one, an engine acquires and releases its server.
    let (status, body) = api
        .put_json("/api/v1/pools/testers", json!({ "servers": ["s1", "s2"] }))
        .await;
    assert_eq!(status, 200, "{body}");
    let pooled = api.force("pooled", json!({})).await;
    let build = api.wait_finished(&pooled, DEADLINE).await;
    assert_eq!(build["result"], "success", "{build}");

    // A cancel: stored by the UI master, carried out by the engine and the agent.
    let cancellable = api.force("cancellable", json!({})).await;
    api.wait_build(&cancellable, DEADLINE, |b| b["steps"][0]["state"] == "running")
        .await;
    let (status, body) = api
        .post(&format!("/api/v1/builds/{cancellable}/cancel"), json!({}))
        .await;
    assert_eq!(status, 202, "{body}");
    let build = api.wait_finished(&cancellable, DEADLINE).await;
    assert_eq!(build["result"], "cancelled", "{build}");

    // A later snapshot replaced the first (the object store purges the old one's chunks).
    snapshot_sequence_above(&api, first_snapshot).await;

    // A drain request from the UI master stops the engine cleanly.
    let (status, body) = api.post("/api/v1/masters/engine-1/drain", json!({})).await;
    assert_eq!(status, 202, "{body}");
    let status = deployment.process("engine-1").wait();
    assert!(status.success(), "{}", deployment.log_text("engine-1"));

    let violations = secured.violations();
    assert!(violations.is_empty(), "permissions violations: {violations:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn what_a_role_must_not_do_is_refused() {
    yard_tests::init_logging();
    let (secured, _server) = secured(&[]);
    // The bus, provisioned and read as the admin user, who may do anything.
    let nats = services::config::NatsConfig {
        url: secured.url.clone(),
        user: Some("admin".into()),
        password: Some(services::config::Secret(secured.password("admin").to_owned())),
        ..Default::default()
    };
    let bus = services::Bus::connect(&nats, &Default::default(), "test-admin")
        .await
        .expect("the admin connects and provisions");

    let (agent, mut agent_errors) = secured.client("agent-a1").await;
    let (engine, mut engine_errors) = secured.client("engine").await;
    let agent_js = async_nats::jetstream::new(agent.clone());

    // Its own work subject reaches the agent; its own record it may write. A flush does not
    // wait for the server to register the subscription, so the engine says it until heard.
    let mut own = agent.subscribe("yard.agent.a1.cmd").await.expect("subscribe");
    agent.flush().await.expect("flush");
    let heard = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            engine
                .publish("yard.agent.a1.cmd", "ping".into())
                .await
                .expect("publish");
            engine.flush().await.expect("flush");
            let next = futures::StreamExt::next(&mut own);
            if let Ok(received) = tokio::time::timeout(Duration::from_millis(200), next).await {
                break received.expect("a message");
            }
        }
    })
    .await;
    let received = heard.unwrap_or_else(|_| {
        let errors: Vec<String> = std::iter::from_fn(|| engine_errors.try_recv().ok())
            .chain(std::iter::from_fn(|| agent_errors.try_recv().ok()))
            .collect();
        panic!("the agent did not hear its own work subject; server errors: {errors:?}")
    });
    assert_eq!(received.payload.as_ref(), b"ping");
    agent_js
        .publish("$KV.yard-agents.a1", "record".into())
        .await
        .expect("publish")
        .await
        .expect("its own record is stored");

    // Another agent's work subject, build requests, another agent's record, stream deletion.
    let _other = agent.subscribe("yard.agent.a2.cmd").await.expect("subscribe");
    expect_violation(&mut agent_errors, "Subscription", "yard.agent.a2.cmd").await;
    agent
        .publish("yard.request.two-steps", "request".into())
        .await
        .expect("publish");
    expect_violation(&mut agent_errors, "Publish", "yard.request.two-steps").await;
    agent
        .publish("$KV.yard-agents.a2", "forged".into())
        .await
        .expect("publish");
    expect_violation(&mut agent_errors, "Publish", "$KV.yard-agents.a2").await;
    agent
        .publish("$JS.API.STREAM.DELETE.YARD_EVENTS", "".into())
        .await
        .expect("publish");
    expect_violation(&mut agent_errors, "Publish", "$JS.API.STREAM.DELETE.YARD_EVENTS").await;
    let _eavesdrop = agent.subscribe("_INBOX.engine.>").await.expect("subscribe");
    expect_violation(&mut agent_errors, "Subscription", "_INBOX.engine.>").await;
    // Nothing of it reached the bus: a2's record was never written.
    assert!(bus.agents.get("a2").await.expect("read").is_none());
    assert!(bus.agents.get("a1").await.expect("read").is_some());

    // A UI master sends no scheduling commands.
    let (ui, mut ui_errors) = secured.client("ui").await;
    ui.publish("yard.request.two-steps", "request".into())
        .await
        .expect("publish");
    expect_violation(&mut ui_errors, "Publish", "yard.request.two-steps").await;
    ui.publish("yard.agent.a1.cmd", "command".into())
        .await
        .expect("publish");
    expect_violation(&mut ui_errors, "Publish", "yard.agent.a1.cmd").await;
    let requests = bus
        .stream(bus_schema::subjects::REQUESTS_STREAM)
        .await
        .expect("stream")
        .info()
        .await
        .expect("info")
        .state
        .messages;
    assert_eq!(requests, 0, "no build request was stored");
    bus.close().await;
    // The server logs what it refused (which is how the first test knows nothing was).
    let violations = secured.violations();
    for (user, subject) in [
        ("agent-a1", "yard.request.two-steps"),
        ("ui", "yard.agent.a1.cmd"),
    ] {
        assert!(
            violations
                .iter()
                .any(|line| line.contains(&format!("user:{user}\"")) && line.contains(subject)),
            "{user} {subject} in {violations:#?}"
        );
    }
}

/// Makes a CA and a certificate for 127.0.0.1 it signed, with the `openssl` tool; `None`
/// where that tool is missing.
fn certificates(dir: &Path) -> Option<(PathBuf, PathBuf, PathBuf)> {
    let openssl = |args: &[&str]| {
        std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
    };
    if openssl(&["version"]).is_err() {
        return None;
    }
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1,DNS:localhost\n").expect("ext");
    for args in [
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca.pem",
            "-days",
            "1",
            "-subj",
            "/CN=yard-test-ca",
        ][..],
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server-key.pem",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "1",
            "-extfile",
            "san.ext",
        ],
    ] {
        let output = openssl(args).expect("openssl runs");
        assert!(
            output.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Some((
        dir.join("server.pem"),
        dir.join("server-key.pem"),
        dir.join("ca.pem"),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_settings_reach_the_server_and_the_clients() {
    yard_tests::init_logging();
    let certs = tempfile::tempdir().expect("temp dir");
    let Some((cert, key, ca)) = certificates(certs.path()) else {
        eprintln!("skipped: no openssl tool to make certificates with");
        return;
    };
    let (cert, key, ca) = (
        cert.to_str().unwrap(),
        key.to_str().unwrap(),
        ca.to_str().unwrap(),
    );
    let (secured, _server) = secured(&["--tls-cert", cert, "--tls-key", key, "--tls-ca", ca]);
    // A client that trusts the CA connects over TLS, as any yard process with `tls_ca` does.
    let nats = services::config::NatsConfig {
        url: secured.url.clone(),
        user: Some("admin".into()),
        password: Some(services::config::Secret(secured.password("admin").to_owned())),
        tls_ca: Some(ca.into()),
        ..Default::default()
    };
    let bus = services::Bus::connect(&nats, &Default::default(), "test-tls")
        .await
        .expect("connects over TLS");
    assert!(bus.client.server_info().tls_required);
    bus.close().await;
    // One that does not trust it is refused.
    let untrusting = async_nats::ConnectOptions::with_user_and_password(
        "admin".into(),
        secured.password("admin").to_owned(),
    )
    .connect(&secured.url)
    .await;
    assert!(untrusting.is_err(), "a client without the CA connected");
}
