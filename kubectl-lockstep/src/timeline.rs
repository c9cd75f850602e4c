//! `kubectl lockstep timeline GROUP`: the group's last freezes from its status history, each step in
//! milliseconds from the freeze's trigger.

use lockstep_api::v1alpha1::{FreezeRecord, MilliTime};
use serde::Serialize;

use crate::{
    PluginError,
    connect::Connection,
    output::{Report, or_dash, table},
};

/// What `timeline` prints: the group's freezes, oldest first.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TimelineReport {
    /// The group.
    pub group: String,
    /// Its current epoch: above 0 with no freezes listed, its freezes predate the history.
    pub epoch: u64,
    /// Its freezes.
    pub freezes: Vec<FreezeLine>,
}

/// One freeze: its trigger, when it was heard, and each later step in milliseconds after that.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FreezeLine {
    /// The epoch the freeze raised the group to.
    pub epoch: u64,
    /// Why it froze.
    pub reason: String,
    /// `cluster/volume handle` of the trigger, if a volume's copy failed.
    pub volume: Option<String>,
    /// The path that brought the trigger first.
    pub path: Option<String>,
    /// The replicator's error, or what the trigger was.
    pub message: Option<String>,
    /// When the operator heard the trigger (RFC 3339, milliseconds).
    pub triggered_at: MilliTime,
    /// Milliseconds from the trigger until a first volume acknowledged the freeze.
    pub suspended_ms: Option<i64>,
    /// ... until every volume had (Frozen).
    pub frozen_ms: Option<i64>,
    /// ... until the held writes were released.
    pub released_ms: Option<i64>,
    /// ... until the resync began.
    pub resync_started_ms: Option<i64>,
    /// ... until every member replicated in sync again.
    pub resynced_ms: Option<i64>,
    /// Held writes failed at the hold timeout.
    pub held_writes_failed: u64,
    /// How it ended, or where it stands.
    pub outcome: String,
}

impl FreezeLine {
    /// The line of one history record.
    pub fn of(record: &FreezeRecord) -> Self {
        let after = |step: Option<MilliTime>| step.map(|at| at.millis_since(&record.triggered_at));
        Self {
            epoch: record.epoch,
            reason: record.trigger.reason.clone(),
            volume: record.trigger.volume_handle.as_ref().map(|volume| {
                format!(
                    "{}/{volume}",
                    record.trigger.cluster.as_deref().unwrap_or("?")
                )
            }),
            path: record.trigger.path.map(|path| path.to_string()),
            message: record.trigger.message.clone(),
            triggered_at: record.triggered_at,
            suspended_ms: after(record.suspended_at),
            frozen_ms: after(record.frozen_at),
            released_ms: after(record.released_at),
            resync_started_ms: after(record.resync_started_at),
            resynced_ms: after(record.resynced_at),
            held_writes_failed: record.held_writes_failed,
            outcome: record.outcome.to_string(),
        }
    }
}

/// Reads the group's history.
pub async fn report(connection: &Connection, name: &str) -> Result<TimelineReport, PluginError> {
    let group = connection.group(name).await?;
    let epoch = group.position().0;
    let history = group
        .status
        .map(|status| status.history)
        .unwrap_or_default();
    Ok(TimelineReport {
        group: name.to_owned(),
        epoch,
        freezes: history.iter().map(FreezeLine::of).collect(),
    })
}

fn millis(value: Option<i64>) -> String {
    or_dash(value.map(|ms| format!("+{ms}ms")))
}

impl Report for TimelineReport {
    fn table(&self) -> String {
        if self.freezes.is_empty() && self.epoch == 0 {
            return format!("{} has not frozen yet\n", self.group);
        }
        if self.freezes.is_empty() {
            return format!(
                "{} is at epoch {} but keeps no history of those freezes: they predate an operator that records it\n",
                self.group, self.epoch
            );
        }
        let rows: Vec<Vec<String>> = self
            .freezes
            .iter()
            .map(|line| {
                vec![
                    line.epoch.to_string(),
                    line.reason.clone(),
                    or_dash(line.volume.as_ref()),
                    or_dash(line.path.as_ref()),
                    line.triggered_at.to_string(),
                    millis(line.suspended_ms),
                    millis(line.frozen_ms),
                    millis(line.released_ms),
                    millis(line.resync_started_ms),
                    millis(line.resynced_ms),
                    line.held_writes_failed.to_string(),
                    line.outcome.clone(),
                ]
            })
            .collect();
        table(
            &[
                "EPOCH",
                "TRIGGER",
                "VOLUME",
                "PATH",
                "TRIGGERED",
                "SUSPENDED",
                "FROZEN",
                "RELEASED",
                "RESYNC",
                "RESYNCED",
                "HELD-FAILED",
                "OUTCOME",
            ],
            &rows,
        )
    }
}
