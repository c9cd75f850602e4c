//! The bounded status, the shards and the record rebuilt from them.

#![allow(clippy::unwrap_used)]

use lockstep_api::{
    domain::{Path, Phase, Stage, VolumeState},
    v1alpha1::{
        Acknowledgement, ConsistencyGroupStatus, ConsistentImage, ImageVolume, MemberVolumeStatus,
    },
};

use super::*;

fn member(cluster: &str, index: usize, node: usize, state: VolumeState) -> MemberVolumeStatus {
    MemberVolumeStatus {
        cluster: cluster.into(),
        namespace: "orders".into(),
        pvc: format!("data-{index:05}"),
        persistent_volume: Some(format!("pv-{index:05}")),
        volume_handle: Some(format!("vol-{index:05}")),
        node: Some(format!("node-{node:03}")),
        state: Some(state),
        acknowledged: None,
        image_epoch: None,
    }
}

fn ack(member: &mut MemberVolumeStatus, epoch: u64, stage: Stage) {
    member.acknowledged = Some(Acknowledgement {
        epoch,
        stage,
        path: Path::Grpc,
        fail_safe: false,
        at: None,
    });
}

/// 10 000 volumes on 100 nodes of two clusters, frozen at epoch 3, all but 7 acknowledged.
fn large_frozen_group() -> ConsistencyGroupStatus {
    let mut members: Vec<MemberVolumeStatus> = (0..10_000)
        .map(|i| {
            let cluster = if i % 2 == 0 { "east" } else { "west" };
            let mut m = member(cluster, i, i % 50, VolumeState::Suspended);
            m.image_epoch = Some(3);
            if i >= 7 {
                ack(&mut m, 3, Stage::Freeze);
            }
            m
        })
        .collect();
    members[3].volume_handle = None; // one not resolved yet
    members[3].node = None;
    let image = members
        .iter()
        .filter(|m| m.acknowledged.is_some())
        .filter_map(|m| {
            Some(ImageVolume {
                cluster: m.cluster.clone(),
                volume_handle: m.volume_handle.clone()?,
            })
        })
        .collect();
    ConsistencyGroupStatus {
        phase: Some(Phase::Freezing),
        epoch: 3,
        stage: Some(Stage::Freeze),
        member_count: 10_000,
        members,
        consistent_image: Some(ConsistentImage {
            epoch: 3,
            volumes: image,
            volume_count: 0,
        }),
        ..ConsistencyGroupStatus::default()
    }
}

#[test]
fn the_bounded_status_of_ten_thousand_volumes_is_small_and_counts_them() {
    let full = large_frozen_group();
    let bounded = bounded(&full);
    let bytes = serde_json::to_vec(&bounded).unwrap().len();
    // Counts, 20 stragglers and one acknowledgement per node (50 nodes).
    assert!(bytes < 32 * 1024, "bounded status is {bytes} bytes");
    assert_eq!(
        bounded.node_acknowledgements.len(),
        44,
        "of 50 nodes, 6 have a volume that acknowledged nothing"
    );
    assert!(bounded.members.is_empty());
    let counts = bounded.volumes.as_ref().unwrap();
    assert_eq!(bounded.member_count, 10_000);
    assert_eq!(counts.frozen, 9_993);
    assert_eq!(counts.acknowledged, 9_993);
    assert_eq!(counts.by_state.get("Suspended"), Some(&10_000));
    let east = counts
        .clusters
        .iter()
        .find(|c| c.cluster == "east")
        .unwrap();
    assert_eq!((east.volumes, east.unresolved, east.nodes), (5_000, 0, 25));
    let west = counts
        .clusters
        .iter()
        .find(|c| c.cluster == "west")
        .unwrap();
    assert_eq!(west.unresolved, 1);
    assert_eq!(bounded.stragglers.len(), 7, "{:?}", bounded.stragglers);
    assert_eq!(bounded.stragglers[3].reason, "Unresolved");
    assert_eq!(bounded.stragglers[0].reason, "NotAcknowledged");
    let image = bounded.consistent_image.as_ref().unwrap();
    assert_eq!((image.epoch, image.volume_count), (3, 9_993));
    assert!(image.volumes.is_empty());
    // Whatever the volume count, the status grows only with clusters (stragglers are capped at 20).
    let size = |status: &ConsistencyGroupStatus| {
        serde_json::to_vec(&super::bounded(status)).unwrap().len()
    };
    let mut once = full.clone();
    once.members.retain(|m| m.acknowledged.is_some());
    let mut ten_times = once.clone();
    for _ in 0..9 {
        ten_times.members.extend(once.members.clone());
    }
    assert!(
        size(&ten_times) < size(&once) + 64,
        "{} vs {}",
        size(&ten_times),
        size(&once)
    );
}

#[test]
fn shards_list_every_volume_at_most_256_each_and_restore_the_record() {
    let full = large_frozen_group();
    let shards = shard_specs("orders", "uid-1", &full);
    let listed: usize = shards.values().map(|s| s.volumes.len()).sum();
    assert_eq!(listed, 10_000);
    assert!(shards.values().all(|s| s.volumes.len() <= SHARD_VOLUMES));
    assert_eq!(
        shards
            .values()
            .map(|s| s.image_volume_handles.len())
            .sum::<usize>(),
        9_993
    );
    for shard in shards.values() {
        let bytes = serde_json::to_vec(shard).unwrap().len();
        assert!(bytes < 1024 * 1024, "a shard of {bytes} bytes");
        assert!(shard.volumes.iter().all(|m| m.node == shard.node));
    }
    let specs: Vec<_> = shards.into_values().collect();
    let restored = restore(&bounded(&full), &specs);
    let mut expected = full.clone();
    expected.members.sort_by(|a, b| {
        (&a.cluster, &a.namespace, &a.pvc).cmp(&(&b.cluster, &b.namespace, &b.pvc))
    });
    expected.consistent_image.as_mut().unwrap().volumes.sort();
    expected.consistent_image.as_mut().unwrap().volume_count = 9_993;
    assert_eq!(restored.members, expected.members);
    assert_eq!(restored.consistent_image, expected.consistent_image);
}

#[test]
fn a_status_without_shards_keeps_the_members_an_older_operator_listed() {
    let legacy = large_frozen_group();
    assert_eq!(restore(&legacy, &[]), legacy);
    assert_eq!(hydrate(Some(legacy.clone()), None), Some(legacy));
}

#[test]
fn shards_from_before_a_freeze_put_in_its_image_the_volumes_in_sync_then() {
    // Written while replicating at epoch 4: one volume was resyncing.
    let mut before = ConsistencyGroupStatus {
        phase: Some(Phase::Replicating),
        epoch: 4,
        stage: Some(Stage::Resume),
        members: vec![
            member("east", 1, 1, VolumeState::Replicating),
            member("east", 2, 1, VolumeState::Resyncing),
        ],
        ..ConsistencyGroupStatus::default()
    };
    for m in &mut before.members {
        ack(m, 4, Stage::Resume);
    }
    let specs: Vec<_> = shard_specs("orders", "uid-1", &before)
        .into_values()
        .collect();
    // The operator restarted after persisting the freeze at epoch 5, before any shard was written again.
    let now = ConsistencyGroupStatus {
        phase: Some(Phase::Freezing),
        epoch: 5,
        stage: Some(Stage::Freeze),
        ..ConsistencyGroupStatus::default()
    };
    let restored = restore(&now, &specs);
    let image: Vec<_> = restored.members.iter().map(|m| m.image_epoch).collect();
    assert_eq!(image, vec![Some(5), None]);
    // Two freezes further on, nothing can be replayed: no volume is claimed for the image.
    let later = ConsistencyGroupStatus { epoch: 6, ..now };
    let restored = restore(&later, &specs);
    assert!(restored.members.iter().all(|m| m.image_epoch.is_none()));
}

#[test]
fn membership_changes_only_when_a_nodes_volumes_change() {
    let mut status = large_frozen_group();
    let old = shard_specs("orders", "uid-1", &status);
    status.members[10].state = Some(VolumeState::Running);
    ack(&mut status.members[10], 3, Stage::Release);
    let moved_state = shard_specs("orders", "uid-1", &status);
    assert!(membership_changed(&old, &moved_state).is_empty());
    status
        .members
        .push(member("east", 20_000, 7, VolumeState::Replicating));
    let joined = shard_specs("orders", "uid-1", &status);
    let changed = membership_changed(&old, &joined);
    assert_eq!(changed.len(), 1, "{changed:?}");
    assert_eq!(
        changed.iter().next().unwrap().node.as_deref(),
        Some("node-007")
    );
}

#[test]
fn hydrating_takes_the_volumes_from_the_record_and_the_decision_from_the_status() {
    let full = large_frozen_group();
    let mut persisted = bounded(&full);
    persisted.phase = Some(Phase::Frozen);
    let hydrated = hydrate(Some(persisted), Some(&full)).unwrap();
    assert_eq!(hydrated.phase, Some(Phase::Frozen));
    assert_eq!(hydrated.members, full.members);
    assert_eq!(
        hydrated.consistent_image.unwrap().volumes,
        full.consistent_image.unwrap().volumes
    );
}

#[test]
fn a_nodes_acknowledgement_comes_back_after_a_restart_only_for_the_same_volumes() {
    let mut frozen = ConsistencyGroupStatus {
        phase: Some(Phase::Freezing),
        epoch: 2,
        stage: Some(Stage::Freeze),
        members: vec![
            member("east", 1, 1, VolumeState::Suspended),
            member("east", 2, 1, VolumeState::Suspended),
            member("east", 3, 2, VolumeState::Suspended),
        ],
        ..ConsistencyGroupStatus::default()
    };
    ack(&mut frozen.members[0], 2, Stage::Freeze);
    ack(&mut frozen.members[1], 2, Stage::Freeze);
    // Shards from before the freeze (no acknowledgement of it), then the restart.
    let mut before = frozen.clone();
    before.epoch = 1;
    before.stage = Some(Stage::Resume);
    before.phase = Some(Phase::Replicating);
    for m in &mut before.members {
        m.acknowledged = None;
    }
    let shards: Vec<_> = shard_specs("orders", "uid-1", &before)
        .into_values()
        .collect();
    let persisted = bounded(&frozen);
    assert_eq!(
        persisted.node_acknowledgements.len(),
        1,
        "node-002 acknowledged nothing"
    );
    let restored = restore(&persisted, &shards);
    let acks: Vec<_> = restored
        .members
        .iter()
        .map(|m| m.acknowledged.as_ref().map(|a| (a.epoch, a.stage)))
        .collect();
    assert_eq!(
        acks,
        vec![Some((2, Stage::Freeze)), Some((2, Stage::Freeze)), None]
    );

    // A volume joined node-001 since: the record was for another set, and is not applied to it.
    let mut joined = before.clone();
    joined
        .members
        .push(member("east", 4, 1, VolumeState::Replicating));
    let shards: Vec<_> = shard_specs("orders", "uid-1", &joined)
        .into_values()
        .collect();
    let restored = restore(&persisted, &shards);
    assert!(
        restored.members.iter().all(|m| m.acknowledged.is_none()),
        "{:?}",
        restored.members
    );
}

#[test]
fn a_shard_written_before_its_volume_was_in_sync_is_written_again_when_a_freeze_begins() {
    // The shard was last written while the volume was still unconfirmed; it replicated in sync before
    // the freeze at epoch 1 began, so the freeze's image holds it.
    let replicating = |state| ConsistencyGroupStatus {
        phase: Some(Phase::Replicating),
        epoch: 0,
        stage: Some(Stage::Resume),
        members: vec![member("west", 1, 1, state)],
        ..ConsistencyGroupStatus::default()
    };
    let stale = shard_specs("orders", "uid-1", &replicating(VolumeState::Unconfirmed));
    let current = shard_specs("orders", "uid-1", &replicating(VolumeState::Replicating));
    let mut freezing = replicating(VolumeState::Replicating);
    crate::freeze::begin_image(&mut freezing, 1);
    freezing.epoch = 1;
    freezing.stage = Some(Stage::Freeze);
    freezing.phase = Some(Phase::Freezing);
    let target = shard_specs("orders", "uid-1", &freezing);
    let (key, spec) = target.iter().next().unwrap();
    assert_eq!(spec.volumes[0].image_epoch, Some(1));
    // A restart would rebuild the image without the volume from the stale shard: written again.
    assert!(image_behind(stale.get(key), spec));
    let rebuilt = restore(&freezing, &stale.values().cloned().collect::<Vec<_>>());
    assert_eq!(
        rebuilt.members[0].image_epoch, None,
        "the stale shard's image"
    );
    // From a current shard the restart rebuilds the same image: nothing to write during the freeze.
    assert!(!image_behind(current.get(key), spec));
    assert!(image_behind(None, spec), "never written");
}
