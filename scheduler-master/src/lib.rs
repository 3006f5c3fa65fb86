//! The scheduler master: reads every change and turns the ones its schedulers accept into
//! build requests.
//!
//! It also stores forced builds: UI masters ask on `yard.force.<builder>`, and one scheduler
//! master whose `force` schedulers list the builder checks and stores the request, so that no
//! other role needs to publish build requests.
//!
//! **Architecture Invariant:** a change is acknowledged only after the build requests it
//! caused are stored, and those requests have ids derived from (change, scheduler, builder),
//! so a scheduler that dies halfway and sees the change again stores nothing twice.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{consumer, AckKind};
use bus_schema::{subjects, BuildRequest, Change, ForceReply};
use futures::StreamExt;
use services::config::{SchedulerConfig, SchedulerKind};
use services::lease::Lease;
use services::time::now;
use services::{Bus, YardConfig};
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Bus(#[from] services::bus::Error),
}

/// The role naming the scheduler in dead letters and metrics.
const ROLE: &str = "scheduler";

/// How many changes one scheduler works on at once.
const CHANGES_IN_FLIGHT: usize = 64;

/// Runs every `on-change` scheduler of the configuration until `shutdown` fires. Each
/// scheduler runs here only while this master holds its lease, so a scheduler name is active
/// in one master at a time; another master takes the lease over when this one dies.
pub async fn run(config: Arc<YardConfig>, bus: Bus, shutdown: CancellationToken) -> Result<(), Error> {
    let holder = config
        .masters
        .id
        .clone()
        .unwrap_or_else(|| services::presence::master_id(&config));
    services::metrics::spawn_rtt_probe(bus.clone(), "scheduler", shutdown.clone());
    let mut tasks = Vec::new();
    if let Some(forced) = answer_forced_builds(&bus, &config, shutdown.clone()).await? {
        tasks.push(forced);
    }
    for scheduler in config
        .schedulers
        .iter()
        .filter(|s| s.kind == SchedulerKind::OnChange)
    {
        let consumer = bus.scheduler_consumer(&scheduler.name).await?;
        tasks.push(tokio::spawn(hold_and_follow(
            bus.clone(),
            scheduler.clone(),
            consumer,
            holder.clone(),
            shutdown.clone(),
        )));
    }
    shutdown.cancelled().await;
    for task in tasks {
        let _ = task.await;
    }
    Ok(())
}

/// Answers UI masters' forced builds of every builder a `force` scheduler here lists, until
/// `shutdown` fires: one scheduler master of the queue group checks the request and stores
/// it with its `requested` event. `None` when no `force` scheduler is configured here.
async fn answer_forced_builds(
    bus: &Bus,
    config: &Arc<YardConfig>,
    shutdown: CancellationToken,
) -> Result<Option<tokio::task::JoinHandle<()>>, Error> {
    let mut builders: Vec<&str> = config
        .schedulers
        .iter()
        .filter(|s| s.kind == SchedulerKind::Force)
        .flat_map(|s| s.builders.iter().map(String::as_str))
        .collect();
    builders.sort_unstable();
    builders.dedup();
    if builders.is_empty() {
        return Ok(None);
    }
    let mut subscribers = Vec::new();
    for builder in builders {
        subscribers.push(
            bus.client
                .queue_subscribe(subjects::force(builder), subjects::FORCE_QUEUE.into())
                .await
                .map_err(|e| services::bus::Error::nats("listening for forced builds", e))?,
        );
    }
    let mut requests = futures::stream::select_all(subscribers);
    let (bus, config) = (bus.clone(), Arc::clone(config));
    Ok(Some(tokio::spawn(async move {
        loop {
            let message = tokio::select! {
                message = requests.next() => message,
                _ = shutdown.cancelled() => return,
            };
            let Some(message) = message else { return };
            let Some(reply_to) = message.reply.clone() else {
                continue;
            };
            let (bus, config) = (bus.clone(), Arc::clone(&config));
            tokio::spawn(async move {
                let delivery = message
                    .headers
                    .as_ref()
                    .and_then(|headers| headers.get(subjects::FORCE_DELIVERY_HEADER))
                    .map(|value| value.as_str().to_owned());
                let reply = store_forced_build(
                    &bus,
                    &config,
                    &message.subject,
                    &message.payload,
                    delivery.as_deref(),
                )
                .await;
                if let Err(error) = bus
                    .client
                    .publish(reply_to, bus_schema::encode(&reply).into())
                    .await
                {
                    tracing::warn!(%error, "answer to a forced build not sent");
                }
            });
        }
    })))
}

/// The longest delivery (a forced build's [`subjects::FORCE_DELIVERY_HEADER`]) accepted.
const MAX_DELIVERY_BYTES: usize = 1024;

/// Checks a forced build asked on `subject` and stores it, once per `delivery` if it names
/// one.
async fn store_forced_build(
    bus: &Bus,
    config: &YardConfig,
    subject: &str,
    payload: &[u8],
    delivery: Option<&str>,
) -> ForceReply {
    let refused = |reason: String| ForceReply::Refused { reason };
    let request: BuildRequest = match bus_schema::decode(payload) {
        Ok(request) => request,
        Err(error) => {
            tokio::spawn(bus.park_dead_letter(ROLE, subject, payload, &error));
            return refused(format!("cannot decode the forced build: {error}"));
        }
    };
    if subject != subjects::force(&request.builder) {
        return refused(format!("builder {} was asked on {subject}", request.builder));
    }
    if !config.is_forceable(&request.builder) {
        return refused(format!(
            "builder {} cannot be forced: no `force` scheduler lists it",
            request.builder
        ));
    }
    if !subjects::is_valid_token(&request.build_id) {
        return refused(format!("build id {:?} is not a valid token", request.build_id));
    }
    if let Some(bad) = request
        .properties
        .keys()
        .find(|name| !services::config::is_env_name(name) || name.starts_with("YARD_"))
    {
        return refused(format!(
            "property name {bad:?} must be letters, digits and `_`, not start with a digit or YARD_"
        ));
    }
    if let Some(bad) = delivery.filter(|delivery| delivery.is_empty() || delivery.len() > MAX_DELIVERY_BYTES)
    {
        return refused(format!(
            "delivery {bad:?} must be 1 to {MAX_DELIVERY_BYTES} bytes"
        ));
    }
    match bus.store_build_request(&request, delivery).await {
        Ok(stored) => {
            tracing::debug!(build = %stored.build_id, builder = %request.builder, "forced build stored");
            ForceReply::Stored {
                sequence: stored.sequence,
                build_id: Some(stored.build_id),
            }
        }
        Err(error) => {
            tracing::warn!(build = %request.build_id, %error, "forced build not stored");
            ForceReply::NotStored {
                reason: error.to_string(),
            }
        }
    }
}

/// Waits for the scheduler's lease, follows changes while holding it, and starts waiting
/// again if it is lost.
async fn hold_and_follow(
    bus: Bus,
    scheduler: SchedulerConfig,
    consumer: consumer::PullConsumer,
    holder: String,
    shutdown: CancellationToken,
) {
    let lease_key = subjects::scheduler_consumer(&scheduler.name);
    let renew_every = Duration::from_secs(subjects::LEASE_SECONDS) / 4;
    while !shutdown.is_cancelled() {
        let mut lease = match Lease::try_acquire(&bus.leases, &lease_key, &holder).await {
            Ok(Some(lease)) => lease,
            Ok(None) => {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = shutdown.cancelled() => return,
                }
                continue;
            }
            Err(error) => {
                tracing::warn!(scheduler = %scheduler.name, %error, "cannot take the scheduler lease; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = shutdown.cancelled() => return,
                }
                continue;
            }
        };
        tracing::info!(scheduler = %scheduler.name, master = %holder, "scheduler lease taken; following changes");
        let metrics = services::metrics::SchedulerMetrics::get();
        metrics.leases_held.inc();
        let following = CancellationToken::new();
        let follower = tokio::spawn(follow_changes(
            bus.clone(),
            scheduler.clone(),
            consumer.clone(),
            following.clone(),
        ));
        let mut renewals = tokio::time::interval(renew_every);
        renewals.tick().await;
        let lost = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break false,
                _ = renewals.tick() => match lease.renew().await {
                    Ok(true) => {}
                    Ok(false) => break true,
                    Err(error) => tracing::warn!(scheduler = %scheduler.name, %error, "lease renewal failed"),
                },
            }
        };
        following.cancel();
        let _ = follower.await;
        metrics.leases_held.dec();
        if lost {
            tracing::warn!(scheduler = %scheduler.name, "scheduler lease lost to another master");
        } else {
            lease.release().await;
        }
    }
}

async fn follow_changes(
    bus: Bus,
    scheduler: SchedulerConfig,
    consumer: consumer::PullConsumer,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    while !shutdown.is_cancelled() {
        let messages = match consumer.stream().max_messages_per_batch(256).messages().await {
            Ok(messages) => messages,
            Err(error) => {
                tracing::warn!(scheduler = %scheduler.name, %error, "cannot pull changes; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.cancelled() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        let handled = messages
            .take_until(shutdown.cancelled())
            .take_while(|message| {
                if let Err(error) = message {
                    // Pull streams end on reconnects and leader changes; pull again.
                    tracing::warn!(scheduler = %scheduler.name, %error, "change stream interrupted; pulling again");
                }
                std::future::ready(message.is_ok())
            })
            .filter_map(|message| std::future::ready(message.ok()))
            .map(|message| handle_change(&bus, &scheduler, message))
            .buffer_unordered(CHANGES_IN_FLIGHT);
        handled.for_each(|()| std::future::ready(())).await;
    }
}

async fn handle_change(bus: &Bus, scheduler: &SchedulerConfig, message: async_nats::jetstream::Message) {
    let change: Change = match bus_schema::decode(&message.payload) {
        Ok(change) => change,
        Err(error) => {
            // Dropped only once its copy is parked; else it comes back later.
            let reject = match bus
                .park_dead_letter(ROLE, &message.subject, &message.payload, &error)
                .await
            {
                Ok(()) => AckKind::Term,
                Err(_) => AckKind::Nak(Some(Duration::from_secs(10))),
            };
            let _ = message.ack_with(reject).await;
            return;
        }
    };
    let metrics = services::metrics::SchedulerMetrics::get();
    let label = services::metrics::SchedulerLabel {
        scheduler: scheduler.name.clone(),
    };
    if scheduler.accepts(&change.branch, &change.project) {
        let requests = scheduler
            .builders
            .iter()
            .map(|builder| build_request(scheduler, builder, &change));
        let stored = futures::future::join_all(requests.map(|request| async move {
            let result = bus.store_build_request(&request, None).await;
            (request, result)
        }))
        .await;
        for (request, result) in stored {
            if let Err(error) = result {
                // Not acknowledged: the change comes back and the stored requests dedupe.
                tracing::warn!(change = %change.id, builder = %request.builder, %error, "build request not stored");
                let _ = message.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await;
                return;
            }
            tracing::debug!(change = %change.id, build = %request.build_id, builder = %request.builder, "build requested");
            metrics.requests.get_or_create(&label).inc();
        }
    }
    metrics.changes.get_or_create(&label).inc();
    if let Err(error) = message.ack().await {
        tracing::debug!(change = %change.id, %error, "change ack not sent; it will be seen again");
    }
}

/// The request a change causes for one builder of one scheduler; its build id is derived
/// from the three, so processing the change again yields the same id.
pub fn build_request(scheduler: &SchedulerConfig, builder: &str, change: &Change) -> BuildRequest {
    BuildRequest {
        build_id: derived_build_id(
            &change.id,
            &scheduler.name,
            builder,
            change.received_at.as_millis(),
        ),
        builder: builder.to_owned(),
        reason: format!(
            "scheduler {}: change {} on {}",
            scheduler.name, change.id, change.branch
        ),
        properties: Default::default(),
        changes: vec![change.clone()],
        priority: 0,
        requested_at: now(),
    }
}

/// A ULID whose time part is the change's arrival and whose random part is a stable hash
/// (two FNV-1a passes) of change, scheduler and builder.
fn derived_build_id(change_id: &str, scheduler: &str, builder: &str, millis: u64) -> String {
    fn fnv1a(seed: u64, parts: &[&str]) -> u64 {
        let mut hash = seed;
        for part in parts {
            for byte in part.bytes().chain([0xff]) {
                hash ^= u64::from(byte);
                hash = hash.wrapping_mul(0x0100_0000_01b3);
            }
        }
        hash
    }
    let parts = [change_id, scheduler, builder];
    let random = (u128::from(fnv1a(0xcbf2_9ce4_8422_2325, &parts)) << 64)
        | u128::from(fnv1a(0x8422_2325_cbf2_9ce4, &parts));
    ulid::Ulid::from_parts(millis, random).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_ids_are_stable_and_distinct() {
        let a = derived_build_id("c1", "main", "demo", 1_000);
        assert_eq!(a, derived_build_id("c1", "main", "demo", 1_000));
        assert_ne!(a, derived_build_id("c1", "main", "other", 1_000));
        assert_ne!(a, derived_build_id("c1", "nightly", "demo", 1_000));
        assert_ne!(a, derived_build_id("c2", "main", "demo", 1_000));
        assert!(bus_schema::subjects::is_valid_token(&a));
    }
}
