//! File-backed block storage: a sparse file whose operations are applied in submission order, with
//! group commit.
//!
//! Both the primary and the secondary write through a [`Store`]. Writes, trims and flushes are applied in
//! exactly the order they were submitted (so a primary and its secondary, fed the same ordered stream,
//! end up byte-identical even when a client issues overlapping writes concurrently).
//!
//! **Where the I/O runs.** A small write (at most [`INLINE_MAX`] bytes) submitted while nothing is queued
//! is applied at once by the submitting task with a positioned write: that is a copy into the page cache
//! of a few microseconds, shorter than handing the write to a thread and being woken by it. Everything
//! else (large writes, trims, ordered snapshots, and any operation submitted while earlier ones are still
//! queued) goes to the store's I/O thread, which applies its queue in order; an operation is applied
//! inline only when the queue is empty, so the order holds either way.
//!
//! **Durable** means: the bytes were written with `pwrite` and an `fdatasync` of the file that *started
//! after that `pwrite` returned* returned successfully before the operation was answered. The I/O thread
//! does group commit: a durable operation, once applied, joins the waiters of the next `fdatasync`; the
//! thread takes every waiter registered so far, calls `fdatasync` once, and answers them all. Writes
//! applied while an `fdatasync` runs wait for the next one.
//!
//! Reads run on tokio's blocking pool with positioned reads and see every write already answered.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::sync::oneshot;

/// The largest write applied by the submitting task; larger ones go to the I/O thread.
pub const INLINE_MAX: usize = 64 * 1024;
/// The largest number of queued operations the I/O thread applies before its next `fdatasync`.
const MAX_BATCH: usize = 512;

/// An I/O failure on a volume's file, cheap to clone so one `fdatasync` error can answer many writes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{op} on {path}: {message}")]
pub struct StoreError {
    /// What was being done.
    pub op: &'static str,
    /// The file.
    pub path: String,
    /// The error, for people.
    pub message: String,
}

/// One ordered operation on the file.
#[derive(Debug)]
pub enum StoreOp {
    /// Write `data` at `offset`.
    Write {
        /// Byte offset.
        offset: u64,
        /// The bytes.
        data: Bytes,
    },
    /// Punch a hole (reads as zeroes afterwards).
    Trim {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        length: u64,
    },
    /// Nothing to apply: used with `durable` to make every earlier operation durable.
    Flush,
    /// Read a range in queue order (it reflects every earlier operation and no later one), for resync.
    Snapshot {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        length: u64,
        /// Where the bytes go.
        out: oneshot::Sender<Result<Bytes, StoreError>>,
    },
}

impl StoreOp {
    fn name(&self) -> &'static str {
        match self {
            StoreOp::Write { .. } => "write",
            StoreOp::Trim { .. } => "trim",
            StoreOp::Flush => "flush",
            StoreOp::Snapshot { .. } => "snapshot",
        }
    }

    /// Whether the submitting task may apply it itself (a short memory copy, never a long call).
    fn cheap(&self) -> bool {
        match self {
            StoreOp::Write { data, .. } => data.len() <= INLINE_MAX,
            StoreOp::Flush => true,
            StoreOp::Trim { .. } | StoreOp::Snapshot { .. } => false,
        }
    }
}

type Done = oneshot::Sender<Result<(), StoreError>>;

#[derive(Debug)]
struct Job {
    op: StoreOp,
    durable: bool,
    done: Done,
}

/// What the submitters and the I/O thread share, under one lock.
#[derive(Debug, Default)]
struct Queue {
    /// Operations for the I/O thread, oldest first.
    jobs: VecDeque<Job>,
    /// Operations the I/O thread took from `jobs` and has not finished applying.
    applying: usize,
    /// Applied durable operations waiting for an `fdatasync` that starts after them.
    sync_waiters: Vec<Done>,
    /// Every [`Store`] handle is gone: the thread ends once the queue is drained.
    closed: bool,
}

#[derive(Debug)]
struct Shared {
    file: File,
    path: String,
    queue: Mutex<Queue>,
    work: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // The queue is never left half-updated, so a poisoned lock is still consistent.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn error(&self, op: &'static str, message: String) -> StoreError {
        StoreError {
            op,
            path: self.path.clone(),
            message,
        }
    }
}

/// Ends the I/O thread when the last [`Store`] handle is dropped.
#[derive(Debug)]
struct Closer(Arc<Shared>);

impl Drop for Closer {
    fn drop(&mut self) {
        self.0.lock().closed = true;
        self.0.work.notify_one();
    }
}

/// A volume's file, its ordered operation queue and its I/O thread.
#[derive(Debug, Clone)]
pub struct Store {
    shared: Arc<Shared>,
    _closes_on_drop: Arc<Closer>,
    path: PathBuf,
    size: u64,
}

/// The completion of a submitted operation: ready at once when it was applied inline and needs no
/// `fdatasync`, otherwise answered by the I/O thread.
#[derive(Debug)]
pub struct StoreWait {
    state: WaitState,
}

#[derive(Debug)]
enum WaitState {
    Ready(Option<Result<(), StoreError>>),
    Waiting(oneshot::Receiver<Result<(), StoreError>>, Arc<Shared>),
}

impl StoreWait {
    fn ready(result: Result<(), StoreError>) -> StoreWait {
        StoreWait {
            state: WaitState::Ready(Some(result)),
        }
    }
}

impl Future for StoreWait {
    type Output = Result<(), StoreError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.get_mut().state {
            WaitState::Ready(result) => Poll::Ready(result.take().unwrap_or_else(|| {
                Err(StoreError {
                    op: "wait",
                    path: String::new(),
                    message: "polled after completion".into(),
                })
            })),
            WaitState::Waiting(rx, shared) => Pin::new(rx).poll(cx).map(|r| {
                r.unwrap_or_else(|_| {
                    Err(shared.error("write", "the store's I/O thread has stopped".into()))
                })
            }),
        }
    }
}

impl Store {
    /// Opens (creating if needed) the file at `path`, extends it sparsely to `size` if it is shorter
    /// (`None` keeps its current length) and starts its I/O thread.
    pub fn open(path: &Path, size: Option<u64>) -> Result<Store, StoreError> {
        let err = |op: &'static str, e: std::io::Error| StoreError {
            op,
            path: path.display().to_string(),
            message: e.to_string(),
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| err("open", e))?;
        let current = file.metadata().map_err(|e| err("stat", e))?.len();
        let size = match size {
            Some(size) => {
                if current < size {
                    file.set_len(size).map_err(|e| err("extend", e))?;
                }
                size
            }
            None => current,
        };
        let shared = Arc::new(Shared {
            file,
            path: path.display().to_string(),
            queue: Mutex::new(Queue::default()),
            work: Condvar::new(),
        });
        let thread_shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("store-io".into())
            .spawn(move || io_thread(&thread_shared))
            .map_err(|e| err("spawn I/O thread", e))?;
        Ok(Store {
            _closes_on_drop: Arc::new(Closer(Arc::clone(&shared))),
            shared,
            path: path.to_owned(),
            size,
        })
    }

    /// The volume's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Applies (or queues) an operation behind every earlier one; the returned future completes once it
    /// is applied (and, if `durable`, once an `fdatasync` that started after it returned).
    pub fn submit(&self, op: StoreOp, durable: bool) -> StoreWait {
        let wait = self.submit_deferred(op, durable);
        self.start();
        wait
    }

    /// Like [`Store::submit`], but the I/O thread is not woken until the next [`Store::start`] (or
    /// another submission wakes it): a caller that knows more operations follow at once lets them join
    /// the same `fdatasync`. The caller must call [`Store::start`] before it waits for anything.
    pub fn submit_deferred(&self, op: StoreOp, durable: bool) -> StoreWait {
        let shared = &self.shared;
        let mut queue = shared.lock();
        if op.cheap() && queue.jobs.is_empty() && queue.applying == 0 {
            // Nothing earlier is pending, and holding the lock keeps later submitters behind this one.
            if let Err(e) = apply_op(&shared.file, &op) {
                return StoreWait::ready(Err(shared.error(op.name(), e.to_string())));
            }
            if !durable {
                return StoreWait::ready(Ok(()));
            }
            let (done, rx) = oneshot::channel();
            queue.sync_waiters.push(done);
            return StoreWait {
                state: WaitState::Waiting(rx, Arc::clone(shared)),
            };
        }
        let (done, rx) = oneshot::channel();
        queue.jobs.push_back(Job { op, durable, done });
        StoreWait {
            state: WaitState::Waiting(rx, Arc::clone(shared)),
        }
    }

    /// Wakes the I/O thread for everything submitted so far.
    pub fn start(&self) {
        self.shared.work.notify_one();
    }

    /// Applies an operation and waits for it.
    pub async fn apply(&self, op: StoreOp, durable: bool) -> Result<(), StoreError> {
        self.submit(op, durable).await
    }

    /// Reads `length` bytes at `offset`.
    pub async fn read(&self, offset: u64, length: u32) -> Result<Bytes, StoreError> {
        let shared = Arc::clone(&self.shared);
        let result = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; length as usize];
            shared
                .file
                .read_exact_at(&mut buf, offset)
                .map(|()| buf)
                .map_err(|e| shared.error("read", e.to_string()))
        })
        .await;
        match result {
            Ok(result) => result.map(Bytes::from),
            Err(e) => Err(self.shared.error("read", e.to_string())),
        }
    }
}

fn apply_op(file: &File, op: &StoreOp) -> std::io::Result<()> {
    match op {
        StoreOp::Write { offset, data } => file.write_all_at(data, *offset),
        StoreOp::Trim { offset, length } => {
            if *length == 0 {
                return Ok(());
            }
            rustix::fs::fallocate(
                file,
                rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
                *offset,
                *length,
            )
            .map_err(std::io::Error::from)
        }
        StoreOp::Flush | StoreOp::Snapshot { .. } => Ok(()),
    }
}

/// Applies one queued job; a durable one that succeeded joins `waiting_sync`.
fn apply_job(shared: &Shared, job: Job, waiting_sync: &mut Vec<Done>) {
    let Job { op, durable, done } = job;
    if let StoreOp::Snapshot {
        offset,
        length,
        out,
    } = op
    {
        let mut buf = vec![0u8; usize::try_from(length).unwrap_or(0)];
        let result = shared
            .file
            .read_exact_at(&mut buf, offset)
            .map(|()| Bytes::from(buf))
            .map_err(|e| shared.error("snapshot", e.to_string()));
        let _ = out.send(result);
        let _ = done.send(Ok(()));
        return;
    }
    match apply_op(&shared.file, &op) {
        Err(e) => {
            let _ = done.send(Err(shared.error(op.name(), e.to_string())));
        }
        Ok(()) if durable => waiting_sync.push(done),
        Ok(()) => {
            let _ = done.send(Ok(()));
        }
    }
}

/// The I/O thread: applies queued operations in order, then runs one `fdatasync` for every durable
/// operation applied so far (its own and the submitters' inline ones).
fn io_thread(shared: &Shared) {
    let mut batch: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    let mut waiting_sync: Vec<Done> = Vec::with_capacity(MAX_BATCH);
    loop {
        {
            let mut queue = shared.lock();
            while queue.jobs.is_empty() && queue.sync_waiters.is_empty() {
                if queue.closed {
                    return;
                }
                queue = shared
                    .work
                    .wait(queue)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            let n = queue.jobs.len().min(MAX_BATCH);
            batch.extend(queue.jobs.drain(..n));
            queue.applying = n;
        }
        for job in batch.drain(..) {
            apply_job(shared, job, &mut waiting_sync);
        }
        {
            // Every waiter registered so far finished its pwrite before registering, so the fdatasync
            // below starts after all of them.
            let mut queue = shared.lock();
            queue.applying = 0;
            waiting_sync.append(&mut queue.sync_waiters);
        }
        if !waiting_sync.is_empty() {
            let result = shared
                .file
                .sync_data()
                .map_err(|e| shared.error("fdatasync", e.to_string()));
            for done in waiting_sync.drain(..) {
                let _ = done.send(result.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn writes_apply_in_order_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("v"), Some(1 << 20)).unwrap();
        let a = store.submit(
            StoreOp::Write {
                offset: 0,
                data: Bytes::from(vec![1u8; 8192]),
            },
            false,
        );
        let b = store.submit(
            StoreOp::Write {
                offset: 4096,
                data: Bytes::from(vec![2u8; 4096]),
            },
            true,
        );
        a.await.unwrap();
        b.await.unwrap();
        let got = store.read(0, 8192).await.unwrap();
        assert!(got[..4096].iter().all(|&x| x == 1));
        assert!(got[4096..].iter().all(|&x| x == 2));
        store
            .apply(
                StoreOp::Trim {
                    offset: 0,
                    length: 4096,
                },
                true,
            )
            .await
            .unwrap();
        let got = store.read(0, 4096).await.unwrap();
        assert!(got.iter().all(|&x| x == 0));
        assert_eq!(std::fs::metadata(store.path()).unwrap().len(), 1 << 20);
    }

    #[tokio::test]
    async fn small_writes_queue_behind_a_large_one_and_land_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("v"), Some(4 << 20)).unwrap();
        // A large write goes to the I/O thread; the small overlapping ones submitted after it must not
        // overtake it, whether they are applied by the thread or inline.
        let large = store.submit(
            StoreOp::Write {
                offset: 0,
                data: Bytes::from(vec![1u8; 2 << 20]),
            },
            false,
        );
        let mut small = Vec::new();
        for i in 0..64u64 {
            small.push(store.submit(
                StoreOp::Write {
                    offset: i * 4096,
                    data: Bytes::from(vec![2u8; 4096]),
                },
                i % 2 == 0,
            ));
        }
        let trim = store.submit(
            StoreOp::Trim {
                offset: 8 * 4096,
                length: 4096,
            },
            false,
        );
        let last = store.submit(
            StoreOp::Write {
                offset: 9 * 4096,
                data: Bytes::from(vec![3u8; 4096]),
            },
            true,
        );
        large.await.unwrap();
        for s in small {
            s.await.unwrap();
        }
        trim.await.unwrap();
        last.await.unwrap();
        let got = store.read(0, 2 << 20).await.unwrap();
        for (i, block) in got.chunks(4096).enumerate() {
            let want = match i {
                8 => 0,
                9 => 3,
                0..64 => 2,
                _ => 1,
            };
            assert!(block.iter().all(|&x| x == want), "block {i}");
        }
    }
}
