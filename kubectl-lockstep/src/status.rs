//! `kubectl lockstep status GROUP`: phase, epoch, policy and trigger from the group's status, its
//! conditions, and each member volume's state and acknowledgement across the member clusters from its
//! ConsistencyGroupShards.

use lockstep_api::v1alpha1::{ConsistencyGroup, GroupVolumes, MemberVolumeStatus};
use serde::Serialize;

use crate::{
    PluginError,
    connect::Connection,
    output::{Report, or_dash, table},
};

/// What `status` prints.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusReport {
    /// The group.
    pub group: String,
    /// Its phase (absent before the operator first wrote its status).
    pub phase: Option<String>,
    /// The current epoch.
    pub epoch: u64,
    /// The stage of that epoch: Freeze, Release or Resume.
    pub stage: String,
    /// FreezeAndGo or FreezeAndStop.
    pub policy: String,
    /// How long writes may stay held.
    pub hold_timeout: String,
    /// Resolved member volumes.
    pub members: u32,
    /// Volumes that acknowledged the current epoch and stage.
    pub acknowledged: u32,
    /// Volumes that acknowledged the current epoch's freeze.
    pub suspended: u32,
    /// What started the current epoch's freeze, in a sentence.
    pub trigger: Option<String>,
    /// The conditions: type, status, reason, message.
    pub conditions: Vec<ConditionLine>,
    /// Every member volume.
    pub volumes: Vec<VolumeLine>,
    /// When the volume lines are older than the group's epoch and stage, the point (`epoch/stage`) they
    /// were written at: the operator writes them after the group's status, so they can lag it briefly.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volumes_as_of: Option<String>,
}

/// One condition of the group.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConditionLine {
    /// Ready, Frozen, ConsistentImage, ...
    #[serde(rename = "type")]
    pub type_: String,
    /// True or False.
    pub status: String,
    /// Why, in CamelCase.
    pub reason: String,
    /// Why, in a sentence.
    pub message: String,
}

/// One member volume as its shard lists it: the chain PVC → PV → handle → node, its state and
/// acknowledgement, and (`members`) why it is unresolved.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeLine {
    /// The member cluster.
    pub cluster: String,
    /// The claim's namespace.
    pub namespace: String,
    /// The claim.
    pub pvc: String,
    /// Its PersistentVolume.
    pub persistent_volume: Option<String>,
    /// The CSI volume handle.
    pub volume_handle: Option<String>,
    /// The node serving it.
    pub node: Option<String>,
    /// Its replication state as its sidecar last reported it.
    pub state: Option<String>,
    /// The highest point it acknowledged: `epoch/stage via path`.
    pub acknowledged: Option<String>,
    /// Whether the operator resolved it to a handle and a node.
    pub resolved: bool,
    /// For an unresolved volume, why, as its member cluster shows it (`members` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
}

impl VolumeLine {
    /// The line of a member volume a shard lists.
    pub fn of(member: &MemberVolumeStatus) -> Self {
        Self {
            cluster: member.cluster.clone(),
            namespace: member.namespace.clone(),
            pvc: member.pvc.clone(),
            persistent_volume: member.persistent_volume.clone(),
            volume_handle: member.volume_handle.clone(),
            node: member.node.clone(),
            state: member.state.map(|state| format!("{state:?}")),
            acknowledged: member
                .acknowledged
                .as_ref()
                .map(|ack| format!("{}/{} via {}", ack.epoch, ack.stage, ack.path)),
            resolved: member.volume_handle.is_some() && member.node.is_some(),
            why: None,
        }
    }
}

/// Reads the group and its shards.
pub async fn report(connection: &Connection, name: &str) -> Result<StatusReport, PluginError> {
    let group = connection.group(name).await?;
    let volumes = connection.volumes(&group).await?;
    Ok(build(&group, &volumes))
}

/// The report of `group` whose shards list `members`.
pub fn build(group: &ConsistencyGroup, volumes: &GroupVolumes) -> StatusReport {
    let status = group.status.clone().unwrap_or_default();
    let (epoch, stage) = group.position();
    let volumes_as_of = volumes
        .oldest
        .filter(|oldest| *oldest < (epoch, stage))
        .map(|(epoch, stage)| format!("{epoch}/{stage}"));
    let counts = status.volumes.clone().unwrap_or_default();
    let trigger = status
        .trigger
        .as_ref()
        .filter(|_| epoch > 0)
        .map(|trigger| {
            let mut text = trigger.reason.clone();
            if let Some(volume) = &trigger.volume_handle {
                text.push_str(&format!(
                    " on {}/{volume}",
                    trigger.cluster.as_deref().unwrap_or("?")
                ));
            }
            if let Some(node) = &trigger.node {
                text.push_str(&format!(" (node {node})"));
            }
            if let Some(path) = trigger.path {
                text.push_str(&format!(", first heard on the {path} path"));
            }
            if let Some(message) = &trigger.message {
                text.push_str(&format!(": {message}"));
            }
            text
        });
    StatusReport {
        group: group.metadata.name.clone().unwrap_or_default(),
        phase: status.phase.map(|phase| phase.to_string()),
        epoch,
        stage: stage.to_string(),
        policy: format!("{:?}", group.spec.policy),
        hold_timeout: group.spec.hold_timeout.clone(),
        members: status.member_count,
        acknowledged: counts.acknowledged,
        suspended: counts.frozen,
        trigger,
        conditions: status
            .conditions
            .iter()
            .map(|condition| ConditionLine {
                type_: condition.type_.clone(),
                status: condition.status.clone(),
                reason: condition.reason.clone(),
                message: condition.message.clone(),
            })
            .collect(),
        volumes: volumes.members.iter().map(VolumeLine::of).collect(),
        volumes_as_of,
    }
}

impl Report for StatusReport {
    fn table(&self) -> String {
        let mut text = table(
            &[
                "GROUP",
                "PHASE",
                "EPOCH",
                "STAGE",
                "POLICY",
                "MEMBERS",
                "ACKNOWLEDGED",
                "SUSPENDED",
            ],
            &[vec![
                self.group.clone(),
                or_dash(self.phase.as_ref()),
                self.epoch.to_string(),
                self.stage.clone(),
                self.policy.clone(),
                self.members.to_string(),
                self.acknowledged.to_string(),
                self.suspended.to_string(),
            ]],
        );
        if let Some(trigger) = &self.trigger {
            text.push_str(&format!("Trigger: {trigger}\n"));
        }
        text.push('\n');
        let conditions: Vec<Vec<String>> = self
            .conditions
            .iter()
            .map(|c| {
                vec![
                    c.type_.clone(),
                    c.status.clone(),
                    c.reason.clone(),
                    c.message.clone(),
                ]
            })
            .collect();
        text.push_str(&table(
            &["CONDITION", "STATUS", "REASON", "MESSAGE"],
            &conditions,
        ));
        text.push('\n');
        let volumes: Vec<Vec<String>> = self
            .volumes
            .iter()
            .map(|v| {
                vec![
                    v.cluster.clone(),
                    v.namespace.clone(),
                    v.pvc.clone(),
                    or_dash(v.node.as_ref()),
                    or_dash(v.volume_handle.as_ref()),
                    or_dash(v.state.as_ref()),
                    or_dash(v.acknowledged.as_ref()),
                ]
            })
            .collect();
        text.push_str(&table(
            &[
                "CLUSTER",
                "NAMESPACE",
                "PVC",
                "NODE",
                "VOLUME HANDLE",
                "STATE",
                "ACKNOWLEDGED",
            ],
            &volumes,
        ));
        if let Some(as_of) = &self.volumes_as_of {
            text.push_str(&format!(
                "Volumes as of {as_of}: the operator is still writing them (the counts above are current)\n"
            ));
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lockstep_api::{
        domain::{Phase, Stage},
        v1alpha1::{ConsistencyGroupSpec, ConsistencyGroupStatus},
    };

    fn frozen_group() -> ConsistencyGroup {
        let spec: ConsistencyGroupSpec = serde_json::from_value(serde_json::json!({
            "members": [{"cluster": "east", "namespace": "orders", "pvcNames": ["a"]}],
            "policy": "FreezeAndStop",
        }))
        .unwrap_or_else(|error| panic!("{error}"));
        let mut group = ConsistencyGroup::new("orders-db", spec);
        group.status = Some(ConsistencyGroupStatus {
            epoch: 1,
            stage: Some(Stage::Freeze),
            phase: Some(Phase::Frozen),
            ..ConsistencyGroupStatus::default()
        });
        group
    }

    #[test]
    fn volumes_written_before_the_groups_position_are_marked_as_lagging() {
        let group = frozen_group();
        let lagging = GroupVolumes {
            oldest: Some((0, Stage::Resume)),
            ..GroupVolumes::default()
        };
        let report = build(&group, &lagging);
        assert_eq!(report.volumes_as_of.as_deref(), Some("0/Resume"));
        assert!(
            report
                .table()
                .contains("Volumes as of 0/Resume: the operator is still writing them"),
            "{}",
            report.table()
        );
        let current = GroupVolumes {
            oldest: Some((1, Stage::Freeze)),
            ..GroupVolumes::default()
        };
        let report = build(&group, &current);
        assert_eq!(report.volumes_as_of, None);
        assert!(!report.table().contains("Volumes as of"));
    }
}
