//! Following a KV bucket: the current entries first, then every change, surviving reconnects.

use std::collections::HashSet;
use std::time::Duration;

use async_nats::jetstream::kv;
use futures::StreamExt;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// One change in a watched bucket.
pub enum BucketChange {
    Put { key: String, value: bytes::Bytes },
    Removed { key: String },
}

/// How long a watch of a bucket without heartbeats (cancels, waits, pools) may hear nothing
/// before [`follow_bucket`] restarts it. Buckets whose entries are refreshed regularly use
/// their refresh period instead.
pub const QUIET_BUCKET_RESTART_AFTER: Duration = Duration::from_secs(60);

/// Spawns a task that calls `on_change` for every entry of `store` and every later change,
/// until `stop` fires. The returned receiver resolves once the entries present at the start
/// have been delivered. Watchers can die across reconnects, and can stall without a word
/// when a NATS node fails over, so the task restarts its watch with backoff after an error
/// and after `restart_after_silence` without a change. A restart replays the current entries
/// (which `on_change` must tolerate) and then reports as removed every key it had reported
/// that the replay no longer holds, so nothing missed while the watch was down, an
/// expired entry included, stays in a follower's picture.
pub fn follow_bucket(
    store: kv::Store,
    stop: CancellationToken,
    restart_after_silence: Duration,
    mut on_change: impl FnMut(BucketChange) + Send + 'static,
) -> oneshot::Receiver<()> {
    let (ready_tx, ready_rx) = oneshot::channel();
    tokio::spawn(async move {
        let mut ready = Some(ready_tx);
        let mut backoff = Duration::from_millis(100);
        // Keys reported present, and (during a replay) those the replay has told about.
        let mut present: HashSet<String> = HashSet::new();
        while !stop.is_cancelled() {
            let watch = async {
                // The stream's info now: `Store::status` answers what it was when opened.
                let empty = store.stream.clone().info().await?.state.messages == 0;
                let watch = store.watch_with_history(">").await?;
                Ok::<_, async_nats::Error>((empty, watch))
            };
            let (empty, mut watch) = match watch.await {
                Ok(started) => started,
                Err(error) => {
                    tracing::warn!(bucket = %store.name, %error, "cannot watch bucket; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            // Until the replay ends, the keys reported before it that it has not told about.
            let mut unconfirmed = Some(std::mem::take(&mut present));
            if empty {
                end_replay(&mut unconfirmed, &mut on_change);
                if let Some(ready) = ready.take() {
                    let _ = ready.send(());
                }
            }
            loop {
                let entry = tokio::select! {
                    entry = watch.next() => entry,
                    _ = tokio::time::sleep(restart_after_silence) => {
                        tracing::debug!(bucket = %store.name, "bucket watch went quiet; restarting it");
                        break;
                    }
                    _ = stop.cancelled() => return,
                };
                match entry {
                    Some(Ok(entry)) => {
                        if let Some(unconfirmed) = unconfirmed.as_mut() {
                            unconfirmed.remove(&entry.key);
                        }
                        let change = match entry.operation {
                            kv::Operation::Put => {
                                present.insert(entry.key.clone());
                                BucketChange::Put {
                                    key: entry.key,
                                    value: entry.value,
                                }
                            }
                            kv::Operation::Delete | kv::Operation::Purge => {
                                present.remove(&entry.key);
                                BucketChange::Removed { key: entry.key }
                            }
                        };
                        on_change(change);
                        if entry.delta == 0 {
                            end_replay(&mut unconfirmed, &mut on_change);
                            if let Some(ready) = ready.take() {
                                let _ = ready.send(());
                            }
                        }
                    }
                    Some(Err(error)) => {
                        tracing::warn!(bucket = %store.name, %error, "bucket watch failed; restarting it");
                        break;
                    }
                    None => break,
                }
            }
            // A replay cut short: what it did not confirm is still believed present.
            present.extend(unconfirmed.into_iter().flatten());
        }
    });
    ready_rx
}

/// Ends a [`follow_bucket`] replay: the keys reported before it that it did not hold are gone.
fn end_replay(unconfirmed: &mut Option<HashSet<String>>, on_change: &mut impl FnMut(BucketChange)) {
    for key in unconfirmed.take().into_iter().flatten() {
        on_change(BucketChange::Removed { key });
    }
}

/// Where [`follow_stream`] starts.
#[derive(Debug, Clone, Copy)]
pub enum StreamStart {
    /// From the first message stored.
    Beginning,
    /// From the messages stored after the follower starts.
    New,
    /// From the message after this sequence (what a snapshot already holds).
    After(u64),
}

/// How long a [`follow_stream`] follower may hear nothing before it asks the server about its
/// consumer. An ordered consumer can stall without a word when a NATS node fails over (seen
/// with the consumer's node killed in a cluster: no message, no error, for minutes). A
/// consumer the server no longer has, one holding messages it has not delivered, or one that
/// delivered messages the follower never received, is replaced by a new one that resumes
/// right after the last message applied, so nothing is skipped. A consumer that is merely quiet (its filter matches nothing new) is kept: a new
/// filtered consumer makes the server scan every message stored since the last match, which on
/// a busy stream stalls its writes.
pub const FOLLOWER_CHECK_AFTER_SILENCE: Duration = Duration::from_secs(10);

/// Spawns a task that follows `stream_name` (only `filter` subjects, when given) with an
/// ordered consumer and calls `apply` with each message's stream sequence, subject and payload, until
/// `stop` fires. When the consumer is interrupted (reconnects, leader changes), or has been
/// silent for `check_after_silence` and the server says it is gone or behind (see
/// [`FOLLOWER_CHECK_AFTER_SILENCE`]), it resumes right after the last message applied, so
/// nothing is skipped. The returned receiver resolves once the follower is consuming.
pub fn follow_stream(
    bus: crate::Bus,
    stream_name: &'static str,
    filter: Option<&'static str>,
    start: StreamStart,
    check_after_silence: Duration,
    stop: CancellationToken,
    mut apply: impl FnMut(u64, &str, &[u8]) + Send + 'static,
) -> oneshot::Receiver<()> {
    use async_nats::jetstream::consumer;
    let (ready_tx, ready_rx) = oneshot::channel();
    tokio::spawn(async move {
        let mut ready = Some(ready_tx);
        let mut backoff = Duration::from_millis(100);
        // Where the follower resumes: after this sequence, or from the first message.
        let mut resume_after: Option<u64> = match start {
            StreamStart::Beginning | StreamStart::New => None,
            StreamStart::After(sequence) => Some(sequence),
        };
        let mut starts_new = matches!(start, StreamStart::New);
        while !stop.is_cancelled() {
            let messages = async {
                let mut stream = bus.stream(stream_name).await?;
                if starts_new {
                    // "New" pinned to a sequence, so that a restart before the first message
                    // skips nothing stored since the follower started.
                    let info = stream
                        .info()
                        .await
                        .map_err(|e| crate::bus::Error::nats(format!("reading {stream_name}"), e))?;
                    resume_after = Some(info.state.last_sequence);
                    starts_new = false;
                }
                let deliver_policy = match resume_after {
                    Some(sequence) => consumer::DeliverPolicy::ByStartSequence {
                        start_sequence: sequence + 1,
                    },
                    None => consumer::DeliverPolicy::All,
                };
                let consumer = stream
                    .create_consumer(consumer::pull::OrderedConfig {
                        filter_subject: filter.unwrap_or_default().to_owned(),
                        deliver_policy,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| crate::bus::Error::nats(format!("following {stream_name}"), e))?;
                let name = consumer.cached_info().name.clone();
                let messages = consumer
                    .messages()
                    .await
                    .map_err(|e| crate::bus::Error::nats(format!("following {stream_name}"), e))?;
                Ok::<_, crate::bus::Error>((stream, name, messages))
            };
            let (stream, consumer_name, mut messages) = match messages.await {
                Ok(following) => following,
                Err(error) => {
                    tracing::warn!(stream = stream_name, %error, "cannot follow stream; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            if let Some(ready) = ready.take() {
                let _ = ready.send(());
            }
            // The consumer sequence of the last message received from this consumer.
            let mut received = 0;
            loop {
                let message = tokio::select! {
                    message = messages.next() => message,
                    _ = tokio::time::sleep(check_after_silence) => {
                        if consumer_caught_up(&stream, &consumer_name, received).await {
                            continue;
                        }
                        tracing::debug!(stream = stream_name, "stream follower's consumer is gone or behind; restarting it");
                        // Gone by itself once inactive.
                        let stream = stream.clone();
                        let consumer_name = consumer_name.clone();
                        tokio::spawn(async move { stream.delete_consumer(&consumer_name).await });
                        break;
                    }
                    _ = stop.cancelled() => return,
                };
                match message {
                    Some(Ok(message)) => {
                        let sequences = message
                            .info()
                            .ok()
                            .map(|info| (info.stream_sequence, info.consumer_sequence));
                        let sequence = match sequences {
                            Some((stream_sequence, consumer_sequence)) => {
                                received = consumer_sequence;
                                stream_sequence
                            }
                            None => resume_after.map_or(0, |s| s + 1),
                        };
                        apply(sequence, &message.subject, &message.payload);
                        resume_after = Some(sequence);
                    }
                    Some(Err(error)) => {
                        tracing::debug!(stream = stream_name, %error, "stream follower interrupted; resuming");
                        break;
                    }
                    None => break,
                }
            }
        }
    });
    ready_rx
}

/// Whether the server still has consumer `name` of `stream`, with nothing left to deliver
/// and nothing delivered after consumer sequence `received` (the last message the follower
/// got): a follower quiet because nothing new matches its filter, not one that stalled on
/// either side.
async fn consumer_caught_up(
    stream: &async_nats::jetstream::stream::Stream,
    name: &str,
    received: u64,
) -> bool {
    match tokio::time::timeout(Duration::from_secs(5), stream.consumer_info(name)).await {
        Ok(Ok(info)) => info.num_pending == 0 && info.delivered.consumer_sequence <= received,
        _ => false,
    }
}

/// A bucket's entries kept in memory by [`mirror_bucket`], by key.
pub type Mirror<T> = std::sync::Arc<std::sync::RwLock<std::collections::BTreeMap<String, T>>>;

/// Keeps `mirror` of bucket `store` of `bus` in step with it: every entry, decoded with
/// `decode`, under its key, removed when the key is. Entries that fail to decode are left out
/// and parked as dead letters rejected by `role`. See [`follow_bucket`] for
/// `restart_after_silence`.
pub fn mirror_bucket<T: Send + Sync + 'static>(
    mirror: &Mirror<T>,
    (bus, role): (&crate::Bus, &'static str),
    store: kv::Store,
    stop: CancellationToken,
    restart_after_silence: Duration,
    decode: fn(&bytes::Bytes) -> Result<T, bus_schema::DecodeError>,
) {
    let map = std::sync::Arc::clone(mirror);
    let bucket = store.name.clone();
    let bus = bus.clone();
    let _ready = follow_bucket(store, stop, restart_after_silence, move |change| {
        let mut map = map.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        match change {
            BucketChange::Put { key, value } => match decode(&value) {
                Ok(entry) => {
                    map.insert(key, entry);
                }
                Err(error) => {
                    let subject = bus_schema::subjects::kv_key(&bucket, &key);
                    tokio::spawn(bus.park_dead_letter(role, &subject, &value, &error));
                }
            },
            BucketChange::Removed { key } => {
                map.remove(&key);
            }
        }
    });
}

/// A [`mirror_bucket`] decoder for bus messages.
pub fn decoded<T: serde::de::DeserializeOwned>(value: &bytes::Bytes) -> Result<T, bus_schema::DecodeError> {
    bus_schema::decode(value)
}

/// A [`mirror_bucket`] decoder that keeps values as they are, once they are known to be bus
/// messages (of this protocol version, not oversized); each reader decodes its own type.
pub fn raw(value: &bytes::Bytes) -> Result<bytes::Bytes, bus_schema::DecodeError> {
    bus_schema::decode::<serde::de::IgnoredAny>(value)?;
    Ok(value.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_entries_must_be_bus_messages() {
        let record = bus_schema::encode(&bus_schema::PoolRecord {
            role: "db".into(),
            servers: vec!["db-1".into()],
        });
        assert!(raw(&record.into()).is_ok());
        for garbage in [&b"garbage"[..], b"", b"\x81\xa1v\x01"] {
            assert!(raw(&bytes::Bytes::from_static(garbage)).is_err());
        }
    }
}
