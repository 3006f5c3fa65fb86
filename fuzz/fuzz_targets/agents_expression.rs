//! Arbitrary text as an `agents` expression: parsing answers Ok or Err and never panics, a
//! parsed selector can be matched and compared, and its written form parses back to it.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use services::AgentSelector;

/// Agents every parsed selector is matched against: (name, labels).
fn agents() -> Vec<(&'static str, BTreeMap<String, String>)> {
    let labels = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect()
    };
    vec![
        (
            "agent-1",
            labels(&[("os", "linux"), ("arch", "x86_64"), ("gpu", "")]),
        ),
        ("agent-2", labels(&[("os", "mac"), ("group", "1")])),
        ("name", BTreeMap::new()),
    ]
}

/// Checks what holds for every selector that parses.
fn check(selector: &AgentSelector) {
    for (name, labels) in agents() {
        // An agent matching a selector proves the selector can overlap itself.
        if selector.matches(name, &labels) {
            assert!(
                selector.may_overlap(selector),
                "{selector} matches {name} but not itself"
            );
        }
    }
    let _ = selector.may_overlap(selector);

    // What the waits bucket stores is the source; what messages show is the Display form.
    let from_source = AgentSelector::parse(selector.source())
        .unwrap_or_else(|error| panic!("source {:?} does not parse again: {error}", selector.source()));
    assert_eq!(&from_source, selector);
    if !selector.source().is_empty() {
        let written = selector.to_string();
        let again = AgentSelector::parse(&written)
            .unwrap_or_else(|error| panic!("{written:?} does not parse again: {error}"));
        assert_eq!(&again, selector);
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(selector) = AgentSelector::parse(text) {
        check(&selector);
    }
    // Two selectors (split at the first NUL, which the language never accepts): no agent
    // matches both of two selectors that cannot overlap.
    if let Some((first, second)) = text.split_once('\0') {
        let (Ok(first), Ok(second)) = (AgentSelector::parse(first), AgentSelector::parse(second)) else {
            return;
        };
        check(&first);
        check(&second);
        for (name, labels) in agents() {
            if first.matches(name, &labels) && second.matches(name, &labels) {
                assert!(
                    first.may_overlap(&second),
                    "{first} and {second} both match {name}"
                );
                assert!(
                    second.may_overlap(&first),
                    "{second} and {first} both match {name}"
                );
            }
        }
    }
});
