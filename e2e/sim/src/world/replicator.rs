//! The replicators: each primary volume runs the reference replicator's real hold state machine
//! ([`lockstep_replicator::hold::ReplState`]); what the replicator process does around it is modelled
//! here, as `volume.rs` does it — the state file (a write that can fail), the resync driver, the
//! replication link (in order, acknowledged up to a sequence, cut without a word), the copy timeout,
//! the events the sidecar subscribes to, and crashes: a replicator killed and restarted from its state
//! file, every write it had not answered failed. The secondary is a model: the writes it holds, and the
//! image it keeps through a resync.
//!
//! Each write has a block of its own, so a volume's primary and secondary are sets of writes; the dirty
//! map's chunks (64 KiB) hold 16 blocks, so a resync copies neighbours along.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use lockstep_api::proto::replicator::v1 as pb;
use lockstep_replicator::CopyError;
use lockstep_replicator::events::Event;
use lockstep_replicator::hold::{self, CopyWait, Effect, LinkItem, Persisted, ReplState};
use lockstep_replicator::wire::Frame;
use lockstep_sidecar::enforce::{Carried, Input, Operation};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::oneshot::{self, error::TryRecvError};

use super::{Ms, Mutant, Step, UID, Violation, World};

/// The bytes of one write: write `w` is at `w × BLOCK` on its volume.
const BLOCK: u64 = 4096;
/// A volume's size, larger than any run writes.
const VOLUME_SIZE: u64 = 1 << 40;
/// How long a copy may wait for the secondary's acknowledgement before the link counts as failed.
const COPY_TIMEOUT: Ms = 150;
/// How often a replicator checks its copy timeout and its held writes' hold timeout.
pub(super) const REPLICATOR_TICK: Ms = 50;
/// The resync driver's piece and window, as `volume.rs` has them.
const RESYNC_PIECE: u64 = 1024 * 1024;
const RESYNC_WINDOW: usize = 16;
/// Wall-clock time at simulated time 0.
const WALL_START_MS: u64 = 1_700_000_000_000;

/// One member volume: its primary (the real hold machine, in a modelled replicator) and its secondary.
#[derive(Debug)]
pub(super) struct Volume {
    pub(super) cluster: usize,
    /// The sidecar (node) serving it.
    pub(super) node: usize,
    pub(super) handle: String,
    /// The replicator's state machine; `None` while the replicator is down.
    pub(super) repl: Option<ReplState>,
    /// The state file: what the last successful state write put on disk.
    pub(super) state_file: Option<Persisted>,
    /// State writes fail until then.
    pub(super) state_writes_fail_until: Ms,
    /// Bumped when the replicator crashes: what its old incarnation sent is ignored.
    pub(super) incarnation: u64,
    /// The writes on the primary's disk, by offset.
    pub(super) primary: BTreeMap<u64, usize>,
    /// Writes waiting at the volume's gate: I/O waits until the sidecar confirms the volume.
    gated: Vec<usize>,
    /// Writes waiting for their outcome.
    pub(super) waits: Vec<(usize, oneshot::Receiver<Result<(), CopyError>>)>,
    pub(super) link_up: bool,
    /// Bumped at every link cut: frames on the wire then are lost.
    pub(super) cuts: u64,
    /// The current link's send queue.
    link: Option<(u64, UnboundedReceiver<LinkItem>)>,
    /// When the last frame and the last acknowledgement arrive (links are in order).
    last_arrival: Ms,
    last_ack: Ms,
    /// The resync round under way: its link generation and its pieces' completions.
    resync: Option<(u64, Vec<oneshot::Receiver<()>>)>,
    /// The writes each queued resync frame carries (read from the primary when queued), by sequence.
    resync_writes: BTreeMap<u64, Vec<usize>>,
    /// The image the secondary is asked to keep when a link opens (the replicator's memory).
    keep: Option<u64>,
    /// Secondary: the writes it holds.
    pub(super) image: BTreeSet<usize>,
    /// Secondary: the image kept through a resync.
    pub(super) kept: Option<BTreeSet<usize>>,
}

impl Volume {
    pub(super) fn new(cluster: usize, node: usize, handle: String) -> Self {
        Self {
            cluster,
            node,
            handle,
            repl: None,
            state_file: None,
            state_writes_fail_until: 0,
            incarnation: 0,
            primary: BTreeMap::new(),
            gated: Vec::new(),
            waits: Vec::new(),
            link_up: true,
            cuts: 0,
            link: None,
            last_arrival: 0,
            last_ack: 0,
            resync: None,
            resync_writes: BTreeMap::new(),
            keep: None,
            image: BTreeSet::new(),
            kept: None,
        }
    }

    /// The replication connection breaks: nothing more goes on it.
    pub(super) fn drop_link(&mut self) {
        self.link = None;
    }

    /// Where the volume is, as the replicator would say: its live state, or its state file while the
    /// replicator is down.
    pub(super) fn snapshot(&self) -> Option<hold::Snapshot> {
        self.repl.as_ref().map(ReplState::snapshot)
    }

    /// What the sidecar reads of the volume: the replicator's status through the protocol's
    /// `VolumeState`, as the real sidecar converts it.
    pub(super) fn carried(&self) -> Option<Carried> {
        let status = lockstep_replicator::VolumeStatus {
            name: self.handle.clone(),
            replication: self.snapshot()?,
            secondary: "secondary".into(),
            kept_image: None,
            fenced: None,
        };
        Some(lockstep_sidecar::replicator::carried(
            &lockstep_replicator::control::state_to_pb(&status),
        ))
    }

    /// Whether nothing the primary holds can reach the secondary before a release at `epoch`: suspended
    /// (or released) at it or later, or failing closed (down, or unconfirmed) at it or later.
    pub(super) fn frozen_at(&self, epoch: u64) -> bool {
        match &self.repl {
            Some(repl) => {
                let s = repl.snapshot();
                let at_or_after = (s.epoch, s.stage) >= (epoch, Some(hold::Stage::Freeze));
                match s.mode {
                    hold::Mode::Suspended { epoch: at, .. } => at >= epoch,
                    hold::Mode::Running { .. } | hold::Mode::Unconfirmed => at_or_after,
                    _ => false,
                }
            }
            None => self
                .state_file
                .as_ref()
                .is_some_and(|p| (p.epoch, p.stage) >= (epoch, Some(hold::Stage::Freeze))),
        }
    }
}

impl World {
    /// The monotonic clock the hold machine is given.
    fn instant(&self) -> Instant {
        self.clock_base + Duration::from_millis(self.now)
    }

    fn wall(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(WALL_START_MS + self.now)
    }

    /// Starts (or restarts) the volume's replicator from its state file: unconfirmed, I/O waiting for
    /// the sidecar.
    pub(super) fn replicator_starts(&mut self, volume: usize) -> Result<(), Box<Violation>> {
        let wall = self.wall();
        let hold_timeout = Duration::from_millis(self.config.hold_timeout_ms);
        let mutant = self.config.mutant;
        let v = &mut self.volumes[volume];
        let mut repl = ReplState::new(
            &v.handle,
            true,
            hold_timeout,
            v.state_file.clone(),
            false,
            wall,
        );
        match mutant {
            Some(Mutant::AckWhileSuspended) => repl.break_ack_while_suspended(),
            Some(Mutant::WriteLandsUncovered) => repl.break_activity_map(),
            _ => {}
        }
        v.repl = Some(repl);
        self.drive(volume)
    }

    /// The node's replicator starts again (each of its volumes that is down).
    pub(super) fn replicators_up(&mut self, sidecar: usize) -> Result<(), Box<Violation>> {
        for volume in self.sidecars[sidecar].volumes.clone() {
            if self.volumes[volume].repl.is_none() {
                self.replicator_starts(volume)?;
            }
        }
        Ok(())
    }

    /// The replicator is killed: every write it had not answered fails (the application sees an I/O
    /// error), its queues and memory are gone; its disk (the primary, the state file) stays.
    pub(super) fn replicator_crashes(&mut self, volume: usize) -> Result<(), Box<Violation>> {
        let v = &mut self.volumes[volume];
        v.repl = None;
        v.incarnation += 1;
        v.link = None;
        v.resync = None;
        v.resync_writes.clear();
        v.keep = None;
        // The application's requests waiting at the gate end with the process too.
        for write in std::mem::take(&mut v.gated) {
            self.completed(write, false)?;
        }
        self.settle_writes(volume)
    }

    /// The application writes `write` to `volume`, through the replicator as `Volume::ordered` does:
    /// the activity map covers the block before it lands, then the write is submitted.
    pub(super) fn primary_write(
        &mut self,
        volume: usize,
        write: usize,
    ) -> Result<(), Box<Violation>> {
        let offset = write as u64 * BLOCK;
        let now = self.instant();
        let Some(repl) = self.volumes[volume].repl.as_mut() else {
            // No replicator serves the volume: the application's I/O fails.
            return self.completed(write, false);
        };
        if *repl.mode() == hold::Mode::Unconfirmed {
            // `Volume::gate`: nothing lands before the sidecar confirms the volume.
            self.volumes[volume].gated.push(write);
            return Ok(());
        }
        let cover = repl.cover(offset, BLOCK);
        self.drive(volume)?;
        let covered = match cover {
            None => true,
            Some(mut rx) => matches!(rx.try_recv(), Ok(Ok(()))),
        };
        let v = &mut self.volumes[volume];
        let Some(repl) = v.repl.as_mut() else {
            return self.completed(write, false);
        };
        if !covered {
            // The state write the block waited for failed: nothing lands, the write fails.
            repl.uncover();
            return self.completed(write, false);
        }
        v.primary.insert(offset, write);
        let seq = repl.next_seq();
        if self.tracing {
            let line = format!(
                "  write {write} lands on c{}/{} as sequence {seq} ({:?})",
                v.cluster,
                v.handle,
                repl.mode()
            );
            self.note(line);
        }
        let v = &mut self.volumes[volume];
        let Some(repl) = v.repl.as_mut() else {
            return self.completed(write, false);
        };
        let frame = Frame::Write {
            seq,
            offset,
            data: Bytes::new(),
        };
        let wait = repl.submit(seq, offset, BLOCK, frame, now);
        repl.uncover();
        match wait {
            CopyWait::Done(result) => {
                self.drive(volume)?;
                self.completed(write, result.is_ok())
            }
            CopyWait::Wait(rx) => {
                v.waits.push((write, rx));
                self.drive(volume)
            }
        }
    }

    /// Carries out what the state machine asked for, ships the frames it queued and answers the writes
    /// it decided, until it asks for nothing more.
    pub(super) fn drive(&mut self, volume: usize) -> Result<(), Box<Violation>> {
        while let Some(repl) = self.volumes[volume].repl.as_mut() {
            let effects = repl.take_effects();
            let resynced = self.resync_round(volume);
            if effects.is_empty() && !resynced {
                break;
            }
            for effect in effects {
                match effect {
                    Effect::StartLink { generation, rx, .. } => {
                        self.volumes[volume].link = Some((generation, rx));
                        self.send_hello(volume);
                    }
                    // The resync rounds run while the state machine says it resyncs (below).
                    Effect::StartResync { .. } | Effect::StateChanged => {}
                    Effect::Persist => self.write_state(volume),
                    Effect::KeepImage { epoch } => {
                        // `Volume::set_keep_image`.
                        self.volumes[volume].keep = Some(epoch);
                    }
                    Effect::Event(event) => self.replicator_event(volume, event),
                    Effect::ProbeSecondary => {
                        let incarnation = self.volumes[volume].incarnation;
                        self.at(
                            100,
                            Step::ProbeSecondary {
                                volume,
                                incarnation,
                            },
                        );
                    }
                }
            }
        }
        self.ship_frames(volume);
        self.settle_writes(volume)?;
        let confirmed = self.volumes[volume]
            .repl
            .as_ref()
            .is_some_and(|repl| *repl.mode() != hold::Mode::Unconfirmed);
        if confirmed && !self.volumes[volume].gated.is_empty() {
            // The gate opens: the waiting writes go on, in order.
            for write in std::mem::take(&mut self.volumes[volume].gated) {
                self.primary_write(volume, write)?;
            }
        }
        self.drop_kept_images_when_in_sync()
    }

    /// The replicator's persister: writes the state file, or fails to.
    fn write_state(&mut self, volume: usize) {
        let failing = self.now < self.volumes[volume].state_writes_fail_until;
        let v = &mut self.volumes[volume];
        let Some(repl) = v.repl.as_mut() else {
            return;
        };
        let (state, waiters, ticket) = repl.take_persist();
        let result = if failing {
            let error = CopyError::Persist("the state file could not be written".into());
            repl.persist_failed(&ticket, &error);
            Err(error)
        } else {
            v.state_file = Some(state);
            repl.persisted(ticket);
            Ok(())
        };
        if failing {
            self.fault("replicator state write failed");
        }
        for waiter in waiters {
            let _ = waiter.send(result.clone());
        }
    }

    /// An event on the replicator's stream reaches the node's sidecar (if it listens) a little later.
    fn replicator_event(&mut self, volume: usize, event: Event) {
        let input = match event {
            Event::CopyFailed(failed) => Input::CopyFailed {
                volume: failed.volume,
                sequence: failed.sequence,
                error: failed.error,
                since_unix_ms: unix_ms(failed.since),
            },
            Event::HoldTimedOut(timed_out) => Input::HoldTimedOut {
                volume: timed_out.volume,
                failed_writes: timed_out.failed_writes,
                at_unix_ms: unix_ms(self.wall()),
            },
            Event::StateChanged(_) => return,
        };
        let sidecar = self.volumes[volume].node;
        let incarnation = self.sidecars[sidecar].incarnation;
        self.at(
            1,
            Step::ReplicatorEvent {
                sidecar,
                incarnation,
                input,
            },
        );
    }

    /// The resync driver of `volume.rs`: while the volume resyncs on its current link, copy the dirty
    /// pieces (up to a window at a time), then, once the map is empty, say the resync is done. True when
    /// it did something.
    fn resync_round(&mut self, volume: usize) -> bool {
        let now = self.instant();
        let Volume {
            repl,
            primary,
            resync,
            resync_writes,
            ..
        } = &mut self.volumes[volume];
        let Some(repl) = repl.as_mut() else {
            return false;
        };
        let generation = repl.generation();
        if !repl.resyncing(generation) {
            *resync = None;
            return false;
        }
        if let Some((at, pieces)) = resync
            && *at == generation
        {
            pieces.retain_mut(|done| matches!(done.try_recv(), Err(TryRecvError::Empty)));
            if !pieces.is_empty() {
                return false;
            }
        }
        let pieces = repl.dirty().pieces(RESYNC_PIECE, VOLUME_SIZE);
        if pieces.is_empty() {
            *resync = None;
            repl.resync_done(generation);
            return true;
        }
        let mut waits = Vec::new();
        for (offset, length) in pieces.into_iter().take(RESYNC_WINDOW) {
            let seq = repl.next_seq();
            let writes: Vec<usize> = primary
                .range(offset..offset.saturating_add(length))
                .map(|(_, write)| *write)
                .collect();
            let (data_tx, data) = oneshot::channel();
            let _ = data_tx.send(Ok(Bytes::new()));
            resync_writes.insert(seq, writes);
            match repl.submit_resync(generation, seq, offset, length, data, now) {
                Some(done) => waits.push(done),
                None => break,
            }
        }
        *resync = Some((generation, waits));
        true
    }

    /// When something put on a link now arrives: a little later, and never before what went before it
    /// (`after`): links deliver in order.
    fn on_the_wire(&mut self, after: Ms) -> Ms {
        let delay = self.rng.between(1, 20);
        (self.now + delay).max(after)
    }

    /// A new link's hello goes first: it asks the secondary to keep its image before anything lands.
    fn send_hello(&mut self, volume: usize) {
        let v = &mut self.volumes[volume];
        if !v.link_up {
            v.drop_link();
            return;
        }
        let (cuts, keep) = (v.cuts, v.keep);
        let at = self.on_the_wire(self.volumes[volume].last_arrival);
        self.volumes[volume].last_arrival = at;
        self.at_time(at, Step::HelloArrives { volume, cuts, keep });
    }

    /// The hello reaches the secondary: it keeps its image if asked and it keeps none.
    pub(super) fn hello_arrives(
        &mut self,
        volume: usize,
        cuts: u64,
        keep: Option<u64>,
    ) -> Result<(), Box<Violation>> {
        let v = &mut self.volumes[volume];
        if v.cuts != cuts || !v.link_up || keep.is_none() || v.kept.is_some() {
            return Ok(());
        }
        v.kept = Some(v.image.clone());
        self.recompute_image()
    }

    /// Puts the frames the state machine queued on the wire, in order: lost if the link is cut.
    fn ship_frames(&mut self, volume: usize) {
        let mut frames = Vec::new();
        let v = &mut self.volumes[volume];
        let Some((generation, rx)) = v.link.as_mut() else {
            return;
        };
        let generation = *generation;
        while let Ok(item) = rx.try_recv() {
            let (seq, writes) = match item {
                LinkItem::Frame(Frame::Write { seq, offset, .. }) => {
                    (seq, v.primary.get(&offset).copied().into_iter().collect())
                }
                LinkItem::Frame(Frame::Trim { seq, .. }) => (seq, Vec::new()),
                LinkItem::Deferred { seq, .. } => {
                    (seq, v.resync_writes.remove(&seq).unwrap_or_default())
                }
                LinkItem::Frame(_) => continue,
            };
            frames.push((seq, writes));
        }
        if !v.link_up {
            // Lost: the connection is broken, and a link that lost a frame carries nothing more (its
            // writes wait for the copy timeout).
            v.drop_link();
            return;
        }
        let (incarnation, cuts) = (v.incarnation, v.cuts);
        for (seq, writes) in frames {
            let at = self.on_the_wire(self.volumes[volume].last_arrival);
            self.volumes[volume].last_arrival = at;
            self.at_time(
                at,
                Step::CopyArrives {
                    volume,
                    incarnation,
                    cuts,
                    generation,
                    seq,
                    writes,
                },
            );
        }
    }

    /// A frame reaches the secondary (unless its link was cut meanwhile): its writes land there, and
    /// its acknowledgement goes back.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn copy_arrives(
        &mut self,
        volume: usize,
        incarnation: u64,
        cuts: u64,
        generation: u64,
        seq: u64,
        writes: Vec<usize>,
    ) -> Result<(), Box<Violation>> {
        let v = &mut self.volumes[volume];
        if v.cuts != cuts || !v.link_up {
            return Ok(());
        }
        v.image.extend(writes.iter().copied());
        if v.kept.is_none() {
            for write in writes {
                self.onto_image(write)?;
            }
        }
        let at = self.on_the_wire(self.volumes[volume].last_ack);
        self.volumes[volume].last_ack = at;
        self.at_time(
            at,
            Step::CopyAcked {
                volume,
                incarnation,
                cuts,
                generation,
                seq,
            },
        );
        Ok(())
    }

    /// The secondary's acknowledgement of every sequence up to `seq` reaches the primary.
    pub(super) fn copy_acked(
        &mut self,
        volume: usize,
        incarnation: u64,
        cuts: u64,
        generation: u64,
        seq: u64,
    ) -> Result<(), Box<Violation>> {
        let v = &mut self.volumes[volume];
        if v.incarnation != incarnation || v.cuts != cuts || !v.link_up {
            return Ok(());
        }
        let Some(repl) = v.repl.as_mut() else {
            return Ok(());
        };
        if let Err(error) = repl.acked(generation, seq) {
            return Err(self.violation(format!(
                "{}'s replicator refused an in-order acknowledgement: {error}",
                self.volumes[volume].handle
            )));
        }
        self.drive(volume)
    }

    /// The replicator's timers: a copy unacknowledged for the copy timeout fails the link (every write
    /// held), and held writes older than the hold timeout fail.
    pub(super) fn replicator_tick(&mut self, volume: usize) -> Result<(), Box<Violation>> {
        let (now, wall) = (self.instant(), self.wall());
        let Some(repl) = self.volumes[volume].repl.as_mut() else {
            return Ok(());
        };
        let timeout = Duration::from_millis(COPY_TIMEOUT);
        if repl
            .oldest_pending()
            .is_some_and(|oldest| now.saturating_duration_since(oldest) >= timeout)
        {
            let generation = repl.generation();
            repl.link_failed(generation, &CopyError::Timeout(timeout), now, wall);
        }
        repl.expire_holds(now);
        self.drive(volume)
    }

    /// A volume running primary-only outside every group probes its secondary.
    pub(super) fn probe_secondary(
        &mut self,
        volume: usize,
        incarnation: u64,
    ) -> Result<(), Box<Violation>> {
        let now = self.instant();
        let v = &mut self.volumes[volume];
        if v.incarnation != incarnation {
            return Ok(());
        }
        let Some(repl) = v.repl.as_mut() else {
            return Ok(());
        };
        if !repl.awaiting_secondary() {
            return Ok(());
        }
        if v.link_up {
            repl.secondary_answers(now);
            self.drive(volume)
        } else {
            self.at(
                100,
                Step::ProbeSecondary {
                    volume,
                    incarnation,
                },
            );
            Ok(())
        }
    }

    /// Answers the writes whose outcome the state machine decided (a crashed replicator's all fail).
    fn settle_writes(&mut self, volume: usize) -> Result<(), Box<Violation>> {
        let mut done = Vec::new();
        self.volumes[volume]
            .waits
            .retain_mut(|(write, rx)| match rx.try_recv() {
                Ok(result) => {
                    done.push((*write, result.is_ok()));
                    false
                }
                Err(TryRecvError::Empty) => true,
                Err(TryRecvError::Closed) => {
                    done.push((*write, false));
                    false
                }
            });
        let copying = self.volumes[volume].snapshot().is_some_and(|s| {
            matches!(
                s.mode,
                hold::Mode::Replicating | hold::Mode::Resyncing { .. }
            )
        });
        for (write, ok) in done {
            // A write acknowledged while its volume copies was acknowledged as copied: its secondary
            // must hold it (a release, which acknowledges primary-only, leaves the volume running).
            if ok && copying && !self.volumes[volume].image.contains(&write) {
                return Err(self.violation(format!(
                    "write {write} was acknowledged as copied by {}, but its secondary does not hold it",
                    self.volumes[volume].handle
                )));
            }
            self.completed(write, ok)?;
        }
        Ok(())
    }

    /// Carries out one of the sidecar's operations on the node's replicator, as its `Replicator`
    /// service does (a resume first asks the secondaries to keep their image). Returns the volumes it
    /// failed for.
    pub(super) fn replicator_call(
        &mut self,
        sidecar: usize,
        operation: &Operation,
    ) -> Result<Vec<String>, Box<Violation>> {
        let mut failed = Vec::new();
        for handle in operation.volumes() {
            let Some(&volume) = self.sidecars[sidecar]
                .volumes
                .iter()
                .find(|&&v| self.volumes[v].handle == handle)
            else {
                failed.push(handle);
                continue;
            };
            let now = self.instant();
            let v = &mut self.volumes[volume];
            let Some(repl) = v.repl.as_mut() else {
                failed.push(handle);
                continue;
            };
            let answer = match operation {
                Operation::Suspend {
                    group_uid,
                    epoch,
                    fail_safe,
                    ..
                } => repl.suspend(group_uid, *epoch, *fail_safe, now),
                Operation::Release {
                    group_uid, epoch, ..
                } => repl.release(group_uid, *epoch),
                Operation::Resume {
                    group_uid, epoch, ..
                } => {
                    // The sidecar asks the secondaries to keep their image first (`KeepImage`).
                    v.keep = Some(*epoch);
                    repl.resume(group_uid, *epoch, now)
                }
                Operation::Configure {
                    group_uid,
                    epoch,
                    stage,
                    hold_timeout_ms,
                    ..
                } => {
                    if *hold_timeout_ms > 0 {
                        repl.set_hold_timeout(Duration::from_millis(*hold_timeout_ms));
                    }
                    // Through the protocol's stage, as the sidecar sends it and the replicator reads it.
                    let stage = match lockstep_sidecar::replicator::configure_stage(*epoch, *stage)
                    {
                        pb::Stage::Unspecified => None,
                        pb::Stage::Freeze => Some(hold::Stage::Freeze),
                        pb::Stage::Release => Some(hold::Stage::Release),
                        pb::Stage::Resume => Some(hold::Stage::Resume),
                    };
                    repl.configure(group_uid, *epoch, stage, now)
                }
            };
            self.drive(volume)?;
            let ok = match answer {
                Ok(None) => true,
                // The state write it waited for was carried out by `drive`.
                Ok(Some(mut rx)) => matches!(rx.try_recv(), Ok(Ok(()))),
                Err(_) => false,
            };
            if !ok {
                failed.push(handle);
            }
        }
        Ok(failed)
    }

    /// The secondaries drop the image they kept through a resync once every volume of the group
    /// replicates again with nothing left to copy (the operator decides this group-wide).
    fn drop_kept_images_when_in_sync(&mut self) -> Result<(), Box<Violation>> {
        if self.volumes.iter().all(|v| v.kept.is_none()) {
            return Ok(());
        }
        let in_sync = self.volumes.iter().all(|v| {
            v.snapshot().is_some_and(|s| {
                s.mode == hold::Mode::Replicating
                    && s.group_uid == UID
                    && s.dirty_bytes == 0
                    && s.held == 0
                    && s.pending == 0
            })
        });
        if in_sync {
            for v in &mut self.volumes {
                v.kept = None;
                v.keep = None;
            }
            self.recompute_image()?;
        }
        Ok(())
    }

    /// After the heal phase: every volume replicates with no write held, and its secondary holds every
    /// write on its primary that is not still on its way.
    pub(super) fn replicators_in_sync(&self) -> Result<(), Box<Violation>> {
        for v in &self.volumes {
            let Some(s) = v.snapshot() else {
                return Err(self.violation(format!(
                    "after the heal phase c{}/{}'s replicator is down",
                    v.cluster, v.handle
                )));
            };
            if s.mode != hold::Mode::Replicating || s.held > 0 {
                return Err(self.violation(format!(
                    "after the heal phase c{}/{} is {:?} holding {} writes",
                    v.cluster, v.handle, s.mode, s.held
                )));
            }
            let on_the_way: BTreeSet<usize> = v
                .waits
                .iter()
                .map(|(write, _)| *write)
                .chain(v.gated.iter().copied())
                .collect();
            if let Some(missing) = v
                .primary
                .values()
                .find(|write| !v.image.contains(write) && !on_the_way.contains(write))
            {
                return Err(self.violation(format!(
                    "after the heal phase c{}/{} replicates in sync, but write {missing} is on its primary and not on its secondary (no dirty or activity map recorded it)",
                    v.cluster, v.handle
                )));
            }
        }
        Ok(())
    }
}

fn unix_ms(at: SystemTime) -> i64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
