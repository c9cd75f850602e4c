//! Synchronous copy of a volume's writes to its secondary: the per-volume copy state machine (pure,
//! guarded by the volume's lock) and the replication link task (the I/O).
//!
//! **Order.** Every write gets its sequence number and enters both the local store queue and the copy
//! queue under the volume's lock, so the secondary receives writes in sequence order and applies them in
//! that order. The secondary acknowledges cumulatively; a write's copy completes when an ack covers its
//! sequence.
//!
//! **Ack rule.** The NBD server acknowledges a write only when both its local write and its copy
//! completed successfully (they run in parallel).
//!
//! **Failure.** The link task reports a connection error, an `Error` frame from the secondary, a
//! protocol violation, or a write the secondary has not acknowledged within [`CopyConfig::timeout`]
//! (counted from when the write entered the copy queue). [`CopyState::fail`] then moves the volume to
//! [`CopyMode::Failed`] and decides what happens to every write whose copy did not complete — in
//! [`CopyState::settle_uncopied`], the single place where part 2 will hold writes instead of failing
//! them. Every such write is recorded in the dirty-region map. Nothing is ever acknowledged unreplicated.

use std::collections::VecDeque;
use std::sync::Weak;
use std::time::{Duration, Instant, SystemTime};

use bytes::BytesMut;
use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{Encoder, FramedRead};

use crate::dirty::DirtyMap;
use crate::events::CopyFailed;
use crate::volume::Shared;
use crate::wire::{Frame, FrameCodec};

/// Where and how strictly a volume is copied.
#[derive(Debug, Clone)]
pub struct CopyConfig {
    /// The secondary's replication address (`host:port`).
    pub secondary: String,
    /// How long a write may wait for the secondary's acknowledgement before the copy counts as failed.
    pub timeout: Duration,
}

/// Why a write's copy did not complete.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CopyError {
    /// The connection to the secondary failed or could not be made.
    #[error("replication link: {0}")]
    Link(String),
    /// The secondary did not acknowledge in time.
    #[error("secondary did not acknowledge within {0:?}")]
    Timeout(Duration),
    /// The secondary refused or failed a write.
    #[error("secondary refused sequence {seq}: {message}")]
    Secondary {
        /// The sequence it refused.
        seq: u64,
        /// Its message.
        message: String,
    },
    /// The secondary broke the protocol.
    #[error("replication protocol: {0}")]
    Protocol(String),
    /// Replication of this volume has failed; the write was not copied.
    #[error("replication failed at sequence {first_seq}: {cause}")]
    Failed {
        /// The first sequence not copied.
        first_seq: u64,
        /// The original failure.
        cause: String,
    },
}

/// What a volume's replication is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyMode {
    /// Replication off: writes are acknowledged once local.
    Off,
    /// Every write is copied synchronously.
    Replicating,
    /// A copy failed; later writes are not copied (part 1: they fail with an I/O error).
    Failed {
        /// The first sequence not copied.
        first_seq: u64,
        /// What failed.
        error: String,
        /// When.
        since: SystemTime,
    },
}

/// How a write's copy will complete.
#[derive(Debug)]
pub enum CopyWait {
    /// Already decided.
    Done(Result<(), CopyError>),
    /// Completes when the secondary acknowledges (or the copy fails).
    Wait(oneshot::Receiver<Result<(), CopyError>>),
}

impl CopyWait {
    /// Waits for the copy's outcome.
    pub async fn wait(self) -> Result<(), CopyError> {
        match self {
            CopyWait::Done(result) => result,
            CopyWait::Wait(rx) => rx.await.unwrap_or_else(|_| {
                Err(CopyError::Link("the replication link task stopped".into()))
            }),
        }
    }
}

#[derive(Debug)]
struct Pending {
    seq: u64,
    offset: u64,
    length: u64,
    enqueued: Instant,
    done: oneshot::Sender<Result<(), CopyError>>,
}

/// A volume's copy state, guarded by the volume's lock. No I/O.
#[derive(Debug)]
pub struct CopyState {
    mode: CopyMode,
    pending: VecDeque<Pending>,
    link: Option<mpsc::UnboundedSender<Frame>>,
    generation: u64,
    last_acked: Option<u64>,
    dirty: DirtyMap,
}

impl CopyState {
    /// Replication off.
    pub fn off() -> CopyState {
        CopyState {
            mode: CopyMode::Off,
            pending: VecDeque::new(),
            link: None,
            generation: 0,
            last_acked: None,
            dirty: DirtyMap::default(),
        }
    }

    /// Replicating through `link` (the sender of the link task numbered `generation`).
    pub fn replicating(link: mpsc::UnboundedSender<Frame>, generation: u64) -> CopyState {
        CopyState {
            mode: CopyMode::Replicating,
            link: Some(link),
            generation,
            ..CopyState::off()
        }
    }

    /// The current mode.
    pub fn mode(&self) -> &CopyMode {
        &self.mode
    }

    /// The highest sequence the secondary acknowledged.
    pub fn last_acked(&self) -> Option<u64> {
        self.last_acked
    }

    /// Writes waiting for the secondary.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// The dirty-region map.
    pub fn dirty(&self) -> &DirtyMap {
        &self.dirty
    }

    /// When the oldest write still waiting for the secondary entered the queue.
    pub fn oldest_pending(&self) -> Option<Instant> {
        self.pending.front().map(|p| p.enqueued)
    }

    /// Queues write or trim `frame` (sequence `seq`, covering `[offset, offset + length)`) for copying.
    /// Called under the volume's lock, in sequence order.
    pub fn submit(
        &mut self,
        seq: u64,
        offset: u64,
        length: u64,
        frame: Frame,
        now: Instant,
    ) -> CopyWait {
        match &self.mode {
            CopyMode::Off => CopyWait::Done(Ok(())),
            CopyMode::Replicating => {
                let (done, rx) = oneshot::channel();
                self.pending.push_back(Pending {
                    seq,
                    offset,
                    length,
                    enqueued: now,
                    done,
                });
                if let Some(link) = &self.link {
                    // A closed link means the link task ended; it reports why through `fail`.
                    let _ = link.send(frame);
                }
                CopyWait::Wait(rx)
            }
            CopyMode::Failed {
                first_seq, error, ..
            } => {
                let err = CopyError::Failed {
                    first_seq: *first_seq,
                    cause: error.clone(),
                };
                self.dirty.mark(offset, length);
                match self.settle_uncopied(err) {
                    Settle::Fail(err) => CopyWait::Done(Err(err)),
                }
            }
        }
    }

    /// The secondary acknowledged every sequence up to `seq` on link `generation`.
    pub fn acked(&mut self, generation: u64, seq: u64, next_seq: u64) -> Result<(), CopyError> {
        if generation != self.generation || self.mode != CopyMode::Replicating {
            return Ok(());
        }
        if seq >= next_seq || self.last_acked.is_some_and(|last| seq < last) {
            return Err(CopyError::Protocol(format!(
                "ack for sequence {seq} (next {next_seq}, last acked {:?})",
                self.last_acked
            )));
        }
        self.last_acked = Some(seq);
        while self.pending.front().is_some_and(|p| p.seq <= seq) {
            if let Some(p) = self.pending.pop_front() {
                let _ = p.done.send(Ok(()));
            }
        }
        Ok(())
    }

    /// The link numbered `generation` failed with `error`. Returns the event to publish, or `None` if
    /// the failure is stale (an older link) or the volume is not replicating.
    pub fn fail(
        &mut self,
        generation: u64,
        error: &CopyError,
        next_seq: u64,
        volume: &str,
        now: SystemTime,
    ) -> Option<CopyFailed> {
        if generation != self.generation || self.mode != CopyMode::Replicating {
            return None;
        }
        let first_seq = self.pending.front().map_or(next_seq, |p| p.seq);
        let cause = error.to_string();
        self.mode = CopyMode::Failed {
            first_seq,
            error: cause.clone(),
            since: now,
        };
        self.link = None;
        for p in std::mem::take(&mut self.pending) {
            self.dirty.mark(p.offset, p.length);
            let err = if p.seq == first_seq {
                error.clone()
            } else {
                CopyError::Failed {
                    first_seq,
                    cause: cause.clone(),
                }
            };
            match self.settle_uncopied(err) {
                Settle::Fail(err) => {
                    let _ = p.done.send(Err(err));
                }
            }
        }
        Some(CopyFailed {
            volume: volume.to_owned(),
            sequence: first_seq,
            error: cause,
            since: now,
        })
    }

    /// The decision for a write whose copy did not and will not complete. Part 1 fails it (the NBD
    /// client gets `EIO`); part 2 holds it here (keeps its completion until release, resume or the hold
    /// timeout) — the write is already in the dirty map either way.
    fn settle_uncopied(&mut self, err: CopyError) -> Settle {
        Settle::Fail(err)
    }
}

/// What [`CopyState::settle_uncopied`] decided.
enum Settle {
    /// Complete the write with this error.
    Fail(CopyError),
}

/// How often the link task checks the oldest write's age against the timeout.
fn watchdog_period(timeout: Duration) -> Duration {
    (timeout / 4).clamp(Duration::from_millis(1), Duration::from_millis(50))
}

/// Runs one replication link for a volume until it fails or the volume is dropped: connects, says
/// hello, streams queued frames, applies acknowledgements, and watches the oldest write's age.
pub(crate) async fn run_link(
    shared: Weak<Shared>,
    generation: u64,
    config: CopyConfig,
    hello: Frame,
    rx: mpsc::UnboundedReceiver<Frame>,
) {
    let timeout = config.timeout;
    let watchdog = {
        let shared = shared.clone();
        async move {
            let mut tick = tokio::time::interval(watchdog_period(timeout));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(shared) = shared.upgrade() else {
                    return Ok(());
                };
                if shared
                    .oldest_pending()
                    .is_some_and(|t| t.elapsed() > timeout)
                {
                    return Err(CopyError::Timeout(timeout));
                }
            }
        }
    };
    let link = stream(shared.clone(), generation, &config, hello, rx);
    let result = tokio::select! {
        r = watchdog => r,
        r = link => r,
    };
    if let Err(error) = result
        && let Some(shared) = shared.upgrade()
    {
        tracing::warn!(volume = %shared.name(), %error, "copy to the secondary failed");
        shared.copy_failed(generation, &error);
    }
}

async fn connect(addr: &str) -> Result<TcpStream, CopyError> {
    // Retry until the watchdog decides (only a write waiting too long makes an unreachable secondary a
    // failure; an idle volume keeps trying).
    let mut delay = Duration::from_millis(20);
    loop {
        match TcpStream::connect(addr).await {
            Ok(stream) => {
                stream
                    .set_nodelay(true)
                    .map_err(|e| CopyError::Link(e.to_string()))?;
                return Ok(stream);
            }
            Err(e) => {
                tracing::debug!(%addr, error = %e, "secondary not reachable yet");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_millis(500));
            }
        }
    }
}

async fn stream(
    shared: Weak<Shared>,
    generation: u64,
    config: &CopyConfig,
    hello: Frame,
    mut rx: mpsc::UnboundedReceiver<Frame>,
) -> Result<(), CopyError> {
    let first_seq = match &hello {
        Frame::Hello { first_seq, .. } => *first_seq,
        _ => return Err(CopyError::Protocol("link must open with hello".into())),
    };
    let tcp = connect(&config.secondary).await?;
    let (rd, mut wr) = tcp.into_split();
    let mut buf = BytesMut::new();
    FrameCodec
        .encode(&hello, &mut buf)
        .map_err(|e| CopyError::Protocol(e.to_string()))?;
    wr.write_all(&buf)
        .await
        .map_err(|e| CopyError::Link(e.to_string()))?;
    buf.clear();
    let mut frames = FramedRead::new(rd, FrameCodec);
    match frames.next().await {
        Some(Ok(Frame::Welcome { next_seq })) if next_seq == first_seq => {}
        Some(Ok(Frame::Error { seq, message })) => {
            return Err(CopyError::Secondary { seq, message });
        }
        Some(Ok(other)) => {
            return Err(CopyError::Protocol(format!(
                "expected welcome, got {other:?}"
            )));
        }
        Some(Err(e)) => return Err(CopyError::Protocol(e.to_string())),
        None => return Err(CopyError::Link("secondary closed the connection".into())),
    }

    let writer = async move {
        while let Some(frame) = rx.recv().await {
            FrameCodec
                .encode(&frame, &mut buf)
                .map_err(|e| CopyError::Protocol(e.to_string()))?;
            while buf.len() < 1024 * 1024 {
                match rx.try_recv() {
                    Ok(frame) => FrameCodec
                        .encode(&frame, &mut buf)
                        .map_err(|e| CopyError::Protocol(e.to_string()))?,
                    Err(_) => break,
                }
            }
            wr.write_all(&buf)
                .await
                .map_err(|e| CopyError::Link(e.to_string()))?;
            buf.clear();
        }
        // The volume is gone: nothing more to copy.
        Ok(())
    };
    let reader = async move {
        loop {
            match frames.next().await {
                Some(Ok(Frame::Ack { seq })) => {
                    let Some(shared) = shared.upgrade() else {
                        return Ok(());
                    };
                    shared.copy_acked(generation, seq)?;
                }
                Some(Ok(Frame::Error { seq, message })) => {
                    return Err(CopyError::Secondary { seq, message });
                }
                Some(Ok(other)) => {
                    return Err(CopyError::Protocol(format!("unexpected frame {other:?}")));
                }
                Some(Err(e)) => return Err(CopyError::Link(e.to_string())),
                None => return Err(CopyError::Link("secondary closed the connection".into())),
            }
        }
    };
    tokio::select! {
        r = writer => r,
        r = reader => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn write(seq: u64) -> Frame {
        Frame::Write {
            seq,
            offset: seq * 4096,
            data: Bytes::from_static(&[1u8; 16]),
        }
    }

    #[tokio::test]
    async fn acks_complete_in_order_and_failure_fails_the_rest() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut s = CopyState::replicating(tx, 1);
        let now = Instant::now();
        let waits: Vec<CopyWait> = (0..4)
            .map(|seq| s.submit(seq, seq * 4096, 4096, write(seq), now))
            .collect();
        for seq in 0..4 {
            assert_eq!(rx.recv().await, Some(write(seq)));
        }
        s.acked(1, 1, 4).unwrap();
        assert!(s.acked(1, 9, 4).is_err(), "ack beyond what was sent");
        let ev = s
            .fail(
                1,
                &CopyError::Timeout(Duration::from_secs(1)),
                4,
                "v",
                SystemTime::UNIX_EPOCH,
            )
            .unwrap();
        assert_eq!(ev.sequence, 2);
        assert!(
            s.fail(
                1,
                &CopyError::Link("again".into()),
                4,
                "v",
                SystemTime::now()
            )
            .is_none()
        );
        let mut results = Vec::new();
        for w in waits {
            results.push(w.wait().await);
        }
        assert!(results[0].is_ok() && results[1].is_ok());
        assert_eq!(results[2], Err(CopyError::Timeout(Duration::from_secs(1))));
        assert!(matches!(
            results[3],
            Err(CopyError::Failed { first_seq: 2, .. })
        ));
        // Later writes fail at once and are recorded dirty.
        let later = s.submit(4, 1 << 20, 4096, write(4), now).wait().await;
        assert!(matches!(later, Err(CopyError::Failed { first_seq: 2, .. })));
        assert!(s.dirty().is_dirty(1 << 20, 4096));
        assert!(s.dirty().is_dirty(2 * 4096, 4096));
        assert!(!s.dirty().is_dirty(1 << 30, 1));
    }

    #[tokio::test]
    async fn stale_generation_is_ignored_and_off_completes_at_once() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let mut s = CopyState::replicating(tx, 2);
        let w = s.submit(0, 0, 1, write(0), Instant::now());
        assert!(
            s.fail(1, &CopyError::Link("old".into()), 1, "v", SystemTime::now())
                .is_none()
        );
        s.acked(1, 0, 1).unwrap();
        assert_eq!(s.pending(), 1);
        s.acked(2, 0, 1).unwrap();
        assert_eq!(w.wait().await, Ok(()));
        let mut off = CopyState::off();
        assert_eq!(
            off.submit(0, 0, 1, write(0), Instant::now()).wait().await,
            Ok(())
        );
    }
}
