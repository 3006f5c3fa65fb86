//! `yard` processes started from the built binary, killed when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The `yard` binary built next to the test executable (`cargo build --bins` builds it;
/// scripts/test does that first).
pub fn yard_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/yard
    let binary = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("yard"))
        .expect("target directory");
    assert!(
        binary.is_file(),
        "{} is missing: build it with `cargo build --workspace --bins` (scripts/test does)",
        binary.display()
    );
    binary
}

/// A running `yard` process whose output goes to a log file.
pub struct YardProcess {
    child: Child,
    pub log: PathBuf,
}

impl YardProcess {
    /// Starts `yard ARGS...`, logging to `<log_dir>/<name>.log`.
    pub fn start(name: &str, log_dir: &Path, args: &[&str]) -> YardProcess {
        Self::start_with_env(name, log_dir, args, &[])
    }

    /// Starts `yard ARGS...` with extra environment variables.
    pub fn start_with_env(name: &str, log_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> YardProcess {
        let log = log_dir.join(format!("{name}.log"));
        let file = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let child = Command::new(yard_binary())
            .args(args)
            .envs(env.iter().copied())
            .env(
                "YARD_LOG",
                std::env::var("YARD_TEST_LOG").unwrap_or_else(|_| "info,async_nats=warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .expect("yard starts");
        YardProcess { child, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        self.child.wait().expect("wait")
    }

    /// Kills the process at once, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for the process to exit by itself.
    pub fn wait(&mut self) -> std::process::ExitStatus {
        self.child.wait().expect("wait")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for YardProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
