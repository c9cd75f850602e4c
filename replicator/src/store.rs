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
//! after that `pwrite` returned* returned successfully before the operation was answered. Syncing is
//! group commit on sync threads ([`SYNC_THREADS`] unless opened with more): a durable operation, once
//! applied, joins the waiters of the next `fdatasync`; an idle sync thread takes every waiter registered
//! so far, calls `fdatasync` once, and answers them all. With several threads, another one can start
//! the next `fdatasync` while one runs. One is the default because it measured best: one `fdatasync`
//! covers every write applied while the previous one ran, whereas concurrent calls on one file each
//! wait for the other's write-back and send their own device flush (replicator-bench, 4 KiB FUA writes
//! at QD16 on ext4/virtio: 1 thread 31-33k IOPS, 2 threads 28-29k, 4 threads 19-23k; QD1 the same).
//!
//! Each sync thread calls `fdatasync` on its own open file description of the file (opened again, not
//! `dup`ed): Linux reports a write-back error once per open file description, so with a shared one an
//! error for one batch's pages could be returned to another thread's overlapping call while the batch's
//! own call returned success. With one description each, every sync thread sees every write-back error
//! since its own previous call, so a batch whose pages were lost always gets an error (sometimes a
//! batch whose pages were not does too).
//!
//! A failed `fdatasync` is sticky: pages it dropped are gone, and a later `fdatasync` may succeed without
//! them. From the moment the first failure is recorded, every durable operation is answered with an
//! error saying an earlier `fdatasync` failed (it is still applied in order; only the promise of
//! durability is gone), including batches whose own `fdatasync` was running at the time; no `fdatasync`
//! is attempted any more. Non-durable operations and reads go on as before.
//!
//! Reads run on tokio's blocking pool with positioned reads and see every write already answered.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::sync::oneshot;

/// The largest write applied by the submitting task; larger ones go to the I/O thread.
pub const INLINE_MAX: usize = 64 * 1024;
/// The largest number of queued operations the I/O thread applies at once.
const MAX_BATCH: usize = 512;
/// How many `fdatasync` calls on one file may run at once (see the module doc for why one).
pub const SYNC_THREADS: usize = 1;

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
    /// Every [`Store`] handle is gone: the threads end once the queue is drained.
    closed: bool,
    /// The I/O thread ended (it registers no more sync waiters).
    io_ended: bool,
    /// Set by the first failed `fdatasync`: every durable operation answered from then on gets it.
    sync_failed: Option<StoreError>,
    /// The I/O thread is parked on `jobs_ready`.
    io_parked: bool,
    /// Sync threads parked on `sync_ready`.
    sync_parked: usize,
}

impl Queue {
    /// Registers an applied durable operation for the next `fdatasync`, or answers it with the sticky
    /// failure.
    fn join_sync(&mut self, done: Done) {
        match &self.sync_failed {
            Some(e) => {
                let _ = done.send(Err(e.clone()));
            }
            None => self.sync_waiters.push(done),
        }
    }

    /// Which parked threads have work waiting for them: (the I/O thread, a sync thread). A thread that
    /// is not parked checks the queue under the lock before it parks, so it needs no wake-up; waking
    /// only parked threads with work saves a futex call and a context switch per operation.
    fn wake_needed(&self) -> (bool, bool) {
        (
            self.io_parked && !self.jobs.is_empty(),
            self.sync_parked > 0 && !self.sync_waiters.is_empty(),
        )
    }
}

/// How a sync thread syncs its file: `File::sync_data` except in tests.
type SyncFn = fn(&File) -> std::io::Result<()>;

#[derive(Debug)]
struct Shared {
    /// Written, trimmed and read by the I/O thread, the submitters and the readers.
    file: File,
    /// One open file description per sync thread, each opened separately (see the module doc).
    sync_files: Vec<File>,
    /// What a sync thread calls on its file.
    sync: SyncFn,
    path: String,
    queue: Mutex<Queue>,
    /// Signalled when `jobs` gets work (or on close).
    jobs_ready: Condvar,
    /// Signalled when `sync_waiters` gets work (or on close).
    sync_ready: Condvar,
    /// Kept until the store is gone: every handle dropped and its threads ended.
    held: Mutex<Vec<Box<dyn std::any::Any + Send + Sync>>>,
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

    /// Wakes the threads `queue` has work for, after releasing its lock.
    fn wake(&self, queue: MutexGuard<'_, Queue>) {
        let (io, sync) = queue.wake_needed();
        drop(queue);
        if io {
            self.jobs_ready.notify_one();
        }
        if sync {
            self.sync_ready.notify_one();
        }
    }
}

/// Ends the I/O thread when the last [`Store`] handle is dropped.
#[derive(Debug)]
struct Closer(Arc<Shared>);

impl Drop for Closer {
    fn drop(&mut self) {
        self.0.lock().closed = true;
        self.0.jobs_ready.notify_all();
        self.0.sync_ready.notify_all();
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
        Store::open_inner(path, size, File::sync_data, SYNC_THREADS)
    }

    /// [`Store::open`] with `sync_threads` sync threads calling `sync` instead of `File::sync_data`.
    #[cfg(test)]
    fn open_with_sync(
        path: &Path,
        size: Option<u64>,
        sync: SyncFn,
        sync_threads: usize,
    ) -> Result<Store, StoreError> {
        Store::open_inner(path, size, sync, sync_threads)
    }

    fn open_inner(
        path: &Path,
        size: Option<u64>,
        sync: SyncFn,
        sync_threads: usize,
    ) -> Result<Store, StoreError> {
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
        let sync_files = (0..sync_threads.max(1))
            .map(|_| reopen(path, &file).map_err(|e| err("reopen for fdatasync", e)))
            .collect::<Result<Vec<_>, _>>()?;
        let shared = Arc::new(Shared {
            file,
            sync_files,
            sync,
            path: path.display().to_string(),
            queue: Mutex::new(Queue::default()),
            jobs_ready: Condvar::new(),
            sync_ready: Condvar::new(),
            held: Mutex::new(Vec::new()),
        });
        let thread_shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("store-io".into())
            .spawn(move || io_thread(&thread_shared))
            .map_err(|e| err("spawn I/O thread", e))?;
        // From here on a failed spawn drops the closer, which ends the threads already started (and
        // releases the file) instead of leaving them waiting for a store that was never returned.
        let closer = Arc::new(Closer(Arc::clone(&shared)));
        for index in 0..shared.sync_files.len() {
            let thread_shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("store-sync".into())
                .spawn(move || sync_thread(&thread_shared, index))
                .map_err(|e| err("spawn sync thread", e))?;
        }
        Ok(Store {
            _closes_on_drop: closer,
            shared,
            path: path.to_owned(),
            size,
        })
    }

    /// Keeps `lease` until the store is gone: every handle dropped and its threads ended (they finish
    /// what was queued first). The secondary holds its volume's lock this way, so that a connection
    /// that ended abruptly leaves no thread writing the file when the next one opens it.
    pub fn hold_until_closed(&self, lease: impl std::any::Any + Send + Sync) {
        self.shared
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Box::new(lease));
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
            queue.join_sync(done);
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

    /// Wakes the I/O thread and a sync thread for everything submitted so far, if they are parked and
    /// have work. The work was queued under the lock, and a thread parks only after finding nothing to
    /// do under the same lock (marking itself parked), so it either sees the work when it next checks
    /// or is parked and woken here.
    pub fn start(&self) {
        let shared = &self.shared;
        shared.wake(shared.lock());
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

/// Opens `path` again as a new open file description (not a `dup`, which would share its write-back
/// error cursor), refusing it unless it is still the file `opened`.
fn reopen(path: &Path, opened: &File) -> std::io::Result<File> {
    let file = OpenOptions::new().read(true).write(true).open(path)?;
    let (a, b) = (opened.metadata()?, file.metadata()?);
    if (a.dev(), a.ino()) != (b.dev(), b.ino()) {
        return Err(std::io::Error::other(
            "the path was replaced while the volume was being opened",
        ));
    }
    Ok(file)
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

/// The I/O thread: applies queued operations in order; the durable ones join the sync waiters.
fn io_thread(shared: &Shared) {
    let mut batch: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    let mut applied_durable: Vec<Done> = Vec::with_capacity(MAX_BATCH);
    loop {
        {
            let mut queue = shared.lock();
            while queue.jobs.is_empty() {
                if queue.closed {
                    queue.io_ended = true;
                    drop(queue);
                    shared.sync_ready.notify_all();
                    return;
                }
                queue.io_parked = true;
                queue = shared
                    .jobs_ready
                    .wait(queue)
                    .unwrap_or_else(PoisonError::into_inner);
                queue.io_parked = false;
            }
            let n = queue.jobs.len().min(MAX_BATCH);
            batch.extend(queue.jobs.drain(..n));
            queue.applying = n;
        }
        for job in batch.drain(..) {
            apply_job(shared, job, &mut applied_durable);
        }
        let mut queue = shared.lock();
        queue.applying = 0;
        for done in applied_durable.drain(..) {
            queue.join_sync(done);
        }
        shared.wake(queue);
    }
}

/// A sync thread: takes every sync waiter registered so far, runs one `fdatasync` on its own file
/// (`shared.sync_files[index]`), answers them.
fn sync_thread(shared: &Shared, index: usize) {
    let Some(file) = shared.sync_files.get(index) else {
        return;
    };
    loop {
        let (waiters, failed) = {
            let mut queue = shared.lock();
            while queue.sync_waiters.is_empty() {
                if queue.closed && queue.io_ended {
                    return;
                }
                queue.sync_parked += 1;
                queue = shared
                    .sync_ready
                    .wait(queue)
                    .unwrap_or_else(PoisonError::into_inner);
                queue.sync_parked -= 1;
            }
            // Every waiter finished its pwrite before registering, so the fdatasync below starts after
            // all of them.
            (
                std::mem::take(&mut queue.sync_waiters),
                queue.sync_failed.clone(),
            )
        };
        let result = match failed {
            Some(e) => Err(e),
            None => (shared.sync)(file).map_err(|e| shared.error("fdatasync", e.to_string())),
        };
        let result = {
            let mut queue = shared.lock();
            match (result, &queue.sync_failed) {
                (Err(e), None) => {
                    queue.sync_failed = Some(shared.error(
                        "fdatasync",
                        format!(
                            "an earlier fdatasync failed ({}), so durability can no longer be promised",
                            e.message
                        ),
                    ));
                    Err(e)
                }
                // Another thread's fdatasync failed meanwhile: no durable answer is Ok from then on.
                (Ok(()), Some(sticky)) => Err(sticky.clone()),
                (result, _) => result,
            }
        };
        for done in waiters {
            let _ = done.send(result.clone());
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

    /// How long a test waits for any one answer before calling it a stall.
    const STALL: std::time::Duration = std::time::Duration::from_secs(20);

    async fn answered(wait: StoreWait, what: &str) -> Result<(), StoreError> {
        match tokio::time::timeout(STALL, wait).await {
            Ok(result) => result,
            Err(_) => panic!("{what}: no answer within {STALL:?} (lost wake-up?)"),
        }
    }

    fn block(fill: u8, len: usize) -> Bytes {
        Bytes::from(vec![fill; len])
    }

    /// The default and a concurrent number of sync threads: the stress tests run with both.
    const SYNC_THREAD_COUNTS: [usize; 2] = [SYNC_THREADS, 4];

    fn open_with_threads(path: &Path, size: u64, sync_threads: usize) -> Store {
        Store::open_with_sync(path, Some(size), File::sync_data, sync_threads).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_durable_and_plain_submissions_never_stall() {
        for sync_threads in SYNC_THREAD_COUNTS {
            concurrent_submissions(sync_threads).await;
        }
    }

    async fn concurrent_submissions(sync_threads: usize) {
        const TASKS: u64 = 24;
        const ROUNDS: u64 = 60;
        const REGION: u64 = 256 * 1024;
        let dir = tempfile::tempdir().unwrap();
        let store = open_with_threads(&dir.path().join("v"), TASKS * REGION, sync_threads);
        let mut tasks = Vec::new();
        for t in 0..TASKS {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let base = t * REGION;
                for round in 0..ROUNDS {
                    let fill = (round % 250 + 1) as u8;
                    let durable = (t + round) % 3 != 0;
                    let small = |i: u64| StoreOp::Write {
                        offset: base + i * 4096,
                        data: block(fill, 4096),
                    };
                    match (t + round) % 4 {
                        // One write, submitted and woken at once.
                        0 => answered(store.submit(small(0), durable), "submit").await?,
                        // A burst submitted deferred, then started once, as the secondary does.
                        1 => {
                            let waits: Vec<_> = (0..4)
                                .map(|i| store.submit_deferred(small(i), durable || i == 3))
                                .collect();
                            store.start();
                            for w in waits {
                                answered(w, "deferred").await?;
                            }
                        }
                        // A large write (the I/O thread's) with small ones queued behind it.
                        2 => {
                            let large = store.submit(
                                StoreOp::Write {
                                    offset: base,
                                    data: block(fill, 2 * INLINE_MAX),
                                },
                                durable,
                            );
                            let behind = store.submit(small(1), true);
                            answered(large, "large").await?;
                            answered(behind, "behind large").await?;
                        }
                        // A flush and a trim.
                        _ => {
                            let flush = store.submit(StoreOp::Flush, true);
                            answered(flush, "flush").await?;
                            let trim = store.submit(
                                StoreOp::Trim {
                                    offset: base + 8 * 4096,
                                    length: 4096,
                                },
                                durable,
                            );
                            answered(trim, "trim").await?;
                        }
                    }
                }
                Ok::<(), StoreError>(())
            }));
        }
        for task in tasks {
            task.await.unwrap().unwrap();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn every_durable_write_is_answered_ok_and_reads_back() {
        for sync_threads in SYNC_THREAD_COUNTS {
            durable_writes_read_back(sync_threads).await;
        }
    }

    async fn durable_writes_read_back(sync_threads: usize) {
        const WRITES: u64 = 2000;
        let dir = tempfile::tempdir().unwrap();
        let store = open_with_threads(&dir.path().join("v"), WRITES * 4096, sync_threads);
        let mut waits = Vec::new();
        for i in 0..WRITES {
            let op = StoreOp::Write {
                offset: i * 4096,
                data: block((i % 251) as u8, 4096),
            };
            // Alternate single submissions with deferred bursts of up to seven.
            if i % 8 == 0 {
                store.start();
                waits.push(tokio::spawn(answered(store.submit(op, true), "durable")));
            } else {
                waits.push(tokio::spawn(answered(
                    store.submit_deferred(op, true),
                    "deferred durable",
                )));
            }
            if i % 64 == 0 {
                tokio::task::yield_now().await;
            }
        }
        store.start();
        let mut ok = 0;
        for w in waits {
            w.await.unwrap().unwrap();
            ok += 1;
        }
        assert_eq!(ok, WRITES);
        let got = store.read(0, (WRITES * 4096) as u32).await.unwrap();
        for (i, b) in got.chunks(4096).enumerate() {
            assert!(b.iter().all(|&x| x == (i % 251) as u8), "block {i}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn dropping_the_store_with_syncs_in_flight_answers_them_and_ends_its_threads() {
        for round in 0..20 {
            let sync_threads = SYNC_THREAD_COUNTS[round % SYNC_THREAD_COUNTS.len()];
            let dir = tempfile::tempdir().unwrap();
            let store = open_with_threads(&dir.path().join("v"), 1 << 20, sync_threads);
            let shared = Arc::downgrade(&store.shared);
            let mut waits = Vec::new();
            for i in 0..64u64 {
                let op = StoreOp::Write {
                    offset: (i % 256) * 4096,
                    data: block(1, if i % 16 == 0 { 2 * INLINE_MAX } else { 4096 }),
                };
                waits.push(if i % 2 == 0 {
                    store.submit(op, true)
                } else {
                    store.submit_deferred(op, true)
                });
            }
            // The last handle goes without a start(): closing must still wake every thread.
            drop(store);
            for w in waits {
                answered(w, "in flight at drop").await.unwrap();
            }
            // Every thread ends, dropping its share of the file.
            let ended = tokio::time::timeout(STALL, async {
                while shared.upgrade().is_some() {
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
            })
            .await;
            assert!(
                ended.is_ok(),
                "store threads still running {STALL:?} after the drop"
            );
        }
    }

    /// Fails every `fdatasync` while set, standing in for a disk that dropped written-back pages.
    static SYNC_FAILING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

    fn failing_sync(file: &File) -> std::io::Result<()> {
        if SYNC_FAILING.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(std::io::Error::other("injected write-back error"));
        }
        file.sync_data()
    }

    fn write(offset: u64, fill: u8, len: usize) -> StoreOp {
        StoreOp::Write {
            offset,
            data: block(fill, len),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_failed_fdatasync_fails_its_batch_and_every_later_durable_operation() {
        const STICKY: &str = "an earlier fdatasync failed";
        let dir = tempfile::tempdir().unwrap();
        let store =
            Store::open_with_sync(&dir.path().join("v"), Some(1 << 20), failing_sync, 4).unwrap();
        // The failing batch: a deferred burst (inline) and a large write (the I/O thread's).
        let mut waits: Vec<_> = (0..8u64)
            .map(|i| store.submit_deferred(write(i * 4096, 1, 4096), true))
            .collect();
        waits.push(store.submit(write(8 * 4096, 1, 2 * INLINE_MAX), true));
        store.start();
        let mut injected = 0;
        for w in waits {
            let e = answered(w, "failing batch").await.unwrap_err();
            assert_eq!(e.op, "fdatasync");
            if e.message.contains("injected") {
                injected += 1;
            } else {
                assert!(e.message.contains(STICKY), "{e}");
            }
        }
        assert!(injected > 0);

        // The sync works again, but pages may have been lost: every durable operation still fails.
        SYNC_FAILING.store(false, std::sync::atomic::Ordering::SeqCst);
        assert!(failing_sync(&store.shared.file).is_ok());
        let burst: Vec<_> = (0..4u64)
            .map(|i| store.submit_deferred(write((64 + i) * 4096, 2, 4096), true))
            .collect();
        store.start();
        let later = [
            store.submit(write(40 * 4096, 3, 4096), true),
            store.submit(write(48 * 4096, 3, 2 * INLINE_MAX), true),
            store.submit(StoreOp::Flush, true),
            store.submit(
                StoreOp::Trim {
                    offset: 0,
                    length: 4096,
                },
                true,
            ),
        ];
        for w in burst.into_iter().chain(later) {
            let e = answered(w, "after the failure").await.unwrap_err();
            assert!(e.message.contains(STICKY), "{e}");
            assert!(e.message.contains("injected"), "{e}");
        }

        // Non-durable operations go on, and everything was applied in order.
        let plain = [
            store.submit(write(100 * 4096, 4, 4096), false),
            store.submit(write(101 * 4096, 5, 2 * INLINE_MAX), false),
            store.submit(StoreOp::Flush, false),
        ];
        for w in plain {
            answered(w, "non-durable").await.unwrap();
        }
        let got = store.read(0, 200 * 4096).await.unwrap();
        for (i, b) in got.chunks(4096).enumerate() {
            let want = match i {
                0 => 0,
                // The large write at block 8 is 2 × INLINE_MAX: 32 blocks.
                1..40 => 1,
                40 => 3,
                // Submitted after the deferred writes at 64..68, so it lands over them.
                48..80 => 3,
                100 => 4,
                101..133 => 5,
                _ => 0,
            };
            assert!(b.iter().all(|&x| x == want), "block {i}");
        }
    }

    #[tokio::test]
    async fn each_sync_thread_has_its_own_open_file_description() {
        use rustix::fs::{OFlags, fcntl_getfl, fcntl_setfl};
        let dir = tempfile::tempdir().unwrap();
        let store = open_with_threads(&dir.path().join("v"), 1 << 20, 4);
        let shared = &store.shared;
        assert_eq!(shared.sync_files.len(), 4);
        let files: Vec<&File> = std::iter::once(&shared.file)
            .chain(&shared.sync_files)
            .collect();
        let ino = shared.file.metadata().unwrap().ino();
        // Status flags belong to the open file description: after a `dup` (`try_clone`) a flag set on
        // one file would show on the other too.
        for (i, a) in files.iter().enumerate() {
            assert_eq!(a.metadata().unwrap().ino(), ino, "file {i}");
            let flags = fcntl_getfl(a).unwrap();
            fcntl_setfl(a, flags | OFlags::APPEND).unwrap();
            for (j, b) in files.iter().enumerate() {
                let append = fcntl_getfl(b).unwrap().contains(OFlags::APPEND);
                assert_eq!(append, i == j, "O_APPEND set on file {i}, seen on file {j}");
            }
            fcntl_setfl(a, flags).unwrap();
        }
    }
}
