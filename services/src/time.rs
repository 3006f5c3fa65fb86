//! The wall clock, as bus timestamps.

use bus_schema::Timestamp;

/// Now, in milliseconds since the Unix epoch.
pub fn now() -> Timestamp {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp(since_epoch.as_millis() as u64)
}
