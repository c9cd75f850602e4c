//! A served volume: its file ([`Store`]), its write sequence and its copy state, tied together so that
//! every write enters the local queue and the copy queue in the same order.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use tokio::sync::{broadcast, mpsc};

use crate::copy::{CopyConfig, CopyError, CopyMode, CopyState, CopyWait};
use crate::events::Event;
use crate::store::{Store, StoreError, StoreOp};
use crate::wire::{Frame, valid_volume_name};

/// How to serve one volume.
#[derive(Debug, Clone)]
pub struct VolumeConfig {
    /// The export name (also the secondary's file name): see [`valid_volume_name`].
    pub name: String,
    /// The backing file (created sparse if missing).
    pub path: PathBuf,
    /// The size in bytes; `None` uses the file's current length.
    pub size: Option<u64>,
    /// Where to copy writes; `None` turns replication off.
    pub copy: Option<CopyConfig>,
}

/// Why a volume operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VolumeError {
    /// The local file failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The copy to the secondary failed.
    #[error(transparent)]
    Copy(#[from] CopyError),
    /// The configuration is unusable.
    #[error("volume {name}: {reason}")]
    Config {
        /// The volume.
        name: String,
        /// Why.
        reason: String,
    },
}

/// A snapshot of a volume's replication, for status and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeStatus {
    /// The volume.
    pub name: String,
    /// Replication mode.
    pub mode: CopyMode,
    /// The sequence the next write will get.
    pub next_seq: u64,
    /// The highest sequence the secondary acknowledged.
    pub last_acked: Option<u64>,
    /// Writes waiting for the secondary.
    pub pending: usize,
    /// Bytes the secondary may lack.
    pub dirty_bytes: u64,
}

#[derive(Debug)]
struct Inner {
    next_seq: u64,
    copy: CopyState,
}

/// The part of a volume its replication link task refers to (weakly).
#[derive(Debug)]
pub(crate) struct Shared {
    name: String,
    inner: Mutex<Inner>,
    events: broadcast::Sender<Event>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Critical sections never leave `Inner` half-updated, so a poisoned lock is still consistent.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn oldest_pending(&self) -> Option<Instant> {
        self.lock().copy.oldest_pending()
    }

    pub(crate) fn copy_acked(&self, generation: u64, seq: u64) -> Result<(), CopyError> {
        let mut inner = self.lock();
        let next_seq = inner.next_seq;
        inner.copy.acked(generation, seq, next_seq)
    }

    pub(crate) fn copy_failed(&self, generation: u64, error: &CopyError) {
        let event = {
            let mut inner = self.lock();
            let next_seq = inner.next_seq;
            inner
                .copy
                .fail(generation, error, next_seq, &self.name, SystemTime::now())
        };
        if let Some(event) = event {
            // No subscriber is fine: the state itself records the failure.
            let _ = self.events.send(Event::CopyFailed(event));
        }
    }
}

/// A served volume.
#[derive(Debug)]
pub struct Volume {
    shared: Arc<Shared>,
    store: Store,
}

impl Volume {
    /// Opens the volume's file and, if it is replicated, starts its replication link. Must be called
    /// inside a tokio runtime.
    pub fn open(
        config: VolumeConfig,
        events: broadcast::Sender<Event>,
    ) -> Result<Arc<Volume>, VolumeError> {
        if !valid_volume_name(&config.name) {
            return Err(VolumeError::Config {
                name: config.name,
                reason:
                    "a volume name is 1-255 characters of [A-Za-z0-9._-], not starting with '.'"
                        .into(),
            });
        }
        let store = Store::open(&config.path, config.size)?;
        let next_seq = 0;
        let generation = 1;
        let (copy, link) = match &config.copy {
            None => (CopyState::off(), None),
            Some(copy_config) => {
                let (tx, rx) = mpsc::unbounded_channel();
                (
                    CopyState::replicating(tx, generation),
                    Some((copy_config.clone(), rx)),
                )
            }
        };
        let shared = Arc::new(Shared {
            name: config.name.clone(),
            inner: Mutex::new(Inner { next_seq, copy }),
            events,
        });
        if let Some((copy_config, rx)) = link {
            let hello = Frame::Hello {
                volume: config.name.clone(),
                size: store.size(),
                first_seq: next_seq,
            };
            tokio::spawn(crate::copy::run_link(
                Arc::downgrade(&shared),
                generation,
                copy_config,
                hello,
                rx,
            ));
        }
        Ok(Arc::new(Volume { shared, store }))
    }

    /// The export name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The size in bytes.
    pub fn size(&self) -> u64 {
        self.store.size()
    }

    /// The backing file.
    pub fn path(&self) -> &std::path::Path {
        self.store.path()
    }

    /// A snapshot of the volume's replication.
    pub fn status(&self) -> VolumeStatus {
        let inner = self.shared.lock();
        VolumeStatus {
            name: self.shared.name.clone(),
            mode: inner.copy.mode().clone(),
            next_seq: inner.next_seq,
            last_acked: inner.copy.last_acked(),
            pending: inner.copy.pending(),
            dirty_bytes: inner.copy.dirty().dirty_bytes(),
        }
    }

    /// The dirty regions as `(offset, length)` ranges.
    pub fn dirty_regions(&self) -> Vec<(u64, u64)> {
        self.shared.lock().copy.dirty().regions()
    }

    /// Reads `length` bytes at `offset` (the caller checked the range).
    pub async fn read(&self, offset: u64, length: u32) -> Result<Bytes, VolumeError> {
        Ok(self.store.read(offset, length).await?)
    }

    /// Writes `data` at `offset` (the caller checked the range). Returns once the write is local (and
    /// durable if `fua`) and, when replicating, durable on the secondary.
    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), VolumeError> {
        let length = data.len() as u64;
        let frame_data = data.clone();
        self.ordered(
            StoreOp::Write { offset, data },
            fua,
            offset,
            length,
            move |seq| Frame::Write {
                seq,
                offset,
                data: frame_data,
            },
        )
        .await
    }

    /// Discards `[offset, offset + length)` on the primary and the secondary.
    pub async fn trim(&self, offset: u64, length: u32, fua: bool) -> Result<(), VolumeError> {
        self.ordered(
            StoreOp::Trim {
                offset,
                length: u64::from(length),
            },
            fua,
            offset,
            u64::from(length),
            move |seq| Frame::Trim {
                seq,
                offset,
                length,
            },
        )
        .await
    }

    /// Makes every completed write durable locally. (Writes acknowledged while replicating are already
    /// durable on the secondary.)
    pub async fn flush(&self) -> Result<(), VolumeError> {
        Ok(self.store.apply(StoreOp::Flush, true).await?)
    }

    async fn ordered(
        &self,
        op: StoreOp,
        durable: bool,
        offset: u64,
        length: u64,
        frame: impl FnOnce(u64) -> Frame,
    ) -> Result<(), VolumeError> {
        let (local, copy): (_, CopyWait) = {
            let mut inner = self.shared.lock();
            let seq = inner.next_seq;
            inner.next_seq += 1;
            let local = self.store.submit(op, durable);
            let copy = inner
                .copy
                .submit(seq, offset, length, frame(seq), Instant::now());
            (local, copy)
        };
        let (local, copy) = tokio::join!(local, copy.wait());
        let local = local.unwrap_or_else(|_| {
            Err(StoreError {
                op: "write",
                path: self.store.path().display().to_string(),
                message: "the writer thread has stopped".into(),
            })
        });
        local?;
        copy?;
        Ok(())
    }
}
