//! MessagePack encoding of bus messages inside a versioned envelope.

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::{MAX_MESSAGE_BYTES, PROTOCOL_VERSION};

/// Why a payload taken off the bus could not be used.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not a Yardmaster message: {0}")]
    Malformed(#[from] rmp_serde::decode::Error),
    #[error("protocol version {found} is not supported (this build speaks {supported})")]
    IncompatibleVersion { found: u32, supported: u32 },
    #[error("message of {size} bytes is larger than the limit of {max} bytes")]
    TooLarge { size: usize, max: usize },
}

#[derive(Serialize)]
struct EnvelopeRef<'a, T> {
    v: u32,
    m: &'a T,
}

/// The body of an envelope whose version was already checked.
#[derive(Deserialize)]
struct Envelope<T> {
    m: T,
}

#[derive(Deserialize)]
struct VersionOnly {
    v: u32,
}

/// Encodes a message for the bus: MessagePack with named fields, so that fields can be added
/// without breaking older readers.
pub fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    encode_as(message, PROTOCOL_VERSION)
}

/// Encodes a message announcing protocol `version` (an agent started with another protocol
/// version, to see how masters refuse it).
pub fn encode_as<T: Serialize>(message: &T, version: u32) -> Vec<u8> {
    let envelope = EnvelopeRef {
        v: version,
        m: message,
    };
    // Serializing plain data structs into a Vec cannot fail: no maps with non-string keys
    // and no I/O are involved.
    rmp_serde::to_vec_named(&envelope).expect("bus messages always serialize")
}

/// The protocol version a bus message was written with.
pub fn protocol_of(payload: &[u8]) -> Result<u32, DecodeError> {
    let version: VersionOnly = rmp_serde::from_slice(payload)?;
    Ok(version.v)
}

/// Why masters speaking [`PROTOCOL_VERSION`] refuse an agent speaking `agent_protocol`, if
/// they do.
pub fn agent_refusal(agent_protocol: u32) -> Option<String> {
    (agent_protocol != PROTOCOL_VERSION).then(|| {
        format!(
            "refused: the agent speaks protocol {agent_protocol}, the masters speak protocol \
             {PROTOCOL_VERSION}; run agent and masters of matching releases"
        )
    })
}

/// Decodes a message from the bus, refusing one larger than [`MAX_MESSAGE_BYTES`] and other
/// protocol versions before looking at the body.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, DecodeError> {
    if payload.len() > MAX_MESSAGE_BYTES {
        return Err(DecodeError::TooLarge {
            size: payload.len(),
            max: MAX_MESSAGE_BYTES,
        });
    }
    decode_object(payload)
}

/// Decodes a stored object (a view snapshot) written with [`encode`]: like [`decode`], but
/// without the size limit of a bus message.
pub fn decode_object<T: DeserializeOwned>(payload: &[u8]) -> Result<T, DecodeError> {
    let version: VersionOnly = rmp_serde::from_slice(payload)?;
    if version.v != PROTOCOL_VERSION {
        return Err(DecodeError::IncompatibleVersion {
            found: version.v,
            supported: PROTOCOL_VERSION,
        });
    }
    let envelope: Envelope<T> = rmp_serde::from_slice(payload)?;
    Ok(envelope.m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::CancelRequest;

    #[test]
    fn round_trips_a_message() {
        let cancel = CancelRequest {
            build_id: "01J0".into(),
            requested_by: "alice".into(),
        };
        let decoded: CancelRequest = decode(&encode(&cancel)).unwrap();
        assert_eq!(decoded, cancel);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for garbage in [&b""[..], b"\xff\xff", b"hello world", b"\x81\xa1v\x01"] {
            assert!(decode::<CancelRequest>(garbage).is_err());
        }
    }

    #[test]
    fn an_oversized_message_is_refused_unread() {
        let cancel = CancelRequest {
            build_id: "x".repeat(MAX_MESSAGE_BYTES),
            requested_by: "alice".into(),
        };
        let payload = encode(&cancel);
        match decode::<CancelRequest>(&payload) {
            Err(DecodeError::TooLarge { size, max }) => {
                assert_eq!((size, max), (payload.len(), MAX_MESSAGE_BYTES));
            }
            other => panic!("expected a size error, got {other:?}"),
        }
        assert_eq!(decode_object::<CancelRequest>(&payload).unwrap(), cancel);
    }

    #[test]
    fn a_force_reply_without_a_build_id_still_decodes() {
        use crate::messages::ForceReply;
        /// `ForceReply::Stored` as schedulers that predate its `build_id` encode it.
        #[derive(Serialize)]
        enum OldForceReply {
            Stored { sequence: u64 },
        }
        let old = encode(&OldForceReply::Stored { sequence: 7 });
        assert_eq!(
            decode::<ForceReply>(&old).unwrap(),
            ForceReply::Stored {
                sequence: 7,
                build_id: None
            }
        );
        let new = ForceReply::Stored {
            sequence: 7,
            build_id: Some("01J0".into()),
        };
        assert_eq!(decode::<ForceReply>(&encode(&new)).unwrap(), new);
    }

    #[test]
    fn another_protocol_version_is_refused() {
        let payload = rmp_serde::to_vec_named(&EnvelopeRef { v: 99, m: &1u8 }).unwrap();
        match decode::<u8>(&payload) {
            Err(DecodeError::IncompatibleVersion { found: 99, .. }) => {}
            other => panic!("expected a version error, got {other:?}"),
        }
    }
}
