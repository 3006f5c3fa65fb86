//! Arbitrary text as a configuration file: loading and validating answer Ok or Err and never
//! panic, and a configuration that validates can be asked everything the roles ask of it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use services::YardConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = YardConfig::from_toml(Some(text), "fuzz", Vec::new()) else {
        return;
    };
    if config.validate().is_err() {
        return;
    }
    let _ = config.deadlock_warnings();
    let _ = config.definition_digests();
    for builder in &config.builders {
        let steps = builder.flat_steps();
        for step in &steps {
            assert_eq!(steps[step.index as usize].path, step.path);
            let _ = step.step.selector().map(|selector| selector.expect("validated"));
        }
        builder.selector().expect("validated");
        let _ = config.is_forceable(&builder.name);
    }
});
