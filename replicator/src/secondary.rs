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
//! A new connection for a volume takes over from an older one: the older connection is cancelled and
//! finishes (applying and acknowledging what it already accepted) before the new one starts.

use std::collections::HashMap;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::{FutureExt, SinkExt, StreamExt};
use tokio::io::AsyncWrite;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;

use crate::store::{Store, StoreError, StoreOp, StoreWait};
use crate::undo::{RolledBack, UndoError, UndoLog};
use crate::wire::{Frame, FrameCodec, FrameError, whole_frame_buffered};

/// How long a new connection may take to say hello.
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
}

/// Per volume: the token that cancels its current connection, and the lock a connection holds.
type Lease = (CancellationToken, Arc<tokio::sync::Mutex<()>>);

#[derive(Debug, Default)]
struct Registry {
    volumes: Mutex<HashMap<String, Lease>>,
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

    fn take_over(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.take_over_with(name, CancellationToken::new())
    }
}

/// A running secondary; stops when dropped.
#[derive(Debug)]
pub struct Secondary {
    addr: SocketAddr,
    dir: PathBuf,
    registry: Arc<Registry>,
    task: JoinHandle<()>,
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
        let dir = config.dir.clone();
        let shared = Arc::clone(&registry);
        let task = tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((tcp, peer)) => {
                        let registry = Arc::clone(&registry);
                        let dir = dir.clone();
                        tokio::spawn(async move {
                            if let Err(e) = serve(registry, dir, tcp).await {
                                tracing::warn!(%peer, error = %e, "replication connection ended");
                            }
                        });
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
            task,
        })
    }

    /// The address primaries connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
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

async fn serve(
    registry: Arc<Registry>,
    dir: PathBuf,
    tcp: TcpStream,
) -> Result<(), SecondaryError> {
    tcp.set_nodelay(true).map_err(FrameError::Io)?;
    let (rd, wr) = tcp.into_split();
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

    // Take the volume over from any older connection.
    let token = CancellationToken::new();
    let lock = registry.take_over_with(&volume, token.clone());
    let _guard = lock.lock_owned().await;

    let path = dir.join(&volume);
    let opened = Store::open(&path, Some(size))
        .map_err(SecondaryError::from)
        .and_then(|store| Ok((store, kept_image(&dir, &volume, size, keep, drop_image)?)));
    let (store, mut undo) = match opened {
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
    // The volume file as it is read for the undo log (blocks not saved yet hold the kept image).
    let reader = match &undo {
        Some(_) => Some(File::open(&path).map_err(|e| StoreError {
            op: "open",
            path: path.display().to_string(),
            message: e.to_string(),
        })?),
        None => None,
    };
    out.send(Frame::Welcome {
        next_seq: first_seq,
        kept: undo.as_ref().map(UndoLog::epoch),
    })
    .await?;
    tracing::info!(%volume, size, first_seq, kept = ?undo.as_ref().map(UndoLog::epoch), "replication stream started");

    let (acks, ack_rx) = mpsc::channel::<AckItem>(MAX_UNACKED);
    let acker = tokio::spawn(acknowledge(out, ack_rx));

    // With a kept image, writes wait here until the log holding what they overwrite is synced.
    let mut staged: Vec<(u64, StoreOp)> = Vec::new();
    let mut expected = first_seq;
    loop {
        let frame = tokio::select! {
            () = token.cancelled() => break,
            frame = frames.next() => frame,
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
                if !flush(&mut undo, &mut staged, &store, &acks).await {
                    break;
                }
                if let Some(log) = undo.take_if(|log| log.epoch() <= epoch)
                    && let Err(e) = log.discard()
                {
                    failure = Some(format!("dropping the kept image: {e}"));
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
        if failure.is_none()
            && let (Some(op), Some(log), Some(reader)) = (&op, undo.as_mut(), &reader)
        {
            let (offset, length) = match op {
                StoreOp::Write { offset, data } => (*offset, data.len() as u64),
                StoreOp::Trim { offset, length } => (*offset, *length),
                _ => (0, 0),
            };
            if let Err(e) = log.preserve(reader, offset, length) {
                tracing::error!(%volume, error = %e, "the write is refused: what it overwrites could not be saved");
                failure = Some(format!("keeping the image: {e}"));
            }
        }
        if let Some(message) = failure {
            // Everything before it is applied and acknowledged; this one is refused.
            let _ = flush(&mut undo, &mut staged, &store, &acks).await;
            let _ = queue(&acks, &store, AckItem::Refuse(expected, message)).await;
            break;
        }
        if let Some(op) = op {
            if undo.is_some() {
                staged.push((expected, op));
            } else if !queue(
                &acks,
                &store,
                AckItem::Wait(expected, store.submit_deferred(op, true)),
            )
            .await
            {
                break;
            }
        }
        expected += 1;
        // Writes that arrived together share one fdatasync (of the undo log, then of the volume):
        // start it once no whole frame is left.
        if !whole_frame_buffered(frames.read_buffer()) || staged.len() >= MAX_STAGED {
            if !flush(&mut undo, &mut staged, &store, &acks).await {
                break;
            }
            store.start();
        }
    }
    let _ = flush(&mut undo, &mut staged, &store, &acks).await;
    store.start();
    drop(acks);
    match acker.await {
        Ok(result) => result,
        Err(e) => Err(SecondaryError::Refused(format!(
            "acknowledger stopped: {e}"
        ))),
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
        (None, Some(epoch)) => Ok(Some(UndoLog::create(dir, name, epoch, size)?)),
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

/// Makes the undo log durable, then submits the staged writes it protects (in order). If the log
/// cannot be synced, none of them is applied: the first is refused. Returns `false` when the connection
/// must end.
async fn flush(
    undo: &mut Option<UndoLog>,
    staged: &mut Vec<(u64, StoreOp)>,
    store: &Store,
    acks: &mpsc::Sender<AckItem>,
) -> bool {
    if staged.is_empty() {
        return true;
    }
    if let Some(log) = undo.as_mut().filter(|log| log.needs_sync()) {
        let file = log.sync_handle();
        let synced = tokio::task::spawn_blocking(move || file.sync_data()).await;
        match synced {
            Ok(Ok(())) => log.synced(),
            failed => {
                let why = match failed {
                    Ok(Err(e)) => e.to_string(),
                    Err(e) => e.to_string(),
                    Ok(Ok(())) => String::new(),
                };
                let seq = staged.first().map_or(0, |(seq, _)| *seq);
                staged.clear();
                tracing::error!(error = %why, "the undo log could not be synced: writes refused");
                let message = format!("keeping the image: fdatasync of the undo log: {why}");
                let _ = queue(acks, store, AckItem::Refuse(seq, message)).await;
                return false;
            }
        }
    }
    for (seq, op) in staged.drain(..) {
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
    store.start();
    true
}

#[cfg(test)]
mod tests {
    use super::*;
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
}
