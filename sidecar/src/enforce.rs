//! The enforcement core: pure, no I/O.
//!
//! [`Enforcer`] knows, per group, the highest (epoch, stage) seen by either path, which local volumes
//! belong to it (by path), what each volume carries and whether a fail-safe suspension is in force. An
//! [`Input`] (a directive from a path, a membership change, the replicator's inventory, a copy failure, the
//! fail-safe timer) yields an [`Outcome`]: replicator operations, in order, and acknowledgements.
//!
//! Idempotence lives here (DESIGN.md rules 3, 5, 6, 8):
//! - the highest (epoch, stage) seen by either path is enforced exactly once per volume; a stale, repeated
//!   or reordered directive changes nothing;
//! - reaching (e, Release) without having frozen at e means `Suspend(e)` then `Release(e)`; reaching
//!   (e, Resume) from a suspension at an older epoch means `Suspend(e)` then `Resume(e)`;
//! - the fail-safe suspends at the epoch last seen, marked fail-safe, and only a directive at a higher
//!   epoch lifts it;
//! - a volume is confirmed to its replicator (`Configure`) only after its group's point was read from a
//!   path, and never at anything older than what the volume carries. An unconfirmed or fresh volume gets
//!   one `Configure` at the target, which the replicator enforces itself; a confirmed volume of the group
//!   gets `Suspend` / `Release` / `Resume` directives.
//!
//! Volumes held outside any group (DESIGN.md rules 5, 6 and 9): nothing stays suspended in a group that
//! no longer names it. A volume that carries a group which does not name it any more is *let go of* —
//! one `Configure` into no group, which resynchronises it and replicates, its held writes completing
//! once copied — when that group lets it go:
//! - it left a frozen group (for no group or for another): once that group replicates again at or past
//!   the volume's epoch (until then it stays suspended), and at once when it left at a replicating
//!   point; a volume another group names is let go of first, then joins that group;
//! - its group is gone: no path lists the group any more (the mirror is deleted and the operator's
//!   gRPC membership no longer names it — a group deleted while this node was cut off, whose finalizer
//!   let go of it after twice the hold timeout; or a group never heard of since a restart): it is let
//!   go of at once, whatever point it carries (rule 9: deleting a group ends its guarantees), so a new
//!   group can claim it. A path that still lists the group, even one now unreachable whose last view
//!   named it, keeps the volume where it is.
//!
//! Nothing is let go of — and no volume changes group — before every path has delivered its complete
//! view: after a restart the group a volume carries may list it on a path not read yet. A volume in
//! no group whose copy fails has no group to freeze: the replicator runs it primary-only with its
//! changes tracked and resynchronises it when the secondary answers; the core records no failure for it
//! ([`Refusal::FailureOutsideGroup`], which the agent logs and counts).
//!
//! Operations for one volume are always issued in increasing [`Level`] within a group (a let-go starts
//! a new order: the next group's epochs start anew): the proptests at the bottom check
//! it over random interleavings of directives from the two paths.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use lockstep_api::domain::{ClaimOrder, GroupEpoch, Path, Stage, VolumeState};

/// Where a volume is in its group's life: an (epoch, stage) point, or a fail-safe suspension at an epoch,
/// which ranks above every stage of that epoch and below the next epoch (only a higher epoch lifts it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Level {
    /// The epoch.
    pub epoch: u64,
    /// The rank within the epoch.
    pub rank: Rank,
}

/// The rank of a [`Level`] within its epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rank {
    /// Suspended at the epoch by directive: every write held.
    Freeze,
    /// Released at the epoch: primary-only.
    Release,
    /// Replicating (resumed at the epoch, or never frozen at it).
    Resume,
    /// Suspended at the epoch by the sidecar's own fail-safe.
    FailSafe,
}

impl Level {
    /// The level of an (epoch, stage) point.
    pub fn point(epoch: u64, stage: Stage) -> Self {
        let rank = match stage {
            Stage::Freeze => Rank::Freeze,
            Stage::Release => Rank::Release,
            Stage::Resume => Rank::Resume,
        };
        Self { epoch, rank }
    }

    /// A fail-safe suspension at an epoch.
    pub fn fail_safe(epoch: u64) -> Self {
        Self {
            epoch,
            rank: Rank::FailSafe,
        }
    }

    /// The stage a replicator records for this level (a fail-safe suspension is a Freeze, marked).
    pub fn stage(self) -> Stage {
        match self.rank {
            Rank::Freeze | Rank::FailSafe => Stage::Freeze,
            Rank::Release => Stage::Release,
            Rank::Resume => Stage::Resume,
        }
    }

    /// True for a fail-safe suspension.
    pub fn is_fail_safe(self) -> bool {
        self.rank == Rank::FailSafe
    }

    /// True when a volume at `self` already satisfies `target` (nothing to do). A fail-safe target is
    /// satisfied by any non-replicating level at its epoch or anything at a higher epoch.
    pub fn satisfies(self, target: Level) -> bool {
        match target.rank {
            Rank::FailSafe => {
                self.epoch > target.epoch
                    || (self.epoch == target.epoch && self.rank != Rank::Resume)
            }
            _ => self >= target,
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.rank {
            Rank::FailSafe => write!(f, "{}/Freeze(fail-safe)", self.epoch),
            _ => write!(f, "{}/{}", self.epoch, self.stage()),
        }
    }
}

/// What the replicator says a volume carries (from `ListVolumes` or `State`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Carried {
    /// The volume handle.
    pub volume: String,
    /// The group it carries; `None` when in no group.
    pub group_uid: Option<String>,
    /// Its level in that group.
    pub level: Level,
    /// False while the replicator holds its I/O waiting for a confirmation.
    pub confirmed: bool,
    /// The sequence of the write whose failed copy the volume holds writes for (mode Held), if it does.
    /// A failure the replicator announced before this sidecar listened (it restarted, or its event
    /// stream broke) is learnt from here: otherwise nothing would ever freeze the group, and the volume's
    /// writes would fail at every hold timeout.
    pub held_after_failure: Option<u64>,
    /// Still copying its dirty regions to the secondary after a resume (mode Resyncing): not in sync.
    pub resyncing: bool,
}

/// A write whose copy failed, as the core records it for the reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The volume.
    pub volume: String,
    /// The group.
    pub group_uid: String,
    /// The epoch the sidecar had seen when the copy failed (DESIGN.md rule 4).
    pub epoch_seen: u64,
    /// The replicator's sequence number of the write.
    pub sequence: u64,
    /// What failed.
    pub error: String,
    /// When, in milliseconds since the Unix epoch.
    pub since_unix_ms: i64,
}

/// Held writes of a volume that outlived the group's hold timeout and failed with an I/O error, as the
/// core records them for the reports: a running total per volume and epoch, kept until the group resumes
/// or freezes again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldTimeout {
    /// The volume.
    pub volume: String,
    /// The group.
    pub group_uid: String,
    /// The group's epoch the sidecar had seen when the writes failed (DESIGN.md rule 4).
    pub epoch: u64,
    /// How many held writes failed at that epoch so far.
    pub failed_writes: u64,
    /// When the first of them failed, in milliseconds since the Unix epoch.
    pub since_unix_ms: i64,
}

/// An input to the core.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// The replicator's volumes (the complete list): what each carries.
    Inventory(Vec<Carried>),
    /// A path's view of which local volumes belong to a group (replaces that path's previous view).
    Membership {
        /// The path.
        path: Path,
        /// The group.
        group_uid: String,
        /// Its name, for logs.
        group_name: String,
        /// Its place in the claim order: of two groups listing a volume, the first claim wins.
        order: ClaimOrder,
        /// The volume handles on this node.
        volumes: BTreeSet<String>,
        /// The group's hold timeout.
        hold_timeout_ms: u64,
    },
    /// A path no longer lists the group (deleted, or no longer on this node).
    GroupGone {
        /// The path.
        path: Path,
        /// The group.
        group_uid: String,
    },
    /// A path delivered its complete view: volumes in no group may now be confirmed standalone.
    Synced(Path),
    /// The operator found every member of the group in sync at (epoch, Resume): the image the
    /// secondaries kept through the resync may go (DESIGN rule 7; decided group-wide, never per volume).
    GroupInSync {
        /// The group.
        group_uid: String,
        /// The epoch it is in sync at.
        epoch: u64,
        /// Its volumes on this node.
        volumes: BTreeSet<String>,
    },
    /// A directive (or the group's current point) read from a path.
    Directive {
        /// The path.
        path: Path,
        /// What to enforce.
        target: GroupEpoch,
    },
    /// The replicator reported a failed copy (the write is held).
    CopyFailed {
        /// The volume.
        volume: String,
        /// The write's sequence number.
        sequence: u64,
        /// What failed.
        error: String,
        /// When.
        since_unix_ms: i64,
    },
    /// The replicator failed held writes of a volume at the hold timeout (the volume keeps holding).
    HoldTimedOut {
        /// The volume.
        volume: String,
        /// How many held writes failed this time.
        failed_writes: u64,
        /// When, in milliseconds since the Unix epoch.
        at_unix_ms: i64,
    },
    /// Neither path was reachable for the fail-safe interval: suspend every group holding a failed write.
    FailSafeTimer,
    /// A replicator operation on these volumes failed: forget what they carry until the next inventory.
    OperationFailed {
        /// The volumes.
        volumes: Vec<String>,
    },
}

/// One replicator operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operation {
    /// Suspend at an epoch (hold every write, stop copying).
    Suspend {
        /// The group.
        group_uid: String,
        /// The epoch.
        epoch: u64,
        /// The volumes.
        volumes: Vec<String>,
        /// Taken by the fail-safe.
        fail_safe: bool,
    },
    /// Release held writes at exactly the epoch.
    Release {
        /// The group.
        group_uid: String,
        /// The epoch.
        epoch: u64,
        /// The volumes.
        volumes: Vec<String>,
    },
    /// Resynchronise and copy again.
    Resume {
        /// The group.
        group_uid: String,
        /// The epoch.
        epoch: u64,
        /// The volumes.
        volumes: Vec<String>,
    },
    /// Confirm a volume's group and (epoch, stage), and set its hold timeout. An empty group confirms
    /// that the volume is in no group.
    Configure {
        /// The volume.
        volume: String,
        /// The group, or empty.
        group_uid: String,
        /// The epoch.
        epoch: u64,
        /// The stage.
        stage: Stage,
        /// The hold timeout.
        hold_timeout_ms: u64,
    },
}

impl Operation {
    /// The volumes the operation acts on.
    pub fn volumes(&self) -> Vec<String> {
        self.volume_names().into_iter().map(str::to_owned).collect()
    }

    /// The volumes' names, borrowed.
    pub fn volume_names(&self) -> Vec<&str> {
        match self {
            Operation::Suspend { volumes, .. }
            | Operation::Release { volumes, .. }
            | Operation::Resume { volumes, .. } => volumes.iter().map(String::as_str).collect(),
            Operation::Configure { volume, .. } => vec![volume.as_str()],
        }
    }

    /// The level the operation brings its volumes to.
    pub fn level(&self) -> Level {
        match self {
            Operation::Suspend {
                epoch, fail_safe, ..
            } => {
                if *fail_safe {
                    Level::fail_safe(*epoch)
                } else {
                    Level::point(*epoch, Stage::Freeze)
                }
            }
            Operation::Release { epoch, .. } => Level::point(*epoch, Stage::Release),
            Operation::Resume { epoch, .. } => Level::point(*epoch, Stage::Resume),
            Operation::Configure { epoch, stage, .. } => Level::point(*epoch, *stage),
        }
    }
}

/// An acknowledgement to send on both paths: the volumes now at (group, epoch, stage).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    /// What was enforced.
    pub point: GroupEpoch,
    /// The volume handles at that point (sorted).
    pub volumes: Vec<String>,
    /// True for a fail-safe suspension.
    pub fail_safe: bool,
}

/// Input the core refused, for the log (never a panic).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// A membership names a volume this node's replicator does not serve.
    #[error("group {group_uid} names volume {volume}, which this node does not serve")]
    NotOwned {
        /// The group.
        group_uid: String,
        /// The volume.
        volume: String,
    },
    /// A volume is claimed by two groups; the first claim wins.
    #[error("volume {volume} is claimed by group {claimed_by} and also by {group_uid}")]
    DoubleClaim {
        /// The refused group.
        group_uid: String,
        /// The volume.
        volume: String,
        /// The group that holds it.
        claimed_by: String,
    },
    /// A stale, repeated or reordered directive.
    #[error("directive {target} is not newer than {seen}: nothing to do")]
    Stale {
        /// The directive.
        target: GroupEpoch,
        /// What the core had seen.
        seen: Level,
    },
    /// A directive at or below a fail-safe suspension's epoch.
    #[error("directive {target} does not lift the fail-safe suspension at epoch {epoch}")]
    BelowFailSafe {
        /// The directive.
        target: GroupEpoch,
        /// The fail-safe epoch.
        epoch: u64,
    },
    /// A volume is not moved into another group before the group it carries let it go at a replicating
    /// point (or, after a restart, before the paths said whether that group still exists).
    #[error(
        "volume {volume} stays in group {frozen_in} until that group lets it go at a replicating point; not joining {group_uid}"
    )]
    StillFrozen {
        /// The volume.
        volume: String,
        /// The group that claims it now.
        group_uid: String,
        /// The frozen group it carries.
        frozen_in: String,
    },
    /// A copy failure on a volume in no known group.
    #[error("copy failure on volume {volume}, which is in no known group")]
    FailureOutsideGroup {
        /// The volume.
        volume: String,
    },
    /// A hold timeout on a volume in no known group.
    #[error("hold timeout on volume {volume}, which is in no known group")]
    HoldTimeoutOutsideGroup {
        /// The volume.
        volume: String,
    },
    /// A hold timeout that names no volume or no failed write.
    #[error("malformed hold timeout (volume {volume:?}, {failed_writes} failed writes) refused")]
    MalformedHoldTimeout {
        /// The volume named.
        volume: String,
        /// The count named.
        failed_writes: u64,
    },
    /// A volume carries a newer point than its group's path view: it stays held, unconfirmed.
    #[error(
        "volume {volume} carries {carried}, newer than {seen} read from the paths: not confirmed"
    )]
    CarriesNewer {
        /// The volume.
        volume: String,
        /// What it carries.
        carried: Level,
        /// What the paths said.
        seen: Level,
    },
}

impl Refusal {
    /// The refusal for people, each group named by its name with its UID (`orders-db (uid …)`) where
    /// `name_of` knows the name, by its UID alone otherwise.
    pub fn describe<'a>(&self, name_of: impl Fn(&str) -> Option<&'a str>) -> String {
        let group = |uid: &str| match name_of(uid) {
            Some(name) => format!("group {name} (uid {uid})"),
            None => format!("group {uid}"),
        };
        match self {
            Self::NotOwned { group_uid, volume } => format!(
                "{} names volume {volume}, which this node does not serve",
                group(group_uid)
            ),
            Self::DoubleClaim {
                group_uid,
                volume,
                claimed_by,
            } => format!(
                "volume {volume} is claimed by {} and also by {}",
                group(claimed_by),
                group(group_uid)
            ),
            Self::StillFrozen {
                volume,
                group_uid,
                frozen_in,
            } => format!(
                "volume {volume} stays in {} until that group lets it go at a replicating point; not joining {}",
                group(frozen_in),
                group(group_uid)
            ),
            other => other.to_string(),
        }
    }
}

/// What an input produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Replicator operations, in the order to run them.
    pub operations: Vec<Operation>,
    /// Acknowledgements to send on both paths.
    pub acks: Vec<Ack>,
    /// Refused or ignored input, for the log.
    pub refused: Vec<Refusal>,
    /// Groups whose fail-safe was taken by this input.
    pub fail_safe_taken: Vec<String>,
}

/// What the core knows about one local volume.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Volume {
    /// The group it carries, as the replicator said or as the core set it.
    group_uid: Option<String>,
    /// Its level in that group; `None` when unknown (fresh, or after a failed operation).
    level: Option<Level>,
    /// Confirmed to the replicator.
    confirmed: bool,
    /// Resynchronising: resumed by this core, or listed so, and not yet listed as done.
    resyncing: bool,
}

/// What the core knows about one group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Group {
    name: String,
    /// Its place in the claim order, as a path named it.
    order: Option<ClaimOrder>,
    /// The highest point read from either path.
    seen: Option<Level>,
    /// The path that first brought `seen`.
    seen_by: Option<Path>,
    /// Local volumes, per path.
    members: BTreeMap<Path, BTreeSet<String>>,
    hold_timeout_ms: u64,
    /// A fail-safe suspension in force, at this epoch.
    fail_safe: Option<u64>,
    /// Outstanding copy failures, by volume.
    failures: BTreeMap<String, Failure>,
    /// The last acknowledgement produced.
    last_ack: Option<Ack>,
    /// Held writes failed by the hold timeout, by volume, with the point seen when first recorded.
    hold_timeouts: BTreeMap<String, (HoldTimeout, Option<Level>)>,
}

/// The default hold timeout used until a path names the group's own.
pub const DEFAULT_HOLD_TIMEOUT_MS: u64 = 30_000;

/// The hold timeouts a group may have, as its CRD admits them (1s to 10m), in milliseconds.
pub const HOLD_TIMEOUT_RANGE_MS: std::ops::RangeInclusive<u64> = 1_000..=600_000;

/// A hold timeout read from a path, within [`HOLD_TIMEOUT_RANGE_MS`] (0, none named, stays 0: the default
/// applies). The API server never admits another; a gRPC membership message could carry anything.
pub fn bounded_hold_timeout_ms(hold_timeout_ms: u64) -> u64 {
    if hold_timeout_ms == 0 {
        return 0;
    }
    hold_timeout_ms.clamp(*HOLD_TIMEOUT_RANGE_MS.start(), *HOLD_TIMEOUT_RANGE_MS.end())
}

/// The pure enforcement core of one node.
#[derive(Debug, Clone, Default)]
pub struct Enforcer {
    groups: BTreeMap<String, Group>,
    volumes: BTreeMap<String, Volume>,
    inventory_known: bool,
    synced: BTreeSet<Path>,
    /// The paths this sidecar runs: a group is taken as gone only once each of them has delivered its
    /// complete view without it (empty: once any has).
    paths: BTreeSet<Path>,
}

/// A read-only view of one group, for status and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupView {
    /// The group UID.
    pub group_uid: String,
    /// Its name.
    pub name: String,
    /// The highest point seen by a path.
    pub seen: Option<Level>,
    /// The fail-safe epoch in force.
    pub fail_safe: Option<u64>,
    /// The local volumes (union of the paths' views, served here).
    pub volumes: Vec<String>,
    /// The last acknowledgement.
    pub last_ack: Option<Ack>,
}

/// A read-only view of one volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeView {
    /// The handle.
    pub volume: String,
    /// The group it is in, if any.
    pub group_uid: Option<String>,
    /// Its level.
    pub level: Option<Level>,
    /// Confirmed to the replicator.
    pub confirmed: bool,
    /// Still resynchronising after a resume: its secondary is not in sync yet.
    pub resyncing: bool,
}

impl VolumeView {
    /// The state a sidecar reports for the volume, given the core's outstanding `failures`. A volume at
    /// `(e, Resume)` is replicating — in sync, so in the image of the next freeze — only once its resync
    /// is known to be done: the operator takes that report as the volume being back in the image.
    pub fn state(&self, failures: &[Failure]) -> VolumeState {
        if failures.iter().any(|f| f.volume == self.volume) {
            // Holding a failed write; one whose resync it interrupted is still out of sync (outside the
            // image of the freeze its failure starts).
            return if self.resyncing {
                VolumeState::Resyncing
            } else {
                VolumeState::Held
            };
        }
        match (self.confirmed, &self.group_uid, self.level) {
            (false, _, _) => VolumeState::Unconfirmed,
            (true, None, _) | (true, Some(_), None) => VolumeState::Standalone,
            (true, Some(_), Some(level)) => match level.rank {
                Rank::Freeze | Rank::FailSafe => VolumeState::Suspended,
                Rank::Release => VolumeState::Running,
                Rank::Resume if self.resyncing => VolumeState::Resyncing,
                Rank::Resume => VolumeState::Replicating,
            },
        }
    }
}

impl Enforcer {
    /// An empty core.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty core of a sidecar running these control paths. A path that has not delivered its first
    /// complete view (a watch still listing, an operator still starting) may yet name a group the other
    /// path does not: until each has, no volume is let go of its group. A frozen volume let go early
    /// would replicate the writes that depend on ones its group lost.
    pub fn with_paths(paths: BTreeSet<Path>) -> Self {
        Self {
            paths,
            ..Self::default()
        }
    }

    /// Whether every path this sidecar runs has delivered its complete view (at least one has).
    fn all_synced(&self) -> bool {
        !self.synced.is_empty() && self.paths.is_subset(&self.synced)
    }

    /// Feeds one input.
    pub fn handle(&mut self, input: Input) -> Outcome {
        let mut out = Outcome::default();
        match input {
            Input::Inventory(carried) => self.inventory(carried, &mut out),
            // Carried out by the agent on the replicator; nothing to enforce.
            Input::GroupInSync { .. } => {}
            Input::Membership {
                path,
                group_uid,
                group_name,
                order,
                volumes,
                hold_timeout_ms,
            } => {
                if group_uid.is_empty() {
                    return out;
                }
                let group = self.groups.entry(group_uid.clone()).or_default();
                group.name = group_name;
                // Both paths name the same order; one that knows the creation time wins over one that
                // does not (a mirror written before the annotation existed).
                group.order = Some(match group.order.take() {
                    Some(known) => known.min(order),
                    None => order,
                });
                group.hold_timeout_ms = bounded_hold_timeout_ms(hold_timeout_ms);
                group.members.insert(path, volumes);
                self.enforce_all(&mut out);
            }
            Input::GroupGone { path, group_uid } => {
                if let Some(group) = self.groups.get_mut(&group_uid) {
                    group.members.remove(&path);
                }
                self.enforce_all(&mut out);
            }
            Input::Synced(path) => {
                self.synced.insert(path);
                self.enforce_all(&mut out);
            }
            Input::Directive { path, target } => self.directive(path, target, &mut out),
            Input::CopyFailed {
                volume,
                sequence,
                error,
                since_unix_ms,
            } => self.copy_failed(volume, sequence, error, since_unix_ms, &mut out),
            Input::HoldTimedOut {
                volume,
                failed_writes,
                at_unix_ms,
            } => self.hold_timed_out(volume, failed_writes, at_unix_ms, &mut out),
            Input::FailSafeTimer => self.fail_safe(&mut out),
            Input::OperationFailed { volumes } => {
                for name in volumes {
                    if let Some(volume) = self.volumes.get_mut(&name) {
                        volume.level = None;
                        volume.confirmed = false;
                    }
                }
                // Re-learnt from the next inventory; nothing acts on them until then, and the next
                // acknowledgement of their groups is sent afresh.
                for group in self.groups.values_mut() {
                    group.last_ack = None;
                }
                self.inventory_known = false;
            }
        }
        self.forget_past_hold_timeouts();
        out
    }

    fn inventory(&mut self, carried: Vec<Carried>, out: &mut Outcome) {
        let served: BTreeSet<String> = carried.iter().map(|c| c.volume.clone()).collect();
        // Held after a failed copy — or suspended by a fail-safe, which a sidecar takes only for a
        // failure it never got acknowledged: a restarted sidecar that forgot it would leave the volume
        // suspended while its group replicates, every write failing at the hold timeout.
        let held: Vec<(String, u64, u64)> = carried
            .iter()
            .filter_map(|c| {
                let sequence = c
                    .held_after_failure
                    .or_else(|| c.level.is_fail_safe().then_some(0))?;
                Some((c.volume.clone(), sequence, c.level.epoch))
            })
            .collect();
        self.volumes.retain(|name, _| served.contains(name));
        for c in carried {
            let known = self.volumes.get(&c.volume);
            // A volume the core already tracks keeps the core's view (it only grows) unless the
            // replicator carries something newer or the core lost track of it.
            let replace = match known {
                None => true,
                Some(v) => match (v.level, v.group_uid == c.group_uid) {
                    (None, _) | (_, false) => true,
                    (Some(level), true) => c.level > level || (!c.confirmed && v.confirmed),
                },
            };
            if replace {
                self.volumes.insert(
                    c.volume.clone(),
                    Volume {
                        level: c.group_uid.as_ref().map(|_| c.level),
                        group_uid: c.group_uid,
                        confirmed: c.confirmed,
                        resyncing: c.resyncing,
                    },
                );
            } else if let Some(volume) = self.volumes.get_mut(&c.volume) {
                // Whether a resync is still copying is the replicator's to say, listing by listing;
                // one whose copy failed holds writes now, its secondary still half resynchronised.
                volume.resyncing =
                    c.resyncing || (volume.resyncing && c.held_after_failure.is_some());
            }
        }
        self.inventory_known = true;
        for (volume, sequence, failed_at) in held {
            let Some(group_uid) = self.group_of(&volume) else {
                continue;
            };
            // A volume still listed as held at an epoch the group has moved past failed before a freeze
            // that already answered it (its directive suspends it): reporting it again would freeze anew.
            let seen = self
                .groups
                .get(&group_uid)
                .and_then(|group| group.seen)
                .map_or(0, |level| level.epoch);
            if seen > failed_at {
                continue;
            }
            let error = "the replicator holds this volume's writes after a failed copy (found in its volume list, held or in a fail-safe suspension: the failure was announced before this sidecar listened)".to_owned();
            self.copy_failed(volume, sequence, error, 0, out);
        }
        self.enforce_all(out);
    }

    fn directive(&mut self, path: Path, target: GroupEpoch, out: &mut Outcome) {
        let level = Level::point(target.epoch, target.stage);
        let group = self.groups.entry(target.group_uid.clone()).or_default();
        if let Some(seen) = group.seen
            && level <= seen
        {
            out.refused.push(Refusal::Stale { target, seen });
            return;
        }
        if let Some(epoch) = group.fail_safe
            && target.epoch <= epoch
            && !self.lifts_at_same_epoch(&target, epoch)
        {
            out.refused.push(Refusal::BelowFailSafe { target, epoch });
            return;
        }
        let group = self.groups.entry(target.group_uid.clone()).or_default();
        group.fail_safe = None;
        group.seen = Some(level);
        group.seen_by = Some(path);
        // A report counts as acknowledged once its sender sees a higher epoch (rule 4).
        group.failures.retain(|_, f| f.epoch_seen >= target.epoch);
        self.enforce_all(out);
    }

    /// Never: only a higher epoch lifts a fail-safe. With the `FailSafeLiftedAtSameEpoch` mutant, a
    /// directive at the fail-safe's own epoch lifts it and the volumes it suspended follow that
    /// directive, as if the group had suspended them at that epoch.
    #[cfg(feature = "mutants")]
    fn lifts_at_same_epoch(&mut self, target: &GroupEpoch, epoch: u64) -> bool {
        if target.epoch != epoch
            || !lockstep_api::mutants::active(
                lockstep_api::mutants::Mutant::FailSafeLiftedAtSameEpoch,
            )
        {
            return false;
        }
        for volume in self.volumes.values_mut() {
            if volume.group_uid.as_deref() == Some(target.group_uid.as_str())
                && volume.level == Some(Level::fail_safe(epoch))
            {
                volume.level = Some(Level::point(epoch, Stage::Freeze));
            }
        }
        true
    }

    #[cfg(not(feature = "mutants"))]
    fn lifts_at_same_epoch(&mut self, _target: &GroupEpoch, _epoch: u64) -> bool {
        false
    }

    fn copy_failed(
        &mut self,
        volume: String,
        sequence: u64,
        error: String,
        since_unix_ms: i64,
        out: &mut Outcome,
    ) {
        let Some(group_uid) = self.group_of(&volume) else {
            out.refused.push(Refusal::FailureOutsideGroup { volume });
            return;
        };
        let carried = self.epoch_carried(&volume, &group_uid);
        let Some(group) = self.groups.get_mut(&group_uid) else {
            return;
        };
        let epoch_seen = group.seen.map_or(0, |l| l.epoch).max(carried);
        // Frozen or released by the operator at the epoch it carries: that epoch's freeze is decided
        // already, and the resync that ends it copies this write again. Recorded, the report would
        // outlive the freeze and, once the group resumed at that same epoch, freeze it again for a
        // failure it had answered (naming a stale cause, not the resync's own failure).
        if group
            .seen
            .is_some_and(|l| matches!(l.rank, Rank::Freeze | Rank::Release) && l.epoch >= carried)
        {
            return;
        }
        group
            .failures
            .entry(volume.clone())
            .or_insert_with(|| Failure {
                volume,
                group_uid,
                epoch_seen,
                sequence,
                error,
                since_unix_ms,
            });
    }

    /// The epoch a volume carries in a group (0 when it carries another group or nothing known).
    fn epoch_carried(&self, volume: &str, group_uid: &str) -> u64 {
        self.volumes
            .get(volume)
            .filter(|v| v.group_uid.as_deref() == Some(group_uid))
            .and_then(|v| v.level)
            .map_or(0, |l| l.epoch)
    }

    fn hold_timed_out(
        &mut self,
        volume: String,
        failed_writes: u64,
        at_unix_ms: i64,
        out: &mut Outcome,
    ) {
        if volume.is_empty() || failed_writes == 0 {
            out.refused.push(Refusal::MalformedHoldTimeout {
                volume,
                failed_writes,
            });
            return;
        }
        let Some(group_uid) = self.group_of(&volume) else {
            out.refused
                .push(Refusal::HoldTimeoutOutsideGroup { volume });
            return;
        };
        let carried = self.epoch_carried(&volume, &group_uid);
        let Some(group) = self.groups.get_mut(&group_uid) else {
            return;
        };
        let epoch = group
            .seen
            .map_or(0, |l| l.epoch)
            .max(carried)
            .max(group.fail_safe.unwrap_or(0));
        let seen = group.seen;
        match group.hold_timeouts.get_mut(&volume) {
            Some((record, _)) if record.epoch == epoch => {
                record.failed_writes = record.failed_writes.saturating_add(failed_writes);
            }
            _ => {
                let record = HoldTimeout {
                    volume: volume.clone(),
                    group_uid,
                    epoch,
                    failed_writes,
                    since_unix_ms: at_unix_ms,
                };
                group.hold_timeouts.insert(volume, (record, seen));
            }
        }
    }

    /// Forgets hold timeouts the group moved past: a resume after them, or a freeze at a higher epoch
    /// (whose own timeouts are recorded afresh), and those of volumes that left the group or this node.
    fn forget_past_hold_timeouts(&mut self) {
        // Most messages find no hold timeout to forget: no member set is built for them.
        let members: BTreeMap<String, BTreeSet<String>> = self
            .groups
            .iter()
            .filter(|(_, g)| !g.hold_timeouts.is_empty())
            .map(|(uid, g)| (uid.clone(), g.members.values().flatten().cloned().collect()))
            .collect();
        for (uid, group) in &mut self.groups {
            let seen = group.seen;
            group.hold_timeouts.retain(|volume, (record, seen_then)| {
                let moved_on = seen.is_some_and(|now| {
                    Some(now) > *seen_then && (now.epoch > record.epoch || now.rank == Rank::Resume)
                });
                let still_here = self.volumes.contains_key(volume)
                    && members.get(uid).is_some_and(|m| m.contains(volume));
                !moved_on && still_here
            });
        }
    }

    fn fail_safe(&mut self, out: &mut Outcome) {
        let uids: Vec<String> = self
            .groups
            .iter()
            .filter(|(_, g)| !g.failures.is_empty() && g.fail_safe.is_none())
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in uids {
            // At the highest epoch the sidecar knows the group at: seen, or — after a restart, before
            // any path answered — carried by its volumes. At 0 it would suspend nothing that carries a
            // later epoch, and the group's current point would lift it.
            let carried = self
                .volumes
                .values()
                .filter(|v| v.group_uid.as_deref() == Some(uid.as_str()))
                .filter_map(|v| v.level)
                .map(|l| l.epoch)
                .max()
                .unwrap_or(0);
            if let Some(group) = self.groups.get_mut(&uid) {
                let epoch = group.seen.map_or(0, |l| l.epoch).max(carried);
                group.fail_safe = Some(epoch);
                out.fail_safe_taken.push(uid);
            }
        }
        self.enforce_all(out);
    }

    /// The group a local volume belongs to (see [`Enforcer::local_volumes`]).
    fn group_of(&self, volume: &str) -> Option<String> {
        let mut scratch = Outcome::default();
        self.local_volumes(&mut scratch)
            .into_iter()
            .find(|(_, volumes)| volumes.contains(volume))
            .map(|(uid, _)| uid)
    }

    /// A group's place in the claim order (a group no path has ordered ranks after every ordered one).
    fn order_of(&self, uid: &str) -> ClaimOrder {
        self.groups
            .get(uid)
            .and_then(|group| group.order.clone())
            .unwrap_or_else(|| ClaimOrder::new(None, uid))
    }

    /// Whether the group a volume carries at `level` has let it go at a replicating point: it is
    /// replicating (resumed at or after that level's epoch, no fail-safe in force), or — once a path
    /// delivered its complete view — no path knows it any more and the volume was left replicating (its
    /// finalizer resumed it).
    fn let_go(&self, uid: &str, level: Level) -> bool {
        match self.groups.get(uid) {
            Some(group)
                if group.seen.is_some() || group.members.values().any(|m| !m.is_empty()) =>
            {
                group
                    .seen
                    .is_some_and(|seen| seen.rank == Rank::Resume && seen.epoch >= level.epoch)
                    && group.fail_safe.is_none()
            }
            _ => self.all_synced() && level.rank == Rank::Resume,
        }
    }

    /// Every group's local volumes: the union of the paths' views, served here, each volume in at most
    /// one group (DESIGN.md rule 5). Of the groups listing a volume the first claim wins (creation time,
    /// then UID, as the operator decides) — except that a volume stays in the group it carries, while
    /// that group lists it, until that group has let it go at a replicating point. Every other claim is
    /// refused and never acted on.
    fn local_volumes(&self, out: &mut Outcome) -> BTreeMap<String, BTreeSet<String>> {
        let mut claimants: BTreeMap<&String, Vec<(ClaimOrder, &String)>> = BTreeMap::new();
        let mut result: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (uid, group) in &self.groups {
            result.entry(uid.clone()).or_default();
            // The API path lists this node's volumes: one not served here is refused. The gRPC
            // membership lists the whole cluster's (thousands, in a large group): the others are simply
            // not this node's, so the node's own volumes are looked up in it rather than the reverse.
            for (path, names) in &group.members {
                let refuse_unserved = *path == Path::Api && self.inventory_known;
                let served: Vec<&String> = if refuse_unserved || names.len() <= self.volumes.len() {
                    let mut served = Vec::with_capacity(names.len());
                    for name in names {
                        if self.volumes.contains_key(name) {
                            served.push(name);
                        } else if refuse_unserved {
                            out.refused.push(Refusal::NotOwned {
                                group_uid: uid.clone(),
                                volume: name.clone(),
                            });
                        }
                    }
                    served
                } else {
                    self.volumes
                        .keys()
                        .filter(|name| names.contains(*name))
                        .collect()
                };
                for name in served {
                    let entry = claimants.entry(name).or_default();
                    if !entry.iter().any(|(_, listed_by)| *listed_by == uid) {
                        entry.push((self.order_of(uid), uid));
                    }
                }
            }
        }
        for (name, mut listing) in claimants {
            listing.sort();
            let Some((_, first)) = listing.first() else {
                continue;
            };
            let carried = self
                .volumes
                .get(name)
                .and_then(|volume| Some((volume.group_uid.as_ref()?, volume.level?)));
            let owner = match carried {
                Some((holder, level))
                    if holder != *first
                        && listing.iter().any(|(_, uid)| *uid == holder)
                        && !self.let_go(holder, level) =>
                {
                    holder
                }
                // Until every path has delivered its complete view, no other group takes a volume
                // from the group it carries: that group may list it on a path not read yet (after a
                // restart, the first claim's membership can arrive after a second group's).
                Some((holder, _))
                    if holder != *first
                        && !listing.iter().any(|(_, uid)| *uid == holder)
                        && !self.all_synced() =>
                {
                    continue;
                }
                _ => *first,
            };
            #[cfg(feature = "mutants")]
            if lockstep_api::mutants::active(
                lockstep_api::mutants::Mutant::SecondGroupClaimHonoured,
            ) {
                for (_, uid) in &listing {
                    result
                        .entry((*uid).clone())
                        .or_default()
                        .insert(name.clone());
                }
                continue;
            }
            for (_, uid) in &listing {
                if *uid != owner {
                    out.refused.push(Refusal::DoubleClaim {
                        group_uid: (*uid).clone(),
                        volume: name.clone(),
                        claimed_by: owner.clone(),
                    });
                }
            }
            result
                .entry(owner.clone())
                .or_default()
                .insert(name.clone());
        }
        result
    }

    fn enforce_all(&mut self, out: &mut Outcome) {
        if !self.inventory_known {
            return;
        }
        let local = self.local_volumes(out);
        out.refused.dedup();
        self.release_unclaimed(&local, out);
        for (uid, volumes) in &local {
            self.enforce_group(uid, volumes, out);
        }
        self.confirm_standalone(&local, out);
    }

    fn enforce_group(&mut self, uid: &str, volumes: &BTreeSet<String>, out: &mut Outcome) {
        let Some(group) = self.groups.get(uid) else {
            return;
        };
        // A fail-safe suspends even before any path answered (a sidecar restarted while cut off); else
        // with nothing read from a path yet the volumes stay as they are (held if unconfirmed).
        let target = match (group.fail_safe, group.seen) {
            (Some(epoch), _) => Level::fail_safe(epoch),
            (None, Some(seen)) => seen,
            (None, None) => return,
        };
        let hold_timeout_ms = if group.hold_timeout_ms == 0 {
            DEFAULT_HOLD_TIMEOUT_MS
        } else {
            group.hold_timeout_ms
        };
        let mut suspend = Vec::new();
        let mut release = Vec::new();
        let mut resume = Vec::new();
        let mut configure = Vec::new();
        // A volume that carries another group joins this one only once that group let it go at a
        // replicating point (rule 5): until then it stays as it is (suspended, if it was).
        let held_elsewhere: BTreeMap<&String, String> = volumes
            .iter()
            .filter_map(|name| {
                let volume = self.volumes.get(name)?;
                let (other, level) = (volume.group_uid.as_ref()?, volume.level?);
                (other != uid && !self.let_go(other, level)).then(|| (name, other.clone()))
            })
            .collect();
        for name in volumes {
            let Some(volume) = self.volumes.get_mut(name) else {
                continue;
            };
            if let Some(other) = held_elsewhere.get(name) {
                out.refused.push(Refusal::StillFrozen {
                    volume: name.clone(),
                    group_uid: uid.to_owned(),
                    frozen_in: other.clone(),
                });
                continue;
            }
            let carried = match volume.group_uid.as_deref() {
                Some(g) if g == uid => volume.level,
                _ => None,
            };
            if let Some(level) = carried
                && level.satisfies(target)
            {
                if !volume.confirmed {
                    if level == target && !target.is_fail_safe() {
                        configure.push(name.clone());
                        volume.confirmed = true;
                        volume.resyncing |= confirmed_into_replication(target);
                    } else if level > target {
                        out.refused.push(Refusal::CarriesNewer {
                            volume: name.clone(),
                            carried: level,
                            seen: target,
                        });
                    }
                }
                continue;
            }
            if !volume.confirmed || carried.is_none() {
                // Unconfirmed, fresh or joining from no group: one `Configure` confirms it and brings it
                // to the target (the replicator suspends / releases / resumes as the point asks). Under
                // a fail-safe it is left alone: unconfirmed, it holds its I/O anyway.
                if target.is_fail_safe() {
                    continue;
                }
                configure.push(name.clone());
                volume.confirmed = true;
                volume.resyncing |= confirmed_into_replication(target);
                volume.group_uid = Some(uid.to_owned());
                volume.level = Some(target);
                continue;
            }
            let steps = steps(carried, target);
            if steps.suspend {
                suspend.push(name.clone());
            }
            if steps.release {
                release.push(name.clone());
            }
            if steps.resume {
                resume.push(name.clone());
            }
            // A resume starts the volume's resync: it is not in sync until a listing says the resync
            // is done. Any other move stops the resync.
            volume.resyncing = steps.resume || (volume.resyncing && target.rank == Rank::Resume);
            #[cfg(feature = "mutants")]
            if lockstep_api::mutants::active(lockstep_api::mutants::Mutant::ResumedReportedInSync)
                && steps.resume
            {
                volume.resyncing = false;
            }
            if steps.configure {
                configure.push(name.clone());
            }
            volume.group_uid = Some(uid.to_owned());
            volume.level = Some(target);
        }
        let epoch = target.epoch;
        if !suspend.is_empty() {
            out.operations.push(Operation::Suspend {
                group_uid: uid.to_owned(),
                epoch,
                volumes: suspend,
                fail_safe: target.is_fail_safe(),
            });
        }
        if !release.is_empty() {
            out.operations.push(Operation::Release {
                group_uid: uid.to_owned(),
                epoch,
                volumes: release,
            });
        }
        if !resume.is_empty() {
            out.operations.push(Operation::Resume {
                group_uid: uid.to_owned(),
                epoch,
                volumes: resume,
            });
        }
        for volume in configure {
            out.operations.push(Operation::Configure {
                volume,
                group_uid: uid.to_owned(),
                epoch,
                stage: target.stage(),
                hold_timeout_ms,
            });
        }
        // Acknowledge the volumes at the target, when that changed.
        let at_target: Vec<String> = volumes
            .iter()
            .filter(|name| {
                self.volumes.get(*name).is_some_and(|v| {
                    v.group_uid.as_deref() == Some(uid)
                        && v.level.is_some_and(|l| l.satisfies(target) && l <= target)
                        && (v.confirmed || target.is_fail_safe())
                })
            })
            .cloned()
            .collect();
        if at_target.is_empty() {
            return;
        }
        let ack = Ack {
            point: GroupEpoch {
                group_uid: uid.to_owned(),
                epoch,
                stage: target.stage(),
            },
            volumes: at_target,
            fail_safe: target.is_fail_safe(),
        };
        if let Some(group) = self.groups.get_mut(uid)
            && group.last_ack.as_ref() != Some(&ack)
        {
            group.last_ack = Some(ack.clone());
            out.acks.push(ack);
        }
    }

    /// Volumes that carry a group which no longer names them are let go of — configured into no group,
    /// which resynchronises them and replicates, their held writes completing once copied — as soon as
    /// that group lets them go (see the module docs, and [`Enforcer::let_go`]): it replicates again at
    /// or past the volume's epoch, no path lists it any more, or the volume is itself at a replicating
    /// point and no group names it. A volume another group names is let go of first, then joins it (a
    /// `Configure` naming a new group alone would leave the replicator suspended at the old group's
    /// epoch). Nothing is let go of before every path has delivered its complete view: the group a volume
    /// carries may still list it on a path not read yet.
    fn release_unclaimed(&mut self, local: &BTreeMap<String, BTreeSet<String>>, out: &mut Outcome) {
        let claimed: BTreeMap<&String, &String> = local
            .iter()
            .flat_map(|(uid, volumes)| volumes.iter().map(move |v| (v, uid)))
            .collect();
        let synced = self.all_synced();
        let mut released = Vec::new();
        for (name, volume) in &self.volumes {
            let (Some(uid), Some(level)) = (volume.group_uid.as_deref(), volume.level) else {
                continue;
            };
            let claimed_by = claimed.get(name).map(|g| g.as_str());
            // Nothing is let go of before every path has delivered its complete view: the group a
            // volume carries may still list it on a path not read yet.
            if claimed_by == Some(uid) || !synced {
                continue;
            }
            // No path lists the group any more: deleted (rule 9), or never heard of since a restart.
            let gone = synced
                && self
                    .groups
                    .get(uid)
                    .is_none_or(|group| group.members.is_empty());
            let lets_go = match claimed_by {
                // Replicating in its old group: it joins the other one directly.
                Some(_) if level.rank == Rank::Resume => false,
                Some(_) => gone || self.let_go(uid, level),
                None => gone || level.rank == Rank::Resume || self.let_go(uid, level),
            };
            if lets_go {
                tracing::info!(
                    volume = %name,
                    group_uid = uid,
                    ?level,
                    claimed_by,
                    group_gone = gone,
                    "volume let go of its group"
                );
                released.push(name.clone());
            }
        }
        for name in released {
            if let Some(volume) = self.volumes.get_mut(&name) {
                volume.group_uid = None;
                volume.level = None;
                volume.confirmed = true;
            }
            out.operations.push(Operation::Configure {
                volume: name,
                group_uid: String::new(),
                epoch: 0,
                stage: Stage::Resume,
                hold_timeout_ms: DEFAULT_HOLD_TIMEOUT_MS,
            });
        }
    }

    /// Volumes in no group, once a path has delivered its complete view, are confirmed standalone.
    fn confirm_standalone(
        &mut self,
        local: &BTreeMap<String, BTreeSet<String>>,
        out: &mut Outcome,
    ) {
        if self.synced.is_empty() {
            return;
        }
        let in_group: BTreeSet<&String> = local.values().flatten().collect();
        for (name, volume) in &mut self.volumes {
            if volume.confirmed || in_group.contains(name) || volume.group_uid.is_some() {
                // A volume that carries a group but is listed by none stays as it is (rule 5: a volume
                // that leaves a frozen group stays suspended until the group replicates again).
                continue;
            }
            tracing::debug!(volume = %name, "volume in no group confirmed standalone");
            volume.confirmed = true;
            out.operations.push(Operation::Configure {
                volume: name.clone(),
                group_uid: String::new(),
                epoch: 0,
                stage: Stage::Resume,
                hold_timeout_ms: DEFAULT_HOLD_TIMEOUT_MS,
            });
        }
    }

    /// Outstanding copy failures (reported on both paths until a higher epoch is seen).
    pub fn failures(&self) -> Vec<Failure> {
        self.groups
            .values()
            .flat_map(|g| g.failures.values().cloned())
            .collect()
    }

    /// The fail-safe interval for a group's failures: the configured one while it is below the group's
    /// hold timeout, else half the hold timeout — a fail-safe taken after the held writes failed would
    /// come too late to hold the writes that follow them.
    pub fn fail_safe_interval(&self, group_uid: &str, configured: Duration) -> Duration {
        let hold = Duration::from_millis(self.hold_timeout_ms(group_uid));
        if configured < hold {
            configured
        } else {
            hold / 2
        }
    }

    /// A group's hold timeout, in milliseconds (the default until a path names it).
    pub fn hold_timeout_ms(&self, group_uid: &str) -> u64 {
        self.groups
            .get(group_uid)
            .map(|group| group.hold_timeout_ms)
            .filter(|ms| *ms > 0)
            .unwrap_or(DEFAULT_HOLD_TIMEOUT_MS)
    }

    /// Held writes failed by the hold timeout, per volume, until the group resumes or freezes again.
    pub fn hold_timeouts(&self) -> Vec<HoldTimeout> {
        self.groups
            .values()
            .flat_map(|g| g.hold_timeouts.values().map(|(record, _)| record.clone()))
            .collect()
    }

    /// The highest point seen or carried per group (for `SubscribeRequest.seen`, rule 8).
    pub fn seen(&self) -> Vec<GroupEpoch> {
        let mut best: BTreeMap<String, Level> = BTreeMap::new();
        for (uid, group) in &self.groups {
            if let Some(level) = group.seen {
                best.insert(uid.clone(), level);
            }
        }
        for volume in self.volumes.values() {
            if let (Some(uid), Some(level)) = (&volume.group_uid, volume.level) {
                let entry = best.entry(uid.clone()).or_insert(level);
                if level > *entry {
                    *entry = level;
                }
            }
        }
        best.into_iter()
            .map(|(group_uid, level)| GroupEpoch {
                group_uid,
                epoch: level.epoch,
                stage: level.stage(),
            })
            .collect()
    }

    /// The highest epoch seen for a group by a path.
    pub fn seen_epoch(&self, group_uid: &str) -> Option<u64> {
        self.groups
            .get(group_uid)
            .and_then(|g| g.seen)
            .map(|l| l.epoch)
    }

    /// A known group's name, if it has one (cheap: no view of its volumes is built).
    pub fn group_name(&self, uid: &str) -> Option<&str> {
        self.groups
            .get(uid)
            .map(|group| group.name.as_str())
            .filter(|name| !name.is_empty())
    }

    /// Groups, for status and metrics.
    pub fn groups(&self) -> Vec<GroupView> {
        let mut scratch = Outcome::default();
        let local = self.local_volumes(&mut scratch);
        self.groups
            .iter()
            .map(|(uid, g)| GroupView {
                group_uid: uid.clone(),
                name: g.name.clone(),
                seen: g.seen,
                fail_safe: g.fail_safe,
                volumes: local
                    .get(uid)
                    .map(|v| v.iter().cloned().collect())
                    .unwrap_or_default(),
                last_ack: g.last_ack.clone(),
            })
            .collect()
    }

    /// Volumes, for status.
    pub fn volumes(&self) -> Vec<VolumeView> {
        self.volumes
            .iter()
            .map(|(name, v)| VolumeView {
                volume: name.clone(),
                group_uid: v.group_uid.clone(),
                level: v.level,
                confirmed: v.confirmed,
                resyncing: v.resyncing,
            })
            .collect()
    }

    /// True once the replicator's inventory is known.
    pub fn inventory_known(&self) -> bool {
        self.inventory_known
    }

    /// True while some group holds an outstanding failure and has no fail-safe in force.
    pub fn holds_unreported_risk(&self) -> bool {
        self.groups
            .values()
            .any(|g| !g.failures.is_empty() && g.fail_safe.is_none())
    }
}

/// The replicator steps that bring a volume from `from` to `to` (`from` < `to`, not satisfying it).
/// Whether a `Configure` confirming a volume at `target` may start a resync in its replicator: one into
/// replication copies whatever the volume holds dirty first (restarted mid-resync, or restarted while its
/// group resumed), so it is not in sync until a listing says so.
fn confirmed_into_replication(target: Level) -> bool {
    target.rank == Rank::Resume
}

#[derive(Debug, Default)]
struct Steps {
    suspend: bool,
    release: bool,
    resume: bool,
    /// Record the new point with a `Configure` (no transition carries it).
    configure: bool,
}

fn steps(from: Option<Level>, to: Level) -> Steps {
    let e = to.epoch;
    match to.rank {
        Rank::Freeze | Rank::FailSafe => Steps {
            suspend: true,
            ..Steps::default()
        },
        Rank::Release => Steps {
            suspend: from != Some(Level::point(e, Stage::Freeze)),
            release: true,
            ..Steps::default()
        },
        Rank::Resume => match from {
            // Never frozen at all, or replicating at an older epoch: it already copies; record it.
            None => Steps {
                configure: true,
                ..Steps::default()
            },
            Some(level) if level.rank == Rank::Resume => Steps {
                configure: true,
                ..Steps::default()
            },
            // Suspended or released at this epoch: resume.
            Some(level) if level.epoch == e && level.rank != Rank::FailSafe => Steps {
                resume: true,
                ..Steps::default()
            },
            // Suspended (or fail-safe) or released at an older epoch: move the suspension to this epoch
            // first, so that Resume(e) names the epoch the volume is at.
            Some(_) => Steps {
                suspend: true,
                resume: true,
                ..Steps::default()
            },
        },
    }
}

#[cfg(test)]
mod tests;
