//! The agent's entry in the agents bucket: written at start, on every change of occupancy and
//! on every heartbeat, by one task so that writes never overtake each other.

use std::sync::Arc;
use std::time::Duration;

use bus_schema::AgentRecord;
use bytes::Bytes;
use services::time::now;
use tokio_util::sync::CancellationToken;

use crate::Agent;

fn record(agent: &Agent) -> AgentRecord {
    AgentRecord {
        name: agent.settings.name.clone(),
        labels: agent.settings.labels.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
        protocol: agent.settings.protocol,
        session: agent.session.clone(),
        benchmark: agent.benchmark,
        busy_with: agent.busy_with(),
        busy_elsewhere: agent.machine.serves_another(&agent.settings.instance),
        started_at: bus_schema::Timestamp(
            ulid::Ulid::from_string(&agent.session).map_or(0, |u| u.timestamp_ms()),
        ),
        heartbeat_at: now(),
    }
}

pub(crate) async fn publish(agent: &Agent) -> Result<(), services::bus::Error> {
    let payload = Bytes::from(bus_schema::encode_as(&record(agent), agent.settings.protocol));
    agent
        .bus
        .agents
        .put(&agent.settings.name, payload)
        .await
        .map_err(|e| services::bus::Error::nats("writing the agent record", e))?;
    Ok(())
}

/// Follows the masters registry and says in the log, once per master, when a master speaks
/// another protocol version: that master refuses this agent, and no work comes from it.
pub(crate) fn watch_for_refusal(agent: &Agent, stop: CancellationToken) {
    let own = agent.settings.protocol;
    let mut reported = std::collections::HashSet::new();
    let _ready = services::watch::follow_bucket(
        agent.bus.masters.clone(),
        stop,
        services::watch::QUIET_BUCKET_RESTART_AFTER,
        move |change| {
            let services::watch::BucketChange::Put { key, value } = change else {
                return;
            };
            let Ok(theirs) = bus_schema::protocol_of(&value) else {
                return;
            };
            if theirs != own && reported.insert(key.clone()) {
                tracing::error!(
                    master = %key,
                    master_protocol = theirs,
                    agent_protocol = own,
                    "refused by master {key}: it speaks protocol {theirs}, this agent speaks protocol {own}; \
                     no work comes from it until agent and masters run matching releases"
                );
            }
        },
    );
}

/// Occupancy changes published closer together than this are merged into one write: an
/// agent running many short builds would otherwise write its record twice per build.
const OCCUPANCY_COALESCE: Duration = Duration::from_millis(50);

/// Publishes the record on every heartbeat tick and soon after occupancy changes (at once,
/// unless the last change was written less than [`OCCUPANCY_COALESCE`] ago).
pub(crate) async fn heartbeat(agent: Arc<Agent>, stop: CancellationToken) {
    let mut ticker = tokio::time::interval(agent.settings.heartbeat);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Another deployment taking or freeing the machine changes what this one should see.
    let mut machine = agent.machine.serving.subscribe();
    let mut last_change_written = tokio::time::Instant::now() - OCCUPANCY_COALESCE;
    loop {
        let changed = tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => false,
            _ = agent.occupancy_changed.notified() => true,
            Ok(()) = machine.changed() => true,
        };
        if changed {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep_until(last_change_written + OCCUPANCY_COALESCE) => {}
            }
            last_change_written = tokio::time::Instant::now();
        }
        if let Err(error) = publish(&agent).await {
            // The next tick tries again; NATS may be reconnecting.
            tracing::warn!(%error, "heartbeat not stored");
        }
    }
}

pub(crate) async fn deregister(agent: &Agent) {
    if let Err(error) = agent.bus.agents.delete(&agent.settings.name).await {
        tracing::warn!(%error, "cannot deregister the agent");
    }
}
