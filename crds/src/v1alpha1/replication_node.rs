//! `ReplicationNode`: one node's volumes, failures and enforcements, written by that node's sidecar.
//!
//! It is path 1 of the report (a failure lands in `status.failures`) and of the acknowledgement
//! (`status.enforced`). Liveness is not here but in a Lease per node, so this status changes only when
//! something happens.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::domain::{Stage, VolumeState};

/// One node of a member cluster, as its Lockstep sidecar sees it: the volumes it serves, the copies that
/// failed and the freezes it enforced. Named after the node.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "lockstep.dev",
    version = "v1alpha1",
    kind = "ReplicationNode",
    doc = "One node of a member cluster as its Lockstep sidecar sees it: volumes served, copies failed, freezes enforced.",
    plural = "replicationnodes",
    shortname = "rn",
    category = "lockstep",
    status = "ReplicationNodeStatus",
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".spec.nodeName"}"#,
    printcolumn = r#"{"name":"Volumes","type":"integer","jsonPath":".status.volumeCount"}"#,
    printcolumn = r#"{"name":"Failures","type":"integer","jsonPath":".status.failureCount"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ReplicationNodeSpec {
    /// The Kubernetes node this sidecar runs on.
    #[schemars(length(min = 1, max = 253))]
    #[schemars(extend("x-kubernetes-validations" = [super::object_name_rule("nodeName", "Kubernetes node name")]))]
    pub node_name: String,
    /// The MemberCluster name of this cluster, as the hub knows it.
    #[schemars(length(min = 1, max = 63))]
    #[schemars(extend("x-kubernetes-validations" = [super::object_name_rule("cluster", "MemberCluster name")]))]
    pub cluster: String,
}

/// What the node's sidecar observed and enforced.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicationNodeStatus {
    /// The volumes the node's replicator serves.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1024))]
    pub volumes: Vec<NodeVolume>,
    /// How many volumes the node serves.
    #[serde(default)]
    pub volume_count: u32,
    /// Copies that failed and whose writes the node holds, until the sender sees a higher epoch.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1024))]
    pub failures: Vec<CopyFailureReport>,
    /// How many failures are outstanding.
    #[serde(default)]
    pub failure_count: u32,
    /// The highest (epoch, stage) the node enforced per group, with the volumes it enforced it on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub enforced: Vec<Enforcement>,
    /// Ready (the replicator's volumes are known and no fail-safe suspension is in force) and
    /// HoldTimedOut (held writes failed with an I/O error at a group's hold timeout).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub conditions: Vec<Condition>,
}

/// One volume the node serves.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeVolume {
    /// The CSI volume handle.
    #[schemars(length(max = 1024))]
    pub volume_handle: String,
    /// The claim bound to the volume, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<ClaimRef>,
    /// The UID of the group the volume belongs to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub group_uid: Option<String>,
    /// What replication is doing.
    pub state: VolumeState,
    /// The volume's (epoch, stage) as its replicator holds it.
    #[serde(default)]
    #[schemars(range(max = crate::domain::MAX_EPOCH))]
    pub epoch: u64,
    /// The stage within that epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<Stage>,
    /// Held writes that outlived the group's hold timeout and failed with an I/O error, until the
    /// group resumes or freezes again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_timeout: Option<NodeHoldTimeout>,
}

/// Held writes of one volume failed by the hold timeout.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeHoldTimeout {
    /// The group's epoch the sidecar had seen when the writes failed (DESIGN.md rule 4).
    #[schemars(range(max = crate::domain::MAX_EPOCH))]
    pub epoch: u64,
    /// How many held writes failed at that epoch so far.
    #[schemars(range(min = 1))]
    pub failed_writes: u64,
    /// When the first of them failed.
    pub since: Time,
}

/// A PersistentVolumeClaim, by namespace and name.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub struct ClaimRef {
    /// The claim's namespace.
    #[schemars(length(max = 63))]
    pub namespace: String,
    /// The claim's name.
    #[schemars(length(max = 253))]
    pub name: String,
}

/// A copy that failed: path 1 of the report.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CopyFailureReport {
    /// The volume whose copy failed.
    #[schemars(length(max = 1024))]
    pub volume_handle: String,
    /// The group the volume belongs to.
    #[schemars(length(max = 128))]
    pub group_uid: String,
    /// The group's epoch the sidecar had seen when the copy failed (DESIGN.md rule 4).
    #[schemars(range(max = crate::domain::MAX_EPOCH))]
    pub epoch_seen: u64,
    /// The replicator's sequence number of the failed write.
    #[serde(default)]
    pub sequence: u64,
    /// What failed, for people.
    #[schemars(length(max = 1024))]
    pub error: String,
    /// When the copy failed.
    pub since: Time,
}

/// A (group, epoch, stage) the node enforced: path 1 of the acknowledgement.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Enforcement {
    /// The group.
    #[schemars(length(max = 128))]
    pub group_uid: String,
    /// The epoch enforced.
    #[schemars(range(max = crate::domain::MAX_EPOCH))]
    pub epoch: u64,
    /// The stage enforced.
    pub stage: Stage,
    /// The volumes now at that (epoch, stage).
    #[schemars(length(max = 1024), inner(length(max = 1024)))]
    pub volume_handles: Vec<String>,
    /// True when the node suspended by its own fail-safe, having reached neither path.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fail_safe: bool,
    /// When the node enforced it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<Time>,
}
