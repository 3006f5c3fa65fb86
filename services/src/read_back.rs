//! Reading back every message stored under one subject filter (one build's events, one
//! step's log) without creating a consumer: JetStream batch direct gets, which any replica
//! may answer, completed from the stream leader (asked for what follows the last message
//! read, until it has nothing more), so that a replica behind it never yields a partial
//! history.
//!
//! The leader is only ever asked for the next message after a sequence: the server finds
//! that through its per-subject index. Asking it for the last message under a wildcard
//! filter walks back every message block since that message, which on a long-lived stream
//! turned every read of an older build into a scan.
//!
//! **Architecture Invariant:** a read creates nothing on the server. Consumers are a limited
//! resource per stream (nats-server refuses more than its limit), and a reader killed halfway
//! must leave nothing behind.

use std::time::Duration;

use async_nats::jetstream::{self, stream::LastRawMessageErrorKind};
use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;

/// How long one batch may take to arrive, message after message, before the leader is asked
/// for the rest instead. A replica that is current answers within milliseconds; one that is
/// catching up (a node restarted moments ago) may not answer at all, and a read must not wait
/// for it: an engine reads a build's events before it declares an agent lost.
const BATCH_TIMEOUT: Duration = Duration::from_millis(250);
/// The most messages one batch asks for (the server's own limit is higher).
const BATCH_SIZE: u64 = 1_000;

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
    #[error("reading from the stream leader: {0}")]
    Leader(String),
    #[error("direct get: {0}")]
    Direct(String),
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
    let leader = jetstream
        .get_stream_no_info(stream)
        .await
        .map_err(|error| ReadError::Leader(error.to_string()))?;
    let mut messages = Vec::new();
    if let Err(error) = read_from_any_replica(client, stream, filter, &mut messages).await {
        tracing::debug!(%stream, %filter, %error, "direct read incomplete; reading the rest from the leader");
    }
    // A replica behind the leader (a node catching up after a restart) misses the newest
    // messages: the leader has them, one request each, and says when there are no more.
    loop {
        let from = messages
            .last()
            .map_or(1, |last: &StoredMessage| last.sequence + 1);
        let next = leader
            .raw_message_builder()
            .sequence(from)
            .next_by_subject(filter)
            .send()
            .await;
        match next {
            Ok(message) => messages.push(StoredMessage {
                subject: message.subject.to_string(),
                sequence: message.sequence,
                payload: message.payload,
            }),
            // Nothing after it: the read is complete.
            Err(error) if error.kind() == LastRawMessageErrorKind::NoMessageFound => break,
            Err(error) => return Err(ReadError::Leader(error.to_string())),
        }
    }
    Ok(messages)
}

/// Every message under `filter`, in batches of direct gets that any replica may answer.
/// Adds what it read to `messages`, also when it fails halfway.
async fn read_from_any_replica(
    client: &async_nats::Client,
    stream: &str,
    filter: &str,
    messages: &mut Vec<StoredMessage>,
) -> Result<(), ReadError> {
    let direct = |what: String| ReadError::Direct(format!("{stream} {filter}: {what}"));
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
        .map_err(|_| {
            direct(format!(
                "no complete batch within {} ms",
                BATCH_TIMEOUT.as_millis()
            ))
        })??;
        if pending == 0 {
            return Ok(());
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
