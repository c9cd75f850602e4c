//! Fault scenarios: every failure DESIGN.md claims the freeze survives, injected for real into simulated
//! clusters run by the real operator and sidecars (replication links cut by the link-cut proxy, a member
//! API server stopped, the gRPC path refused, a node cut off from both control paths, the operator, a
//! sidecar or a replicator killed by aborting it with no orderly shutdown, a claim joining the group
//! mid-freeze). Each ends with the consistency checker on the secondaries and a check that nothing
//! acknowledged was lost on the primaries, then resyncs and compares primaries with secondaries.
//!
//! They run on test API servers, or on real clusters when `LOCKSTEP_E2E_KUBECONFIGS` names them (see
//! the README); `the_scenarios_run_on_clusters_given_by_kubeconfig` takes that path in CI. A negative
//! control shows the fail-safe scenario catches a replicator that acknowledges writes while suspended.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod common;
use common::{all_handles, condition, finish, frozen, image, start, start_on};

use std::collections::BTreeMap;
use std::time::Duration;

use lockstep_api::domain::{Path, Phase, Policy, Stage};
use lockstep_api::v1alpha1::ConsistencyGroup;
use lockstep_e2e::cluster::VolumeSpec;
use lockstep_e2e::faults::LinkCutMode;
use lockstep_e2e::scenario::{GrpcPath, Harness, Setup, Target, suspended_at};
use lockstep_replicator::ReplMode;

/// Starts `setup`, cuts the replication links of `volumes` at once, and waits for the failed copy and
/// then for the group to reach `goal`.
async fn cut_until(
    setup: Setup,
    volumes: &[&str],
    how: LinkCutMode,
    what: &'static str,
    goal: impl Fn(&ConsistencyGroup) -> bool,
) -> (Harness, ConsistencyGroup) {
    let mut h = start(setup).await;
    h.cut(volumes, how).unwrap();
    ok!(h, h.wait_for_copy_failure());
    let group = ok!(h, h.wait_group(what, goal));
    (h, group)
}

/// The checker on the secondaries now must pass.
async fn assert_secondaries_consistent(h: &Harness) {
    let verdict = ok!(h, h.check_secondaries());
    assert!(verdict.is_consistent(), "{verdict}\n{}", h.timeline.text());
}

/// Released (FreezeAndGo) at an epoch past `from`.
fn released_after(from: u64) -> impl Fn(&ConsistencyGroup) -> bool {
    move |g| {
        let (epoch, stage) = g.position();
        epoch > from && stage == Stage::Release
    }
}

/// Every member acknowledged, and by which path, per cluster.
fn paths_by_cluster(group: &ConsistencyGroup) -> BTreeMap<String, Path> {
    group
        .status
        .iter()
        .flat_map(|s| s.members.iter())
        .filter_map(|m| Some((m.cluster.clone(), m.acknowledged.as_ref()?.path)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_link_cut_on_one_volume_freezes_the_group_and_the_secondaries_stay_consistent() {
    let mut h = start(Setup::new(Policy::FreezeAndGo).unwrap()).await;
    h.cut(&["east-postgres-data"], LinkCutMode::Reset).unwrap();
    let failed = ok!(h, h.wait_for_copy_failure());
    assert_eq!(failed, h.handle("east-postgres-data").unwrap());
    let group = ok!(h, h.wait_group("released", released_after(0)));
    assert_eq!(image(&group), all_handles(&h), "{}", h.timeline.text());
    // The primaries run on, unreplicated.
    ok!(h, h.wait_for_more_writes(30));
    finish(h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cuts_on_two_volumes_in_two_clusters_at_once_freeze_the_group_once_consistent() {
    let (mut h, group) = cut_until(
        Setup::new(Policy::FreezeAndGo).unwrap(),
        &["east-postgres-wal", "west-reporting"],
        LinkCutMode::Reset,
        "released",
        released_after(0),
    )
    .await;
    assert_eq!(image(&group), all_handles(&h), "{}", h.timeline.text());
    assert_secondaries_consistent(&h).await;
    ok!(h, h.wait_for_more_writes(30));
    finish(h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_a_member_api_server_down_when_the_link_fails_the_member_freezes_over_grpc() {
    let mut h = start(Setup::new(Policy::FreezeAndGo).unwrap()).await;
    if let Err(skipped) = h.api_server_control() {
        eprintln!("skipped: {}", skipped.0);
        return;
    }
    h.cluster("west").unwrap().stop_api_server().await.unwrap();
    h.timeline.say("fault: west's API server stopped");
    h.cut(&["east-postgres-data"], LinkCutMode::Reset).unwrap();
    ok!(h, h.wait_for_copy_failure());
    let group = ok!(h, h.wait_group("released", released_after(0)));
    assert_eq!(image(&group), all_handles(&h), "{}", h.timeline.text());
    assert_eq!(
        paths_by_cluster(&group).get("west"),
        Some(&Path::Grpc),
        "west heard the freeze over gRPC\n{}",
        h.timeline.text()
    );
    assert_secondaries_consistent(&h).await;
    h.cluster("west").unwrap().start_api_server().await.unwrap();
    h.timeline
        .say("fault cleared: west's API server started again");
    finish(h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_the_grpc_path_refused_every_member_freezes_through_the_api_servers() {
    let mut setup = Setup::new(Policy::FreezeAndGo).unwrap();
    setup.grpc = GrpcPath::Refused;
    let (h, group) = cut_until(
        setup,
        &["west-reporting"],
        LinkCutMode::Reset,
        "released",
        released_after(0),
    )
    .await;
    assert_eq!(image(&group), all_handles(&h), "{}", h.timeline.text());
    let trigger = group.status.as_ref().unwrap().trigger.clone().unwrap();
    assert_eq!(trigger.path, Some(Path::Api), "{}", h.timeline.text());
    for (cluster, path) in paths_by_cluster(&group) {
        assert_eq!(path, Path::Api, "{cluster}\n{}", h.timeline.text());
    }
    finish(h).await;
}

/// West's node loses both control paths and its replication link: after the fail-safe interval its
/// sidecar suspends west's volume itself. Returns the harness and the checker's verdict on the
/// secondaries once the workload has run on for a while with the node cut off. With
/// `break_replicator`, west's replicator acknowledges writes while suspended (the negative control).
async fn node_cut_off_from_both_paths(
    break_replicator: bool,
) -> (Harness, lockstep_checker::Verdict) {
    let mut setup = Setup::new(Policy::FreezeAndGo).unwrap();
    setup.proxied = vec!["west".into()];
    setup.fail_safe_interval = Duration::from_secs(2);
    let mut h = start(setup).await;
    let reporting = h.handle("west-reporting").unwrap();
    if break_replicator {
        h.cluster("west")
            .unwrap()
            .replicated_volume(&reporting)
            .unwrap()
            .break_ack_while_suspended();
        h.timeline
            .say("BROKEN on purpose: west's replicator acknowledges writes while suspended");
    }
    h.isolate("west", true).unwrap();
    h.cut(&["west-reporting"], LinkCutMode::Reset).unwrap();
    ok!(h, h.wait_for_copy_failure());
    let status = ok!(
        h,
        h.wait_volume("west-reporting", "suspended by the fail-safe", |s| {
            matches!(
                s.replication.mode,
                ReplMode::Suspended {
                    fail_safe: true,
                    ..
                }
            )
        })
    );
    assert_eq!(
        status.replication.epoch, 0,
        "the fail-safe suspends at the epoch last seen"
    );
    // The operator heard nothing: the other volumes replicate, and the lanes that avoid west run on.
    let group = h.world.group_now().await.unwrap();
    assert_eq!(group.position().0, 0, "{}", h.timeline.text());
    ok!(h, h.wait_for_more_writes(40));
    // East still replicates: stop the workload so that the secondaries stand still for the checker.
    ok!(h, h.stop_workload());
    let verdict = ok!(h, h.check_secondaries());
    (h, verdict)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_cut_off_from_both_paths_suspends_its_own_volumes_fail_safe() {
    let (h, verdict) = node_cut_off_from_both_paths(false).await;
    assert!(verdict.is_consistent(), "{verdict}\n{}", h.timeline.text());
    // Contact returns: the failure is reported, the group freezes at a higher epoch, which lifts the
    // fail-safe, and releases.
    h.isolate("west", false).unwrap();
    let group = ok!(h, h.wait_group("released", released_after(0)));
    assert_eq!(image(&group), all_handles(&h), "{}", h.timeline.text());
    finish(h).await;
}

/// The negative control: the same scenario with west's replicator broken on purpose (it acknowledges
/// writes while suspended, against DESIGN.md rule 2). Lanes write west primary-only and then east,
/// which still copies: the checker must find the secondaries inconsistent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn negative_control_a_replicator_acknowledging_while_suspended_makes_the_checker_fail() {
    let (mut h, verdict) = node_cut_off_from_both_paths(true).await;
    assert!(
        !verdict.is_consistent(),
        "the checker passed a replicator that acknowledges writes while suspended:\n{verdict}\n{}",
        h.timeline.text()
    );
    assert!(!verdict.gaps().is_empty(), "{verdict}");
    assert!(verdict.to_string().contains("INCONSISTENT"), "{verdict}");
    h.shutdown().await;
}

/// West's node is cut off from both control paths (its replication still works), then east's link is
/// cut: the operator freezes east, but cannot release until west acknowledges — mid-freeze.
async fn stuck_mid_freeze() -> Harness {
    let mut setup = Setup::new(Policy::FreezeAndGo).unwrap();
    setup.proxied = vec!["west".into()];
    let mut h = start(setup).await;
    h.isolate("west", true).unwrap();
    h.cut(&["east-postgres-wal"], LinkCutMode::Reset).unwrap();
    ok!(h, h.wait_for_copy_failure());
    let group = ok!(
        h,
        h.wait_group("freezing at epoch 1", |g| g.position()
            == (1, Stage::Freeze))
    );
    assert_ne!(
        group.status.as_ref().and_then(|s| s.phase),
        Some(Phase::Running),
        "{}",
        h.timeline.text()
    );
    for volume in ["east-postgres-wal", "east-postgres-data"] {
        ok!(
            h,
            h.wait_volume(volume, "suspended at epoch 1", |s| suspended_at(s, 1))
        );
    }
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_operator_killed_mid_freeze_is_replaced_and_the_new_one_finishes_the_freeze() {
    let mut h = stuck_mid_freeze().await;
    h.kill_operator();
    ok!(h, h.start_operator());
    h.isolate("west", false).unwrap();
    let group = ok!(h, h.wait_group("released", released_after(0)));
    assert_eq!(
        group.position(),
        (1, Stage::Release),
        "the new operator finished the same freeze\n{}",
        h.timeline.text()
    );
    assert_eq!(image(&group), all_handles(&h), "{}", h.timeline.text());
    let reporting = h
        .volume_status(&h.handle("west-reporting").unwrap())
        .unwrap();
    assert_eq!(reporting.replication.epoch, 1, "{}", h.timeline.text());
    finish(h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sidecar_killed_mid_freeze_restarts_and_re_enforces_the_freeze() {
    let mut h = stuck_mid_freeze().await;
    // East's sidecar has suspended east's volumes; kill it, and start a new one.
    h.kill_sidecar("east").unwrap();
    ok!(h, h.start_sidecar("east"));
    h.isolate("west", false).unwrap();
    let group = ok!(h, h.wait_group("released", released_after(0)));
    assert_eq!(
        group.position(),
        (1, Stage::Release),
        "{}",
        h.timeline.text()
    );
    assert_eq!(image(&group), all_handles(&h), "{}", h.timeline.text());
    // The new sidecar carried the freeze through: east's volumes released at epoch 1.
    for volume in ["east-postgres-wal", "east-postgres-data"] {
        ok!(
            h,
            h.wait_volume(volume, "running at epoch 1", |s| {
                matches!(s.replication.mode, ReplMode::Running { epoch: 1 })
            })
        );
    }
    finish(h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replicator_killed_while_suspended_restarts_suspended_and_holds_writes() {
    let (mut h, group) = cut_until(
        Setup::new(Policy::FreezeAndStop).unwrap(),
        &["west-reporting"],
        LinkCutMode::Reset,
        "frozen",
        frozen,
    )
    .await;
    let (epoch, _) = group.position();
    // Frozen under FreezeAndStop: every write is held, none acknowledged.
    let acked = h.acked();
    ok!(h, h.kill_replicator("east"));
    ok!(h, h.restart_replicator("east"));
    let wal = h.handle("east-postgres-wal").unwrap();
    let restarted = h.volume_status(&wal).unwrap();
    assert!(
        matches!(
            restarted.replication.mode,
            ReplMode::Unconfirmed | ReplMode::Suspended { .. }
        ),
        "fail closed: {restarted:?}"
    );
    assert_eq!(
        (restarted.replication.epoch, restarted.replication.stage),
        (epoch, Some(lockstep_replicator::Stage::Freeze))
    );
    for volume in ["east-postgres-wal", "east-postgres-data"] {
        ok!(
            h,
            h.wait_volume(volume, "confirmed, suspended", |s| suspended_at(s, epoch))
        );
    }
    // The workload reconnects and writes again (lane 0 writes only to east): held, not acknowledged.
    ok!(h, h.wait_held("east"));
    assert_eq!(h.acked(), acked, "{}", h.timeline.text());
    assert_secondaries_consistent(&h).await;
    finish(h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn freeze_and_stop_holds_every_write_until_released_through_the_spec() {
    let (mut h, group) = cut_until(
        Setup::new(Policy::FreezeAndStop).unwrap(),
        &["east-postgres-data"],
        LinkCutMode::Reset,
        "frozen",
        frozen,
    )
    .await;
    let (epoch, stage) = group.position();
    assert_eq!(stage, Stage::Freeze);
    assert_eq!(image(&group), all_handles(&h), "{}", h.timeline.text());
    let acked = h.acked();
    assert_secondaries_consistent(&h).await;
    // Still held: every volume suspended, nothing acknowledged since the freeze.
    for (_, v) in h.world.volumes() {
        let status = h.volume_status(&v.spec.handle).unwrap();
        assert!(suspended_at(&status, epoch), "{status:?}");
    }
    assert_eq!(h.acked(), acked);
    ok!(
        h,
        h.patch_spec(serde_json::json!({"release": {"epoch": epoch}}))
    );
    let released = ok!(
        h,
        h.wait_group("released", move |g| g.position() == (epoch, Stage::Release))
    );
    assert_eq!(
        released.status.as_ref().and_then(|s| s.phase),
        Some(Phase::Running)
    );
    ok!(h, h.wait_for_more_writes(30));
    finish(h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_resync_returns_to_replicating_with_primaries_and_secondaries_identical() {
    let (mut h, _) = cut_until(
        Setup::new(Policy::FreezeAndGo).unwrap(),
        &["west-reporting"],
        LinkCutMode::Blackhole,
        "released",
        released_after(0),
    )
    .await;
    // Unreplicated writes pile up as dirty regions.
    ok!(h, h.wait_for_more_writes(60));
    let reporting = h.handle("west-reporting").unwrap();
    assert!(h.volume_status(&reporting).unwrap().replication.dirty_bytes > 0);
    let volumes = all_handles(&h);
    let outcome = finish(h).await;
    assert_eq!(
        outcome.resynced.status.as_ref().and_then(|s| s.phase),
        Some(Phase::Replicating)
    );
    assert_eq!(outcome.resynced.position().1, Stage::Resume);
    assert_eq!(outcome.differences.len(), volumes.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_claim_joining_by_selector_during_a_freeze_is_suspended_at_the_current_epoch_first() {
    let mut setup = Setup::new(Policy::FreezeAndStop).unwrap();
    // A second claim in west, not yet labelled for the group.
    setup.world.clusters[1] = setup.world.clusters[1].clone().volume(
        VolumeSpec::new("west", "reporting-archive", 4 << 20)
            .label("app.kubernetes.io/name", "orders-archive"),
    );
    setup.joining_later = vec!["west-reporting-archive".into()];
    let (h, group) = cut_until(
        setup,
        &["east-postgres-wal"],
        LinkCutMode::Reset,
        "frozen",
        frozen,
    )
    .await;
    let (epoch, _) = group.position();
    let image_at_freeze = image(&group);
    let archive = h.handle("west-reporting-archive").unwrap();
    assert!(!image_at_freeze.contains(&archive));

    ok!(
        h,
        h.label_claim(
            "west",
            "reporting-archive",
            serde_json::json!({"app.kubernetes.io/name": "orders-reporting"})
        )
    );
    let joined = ok!(
        h,
        h.wait_group("the claim resolved as a member", |g| {
            g.status.as_ref().is_some_and(|s| s.member_count >= 4)
        })
    );
    // Rule 5: it is suspended at the current epoch before it counts.
    ok!(
        h,
        h.wait_volume(
            "west-reporting-archive",
            "suspended at the current epoch",
            |s| { suspended_at(s, epoch) }
        )
    );
    assert_eq!(joined.position().0, epoch, "{}", h.timeline.text());
    let frozen_now = ok!(
        h,
        h.wait_group("frozen again, the new member acknowledged", |g| {
            frozen(g) && g.status.as_ref().is_some_and(|s| s.member_count >= 4)
        })
    );
    let acknowledged = frozen_now
        .status
        .iter()
        .flat_map(|s| s.members.iter())
        .find(|m| m.volume_handle.as_deref() == Some(archive.as_str()))
        .and_then(|m| m.acknowledged.clone())
        .unwrap();
    assert_eq!(
        (acknowledged.epoch, acknowledged.stage),
        (epoch, Stage::Freeze)
    );
    // DESIGN.md rule 5: a late joiner stays outside the image of the freeze it joined during, until the
    // next resync; the group says so. Every volume in the image is suspended at the epoch, and the
    // checker over all four secondaries (the workload wrote to the new one before it joined) must pass.
    for handle in image(&frozen_now) {
        let status = h.volume_status(&handle).unwrap();
        assert!(suspended_at(&status, epoch), "{handle}: {status:?}");
    }
    assert_eq!(image(&frozen_now), image_at_freeze, "{}", h.timeline.text());
    assert_eq!(
        condition(&frozen_now, "ConsistentImage").as_deref(),
        Some("False"),
        "a member outside the image: no image of the whole group is claimed"
    );
    assert_secondaries_consistent(&h).await;
    let outcome = finish(h).await;
    let archive_member = outcome
        .resynced
        .status
        .iter()
        .flat_map(|s| s.members.iter())
        .find(|m| m.volume_handle.as_deref() == Some(archive.as_str()))
        .cloned();
    assert!(
        archive_member.is_some(),
        "after the resync the new member is a member, in sync (ConsistentImage=True, checked by finish)"
    );
}

/// The same scenario code against clusters named by kubeconfig, as with `LOCKSTEP_E2E_KUBECONFIGS`: here
/// two test API servers started by this test stand in for real clusters. A fault that needs control of
/// an API server is skipped there, with its reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_scenarios_run_on_clusters_given_by_kubeconfig() {
    let dir = tempfile::tempdir().unwrap();
    let mut servers = Vec::new();
    let mut kubeconfigs = Vec::new();
    for name in ["east", "west"] {
        let server = lockstep_testapi::TestApiServer::start(lockstep_testapi::Options::default())
            .await
            .unwrap();
        let path = dir.path().join(format!("{name}.kubeconfig"));
        server.write_kubeconfig(&path).unwrap();
        kubeconfigs.push(format!("{name}={}", path.display()));
        servers.push(server);
    }
    let target = Target::parse(&kubeconfigs.join(",")).unwrap();
    assert!(target.is_real());

    // Twice on the same clusters, as a user re-running the suite would: the second run reuses the first
    // run's node names, and must not be confused by what the first run left behind.
    for _ in 0..2 {
        let mut h = start_on(Setup::new(Policy::FreezeAndGo).unwrap(), target.clone()).await;
        assert!(h.on_real_clusters());
        assert!(h.cluster("west").unwrap().api.is_none());
        assert!(
            h.api_server_control()
                .unwrap_err()
                .0
                .contains("needs control of it"),
        );
        assert!(h.cluster("west").unwrap().stop_api_server().await.is_err());
        let data = h.handle("east-postgres-data").unwrap();
        assert_ne!(data, "east-postgres-data", "handles carry the run's suffix");
        h.cut(&["east-postgres-data"], LinkCutMode::Reset).unwrap();
        ok!(h, h.wait_for_copy_failure());
        let group = ok!(h, h.wait_group("released", released_after(0)));
        assert_eq!(image(&group), all_handles(&h), "{}", h.timeline.text());
        finish(h).await;
    }
    // Each run deleted what it created there: its group (through the operator's finalizer) and claims.
    let hub = servers[0].client().await.unwrap();
    let groups = kube::Api::<ConsistencyGroup>::all(hub.clone());
    assert!(
        groups
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
    let claims = kube::Api::<k8s_openapi::api::core::v1::PersistentVolumeClaim>::all(hub);
    assert!(
        claims
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
}
