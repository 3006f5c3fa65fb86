//! A real headless Chromium (Debian's `chromium`, which scripts/test installs), driven over
//! the DevTools protocol, with screenshots kept as test artifacts.

use std::path::PathBuf;
use std::time::Duration;

use chromiumoxide::browser::{Browser, BrowserConfig};
use chromiumoxide::cdp::browser_protocol::emulation::SetDeviceMetricsOverrideParams;
use chromiumoxide::cdp::browser_protocol::page::CaptureScreenshotFormat;
use chromiumoxide::page::ScreenshotParams;
use chromiumoxide::Page;
use futures::StreamExt;
use serde::de::DeserializeOwned;

use crate::wait_until;

/// The Chromium binary: `YARD_CHROMIUM`, else `chromium` or `chromium-browser` on the PATH.
pub fn chromium_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("YARD_CHROMIUM") {
        return PathBuf::from(path);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .flat_map(|dir| ["chromium", "chromium-browser"].map(|name| dir.join(name)))
        .find(|candidate| candidate.is_file())
        .expect("chromium is missing: scripts/test installs it (Debian's `chromium` package)")
}

/// Where screenshots go: `YARD_TEST_ARTIFACTS`, else `target/test-artifacts`.
pub fn artifacts_dir() -> PathBuf {
    std::env::var_os("YARD_TEST_ARTIFACTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts"))
}

/// One headless browser with one page; the browser is closed when dropped.
pub struct Headless {
    browser: Browser,
    handler: tokio::task::JoinHandle<()>,
    pub page: Page,
    _profile: tempfile::TempDir,
}

impl Headless {
    pub async fn launch() -> Headless {
        let profile = tempfile::tempdir().expect("browser profile directory");
        let config = BrowserConfig::builder()
            .chrome_executable(chromium_binary())
            .new_headless_mode()
            .no_sandbox()
            .user_data_dir(profile.path())
            .window_size(1280, 900)
            .arg("--disable-gpu")
            .arg("--disable-dev-shm-usage")
            .build()
            .expect("browser configuration");
        let (browser, mut handler) = Browser::launch(config).await.expect("chromium starts");
        // The handler drives the DevTools connection; an event this client version cannot
        // decode is not fatal to the page under test.
        let handler = tokio::spawn(async move { while handler.next().await.is_some() {} });
        let page = browser.new_page("about:blank").await.expect("a browser page");
        Headless {
            browser,
            handler,
            page,
            _profile: profile,
        }
    }

    pub async fn goto(&self, url: &str) {
        self.page.goto(url).await.expect("page loads");
    }

    /// Evaluates a JavaScript expression and returns its value.
    pub async fn eval<T: DeserializeOwned>(&self, expression: &str) -> T {
        self.page
            .evaluate(expression)
            .await
            .unwrap_or_else(|error| panic!("evaluating {expression}: {error}"))
            .into_value()
            .unwrap_or_else(|error| panic!("the value of {expression}: {error}"))
    }

    /// Waits until the JavaScript expression is true; on timeout, panics showing the page's
    /// text.
    pub async fn wait_for(&self, what: &str, expression: &str) {
        let deadline = Duration::from_secs(60);
        let waited = tokio::time::timeout(
            deadline,
            wait_until(what, deadline * 2, || async {
                let value: Option<bool> = self
                    .page
                    .evaluate(expression)
                    .await
                    .ok()
                    .and_then(|result| result.into_value().ok());
                value.filter(|ready| *ready).map(|_| ())
            }),
        )
        .await;
        if waited.is_err() {
            let shown: String = self.eval("location.href + '\\n' + document.body.innerText").await;
            panic!("timed out after {deadline:?} waiting for {what}; the page shows:\n{shown}");
        }
    }

    /// The text of the first element matching a CSS selector ("" when there is none).
    pub async fn text(&self, selector: &str) -> String {
        let selector = serde_json::to_string(selector).expect("selector");
        self.eval(&format!(
            "(document.querySelector({selector}) || {{}}).textContent || ''"
        ))
        .await
    }

    /// Clicks the first element matching a CSS selector, as a user would.
    pub async fn click(&self, selector: &str) {
        self.page
            .find_element(selector)
            .await
            .unwrap_or_else(|error| panic!("no element {selector}: {error}"))
            .click()
            .await
            .unwrap_or_else(|error| panic!("clicking {selector}: {error}"));
    }

    /// Emulates a device of the given width and height (mobile when narrow).
    pub async fn viewport(&self, width: i64, height: i64) {
        self.page
            .execute(SetDeviceMetricsOverrideParams::new(
                width,
                height,
                1.0,
                width < 700,
            ))
            .await
            .expect("viewport set");
    }

    /// Saves a full-page PNG screenshot as `<artifacts>/<name>.png`; returns its path.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let png = self
            .page
            .screenshot(
                ScreenshotParams::builder()
                    .format(CaptureScreenshotFormat::Png)
                    .full_page(true)
                    .build(),
            )
            .await
            .expect("screenshot taken");
        let dir = artifacts_dir();
        std::fs::create_dir_all(&dir).expect("artifacts directory");
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).expect("screenshot saved");
        path
    }
}

impl Drop for Headless {
    fn drop(&mut self) {
        self.handler.abort();
        if let Some(child) = self.browser.get_mut_child() {
            let _ = child.as_mut_inner().start_kill();
        }
    }
}
