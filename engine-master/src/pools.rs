//! Resource pools: acquiring and releasing servers by role, consistently across engines.
//!
//! Each server's acquisitions live under one key of the pools bucket and change only by
//! compare-and-swap, so two engines never hand a server to two holders in one scope. A global
//! acquisition excludes every other holder of the server; a role-scoped one excludes only
//! holders of its role and global ones. Waiters queue per role, first come first served, in
//! the same bucket. Holders and waiters are refreshed while their build runs; one not
//! refreshed for [`STALE_AFTER`] has vanished and no longer counts.

use std::time::Duration;

use async_nats::jetstream::kv;
use bus_schema::{subjects, PoolHolder, PoolQueue, PoolRecord, PoolWaiter, ServerHolds, Timestamp};
use serde::{de::DeserializeOwned, Serialize};
use services::config::PoolScope;
use services::time::now;
use tokio_util::sync::CancellationToken;

use crate::Engine;

/// A holder or waiter not refreshed for this long has vanished (its engine and build are gone).
pub(crate) const STALE_AFTER: Duration = Duration::from_secs(30);
/// How often a build refreshes its holds and its place in a queue.
pub(crate) const REFRESH_EVERY: Duration = Duration::from_secs(10);
/// How often a waiter looks again for a free server.
const POLL: Duration = Duration::from_millis(50);

fn fresh(refreshed_at: Timestamp, at: Timestamp) -> bool {
    at.millis_since(refreshed_at) <= STALE_AFTER.as_millis() as u64
}

/// Reads a value and its revision (0 when absent).
async fn read<T: DeserializeOwned + Default>(store: &kv::Store, key: &str) -> Result<(T, u64), String> {
    match store.entry(key).await.map_err(|error| error.to_string())? {
        Some(entry) if entry.operation == kv::Operation::Put => {
            let value = bus_schema::decode(&entry.value).map_err(|error| error.to_string())?;
            Ok((value, entry.revision))
        }
        Some(entry) => Ok((T::default(), entry.revision)),
        None => Ok((T::default(), 0)),
    }
}

/// Writes a value if the key is still at `revision`; false if someone changed it first.
async fn write<T: Serialize>(store: &kv::Store, key: &str, value: &T, revision: u64) -> Result<bool, String> {
    let payload = bus_schema::encode(value).into();
    let failure = if revision == 0 {
        match store.create(key, payload).await {
            Ok(_) => None,
            Err(error) => Some((
                error.kind() == kv::CreateErrorKind::AlreadyExists,
                error.to_string(),
            )),
        }
    } else {
        match store.update(key, payload, revision).await {
            Ok(_) => None,
            Err(error) => Some((
                error.kind() == kv::UpdateErrorKind::WrongLastRevision,
                error.to_string(),
            )),
        }
    };
    match failure {
        None => Ok(true),
        // Someone wrote it first. The client can report that as a failed publish ("wrong last
        // sequence", after a failover) rather than by its kind.
        Some((conflict, text)) if conflict || text.contains("wrong last sequence") => Ok(false),
        Some((_, text)) => Err(text),
    }
}

/// How long a pool read or change keeps trying while the bus fails: a NATS node failing over
/// makes reads and writes fail for a few seconds, which must not fail the step.
const BUS_PATIENCE: Duration = Duration::from_secs(20);

/// Paces the tries of one bus operation that fails, for up to [`BUS_PATIENCE`].
struct Patience {
    started: tokio::time::Instant,
    pause: Duration,
}

impl Patience {
    fn new() -> Self {
        Patience {
            started: tokio::time::Instant::now(),
            pause: Duration::from_millis(50),
        }
    }

    /// Waits before the next try; `Err(error)` once patience has run out.
    async fn after(&mut self, key: &str, error: String) -> Result<(), String> {
        if self.started.elapsed() >= BUS_PATIENCE {
            return Err(error);
        }
        tracing::debug!(%key, %error, "pool entry not read or changed; trying again");
        tokio::time::sleep(self.pause).await;
        self.pause = (self.pause * 2).min(Duration::from_secs(1));
        Ok(())
    }
}

/// [`read`], tried again while the bus fails.
async fn read_patiently<T: DeserializeOwned + Default>(
    store: &kv::Store,
    key: &str,
) -> Result<(T, u64), String> {
    let mut patience = Patience::new();
    loop {
        match read(store, key).await {
            Ok(read) => return Ok(read),
            Err(error) => patience.after(key, error).await?,
        }
    }
}

/// Reads, changes and writes `key` by compare-and-swap until it sticks; `change` returns
/// what to report, or `None` to write nothing.
async fn update<T, R>(
    store: &kv::Store,
    key: &str,
    mut change: impl FnMut(&mut T) -> Option<R>,
) -> Result<Option<R>, String>
where
    T: Serialize + DeserializeOwned + Default,
{
    let mut patience = Patience::new();
    loop {
        let attempt = async {
            let (mut value, revision) = read::<T>(store, key).await?;
            let Some(report) = change(&mut value) else {
                return Ok(Some(None));
            };
            Ok(write(store, key, &value, revision).await?.then_some(Some(report)))
        };
        match attempt.await {
            Ok(Some(report)) => return Ok(report),
            Ok(None) => continue,
            Err(error) => patience.after(key, error).await?,
        }
    }
}

/// True if the server can be acquired for `role` in `scope`: a global acquisition needs it
/// held by nobody; a role-scoped one needs no global holder and none in its role.
fn is_free_for(holds: &ServerHolds, role: &str, scope: PoolScope, at: Timestamp) -> bool {
    let global_held = holds
        .global
        .as_ref()
        .is_some_and(|holder| fresh(holder.refreshed_at, at));
    let role_held = |role: &str| {
        holds
            .roles
            .get(role)
            .is_some_and(|holder| fresh(holder.refreshed_at, at))
    };
    match scope {
        PoolScope::Global => !global_held && !holds.roles.keys().any(|held| role_held(held)),
        PoolScope::Role => !global_held && !role_held(role),
    }
}

/// The servers of `role` now.
pub(crate) async fn servers(engine: &Engine, role: &str) -> Result<Vec<String>, String> {
    let (pool, _) =
        read_patiently::<Option<PoolRecord>>(&engine.bus.pools, &subjects::pool_key(role)).await?;
    Ok(pool.map(|pool| pool.servers).unwrap_or_default())
}

/// Acquires a server of `role` for the build, waiting in the role's queue while none is free.
/// `Ok(None)` if the build was cancelled while it waited.
pub(crate) async fn acquire(
    engine: &Engine,
    build_id: &str,
    step: &str,
    role: &str,
    scope: PoolScope,
    cancel: &CancellationToken,
) -> Result<Option<String>, String> {
    if let Some(server) = held_by_step(engine, build_id, step, role).await? {
        // Taken by an earlier run of this step (its engine died before recording it, or the
        // build is on its next attempt): the step has its server, not a second one.
        return Ok(Some(server));
    }
    let store = &engine.bus.pools;
    let queue_key = subjects::pool_queue_key(role);
    let since = now();
    let me = PoolWaiter {
        build_id: build_id.to_owned(),
        step: step.to_owned(),
        scope: scope.as_str().to_owned(),
        since,
        refreshed_at: since,
    };
    update::<PoolQueue, ()>(store, &queue_key, |queue| {
        queue.waiters.push(me.clone());
        Some(())
    })
    .await?;
    let mut last_refresh = since;
    let acquired = loop {
        let at = now();
        if at.millis_since(last_refresh) >= REFRESH_EVERY.as_millis() as u64 {
            last_refresh = at;
            update::<PoolQueue, ()>(store, &queue_key, |queue| {
                let mine = queue
                    .waiters
                    .iter_mut()
                    .find(|waiter| waiter.build_id == build_id && waiter.step == step)?;
                mine.refreshed_at = at;
                Some(())
            })
            .await?;
        }
        // First come, first served: only the oldest live waiter of the role may take a server.
        let (queue, _) = read_patiently::<PoolQueue>(store, &queue_key).await?;
        let first = queue.waiters.iter().find(|waiter| fresh(waiter.refreshed_at, at));
        if first.is_some_and(|first| first.build_id == build_id && first.step == step) {
            if let Some(server) = take_free_server(engine, build_id, step, role, scope).await? {
                break Some(server);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = cancel.cancelled() => break None,
        }
    };
    update::<PoolQueue, ()>(store, &queue_key, |queue| {
        let before = queue.waiters.len();
        queue.waiters.retain(|waiter| {
            !(waiter.build_id == build_id && waiter.step == step) && fresh(waiter.refreshed_at, now())
        });
        (queue.waiters.len() != before).then_some(())
    })
    .await?;
    Ok(acquired)
}

/// The server of `role` the build's `step` holds already, if any.
async fn held_by_step(
    engine: &Engine,
    build_id: &str,
    step: &str,
    role: &str,
) -> Result<Option<String>, String> {
    for server in servers(engine, role).await? {
        // Refreshed by compare-and-swap: a hold gone stale may be taken by another build at
        // the same moment, and only one of the two writes sticks.
        let kept =
            update::<ServerHolds, ()>(&engine.bus.pools, &subjects::pool_server_key(&server), |holds| {
                let at = now();
                let holder = match holds.roles.get_mut(role) {
                    Some(holder) if holder.build_id == build_id && holder.step == step => holder,
                    _ => holds
                        .global
                        .as_mut()
                        .filter(|holder| holder.build_id == build_id && holder.step == step)?,
                };
                holder.refreshed_at = at;
                Some(())
            })
            .await?;
        if kept.is_some() {
            return Ok(Some(server));
        }
    }
    Ok(None)
}

/// Takes the first server of the role that is free in this scope, if any.
async fn take_free_server(
    engine: &Engine,
    build_id: &str,
    step: &str,
    role: &str,
    scope: PoolScope,
) -> Result<Option<String>, String> {
    for server in servers(engine, role).await? {
        let taken =
            update::<ServerHolds, ()>(&engine.bus.pools, &subjects::pool_server_key(&server), |holds| {
                let at = now();
                if !is_free_for(holds, role, scope, at) {
                    return None;
                }
                let holder = PoolHolder {
                    build_id: build_id.to_owned(),
                    step: step.to_owned(),
                    engine: engine.id.clone(),
                    since: at,
                    refreshed_at: at,
                };
                match scope {
                    PoolScope::Global => holds.global = Some(holder),
                    PoolScope::Role => {
                        holds.roles.insert(role.to_owned(), holder);
                    }
                }
                Some(())
            })
            .await?;
        if taken.is_some() {
            return Ok(Some(server));
        }
    }
    Ok(None)
}

/// Gives back `server` of `role` held by the build; false if the build did not hold it.
pub(crate) async fn release(
    engine: &Engine,
    build_id: &str,
    role: &str,
    server: &str,
) -> Result<bool, String> {
    if !bus_schema::subjects::is_valid_token(server) {
        return Ok(false);
    }
    let released =
        update::<ServerHolds, ()>(&engine.bus.pools, &subjects::pool_server_key(server), |holds| {
            if holds
                .roles
                .get(role)
                .is_some_and(|holder| holder.build_id == build_id)
            {
                holds.roles.remove(role);
                return Some(());
            }
            // A global acquisition of a server of this role.
            if holds
                .global
                .as_ref()
                .is_some_and(|holder| holder.build_id == build_id)
            {
                holds.global = None;
                return Some(());
            }
            None
        })
        .await?;
    Ok(released.is_some())
}

/// The key of every server a build may hold: the servers of the configured pools, of the pool
/// definitions in the bucket, and every server key in it, as this engine's mirror of the bucket
/// has them. Read from the mirror, not listed from the bucket: each listing is a consumer on
/// the server, and a busy grid listing on every refresh runs into the server's limit on them.
fn server_keys(engine: &Engine) -> Vec<String> {
    let mut keys: std::collections::BTreeSet<String> = engine
        .config
        .pools
        .iter()
        .flat_map(|pool| {
            pool.servers
                .iter()
                .map(|server| subjects::pool_server_key(server))
        })
        .collect();
    let entries = engine
        .pool_entries
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    for (key, value) in entries.iter() {
        if key.starts_with("server.") {
            keys.insert(key.clone());
        } else if key.starts_with("pool.") {
            if let Ok(pool) = bus_schema::decode::<PoolRecord>(value) {
                keys.extend(
                    pool.servers
                        .iter()
                        .map(|server| subjects::pool_server_key(server)),
                );
            }
        }
    }
    keys.into_iter().collect()
}

/// Releases every server the build holds (its end, whatever the result), or with
/// `refresh_only` renews them instead; returns the servers touched.
pub(crate) async fn release_or_refresh_all(
    engine: &Engine,
    build_id: &str,
    refresh_only: bool,
) -> Result<Vec<String>, String> {
    let mut touched = Vec::new();
    for key in server_keys(engine) {
        let changed = update::<ServerHolds, ()>(&engine.bus.pools, &key, |holds| {
            let at = now();
            let mut changed = false;
            if holds
                .global
                .as_ref()
                .is_some_and(|holder| holder.build_id == build_id)
            {
                if refresh_only {
                    if let Some(holder) = holds.global.as_mut() {
                        holder.refreshed_at = at;
                    }
                } else {
                    holds.global = None;
                }
                changed = true;
            }
            let roles: Vec<String> = holds
                .roles
                .iter()
                .filter(|(_, holder)| holder.build_id == build_id)
                .map(|(role, _)| role.clone())
                .collect();
            for role in roles {
                if refresh_only {
                    if let Some(holder) = holds.roles.get_mut(&role) {
                        holder.refreshed_at = at;
                    }
                } else {
                    holds.roles.remove(&role);
                }
                changed = true;
            }
            changed.then_some(())
        })
        .await?;
        if changed.is_some() {
            touched.push(key.trim_start_matches("server.").to_owned());
        }
    }
    Ok(touched)
}

/// Writes a pool definition (from configuration at start, or from the API).
pub async fn define(store: &kv::Store, pool: &PoolRecord) -> Result<(), String> {
    store
        .put(subjects::pool_key(&pool.role), bus_schema::encode(pool).into())
        .await
        .map(|_| ())
        .map_err(|error| error.to_string())
}

/// Writes the pools of the configuration that the bucket does not define yet.
pub(crate) async fn seed(engine: &Engine) {
    for pool in &engine.config.pools {
        let record = PoolRecord {
            role: pool.role.clone(),
            servers: pool.servers.clone(),
        };
        let payload = bus_schema::encode(&record);
        match engine
            .bus
            .pools
            .create(subjects::pool_key(&pool.role), payload.into())
            .await
        {
            Ok(_) => {}
            Err(error) if error.kind() == kv::CreateErrorKind::AlreadyExists => {}
            Err(error) => tracing::warn!(role = %pool.role, %error, "pool not defined"),
        }
    }
}
