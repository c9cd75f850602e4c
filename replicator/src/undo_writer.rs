//! The undo log's writer thread: group commit for the kept image, overlapped with the volume's I/O.
//!
//! The secondary keeps reading frames while what they overwrite is being saved: each write's range is
//! handed to the *appender* thread as a *save* with a ticket (the write's sequence number), in sequence
//! order. The appender appends the blocks not saved yet to the log ([`UndoLog::preserve`]) and records
//! how far it got. The *syncer* thread, whenever it is idle and something was appended, takes
//! everything appended so far, calls `fdatasync` on the log once (it starts after those appends
//! returned), and then publishes that every ticket it covered is durable — group commit: saves appended
//! while it syncs share the next `fdatasync`, and appending goes on during a sync. The secondary
//! submits a write to the volume only once its ticket is durable — the rule "saved durably before the
//! overwrite" — so the log's `fdatasync` for later writes runs while earlier writes are being applied
//! and synced on the volume.
//!
//! A write whose blocks were all saved by earlier writes still waits for its ticket: the blocks it
//! overwrites may have been saved by a batch whose sync has not returned yet.
//!
//! A save that fails (no space, an I/O error) or a failed `fdatasync` is published as a failure at the
//! first ticket that is not durable; the thread saves nothing more, and the secondary refuses that
//! write and everything after it. Writes before it, whose saves were synced, are applied.

use std::fs::File;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use tokio::sync::{oneshot, watch};

use crate::undo::{UndoError, UndoLog};

/// How the writer makes the log durable: `File::sync_data`, or a stand-in in tests.
pub type LogSync = Arc<dyn Fn(&File) -> std::io::Result<()> + Send + Sync>;

/// The sync the secondary uses.
pub fn fdatasync() -> LogSync {
    Arc::new(File::sync_data)
}

/// What the writer has made durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// Every ticket below this one is durable in the log.
    pub durable_below: u64,
    /// The first ticket whose save could not be made durable, and why; nothing from it on is saved.
    pub failed: Option<(u64, String)>,
}

/// A save: keep what `[offset, offset + length)` holds now, before ticket `ticket` overwrites it.
#[derive(Debug)]
struct Save {
    ticket: u64,
    offset: u64,
    length: u64,
}

/// A running writer thread; owns the volume's [`UndoLog`] until [`UndoWriter::finish`].
#[derive(Debug)]
pub struct UndoWriter {
    epoch: u64,
    saves: Option<std_mpsc::Sender<Save>>,
    progress: watch::Receiver<Progress>,
    log_back: oneshot::Receiver<UndoLog>,
}

impl UndoWriter {
    /// Starts the threads for `log`, reading the bytes to save from the volume file `volume`; the first
    /// ticket will be `first_ticket`. `lease` is dropped once both threads have ended.
    pub fn start(
        log: UndoLog,
        volume: File,
        first_ticket: u64,
        sync: LogSync,
        lease: impl Send + 'static,
    ) -> Result<UndoWriter, UndoError> {
        let epoch = log.epoch();
        let (saves, rx) = std_mpsc::channel();
        let (publish, progress) = watch::channel(Progress {
            durable_below: first_ticket,
            failed: None,
        });
        let (give_back, log_back) = oneshot::channel();
        let shared = Arc::new(Shared {
            state: Mutex::new(Appended {
                below: first_ticket,
                failed: None,
                sync_failed: false,
                closed: false,
            }),
            changed: Condvar::new(),
        });
        let file = log.sync_handle();
        let syncer_shared = Arc::clone(&shared);
        let syncer = std::thread::Builder::new()
            .name("undo-log-sync".into())
            .spawn(move || sync_appended(&syncer_shared, &file, &publish, first_ticket, &*sync))
            .map_err(|e| UndoError::Io {
                op: "start the undo log's sync thread",
                path: String::new(),
                source: e,
            })?;
        std::thread::Builder::new()
            .name("undo-log".into())
            .spawn(move || {
                let log = append_saves(log, &volume, &rx, &shared);
                shared.lock().closed = true;
                shared.changed.notify_all();
                let _ = syncer.join();
                let _ = give_back.send(log);
                drop(lease);
            })
            .map_err(|e| UndoError::Io {
                op: "start the undo log's writer thread",
                path: String::new(),
                source: e,
            })?;
        Ok(UndoWriter {
            epoch,
            saves: Some(saves),
            progress,
            log_back,
        })
    }

    /// The epoch of the kept image.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Queues the save for ticket `ticket` (tickets must be given in increasing order). Never blocks.
    pub fn save(&self, ticket: u64, offset: u64, length: u64) {
        if let Some(saves) = &self.saves {
            // A send fails only once the thread stopped after a failure, which `progress` reports.
            let _ = saves.send(Save {
                ticket,
                offset,
                length,
            });
        }
    }

    /// What is durable now.
    pub fn progress(&self) -> Progress {
        self.progress.borrow().clone()
    }

    /// Waits until the progress changes (returns at once if it changed since it was last read).
    pub async fn changed(&mut self) {
        if self.progress.changed().await.is_err() {
            // The thread ended: nothing changes any more; wait forever like a quiet channel would.
            std::future::pending::<()>().await;
        }
        self.progress.borrow_and_update();
    }

    /// Waits until every queued save is durable (or failed), stops the thread and returns the log.
    pub async fn finish(mut self) -> Result<UndoLog, UndoError> {
        drop(self.saves.take());
        self.log_back.await.map_err(|_| UndoError::Io {
            op: "finish the undo log's writer thread",
            path: String::new(),
            source: std::io::Error::other("the writer thread stopped without handing the log back"),
        })
    }
}

/// What the appender got to, shared with the syncer.
#[derive(Debug)]
struct Appended {
    /// Every ticket below this one is appended.
    below: u64,
    /// The save that failed, and why (the appender stopped).
    failed: Option<(u64, String)>,
    /// The syncer failed: the appender stops.
    sync_failed: bool,
    /// The appender stopped: the syncer syncs what is left and stops.
    closed: bool,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<Appended>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Appended> {
        // Never left half-updated, so a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The appender: saves in ticket order, each recorded as appended once it returned.
fn append_saves(
    mut log: UndoLog,
    volume: &File,
    saves: &std_mpsc::Receiver<Save>,
    shared: &Shared,
) -> UndoLog {
    while let Ok(save) = saves.recv() {
        if shared.lock().sync_failed {
            break;
        }
        match log.preserve(volume, save.offset, save.length) {
            Ok(_) => {
                shared.lock().below = save.ticket + 1;
                shared.changed.notify_all();
            }
            Err(e) => {
                tracing::error!(error = %e, ticket = save.ticket, "the kept image: a save failed");
                shared.lock().failed = Some((save.ticket, format!("keeping the image: {e}")));
                shared.changed.notify_all();
                break;
            }
        }
    }
    log
}

/// The syncer: one `fdatasync` for everything appended since the last, then publishes it durable.
fn sync_appended(
    shared: &Shared,
    file: &File,
    publish: &watch::Sender<Progress>,
    first_ticket: u64,
    sync: &(dyn Fn(&File) -> std::io::Result<()> + Send + Sync),
) {
    let mut durable_below = first_ticket;
    loop {
        let (appended_below, failed, closed) = {
            let mut state = shared.lock();
            while state.below == durable_below && state.failed.is_none() && !state.closed {
                state = shared
                    .changed
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            (state.below, state.failed.clone(), state.closed)
        };
        if appended_below > durable_below {
            // Every save below `appended_below` returned before this call starts.
            if let Err(e) = sync(file) {
                tracing::error!(error = %e, "the kept image: the undo log could not be synced");
                shared.lock().sync_failed = true;
                publish.send_replace(Progress {
                    durable_below,
                    failed: Some((
                        durable_below,
                        format!("keeping the image: fdatasync of the undo log: {e}"),
                    )),
                });
                return;
            }
            durable_below = appended_below;
        }
        let stop = failed.is_some() || closed;
        publish.send_replace(Progress {
            durable_below,
            failed,
        });
        if stop {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::undo::{BLOCK, log_path};
    use std::sync::{Condvar, Mutex};
    use std::time::Duration;

    /// A log sync the test opens and closes: `fdatasync` runs only while the gate is open.
    #[derive(Default)]
    struct Gate {
        open: Mutex<bool>,
        changed: Condvar,
        syncs: Mutex<u64>,
    }

    impl Gate {
        fn set(&self, open: bool) {
            *self.open.lock().unwrap() = open;
            self.changed.notify_all();
        }

        fn sync(self: &Arc<Gate>) -> LogSync {
            let gate = Arc::clone(self);
            Arc::new(move |file: &File| {
                let mut open = gate.open.lock().unwrap();
                while !*open {
                    open = gate.changed.wait(open).unwrap();
                }
                *gate.syncs.lock().unwrap() += 1;
                file.sync_data()
            })
        }
    }

    fn volume(dir: &std::path::Path, size: u64) -> File {
        let path = dir.join("v");
        std::fs::write(&path, vec![0x11u8; size as usize]).unwrap();
        File::open(path).unwrap()
    }

    async fn progress_reaches(writer: &mut UndoWriter, below: u64) -> Progress {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let now = writer.progress();
                if now.durable_below >= below || now.failed.is_some() {
                    return now;
                }
                writer.changed().await;
            }
        })
        .await
        .expect("progress within 10 s")
    }

    #[tokio::test]
    async fn saves_queued_during_a_sync_share_the_next_one_and_nothing_is_durable_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let size = 64 * BLOCK;
        let log = UndoLog::create(dir.path(), "v", 3, size).unwrap();
        let gate = Arc::new(Gate::default());
        let mut writer =
            UndoWriter::start(log, volume(dir.path(), size), 10, gate.sync(), ()).unwrap();
        writer.save(10, 0, BLOCK);
        // The first batch is appended and waits at the closed gate; more saves queue meanwhile.
        for ticket in 11..20 {
            writer.save(ticket, ticket * BLOCK, BLOCK);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(writer.progress().durable_below, 10, "nothing durable yet");
        gate.set(true);
        let done = progress_reaches(&mut writer, 20).await;
        assert_eq!(
            done,
            Progress {
                durable_below: 20,
                failed: None
            }
        );
        let syncs = *gate.syncs.lock().unwrap();
        assert!(
            (1..=2).contains(&syncs),
            "10 saves in at most 2 syncs, got {syncs}"
        );
        let log = writer.finish().await.unwrap();
        assert_eq!(log.saved_blocks(), 10);
        assert!(log_path(dir.path(), "v").exists());
    }

    #[tokio::test]
    async fn a_failed_sync_is_published_at_the_first_ticket_it_covered_and_ends_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let size = 8 * BLOCK;
        let log = UndoLog::create(dir.path(), "v", 1, size).unwrap();
        let failing: LogSync = Arc::new(|_: &File| Err(std::io::Error::other("disk gone")));
        let mut writer = UndoWriter::start(log, volume(dir.path(), size), 5, failing, ()).unwrap();
        writer.save(5, 0, BLOCK);
        let done = progress_reaches(&mut writer, 6).await;
        assert_eq!(done.durable_below, 5);
        let (ticket, why) = done.failed.unwrap();
        assert_eq!(ticket, 5);
        assert!(
            why.contains("fdatasync of the undo log: disk gone"),
            "{why}"
        );
        writer.save(6, BLOCK, BLOCK);
        writer.finish().await.unwrap();
    }

    #[tokio::test]
    async fn a_save_that_fails_is_published_at_its_ticket_and_nothing_after_it_is_saved() {
        let dir = tempfile::tempdir().unwrap();
        let size = 8 * BLOCK;
        let log = UndoLog::create(dir.path(), "v", 1, size).unwrap();
        drop(volume(dir.path(), size));
        // A failing disk's stand-in: the volume opened write-only cannot be read for saving.
        let unreadable = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join("v"))
            .unwrap();
        let mut writer = UndoWriter::start(log, unreadable, 1, fdatasync(), ()).unwrap();
        writer.save(1, 0, BLOCK);
        writer.save(2, BLOCK, BLOCK);
        let done = progress_reaches(&mut writer, 2).await;
        assert_eq!(done.durable_below, 1);
        let (ticket, why) = done.failed.unwrap();
        assert_eq!(ticket, 1);
        assert!(why.starts_with("keeping the image: undo log"), "{why}");
        let log = writer.finish().await.unwrap();
        assert_eq!(log.saved_blocks(), 0);
    }
}
