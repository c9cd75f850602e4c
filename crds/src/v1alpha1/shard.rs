//! `ConsistencyGroupShard`: the member volumes of one group on one node, so that a group's own status
//! stays bounded by its clusters and nodes, never by its volumes.
//!
//! The operator writes one shard per (group, member cluster, node) — more than one when a node holds more
//! than [`SHARD_VOLUMES`] of the group's volumes, and one per cluster, without a node, for volumes not yet
//! resolved to one — in the hub, and a copy of each node's shards in its member cluster (for clusters the
//! hub reaches through their API server), where that node's sidecar watches them (path 1 of membership).
//! Shards are written when what they hold changes, never while a freeze is being decided unless a node's
//! membership changed, so the freeze itself writes O(1) objects whatever the volume count.
//!
//! What a shard persists is what must survive an operator restart per volume: each member's resolution
//! (PVC → PV → handle → node), its last known state and acknowledgement, the epoch whose image it belongs
//! to, and the exact volumes of the group's consistent image. The group's status names the image's epoch
//! and counts; the shards list its volumes.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::domain::{Phase, Stage};
use crate::v1alpha1::MemberVolumeStatus;

/// The most member volumes one shard lists: a node with more gets several shards (`part` 0, 1, …). At
/// names of usual length a volume takes about 280 bytes of a shard (the freeze benchmark measured 46.6
/// KiB for 167), so a full shard stays near 35 KiB, under the 64 KiB Lockstep holds every object to; at
/// the schema's longest strings it stays well under etcd's 1.5 MiB request limit. (The schema allows 256,
/// what shards held before.)
pub const SHARD_VOLUMES: usize = 128;

/// The label naming a shard's member cluster.
pub const CLUSTER_LABEL: &str = "lockstep.dev/cluster";
/// The label naming a shard's node, as [`node_label_value`] spells it (empty for unresolved volumes).
pub const NODE_LABEL: &str = "lockstep.dev/node";

/// The member volumes of one group on one node of one member cluster, written by the operator.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "lockstep.dev",
    version = "v1alpha1",
    kind = "ConsistencyGroupShard",
    doc = "The member volumes of one ConsistencyGroup on one node: their claims, handles, states and acknowledgements, written by the Lockstep operator.",
    plural = "consistencygroupshards",
    shortname = "cgshard",
    category = "lockstep",
    printcolumn = r#"{"name":"Group","type":"string","jsonPath":".spec.group","description":"The ConsistencyGroup."}"#,
    printcolumn = r#"{"name":"Cluster","type":"string","jsonPath":".spec.cluster","description":"The member cluster."}"#,
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".spec.node","description":"The node serving these volumes (empty: not yet resolved to a node)."}"#,
    printcolumn = r#"{"name":"Epoch","type":"integer","jsonPath":".spec.epoch","description":"The group's epoch when this shard was written."}"#,
    printcolumn = r#"{"name":"Volumes","type":"integer","jsonPath":".spec.volumeCount","description":"Member volumes listed."}"#,
    printcolumn = r#"{"name":"Acknowledged","type":"integer","jsonPath":".spec.acknowledgedCount","description":"Volumes that acknowledged the group's current epoch."}"#,
    printcolumn = r#"{"name":"Suspended","type":"integer","jsonPath":".spec.suspendedCount","description":"Volumes suspended (writes held until release)."}"#,
    printcolumn = r#"{"name":"Image","type":"integer","jsonPath":".spec.imageVolumeCount","description":"Volumes in the group's consistent image."}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ConsistencyGroupShardSpec {
    /// The ConsistencyGroup, by name (in the hub).
    #[schemars(length(max = 253))]
    pub group: String,
    /// The UID of the hub's ConsistencyGroup.
    #[schemars(length(max = 128))]
    pub group_uid: String,
    /// The member cluster.
    #[schemars(length(max = 63))]
    pub cluster: String,
    /// The node whose sidecar serves these volumes; absent for volumes not resolved to a node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub node: Option<String>,
    /// Which of the node's shards this is, from 0.
    #[serde(default)]
    pub part: u32,
    /// The group's epoch when the operator wrote this shard.
    #[serde(default)]
    #[schemars(range(max = crate::domain::MAX_EPOCH))]
    pub epoch: u64,
    /// The stage of that epoch (absent: Resume).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<Stage>,
    /// The group's phase when the operator wrote this shard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// The member volumes: claim, volume, handle, node, state, acknowledgement, image epoch.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub volumes: Vec<MemberVolumeStatus>,
    /// How many member volumes this shard lists.
    #[serde(default)]
    pub volume_count: u32,
    /// How many of them acknowledged the group's current epoch (any stage).
    #[serde(default)]
    pub acknowledged_count: u32,
    /// How many of them are suspended.
    #[serde(default)]
    pub suspended_count: u32,
    /// The epoch of the group's consistent image, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = crate::domain::MAX_EPOCH))]
    pub image_epoch: Option<u64>,
    /// The volumes of this cluster and node that make up that image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(max = 1024)))]
    pub image_volume_handles: Vec<String>,
    /// How many volumes `imageVolumeHandles` lists.
    #[serde(default)]
    pub image_volume_count: u32,
}

impl ConsistencyGroupShardSpec {
    /// The shard's place in its group's set: (cluster, node, part).
    pub fn key(&self) -> ShardKey {
        ShardKey {
            cluster: self.cluster.clone(),
            node: self.node.clone(),
            part: self.part,
        }
    }
}

/// A group's volumes as its shards list them: every member volume and the volumes of its consistent
/// image.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GroupVolumes {
    /// Every member volume, in (cluster, namespace, claim) order.
    pub members: Vec<MemberVolumeStatus>,
    /// The epoch of the consistent image the shards list, if any.
    pub image_epoch: Option<u64>,
    /// The image's volumes, in (cluster, handle) order.
    pub image: Vec<crate::v1alpha1::ImageVolume>,
    /// The oldest (epoch, stage) any shard was written at: shards are written after the group's status, so
    /// for a moment after a freeze they can lag it.
    pub oldest: Option<(u64, Stage)>,
}

impl GroupVolumes {
    /// Gathers the volumes of a group's shards (all from one cluster's API server).
    pub fn from_shards<'a>(
        shards: impl IntoIterator<Item = &'a ConsistencyGroupShardSpec>,
    ) -> Self {
        let mut volumes = Self::default();
        for shard in shards {
            let written_at = (shard.epoch, shard.stage.unwrap_or(Stage::Resume));
            volumes.oldest = Some(volumes.oldest.map_or(written_at, |old| old.min(written_at)));
            volumes.members.extend(shard.volumes.iter().cloned());
            if let Some(epoch) = shard.image_epoch {
                volumes.image_epoch = volumes.image_epoch.max(Some(epoch));
                volumes
                    .image
                    .extend(shard.image_volume_handles.iter().map(|handle| {
                        crate::v1alpha1::ImageVolume {
                            cluster: shard.cluster.clone(),
                            volume_handle: handle.clone(),
                        }
                    }));
            }
        }
        volumes.members.sort_by(|a, b| {
            (&a.cluster, &a.namespace, &a.pvc).cmp(&(&b.cluster, &b.namespace, &b.pvc))
        });
        volumes.image.sort();
        volumes
    }

    /// Reads the shards of the group with this UID through `client` (the hub lists every member
    /// cluster's; a member cluster only its own).
    pub async fn read(client: &kube::Client, group_uid: &str) -> Result<Self, kube::Error> {
        let api = kube::Api::<ConsistencyGroupShard>::all(client.clone());
        let selector = format!("{}={group_uid}", crate::v1alpha1::GROUP_UID_LABEL);
        let shards = api
            .list(&kube::api::ListParams::default().labels(&selector))
            .await?;
        Ok(Self::from_shards(
            shards
                .items
                .iter()
                .map(|shard| &shard.spec)
                .filter(|spec| spec.group_uid == group_uid),
        ))
    }
}

/// Where a shard sits in its group's set.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ShardKey {
    /// The member cluster.
    pub cluster: String,
    /// The node, or `None` for the cluster's volumes not resolved to a node.
    pub node: Option<String>,
    /// Which of the node's shards.
    pub part: u32,
}

impl ShardKey {
    /// The shard's object name: `<group>.<cluster>.<node>[.<part>]` when that is a valid name, else the
    /// group's name cut short and a hash of the rest (names stay stable and unique either way).
    pub fn object_name(&self, group: &str) -> String {
        let node = self.node.as_deref().unwrap_or("unresolved");
        let mut name = format!("{group}.{}.{node}", self.cluster);
        if self.part > 0 {
            name.push_str(&format!(".{}", self.part));
        }
        if name.len() <= 253 {
            return name;
        }
        let digest = short_hash(&name);
        let keep = group.len().min(253 - digest.len() - 1);
        let cut = group
            .char_indices()
            .map(|(at, _)| at)
            .take_while(|at| *at <= keep)
            .last()
            .unwrap_or(0);
        format!("{}.{digest}", group[..cut].trim_end_matches(['.', '-']))
    }

    /// The labels a shard carries, so that a node's sidecar selects its own.
    pub fn labels(&self) -> [(&'static str, String); 2] {
        [
            (CLUSTER_LABEL, label_value(&self.cluster)),
            (NODE_LABEL, node_label_value(self.node.as_deref())),
        ]
    }
}

/// The value of a shard's [`NODE_LABEL`] for a node: its name when that is a valid label value (63
/// characters at most), else a stable hash of it; empty for volumes not resolved to a node.
pub fn node_label_value(node: Option<&str>) -> String {
    node.map(label_value).unwrap_or_default()
}

/// `text` when it is a valid label value (a cluster's name always is), else `h-` and a stable hash of it.
pub fn label_value(text: &str) -> String {
    let valid = text.len() <= 63
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && text
            .chars()
            .next()
            .is_none_or(|c| c.is_ascii_alphanumeric())
        && text
            .chars()
            .last()
            .is_none_or(|c| c.is_ascii_alphanumeric());
    if valid {
        text.to_owned()
    } else {
        format!("h-{}", short_hash(text))
    }
}

/// A stable digest of a set of volume handles (order does not matter), as
/// [`crate::v1alpha1::NodeAcknowledgement::volume_set`] names it.
pub fn volume_set_digest<'a>(handles: impl IntoIterator<Item = &'a str>) -> String {
    let mut handles: Vec<&str> = handles.into_iter().collect();
    handles.sort_unstable();
    short_hash(&handles.join("\n"))
}

/// A stable 16-hex-digit FNV-1a hash (names must not change between releases, so no `DefaultHasher`).
fn short_hash(text: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(node: Option<&str>, part: u32) -> ShardKey {
        ShardKey {
            cluster: "east".into(),
            node: node.map(str::to_owned),
            part,
        }
    }

    #[test]
    fn names_read_as_group_cluster_node_and_stay_valid_when_long() {
        assert_eq!(key(Some("n1"), 0).object_name("db"), "db.east.n1");
        assert_eq!(key(Some("n1"), 2).object_name("db"), "db.east.n1.2");
        assert_eq!(key(None, 0).object_name("db"), "db.east.unresolved");
        let long_node = "n".repeat(253);
        let name = key(Some(&long_node), 0).object_name(&"g".repeat(200));
        assert!(name.len() <= 253, "{}", name.len());
        assert_ne!(
            name,
            key(Some(&long_node), 1).object_name(&"g".repeat(200)),
            "parts stay apart"
        );
    }

    #[test]
    fn node_labels_are_valid_label_values() {
        assert_eq!(node_label_value(Some("node-a")), "node-a");
        assert_eq!(node_label_value(None), "");
        let long = node_label_value(Some(&"n".repeat(100)));
        assert!(long.starts_with("h-") && long.len() <= 63, "{long}");
    }
}
