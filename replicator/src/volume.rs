//! A served volume: its file ([`Store`]), its replication state ([`ReplState`]) and the tasks that carry
//! out the state's effects — the replication link, the resync driver, the persister of the state file
//! and the hold-timeout supervisor.
//!
//! Every write takes its sequence number, enters the local store queue and is handed to the state
//! machine under one lock, so local and remote order agree. The state file (`<volume file>.lockstep.json`)
//! sits beside the volume's data and is replaced atomically (write, fsync, rename, fsync directory).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::copy::{CopyConfig, CopyError};
use crate::events::Event;
use crate::hold::{CopyWait, DirectiveError, Effect, Persisted, ReplState, Snapshot, Stage};
use crate::store::{Store, StoreError, StoreOp};
use crate::wire::{Frame, valid_volume_name};

/// The default hold timeout.
pub const DEFAULT_HOLD_TIMEOUT: Duration = Duration::from_secs(30);
/// How often held writes are checked against the hold timeout.
const HOLD_CHECK: Duration = Duration::from_millis(20);
/// Resync pieces in flight at once, and their size.
const RESYNC_WINDOW: usize = 16;
const RESYNC_PIECE: u64 = 1024 * 1024;

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
    /// How long a held write waits before it fails (until the sidecar configures another).
    pub hold_timeout: Duration,
    /// Start unconfirmed: hold all I/O until [`Volume::configure`] (fail closed, DESIGN.md rule 6).
    pub require_confirmation: bool,
    /// Track changes in the dirty map though `copy` names no secondary yet: a volume promoted at the
    /// disaster-recovery site, whose peer is known only once the old site returns
    /// ([`Volume::set_secondary`]).
    pub track_changes: bool,
}

impl VolumeConfig {
    /// A volume with the default hold timeout that needs no confirmation.
    pub fn new(name: &str, path: PathBuf, size: Option<u64>, copy: Option<CopyConfig>) -> Self {
        VolumeConfig {
            name: name.to_owned(),
            path,
            size,
            copy,
            hold_timeout: DEFAULT_HOLD_TIMEOUT,
            require_confirmation: false,
            track_changes: false,
        }
    }
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
    /// The volume is fenced: the write was refused before it touched the file.
    #[error(
        "volume {name} is fenced since epoch {epoch} (its secondary was promoted): writes are refused"
    )]
    Fenced {
        /// The volume.
        name: String,
        /// The epoch it was fenced at.
        epoch: u64,
    },
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
    /// What its replication state machine says: mode, point, sequences, held writes, dirty bytes.
    pub replication: Snapshot,
    /// The secondary's address ("" when not replicated).
    pub secondary: String,
    /// The epoch of the image the secondary keeps, as it said when the last link opened.
    pub kept_image: Option<u64>,
    /// Fenced at this epoch: every write fails.
    pub fenced: Option<u64>,
}

/// A served volume.
#[derive(Debug)]
pub struct Volume {
    name: String,
    store: Store,
    /// Where writes are copied; set later on a promoted volume ([`Volume::set_secondary`]).
    copy: Mutex<Option<CopyConfig>>,
    /// Changes are tracked though no secondary may be named yet (a promoted volume).
    track_changes: bool,
    state_path: PathBuf,
    state: Mutex<ReplState>,
    events: broadcast::Sender<Event>,
    confirmed: watch::Sender<bool>,
    persist: mpsc::UnboundedSender<()>,
    /// The kept image (see [`crate::undo`]): asked for, to drop, and as the secondary last said.
    image: Mutex<ImageRequests>,
    me: Weak<Volume>,
}

/// What the primary asks of its secondary's kept image.
#[derive(Debug, Default)]
struct ImageRequests {
    /// Keep the image at this epoch when a link opens.
    keep: Option<u64>,
    /// Drop an image of this epoch or older when the next link opens (no link was open to send it on).
    pending_drop: Option<u64>,
    /// What the secondary said it keeps.
    kept: Option<u64>,
}

/// The state file beside a volume's data file.
pub fn state_path(data: &Path) -> PathBuf {
    let mut name = data.file_name().unwrap_or_default().to_os_string();
    name.push(".lockstep.json");
    data.with_file_name(name)
}

/// Where the next state is written before it replaces the state file `state` (see [`state_path`]).
pub fn state_scratch_path(state: &Path) -> PathBuf {
    state.with_extension("json.tmp")
}

fn load_state(path: &Path) -> Result<Option<Persisted>, String> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

fn save_state(path: &Path, state: &Persisted) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?;
    replace_durably(path, &state_scratch_path(path), &bytes)
}

/// Replaces `path` with `bytes` so that it is whole or unchanged after a crash: written to `scratch`,
/// synced, renamed into place, and the directory synced.
pub(crate) fn replace_durably(path: &Path, scratch: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(scratch)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(scratch, path)?;
    sync_parent(path)
}

/// Syncs the directory holding `path` (a rename or removal in it is durable once this returns).
pub(crate) fn sync_parent(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => std::fs::File::open(dir)?.sync_all(),
        _ => std::fs::File::open(".")?.sync_all(),
    }
}

impl Volume {
    /// Opens the volume's file and its persisted state and starts its tasks. Must be called inside a
    /// tokio runtime.
    pub fn open(
        config: VolumeConfig,
        events: broadcast::Sender<Event>,
    ) -> Result<Arc<Volume>, VolumeError> {
        let bad = |reason: String| VolumeError::Config {
            name: config.name.clone(),
            reason,
        };
        if !valid_volume_name(&config.name) {
            return Err(bad(
                "a volume name is 1-255 characters of [A-Za-z0-9._-], not starting with '.'".into(),
            ));
        }
        let store = Store::open(&config.path, config.size)?;
        let state_path = state_path(&config.path);
        let mut restored = load_state(&state_path).map_err(bad)?;
        if let Some(p) = &mut restored
            && p.mode == "standalone"
            && config.copy.is_some()
        {
            // Served unreplicated before: nothing says what the secondary lacks, so all of it is dirty.
            p.mode = "resyncing".into();
            p.dirty = vec![(0, store.size())];
        }
        if let Some(p) = &mut restored {
            // Active extents end at the volume's end.
            let size = store.size();
            p.active.retain_mut(|(offset, length)| {
                *length = (*length).min(size.saturating_sub(*offset));
                *length > 0
            });
        }
        let state = ReplState::new(
            &config.name,
            config.copy.is_some() || config.track_changes,
            config.hold_timeout,
            restored,
            !config.require_confirmation,
            std::time::SystemTime::now(),
        );
        let (persist, persist_rx) = mpsc::unbounded_channel();
        let (confirmed, _) = watch::channel(state.confirmed());
        let volume = Arc::new_cyclic(|me| Volume {
            name: config.name.clone(),
            store,
            copy: Mutex::new(config.copy.clone()),
            track_changes: config.track_changes,
            state_path,
            state: Mutex::new(state),
            events,
            confirmed,
            persist,
            image: Mutex::new(ImageRequests::default()),
            me: me.clone(),
        });
        tokio::spawn(persister(Arc::downgrade(&volume), persist_rx));
        tokio::spawn(hold_supervisor(Arc::downgrade(&volume)));
        let effects = volume.lock().take_effects();
        volume.apply(effects);
        // Record the initial state so it travels with the data from the start.
        let _ = volume.persist.send(());
        Ok(volume)
    }

    fn image(&self) -> MutexGuard<'_, ImageRequests> {
        self.image.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The epoch of the image the secondary is asked to keep when a link opens, if any.
    pub fn keep_image(&self) -> Option<u64> {
        self.image().keep
    }

    /// Asks the secondary to keep its image at `epoch` from the next link on (a resume opens one). A
    /// secondary that keeps an older image keeps that one.
    pub fn set_keep_image(&self, epoch: u64) {
        let mut image = self.image();
        image.keep = Some(epoch);
        // A drop not yet delivered is of an older image: it still goes first.
        image.pending_drop = image.pending_drop.filter(|drop| *drop < epoch);
    }

    /// Drops the secondary's kept image of `epoch` or older: on the current link if there is one, else
    /// when the next link opens.
    pub fn drop_image(&self, epoch: u64) {
        {
            let mut image = self.image();
            image.keep = image.keep.filter(|keep| *keep > epoch);
            if image.kept.is_some_and(|kept| kept <= epoch) {
                image.kept = None;
            }
        }
        let sent = self.with_state(|s| s.send_unsequenced(Frame::DropImage { epoch }));
        if !sent {
            let mut image = self.image();
            image.pending_drop = Some(image.pending_drop.map_or(epoch, |d| d.max(epoch)));
        }
    }

    fn take_pending_drop(&self) -> Option<u64> {
        self.image().pending_drop.take()
    }

    /// The epoch of the image the secondary said it keeps when the last link opened (`None` also when
    /// no link opened yet).
    pub fn kept_image(&self) -> Option<u64> {
        self.image().kept
    }

    /// The secondary's welcome said which image it keeps.
    pub(crate) fn secondary_keeps(&self, kept: Option<u64>) {
        self.image().kept = kept;
    }

    fn lock(&self) -> MutexGuard<'_, ReplState> {
        // Critical sections never leave the state half-updated, so a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Carries out effects queued by the state machine (call without holding the lock).
    fn apply(&self, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                Effect::StartLink {
                    generation,
                    first_seq,
                    rx,
                } => {
                    if let Some(config) = self.copy_config() {
                        let hello = Frame::Hello {
                            volume: self.name.clone(),
                            size: self.store.size(),
                            first_seq,
                            keep: self.keep_image(),
                            drop_image: self.take_pending_drop(),
                        };
                        tokio::spawn(crate::copy::run_link(
                            self.me.clone(),
                            generation,
                            config,
                            hello,
                            rx,
                        ));
                    }
                }
                Effect::KeepImage { epoch } => self.set_keep_image(epoch),
                Effect::ProbeSecondary => {
                    tracing::warn!(
                        volume = %self.name,
                        "copy failed on a volume in no group: running primary-only with its changes tracked until the secondary answers, then resynchronising"
                    );
                    tokio::spawn(probe_secondary(self.me.clone()));
                }
                Effect::StartResync { generation } => {
                    tokio::spawn(resync(self.me.clone(), generation));
                }
                Effect::Persist => {
                    let _ = self.persist.send(());
                }
                Effect::Event(event) => {
                    // No subscriber is fine: the state itself records what happened.
                    let _ = self.events.send(event);
                }
                Effect::StateChanged => {
                    let status = self.status();
                    let confirmed = self.lock().confirmed();
                    self.confirmed.send_if_modified(|c| {
                        let now = confirmed;
                        std::mem::replace(c, now) != now
                    });
                    let _ = self.events.send(Event::StateChanged(Box::new(status)));
                }
            }
        }
    }

    /// Runs `f` on the state under the lock, then carries out its effects.
    fn with_state<T>(&self, f: impl FnOnce(&mut ReplState) -> T) -> T {
        let (out, effects) = {
            let mut state = self.lock();
            let out = f(&mut state);
            (out, state.take_effects())
        };
        self.apply(effects);
        out
    }

    pub(crate) fn link_current(&self, generation: u64) -> bool {
        self.lock().generation() == generation
    }

    pub(crate) fn oldest_pending(&self) -> Option<Instant> {
        self.lock().oldest_pending()
    }

    pub(crate) fn copy_acked(&self, generation: u64, seq: u64) -> Result<(), CopyError> {
        self.with_state(|s| s.acked(generation, seq))
    }

    pub(crate) fn copy_failed(&self, generation: u64, error: &CopyError) {
        self.with_state(|s| {
            s.link_failed(
                generation,
                error,
                Instant::now(),
                std::time::SystemTime::now(),
            )
        });
    }

    /// The export name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The size in bytes.
    pub fn size(&self) -> u64 {
        self.store.size()
    }

    /// The backing file.
    pub fn path(&self) -> &Path {
        self.store.path()
    }

    /// The state file.
    pub fn state_file(&self) -> &Path {
        &self.state_path
    }

    /// A snapshot of the volume's replication.
    pub fn status(&self) -> VolumeStatus {
        let (s, fenced) = {
            let state = self.lock();
            (state.snapshot(), state.fenced())
        };
        VolumeStatus {
            name: self.name.clone(),
            replication: s,
            secondary: self.copy_config().map(|c| c.secondary).unwrap_or_default(),
            kept_image: self.kept_image(),
            fenced,
        }
    }

    /// **Breaks the safety rules on purpose**: see [`ReplState::break_ack_while_suspended`]. Tests only.
    #[doc(hidden)]
    pub fn break_ack_while_suspended(&self) {
        self.lock().break_ack_while_suspended();
    }

    /// The dirty regions as `(offset, length)` ranges.
    pub fn dirty_regions(&self) -> Vec<(u64, u64)> {
        self.lock().dirty().regions()
    }

    /// Waits until the volume is confirmed (fail closed).
    async fn gate(&self) {
        if *self.confirmed.borrow() {
            return;
        }
        let mut rx = self.confirmed.subscribe();
        // The sender lives as long as the volume.
        let _ = rx.wait_for(|c| *c).await;
    }

    /// Reads `length` bytes at `offset` (the caller checked the range).
    pub async fn read(&self, offset: u64, length: u32) -> Result<Bytes, VolumeError> {
        self.gate().await;
        Ok(self.store.read(offset, length).await?)
    }

    /// Writes `data` at `offset` (the caller checked the range). Completes once the write is local (and
    /// durable if `fua`) and its replication completed: durable on the secondary, or released.
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
        self.gate().await;
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
        self.gate().await;
        // In the persisted activity map before it may land: a crash cannot leave it on the primary only.
        let wait = self.with_state(|state| state.cover(offset, length));
        let covered = Covered(self);
        if let Some(rx) = wait {
            rx.await
                .unwrap_or_else(|_| Err(CopyError::Persist("the persister stopped".into())))?;
        }
        let (local, copy): (_, CopyWait) = self.with_state(|state| {
            if let Some(epoch) = state.fenced() {
                return Err(VolumeError::Fenced {
                    name: self.name.clone(),
                    epoch,
                });
            }
            let seq = state.next_seq();
            let local = self.store.submit(op, durable);
            let copy = state.submit(seq, offset, length, frame(seq), Instant::now());
            Ok((local, copy))
        })?;
        drop(covered);
        let (local, copy) = tokio::join!(local, copy.wait());
        local?;
        copy?;
        Ok(())
    }

    async fn await_persist(
        rx: Option<oneshot::Receiver<Result<(), CopyError>>>,
    ) -> Result<(), DirectiveError> {
        if let Some(rx) = rx {
            rx.await
                .unwrap_or_else(|_| Err(CopyError::Persist("the persister stopped".into())))
                .map_err(|e| DirectiveError::Persist(e.to_string()))?;
        }
        Ok(())
    }

    /// Refuses what would start copying on a volume that has no secondary yet (promoted at the DR site:
    /// its peer is named by a Reverse).
    fn check_peer(&self, what: &str) -> Result<(), DirectiveError> {
        if self.track_changes && self.copy_config().is_none() {
            return Err(DirectiveError::Refused(format!(
                "{what} on volume {}: it was promoted at this site and has no secondary yet; a \
                 Reverse names the old site's secondary",
                self.name
            )));
        }
        Ok(())
    }

    /// The sidecar's confirmation / configuration (group, epoch, stage, hold timeout).
    pub async fn configure(
        &self,
        group: &str,
        epoch: u64,
        stage: Option<Stage>,
        hold_timeout: Option<Duration>,
    ) -> Result<VolumeStatus, DirectiveError> {
        self.check_peer("configure")?;
        let rx = self.with_state(|s| {
            if let Some(t) = hold_timeout {
                s.set_hold_timeout(t);
            }
            s.configure(group, epoch, stage, Instant::now())
        })?;
        Self::await_persist(rx).await?;
        Ok(self.status())
    }

    /// Suspends at `epoch`. Returns once the send queue is closed and the persisted dirty map covers
    /// every write the secondary had not acknowledged and every later one.
    pub async fn suspend(
        &self,
        group: &str,
        epoch: u64,
        fail_safe: bool,
    ) -> Result<VolumeStatus, DirectiveError> {
        let rx = self.with_state(|s| s.suspend(group, epoch, fail_safe, Instant::now()))?;
        Self::await_persist(rx).await?;
        Ok(self.status())
    }

    /// Releases at exactly `epoch`: returns once the state saying so is on disk, when the held writes
    /// complete, primary-only. If it cannot be written the volume stays suspended, holding.
    pub async fn release(&self, group: &str, epoch: u64) -> Result<VolumeStatus, DirectiveError> {
        let rx = self.with_state(|s| s.release(group, epoch))?;
        Self::await_persist(rx).await?;
        Ok(self.status())
    }

    /// Fences the volume at `epoch` (see [`ReplState::fence`]): returns once that is on disk, with the
    /// dirty regions (what the peer lacks) as `(offset, length)` ranges.
    pub async fn fence(
        &self,
        group: &str,
        epoch: u64,
    ) -> Result<(VolumeStatus, Vec<(u64, u64)>), DirectiveError> {
        let rx = self.with_state(|s| s.fence(group, epoch, Instant::now()))?;
        Self::await_persist(Some(rx)).await?;
        tracing::warn!(volume = %self.name, epoch, "fenced: every write fails from now on");
        Ok((self.status(), self.dirty_regions()))
    }

    /// Whether the volume is fenced, and at which epoch.
    pub fn fenced(&self) -> Option<u64> {
        self.lock().fenced()
    }

    /// Marks `ranges` dirty (a peer lacks them) and returns once the map on disk covers them.
    pub async fn add_dirty(&self, ranges: &[(u64, u64)]) -> Result<(), DirectiveError> {
        let rx = self.with_state(|s| s.add_dirty(ranges));
        Self::await_persist(Some(rx)).await
    }

    /// Copies this volume's writes to `config`'s secondary from the next link on (a promoted volume
    /// gets its peer when the old site returns).
    pub fn set_secondary(&self, config: CopyConfig) {
        *self.copy.lock().unwrap_or_else(PoisonError::into_inner) = Some(config);
    }

    fn copy_config(&self) -> Option<CopyConfig> {
        self.copy
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Resumes at `epoch`: resynchronises the dirty regions, then copies synchronously again. Returns once
    /// the resync has started.
    pub async fn resume(&self, group: &str, epoch: u64) -> Result<VolumeStatus, DirectiveError> {
        self.check_peer("resume")?;
        let rx = self.with_state(|s| s.resume(group, epoch, Instant::now()))?;
        Self::await_persist(rx).await?;
        Ok(self.status())
    }
}

/// Writes the state file whenever asked, answering the waiters the snapshot covered.
/// A write between [`ReplState::cover`] and its submission (or its end, cancelled or failed).
struct Covered<'a>(&'a Volume);

impl Drop for Covered<'_> {
    fn drop(&mut self) {
        self.0.with_state(ReplState::uncover);
    }
}

async fn persister(volume: Weak<Volume>, mut rx: mpsc::UnboundedReceiver<()>) {
    while rx.recv().await.is_some() {
        while rx.try_recv().is_ok() {}
        let Some(v) = volume.upgrade() else {
            return;
        };
        let (state, waiters, ticket) = v.lock().take_persist();
        let path = v.state_path.clone();
        let result = tokio::task::spawn_blocking(move || save_state(&path, &state))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        let result = result.map_err(CopyError::Persist);
        match &result {
            Ok(()) => v.with_state(|s| s.persisted(ticket)),
            Err(e) => {
                tracing::error!(volume = %v.name, error = %e, "persisting the volume state failed");
                v.with_state(|s| s.persist_failed(&ticket, e));
            }
        }
        for w in waiters {
            let _ = w.send(result.clone());
        }
    }
}

/// Probes the secondary of a volume running primary-only outside every group, with backoff, until it
/// answers (then resynchronises it) or the volume no longer waits for it.
async fn probe_secondary(volume: Weak<Volume>) {
    let mut delay = Duration::from_millis(100);
    loop {
        let Some(v) = volume.upgrade() else {
            return;
        };
        let next_seq = {
            let state = v.lock();
            if !state.awaiting_secondary() {
                return;
            }
            state.snapshot().next_seq
        };
        let Some(config) = v.copy_config() else {
            return;
        };
        let hello = Frame::Hello {
            volume: v.name.clone(),
            size: v.store.size(),
            first_seq: next_seq,
            keep: None,
            drop_image: None,
        };
        drop(v);
        match crate::copy::probe(&config, hello).await {
            Ok(()) => {
                if let Some(v) = volume.upgrade() {
                    tracing::info!(volume = %v.name, "the secondary answers again: resynchronising");
                    v.with_state(|s| s.secondary_answers(Instant::now()));
                }
                return;
            }
            Err(error) => tracing::debug!(%error, "secondary not answering yet"),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// Fails held writes that outlive the hold timeout.
async fn hold_supervisor(volume: Weak<Volume>) {
    let mut tick = tokio::time::interval(HOLD_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(v) = volume.upgrade() else {
            return;
        };
        v.with_state(|s| s.expire_holds(Instant::now()));
    }
}

/// Copies the dirty regions over link `generation`, a window of pieces at a time, each read in order
/// with the writes around it; finishes the resync when the map is empty.
async fn resync(volume: Weak<Volume>, generation: u64) {
    loop {
        let Some(v) = volume.upgrade() else {
            return;
        };
        let batch = v.with_state(|s| {
            if !s.resyncing(generation) {
                return None;
            }
            let pieces = s.dirty().pieces(RESYNC_PIECE, v.store.size());
            if pieces.is_empty() {
                s.resync_done(generation);
                return None;
            }
            let mut waits = Vec::new();
            for (offset, length) in pieces.into_iter().take(RESYNC_WINDOW) {
                let seq = s.next_seq();
                let (out, data) = oneshot::channel();
                // The store answers `out` with the bytes; the job's own completion is not needed.
                drop(v.store.submit(
                    StoreOp::Snapshot {
                        offset,
                        length,
                        out,
                    },
                    false,
                ));
                match s.submit_resync(generation, seq, offset, length, data, Instant::now()) {
                    Some(done) => waits.push(done),
                    None => return None,
                }
            }
            Some(waits)
        });
        drop(v);
        let Some(waits) = batch else {
            return;
        };
        for done in waits {
            if done.await.is_err() {
                // The link failed or was closed; the state machine already moved on.
                return;
            }
        }
    }
}
