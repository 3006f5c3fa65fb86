//! A master's presence on the bus: its record in the masters bucket, refreshed by heartbeats,
//! and its control subject, on which a drain request starts a graceful shutdown.

use std::sync::{Arc, Mutex};

use bus_schema::{subjects, MasterCommand, MasterRecord, MasterState, PROTOCOL_VERSION};
use futures::StreamExt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::time::now;
use crate::{Bus, YardConfig};

/// The role naming the masters' shared presence in dead letters and metrics.
const ROLE: &str = "master";

/// The id this master goes by: `[masters] id`, else `<host>-<random>`.
pub fn master_id(config: &YardConfig) -> String {
    if let Some(id) = &config.masters.id {
        return id.clone();
    }
    let host: String = host_name()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    let random = ulid::Ulid::new().to_string();
    format!("{host}-{}", &random[random.len() - 8..]).to_lowercase()
}

pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Publishes this master's record until `stop` fires, then removes it. A drain request on the
/// control subject, or `shutdown` firing by itself, marks the master `draining`; a drain
/// request also fires `shutdown`.
pub fn spawn(
    bus: Bus,
    config: &YardConfig,
    roles: Vec<String>,
    metrics_url: Option<String>,
    shutdown: CancellationToken,
    stop: CancellationToken,
) -> JoinHandle<()> {
    let started_at = now();
    let record = Arc::new(Mutex::new(MasterRecord {
        id: master_id(config),
        roles,
        version: env!("CARGO_PKG_VERSION").into(),
        protocol: PROTOCOL_VERSION,
        host: host_name(),
        state: MasterState::Active,
        definitions: config.definition_digests(),
        started_at,
        heartbeat_at: started_at,
        metrics_url,
    }));
    let heartbeat = config.masters.heartbeat;
    warn_about_conflicts(&bus, &record, config.masters.dead_after, stop.clone());
    tokio::spawn(async move {
        let id = record.lock().map(|r| r.id.clone()).unwrap_or_default();
        let mut control = match bus.client.subscribe(subjects::master_control(&id)).await {
            Ok(subscriber) => Some(subscriber),
            Err(error) => {
                tracing::warn!(%error, "cannot listen for drain requests");
                None
            }
        };
        let mut ticker = tokio::time::interval(heartbeat);
        let mut draining_published = false;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = ticker.tick() => {}
                _ = shutdown.cancelled(), if !draining_published => {}
                Some(message) = next_control(&mut control) => {
                    let reply = match bus_schema::decode::<MasterCommand>(&message.payload) {
                        Ok(MasterCommand::Drain) => {
                            tracing::info!(master = %id, "drain requested");
                            shutdown.cancel();
                            "draining".to_owned()
                        }
                        Err(error) => {
                            tokio::spawn(bus.park_dead_letter(ROLE, &message.subject, &message.payload, &error));
                            format!("refused: {error}")
                        }
                    };
                    if let Some(reply_to) = message.reply {
                        // Answer after the draining record is stored, below.
                        publish(&bus, &record, &shutdown).await;
                        let _ = bus.client.publish(reply_to, reply.into()).await;
                    }
                }
            }
            if shutdown.is_cancelled() {
                draining_published = true;
            }
            publish(&bus, &record, &shutdown).await;
        }
        if let Err(error) = bus.masters.delete(&id).await {
            tracing::debug!(%error, "master record not removed");
        }
    })
}

/// Logs a warning whenever another master runs a scheduler or builder of the same name with a
/// different definition (once per peer and name).
fn warn_about_conflicts(
    bus: &Bus,
    record: &Arc<Mutex<MasterRecord>>,
    config_dead_after: std::time::Duration,
    stop: CancellationToken,
) {
    let (own_id, own) = match record.lock() {
        Ok(record) => (record.id.clone(), record.definitions.clone()),
        Err(_) => return,
    };
    let mut reported = std::collections::HashSet::new();
    let parker = bus.clone();
    let _ready = crate::watch::follow_bucket(bus.masters.clone(), stop, config_dead_after, move |change| {
        let crate::watch::BucketChange::Put { key, value } = change else {
            return;
        };
        if key == own_id {
            return;
        }
        let peer = match bus_schema::decode::<MasterRecord>(&value) {
            Ok(peer) => peer,
            Err(error) => {
                let subject = subjects::kv_key(subjects::MASTERS_BUCKET, &key);
                tokio::spawn(parker.park_dead_letter(ROLE, &subject, &value, &error));
                return;
            }
        };
        for (name, digest) in &peer.definitions {
            if own.get(name).is_some_and(|mine| mine != digest)
                && reported.insert((peer.id.clone(), name.clone()))
            {
                tracing::warn!(
                    master = %own_id,
                    peer = %peer.id,
                    definition = %name,
                    "another master defines this differently: builds may differ depending on which master takes them"
                );
            }
        }
    });
}

async fn next_control(control: &mut Option<async_nats::Subscriber>) -> Option<async_nats::Message> {
    match control {
        Some(subscriber) => subscriber.next().await,
        None => std::future::pending().await,
    }
}

async fn publish(bus: &Bus, record: &Mutex<MasterRecord>, shutdown: &CancellationToken) {
    let (id, payload) = {
        let Ok(mut record) = record.lock() else { return };
        record.heartbeat_at = now();
        if shutdown.is_cancelled() {
            record.state = MasterState::Draining;
        }
        (record.id.clone(), bus_schema::encode(&*record))
    };
    if let Err(error) = bus.masters.put(&id, payload.into()).await {
        tracing::warn!(%error, "master heartbeat not stored");
    }
}
