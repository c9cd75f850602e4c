//! The Membership message: which groups have members in a node's cluster, pushed to its sidecars.

use lockstep_api::{domain::GroupEpoch, proto::control::v1 as pb, v1alpha1::ConsistencyGroup};

use crate::engine::Engine;

/// Sends each cluster with open sessions its membership, where it changed since it was last sent (a group
/// created, changed or deleted): a gRPC-only cluster learns its groups from nothing else.
pub fn push_memberships(engine: &Engine) {
    for cluster in engine.sessions().clusters() {
        let Some(membership) = membership(engine, &cluster) else {
            // Sent once complete, to every session of the cluster (those that joined meanwhile too).
            engine.sessions().forget_membership(&cluster);
            continue;
        };
        let sent = engine
            .sessions()
            .push_membership(&cluster, membership, None);
        if sent > 0 {
            tracing::info!(%cluster, sessions = sent, "membership changed; sent to the cluster's sidecars");
        }
    }
}

/// The Membership message for a node's cluster: every group with members there — or `None` while this
/// operator cannot list them all yet. A sidecar reads a group missing from a membership as deleted and
/// lets its volumes go, frozen or not; so an operator just started or failed over, whose hub groups are
/// not listed yet or whose groups' volumes are still in their shards, says nothing rather than "none".
pub(super) fn membership(engine: &Engine, cluster: &str) -> Option<pb::Membership> {
    let listed = engine.listed_groups()?;
    let has_member_here =
        |group: &ConsistencyGroup| group.spec.members.iter().any(|m| m.cluster == cluster);
    if listed
        .iter()
        .any(|group| has_member_here(group) && !engine.knows_members_of(group))
    {
        return None;
    }
    let groups = listed
        .iter()
        .filter_map(|group| {
            let uid = group.metadata.uid.clone()?;
            let members: Vec<pb::ResolvedVolume> = group
                .spec
                .members
                .iter()
                .filter(|member| member.cluster == cluster)
                .flat_map(|member| {
                    member
                        .pvc_names
                        .iter()
                        .flatten()
                        .map(|pvc| pb::ResolvedVolume {
                            namespace: member.namespace.clone(),
                            pvc: pvc.clone(),
                            ..pb::ResolvedVolume::default()
                        })
                })
                .chain(
                    engine
                        .member_volumes_of(&uid)
                        .iter()
                        .filter(|m| m.cluster == cluster)
                        .map(|member| pb::ResolvedVolume {
                            namespace: member.namespace.clone(),
                            pvc: member.pvc.clone(),
                            persistent_volume: member.persistent_volume.clone().unwrap_or_default(),
                            volume_handle: member.volume_handle.clone().unwrap_or_default(),
                        }),
                )
                .collect();
            if members.is_empty() {
                return None;
            }
            let (epoch, stage) = group.position();
            let hold_timeout_ms = lockstep_api::domain::parse_duration(&group.spec.hold_timeout)
                .map(|timeout| u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX))
                .unwrap_or(30_000);
            Some(pb::GroupMembership {
                group_name: group.metadata.name.clone().unwrap_or_default(),
                current: Some(pb::GroupEpoch::from(&GroupEpoch {
                    group_uid: uid,
                    epoch,
                    stage,
                })),
                hold_timeout_ms,
                volumes: members,
                created_unix_ms: group
                    .claim_order()
                    .map_or(0, |order| order.created_unix_ms()),
                in_sync_epoch: group.in_sync_at().unwrap_or(0),
            })
        })
        .collect();
    Some(pb::Membership { groups })
}
