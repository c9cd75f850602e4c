//! A Service in front of operator replicas, as kube-proxy is one: each new connection goes to a replica
//! whose `/readyz` answers 200 (the leader); open connections stay where they are, so a replica that
//! stops leading must close them itself for its sidecars to reach the new leader.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// One replica behind the Service: where it serves gRPC and where it answers `/readyz`.
#[derive(Debug, Clone, Copy)]
pub struct Endpoint {
    /// The gRPC Control listener.
    pub grpc: SocketAddr,
    /// The HTTP listener with `/readyz`.
    pub http: SocketAddr,
}

/// A running Service; stops accepting when dropped.
#[derive(Debug)]
pub struct ReadyService {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for ReadyService {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ReadyService {
    /// Listens on a loopback port in front of `endpoints`.
    pub async fn start(endpoints: Vec<Endpoint>) -> std::io::Result<ReadyService> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(forward(client, endpoints.clone()));
            }
        });
        Ok(ReadyService { addr, task })
    }

    /// The Service's address (what the sidecars dial).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Forwards `client` to the first ready endpoint; with none ready the connection is closed, as a
/// Service without ready endpoints refuses it.
async fn forward(mut client: TcpStream, endpoints: Vec<Endpoint>) {
    for endpoint in endpoints {
        if ready(endpoint.http).await
            && let Ok(mut upstream) = TcpStream::connect(endpoint.grpc).await
        {
            let _ = client.set_nodelay(true);
            let _ = upstream.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            return;
        }
    }
}

/// Whether the replica whose HTTP listener is `http` answers `/readyz` with 200.
pub async fn ready(http: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect(http).await else {
        return false;
    };
    let asked = stream
        .write_all(b"GET /readyz HTTP/1.0\r\nHost: operator\r\n\r\n")
        .await;
    let mut response = String::new();
    asked.is_ok()
        && stream.read_to_string(&mut response).await.is_ok()
        && response.split_whitespace().nth(1) == Some("200")
}
