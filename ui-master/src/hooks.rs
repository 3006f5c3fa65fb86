//! VCS change hooks: GitHub, GitLab and Gitea payloads, as the providers send them, become
//! changes on the bus. A hook is answered 2xx only after JetStream stored its change; one
//! that carries no change (a branch deletion, a tag, an event of another kind) is answered
//! 2xx with the reason it was ignored.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use axum::{Json, Router};
use bus_schema::Change;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::json;
use services::time::now;
use sha2::Sha256;

use crate::error::ApiError;
use crate::AppState;

pub(crate) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/hooks/github", post(github))
        .route("/hooks/gitlab", post(gitlab))
        .route("/hooks/gitea", post(gitea))
}

/// What a hook payload means.
#[derive(Debug, PartialEq)]
pub enum HookOutcome {
    Change(Box<Change>),
    /// Not a change; answered 2xx with this reason.
    Ignored(String),
}

/// True if `signature` (hex, optionally `sha256=`-prefixed) is the HMAC-SHA256 of `body` under
/// `secret`. Compared in constant time.
pub fn signature_matches(secret: &str, body: &[u8], signature: &str) -> bool {
    let hex_digest = signature.trim().trim_start_matches("sha256=");
    let Ok(expected) = hex::decode(hex_digest) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        return false;
    };
    mac.update(body);
    mac.verify_slice(&expected).is_ok()
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

/// The longest delivery key (`Idempotency-Key`, a webhook's delivery id) accepted.
const MAX_DELIVERY_KEY: usize = 200;

/// The key a submission names itself by, from header `name`, scoped to `source` so that keys
/// of different senders never meet: a second submission with the same key is the same change
/// (see `Bus::store_change`). `None` without the header; an error naming the header when its
/// value is not 1 to 200 printable ASCII characters without spaces.
pub(crate) fn delivery_key(
    headers: &HeaderMap,
    name: &str,
    source: &str,
) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(name) else {
        return Ok(None);
    };
    let key = value.as_bytes();
    if key.is_empty() || key.len() > MAX_DELIVERY_KEY || !key.iter().all(u8::is_ascii_graphic) {
        return Err(ApiError::BadRequest(format!(
            "{name} must be 1 to {MAX_DELIVERY_KEY} printable ASCII characters without spaces"
        )));
    }
    Ok(Some(format!("{source}:{}", String::from_utf8_lossy(key))))
}

fn malformed(error: serde_json::Error) -> ApiError {
    ApiError::BadRequest(format!("malformed hook payload: {error}"))
}

fn change(source: &str) -> Change {
    Change {
        id: ulid::Ulid::new().to_string(),
        repository: String::new(),
        branch: String::new(),
        revision: String::new(),
        author: String::new(),
        comments: String::new(),
        files: Vec::new(),
        project: String::new(),
        source: source.to_owned(),
        received_at: now(),
    }
}

#[derive(Deserialize)]
struct Repository {
    #[serde(default)]
    full_name: String,
    #[serde(default)]
    clone_url: String,
}

#[derive(Deserialize, Default)]
struct Person {
    #[serde(default)]
    name: String,
    #[serde(default)]
    email: String,
    #[serde(default)]
    username: String,
}

#[derive(Deserialize)]
struct Commit {
    #[serde(default)]
    id: String,
    #[serde(default)]
    message: String,
    #[serde(default)]
    author: Person,
    #[serde(default)]
    added: Vec<String>,
    #[serde(default)]
    removed: Vec<String>,
    #[serde(default)]
    modified: Vec<String>,
}

/// A push as GitHub and Gitea send it.
#[derive(Deserialize)]
struct Push {
    #[serde(rename = "ref")]
    reference: String,
    #[serde(default)]
    after: String,
    #[serde(default)]
    deleted: bool,
    repository: Repository,
    #[serde(default)]
    commits: Vec<Commit>,
    #[serde(default)]
    head_commit: Option<Commit>,
}

/// Turns a GitHub or Gitea push into a change.
fn push_change(source: &str, push: Push) -> HookOutcome {
    let Some(branch) = push.reference.strip_prefix("refs/heads/") else {
        return HookOutcome::Ignored(format!("{} is not a branch", push.reference));
    };
    if push.deleted || push.after.chars().all(|c| c == '0') {
        return HookOutcome::Ignored(format!("branch {branch} was deleted"));
    }
    let head = push.head_commit.or_else(|| push.commits.into_iter().last());
    let mut change = change(source);
    change.branch = branch.to_owned();
    change.revision = push.after;
    change.repository = push.repository.clone_url;
    change.project = push.repository.full_name;
    if let Some(head) = head {
        change.comments = head.message;
        change.author = format_author(&head.author);
        change.files = [head.added, head.removed, head.modified].concat();
        if change.revision.is_empty() {
            change.revision = head.id;
        }
    }
    HookOutcome::Change(Box::new(change))
}

fn format_author(person: &Person) -> String {
    let name = if person.name.is_empty() {
        &person.username
    } else {
        &person.name
    };
    if person.email.is_empty() {
        name.clone()
    } else {
        format!("{name} <{}>", person.email)
    }
}

#[derive(Deserialize)]
struct PullRequestEvent {
    action: String,
    pull_request: PullRequest,
}

#[derive(Deserialize)]
struct PullRequest {
    #[serde(default)]
    title: String,
    head: PullRequestHead,
    #[serde(default)]
    user: Option<GithubUser>,
}

#[derive(Deserialize)]
struct PullRequestHead {
    #[serde(rename = "ref")]
    reference: String,
    sha: String,
    repo: Option<Repository>,
}

#[derive(Deserialize)]
struct GithubUser {
    login: String,
}

/// What a GitHub hook delivery means, by its `X-GitHub-Event`.
pub fn github_outcome(event: &str, body: &[u8]) -> Result<HookOutcome, ApiError> {
    match event {
        "ping" => Ok(HookOutcome::Ignored("pong".into())),
        "push" => Ok(push_change(
            "github",
            serde_json::from_slice(body).map_err(malformed)?,
        )),
        "pull_request" => {
            let event: PullRequestEvent = serde_json::from_slice(body).map_err(malformed)?;
            if !["opened", "synchronize", "reopened"].contains(&event.action.as_str()) {
                return Ok(HookOutcome::Ignored(format!(
                    "pull request action {:?} is not a change",
                    event.action
                )));
            }
            let request = event.pull_request;
            let mut change = change("github");
            change.branch = request.head.reference;
            change.revision = request.head.sha;
            change.comments = request.title;
            change.author = request.user.map(|user| user.login).unwrap_or_default();
            if let Some(repo) = request.head.repo {
                change.repository = repo.clone_url;
                change.project = repo.full_name;
            }
            Ok(HookOutcome::Change(Box::new(change)))
        }
        other => Ok(HookOutcome::Ignored(format!("event {other:?} is not supported"))),
    }
}

#[derive(Deserialize)]
struct GitlabProject {
    #[serde(default)]
    path_with_namespace: String,
    #[serde(default)]
    git_http_url: String,
}

#[derive(Deserialize)]
struct GitlabPush {
    #[serde(rename = "ref")]
    reference: String,
    #[serde(default)]
    after: String,
    #[serde(default)]
    checkout_sha: Option<String>,
    #[serde(default)]
    user_name: String,
    project: GitlabProject,
    #[serde(default)]
    commits: Vec<Commit>,
}

#[derive(Deserialize)]
struct GitlabMergeRequest {
    object_attributes: GitlabMergeAttributes,
    project: GitlabProject,
    #[serde(default)]
    user: Option<Person>,
}

#[derive(Deserialize)]
struct GitlabMergeAttributes {
    #[serde(default)]
    action: String,
    source_branch: String,
    #[serde(default)]
    title: String,
    last_commit: Option<GitlabCommitId>,
}

#[derive(Deserialize)]
struct GitlabCommitId {
    id: String,
}

/// What a GitLab hook delivery means, by its `X-Gitlab-Event`.
pub fn gitlab_outcome(event: &str, body: &[u8]) -> Result<HookOutcome, ApiError> {
    match event {
        "Push Hook" => {
            let push: GitlabPush = serde_json::from_slice(body).map_err(malformed)?;
            let Some(branch) = push.reference.strip_prefix("refs/heads/") else {
                return Ok(HookOutcome::Ignored(format!(
                    "{} is not a branch",
                    push.reference
                )));
            };
            let revision = push.checkout_sha.unwrap_or(push.after);
            if revision.is_empty() || revision.chars().all(|c| c == '0') {
                return Ok(HookOutcome::Ignored(format!("branch {branch} was deleted")));
            }
            let mut change = change("gitlab");
            change.branch = branch.to_owned();
            change.revision = revision;
            change.repository = push.project.git_http_url;
            change.project = push.project.path_with_namespace;
            change.author = push.user_name;
            if let Some(head) = push.commits.into_iter().last() {
                change.comments = head.message;
                change.files = [head.added, head.removed, head.modified].concat();
            }
            Ok(HookOutcome::Change(Box::new(change)))
        }
        "Merge Request Hook" => {
            let request: GitlabMergeRequest = serde_json::from_slice(body).map_err(malformed)?;
            let attributes = request.object_attributes;
            if !["open", "update", "reopen"].contains(&attributes.action.as_str()) {
                return Ok(HookOutcome::Ignored(format!(
                    "merge request action {:?} is not a change",
                    attributes.action
                )));
            }
            let mut change = change("gitlab");
            change.branch = attributes.source_branch;
            change.revision = attributes.last_commit.map(|commit| commit.id).unwrap_or_default();
            change.comments = attributes.title;
            change.repository = request.project.git_http_url;
            change.project = request.project.path_with_namespace;
            change.author = request.user.map(|user| format_author(&user)).unwrap_or_default();
            Ok(HookOutcome::Change(Box::new(change)))
        }
        other => Ok(HookOutcome::Ignored(format!("event {other:?} is not supported"))),
    }
}

/// What a Gitea hook delivery means, by its `X-Gitea-Event`.
pub fn gitea_outcome(event: &str, body: &[u8]) -> Result<HookOutcome, ApiError> {
    match event {
        "push" => Ok(push_change(
            "gitea",
            serde_json::from_slice(body).map_err(malformed)?,
        )),
        other => Ok(HookOutcome::Ignored(format!("event {other:?} is not supported"))),
    }
}

/// Stores the change a hook carried, or says why there was none. `delivery` is the provider's
/// id of this delivery: a redelivery of it stores nothing and answers the first change's id.
async fn answer(
    state: &AppState,
    outcome: HookOutcome,
    delivery: Option<String>,
) -> Result<impl IntoResponse, ApiError> {
    match outcome {
        HookOutcome::Change(change) => {
            let id = state.bus.store_change(&change, delivery.as_deref()).await?;
            Ok((StatusCode::ACCEPTED, Json(json!({ "id": id }))))
        }
        HookOutcome::Ignored(reason) => Ok((StatusCode::OK, Json(json!({ "ignored": reason })))),
    }
}

fn unauthorized(message: &str) -> ApiError {
    ApiError::Unauthorized(message.to_owned())
}

async fn github(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let Some(config) = &state.config.hooks.github else {
        return Err(ApiError::NotFound(
            "GitHub hooks are not configured ([hooks.github] secret)".into(),
        ));
    };
    let signature =
        header(&headers, "x-hub-signature-256").ok_or_else(|| unauthorized("missing X-Hub-Signature-256"))?;
    if !signature_matches(&config.secret, &body, signature) {
        return Err(unauthorized("X-Hub-Signature-256 does not match the body"));
    }
    let event = header(&headers, "x-github-event").unwrap_or_default();
    let delivery = delivery_key(&headers, "X-GitHub-Delivery", "github")?;
    answer(&state, github_outcome(event, &body)?, delivery).await
}

async fn gitea(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let Some(config) = &state.config.hooks.gitea else {
        return Err(ApiError::NotFound(
            "Gitea hooks are not configured ([hooks.gitea] secret)".into(),
        ));
    };
    let signature =
        header(&headers, "x-gitea-signature").ok_or_else(|| unauthorized("missing X-Gitea-Signature"))?;
    if !signature_matches(&config.secret, &body, signature) {
        return Err(unauthorized("X-Gitea-Signature does not match the body"));
    }
    let event = header(&headers, "x-gitea-event").unwrap_or_default();
    let delivery = delivery_key(&headers, "X-Gitea-Delivery", "gitea")?;
    answer(&state, gitea_outcome(event, &body)?, delivery).await
}

async fn gitlab(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let Some(config) = &state.config.hooks.gitlab else {
        return Err(ApiError::NotFound(
            "GitLab hooks are not configured ([hooks.gitlab] token)".into(),
        ));
    };
    let token = header(&headers, "x-gitlab-token").ok_or_else(|| unauthorized("missing X-Gitlab-Token"))?;
    let equal = token.len() == config.token.len()
        && token
            .bytes()
            .zip(config.token.bytes())
            .fold(0u8, |difference, (a, b)| difference | (a ^ b))
            == 0;
    if !equal {
        return Err(unauthorized("X-Gitlab-Token is wrong"));
    }
    let event = header(&headers, "x-gitlab-event").unwrap_or_default();
    let delivery = delivery_key(&headers, "X-Gitlab-Event-UUID", "gitlab")?;
    answer(&state, gitlab_outcome(event, &body)?, delivery).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_keys_are_scoped_to_their_source_and_checked() {
        let mut headers = HeaderMap::new();
        assert_eq!(
            delivery_key(&headers, "X-GitHub-Delivery", "github").unwrap(),
            None
        );
        headers.insert("x-github-delivery", "72d3162e-cc78".parse().unwrap());
        assert_eq!(
            delivery_key(&headers, "X-GitHub-Delivery", "github").unwrap(),
            Some("github:72d3162e-cc78".into())
        );
        for bad in ["two words", "", &"k".repeat(MAX_DELIVERY_KEY + 1)] {
            headers.insert("idempotency-key", bad.parse().unwrap());
            let error = delivery_key(&headers, "Idempotency-Key", "api").unwrap_err();
            assert!(error.to_string().contains("Idempotency-Key"), "{error}");
        }
        headers.insert("idempotency-key", "k".repeat(MAX_DELIVERY_KEY).parse().unwrap());
        assert!(delivery_key(&headers, "Idempotency-Key", "api")
            .unwrap()
            .is_some());
    }

    fn fixture() -> Vec<u8> {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/fixtures/github-push.json"
        );
        std::fs::read(path).expect("the shared GitHub push fixture")
    }

    #[test]
    fn github_push_fixture_becomes_a_change() {
        let HookOutcome::Change(change) = github_outcome("push", &fixture()).unwrap() else {
            panic!("a push is a change");
        };
        assert_eq!(change.branch, "master");
        assert_eq!(change.revision, "6113728f27ae82c7b1a177c8d03f9e96e0adf246");
        assert_eq!(change.repository, "https://github.com/Codertocat/Hello-World.git");
        assert_eq!(change.project, "Codertocat/Hello-World");
        assert_eq!(change.source, "github");
    }

    #[test]
    fn gitea_pushes_are_changes_and_other_events_are_ignored() {
        let HookOutcome::Change(change) = gitea_outcome("push", &fixture()).unwrap() else {
            panic!("a push is a change");
        };
        assert_eq!(
            (change.branch.as_str(), change.source.as_str()),
            ("master", "gitea")
        );
        assert!(matches!(
            gitea_outcome("issues", b"{}").unwrap(),
            HookOutcome::Ignored(_)
        ));
        assert!(gitea_outcome("push", b"{not json").is_err());
    }

    #[test]
    fn signatures_are_checked() {
        let body = b"{\"zen\":\"x\"}";
        let mut mac = Hmac::<Sha256>::new_from_slice(b"s3cret").unwrap();
        mac.update(body);
        let good = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        assert!(signature_matches("s3cret", body, &good));
        assert!(!signature_matches("other", body, &good));
        assert!(!signature_matches("s3cret", b"{}", &good));
        assert!(!signature_matches("s3cret", body, "sha256=zz"));
        assert!(!signature_matches("s3cret", body, ""));
    }

    #[test]
    fn not_changes_are_ignored_with_a_reason() {
        let deletion = br#"{"ref":"refs/heads/gone","after":"0000000000000000000000000000000000000000","deleted":true,"repository":{"full_name":"a/b","clone_url":"u"}}"#;
        assert!(
            matches!(github_outcome("push", deletion).unwrap(), HookOutcome::Ignored(reason) if reason.contains("deleted"))
        );
        let tag = br#"{"ref":"refs/tags/v1","after":"abc","repository":{"full_name":"a/b","clone_url":"u"}}"#;
        assert!(matches!(
            github_outcome("push", tag).unwrap(),
            HookOutcome::Ignored(_)
        ));
        assert!(
            matches!(github_outcome("ping", b"{}").unwrap(), HookOutcome::Ignored(reason) if reason == "pong")
        );
        assert!(matches!(
            github_outcome("issues", b"{}").unwrap(),
            HookOutcome::Ignored(_)
        ));
        assert!(github_outcome("push", b"{not json").is_err());
        assert!(github_outcome("push", b"{}").is_err());
    }

    #[test]
    fn gitlab_pushes_and_merge_requests() {
        let push = br#"{"object_kind":"push","ref":"refs/heads/main","after":"da1560886d4f094c3e6c9ef40349f7d38b5d27d7","checkout_sha":"da1560886d4f094c3e6c9ef40349f7d38b5d27d7","user_name":"John Smith","project":{"path_with_namespace":"mike/diaspora","git_http_url":"http://example.com/mike/diaspora.git"},"commits":[{"id":"da15","message":"fixed readme","author":{"name":"GitLab dev","email":"gitlabdev@dv6700.(none)"},"added":["CHANGELOG"],"modified":["app/controller/application.rb"],"removed":[]}]}"#;
        let HookOutcome::Change(change) = gitlab_outcome("Push Hook", push).unwrap() else {
            panic!()
        };
        assert_eq!(
            (change.branch.as_str(), change.project.as_str()),
            ("main", "mike/diaspora")
        );
        assert_eq!(change.files, vec!["CHANGELOG", "app/controller/application.rb"]);
        let merge = br#"{"object_kind":"merge_request","user":{"name":"Administrator","username":"root"},"project":{"path_with_namespace":"gitlabhq/gitlab-test","git_http_url":"http://example.com/gitlabhq/gitlab-test.git"},"object_attributes":{"action":"open","source_branch":"ms-viewport","title":"MS-Viewport","last_commit":{"id":"da1560886d4f094c3e6c9ef40349f7d38b5d27d7"}}}"#;
        let HookOutcome::Change(change) = gitlab_outcome("Merge Request Hook", merge).unwrap() else {
            panic!()
        };
        assert_eq!(change.branch, "ms-viewport");
        assert!(matches!(
            gitlab_outcome("Tag Push Hook", b"{}").unwrap(),
            HookOutcome::Ignored(_)
        ));
    }
}
