//! VCS change hooks over HTTP: real payloads with valid, invalid and missing signatures,
//! malformed and oversized bodies, and events that are not changes.

use std::time::Duration;

use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;
use yard_tests::cluster::{AgentSpec, Cluster};
use yard_tests::wait_until;

const CONFIG: &str = r#"
[hooks.github]
secret = "It's a Secret to Everybody"

[hooks.gitlab]
token = "gitlab-token"

[[builder]]
name = "hello"
[[builder.steps]]
name = "echo"
run = 'echo "building $YARD_REVISION of $YARD_PROJECT"'

[[scheduler]]
name = "master"
kind = "on-change"
branches = ["master", "main"]
builders = ["hello"]
"#;

fn fixture() -> Vec<u8> {
    std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/fixtures/github-push.json"
    ))
    .expect("the shared GitHub push fixture")
}

fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

async fn deliver(cluster: &Cluster, path: &str, headers: &[(&str, &str)], body: Vec<u8>) -> (u16, Value) {
    let client = reqwest::Client::new();
    let mut request = client.post(cluster.api.url(path)).body(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn github_pushes_are_verified_stored_and_built() {
    let cluster = Cluster::start(CONFIG, vec![AgentSpec::new("a1")]).await;
    let secret = "It's a Secret to Everybody";
    let body = fixture();
    let signature = sign(secret, &body);
    let headers = [
        ("x-github-event", "push"),
        ("x-hub-signature-256", signature.as_str()),
        ("x-github-delivery", "72d3162e-cc78-11e3-81ab-4c9367dc0958"),
    ];
    let (status, answer) = deliver(&cluster, "/hooks/github", &headers, body.clone()).await;
    assert_eq!(status, 202, "{answer}");
    let change = answer["id"].as_str().unwrap().to_owned();
    // GitHub redelivers (after a timeout, or by hand) with the same delivery id: the same
    // change, stored once.
    let (status, again) = deliver(&cluster, "/hooks/github", &headers, body.clone()).await;
    assert_eq!(
        (status, again["id"].as_str()),
        (202, Some(change.as_str())),
        "{again}"
    );
    let build = wait_until("the push's build", Duration::from_secs(30), || async {
        let (_, body) = cluster.api.get(&format!("/api/v1/builds?change={change}")).await;
        body["builds"].as_array()?.first().cloned()
    })
    .await;
    let id = build["id"].as_str().unwrap();
    let done = cluster.api.wait_finished(id, Duration::from_secs(30)).await;
    assert_eq!(done["result"], "success");
    assert!(cluster
        .api
        .step_log(id, 0)
        .await
        .contains("building 6113728f27ae82c7b1a177c8d03f9e96e0adf246 of Codertocat/Hello-World"));

    // Wrong and missing signatures are refused, and store nothing.
    let wrong = sign("not the secret", &body);
    let (status, _) = deliver(
        &cluster,
        "/hooks/github",
        &[("x-github-event", "push"), ("x-hub-signature-256", &wrong)],
        body.clone(),
    )
    .await;
    assert_eq!(status, 401);
    let (status, answer) = deliver(
        &cluster,
        "/hooks/github",
        &[("x-github-event", "push")],
        body.clone(),
    )
    .await;
    assert_eq!(status, 401);
    assert!(answer["error"].as_str().unwrap().contains("X-Hub-Signature-256"));
    let (_, changes) = cluster.api.get("/api/v1/changes").await;
    assert_eq!(changes["changes"].as_array().unwrap().len(), 1);

    // Malformed JSON with a valid signature: 400 with a message.
    let garbage = b"{\"ref\": 42".to_vec();
    let signature = sign(secret, &garbage);
    let (status, answer) = deliver(
        &cluster,
        "/hooks/github",
        &[("x-github-event", "push"), ("x-hub-signature-256", &signature)],
        garbage,
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        answer["error"].as_str().unwrap().contains("malformed"),
        "{answer}"
    );

    // A ping and a tag push are answered and ignored.
    let ping = b"{\"zen\":\"Keep it logically awesome.\"}".to_vec();
    let signature = sign(secret, &ping);
    let (status, answer) = deliver(
        &cluster,
        "/hooks/github",
        &[("x-github-event", "ping"), ("x-hub-signature-256", &signature)],
        ping,
    )
    .await;
    assert_eq!((status, answer["ignored"].as_str()), (200, Some("pong")));
    let tag = String::from_utf8(body.clone())
        .unwrap()
        .replace("refs/heads/master", "refs/tags/v1.0");
    let signature = sign(secret, tag.as_bytes());
    let (status, answer) = deliver(
        &cluster,
        "/hooks/github",
        &[("x-github-event", "push"), ("x-hub-signature-256", &signature)],
        tag.into_bytes(),
    )
    .await;
    assert_eq!(status, 200);
    assert!(answer["ignored"].as_str().unwrap().contains("not a branch"));

    // Over the size limit: 413, never a 500.
    let huge = vec![b' '; 2 * 1024 * 1024];
    let (status, _) = deliver(&cluster, "/hooks/github", &[("x-github-event", "push")], huge).await;
    assert_eq!(status, 413);
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gitlab_tokens_are_checked_and_unconfigured_hooks_refused() {
    let cluster = Cluster::start(CONFIG, vec![AgentSpec::new("a1")]).await;
    let push = br#"{"object_kind":"push","ref":"refs/heads/main","after":"da1560886d4f094c3e6c9ef40349f7d38b5d27d7","checkout_sha":"da1560886d4f094c3e6c9ef40349f7d38b5d27d7","user_name":"John Smith","project":{"path_with_namespace":"mike/diaspora","git_http_url":"http://example.com/mike/diaspora.git"},"commits":[]}"#.to_vec();
    let (status, _) = deliver(
        &cluster,
        "/hooks/gitlab",
        &[("x-gitlab-event", "Push Hook"), ("x-gitlab-token", "wrong")],
        push.clone(),
    )
    .await;
    assert_eq!(status, 401);
    let (status, answer) = deliver(
        &cluster,
        "/hooks/gitlab",
        &[
            ("x-gitlab-event", "Push Hook"),
            ("x-gitlab-token", "gitlab-token"),
        ],
        push,
    )
    .await;
    assert_eq!(status, 202, "{answer}");
    let change = answer["id"].as_str().unwrap().to_owned();
    let build = wait_until("the GitLab push's build", Duration::from_secs(30), || async {
        let (_, body) = cluster.api.get(&format!("/api/v1/builds?change={change}")).await;
        body["builds"].as_array()?.first().cloned()
    })
    .await;
    let done = cluster
        .api
        .wait_finished(build["id"].as_str().unwrap(), Duration::from_secs(30))
        .await;
    assert_eq!(done["result"], "success");
    assert_eq!(done["changes"][0]["project"], "mike/diaspora");
    let (status, answer) = deliver(
        &cluster,
        "/hooks/gitea",
        &[("x-gitea-event", "push")],
        b"{}".to_vec(),
    )
    .await;
    assert_eq!(status, 404, "{answer}");
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_post_receive_script_posts_pushed_branches() {
    let cluster = Cluster::start(CONFIG, vec![AgentSpec::new("a1")]).await;
    let dir = cluster.path();
    let git = |args: &[&str], cwd: &std::path::Path| {
        let output = std::process::Command::new("git")
            .args(args)
            .current_dir(cwd)
            .env("YARD_URL", cluster.api.url(""))
            .env("GIT_AUTHOR_NAME", "Ada")
            .env("GIT_AUTHOR_EMAIL", "ada@example.com")
            .env("GIT_COMMITTER_NAME", "Ada")
            .env("GIT_COMMITTER_EMAIL", "ada@example.com")
            .output()
            .expect("git runs");
        assert!(
            output.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    git(&["init", "-q", "--bare", "repo.git"], &dir);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../contrib/post-receive");
    std::fs::copy(script, dir.join("repo.git/hooks/post-receive")).unwrap();
    git(&["init", "-q", "work"], &dir);
    let work = dir.join("work");
    std::fs::write(work.join("README"), "hello").unwrap();
    git(&["add", "README"], &work);
    git(&["commit", "-q", "-m", "a \"quoted\" message"], &work);
    let pushed = git(&["push", "-q", "../repo.git", "HEAD:main"], &work);
    assert!(pushed.contains("change for main"), "{pushed}");
    let (_, changes) = cluster.api.get("/api/v1/changes").await;
    let change = &changes["changes"][0];
    assert_eq!(change["branch"], "main");
    assert_eq!(change["comments"], "a \"quoted\" message");
    assert_eq!(change["files"], serde_json::json!(["README"]));
    let id = change["id"].as_str().unwrap().to_owned();
    let build = wait_until("the pushed branch's build", Duration::from_secs(30), || async {
        let (_, body) = cluster.api.get(&format!("/api/v1/builds?change={id}")).await;
        body["builds"].as_array()?.first().cloned()
    })
    .await;
    let done = cluster
        .api
        .wait_finished(build["id"].as_str().unwrap(), Duration::from_secs(30))
        .await;
    assert_eq!(done["result"], "success");
    cluster.stop().await;
}
