//! `ConsistencyGroup`: volumes, across clusters, whose secondaries must stay mutually consistent.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::domain::{ClaimOrder, Path, Phase, Policy, Stage, VolumeState};

/// The volumes named here stay mutually consistent on their secondaries: the first failed copy in any
/// member freezes replication on every member before any dependent write can reach a secondary.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "lockstep.dev",
    version = "v1alpha1",
    kind = "ConsistencyGroup",
    doc = "Volumes, across clusters, whose secondaries stay mutually consistent: the first failed copy in any member freezes replication on every member.",
    plural = "consistencygroups",
    shortname = "cg",
    category = "lockstep",
    status = "ConsistencyGroupStatus",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase","description":"Where the group is in its life cycle."}"#,
    printcolumn = r#"{"name":"Epoch","type":"integer","jsonPath":".status.epoch","description":"The current freeze epoch."}"#,
    printcolumn = r#"{"name":"Members","type":"integer","jsonPath":".status.memberCount","description":"Resolved member volumes."}"#,
    printcolumn = r#"{"name":"Acknowledged","type":"integer","jsonPath":".status.volumes.acknowledged","description":"Member volumes that acknowledged the current epoch and stage."}"#,
    printcolumn = r#"{"name":"Suspended","type":"integer","jsonPath":".status.volumes.frozen","description":"Member volumes that acknowledged the current epoch's freeze."}"#,
    printcolumn = r#"{"name":"Frozen","type":"string","jsonPath":".status.conditions[?(@.type==\"Frozen\")].status","description":"Whether every member volume acknowledged the freeze."}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
// `namespace` is a CEL reserved word: Kubernetes exposes such fields as `__namespace__` in rules.
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "size(self.members) > 0",
        "message": "a ConsistencyGroup needs at least one member: list the clusters and PVCs it keeps consistent"
    },
    {
        "rule": "self.members.all(m, self.members.exists_one(n, n.cluster == m.cluster && n.__namespace__ == m.__namespace__))",
        "message": "each (cluster, namespace) may appear only once in members: merge the PVCs of duplicate entries into one"
    },
    {
        "rule": "self.members.map(m, has(m.pvcNames) ? size(m.pvcNames) : 0).sum() <= 4096",
        "message": "a ConsistencyGroup names at most 4096 PVCs in pvcNames over all members (the object must stay well under the API server's size limit): select larger sets of PVCs with a label selector"
    },
    {
        "rule": "!has(oldSelf.failover) || (has(self.failover) && self.failover.epoch >= oldSelf.failover.epoch)",
        "message": "spec.failover is never removed or lowered once set: the group returns to its first site by failing back (reverse replication, then a planned switch), not by editing the intent"
    }
]))]
pub struct ConsistencyGroupSpec {
    /// The volumes of the group, per member cluster and namespace.
    #[schemars(length(max = 32))]
    pub members: Vec<GroupMember>,

    /// What happens once every member is frozen: FreezeAndGo releases held writes and lets primaries run
    /// unreplicated; FreezeAndStop keeps writes held until a person sets spec.release.epoch.
    #[serde(default)]
    pub policy: Policy,

    /// How long a write may stay held (not acknowledged) while the group freezes, as a duration such as
    /// 30s or 2m (1s to 10m). Held writes that outlive it fail with an I/O error; they are never
    /// acknowledged unreplicated. Keep it below the applications' and kernels' I/O timeouts.
    #[serde(default = "default_hold_timeout")]
    #[schemars(length(max = 16), regex(pattern = r"^([0-9]+(ms|s|m|h))+$"))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "duration(self) >= duration('1s') && duration(self) <= duration('10m')",
        "message": "holdTimeout must be between 1s and 10m: writes are held (not acknowledged) for at most that long",
        "messageExpression": "'holdTimeout ' + self + ' is not between 1s and 10m: writes are held (not acknowledged) for at most that long'"
    }]))]
    pub hold_timeout: String,

    /// Releases the held writes of a FreezeAndStop freeze. Acts only while `epoch` equals the group's
    /// current epoch and every resolved volume acknowledged the freeze, so a value left in Git never acts
    /// twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<EpochIntent>,

    /// Thaws the group: resynchronises every member and returns it to Replicating. Acts only while `epoch`
    /// equals the group's current epoch. The secondaries are inconsistent until every member is in sync.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync: Option<EpochIntent>,

    /// Takes a planned freeze (for a test of the disaster recovery site, or a backup of the secondaries).
    /// Acts only while `epoch` equals the group's current epoch; the freeze raises the epoch by one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze: Option<EpochIntent>,

    /// Fails the group over to its disaster-recovery site: every secondary is promoted from the image of
    /// `epoch` (rolled back to it if a resync had started) and serves as the primary there. Meant to act
    /// only while the group is frozen at exactly `epoch` with a complete consistent image, and to be
    /// refused with the reason otherwise. Never removed or lowered once set. The operator says in the
    /// FailoverReady condition whether the image of `epoch` can be failed over to, or why not; it does
    /// not promote the secondaries itself yet: the replicators' `promote`, `fence` and `reverse` do it
    /// (README, "Disaster recovery").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover: Option<EpochIntent>,
}

fn default_hold_timeout() -> String {
    "30s".to_owned()
}

/// The group's volumes in one namespace of one member cluster.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.pvcNames) != has(self.selector)",
        "message": "a member names its PVCs in pvcNames or selects them with selector: give exactly one of the two"
    }
]))]
pub struct GroupMember {
    /// The MemberCluster (by name, in the hub) whose volumes these are.
    #[schemars(length(min = 1, max = 63))]
    #[schemars(extend("x-kubernetes-validations" = [super::object_name_rule("cluster", "MemberCluster name")]))]
    pub cluster: String,

    /// The namespace of the PersistentVolumeClaims.
    #[schemars(length(min = 1, max = 63))]
    #[schemars(extend("x-kubernetes-validations" = [super::namespace_rule()]))]
    pub namespace: String,

    /// The PersistentVolumeClaims, by name, each once. The only form a gRPC-only cluster supports, as the
    /// hub cannot list its PVCs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    // A pattern, not a CEL rule: a rule over 256 names of 253 characters exceeds kube-apiserver's cost
    // budget. The refusal names the value: `Invalid value: "Postgres_WAL": … should match '^[a-z0-9]…'`.
    #[schemars(
        length(min = 1, max = 4096),
        inner(
            length(min = 1, max = 253),
            regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
        )
    )]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub pvc_names: Option<Vec<String>>,

    /// Selects the PersistentVolumeClaims by label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
}

/// An intent that names the epoch it is meant for, so that it acts at most once.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub struct EpochIntent {
    /// The epoch this intent is meant for: it acts only while the group's current epoch equals it.
    #[schemars(range(max = crate::domain::MAX_EPOCH))]
    pub epoch: u64,
}

impl ConsistencyGroupStatus {
    /// Where the status is in the group's life, (epoch, stage), ordered: the one place a missing stage is
    /// read as the baseline — a group that never froze, or resumed, replicates at (epoch, Resume).
    pub fn position(&self) -> (u64, Stage) {
        crate::domain::Position::decode(self.epoch, self.stage).into()
    }
}

/// What the operator observed and did: the current epoch, the members it resolved and what each
/// acknowledged.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConsistencyGroupStatus {
    /// Where the group is in its life cycle: Replicating, Freezing, Frozen, Running, Resyncing or Degraded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,

    /// The group's freeze epoch: raised by one with every freeze, never lowered.
    // The rule sits on the field, not on the status: a rule on the status would have the API server
    // convert every member's entry for every write. An omitted epoch is defaulted to 0 before the rule
    // runs, so leaving it out cannot lower it either.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-validations" = [
        {
            "rule": "self >= oldSelf",
            "message": "status.epoch never decreases: epochs only grow, so a deposed operator cannot move a group back"
        }
    ]))]
    #[schemars(range(max = crate::domain::MAX_EPOCH))]
    pub epoch: u64,

    /// The stage of the current epoch: Freeze, Release or Resume. Absent before the first freeze.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<Stage>,

    /// What started the current epoch's freeze.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger: Option<FreezeTrigger>,

    /// The member volumes as operators before ConsistencyGroupShards listed them here. No longer written:
    /// each node's volumes are in its `ConsistencyGroupShard`s (`kubectl get cgshard -l
    /// lockstep.dev/group-uid=<uid>`); an operator upgraded mid-freeze reads this list once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1024))]
    pub members: Vec<MemberVolumeStatus>,

    /// How many member volumes are resolved.
    #[serde(default)]
    pub member_count: u32,

    /// The member volumes counted: acknowledged, frozen, by state and per cluster. The volumes themselves
    /// are listed in the group's ConsistencyGroupShards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volumes: Option<VolumeCounts>,

    /// What each node acknowledged for all of its member volumes of the group: bounded by nodes, it lets
    /// an operator restarted mid-freeze keep the acknowledgements of nodes it cannot hear from yet.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 4096))]
    pub node_acknowledgements: Vec<NodeAcknowledgement>,

    /// At most 20 member volumes holding the group back (not acknowledged, or not resolved), for people;
    /// the shards list every volume.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub stragglers: Vec<Straggler>,

    /// The volumes whose secondaries make up the consistent image of `consistentImage.epoch`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistent_image: Option<ConsistentImage>,

    /// Held writes that failed with an I/O error because the hold timeout expired before the release.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_timeouts: Option<HoldTimeouts>,

    /// The group's last freezes (at most 10, oldest first): trigger, path, the times of suspension,
    /// freeze, release and resync, and how each ended. `kubectl lockstep timeline` prints them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10))]
    pub history: Vec<super::FreezeRecord>,

    /// The generation of the spec this status reflects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Which decision of the operator wrote this status: an operator whose own record of the group's
    /// volumes was made for another (another replica wrote since) rebuilds it from the shards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub decision_id: Option<String>,

    /// Ready, Frozen, ConsistentImage, MembersResolved, ImageKept, and Stalled while the group is Degraded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub conditions: Vec<Condition>,
}

/// The first report that made the operator raise the epoch, or a planned freeze.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FreezeTrigger {
    /// Why: `CopyFailed` for a failed copy, `Planned` for spec.freeze, `Adopted` for a freeze a member
    /// reported that was never persisted.
    #[schemars(length(max = 64))]
    pub reason: String,
    /// The member cluster of the reporting node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub cluster: Option<String>,
    /// The reporting node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub node: Option<String>,
    /// The volume whose copy failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub volume_handle: Option<String>,
    /// The path that brought the report first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<Path>,
    /// The error the replicator gave, for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub message: Option<String>,
    /// When the operator received the report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<Time>,
}

/// One member volume, resolved.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemberVolumeStatus {
    /// The member cluster.
    #[schemars(length(max = 63))]
    pub cluster: String,
    /// The claim's namespace.
    #[schemars(length(max = 63))]
    pub namespace: String,
    /// The PersistentVolumeClaim.
    #[schemars(length(max = 253))]
    pub pvc: String,
    /// The bound PersistentVolume, once bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub persistent_volume: Option<String>,
    /// The CSI volume handle, the replicator's name for the volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub volume_handle: Option<String>,
    /// The node whose sidecar serves the volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub node: Option<String>,
    /// The volume's replication state, as its sidecar last reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<VolumeState>,
    /// The highest (epoch, stage) the volume acknowledged, and by which path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acknowledged: Option<Acknowledgement>,
    /// The epoch of the freeze whose consistent image this volume's secondary belongs to: set when that
    /// freeze began, for the volumes in sync at that moment (DESIGN rule 5 and 7). A volume that joined
    /// later, or was still resyncing, has none until the group replicates in sync again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_epoch: Option<u64>,
}

/// The group's member volumes, counted.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeCounts {
    /// Volumes that acknowledged the group's current (epoch, stage).
    #[serde(default)]
    pub acknowledged: u32,
    /// Volumes that acknowledged the current epoch's freeze (0 before the first freeze).
    #[serde(default)]
    pub frozen: u32,
    /// Volumes per replication state as their sidecars last reported it (`Unknown`: no report yet).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 16))]
    pub by_state: std::collections::BTreeMap<String, u32>,
    /// The same counts per member cluster.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub clusters: Vec<ClusterVolumeCounts>,
}

/// One member cluster's volumes of a group, counted.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterVolumeCounts {
    /// The member cluster.
    #[schemars(length(max = 63))]
    pub cluster: String,
    /// Member volumes listed (resolved to a handle and node, or not yet).
    #[serde(default)]
    pub volumes: u32,
    /// Volumes not resolved to a volume handle and node.
    #[serde(default)]
    pub unresolved: u32,
    /// Nodes serving them.
    #[serde(default)]
    pub nodes: u32,
    /// Volumes that acknowledged the group's current (epoch, stage).
    #[serde(default)]
    pub acknowledged: u32,
    /// Volumes that acknowledged the current epoch's freeze.
    #[serde(default)]
    pub frozen: u32,
}

/// The point every member volume of one node acknowledged, for that exact set of volumes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeAcknowledgement {
    /// The member cluster.
    #[schemars(length(max = 63))]
    pub cluster: String,
    /// The node.
    #[schemars(length(max = 253))]
    pub node: String,
    /// How many member volumes the node has.
    pub volumes: u32,
    /// A digest of their volume handles: the acknowledgement stands only for this set.
    #[schemars(length(max = 16))]
    pub volume_set: String,
    /// The lowest (epoch, stage) its volumes acknowledged: the epoch.
    #[schemars(range(max = crate::domain::MAX_EPOCH))]
    pub epoch: u64,
    /// The stage.
    pub stage: Stage,
    /// The path that brought that acknowledgement.
    pub path: Path,
    /// Whether any of them suspended by its own fail-safe.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fail_safe: bool,
}

/// A member volume holding its group back, named for people.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Straggler {
    /// The member cluster.
    #[schemars(length(max = 63))]
    pub cluster: String,
    /// The claim's namespace.
    #[schemars(length(max = 63))]
    pub namespace: String,
    /// The PersistentVolumeClaim.
    #[schemars(length(max = 253))]
    pub pvc: String,
    /// The node serving it, when resolved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub node: Option<String>,
    /// Why it holds the group back: `Unresolved` or `NotAcknowledged`.
    #[schemars(length(max = 32))]
    pub reason: String,
}

/// An acknowledgement of one volume.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Acknowledgement {
    /// The epoch acknowledged.
    #[schemars(range(max = crate::domain::MAX_EPOCH))]
    pub epoch: u64,
    /// The stage acknowledged.
    pub stage: Stage,
    /// The path that brought the acknowledgement first.
    pub path: Path,
    /// True when the node suspended the volume by its own fail-safe rather than by directive.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fail_safe: bool,
    /// When the operator received it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<Time>,
}

/// The secondaries that together hold the consistent image of one epoch.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConsistentImage {
    /// The epoch whose freeze the image is.
    #[schemars(range(max = crate::domain::MAX_EPOCH))]
    pub epoch: u64,
    /// The volumes of the image as operators before ConsistencyGroupShards listed them here. Now each
    /// shard lists its node's volumes of the image (`imageVolumeHandles`), and this stays empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1024))]
    pub volumes: Vec<ImageVolume>,
    /// How many volumes the image covers: those that were in sync when that freeze began and
    /// acknowledged it.
    #[serde(default)]
    pub volume_count: u32,
}

/// One volume of a consistent image: a volume handle names a volume only within its cluster.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageVolume {
    /// The member cluster.
    #[schemars(length(max = 63))]
    pub cluster: String,
    /// The CSI volume handle.
    #[schemars(length(max = 1024))]
    pub volume_handle: String,
}

/// Held writes failed by the hold timeout during the current epoch (cleared when the group resumes or
/// freezes again). Counted per volume: each sidecar reports a running total per volume and epoch, so a
/// report repeated on both paths counts once.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HoldTimeouts {
    /// The epoch during which the writes failed.
    #[schemars(range(max = crate::domain::MAX_EPOCH))]
    pub epoch: u64,
    /// How many held writes failed with an I/O error, over every volume.
    #[serde(default)]
    pub failed_writes: u64,
    /// Volumes whose held writes failed: at most 20 named here, all of them counted in `volumeCount`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1024))]
    pub volumes: Vec<VolumeHoldTimeout>,
    /// How many volumes had held writes fail.
    #[serde(default)]
    pub volume_count: u32,
    /// When the first of them failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Time>,
}

/// Held writes of one member volume failed by the hold timeout.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeHoldTimeout {
    /// The member cluster of the volume.
    #[serde(default)]
    #[schemars(length(max = 63))]
    pub cluster: String,
    /// The CSI volume handle.
    #[schemars(length(max = 1024))]
    pub volume_handle: String,
    /// How many of its held writes failed.
    pub failed_writes: u64,
    /// When the first of them failed, as its sidecar saw it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Time>,
}

/// The label a mirror carries naming the hub that owns it (the operator's `--hub-name`).
pub const HUB_LABEL: &str = "lockstep.dev/hub";
/// The label a mirror carries naming its hub group's `metadata.uid`: epochs belong to that UID.
pub const GROUP_UID_LABEL: &str = "lockstep.dev/group-uid";
/// The annotation a mirror carries with its hub group's `metadata.creationTimestamp` (RFC 3339): with the
/// UID, it orders claims on a volume the same way in every cluster (DESIGN.md rule 5).
pub const GROUP_CREATED_ANNOTATION: &str = "lockstep.dev/group-created";

impl ConsistencyGroup {
    /// The UID epochs belong to: the hub group's `metadata.uid`, which a mirror in a member cluster
    /// carries in its [`GROUP_UID_LABEL`] label (its own UID is that of the copy).
    pub fn group_uid(&self) -> Option<&str> {
        self.metadata
            .labels
            .as_ref()
            .and_then(|labels| labels.get(GROUP_UID_LABEL))
            .or(self.metadata.uid.as_ref())
            .map(String::as_str)
    }

    /// The group's place in the claim order (DESIGN.md rule 5): the hub group's creation time — a
    /// mirror's from its [`GROUP_CREATED_ANNOTATION`], as the mirror's own is that of the copy — then its
    /// UID. `None` without a UID.
    pub fn claim_order(&self) -> Option<ClaimOrder> {
        let uid = self.group_uid().filter(|uid| !uid.is_empty())?;
        let created = if self.is_mirror() {
            self.metadata
                .annotations
                .as_ref()
                .and_then(|annotations| annotations.get(GROUP_CREATED_ANNOTATION))
                .and_then(|text| text.parse::<k8s_openapi::jiff::Timestamp>().ok())
        } else {
            self.metadata.creation_timestamp.as_ref().map(|time| time.0)
        };
        Some(ClaimOrder::new(
            created.map(|time| time.as_millisecond()),
            uid,
        ))
    }

    /// True when this object is a mirror written by a hub rather than a group a person created.
    pub fn is_mirror(&self) -> bool {
        self.metadata
            .labels
            .as_ref()
            .is_some_and(|labels| labels.contains_key(HUB_LABEL))
    }

    /// The group's (epoch, stage): a group that never froze is replicating at (epoch, Resume).
    pub fn position(&self) -> (u64, Stage) {
        self.status.as_ref().map_or(
            crate::domain::Position::START.into(),
            ConsistencyGroupStatus::position,
        )
    }

    /// The epoch at which the operator found every member in sync after a resume (phase Replicating
    /// at (epoch, Resume)), if it did: the images the secondaries kept through that resync may go.
    pub fn in_sync_at(&self) -> Option<u64> {
        let status = self.status.as_ref()?;
        (status.phase == Some(crate::domain::Phase::Replicating)
            && status.stage == Some(Stage::Resume)
            && status.epoch > 0)
            .then_some(status.epoch)
    }
}
