//! The group's freeze history ([`FreezeRecord`]s in its status), pure: after each decision, the freeze
//! it began is added and the current freeze's steps are stamped with the decision's time.
//!
//! Every change here goes with a change the decision makes anyway (a new epoch, a first acknowledgement
//! that changes the counts, a phase or stage), so the history never costs a status write of its own. A
//! freeze this operator did not see begin (an upgrade from a version without history) gets no record:
//! its times would be guesses.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use lockstep_api::{
    domain::{Phase, Stage},
    v1alpha1::{
        ConsistencyGroupStatus, FREEZE_HISTORY, FreezeOutcome, FreezeRecord, FreezeTrigger,
        MilliTime,
    },
};

/// Brings `status.history` up to date with the status decided at `now` from one at `epoch_before`.
pub fn record(epoch_before: u64, status: &mut ConsistencyGroupStatus, now: &Time) {
    let now = MilliTime(now.0);
    if status.epoch > epoch_before {
        begin(status, now);
    }
    let (epoch, stage) = status.position();
    let phase = status.phase;
    let suspended = status.members.iter().any(|member| {
        member
            .acknowledged
            .as_ref()
            .is_some_and(|ack| (ack.epoch, ack.stage) >= (epoch, Stage::Freeze))
    });
    let held_writes_failed = status
        .hold_timeouts
        .as_ref()
        .filter(|held| held.epoch == epoch)
        .map_or(0, |held| held.failed_writes);
    let Some(current) = status
        .history
        .iter_mut()
        .rev()
        .find(|record| record.epoch == epoch)
    else {
        return;
    };
    let frozen = phase == Some(Phase::Frozen) || stage == Stage::Release;
    if suspended || frozen {
        current.suspended_at.get_or_insert(now);
    }
    if frozen {
        current.frozen_at.get_or_insert(now);
    }
    if stage == Stage::Release {
        current.released_at.get_or_insert(now);
    }
    if stage == Stage::Resume {
        current.resync_started_at.get_or_insert(now);
        if phase != Some(Phase::Resyncing) {
            current.resynced_at.get_or_insert(now);
        }
    }
    current.held_writes_failed = current.held_writes_failed.max(held_writes_failed);
    current.outcome = match stage {
        Stage::Freeze if current.held_writes_failed > 0 => FreezeOutcome::HoldTimeout,
        Stage::Freeze if frozen => FreezeOutcome::AwaitingRelease,
        Stage::Freeze => FreezeOutcome::Freezing,
        Stage::Release => FreezeOutcome::Released,
        Stage::Resume if phase == Some(Phase::Resyncing) => FreezeOutcome::Resyncing,
        Stage::Resume => FreezeOutcome::Resynced,
    };
}

/// Adds the record of the freeze that just raised the epoch (from its trigger), marks freezes not yet
/// resynced as superseded, and drops the oldest beyond [`FREEZE_HISTORY`].
fn begin(status: &mut ConsistencyGroupStatus, now: MilliTime) {
    for older in &mut status.history {
        if older.outcome != FreezeOutcome::Resynced {
            older.outcome = FreezeOutcome::Superseded;
        }
    }
    let trigger = status.trigger.clone().unwrap_or_else(|| FreezeTrigger {
        reason: "Unknown".to_owned(),
        cluster: None,
        node: None,
        volume_handle: None,
        path: None,
        message: None,
        at: None,
    });
    status.history.push(FreezeRecord {
        epoch: status.epoch,
        triggered_at: trigger.at.as_ref().map_or(now, |at| MilliTime(at.0)),
        trigger,
        suspended_at: None,
        frozen_at: None,
        released_at: None,
        resync_started_at: None,
        resynced_at: None,
        held_writes_failed: 0,
        outcome: FreezeOutcome::Freezing,
    });
    let excess = status.history.len().saturating_sub(FREEZE_HISTORY);
    status.history.drain(..excess);
}
