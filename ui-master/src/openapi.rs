//! The OpenAPI description of the REST API, served at `GET /api/v1/openapi.json`.

use serde_json::{json, Value};

/// One operation: method, path, summary, and the statuses it answers.
const OPERATIONS: &[(&str, &str, &str, &[u16])] = &[
    (
        "get",
        "/api/v1/builds",
        "Builds, newest first; filters builder, state, change; limit (at most 1000); before=<build id> for the next page",
        &[200, 400],
    ),
    ("get", "/api/v1/builds/{id}", "One build", &[200, 404]),
    (
        "get",
        "/api/v1/builds/{id}/steps/{index}/log",
        "A step's log as text/plain",
        &[200, 404, 503],
    ),
    (
        "get",
        "/api/v1/builds/{id}/steps/{index}/log/stream",
        "Server-Sent Events: a step's log as it grows (`log` events), then `end`",
        &[200, 404, 503],
    ),
    (
        "post",
        "/api/v1/builds/{id}/cancel",
        "Cancel a build",
        &[202, 401, 404, 409, 503],
    ),
    ("get", "/api/v1/changes", "Changes, newest first", &[200]),
    (
        "post",
        "/api/v1/changes",
        "Post a change (repository, branch, revision, author, comments, files, project)",
        &[202, 400, 401, 413, 503],
    ),
    ("get", "/api/v1/builders", "Configured builders", &[200]),
    (
        "post",
        "/api/v1/builders/{name}/force",
        "Force a build; optional properties, reason, priority; an Idempotency-Key header makes a retry the same build",
        &[202, 400, 401, 404, 409, 413, 503],
    ),
    ("get", "/api/v1/agents", "Registered agents", &[200]),
    (
        "get",
        "/api/v1/masters",
        "Masters and definition conflicts",
        &[200],
    ),
    (
        "post",
        "/api/v1/masters/{id}/drain",
        "Drain a master",
        &[202, 401, 404, 503],
    ),
    (
        "get",
        "/api/v1/waits",
        "The wait-for graph and its deadlocks",
        &[200],
    ),
    (
        "get",
        "/api/v1/pools",
        "Resource pools with holders and queues",
        &[200],
    ),
    ("get", "/api/v1/pools/{role}", "One pool", &[200, 404]),
    (
        "put",
        "/api/v1/pools/{role}",
        "Set a pool's servers",
        &[200, 400, 401, 413, 503],
    ),
    (
        "get",
        "/api/v1/stream",
        "Server-Sent Events: every build change",
        &[200],
    ),
    ("get", "/api/v1/openapi.json", "This description", &[200]),
    (
        "get",
        "/api/v1/toolkits",
        "Published toolkits: name, version, size, sha256",
        &[200, 503],
    ),
    (
        "post",
        "/hooks/github",
        "GitHub hook (X-Hub-Signature-256)",
        &[200, 202, 400, 401, 404, 413, 503],
    ),
    (
        "post",
        "/hooks/gitlab",
        "GitLab hook (X-Gitlab-Token)",
        &[200, 202, 400, 401, 404, 413, 503],
    ),
    (
        "post",
        "/hooks/gitea",
        "Gitea hook (X-Gitea-Signature)",
        &[200, 202, 400, 401, 404, 413, 503],
    ),
    ("get", "/metrics", "Prometheus metrics", &[200]),
    ("get", "/healthz", "Health", &[200, 503]),
];

pub fn document() -> Value {
    let mut paths = serde_json::Map::new();
    for (method, path, summary, statuses) in OPERATIONS {
        let parameters: Vec<Value> = path
            .split('/')
            .filter_map(|part| part.strip_prefix('{')?.strip_suffix('}'))
            .map(|name| json!({ "name": name, "in": "path", "required": true, "schema": { "type": "string" } }))
            .collect();
        let responses: serde_json::Map<String, Value> = statuses
            .iter()
            .map(|status| (status.to_string(), json!({ "description": describe(*status) })))
            .collect();
        let entry = paths.entry(path.to_string()).or_insert_with(|| json!({}));
        entry[*method] = json!({
            "summary": summary,
            "parameters": parameters,
            "responses": responses,
            "security": if *method == "get" { json!([]) } else { json!([{ "bearer": [] }]) },
        });
    }
    json!({
        "openapi": "3.1.0",
        "info": { "title": "Yardmaster", "version": env!("CARGO_PKG_VERSION") },
        "paths": paths,
        "components": { "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } } },
    })
}

fn describe(status: u16) -> &'static str {
    match status {
        200 => "OK",
        202 => "Accepted: stored on the bus",
        400 => "Malformed input; the error says what is wrong",
        401 => "Missing or wrong token or signature",
        404 => "No such thing",
        409 => "Conflicting state",
        413 => "Body over the size limit ([http] max_body_bytes)",
        503 => "The bus did not store it, or the master is at [http] max_concurrent_requests; nothing was accepted",
        _ => "",
    }
}
