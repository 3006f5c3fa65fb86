//! A private nats-server child process, for `yard up` on one machine and for tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The Go garbage collector's target for the nats-servers Yardmaster runs (unless `GOGC` is
/// set): a collection when the heap has grown by 400% instead of 100%. Fewer collections cut
/// the server's pauses, and so the tail of dispatch latency under load, for some memory.
pub const NATS_SERVER_GOGC: &str = "400";

/// A loopback port free now, below the kernel's ephemeral range. A port the kernel hands out
/// for `127.0.0.1:0` can be handed out again before the process it was picked for binds it
/// (to a server binding port 0, or as the local port of an outgoing connection), and so can
/// the port of a node that was killed, while it restarts.
pub fn free_loopback_port() -> std::io::Result<u16> {
    use std::hash::{BuildHasher, Hasher};
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000u16, ephemeral_start.max(11_000));
    let seed = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    (0..10_000u64)
        .map(|attempt| low + (seed.wrapping_add(attempt.wrapping_mul(7_919)) % u64::from(high - low)) as u16)
        .find(|port| std::net::TcpListener::bind(("127.0.0.1", *port)).is_ok())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("no free loopback port between {low} and {high}"),
            )
        })
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "nats-server not found: set YARD_NATS_SERVER, or run `scripts/install-nats` to put nats-server 2.15 in .nats/ (never Debian's 2.9)"
    )]
    NotFound,
    #[error("cannot start {binary}: {source}")]
    Spawn {
        binary: String,
        #[source]
        source: std::io::Error,
    },
    #[error("nats-server did not report its port within 10 s; see {log}")]
    NoPort { log: String },
    #[error("cannot prepare {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// A running nats-server child with JetStream; killed when dropped.
pub struct NatsServer {
    child: Child,
    url: String,
    port: u16,
    /// The monitoring endpoint (`/healthz`, `/jsz`) of a cluster node.
    monitoring_url: Option<String>,
    data_dir: PathBuf,
    binary: PathBuf,
    /// The configuration file of a cluster node, which a restart reuses.
    config_file: Option<PathBuf>,
}

impl NatsServer {
    /// Finds the nats-server binary: `$YARD_NATS_SERVER`, then `.nats/bin/nats-server` in this
    /// directory or a parent of it or of the running executable, then `nats-server` on `PATH`.
    pub fn locate_binary() -> Result<PathBuf, Error> {
        if let Some(path) = std::env::var_os("YARD_NATS_SERVER") {
            let path = PathBuf::from(path);
            return if path.is_file() {
                Ok(path)
            } else {
                Err(Error::NotFound)
            };
        }
        let mut roots = Vec::new();
        if let Ok(dir) = std::env::current_dir() {
            roots.push(dir);
        }
        if let Ok(exe) = std::env::current_exe() {
            roots.push(exe);
        }
        for root in roots {
            for dir in root.ancestors() {
                let candidate = dir.join(".nats/bin/nats-server");
                if candidate.is_file() {
                    return Ok(candidate);
                }
            }
        }
        std::env::var_os("PATH")
            .into_iter()
            .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
            .map(|dir| dir.join("nats-server"))
            .find(|candidate| candidate.is_file())
            .ok_or(Error::NotFound)
    }

    /// Starts nats-server on 127.0.0.1 with JetStream stored under `data_dir`, on `port`
    /// (or a free one when `None`).
    pub fn start(binary: &Path, data_dir: &Path, port: Option<u16>) -> Result<NatsServer, Error> {
        std::fs::create_dir_all(data_dir).map_err(|source| Error::Io {
            path: data_dir.display().to_string(),
            source,
        })?;
        let port_arg = port.map_or_else(|| "-1".to_owned(), |p| p.to_string());
        let mut command = Command::new(binary);
        command
            .args(["-a", "127.0.0.1", "-p", &port_arg, "-js", "-sd"])
            .arg(data_dir.join("jetstream"));
        Self::spawn(command, binary, data_dir, None)
    }

    /// Starts a three-node JetStream cluster on loopback, node `i` storing under
    /// `data_dir/node-i`. Give clients every node's URL.
    pub fn start_cluster(binary: &Path, data_dir: &Path) -> Result<Vec<NatsServer>, Error> {
        let free_port = || {
            free_loopback_port().map_err(|source| Error::Io {
                path: "127.0.0.1".into(),
                source,
            })
        };
        let mut client_ports = Vec::new();
        let mut route_ports = Vec::new();
        for _ in 0..3 {
            client_ports.push(free_port()?);
            route_ports.push(free_port()?);
        }
        let routes: Vec<String> = route_ports
            .iter()
            .map(|port| format!("\"nats-route://127.0.0.1:{port}\""))
            .collect();
        let mut nodes = Vec::new();
        for node in 0..3 {
            let node_dir = data_dir.join(format!("node-{node}"));
            std::fs::create_dir_all(&node_dir).map_err(|source| Error::Io {
                path: node_dir.display().to_string(),
                source,
            })?;
            let config = format!(
                "server_name: n{node}\nlisten: 127.0.0.1:{client}\nhttp: \"127.0.0.1:-1\"\njetstream {{ store_dir: \"{store}\" }}\ncluster {{\n  name: yard\n  listen: 127.0.0.1:{route}\n  routes: [{routes}]\n  no_advertise: true\n}}\n",
                client = client_ports[node],
                store = node_dir.join("jetstream").display(),
                route = route_ports[node],
                routes = routes.join(", "),
            );
            let config_file = node_dir.join("nats.conf");
            std::fs::write(&config_file, config).map_err(|source| Error::Io {
                path: config_file.display().to_string(),
                source,
            })?;
            nodes.push(Self::start_node(binary, &node_dir, &config_file)?);
        }
        Ok(nodes)
    }

    /// Starts nats-server with the configuration file `config_file` (which says where it
    /// listens and stores), its ports file and log under `data_dir`.
    pub fn start_with_config(
        binary: &Path,
        data_dir: &Path,
        config_file: &Path,
    ) -> Result<NatsServer, Error> {
        std::fs::create_dir_all(data_dir).map_err(|source| Error::Io {
            path: data_dir.display().to_string(),
            source,
        })?;
        Self::start_node(binary, data_dir, config_file)
    }

    fn start_node(binary: &Path, data_dir: &Path, config_file: &Path) -> Result<NatsServer, Error> {
        let mut command = Command::new(binary);
        command.arg("-c").arg(config_file);
        Self::spawn(command, binary, data_dir, Some(config_file.to_owned()))
    }

    fn spawn(
        mut command: Command,
        binary: &Path,
        data_dir: &Path,
        config_file: Option<PathBuf>,
    ) -> Result<NatsServer, Error> {
        let io_error = |path: &Path| {
            let path = path.display().to_string();
            move |source| Error::Io { path, source }
        };
        let ports_dir = data_dir.join("ports");
        // A ports file left by an earlier run must not be mistaken for this one's.
        let _ = std::fs::remove_dir_all(&ports_dir);
        std::fs::create_dir_all(&ports_dir).map_err(io_error(&ports_dir))?;
        let log = data_dir.join("nats-server.log");
        if std::env::var_os("GOGC").is_none() {
            command.env("GOGC", NATS_SERVER_GOGC);
        }
        let child = command
            .arg("--ports_file_dir")
            .arg(&ports_dir)
            .arg("-l")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| Error::Spawn {
                binary: binary.display().to_string(),
                source,
            })?;
        let ports_file = ports_dir.join(format!("nats-server_{}.ports", child.id()));
        let mut server = NatsServer {
            child,
            url: String::new(),
            port: 0,
            monitoring_url: None,
            data_dir: data_dir.to_owned(),
            binary: binary.to_owned(),
            config_file,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let ports = std::fs::read_to_string(&ports_file).unwrap_or_default();
            if let Some(url) = client_url(&ports) {
                server.port = url.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or(0);
                server.url = url;
                server.monitoring_url = monitoring_url(&ports);
                return Ok(server);
            }
            if let Ok(Some(_)) = server.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Err(Error::NoPort {
            log: log.display().to_string(),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The monitoring endpoint of a cluster node (its port changes with each restart).
    pub fn monitoring_url(&self) -> Option<&str> {
        self.monitoring_url.as_deref()
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The server's log file.
    pub fn log_file(&self) -> PathBuf {
        self.data_dir.join("nats-server.log")
    }

    /// Kills the server at once (as a crash would) and waits for it to exit.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the server again on the same port with the same data, after [`NatsServer::kill`].
    pub fn restart(&mut self) -> Result<(), Error> {
        self.kill();
        let restarted = match &self.config_file {
            Some(config_file) => NatsServer::start_node(&self.binary, &self.data_dir, config_file)?,
            None => NatsServer::start(&self.binary, &self.data_dir, Some(self.port))?,
        };
        *self = restarted;
        Ok(())
    }

    /// Asks the server to stop (SIGTERM), waiting up to five seconds before killing it.
    pub fn stop(mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Extracts the first client URL from a ports file: `{"nats":["nats://127.0.0.1:PORT"],...}`.
fn client_url(ports_file: &str) -> Option<String> {
    first_url(ports_file, "nats")
}

/// Extracts the monitoring URL from a ports file, if the server has one.
fn monitoring_url(ports_file: &str) -> Option<String> {
    first_url(ports_file, "monitoring")
}

fn first_url(ports_file: &str, listener: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(ports_file).ok()?;
    value.get(listener)?.get(0)?.as_str().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_ports_file() {
        let text = r#"{"nats":["nats://127.0.0.1:40123"],"monitoring":[]}"#;
        assert_eq!(client_url(text).as_deref(), Some("nats://127.0.0.1:40123"));
        assert_eq!(monitoring_url(text), None);
        assert_eq!(client_url("{"), None);
        let text = r#"{"nats":["nats://127.0.0.1:40123"],"monitoring":["http://127.0.0.1:40124"]}"#;
        assert_eq!(monitoring_url(text).as_deref(), Some("http://127.0.0.1:40124"));
    }
}
