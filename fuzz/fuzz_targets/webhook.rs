//! Arbitrary bodies of VCS change hooks (GitHub, GitLab, Gitea), under every event header the
//! hooks handle: parsing answers a change, a reason to ignore the delivery or an error, and
//! never panics; a change goes onto the bus and comes back equal.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ui_master::hooks::{self, HookOutcome};

/// The providers, with each event they treat specially and one they do not support.
const DELIVERIES: &[(&str, &str)] = &[
    ("github", "push"),
    ("github", "pull_request"),
    ("github", "ping"),
    ("github", "issues"),
    ("gitlab", "Push Hook"),
    ("gitlab", "Merge Request Hook"),
    ("gitlab", "Tag Push Hook"),
    ("gitea", "push"),
    ("gitea", "issues"),
];

fuzz_target!(|data: &[u8]| {
    // The first byte picks the provider and event; the rest is the body.
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let (provider, event) = DELIVERIES[usize::from(selector) % DELIVERIES.len()];
    let outcome = match provider {
        "github" => hooks::github_outcome(event, body),
        "gitlab" => hooks::gitlab_outcome(event, body),
        _ => hooks::gitea_outcome(event, body),
    };
    if let Ok(HookOutcome::Change(change)) = outcome {
        assert_eq!(change.source, provider);
        let stored: bus_schema::Change =
            bus_schema::decode(&bus_schema::encode(&*change)).expect("a hook's change decodes from the bus");
        assert_eq!(stored, *change);
    }

    // The signature check sees attacker-chosen headers too.
    let signature = String::from_utf8_lossy(&body[..body.len().min(80)]);
    let _ = hooks::signature_matches("s3cret", body, &signature);
});
