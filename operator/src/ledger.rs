//! A group's per-volume record and how it is persisted, pure: the group's status in the hub holds the
//! decision and counts (bounded by clusters and nodes), the `ConsistencyGroupShard`s hold the volumes.
//!
//! The freeze core ([`crate::freeze`]) decides on the *full* status — every member volume with its state,
//! acknowledgement and image epoch, the image's volumes, the hold timeouts per volume — which the engine
//! keeps in memory between decisions. This module turns it into:
//! - [`bounded`]: what the group's status persists: phase, (epoch, stage), trigger, conditions, counts per
//!   state and per cluster, the image's epoch and size, at most [`NAMED`] stragglers, and per node the
//!   acknowledgement all of its volumes gave (so that a restart mid-freeze keeps them: written with the
//!   decision, for the exact set of volumes, by digest);
//! - [`shard_specs`]: the shards, one per (cluster, node, part of at most [`SHARD_VOLUMES`] volumes);
//!
//! and back, after a restart or a failover: [`restore`] rebuilds the full status from the persisted status
//! and the shards (or, once, from the member list an operator before shards kept in the status).

use std::collections::{BTreeMap, BTreeSet};

use lockstep_api::{
    domain::{Phase, Stage},
    v1alpha1::{
        Acknowledgement, ClusterVolumeCounts, ConsistencyGroupShardSpec, ConsistencyGroupStatus,
        ConsistentImage, HoldTimeouts, ImageVolume, MemberVolumeStatus, NodeAcknowledgement,
        SHARD_VOLUMES, ShardKey, Straggler, VolumeCounts, volume_set_digest,
    },
};

/// A new [`ConsistencyGroupStatus::decision_id`]: unique per status write (the time in nanoseconds and
/// a counter, in hex).
pub fn new_decision_id() -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos());
    let count = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{nanos:x}-{count:x}")
}

/// How many volumes the bounded status names (stragglers, hold timeouts); the rest are counted.
pub const NAMED: usize = 20;

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn acknowledged_at(member: &MemberVolumeStatus, epoch: u64, stage: Stage) -> bool {
    member
        .acknowledged
        .as_ref()
        .is_some_and(|ack| (ack.epoch, ack.stage) >= (epoch, stage))
}

fn frozen_at(member: &MemberVolumeStatus, epoch: u64) -> bool {
    epoch > 0 && acknowledged_at(member, epoch, Stage::Freeze)
}

fn state_name(member: &MemberVolumeStatus) -> String {
    member
        .state
        .map_or_else(|| "Unknown".to_owned(), |state| format!("{state:?}"))
}

/// What the group's status persists of the full status: no per-volume list, counts instead.
pub fn bounded(full: &ConsistencyGroupStatus) -> ConsistencyGroupStatus {
    let (epoch, stage) = full.position();
    let mut status = without_volume_lists(full);
    status.member_count = count(full.members.len());
    let mut counts = VolumeCounts::default();
    let mut clusters: BTreeMap<&str, (ClusterVolumeCounts, BTreeSet<&str>)> = BTreeMap::new();
    for member in &full.members {
        let acknowledged = acknowledged_at(member, epoch, stage);
        let frozen = frozen_at(member, epoch);
        counts.acknowledged += u32::from(acknowledged);
        counts.frozen += u32::from(frozen);
        *counts.by_state.entry(state_name(member)).or_default() += 1;
        let (cluster, nodes) = clusters.entry(&member.cluster).or_insert_with(|| {
            (
                ClusterVolumeCounts {
                    cluster: member.cluster.clone(),
                    ..ClusterVolumeCounts::default()
                },
                BTreeSet::new(),
            )
        });
        cluster.volumes += 1;
        cluster.acknowledged += u32::from(acknowledged);
        cluster.frozen += u32::from(frozen);
        match (&member.volume_handle, &member.node) {
            (Some(_), Some(node)) => {
                nodes.insert(node);
            }
            _ => cluster.unresolved += 1,
        }
    }
    counts.clusters = clusters
        .into_values()
        .map(|(mut cluster, nodes)| {
            cluster.nodes = count(nodes.len());
            cluster
        })
        .collect();
    status.volumes = (!full.members.is_empty()).then_some(counts);
    status.node_acknowledgements = node_acknowledgements(&full.members);
    status.stragglers = full
        .members
        .iter()
        .filter_map(|member| {
            let reason = if member.volume_handle.is_none() || member.node.is_none() {
                "Unresolved"
            } else if (epoch, stage) != (0, Stage::Resume) && !acknowledged_at(member, epoch, stage)
            {
                "NotAcknowledged"
            } else {
                return None;
            };
            Some(Straggler {
                cluster: member.cluster.clone(),
                namespace: member.namespace.clone(),
                pvc: member.pvc.clone(),
                node: member.node.clone(),
                reason: reason.to_owned(),
            })
        })
        .take(NAMED)
        .collect();
    status
}

/// A copy of `full` without its per-volume lists (members, the image's volumes, all but [`NAMED`] hold
/// timeouts), their sizes counted: copying thousands of volumes only to drop them costs more than the
/// rest of a decision.
fn without_volume_lists(full: &ConsistencyGroupStatus) -> ConsistencyGroupStatus {
    let ConsistencyGroupStatus {
        phase,
        epoch,
        stage,
        trigger,
        members: _,
        member_count,
        volumes,
        node_acknowledgements,
        stragglers,
        consistent_image,
        hold_timeouts,
        history,
        observed_generation,
        decision_id,
        conditions,
    } = full;
    ConsistencyGroupStatus {
        phase: *phase,
        epoch: *epoch,
        stage: *stage,
        trigger: trigger.clone(),
        members: Vec::new(),
        member_count: *member_count,
        volumes: volumes.clone(),
        node_acknowledgements: node_acknowledgements.clone(),
        stragglers: stragglers.clone(),
        consistent_image: consistent_image.as_ref().map(|image| ConsistentImage {
            epoch: image.epoch,
            volumes: Vec::new(),
            volume_count: count(image.volumes.len()),
        }),
        hold_timeouts: hold_timeouts.as_ref().map(|held| HoldTimeouts {
            epoch: held.epoch,
            failed_writes: held.failed_writes,
            volumes: held.volumes.iter().take(NAMED).cloned().collect(),
            volume_count: count(held.volumes.len()),
            since: held.since.clone(),
        }),
        history: history.clone(),
        observed_generation: *observed_generation,
        decision_id: decision_id.clone(),
        conditions: conditions.clone(),
    }
}

/// Whether two full statuses list the same volumes the same way: members, the image's volumes, the hold
/// timeouts per volume (what the bounded status only counts).
pub fn same_volumes(a: &ConsistencyGroupStatus, b: &ConsistencyGroupStatus) -> bool {
    a.members == b.members
        && a.consistent_image.as_ref().map(|image| &image.volumes)
            == b.consistent_image.as_ref().map(|image| &image.volumes)
        && a.hold_timeouts.as_ref().map(|held| &held.volumes)
            == b.hold_timeouts.as_ref().map(|held| &held.volumes)
}

/// Per node, the lowest acknowledgement over all of its member volumes, for that set of volumes (a node
/// with a volume that acknowledged nothing has none).
fn node_acknowledgements(members: &[MemberVolumeStatus]) -> Vec<NodeAcknowledgement> {
    let mut by_node: BTreeMap<(&str, &str), Vec<&MemberVolumeStatus>> = BTreeMap::new();
    for member in members {
        if let (Some(node), Some(_)) = (&member.node, &member.volume_handle) {
            by_node
                .entry((&member.cluster, node))
                .or_default()
                .push(member);
        }
    }
    by_node
        .into_iter()
        .filter_map(|((cluster, node), volumes)| {
            let lowest = volumes
                .iter()
                .map(|member| member.acknowledged.as_ref())
                .collect::<Option<Vec<_>>>()?
                .into_iter()
                .min_by_key(|ack| (ack.epoch, ack.stage))?
                .clone();
            Some(NodeAcknowledgement {
                cluster: cluster.to_owned(),
                node: node.to_owned(),
                volumes: count(volumes.len()),
                volume_set: volume_set_digest(
                    volumes.iter().filter_map(|m| m.volume_handle.as_deref()),
                ),
                epoch: lowest.epoch,
                stage: lowest.stage,
                path: lowest.path,
                fail_safe: volumes
                    .iter()
                    .any(|m| m.acknowledged.as_ref().is_some_and(|ack| ack.fail_safe)),
            })
        })
        .collect()
}

/// Gives each member the acknowledgement its node recorded for all of its volumes, when the node's
/// volumes are still exactly that set and the record is higher than what the member has.
fn apply_node_acknowledgements(members: &mut [MemberVolumeStatus], nodes: &[NodeAcknowledgement]) {
    let mut sets: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for member in members.iter() {
        if let (Some(node), Some(handle)) = (&member.node, &member.volume_handle) {
            sets.entry((member.cluster.clone(), node.clone()))
                .or_default()
                .push(handle.clone());
        }
    }
    for record in nodes {
        let key = (record.cluster.clone(), record.node.clone());
        let same_set = sets.get(&key).is_some_and(|handles| {
            handles.len() == record.volumes as usize
                && volume_set_digest(handles.iter().map(String::as_str)) == record.volume_set
        });
        if !same_set {
            continue;
        }
        for member in members.iter_mut().filter(|m| {
            m.cluster == record.cluster && m.node.as_deref() == Some(record.node.as_str())
        }) {
            let behind = member
                .acknowledged
                .as_ref()
                .is_none_or(|ack| (ack.epoch, ack.stage) < (record.epoch, record.stage));
            if behind {
                member.acknowledged = Some(Acknowledgement {
                    epoch: record.epoch,
                    stage: record.stage,
                    path: record.path,
                    fail_safe: record.fail_safe,
                    at: None,
                });
            }
        }
    }
}

/// The full status to decide on: the persisted (bounded) `read` with the per-volume parts of `record`,
/// the full status this operator decided last. Without a record, `read` as it is (a status written by an
/// operator before shards still lists its members).
pub fn hydrate(
    read: Option<ConsistencyGroupStatus>,
    record: Option<&ConsistencyGroupStatus>,
) -> Option<ConsistencyGroupStatus> {
    let (Some(mut status), Some(record)) = (read.clone(), record) else {
        return read;
    };
    status.members = record.members.clone();
    if let (Some(image), Some(known)) = (
        status.consistent_image.as_mut(),
        record.consistent_image.as_ref(),
    ) && image.epoch == known.epoch
    {
        image.volumes = known.volumes.clone();
    }
    if let (Some(held), Some(known)) =
        (status.hold_timeouts.as_mut(), record.hold_timeouts.as_ref())
        && held.epoch == known.epoch
    {
        held.volumes = known.volumes.clone();
    }
    Some(status)
}

/// One volume a shard lists: a member, a volume of the image, or both.
struct Entry<'a> {
    sort: (String, String, String),
    member: Option<&'a MemberVolumeStatus>,
    image_handle: Option<&'a str>,
}

/// The shards of a group's full status, by key: each member volume in the shard of its (cluster, node),
/// each volume of the consistent image beside it, at most [`SHARD_VOLUMES`] per shard.
pub fn shard_specs(
    group: &str,
    group_uid: &str,
    full: &ConsistencyGroupStatus,
) -> BTreeMap<ShardKey, ConsistencyGroupShardSpec> {
    let (epoch, _) = full.position();
    let image_epoch = full.consistent_image.as_ref().map(|image| image.epoch);
    let in_image: BTreeSet<(&str, &str)> = full
        .consistent_image
        .iter()
        .flat_map(|image| image.volumes.iter())
        .map(|volume| (volume.cluster.as_str(), volume.volume_handle.as_str()))
        .collect();
    let mut by_node: BTreeMap<(&str, Option<&str>), Vec<Entry<'_>>> = BTreeMap::new();
    let mut members_listed: BTreeSet<(&str, &str)> = BTreeSet::new();
    for member in &full.members {
        let handle = member.volume_handle.as_deref();
        if let Some(handle) = handle {
            members_listed.insert((&member.cluster, handle));
        }
        by_node
            .entry((&member.cluster, member.node.as_deref()))
            .or_default()
            .push(Entry {
                sort: (
                    member.namespace.clone(),
                    member.pvc.clone(),
                    handle.unwrap_or_default().to_owned(),
                ),
                member: Some(member),
                image_handle: handle.filter(|handle| in_image.contains(&(&member.cluster, handle))),
            });
    }
    // A volume of the image that is no member any more (it left the group) stays listed with its cluster.
    for (cluster, handle) in &in_image {
        if !members_listed.contains(&(*cluster, *handle)) {
            by_node.entry((cluster, None)).or_default().push(Entry {
                sort: (String::new(), String::new(), (*handle).to_owned()),
                member: None,
                image_handle: Some(handle),
            });
        }
    }
    let mut shards = BTreeMap::new();
    for ((cluster, node), mut entries) in by_node {
        entries.sort_by(|a, b| a.sort.cmp(&b.sort));
        for (part, chunk) in entries.chunks(SHARD_VOLUMES).enumerate() {
            let volumes: Vec<MemberVolumeStatus> =
                chunk.iter().filter_map(|e| e.member.cloned()).collect();
            let image_volume_handles: Vec<String> = chunk
                .iter()
                .filter_map(|e| e.image_handle.map(str::to_owned))
                .collect();
            let key = ShardKey {
                cluster: cluster.to_owned(),
                node: node.map(str::to_owned),
                part: u32::try_from(part).unwrap_or(u32::MAX),
            };
            let spec = ConsistencyGroupShardSpec {
                group: group.to_owned(),
                group_uid: group_uid.to_owned(),
                cluster: key.cluster.clone(),
                node: key.node.clone(),
                part: key.part,
                epoch,
                stage: full.stage,
                phase: full.phase,
                volume_count: count(volumes.len()),
                acknowledged_count: count(
                    volumes
                        .iter()
                        .filter(|m| acknowledged_at(m, epoch, Stage::Freeze) && epoch > 0)
                        .count(),
                ),
                suspended_count: count(
                    volumes
                        .iter()
                        .filter(|m| m.state == Some(lockstep_api::domain::VolumeState::Suspended))
                        .count(),
                ),
                image_epoch: image_epoch.filter(|_| !image_volume_handles.is_empty()),
                image_volume_count: count(image_volume_handles.len()),
                image_volume_handles,
                volumes,
            };
            shards.insert(key, spec);
        }
    }
    shards
}

/// Which nodes' membership differs between two sets of shards: the volume handles a node's sidecar must
/// enforce changed (such shards are written even while a freeze is being decided: a volume that joined
/// cannot acknowledge before its sidecar knows it is a member).
pub fn membership_changed(
    old: &BTreeMap<ShardKey, ConsistencyGroupShardSpec>,
    new: &BTreeMap<ShardKey, ConsistencyGroupShardSpec>,
) -> BTreeSet<ShardKey> {
    let handles =
        |spec: Option<&ConsistencyGroupShardSpec>| -> Vec<(String, String, Option<String>)> {
            spec.map(|spec| {
                spec.volumes
                    .iter()
                    .map(|m| (m.namespace.clone(), m.pvc.clone(), m.volume_handle.clone()))
                    .collect()
            })
            .unwrap_or_default()
        };
    old.keys()
        .chain(new.keys())
        .filter(|key| handles(old.get(key)) != handles(new.get(key)))
        .cloned()
        .collect()
}

/// The member volumes of a shard written at `written` (epoch, stage, resyncing), as a restore at
/// `now` (the group's persisted point) rebuilds them: a shard from before a freeze that began since has
/// that freeze's image membership worked out again from what it lists (DESIGN rule 7), as it was when the
/// freeze began; a shard further back has no image membership.
fn replayed(
    written: (u64, Stage, bool),
    volumes: Vec<MemberVolumeStatus>,
    now: (u64, Stage),
) -> Vec<MemberVolumeStatus> {
    let ((shard_epoch, shard_stage, resyncing), (epoch, stage)) = (written, now);
    let mut then = ConsistencyGroupStatus {
        epoch: shard_epoch,
        stage: Some(shard_stage),
        phase: resyncing.then_some(Phase::Resyncing),
        members: volumes,
        ..ConsistencyGroupStatus::default()
    };
    if (shard_epoch, shard_stage) < (epoch, Stage::Freeze) && stage != Stage::Resume {
        if shard_epoch + 1 == epoch {
            crate::freeze::begin_image(&mut then, epoch);
        } else {
            for member in &mut then.members {
                member.image_epoch = None;
            }
        }
    }
    then.members
}

/// Whether a restart would rebuild `target`'s image membership wrongly from the shard as last
/// `written`: a freeze that began after a state change the shard had not been written with yet. Such a
/// shard is written even while the group is Freezing (in steady state none is: the shards are current
/// when a freeze begins, and the freeze writes none).
pub fn image_behind(
    written: Option<&ConsistencyGroupShardSpec>,
    target: &ConsistencyGroupShardSpec,
) -> bool {
    let Some(written) = written else {
        return true;
    };
    let at = |spec: &ConsistencyGroupShardSpec| {
        (
            spec.epoch,
            spec.stage.unwrap_or(Stage::Resume),
            spec.phase == Some(Phase::Resyncing),
        )
    };
    let now = (target.epoch, target.stage.unwrap_or(Stage::Resume));
    let rebuilt = replayed(at(written), written.volumes.clone(), now);
    let images = |members: &[MemberVolumeStatus]| -> BTreeMap<(String, String), Option<u64>> {
        members
            .iter()
            .map(|m| ((m.namespace.clone(), m.pvc.clone()), m.image_epoch))
            .collect()
    };
    images(&rebuilt) != images(&target.volumes)
}

/// The full status rebuilt from the persisted `status` and the group's shards, after a restart or a
/// failover (the acknowledgements the shards missed come again: sidecars resend on every subscribe and
/// ReplicationNodes are read every round). Without shards, a member list in `status` (written by an
/// operator before shards) is taken as it is.
///
/// Shards written before the current freeze began carry the members' states from before it, which is
/// what decides whether a volume's secondary belongs to the freeze's image (DESIGN rule 7): the image
/// membership is worked out again from them, as it was when the freeze began. A freeze further back than
/// the one after the shards' epoch cannot be replayed so: its volumes are left out of the image (an
/// image that is too small is reported, never one that is too large).
pub fn restore(
    status: &ConsistencyGroupStatus,
    shards: &[ConsistencyGroupShardSpec],
) -> ConsistencyGroupStatus {
    let mut full = status.clone();
    if shards.is_empty() {
        apply_node_acknowledgements(&mut full.members, &status.node_acknowledgements);
        return full;
    }
    let mut members: Vec<MemberVolumeStatus> = Vec::new();
    let (epoch, stage) = status.position();
    // Shards written at different points are replayed point by point.
    let mut by_point: BTreeMap<(u64, Stage, bool), Vec<MemberVolumeStatus>> = BTreeMap::new();
    for shard in shards {
        let resyncing = shard.phase == Some(Phase::Resyncing);
        by_point
            .entry((shard.epoch, shard.stage.unwrap_or(Stage::Resume), resyncing))
            .or_default()
            .extend(shard.volumes.iter().cloned());
    }
    for ((shard_epoch, shard_stage, resyncing), volumes) in by_point {
        members.extend(replayed(
            (shard_epoch, shard_stage, resyncing),
            volumes,
            (epoch, stage),
        ));
    }
    members.sort_by(|a, b| {
        (&a.cluster, &a.namespace, &a.pvc).cmp(&(&b.cluster, &b.namespace, &b.pvc))
    });
    apply_node_acknowledgements(&mut members, &status.node_acknowledgements);
    full.members = members;
    if let Some(image) = full.consistent_image.as_mut() {
        let listed: Vec<ImageVolume> = shards
            .iter()
            .filter(|shard| shard.image_epoch == Some(image.epoch))
            .flat_map(|shard| {
                shard.image_volume_handles.iter().map(|handle| ImageVolume {
                    cluster: shard.cluster.clone(),
                    volume_handle: handle.clone(),
                })
            })
            .collect();
        image.volumes = if listed.len() == image.volume_count as usize {
            listed
        } else {
            // The shards predate the image: its volumes are the members whose image epoch it is (at the
            // freeze that made it, every such member acknowledged).
            full.members
                .iter()
                .filter(|member| member.image_epoch == Some(image.epoch))
                .filter_map(|member| {
                    Some(ImageVolume {
                        cluster: member.cluster.clone(),
                        volume_handle: member.volume_handle.clone()?,
                    })
                })
                .collect()
        };
        image.volumes.sort();
    }
    full
}

#[cfg(test)]
mod tests;
