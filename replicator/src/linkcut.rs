//! `LinkCut`: an in-process TCP proxy for fault injection on replication links.
//!
//! Point a primary at [`LinkCut::addr`] instead of the secondary, then switch the link's [`LinkMode`]:
//! - [`LinkMode::Pass`] forwards bytes both ways;
//! - [`LinkMode::Blackhole`] silently drops every byte in both directions (connections stay open, new
//!   ones are accepted and never reach the target) — the peer sees only silence, as with a dead route;
//! - [`LinkMode::Reset`] resets every open connection (TCP RST) and every new one at once.
//!
//! Switching back to `Pass` affects new connections and, for `Blackhole`, resumes forwarding on open ones
//! (bytes dropped meanwhile stay lost, which the stream then detects as corruption or a timeout).

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkMode {
    /// Forward.
    Pass,
    /// Drop everything silently.
    Blackhole,
    /// Reset every connection.
    Reset,
}

/// A running proxy; stops (resetting its connections) when dropped.
#[derive(Debug)]
pub struct LinkCut {
    addr: SocketAddr,
    mode: Arc<watch::Sender<LinkMode>>,
    task: JoinHandle<()>,
}

impl Drop for LinkCut {
    fn drop(&mut self) {
        self.mode.send_replace(LinkMode::Reset);
        self.task.abort();
    }
}

impl LinkCut {
    /// Listens on a loopback port and forwards to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<LinkCut> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let (mode, _) = watch::channel(LinkMode::Pass);
        let mode = Arc::new(mode);
        let accept_mode = Arc::clone(&mode);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let mode_rx = accept_mode.subscribe();
                tokio::spawn(async move {
                    let _ = proxy(client, target, mode_rx).await;
                });
            }
        });
        Ok(LinkCut { addr, mode, task })
    }

    /// The address to connect to instead of the target.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Switches the mode for open and new connections.
    pub fn set_mode(&self, mode: LinkMode) {
        self.mode.send_replace(mode);
    }

    /// The current mode.
    pub fn mode(&self) -> LinkMode {
        *self.mode.borrow()
    }
}

async fn proxy(
    client: TcpStream,
    target: SocketAddr,
    mut mode: watch::Receiver<LinkMode>,
) -> std::io::Result<()> {
    client.set_zero_linger()?;
    client.set_nodelay(true)?;
    let current = *mode.borrow_and_update();
    match current {
        LinkMode::Reset => return Ok(()),
        LinkMode::Blackhole => {
            // Swallow everything until the mode resets the connection or the client leaves.
            let (mut rd, _wr) = client.into_split();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                tokio::select! {
                    n = rd.read(&mut buf) => if n? == 0 { return Ok(()) },
                    changed = mode.changed() => {
                        if changed.is_err() || *mode.borrow() == LinkMode::Reset { return Ok(()) }
                    }
                }
            }
        }
        LinkMode::Pass => {}
    }
    let upstream = TcpStream::connect(target).await?;
    upstream.set_zero_linger()?;
    upstream.set_nodelay(true)?;
    let (crd, cwr) = client.into_split();
    let (urd, uwr) = upstream.into_split();
    let up = pump(crd, uwr, mode.clone());
    let down = pump(urd, cwr, mode);
    // Either direction ending (EOF, error or reset) drops both sockets; with zero linger a reset closes
    // them with RST.
    tokio::select! {
        r = up => r,
        r = down => r,
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<LinkMode>,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            n = from.read(&mut buf) => n?,
            changed = mode.changed() => {
                if changed.is_err() || *mode.borrow() == LinkMode::Reset {
                    return Ok(());
                }
                continue;
            }
        };
        if n == 0 {
            // Forward the half-close, then wait for the other direction.
            to.shutdown().await?;
            std::future::pending::<()>().await;
        }
        let current = *mode.borrow();
        match current {
            LinkMode::Pass => to.write_all(&buf[..n]).await?,
            LinkMode::Blackhole => {}
            LinkMode::Reset => return Ok(()),
        }
    }
}
