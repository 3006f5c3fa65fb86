//! A TCP proxy on loopback that a test can cut: every connection through it drops, and new
//! ones are refused, until it is restored. Puts a process "off the network" without touching
//! the process itself.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub struct Proxy {
    address: SocketAddr,
    /// Cancelled to drop the connections of the current period (cut); replaced on restore.
    period: Arc<Mutex<Option<CancellationToken>>>,
    stop: CancellationToken,
}

impl Proxy {
    /// Forwards a free loopback port to `target`.
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy port");
        let address = listener.local_addr().expect("proxy address");
        let period = Arc::new(Mutex::new(Some(CancellationToken::new())));
        let stop = CancellationToken::new();
        let (accepting, stopped) = (Arc::clone(&period), stop.clone());
        tokio::spawn(async move {
            loop {
                let client = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((client, _)) => client,
                        Err(_) => continue,
                    },
                    _ = stopped.cancelled() => return,
                };
                let Some(period) = accepting.lock().unwrap().clone() else {
                    // Cut off: the connection is dropped at once.
                    continue;
                };
                tokio::spawn(forward(client, target, period));
            }
        });
        Proxy {
            address,
            period,
            stop,
        }
    }

    /// `nats://` URL of the proxy.
    pub fn url(&self) -> String {
        format!("nats://{}", self.address)
    }

    /// Drops every connection through the proxy and refuses new ones.
    pub fn cut(&self) {
        if let Some(period) = self.period.lock().unwrap().take() {
            period.cancel();
        }
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.period
            .lock()
            .unwrap()
            .get_or_insert_with(CancellationToken::new);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.stop.cancel();
    }
}

async fn forward(mut client: TcpStream, target: SocketAddr, period: CancellationToken) {
    let Ok(mut upstream) = TcpStream::connect(target).await else {
        return;
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
        _ = period.cancelled() => {}
    }
}
