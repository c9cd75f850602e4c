//! The NBD server: the fixed newstyle handshake, then the transmission phase with requests on one
//! connection served concurrently and answered with simple replies as they complete.
//!
//! All parsing and validation goes through [`super::proto`]; this module only moves bytes. A request the
//! codec rejects gets its NBD error; a stream that can no longer be trusted (bad magic, an oversized
//! payload) is closed after every request already started has been answered.
//!
//! **The serving path.** The connection's task reads a request and runs it right there; only a request
//! that has to wait (for an `fdatasync`, the secondary, a held write) becomes a task of its own. A
//! reply is queued in the connection's [`ReplySink`] by whoever finished the request; the queue is
//! written out by one task at a time, which takes every reply queued meanwhile (so concurrent replies
//! share a `write`). The connection's task leaves its replies queued while a whole next request is
//! already buffered, so a burst of requests gets one `write` of replies.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::proto::{self, Command, Verdict};
use crate::volume::Volume;

/// Requests one connection may have in flight; further ones wait to be read.
const MAX_IN_FLIGHT: usize = 128;
/// Reply data up to this size is copied into the reply queue; larger data is queued as it is.
const COPY_REPLY_DATA_MAX: usize = 64 * 1024;

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

/// The exports an NBD server offers: shared, so that volumes can be added and removed while it serves
/// (a secondary's volume promoted at the disaster-recovery site is exported from then on).
#[derive(Debug, Clone, Default)]
pub struct Exports {
    volumes: Arc<Mutex<BTreeMap<String, Arc<Volume>>>>,
}

impl Exports {
    /// Exports `volumes` by name.
    pub fn new(volumes: impl IntoIterator<Item = Arc<Volume>>) -> Exports {
        Exports {
            volumes: Arc::new(Mutex::new(
                volumes
                    .into_iter()
                    .map(|v| (v.name().to_owned(), v))
                    .collect(),
            )),
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Arc<Volume>>> {
        self.volumes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The volume named `name`; the empty name means the only export, if there is exactly one.
    pub fn get(&self, name: &str) -> Option<Arc<Volume>> {
        let volumes = self.lock();
        if name.is_empty() && volumes.len() == 1 {
            return volumes.values().next().cloned();
        }
        volumes.get(name).cloned()
    }

    /// Every export, in name order.
    pub fn all(&self) -> Vec<Arc<Volume>> {
        self.lock().values().cloned().collect()
    }

    /// Exports `volume` (replacing an export of the same name).
    pub fn insert(&self, volume: Arc<Volume>) {
        self.lock().insert(volume.name().to_owned(), volume);
    }

    /// Stops exporting `name` (connections already open keep their volume); returns it if it was.
    pub fn remove(&self, name: &str) -> Option<Arc<Volume>> {
        self.lock().remove(name)
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
        let mut wr = BufWriter::new(wr);
        let Some(volume) = self.handshake(&mut rd, &mut wr).await? else {
            return Ok(());
        };
        // The handshake flushed everything; replies are written unbuffered by the reply queue.
        transmission(volume, rd, wr.into_inner(), self.latency.clone()).await
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
                    return Ok(Some(volume));
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
                        for volume in self.exports.all() {
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
                                Some(volume)
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

/// Replies waiting to be written to the client, and the write half while no task is writing.
struct ReplySink<W> {
    inner: Mutex<SinkInner<W>>,
}

struct SinkInner<W> {
    /// Queued pieces older than `tail`, in order.
    chunks: Vec<Bytes>,
    /// The newest queued bytes (headers and small data are appended here).
    tail: BytesMut,
    /// The write half; `None` while a task is writing (or after the socket failed).
    writer: Option<W>,
    /// The first write error.
    failed: Option<std::io::Error>,
}

impl<W: AsyncWrite + Unpin> ReplySink<W> {
    fn new(writer: W) -> ReplySink<W> {
        ReplySink {
            inner: Mutex::new(SinkInner {
                chunks: Vec::new(),
                tail: BytesMut::with_capacity(64 * 1024),
                writer: Some(writer),
                failed: None,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, SinkInner<W>> {
        // Never left half-updated: a poisoned lock is still consistent.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a reply (data follows the header for a successful READ).
    fn queue(&self, header: &[u8], data: Option<Bytes>) {
        let mut s = self.lock();
        s.tail.extend_from_slice(header);
        if let Some(data) = data {
            if data.len() <= COPY_REPLY_DATA_MAX {
                s.tail.extend_from_slice(&data);
            } else {
                let older = s.tail.split().freeze();
                s.chunks.push(older);
                s.chunks.push(data);
            }
        }
    }

    /// Writes out everything queued — unless another task is writing already: that one takes what was
    /// queued here too before it lets go of the write half.
    async fn flush(&self) {
        let Some(mut writer) = self.lock().writer.take() else {
            return;
        };
        loop {
            let out = {
                let mut s = self.lock();
                if s.chunks.is_empty() && s.tail.is_empty() {
                    s.writer = Some(writer);
                    return;
                }
                let mut out = std::mem::take(&mut s.chunks);
                if !s.tail.is_empty() {
                    out.push(s.tail.split().freeze());
                }
                out
            };
            for chunk in out {
                if let Err(e) = writer.write_all(&chunk).await {
                    // The write half stays out: later replies have nowhere to go.
                    self.lock().failed = Some(e);
                    return;
                }
            }
            if let Err(e) = writer.flush().await {
                self.lock().failed = Some(e);
                return;
            }
        }
    }

    /// Writes out the rest and shuts the write half down; the first write error, if any.
    async fn close(&self) -> std::io::Result<()> {
        self.flush().await;
        let (writer, failed) = {
            let mut s = self.lock();
            (s.writer.take(), s.failed.take())
        };
        if let Some(e) = failed {
            return Err(e);
        }
        match writer {
            Some(mut writer) => writer.shutdown().await,
            None => Ok(()),
        }
    }
}

/// Polls `fut` once on the calling task; if it cannot finish at once, it becomes a task of `tasks`.
///
/// The first poll uses a no-op waker, which is fine: a spawned task is always polled again, and every
/// future registers the waker of its latest poll.
fn run_or_spawn<F>(tasks: &mut JoinSet<()>, fut: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    let mut fut = Box::pin(fut);
    if fut
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
        .is_pending()
    {
        tasks.spawn(fut);
    }
}

/// Whether `buffered` holds a whole request (header and any payload), so reading it will not wait.
fn whole_request_buffered(buffered: &[u8]) -> bool {
    let Some(header) = buffered.first_chunk::<{ proto::REQUEST_LEN }>() else {
        return false;
    };
    match proto::parse_request_header(header) {
        Ok(h) if h.command == proto::CMD_WRITE => {
            buffered.len() - proto::REQUEST_LEN >= h.length as usize
        }
        Ok(_) => true,
        // Not a request: reading it ends the connection, which writes out every reply anyway.
        Err(_) => true,
    }
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

/// Carries out a command; the NBD error (0 for success) and, for a READ, the data.
async fn execute(volume: Arc<Volume>, command: Command, payload: Bytes) -> (u32, Option<Bytes>) {
    let (result, data) = match command {
        Command::Read { offset, length } => match volume.read(offset, length).await {
            Ok(data) => (Ok(()), Some(data)),
            Err(e) => (Err(e), None),
        },
        Command::Write { offset, fua, .. } => (volume.write(offset, payload, fua).await, None),
        Command::Trim {
            offset,
            length,
            fua,
        } => (volume.trim(offset, length, fua).await, None),
        Command::Flush => (volume.flush().await, None),
        Command::Disconnect => (Ok(()), None),
    };
    match result {
        Ok(()) => (0, data),
        Err(e) => {
            tracing::debug!(volume = %volume.name(), error = %e, "request failed");
            (proto::EIO, None)
        }
    }
}

async fn transmission<R, W>(
    volume: Arc<Volume>,
    mut rd: BufReader<R>,
    wr: W,
    latency: Option<Arc<LatencyRecorder>>,
) -> Result<(), NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let sink = Arc::new(ReplySink::new(wr));
    let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut tasks = JoinSet::new();
    let size = volume.size();
    let outcome: Result<(), NbdError> = loop {
        // Write out the queued replies unless the next request is already here.
        if !whole_request_buffered(rd.buffer()) {
            let sink = Arc::clone(&sink);
            run_or_spawn(&mut tasks, async move { sink.flush().await });
        }
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
                sink.queue(&proto::simple_reply(errno, header.cookie), None);
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
        let cookie = header.cookie;
        let is_write = matches!(command, Command::Write { .. });
        let latency = latency.clone().filter(|_| is_write);
        let mut request = Box::pin(execute(Arc::clone(&volume), command, payload));
        match request
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
        {
            Poll::Ready((errno, data)) => {
                sink.queue(&proto::simple_reply(errno, cookie), data);
                if let Some(latency) = &latency {
                    latency.record(arrived);
                }
                drop(permit);
            }
            Poll::Pending => {
                // It waits (fdatasync, the secondary, a hold): finish it on its own task.
                let sink = Arc::clone(&sink);
                tasks.spawn(async move {
                    let (errno, data) = request.await;
                    sink.queue(&proto::simple_reply(errno, cookie), data);
                    if let Some(latency) = &latency {
                        latency.record(arrived);
                    }
                    drop(permit);
                    sink.flush().await;
                });
            }
        }
    };
    // Answer every request already started, then close.
    while tasks.join_next().await.is_some() {}
    match sink.close().await {
        Err(e) if outcome.is_ok() => Err(e.into()),
        _ => outcome,
    }
}
