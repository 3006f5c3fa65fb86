//! The JSON API, version 1.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use bus_schema::{
    subjects, BuildRecord, BuildRequest, CancelRequest, Change, ForceReply, LogChunk, LogStream,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use services::time::now;

use crate::error::ApiError;
use crate::view::BuildFilter;
use crate::AppState;

pub(crate) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/api/v1/builds", get(list_builds))
        .route("/api/v1/builds/{id}", get(get_build))
        .route("/api/v1/builds/{id}/steps/{index}/log", get(step_log))
        .route("/api/v1/builds/{id}/cancel", post(cancel_build))
        .route("/api/v1/changes", get(list_changes).post(post_change))
        .route("/api/v1/builders", get(list_builders))
        .route("/api/v1/builders/{name}/force", post(force_build))
        .route("/api/v1/agents", get(list_agents))
        .route("/api/v1/toolkits", get(list_toolkits))
        .route("/api/v1/masters", get(list_masters))
        .route("/api/v1/waits", get(list_waits))
        .route("/api/v1/pools", get(list_pools))
        .route("/api/v1/pools/{role}", get(get_pool).put(put_pool))
        .route("/api/v1/masters/{id}/drain", post(drain_master))
        .route("/healthz", get(health))
        .route(
            "/api/v1/openapi.json",
            get(|| async { Json(crate::openapi::document()) }),
        )
}

/// Parses a JSON body (an empty body or `null` means all defaults), answering malformed input
/// with 400 and a message saying what is wrong.
fn parse_body<T: serde::de::DeserializeOwned + Default>(body: &Bytes) -> Result<T, ApiError> {
    let text = body.trim_ascii();
    if text.is_empty() || text == b"null" {
        return Ok(T::default());
    }
    serde_json::from_slice(body)
        .map_err(|error| ApiError::BadRequest(format!("malformed JSON body: {error}")))
}

const DEFAULT_LIMIT: usize = 50;
const MAX_LIMIT: usize = 1000;

#[derive(Deserialize)]
struct BuildsQuery {
    builder: Option<String>,
    state: Option<String>,
    change: Option<String>,
    before: Option<String>,
    limit: Option<usize>,
}

async fn list_builds(
    State(state): State<Arc<AppState>>,
    Query(query): Query<BuildsQuery>,
) -> Result<impl IntoResponse, ApiError> {
    if let Some(wanted) = &query.state {
        if !["requested", "waiting", "running", "finished"].contains(&wanted.as_str()) {
            return Err(ApiError::BadRequest(format!(
                "unknown state {wanted:?}: use requested, waiting, running or finished"
            )));
        }
    }
    let filter = BuildFilter {
        builder: query.builder,
        state: query.state,
        change: query.change,
        before: query.before,
        limit: query.limit.unwrap_or(DEFAULT_LIMIT).min(MAX_LIMIT),
    };
    Ok(Json(json!({ "builds": state.view.builds(&filter) })))
}

async fn get_build(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    state
        .view
        .build(&id)
        .filter(|build| build.number != 0)
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no build {id}")))
}

/// The build `id`, if it has a step `index`; 404 saying which is missing otherwise.
pub(crate) fn build_with_step(state: &AppState, id: &str, index: u32) -> Result<BuildRecord, ApiError> {
    let build = state
        .view
        .build(id)
        .ok_or_else(|| ApiError::NotFound(format!("no build {id}")))?;
    if index as usize >= build.steps.len() {
        return Err(ApiError::NotFound(format!("build {id} has no step {index}")));
    }
    Ok(build)
}

async fn step_log(
    State(state): State<Arc<AppState>>,
    Path((id, index)): Path<(String, u32)>,
) -> Result<impl IntoResponse, ApiError> {
    let build = build_with_step(&state, &id, index)?;
    let messages = state
        .bus
        .read_all(subjects::LOGS_STREAM, &subjects::step_log(&id, index))
        .await?;
    // The log of the build's current attempt, in chunk order (a chunk stored again after a
    // failure can land late).
    let attempt = build.retries.len() as u32;
    let mut chunks: Vec<LogChunk> = messages
        .iter()
        .filter_map(|message| match bus_schema::decode::<LogChunk>(&message.payload) {
            Ok(chunk) => Some(chunk),
            Err(error) => {
                let parked =
                    state
                        .bus
                        .park_dead_letter(crate::view::ROLE, &message.subject, &message.payload, &error);
                tokio::spawn(parked);
                None
            }
        })
        .filter(|chunk| chunk.attempt == attempt)
        .collect();
    chunks.sort_by_key(|chunk| chunk.seq);
    let mut text = String::new();
    for line in chunks.into_iter().flat_map(|chunk| chunk.lines) {
        if line.stream == LogStream::Header {
            text.push_str("# ");
        }
        text.push_str(&line.text);
        text.push('\n');
    }
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text))
}

async fn cancel_build(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let build = state
        .view
        .build(&id)
        .filter(|build| build.number != 0)
        .ok_or_else(|| ApiError::NotFound(format!("no build {id}")))?;
    if build.result.is_some() {
        return Err(ApiError::Conflict(format!("build {id} has already finished")));
    }
    let request = CancelRequest {
        build_id: id.clone(),
        requested_by: "api".into(),
    };
    state
        .bus
        .cancels
        .put(&id, bus_schema::encode(&request).into())
        .await
        .map_err(|e| services::bus::Error::nats("storing a cancel request", e))?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "id": id, "cancel": "requested" })),
    ))
}

#[derive(Deserialize)]
struct LimitQuery {
    limit: Option<usize>,
}

async fn list_changes(
    State(state): State<Arc<AppState>>,
    Query(query): Query<LimitQuery>,
) -> impl IntoResponse {
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT).min(MAX_LIMIT);
    Json(json!({ "changes": state.view.changes(limit) }))
}

/// The generic change of `POST /api/v1/changes`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangeBody {
    #[serde(default)]
    pub repository: String,
    #[serde(default)]
    pub branch: String,
    #[serde(default)]
    pub revision: String,
    #[serde(default)]
    pub author: String,
    #[serde(default)]
    pub comments: String,
    #[serde(default)]
    pub files: Vec<String>,
    #[serde(default)]
    pub project: String,
}

/// `POST /api/v1/changes`. With an `Idempotency-Key` header, the same key again within the
/// bus's duplicate window stores nothing and answers the first change's id.
async fn post_change(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let delivery = crate::hooks::delivery_key(&headers, "Idempotency-Key", "api")?;
    let body: ChangeBody = parse_body(&body)?;
    if body.branch.trim().is_empty() {
        return Err(ApiError::BadRequest("a change needs a `branch`".into()));
    }
    let change = Change {
        id: ulid::Ulid::new().to_string(),
        repository: body.repository,
        branch: body.branch,
        revision: body.revision,
        author: body.author,
        comments: body.comments,
        files: body.files,
        project: body.project,
        source: "api".into(),
        received_at: now(),
    };
    let id = state.bus.store_change(&change, delivery.as_deref()).await?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "id": id }))))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ForceBody {
    #[serde(default)]
    properties: BTreeMap<String, String>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    priority: i32,
}

/// `POST /api/v1/builders/{name}/force`. With an `Idempotency-Key` header, the same key again
/// for the same builder within the bus's duplicate window stores nothing and answers the
/// first build.
async fn force_build(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let delivery = crate::hooks::delivery_key(&headers, "Idempotency-Key", &format!("force.{name}"))?;
    let body: ForceBody = parse_body(&body)?;
    if state.config.builder(&name).is_none() {
        return Err(ApiError::NotFound(format!("no builder {name}")));
    }
    if !state.config.is_forceable(&name) {
        return Err(ApiError::Conflict(format!(
            "builder {name} cannot be forced: no `force` scheduler lists it"
        )));
    }
    for property in body.properties.keys() {
        if !services::config::is_env_name(property) || property.starts_with("YARD_") {
            return Err(ApiError::BadRequest(format!(
                "property name {property:?} must be letters, digits and `_`, not start with a digit or YARD_"
            )));
        }
    }
    let request = BuildRequest {
        build_id: ulid::Ulid::new().to_string(),
        builder: name,
        reason: body.reason.unwrap_or_else(|| "forced".into()),
        properties: body.properties,
        changes: Vec::new(),
        priority: body.priority,
        requested_at: now(),
    };
    let (sequence, build_id) = ask_to_force(&state, &request, delivery.as_deref()).await?;
    // Let the caller read its own write: wait (briefly) for the view to apply the request.
    state
        .view
        .wait_for_sequence(sequence, Duration::from_secs(2))
        .await;
    let number = state.view.build(&build_id).map_or(0, |build| build.number);
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "id": build_id, "number": number, "builder": request.builder })),
    ))
}

/// Asks the scheduler masters to store a forced build (only they publish build requests);
/// returns the events-stream sequence of its `requested` event. While no scheduler master
/// listens (one starting or restarting) it asks again for up to `[nats] request_timeout`; a
/// request whose answer was lost is asked once more: the build id (or `delivery`) deduplicates
/// it. Answers the sequence and the id of the build stored (the first one of `delivery`).
async fn ask_to_force(
    state: &AppState,
    request: &BuildRequest,
    delivery: Option<&str>,
) -> Result<(u64, String), ApiError> {
    let subject = subjects::force(&request.builder);
    let payload = Bytes::from(bus_schema::encode(request));
    let mut headers = async_nats::HeaderMap::new();
    if let Some(delivery) = delivery {
        headers.insert(subjects::FORCE_DELIVERY_HEADER, delivery);
    }
    let patience = tokio::time::Instant::now() + state.config.nats.request_timeout;
    let mut timeouts = 0;
    let answer = loop {
        let asked = state
            .bus
            .client
            .request_with_headers(subject.clone(), headers.clone(), payload.clone())
            .await;
        match asked {
            Ok(answer) => break answer,
            Err(error)
                if error.kind() == async_nats::RequestErrorKind::NoResponders
                    && tokio::time::Instant::now() < patience =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) if error.kind() == async_nats::RequestErrorKind::NoResponders => {
                return Err(ApiError::Unavailable(format!(
                    "no scheduler master forces builder {}: start one whose configuration has a `force` scheduler listing it",
                    request.builder
                )))
            }
            Err(error) if error.kind() == async_nats::RequestErrorKind::TimedOut && timeouts == 0 => {
                timeouts += 1;
                tracing::debug!(build = %request.build_id, "no answer about a forced build yet; asking again");
            }
            Err(error) => {
                return Err(ApiError::Unavailable(format!(
                    "asking a scheduler master to force builder {}: {error}",
                    request.builder
                )))
            }
        }
    };
    match bus_schema::decode::<ForceReply>(&answer.payload) {
        Ok(ForceReply::Stored { sequence, build_id }) => {
            Ok((sequence, build_id.unwrap_or_else(|| request.build_id.clone())))
        }
        Ok(ForceReply::Refused { reason }) => Err(ApiError::Conflict(reason)),
        Ok(ForceReply::NotStored { reason }) => Err(ApiError::Unavailable(reason)),
        Err(error) => {
            let error = format!("a scheduler master's answer to {subject} cannot be decoded: {error}");
            let parked =
                state
                    .bus
                    .park_dead_letter(crate::view::ROLE, &answer.subject, &answer.payload, &error);
            tokio::spawn(parked);
            Err(ApiError::Unavailable(error))
        }
    }
}

#[derive(Serialize)]
struct BuilderSummary<'a> {
    name: &'a str,
    agents: &'a str,
    steps: Vec<&'a str>,
    forceable: bool,
    schedulers: Vec<&'a str>,
    /// The names of the builder's secrets; their sources and values are never shown.
    secrets: Vec<&'a str>,
}

async fn list_builders(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let builders: Vec<BuilderSummary> = state
        .config
        .builders
        .iter()
        .map(|builder| BuilderSummary {
            name: &builder.name,
            agents: &builder.agents,
            steps: builder.steps.iter().map(|step| step.name.as_str()).collect(),
            forceable: state.config.is_forceable(&builder.name),
            schedulers: state
                .config
                .schedulers
                .iter()
                .filter(|s| s.builders.contains(&builder.name))
                .map(|s| s.name.as_str())
                .collect(),
            secrets: builder.secrets.keys().map(String::as_str).collect(),
        })
        .collect();
    Json(json!({ "builders": builders }))
}

async fn list_toolkits(State(state): State<Arc<AppState>>) -> Result<impl IntoResponse, ApiError> {
    let toolkits = services::toolkits::list(&state.bus, state.config.nats.replicas).await?;
    Ok(Json(json!({ "toolkits": toolkits })))
}

async fn list_agents(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let silence_limit = state.config.engine.agent_timeout.as_millis() as u64;
    let at = now();
    let agents: Vec<serde_json::Value> = state
        .view
        .agents()
        .into_iter()
        .map(|agent| {
            let online = at.millis_since(agent.heartbeat_at) <= silence_limit;
            let refusal = bus_schema::agent_refusal(agent.protocol);
            let status = match (&agent.busy_with, online) {
                (_, false) => "offline",
                _ if refusal.is_some() => "refused",
                (Some(_), true) => "busy",
                (None, true) if agent.busy_elsewhere => "busy",
                (None, true) => "idle",
            };
            json!({
                "name": agent.name,
                "labels": agent.labels,
                "version": agent.version,
                "protocol": agent.protocol,
                "benchmark": agent.benchmark,
                "status": status,
                "busy_with": agent.busy_with,
                "busy_elsewhere": agent.busy_elsewhere,
                "refused": refusal,
                "started_at": agent.started_at,
                "last_heartbeat": agent.heartbeat_at,
            })
        })
        .collect();
    Json(json!({ "agents": agents }))
}

/// The grid's wait-for graph: every waiting step, the agents it could use and who holds them,
/// and the groups of builds deadlocked among themselves. `more` counts the builds waiting for
/// a master agent beyond what each engine lists (they hold nothing, so no deadlock runs
/// through them).
async fn list_waits(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let silence_limit = state.config.engine.agent_timeout.as_millis() as u64;
    let at = now();
    let (waits, more) = state.view.waits(state.config.masters.dead_after);
    let graph = services::waits::WaitGraph::analyze_with_pools(
        &waits,
        &state.view.agents(),
        |agent| at.millis_since(agent.heartbeat_at) <= silence_limit,
        &state.view.pool_holders(),
    );
    let descriptions: Vec<String> = graph
        .deadlocks
        .iter()
        .map(|group| graph.describe(group))
        .collect();
    Json(
        json!({ "waits": graph.waits, "more": more, "deadlocks": graph.deadlocks, "descriptions": descriptions }),
    )
}

/// One pool: each server with its holders (the seed's `@AcquiredServers`) and the queue.
fn pool_json(state: &AppState, role: &str) -> Option<serde_json::Value> {
    let pool: bus_schema::PoolRecord = state.view.pool_entry(&subjects::pool_key(role))?;
    let at = now();
    let stale_after = 30_000;
    let servers: Vec<serde_json::Value> = pool
        .servers
        .iter()
        .map(|server| {
            let holds: bus_schema::ServerHolds = state
                .view
                .pool_entry(&subjects::pool_server_key(server))
                .unwrap_or_default();
            let mut holders = Vec::new();
            if let Some(holder) = holds.global.filter(|h| at.millis_since(h.refreshed_at) <= stale_after) {
                holders.push(json!({ "build": holder.build_id, "step": holder.step, "scope": "global", "role": role, "since": holder.since }));
            }
            for (held_role, holder) in holds.roles {
                if at.millis_since(holder.refreshed_at) <= stale_after {
                    holders.push(json!({ "build": holder.build_id, "step": holder.step, "scope": "role", "role": held_role, "since": holder.since }));
                }
            }
            json!({ "server": server, "holders": holders })
        })
        .collect();
    let queue: bus_schema::PoolQueue = state
        .view
        .pool_entry(&subjects::pool_queue_key(role))
        .unwrap_or_default();
    let waiters: Vec<serde_json::Value> = queue
        .waiters
        .iter()
        .filter(|waiter| at.millis_since(waiter.refreshed_at) <= stale_after)
        .map(|waiter| json!({ "build": waiter.build_id, "step": waiter.step, "scope": waiter.scope, "since": waiter.since }))
        .collect();
    Some(json!({ "role": role, "servers": servers, "queue": waiters }))
}

async fn list_pools(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let pools: Vec<serde_json::Value> = state
        .view
        .pool_roles()
        .iter()
        .filter_map(|role| pool_json(&state, role))
        .collect();
    Json(json!({ "pools": pools }))
}

async fn get_pool(
    State(state): State<Arc<AppState>>,
    Path(role): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    pool_json(&state, &role)
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no pool {role}")))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolBody {
    servers: Vec<String>,
}

async fn put_pool(
    State(state): State<Arc<AppState>>,
    Path(role): Path<String>,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    if !subjects::is_valid_token(&role) {
        return Err(ApiError::BadRequest(format!(
            "pool role {role:?}: use letters, digits, `-` and `_` only"
        )));
    }
    let body: PoolBody = parse_body(&body)?;
    if let Some(bad) = body
        .servers
        .iter()
        .find(|server| !subjects::is_valid_token(server))
    {
        return Err(ApiError::BadRequest(format!(
            "server name {bad:?}: use letters, digits, `-` and `_` only"
        )));
    }
    let pool = bus_schema::PoolRecord {
        role: role.clone(),
        servers: body.servers,
    };
    state
        .bus
        .pools
        .put(subjects::pool_key(&role), bus_schema::encode(&pool).into())
        .await
        .map_err(|e| services::bus::Error::nats("storing a pool", e))?;
    Ok(Json(json!({ "role": role, "servers": pool.servers })))
}

async fn list_masters(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let dead_after = state.config.masters.dead_after.as_millis() as u64;
    let at = now();
    let masters = state.view.masters();
    let alive: Vec<&bus_schema::MasterRecord> = masters
        .iter()
        .filter(|master| at.millis_since(master.heartbeat_at) <= dead_after)
        .collect();
    // Masters that run the same scheduler or builder name with different definitions would
    // give different results depending on which of them takes the work.
    let mut definitions: BTreeMap<&str, BTreeMap<&str, Vec<&str>>> = BTreeMap::new();
    for master in &alive {
        for (name, digest) in &master.definitions {
            definitions
                .entry(name.as_str())
                .or_default()
                .entry(digest.as_str())
                .or_default()
                .push(master.id.as_str());
        }
    }
    let conflicts: Vec<serde_json::Value> = definitions
        .into_iter()
        .filter(|(_, versions)| versions.len() > 1)
        .map(|(name, versions)| {
            let (kind, name) = name.split_once(':').unwrap_or(("definition", name));
            json!({
                "kind": kind,
                "name": name,
                "masters": versions.values().collect::<Vec<_>>(),
                "problem": format!("{kind} {name:?} has {} different definitions among live masters", versions.len()),
            })
        })
        .collect();
    let list: Vec<serde_json::Value> = masters
        .iter()
        .map(|master| {
            let alive = at.millis_since(master.heartbeat_at) <= dead_after;
            json!({
                "id": master.id,
                "roles": master.roles,
                "version": master.version,
                "host": master.host,
                "state": if alive { serde_json::to_value(master.state).unwrap_or_default() } else { json!("dead") },
                "started_at": master.started_at,
                "last_heartbeat": master.heartbeat_at,
                "metrics_url": master.metrics_url,
            })
        })
        .collect();
    Json(json!({ "masters": list, "conflicts": conflicts }))
}

async fn drain_master(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    if !state.view.masters().iter().any(|master| master.id == id) {
        return Err(ApiError::NotFound(format!("no master {id}")));
    }
    let command = bus_schema::encode(&bus_schema::MasterCommand::Drain);
    let reply = tokio::time::timeout(
        Duration::from_secs(5),
        state
            .bus
            .client
            .request(subjects::master_control(&id), command.into()),
    )
    .await
    .map_err(|_| ApiError::Unavailable(format!("master {id} did not answer the drain request")))?
    .map_err(|error| ApiError::Unavailable(format!("master {id} is unreachable: {error}")))?;
    let answer = String::from_utf8_lossy(&reply.payload).into_owned();
    Ok((StatusCode::ACCEPTED, Json(json!({ "id": id, "state": answer }))))
}

async fn health(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let connected = state.bus.client.connection_state() == async_nats::connection::State::Connected;
    let status = if connected {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({ "status": if connected { "ok" } else { "disconnected" }, "bus": connected })),
    )
}
