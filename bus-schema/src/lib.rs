//! The Yardmaster bus: every subject, stream, bucket and message type, plus the protocol version.
//!
//! **Architecture Invariant:** this crate knows nothing about connections, runtimes or files.
//! It is serde types, subject-building functions, the MessagePack codec and the pure fold
//! that turns build events into build state. Every service depends on it; it depends on no
//! service.

pub mod build;
pub mod codec;
pub mod messages;
pub mod subjects;
pub mod time;

pub use build::{BuildRecord, BuildResult, BuildState, StepRecord, StepResult, StepState};
pub use codec::{agent_refusal, decode, decode_object, encode, encode_as, protocol_of, DecodeError};
pub use messages::*;
pub use time::Timestamp;

/// Version of the bus protocol. Every message carries it; a peer refuses messages from an
/// incompatible major version instead of misreading them.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest bus message a role reads: [`decode`] refuses a larger one unread, and the role parks
/// it as a dead letter. nats-server's default `max_payload`, so no message Yardmaster writes
/// to a default server is ever refused; a server allowing larger payloads (up to 64 MiB)
/// cannot make a role read one.
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// What an agent answers `Busy` with, instead of a build id, while its machine runs a build
/// of another deployment.
pub const BUSY_ELSEWHERE: &str = "another-deployment";

/// Oldest nats-server release that has what Yardmaster relies on (per-key TTL, KV limit markers).
pub const MIN_NATS_SERVER_VERSION: (u64, u64, u64) = (2, 11, 0);
