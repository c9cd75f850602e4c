//! The control system's decisions, pure: a group as persisted + one event → the new status, the
//! directives to send and the events to record. No I/O here: the engine ([`crate::engine`]) fetches,
//! calls [`decide`], then applies.
//!
//! The safety rules of DESIGN.md live in this file:
//! - rule 1: a freeze is sent at once, before the new epoch is persisted ([`Decision::freeze_now`]); a
//!   release or resume is sent only once the status naming it is persisted ([`Decision::after_persist`]),
//!   and a release needs every resolved member volume to have acknowledged the freeze;
//! - rule 4: a report raises the epoch only when the epoch its sender had seen is the current one and the
//!   group is replicating, so duplicated and replayed reports are harmless;
//! - rule 5: Frozen needs MembersResolved and an acknowledgement from every resolved volume; the
//!   consistent image lists exactly the volumes that acknowledged;
//! - rule 8: the highest epoch any member reports having seen or enforced is adopted.
//!
//! Hold timeouts (held writes failed with an I/O error) are recorded per volume for the current epoch
//! only, as running totals (a report repeated on both paths counts once), and cleared when the group
//! freezes again or resumes.
//!
//! A group that never froze is "replicating at (0, Resume)": a missing `status.stage` means Resume.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use lockstep_api::{
    conditions::{self, ConditionUpdate},
    domain::{
        GroupEpoch, MAX_EPOCH, Path, Phase, Policy, Stage, VolumeState, condition,
        kept_image_failure,
    },
    v1alpha1::{
        Acknowledgement, ConsistencyGroup, ConsistencyGroupStatus, ConsistentImage, FreezeTrigger,
        HoldTimeouts, ImageVolume, MemberVolumeStatus, VolumeHoldTimeout,
    },
};

/// Something the control system heard about a group.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A node could not copy a write.
    Report(Report),
    /// A node enforced a directive on some volumes.
    Ack(Ack),
    /// Held writes of a volume failed with an I/O error at the hold timeout.
    HoldTimedOut(HoldTimeoutReport),
    /// A member says it has seen or enforced this epoch of the group (rule 8), e.g. on reconnecting.
    Seen {
        /// The epoch seen.
        epoch: u64,
    },
    /// Nothing new arrived: evaluate the spec's intents and the acknowledgements again.
    Evaluate,
}

/// A copy failure, as a sidecar reported it on one path.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// The path that brought it.
    pub path: Path,
    /// The reporting node's cluster and name.
    pub cluster: String,
    /// The reporting node.
    pub node: String,
    /// The volume whose copy failed.
    pub volume_handle: String,
    /// The highest epoch of the group the sender had seen.
    pub epoch_seen: u64,
    /// The replicator's error, for people.
    pub message: String,
}

/// Held writes of one volume failed by the hold timeout, as a sidecar reported them: a running total for
/// (volume, epoch), so the same report on both paths, or replayed, counts once.
#[derive(Debug, Clone, PartialEq)]
pub struct HoldTimeoutReport {
    /// The path that brought it.
    pub path: Path,
    /// The cluster of the reporting node: a volume is (cluster, volume handle).
    pub cluster: String,
    /// The volume whose held writes failed.
    pub volume_handle: String,
    /// The group's epoch the sender had seen when they failed.
    pub epoch: u64,
    /// How many held writes of the volume failed at that epoch so far.
    pub failed_writes: u64,
    /// When the first of them failed.
    pub since: Option<Time>,
}

/// An acknowledgement: these volumes are at (epoch, stage).
#[derive(Debug, Clone, PartialEq)]
pub struct Ack {
    /// The path that brought it.
    pub path: Path,
    /// The cluster of the acknowledging node: a volume is (cluster, volume handle).
    pub cluster: String,
    /// The epoch enforced.
    pub epoch: u64,
    /// The stage enforced.
    pub stage: Stage,
    /// The volumes now at that point.
    pub volume_handles: Vec<String>,
    /// The node suspended by its own fail-safe, not by directive.
    pub fail_safe: bool,
}

/// An event for people, recorded on the group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// Warning (something failed) or Normal.
    pub warning: bool,
    /// CamelCase reason.
    pub reason: &'static str,
    /// A sentence.
    pub message: String,
}

/// What to do about one event.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The status to persist (with the resourceVersion the group was read at).
    pub status: ConsistencyGroupStatus,
    /// A freeze to send on both paths now, before `status` is persisted (rule 1: freezing is always safe).
    pub freeze_now: Option<GroupEpoch>,
    /// A release or resume to send on both paths only after `status` was persisted.
    pub after_persist: Option<GroupEpoch>,
    /// Events for people.
    pub notes: Vec<Note>,
}

/// Why no decision could be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecideError {
    /// The group has no UID yet (it was never persisted); epochs belong to a UID.
    #[error("the group {0:?} has no metadata.uid")]
    NoUid(String),
}

fn replicating(status: &ConsistencyGroupStatus) -> bool {
    status.position().1 == Stage::Resume
}

/// Decides what one event means for a group as persisted.
pub fn decide(
    group: &ConsistencyGroup,
    event: &Event,
    now: &Time,
) -> Result<Decision, DecideError> {
    let persisted = group.status.as_ref().map_or(0, |status| status.epoch);
    decide_adopting_up_to(group, event, now, next_epoch(persisted))
}

/// The epoch after `epoch`, or none when `epoch` is already the largest Lockstep uses ([`MAX_EPOCH`]).
fn next_epoch(epoch: u64) -> Option<u64> {
    epoch.checked_add(1).filter(|next| *next <= MAX_EPOCH)
}

/// Decides one event, adopting an epoch a member claims to have seen only up to `adopt_limit`: the epoch
/// after the persisted one, the only one that can have been sent before it was persisted (rule 8).
fn decide_adopting_up_to(
    group: &ConsistencyGroup,
    event: &Event,
    now: &Time,
    adopt_limit: Option<u64>,
) -> Result<Decision, DecideError> {
    let mut decision = Decision {
        status: group.status.clone().unwrap_or_default(),
        freeze_now: None,
        after_persist: None,
        notes: Vec::new(),
    };
    decide_into(group, &mut decision, event, now, adopt_limit)?;
    Ok(decision)
}

/// Decides one event on `decision.status` in place: the status as decided so far (the group's own
/// `status` is not read), so that a batch works on one copy of a status of thousands of volumes.
fn decide_into(
    group: &ConsistencyGroup,
    decision: &mut Decision,
    event: &Event,
    now: &Time,
    adopt_limit: Option<u64>,
) -> Result<(), DecideError> {
    let uid = match group.metadata.uid.as_deref() {
        Some(uid) => uid.to_owned(),
        None => {
            return Err(DecideError::NoUid(
                group.metadata.name.clone().unwrap_or_default(),
            ));
        }
    };
    let generation = group.metadata.generation;
    let epoch_before = decision.status.epoch;
    if group.metadata.deletion_timestamp.is_some() {
        decide_deletion(group, &uid, event, decision, now);
        crate::history::record(epoch_before, &mut decision.status, now);
        decision.status.observed_generation = generation;
        return Ok(());
    }
    let status = &mut decision.status;

    match event {
        Event::Report(report) => {
            if report.epoch_seen > status.epoch {
                adopt(decision, &uid, report.epoch_seen, adopt_limit, now);
            } else if report.epoch_seen == status.epoch && replicating(status) {
                let trigger = FreezeTrigger {
                    reason: "CopyFailed".to_owned(),
                    cluster: Some(report.cluster.clone()),
                    node: Some(report.node.clone()),
                    volume_handle: Some(report.volume_handle.clone()),
                    path: Some(report.path),
                    message: Some(report.message.clone()),
                    at: Some(now.clone()),
                };
                freeze(decision, &uid, trigger);
            }
            // Marked after the freeze decided which volumes were in sync as it began: this one was (its
            // secondary never got the write whose copy failed).
            mark_held(&mut decision.status, report);
        }
        Event::Ack(ack) => {
            if ack.epoch > status.epoch {
                adopt(decision, &uid, ack.epoch, adopt_limit, now);
            } else if ack.fail_safe && ack.epoch == status.epoch && replicating(status) {
                // A node suspended on its own at the current epoch: treat it as the failure it stands for.
                let trigger = FreezeTrigger {
                    reason: "FailSafe".to_owned(),
                    cluster: Some(ack.cluster.clone()),
                    node: None,
                    volume_handle: ack.volume_handles.first().cloned(),
                    path: Some(ack.path),
                    message: Some(
                        "a sidecar reached neither path and suspended its volumes".to_owned(),
                    ),
                    at: Some(now.clone()),
                };
                freeze(decision, &uid, trigger);
            }
            // An acknowledgement of an epoch that was refused is no acknowledgement of anything.
            if ack.epoch <= decision.status.epoch {
                record_ack(&mut decision.status, ack, now);
            }
        }
        Event::Seen { epoch } => {
            if *epoch > decision.status.epoch {
                adopt(decision, &uid, *epoch, adopt_limit, now);
            }
        }
        Event::HoldTimedOut(report) => record_hold_timeout(decision, group, report),
        Event::Evaluate => {}
    }

    // A planned freeze names the epoch it is meant for.
    if let Some(intent) = group.spec.freeze
        && intent.epoch == decision.status.epoch
        && replicating(&decision.status)
        && decision.freeze_now.is_none()
    {
        let trigger = FreezeTrigger {
            reason: "Planned".to_owned(),
            cluster: None,
            node: None,
            volume_handle: None,
            path: None,
            message: Some(format!("spec.freeze.epoch named epoch {}", intent.epoch)),
            at: Some(now.clone()),
        };
        freeze(decision, &uid, trigger);
    }

    advance(decision, group, &uid);
    // Hold timeouts belong to the current epoch's freeze: a new freeze or a resume clears them.
    let status = &mut decision.status;
    if status
        .hold_timeouts
        .as_ref()
        .is_some_and(|held| held.epoch != status.epoch || replicating(status))
    {
        status.hold_timeouts = None;
    }
    set_conditions(&mut decision.status, group, generation, now);
    crate::history::record(epoch_before, &mut decision.status, now);
    decision.status.observed_generation = generation;
    Ok(())
}

/// Decides a batch of events that queued up for one group while an earlier decision was being persisted,
/// as if each had been decided and persisted in turn, so that the batch costs one status write.
///
/// The merged decision sends the highest freeze of the batch at once (a freeze at a higher epoch
/// suspends as well as a lower one), sends after persisting only the highest release or resume, and only
/// when it lies beyond that freeze (a release of an epoch the batch froze past would be refused), and
/// keeps every note in order.
pub fn decide_batch(
    group: &ConsistencyGroup,
    events: &[Event],
    now: &Time,
) -> Result<Decision, DecideError> {
    decide_batch_on(group, group.status.clone(), events, now)
}

/// [`decide_batch`] on `status`, the group's status as persisted (with its volumes), taken by value:
/// the group's own `status` is not read, and the status of thousands of volumes is not copied.
pub fn decide_batch_on(
    group: &ConsistencyGroup,
    status: Option<ConsistencyGroupStatus>,
    events: &[Event],
    now: &Time,
) -> Result<Decision, DecideError> {
    let adopt_limit = next_epoch(status.as_ref().map_or(0, |status| status.epoch));
    // Reports that arrived together froze the group together: one naming a secondary that could not
    // keep the image goes first, so that the freeze's trigger (and `ImageKept`) says so.
    let mut events: Vec<&Event> = events.iter().collect();
    events.sort_by_key(|event| {
        !matches!(event, Event::Report(report)
            if lockstep_api::domain::kept_image_failure(&report.message).is_some())
    });
    if events.is_empty() {
        events.push(&Event::Evaluate);
    }
    let mut merged = Decision {
        status: status.unwrap_or_default(),
        freeze_now: None,
        after_persist: None,
        notes: Vec::new(),
    };
    for event in events {
        let (freeze_before, after_before) = (merged.freeze_now.take(), merged.after_persist.take());
        decide_into(group, &mut merged, event, now, adopt_limit)?;
        merged.freeze_now = highest(freeze_before, merged.freeze_now.take());
        merged.after_persist = highest(after_before, merged.after_persist.take());
    }
    if let (Some(after), Some(freeze)) = (&merged.after_persist, &merged.freeze_now)
        && (after.epoch, after.stage) <= (freeze.epoch, freeze.stage)
    {
        merged.after_persist = None;
    }
    Ok(merged)
}

fn highest(a: Option<GroupEpoch>, b: Option<GroupEpoch>) -> Option<GroupEpoch> {
    match (a, b) {
        (Some(a), Some(b)) => Some(if (b.epoch, b.stage) >= (a.epoch, a.stage) {
            b
        } else {
            a
        }),
        (a, b) => a.or(b),
    }
}

/// A group being deleted ends its guarantees openly (rule 9): no new freeze; a frozen or released group
/// resumes normal replication at its current epoch, so that no volume stays held; acknowledgements are
/// still recorded so the finalizer knows when every volume resumed.
fn decide_deletion(
    group: &ConsistencyGroup,
    uid: &str,
    event: &Event,
    decision: &mut Decision,
    now: &Time,
) {
    if let Event::Ack(ack) = event
        && ack.epoch == decision.status.epoch
    {
        record_ack(&mut decision.status, ack, now);
    }
    let status = &mut decision.status;
    if !replicating(status) {
        status.stage = Some(Stage::Resume);
        status.phase = Some(Phase::Resyncing);
        decision.after_persist = Some(GroupEpoch {
            group_uid: uid.to_owned(),
            epoch: status.epoch,
            stage: Stage::Resume,
        });
        decision.notes.push(Note {
            warning: true,
            reason: "Deleting",
            message: format!(
                "the group {} is being deleted: its guarantees end; releasing held writes and resuming normal replication at epoch {}",
                group.metadata.name.as_deref().unwrap_or_default(),
                status.epoch
            ),
        });
    }
}

/// Whether a group being deleted may go: every member volume acknowledged the resume of its current
/// epoch (or the group never froze), or `deadline_passed`. Returns the volumes that did not acknowledge.
pub fn deletion_outcome(
    status: &ConsistencyGroupStatus,
    deadline_passed: bool,
) -> Option<Vec<String>> {
    let (epoch, _) = status.position();
    let never_froze = epoch == 0;
    let missing: Vec<String> = unacknowledged(status, epoch, Stage::Resume)
        .iter()
        .map(|member| {
            member
                .volume_handle
                .clone()
                .unwrap_or_else(|| member.pvc.clone())
        })
        .collect();
    (never_froze || missing.is_empty() || deadline_passed)
        .then(|| if never_froze { Vec::new() } else { missing })
}

/// Raises the epoch by one and freezes.
fn freeze(decision: &mut Decision, uid: &str, trigger: FreezeTrigger) {
    let status = &mut decision.status;
    let Some(epoch) = next_epoch(status.epoch) else {
        decision.notes.push(Note {
            warning: true,
            reason: "EpochsExhausted",
            message: format!(
                "cannot freeze: epoch {} is the largest Lockstep uses ({MAX_EPOCH}); recreate the group to start again from epoch 0",
                status.epoch
            ),
        });
        return;
    };
    let keep = keeps_older_image(status);
    begin_image(status, epoch);
    status.epoch = epoch;
    status.stage = Some(Stage::Freeze);
    status.phase = Some(Phase::Freezing);
    if !keep {
        status.consistent_image = None;
    }
    decision.notes.push(Note {
        warning: true,
        reason: "Freezing",
        message: format!(
            "freezing every member at epoch {} ({}{})",
            status.epoch,
            trigger.reason,
            trigger
                .volume_handle
                .as_ref()
                .map(|volume| format!(" on volume {volume}"))
                .unwrap_or_default()
        ),
    });
    if let Some((reason, message)) = image_not_kept(&trigger, status.consistent_image.as_ref()) {
        decision.notes.push(Note {
            warning: true,
            reason,
            message,
        });
    }
    status.trigger = Some(trigger);
    decision.freeze_now = Some(GroupEpoch {
        group_uid: uid.to_owned(),
        epoch: status.epoch,
        stage: Stage::Freeze,
    });
}

/// Adopts a higher epoch a member has seen or enforced (rule 8): a freeze that was sent but never persisted.
/// Only the epoch after the persisted one can have been sent so: a claim beyond `limit` is refused (a
/// Warning), never adopted.
fn adopt(decision: &mut Decision, uid: &str, epoch: u64, limit: Option<u64>, now: &Time) {
    #[cfg(feature = "mutants")]
    let limit = if lockstep_api::mutants::active(lockstep_api::mutants::Mutant::AdoptAnyHigherEpoch)
    {
        Some(u64::MAX)
    } else {
        limit
    };
    if limit.is_none_or(|limit| epoch > limit) {
        decision.notes.push(Note {
            warning: true,
            reason: "EpochRefused",
            message: format!(
                "refused epoch {epoch} that a member claims to have seen: the group is at epoch {} and never sent a later one than {}",
                decision.status.epoch,
                limit.map_or_else(|| "that".to_owned(), |limit| limit.to_string())
            ),
        });
        return;
    }
    let status = &mut decision.status;
    let keep = keeps_older_image(status);
    begin_image(status, epoch);
    status.epoch = epoch;
    status.stage = Some(Stage::Freeze);
    status.phase = Some(Phase::Freezing);
    if !keep {
        status.consistent_image = None;
    }
    status.trigger = Some(FreezeTrigger {
        reason: "Adopted".to_owned(),
        cluster: None,
        node: None,
        volume_handle: None,
        path: None,
        message: Some(format!(
            "a member had seen epoch {epoch}, which was never persisted"
        )),
        at: Some(now.clone()),
    });
    decision.notes.push(Note {
        warning: true,
        reason: "FreezeAdopted",
        message: format!("finishing the freeze at epoch {epoch} that a member had already seen"),
    });
    decision.freeze_now = Some(GroupEpoch {
        group_uid: uid.to_owned(),
        epoch,
        stage: Stage::Freeze,
    });
}

/// Records a volume's running total of held writes failed at the current epoch of a freeze; a new
/// volume gets a Warning. Totals only grow: a lower or repeated count changes nothing.
fn record_hold_timeout(
    decision: &mut Decision,
    group: &ConsistencyGroup,
    report: &HoldTimeoutReport,
) {
    let status = &mut decision.status;
    let member = status
        .members
        .iter()
        .any(|member| is_volume(member, &report.cluster, &report.volume_handle));
    if report.failed_writes == 0 || report.epoch != status.epoch || replicating(status) || !member {
        return;
    }
    let epoch = status.epoch;
    let held = status.hold_timeouts.get_or_insert_with(|| HoldTimeouts {
        epoch,
        failed_writes: 0,
        volumes: Vec::new(),
        volume_count: 0,
        since: None,
    });
    if held.epoch != epoch {
        *held = HoldTimeouts {
            epoch,
            failed_writes: 0,
            volumes: Vec::new(),
            volume_count: 0,
            since: None,
        };
    }
    let known = held.volumes.iter_mut().find(|volume| {
        volume.cluster == report.cluster && volume.volume_handle == report.volume_handle
    });
    match known {
        Some(volume) if volume.failed_writes >= report.failed_writes => return,
        Some(volume) => volume.failed_writes = report.failed_writes,
        None => {
            held.volumes.push(VolumeHoldTimeout {
                cluster: report.cluster.clone(),
                volume_handle: report.volume_handle.clone(),
                failed_writes: report.failed_writes,
                since: report.since.clone(),
            });
            held.volumes.sort_by(|a, b| {
                (&a.cluster, &a.volume_handle).cmp(&(&b.cluster, &b.volume_handle))
            });
            decision.notes.push(Note {
                warning: true,
                reason: "HoldTimedOut",
                message: format!(
                    "{} held writes of volume {}/{} failed with an I/O error after holdTimeout {} at epoch {epoch}; its writes keep failing until {}",
                    report.failed_writes,
                    report.cluster,
                    report.volume_handle,
                    group.spec.hold_timeout,
                    until_released(group, epoch),
                ),
            });
        }
    }
    held.failed_writes = held.volumes.iter().fold(0u64, |total, volume| {
        total.saturating_add(volume.failed_writes)
    });
    held.since = held
        .volumes
        .iter()
        .filter_map(|volume| volume.since.clone())
        .min_by_key(|since| since.0);
}

/// What ends failing writes: the release a person gives (FreezeAndStop) or the one that follows the freeze.
fn until_released(group: &ConsistencyGroup, epoch: u64) -> String {
    match group.spec.policy {
        Policy::FreezeAndStop => format!("the release: set spec.release.epoch: {epoch}"),
        Policy::FreezeAndGo => "every member is frozen and the writes are released".to_owned(),
    }
}

/// What a persisted status change adds to the hold timeouts: failed writes newly counted, and the volumes
/// newly listed as (cluster, volume handle) (for the metric and the Events on their claims).
pub fn hold_timeout_growth(
    before: Option<&HoldTimeouts>,
    after: Option<&HoldTimeouts>,
) -> (u64, Vec<(String, String)>) {
    let Some(after) = after else {
        return (0, Vec::new());
    };
    let before = before.filter(|before| before.epoch == after.epoch);
    let counted = |cluster: &str, handle: &str| {
        before
            .and_then(|before| {
                before
                    .volumes
                    .iter()
                    .find(|v| v.cluster == cluster && v.volume_handle == handle)
            })
            .map_or(0, |volume| volume.failed_writes)
    };
    let mut added = 0u64;
    let mut new_volumes = Vec::new();
    for volume in &after.volumes {
        let was = counted(&volume.cluster, &volume.volume_handle);
        added = added.saturating_add(volume.failed_writes.saturating_sub(was));
        if was == 0 {
            new_volumes.push((volume.cluster.clone(), volume.volume_handle.clone()));
        }
    }
    (added, new_volumes)
}

/// The sentence conditions carry while held writes are failing at the current epoch.
fn hold_timeout_sentence(
    status: &ConsistencyGroupStatus,
    group: &ConsistencyGroup,
) -> Option<String> {
    let held = status.hold_timeouts.as_ref()?;
    let volumes: Vec<String> = held
        .volumes
        .iter()
        .map(|volume| format!("{}/{}", volume.cluster, volume.volume_handle))
        .collect();
    let mut sentence = format!(
        "{} held writes failed with an I/O error (EIO) after holdTimeout {} on {}",
        held.failed_writes,
        group.spec.hold_timeout,
        volumes.join(", ")
    );
    if status.stage == Some(Stage::Freeze) {
        sentence.push_str(&format!(
            "; writes keep failing until {}",
            until_released(group, held.epoch)
        ));
    }
    Some(sentence)
}

/// Whether a freeze beginning now leaves the last complete image standing (rule 7): the secondaries keep
/// it through a resync (their undo logs), so a freeze during the resync — or during a freeze that hit
/// one — does not replace it with an image some volumes are missing.
fn keeps_older_image(status: &ConsistencyGroupStatus) -> bool {
    let (epoch, stage) = status.position();
    status.consistent_image.as_ref().is_some_and(|image| {
        image.epoch < epoch || (stage == Stage::Resume && status.phase == Some(Phase::Resyncing))
    })
}

/// The image of an older epoch the secondaries keep while the current epoch has none complete.
fn older_image_kept(status: &ConsistencyGroupStatus) -> Option<u64> {
    status
        .consistent_image
        .as_ref()
        .map(|image| image.epoch)
        .filter(|epoch| *epoch < status.epoch)
}

/// Decides, as a freeze at `new_epoch` begins, which member volumes its image can hold (rules 5 and 7):
/// when the group was replicating, the volumes in sync then; when it was already frozen or released, the
/// volumes of the image it held (their secondaries have not moved since). A volume that joins later, or
/// was still resyncing, stays outside until the group replicates in sync again.
pub fn begin_image(status: &mut ConsistencyGroupStatus, new_epoch: u64) {
    let (epoch, stage) = status.position();
    let resyncing = status.phase == Some(Phase::Resyncing);
    for member in &mut status.members {
        let in_image = match stage {
            Stage::Resume => in_sync(member, epoch, resyncing),
            Stage::Freeze | Stage::Release => member.image_epoch == Some(epoch),
        };
        member.image_epoch = in_image.then_some(new_epoch);
    }
}

/// Whether a member volume's secondary is in sync with its primary while the group is at (epoch, Resume).
/// During a resync only a volume that finished it is; otherwise one whose sidecar reports it replicating,
/// holding a write whose copy failed (its secondary never got it), or suspended (its writes held: a
/// report can show the suspension of the very freeze being decided, when a decision is retried after a
/// conflict), or that no sidecar reported a state for yet. A volume primary-only, resyncing, in no group
/// yet, or not yet confirmed is not.
fn in_sync(member: &MemberVolumeStatus, epoch: u64, resyncing: bool) -> bool {
    if resyncing {
        return member.state == Some(VolumeState::Replicating)
            && member
                .acknowledged
                .as_ref()
                .is_some_and(|ack| (ack.epoch, ack.stage) >= (epoch, Stage::Resume));
    }
    matches!(
        member.state,
        None | Some(VolumeState::Replicating)
            | Some(VolumeState::Held)
            | Some(VolumeState::Suspended)
    )
}

/// Whether a member volume is in the group's consistent image now: at (epoch, Resume), in sync; during a
/// freeze or after its release, in the image of that freeze and acknowledged it.
fn in_image(member: &MemberVolumeStatus, epoch: u64, stage: Stage) -> bool {
    match stage {
        Stage::Resume => in_sync(member, epoch, false),
        Stage::Freeze | Stage::Release => {
            member.image_epoch == Some(epoch)
                && member
                    .acknowledged
                    .as_ref()
                    .is_some_and(|ack| (ack.epoch, ack.stage) >= (epoch, Stage::Freeze))
        }
    }
}

/// How many volumes a condition names before it only counts the rest.
const NAMED_IN_CONDITION: usize = 20;

/// "a, b, c and 5 more": at most [`NAMED_IN_CONDITION`] member volumes named, the rest counted.
fn name_some(members: &[&MemberVolumeStatus]) -> String {
    let mut text = members
        .iter()
        .take(NAMED_IN_CONDITION)
        .map(|member| format!("{}/{}/{}", member.cluster, member.namespace, member.pvc))
        .collect::<Vec<_>>()
        .join(", ");
    if members.len() > NAMED_IN_CONDITION {
        text.push_str(&format!(" and {} more", members.len() - NAMED_IN_CONDITION));
    }
    text
}

/// If `trigger` is a secondary that could not keep the frozen image through a resync (its copy failure
/// says why, e.g. out of undo-log space): the reason and a sentence naming the volume and its node.
fn image_not_kept(
    trigger: &FreezeTrigger,
    image: Option<&ConsistentImage>,
) -> Option<(&'static str, String)> {
    if trigger.reason != "CopyFailed" {
        return None;
    }
    let error = trigger.message.as_deref()?;
    let reason = kept_image_failure(error)?;
    let kept = image.map_or_else(
        || "the secondaries hold no complete image".to_owned(),
        |image| {
            format!(
                "the secondaries still hold the image of epoch {}",
                image.epoch
            )
        },
    );
    Some((
        reason,
        format!(
            "the secondary of volume {} (node {}, cluster {}) cannot keep the frozen image through a resync, so the resync was refused ({error}); {kept}. Free space for its undo log (or raise the replicator's --undo-log-max-bytes), then resync again",
            trigger.volume_handle.as_deref().unwrap_or("?"),
            trigger.node.as_deref().unwrap_or("?"),
            trigger.cluster.as_deref().unwrap_or("?"),
        ),
    ))
}

/// The ImageKept condition: False while the group's last freeze was a secondary failing to keep the image
/// through a resync and the group has not replicated since; True otherwise.
fn image_kept_condition(status: &ConsistencyGroupStatus) -> ConditionUpdate<'static> {
    let phase = status.phase.unwrap_or(Phase::Replicating);
    let failed = status
        .trigger
        .as_ref()
        .filter(|_| phase != Phase::Replicating)
        .and_then(|trigger| image_not_kept(trigger, status.consistent_image.as_ref()));
    match failed {
        Some((reason, message)) => ConditionUpdate {
            type_: condition::IMAGE_KEPT,
            status: false,
            reason,
            message,
        },
        None => ConditionUpdate {
            type_: condition::IMAGE_KEPT,
            status: true,
            reason: "NoFailure",
            message: "no secondary has failed to keep the frozen image through a resync".to_owned(),
        },
    }
}

/// The ConsistentImage condition: True only when every member is resolved and every resolved volume is in
/// the image (DESIGN rule 5), never claimed while a freeze is still collecting acknowledgements or a
/// resync is copying.
fn image_condition(status: &ConsistencyGroupStatus) -> ConditionUpdate<'static> {
    let (epoch, stage) = status.position();
    let phase = status.phase.unwrap_or(Phase::Replicating);
    let no = |reason, message| ConditionUpdate {
        type_: condition::CONSISTENT_IMAGE,
        status: false,
        reason,
        message,
    };
    if !members_resolved(status) {
        let unresolved = status
            .members
            .iter()
            .filter(|member| member.volume_handle.is_none())
            .count();
        return no(
            "MembersNotResolved",
            format!(
                "not every member is resolved to a volume ({} of {} member volumes resolved; see MembersResolved): no image can be claimed",
                status.members.len() - unresolved,
                status.members.len()
            ),
        );
    }
    let kept = status.consistent_image.as_ref().map(|image| image.epoch);
    if stage == Stage::Resume && phase == Phase::Resyncing {
        let keeping = kept.map_or_else(String::new, |kept| {
            format!("; they keep the image of epoch {kept} (undo logs): roll them back to it if the primaries are lost")
        });
        return no(
            "Resyncing",
            format!(
                "members are copying their dirty regions: the secondaries are not a consistent image until every member is in sync{keeping}"
            ),
        );
    }
    if let Some(kept) = older_image_kept(status)
        && stage != Stage::Resume
        && phase != Phase::Freezing
    {
        return no(
            "OlderImageKept",
            format!(
                "the image of epoch {epoch} is incomplete (members were resyncing when it froze); the secondaries keep the image of epoch {kept} (undo logs): roll them back to it, or resync to bring every member in"
            ),
        );
    }
    if stage == Stage::Freeze && phase != Phase::Frozen {
        return no(
            "Freezing",
            format!(
                "freezing at epoch {epoch}: the image is known once every member volume acknowledged the freeze"
            ),
        );
    }
    let outside: Vec<&MemberVolumeStatus> = status
        .members
        .iter()
        .filter(|member| !in_image(member, epoch, stage))
        .collect();
    if !outside.is_empty() {
        let what = match stage {
            Stage::Resume => "not replicating in sync".to_owned(),
            Stage::Freeze | Stage::Release => format!(
                "outside the image of epoch {epoch} (not in sync when the freeze began); a resync brings them in"
            ),
        };
        return no(
            "VolumesOutsideImage",
            format!(
                "{} of {} member volumes are {what}: {}",
                outside.len(),
                status.members.len(),
                name_some(&outside)
            ),
        );
    }
    ConditionUpdate {
        type_: condition::CONSISTENT_IMAGE,
        status: true,
        reason: "DependentWriteConsistent",
        message: match stage {
            Stage::Resume => format!(
                "all {} member volumes replicate in sync: the secondaries together hold a state the application could have seen at one instant",
                status.members.len()
            ),
            Stage::Freeze | Stage::Release => format!(
                "the secondaries of all {} member volumes hold the image of epoch {epoch}, a state the application could have seen at one instant",
                status.members.len()
            ),
        },
    }
}

/// Whether a member is the volume (cluster, volume handle): a handle alone names no volume, since another
/// cluster may have a volume of the same name.
fn is_volume(member: &MemberVolumeStatus, cluster: &str, volume_handle: &str) -> bool {
    member.cluster == cluster && member.volume_handle.as_deref() == Some(volume_handle)
}

/// Marks a reported volume Held, unless it already acknowledged a later epoch than the report saw: then the
/// report is the failure's late copy on its second path (or a replay), and the volume has moved on
/// (Suspended by the freeze it caused, or Running after its release); marking it Held again would show a
/// frozen volume as still holding writes. A volume last reported Resyncing stays so: its copy failed
/// mid-resync, its secondary is not in sync, and Held would put it in the image of the freeze its failure
/// starts.
fn mark_held(status: &mut ConsistencyGroupStatus, report: &Report) {
    for member in &mut status.members {
        let moved_on = member
            .acknowledged
            .as_ref()
            .is_some_and(|ack| ack.epoch > report.epoch_seen);
        let resyncing = member.state == Some(VolumeState::Resyncing);
        if is_volume(member, &report.cluster, &report.volume_handle) && !moved_on && !resyncing {
            member.state = Some(VolumeState::Held);
        }
    }
}

/// Records an acknowledgement on each named member volume, never moving one backwards; the first path to
/// bring a point is the one recorded.
fn record_ack(status: &mut ConsistencyGroupStatus, ack: &Ack, now: &Time) {
    let acked: std::collections::HashSet<&str> =
        ack.volume_handles.iter().map(String::as_str).collect();
    for member in &mut status.members {
        let Some(handle) = member.volume_handle.as_deref() else {
            continue;
        };
        let other_cluster = member.cluster != ack.cluster;
        #[cfg(feature = "mutants")]
        let other_cluster = other_cluster
            && !lockstep_api::mutants::active(
                lockstep_api::mutants::Mutant::AckMatchedAcrossClusters,
            );
        if other_cluster || !acked.contains(handle) {
            continue;
        }
        let epoch = ack.epoch;
        #[cfg(feature = "mutants")]
        let epoch =
            if lockstep_api::mutants::active(lockstep_api::mutants::Mutant::AckCountedForNextEpoch)
            {
                epoch + 1
            } else {
                epoch
            };
        let newer = member
            .acknowledged
            .as_ref()
            .is_none_or(|old| (epoch, ack.stage) > (old.epoch, old.stage));
        if newer {
            member.acknowledged = Some(Acknowledgement {
                epoch,
                stage: ack.stage,
                path: ack.path,
                fail_safe: ack.fail_safe,
                at: Some(now.clone()),
            });
            member.state = Some(match ack.stage {
                Stage::Freeze => VolumeState::Suspended,
                Stage::Release => VolumeState::Running,
                Stage::Resume => VolumeState::Resyncing,
            });
        }
    }
}

fn members_resolved(status: &ConsistencyGroupStatus) -> bool {
    conditions::status_of(&status.conditions, condition::MEMBERS_RESOLVED) == Some(true)
        && !status.members.is_empty()
        && status
            .members
            .iter()
            .all(|member| member.volume_handle.is_some())
}

/// The member volumes that have not acknowledged (epoch, stage) or later.
fn unacknowledged(
    status: &ConsistencyGroupStatus,
    epoch: u64,
    stage: Stage,
) -> Vec<&MemberVolumeStatus> {
    status
        .members
        .iter()
        .filter(|member| {
            member
                .acknowledged
                .as_ref()
                .is_none_or(|ack| (ack.epoch, ack.stage) < (epoch, stage))
        })
        .collect()
}

/// Moves the group along its life cycle as far as the persisted acknowledgements and intents allow.
fn advance(decision: &mut Decision, group: &ConsistencyGroup, uid: &str) {
    let status = &mut decision.status;
    let (epoch, stage) = status.position();
    let unacknowledged_count = unacknowledged(status, epoch, Stage::Freeze).len();
    #[cfg(feature = "mutants")]
    let unacknowledged_count = if lockstep_api::mutants::active(
        lockstep_api::mutants::Mutant::ReleaseWithOneUnacknowledged,
    ) {
        unacknowledged_count.saturating_sub(1)
    } else {
        unacknowledged_count
    };
    let all_frozen = members_resolved(status) && unacknowledged_count == 0;
    let point = |stage| GroupEpoch {
        group_uid: uid.to_owned(),
        epoch,
        stage,
    };

    match stage {
        Stage::Freeze if !all_frozen => status.phase = Some(Phase::Freezing),
        Stage::Freeze => {
            if status.phase != Some(Phase::Frozen) {
                decision.notes.push(Note {
                    warning: false,
                    reason: "Frozen",
                    message: format!(
                        "every member volume acknowledged the freeze at epoch {epoch}"
                    ),
                });
            }
            status.phase = Some(Phase::Frozen);
            let complete = members_resolved(status)
                && status
                    .members
                    .iter()
                    .all(|member| in_image(member, epoch, Stage::Freeze));
            // An older image the secondaries keep stays until a freeze finds every member in sync.
            if complete || older_image_kept(status).is_none() {
                status.consistent_image = Some(ConsistentImage {
                    epoch,
                    volumes: status
                        .members
                        .iter()
                        .filter(|member| in_image(member, epoch, Stage::Freeze))
                        .filter_map(|member| {
                            Some(ImageVolume {
                                cluster: member.cluster.clone(),
                                volume_handle: member.volume_handle.clone()?,
                            })
                        })
                        .collect(),
                    volume_count: 0,
                });
            }
            let release_asked = group
                .spec
                .release
                .is_some_and(|intent| intent.epoch == epoch);
            if group.spec.policy == Policy::FreezeAndGo || release_asked {
                status.stage = Some(Stage::Release);
                status.phase = Some(Phase::Running);
                decision.after_persist = Some(point(Stage::Release));
                decision.notes.push(Note {
                    warning: false,
                    reason: "Released",
                    message: format!(
                        "releasing held writes at epoch {epoch}; primaries run unreplicated"
                    ),
                });
            }
        }
        Stage::Release => status.phase = Some(Phase::Running),
        Stage::Resume => {
            let resyncing = status.phase == Some(Phase::Resyncing);
            let in_sync = status.members.iter().all(|member| {
                member.state == Some(VolumeState::Replicating)
                    && member
                        .acknowledged
                        .as_ref()
                        .is_some_and(|ack| (ack.epoch, ack.stage) >= (epoch, Stage::Resume))
            });
            status.phase = Some(if resyncing && !in_sync {
                Phase::Resyncing
            } else if members_resolved(status) {
                Phase::Replicating
            } else {
                Phase::Degraded
            });
        }
    }

    // A resync names the epoch it is meant for and thaws a frozen or running group.
    let frozen_or_running = match status.position().1 {
        Stage::Freeze => status.phase == Some(Phase::Frozen),
        Stage::Release => true,
        Stage::Resume => false,
    };
    if group
        .spec
        .resync
        .is_some_and(|intent| intent.epoch == epoch)
        && frozen_or_running
        && decision.freeze_now.is_none()
    {
        status.stage = Some(Stage::Resume);
        status.phase = Some(Phase::Resyncing);
        decision.after_persist = Some(point(Stage::Resume));
        decision.notes.push(Note {
            warning: false,
            reason: "Resyncing",
            message: format!("resynchronising every member after epoch {epoch}; the secondaries are inconsistent until done"),
        });
    }
}

/// The FailoverReady condition, once `spec.failover` names an epoch: a failover is only taken from the
/// complete consistent image of a freeze at exactly that epoch (frozen, released, or resyncing with the
/// image kept in the secondaries' undo logs); any other state refuses it, saying why and what to do.
/// `image` is the ConsistentImage condition just decided.
fn failover_condition(
    status: &ConsistencyGroupStatus,
    group: &ConsistencyGroup,
    image: &ConditionUpdate<'_>,
) -> Option<ConditionUpdate<'static>> {
    let asked = group.spec.failover?.epoch;
    let (epoch, stage) = status.position();
    let phase = status.phase.unwrap_or(Phase::Replicating);
    let refused = |reason, why: String| ConditionUpdate {
        type_: condition::FAILOVER_READY,
        status: false,
        reason,
        message: format!("spec.failover.epoch {asked} refused: {why}"),
    };
    if asked != epoch {
        let now = match stage {
            Stage::Resume if phase != Phase::Resyncing => format!("replicates at epoch {epoch}"),
            _ => format!("is at epoch {epoch}"),
        };
        return Some(refused(
            "NotFrozenAtEpoch",
            format!(
                "the group {now}; a failover takes the image of the freeze at exactly its epoch (freeze the group, then name the epoch it froze at)"
            ),
        ));
    }
    let kept = status
        .consistent_image
        .as_ref()
        .is_some_and(|image| image.epoch == asked);
    match (stage, phase) {
        (Stage::Freeze, Phase::Freezing) => Some(refused(
            "NotFrozen",
            format!(
                "the group is still freezing at epoch {asked}: the image is known once every member volume acknowledged the freeze"
            ),
        )),
        (Stage::Resume, Phase::Resyncing) if kept => Some(ConditionUpdate {
            type_: condition::FAILOVER_READY,
            status: true,
            reason: "ImageKept",
            message: format!(
                "a resync after epoch {asked} is copying: the secondaries keep the image of epoch {asked} in their undo logs and are rolled back to it when promoted (README \"Disaster recovery\")"
            ),
        }),
        (Stage::Resume, Phase::Resyncing) => Some(refused(
            "ImageIncomplete",
            format!(
                "a resync after epoch {asked} is copying and the secondaries keep no complete image of epoch {asked}"
            ),
        )),
        (Stage::Resume, _) => Some(refused(
            "NotFrozen",
            format!(
                "the group replicates again after epoch {asked} and its secondaries no longer keep that image: freeze it again and fail over to the new epoch"
            ),
        )),
        _ if !image.status => Some(refused(
            "ImageIncomplete",
            format!(
                "the image of epoch {asked} is not complete: {}",
                image.message
            ),
        )),
        _ => Some(ConditionUpdate {
            type_: condition::FAILOVER_READY,
            status: true,
            reason: "ImageComplete",
            message: format!(
                "the secondaries of all {} member volumes hold the complete image of epoch {asked}: promote them from it at the disaster-recovery site (README \"Disaster recovery\")",
                status.members.len()
            ),
        }),
    }
}

fn stale_intents(group: &ConsistencyGroup, epoch: u64) -> Vec<String> {
    let intents = [
        ("release", group.spec.release),
        ("resync", group.spec.resync),
        ("freeze", group.spec.freeze),
    ];
    intents
        .into_iter()
        .filter_map(|(name, intent)| {
            let intent = intent?;
            (intent.epoch != epoch).then(|| {
                format!(
                    "spec.{name}.epoch {} is not the current epoch {epoch}: ignored (it already acted, or it is out of date)",
                    intent.epoch
                )
            })
        })
        .collect()
}

fn set_conditions(
    status: &mut ConsistencyGroupStatus,
    group: &ConsistencyGroup,
    generation: Option<i64>,
    now: &Time,
) {
    let (epoch, stage) = status.position();
    let phase = status.phase.unwrap_or(Phase::Replicating);
    let held = hold_timeout_sentence(status, group);
    let with_held = |message: String| match &held {
        Some(held) => format!("{message}; {held}"),
        None => message,
    };
    let frozen = match stage {
        Stage::Freeze => phase == Phase::Frozen,
        Stage::Release => true,
        Stage::Resume => false,
    };
    let missing = if stage == Stage::Freeze {
        unacknowledged(status, epoch, Stage::Freeze)
    } else {
        Vec::new()
    };
    let frozen_update = ConditionUpdate {
        type_: condition::FROZEN,
        status: frozen,
        reason: match (stage, frozen) {
            (Stage::Freeze, true) => "AllMembersAcknowledged",
            (Stage::Freeze, false) => "WaitingForAcknowledgements",
            (Stage::Release, _) => "FrozenAndReleased",
            (Stage::Resume, _) => "Replicating",
        },
        message: with_held(match (stage, frozen) {
            (Stage::Freeze, true) => format!("every member volume is suspended at epoch {epoch}"),
            (Stage::Freeze, false) if !members_resolved(status) => {
                format!(
                    "freezing at epoch {epoch}; the release waits until every member is resolved"
                )
            }
            (Stage::Freeze, false) => format!(
                "freezing at epoch {epoch}; waiting for {}",
                name_some(&missing)
            ),
            (Stage::Release, _) => {
                format!(
                    "the secondaries hold the image of epoch {epoch}; primaries run unreplicated"
                )
            }
            (Stage::Resume, _) if !members_resolved(status) => {
                "not frozen; some members are not resolved to a volume (see MembersResolved), so replication is not known to run on all of them".to_owned()
            }
            (Stage::Resume, _) => {
                let behind: Vec<&MemberVolumeStatus> = status
                    .members
                    .iter()
                    .filter(|member| !in_sync(member, epoch, phase == Phase::Resyncing))
                    .collect();
                if behind.is_empty() {
                    "replication is running on every member".to_owned()
                } else {
                    format!(
                        "not frozen; {} member volumes are not replicating in sync: {}",
                        behind.len(),
                        name_some(&behind)
                    )
                }
            }
        }),
    };
    conditions::set(&mut status.conditions, frozen_update, generation, now);

    let image = image_condition(status);
    let failover = failover_condition(status, group, &image);
    conditions::set(&mut status.conditions, image, generation, now);
    let kept = image_kept_condition(status);
    conditions::set(&mut status.conditions, kept, generation, now);
    if let Some(failover) = failover {
        conditions::set(&mut status.conditions, failover, generation, now);
    }

    let stale = stale_intents(group, epoch);
    let ready = phase == Phase::Replicating && members_resolved(status) && stale.is_empty();
    let ready_update = ConditionUpdate {
        type_: condition::READY,
        status: ready,
        // A stale intent is the reason only when nothing more important keeps the group from Ready;
        // otherwise the message says it after that reason's own sentence.
        reason: if !stale.is_empty() && phase == Phase::Replicating && members_resolved(status) {
            "StaleIntent"
        } else {
            match phase {
                Phase::Replicating if ready => "Replicating",
                Phase::Replicating | Phase::Degraded => "MembersNotResolved",
                Phase::Freezing => "Freezing",
                Phase::Frozen => "WaitingForRelease",
                Phase::Running => "RunningUnreplicated",
                Phase::Resyncing => "Resyncing",
            }
        },
        message: with_held(
            if !stale.is_empty() && phase == Phase::Replicating && members_resolved(status) {
                stale.join("; ")
            } else {
                let reason = match phase {
                    Phase::Replicating if ready => {
                        "every member replicates synchronously".to_owned()
                    }
                    Phase::Replicating | Phase::Degraded => {
                        "not every member is resolved to a volume".to_owned()
                    }
                    Phase::Freezing => format!("freezing at epoch {epoch}"),
                    Phase::Frozen => format!(
                        "frozen at epoch {epoch}; writes stay held until spec.release.epoch: {epoch}"
                    ),
                    Phase::Running => format!(
                        "released at epoch {epoch}; set spec.resync.epoch: {epoch} to resynchronise"
                    ),
                    Phase::Resyncing => format!("resynchronising after epoch {epoch}"),
                };
                std::iter::once(reason)
                    .chain(stale)
                    .collect::<Vec<_>>()
                    .join("; ")
            },
        ),
    };
    let ready_message = ready_update.message.clone();
    conditions::set(&mut status.conditions, ready_update, generation, now);

    // kstatus (Flux, kpt) reads Stalled=True as Failed: a Degraded group waits for a person. Present only
    // while True, as kstatus's abnormal-true conditions are; any other phase reads from Ready.
    if phase == Phase::Degraded {
        let stalled = ConditionUpdate {
            type_: condition::STALLED,
            status: true,
            reason: "MembersNotResolved",
            message: ready_message,
        };
        conditions::set(&mut status.conditions, stalled, generation, now);
    } else {
        status
            .conditions
            .retain(|existing| existing.type_ != condition::STALLED);
    }
}

#[cfg(test)]
mod tests;
