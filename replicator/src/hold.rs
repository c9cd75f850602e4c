//! The per-volume replication state machine: copying, holding, suspend / release / resume at epochs,
//! hold timeouts and the dirty-region map. Pure: no I/O. It only completes waiters (oneshot senders)
//! and queues [`Effect`]s that the volume carries out (start a link, persist, publish an event). It reads
//! no clock either: every time it needs (monotonic for timeouts, wall-clock for reports) is passed in.
//!
//! Modes (the `Mode` of the Replicator protocol):
//! - `Unconfirmed`: just started; I/O waits until the sidecar confirms the volume (fail closed).
//! - `Standalone`: no secondary; writes complete once local.
//! - `Replicating`: every write is copied; it completes when the secondary acknowledges it.
//! - `Held`: a copy failed; that write, every write in flight and every new write is **held** — its
//!   completion is kept, not answered — and recorded in the dirty map.
//! - `Suspended(e)`: the send queue is closed; every write is held until `Release(e)` or a resume.
//! - `Running(e)`: released at `e`; writes complete once local, recorded in the dirty map (persisted
//!   before the write completes when it dirties a new chunk).
//! - `Resyncing(e)`: dirty regions are being copied; new writes are copied synchronously; writes held
//!   before the resume complete when the resync finishes.
//!
//! Held writes never complete successfully except by a release, a finished resync or a group's removal
//! (DESIGN.md rule 9); a held write older than the hold timeout fails, and the volume keeps holding.
//!
//! Outside every group (issue 21 item 3c): a volume the control system confirmed in no group (a
//! `Configure` naming no group) has no group to freeze, so nothing could ever release its held writes.
//! When its copy fails it runs primary-only instead — `Running` at epoch 0, every write recorded in the
//! dirty map, acknowledged once the map on disk covers it — says so (`CopyFailed` naming no group, the
//! mode), and probes the secondary ([`Effect::ProbeSecondary`]); once the secondary answers it
//! resynchronises and replicates ([`ReplState::secondary_answers`]). A volume served without a control
//! system (never confirmed) keeps failing closed: held, until one configures it.
//! Points (group, epoch, stage) never move backwards: an older directive or confirmation changes nothing.
//!
//! The activity map: a copied write reaches the primary's disk before its copy reaches the secondary,
//! and a crash then left the two sides different with nothing saying so — while the application, or its
//! recovery, reads that write on the primary and builds on it. So while the volume copies, before a write
//! may land ([`ReplState::cover`]) its chunk is in the persisted activity map, and a restart takes every
//! active chunk as dirty. The map is cleared once the volume replicates in sync and has been idle for
//! [`ACTIVE_IDLE`]: a steady working set costs nothing, the first write to a chunk after a quiet spell
//! waits for one state write. In the other modes (held, suspended, released) the dirty map records
//! writes, and likewise its chunk is on disk before the write may land (the simulator found a suspended
//! volume's write whose map write failed, then a crash, leaving it on the primary alone for good).
//!
//! A release takes effect only once it is durable (rules 2 and 6): the volume stays `Suspended` while the
//! state saying "running at `e`" — with the dirty map covering the held writes — is written, enters
//! `Running` when that write succeeds, and stays suspended at its old stage when it fails, so a retry
//! writes it again. A held write completes only once a written state covers its dirty region. Likewise a
//! repeated suspend is "already done" only once the suspension and the map are on disk.

use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::copy::CopyError;
use crate::dirty::DirtyMap;
use crate::events::{CopyFailed, Event, HoldTimedOut};
use crate::store::StoreError;
use crate::wire::Frame;

/// How long a volume replicating in sync stays without writes before its activity map is cleared.
pub const ACTIVE_IDLE: Duration = Duration::from_secs(1);

/// The activity map's granularity (DRBD's activity-log extent): a sequential writer waits for one state
/// write per extent, and a restart resynchronises at most the active extents.
pub const ACTIVE_EXTENT: u64 = 4 * 1024 * 1024;

/// A stage within an epoch: Freeze < Release < Resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Stage {
    /// Suspended.
    Freeze,
    /// Released.
    Release,
    /// Resumed.
    Resume,
}

/// What a volume's replication is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Waiting for the sidecar's confirmation; I/O waits.
    Unconfirmed,
    /// No secondary.
    Standalone,
    /// Copying every write synchronously.
    Replicating,
    /// A copy failed; writes are held.
    Held {
        /// The first sequence not copied.
        first_seq: u64,
        /// What failed.
        error: String,
        /// When.
        since: SystemTime,
    },
    /// Suspended at an epoch; writes are held.
    Suspended {
        /// The epoch.
        epoch: u64,
        /// Taken by the sidecar's fail-safe (lifted only at a higher epoch).
        fail_safe: bool,
    },
    /// Released at an epoch: primary-only, dirty recorded.
    Running {
        /// The epoch.
        epoch: u64,
    },
    /// Copying dirty regions, then synchronous again.
    Resyncing {
        /// The epoch.
        epoch: u64,
    },
}

impl Mode {
    fn copies(&self) -> bool {
        matches!(self, Mode::Replicating | Mode::Resyncing { .. })
    }
}

/// An item on a replication link's send queue, in sequence order.
#[derive(Debug)]
pub enum LinkItem {
    /// A frame ready to send.
    Frame(Frame),
    /// A resync write whose data the store reads in order (it reflects every earlier write only).
    Deferred {
        /// Sequence.
        seq: u64,
        /// Offset.
        offset: u64,
        /// The data, when read.
        data: oneshot::Receiver<Result<Bytes, StoreError>>,
    },
}

/// Work for the volume to carry out after a state change (outside the lock).
#[derive(Debug)]
pub enum Effect {
    /// Start replication link `generation`, first sequence `first_seq`, fed by `rx`.
    StartLink {
        /// Link generation.
        generation: u64,
        /// First sequence it carries.
        first_seq: u64,
        /// Its send queue.
        rx: mpsc::UnboundedReceiver<LinkItem>,
    },
    /// Start copying the dirty regions over link `generation`.
    StartResync {
        /// Link generation.
        generation: u64,
    },
    /// Write the persisted state.
    Persist,
    /// Publish an event.
    Event(Event),
    /// The volume's state changed (publish its status).
    StateChanged,
    /// A volume in no group runs primary-only: probe the secondary until it answers, then call
    /// [`ReplState::secondary_answers`].
    ProbeSecondary,
    /// Ask the secondary to keep its image of `epoch` from the next link on (DESIGN rule 7): a
    /// confirmation that resumes the volume at `epoch` is about to overwrite it with the dirty regions (a
    /// `Resume` is preceded by the caller's own `KeepImage`; the failover's reverse resync keeps none).
    /// Comes before the link it is for.
    KeepImage {
        /// The epoch whose image the secondary keeps (one that keeps an older image keeps that one).
        epoch: u64,
    },
}

/// How a write's replication completes.
#[derive(Debug)]
pub enum CopyWait {
    /// Already decided.
    Done(Result<(), CopyError>),
    /// Decided later (ack, release, resync, persist or hold timeout).
    Wait(oneshot::Receiver<Result<(), CopyError>>),
}

impl CopyWait {
    /// Waits for the outcome.
    pub async fn wait(self) -> Result<(), CopyError> {
        match self {
            CopyWait::Done(r) => r,
            CopyWait::Wait(rx) => rx
                .await
                .unwrap_or_else(|_| Err(CopyError::Link("the volume stopped".into()))),
        }
    }
}

#[derive(Debug)]
enum PendingKind {
    Write(oneshot::Sender<Result<(), CopyError>>),
    Resync(oneshot::Sender<()>),
}

#[derive(Debug)]
struct Pending {
    seq: u64,
    offset: u64,
    length: u64,
    enqueued: Instant,
    kind: PendingKind,
}

#[derive(Debug)]
struct Held {
    since: Instant,
    done: oneshot::Sender<Result<(), CopyError>>,
    /// The dirty version a written state must cover before a release may complete this write.
    covered_at: u64,
}

/// A release accepted at `epoch` whose state is being written: the volume holds until it is on disk.
#[derive(Debug)]
struct Releasing {
    epoch: u64,
    waiters: Vec<oneshot::Sender<Result<(), CopyError>>>,
}

/// What one state write holds: pass it back to [`ReplState::persisted`] once it is on disk, or to
/// [`ReplState::persist_failed`] when the write failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PersistTicket {
    /// The dirty version the written map covers.
    version: u64,
    /// The activity version the written activity map covers.
    active_version: u64,
    group: String,
    epoch: u64,
    stage: Option<Stage>,
    /// The mode written (a pending release is written as `Running`).
    mode: Mode,
}

/// Why a directive was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DirectiveError {
    /// The volume has no secondary: there is nothing to suspend or resume.
    #[error("volume {0} is not replicated")]
    NotReplicated(String),
    /// The directive names another group than the volume's.
    #[error("volume {volume} belongs to group {actual:?}, not {named:?}")]
    WrongGroup {
        /// The volume.
        volume: String,
        /// Its group.
        actual: String,
        /// The group named.
        named: String,
    },
    /// The directive does not apply in the volume's state (e.g. a release at another epoch).
    #[error("refused: {0}")]
    Refused(String),
    /// The state could not be persisted.
    #[error("persisting the volume state: {0}")]
    Persist(String),
}

/// The persisted part of a volume's replication state (DESIGN.md rule 6).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Persisted {
    /// The group ("" for none).
    pub group_uid: String,
    /// The epoch.
    pub epoch: u64,
    /// The stage within the epoch, if any directive was seen.
    pub stage: Option<Stage>,
    /// The mode to return to: `replicating`, `held`, `suspended`, `running`, `resyncing`.
    pub mode: String,
    /// Whether a suspension is the fail-safe's.
    pub fail_safe: bool,
    /// The hold timeout in milliseconds.
    pub hold_timeout_ms: u64,
    /// Dirty regions `(offset, length)`.
    pub dirty: Vec<(u64, u64)>,
    /// Fenced at this epoch (its secondary was promoted): every write fails, also after a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fenced: Option<u64>,
    /// Chunks writes may have reached the primary's disk in without being on the secondary or in
    /// `dirty` (the activity map): taken as dirty after a restart.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub active: Vec<(u64, u64)>,
}

/// A snapshot for status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Mode.
    pub mode: Mode,
    /// Group ("" for none).
    pub group_uid: String,
    /// Epoch.
    pub epoch: u64,
    /// Stage.
    pub stage: Option<Stage>,
    /// Fail-safe suspension.
    pub fail_safe: bool,
    /// The next write's sequence.
    pub next_seq: u64,
    /// Highest sequence the secondary acknowledged (on the current link).
    pub last_acked: Option<u64>,
    /// Writes waiting for the secondary.
    pub pending: usize,
    /// Writes held.
    pub held: usize,
    /// Dirty bytes.
    pub dirty_bytes: u64,
    /// Hold timeout.
    pub hold_timeout: Duration,
}

/// A volume's replication state.
#[derive(Debug)]
pub struct ReplState {
    volume: String,
    has_secondary: bool,
    mode: Mode,
    /// While `Unconfirmed`: the mode to enter on confirmation.
    restored: Mode,
    group: String,
    epoch: u64,
    stage: Option<Stage>,
    hold_timeout: Duration,
    next_seq: u64,
    pending: VecDeque<Pending>,
    held: VecDeque<Held>,
    link: Option<mpsc::UnboundedSender<LinkItem>>,
    generation: u64,
    last_acked: Option<u64>,
    dirty: DirtyMap,
    persist_waiters: Vec<oneshot::Sender<Result<(), CopyError>>>,
    /// Bumped whenever the dirty map gains a chunk.
    dirty_version: u64,
    /// The `dirty_version` the last completed persist covered.
    persisted_version: u64,
    /// The activity map: chunks writes may land in before they are copied or recorded dirty on disk.
    active: DirtyMap,
    /// Bumped whenever the activity map changes.
    active_version: u64,
    /// The `active_version` the last completed persist covered.
    active_persisted_version: u64,
    /// Writes covered by [`ReplState::cover`] and not yet submitted: the map is not cleared under them.
    covering: u64,
    /// When the last write was submitted.
    last_write: Option<Instant>,
    /// A release waiting for its state to be written.
    releasing: Option<Releasing>,
    /// What the last successful state write put on disk.
    durable: Option<PersistTicket>,
    /// The control system confirmed the volume in no group: a copy failure runs it primary-only.
    outside_groups: bool,
    /// Deliberately wrong semantics, for tests that must catch them: acknowledge writes while suspended.
    broken_ack_while_suspended: bool,
    /// Deliberately wrong semantics, for tests that must catch them: let writes land uncovered by the
    /// activity map.
    broken_activity_map: bool,
    /// Fenced at this epoch: writes fail, directives that would replicate or acknowledge are refused.
    fenced: Option<u64>,
    effects: Vec<Effect>,
}

fn mode_name(mode: &Mode) -> &'static str {
    match mode {
        Mode::Unconfirmed => "unconfirmed",
        Mode::Standalone => "standalone",
        Mode::Replicating => "replicating",
        Mode::Held { .. } => "held",
        Mode::Suspended { .. } => "suspended",
        Mode::Running { .. } => "running",
        Mode::Resyncing { .. } => "resyncing",
    }
}

impl ReplState {
    /// A fresh or restored state. `confirmed` false starts `Unconfirmed` (fail closed). `wall_now` is the
    /// wall-clock time now: the state machine reads no clock itself (times are passed in), so a simulator
    /// can drive it.
    pub fn new(
        volume: &str,
        has_secondary: bool,
        hold_timeout: Duration,
        restored: Option<Persisted>,
        confirmed: bool,
        wall_now: SystemTime,
    ) -> ReplState {
        let mut s = ReplState {
            volume: volume.to_owned(),
            has_secondary,
            mode: Mode::Unconfirmed,
            restored: Mode::Standalone,
            group: String::new(),
            epoch: 0,
            stage: None,
            hold_timeout,
            next_seq: 0,
            pending: VecDeque::new(),
            held: VecDeque::new(),
            link: None,
            generation: 0,
            last_acked: None,
            dirty: DirtyMap::default(),
            persist_waiters: Vec::new(),
            dirty_version: 0,
            persisted_version: 0,
            active: DirtyMap::default(),
            active_version: 0,
            active_persisted_version: 0,
            covering: 0,
            last_write: None,
            releasing: None,
            durable: None,
            outside_groups: false,
            broken_ack_while_suspended: false,
            broken_activity_map: false,
            fenced: restored.as_ref().and_then(|p| p.fenced),
            effects: Vec::new(),
        };
        s.restored = if !has_secondary {
            Mode::Standalone
        } else if let Some(p) = restored {
            s.group = p.group_uid;
            s.epoch = p.epoch;
            s.stage = p.stage;
            s.hold_timeout = Duration::from_millis(p.hold_timeout_ms);
            // Chunks active at the stop may differ between the two sides: resynchronised like dirty ones.
            for (offset, length) in p.dirty.into_iter().chain(p.active) {
                s.dirty.mark(offset, length);
            }
            match p.mode.as_str() {
                "suspended" => Mode::Suspended {
                    epoch: p.epoch,
                    fail_safe: p.fail_safe,
                },
                "running" => Mode::Running { epoch: p.epoch },
                "resyncing" => Mode::Resyncing { epoch: p.epoch },
                "replicating" if s.dirty.dirty_bytes() == 0 => Mode::Replicating,
                "replicating" => Mode::Resyncing { epoch: p.epoch },
                // Held, or anything unknown: hold (freezing is always safe).
                _ => Mode::Held {
                    first_seq: 0,
                    error: "held before the restart".into(),
                    since: wall_now,
                },
            }
        } else {
            Mode::Replicating
        };
        if confirmed {
            s.confirm();
        }
        s
    }

    /// Effects queued since the last call.
    pub fn take_effects(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.effects)
    }

    /// **Breaks the safety rules on purpose** (rule 2): a suspended volume then acknowledges new writes
    /// primary-only before any release. Only for tests that show the checks catch it.
    #[doc(hidden)]
    pub fn break_ack_while_suspended(&mut self) {
        self.broken_ack_while_suspended = true;
    }

    /// **Breaks the crash guarantee on purpose**: writes land on the primary without their chunk in the
    /// activity map, so a crash can leave a write on the primary that nothing resynchronises. Only for
    /// tests that show the checks catch it.
    #[doc(hidden)]
    pub fn break_activity_map(&mut self) {
        self.broken_activity_map = true;
    }

    /// The current link generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether I/O may proceed (the volume is confirmed), or fail at once (it is fenced).
    pub fn confirmed(&self) -> bool {
        self.mode != Mode::Unconfirmed || self.fenced.is_some()
    }

    /// The epoch the volume was fenced at, if it is fenced.
    pub fn fenced(&self) -> Option<u64> {
        self.fenced
    }

    /// Fences the volume at `epoch` (its secondary was promoted at the DR site): from now on every write
    /// fails and is never acknowledged; held writes and writes waiting for the secondary fail now (their
    /// regions stay in the dirty map, which says what the peer lacks); the link closes and the volume
    /// stays suspended. Durable once the returned persist completes; repeating it changes nothing but
    /// writes the state again.
    pub fn fence(
        &mut self,
        group: &str,
        epoch: u64,
        now: Instant,
    ) -> Result<oneshot::Receiver<Result<(), CopyError>>, DirectiveError> {
        self.check_group(group)?;
        if self.fenced.is_none() {
            self.fenced = Some(epoch);
            self.abandon_release();
            self.close_link(now);
            self.complete_held(&Err(CopyError::Fenced(epoch)));
            let suspended = Mode::Suspended {
                epoch: self.epoch,
                fail_safe: false,
            };
            if self.mode == Mode::Unconfirmed {
                self.restored = suspended;
            } else {
                self.mode = suspended;
            }
            self.changed();
        }
        Ok(self.persist())
    }

    /// Adds `ranges` to the dirty map (what a peer lacks: the old site's writes after the image, to be
    /// overwritten on the reverse resync). Durable once the returned persist completes.
    pub fn add_dirty(&mut self, ranges: &[(u64, u64)]) -> oneshot::Receiver<Result<(), CopyError>> {
        for (offset, length) in ranges {
            self.mark_dirty(*offset, *length);
        }
        self.changed();
        self.persist()
    }

    /// Refuses a directive on a fenced volume.
    fn check_not_fenced(&self, what: &str) -> Result<(), DirectiveError> {
        match self.fenced {
            Some(epoch) => Err(DirectiveError::Refused(format!(
                "{what} on volume {}: it is fenced since epoch {epoch} (its secondary was promoted at the \
                 disaster-recovery site), so it takes no writes; it becomes a secondary of the promoted \
                 volume (Reverse) before it can be a primary again",
                self.volume
            ))),
            None => Ok(()),
        }
    }

    /// The current mode.
    pub fn mode(&self) -> &Mode {
        &self.mode
    }

    /// The dirty map.
    pub fn dirty(&self) -> &DirtyMap {
        &self.dirty
    }

    /// A status snapshot.
    pub fn snapshot(&self) -> Snapshot {
        let fail_safe = matches!(
            self.mode,
            Mode::Suspended {
                fail_safe: true,
                ..
            }
        );
        Snapshot {
            mode: self.mode.clone(),
            group_uid: self.group.clone(),
            epoch: self.epoch,
            stage: self.stage,
            fail_safe,
            next_seq: self.next_seq,
            last_acked: self.last_acked,
            pending: self.pending.len(),
            held: self.held.len(),
            dirty_bytes: self.dirty.dirty_bytes(),
            hold_timeout: self.hold_timeout,
        }
    }

    /// The epoch of a release whose state is being written, if the volume is still suspended for it.
    fn pending_release(&self) -> Option<u64> {
        let epoch = self.releasing.as_ref()?.epoch;
        let suspended = Mode::Suspended {
            epoch,
            fail_safe: false,
        };
        (self.mode == suspended && self.position() == (epoch, Some(Stage::Freeze))).then_some(epoch)
    }

    /// What to persist, the waiters the write will answer, and the ticket to pass back to
    /// [`ReplState::persisted`] once written (or [`ReplState::persist_failed`]). A release being
    /// written is written as running at its epoch.
    #[allow(clippy::type_complexity)]
    pub fn take_persist(
        &mut self,
    ) -> (
        Persisted,
        Vec<oneshot::Sender<Result<(), CopyError>>>,
        PersistTicket,
    ) {
        let (mode, stage) = match self.pending_release() {
            Some(epoch) => (Mode::Running { epoch }, Some(Stage::Release)),
            None if self.mode == Mode::Unconfirmed => (self.restored.clone(), self.stage),
            None => (self.mode.clone(), self.stage),
        };
        let p = Persisted {
            group_uid: self.group.clone(),
            epoch: self.epoch,
            stage,
            mode: mode_name(&mode).into(),
            fail_safe: matches!(
                mode,
                Mode::Suspended {
                    fail_safe: true,
                    ..
                }
            ),
            hold_timeout_ms: u64::try_from(self.hold_timeout.as_millis()).unwrap_or(u64::MAX),
            dirty: self.dirty.regions(),
            fenced: self.fenced,
            active: self.active.regions(),
        };
        let ticket = PersistTicket {
            version: self.dirty_version,
            active_version: self.active_version,
            group: self.group.clone(),
            epoch: self.epoch,
            stage,
            mode,
        };
        (p, std::mem::take(&mut self.persist_waiters), ticket)
    }

    /// The state of `ticket` is on disk: a release it carried takes effect, and held writes its map
    /// covers complete (primary-only) once the volume runs released at the epoch written.
    pub fn persisted(&mut self, ticket: PersistTicket) {
        self.persisted_version = self.persisted_version.max(ticket.version);
        self.active_persisted_version = self.active_persisted_version.max(ticket.active_version);
        if let Mode::Running { epoch } = ticket.mode
            && ticket.group == self.group
        {
            if self.pending_release() == Some(epoch) {
                self.epoch = epoch;
                self.stage = Some(Stage::Release);
                self.mode = Mode::Running { epoch };
                self.changed();
                for w in self.releasing.take().map(|r| r.waiters).unwrap_or_default() {
                    let _ = w.send(Ok(()));
                }
            }
            if self.mode == (Mode::Running { epoch }) {
                while self
                    .held
                    .front()
                    .is_some_and(|h| h.covered_at <= ticket.version)
                {
                    if let Some(h) = self.held.pop_front() {
                        let _ = h.done.send(Ok(()));
                    }
                }
            }
        }
        self.durable = Some(ticket);
    }

    /// The state of `ticket` could not be written: a release it carried fails (its callers retry) and
    /// the volume stays suspended at its old stage, holding.
    pub fn persist_failed(&mut self, ticket: &PersistTicket, error: &CopyError) {
        if let Mode::Running { epoch } = ticket.mode
            && self.pending_release() == Some(epoch)
        {
            for w in self.releasing.take().map(|r| r.waiters).unwrap_or_default() {
                let _ = w.send(Err(error.clone()));
            }
        }
    }

    /// Fails the callers of a release that a later directive superseded before it was written.
    fn abandon_release(&mut self) {
        for w in self.releasing.take().map(|r| r.waiters).unwrap_or_default() {
            let _ = w.send(Err(CopyError::Persist(
                "a later directive superseded the release before its state was written".into(),
            )));
        }
    }

    /// Whether the state on disk holds a suspension at `epoch` or later and a map covering every
    /// dirty region known now.
    fn suspension_durable(&self, epoch: u64) -> bool {
        self.persisted_version >= self.dirty_version
            && self.durable.as_ref().is_some_and(|d| {
                d.group == self.group
                    && matches!(d.mode, Mode::Suspended { epoch: at, .. } if at >= epoch)
            })
    }

    fn mark_dirty(&mut self, offset: u64, length: u64) -> bool {
        let newly = !self.dirty.is_dirty_all(offset, length);
        if newly {
            self.dirty.mark(offset, length);
            self.dirty_version += 1;
        }
        newly
    }

    fn persist(&mut self) -> oneshot::Receiver<Result<(), CopyError>> {
        let (tx, rx) = oneshot::channel();
        self.persist_waiters.push(tx);
        self.effects.push(Effect::Persist);
        rx
    }

    fn changed(&mut self) {
        self.effects.push(Effect::StateChanged);
    }

    /// Sends a frame without a sequence (a kept image's drop) on the open link, in order with the writes;
    /// `false` when no link is open.
    pub fn send_unsequenced(&mut self, frame: Frame) -> bool {
        self.link
            .as_ref()
            .is_some_and(|link| link.send(LinkItem::Frame(frame)).is_ok())
    }

    /// Opens a new link generation; the old one's acks and failures are ignored from now on.
    fn open_link(&mut self) {
        let (tx, rx) = mpsc::unbounded_channel();
        self.generation += 1;
        self.link = Some(tx);
        self.last_acked = None;
        self.effects.push(Effect::StartLink {
            generation: self.generation,
            first_seq: self.next_seq,
            rx,
        });
    }

    /// Closes the send queue: pending writes become held (and dirty); resync chunks are dropped.
    fn close_link(&mut self, now: Instant) {
        self.generation += 1;
        self.link = None;
        for p in std::mem::take(&mut self.pending) {
            self.mark_dirty(p.offset, p.length);
            if let PendingKind::Write(done) = p.kind {
                self.held.push_back(Held {
                    since: now,
                    done,
                    covered_at: self.dirty_version,
                });
            }
        }
    }

    fn complete_held(&mut self, result: &Result<(), CopyError>) {
        for h in std::mem::take(&mut self.held) {
            let _ = h.done.send(result.clone());
        }
    }

    fn enter(&mut self, mode: Mode) {
        if mode.copies() && !self.mode.copies() {
            self.open_link();
        }
        if let Mode::Resyncing { .. } = mode {
            self.effects.push(Effect::StartResync {
                generation: self.generation,
            });
        }
        self.mode = mode;
        self.changed();
    }

    fn confirm(&mut self) {
        if self.mode == Mode::Unconfirmed {
            let mut restored = std::mem::replace(&mut self.restored, Mode::Standalone);
            // Writes that came while the volume waited are held and dirty: one returning to replicate
            // copies them first (and completes them once copied), or they would wait for the hold
            // timeout and stay on the primary alone while the volume claims to be in sync.
            if restored == Mode::Replicating && self.dirty.dirty_bytes() > 0 {
                restored = Mode::Resyncing { epoch: self.epoch };
            }
            self.enter(restored);
        }
    }

    /// Takes the next write sequence.
    pub fn next_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    /// Records `[offset, offset+length)` on disk before a write or trim there may land on the primary's
    /// disk: while the volume copies (replicating or resyncing) in the activity map, in any other mode
    /// (held, suspended, released) in the dirty map — so a crash can never leave a write on the primary
    /// with nothing saying its secondary may lack it. `Some`: wait for this state write first (a failure
    /// fails the write: nothing lands). Pair every call with [`ReplState::uncover`] once the write was
    /// submitted (or given up).
    pub fn cover(
        &mut self,
        offset: u64,
        length: u64,
    ) -> Option<oneshot::Receiver<Result<(), CopyError>>> {
        self.covering += 1;
        // Nothing lands on a fenced volume (the write is refused), nor needs recording without a peer.
        if !self.has_secondary || self.fenced.is_some() {
            return None;
        }
        if !self.mode.copies() {
            // Not copied: the dirty map records it (and a released volume's write is acknowledged once
            // the map on disk covers it, which it now does before the write lands).
            self.mark_dirty(offset, length);
            return (self.persisted_version < self.dirty_version).then(|| self.persist());
        }
        if self.broken_activity_map {
            return None;
        }
        if !self.active.is_dirty_all(offset, length) {
            let first = offset / ACTIVE_EXTENT * ACTIVE_EXTENT;
            let end = offset
                .saturating_add(length)
                .div_ceil(ACTIVE_EXTENT)
                .saturating_mul(ACTIVE_EXTENT);
            self.active.mark(first, end.saturating_sub(first).max(1));
            self.active_version += 1;
        }
        (self.active_persisted_version < self.active_version).then(|| self.persist())
    }

    /// A write covered by [`ReplState::cover`] was submitted, or given up.
    pub fn uncover(&mut self) {
        self.covering = self.covering.saturating_sub(1);
    }

    /// Clears the activity map once nothing can be on the primary's disk that is not on the secondary:
    /// replicating, nothing in flight or about to land, no write for [`ACTIVE_IDLE`].
    fn clear_activity_when_idle(&mut self, now: Instant) {
        let idle = self
            .last_write
            .is_none_or(|at| now.saturating_duration_since(at) >= ACTIVE_IDLE);
        if self.mode == Mode::Replicating
            && self.pending.is_empty()
            && self.covering == 0
            && idle
            && self.active.dirty_bytes() > 0
        {
            self.active = DirtyMap::default();
            self.active_version += 1;
            drop(self.persist());
        }
    }

    /// Decides how write or trim `frame` (sequence `seq`, `[offset, offset+length)`) is replicated. Called
    /// under the volume's lock, in sequence order, after the local operation was queued.
    pub fn submit(
        &mut self,
        seq: u64,
        offset: u64,
        length: u64,
        frame: Frame,
        now: Instant,
    ) -> CopyWait {
        self.last_write = Some(now);
        match &self.mode {
            Mode::Standalone => CopyWait::Done(Ok(())),
            Mode::Replicating | Mode::Resyncing { .. } => {
                let (done, rx) = oneshot::channel();
                self.pending.push_back(Pending {
                    seq,
                    offset,
                    length,
                    enqueued: now,
                    kind: PendingKind::Write(done),
                });
                if let Some(link) = &self.link {
                    let _ = link.send(LinkItem::Frame(frame));
                }
                CopyWait::Wait(rx)
            }
            Mode::Running { .. } => {
                // Acknowledge only once the map on disk covers this write.
                if !self.mark_dirty(offset, length) && self.persisted_version >= self.dirty_version
                {
                    CopyWait::Done(Ok(()))
                } else {
                    CopyWait::Wait(self.persist())
                }
            }
            Mode::Suspended { .. } if self.broken_ack_while_suspended => {
                self.mark_dirty(offset, length);
                CopyWait::Done(Ok(()))
            }
            Mode::Held { .. } | Mode::Suspended { .. } | Mode::Unconfirmed => {
                if self.mark_dirty(offset, length) {
                    // Not awaited: the write is held anyway; this keeps the map on disk current.
                    drop(self.persist());
                }
                let (done, rx) = oneshot::channel();
                self.held.push_back(Held {
                    since: now,
                    done,
                    covered_at: self.dirty_version,
                });
                CopyWait::Wait(rx)
            }
        }
    }

    /// Queues a resync copy of `[offset, offset+length)` with data read in order by the store. Returns
    /// the completion the resync driver waits for, or `None` if link `generation` is no longer current.
    pub fn submit_resync(
        &mut self,
        generation: u64,
        seq: u64,
        offset: u64,
        length: u64,
        data: oneshot::Receiver<Result<Bytes, StoreError>>,
        now: Instant,
    ) -> Option<oneshot::Receiver<()>> {
        if generation != self.generation || !matches!(self.mode, Mode::Resyncing { .. }) {
            return None;
        }
        let (done, rx) = oneshot::channel();
        self.pending.push_back(Pending {
            seq,
            offset,
            length,
            enqueued: now,
            kind: PendingKind::Resync(done),
        });
        if let Some(link) = &self.link {
            let _ = link.send(LinkItem::Deferred { seq, offset, data });
        }
        Some(rx)
    }

    /// Whether link `generation` is resyncing.
    pub fn resyncing(&self, generation: u64) -> bool {
        generation == self.generation && matches!(self.mode, Mode::Resyncing { .. })
    }

    /// The resync finished on link `generation` (the dirty map is empty): replicate, and complete the
    /// writes held before the resume.
    pub fn resync_done(&mut self, generation: u64) {
        if !self.resyncing(generation) || self.dirty.dirty_bytes() != 0 {
            return;
        }
        self.mode = Mode::Replicating;
        self.complete_held(&Ok(()));
        self.changed();
        drop(self.persist());
    }

    /// The secondary acknowledged every sequence up to `seq` on link `generation`.
    pub fn acked(&mut self, generation: u64, seq: u64) -> Result<(), CopyError> {
        if generation != self.generation || !self.mode.copies() {
            return Ok(());
        }
        if seq >= self.next_seq || self.last_acked.is_some_and(|last| seq < last) {
            return Err(CopyError::Protocol(format!(
                "ack for sequence {seq} (next {}, last acked {:?})",
                self.next_seq, self.last_acked
            )));
        }
        self.last_acked = Some(seq);
        while self.pending.front().is_some_and(|p| p.seq <= seq) {
            if let Some(p) = self.pending.pop_front() {
                match p.kind {
                    PendingKind::Write(done) => {
                        let _ = done.send(Ok(()));
                    }
                    PendingKind::Resync(done) => {
                        self.dirty.clear(p.offset, p.length);
                        let _ = done.send(());
                    }
                }
            }
        }
        Ok(())
    }

    /// When the oldest write still waiting for the secondary entered the queue.
    pub fn oldest_pending(&self) -> Option<Instant> {
        self.pending.front().map(|p| p.enqueued)
    }

    /// Link `generation` failed: hold everything in flight and everything after it. `wall_now` is when,
    /// for the failure's report.
    pub fn link_failed(
        &mut self,
        generation: u64,
        error: &CopyError,
        now: Instant,
        wall_now: SystemTime,
    ) {
        if generation != self.generation || !self.mode.copies() {
            return;
        }
        let first_seq = self.pending.front().map_or(self.next_seq, |p| p.seq);
        let since = wall_now;
        self.close_link(now);
        if self.outside_groups && self.group.is_empty() {
            // No group to freeze: primary-only, changes tracked; the writes in flight complete once the
            // map on disk covers them. Resynchronised when the secondary answers again.
            self.mode = Mode::Running { epoch: self.epoch };
            self.effects.push(Effect::ProbeSecondary);
        } else {
            self.mode = Mode::Held {
                first_seq,
                error: error.to_string(),
                since,
            };
        }
        self.effects
            .push(Effect::Event(Event::CopyFailed(CopyFailed {
                volume: self.volume.clone(),
                sequence: first_seq,
                group_uid: self.group.clone(),
                epoch_known: self.epoch,
                error: error.to_string(),
                since,
            })));
        self.changed();
        drop(self.persist());
    }

    /// Fails held writes older than the hold timeout (the volume keeps holding), and clears the activity
    /// map of a volume idle in sync.
    pub fn expire_holds(&mut self, now: Instant) {
        self.clear_activity_when_idle(now);
        let timeout = self.hold_timeout;
        let mut failed = 0u64;
        while self
            .held
            .front()
            .is_some_and(|h| now.saturating_duration_since(h.since) >= timeout)
        {
            if let Some(h) = self.held.pop_front() {
                let _ = h.done.send(Err(CopyError::HoldTimeout(timeout)));
                failed += 1;
            }
        }
        if failed > 0 {
            self.effects
                .push(Effect::Event(Event::HoldTimedOut(HoldTimedOut {
                    volume: self.volume.clone(),
                    failed_writes: failed,
                })));
        }
    }

    fn check_group(&self, group: &str) -> Result<(), DirectiveError> {
        if !self.has_secondary {
            return Err(DirectiveError::NotReplicated(self.volume.clone()));
        }
        if group.is_empty() || group != self.group {
            return Err(DirectiveError::WrongGroup {
                volume: self.volume.clone(),
                actual: self.group.clone(),
                named: group.to_owned(),
            });
        }
        Ok(())
    }

    fn position(&self) -> (u64, Option<Stage>) {
        (self.epoch, self.stage)
    }

    /// Suspends at `epoch`: closes the send queue and holds every write until a release at exactly
    /// `epoch` (or a resume). Returns the persist completion to await before answering, or `None` when
    /// the directive is stale or a duplicate (nothing changed).
    pub fn suspend(
        &mut self,
        group: &str,
        epoch: u64,
        fail_safe: bool,
        now: Instant,
    ) -> Result<Option<oneshot::Receiver<Result<(), CopyError>>>, DirectiveError> {
        self.check_group(group)?;
        let live = if self.mode == Mode::Unconfirmed {
            &self.restored
        } else {
            &self.mode
        };
        let already = match live {
            Mode::Suspended { epoch: at, .. } => *at >= epoch,
            _ => false,
        };
        let stale = if fail_safe {
            // The fail-safe suspends at the epoch it last saw, even after that epoch's release.
            epoch < self.epoch
        } else {
            (epoch, Some(Stage::Freeze)) < self.position()
        };
        if stale || (already && self.suspension_durable(epoch)) {
            return Ok(None);
        }
        if already {
            // Suspended in memory, but the suspension or the map covering its held writes is not on
            // disk yet (its write failed, or is under way): write it again before answering.
            return Ok(Some(self.persist()));
        }
        self.abandon_release();
        self.close_link(now);
        if self.stage.is_none() || (epoch, Some(Stage::Freeze)) > self.position() {
            self.epoch = epoch;
            self.stage = Some(Stage::Freeze);
        }
        if self.broken_ack_while_suspended {
            self.complete_held(&Ok(()));
        }
        let mode = Mode::Suspended { epoch, fail_safe };
        if self.mode == Mode::Unconfirmed {
            self.restored = mode;
        } else {
            self.mode = mode;
            self.changed();
        }
        Ok(Some(self.persist()))
    }

    /// Releases at exactly `epoch` once the state saying so — whose dirty map covers the held writes —
    /// is on disk: until then the volume stays suspended at `(epoch, Freeze)` and holds; then held writes
    /// complete (primary-only) and later writes run primary-only. If the write fails, the returned
    /// completion fails and the volume is still suspended, so a retry writes it again. `None`: a
    /// duplicate of a release already on disk.
    pub fn release(
        &mut self,
        group: &str,
        epoch: u64,
    ) -> Result<Option<oneshot::Receiver<Result<(), CopyError>>>, DirectiveError> {
        self.check_group(group)?;
        self.check_not_fenced("release")?;
        match self.mode {
            // Suspended at exactly `epoch` and still at its freeze: what the write of the release
            // waits for (a volume whose epoch moved on without a new suspension would never get there).
            Mode::Suspended {
                epoch: at,
                fail_safe: false,
            } if at == epoch && self.position() == (epoch, Some(Stage::Freeze)) => {}
            Mode::Running { epoch: at }
                if at == epoch && self.position() == (epoch, Some(Stage::Release)) =>
            {
                return Ok(None);
            }
            ref other => {
                return Err(DirectiveError::Refused(format!(
                    "release at epoch {epoch} needs the volume suspended at exactly {epoch} \
                     (not by the fail-safe); it is {other:?} at epoch {} stage {:?}",
                    self.epoch, self.stage
                )));
            }
        }
        let (done, rx) = oneshot::channel();
        match &mut self.releasing {
            Some(r) if r.epoch == epoch => r.waiters.push(done),
            _ => {
                self.abandon_release();
                self.releasing = Some(Releasing {
                    epoch,
                    waiters: vec![done],
                });
            }
        }
        self.effects.push(Effect::Persist);
        Ok(Some(rx))
    }

    /// Resumes at `epoch`: copies the dirty regions, then replicates synchronously. `None`: stale or a
    /// duplicate.
    pub fn resume(
        &mut self,
        group: &str,
        epoch: u64,
        now: Instant,
    ) -> Result<Option<oneshot::Receiver<Result<(), CopyError>>>, DirectiveError> {
        self.check_group(group)?;
        self.check_not_fenced("resume")?;
        if self.mode == Mode::Unconfirmed {
            return Err(DirectiveError::Refused(
                "the volume is not confirmed yet".into(),
            ));
        }
        if (epoch, Some(Stage::Resume)) <= self.position() {
            return Ok(None);
        }
        if let Mode::Suspended {
            epoch: at,
            fail_safe: true,
        } = self.mode
            && epoch <= at
        {
            return Err(DirectiveError::Refused(format!(
                "a fail-safe suspension at epoch {at} is lifted only at a higher epoch"
            )));
        }
        self.start_resync(epoch, now);
        self.stage = Some(Stage::Resume);
        Ok(Some(self.persist()))
    }

    fn start_resync(&mut self, epoch: u64, now: Instant) {
        self.abandon_release();
        if self.mode.copies() {
            // Restart on a fresh link so the resync's ordering is simple.
            self.close_link(now);
            self.mode = Mode::Running { epoch };
        }
        self.epoch = epoch;
        self.enter(Mode::Resyncing { epoch });
    }

    /// Whether the volume runs primary-only outside every group, waiting for its secondary.
    pub fn awaiting_secondary(&self) -> bool {
        self.outside_groups && self.group.is_empty() && matches!(self.mode, Mode::Running { .. })
    }

    /// The secondary of a volume running primary-only outside every group answers again: resynchronise
    /// and replicate. Does nothing once the volume is in a group or copying.
    pub fn secondary_answers(&mut self, now: Instant) {
        if self.awaiting_secondary() {
            self.start_resync(self.epoch, now);
            drop(self.persist());
        }
    }

    /// Sets the hold timeout.
    pub fn set_hold_timeout(&mut self, timeout: Duration) {
        self.hold_timeout = timeout;
    }

    /// The sidecar's confirmation / configuration: the volume's group and the point it read. An older
    /// point of the same group is ignored (and does not confirm). Returns the persist to await, if any.
    pub fn configure(
        &mut self,
        group: &str,
        epoch: u64,
        stage: Option<Stage>,
        now: Instant,
    ) -> Result<Option<oneshot::Receiver<Result<(), CopyError>>>, DirectiveError> {
        self.check_not_fenced("configure")?;
        if !self.has_secondary {
            self.group = group.to_owned();
            self.confirm();
            return Ok(None);
        }
        self.outside_groups = group.is_empty();
        if group.is_empty() {
            // In no group (or the group was deleted, rule 9): stop holding, resync, replicate; writes held
            // until now complete once the resync has copied them.
            let was_group = !self.group.is_empty();
            self.abandon_release();
            self.group.clear();
            self.epoch = 0;
            self.stage = None;
            self.confirm();
            if (was_group && self.mode != Mode::Replicating)
                || matches!(
                    self.mode,
                    Mode::Held { .. } | Mode::Suspended { .. } | Mode::Running { .. }
                )
            {
                self.start_resync(0, now);
            }
            return Ok(Some(self.persist()));
        }
        if group != self.group {
            // A new group: its epochs start a new order.
            self.abandon_release();
            self.group = group.to_owned();
            self.epoch = 0;
            self.stage = None;
        }
        let current = self.position();
        let asked = (epoch, stage);
        if asked < current {
            return Ok(None);
        }
        self.confirm();
        if asked == current {
            return Ok(Some(self.persist()));
        }
        match stage {
            None => {
                // The volume's epoch moves on: a release still being written for the old one will
                // never take effect, and its callers are told so rather than left waiting.
                self.abandon_release();
                self.epoch = epoch;
                Ok(Some(self.persist()))
            }
            Some(Stage::Freeze) => self.suspend(group, epoch, false, now),
            Some(Stage::Release) => {
                if self.mode
                    == (Mode::Suspended {
                        epoch,
                        fail_safe: false,
                    })
                {
                    self.release(group, epoch)
                } else {
                    // Released while this volume was away: suspend at the epoch (held, like every
                    // write since), then release once that is on disk, like any release.
                    self.abandon_release();
                    self.close_link(now);
                    self.epoch = epoch;
                    self.stage = Some(Stage::Freeze);
                    self.mode = Mode::Suspended {
                        epoch,
                        fail_safe: false,
                    };
                    self.changed();
                    self.release(group, epoch)
                }
            }
            Some(Stage::Resume) => {
                // A volume restarted while its group resumed is resumed by its confirmation, not by a
                // `Resume` its sidecar would precede with `KeepImage`: the secondary keeps the image of
                // `epoch` through the resync all the same (asked before the link that resync opens).
                let before = self.effects.len();
                let resumed = self.resume(group, epoch, now);
                if matches!(resumed, Ok(Some(_))) {
                    self.effects.insert(before, Effect::KeepImage { epoch });
                }
                resumed
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(seq: u64) -> Frame {
        Frame::Write {
            seq,
            offset: seq * 4096,
            data: Bytes::from_static(&[1u8; 16]),
        }
    }

    /// Found by `tests/fuzz_replicator_service.rs`: a Release call that hung for good.
    #[test]
    fn a_release_is_answered_or_refused_never_left_waiting() {
        let now = Instant::now();
        // A configuration naming a later epoch without a stage moves the epoch, not the suspension:
        // a release at the suspension's epoch is refused at once.
        let mut s = replicating();
        s.suspend("g", 4, false, now).unwrap();
        write_state(&mut s, true);
        s.configure("g", 5, None, now).unwrap();
        write_state(&mut s, true);
        assert!(matches!(
            s.release("g", 4),
            Err(DirectiveError::Refused(message)) if message.contains("stage")
        ));
        // A release accepted, then overtaken by such a configuration before its state was written, is
        // answered with an error.
        let mut s = replicating();
        s.suspend("g", 4, false, now).unwrap();
        write_state(&mut s, true);
        let mut release = s.release("g", 4).unwrap().expect("a release to write");
        s.configure("g", 5, None, now).unwrap();
        write_state(&mut s, true);
        assert!(matches!(release.try_recv(), Ok(Err(_))));
    }

    /// The simulator, before it modelled the volume's gate, let writes reach a restarted volume before its
    /// sidecar confirmed it: held and dirty, and the confirmation at the point it carried put it back to
    /// replicating with them still held — failed at the hold timeout, left on the primary alone.
    /// `Volume` gates I/O until the confirmation, but the state machine takes such writes: it now
    /// resynchronises them first and completes them once copied.
    #[test]
    fn writes_held_before_a_restarted_volume_was_confirmed_are_copied_then_completed() {
        let now = Instant::now();
        let mut before = replicating();
        let restored = write_state(&mut before, true);
        let mut s = restarted(restored);
        let CopyWait::Wait(mut held) = submit(&mut s) else {
            panic!("an unconfirmed volume holds its writes");
        };
        s.configure("g", 1, None, now).unwrap();
        assert!(
            matches!(s.mode(), Mode::Resyncing { .. }),
            "confirmed with a dirty write: {:?}",
            s.mode()
        );
        assert!(matches!(
            held.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        ));
        let generation = s.generation();
        let pieces = s.dirty().pieces(1024 * 1024, 1 << 30);
        assert_eq!(pieces, vec![(0, crate::dirty::CHUNK)]);
        let seq = s.next_seq();
        let (data_tx, data) = oneshot::channel();
        let _ = data_tx.send(Ok(Bytes::new()));
        let mut copied = s
            .submit_resync(generation, seq, 0, crate::dirty::CHUNK, data, now)
            .expect("the resync runs on the current link");
        s.acked(generation, seq).unwrap();
        assert!(copied.try_recv().is_ok());
        s.resync_done(generation);
        assert_eq!(s.mode(), &Mode::Replicating);
        assert!(matches!(held.try_recv(), Ok(Ok(()))));
    }

    /// A fenced volume refuses every write: `cover` records nothing, so the fence's report of what the
    /// old site wrote after the image (its dirty map) names only what landed.
    #[test]
    fn a_fenced_volume_records_nothing_for_a_write_it_refuses() {
        let mut s = replicating();
        s.suspend("g", 2, false, Instant::now()).unwrap();
        write_state(&mut s, true);
        drop(s.fence("g", 2, Instant::now()).unwrap());
        write_state(&mut s, true);
        assert!(s.cover(0, 4096).is_none());
        s.uncover();
        assert_eq!(s.dirty().dirty_bytes(), 0);
    }

    /// A volume restarted from `restored`, not confirmed yet.
    fn restarted(restored: Persisted) -> ReplState {
        ReplState::new(
            "v",
            true,
            Duration::from_secs(60),
            Some(restored),
            false,
            SystemTime::now(),
        )
    }

    /// A volume with a secondary, a 60 s hold timeout, nothing restored, not confirmed yet.
    fn unconfirmed() -> ReplState {
        ReplState::new(
            "v",
            true,
            Duration::from_secs(60),
            None,
            false,
            SystemTime::now(),
        )
    }

    fn replicating() -> ReplState {
        let mut s = unconfirmed();
        s.configure("g", 1, None, Instant::now()).unwrap();
        s.take_effects();
        s
    }

    fn submit(s: &mut ReplState) -> CopyWait {
        let seq = s.next_seq();
        s.submit(seq, seq * 4096, 4096, write(seq), Instant::now())
    }

    fn done(w: &mut CopyWait) -> Option<Result<(), CopyError>> {
        match w {
            CopyWait::Done(r) => Some(r.clone()),
            CopyWait::Wait(rx) => rx.try_recv().ok(),
        }
    }

    /// Writes the state as the persister does, successfully or not, and answers its waiters.
    fn write_state(s: &mut ReplState, ok: bool) -> Persisted {
        let (p, waiters, ticket) = s.take_persist();
        let result = if ok {
            s.persisted(ticket);
            Ok(())
        } else {
            let error = CopyError::Persist("disk full".into());
            s.persist_failed(&ticket, &error);
            Err(error)
        };
        for w in waiters {
            let _ = w.send(result.clone());
        }
        p
    }

    #[test]
    fn unconfirmed_holds_until_configured() {
        let mut s = unconfirmed();
        assert!(!s.confirmed());
        // An older confirmation of a restored state does not confirm.
        let restored = Persisted {
            group_uid: "g".into(),
            epoch: 5,
            stage: Some(Stage::Freeze),
            mode: "suspended".into(),
            fail_safe: false,
            hold_timeout_ms: 1000,
            dirty: vec![(0, 4096)],
            fenced: None,
            active: Vec::new(),
        };
        let mut r = restarted(restored);
        assert!(matches!(
            r.configure("g", 4, Some(Stage::Resume), Instant::now()),
            Ok(None)
        ));
        assert!(!r.confirmed());
        r.configure("g", 5, Some(Stage::Freeze), Instant::now())
            .unwrap();
        assert_eq!(
            r.mode(),
            &Mode::Suspended {
                epoch: 5,
                fail_safe: false
            }
        );
        assert!(r.dirty().is_dirty(0, 1));
        s.configure("", 0, None, Instant::now()).unwrap();
        assert!(s.confirmed());
    }

    #[test]
    fn copy_failure_holds_and_suspend_release_complete_them() {
        let mut s = replicating();
        let mut a = submit(&mut s);
        let mut b = submit(&mut s);
        let gen_ = s.generation;
        s.acked(gen_, 0).unwrap();
        assert_eq!(done(&mut a), Some(Ok(())));
        s.link_failed(
            gen_,
            &CopyError::Link("cut".into()),
            Instant::now(),
            SystemTime::now(),
        );
        assert!(matches!(s.mode(), Mode::Held { first_seq: 1, .. }));
        let mut c = submit(&mut s);
        assert_eq!(done(&mut b), None, "held, not failed");
        assert_eq!(done(&mut c), None);
        assert!(s.dirty().is_dirty(4096, 4096) && s.dirty().is_dirty(2 * 4096, 4096));
        // Release before suspend is refused; suspend; release at the wrong epoch is refused.
        assert!(s.release("g", 2).is_err());
        assert!(s.suspend("other", 2, false, Instant::now()).is_err());
        assert!(s.suspend("g", 2, false, Instant::now()).unwrap().is_some());
        assert!(
            s.suspend("g", 2, false, Instant::now()).unwrap().is_some(),
            "not on disk yet: written again"
        );
        write_state(&mut s, true);
        assert!(
            s.suspend("g", 2, false, Instant::now()).unwrap().is_none(),
            "duplicate"
        );
        assert!(
            s.suspend("g", 1, false, Instant::now()).unwrap().is_none(),
            "stale"
        );
        let mut d = submit(&mut s);
        assert!(s.release("g", 3).is_err());
        assert!(s.release("g", 1).is_err());
        assert!(s.release("g", 2).unwrap().is_some());
        assert_eq!(done(&mut b), None, "not before the persist");
        write_state(&mut s, true);
        for w in [&mut b, &mut c, &mut d] {
            assert_eq!(done(w), Some(Ok(())));
        }
        assert!(s.release("g", 2).unwrap().is_none(), "duplicate release");
        // Running: primary-only; a write to a chunk already dirty on disk completes at once, a newly
        // dirty one waits for a persist.
        let mut covered = submit(&mut s);
        assert_eq!(done(&mut covered), Some(Ok(())));
        let seq = s.next_seq();
        let mut e = s.submit(
            seq,
            5 * crate::dirty::CHUNK,
            4096,
            write(seq),
            Instant::now(),
        );
        assert_eq!(done(&mut e), None);
        write_state(&mut s, true);
        assert_eq!(done(&mut e), Some(Ok(())));
        // A stale suspend after the release changes nothing.
        assert!(s.suspend("g", 2, false, Instant::now()).unwrap().is_none());
    }

    #[test]
    fn hold_timeout_fails_held_writes_and_keeps_holding() {
        let mut s = replicating();
        s.set_hold_timeout(Duration::from_millis(10));
        let t0 = Instant::now();
        let mut a = submit(&mut s);
        let g = s.generation;
        s.link_failed(
            g,
            &CopyError::Timeout(Duration::from_secs(1)),
            t0,
            SystemTime::now(),
        );
        s.expire_holds(t0);
        assert_eq!(done(&mut a), None);
        s.expire_holds(t0 + Duration::from_millis(20));
        assert_eq!(
            done(&mut a),
            Some(Err(CopyError::HoldTimeout(Duration::from_millis(10))))
        );
        let mut b = submit(&mut s);
        assert_eq!(done(&mut b), None, "still holding after the timeout");
        assert!(matches!(s.mode(), Mode::Held { .. }));
    }

    #[test]
    fn fail_safe_is_lifted_only_at_a_higher_epoch() {
        let mut s = replicating();
        s.suspend("g", 3, true, Instant::now()).unwrap();
        assert!(s.release("g", 3).is_err());
        assert!(s.resume("g", 3, Instant::now()).is_err());
        assert!(s.suspend("g", 4, false, Instant::now()).unwrap().is_some());
        assert!(s.release("g", 4).unwrap().is_some());
    }

    #[test]
    fn resume_resyncs_then_replicates() {
        let mut s = replicating();
        let g = s.generation;
        let mut a = submit(&mut s);
        s.suspend("g", 2, false, Instant::now()).unwrap();
        s.take_effects();
        assert!(s.acked(g, 0).is_ok(), "an old link's ack is ignored");
        assert_eq!(done(&mut a), None);
        s.resume("g", 2, Instant::now()).unwrap();
        assert!(matches!(s.mode(), Mode::Resyncing { epoch: 2 }));
        let effects = s.take_effects();
        assert!(
            effects
                .iter()
                .any(|e| matches!(e, Effect::StartResync { .. }))
        );
        let g2 = s.generation;
        let (_tx, data) = oneshot::channel();
        let seq = s.next_seq();
        let mut chunk = s
            .submit_resync(g2, seq, 0, crate::dirty::CHUNK, data, Instant::now())
            .unwrap();
        s.acked(g2, seq).unwrap();
        assert!(chunk.try_recv().is_ok());
        assert_eq!(s.dirty().dirty_bytes(), 0);
        s.resync_done(g2);
        assert_eq!(s.mode(), &Mode::Replicating);
        assert_eq!(done(&mut a), Some(Ok(())));
        assert!(
            s.resume("g", 2, Instant::now()).unwrap().is_none(),
            "duplicate resume"
        );
    }

    #[test]
    fn leaving_the_group_resyncs_and_completes_held_writes_only_when_copied() {
        let mut s = replicating();
        let mut a = submit(&mut s);
        s.suspend("g", 2, false, Instant::now()).unwrap();
        s.configure("", 0, None, Instant::now()).unwrap();
        assert!(matches!(s.mode(), Mode::Resyncing { epoch: 0 }));
        assert_eq!(s.snapshot().group_uid, "");
        assert_eq!(
            done(&mut a),
            None,
            "not acknowledged before the resync copied it"
        );
        let g = s.generation();
        let (_tx, data) = oneshot::channel();
        let seq = s.next_seq();
        s.submit_resync(g, seq, 0, crate::dirty::CHUNK, data, Instant::now())
            .unwrap();
        s.acked(g, seq).unwrap();
        s.resync_done(g);
        assert_eq!(done(&mut a), Some(Ok(())));
        assert_eq!(s.mode(), &Mode::Replicating);
    }

    #[test]
    fn running_acknowledges_only_what_the_persisted_map_covers() {
        let mut s = replicating();
        s.suspend("g", 2, false, Instant::now()).unwrap();
        s.release("g", 2).unwrap();
        write_state(&mut s, true);
        // First write to a chunk waits for a persist; a second write to the same chunk before that
        // persist completes waits too.
        let mut a = s.submit(10, 0, 4096, write(10), Instant::now());
        let mut b = s.submit(11, 4096, 4096, write(11), Instant::now());
        assert_eq!(done(&mut a), None);
        assert_eq!(done(&mut b), None);
        let p = write_state(&mut s, true);
        assert_eq!(p.mode, "running");
        assert_eq!(p.dirty, vec![(0, crate::dirty::CHUNK)]);
        assert_eq!(done(&mut a), Some(Ok(())));
        assert_eq!(done(&mut b), Some(Ok(())));
        // Now covered on disk: immediate.
        let mut c = s.submit(12, 8192, 4096, write(12), Instant::now());
        assert_eq!(done(&mut c), Some(Ok(())));
    }

    #[test]
    fn a_release_takes_effect_only_once_its_state_is_written() {
        let mut s = replicating();
        let mut a = submit(&mut s);
        s.suspend("g", 2, false, Instant::now()).unwrap();
        write_state(&mut s, true);
        let mut first = s.release("g", 2).unwrap().unwrap();
        assert!(matches!(s.mode(), Mode::Suspended { epoch: 2, .. }));
        // The state written says released at 2, and its map covers the held write.
        let p = write_state(&mut s, false);
        assert_eq!(
            (p.mode.as_str(), p.stage),
            ("running", Some(Stage::Release))
        );
        assert_eq!(p.dirty.first().map(|&(offset, _)| offset), Some(0));
        assert!(matches!(first.try_recv(), Ok(Err(CopyError::Persist(_)))));
        assert_eq!(
            s.mode(),
            &Mode::Suspended {
                epoch: 2,
                fail_safe: false
            },
            "still suspended after the failed write"
        );
        assert_eq!(s.snapshot().stage, Some(Stage::Freeze));
        assert_eq!(done(&mut a), None, "held");
        // A write arriving while the retry's state is being written is held, and covered by a later
        // write only.
        let mut retry = s
            .release("g", 2)
            .unwrap()
            .expect("written again, not a duplicate");
        let (_, waiters, ticket) = s.take_persist();
        let mut b = s.submit(9, 9 * crate::dirty::CHUNK, 4096, write(9), Instant::now());
        s.persisted(ticket);
        for w in waiters {
            let _ = w.send(Ok(()));
        }
        assert_eq!(retry.try_recv(), Ok(Ok(())));
        assert_eq!(s.mode(), &Mode::Running { epoch: 2 });
        assert_eq!(done(&mut a), Some(Ok(())));
        assert_eq!(done(&mut b), None, "its chunk is not on disk yet");
        write_state(&mut s, false);
        assert_eq!(done(&mut b), None, "still not on disk");
        write_state(&mut s, true);
        assert_eq!(done(&mut b), Some(Ok(())));
    }

    #[test]
    fn a_repeated_suspend_is_done_only_once_it_is_on_disk() {
        let mut s = replicating();
        let mut first = s.suspend("g", 2, false, Instant::now()).unwrap().unwrap();
        write_state(&mut s, false);
        assert!(matches!(first.try_recv(), Ok(Err(_))));
        assert!(
            matches!(s.mode(), Mode::Suspended { epoch: 2, .. }),
            "holds"
        );
        let mut again = s
            .suspend("g", 2, false, Instant::now())
            .unwrap()
            .expect("written again, not already done");
        let p = write_state(&mut s, true);
        assert_eq!((p.mode.as_str(), p.epoch), ("suspended", 2));
        assert_eq!(again.try_recv(), Ok(Ok(())));
        assert!(s.suspend("g", 2, false, Instant::now()).unwrap().is_none());
        // A held write to a new chunk: not "already done" until the map covering it is written.
        let _held = submit(&mut s);
        assert!(s.suspend("g", 2, false, Instant::now()).unwrap().is_some());
        write_state(&mut s, true);
        assert!(s.suspend("g", 2, false, Instant::now()).unwrap().is_none());
    }

    /// A copied write lands on the primary before its copy is acknowledged: its chunk must be in the
    /// activity map on disk first, and a restart from that state resynchronises the chunk.
    #[test]
    fn a_copied_write_lands_only_once_its_chunk_is_in_the_activity_map_on_disk() {
        let t0 = Instant::now();
        let mut s = replicating();
        let mut wait = s
            .cover(0, 4096)
            .expect("a new chunk waits for a state write");
        assert!(
            wait.try_recv().is_err(),
            "answered before the state was written"
        );
        let on_disk = write_state(&mut s, true);
        assert!(matches!(wait.try_recv(), Ok(Ok(()))));
        assert_eq!(on_disk.active, vec![(0, ACTIVE_EXTENT)]);
        s.uncover();
        let seq = s.next_seq();
        let mut copy = s.submit(seq, 0, 4096, write(seq), t0);
        // The same extent again: covered already, no state write.
        assert!(s.cover(ACTIVE_EXTENT - 4096, 4096).is_none());
        s.uncover();

        // Killed with the write in flight: the restarted volume takes the active chunk as dirty.
        let restarted = ReplState::new(
            "v",
            true,
            Duration::from_secs(60),
            Some(on_disk),
            true,
            SystemTime::now(),
        );
        assert!(
            matches!(restarted.mode(), Mode::Resyncing { .. }),
            "{:?}",
            restarted.mode()
        );
        assert_eq!(restarted.dirty().regions(), vec![(0, ACTIVE_EXTENT)]);

        // Acknowledged and idle long enough, the map is cleared (and written so).
        s.acked(s.generation(), seq).unwrap();
        assert!(matches!(done(&mut copy), Some(Ok(()))));
        s.expire_holds(t0 + ACTIVE_IDLE / 2);
        assert_eq!(write_state(&mut s, true).active.len(), 1, "not idle yet");
        s.expire_holds(t0 + ACTIVE_IDLE);
        assert!(write_state(&mut s, true).active.is_empty());
        assert!(
            s.cover(0, 4096).is_some(),
            "a cleared chunk is covered again"
        );
    }

    /// A state disk that fails: a copied write to an uncovered chunk fails rather than land unrecorded.
    #[test]
    fn a_copied_write_whose_chunk_cannot_be_recorded_fails() {
        let mut s = replicating();
        let mut wait = s.cover(0, 4096).expect("a state write");
        write_state(&mut s, false);
        assert!(matches!(wait.try_recv(), Ok(Err(CopyError::Persist(_)))));
    }

    /// Outside the copying modes the dirty map records writes, on disk before they land (the simulator,
    /// seed 237: a suspended volume's write landed, its state write failed, the replicator was killed,
    /// and nothing recorded that its secondary lacked it); no activity map.
    #[test]
    fn a_suspended_volume_records_a_write_in_its_dirty_map_before_it_lands() {
        let mut s = replicating();
        s.suspend("g", 2, false, Instant::now()).unwrap();
        write_state(&mut s, true);
        let mut covered = s.cover(0, 4096).expect("the dirty map to write first");
        let on_disk = write_state(&mut s, true);
        assert!(matches!(covered.try_recv(), Ok(Ok(()))));
        assert_eq!(on_disk.dirty, vec![(0, crate::dirty::CHUNK)]);
        assert!(on_disk.active.is_empty());
        s.uncover();
        // The chunk is on disk: the next write there waits for nothing.
        assert!(s.cover(4096, 4096).is_none());
        s.uncover();
        // A state write that fails fails the write before it lands.
        let mut failed = s
            .cover(crate::dirty::CHUNK, 4096)
            .expect("a new chunk to write");
        write_state(&mut s, false);
        assert!(matches!(failed.try_recv(), Ok(Err(_))));
        s.uncover();
    }
}
