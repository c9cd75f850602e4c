//! Issue 20, item 6: an operator restarted mid-freeze with a gRPC-only member. West is reached only over
//! gRPC (its sidecar dials out; the hub never reads its API server). West's copy fails, the group freezes,
//! west suspends and acknowledges over gRPC; east's node is cut off from both control paths, so the freeze
//! waits for it. The operator is killed and a new one starts while west's sidecar cannot reach it either:
//! the new operator's first resolutions find no sidecar of west. The freeze must still complete once the
//! nodes reach the operator again — west's acknowledgement kept, no sidecar restarted — and the
//! secondaries must hold a consistent image.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;
use common::{all_handles, finish, image, start};

use lockstep_api::domain::{Path, Policy, Stage};
use lockstep_api::v1alpha1::ConsistencyGroup;
use lockstep_e2e::faults::LinkCutMode;
use lockstep_e2e::scenario::{Setup, suspended_at};

/// What the group's status records west's node acknowledged for all its volumes: (epoch, stage) and
/// path.
fn west_acknowledged(group: &ConsistencyGroup) -> Option<(u64, Stage, Path)> {
    let ack = group
        .status
        .as_ref()?
        .node_acknowledgements
        .iter()
        .find(|n| n.cluster == "west")?;
    Some((ack.epoch, ack.stage, ack.path))
}

fn members_resolved(group: &ConsistencyGroup) -> Option<(String, String)> {
    let found = group
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "MembersResolved")?;
    Some((found.status.clone(), found.message.clone()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_operator_restarted_mid_freeze_keeps_a_grpc_only_members_acknowledgement_and_finishes_the_freeze()
 {
    let mut setup = Setup::new(Policy::FreezeAndGo).unwrap();
    setup.grpc_only = vec!["west".into()];
    setup.proxied = vec!["east".into(), "west".into()];
    // Room for the whole restart before a held write fails: this scenario is about acknowledgements.
    setup.world.group.spec.hold_timeout = "120s".into();
    let mut h = start(setup).await;

    // East cannot hear the freeze; west's copy fails, west freezes and acknowledges over gRPC.
    h.isolate("east", true).unwrap();
    h.cut(&["west-reporting"], LinkCutMode::Reset).unwrap();
    ok!(h, h.wait_for_copy_failure());
    let frozen_west = ok!(
        h,
        h.wait_group("west's acknowledgement of epoch 1 recorded", |g| {
            west_acknowledged(g)
                .is_some_and(|(epoch, stage, _)| (epoch, stage) == (1, Stage::Freeze))
        })
    );
    assert_eq!(
        frozen_west.position(),
        (1, Stage::Freeze),
        "{}",
        h.timeline.text()
    );
    assert_eq!(
        west_acknowledged(&frozen_west).map(|(_, _, path)| path),
        Some(Path::Grpc),
        "west has no other path\n{}",
        h.timeline.text()
    );
    ok!(
        h,
        h.wait_volume("west-reporting", "suspended at epoch 1", |s| suspended_at(
            s, 1
        ))
    );

    // The operator is killed mid-freeze, and west's node cannot reach the new one at first.
    h.isolate("west", true).unwrap();
    h.kill_operator();
    ok!(h, h.start_operator());
    let restarted = ok!(
        h,
        h.wait_group(
            "the new operator's resolution without west's sidecar",
            |g| {
                members_resolved(g).is_some_and(|(status, message)| {
                    status == "False" || message.contains("kept as last resolved")
                })
            }
        )
    );
    assert_eq!(
        west_acknowledged(&restarted).map(|(epoch, stage, _)| (epoch, stage)),
        Some((1, Stage::Freeze)),
        "the new operator kept west's acknowledgement\n{}",
        h.timeline.text()
    );

    // Both nodes reach the operator again (no sidecar restarted): the freeze completes and releases.
    h.isolate("west", false).unwrap();
    h.isolate("east", false).unwrap();
    let released = ok!(
        h,
        h.wait_group("released at epoch 1", |g| g.position()
            == (1, Stage::Release))
    );
    assert_eq!(
        image(&released),
        all_handles(&h),
        "{:?}\n{}",
        released.status.as_ref().map(|s| &s.members),
        h.timeline.text()
    );
    // West's replication state reaches the operator over gRPC too, so the resync can finish: the checker
    // on the secondaries, every acknowledged write on the primaries, then copies identical.
    finish(h).await;
}
