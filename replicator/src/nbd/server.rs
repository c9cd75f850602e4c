//! The NBD server: the fixed newstyle handshake, then the transmission phase with requests on one
//! connection served concurrently and answered with simple replies as they complete.
//!
//! All parsing and validation goes through [`super::proto`]; this module only moves bytes. A request the
//! codec rejects gets its NBD error; a stream that can no longer be trusted (bad magic, an oversized
//! payload) is closed after every request already started has been answered.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;

use super::proto::{self, Command, Verdict};
use crate::volume::Volume;

/// Requests one connection may have in flight; further ones wait to be read.
const MAX_IN_FLIGHT: usize = 128;

/// Why a connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The socket failed.
    #[error("nbd connection: {0}")]
    Io(#[from] std::io::Error),
    /// The client broke the protocol; the connection was closed.
    #[error("nbd protocol: {0}")]
    Protocol(String),
}

impl From<proto::ProtoError> for NbdError {
    fn from(e: proto::ProtoError) -> Self {
        NbdError::Protocol(e.to_string())
    }
}

/// Per-request latencies of WRITE commands, in microseconds from the request header's arrival to its
/// reply being queued (for the benchmark; off unless asked for).
#[derive(Debug, Default)]
pub struct LatencyRecorder {
    samples: Mutex<Vec<u32>>,
}

impl LatencyRecorder {
    fn record(&self, since: Instant) {
        let micros = u32::try_from(since.elapsed().as_micros()).unwrap_or(u32::MAX);
        self.samples
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(micros);
    }

    /// Takes every sample recorded so far.
    pub fn take(&self) -> Vec<u32> {
        std::mem::take(&mut *self.samples.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// The exports an NBD server offers.
#[derive(Debug, Clone, Default)]
pub struct Exports {
    volumes: BTreeMap<String, Arc<Volume>>,
}

impl Exports {
    /// Exports `volumes` by name.
    pub fn new(volumes: impl IntoIterator<Item = Arc<Volume>>) -> Exports {
        Exports {
            volumes: volumes
                .into_iter()
                .map(|v| (v.name().to_owned(), v))
                .collect(),
        }
    }

    /// The volume named `name`; the empty name means the only export, if there is exactly one.
    pub fn get(&self, name: &str) -> Option<&Arc<Volume>> {
        if name.is_empty() && self.volumes.len() == 1 {
            return self.volumes.values().next();
        }
        self.volumes.get(name)
    }

    /// Every export.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Volume>> {
        self.volumes.values()
    }
}

/// An NBD server over a set of exports.
#[derive(Debug)]
pub struct NbdServer {
    exports: Exports,
    latency: Option<Arc<LatencyRecorder>>,
}

impl NbdServer {
    /// A server for `exports`.
    pub fn new(exports: Exports) -> Arc<NbdServer> {
        Arc::new(NbdServer {
            exports,
            latency: None,
        })
    }

    /// A server that also records WRITE latencies.
    pub fn with_latency(exports: Exports, latency: Arc<LatencyRecorder>) -> Arc<NbdServer> {
        Arc::new(NbdServer {
            exports,
            latency: Some(latency),
        })
    }

    /// The exports.
    pub fn exports(&self) -> &Exports {
        &self.exports
    }

    /// Accepts TCP connections forever, serving each on its own task. The connections belong to this
    /// task: aborting it (dropping the [`crate::Primary`]) drops them all, as a killed process would.
    pub async fn serve_tcp(self: Arc<Self>, listener: TcpListener) {
        let mut connections = JoinSet::new();
        loop {
            while connections.try_join_next().is_some() {}
            match listener.accept().await {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let server = Arc::clone(&self);
                    connections.spawn(async move {
                        if let Err(e) = server.serve(stream).await {
                            tracing::info!(%peer, error = %e, "nbd connection ended");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "nbd accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Accepts unix-socket connections forever, serving each on its own task; like
    /// [`NbdServer::serve_tcp`], aborting this task drops every connection.
    pub async fn serve_unix(self: Arc<Self>, listener: UnixListener) {
        let mut connections = JoinSet::new();
        loop {
            while connections.try_join_next().is_some() {}
            match listener.accept().await {
                Ok((stream, _)) => {
                    let server = Arc::clone(&self);
                    connections.spawn(async move {
                        if let Err(e) = server.serve(stream).await {
                            tracing::info!(error = %e, "nbd connection ended");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "nbd accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Serves one connection: handshake, then transmission until the client disconnects.
    pub async fn serve<S>(self: Arc<Self>, stream: S) -> Result<(), NbdError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (rd, wr) = tokio::io::split(stream);
        let mut rd = BufReader::with_capacity(256 * 1024, rd);
        let mut wr = BufWriter::with_capacity(256 * 1024, wr);
        let Some(volume) = self.handshake(&mut rd, &mut wr).await? else {
            return Ok(());
        };
        transmission(volume, rd, wr, self.latency.clone()).await
    }

    /// Runs the option haggling; returns the chosen export, or `None` if the client aborted.
    async fn handshake<R, W>(&self, rd: &mut R, wr: &mut W) -> Result<Option<Arc<Volume>>, NbdError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        wr.write_all(&proto::server_greeting()).await?;
        wr.flush().await?;
        let client = proto::parse_client_flags(rd.read_u32().await?)?;
        loop {
            let mut header = [0u8; proto::OPTION_HEADER_LEN];
            rd.read_exact(&mut header).await?;
            let header = proto::parse_option_header(&header)?;
            if header.length > proto::MAX_OPTION_LEN {
                return Err(NbdError::Protocol(format!(
                    "option data of {} bytes",
                    header.length
                )));
            }
            let mut data = vec![0u8; header.length as usize];
            rd.read_exact(&mut data).await?;
            let opt = header.option;
            match opt {
                proto::OPT_EXPORT_NAME => {
                    let name = proto::parse_export_name(&data)?;
                    let Some(volume) = self.exports.get(&name) else {
                        // The protocol has no error reply for EXPORT_NAME: close.
                        return Err(NbdError::Protocol(format!("unknown export {name:?}")));
                    };
                    wr.write_all(&proto::export_name_reply(
                        volume.size(),
                        proto::TX_FLAGS,
                        client.no_zeroes,
                    ))
                    .await?;
                    wr.flush().await?;
                    return Ok(Some(Arc::clone(volume)));
                }
                proto::OPT_ABORT => {
                    // Best effort: the client may already have gone.
                    let _ = wr
                        .write_all(&proto::option_reply(opt, proto::REP_ACK, &[]))
                        .await;
                    let _ = wr.flush().await;
                    return Ok(None);
                }
                proto::OPT_LIST => {
                    if data.is_empty() {
                        for volume in self.exports.iter() {
                            wr.write_all(&proto::option_reply(
                                opt,
                                proto::REP_SERVER,
                                &proto::server_reply_data(volume.name()),
                            ))
                            .await?;
                        }
                        wr.write_all(&proto::option_reply(opt, proto::REP_ACK, &[]))
                            .await?;
                    } else {
                        wr.write_all(&proto::option_reply(opt, proto::REP_ERR_INVALID, &[]))
                            .await?;
                    }
                }
                proto::OPT_INFO | proto::OPT_GO => {
                    let chosen = match proto::parse_info_request(&data) {
                        Err(_) => {
                            wr.write_all(&proto::option_reply(opt, proto::REP_ERR_INVALID, &[]))
                                .await?;
                            None
                        }
                        Ok(req) => match self.exports.get(&req.name) {
                            None => {
                                wr.write_all(&proto::option_reply(
                                    opt,
                                    proto::REP_ERR_UNKNOWN,
                                    &[],
                                ))
                                .await?;
                                None
                            }
                            Some(volume) => {
                                wr.write_all(&proto::option_reply(
                                    opt,
                                    proto::REP_INFO,
                                    &proto::info_export(volume.size(), proto::TX_FLAGS),
                                ))
                                .await?;
                                if req.items.contains(&proto::INFO_BLOCK_SIZE) {
                                    wr.write_all(&proto::option_reply(
                                        opt,
                                        proto::REP_INFO,
                                        &proto::info_block_size(1, 4096, proto::MAX_PAYLOAD),
                                    ))
                                    .await?;
                                }
                                wr.write_all(&proto::option_reply(opt, proto::REP_ACK, &[]))
                                    .await?;
                                Some(Arc::clone(volume))
                            }
                        },
                    };
                    if opt == proto::OPT_GO
                        && let Some(volume) = chosen
                    {
                        wr.flush().await?;
                        return Ok(Some(volume));
                    }
                }
                _ => {
                    wr.write_all(&proto::option_reply(opt, proto::REP_ERR_UNSUP, &[]))
                        .await?;
                }
            }
            wr.flush().await?;
        }
    }
}

/// A reply on its way to the client.
struct Reply {
    header: [u8; proto::SIMPLE_REPLY_LEN],
    data: Option<Bytes>,
}

async fn write_replies<W>(mut wr: W, mut rx: mpsc::UnboundedReceiver<Reply>) -> std::io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    while let Some(reply) = rx.recv().await {
        let mut next = Some(reply);
        while let Some(reply) = next {
            wr.write_all(&reply.header).await?;
            if let Some(data) = reply.data {
                wr.write_all(&data).await?;
            }
            next = rx.try_recv().ok();
        }
        wr.flush().await?;
    }
    wr.flush().await?;
    wr.shutdown().await
}

async fn discard<R: AsyncRead + Unpin>(rd: &mut R, mut n: u64) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    while n > 0 {
        let chunk = n.min(buf.len() as u64) as usize;
        rd.read_exact(&mut buf[..chunk]).await?;
        n -= chunk as u64;
    }
    Ok(())
}

async fn transmission<R, W>(
    volume: Arc<Volume>,
    mut rd: R,
    wr: W,
    latency: Option<Arc<LatencyRecorder>>,
) -> Result<(), NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (replies, rx) = mpsc::unbounded_channel::<Reply>();
    let writer = tokio::spawn(write_replies(wr, rx));
    let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut tasks = JoinSet::new();
    let size = volume.size();
    let outcome: Result<(), NbdError> = loop {
        let mut header = [0u8; proto::REQUEST_LEN];
        match rd.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(e.into()),
        }
        let arrived = Instant::now();
        let header = match proto::parse_request_header(&header) {
            Ok(h) => h,
            Err(e) => break Err(e.into()),
        };
        // Reap finished tasks so the set does not grow with the connection's lifetime.
        while tasks.try_join_next().is_some() {}
        let command = match proto::classify(&header, size) {
            Verdict::Disconnect(why) => break Err(NbdError::Protocol(why.into())),
            Verdict::Reject { errno, discard: n } => {
                if let Err(e) = discard(&mut rd, u64::from(n)).await {
                    break Err(e.into());
                }
                let _ = replies.send(Reply {
                    header: proto::simple_reply(errno, header.cookie),
                    data: None,
                });
                continue;
            }
            Verdict::Execute(Command::Disconnect) => break Ok(()),
            Verdict::Execute(command) => command,
        };
        let payload = match command {
            Command::Write { length, .. } => {
                let mut buf = BytesMut::zeroed(length as usize);
                if let Err(e) = rd.read_exact(&mut buf).await {
                    break Err(e.into());
                }
                buf.freeze()
            }
            _ => Bytes::new(),
        };
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            break Err(NbdError::Protocol("request limiter closed".into()));
        };
        let volume = Arc::clone(&volume);
        let replies = replies.clone();
        let latency = latency.clone();
        let cookie = header.cookie;
        tasks.spawn(async move {
            let _permit = permit;
            let (result, data) = match command {
                Command::Read { offset, length } => match volume.read(offset, length).await {
                    Ok(data) => (Ok(()), Some(data)),
                    Err(e) => (Err(e), None),
                },
                Command::Write { offset, fua, .. } => {
                    (volume.write(offset, payload, fua).await, None)
                }
                Command::Trim {
                    offset,
                    length,
                    fua,
                } => (volume.trim(offset, length, fua).await, None),
                Command::Flush => (volume.flush().await, None),
                Command::Disconnect => (Ok(()), None),
            };
            let errno = match &result {
                Ok(()) => 0,
                Err(e) => {
                    tracing::debug!(volume = %volume.name(), error = %e, "request failed");
                    proto::EIO
                }
            };
            let _ = replies.send(Reply {
                header: proto::simple_reply(errno, cookie),
                data: if errno == 0 { data } else { None },
            });
            if let (Some(latency), Command::Write { .. }) = (&latency, command) {
                latency.record(arrived);
            }
        });
    };
    // Answer every request already started, then close.
    while tasks.join_next().await.is_some() {}
    drop(replies);
    match writer.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) if outcome.is_ok() => return Err(e.into()),
        _ => {}
    }
    outcome
}
