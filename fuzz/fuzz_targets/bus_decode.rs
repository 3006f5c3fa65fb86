//! Arbitrary bytes taken off the bus, decoded as every bus message type: decoding answers Ok or
//! Err and never panics, whatever decodes encodes and decodes again to an equal value, and a
//! decoded build event folds into a build record without panicking.
#![no_main]

use std::fmt::Debug;

use bus_schema::{
    AgentCommand, AgentRecord, AgentReply, BuildEvent, BuildEventKind, BuildRecord, BuildRequest,
    BuildResult, BuildState, CancelRequest, Change, EngineWaits, ForceReply, LeaseRecord, LogChunk, LogLine, LogStream,
    MasterCommand, MasterRecord, MasterState, PlannedStep, PoolHolder, PoolQueue, PoolRecord, PoolWaiter,
    ServerHolds, StepAssignment, StepRecord, StepResult, StepState, Timestamp, WaitRecord,
};
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Decodes `data` as a `T`; if that works, the value must survive an encode/decode round trip.
fn round_trip<T>(data: &[u8]) -> Option<T>
where
    T: DeserializeOwned + Serialize + PartialEq + Debug,
{
    let message = bus_schema::decode::<T>(data).ok()?;
    let encoded = bus_schema::encode(&message);
    let again = bus_schema::decode::<T>(&encoded)
        .unwrap_or_else(|error| panic!("{message:?} encoded but does not decode: {error}"));
    assert_eq!(again, message, "round trip changed the message");
    Some(message)
}

fuzz_target!(|data: &[u8]| {
    let _ = bus_schema::protocol_of(data);

    round_trip::<Change>(data);
    round_trip::<BuildRequest>(data);
    round_trip::<PlannedStep>(data);
    round_trip::<BuildEventKind>(data);
    round_trip::<AgentRecord>(data);
    round_trip::<StepAssignment>(data);
    round_trip::<AgentCommand>(data);
    round_trip::<AgentReply>(data);
    round_trip::<LogStream>(data);
    round_trip::<LogLine>(data);
    round_trip::<LogChunk>(data);
    round_trip::<CancelRequest>(data);
    round_trip::<MasterState>(data);
    round_trip::<MasterRecord>(data);
    round_trip::<MasterCommand>(data);
    round_trip::<ForceReply>(data);
    round_trip::<LeaseRecord>(data);
    round_trip::<WaitRecord>(data);
    round_trip::<EngineWaits>(data);
    round_trip::<PoolRecord>(data);
    round_trip::<PoolHolder>(data);
    round_trip::<ServerHolds>(data);
    round_trip::<PoolWaiter>(data);
    round_trip::<PoolQueue>(data);
    round_trip::<BuildState>(data);
    round_trip::<BuildResult>(data);
    round_trip::<StepState>(data);
    round_trip::<StepResult>(data);
    round_trip::<StepRecord>(data);
    round_trip::<bus_schema::build::RetryRecord>(data);
    round_trip::<BuildRecord>(data);
    round_trip::<Timestamp>(data);

    // What every engine and UI master does with an event: fold it into the build's record.
    if let Some(event) = round_trip::<BuildEvent>(data) {
        let mut record = BuildRecord::placeholder(&event.build_id, event.at);
        record.apply(&event);
        record.apply(&event);
    }
});
