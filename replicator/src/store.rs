//! File-backed block storage: a sparse file written by one dedicated thread in submission order, with
//! group commit.
//!
//! Both the primary and the secondary write through a [`Store`]. Writes, trims and flushes are applied in
//! exactly the order they were submitted (so a primary and its secondary, fed the same ordered stream,
//! end up byte-identical even when a client issues overlapping writes concurrently). The thread takes
//! every operation already queued as one batch, applies them with positioned writes, and — if any
//! operation in the batch asked for durability — calls `fdatasync` once before answering those
//! operations. **Durable** therefore means: the bytes were written with `pwrite` and a later
//! `fdatasync` on the file returned successfully before the operation was answered.
//!
//! Reads run on tokio's blocking pool with positioned reads and see every write already answered.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};

use bytes::Bytes;
use tokio::sync::oneshot;

/// The largest number of operations applied in one batch (one `fdatasync`).
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

struct Job {
    op: StoreOp,
    durable: bool,
    done: oneshot::Sender<Result<(), StoreError>>,
}

/// A volume's file and its ordered writer thread.
#[derive(Debug, Clone)]
pub struct Store {
    file: Arc<File>,
    path: PathBuf,
    size: u64,
    jobs: mpsc::Sender<Job>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("op", &self.op)
            .field("durable", &self.durable)
            .finish()
    }
}

impl Store {
    /// Opens (creating if needed) the file at `path`, extends it sparsely to `size` if it is shorter
    /// (`None` keeps its current length) and starts its writer thread.
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
        let file = Arc::new(file);
        let (jobs, rx) = mpsc::channel::<Job>();
        let writer_file = Arc::clone(&file);
        let display = path.display().to_string();
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer_loop(&writer_file, &display, &rx))
            .map_err(|e| err("spawn writer thread", e))?;
        Ok(Store {
            file,
            path: path.to_owned(),
            size,
            jobs,
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

    /// Queues an operation behind every earlier one; the receiver answers once it is applied (and, if
    /// `durable`, once an `fdatasync` after it returned).
    pub fn submit(&self, op: StoreOp, durable: bool) -> oneshot::Receiver<Result<(), StoreError>> {
        let (done, rx) = oneshot::channel();
        // If the writer thread is gone, `done` is dropped with the job and the receiver reports it.
        let _ = self.jobs.send(Job { op, durable, done });
        rx
    }

    /// Applies an operation and waits for it.
    pub async fn apply(&self, op: StoreOp, durable: bool) -> Result<(), StoreError> {
        self.submit(op, durable)
            .await
            .unwrap_or_else(|_| Err(self.error("write", "the writer thread has stopped".into())))
    }

    /// Reads `length` bytes at `offset`.
    pub async fn read(&self, offset: u64, length: u32) -> Result<Bytes, StoreError> {
        let file = Arc::clone(&self.file);
        let path = self.path.display().to_string();
        let result = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; length as usize];
            file.read_exact_at(&mut buf, offset).map(|()| buf)
        })
        .await;
        match result {
            Ok(Ok(buf)) => Ok(Bytes::from(buf)),
            Ok(Err(e)) => Err(StoreError {
                op: "read",
                path,
                message: e.to_string(),
            }),
            Err(e) => Err(StoreError {
                op: "read",
                path,
                message: e.to_string(),
            }),
        }
    }

    fn error(&self, op: &'static str, message: String) -> StoreError {
        StoreError {
            op,
            path: self.path.display().to_string(),
            message,
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

fn writer_loop(file: &File, path: &str, rx: &mpsc::Receiver<Job>) {
    let mut batch: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    let mut waiting_sync = Vec::with_capacity(MAX_BATCH);
    while let Ok(first) = rx.recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        for job in batch.drain(..) {
            let op_name = match job.op {
                StoreOp::Write { .. } => "write",
                StoreOp::Trim { .. } => "trim",
                StoreOp::Flush => "flush",
                StoreOp::Snapshot { .. } => "snapshot",
            };
            let job = match job.op {
                StoreOp::Snapshot {
                    offset,
                    length,
                    out,
                } => {
                    let mut buf = vec![0u8; usize::try_from(length).unwrap_or(0)];
                    let result = file
                        .read_exact_at(&mut buf, offset)
                        .map(|()| Bytes::from(buf))
                        .map_err(|e| StoreError {
                            op: "snapshot",
                            path: path.to_owned(),
                            message: e.to_string(),
                        });
                    let _ = out.send(result);
                    let _ = job.done.send(Ok(()));
                    continue;
                }
                op => Job { op, ..job },
            };
            match apply_op(file, &job.op) {
                Err(e) => {
                    let _ = job.done.send(Err(StoreError {
                        op: op_name,
                        path: path.to_owned(),
                        message: e.to_string(),
                    }));
                }
                Ok(()) if job.durable => waiting_sync.push(job.done),
                Ok(()) => {
                    let _ = job.done.send(Ok(()));
                }
            }
        }
        if !waiting_sync.is_empty() {
            let result = file.sync_data().map_err(|e| StoreError {
                op: "fdatasync",
                path: path.to_owned(),
                message: e.to_string(),
            });
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
        a.await.unwrap().unwrap();
        b.await.unwrap().unwrap();
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
}
