//! The web UI in a real headless Chromium: force a build from the builders page, watch it go
//! from waiting to success without a reload, tail a running step's log, read ANSI colours,
//! and use it at phone width. Screenshots land in target/test-artifacts.

use yard_tests::browser::Headless;
use yard_tests::cluster::{AgentSpec, Cluster};

/// The build waits for an agent named `late` (none at first); its second step runs until the
/// test creates a gate file, so the log can be watched growing.
const CONFIG: &str = r#"
[[builder]]
name = "ui-demo"
agents = 'name == "late"'
[[builder.steps]]
name = "greet"
run = '''printf '\033[32mgreen text\033[0m and plain text\n' '''
[[builder.steps]]
name = "gated"
run = 'echo "first line"; while [ ! -f "$GATE" ]; do sleep 0.05; done; echo "second line"'

[[scheduler]]
name = "force"
kind = "force"
builders = ["ui-demo"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_forced_build_seen_live_in_chromium() {
    let mut cluster = Cluster::start(CONFIG, Vec::new()).await;
    let gate = cluster.path().join("gate");
    let browser = Headless::launch().await;
    browser.goto(&cluster.api.url("/#/builders")).await;
    browser
        .wait_for("the force button", "!!document.querySelector('button.force')")
        .await;
    // A marker that a reload would wipe out: everything below must happen without one.
    let _: bool = browser.eval("window.__notReloaded = true").await;
    browser.screenshot("ui-1-builders").await;

    browser
        .eval::<String>(&format!(
            "document.getElementById('props-ui-demo').value = 'GATE={}'",
            gate.display()
        ))
        .await;
    browser.click("button.force").await;
    browser
        .wait_for("the build page", "location.hash.startsWith('#/build/')")
        .await;
    browser
        .wait_for(
            "the build to wait for an agent",
            "(document.getElementById('build-state') || {}).textContent === 'waiting'",
        )
        .await;
    assert!(
        browser
            .text("#build-info")
            .await
            .contains("no registered agent matches"),
        "the page says why it waits: {}",
        browser.text("#build-info").await
    );
    browser.screenshot("ui-2-waiting").await;

    cluster.add_agent(AgentSpec::new("late")).await;
    browser
        .wait_for("the gated step to start", "!!document.querySelector('#step-1 a')")
        .await;
    browser.click("#step-1 a").await;
    browser
        .wait_for(
            "the first line in the live log",
            "(document.getElementById('log-text') || {textContent: ''}).textContent.endsWith('\\nfirst line\\n')",
        )
        .await;
    assert_eq!(browser.text("#log-state").await, "live");
    assert_eq!(browser.text("#build-state").await, "running");
    browser.screenshot("ui-3-live-log").await;

    std::fs::write(&gate, "").expect("gate file");
    browser
        .wait_for(
            "the second line and the log's end",
            "document.getElementById('log-text').textContent.endsWith('\\nfirst line\\nsecond line\\n') \
             && document.getElementById('log-state').textContent === 'complete'",
        )
        .await;
    browser
        .wait_for(
            "the build to succeed",
            "document.getElementById('build-state').textContent === 'success'",
        )
        .await;
    assert!(
        browser.eval::<bool>("window.__notReloaded === true").await,
        "the page was reloaded"
    );
    browser.screenshot("ui-4-success").await;

    // The finished first step's log, its ANSI green rendered as colour.
    browser.click("#step-0 a").await;
    browser
        .wait_for(
            "the first step's log",
            "(document.querySelector('#log h3') || {textContent: ''}).textContent.startsWith('Log of greet') \
             && document.getElementById('log-state').textContent === 'complete'",
        )
        .await;
    let coloured: String = browser
        .eval("(document.querySelector('#log-text span') || {}).outerHTML || ''")
        .await;
    assert!(
        coloured.contains("color") && coloured.contains(">green text</span>"),
        "ANSI green becomes a coloured span: {coloured}"
    );
    let log = browser.text("#log-text").await;
    assert!(
        log.starts_with("# $ printf") && log.ends_with("\ngreen text and plain text\n"),
        "the command's header, then its output without escape codes: {log:?}"
    );
    browser.screenshot("ui-5-ansi-log").await;

    // The builds list at phone width: the row is there, live, and nothing overflows sideways.
    browser.viewport(390, 844).await;
    // The same document: a hash change, as following the header's link does.
    browser.click("#nav-builds").await;
    browser
        .wait_for(
            "the build's row",
            "!!document.querySelector('#builds tr td.state') \
             && document.querySelector('#builds tr td.state').textContent === 'success'",
        )
        .await;
    // The filters: running builds, none; finished builds, this one.
    let _: bool = browser
        .eval(
            "(() => { const s = document.getElementById('filter-state'); s.value = 'running'; \
             s.dispatchEvent(new Event('change')); return true; })()",
        )
        .await;
    browser
        .wait_for(
            "the running filter to apply",
            "location.hash === '#/builds?state=running' && !!document.getElementById('builds') \
             && document.querySelectorAll('#builds tr').length === 0 \
             && document.getElementById('filter-state').value === 'running'",
        )
        .await;
    let _: bool = browser
        .eval(
            "(() => { const s = document.getElementById('filter-state'); s.value = 'finished'; \
             s.dispatchEvent(new Event('change')); return true; })()",
        )
        .await;
    browser
        .wait_for(
            "the finished filter to show the build",
            "location.hash === '#/builds?state=finished' \
             && document.querySelectorAll('#builds tr').length === 1",
        )
        .await;
    let overflow: i64 = browser
        .eval("document.documentElement.scrollWidth - window.innerWidth")
        .await;
    assert!(overflow <= 0, "the page is {overflow}px wider than a phone");
    browser.screenshot("ui-6-phone").await;
    cluster.stop().await;
}
