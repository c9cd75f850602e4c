//! The secondary: receives ordered replication streams over TCP and applies them to its own files.
//!
//! One connection carries one volume (see [`crate::wire`]). Frames must carry consecutive sequence
//! numbers and stay inside the volume; anything else — a malformed frame, a gap, an out-of-range write —
//! is refused with an `Error` frame and the connection is closed, after every earlier write has been
//! applied and acknowledged.
//!
//! **Durability.** Writes go through a [`Store`] with `durable = true`: they are applied in sequence
//! order with `pwrite`, and the writer thread calls `fdatasync` once per batch (group commit) before
//! answering. A sequence is acknowledged only after the `fdatasync` covering it returned successfully,
//! so an `Ack(n)` means every write up to `n` is on stable storage in the secondary's file.
//! Frames that arrived together share one `fdatasync`: the store's sync starts once no whole frame is
//! left in the read buffer (or the acknowledger would otherwise wait for it). Acknowledgements are
//! cumulative: one `Ack` answers every write that became durable with it, and it is sent before the
//! acknowledger waits for the next batch (never held back behind a later `fdatasync`).
//!
//! **Kept image.** When the volume keeps an image (see [`crate::undo`]), each write is first handed to
//! the undo log's writer ([`crate::undo_writer`]) to save what it overwrites, and waits, in order, until
//! the log's `fdatasync` covering that save returned; only then is it submitted to the store. Frames
//! keep being read meanwhile (up to [`MAX_STAGED`] writes waiting), so the log's sync for later writes
//! overlaps the volume's I/O for earlier ones. A save that fails refuses its write (and ends the
//! connection); the writes before it are applied and acknowledged.
//!
//! A new connection for a volume takes over from an older one: the older connection is cancelled and
//! finishes (applying and acknowledging what it already accepted) before the new one starts.
//!
//! **Authentication** (see [`crate::link_tls`], [`crate::owners`]). With TLS, a primary must present a
//! certificate that the configured CA bundle signs, and a stream for a volume is accepted only from the
//! primary that owns it (the first to stream it); another primary is refused with an `Error` frame
//! before it can take anything over. In plaintext, nobody is authenticated and ownership is not checked.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::{FutureExt, SinkExt, StreamExt};
use tokio::io::AsyncWrite;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;

use crate::failover::Site;
use crate::link_tls::{LinkSecurity, LinkTlsError, ServerStream};
use crate::owners::{OwnerError, Owners};
use crate::store::{Store, StoreError, StoreOp, StoreWait};
use crate::undo::{RolledBack, UndoError, UndoLog};
use crate::undo_writer::{LogSync, UndoWriter};
use crate::wire::{Frame, FrameCodec, FrameError, whole_frame_buffered};

/// How long a new connection may take to finish its TLS handshake, and then to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Writes accepted but not yet acknowledged, per connection.
const MAX_UNACKED: usize = 4096;
/// Writes waiting for one sync of the undo log, at most.
const MAX_STAGED: usize = 256;

/// How to run a secondary.
#[derive(Debug, Clone)]
pub struct SecondaryConfig {
    /// Where to listen for primaries.
    pub listen: SocketAddr,
    /// The directory holding one file per volume, named after the volume.
    pub dir: PathBuf,
    /// Plaintext, or mutual TLS (the CA bundle signs the primaries' certificates).
    pub security: LinkSecurity,
}

impl SecondaryConfig {
    /// A secondary serving plaintext: nobody is authenticated (tests).
    pub fn plaintext(listen: SocketAddr, dir: PathBuf) -> SecondaryConfig {
        SecondaryConfig {
            listen,
            dir,
            security: LinkSecurity::Plaintext,
        }
    }
}

/// Why a replication connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum SecondaryError {
    /// The socket or the frame codec failed.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The volume's file failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The kept image's undo log failed.
    #[error(transparent)]
    Undo(#[from] UndoError),
    /// The primary broke the protocol; the connection was refused.
    #[error("refused: {0}")]
    Refused(String),
    /// The TLS handshake failed (no client certificate, or one the CA bundle does not sign).
    #[error(transparent)]
    Tls(#[from] LinkTlsError),
    /// The volume belongs to another primary (logged where it was decided).
    #[error(transparent)]
    NotOwner(OwnerError),
}

/// Per volume: the token that cancels its current connection, and the lock a connection holds.
type Lease = (CancellationToken, Arc<tokio::sync::Mutex<()>>);

/// The secondary's volumes: which connection serves each (and the lock it holds while it does).
#[derive(Debug, Default)]
pub(crate) struct Registry {
    volumes: Mutex<HashMap<String, Lease>>,
    /// The connection tasks, to end them all at once ([`Secondary::kill`]).
    connections: Mutex<Vec<JoinHandle<()>>>,
}

impl Registry {
    /// Cancels volume `name`'s current connection and makes `token` cancel the next taker; returns the
    /// lock to wait for (held by the connection until it finished).
    fn take_over_with(&self, name: &str, token: CancellationToken) -> Arc<tokio::sync::Mutex<()>> {
        let mut volumes = self.volumes.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = volumes.entry(name.to_owned()).or_insert_with(|| {
            (
                CancellationToken::new(),
                Arc::new(tokio::sync::Mutex::new(())),
            )
        });
        entry.0.cancel();
        entry.0 = token;
        Arc::clone(&entry.1)
    }

    pub(crate) fn take_over(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.take_over_with(name, CancellationToken::new())
    }

    /// Whether a replication connection serves volume `name` now (it holds the volume's lock).
    pub(crate) fn streaming(&self, name: &str) -> bool {
        self.volumes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .is_some_and(|(_, lock)| lock.try_lock().is_err())
    }
}

/// A running secondary; stops when dropped.
#[derive(Debug)]
pub struct Secondary {
    addr: SocketAddr,
    dir: PathBuf,
    registry: Arc<Registry>,
    undo_log_limit: Arc<AtomicU64>,
    site: Arc<Site>,
    task: JoinHandle<()>,
}

/// How connections keep images: how the undo log is synced, and the most one log may reserve.
#[derive(Clone)]
struct KeptImageSettings {
    log_sync: LogSync,
    /// In bytes; `u64::MAX` for no limit but the filesystem's.
    log_limit: Arc<AtomicU64>,
}

impl KeptImageSettings {
    fn limit(&self) -> Option<u64> {
        Some(self.log_limit.load(Ordering::Relaxed)).filter(|limit| *limit != u64::MAX)
    }
}

impl Drop for Secondary {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Secondary {
    /// Binds and starts serving.
    pub async fn start(config: SecondaryConfig) -> std::io::Result<Secondary> {
        std::fs::create_dir_all(&config.dir)?;
        let listener = TcpListener::bind(config.listen).await?;
        let addr = listener.local_addr()?;
        let registry = Arc::new(Registry::default());
        let owners = Arc::new(Owners::new(&config.dir));
        let site = Arc::new(Site::new(
            config.dir.clone(),
            Arc::clone(&registry),
            config.security.clone(),
        ));
        let accepting_site = Arc::clone(&site);
        let dir = config.dir.clone();
        let shared = Arc::clone(&registry);
        let security = config.security;
        if let LinkSecurity::Tls(tls) = &security {
            tracing::info!(
                identity = tls.identity(),
                "replication link: mutual TLS, volumes owned by the primary that first streams them"
            );
        }
        let undo_log_limit = Arc::new(AtomicU64::new(u64::MAX));
        let kept = KeptImageSettings {
            log_sync: crate::undo_writer::fdatasync(),
            log_limit: Arc::clone(&undo_log_limit),
        };
        let task = tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((tcp, peer)) => {
                        let registry = Arc::clone(&registry);
                        let owners = Arc::clone(&owners);
                        let dir = dir.clone();
                        let security = security.clone();
                        let kept = kept.clone();
                        let served = Arc::clone(&registry);
                        let site = Arc::clone(&accepting_site);
                        let connection = tokio::spawn(async move {
                            match serve_connection(
                                served, owners, &site, dir, security, tcp, peer, kept,
                            )
                            .await
                            {
                                Ok(()) | Err(SecondaryError::NotOwner(_)) => {}
                                Err(e) => {
                                    tracing::warn!(%peer, error = %e, "replication connection ended");
                                }
                            }
                        });
                        let mut connections = registry
                            .connections
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner);
                        connections.retain(|task| !task.is_finished());
                        connections.push(connection);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "replication accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
        Ok(Secondary {
            addr,
            dir: config.dir,
            registry: shared,
            undo_log_limit,
            site,
            task,
        })
    }

    /// Limits the space one volume's undo log may reserve to `bytes` (`None`: only the filesystem's
    /// free space limits it). An image whose log may need more is refused exactly as when the
    /// filesystem has no space left (ENOSPC): the connection asking for it is refused with a message
    /// starting [`crate::undo::OUT_OF_SPACE`]. Applies to images kept from now on.
    pub fn set_undo_log_limit(&self, bytes: Option<u64>) {
        self.undo_log_limit
            .store(bytes.unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Stops abruptly, as a killed process would: the listener closes and every replication connection
    /// ends at once — nothing more is read, acknowledged or refused on it, no goodbye is sent. (Unlike
    /// a killed process, the threads of those connections finish what they had already queued — saves
    /// and writes they accepted — before this returns, so that a secondary started again on the same
    /// directory never races them.) The files are left as they are, undo logs included.
    pub async fn kill(&mut self) {
        self.task.abort();
        // The listener goes with the task: once it ended, the address is free again.
        let _ = (&mut self.task).await;
        let connections = std::mem::take(
            &mut *self
                .registry
                .connections
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for connection in &connections {
            connection.abort();
        }
        for connection in connections {
            let _ = connection.await;
        }
        let locks: Vec<Arc<tokio::sync::Mutex<()>>> = self
            .registry
            .volumes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .map(|(_, lock)| Arc::clone(lock))
            .collect();
        for lock in locks {
            drop(lock.lock().await);
        }
        tracing::warn!(dir = %self.dir.display(), "secondary killed");
    }

    /// The address primaries connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its failover side: promoted volumes (see [`crate::failover`]).
    pub fn site(&self) -> &Arc<Site> {
        &self.site
    }

    /// Rolls volume `name` back to the image it keeps (see [`crate::undo`]): its current replication
    /// connection is cancelled and finishes first, and none is served meanwhile. Returns what was
    /// restored, or `None` if the volume keeps no image.
    pub async fn roll_back(&self, name: &str) -> Result<Option<RolledBack>, UndoError> {
        let lock = self.registry.take_over(name);
        let _guard = lock.lock_owned().await;
        let dir = self.dir.clone();
        let name = name.to_owned();
        tokio::task::spawn_blocking(move || crate::undo::roll_back(&dir, &name))
            .await
            .unwrap_or_else(|e| {
                Err(UndoError::Corrupt {
                    path: e.to_string(),
                    why: "the roll-back task stopped".into(),
                })
            })
    }

    /// The epoch of the image volume `name` keeps, if it keeps one.
    pub fn kept_image(&self, name: &str) -> Result<Option<u64>, UndoError> {
        crate::undo::kept_epoch(&self.dir, name)
    }

    /// Serves until the task ends (it does not, unless aborted).
    pub async fn wait(mut self) {
        let _ = (&mut self.task).await;
    }
}

/// What the acknowledger answers next, in sequence order: a write once its wait completes, or a refusal.
enum AckItem<W = StoreWait> {
    Wait(u64, W),
    Refuse(u64, String),
}

/// Sends `Ack(seq)` for the highest durable sequence not yet acknowledged, if there is one.
async fn send_ack<O: AsyncWrite + Unpin>(
    out: &mut FramedWrite<O, FrameCodec>,
    unsent: &mut Option<u64>,
) -> Result<(), FrameError> {
    match unsent.take() {
        Some(seq) => out.send(Frame::Ack { seq }).await,
        None => Ok(()),
    }
}

/// Answers the primary in sequence order: one cumulative `Ack` for each run of writes that became
/// durable together, sent before it waits for a later write's `fdatasync` (an acknowledgement is never
/// held back behind the next batch), and an `Error` for the first write refused or failed, after which
/// the connection ends.
async fn acknowledge<O, W>(
    mut out: FramedWrite<O, FrameCodec>,
    mut items: mpsc::Receiver<AckItem<W>>,
) -> Result<(), SecondaryError>
where
    O: AsyncWrite + Unpin,
    W: Future<Output = Result<(), StoreError>> + Unpin,
{
    let mut unsent: Option<u64> = None;
    while let Some(item) = items.recv().await {
        let failure = match item {
            AckItem::Wait(seq, mut applied) => {
                let result = match (&mut applied).now_or_never() {
                    Some(result) => result,
                    None => {
                        send_ack(&mut out, &mut unsent).await?;
                        applied.await
                    }
                };
                match result {
                    Ok(()) => {
                        unsent = Some(seq);
                        None
                    }
                    Err(e) => Some((seq, e.to_string(), SecondaryError::Store(e))),
                }
            }
            AckItem::Refuse(seq, message) => {
                Some((seq, message.clone(), SecondaryError::Refused(message)))
            }
        };
        if let Some((seq, message, error)) = failure {
            send_ack(&mut out, &mut unsent).await?;
            out.send(Frame::Error { seq, message }).await?;
            return Err(error);
        }
        if items.is_empty() {
            send_ack(&mut out, &mut unsent).await?;
        }
    }
    send_ack(&mut out, &mut unsent).await?;
    Ok(())
}

/// Authenticates a new connection (TLS: its handshake, within [`HELLO_TIMEOUT`]) and serves it.
#[allow(clippy::too_many_arguments)]
async fn serve_connection(
    registry: Arc<Registry>,
    owners: Arc<Owners>,
    site: &Site,
    dir: PathBuf,
    security: LinkSecurity,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    settings: KeptImageSettings,
) -> Result<(), SecondaryError> {
    tcp.set_nodelay(true).map_err(FrameError::Io)?;
    let (stream, primary) = match &security {
        LinkSecurity::Plaintext => (ServerStream::Left(tcp), None),
        LinkSecurity::Tls(tls) => {
            let (stream, identity) = tokio::time::timeout(HELLO_TIMEOUT, tls.accept(tcp, peer))
                .await
                .map_err(|_| SecondaryError::Refused("no TLS handshake".into()))??;
            (stream, Some(identity))
        }
    };
    serve(registry, owners, Some(site), dir, stream, primary, settings).await
}

/// Serves one replication stream; `primary` is the authenticated peer's identity (`None` in plaintext).
async fn serve(
    registry: Arc<Registry>,
    owners: Arc<Owners>,
    site: Option<&Site>,
    dir: PathBuf,
    stream: ServerStream,
    primary: Option<String>,
    settings: KeptImageSettings,
) -> Result<(), SecondaryError> {
    let (rd, wr) = tokio::io::split(stream);
    let mut frames = FramedRead::new(rd, FrameCodec);
    let mut out = FramedWrite::new(wr, FrameCodec);
    let hello = tokio::time::timeout(HELLO_TIMEOUT, frames.next())
        .await
        .map_err(|_| SecondaryError::Refused("no hello".into()))?;
    let (volume, size, first_seq, keep, drop_image) = match hello {
        Some(Ok(Frame::Hello {
            volume,
            size,
            first_seq,
            keep,
            drop_image,
        })) => (volume, size, first_seq, keep, drop_image),
        Some(Ok(other)) => {
            let message = format!("expected hello, got {other:?}");
            out.send(Frame::Error {
                seq: 0,
                message: message.clone(),
            })
            .await?;
            return Err(SecondaryError::Refused(message));
        }
        Some(Err(e)) => {
            let message = e.to_string();
            let _ = out.send(Frame::Error { seq: 0, message }).await;
            return Err(e.into());
        }
        None => return Ok(()),
    };

    // Only the volume's owner may stream it (and so take it over from an older connection).
    if let Some(primary) = &primary {
        let claim = {
            let owners = Arc::clone(&owners);
            let (volume, primary) = (volume.clone(), primary.clone());
            tokio::task::spawn_blocking(move || owners.claim(&volume, &primary)).await
        };
        let refusal = match claim {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some((e.to_string(), SecondaryError::NotOwner(e))),
            Err(e) => {
                let message = format!("checking volume {volume}'s owner stopped: {e}");
                Some((message.clone(), SecondaryError::Refused(message)))
            }
        };
        if let Some((message, error)) = refusal {
            let _ = out
                .send(Frame::Error {
                    seq: first_seq,
                    message,
                })
                .await;
            return Err(error);
        }
    }

    // Take the volume over from any older connection.
    let token = CancellationToken::new();
    let lock = registry.take_over_with(&volume, token.clone());
    // Held by this connection and by every thread it starts (the store's, the undo log's): the next
    // connection for the volume waits until all of them are done with its files.
    let lease = Arc::new(lock.lock_owned().await);
    // A volume promoted here takes no stream (unless fenced: then the stream demotes it).
    if let Some(refusal) = site.and_then(|site| site.admit_stream(&volume).err()) {
        tracing::warn!(%volume, reason = %refusal, "replication stream refused");
        let _ = out
            .send(Frame::Error {
                seq: first_seq,
                message: refusal.clone(),
            })
            .await;
        return Err(SecondaryError::Refused(refusal));
    }

    let path = dir.join(&volume);
    let opened = Store::open(&path, Some(size))
        .map_err(SecondaryError::from)
        .and_then(|store| {
            store.hold_until_closed(Arc::clone(&lease));
            let log = kept_image(&dir, &volume, size, keep, drop_image, settings.limit())?;
            let kept = match log {
                Some(log) => Some(Kept::start(
                    log,
                    &path,
                    first_seq,
                    &settings.log_sync,
                    Arc::clone(&lease),
                )?),
                None => None,
            };
            Ok((store, kept))
        });
    let (store, mut kept) = match opened {
        Ok(opened) => opened,
        Err(e) => {
            let _ = out
                .send(Frame::Error {
                    seq: first_seq,
                    message: e.to_string(),
                })
                .await;
            return Err(e);
        }
    };
    let kept_epoch = kept.as_ref().map(|k| k.writer.epoch());
    out.send(Frame::Welcome {
        next_seq: first_seq,
        kept: kept_epoch,
    })
    .await?;
    tracing::info!(%volume, size, first_seq, kept = ?kept_epoch, "replication stream started");

    let (acks, ack_rx) = mpsc::channel::<AckItem>(MAX_UNACKED);
    // Ends with this connection's task even when that is aborted ([`Secondary::kill`]).
    let mut acker = AbortOnDrop(tokio::spawn(acknowledge(out, ack_rx)));

    let mut expected = first_seq;
    let mut go_on = true;
    while go_on {
        // With a kept image, writes wait in `kept` until the undo log's sync that saves what they
        // overwrite returned; frames keep being read meanwhile (up to MAX_STAGED writes waiting).
        let room = kept.as_ref().is_none_or(|k| k.staged.len() < MAX_STAGED);
        let frame = tokio::select! {
            () = token.cancelled() => break,
            () = saves_progressed(&mut kept) => {
                go_on = match kept.as_mut() {
                    Some(k) => k.submit_durable(&store, &acks).await,
                    None => true,
                };
                continue;
            }
            frame = frames.next(), if room => frame,
        };
        let mut failure = None;
        let op = match frame {
            None => break,
            Some(Err(e)) => {
                failure = Some(e.to_string());
                None
            }
            Some(Ok(Frame::Write { seq, offset, data })) if seq == expected => {
                if offset
                    .checked_add(data.len() as u64)
                    .is_some_and(|end| end <= size)
                {
                    Some(StoreOp::Write { offset, data })
                } else {
                    failure = Some(format!(
                        "write at {offset} outside the volume ({size} bytes)"
                    ));
                    None
                }
            }
            Some(Ok(Frame::Trim {
                seq,
                offset,
                length,
            })) if seq == expected => {
                let length = u64::from(length);
                if offset.checked_add(length).is_some_and(|end| end <= size) {
                    Some(StoreOp::Trim { offset, length })
                } else {
                    failure = Some(format!(
                        "trim at {offset} outside the volume ({size} bytes)"
                    ));
                    None
                }
            }
            Some(Ok(Frame::Write { seq, .. } | Frame::Trim { seq, .. })) => {
                failure = Some(format!("sequence {seq} out of order (expected {expected})"));
                None
            }
            Some(Ok(Frame::DropImage { epoch })) => {
                match kept.take() {
                    None => {}
                    Some(k) => match k.drop_if_older(epoch, &store, &acks).await {
                        Ok(AfterDrop::Stays(k)) => kept = Some(k),
                        Ok(AfterDrop::Gone) => {}
                        Ok(AfterDrop::Ended) => break,
                        Err(e) => failure = Some(format!("dropping the kept image: {e}")),
                    },
                }
                if failure.is_none() {
                    continue;
                }
                None
            }
            Some(Ok(other)) => {
                failure = Some(format!("unexpected frame {other:?}"));
                None
            }
        };
        if op.is_some() && expected == u64::MAX {
            // No sequence follows the last one: taking it would leave nothing to expect next.
            failure = Some(format!(
                "sequence {expected} is the last there is: reconnect with a lower first sequence"
            ));
        }
        if let Some(message) = failure {
            // Everything before it is applied and acknowledged; this one is refused.
            let applied = match kept.as_mut() {
                Some(k) => k.drain(&store, &acks).await,
                None => true,
            };
            if applied {
                let _ = queue(&acks, &store, AckItem::Refuse(expected, message)).await;
            }
            break;
        }
        if let Some(op) = op {
            go_on = match kept.as_mut() {
                Some(k) => {
                    k.stage(expected, op);
                    k.submit_durable(&store, &acks).await
                }
                None => {
                    queue(
                        &acks,
                        &store,
                        AckItem::Wait(expected, store.submit_deferred(op, true)),
                    )
                    .await
                }
            };
        }
        expected += 1;
        // Writes that arrived together share one fdatasync: start it once no whole frame is left.
        if !whole_frame_buffered(frames.read_buffer()) {
            store.start();
        }
    }
    if let Some(k) = kept {
        // What was accepted is applied (once saved), and the writer has stopped before the next
        // connection for this volume opens the log.
        k.finish(&store, &acks).await;
    }
    store.start();
    drop(acks);
    match (&mut acker.0).await {
        Ok(result) => result,
        Err(e) => Err(SecondaryError::Refused(format!(
            "acknowledger stopped: {e}"
        ))),
    }
}

/// A task aborted when this handle is dropped (a finished task is not affected).
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Resolves when the undo log's writer made more saves durable (or failed); never without a kept
/// image or with no write waiting.
async fn saves_progressed(kept: &mut Option<Kept>) {
    match kept.as_mut().filter(|k| !k.staged.is_empty()) {
        Some(k) => k.writer.changed().await,
        None => std::future::pending().await,
    }
}

/// A kept image in use on a connection: the undo log's writer and the writes waiting for their saves.
struct Kept {
    writer: UndoWriter,
    /// Accepted writes not yet submitted to the volume, in sequence order.
    staged: VecDeque<(u64, StoreOp)>,
    /// The volume file, for logs.
    path: PathBuf,
}

/// What a `DropImage` did to the kept image.
enum AfterDrop {
    /// It is newer than the epoch dropped: it stays.
    Stays(Kept),
    /// It was dropped.
    Gone,
    /// A write before the drop was refused: the connection ends.
    Ended,
}

impl Kept {
    fn start(
        log: UndoLog,
        path: &Path,
        first_seq: u64,
        log_sync: &LogSync,
        lease: impl Send + 'static,
    ) -> Result<Kept, SecondaryError> {
        // Read separately from the store's file: blocks not saved yet hold the kept image.
        let volume = File::open(path).map_err(|e| StoreError {
            op: "open",
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Ok(Kept {
            writer: UndoWriter::start(log, volume, first_seq, Arc::clone(log_sync), lease)?,
            staged: VecDeque::new(),
            path: path.to_owned(),
        })
    }

    /// Accepts write `seq`: what it overwrites is saved, then it is submitted.
    fn stage(&mut self, seq: u64, op: StoreOp) {
        let (offset, length) = match &op {
            StoreOp::Write { offset, data } => (*offset, data.len() as u64),
            StoreOp::Trim { offset, length } => (*offset, *length),
            StoreOp::Flush | StoreOp::Snapshot { .. } => (0, 0),
        };
        self.writer.save(seq, offset, length);
        self.staged.push_back((seq, op));
    }

    /// Submits (in order) every staged write whose save is durable. If the save of the next one failed,
    /// it is refused. Returns `false` when the connection must end.
    async fn submit_durable(&mut self, store: &Store, acks: &mpsc::Sender<AckItem>) -> bool {
        let progress = self.writer.progress();
        let mut submitted = false;
        while let Some((seq, _)) = self.staged.front() {
            if *seq >= progress.durable_below {
                break;
            }
            let Some((seq, op)) = self.staged.pop_front() else {
                break;
            };
            submitted = true;
            if !queue(
                acks,
                store,
                AckItem::Wait(seq, store.submit_deferred(op, true)),
            )
            .await
            {
                return false;
            }
        }
        if submitted {
            store.start();
        }
        match (self.staged.front(), progress.failed) {
            (Some((seq, _)), Some((_, why))) => {
                let seq = *seq;
                self.staged.clear();
                tracing::error!(error = %why, seq, "the write is refused: what it overwrites could not be saved");
                let _ = queue(acks, store, AckItem::Refuse(seq, why)).await;
                false
            }
            _ => true,
        }
    }

    /// Waits until every staged write is submitted (or the first one whose save failed is refused).
    async fn drain(&mut self, store: &Store, acks: &mpsc::Sender<AckItem>) -> bool {
        loop {
            if !self.submit_durable(store, acks).await {
                return false;
            }
            if self.staged.is_empty() {
                return true;
            }
            self.writer.changed().await;
        }
    }

    /// Applies a `DropImage(epoch)`: the writes before it are submitted first; then the image is
    /// dropped if it is of `epoch` or older.
    async fn drop_if_older(
        mut self,
        epoch: u64,
        store: &Store,
        acks: &mpsc::Sender<AckItem>,
    ) -> Result<AfterDrop, UndoError> {
        if !self.drain(store, acks).await {
            self.writer.finish().await?;
            return Ok(AfterDrop::Ended);
        }
        if self.writer.epoch() > epoch {
            return Ok(AfterDrop::Stays(self));
        }
        self.writer.finish().await?.discard()?;
        Ok(AfterDrop::Gone)
    }

    /// Submits what can be and stops the writer.
    async fn finish(mut self, store: &Store, acks: &mpsc::Sender<AckItem>) {
        let _ = self.drain(store, acks).await;
        if let Err(e) = self.writer.finish().await {
            tracing::error!(path = %self.path.display(), error = %e, "the undo log's writer did not stop cleanly");
        }
    }
}

/// The image volume `name` keeps: after dropping one of epoch `drop_image` or older, the one it already
/// keeps (an older image stays), or a new one at `keep`, or none.
fn kept_image(
    dir: &Path,
    name: &str,
    size: u64,
    keep: Option<u64>,
    drop_image: Option<u64>,
    limit: Option<u64>,
) -> Result<Option<UndoLog>, SecondaryError> {
    let mut existing = UndoLog::open(dir, name)?;
    if let Some(epoch) = drop_image
        && let Some(log) = existing.take_if(|log| log.epoch() <= epoch)
    {
        log.discard()?;
    }
    match (existing, keep) {
        (Some(log), keep) => {
            if keep.is_some_and(|e| e != log.epoch()) {
                tracing::info!(volume = name, kept = log.epoch(), asked = ?keep, "an older image is kept: it stays");
            }
            Ok(Some(log))
        }
        (None, Some(epoch)) => match UndoLog::create_within(dir, name, epoch, size, limit) {
            Ok(log) => Ok(Some(log)),
            Err(e) => {
                tracing::error!(volume = name, epoch, error = %e, "the image cannot be kept: the resync is refused");
                Err(e.into())
            }
        },
        (None, None) => Ok(None),
    }
}

/// Hands `item` to the acknowledger; `false` once it is gone.
async fn queue(acks: &mpsc::Sender<AckItem>, store: &Store, item: AckItem) -> bool {
    match acks.try_send(item) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Full(item)) => {
            // The acknowledger is behind: start what it waits for before waiting for it.
            store.start();
            acks.send(item).await.is_ok()
        }
        Err(mpsc::error::TrySendError::Closed(_)) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use tokio::net::TcpStream;
    use tokio::sync::oneshot;

    /// A wait the test completes by hand.
    type Manual =
        futures::future::MapErr<oneshot::Receiver<()>, fn(oneshot::error::RecvError) -> StoreError>;

    fn manual() -> (oneshot::Sender<()>, Manual) {
        let (done, rx) = oneshot::channel();
        let lost: fn(oneshot::error::RecvError) -> StoreError = |_| StoreError {
            op: "fdatasync",
            path: "v".into(),
            message: "sync thread gone".into(),
        };
        (done, futures::TryFutureExt::map_err(rx, lost))
    }

    /// The acknowledger writing to one end of a loopback TCP connection; the other end, framed.
    async fn acknowledger() -> (
        mpsc::Sender<AckItem<Manual>>,
        mpsc::Receiver<AckItem<Manual>>,
        FramedRead<TcpStream, FrameCodec>,
        TcpStream,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        let (items, rx) = mpsc::channel(16);
        (
            items,
            rx,
            FramedRead::new(client.unwrap(), FrameCodec),
            accepted.unwrap().0,
        )
    }

    async fn next_frame(frames: &mut FramedRead<TcpStream, FrameCodec>) -> Frame {
        tokio::time::timeout(Duration::from_secs(10), frames.next())
            .await
            .expect("a frame within 10 s")
            .expect("the connection open")
            .expect("a well-formed frame")
    }

    #[tokio::test]
    async fn an_ack_is_sent_before_waiting_for_the_next_batch_and_covers_its_whole_batch() {
        let (items, rx, mut frames, server) = acknowledger().await;
        // Writes 1-3 became durable together; write 4 waits for a later fdatasync.
        let mut later = Vec::new();
        for seq in 1..=4 {
            let (done, wait) = manual();
            if seq < 4 {
                done.send(()).unwrap();
            } else {
                later.push(done);
            }
            items.send(AckItem::Wait(seq, wait)).await.unwrap();
        }
        let acker = tokio::spawn(acknowledge(FramedWrite::new(server, FrameCodec), rx));
        // The batch is acknowledged with one cumulative ack while write 4 is still pending.
        assert_eq!(next_frame(&mut frames).await, Frame::Ack { seq: 3 });
        let (done, wait) = manual();
        items.send(AckItem::Wait(5, wait)).await.unwrap();
        later.push(done);
        for done in later {
            done.send(()).unwrap();
        }
        let mut last = None;
        while last != Some(5) {
            match next_frame(&mut frames).await {
                Frame::Ack { seq } => {
                    assert!(
                        seq >= 4 && last.is_none_or(|l| seq > l),
                        "ack {seq} after {last:?}"
                    );
                    last = Some(seq);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        drop(items);
        acker.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_failed_write_is_answered_with_an_error_after_the_acks_before_it() {
        let (items, rx, mut frames, server) = acknowledger().await;
        let (done, wait) = manual();
        done.send(()).unwrap();
        items.send(AckItem::Wait(7, wait)).await.unwrap();
        let (gone, wait) = manual();
        drop(gone);
        items.send(AckItem::Wait(8, wait)).await.unwrap();
        let acker = tokio::spawn(acknowledge(FramedWrite::new(server, FrameCodec), rx));
        assert_eq!(next_frame(&mut frames).await, Frame::Ack { seq: 7 });
        match next_frame(&mut frames).await {
            Frame::Error { seq: 8, message } => assert!(message.contains("sync thread gone")),
            other => panic!("expected an error for 8, got {other:?}"),
        }
        assert!(matches!(
            acker.await.unwrap(),
            Err(SecondaryError::Store(_))
        ));
    }

    /// Reads the undo log's whole records in `[from, to)`: (offset, saved bytes) each, and where they
    /// end.
    fn records(log: &[u8], from: u64, to: u64) -> (Vec<(u64, Vec<u8>)>, u64) {
        use crate::undo::RECORD_HEADER;
        let mut at = from as usize;
        let mut found = Vec::new();
        while at + RECORD_HEADER as usize <= to as usize {
            let word = |i: usize, n: usize| {
                log[at + i..at + i + n]
                    .iter()
                    .fold(0u64, |v, b| (v << 8) | u64::from(*b))
            };
            let (offset, length, kind) = (word(0, 8), word(8, 4) as usize, word(12, 4));
            let body = if kind == 0 { length } else { 0 };
            let start = at + RECORD_HEADER as usize;
            if start + body > to as usize {
                break;
            }
            let bytes = if kind == 0 {
                log[start..start + body].to_vec()
            } else {
                vec![0; length]
            };
            found.push((offset, bytes));
            at = start + body;
        }
        (found, at as u64)
    }

    /// The durability rule, checked at every `fdatasync` of the undo log: each block saved in the log
    /// and not yet covered by a returned sync still holds, on the volume, exactly the bytes saved for
    /// it — before the sync and again just before it returns. A write that reached the volume before
    /// the sync saving what it overwrites returned would show as a difference.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_overwrite_lands_before_the_undo_log_sync_that_saved_its_blocks_returned() {
        use std::os::unix::fs::FileExt;
        const SIZE: u64 = 2 * 1024 * 1024;
        let dir = tempfile::tempdir().unwrap();
        let volume_path = dir.path().join("v");
        let image: Vec<u8> = (0..SIZE).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&volume_path, &image).unwrap();

        let violations = Arc::new(Mutex::new(Vec::<String>::new()));
        let syncs = Arc::new(Mutex::new(0u64));
        let checked_to = Arc::new(Mutex::new(crate::undo::HEADER_LEN));
        let sync: LogSync = {
            let (violations, syncs, checked_to) = (
                Arc::clone(&violations),
                Arc::clone(&syncs),
                Arc::clone(&checked_to),
            );
            let volume = File::open(&volume_path).unwrap();
            Arc::new(move |log: &File| {
                let len = log.metadata()?.len();
                let mut bytes = vec![0u8; len as usize];
                log.read_exact_at(&mut bytes, 0)?;
                let from = *checked_to.lock().unwrap();
                let (saved, end) = records(&bytes, from, len);
                let check = |when: &str| {
                    for (offset, old) in &saved {
                        let mut now = vec![0u8; old.len()];
                        volume.read_exact_at(&mut now, *offset).unwrap();
                        if &now != old {
                            violations.lock().unwrap().push(format!(
                                "block at {offset} overwritten {when} the sync saving it returned"
                            ));
                        }
                    }
                };
                check("before");
                // Give a misbehaving secondary time to apply writes it should still hold back.
                std::thread::sleep(Duration::from_millis(2));
                log.sync_data()?;
                check("just as");
                *checked_to.lock().unwrap() = end;
                *syncs.lock().unwrap() += 1;
                Ok(())
            })
        };

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let served_dir = dir.path().to_path_buf();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let settings = KeptImageSettings {
                log_sync: sync,
                log_limit: Arc::new(AtomicU64::new(u64::MAX)),
            };
            let owners = Arc::new(Owners::new(&served_dir));
            let stream = ServerStream::Left(tcp);
            serve(
                Arc::new(Registry::default()),
                owners,
                None,
                served_dir,
                stream,
                None,
                settings,
            )
            .await
        });
        let mut link =
            tokio_util::codec::Framed::new(TcpStream::connect(addr).await.unwrap(), FrameCodec);
        link.send(Frame::Hello {
            volume: "v".into(),
            size: SIZE,
            first_seq: 1,
            keep: Some(4),
            drop_image: None,
        })
        .await
        .unwrap();
        assert_eq!(
            link.next().await.unwrap().unwrap(),
            Frame::Welcome {
                next_seq: 1,
                kept: Some(4)
            }
        );
        // Overlapping, unaligned writes and trims, all sent at once.
        const WRITES: u64 = 300;
        let (sender, mut receiver) = link.split();
        let send = tokio::spawn(async move {
            let mut sender = sender;
            for seq in 1..=WRITES {
                let offset = (seq * 52_361) % (SIZE - 70_000);
                let frame = if seq % 23 == 0 {
                    Frame::Trim {
                        seq,
                        offset,
                        length: 9000,
                    }
                } else {
                    Frame::Write {
                        seq,
                        offset,
                        data: Bytes::from(vec![seq as u8; 1 + (seq as usize * 977) % 65_000]),
                    }
                };
                sender.send(frame).await.unwrap();
            }
            sender
        });
        loop {
            match tokio::time::timeout(Duration::from_secs(30), receiver.next())
                .await
                .expect("an answer within 30 s")
            {
                Some(Ok(Frame::Ack { seq })) if seq == WRITES => break,
                Some(Ok(Frame::Ack { .. })) => {}
                other => panic!("expected acks, got {other:?}"),
            }
        }
        drop(send.await.unwrap());
        drop(receiver);
        server.await.unwrap().unwrap();

        let violations = violations.lock().unwrap();
        assert!(
            violations.is_empty(),
            "{} violations of the durability rule, the first: {:?}",
            violations.len(),
            &violations[..violations.len().min(5)]
        );
        let syncs = *syncs.lock().unwrap();
        assert!(
            (1..WRITES).contains(&syncs),
            "{WRITES} writes saved in {syncs} syncs"
        );
        assert_ne!(std::fs::read(&volume_path).unwrap(), image);
        crate::undo::roll_back(dir.path(), "v").unwrap().unwrap();
        assert_eq!(std::fs::read(&volume_path).unwrap(), image);
    }
}
