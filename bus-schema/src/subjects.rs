//! Names of every stream, consumer, bucket and subject on the bus, built in one place.
//!
//! Subjects are dot-separated tokens; every token built from user data (build ids, agent
//! names) is checked by [`is_valid_token`] where it enters the system.

/// Stream of change events (pushes, merge requests, generic changes). Limits retention:
/// every scheduler reads every change through its own durable consumer.
pub const CHANGES_STREAM: &str = "YARD_CHANGES";
/// Stream of build requests. Work-queue retention: a fetched message is a claim.
pub const REQUESTS_STREAM: &str = "YARD_REQUESTS";
/// Stream of build events; build state is a fold over them.
pub const EVENTS_STREAM: &str = "YARD_EVENTS";
/// Stream of step log chunks.
pub const LOGS_STREAM: &str = "YARD_LOGS";

/// The one durable pull consumer that every engine master shares on [`REQUESTS_STREAM`].
pub const ENGINES_CONSUMER: &str = "engines";

/// KV bucket of registered agents, keyed by agent name.
pub const AGENTS_BUCKET: &str = "yard-agents";
/// KV bucket of cancel requests, keyed by build id.
pub const CANCELS_BUCKET: &str = "yard-cancels";
/// KV bucket of waiting steps: one [`crate::EngineWaits`] per engine, keyed by
/// [`engine_waits_key`].
pub const WAITS_BUCKET: &str = "yard-waits";
/// KV bucket of resource pools: `pool.<role>` definitions, `server.<name>` acquisitions and
/// `queue.<role>` waiters.
pub const POOLS_BUCKET: &str = "yard-pools";

pub fn pool_key(role: &str) -> String {
    format!("pool.{role}")
}

pub fn pool_server_key(server: &str) -> String {
    format!("server.{server}")
}

pub fn pool_queue_key(role: &str) -> String {
    format!("queue.{role}")
}

/// KV bucket of running masters, keyed by master id.
pub const MASTERS_BUCKET: &str = "yard-masters";
/// KV bucket of scheduler leases, keyed by scheduler consumer name; entries expire after
/// [`LEASE_SECONDS`] without renewal.
pub const LEASES_BUCKET: &str = "yard-leases";
/// How long a scheduler lease lasts without renewal.
pub const LEASE_SECONDS: u64 = 10;
/// Object store of UI masters' view snapshots, so that a restart replays only the tail.
pub const SNAPSHOTS_BUCKET: &str = "yard-snapshots";
/// Object store of toolkits: one object `NAME@VERSION` per published toolkit.
pub const TOOLKITS_BUCKET: &str = "yard-toolkits";
/// The object holding the latest snapshot of a UI master's view.
pub const UI_VIEW_SNAPSHOT: &str = "ui-view";

pub const CHANGES_ALL: &str = "yard.change.>";
pub const REQUESTS_ALL: &str = "yard.request.>";
pub const EVENTS_ALL: &str = "yard.event.>";
pub const LOGS_ALL: &str = "yard.log.>";
/// Filter matching the step-finished events of every build, which engines follow.
pub const STEP_FINISHED_ALL: &str = "yard.event.*.step_finished";

/// Subject a change is stored under.
pub fn change(change_id: &str) -> String {
    format!("yard.change.{change_id}")
}

/// Subject a build request is stored under.
pub fn request(builder: &str) -> String {
    format!("yard.request.{}", token_or_underscore(builder))
}

/// Subject of one event of a build; `kind` is [`crate::BuildEventKind::subject_kind`].
pub fn event(build_id: &str, kind: &str) -> String {
    format!("yard.event.{build_id}.{kind}")
}

/// Filter matching every event of one build.
pub fn events_of_build(build_id: &str) -> String {
    format!("yard.event.{build_id}.*")
}

/// Deduplication id of one log chunk, so that a chunk published twice is stored once.
pub fn log_chunk_id(build_id: &str, attempt: u32, step_index: u32, seq: u32) -> String {
    format!("{build_id}.{attempt}.{step_index}.{seq}")
}

/// Subject of the log chunks of one step.
pub fn step_log(build_id: &str, step_index: u32) -> String {
    format!("yard.log.{build_id}.{step_index}")
}

/// The work subject of one agent: only that agent subscribes to it.
pub fn agent_commands(agent_name: &str) -> String {
    format!("yard.agent.{agent_name}.cmd")
}

/// Filter matching every agent's work subject.
pub const AGENT_COMMANDS_ALL: &str = "yard.agent.*.cmd";

/// Where a UI master asks the scheduler masters to store a forced build of `builder`: the
/// request carries the [`crate::BuildRequest`], the reply is a [`crate::ForceReply`]. Only
/// scheduler masters with a `force` scheduler listing the builder answer.
pub fn force(builder: &str) -> String {
    format!("yard.force.{}", token_or_underscore(builder))
}

/// Header of a [`force`] request naming the submission (an API client's `Idempotency-Key`,
/// scoped to its sender): the same key again within the events stream's duplicate window is
/// the build stored first.
pub const FORCE_DELIVERY_HEADER: &str = "Yard-Delivery";

/// Filter matching every forced-build subject.
pub const FORCE_ALL: &str = "yard.force.>";

/// Queue group of the scheduler masters answering [`force`], so that one of them stores a
/// forced build.
pub const FORCE_QUEUE: &str = "schedulers";

/// Filter matching the events of kind `kind` of every build.
pub fn events_of_kind(kind: &str) -> String {
    format!("yard.event.*.{kind}")
}

/// Key of engine `engine_id`'s waiting steps in the waits bucket.
pub fn engine_waits_key(engine_id: &str) -> String {
    format!("engine.{engine_id}")
}

/// Identifies one waiting step (`master` for the master step) among its engine's waits.
pub fn wait_key(build_id: &str, attempt: u32, step: Option<u32>) -> String {
    match step {
        Some(index) => format!("{build_id}.{attempt}.{index}"),
        None => format!("{build_id}.{attempt}.master"),
    }
}

/// The control subject of one master (drain requests).
pub fn master_control(master_id: &str) -> String {
    format!("yard.master.{master_id}.control")
}

/// Filter matching every master's control subject.
pub const MASTER_CONTROL_ALL: &str = "yard.master.*.control";

/// Where an engine answers whether it still drives a build: the request carries the build
/// id, the reply is `yes` or `no`.
pub fn engine_drives(engine_id: &str) -> String {
    format!("yard.engine.{engine_id}.drives")
}

/// Filter matching every engine's [`engine_drives`] subject.
pub const ENGINE_DRIVES_ALL: &str = "yard.engine.*.drives";

/// Where agents hand an engine the ends of the steps it asked them to run (see
/// `StepAssignment::report_to`); the reply is a `StepEndAnswer`.
pub fn engine_step_ends(engine_id: &str) -> String {
    format!("yard.engine.{engine_id}.step_ends")
}

/// Filter matching every engine's [`engine_step_ends`] subject.
pub const ENGINE_STEP_ENDS_ALL: &str = "yard.engine.*.step_ends";

/// The inbox prefix of a connection as NATS user `user`: replies to its requests (and
/// JetStream deliveries to it) come to `_INBOX.<user>.>`, so that a server can let each user
/// read its own replies only.
pub fn inbox_prefix(user: &str) -> String {
    format!("_INBOX.{user}")
}

/// The subject under which JetStream stores `key` of KV bucket `bucket`.
pub fn kv_key(bucket: &str, key: &str) -> String {
    format!("$KV.{bucket}.{key}")
}

/// The stream behind KV bucket `bucket`.
pub fn kv_stream(bucket: &str) -> String {
    format!("KV_{bucket}")
}

/// The stream behind object store `bucket`.
pub fn object_stream(bucket: &str) -> String {
    format!("OBJ_{bucket}")
}

/// Stream of dead letters: copies of bus messages a role rejected (undecodable, or larger
/// than [`crate::MAX_MESSAGE_BYTES`]), kept for a look and a replay by hand.
pub const DEAD_LETTERS_STREAM: &str = "YARD_DEAD_LETTERS";
pub const DEAD_LETTERS_ALL: &str = "yard.dead.>";

/// Subject a dead letter rejected by `role` is parked under.
pub fn dead_letter(role: &str) -> String {
    format!("yard.dead.{}", token_or_underscore(role))
}

/// Header of a dead letter: the subject the rejected message was read from.
pub const DEAD_LETTER_SUBJECT: &str = "Yard-Dead-Subject";
/// Header of a dead letter: the role that rejected the message.
pub const DEAD_LETTER_ROLE: &str = "Yard-Dead-Role";
/// Header of a dead letter: why the message was rejected.
pub const DEAD_LETTER_ERROR: &str = "Yard-Dead-Error";
/// Header of a dead letter: the size of the rejected message in bytes.
pub const DEAD_LETTER_SIZE: &str = "Yard-Dead-Size";
/// Header of a dead letter that holds only the beginning of a message too large to park
/// whole (`true`).
pub const DEAD_LETTER_TRUNCATED: &str = "Yard-Dead-Truncated";

/// Every KV bucket Yardmaster keeps.
pub const KV_BUCKETS: [&str; 6] = [
    AGENTS_BUCKET,
    CANCELS_BUCKET,
    MASTERS_BUCKET,
    LEASES_BUCKET,
    WAITS_BUCKET,
    POOLS_BUCKET,
];

/// Every stream Yardmaster keeps, besides those behind its buckets.
pub const STREAMS: [&str; 5] = [
    CHANGES_STREAM,
    REQUESTS_STREAM,
    EVENTS_STREAM,
    LOGS_STREAM,
    DEAD_LETTERS_STREAM,
];

/// Name of the durable consumer through which one scheduler reads changes.
pub fn scheduler_consumer(scheduler_name: &str) -> String {
    let safe: String = scheduler_name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("scheduler-{safe}")
}

/// True if `token` can stand as one subject token and one KV key: ASCII letters, digits,
/// `-` and `_`, 1 to 128 characters.
pub fn is_valid_token(token: &str) -> bool {
    !token.is_empty()
        && token.len() <= 128
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn token_or_underscore(text: &str) -> String {
    if is_valid_token(text) {
        text.to_owned()
    } else {
        "_".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_reject_subject_syntax() {
        assert!(is_valid_token("agent-1"));
        assert!(is_valid_token("01JD5Z4Q9W"));
        for bad in ["", "a.b", "a b", "*", ">", "a\nb", &"x".repeat(129)] {
            assert!(!is_valid_token(bad), "{bad:?}");
        }
    }

    #[test]
    fn force_subjects_are_one_token_per_builder() {
        assert_eq!(force("app"), "yard.force.app");
        assert_eq!(force("a.b"), "yard.force._");
    }

    #[test]
    fn scheduler_consumer_names_are_safe() {
        assert_eq!(scheduler_consumer("main branch.x"), "scheduler-main_branch_x");
    }
}
