//! This engine's waiting steps, kept in memory and written to the waits bucket as one record
//! for the whole engine: a wait costs no write of its own, however many builds wait.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bus_schema::{subjects, WaitRecord};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::Engine;

/// How often the record is written again while nothing changes (the bucket's entries expire
/// after 30 s, so a dead engine's waits go away on their own).
const REFRESH: Duration = Duration::from_secs(10);
/// How long changes gather after a write before the next one: at most this many writes a
/// second, whatever the number of waits coming and going.
const WRITE_GAP: Duration = Duration::from_millis(200);
/// The most waits one record lists (every step wait, then master-step waits up to this).
const LISTED_WAITS: usize = 1_000;

/// The engine's waiting steps, by [`subjects::wait_key`].
#[derive(Default)]
pub(crate) struct WaitBook {
    waits: Mutex<HashMap<String, WaitRecord>>,
    changed: Notify,
}

impl WaitBook {
    fn waits(&self) -> std::sync::MutexGuard<'_, HashMap<String, WaitRecord>> {
        self.waits.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn insert(&self, key: String, wait: WaitRecord) {
        self.waits().insert(key, wait);
        self.changed.notify_one();
    }

    pub(crate) fn remove(&self, key: &str) {
        if self.waits().remove(key).is_some() {
            self.changed.notify_one();
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.waits().len()
    }
}

/// Writes the engine's waits to the bucket whenever they change (merging the changes of
/// [`WRITE_GAP`]) and every [`REFRESH`], until `stop`; then removes the record.
pub(crate) async fn write_loop(engine: Arc<Engine>, stop: CancellationToken) {
    let key = subjects::engine_waits_key(&engine.id);
    let store = &engine.bus.waits;
    let mut stored_any = false;
    loop {
        tokio::select! {
            _ = engine.wait_book.changed.notified() => {}
            _ = tokio::time::sleep(REFRESH) => {}
            _ = stop.cancelled() => break,
        }
        let listed = {
            let waits = engine.wait_book.waits();
            services::waits::engine_waits(&engine.id, waits.values(), LISTED_WAITS)
        };
        let written = match (listed.waits.is_empty(), stored_any) {
            (true, false) => Ok(()),
            (true, true) => store.delete(&key).await.map_err(|error| error.to_string()),
            (false, _) => {
                let payload = bytes::Bytes::from(bus_schema::encode(&listed));
                store
                    .put(&key, payload)
                    .await
                    .map(drop)
                    .map_err(|error| error.to_string())
            }
        };
        match written {
            Ok(()) => stored_any = !listed.waits.is_empty(),
            Err(error) => {
                tracing::debug!(%error, "waits not recorded; trying again");
                engine.wait_book.changed.notify_one();
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(WRITE_GAP) => {}
            _ = stop.cancelled() => break,
        }
    }
    if let Err(error) = store.delete(&key).await {
        tracing::debug!(%error, "waits record not removed; it expires");
    }
}
