//! Reading back every message stored under one subject filter (one build's events, one
//! step's log) without creating a consumer: JetStream batch direct gets, checked against the
//! stream leader so that a lagging replica never answers with an incomplete history.
//!
//! **Architecture Invariant:** a read creates nothing on the server. Consumers are a limited
//! resource per stream (nats-server refuses more than its limit), and a reader killed halfway
//! must leave nothing behind.

use std::time::Duration;

use async_nats::jetstream::{self, stream::LastRawMessageErrorKind};
use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;

/// How long one batch may take to arrive, message after message.
const BATCH_TIMEOUT: Duration = Duration::from_secs(5);
/// The most messages one batch asks for (the server's own limit is higher).
const BATCH_SIZE: u64 = 1_000;
/// Reads that may miss the newest message (a replica behind the leader) before giving up.
const ATTEMPTS: u32 = 10;

/// One message read back from a stream.
#[derive(Debug, Clone)]
pub struct StoredMessage {
    pub subject: String,
    pub sequence: u64,
    pub payload: Bytes,
}

/// Why a read failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("asking the stream leader for the newest message: {0}")]
    Newest(String),
    #[error("direct get: {0}")]
    Direct(String),
    #[error("no complete read after {ATTEMPTS} attempts: replicas stay behind the leader")]
    Behind,
}

#[derive(Serialize)]
struct BatchRequest<'a> {
    seq: u64,
    next_by_subj: &'a str,
    batch: u64,
}

/// Every message stored in `stream` under `filter`, oldest first.
pub async fn read_all(
    client: &async_nats::Client,
    jetstream: &jetstream::Context,
    stream: &str,
    filter: &str,
) -> Result<Vec<StoredMessage>, ReadError> {
    let mut delay = Duration::from_millis(20);
    for _ in 0..ATTEMPTS {
        let Some(newest) = newest_sequence(jetstream, stream, filter).await? else {
            return Ok(Vec::new());
        };
        let messages = read_from_any_replica(client, stream, filter).await?;
        if messages.last().is_some_and(|message| message.sequence >= newest) {
            return Ok(messages);
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(500));
    }
    Err(ReadError::Behind)
}

/// The sequence of the newest message under `filter`, as the stream leader knows it.
async fn newest_sequence(
    jetstream: &jetstream::Context,
    stream: &str,
    filter: &str,
) -> Result<Option<u64>, ReadError> {
    let stream = jetstream
        .get_stream_no_info(stream)
        .await
        .map_err(|error| ReadError::Newest(error.to_string()))?;
    match stream.get_last_raw_message_by_subject(filter).await {
        Ok(message) => Ok(Some(message.sequence)),
        Err(error) if error.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(error) => Err(ReadError::Newest(error.to_string())),
    }
}

/// Every message under `filter`, in batches of direct gets that any replica may answer.
async fn read_from_any_replica(
    client: &async_nats::Client,
    stream: &str,
    filter: &str,
) -> Result<Vec<StoredMessage>, ReadError> {
    let direct = |what: String| ReadError::Direct(format!("{stream} {filter}: {what}"));
    let mut messages = Vec::new();
    let mut from = 1;
    loop {
        let inbox = client.new_inbox();
        let mut replies = client
            .subscribe(inbox.clone())
            .await
            .map_err(|error| direct(error.to_string()))?;
        let request = serde_json::to_vec(&BatchRequest {
            seq: from,
            next_by_subj: filter,
            batch: BATCH_SIZE,
        })
        .map_err(|error| direct(error.to_string()))?;
        client
            .publish_with_reply(format!("$JS.API.DIRECT.GET.{stream}"), inbox, request.into())
            .await
            .map_err(|error| direct(error.to_string()))?;
        let pending = tokio::time::timeout(BATCH_TIMEOUT, async {
            while let Some(reply) = replies.next().await {
                match reply.status.map(|status| status.as_u16()) {
                    None => messages.push(stored_message(&reply).ok_or_else(|| {
                        direct(format!("a reply without stream headers on {}", reply.subject))
                    })?),
                    // End of batch: how many more match after it.
                    Some(204) => return Ok(header_number(&reply, "Nats-Num-Pending").unwrap_or(0)),
                    Some(404) => return Ok(0),
                    Some(status) => {
                        let description = reply.description.clone().unwrap_or_default();
                        return Err(direct(format!("status {status} {description}")));
                    }
                }
            }
            Err(direct("the reply subscription ended".to_owned()))
        })
        .await
        .map_err(|_| direct(format!("no complete batch within {} s", BATCH_TIMEOUT.as_secs())))??;
        if pending == 0 {
            return Ok(messages);
        }
        match messages.last() {
            Some(last) => from = last.sequence + 1,
            None => return Err(direct("more pending after an empty batch".to_owned())),
        }
    }
}

fn stored_message(reply: &async_nats::Message) -> Option<StoredMessage> {
    let subject = reply.headers.as_ref()?.get("Nats-Subject")?.as_str().to_owned();
    Some(StoredMessage {
        subject,
        sequence: header_number(reply, "Nats-Sequence")?,
        payload: reply.payload.clone(),
    })
}

fn header_number(reply: &async_nats::Message, name: &str) -> Option<u64> {
    reply.headers.as_ref()?.get(name)?.as_str().parse().ok()
}
